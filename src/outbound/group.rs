//! Groups: outbounds that carry no flow themselves but stand for one of
//! their members, chosen when a flow is decided.
//!
//! - `selector`: the member chosen by hand (the config's `default` today,
//!   an API later): [`Group::select`].
//! - `failover`: the first member whose health check passes, checked
//!   every `interval` by [`failover_watch`], a task the server runs.
//!
//! The choice is one [`AtomicUsize`] per group, so resolving a group on a
//! flow's path is one atomic load per level; health checks and a future
//! API write it without a lock or a policy swap.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use super::kinds::Kind;
use super::{
    BoxFuture, BuildError, Carrier, Context, DnsTransport, Outbound, OutboundError, TcpUpstream,
    UdpUpstream,
};

/// Seconds between a failover group's health checks unless set.
pub const DEFAULT_INTERVAL_SECS: u64 = 30;
/// Longest interval: a week, the bound of every duration in the config
/// (`config::MAX_TIMEOUT_SECS`).
pub const MAX_INTERVAL_SECS: u64 = 7 * 24 * 3600;

/// `[[outbounds]] type = "selector"` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSelector {
    pub name: Option<String>,
    #[serde(deserialize_with = "crate::one_or_many::vec")]
    pub outbounds: Vec<String>,
    pub default: Option<String>,
}

/// `[[outbounds]] type = "failover"` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFailover {
    pub name: Option<String>,
    #[serde(deserialize_with = "crate::one_or_many::vec")]
    pub outbounds: Vec<String>,
    /// Seconds between health checks.
    pub interval: Option<u64>,
}

/// A selector's settings, checked: one of `members`, chosen (at start:
/// `default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorSettings {
    pub members: Vec<String>,
    pub default: String,
}

/// A failover group's settings, checked: the first of `members` whose
/// health check passes, checked every `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverSettings {
    pub members: Vec<String>,
    pub interval: Duration,
}

fn check_members(key: &str, members: &[String], issue: &mut dyn FnMut(&str, String)) {
    if members.is_empty() {
        issue(
            &format!("{key}.outbounds"),
            "a group needs at least one outbound".into(),
        );
    }
}

impl RawSelector {
    /// The settings; problems go to `issue` (`key` names the outbound).
    /// Whether the members exist is the config's to check: it knows every
    /// name.
    pub fn validate(&self, key: &str, issue: &mut dyn FnMut(&str, String)) -> SelectorSettings {
        let outbounds = &self.outbounds;
        let default = match &self.default {
            Some(d) if !outbounds.contains(d) => {
                issue(
                    &format!("{key}.default"),
                    format!("{d:?} is not one of this selector's outbounds {outbounds:?}"),
                );
                d.clone()
            }
            Some(d) => d.clone(),
            None => outbounds.first().cloned().unwrap_or_default(),
        };
        check_members(key, outbounds, issue);
        SelectorSettings {
            members: outbounds.clone(),
            default,
        }
    }
}

impl RawFailover {
    /// The settings; problems go to `issue` (`key` names the outbound).
    pub fn validate(&self, key: &str, issue: &mut dyn FnMut(&str, String)) -> FailoverSettings {
        let secs = self.interval.unwrap_or(DEFAULT_INTERVAL_SECS);
        if secs == 0 || secs > MAX_INTERVAL_SECS {
            issue(
                &format!("{key}.interval"),
                format!("must be 1 to {MAX_INTERVAL_SECS} seconds"),
            );
        }
        check_members(key, &self.outbounds, issue);
        FailoverSettings {
            members: self.outbounds.clone(),
            interval: Duration::from_secs(secs.clamp(1, MAX_INTERVAL_SECS)),
        }
    }
}

impl Kind for SelectorSettings {
    type Raw = RawSelector;
    type Built = Group;
    const TYPE: &'static str = "selector";

    fn validate(
        raw: &RawSelector,
        key: &str,
        _: &dyn Fn(&str) -> Option<String>,
        issue: &mut dyn FnMut(&str, String),
    ) -> SelectorSettings {
        raw.validate(key, issue)
    }

    fn members(&self) -> &[String] {
        &self.members
    }

    fn describe(&self) -> String {
        format!("{}({})", Self::TYPE, self.members.join(", "))
    }

    /// The selector named `name` over `members` (built, in order).
    fn build(&self, name: &str, _: &Context, members: Vec<Member>) -> Result<Group, BuildError> {
        let initial = self
            .members
            .iter()
            .position(|m| *m == self.default)
            .unwrap_or(0);
        Ok(Group::new(
            name.to_string(),
            GroupKind::Selector,
            members,
            initial,
        )?)
    }
}

