//! `[route]`: the rules in order, the rule sets they name, and `final`.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::{de, Backend, FirewallConfig};
use crate::cidr::{Cidr, PortRange};
use crate::one_or_many;
use crate::outbound::kinds::OutboundConfig;

/// Which transport a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    Tcp,
    Udp,
}

/// A protocol recognised from a flow's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SniffProtocol {
    Tls,
    Http,
    /// A QUIC Initial (UDP); its name is the TLS SNI inside.
    Quic,
}

impl SniffProtocol {
    /// As the config and the logs write it.
    pub fn name(self) -> &'static str {
        match self {
            SniffProtocol::Tls => "tls",
            SniffProtocol::Http => "http",
            SniffProtocol::Quic => "quic",
        }
    }
}

/// One routing rule: every key given must match (AND); the first rule
/// that matches names the outbound.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub network: Option<Network>,
    #[serde(default, deserialize_with = "de::list_from_str")]
    pub dst: Vec<Cidr>,
    #[serde(default, deserialize_with = "de::list_from_str")]
    pub src: Vec<Cidr>,
    #[serde(default, deserialize_with = "de::list_from_str")]
    pub dst_port: Vec<PortRange>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub domain: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub domain_suffix: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub domain_keyword: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub domain_regex: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub rule_set: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub protocol: Vec<SniffProtocol>,
    pub outbound: String,
}

/// The file formats a rule set can be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSetFormat {
    /// One prefix per line (chnroute), `#` comments.
    Cidr,
    /// One domain suffix per line; dnsmasq `server=/domain/ip` lines too.
    Domains,
    /// v2ray geoip.dat (protobuf), one `category` (country code).
    Geoip,
    /// v2ray geosite.dat (protobuf), one `category`.
    Geosite,
}

/// A named list of prefixes or domains, read from a file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetConfig {
    pub name: String,
    pub format: RuleSetFormat,
    pub path: PathBuf,
    pub category: Option<String>,
}

/// Where flows go: rules in order, then `final_outbound`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub final_outbound: String,
    pub rules: Vec<Rule>,
    pub rule_sets: Vec<RuleSetConfig>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(rename = "final")]
    pub final_outbound: Option<String>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub rules: Vec<Rule>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub rule_sets: Vec<RuleSetConfig>,
}

impl RawRoute {
    /// `route.final`, the rule sets and the rules, with every outbound
    /// name they use checked against `outbounds` (`known` looks a name up).
    pub(super) fn validate(
        &self,
        outbounds: &[OutboundConfig],
        known: &dyn Fn(&str) -> bool,
        issue: &mut dyn FnMut(&str, String),
    ) -> RouteConfig {
        let r = self;
        let final_outbound = match (&r.final_outbound, outbounds) {
            (Some(f), _) => {
                if !known(f) {
                    issue(
                        "route.final",
                        format!("{f:?} is not the name of an outbound"),
                    );
                }
                f.clone()
            }
            (None, [only]) => only.name.clone(),
            (None, []) => String::new(),
            (None, _) => {
                issue(
                    "route.final",
                    "missing: with several outbounds, name the one for flows that no rule matches"
                        .into(),
                );
                String::new()
            }
        };
        let mut set_names = HashSet::new();
        for (i, set) in r.rule_sets.iter().enumerate() {
            let key = format!("route.rule_sets[{i}]");
            if !set_names.insert(set.name.as_str()) {
                issue(
                    &format!("{key}.name"),
                    format!("the name {:?} is used twice", set.name),
                );
            }
            let geo = matches!(set.format, RuleSetFormat::Geoip | RuleSetFormat::Geosite);
            match (&set.category, geo) {
                (None, true) => issue(
                    &format!("{key}.category"),
                    "missing: geoip and geosite files hold many lists; name one (like \"cn\")"
                        .into(),
                ),
                (Some(_), false) => issue(
                    &format!("{key}.category"),
                    "only for geoip and geosite files".into(),
                ),
                _ => {}
            }
        }
        for (i, rule) in r.rules.iter().enumerate() {
            let key = format!("route.rules[{i}]");
            if !known(&rule.outbound) {
                issue(
                    &format!("{key}.outbound"),
                    format!("{:?} is not the name of an outbound", rule.outbound),
                );
            }
            for set in &rule.rule_set {
                if !set_names.contains(set.as_str()) {
                    issue(
                        &format!("{key}.rule_set"),
                        format!("{set:?} is not the name of a route.rule_sets entry"),
                    );
                }
            }
        }
        RouteConfig {
            final_outbound,
            rules: r.rules.clone(),
            rule_sets: r.rule_sets.clone(),
        }
    }
}

