//! First-match rules over a flow's addresses, ports and sniffed name.
//!
//! Within a rule every key given must match (AND); within a key any
//! listed value may (OR). A rule with a domain key never matches a flow
//! whose name is unknown.

use crate::config::{Network, RouteConfig, Rule, SniffProtocol};
use crate::firewall::cidr::{Cidr, PortRange};

use super::{FlowMeta, PolicyError};

/// One rule, ready to match.
#[derive(Debug)]
struct Compiled {
    network: Option<Network>,
    dst: Vec<Cidr>,
    src: Vec<Cidr>,
    dst_port: Vec<PortRange>,
    domain: Vec<String>,
    /// Stored without a leading dot, lowercased.
    domain_suffix: Vec<String>,
    domain_keyword: Vec<String>,
    protocol: Vec<SniffProtocol>,
}

/// The route's rules in order.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Compiled>,
}

fn lower(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
        .collect()
}

/// `name` is `suffix` or ends with `.suffix` (label boundary).
pub fn suffix_matches(name: &str, suffix: &str) -> bool {
    name == suffix
        || (name.len() > suffix.len()
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.')
}

impl Rules {
    pub fn build(route: &RouteConfig) -> Result<Rules, PolicyError> {
        let mut rules = Vec::with_capacity(route.rules.len());
        for (index, r) in route.rules.iter().enumerate() {
            rules.push(compile(index, r)?);
        }
        Ok(Rules { rules })
    }

    /// The index of the first rule that matches `flow`.
    pub fn first_match(&self, flow: &FlowMeta<'_>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(flow))
    }

    pub fn wants_sniffing(&self) -> bool {
        self.rules.iter().any(|r| {
            !(r.domain.is_empty()
                && r.domain_suffix.is_empty()
                && r.domain_keyword.is_empty()
                && r.protocol.is_empty())
        })
    }
}

fn compile(index: usize, r: &Rule) -> Result<Compiled, PolicyError> {
    let unsupported = |key: &str| PolicyError::Rule {
        index,
        message: format!("{key} is not available in this build yet"),
    };
    if !r.domain_regex.is_empty() {
        return Err(unsupported("domain_regex"));
    }
    if !r.rule_set.is_empty() {
        return Err(unsupported("rule_set"));
    }
    Ok(Compiled {
        network: r.network,
        dst: r.dst.clone(),
        src: r.src.clone(),
        dst_port: r.dst_port.clone(),
        domain: lower(&r.domain),
        domain_suffix: lower(&r.domain_suffix)
            .into_iter()
            .map(|s| s.trim_start_matches('.').to_string())
            .collect(),
        domain_keyword: lower(&r.domain_keyword),
        protocol: r.protocol.clone(),
    })
}

impl Compiled {
    fn matches(&self, flow: &FlowMeta<'_>) -> bool {
        let ip_in = |list: &[Cidr], addr: std::net::SocketAddr| {
            list.is_empty() || list.iter().any(|c| c.contains(&Cidr::host(addr.ip())))
        };
        if self.network.is_some_and(|n| n != flow.network)
            || !ip_in(&self.dst, flow.dst)
            || !ip_in(&self.src, flow.src)
        {
            return false;
        }
        let port = flow.dst.port();
        if !self.dst_port.is_empty()
            && !self
                .dst_port
                .iter()
                .any(|p| (p.first..=p.last).contains(&port))
        {
            return false;
        }
        if !self.protocol.is_empty() && !flow.protocol.is_some_and(|p| self.protocol.contains(&p)) {
            return false;
        }
        let has_domain_key = !(self.domain.is_empty()
            && self.domain_suffix.is_empty()
            && self.domain_keyword.is_empty());
        if has_domain_key {
            let Some(name) = flow.domain else {
                return false;
            };
            let hit = self.domain.iter().any(|d| d == name)
                || self.domain_suffix.iter().any(|s| suffix_matches(name, s))
                || self
                    .domain_keyword
                    .iter()
                    .any(|k| name.contains(k.as_str()));
            if !hit {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn rules(text: &str) -> Rules {
        let cfg = RawConfig::from_toml(
            &format!("[[outbounds]]\nname = \"a\"\ntype = \"direct\"\n[[outbounds]]\nname = \"b\"\ntype = \"block\"\n[route]\nfinal = \"a\"\n{text}\n[firewall]\nbackend = \"none\"\n"),
            "t",
        )
        .unwrap()
        .validate(&|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
        Rules::build(&cfg.route).unwrap()
    }

    fn flow<'a>(net: Network, dst: &str, domain: Option<&'a str>) -> FlowMeta<'a> {
        FlowMeta {
            network: net,
            src: "192.0.2.2:40000".parse().unwrap(),
            dst: dst.parse().unwrap(),
            domain,
            protocol: None,
        }
    }

    #[test]
    fn suffixes_match_on_label_boundaries_only() {
        assert!(suffix_matches("a.com", "a.com"));
        assert!(suffix_matches("x.a.com", "a.com"));
        assert!(!suffix_matches("ba.com", "a.com"));
        assert!(!suffix_matches("com", "a.com"));
    }

    #[test]
    fn first_match_wins_and_keys_are_anded() {
        let r = rules(
            "[[route.rules]]\nnetwork = \"udp\"\ndst_port = [\"53\", \"1000-2000\"]\noutbound = \"b\"\n\
             [[route.rules]]\ndst = [\"198.51.100.0/24\"]\noutbound = \"a\"\n\
             [[route.rules]]\ndomain_suffix = [\"Ads.Example\"]\noutbound = \"b\"\n",
        );
        assert_eq!(
            r.first_match(&flow(Network::Udp, "198.51.100.1:53", None)),
            Some(0)
        );
        assert_eq!(
            r.first_match(&flow(Network::Udp, "198.51.100.1:1500", None)),
            Some(0)
        );
        assert_eq!(
            r.first_match(&flow(Network::Tcp, "198.51.100.1:53", None)),
            Some(1)
        );
        assert_eq!(
            r.first_match(&flow(Network::Tcp, "203.0.113.9:443", None)),
            None
        );
        assert_eq!(
            r.first_match(&flow(
                Network::Tcp,
                "203.0.113.9:443",
                Some("x.ads.example")
            )),
            Some(2)
        );
        assert_eq!(
            r.first_match(&flow(Network::Tcp, "203.0.113.9:443", Some("bads.example"))),
            None
        );
        assert!(r.wants_sniffing());
    }
}
