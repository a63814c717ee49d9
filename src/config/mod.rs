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
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::firewall::cidr::{default_bypass, Cidr, PortRange};
pub use crate::outbound::kinds::{OutboundConfig, OutboundKind, RawOutbound};

pub mod de;

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
    #[serde(default)]
    pub domain: Vec<String>,
    #[serde(default)]
    pub domain_suffix: Vec<String>,
    #[serde(default)]
    pub domain_keyword: Vec<String>,
    #[serde(default)]
    pub domain_regex: Vec<String>,
    #[serde(default)]
    pub rule_set: Vec<String>,
    #[serde(default)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    /// DNS sessions are one question and one answer: keeping them for the
    /// full UDP timeout only fills the session table.
    pub udp_dns_idle: Duration,
    /// Idle timeout of a session that never got a reply: a flood of new
    /// client ports (or a scan) is mostly such sessions, and they must not
    /// hold table slots as long as live ones.
    pub udp_unreplied: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most UDP sessions (client address:port) at once; new clients beyond
    /// it are refused with a warning rather than growing without bound.
    pub udp_sessions: usize,
    /// Most UDP sessions of one client address (all its ports): one host
    /// flooding new ports must not take the whole table, and with it every
    /// other host's DNS.
    pub udp_sessions_per_client: usize,
    /// Most cached reply sockets (one per remote address:port).
    pub udp_reply_sockets: usize,
    /// Threads that run the relay. The kernel does most of the work per
    /// byte and per datagram; on a small router the other cores are busy
    /// forwarding and taking interrupts, and a second relay thread there
    /// measured slower, not faster (bench/RESULTS.md).
    pub threads: usize,
    /// Most TCP flows at once; connections beyond it are reset at once
    /// rather than holding descriptors the open flows need.
    pub tcp_flows: usize,
    /// Most TCP connects in progress (upstream not yet answered) from one
    /// client address: 5,000 connects to a blackholed address must not
    /// hold 10,000 descriptors for the whole connect timeout.
    pub tcp_connecting_per_client: usize,
}

/// Threads when the config names none: half the cores, at least one.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).max(1)
}

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

/// `[dns]`: what tproxyd does with the DNS it captures (UDP port 53).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Every captured query goes to this resolver, whatever address the
    /// client asked; the answer comes back from the address it asked.
    pub server: Option<SocketAddr>,
    /// AAAA questions are answered here, NOERROR with no records.
    pub filter_aaaa: bool,
}

/// `[api]`: one listener for the Clash-compatible API, `/metrics` and
/// the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// The Bearer token every request must carry; None: no auth (allowed
    /// on a loopback address only).
    pub secret: Option<Secret>,
}

/// A token that must never reach a log line or a debug dump.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for comparing a request's token against it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where the API listens when `[api]` is present without `listen`:
/// loopback, so nothing outside the box reaches it unless asked for.
pub const DEFAULT_API_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);

pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 1090);
pub const DEFAULT_MARK: u32 = 255;
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 10;
pub const DEFAULT_TCP_IDLE: u64 = 300;
pub const DEFAULT_UDP_IDLE: u64 = 60;
pub const DEFAULT_UDP_DNS_IDLE: u64 = 10;
/// Linux conntrack keeps an unreplied UDP flow a quarter as long as a
/// replied one (30 s against 120 s); the same ratio over 60 s is 15 s, and
/// 10 s matches the DNS timeout, whose sessions are the common unreplied ones.
pub const DEFAULT_UDP_UNREPLIED: u64 = 10;
/// Longest accepted timeout: a week. Longer values are almost certainly a
/// mistake, and bounding them keeps every deadline arithmetic in range.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Sized for a small router: a few hundred LAN devices with a handful of
/// UDP flows each. Each session costs a socket (two with SOCKS5).
pub const DEFAULT_UDP_SESSIONS: usize = 4096;
pub const DEFAULT_UDP_REPLY_SOCKETS: usize = 1024;
/// A quarter of the table per client address unless set.
pub const DEFAULT_UDP_SESSIONS_SHARE: usize = 4;
pub const DEFAULT_TCP_FLOWS: usize = 16_384;
pub const DEFAULT_TCP_CONNECTING_PER_CLIENT: usize = 256;
/// Upper bounds on counts: each is far past what one box can serve, and
/// keeps a typo (or `u64::MAX`) from reaching an allocation or a thread
/// spawn.
pub const MAX_TABLE_ENTRIES: usize = 1 << 20;
pub const MAX_THREADS: usize = 256;

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
    #[serde(default)]
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

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    #[serde(default, deserialize_with = "de::opt_socket_addr")]
    pub listen: Option<SocketAddr>,
    pub secret: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    #[serde(default, deserialize_with = "de::opt_socket_addr")]
    pub server: Option<SocketAddr>,
    pub filter_aaaa: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(rename = "final")]
    pub final_outbound: Option<String>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub rule_sets: Vec<RuleSetConfig>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFirewall {
    pub backend: Option<Backend>,
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
    pub bypass_rule_sets: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<u64>,
    pub tcp_idle: Option<u64>,
    pub udp_idle: Option<u64>,
    pub udp_dns_idle: Option<u64>,
    pub udp_unreplied: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub udp_sessions: Option<usize>,
    pub udp_sessions_per_client: Option<usize>,
    pub udp_reply_sockets: Option<usize>,
    pub threads: Option<usize>,
    pub tcp_flows: Option<usize>,
    pub tcp_connecting_per_client: Option<usize>,
}

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The key as written in the file, with an index for list entries:
    /// `outbounds[1].server`, `route.rules[0].outbound`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes; that is not a tproxyd config file")]
    TooLarge { path: String, max: u64 },
    /// `message` is the parser's, with the values of secret keys redacted:
    /// it quotes the offending line, which may be the password's.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{}", .0.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigIssue>),
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
        if !tcp && !udp {
            issue("tcp", "both tcp and udp are off: nothing to serve".into());
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

        let secs = |key: &str,
                    v: Option<u64>,
                    default: u64,
                    issue: &mut dyn FnMut(&str, String)| {
            let v = v.unwrap_or(default);
            if v == 0 {
                issue(key, "must be at least 1 second".into());
            }
            if v > MAX_TIMEOUT_SECS {
                issue(
                    key,
                    format!("{v} seconds is more than a week ({MAX_TIMEOUT_SECS}); use a shorter timeout"),
                );
            }
            Duration::from_secs(v.min(MAX_TIMEOUT_SECS))
        };
        let t = &self.timeouts;
        let timeouts = Timeouts {
            connect: secs(
                "timeouts.connect",
                t.connect,
                DEFAULT_CONNECT_TIMEOUT,
                &mut issue,
            ),
            tcp_idle: secs(
                "timeouts.tcp_idle",
                t.tcp_idle,
                DEFAULT_TCP_IDLE,
                &mut issue,
            ),
            udp_idle: secs(
                "timeouts.udp_idle",
                t.udp_idle,
                DEFAULT_UDP_IDLE,
                &mut issue,
            ),
            udp_dns_idle: secs(
                "timeouts.udp_dns_idle",
                t.udp_dns_idle,
                DEFAULT_UDP_DNS_IDLE,
                &mut issue,
            ),
            udp_unreplied: secs(
                "timeouts.udp_unreplied",
                t.udp_unreplied,
                DEFAULT_UDP_UNREPLIED,
                &mut issue,
            ),
        };

        let l = &self.limits;
        let udp_sessions = l.udp_sessions.unwrap_or(DEFAULT_UDP_SESSIONS);
        let limits = Limits {
            udp_sessions,
            udp_sessions_per_client: l
                .udp_sessions_per_client
                .unwrap_or((udp_sessions / DEFAULT_UDP_SESSIONS_SHARE).max(1)),
            udp_reply_sockets: l.udp_reply_sockets.unwrap_or(DEFAULT_UDP_REPLY_SOCKETS),
            threads: l.threads.unwrap_or_else(default_threads),
            tcp_flows: l.tcp_flows.unwrap_or(DEFAULT_TCP_FLOWS),
            tcp_connecting_per_client: l
                .tcp_connecting_per_client
                .unwrap_or(DEFAULT_TCP_CONNECTING_PER_CLIENT),
        };
        for (key, value, max) in [
            (
                "limits.udp_sessions",
                limits.udp_sessions,
                MAX_TABLE_ENTRIES,
            ),
            (
                "limits.udp_sessions_per_client",
                limits.udp_sessions_per_client,
                MAX_TABLE_ENTRIES,
            ),
            (
                "limits.udp_reply_sockets",
                limits.udp_reply_sockets,
                MAX_TABLE_ENTRIES,
            ),
            ("limits.tcp_flows", limits.tcp_flows, MAX_TABLE_ENTRIES),
            (
                "limits.tcp_connecting_per_client",
                limits.tcp_connecting_per_client,
                MAX_TABLE_ENTRIES,
            ),
        ] {
            if value == 0 {
                issue(key, "must be at least 1".into());
            } else if value > max {
                issue(
                    key,
                    format!("{value} is more than the most allowed ({max})"),
                );
            }
        }
        if limits.udp_sessions_per_client > limits.udp_sessions {
            issue(
                "limits.udp_sessions_per_client",
                format!(
                    "{} is more than limits.udp_sessions ({}): one client could fill the table",
                    limits.udp_sessions_per_client, limits.udp_sessions
                ),
            );
        }
        if limits.tcp_connecting_per_client > limits.tcp_flows {
            issue(
                "limits.tcp_connecting_per_client",
                format!(
                    "{} is more than limits.tcp_flows ({})",
                    limits.tcp_connecting_per_client, limits.tcp_flows
                ),
            );
        }
        if limits.threads == 0 {
            issue(
                "limits.threads",
                "must be at least 1 (leave it out for half the cores)".into(),
            );
        } else if limits.threads > MAX_THREADS {
            issue(
                "limits.threads",
                format!(
                    "{} is more than {MAX_THREADS}; the relay measured fastest on half the cores (leave it out)",
                    limits.threads
                ),
            );
        }

        let firewall = self.firewall.validate(mark, mode, tcp, udp, &mut issue);
        let dns = self.dns.validate(udp, &mut issue);
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

/// `[api]`: a listener anyone else can reach must ask for a token, since
/// the API closes flows, switches upstreams and reloads the rules.
fn validate_api(raw: &RawApi, issue: &mut dyn FnMut(&str, String)) -> ApiConfig {
    let listen = raw.listen.unwrap_or(DEFAULT_API_LISTEN);
    // An empty secret is no secret (as in mihomo): no auth at all.
    let secret = raw
        .secret
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(Secret::new);
    if secret.is_none() && !listen.ip().is_loopback() {
        issue(
            "api.secret",
            format!(
                "is required when api.listen ({listen}) is not a loopback address: whoever \
                 reaches it could close flows, switch upstreams and reload the rules. Set \
                 api.secret = \"<a long random string>\" (dashboards send it as the Bearer \
                 token), or listen on loopback (api.listen = \"127.0.0.1:{}\")",
                listen.port()
            ),
        );
    }
    if raw
        .secret
        .as_deref()
        .is_some_and(|s| s.chars().any(char::is_control))
    {
        issue(
            "api.secret",
            "must not contain control characters: an HTTP header cannot carry them".into(),
        );
    }
    ApiConfig { listen, secret }
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
fn check_bypass_rule_sets(
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

/// A config file is a few kilobytes; anything past this is not one.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Keys whose values must never appear in an error message.
const SECRET_KEYS: [&str; 2] = ["password", "secret"];

/// The parser's message for a file that may hold a secret.
///
/// The parser's own rendering quotes the line it stopped at, and a secret
/// can sit on any line in any TOML form: a `password = "..."` line, an
/// inline table (`outbound = { password = "..." }`), the body of a
/// multi-line string. So when the file names a secret key, the message
/// says where (line and column) and what, without the excerpt; and values
/// of secret keys are redacted from what is left, since a type error
/// quotes the value ("invalid type: integer `12345678`").
fn parse_error_message(e: &toml::de::Error, text: &str) -> String {
    if !SECRET_KEYS.iter().any(|k| text.contains(k)) {
        return e.to_string();
    }
    let mut message = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!(
                "TOML parse error at line {line}, column {column}: {}",
                e.message().trim_end()
            )
        }
        None => format!("TOML parse error: {}", e.message().trim_end()),
    };
    for value in secret_values(text) {
        message = message.replace(value, "<redacted>");
    }
    message
}

/// The values given to secret keys anywhere in `text`, in any form: what
/// follows `KEY =` (quotes, spacing and dotted prefixes aside) up to its
/// closing quote, or for a bare value up to a space, `,`, `}`, `]` or `#`.
fn secret_values(text: &str) -> Vec<&str> {
    let mut values = Vec::new();
    for key in SECRET_KEYS {
        for (at, _) in text.match_indices(key) {
            let rest = text[at + key.len()..].trim_start_matches(['"', '\'', ' ', '\t']);
            let Some(rest) = rest.strip_prefix('=') else {
                continue;
            };
            let rest = rest.trim_start_matches([' ', '\t']);
            let line = rest.lines().next().unwrap_or("");
            let value = match line.chars().next() {
                Some(q @ ('"' | '\'')) => {
                    let body = line.trim_start_matches(q);
                    body.split(q).next().unwrap_or(body)
                }
                _ => line
                    .split(|c: char| c.is_whitespace() || matches!(c, ',' | '}' | ']' | '#'))
                    .next()
                    .unwrap_or(line),
            };
            if !value.is_empty() {
                values.push(value);
            }
        }
    }
    values
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
    fn validate(
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
            if lan_interfaces.is_empty() && source_cidrs.is_empty() && !proxy_local {
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

impl RawDns {
    fn validate(&self, udp: bool, issue: &mut dyn FnMut(&str, String)) -> DnsConfig {
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

impl RawConfig {
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

        let r = &self.route;
        let final_outbound = match (&r.final_outbound, outbounds.as_slice()) {
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
        let route = RouteConfig {
            final_outbound,
            rules: r.rules.clone(),
            rule_sets: r.rule_sets.clone(),
        };
        (outbounds, route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Most tests are not about the firewall: switch it off.
    fn no_fw(text: &str) -> String {
        format!("{text}\n[firewall]\nbackend = \"none\"\n")
    }

    fn issues_of(text: &str) -> Vec<ConfigIssue> {
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
    fn relay_threads_default_to_half_the_cores_and_zero_is_refused() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(default_threads(), (cores / 2).max(1));
        let base = "[outbound]\ntype = \"direct\"\n[limits]\n";
        let cfg = RawConfig::from_toml(&no_fw(&format!("{base}threads = 3\n")), "t.toml")
            .unwrap()
            .validate(&no_env)
            .unwrap();
        assert_eq!(cfg.limits.threads, 3);
        let issues = issues_of(&format!("{base}threads = 0\n"));
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "limits.threads");
        assert!(issues[0].message.contains("half the cores"), "{issues:?}");
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
    fn a_parse_error_on_the_password_line_does_not_show_the_password() {
        let text = "[outbound]\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\nusername = \"u\"\npassword = \"hunter2-secret\n";
        let err = RawConfig::from_toml(text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("line 5, column"), "{err}");
        // A type error quotes the value too.
        let err = RawConfig::from_toml("[outbound]\npassword = 12345678\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("12345678"), "{err}");
        // A file without a secret keeps the parser's excerpt.
        let err = RawConfig::from_toml("mark = \"x\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mark = \"x\""), "{err}");
    }

    #[test]
    fn api_listens_on_loopback_by_default_and_elsewhere_only_with_a_secret() {
        let base = "[outbound]\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\n";
        let cfg = RawConfig::from_toml(&format!("{base}[api]\n"), "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap();
        let api = cfg.api.expect("[api] present");
        assert_eq!(api.listen, DEFAULT_API_LISTEN);
        assert_eq!(api.secret, None);
        let none = RawConfig::from_toml(base, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap();
        assert!(none.api.is_none());

        for listen in ["0.0.0.0:9090", "[::]:9090", "192.0.2.1:9090"] {
            for secret in ["", "secret = \"\"\n"] {
                let text = format!("{base}[api]\nlisten = \"{listen}\"\n{secret}");
                let err = RawConfig::from_toml(&text, "t")
                    .unwrap()
                    .validate(&|_| None)
                    .unwrap_err();
                let ConfigError::Invalid(issues) = err else {
                    panic!("{err}")
                };
                assert_eq!(issues.len(), 1, "{issues:?}");
                assert_eq!(issues[0].key, "api.secret");
                assert!(issues[0].message.contains("not a loopback address"));
                assert!(issues[0].message.contains("127.0.0.1:9090"));
            }
            let text = format!("{base}[api]\nlisten = \"{listen}\"\nsecret = \"s3cr3t-value\"\n");
            let cfg = RawConfig::from_toml(&text, "t")
                .unwrap()
                .validate(&|_| None)
                .unwrap();
            let api = cfg.api.as_ref().unwrap();
            assert_eq!(
                api.secret.as_ref().map(Secret::expose),
                Some("s3cr3t-value")
            );
            // Never in a debug dump of the config.
            assert!(!format!("{cfg:?}").contains("s3cr3t"));
        }
        let err = RawConfig::from_toml(&format!("{base}[api]\nport = 1\n"), "t").unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
    }

    #[test]
    fn a_parse_error_near_the_api_secret_does_not_show_it() {
        let text = "[api]\nsecret = \"Zx9ApiSentinel\nlisten = 1\n";
        let err = RawConfig::from_toml(text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("Zx9ApiSentinel"), "{err}");
        let err = RawConfig::from_toml("[api]\nsecret = 12345678\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("12345678"), "{err}");
    }

    /// The forms the line-based redaction missed: the excerpt quoted the
    /// line, and the line held the password. Inputs as the config_toml
    /// fuzz target's oracle reports them (fuzz/corpus/config_toml/).
    #[test]
    fn passwords_in_inline_tables_and_multi_line_strings_stay_hidden() {
        for text in [
            "outbound = { type = \"socks5\", password = \"Zx9Sentinel }\n",
            "outbound = { type = \"socks5\", password = 'Zx9Sentinel' ,, }\n",
            "[outbound]\npassword = \"\"\"\nZx9Sentinel\n",
            "outbound.\"password\" = Zx9Sentinel\n",
            "outbound = { password = 12345678Zx9Sentinel }\n",
        ] {
            let err = RawConfig::from_toml(text, "t.toml")
                .unwrap_err()
                .to_string();
            assert!(!err.contains("Zx9Sentinel"), "{text:?}: {err}");
            assert!(err.contains("line "), "{err}");
        }
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
    fn a_failover_interval_is_bounded_as_every_other_duration() {
        assert_eq!(crate::outbound::group::MAX_INTERVAL_SECS, MAX_TIMEOUT_SECS);
    }

    #[test]
    fn timeouts_and_counts_past_their_bounds_are_refused() {
        let issues = issues_of(
            "[outbound]\ntype = \"direct\"\n[timeouts]\nudp_dns_idle = 18446744073709551615\n\
             [limits]\nthreads = 100000\nudp_sessions = 100\nudp_sessions_per_client = 200\n",
        );
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "timeouts.udp_dns_idle",
                "limits.udp_sessions_per_client",
                "limits.threads"
            ],
            "{issues:?}"
        );
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

    fn fw_issues(fw: &str) -> Vec<ConfigIssue> {
        fw_issues_top("", fw)
    }

    fn fw_issues_top(top: &str, fw: &str) -> Vec<ConfigIssue> {
        let text = format!("{top}[outbound]\ntype = \"direct\"\n[firewall]\n{fw}");
        match RawConfig::from_toml(&text, "t").unwrap().validate(&no_env) {
            Err(ConfigError::Invalid(v)) => v,
            Ok(_) => vec![],
            Err(e) => panic!("{e}"),
        }
    }

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
}
