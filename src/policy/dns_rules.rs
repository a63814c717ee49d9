//! `[[dns.rules]]` compiled: which named resolver answers a query (or
//! whether it is rejected here), by its name, type and client.
//!
//! No matcher of its own: each DNS rule becomes a route [`Rule`] with the
//! same name keys and rule sets, the query type standing in as the
//! destination port and the client as the source, and the route's
//! [`Rules`] index answers "first match". The rule sets are the ones the
//! policy read for the route (built in `Policy::from_config_keeping`), so a
//! list is read once whoever names it; `accept_ip` sets become one
//! destination-only index per rule with a fallback.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::rule_set::RuleSet;
use super::rules::Rules;
use super::{FlowMeta, PolicyError};
use crate::cidr::PortRange;
use crate::config::{DnsAction, DnsConfig, Network, Reject, RouteConfig, Rule};

/// What a query is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask `dns.servers[i]`.
    Server(usize),
    /// Answer here, without asking anyone.
    Reject(Reject),
}

/// The prefixes a rule server's answer must fall in to be kept.
#[derive(Debug)]
pub struct AcceptIp(Rules);

impl AcceptIp {
    /// Whether `ip` is in one of the sets.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        let flow = FlowMeta::addresses(Network::Udp, any, SocketAddr::new(ip, 0));
        self.0.first_match(&flow).is_some()
    }
}

/// One compiled DNS rule's outcome.
#[derive(Debug)]
struct Outcome {
    action: Action,
    /// The fallback server and the prefixes that keep the first answer.
    fallback: Option<(usize, AcceptIp)>,
}

/// What the rules say about one query.
#[derive(Debug, Clone, Copy)]
pub struct Verdict<'a> {
    pub action: Action,
    pub fallback: Option<(usize, &'a AcceptIp)>,
    /// The rule that matched; None: `dns.final`.
    pub rule: Option<usize>,
}

/// `[[dns.rules]]` and `dns.final`, indexed.
#[derive(Debug)]
pub struct DnsRules {
    rules: Rules,
    outcomes: Vec<Outcome>,
    final_server: usize,
}

/// A route rule with no keys (matches every flow).
fn blank_rule() -> Rule {
    Rule {
        network: None,
        dst: Vec::new(),
        src: Vec::new(),
        dst_port: Vec::new(),
        domain: Vec::new(),
        domain_suffix: Vec::new(),
        domain_keyword: Vec::new(),
        domain_regex: Vec::new(),
        rule_set: Vec::new(),
        protocol: Vec::new(),
        outbound: String::new(),
    }
}

/// The route rule that stands for a DNS rule's matching keys.
fn as_route_rule(r: &crate::config::DnsRule) -> Rule {
    Rule {
        src: r.source.clone(),
        // The query type rides as the destination port (both u16).
        dst_port: r
            .query_type
            .iter()
            .map(|t| PortRange {
                first: t.0,
                last: t.0,
            })
            .collect(),
        domain: r.domain.clone(),
        domain_suffix: r.domain_suffix.clone(),
        domain_keyword: r.domain_keyword.clone(),
        domain_regex: r.domain_regex.clone(),
        rule_set: r.rule_set.clone(),
        ..blank_rule()
    }
}

/// A route error about a rule made from `dns.rules[i]`, said as such.
fn as_dns_error(e: PolicyError) -> PolicyError {
    match e {
        PolicyError::Rule { index, message } => PolicyError::DnsRule { index, message },
        other => other,
    }
}

