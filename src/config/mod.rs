//! Settings: read from TOML (`tproxyd run -c FILE`) or from the quick-start
//! flags, both turned into one validated [`Config`].
//!
//! Parsing is split in two: [`RawConfig`] is what serde reads (every field
//! optional, unknown keys refused), and [`RawConfig::validate`] turns it
//! into a [`Config`] or a list of errors, each naming the key it concerns,
//! so that `tproxyd check` can report every mistake in one pass.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::outbound::kinds::{OutboundConfig, RawOutbound};

mod api;
pub mod de;
mod dns;
mod error;
mod firewall;
mod limits;
mod route;

use api::validate_api;
pub use api::{ApiConfig, RawApi, Secret, DEFAULT_API_LISTEN};
pub use dns::{
    DnsAction, DnsCache, DnsConfig, DnsRule, DnsServer, Endpoint, FakeIp, Host, QueryType, RawDns,
    Reject, ServerAddress, DEFAULT_FAKE_IP_STORE,
};
use error::parse_error_message;
pub use error::{ConfigError, ConfigIssue};
pub use firewall::{
    default_bypass, Backend, FirewallConfig, RawFirewall, DEFAULT_BYPASS, DEFAULT_ROUTE_MARK,
    DEFAULT_ROUTE_TABLE, DEFAULT_RULE_PRIORITY,
};
pub use limits::{
    default_threads, Limits, RawLimits, RawTimeouts, Timeouts, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TCP_CONNECTING_PER_CLIENT, DEFAULT_TCP_FLOWS, DEFAULT_TCP_IDLE, DEFAULT_UDP_DNS_IDLE,
    DEFAULT_UDP_IDLE, DEFAULT_UDP_REPLY_SOCKETS, DEFAULT_UDP_SESSIONS, DEFAULT_UDP_SESSIONS_SHARE,
    DEFAULT_UDP_UNREPLIED, MAX_TABLE_ENTRIES, MAX_THREADS, MAX_TIMEOUT_SECS,
};
use route::check_bypass_rule_sets;
pub use route::{
    Network, RawRoute, RouteConfig, Rule, RuleSetConfig, RuleSetFormat, SniffProtocol,
};

/// How TCP flows reach the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// mangle PREROUTING TPROXY: TCP and UDP, destination unchanged.
    Tproxy,
    /// nat REDIRECT: TCP only, destination read back from conntrack.
    Redirect,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Tproxy => "tproxy",
            Mode::Redirect => "redirect",
        })
    }
}

/// The optional parts of tproxyd (Cargo.toml's `[features]`) that a
/// config can ask for: a router build may leave them out, and a config
/// that names one it lacks is refused rather than half-run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `api`: `[api]`, the Clash API and the dashboard (`metrics` adds
    /// /metrics on the same listener; a build without it answers 404
    /// saying so, and needs no key of its own).
    pub api: bool,
    /// `quic`: the QUIC Initial sniffer behind `protocol = "quic"`.
    pub quic: bool,
    /// `dns-tls`: DNS over TLS and HTTPS resolvers (rustls with ring, the
    /// one part of tproxyd that compiles C).
    pub dns_tls: bool,
}

impl Features {
    /// What this binary was built with.
    pub const BUILT: Features = Features {
        api: cfg!(feature = "api"),
        quic: cfg!(feature = "quic"),
        dns_tls: cfg!(feature = "dns-tls"),
    };
}

/// The advice after "built without the `X` feature".
const FEATURE_HINT: &str = "run a build that has it (cargo build --release with \
    default features; `tproxyd --version` lists a build's features)";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    /// Run as this user after start-up: a name or UID from /etc/passwd,
    /// or UID:GID.
    pub user: Option<String>,
    pub mode: Mode,
    pub tcp: bool,
    pub udp: bool,
    /// In the order given; names are unique.
    pub outbounds: Vec<OutboundConfig>,
    pub route: RouteConfig,
    pub mark: u32,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub firewall: FirewallConfig,
    /// The API, metrics and dashboard listener; None: not served.
    pub api: Option<ApiConfig>,
    pub dns: DnsConfig,
}

pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 1090);
pub const DEFAULT_MARK: u32 = 255;

