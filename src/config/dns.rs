//! `[dns]`: what tproxyd does with the DNS it captures.

use std::net::SocketAddr;

use serde::Deserialize;

use super::de;

/// `[dns]`: what tproxyd does with the DNS it captures (UDP port 53).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Every captured query goes to this resolver, whatever address the
    /// client asked; the answer comes back from the address it asked.
    pub server: Option<SocketAddr>,
    /// AAAA questions are answered here, NOERROR with no records.
    pub filter_aaaa: bool,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    #[serde(default, deserialize_with = "de::opt_socket_addr")]
    pub server: Option<SocketAddr>,
    pub filter_aaaa: Option<bool>,
}

impl RawDns {
    pub(super) fn validate(&self, udp: bool, issue: &mut dyn FnMut(&str, String)) -> DnsConfig {
        let dns = DnsConfig {
            server: self.server.map(crate::sys::normalize),
            filter_aaaa: self.filter_aaaa.unwrap_or(false),
        };
        if let Some(s) = dns.server {
            let ip = s.ip();
            let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
            if s.port() == 0 || ip.is_unspecified() || ip.is_multicast() || broadcast {
                issue(
                    "dns.server",
                    format!("{s} is not a resolver's address (a unicast IP and a port, like \"198.51.100.53:53\")"),
                );
            }
        }
        if !udp && (dns.server.is_some() || dns.filter_aaaa) {
            issue(
                "dns",
                "set, but udp is off: tproxyd sees DNS only as captured UDP (port 53)".into(),
            );
        }
        dns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{issues_of, no_env, no_fw};
    use crate::config::*;
    use crate::outbound::kinds::OutboundKind;

    #[test]
    fn the_dns_section_and_dns_over_tcp() {
        let text =
            "[outbound]\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\ndns_over_tcp = true\n\
                    [dns]\nserver = \"198.51.100.53:53\"\nfilter_aaaa = true\n";
        let cfg = RawConfig::from_toml(&no_fw(text), "t")
            .unwrap()
            .validate(&no_env)
            .unwrap();
        assert_eq!(cfg.dns.server, Some("198.51.100.53:53".parse().unwrap()));
        assert!(cfg.dns.filter_aaaa);
        assert!(matches!(
            &cfg.outbounds[0].kind,
            OutboundKind::Socks5(s) if s.dns_over_tcp
        ));
        // Off unless set.
        let plain = RawConfig::from_toml(&no_fw("[outbound]\ntype = \"direct\"\n"), "t")
            .unwrap()
            .validate(&no_env)
            .unwrap();
        assert_eq!(plain.dns, DnsConfig::default());
        // Wrong values are parse errors naming the key.
        for (text, key, says) in [
            (
                "[dns]\nserver = \"resolver.example:53\"\n",
                "server",
                "host name is refused",
            ),
            (
                "[dns]\nserver = \"198.51.100.53\"\n",
                "server",
                "is not IP:PORT",
            ),
            (
                "[dns]\nfilter_aaaa = \"yes\"\n",
                "filter_aaaa",
                "expected a boolean",
            ),
            (
                "[dns]\nfiltre_aaaa = true\n",
                "filtre_aaaa",
                "unknown field",
            ),
            (
                "[outbound]\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\ndns_over_tcp = 1\n",
                "dns_over_tcp",
                "boolean",
            ),
            (
                "[outbound]\ntype = \"http\"\nserver = \"203.0.113.2:3128\"\ndns_over_tcp = true\n",
                "dns_over_tcp",
                "unknown field",
            ),
        ] {
            let err = RawConfig::from_toml(text, "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(says), "{text:?}: {err}");
        }
        // Addresses no resolver has, and DNS settings without UDP.
        for (top, dns, key) in [
            ("", "server = \"0.0.0.0:53\"", "dns.server"),
            ("", "server = \"198.51.100.53:0\"", "dns.server"),
            ("", "server = \"[ff02::1]:53\"", "dns.server"),
            ("udp = false\n", "filter_aaaa = true", "dns"),
        ] {
            let issues = issues_of(&format!(
                "{top}[outbound]\ntype = \"direct\"\n[dns]\n{dns}\n"
            ));
            assert_eq!(
                issues.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(),
                [key],
                "{dns:?}: {issues:?}"
            );
        }
    }
}
