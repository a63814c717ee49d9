//! `[firewall]`: what the capture rules catch, and how they are installed.

use std::fmt;

use serde::Deserialize;

use super::{de, Mode};
use crate::cidr::{Cidr, PortRange};
use crate::one_or_many;

/// Which tool installs the capture rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nftables,
    Iptables,
    /// The user writes the rules; tproxyd installs nothing.
    None,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nftables => "nftables",
            Backend::Iptables => "iptables",
            Backend::None => "none",
        })
    }
}

/// What the firewall rules capture and how (see docs/firewall.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    pub backend: Backend,
    /// Traffic arriving on these interfaces is captured (`eth*` allowed).
    pub lan_interfaces: Vec<String>,
    /// If set, only traffic from these sources is captured.
    pub source_cidrs: Vec<Cidr>,
    /// Destination ports to capture per protocol; empty means all.
    pub tcp_ports: Vec<PortRange>,
    pub udp_ports: Vec<PortRange>,
    /// Capture the router's own traffic too.
    pub proxy_local: bool,
    /// Destinations never captured: the defaults (unless turned off) and
    /// the user's own. The SOCKS5 server is added when the rules are made.
    pub bypass: Vec<Cidr>,
    /// fwmark the rules put on captured packets for the policy route.
    pub route_mark: u32,
    /// Routing table holding tproxyd's `local default dev lo` routes.
    pub route_table: u32,
    /// Priority of tproxyd's `ip rule`.
    pub rule_priority: u32,
    /// Keep the rules (dropping captured traffic) while tproxyd is down.
    pub fail_closed: bool,
    /// Rule sets whose prefixes the kernel skips itself (nftables sets):
    /// flows a leading direct rule would send direct never reach tproxyd.
    pub bypass_rule_sets: Vec<String>,
}

pub const DEFAULT_ROUTE_MARK: u32 = 0x1090;
pub const DEFAULT_ROUTE_TABLE: u32 = 1090;
pub const DEFAULT_RULE_PRIORITY: u32 = 1090;

/// Ranges that are never proxied unless the user removes them: private,
/// loopback, link-local, CGNAT, multicast, broadcast/reserved and
/// unspecified. The documentation ranges (192.0.2.0/24, 198.51.100.0/24,
/// 203.0.113.0/24, 2001:db8::/32) are deliberately not here.
pub const DEFAULT_BYPASS: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

