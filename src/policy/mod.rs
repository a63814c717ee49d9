//! The policy new flows read: the outbounds by name, the rules that pick
//! one, and `route.final` for flows no rule matches.
//!
//! A flow is described by a [`FlowMeta`] (transport, client, original
//! destination, and what sniffing found); [`Policy::decide`] walks the
//! rules in order and returns the first match's outbound. Building a
//! policy checks everything that can only be checked against the system
//! (rule-set files, regexes), so a bad policy is refused at start, never
//! discovered by a flow.

pub mod dns_rules;
pub mod fake_exclusions;
pub mod rule_set;
pub mod rules;
pub mod sniff;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Config, Network, SniffProtocol};
use crate::outbound::group::{Group, Member};
use crate::outbound::{BuildError, Context, Outbound, OutboundConfig};
pub use crate::registry::RuleLabel;
use dns_rules::DnsRules;
use fake_exclusions::Exclusions;
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
    #[error("dns.fake_ip: {message}")]
    FakeIp { message: String },
    #[error("dns.rules[{index}]: {message}")]
    DnsRule { index: usize, message: String },
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
    pub name: Arc<str>,
    pub outbound: Arc<Outbound>,
    /// Stays the same across reloads while the outbound is kept: what the
    /// UDP relay knows an outbound by (a session's upstreams, back-off).
    pub key: u32,
    /// The config it was built from: a reload keeps this outbound (its
    /// connections, a selector's choice, a failover's health) when the
    /// new config describes it the same way.
    config: Option<(OutboundConfig, crate::config::Timeouts)>,
}

/// Where a decision sends a flow.
#[derive(Debug, Clone)]
pub struct Choice {
    /// What carries the flow: the outbound the rule names or, when that is
    /// a group, the member it resolves to now (through nested groups).
    pub outbound: Arc<Outbound>,
    /// Index of `outbound` among the policy's outbounds (for its name).
    pub index: usize,
    /// `outbound`'s [`Named::key`].
    pub key: u32,
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
    /// Each rule as the API shows it, in rule order; then `route.final`.
    rule_labels: Vec<Arc<RuleLabel>>,
    final_index: usize,
    /// The names fake-ip leaves to the real resolver, when `[dns.fake_ip]`
    /// is set: built here from the rule sets the rules read.
    fake_ip_exclusions: Option<Arc<Exclusions>>,
    /// `[[dns.rules]]`, compiled from the same rule-set reading as the
    /// route's; None unless tproxyd answers DNS itself.
    dns_rules: Option<Arc<DnsRules>>,
}

impl Policy {
    pub fn from_config(cfg: &Config) -> Result<Policy, PolicyError> {
        Policy::from_config_keeping(cfg, None)
    }