impl DnsRules {
    /// Compiles `dns` against the route's rule sets: `sets[i]` holds
    /// `route.rule_sets[i]`, as read once by the policy. None when
    /// tproxyd does not answer DNS itself (no named resolvers).
    pub fn build(
        dns: &DnsConfig,
        route: &RouteConfig,
        sets: &[RuleSet],
    ) -> Result<Option<DnsRules>, PolicyError> {
        if !dns.answers() {
            return Ok(None);
        }
        let index: HashMap<&str, usize> = dns
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        // Validation guarantees the names; a missing one is reported, not
        // guessed.
        let server = |i: usize, name: &str| {
            index
                .get(name)
                .copied()
                .ok_or_else(|| PolicyError::DnsRule {
                    index: i,
                    message: format!("{name:?} is not the name of a [[dns.servers]] entry"),
                })
        };
        let indexed = RouteConfig {
            final_outbound: String::new(),
            rules: dns.rules.iter().map(as_route_rule).collect(),
            rule_sets: route.rule_sets.clone(),
        };
        let rules = Rules::with_sets(&indexed, sets).map_err(as_dns_error)?;
        let mut outcomes = Vec::with_capacity(dns.rules.len());
        for (i, r) in dns.rules.iter().enumerate() {
            let action = match &r.action {
                DnsAction::Server(name) => Action::Server(server(i, name)?),
                DnsAction::Reject(kind) => Action::Reject(*kind),
            };
            let fallback = match &r.fallback {
                Some(name) => {
                    let accept = RouteConfig {
                        final_outbound: String::new(),
                        // One rule: destination in any of the sets.
                        rules: vec![Rule {
                            rule_set: r.accept_ip.clone(),
                            ..blank_rule()
                        }],
                        rule_sets: route.rule_sets.clone(),
                    };
                    let accept = Rules::with_sets(&accept, sets).map_err(|e| match e {
                        PolicyError::Rule { message, .. } => PolicyError::DnsRule {
                            index: i,
                            message: format!("accept_ip: {message}"),
                        },
                        other => other,
                    })?;
                    Some((server(i, name)?, AcceptIp(accept)))
                }
                None => None,
            };
            outcomes.push(Outcome { action, fallback });
        }
        let final_server = match &dns.final_server {
            Some(name) => server(0, name)?,
            None => 0,
        };
        Ok(Some(DnsRules {
            rules,
            outcomes,
            final_server,
        }))
    }