impl Kind for FailoverSettings {
    type Raw = RawFailover;
    type Built = Group;
    const TYPE: &'static str = "failover";

    fn validate(
        raw: &RawFailover,
        key: &str,
        _: &dyn Fn(&str) -> Option<String>,
        issue: &mut dyn FnMut(&str, String),
    ) -> FailoverSettings {
        raw.validate(key, issue)
    }

    fn members(&self) -> &[String] {
        &self.members
    }

    fn describe(&self) -> String {
        format!("{}({})", Self::TYPE, self.members.join(", "))
    }

    /// The failover group named `name` over `members` (built, in order).
    fn build(&self, name: &str, _: &Context, members: Vec<Member>) -> Result<Group, BuildError> {
        let kind = GroupKind::Failover {
            interval: self.interval,
        };
        Ok(Group::new(name.to_string(), kind, members, 0)?)
    }
}

/// One member of a group: another outbound of the policy.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    /// Index among the policy's outbounds.
    pub index: usize,
    pub outbound: Arc<Outbound>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Selector,
    Failover { interval: Duration },
}

impl GroupKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            GroupKind::Selector => <SelectorSettings as Kind>::TYPE,
            GroupKind::Failover { .. } => <FailoverSettings as Kind>::TYPE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("group {group:?} has no members")]
    Empty { group: String },
    #[error("{member:?} is not a member of group {group:?}")]
    NotMember { group: String, member: String },
    #[error("group {group:?} is a failover group: its health checks choose the member")]
    NotSelector { group: String },
}

/// A built group: stands for one of its members; the policy resolves it
/// per flow.
pub struct Group {
    pub name: String,
    pub kind: GroupKind,
    /// Never empty ([`Group::new`] refuses that).
    members: Vec<Member>,
    /// Position in `members` of the member new flows go to.
    selected: AtomicUsize,
    /// What the last health check said of each member, for the API and
    /// the metrics (failover groups only; selectors are never checked).
    health: Vec<MemberHealth>,
}

/// A member's last health check: not yet (0), up or down, and how long
/// the check took.
#[derive(Debug, Default)]
struct MemberHealth {
    state: AtomicU8,
    delay_ms: AtomicU32,
}

const HEALTH_UP: u8 = 1;
const HEALTH_DOWN: u8 = 2;

/// A member's last health check as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedHealth {
    pub up: bool,
    /// How long the check took, when it passed.
    pub delay_ms: Option<u32>,
}

impl fmt::Debug for Group {
    // Members are printed by name: their outbounds are printed elsewhere.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field(
                "members",
                &self.members.iter().map(|m| &m.name).collect::<Vec<_>>(),
            )
            .field("selected", &self.selected().name)
            .finish()
    }
}

impl Group {
    /// A group starting on `members[initial]` (the first if out of range).
    pub fn new(
        name: String,
        kind: GroupKind,
        members: Vec<Member>,
        initial: usize,
    ) -> Result<Group, GroupError> {
        if members.is_empty() {
            return Err(GroupError::Empty { group: name });
        }
        let initial = if initial < members.len() { initial } else { 0 };
        let health = members.iter().map(|_| MemberHealth::default()).collect();
        Ok(Group {
            name,
            kind,
            members,
            selected: AtomicUsize::new(initial),
            health,
        })
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member new flows go to now.
    pub fn selected(&self) -> &Member {
        // Relaxed: the index is the only data; members never change.
        let i = self.selected.load(Ordering::Relaxed);
        // In range by construction; the fallback only keeps this total.
        self.members.get(i).unwrap_or(&self.members[0])
    }

    /// What the last health check said of member `i`; None before the
    /// first check (and always for a selector).
    pub fn health(&self, i: usize) -> Option<CheckedHealth> {
        let h = self.health.get(i)?;
        match h.state.load(Ordering::Relaxed) {
            HEALTH_UP => Some(CheckedHealth {
                up: true,
                delay_ms: Some(h.delay_ms.load(Ordering::Relaxed)),
            }),
            HEALTH_DOWN => Some(CheckedHealth {
                up: false,
                delay_ms: None,
            }),
            _ => None,
        }
    }

    fn record_health(&self, i: usize, up: bool, took: Duration) {
        if let Some(h) = self.health.get(i) {
            let ms = u32::try_from(took.as_millis()).unwrap_or(u32::MAX);
            h.delay_ms.store(ms, Ordering::Relaxed);
            h.state
                .store(if up { HEALTH_UP } else { HEALTH_DOWN }, Ordering::Relaxed);
        }
    }

    /// Chooses the member of a selector by name (from the API).
    pub fn select(&self, member: &str) -> Result<(), GroupError> {
        if self.kind != GroupKind::Selector {
            return Err(GroupError::NotSelector {
                group: self.name.clone(),
            });
        }
        let i = self
            .members
            .iter()
            .position(|m| m.name == member)
            .ok_or_else(|| GroupError::NotMember {
                group: self.name.clone(),
                member: member.to_string(),
            })?;
        self.selected.store(i, Ordering::Relaxed);
        Ok(())
    }
}

/// The policy hands out leaves; a group reached anyway goes to its member
/// of the moment.
impl Carrier for Group {
    /// Carries nothing itself.
    const UDP_HEADER: usize = 0;