    /// Builds the policy for `cfg`, keeping from `old` every outbound the
    /// new config describes exactly as before (and, for a group, whose
    /// members are all kept too): a reload then leaves their state alone,
    /// a selector's choice and a failover's health included.
    pub fn from_config_keeping(cfg: &Config, old: Option<&Policy>) -> Result<Policy, PolicyError> {
        let index_of: HashMap<&str, usize> = cfg
            .outbounds
            .iter()
            .enumerate()
            .map(|(i, o)| (o.name.as_str(), i))
            .collect();
        let outbounds = build_outbounds(cfg, &index_of, old)?;
        // Validation guarantees every name below exists.
        let lookup = |name: &str| index_of.get(name).copied().unwrap_or(0);
        // Each rule-set file is read once, for the route, the DNS rules and
        // fake-ip's exclusions.
        let sets = rules::load_sets(&cfg.route)?;
        let rules = Rules::with_sets(&cfg.route, &sets)?;
        let dns_rules = DnsRules::build(&cfg.dns, &cfg.route, &sets)?.map(Arc::new);
        let fake_ip_exclusions = match &cfg.dns.fake_ip {
            Some(fake) => Some(Arc::new(Exclusions::build(fake, &cfg.route, &sets)?)),
            None => None,
        };
        drop(sets);
        let rule_targets = cfg
            .route
            .rules
            .iter()
            .map(|r| lookup(&r.outbound))
            .collect();
        let mut rule_labels: Vec<Arc<RuleLabel>> = cfg
            .route
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Arc::new(rule_label(i, r)))
            .collect();
        rule_labels.push(Arc::new(final_label()));
        Ok(Policy {
            final_index: lookup(&cfg.route.final_outbound),
            outbounds,
            rules,
            rule_targets,
            rule_labels,
            fake_ip_exclusions,
            dns_rules,
        })
    }

    /// Builds what `from_config` builds that can fail on the system alone
    /// (rule-set files, regexes), without the outbounds: what `tproxyd
    /// check` runs, so a bad file or regex is reported before a start.
    pub fn check(cfg: &Config) -> Result<(), PolicyError> {
        let sets = rules::load_sets(&cfg.route)?;
        Rules::with_sets(&cfg.route, &sets)?;
        if let Some(fake) = &cfg.dns.fake_ip {
            Exclusions::build(fake, &cfg.route, &sets)?;
        }
        DnsRules::build(&cfg.dns, &cfg.route, &sets).map(|_| ())
    }

    /// One outbound for every flow, named by its type; no rules.
    pub fn single(outbound: Outbound) -> Policy {
        Policy {
            outbounds: vec![Named {
                name: Arc::from(outbound.name()),
                outbound: Arc::new(outbound),
                key: new_key(),
                config: None,
            }],
            rules: Rules::default(),
            rule_targets: Vec::new(),
            rule_labels: vec![Arc::new(final_label())],
            final_index: 0,
            fake_ip_exclusions: None,
            dns_rules: None,
        }
    }

    /// The outbound for a flow: the first rule that matches, else final;
    /// a group resolved to its member of the moment.
    pub fn decide(&self, flow: &FlowMeta<'_>) -> Choice {
        let rule = self.rules.first_match(flow);
        let target = rule.map_or(self.final_index, |r| self.rule_targets[r]);
        let (index, chain) = self.resolve(target);
        let named = &self.outbounds[index];
        Choice {
            outbound: Arc::clone(&named.outbound),
            key: named.key,
            index,
            chain,
            rule,
        }
    }

    /// The outbound for a flow to a fake-ip address, by its `name`: the
    /// address means nothing, so no rule on destination addresses
    /// (`dst`, prefix rule sets) matches it; the name, ports, source and
    /// protocol decide.
    pub fn decide_by_name(&self, flow: &FlowMeta<'_>, name: &str) -> Choice {
        let named = FlowMeta {
            domain: Some(name),
            ..*flow
        };
        let rule = self.rules.first_match_by_name(&named);
        let target = rule.map_or(self.final_index, |r| self.rule_targets[r]);
        let (index, chain) = self.resolve(target);
        let named = &self.outbounds[index];
        Choice {
            outbound: Arc::clone(&named.outbound),
            key: named.key,
            index,
            chain,
            rule,
        }
    }

    /// The names fake-ip leaves to the real resolver (None without
    /// `[dns.fake_ip]`).
    pub fn fake_ip_exclusions(&self) -> Option<&Arc<Exclusions>> {
        self.fake_ip_exclusions.as_ref()
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
            Outbound::Group(g) if &*n.name == name => Some(g),
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

    /// The compiled `[[dns.rules]]`, when tproxyd answers DNS itself.
    pub fn dns_rules(&self) -> Option<&Arc<DnsRules>> {
        self.dns_rules.as_ref()
    }

    /// The outbound named `name` (its index), groups not resolved.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.outbounds.iter().position(|n| &*n.name == name)
    }

    pub fn outbounds(&self) -> &[Named] {
        &self.outbounds
    }

    /// The name of outbound `index` (from a [`Choice`]).
    pub fn name(&self, index: usize) -> &str {
        self.outbounds.get(index).map_or("?", |n| &*n.name)
    }

    /// The rule of a choice as the API shows it.
    pub fn rule_label(&self, rule: Option<usize>) -> &Arc<RuleLabel> {
        let last = self.rule_labels.len() - 1;
        &self.rule_labels[rule.map_or(last, |r| r.min(last))]
    }

    /// Every rule as the API shows it, then final.
    pub fn rule_labels(&self) -> &[Arc<RuleLabel>] {
        &self.rule_labels
    }

    /// The outbound each rule sends to, by name, in rule order; then final.
    pub fn rule_target_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.rule_targets
            .iter()
            .chain(std::iter::once(&self.final_index))
            .map(|&i| self.name(i))
    }

    /// A choice's outbound, then the groups it was reached through,
    /// innermost first: the Clash API's `chains`.
    pub fn chain_names(&self, choice: &Choice) -> Vec<Arc<str>> {
        let mut names = Vec::with_capacity(1 + choice.chain.len as usize);
        if let Some(n) = self.outbounds.get(choice.index) {
            names.push(Arc::clone(&n.name));
        }
        let groups: Vec<usize> = choice.chain.iter().collect();
        for g in groups.into_iter().rev() {
            if let Some(n) = self.outbounds.get(g) {
                names.push(Arc::clone(&n.name));
            }
        }
        names
    }
}