    /// The first rule matching a query for `qname` (as asked: case and a
    /// trailing dot do not matter), type `qtype`, from `client`.
    pub fn lookup(&self, qname: &str, qtype: u16, client: IpAddr) -> Verdict<'_> {
        let flow = FlowMeta {
            network: Network::Udp,
            src: SocketAddr::new(client, 0),
            dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), qtype),
            domain: Some(qname),
            protocol: None,
        };
        let rule = self.rules.first_match(&flow);
        match rule.and_then(|r| self.outcomes.get(r).map(|o| (r, o))) {
            Some((r, o)) => Verdict {
                action: o.action,
                fallback: o.fallback.as_ref().map(|(s, a)| (*s, a)),
                rule: Some(r),
            },
            None => Verdict {
                action: Action::Server(self.final_server),
                fallback: None,
                rule: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, RawConfig};
    use crate::policy::rules::load_sets;

    fn config(dir: &std::path::Path, extra: &str) -> Config {
        std::fs::write(dir.join("cn.txt"), "cn\nbaidu.com\nfull:exact.example\n").unwrap();
        std::fs::write(dir.join("cn-ip.txt"), "192.0.2.0/24\n2001:db8:cc::/48\n").unwrap();
        let text = format!(
            "[[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
             [route]\nfinal = \"direct\"\n\
             [[route.rule_sets]]\nname = \"cn\"\nformat = \"domains\"\npath = \"{d}/cn.txt\"\n\
             [[route.rule_sets]]\nname = \"cn-ip\"\nformat = \"cidr\"\npath = \"{d}/cn-ip.txt\"\n\
             [dns]\nfinal = \"foreign\"\n\
             [[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\noutbound = \"direct\"\n\
             [[dns.servers]]\nname = \"foreign\"\naddress = \"udp://198.51.100.1\"\n\
             {extra}\n[firewall]\nbackend = \"none\"\n",
            d = dir.display()
        );
        RawConfig::from_toml(&text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn rules(extra: &str) -> DnsRules {
        let dir = crate::policy::rule_set::testdir::TempDir::new();
        let cfg = config(&dir.0, extra);
        let sets = load_sets(&cfg.route).unwrap();
        DnsRules::build(&cfg.dns, &cfg.route, &sets)
            .unwrap()
            .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const CLIENT: &str = "192.168.1.10";

    #[test]
    fn first_match_wins_and_final_takes_the_rest() {
        let r = rules(
            "[[dns.rules]]\ndomain = [\"ads.example\"]\nreject = \"nxdomain\"\n\
             [[dns.rules]]\nrule_set = [\"cn\"]\nserver = \"isp\"\n\
             [[dns.rules]]\ndomain_suffix = [\"baidu.com\"]\nreject = \"nodata\"\n",
        );
        let c = ip(CLIENT);
        assert_eq!(
            r.lookup("ads.example", 1, c).action,
            Action::Reject(Reject::Nxdomain)
        );
        // The rule set's suffixes, case and a trailing dot ignored.
        assert_eq!(r.lookup("www.Baidu.COM.", 1, c).action, Action::Server(0));
        assert_eq!(r.lookup("news.cn", 28, c).action, Action::Server(0));
        assert_eq!(r.lookup("exact.example", 1, c).action, Action::Server(0));
        assert_eq!(
            r.lookup("sub.exact.example", 1, c).action,
            Action::Server(1)
        );
        // Not a label boundary: not the suffix.
        let v = r.lookup("notcn", 1, c);
        assert_eq!((v.action, v.rule), (Action::Server(1), None));
        assert_eq!(r.lookup("example.org", 1, c).rule, None);
    }

    #[test]
    fn query_type_and_source_narrow_a_rule() {
        let r = rules(
            "[[dns.rules]]\nquery_type = [\"AAAA\", 65]\nreject = \"nodata\"\n\
             [[dns.rules]]\nsource = [\"192.168.1.128/25\"]\ndomain_keyword = [\"video\"]\nserver = \"isp\"\n\
             [[dns.rules]]\ndomain_regex = [\"^[a-z]+[0-9]+\\\\.test$\"]\nserver = \"isp\"\n",
        );
        let c = ip(CLIENT);
        assert_eq!(
            r.lookup("a.example", 28, c).action,
            Action::Reject(Reject::Nodata)
        );
        assert_eq!(
            r.lookup("a.example", 65, c).action,
            Action::Reject(Reject::Nodata)
        );
        assert_eq!(r.lookup("a.example", 1, c).action, Action::Server(1));
        assert_eq!(r.lookup("myvideo.example", 1, c).action, Action::Server(1));
        assert_eq!(
            r.lookup("myvideo.example", 1, ip("192.168.1.200")).action,
            Action::Server(0)
        );
        assert_eq!(r.lookup("abc12.test", 1, c).action, Action::Server(0));
        assert_eq!(r.lookup("12abc.test", 1, c).action, Action::Server(1));
    }

    #[test]
    fn a_fallback_rule_carries_its_accepted_prefixes() {
        let r = rules(
            "[[dns.rules]]\nserver = \"isp\"\nfallback = \"foreign\"\naccept_ip = [\"cn-ip\"]\n",
        );
        let v = r.lookup("anything.example", 1, ip(CLIENT));
        assert_eq!(v.action, Action::Server(0));
        let (fallback, accept) = v.fallback.unwrap();
        assert_eq!(fallback, 1);
        assert!(accept.contains(ip("192.0.2.9")));
        assert!(accept.contains(ip("2001:db8:cc::1")));
        assert!(!accept.contains(ip("198.51.100.9")));
        assert!(!accept.contains(ip("2001:db8:dd::1")));
    }

    #[test]
    fn without_named_resolvers_there_is_nothing_to_compile() {
        let cfg = RawConfig::from_toml(
            "[outbound]\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\n",
            "t",
        )
        .unwrap()
        .validate(&|_| None)
        .unwrap();
        assert!(DnsRules::build(&cfg.dns, &cfg.route, &[])
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_bad_regex_names_the_dns_rule() {
        let dir = crate::policy::rule_set::testdir::TempDir::new();
        let cfg = config(
            &dir.0,
            "[[dns.rules]]\ndomain_regex = [\"(\"]\nserver = \"isp\"\n",
        );
        let sets = load_sets(&cfg.route).unwrap();
        let e = DnsRules::build(&cfg.dns, &cfg.route, &sets).unwrap_err();
        assert!(e.to_string().starts_with("dns.rules[0]: "), "{e}");
    }
}