    fn type_name(&self) -> &'static str {
        self.kind.type_name()
    }

    fn clash_type(&self) -> &'static str {
        match self.kind {
            GroupKind::Selector => "Selector",
            GroupKind::Failover { .. } => "Fallback",
        }
    }

    fn udp(&self) -> bool {
        true
    }

    fn udp_refusal(&self) -> Option<OutboundError> {
        self.selected().outbound.udp_refusal()
    }

    /// DNS goes by the member's key, which a group does not have.
    fn dns_transport(&self) -> DnsTransport {
        DnsTransport::Udp
    }

    // Boxed: the member may be a group again.
    fn connect_tcp<'a>(
        &'a self,
        dst: SocketAddr,
        host: Option<&'a str>,
    ) -> impl Future<Output = Result<TcpUpstream, OutboundError>> + Send + 'a {
        let member = Arc::clone(&self.selected().outbound);
        let boxed: BoxFuture<'a, _> = Box::pin(async move { member.connect_tcp(dst, host).await });
        boxed
    }

    fn connect_tcp_named<'a>(
        &'a self,
        name: &'a str,
        port: u16,
        real: &'a dyn crate::outbound::ResolveReal,
    ) -> impl Future<Output = Result<TcpUpstream, OutboundError>> + Send + 'a {
        let member = Arc::clone(&self.selected().outbound);
        let boxed: BoxFuture<'a, _> =
            Box::pin(async move { member.connect_tcp_named(name, port, real).await });
        boxed
    }

    fn open_udp(&self) -> impl Future<Output = Result<UdpUpstream, OutboundError>> + Send + '_ {
        let member = Arc::clone(&self.selected().outbound);
        let boxed: BoxFuture<'_, _> = Box::pin(async move { member.open_udp().await });
        boxed
    }

    fn udp_by_name(&self) -> bool {
        self.selected().outbound.udp_by_name()
    }

    /// Its members are checked on their own.
    async fn probe(&self) -> Result<(), OutboundError> {
        Ok(())
    }
}

/// The outbound that would carry a flow sent to `outbound` now: itself,
/// or for a group its selected member, through nested groups.
pub fn leaf(outbound: &Arc<Outbound>) -> Arc<Outbound> {
    let mut current = Arc::clone(outbound);
    // Bounded: validation forbids cycles; the bound keeps a bug from
    // turning into a hang.
    for _ in 0..64 {
        let next = match &*current {
            Outbound::Group(g) => Arc::clone(&g.selected().outbound),
            _ => break,
        };
        current = next;
    }
    current
}

/// What the last check said of a member.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Unknown,
    Up,
    Down(String),
}

/// A line for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    warn: bool,
    message: String,
}

/// What a failover group remembers between rounds of checks.
#[derive(Debug)]
struct FailoverState {
    health: Vec<Health>,
    all_down: bool,
}

