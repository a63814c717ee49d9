//! The policy new flows read: the outbounds by name, the rules that pick
//! one, and `route.final` for flows no rule matches.
//!
//! A flow is described by a [`FlowMeta`] (transport, client, original
//! destination, and what sniffing found); [`Policy::decide`] walks the
//! rules in order and returns the first match's outbound. Building a
//! policy checks everything that can only be checked against the system
//! (rule-set files, regexes), so a bad policy is refused at start, never
//! discovered by a flow.

pub mod rule_set;
pub mod rules;
pub mod sniff;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Config, Network, OutboundConfig, OutboundKind, SniffProtocol};
use crate::outbound::group::{Group, GroupKind, Member};
use crate::outbound::{BuildError, Outbound};
use rules::Rules;

/// What the policy knows about a flow when it decides.
#[derive(Debug, Clone, Copy)]
pub struct FlowMeta<'a> {
    pub network: Network,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The host name sniffed from the flow's first bytes (TLS SNI, HTTP
    /// Host), lowercased; None when there was none (the router then looks
    /// for a name learned from DNS answers, see `Router::decide`).
    pub domain: Option<&'a str>,
    pub protocol: Option<SniffProtocol>,
}

impl<'a> FlowMeta<'a> {
    /// A flow known by its addresses only.
    pub fn addresses(network: Network, src: SocketAddr, dst: SocketAddr) -> Self {
        FlowMeta {
            network,
            src,
            dst,
            domain: None,
            protocol: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("outbound {name:?}: {source}")]
    Outbound { name: String, source: BuildError },
    #[error("route.rules[{index}]: {message}")]
    Rule { index: usize, message: String },
    #[error("route.rule_sets[{index}] ({name}): {message}")]
    RuleSet {
        index: usize,
        name: String,
        message: String,
    },
}

/// One outbound the policy can choose, with the name the config gave it.
#[derive(Debug)]
pub struct Named {
    pub name: String,
    pub outbound: Arc<Outbound>,
}

/// Where a decision sends a flow.
#[derive(Debug, Clone)]
pub struct Choice {
    /// What carries the flow: the outbound the rule names or, when that is
    /// a group, the member it resolves to now (through nested groups).
    pub outbound: Arc<Outbound>,
    /// Index of `outbound` among the policy's outbounds (for its name).
    pub index: usize,
    /// The groups passed on the way, outermost (the rule's target) first;
    /// empty when the rule named `outbound` itself.
    pub chain: Chain,
    /// The rule that matched; None: `route.final`.
    pub rule: Option<usize>,
}

/// Most groups a [`Chain`] records; deeper nesting still resolves, only
/// the log line names fewer groups.
pub const MAX_CHAIN: usize = 8;

/// The groups a decision passed through, kept inline: the UDP relay decides
/// per datagram, and an allocation each time would be its largest cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chain {
    len: u8,
    groups: [u32; MAX_CHAIN],
}

impl Chain {
    fn push(&mut self, index: usize) {
        if let (Some(slot), Ok(i)) = (self.groups.get_mut(self.len as usize), u32::try_from(index))
        {
            *slot = i;
            self.len += 1;
        }
    }

    /// Outbound indices of the groups, outermost first.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.groups[..self.len as usize].iter().map(|&i| i as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A choice for a log line: `auto/proxy-b`, or `proxy` without groups.
pub struct Route<'a> {
    policy: &'a Policy,
    choice: &'a Choice,
}

impl fmt::Display for Route<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for g in self.choice.chain.iter() {
            write!(f, "{}/", self.policy.name(g))?;
        }
        f.write_str(self.policy.name(self.choice.index))
    }
}

/// The outbounds and the rules, built from a validated config.
#[derive(Debug)]
pub struct Policy {
    outbounds: Vec<Named>,
    rules: Rules,
    /// Outbound index of each rule, in rule order.
    rule_targets: Vec<usize>,
    final_index: usize,
}

impl Policy {
    pub fn from_config(cfg: &Config) -> Result<Policy, PolicyError> {
        let index_of: HashMap<&str, usize> = cfg
            .outbounds
            .iter()
            .enumerate()
            .map(|(i, o)| (o.name.as_str(), i))
            .collect();
        let outbounds = build_outbounds(cfg, &index_of)?;
        // Validation guarantees every name below exists.
        let lookup = |name: &str| index_of.get(name).copied().unwrap_or(0);
        let rules = Rules::build(&cfg.route)?;
        let rule_targets = cfg
            .route
            .rules
            .iter()
            .map(|r| lookup(&r.outbound))
            .collect();
        Ok(Policy {
            final_index: lookup(&cfg.route.final_outbound),
            outbounds,
            rules,
            rule_targets,
        })
    }