/// The file as written. serde types every value (addresses, prefixes,
/// ports, marks) while reading, so a wrong value is a parse error naming
/// its key and line; [`RawConfig::validate`] only checks keys against each
/// other and fills in defaults. Unknown keys are errors.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default, deserialize_with = "de::opt_socket_addr")]
    pub listen: Option<SocketAddr>,
    /// The user to run as once the listeners are bound and the rules
    /// installed (`run --user` overrides it).
    pub user: Option<String>,
    pub mode: Option<Mode>,
    pub tcp: Option<bool>,
    pub udp: Option<bool>,
    #[serde(default, deserialize_with = "de::opt_mark")]
    pub mark: Option<u32>,
    /// One unnamed outbound (the shape before named outbounds); it is then
    /// `route.final`.
    pub outbound: Option<RawOutbound>,
    #[serde(default, deserialize_with = "crate::one_or_many::vec")]
    pub outbounds: Vec<RawOutbound>,
    #[serde(default)]
    pub route: RawRoute,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub firewall: RawFirewall,
    pub api: Option<RawApi>,
    #[serde(default)]
    pub dns: RawDns,
}

impl RawConfig {
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: parse_error_message(&e, text),
        })
    }

    /// Reads and parses `path`. A file past [`MAX_CONFIG_BYTES`] is refused
    /// after reading that much: `-c /dev/zero` must not read forever.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read as _;
        let shown = path.display().to_string();
        let read_error = |source| ConfigError::Read {
            path: shown.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: shown,
                max: MAX_CONFIG_BYTES,
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text ({e})"),
            ))
        })?;
        Self::from_toml(&text, &shown)
    }

    /// Checks every key and returns the config, or every problem found.
    ///
    /// `env` looks up environment variables (injected so tests need not
    /// touch the process environment).
    pub fn validate(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut issues = Vec::new();
        let mut issue = |key: &str, message: String| {
            issues.push(ConfigIssue {
                key: key.to_string(),
                message,
            });
        };

        let listen = match self.listen.unwrap_or(DEFAULT_LISTEN) {
            a if a.port() == 0 => {
                issue(
                    "listen",
                    "port 0 is not a fixed port the firewall rules could point at".into(),
                );
                None
            }
            SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => {
                issue(
                    "listen",
                    format!(
                        "{a} is an IPv4 address in IPv6 form; write it as IPv4 ({}:{})",
                        a.ip()
                            .to_ipv4_mapped()
                            .map_or(String::new(), |v4| v4.to_string()),
                        a.port()
                    ),
                );
                None
            }
            a => Some(a),
        };

        let mode = self.mode.unwrap_or(Mode::Tproxy);
        let tcp = self.tcp.unwrap_or(true);
        // REDIRECT cannot carry UDP: default UDP off there, refuse it if asked.
        let udp = self.udp.unwrap_or(mode == Mode::Tproxy);
        if mode == Mode::Redirect && udp {
            issue(
                "udp",
                "mode \"redirect\" serves TCP only: NAT REDIRECT keeps no per-datagram original \
                 destination; use mode = \"tproxy\" for UDP"
                    .into(),
            );
        }

        if let Some(user) = &self.user {
            if let Err(message) = crate::sys::UserSpec::parse(user) {
                issue(
                    "user",
                    format!("{message}: give a user name, a UID, or UID:GID"),
                );
            }
        }

        let mark = self.mark.unwrap_or(DEFAULT_MARK);
        if mark == 0 {
            issue(
                "mark",
                "must not be 0: the firewall rules tell tproxyd's own traffic apart by this mark, \
                 and 0 is every unmarked packet"
                    .into(),
            );
        }

        let (outbounds, route) = self.validate_outbounds_and_route(env, &mut issue);

        let timeouts = self.timeouts.validate(&mut issue);
        let limits = self.limits.validate(&mut issue);

        let mut firewall = self.firewall.validate(mark, mode, tcp, udp, &mut issue);
        let outbound_names: Vec<&str> = outbounds.iter().map(|o| o.name.as_str()).collect();
        let dns = self
            .dns
            .validate(udp, tcp, &outbound_names, &route.rule_sets, &mut issue);
        // No transparent listener is fine for a DNS forwarder (dnsmasq's
        // upstream on a router); with no DNS listener either, nothing
        // would ever reach tproxyd.
        if !tcp && !udp && dns.listen.is_empty() {
            issue(
                "tcp",
                "both tcp and udp are off and dns.listen is empty: nothing to serve; turn tcp or \
                 udp on, or set dns.listen (with [[dns.servers]]) to run tproxyd as a DNS \
                 forwarder only"
                    .into(),
            );
        }
        // The kernel bypass never covers the fake-ip ranges: a flow to a
        // fake address must reach tproxyd (see `carve_fake_ranges`).
        if let Some(fake) = &dns.fake_ip {
            firewall.bypass = crate::cidr::carve_fake_ranges(&firewall.bypass, &fake.ranges);
        }
        check_bypass_rule_sets(&firewall, &outbounds, &route, &mut issue);
        // REDIRECT rewrites the destination to the address of the interface
        // the packet came in on: only a wildcard listener is found there.
        if let Some(a) = listen {
            if mode == Mode::Redirect
                && firewall.backend != Backend::None
                && !a.ip().is_unspecified()
            {
                issue(
                    "listen",
                    format!(
                        "mode \"redirect\" needs a wildcard listener (\"[::]:{p}\" or \"0.0.0.0:{p}\"): \
                         REDIRECT sends each flow to the address of the interface it came in on, \
                         so a listener on {ip} would never see it",
                        p = a.port(),
                        ip = a.ip()
                    ),
                );
            }
        }

        let api = self.api.as_ref().map(|raw| validate_api(raw, &mut issue));
        self.check_features(Features::BUILT, &mut issue);

        match listen {
            Some(listen) if issues.is_empty() => Ok(Config {
                listen,
                user: self.user.clone(),
                mode,
                tcp,
                udp,
                outbounds,
                route,
                mark,
                timeouts,
                limits,
                firewall,
                api,
                dns,
            }),
            _ => Err(ConfigError::Invalid(issues)),
        }
    }
}