pub fn default_bypass() -> Vec<Cidr> {
    DEFAULT_BYPASS
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFirewall {
    pub backend: Option<Backend>,
    #[serde(default, deserialize_with = "one_or_many::option")]
    pub lan_interfaces: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de::opt_list_from_str")]
    pub source_cidrs: Option<Vec<Cidr>>,
    #[serde(default, deserialize_with = "de::opt_list_from_str")]
    pub tcp_ports: Option<Vec<PortRange>>,
    #[serde(default, deserialize_with = "de::opt_list_from_str")]
    pub udp_ports: Option<Vec<PortRange>>,
    pub proxy_local: Option<bool>,
    #[serde(default, deserialize_with = "de::opt_list_from_str")]
    pub bypass: Option<Vec<Cidr>>,
    /// false: bypass only what `bypass` lists (and the proxy servers).
    pub default_bypass: Option<bool>,
    #[serde(default, deserialize_with = "de::opt_mark")]
    pub route_mark: Option<u32>,
    pub route_table: Option<u32>,
    pub rule_priority: Option<u32>,
    pub fail_closed: Option<bool>,
    #[serde(default, deserialize_with = "one_or_many::option")]
    pub bypass_rule_sets: Option<Vec<String>>,
}

/// Interface names go into rule text: allow only what real names use
/// (plus a trailing `*` wildcard), so no name can inject a rule.
fn valid_interface(name: &str) -> bool {
    let body = name.strip_suffix('*').unwrap_or(name);
    !body.is_empty()
        && name.len() <= 15
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+'))
}

impl RawFirewall {
    pub(super) fn validate(
        &self,
        proxy_mark: u32,
        mode: Mode,
        tcp: bool,
        udp: bool,
        issue: &mut dyn FnMut(&str, String),
    ) -> FirewallConfig {
        let backend = self.backend.unwrap_or(Backend::Nftables);
        let lan_interfaces = self.lan_interfaces.clone().unwrap_or_default();
        for name in &lan_interfaces {
            if !valid_interface(name) {
                issue(
                    "firewall.lan_interfaces",
                    format!("{name:?} is not an interface name (letters, digits, . _ - @ +, at most 15, optional trailing *)"),
                );
            }
        }
        let source_cidrs = self.source_cidrs.clone().unwrap_or_default();
        let tcp_ports = self.tcp_ports.clone().unwrap_or_default();
        let udp_ports = self.udp_ports.clone().unwrap_or_default();
        let proxy_local = self.proxy_local.unwrap_or(false);
        let mut bypass = if self.default_bypass.unwrap_or(true) {
            default_bypass()
        } else {
            Vec::new()
        };
        bypass.extend(self.bypass.iter().flatten().copied());
        let route_mark = self.route_mark.unwrap_or(DEFAULT_ROUTE_MARK);
        let route_table = self.route_table.unwrap_or(DEFAULT_ROUTE_TABLE);
        let rule_priority = self.rule_priority.unwrap_or(DEFAULT_RULE_PRIORITY);
        let fail_closed = self.fail_closed.unwrap_or(false);

        if backend != Backend::None {
            // Without a transparent listener (a DNS forwarder only) no
            // rule captures anything: nothing to name.
            let captures = tcp || udp;
            if captures && lan_interfaces.is_empty() && source_cidrs.is_empty() && !proxy_local {
                issue(
                    "firewall",
                    "nothing to capture: name the LAN with --lan-interface IF (firewall.lan_interfaces) \
                     or firewall.source_cidrs, and/or add --proxy-local; or --firewall none if you \
                     write the rules yourself"
                        .into(),
                );
            }
            if route_mark == 0 || route_mark == proxy_mark {
                issue(
                    "firewall.route_mark",
                    format!("must be non-zero and differ from mark ({proxy_mark}): one marks captured packets, the other tproxyd's own"),
                );
            }
            if route_table == 0 || (253..=255).contains(&route_table) {
                issue(
                    "firewall.route_table",
                    "0, 253 (default), 254 (main) and 255 (local) are the system's tables; pick another".into(),
                );
            }
            if rule_priority == 0 || rule_priority >= 32766 {
                issue(
                    "firewall.rule_priority",
                    "must be between 1 and 32765 so the rule is seen before the main table".into(),
                );
            }
            if mode == Mode::Redirect && fail_closed {
                issue(
                    "firewall.fail_closed",
                    "only for mode tproxy: with redirect, flows to a stopped tproxyd are refused anyway".into(),
                );
            }
        }
        if !tcp && !tcp_ports.is_empty() {
            issue("firewall.tcp_ports", "set, but tcp is off".into());
        }
        if !udp && !udp_ports.is_empty() {
            issue("firewall.udp_ports", "set, but udp is off".into());
        }
        FirewallConfig {
            backend,
            lan_interfaces,
            source_cidrs,
            tcp_ports,
            udp_ports,
            proxy_local,
            bypass,
            route_mark,
            route_table,
            rule_priority,
            fail_closed,
            bypass_rule_sets: self.bypass_rule_sets.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::fw_issues;
    use crate::config::tests::{no_env, valid};
    use crate::config::*;

    #[test]
    fn firewall_defaults_and_udp_53_only() {
        let text = "udp = true\ntcp = false\n[outbound]\ntype = \"direct\"\n\
                    [firewall]\nlan_interfaces = [\"br-lan\"]\nudp_ports = [\"53\"]\nbypass = [\"192.0.2.0/24\"]\n";
        let cfg = RawConfig::from_toml(text, "t")
            .unwrap()
            .validate(&no_env)
            .unwrap();
        let fw = cfg.firewall;
        assert_eq!(fw.backend, Backend::Nftables);
        assert_eq!(fw.udp_ports, vec!["53".parse().unwrap()]);
        assert_eq!(
            (fw.route_mark, fw.route_table, fw.rule_priority),
            (0x1090, 1090, 1090)
        );
        assert!(fw.bypass.contains(&"10.0.0.0/8".parse().unwrap()));
        assert!(fw.bypass.contains(&"192.0.2.0/24".parse().unwrap()));
        assert!(!fw.fail_closed && !fw.proxy_local);
    }

    #[test]
    fn firewall_problems_name_their_keys() {
        assert_eq!(fw_issues("")[0].key, "firewall");
        assert!(fw_issues("backend = \"none\"").is_empty());
        assert!(fw_issues("proxy_local = true").is_empty());
        let keys = |fw: &str| fw_issues(fw).into_iter().map(|i| i.key).collect::<Vec<_>>();
        assert_eq!(
            keys("lan_interfaces = [\"eth0\\\" accept\"]"),
            ["firewall.lan_interfaces"]
        );
        assert_eq!(
            keys("lan_interfaces = [\"averyveryverylongname\"]"),
            ["firewall.lan_interfaces"]
        );
        assert!(keys("lan_interfaces = [\"eth*\", \"br-lan\", \"wg0.5\"]").is_empty());
        assert_eq!(
            keys("proxy_local = true\nroute_mark = 255"),
            ["firewall.route_mark"]
        );
        assert_eq!(
            keys("proxy_local = true\nroute_table = 254"),
            ["firewall.route_table"]
        );
        // A malformed prefix or port is a parse error now (see
        // a_wrong_value_is_a_parse_error_naming_key_and_expectation).
    }

    /// Every list key of `[firewall]` takes one value too.
    #[test]
    fn firewall_lists_take_one_value() {
        let file = |fw: &str| {
            format!(
                "[[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
                 [[route.rule_sets]]\nname = \"cn\"\nformat = \"cidr\"\npath = \"/x\"\n\
                 [[route.rules]]\nrule_set = [\"cn\"]\noutbound = \"direct\"\n\
                 [firewall]\n{fw}"
            )
        };
        for (key, one) in [
            ("lan_interfaces", "\"br-lan\""),
            ("source_cidrs", "\"192.168.1.0/24\""),
            ("tcp_ports", "\"80\""),
            ("udp_ports", "\"1000-2000\""),
            ("bypass", "\"192.0.2.0/24\""),
            ("bypass_rule_sets", "\"cn\""),
        ] {
            // The firewall needs an interface (or proxy_local) to capture.
            let lan = if key == "lan_interfaces" {
                ""
            } else {
                "lan_interfaces = [\"eth1\"]\n"
            };
            let single = valid(&file(&format!("{lan}{key} = {one}\n")));
            let list = valid(&file(&format!("{lan}{key} = [{one}]\n")));
            assert_eq!(single, list, "{key} = {one}");
        }
        let fw = valid(&file("lan_interfaces = \"br-lan\"\nudp_ports = \"53\"\n")).firewall;
        assert_eq!(fw.lan_interfaces, ["br-lan"]);
        assert_eq!(fw.udp_ports, ["53".parse().unwrap()]);
    }

    #[test]
    fn default_bypass_parses_whole_and_leaves_documentation_ranges_out() {
        let list = default_bypass();
        assert_eq!(list.len(), DEFAULT_BYPASS.len());
        for doc in [
            "192.0.2.0/24",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "2001:db8::/32",
        ] {
            assert!(!DEFAULT_BYPASS.contains(&doc));
        }
    }
}