    /// Builds what `from_config` builds that can fail on the system alone
    /// (rule-set files, regexes), without the outbounds: what `tproxyd
    /// check` runs, so a bad file or regex is reported before a start.
    pub fn check(cfg: &Config) -> Result<(), PolicyError> {
        Rules::build(&cfg.route).map(|_| ())
    }

    /// One outbound for every flow, named by its type; no rules.
    pub fn single(outbound: Outbound) -> Policy {
        Policy {
            outbounds: vec![Named {
                name: outbound.name().to_string(),
                outbound: Arc::new(outbound),
            }],
            rules: Rules::default(),
            rule_targets: Vec::new(),
            final_index: 0,
        }
    }

    /// The outbound for a flow: the first rule that matches, else final;
    /// a group resolved to its member of the moment.
    pub fn decide(&self, flow: &FlowMeta<'_>) -> Choice {
        let rule = self.rules.first_match(flow);
        let target = rule.map_or(self.final_index, |r| self.rule_targets[r]);
        let (index, chain) = self.resolve(target);
        Choice {
            outbound: Arc::clone(&self.outbounds[index].outbound),
            index,
            chain,
            rule,
        }
    }

    /// Follows groups from outbound `index` to the one that carries flows
    /// now: one atomic load per group.
    pub fn resolve(&self, mut index: usize) -> (usize, Chain) {
        let mut chain = Chain::default();
        // Bounded: validation forbids cycles; the bound keeps a bug from
        // hanging a flow (a group left over still connects through its
        // member, see `Outbound::connect_tcp`).
        for _ in 0..self.outbounds.len() {
            match &*self.outbounds[index].outbound {
                Outbound::Group(g) => {
                    chain.push(index);
                    index = g.selected().index;
                }
                _ => break,
            }
        }
        (index, chain)
    }

    /// A choice as the logs name it: the groups, then the member.
    pub fn route<'a>(&'a self, choice: &'a Choice) -> Route<'a> {
        Route {
            policy: self,
            choice,
        }
    }

    /// The group named `name`, for changing a selector at run time.
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.outbounds.iter().find_map(|n| match &*n.outbound {
            Outbound::Group(g) if n.name == name => Some(g),
            _ => None,
        })
    }

    /// Whether any rule looks at the sniffed name or protocol: if none
    /// does, flows need not wait for their first bytes.
    pub fn wants_sniffing(&self) -> bool {
        self.rules.wants_sniffing()
    }

    /// Whether any rule looks at the flow's name: only then are names
    /// learned from DNS answers kept and looked up (see `crate::dns`).
    pub fn wants_domains(&self) -> bool {
        self.rules.wants_domains()
    }

    pub fn outbounds(&self) -> &[Named] {
        &self.outbounds
    }

    /// The name of outbound `index` (from a [`Choice`]).
    pub fn name(&self, index: usize) -> &str {
        self.outbounds.get(index).map_or("?", |n| n.name.as_str())
    }
}