/// A key no outbound has had: keys are never reused, so a UDP session's
/// upstream is never mistaken for another outbound's after a reload.
fn new_key() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn final_label() -> RuleLabel {
    RuleLabel {
        index: None,
        kind: "Match",
        payload: String::new(),
    }
}

/// A rule in the Clash API's words: its one key's kind and values, or
/// `AND` with every key when it has several.
fn rule_label(index: usize, r: &crate::config::Rule) -> RuleLabel {
    fn join<T: fmt::Display>(v: &[T]) -> String {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
    let mut parts: Vec<(&'static str, String)> = Vec::new();
    if let Some(n) = r.network {
        parts.push((
            "Network",
            match n {
                Network::Tcp => "tcp".into(),
                Network::Udp => "udp".into(),
            },
        ));
    }
    if !r.dst.is_empty() {
        parts.push(("IPCIDR", join(&r.dst)));
    }
    if !r.src.is_empty() {
        parts.push(("SrcIPCIDR", join(&r.src)));
    }
    if !r.dst_port.is_empty() {
        parts.push(("DstPort", join(&r.dst_port)));
    }
    if !r.domain.is_empty() {
        parts.push(("Domain", r.domain.join(",")));
    }
    if !r.domain_suffix.is_empty() {
        parts.push(("DomainSuffix", r.domain_suffix.join(",")));
    }
    if !r.domain_keyword.is_empty() {
        parts.push(("DomainKeyword", r.domain_keyword.join(",")));
    }
    if !r.domain_regex.is_empty() {
        parts.push(("DomainRegex", r.domain_regex.join(",")));
    }
    if !r.rule_set.is_empty() {
        parts.push(("RuleSet", r.rule_set.join(",")));
    }
    if !r.protocol.is_empty() {
        parts.push((
            "Protocol",
            r.protocol
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(","),
        ));
    }
    let (kind, payload) = match parts.len() {
        0 => ("Match", String::new()),
        1 => parts.remove(0),
        _ => (
            "AND",
            parts
                .iter()
                .map(|(k, v)| format!("({k},{v})"))
                .collect::<Vec<_>>()
                .join(","),
        ),
    };
    RuleLabel {
        index: Some(index),
        kind,
        payload,
    }
}

/// Builds every outbound, in config order, groups after their members:
/// leaves first, then each group once all its members exist. Validation
/// forbids unknown members and cycles; should one slip through, it is an
/// error here rather than a group that never resolves.
fn build_outbounds(
    cfg: &Config,
    index_of: &HashMap<&str, usize>,
    old: Option<&Policy>,
) -> Result<Vec<Named>, PolicyError> {
    // An outbound from `old` stays when its config is the same, and for a
    // group when every member stays too (members are fixed in a group).
    let kept = |o: &OutboundConfig| -> Option<(Arc<Outbound>, u32)> {
        old?.outbounds
            .iter()
            .find(|n| {
                n.config
                    .as_ref()
                    .is_some_and(|(c, t)| c == o && *t == cfg.timeouts)
            })
            .map(|n| (Arc::clone(&n.outbound), n.key))
    };
    let ctx = Context {
        mark: cfg.mark,
        connect_timeout: cfg.timeouts.connect,
    };
    let mut keys: Vec<u32> = vec![0; cfg.outbounds.len()];
    let error = |o: &OutboundConfig, source| PolicyError::Outbound {
        name: o.name.clone(),
        source,
    };
    let mut built: Vec<Option<Arc<Outbound>>> = vec![None; cfg.outbounds.len()];
    let mut reused = vec![false; cfg.outbounds.len()];
    for (i, o) in cfg.outbounds.iter().enumerate() {
        if o.kind.members().is_empty() {
            if let Some((outbound, key)) = kept(o) {
                built[i] = Some(outbound);
                keys[i] = key;
                reused[i] = true;
                continue;
            }
            let outbound = o
                .kind
                .build(&o.name, &ctx, Vec::new())
                .map_err(|e| error(o, e))?;
            built[i] = Some(Arc::new(outbound));
            keys[i] = new_key();
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
            if members.iter().all(|m| reused[m.index]) {
                if let Some((outbound, key)) = kept(o) {
                    built[i] = Some(outbound);
                    keys[i] = key;
                    reused[i] = true;
                    progress = true;
                    continue;
                }
            }
            let group = o
                .kind
                .build(&o.name, &ctx, members)
                .map_err(|e| error(o, e))?;
            built[i] = Some(Arc::new(group));
            keys[i] = new_key();
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
        .zip(keys)
        .filter_map(|((o, b), key)| {
            b.map(|outbound| Named {
                name: Arc::from(o.name.as_str()),
                outbound,
                key,
                config: Some((o.clone(), cfg.timeouts)),
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
        assert!(matches!(&*c.outbound, Outbound::Block(_)));
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

    #[test]
    fn a_reload_keeps_unchanged_outbounds_and_a_selectors_choice() {
        let parse = |text: &str| {
            RawConfig::from_toml(&format!("{text}\n[firewall]\nbackend = \"none\"\n"), "t")
                .unwrap()
                .validate(&|_| None)
                .unwrap()
        };
        let old_cfg = parse(NESTED);
        let old = Policy::from_config(&old_cfg).unwrap();
        old.group("pick").unwrap().select("direct").unwrap();

        // Only a rule changes: every outbound is kept, the choice too.
        let same = parse(&NESTED.replace("198.51.100.0/24", "198.51.100.0/25"));
        let new = Policy::from_config_keeping(&same, Some(&old)).unwrap();
        for (a, b) in old.outbounds().iter().zip(new.outbounds()) {
            assert_eq!(a.key, b.key, "{}", a.name);
            assert!(Arc::ptr_eq(&a.outbound, &b.outbound), "{}", a.name);
        }
        assert_eq!(
            new.route(&new.decide(&flow("203.0.113.50:443")))
                .to_string(),
            "pick/direct"
        );
        assert_eq!(new.rule_labels()[0].kind, "IPCIDR");
        assert_eq!(new.rule_labels()[0].payload, "198.51.100.0/25");

        // A member's server changes: it is built anew, and so are the
        // groups that hold it; the others are kept.
        let moved = parse(&NESTED.replace("203.0.113.3:3128", "203.0.113.9:3128"));
        let new = Policy::from_config_keeping(&moved, Some(&old)).unwrap();
        let key =
            |p: &Policy, name: &str| p.outbounds().iter().find(|n| &*n.name == name).unwrap().key;
        for kept in ["proxy-a", "direct", "stop"] {
            assert_eq!(key(&old, kept), key(&new, kept), "{kept} kept");
        }
        for built in ["proxy-b", "auto", "pick"] {
            assert_ne!(key(&old, built), key(&new, built), "{built} rebuilt");
        }
    }
}