impl Group {
    /// Takes one round of check results (one per member, in order), moves
    /// the selection to the first member that passed and says what
    /// changed. With every member down the selection stays: there is no
    /// better choice, and the first to come back takes over.
    fn apply(&self, state: &mut FailoverState, results: Vec<Result<(), String>>) -> Vec<Event> {
        let mut events = Vec::new();
        let g = &self.name;
        let before = self.selected.load(Ordering::Relaxed);
        let first_up = results.iter().position(Result::is_ok);
        let after = first_up.unwrap_or(before);
        let now: Vec<Health> = results
            .into_iter()
            .map(|r| r.map_or_else(Health::Down, |()| Health::Up))
            .collect();
        let name = |i: usize| self.members.get(i).map_or("?", |m| m.name.as_str());

        if after != before {
            self.selected.store(after, Ordering::Relaxed);
            match now.get(before) {
                Some(Health::Down(e)) => events.push(Event {
                    warn: true,
                    message: format!(
                        "failover {g:?}: {} down ({e}), new flows go to {}",
                        name(before),
                        name(after)
                    ),
                }),
                _ => events.push(Event {
                    warn: false,
                    message: format!(
                        "failover {g:?}: {} is back up, new flows go to {}",
                        name(after),
                        name(after)
                    ),
                }),
            }
        }
        match first_up {
            None if !state.all_down => {
                state.all_down = true;
                let why = now
                    .iter()
                    .enumerate()
                    .filter_map(|(i, h)| match h {
                        Health::Down(e) => Some(format!("{}: {e}", name(i))),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                events.push(Event {
                    warn: true,
                    message: format!(
                        "failover {g:?}: every member is down ({why}); new flows stay on {} and \
                         fail until one is back",
                        name(after)
                    ),
                });
            }
            Some(_) if state.all_down => {
                state.all_down = false;
                if after == before {
                    events.push(Event {
                        warn: false,
                        message: format!(
                            "failover {g:?}: {} is back up, new flows go to {}",
                            name(after),
                            name(after)
                        ),
                    });
                }
            }
            _ => {}
        }
        // Members other than the ones named above: a backup going down is
        // worth knowing before it is needed.
        for (i, h) in now.iter().enumerate() {
            let was = state.health.get(i).cloned().unwrap_or(Health::Unknown);
            if i == before || i == after || state.all_down {
                continue;
            }
            match (&was, h) {
                (Health::Up | Health::Unknown, Health::Down(e)) => events.push(Event {
                    warn: true,
                    message: format!(
                        "failover {g:?}: {} down ({e}); new flows stay on {}",
                        name(i),
                        name(after)
                    ),
                }),
                (Health::Down(_), Health::Up) => events.push(Event {
                    warn: false,
                    message: format!(
                        "failover {g:?}: {} is back up; new flows stay on {}",
                        name(i),
                        name(after)
                    ),
                }),
                _ => {}
            }
        }
        state.health = now;
        events
    }
}

/// The task that keeps a failover group on its first healthy member:
/// checks every member every `interval` (all at once, each bounded by the
/// connect timeout) and moves the selection. None for other outbounds.
/// The server spawns it and aborts it when it stops.
pub fn failover_watch(outbound: Arc<Outbound>) -> Option<impl Future<Output = ()> + Send> {
    let interval = match &*outbound {
        Outbound::Group(g) => match g.kind {
            GroupKind::Failover { interval } => interval,
            GroupKind::Selector => return None,
        },
        _ => return None,
    };
    Some(async move {
        let Outbound::Group(group) = &*outbound else {
            return;
        };
        let mut state = FailoverState {
            health: vec![Health::Unknown; group.members.len()],
            all_down: false,
        };
        let mut tick = tokio::time::interval(interval);
        // A round slower than the interval (a member timing out) must not
        // be followed by a burst of catch-up rounds.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let checks = group.members.iter().enumerate().map(|(i, m)| async move {
                // A member that is itself a group is as healthy as the
                // member it stands for now.
                let started = std::time::Instant::now();
                let result = leaf(&m.outbound).probe().await.map_err(|e| e.to_string());
                group.record_health(i, result.is_ok(), started.elapsed());
                result
            });
            let results = futures_util::future::join_all(checks).await;
            for event in group.apply(&mut state, results) {
                if event.warn {
                    warn!("{}", event.message);
                } else {
                    info!("{}", event.message);
                }
            }
            debug!(group = %group.name, selected = %group.selected().name, "failover checked");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(kind: GroupKind, names: &[&str]) -> Group {
        let members = names
            .iter()
            .enumerate()
            .map(|(index, n)| Member {
                name: n.to_string(),
                index,
                outbound: Arc::new(Outbound::Block(crate::outbound::block::Block)),
            })
            .collect();
        Group::new("auto".into(), kind, members, 0).unwrap()
    }

    fn failover(names: &[&str]) -> (Group, FailoverState) {
        let g = group(
            GroupKind::Failover {
                interval: Duration::from_secs(1),
            },
            names,
        );
        let state = FailoverState {
            health: vec![Health::Unknown; names.len()],
            all_down: false,
        };
        (g, state)
    }

    fn down(e: &str) -> Result<(), String> {
        Err(e.to_string())
    }

    fn messages(events: &[Event]) -> Vec<(bool, &str)> {
        events
            .iter()
            .map(|e| (e.warn, e.message.as_str()))
            .collect()
    }

    #[test]
    fn the_last_health_check_of_each_member_is_kept() {
        let (g, _) = failover(&["a", "b"]);
        assert_eq!(g.health(0), None);
        g.record_health(0, true, Duration::from_millis(12));
        g.record_health(1, false, Duration::from_secs(3));
        assert_eq!(
            g.health(0),
            Some(CheckedHealth {
                up: true,
                delay_ms: Some(12)
            })
        );
        assert_eq!(
            g.health(1),
            Some(CheckedHealth {
                up: false,
                delay_ms: None
            })
        );
        assert_eq!(g.health(2), None);
    }

    #[test]
    fn selector_chooses_by_name_and_failover_refuses_it() {
        let s = group(GroupKind::Selector, &["a", "b"]);
        assert_eq!(s.selected().name, "a");
        s.select("b").unwrap();
        assert_eq!(s.selected().name, "b");
        assert!(matches!(s.select("c"), Err(GroupError::NotMember { .. })));
        let (f, _) = failover(&["a", "b"]);
        assert!(matches!(f.select("b"), Err(GroupError::NotSelector { .. })));
        assert!(matches!(
            Group::new("x".into(), GroupKind::Selector, vec![], 0),
            Err(GroupError::Empty { .. })
        ));
    }

    #[test]
    fn failover_moves_to_the_first_healthy_member_and_back() {
        let (g, mut st) = failover(&["proxy-a", "proxy-b", "direct"]);
        assert!(g.apply(&mut st, vec![Ok(()), Ok(()), Ok(())]).is_empty());
        assert_eq!(g.selected().name, "proxy-a");

        let ev = g.apply(&mut st, vec![down("connect refused"), Ok(()), Ok(())]);
        assert_eq!(
            messages(&ev),
            [(
                true,
                "failover \"auto\": proxy-a down (connect refused), new flows go to proxy-b"
            )]
        );
        assert_eq!(g.selected().name, "proxy-b");
        // No change, no line.
        assert!(g
            .apply(&mut st, vec![down("connect refused"), Ok(()), Ok(())])
            .is_empty());

        let ev = g.apply(&mut st, vec![Ok(()), Ok(()), Ok(())]);
        assert_eq!(
            messages(&ev),
            [(
                false,
                "failover \"auto\": proxy-a is back up, new flows go to proxy-a"
            )]
        );
        assert_eq!(g.selected().name, "proxy-a");

        // A backup going down is told too, without a switch.
        let ev = g.apply(&mut st, vec![Ok(()), down("timed out"), Ok(())]);
        assert_eq!(
            messages(&ev),
            [(
                true,
                "failover \"auto\": proxy-b down (timed out); new flows stay on proxy-a"
            )]
        );
        assert_eq!(g.selected().name, "proxy-a");
    }

    #[test]
    fn with_every_member_down_the_selection_stays_until_one_is_back() {
        let (g, mut st) = failover(&["a", "b"]);
        let ev = g.apply(&mut st, vec![down("refused"), down("refused")]);
        assert_eq!(
            messages(&ev),
            [(
                true,
                "failover \"auto\": every member is down (a: refused; b: refused); new flows stay \
                 on a and fail until one is back"
            )]
        );
        assert_eq!(g.selected().name, "a");
        assert!(g
            .apply(&mut st, vec![down("refused"), down("refused")])
            .is_empty());
        let ev = g.apply(&mut st, vec![down("refused"), Ok(())]);
        assert_eq!(
            messages(&ev),
            [(
                true,
                "failover \"auto\": a down (refused), new flows go to b"
            )]
        );
        assert_eq!(g.selected().name, "b");
    }

    #[test]
    fn leaf_follows_nested_groups() {
        let inner = Arc::new(Outbound::Group(group(GroupKind::Selector, &["x", "y"])));
        if let Outbound::Group(g) = &*inner {
            g.select("y").unwrap();
        }
        let outer = Arc::new(Outbound::Group(
            Group::new(
                "outer".into(),
                GroupKind::Selector,
                vec![Member {
                    name: "inner".into(),
                    index: 9,
                    outbound: Arc::clone(&inner),
                }],
                0,
            )
            .unwrap(),
        ));
        let Outbound::Group(g) = &*inner else {
            unreachable!()
        };
        assert!(Arc::ptr_eq(&leaf(&outer), &g.members()[1].outbound));
        let direct = Arc::new(Outbound::Block(crate::outbound::block::Block));
        assert!(Arc::ptr_eq(&leaf(&direct), &direct));
    }
}