/// Builds every outbound, in config order, groups after their members:
/// leaves first, then each group once all its members exist. Validation
/// forbids unknown members and cycles; should one slip through, it is an
/// error here rather than a group that never resolves.
fn build_outbounds(
    cfg: &Config,
    index_of: &HashMap<&str, usize>,
) -> Result<Vec<Named>, PolicyError> {
    let error = |o: &OutboundConfig, source| PolicyError::Outbound {
        name: o.name.clone(),
        source,
    };
    let mut built: Vec<Option<Arc<Outbound>>> = vec![None; cfg.outbounds.len()];
    for (slot, o) in built.iter_mut().zip(&cfg.outbounds) {
        if o.kind.members().is_empty() {
            let outbound =
                Outbound::from_kind(&o.kind, cfg.mark, &cfg.timeouts).map_err(|e| error(o, e))?;
            *slot = Some(Arc::new(outbound));
        }
    }
    loop {
        let mut progress = false;
        let mut waiting = None;
        for (i, o) in cfg.outbounds.iter().enumerate() {
            if built[i].is_some() {
                continue;
            }
            let mut members = Vec::with_capacity(o.kind.members().len());
            for m in o.kind.members() {
                let index = *index_of
                    .get(m.as_str())
                    .ok_or_else(|| error(o, BuildError::UnknownMember(m.clone())))?;
                match &built[index] {
                    Some(outbound) => members.push(Member {
                        name: m.clone(),
                        index,
                        outbound: Arc::clone(outbound),
                    }),
                    None => break,
                }
            }
            if members.len() < o.kind.members().len() {
                waiting = Some(o);
                continue;
            }
            let (kind, initial) = match &o.kind {
                OutboundKind::Selector { members, default } => (
                    GroupKind::Selector,
                    members.iter().position(|m| m == default).unwrap_or(0),
                ),
                OutboundKind::Failover { interval, .. } => (
                    GroupKind::Failover {
                        interval: *interval,
                    },
                    0,
                ),
                other => return Err(error(o, BuildError::Unsupported(other.type_name()))),
            };
            let group = Group::new(o.name.clone(), kind, members, initial)
                .map_err(|e| error(o, e.into()))?;
            built[i] = Some(Arc::new(Outbound::Group(group)));
            progress = true;
        }
        match waiting {
            None => break,
            Some(o) if !progress => return Err(error(o, BuildError::Cycle)),
            Some(_) => {}
        }
    }
    Ok(cfg
        .outbounds
        .iter()
        .zip(built)
        .filter_map(|(o, b)| {
            b.map(|outbound| Named {
                name: o.name.clone(),
                outbound,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn policy(outbounds_and_route: &str) -> Policy {
        let text = format!("{outbounds_and_route}\n[firewall]\nbackend = \"none\"\n");
        let cfg = RawConfig::from_toml(&text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap();
        Policy::from_config(&cfg).unwrap()
    }

    fn flow(dst: &str) -> FlowMeta<'static> {
        FlowMeta::addresses(
            Network::Tcp,
            "192.0.2.2:40000".parse().unwrap(),
            dst.parse().unwrap(),
        )
    }

    // Groups come before their members in the file: building must not
    // depend on the order.
    const NESTED: &str = r#"
[[outbounds]]
name = "pick"
type = "selector"
outbounds = ["auto", "direct", "stop"]
[[outbounds]]
name = "auto"
type = "failover"
outbounds = ["proxy-a", "proxy-b"]
interval = 1
[[outbounds]]
name = "proxy-a"
type = "socks5"
server = "203.0.113.2:1080"
[[outbounds]]
name = "proxy-b"
type = "http"
server = "203.0.113.3:3128"
[[outbounds]]
name = "direct"
type = "direct"
[[outbounds]]
name = "stop"
type = "block"
[route]
final = "pick"
[[route.rules]]
dst = ["198.51.100.0/24"]
outbound = "direct"
"#;

    #[test]
    fn groups_resolve_to_a_leaf_and_keep_the_chain() {
        let p = policy(NESTED);
        let c = p.decide(&flow("203.0.113.50:443"));
        assert!(matches!(&*c.outbound, Outbound::Socks5(_)));
        assert_eq!(p.name(c.index), "proxy-a");
        assert_eq!(
            c.chain.iter().map(|i| p.name(i)).collect::<Vec<_>>(),
            ["pick", "auto"]
        );
        assert_eq!(p.route(&c).to_string(), "pick/auto/proxy-a");
        assert_eq!(c.rule, None);

        // A rule naming a leaf: no chain.
        let c = p.decide(&flow("198.51.100.10:7"));
        assert_eq!(p.route(&c).to_string(), "direct");
        assert!(c.chain.is_empty());

        // The selector's choice changes at run time, for new decisions.
        p.group("pick").unwrap().select("stop").unwrap();
        let c = p.decide(&flow("203.0.113.50:443"));
        assert!(matches!(&*c.outbound, Outbound::Block));
        assert_eq!(p.route(&c).to_string(), "pick/stop");
        assert!(p.group("proxy-a").is_none());
    }

    #[test]
    fn a_selector_starts_on_its_default() {
        let p = policy(
            r#"
[[outbounds]]
name = "pick"
type = "selector"
outbounds = ["a", "b"]
default = "b"
[[outbounds]]
name = "a"
type = "direct"
[[outbounds]]
name = "b"
type = "block"
[route]
final = "pick"
"#,
        );
        let c = p.decide(&flow("203.0.113.50:443"));
        assert_eq!(p.route(&c).to_string(), "pick/b");
    }
}