/// Whether `rule` only looks at the destination address (and port and
/// transport), which is all the kernel's bypass can see.
fn address_only(rule: &Rule) -> bool {
    rule.src.is_empty()
        && rule.domain.is_empty()
        && rule.domain_suffix.is_empty()
        && rule.domain_keyword.is_empty()
        && rule.domain_regex.is_empty()
        && rule.protocol.is_empty()
}

/// `firewall.bypass_rule_sets`: the kernel may skip a set's prefixes only
/// where tproxyd would have sent those flows direct anyway. That holds
/// when a rule naming the set goes to a `direct` outbound, looks at the
/// address only (and port and transport, which the kernel rule repeats),
/// and every rule before it is such a rule too: no earlier rule could
/// have sent one of those flows elsewhere (by its name, say).
pub(super) fn check_bypass_rule_sets(
    fw: &FirewallConfig,
    outbounds: &[OutboundConfig],
    route: &RouteConfig,
    issue: &mut dyn FnMut(&str, String),
) {
    let key = "firewall.bypass_rule_sets";
    let is_direct = |name: &str| {
        outbounds
            .iter()
            .any(|o| o.name == name && o.kind.is_direct())
    };
    for name in &fw.bypass_rule_sets {
        let Some(set) = route.rule_sets.iter().find(|s| &s.name == name) else {
            issue(key, format!("{name:?} is not a route.rule_sets name"));
            continue;
        };
        if !matches!(set.format, RuleSetFormat::Cidr | RuleSetFormat::Geoip) {
            issue(
                key,
                format!("{name:?}: only cidr and geoip sets hold addresses the kernel can skip"),
            );
            continue;
        }
        if fw.backend != Backend::Nftables {
            issue(
                key,
                "needs backend = \"nftables\" (its sets take thousands of prefixes in one \
                 transaction; iptables would need a rule each)"
                    .into(),
            );
            continue;
        }
        let Some(at) = route.rules.iter().position(|r| r.rule_set.contains(name)) else {
            issue(
                key,
                format!("{name:?} is not used by any rule: the kernel skips only what a direct rule sends direct"),
            );
            continue;
        };
        let rule = &route.rules[at];
        let sets_are_addresses = rule.rule_set.iter().all(|n| {
            route.rule_sets.iter().any(|s| {
                &s.name == n && matches!(s.format, RuleSetFormat::Cidr | RuleSetFormat::Geoip)
            })
        });
        if !is_direct(&rule.outbound) || !address_only(rule) || !sets_are_addresses {
            issue(
                key,
                format!(
                    "{name:?}: its first rule (route.rules[{at}]) must send to a direct outbound \
                     and match by destination only (dst, rule sets of addresses, dst_port, network)"
                ),
            );
            continue;
        }
        if let Some(j) = route.rules[..at]
            .iter()
            .position(|r| !is_direct(&r.outbound) || !address_only(r))
        {
            issue(
                key,
                format!(
                    "{name:?}: route.rules[{j}] comes before its rule (route.rules[{at}]) and could \
                     send some of its flows elsewhere, which the kernel cannot see; put the rule \
                     using {name:?} above it"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{no_env, valid};
    use crate::config::*;

    #[test]
    fn the_kernel_may_only_skip_sets_a_leading_direct_rule_sends_direct() {
        let with = |rules: &str, backend: &str| {
            format!(
                "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
                 [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
                 [route]\nfinal = \"proxy\"\n\
                 [[route.rule_sets]]\nname = \"cn\"\nformat = \"cidr\"\npath = \"/x\"\n\
                 [[route.rule_sets]]\nname = \"names\"\nformat = \"domains\"\npath = \"/y\"\n\
                 {rules}\
                 [firewall]\nbackend = \"{backend}\"\nlan_interfaces = [\"eth1\"]\nbypass_rule_sets = [\"cn\"]\n"
            )
        };
        let issues =
            |text: String| match RawConfig::from_toml(&text, "t").unwrap().validate(&no_env) {
                Ok(_) => vec![],
                Err(ConfigError::Invalid(v)) => v.into_iter().map(|i| i.message).collect(),
                Err(e) => panic!("{e}"),
            };
        let direct_cn =
            "[[route.rules]]\nrule_set = [\"cn\"]\ndst_port = [\"443\"]\noutbound = \"direct\"\n";
        assert!(issues(with(direct_cn, "nftables")).is_empty());
        // Behind a rule that could send some of those flows to the proxy.
        let after_domain = format!(
            "[[route.rules]]\ndomain_suffix = [\"a.example\"]\noutbound = \"proxy\"\n{direct_cn}"
        );
        let got = issues(with(&after_domain, "nftables"));
        assert!(
            got.len() == 1 && got[0].contains("route.rules[0] comes before"),
            "{got:?}"
        );
        // To the proxy, or by name as well, or on the iptables backend.
        for (rules, backend, says) in [
            (
                "[[route.rules]]\nrule_set = [\"cn\"]\noutbound = \"proxy\"\n",
                "nftables",
                "direct outbound",
            ),
            (
                "[[route.rules]]\nrule_set = [\"cn\", \"names\"]\noutbound = \"direct\"\n",
                "nftables",
                "destination only",
            ),
            (direct_cn, "iptables", "nftables"),
            ("", "nftables", "not used by any rule"),
        ] {
            let got = issues(with(rules, backend));
            assert!(
                got.len() == 1 && got[0].contains(says),
                "{rules:?}: {got:?}"
            );
        }
    }

    /// Every list key of a rule takes one value as a list of one: the two
    /// spellings give the same configuration.
    #[test]
    fn a_rule_takes_one_value_where_a_list_is_expected() {
        let file = |rule: &str| {
            format!(
                "[[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
                 [[route.rule_sets]]\nname = \"cn\"\nformat = \"cidr\"\npath = \"/x\"\n\
                 [[route.rules]]\n{rule}outbound = \"direct\"\n\
                 [firewall]\nbackend = \"none\"\n"
            )
        };
        for (key, one) in [
            ("dst", "\"192.0.2.0/24\""),
            ("src", "\"2001:db8::/32\""),
            ("dst_port", "\"53\""),
            ("dst_port", "\"1000-2000\""),
            ("domain", "\"a.com\""),
            ("domain_suffix", "\"a.com\""),
            ("domain_keyword", "\"shop\""),
            ("domain_regex", "\"^a+\\\\.com$\""),
            ("rule_set", "\"cn\""),
            ("protocol", "\"quic\""),
        ] {
            let single = valid(&file(&format!("{key} = {one}\n")));
            let list = valid(&file(&format!("{key} = [{one}]\n")));
            assert_eq!(single, list, "{key} = {one}");
            assert_ne!(single.route.rules[0], Rule::default(), "{key} = {one}");
        }
        assert_eq!(
            valid(&file("protocol = \"quic\"\n")).route.rules[0].protocol,
            [SniffProtocol::Quic]
        );
        assert_eq!(
            valid(&file("dst_port = \"1000-2000\"\n")).route.rules[0].dst_port,
            ["1000-2000".parse().unwrap()]
        );
    }

    /// `[route.rules]` and `[route.rule_sets]` written as one table are a
    /// list of one, like every other list key.
    #[test]
    fn route_lists_take_one_table() {
        let head = "[[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
                    [firewall]\nbackend = \"none\"\n";
        let single = valid(&format!(
            "{head}[route.rule_sets]\nname = \"cn\"\nformat = \"cidr\"\npath = \"/x\"\n\
             [route.rules]\nrule_set = \"cn\"\noutbound = \"direct\"\n"
        ));
        let list = valid(&format!(
            "{head}[[route.rule_sets]]\nname = \"cn\"\nformat = \"cidr\"\npath = \"/x\"\n\
             [[route.rules]]\nrule_set = [\"cn\"]\noutbound = \"direct\"\n"
        ));
        assert_eq!(single, list);
        assert_eq!(single.route.rules.len(), 1);
    }
}