/// A config file is a few kilobytes; anything past this is not one.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl RawConfig {
    /// Refuses what this build cannot do: `[api]` without the `api`
    /// feature, `protocol = "quic"` without `quic` (nothing would ever be
    /// QUIC, so the rule would silently never match).
    fn check_features(&self, built: Features, issue: &mut dyn FnMut(&str, String)) {
        if self.api.is_some() && !built.api {
            issue(
                "api",
                format!(
                    "this tproxyd was built without the `api` feature (Clash API, dashboard \
                     and /metrics), as router builds made with --no-default-features are: \
                     remove [api], or {FEATURE_HINT}"
                ),
            );
        }
        if !built.quic {
            for (i, rule) in self.route.rules.iter().enumerate() {
                if rule.protocol.contains(&SniffProtocol::Quic) {
                    issue(
                        &format!("route.rules[{i}].protocol"),
                        format!(
                            "\"quic\" needs the `quic` feature (the QUIC sniffer), and this \
                             tproxyd was built without it, as router builds made with \
                             --no-default-features are: drop \"quic\" from the rule, or \
                             {FEATURE_HINT}"
                        ),
                    );
                }
            }
        }
        if !built.dns_tls {
            for (i, server) in self.dns.servers.iter().enumerate() {
                if server.address.needs_tls() {
                    issue(
                        &format!("dns.servers[{i}].address"),
                        "tls:// and https:// resolvers need the `dns-tls` feature (rustls \
                             with ring), and this tproxyd was built without it: use udp:// or \
                             tcp:// through a proxy outbound, or build with \
                             --features dns-tls"
                            .into(),
                    );
                }
            }
        }
    }

    /// The named outbounds (from `[outbound]` or `[[outbounds]]`) and the
    /// route, with every name a rule, a group or `route.final` uses checked
    /// against them.
    fn validate_outbounds_and_route(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        issue: &mut dyn FnMut(&str, String),
    ) -> (Vec<OutboundConfig>, RouteConfig) {
        let mut outbounds = Vec::new();
        match (&self.outbound, self.outbounds.is_empty()) {
            (Some(_), false) => issue(
                "outbound",
                "use either one [outbound] or several [[outbounds]], not both".into(),
            ),
            (None, true) => issue(
                "outbounds",
                "missing: name where flows go, e.g. [[outbounds]] name = \"proxy\" type = \"socks5\" \
                 server = \"IP:PORT\" (or type = \"direct\")"
                    .into(),
            ),
            _ => {}
        }
        if let Some(one) = &self.outbound {
            let name = one.name().unwrap_or(one.type_name()).to_string();
            outbounds.push(one.validate("outbound", name, env, issue));
        }
        for (i, raw) in self.outbounds.iter().enumerate() {
            let key = format!("outbounds[{i}]");
            let name = match raw.name() {
                Some(n) if !n.trim().is_empty() => n.to_string(),
                _ => {
                    issue(
                        &format!("{key}.name"),
                        "missing: every outbound needs a name that rules can use".into(),
                    );
                    format!("#{i}")
                }
            };
            outbounds.push(raw.validate(&key, name, env, issue));
        }

        let mut seen = HashSet::new();
        for o in &outbounds {
            if !seen.insert(o.name.as_str()) {
                issue("outbounds", format!("the name {:?} is used twice", o.name));
            }
        }
        let by_name: HashMap<&str, &OutboundConfig> =
            outbounds.iter().map(|o| (o.name.as_str(), o)).collect();
        let known = |name: &str| by_name.contains_key(name);
        for (i, o) in outbounds.iter().enumerate() {
            for m in o.kind.members() {
                if !known(m) {
                    issue(
                        &format!("outbounds[{i}].outbounds"),
                        format!("{m:?} is not the name of an outbound"),
                    );
                }
            }
        }
        // A group that reaches itself through its members would choose
        // for ever.
        for o in &outbounds {
            let mut stack: Vec<&str> = o.kind.members().iter().map(String::as_str).collect();
            let mut visited = HashSet::new();
            while let Some(m) = stack.pop() {
                if m == o.name {
                    issue(
                        "outbounds",
                        format!("group {:?} contains itself (through its members)", o.name),
                    );
                    break;
                }
                if visited.insert(m) {
                    if let Some(next) = by_name.get(m) {
                        stack.extend(next.kind.members().iter().map(String::as_str));
                    }
                }
            }
        }

        let route = self.route.validate(&outbounds, &known, issue);
        (outbounds, route)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::outbound::kinds::OutboundKind;

    pub(super) fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_build_without_a_feature_refuses_the_config_that_needs_it() {
        let text = "[outbound]\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\n[api]\n\
                    [[route.rules]]\nprotocol = [\"tls\", \"quic\"]\noutbound = \"direct\"\n";
        let raw = RawConfig::from_toml(text, "t").unwrap();
        let issues = |built| {
            let mut found = Vec::new();
            raw.check_features(built, &mut |key: &str, message: String| {
                found.push((key.to_string(), message));
            });
            found
        };
        let full = Features {
            api: true,
            quic: true,
            dns_tls: false,
        };
        assert_eq!(issues(full), []);
        let minimal = issues(Features {
            api: false,
            quic: false,
            dns_tls: false,
        });
        assert_eq!(minimal.len(), 2, "{minimal:?}");
        assert_eq!(minimal[0].0, "api");
        assert!(minimal[0].1.contains("built without the `api` feature"));
        assert!(minimal[0].1.contains("remove [api]"));
        assert_eq!(minimal[1].0, "route.rules[0].protocol");
        assert!(minimal[1].1.contains("needs the `quic` feature"));
        // A config that asks for neither passes a minimal build.
        let plain = RawConfig::from_toml("[outbound]\ntype = \"direct\"\n", "t").unwrap();
        let mut none = Vec::new();
        plain.check_features(
            Features {
                api: false,
                quic: false,
                dns_tls: false,
            },
            &mut |key: &str, _| none.push(key.to_string()),
        );
        assert!(none.is_empty(), "{none:?}");
        // And this build checks with what it was built with.
        // (The tests run with the default features, and with dns-tls or
        // without it: CI adds it.)
        assert_eq!(
            Features::BUILT,
            Features {
                dns_tls: cfg!(feature = "dns-tls"),
                ..full
            },
            "the tests run with the default features"
        );
    }

    /// Most tests are not about the firewall: switch it off.
    pub(super) fn no_fw(text: &str) -> String {
        format!("{text}\n[firewall]\nbackend = \"none\"\n")
    }

    pub(super) fn issues_of(text: &str) -> Vec<ConfigIssue> {
        match RawConfig::from_toml(&no_fw(text), "t.toml")
            .unwrap()
            .validate(&no_env)
        {
            Err(ConfigError::Invalid(v)) => v,
            other => panic!("expected validation issues, got {other:?}"),
        }
    }

    #[test]
    fn minimal_socks5_config_gets_defaults() {
        let cfg = RawConfig::from_toml(
            &no_fw("[outbound]\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n"),
            "t.toml",
        )
        .unwrap()
        .validate(&no_env)
        .unwrap();
        assert_eq!(cfg.listen, "[::]:1090".parse().unwrap());
        assert_eq!(cfg.mode, Mode::Tproxy);
        assert!(cfg.tcp && cfg.udp);
        assert_eq!(cfg.mark, 255);
        assert_eq!(cfg.timeouts.connect, Duration::from_secs(10));
        assert_eq!(cfg.timeouts.tcp_idle, Duration::from_secs(300));
        assert_eq!(cfg.timeouts.udp_idle, Duration::from_secs(60));
        assert_eq!(cfg.limits.threads, default_threads());
        assert_eq!(
            cfg.outbounds,
            [OutboundConfig {
                name: "socks5".into(),
                kind: OutboundKind::Socks5(crate::outbound::socks5::Settings {
                    server: "203.0.113.2:1080".parse().unwrap(),
                    auth: None,
                    send_domain: false,
                    dns_over_tcp: false,
                })
            }]
        );
        assert_eq!(cfg.route.final_outbound, "socks5");
        assert!(cfg.route.rules.is_empty());
    }

    #[test]
    fn user_is_a_name_a_uid_or_uid_gid() {
        let base = "[outbound]\ntype = \"direct\"\n";
        for ok in ["tproxyd", "999", "999:995"] {
            let cfg = RawConfig::from_toml(&no_fw(&format!("user = \"{ok}\"\n{base}")), "t")
                .unwrap()
                .validate(&no_env)
                .unwrap();
            assert_eq!(cfg.user.as_deref(), Some(ok));
        }
        for bad in ["", "two words", "999:x"] {
            let issues = issues_of(&format!("user = \"{bad}\"\n{base}"));
            assert_eq!(issues.len(), 1, "{bad:?}: {issues:?}");
            assert_eq!(issues[0].key, "user");
        }
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../../examples/tproxyd.toml");
        let env = |k: &str| (k == "TPROXYD_PASSWORD").then(|| "pw".to_string());
        let cfg = RawConfig::from_toml(text, "example")
            .unwrap()
            .validate(&env)
            .unwrap();
        assert_eq!(cfg.mode, Mode::Tproxy);
    }

    /// Values are typed while the file is read: a wrong one is a parse
    /// error naming its key, with a message that says what was expected.
    #[test]
    fn a_wrong_value_is_a_parse_error_naming_key_and_expectation() {
        for (text, key, says) in [
            ("listen = \"nonsense\"\n", "listen", "is not IP:PORT"),
            (
                "[outbound]\ntype = \"socks5\"\nserver = \"proxy.example:1080\"\n",
                "server",
                "host name is refused",
            ),
            ("mark = \"0xzz\"\n", "mark", "not a 32-bit mark"),
            (
                "[firewall]\nbypass = [\"10.0.0.0/40\"]\n",
                "bypass",
                "prefix length",
            ),
            (
                "[firewall]\nudp_ports = [\"x\"]\n",
                "udp_ports",
                "not a port",
            ),
            (
                "[[route.rules]]\ndst_port = [\"0\"]\noutbound = \"a\"\n",
                "dst_port",
                "not a port",
            ),
        ] {
            let err = RawConfig::from_toml(text, "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(says), "{text:?}: {err}");
        }
    }

    /// What only the keys together can tell is reported in one pass.
    #[test]
    fn every_problem_is_reported_with_its_key() {
        let issues = issues_of(
            "mode = \"redirect\"\nudp = true\nmark = 0\n\
             [outbound]\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\nusername = \"u\"\n\
             [timeouts]\nconnect = 0\n",
        );
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            ["udp", "mark", "outbound.password", "timeouts.connect"]
        );
    }

    #[test]
    fn marks_may_be_written_in_hex() {
        let cfg = RawConfig::from_toml(
            &no_fw("mark = \"0xff\"\n[outbound]\ntype = \"direct\"\n"),
            "t",
        )
        .unwrap()
        .validate(&no_env)
        .unwrap();
        assert_eq!(cfg.mark, 255);
        let cfg = RawConfig::from_toml(
            "mark = 0x1f\n[outbound]\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\nroute_mark = \"0x2000\"\n",
            "t",
        )
        .unwrap()
        .validate(&no_env)
        .unwrap();
        assert_eq!((cfg.mark, cfg.firewall.route_mark), (0x1f, 0x2000));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_parse_errors_naming_the_key() {
        let err = RawConfig::from_toml("lisen = \"[::]:1\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = RawConfig::from_toml("[outbound]\ntype = 5\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("type"), "{err}");
        let err = RawConfig::from_toml("mode = \"nat\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("nat"), "{err}");
    }

    #[test]
    fn a_file_past_the_size_cap_is_refused_without_reading_it_all() {
        // /dev/zero never ends: reading it whole would never return.
        match RawConfig::load(Path::new("/dev/zero")) {
            Err(ConfigError::TooLarge { max, .. }) => assert_eq!(max, MAX_CONFIG_BYTES),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn listen_addresses_redirect_cannot_reach_are_refused() {
        let issues = fw_issues_top(
            "mode = \"redirect\"\nlisten = \"127.0.0.1:1090\"\n",
            "lan_interfaces = [\"eth1\"]",
        );
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "listen");
        assert!(issues[0].message.contains("wildcard"), "{issues:?}");
        assert!(fw_issues_top(
            "mode = \"redirect\"\nlisten = \"0.0.0.0:1090\"\n",
            "lan_interfaces = [\"eth1\"]"
        )
        .is_empty());
        let issues = fw_issues_top(
            "listen = \"[::ffff:127.0.0.1]:1090\"\n",
            "backend = \"none\"",
        );
        assert_eq!(issues[0].key, "listen");
        assert!(issues[0].message.contains("127.0.0.1:1090"), "{issues:?}");
    }

    #[test]
    fn a_failover_interval_is_bounded_as_every_other_duration() {
        assert_eq!(crate::outbound::group::MAX_INTERVAL_SECS, MAX_TIMEOUT_SECS);
    }

    #[test]
    fn password_from_environment() {
        let raw = RawConfig::from_toml(
            &no_fw("[outbound]\ntype=\"socks5\"\nserver=\"[2001:db8::1]:1080\"\nusername=\"u\"\npassword_env=\"PW\"\n"),
            "t.toml",
        )
        .unwrap();
        let env = |k: &str| (k == "PW").then(|| "s3cret".to_string());
        let cfg = raw.validate(&env).unwrap();
        let OutboundKind::Socks5(crate::outbound::socks5::Settings { auth: Some(c), .. }) =
            &cfg.outbounds[0].kind
        else {
            panic!("expected credentials");
        };
        assert_eq!(c.password, "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
        let issues = match raw.validate(&no_env) {
            Err(ConfigError::Invalid(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "outbound.password_env");
    }

    #[test]
    fn redirect_mode_defaults_to_tcp_only() {
        let cfg = RawConfig::from_toml(
            &no_fw("mode=\"redirect\"\n[outbound]\ntype=\"direct\"\n"),
            "t",
        )
        .unwrap()
        .validate(&no_env)
        .unwrap();
        assert!(cfg.tcp && !cfg.udp);
    }

    /// No transparent listener: refused unless tproxyd has a DNS listener
    /// to serve (a router's dnsmasq forwarding to it), and the refusal
    /// names the fix.
    #[test]
    fn a_dns_forwarder_only_needs_no_transparent_listener() {
        let off = "tcp = false\nudp = false\n[outbound]\ntype = \"direct\"\n";
        let issues = issues_of(off);
        assert_eq!(issues[0].key, "tcp");
        assert!(issues[0].message.contains("dns.listen"), "{issues:?}");
        let cfg = valid(&no_fw(&format!(
            "{off}[dns]\nlisten = [\"127.0.0.1:5353\"]\n\
             [[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\n"
        )));
        assert!(!cfg.tcp && !cfg.udp);
        assert_eq!(cfg.dns.listen, ["127.0.0.1:5353".parse().unwrap()]);
        // With a firewall backend: no LAN to name, since nothing is
        // captured.
        let cfg = valid(&format!(
            "{off}[dns]\nlisten = [\"127.0.0.1:5353\"]\n\
             [[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\n\
             [firewall]\nbackend = \"nftables\"\n"
        ));
        assert!(!cfg.tcp && !cfg.udp);
    }

    #[test]
    fn missing_or_unknown_outbound_is_reported() {
        assert_eq!(issues_of("")[0].key, "outbounds");
        for (text, says) in [
            ("[outbound]\ntype=\"ftp\"\n", "unknown variant"),
            ("[outbound]\ntype=\"http\"\n", "missing field `server`"),
            (
                "[outbound]\ntype=\"direct\"\nserver=\"1.2.3.4:1\"\n",
                "unknown field `server`",
            ),
        ] {
            let err = RawConfig::from_toml(text, "t").unwrap_err().to_string();
            assert!(err.contains(says), "{text:?}: {err}");
        }
        assert_eq!(
            issues_of("tcp=false\nudp=false\n[outbound]\ntype=\"direct\"\n")[0].key,
            "tcp"
        );
    }

    /// Parses and validates `text`, which must be valid.
    pub(super) fn valid(text: &str) -> Config {
        RawConfig::from_toml(text, "t")
            .unwrap_or_else(|e| panic!("{text}\n{e}"))
            .validate(&no_env)
            .unwrap_or_else(|e| panic!("{text}\n{e}"))
    }

    /// A wrong single value is reported like a wrong list element: the
    /// key, the line, and what was expected.
    #[test]
    fn a_wrong_single_value_names_its_key_line_and_expectation() {
        for (text, key, says) in [
            (
                "[[route.rules]]\ndst_port = \"0\"\noutbound = \"a\"\n",
                "dst_port",
                "not a port",
            ),
            (
                "[[route.rules]]\nprotocol = \"quik\"\noutbound = \"a\"\n",
                "protocol",
                "unknown variant `quik`",
            ),
            (
                "[firewall]\nbypass = \"10.0.0.0/40\"\n",
                "bypass",
                "prefix length",
            ),
            (
                "[firewall]\nlan_interfaces = 5\n",
                "lan_interfaces",
                "expected a string",
            ),
        ] {
            let err = RawConfig::from_toml(text, "t.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key) && err.contains(says) && err.contains("line 2"),
                "{text:?}: {err}"
            );
        }
    }

    /// A group's members and the outbound entries themselves take one
    /// value as well as a list, like every other list key.
    #[test]
    fn outbound_lists_take_a_single_value() {
        let list = valid(
            "[[outbounds]]\nname = \"a\"\ntype = \"direct\"\n\
             [[outbounds]]\nname = \"g\"\ntype = \"selector\"\noutbounds = [\"a\"]\n\
             [[outbounds]]\nname = \"f\"\ntype = \"failover\"\noutbounds = [\"a\"]\n\
             [route]\nfinal = \"g\"\n[firewall]\nbackend = \"none\"\n",
        );
        let single = valid(
            "[[outbounds]]\nname = \"a\"\ntype = \"direct\"\n\
             [[outbounds]]\nname = \"g\"\ntype = \"selector\"\noutbounds = \"a\"\n\
             [[outbounds]]\nname = \"f\"\ntype = \"failover\"\noutbounds = \"a\"\n\
             [route]\nfinal = \"g\"\n[firewall]\nbackend = \"none\"\n",
        );
        assert_eq!(single.outbounds, list.outbounds);
        assert_eq!(single.outbounds.len(), 3);
        // One `[outbounds]` table is a list of one.
        let one =
            valid("[outbounds]\nname = \"a\"\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\n");
        assert_eq!(one.outbounds.len(), 1);
        assert_eq!(one.outbounds[0].name, "a");
    }

    pub(super) fn fw_issues(fw: &str) -> Vec<ConfigIssue> {
        fw_issues_top("", fw)
    }

    pub(super) fn fw_issues_top(top: &str, fw: &str) -> Vec<ConfigIssue> {
        let text = format!("{top}[outbound]\ntype = \"direct\"\n[firewall]\n{fw}");
        match RawConfig::from_toml(&text, "t").unwrap().validate(&no_env) {
            Err(ConfigError::Invalid(v)) => v,
            Ok(_) => vec![],
            Err(e) => panic!("{e}"),
        }
    }
}
