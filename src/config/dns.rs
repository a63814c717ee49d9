//! `[dns]`: what tproxyd does with DNS — the captured queries (UDP and
//! TCP port 53) and those sent to its own listener.
//!
//! Two shapes, never both:
//! - **one resolver** (`server`): the shape before named resolvers; every
//!   captured UDP query is sent to it, routed like any flow to it.
//! - **named resolvers** (`[[dns.servers]]`, `[[dns.rules]]`, `final`):
//!   tproxyd answers every query itself, from its cache or from the
//!   resolver the first matching rule names, reached through that
//!   resolver's outbound.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

use super::de;
use super::route::{RuleSetConfig, RuleSetFormat};
use crate::cidr::Cidr;
use crate::one_or_many;

/// Where a named resolver is and how it is spoken to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddress {
    /// Plain DNS over UDP (port 53 unless given); a truncated answer is
    /// asked again over TCP.
    Udp(SocketAddr),
    /// Plain DNS over TCP, one connection reused and pipelined.
    Tcp(SocketAddr),
    /// DNS over TLS (RFC 7858; port 853 unless given).
    Tls(Endpoint),
    /// DNS over HTTPS (RFC 8484, HTTP/2; port 443 unless given).
    Https { endpoint: Endpoint, path: String },
    /// The resolvers in the router's own /etc/resolv.conf, over UDP.
    System,
}

/// A host (an IP, or a name another resolver looks up) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// Looked up through the resolver named by the server's `bootstrap`.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl ServerAddress {
    /// The IP and port when the address has them (not `system`, not a
    /// host name).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            ServerAddress::Udp(a) | ServerAddress::Tcp(a) => Some(*a),
            ServerAddress::Tls(e) | ServerAddress::Https { endpoint: e, .. } => match e.host {
                Host::Ip(ip) => Some(SocketAddr::new(ip, e.port)),
                Host::Name(_) => None,
            },
            ServerAddress::System => None,
        }
    }

    /// The host name that needs a `bootstrap` resolver, if any.
    pub fn host_name(&self) -> Option<&str> {
        match self {
            ServerAddress::Tls(e) | ServerAddress::Https { endpoint: e, .. } => match &e.host {
                Host::Name(n) => Some(n),
                Host::Ip(_) => None,
            },
            _ => None,
        }
    }

    /// Whether it needs TLS (the `dns-tls` build feature).
    pub fn needs_tls(&self) -> bool {
        matches!(self, ServerAddress::Tls(_) | ServerAddress::Https { .. })
    }
}

const ADDRESS_FORMS: &str = "write udp://IP[:PORT], tcp://IP[:PORT], tls://HOST[:PORT], \
     https://HOST[:PORT]/PATH or system (a bare IP[:PORT] is UDP)";

fn parse_ip_port(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(crate::sys::normalize(a));
    }
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    match bare.parse::<IpAddr>() {
        Ok(ip) => Ok(crate::sys::normalize(SocketAddr::new(ip, default_port))),
        Err(_) => Err(format!(
            "{text:?} is not an IP address with an optional port; a resolver reached over \
             UDP or TCP is given by IP (a name would need DNS to find DNS)"
        )),
    }
}

fn parse_endpoint(text: &str, default_port: u16) -> Result<Endpoint, String> {
    if let Ok(a) = parse_ip_port(text, default_port) {
        return Ok(Endpoint {
            host: Host::Ip(a.ip()),
            port: a.port(),
        });
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number"))?,
        ),
        None => (text, default_port),
    };
    let host = host.to_ascii_lowercase();
    if !crate::hostname::is_host_name(&host) {
        return Err(format!("{host:?} is neither an IP address nor a host name"));
    }
    Ok(Endpoint {
        host: Host::Name(host),
        port,
    })
}

impl FromStr for ServerAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "system" {
            return Ok(ServerAddress::System);
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            return parse_ip_port(text, 53)
                .map(ServerAddress::Udp)
                .map_err(|e| format!("{e}; {ADDRESS_FORMS}"));
        };
        let address = match scheme.to_ascii_lowercase().as_str() {
            "udp" => ServerAddress::Udp(parse_ip_port(rest.trim_end_matches('/'), 53)?),
            "tcp" => ServerAddress::Tcp(parse_ip_port(rest.trim_end_matches('/'), 53)?),
            "tls" => ServerAddress::Tls(parse_endpoint(rest.trim_end_matches('/'), 853)?),
            "https" => {
                let (authority, path) = match rest.find('/') {
                    Some(at) => rest.split_at(at),
                    None => (rest, "/dns-query"),
                };
                if path.contains('?') || path.contains('#') {
                    return Err(format!(
                        "{path:?}: give the path without a query (tproxyd adds ?dns= or POSTs)"
                    ));
                }
                ServerAddress::Https {
                    endpoint: parse_endpoint(authority, 443)?,
                    path: path.to_string(),
                }
            }
            other => return Err(format!("{other:?} is not a DNS transport; {ADDRESS_FORMS}")),
        };
        if let Some(a) = address.socket_addr() {
            let ip = a.ip();
            let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
            if a.port() == 0 || ip.is_unspecified() || ip.is_multicast() || broadcast {
                return Err(format!(
                    "{a} is not a resolver's address (a unicast IP and a port)"
                ));
            }
        }
        Ok(address)
    }
}

/// What a `reject` rule answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reject {
    /// NXDOMAIN: the name does not exist.
    Nxdomain,
    /// NOERROR with no records: the name exists, not with this type.
    Nodata,
}

/// A query type by name (`"AAAA"`, `"HTTPS"`) or number (`65`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueryType(pub u16);

const QUERY_TYPES: &[(&str, u16)] = &[
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("NAPTR", 35),
    ("DS", 43),
    ("DNSKEY", 48),
    ("SVCB", 64),
    ("HTTPS", 65),
    ("ANY", 255),
    ("CAA", 257),
];

impl FromStr for QueryType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(n) = text.parse::<u16>() {
            return Ok(QueryType(n));
        }
        let upper = text.to_ascii_uppercase();
        QUERY_TYPES
            .iter()
            .find(|(name, _)| *name == upper)
            .map(|&(_, n)| QueryType(n))
            .ok_or_else(|| {
                let names: Vec<&str> = QUERY_TYPES.iter().map(|(n, _)| *n).collect();
                format!(
                    "{text:?} is not a query type: give one of {} or a number",
                    names.join(", ")
                )
            })
    }
}

impl<'de> Deserialize<'de> for QueryType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number(u16),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Number(n) => Ok(QueryType(n)),
            Either::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// One named resolver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsServer {
    pub name: String,
    pub address: ServerAddress,
    /// The outbound its queries go through; None: the route rules decide,
    /// as for any flow to the resolver's address.
    pub outbound: Option<String>,
    /// The name a TLS or HTTPS resolver's certificate must carry (and the
    /// SNI and Host sent); by default its host name, or its IP.
    pub server_name: Option<String>,
    /// The server that looks up this one's host name.
    pub bootstrap: Option<String>,
}

/// What a DNS rule does with a query it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAction {
    /// Ask this named server.
    Server(String),
    /// Answer here.
    Reject(Reject),
}

/// One DNS rule: every key given must match (AND); a rule with no keys
/// matches every query. The first rule that matches decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRule {
    pub domain: Vec<String>,
    pub domain_suffix: Vec<String>,
    pub domain_keyword: Vec<String>,
    pub domain_regex: Vec<String>,
    /// `[[route.rule_sets]]` of domains, by name (the same compiled sets).
    pub rule_set: Vec<String>,
    pub query_type: Vec<QueryType>,
    /// The client's address.
    pub source: Vec<Cidr>,
    pub action: DnsAction,
    /// Asked beside the rule's server; its answer is used unless the
    /// server's answer has only addresses in `accept_ip` (mosdns /
    /// chinadns style, against a poisoning domestic resolver).
    pub fallback: Option<String>,
    /// `[[route.rule_sets]]` of prefixes (format cidr or geoip), by name.
    pub accept_ip: Vec<String>,
}

/// `[dns.cache]`. Seconds throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsCache {
    pub enabled: bool,
    pub max_entries: usize,
    pub max_bytes: usize,
    pub ttl_min: u32,
    pub ttl_max: u32,
    /// The longest a negative answer (NXDOMAIN, no data) is kept, whatever
    /// its SOA says (RFC 2308 suggests hours; a typo fixed upstream should
    /// not stay broken that long on a household's router).
    pub negative_ttl_max: u32,
    /// How long a SERVFAIL (or no answer at all) is remembered.
    pub servfail_ttl: u32,
    /// RFC 8767: an expired answer is served (with `stale_answer_ttl`)
    /// while it is refreshed in the background, for up to `stale_max`
    /// past its expiry.
    pub serve_stale: bool,
    pub stale_answer_ttl: u32,
    pub stale_max: u32,
}

impl Default for DnsCache {
    fn default() -> Self {
        DnsCache {
            enabled: true,
            max_entries: 10_000,
            max_bytes: 4 << 20,
            ttl_min: 0,
            ttl_max: 86_400,
            negative_ttl_max: 900,
            servfail_ttl: 5,
            serve_stale: false,
            stale_answer_ttl: 30,
            stale_max: 86_400,
        }
    }
}

/// `[dns.fake_ip]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeIp {
    /// At most one IPv4 and one IPv6 prefix.
    pub ranges: Vec<Cidr>,
    /// Names answered with real addresses (on top of the built-in list
    /// when `default_exclude`).
    pub exclude_domain: Vec<String>,
    pub exclude_domain_suffix: Vec<String>,
    pub exclude_rule_set: Vec<String>,
    /// The built-in list: NTP, STUN, LAN names, consoles, captive portals.
    pub default_exclude: bool,
    /// The TTL of a fake answer.
    pub ttl: u32,
    /// Where the pool is kept across restarts; None: not kept.
    pub store: Option<PathBuf>,
    /// Seconds between saves while running (besides the one at stop).
    pub save_interval: u32,
}

pub const DEFAULT_FAKE_IP_STORE: &str = "/var/lib/tproxyd/fake-ip.pool";

/// `[dns]` as validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Every captured query goes to this resolver, whatever address the
    /// client asked; the answer comes back from the address it asked.
    pub server: Option<SocketAddr>,
    /// AAAA questions are answered here, NOERROR with no records.
    pub filter_aaaa: bool,
    /// Named resolvers; empty: the one-resolver shape (or none).
    pub servers: Vec<DnsServer>,
    pub rules: Vec<DnsRule>,
    /// The server for queries no rule matches (a name in `servers`).
    pub final_server: Option<String>,
    /// Where tproxyd answers DNS itself, UDP and TCP (for dnsmasq).
    pub listen: Vec<SocketAddr>,
    pub cache: DnsCache,
    pub fake_ip: Option<FakeIp>,
}

impl DnsConfig {
    /// Whether tproxyd answers queries itself (named resolvers).
    pub fn answers(&self) -> bool {
        !self.servers.is_empty()
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    #[serde(default, deserialize_with = "de::opt_socket_addr")]
    pub server: Option<SocketAddr>,
    pub filter_aaaa: Option<bool>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub servers: Vec<RawDnsServer>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub rules: Vec<RawDnsRule>,
    #[serde(rename = "final")]
    pub final_server: Option<String>,
    #[serde(default, deserialize_with = "de::list_from_str")]
    pub listen: Vec<de::HostPort>,
    pub cache: Option<RawDnsCache>,
    pub fake_ip: Option<RawFakeIp>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDnsServer {
    pub name: String,
    #[serde(deserialize_with = "de::from_str")]
    pub address: ServerAddress,
    pub outbound: Option<String>,
    pub server_name: Option<String>,
    pub bootstrap: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDnsRule {
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
    pub query_type: Vec<QueryType>,
    #[serde(default, deserialize_with = "de::list_from_str")]
    pub source: Vec<Cidr>,
    pub server: Option<String>,
    pub reject: Option<Reject>,
    pub fallback: Option<String>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub accept_ip: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDnsCache {
    pub enabled: Option<bool>,
    pub max_entries: Option<usize>,
    pub max_bytes: Option<usize>,
    pub ttl_min: Option<u32>,
    pub ttl_max: Option<u32>,
    pub negative_ttl_max: Option<u32>,
    pub servfail_ttl: Option<u32>,
    pub serve_stale: Option<bool>,
    pub stale_answer_ttl: Option<u32>,
    pub stale_max: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFakeIp {
    #[serde(default, deserialize_with = "de::opt_list_from_str")]
    pub ranges: Option<Vec<Cidr>>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub exclude_domain: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub exclude_domain_suffix: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many::vec")]
    pub exclude_rule_set: Vec<String>,
    pub default_exclude: Option<bool>,
    pub ttl: Option<u32>,
    /// A path, or "" (or false is not TOML-typed: use "") to keep nothing.
    pub store: Option<PathBuf>,
    pub save_interval: Option<u32>,
}

/// The longest TTL a cache setting may name: RFC 2181 caps TTLs at 2^31-1,
/// and a week is already longer than any sane answer.
const MAX_TTL: u32 = 7 * 86_400;

impl RawDns {
    /// `udp`: whether captured UDP exists at all; `tcp` likewise;
    /// `outbounds`: the outbound names; `sets`: `[[route.rule_sets]]`.
    pub(super) fn validate(
        &self,
        udp: bool,
        tcp: bool,
        outbounds: &[&str],
        sets: &[RuleSetConfig],
        issue: &mut dyn FnMut(&str, String),
    ) -> DnsConfig {
        let server = self.server.map(crate::sys::normalize);
        if let Some(s) = server {
            let ip = s.ip();
            let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
            if s.port() == 0 || ip.is_unspecified() || ip.is_multicast() || broadcast {
                issue(
                    "dns.server",
                    format!("{s} is not a resolver's address (a unicast IP and a port, like \"198.51.100.53:53\")"),
                );
            }
        }
        let filter_aaaa = self.filter_aaaa.unwrap_or(false);
        let listen: Vec<SocketAddr> = self
            .listen
            .iter()
            .map(|h| crate::sys::normalize(h.0))
            .collect();
        if !udp
            && !tcp
            && listen.is_empty()
            && (server.is_some() || filter_aaaa || !self.servers.is_empty())
        {
            issue(
                "dns",
                "set, but tcp and udp are off and dns.listen is empty: no query would ever reach tproxyd"
                    .into(),
            );
        } else if !udp && self.servers.is_empty() && (server.is_some() || filter_aaaa) {
            issue(
                "dns",
                "set, but udp is off: tproxyd sees DNS only as captured UDP (port 53)".into(),
            );
        }
        if server.is_some() && !self.servers.is_empty() {
            issue(
                "dns.server",
                "use either dns.server (one resolver for every captured query) or [[dns.servers]] \
                 (named resolvers chosen by [[dns.rules]]), not both: dns.server = \"IP:53\" is \
                 [[dns.servers]] address = \"udp://IP\""
                    .into(),
            );
        }
        let named_only = |key: &str, set: bool, issue: &mut dyn FnMut(&str, String)| {
            if set && self.servers.is_empty() {
                issue(
                    key,
                    "needs named resolvers: add [[dns.servers]] (name, address, outbound)".into(),
                );
            }
        };
        named_only("dns.rules", !self.rules.is_empty(), issue);
        named_only("dns.final", self.final_server.is_some(), issue);
        named_only("dns.listen", !listen.is_empty(), issue);
        named_only("dns.cache", self.cache.is_some(), issue);
        named_only("dns.fake_ip", self.fake_ip.is_some(), issue);

        let servers = self.validate_servers(outbounds, &listen, issue);
        let names: HashSet<&str> = servers.iter().map(|s| s.name.as_str()).collect();
        let final_server = match (&self.final_server, servers.as_slice()) {
            (Some(f), _) => {
                if !names.contains(f.as_str()) {
                    issue(
                        "dns.final",
                        format!("{f:?} is not the name of a [[dns.servers]] entry"),
                    );
                }
                Some(f.clone())
            }
            (None, [only]) => Some(only.name.clone()),
            (None, []) => None,
            (None, _) => {
                issue(
                    "dns.final",
                    "missing: with several [[dns.servers]], name the one for queries no rule matches"
                        .into(),
                );
                None
            }
        };
        let rules = self.validate_rules(&names, sets, issue);
        let cache = self
            .cache
            .as_ref()
            .map(|c| c.validate(issue))
            .unwrap_or_default();
        let fake_ip = self.fake_ip.as_ref().map(|f| f.validate(sets, issue));
        DnsConfig {
            server,
            filter_aaaa,
            servers,
            rules,
            final_server,
            listen,
            cache,
            fake_ip,
        }
    }

    fn validate_servers(
        &self,
        outbounds: &[&str],
        listen: &[SocketAddr],
        issue: &mut dyn FnMut(&str, String),
    ) -> Vec<DnsServer> {
        let mut seen = HashSet::new();
        for (i, s) in self.servers.iter().enumerate() {
            let key = format!("dns.servers[{i}]");
            if s.name.trim().is_empty() || s.name == "reject" {
                issue(
                    &format!("{key}.name"),
                    format!("{:?} cannot be a resolver's name", s.name),
                );
            }
            if !seen.insert(s.name.as_str()) {
                issue(
                    &format!("{key}.name"),
                    format!("the name {:?} is used twice", s.name),
                );
            }
            if let Some(o) = &s.outbound {
                if !outbounds.contains(&o.as_str()) {
                    issue(
                        &format!("{key}.outbound"),
                        format!("{o:?} is not the name of an outbound"),
                    );
                }
            }
            if s.server_name.is_some() && !s.address.needs_tls() {
                issue(
                    &format!("{key}.server_name"),
                    "only for tls:// and https:// resolvers (the name their certificate carries)"
                        .into(),
                );
            }
            if let Some(a) = s.address.socket_addr() {
                // A resolver that is tproxyd's own listener would send
                // every query round in a loop.
                let own = listen.iter().any(|l| {
                    l.port() == a.port()
                        && (l.ip() == a.ip() || (l.ip().is_unspecified() && (a.ip().is_loopback())))
                });
                if own {
                    issue(
                        &format!("{key}.address"),
                        format!("{a} is tproxyd's own dns.listen: queries would go round in a loop; name the resolver that answers (the ISP's, a public one)"),
                    );
                }
            }
            match (s.address.host_name(), &s.bootstrap) {
                (Some(host), None) => issue(
                    &format!("{key}.bootstrap"),
                    format!(
                        "missing: {host:?} is a host name; name the [[dns.servers]] entry that looks \
                         it up (one given by IP), or give the address as an IP"
                    ),
                ),
                (None, Some(_)) => issue(
                    &format!("{key}.bootstrap"),
                    "only for a tls:// or https:// resolver given by host name".into(),
                ),
                (Some(_), Some(b)) => {
                    let target = self.servers.iter().find(|o| &o.name == b);
                    match target {
                        None => issue(
                            &format!("{key}.bootstrap"),
                            format!("{b:?} is not the name of a [[dns.servers]] entry"),
                        ),
                        Some(t) if t.address.host_name().is_some() || t.name == s.name => issue(
                            &format!("{key}.bootstrap"),
                            format!(
                                "{b:?} is itself given by host name: a bootstrap resolver must be \
                                 given by IP, or the lookup goes round in a loop"
                            ),
                        ),
                        Some(_) => {}
                    }
                }
                (None, None) => {}
            }
        }
        self.servers
            .iter()
            .map(|s| DnsServer {
                name: s.name.clone(),
                address: s.address.clone(),
                outbound: s.outbound.clone(),
                server_name: s.server_name.clone(),
                bootstrap: s.bootstrap.clone(),
            })
            .collect()
    }

    fn validate_rules(
        &self,
        servers: &HashSet<&str>,
        sets: &[RuleSetConfig],
        issue: &mut dyn FnMut(&str, String),
    ) -> Vec<DnsRule> {
        let set_format = |name: &str| sets.iter().find(|s| s.name == name).map(|s| s.format);
        let mut rules = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let key = format!("dns.rules[{i}]");
            let action = match (&r.server, r.reject) {
                (Some(s), None) => {
                    if !servers.contains(s.as_str()) {
                        issue(
                            &format!("{key}.server"),
                            format!("{s:?} is not the name of a [[dns.servers]] entry"),
                        );
                    }
                    DnsAction::Server(s.clone())
                }
                (None, Some(r)) => DnsAction::Reject(r),
                _ => {
                    issue(
                        &key,
                        "give exactly one of server = \"NAME\" (a [[dns.servers]] entry) or \
                         reject = \"nxdomain\" | \"nodata\""
                            .into(),
                    );
                    DnsAction::Reject(Reject::Nxdomain)
                }
            };
            for set in &r.rule_set {
                match set_format(set) {
                    None => issue(&format!("{key}.rule_set"), format!("{set:?} is not the name of a route.rule_sets entry")),
                    Some(RuleSetFormat::Domains | RuleSetFormat::Geosite) => {}
                    Some(_) => issue(
                        &format!("{key}.rule_set"),
                        format!("{set:?} holds prefixes, and a query has only a name: use it in accept_ip"),
                    ),
                }
            }
            match (&r.fallback, r.accept_ip.is_empty()) {
                (Some(f), false) => {
                    if !servers.contains(f.as_str()) {
                        issue(&format!("{key}.fallback"), format!("{f:?} is not the name of a [[dns.servers]] entry"));
                    }
                    if matches!(action, DnsAction::Reject(_)) {
                        issue(&format!("{key}.fallback"), "a reject rule asks no server".into());
                    }
                }
                (Some(_), true) => issue(
                    &format!("{key}.accept_ip"),
                    "missing: name the rule sets of prefixes (format cidr or geoip, like \"cn-ip\") \
                     the server's answer must fall in to be kept"
                        .into(),
                ),
                (None, false) => issue(
                    &format!("{key}.fallback"),
                    "missing: accept_ip says when to use a fallback server's answer; name that server"
                        .into(),
                ),
                (None, true) => {}
            }
            for set in &r.accept_ip {
                match set_format(set) {
                    None => issue(
                        &format!("{key}.accept_ip"),
                        format!("{set:?} is not the name of a route.rule_sets entry"),
                    ),
                    Some(RuleSetFormat::Cidr | RuleSetFormat::Geoip) => {}
                    Some(_) => issue(
                        &format!("{key}.accept_ip"),
                        format!(
                            "{set:?} holds names; accept_ip needs prefixes (format cidr or geoip)"
                        ),
                    ),
                }
            }
            rules.push(DnsRule {
                domain: r.domain.clone(),
                domain_suffix: r.domain_suffix.clone(),
                domain_keyword: r.domain_keyword.clone(),
                domain_regex: r.domain_regex.clone(),
                rule_set: r.rule_set.clone(),
                query_type: r.query_type.clone(),
                source: r.source.clone(),
                action,
                fallback: r.fallback.clone(),
                accept_ip: r.accept_ip.clone(),
            });
        }
        rules
    }
}

impl RawDnsCache {
    fn validate(&self, issue: &mut dyn FnMut(&str, String)) -> DnsCache {
        let d = DnsCache::default();
        let c = DnsCache {
            enabled: self.enabled.unwrap_or(d.enabled),
            max_entries: self.max_entries.unwrap_or(d.max_entries),
            max_bytes: self.max_bytes.unwrap_or(d.max_bytes),
            ttl_min: self.ttl_min.unwrap_or(d.ttl_min),
            ttl_max: self.ttl_max.unwrap_or(d.ttl_max),
            negative_ttl_max: self.negative_ttl_max.unwrap_or(d.negative_ttl_max),
            servfail_ttl: self.servfail_ttl.unwrap_or(d.servfail_ttl),
            serve_stale: self.serve_stale.unwrap_or(d.serve_stale),
            stale_answer_ttl: self.stale_answer_ttl.unwrap_or(d.stale_answer_ttl),
            stale_max: self.stale_max.unwrap_or(d.stale_max),
        };
        if c.enabled && (c.max_entries == 0 || c.max_bytes < 4096) {
            issue(
                "dns.cache",
                "max_entries must be at least 1 and max_bytes at least 4096; to keep no cache, \
                 write enabled = false"
                    .into(),
            );
        }
        if c.ttl_min > c.ttl_max {
            issue(
                "dns.cache.ttl_min",
                format!("{} is above ttl_max ({})", c.ttl_min, c.ttl_max),
            );
        }
        for (key, v) in [
            ("ttl_min", c.ttl_min),
            ("ttl_max", c.ttl_max),
            ("negative_ttl_max", c.negative_ttl_max),
            ("stale_max", c.stale_max),
        ] {
            if v > MAX_TTL {
                issue(
                    &format!("dns.cache.{key}"),
                    format!("{v} s is more than a week ({MAX_TTL} s)"),
                );
            }
        }
        if c.servfail_ttl > 30 {
            issue(
                "dns.cache.servfail_ttl",
                format!("{} s: a failure is remembered a few seconds at most (≤ 30), or one lost packet breaks a name for long", c.servfail_ttl),
            );
        }
        if c.serve_stale && c.stale_answer_ttl == 0 {
            issue(
                "dns.cache.stale_answer_ttl",
                "must be at least 1 (RFC 8767 suggests 30)".into(),
            );
        }
        c
    }
}

impl RawFakeIp {
    fn validate(&self, sets: &[RuleSetConfig], issue: &mut dyn FnMut(&str, String)) -> FakeIp {
        let ranges = self.ranges.clone().unwrap_or_else(|| {
            vec![
                Cidr {
                    addr: IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 0)),
                    prefix: 15,
                },
                Cidr {
                    addr: IpAddr::V6(std::net::Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)),
                    prefix: 18,
                },
            ]
        });
        let v4 = ranges.iter().filter(|c| c.is_ipv4()).count();
        if ranges.is_empty() || v4 > 1 || ranges.len() - v4 > 1 {
            issue(
                "dns.fake_ip.ranges",
                "give one IPv4 prefix, one IPv6 prefix, or one of each (like \"198.18.0.0/15\", \"fc00::/18\")"
                    .into(),
            );
        }
        for r in &ranges {
            let host_bits = if r.is_ipv4() { 32 } else { 128 } - u32::from(r.prefix);
            if host_bits < 8 {
                issue(
                    "dns.fake_ip.ranges",
                    format!("{r} holds too few addresses for a pool; give at most a /24 (IPv4) or /120 (IPv6)"),
                );
            }
        }
        for set in &self.exclude_rule_set {
            match sets.iter().find(|s| &s.name == set).map(|s| s.format) {
                None => issue(
                    "dns.fake_ip.exclude_rule_set",
                    format!("{set:?} is not the name of a route.rule_sets entry"),
                ),
                Some(RuleSetFormat::Domains | RuleSetFormat::Geosite) => {}
                Some(_) => issue(
                    "dns.fake_ip.exclude_rule_set",
                    format!("{set:?} holds prefixes; name a set of domains"),
                ),
            }
        }
        let ttl = self.ttl.unwrap_or(1);
        if ttl == 0 || ttl > 300 {
            issue("dns.fake_ip.ttl", format!("{ttl}: give 1 to 300 seconds (1 is best: a client asks again soon after tproxyd stops)"));
        }
        let store = match &self.store {
            None => Some(PathBuf::from(DEFAULT_FAKE_IP_STORE)),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) if p.is_relative() => {
                issue(
                    "dns.fake_ip.store",
                    format!(
                        "{}: give an absolute path, or \"\" to keep no pool",
                        p.display()
                    ),
                );
                None
            }
            Some(p) => Some(p.clone()),
        };
        let save_interval = self.save_interval.unwrap_or(300);
        if save_interval == 0 {
            issue(
                "dns.fake_ip.save_interval",
                "must be at least 1 second".into(),
            );
        }
        FakeIp {
            ranges,
            exclude_domain: self.exclude_domain.clone(),
            exclude_domain_suffix: self.exclude_domain_suffix.clone(),
            exclude_rule_set: self.exclude_rule_set.clone(),
            default_exclude: self.default_exclude.unwrap_or(true),
            ttl,
            store,
            save_interval,
        }
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

    const SPLIT: &str = "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
        [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n[route]\nfinal = \"proxy\"\n\
        [[route.rule_sets]]\nname = \"cn\"\nformat = \"domains\"\npath = \"/etc/tproxyd/cn.txt\"\n\
        [[route.rule_sets]]\nname = \"cn-ip\"\nformat = \"cidr\"\npath = \"/etc/tproxyd/cn-ip.txt\"\n";

    #[test]
    fn named_resolvers_rules_cache_and_fake_ip() {
        let text = format!(
            "{SPLIT}[dns]\nlisten = [\"127.0.0.1:5353\", \"[::1]:5353\"]\nfinal = \"foreign\"\n\
             [[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\noutbound = \"direct\"\n\
             [[dns.servers]]\nname = \"foreign\"\naddress = \"tcp://[2001:db8::53]:5353\"\noutbound = \"proxy\"\n\
             [[dns.servers]]\nname = \"sys\"\naddress = \"system\"\n\
             [[dns.rules]]\nrule_set = \"cn\"\nserver = \"isp\"\n\
             [[dns.rules]]\nquery_type = [\"HTTPS\", 64]\nreject = \"nodata\"\n\
             [[dns.rules]]\nserver = \"isp\"\nfallback = \"foreign\"\naccept_ip = \"cn-ip\"\n\
             [dns.cache]\nmax_entries = 100000\nserve_stale = true\n\
             [dns.fake_ip]\nranges = [\"198.18.0.0/15\"]\nstore = \"\"\n"
        );
        let cfg = RawConfig::from_toml(&no_fw(&text), "t")
            .unwrap()
            .validate(&no_env)
            .unwrap();
        let dns = &cfg.dns;
        assert!(dns.answers());
        assert_eq!(dns.final_server.as_deref(), Some("foreign"));
        assert_eq!(dns.listen.len(), 2);
        assert_eq!(
            dns.servers[0].address,
            ServerAddress::Udp("192.0.2.53:53".parse().unwrap())
        );
        assert_eq!(
            dns.servers[1].address,
            ServerAddress::Tcp("[2001:db8::53]:5353".parse().unwrap())
        );
        assert_eq!(dns.servers[2].address, ServerAddress::System);
        assert_eq!(dns.servers[2].outbound, None);
        assert_eq!(dns.rules[0].action, DnsAction::Server("isp".into()));
        assert_eq!(dns.rules[1].query_type, [QueryType(65), QueryType(64)]);
        assert_eq!(dns.rules[1].action, DnsAction::Reject(Reject::Nodata));
        assert_eq!(dns.rules[2].fallback.as_deref(), Some("foreign"));
        assert_eq!(dns.cache.max_entries, 100_000);
        assert!(dns.cache.serve_stale);
        let fake = dns.fake_ip.as_ref().unwrap();
        assert_eq!(fake.ranges.len(), 1);
        assert_eq!(fake.store, None);
        assert_eq!(fake.ttl, 1);
    }

    #[test]
    fn resolver_addresses() {
        for (text, want) in [
            ("192.0.2.53", "udp 192.0.2.53:53"),
            ("udp://192.0.2.53:5353", "udp 192.0.2.53:5353"),
            ("tcp://[2001:db8::1]", "tcp [2001:db8::1]:53"),
            ("tls://1.1.1.1", "tls 1.1.1.1:853"),
            ("tls://dns.google:8853", "tls dns.google:8853"),
            ("https://1.1.1.1/dns-query", "https 1.1.1.1:443/dns-query"),
            ("https://Doh.Example", "https doh.example:443/dns-query"),
            ("system", "system"),
        ] {
            let got = match text.parse::<ServerAddress>().unwrap() {
                ServerAddress::Udp(a) => format!("udp {a}"),
                ServerAddress::Tcp(a) => format!("tcp {a}"),
                ServerAddress::Tls(e) => format!("tls {}:{}", e.host, e.port),
                ServerAddress::Https { endpoint: e, path } => {
                    format!("https {}:{}{path}", e.host, e.port)
                }
                ServerAddress::System => "system".into(),
            };
            assert_eq!(got, want, "{text}");
        }
        for (text, says) in [
            ("udp://dns.google", "not an IP address"),
            ("quic://1.1.1.1", "not a DNS transport"),
            ("udp://0.0.0.0", "not a resolver's address"),
            ("https://1.1.1.1/q?dns=x", "without a query"),
            ("tls://bad_name!", "neither an IP address nor a host name"),
        ] {
            let err = text.parse::<ServerAddress>().unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn named_resolver_mistakes_name_the_key() {
        for (dns, key) in [
            ("server = \"192.0.2.53:53\"\n[[dns.servers]]\nname = \"a\"\naddress = \"192.0.2.1\"", "dns.server"),
            ("final = \"x\"", "dns.final"),
            ("[[dns.servers]]\nname = \"a\"\naddress = \"192.0.2.1\"\n[[dns.servers]]\nname = \"b\"\naddress = \"192.0.2.2\"", "dns.final"),
            ("[[dns.servers]]\nname = \"a\"\naddress = \"192.0.2.1\"\noutbound = \"nope\"", "dns.servers[0].outbound"),
            ("[[dns.servers]]\nname = \"a\"\naddress = \"tls://dns.example\"", "dns.servers[0].bootstrap"),
            ("listen = \"127.0.0.1:5353\"\n[[dns.servers]]\nname = \"a\"\naddress = \"udp://127.0.0.1:5353\"", "dns.servers[0].address"),
            ("[[dns.servers]]\nname = \"a\"\naddress = \"192.0.2.1\"\n[[dns.rules]]\nserver = \"b\"", "dns.rules[0].server"),
            ("[[dns.servers]]\nname = \"a\"\naddress = \"192.0.2.1\"\n[[dns.rules]]\nrule_set = \"cn-ip\"\nserver = \"a\"", "dns.rules[0].rule_set"),
            ("[[dns.servers]]\nname = \"a\"\naddress = \"192.0.2.1\"\n[[dns.rules]]\nserver = \"a\"\nfallback = \"a\"", "dns.rules[0].accept_ip"),
            ("[[dns.servers]]\nname = \"a\"\naddress = \"192.0.2.1\"\n[[dns.rules]]\nserver = \"a\"\nreject = \"nxdomain\"", "dns.rules[0]"),
            ("[[dns.servers]]\nname = \"a\"\naddress = \"192.0.2.1\"\n[dns.cache]\nttl_min = 60\nttl_max = 30", "dns.cache.ttl_min"),
            ("[[dns.servers]]\nname = \"a\"\naddress = \"192.0.2.1\"\n[dns.fake_ip]\nranges = [\"198.18.0.0/15\", \"10.0.0.0/8\"]", "dns.fake_ip.ranges"),
            ("[dns.cache]\nenabled = true", "dns.cache"),
        ] {
            let issues = issues_of(&format!("{SPLIT}[dns]\n{dns}\n"));
            assert!(
                issues.iter().any(|i| i.key == key),
                "{dns:?}: want {key}, got {issues:?}"
            );
        }
        // tls:// needs the dns-tls feature in a build without it.
        if !cfg!(feature = "dns-tls") {
            let issues = issues_of(&format!(
                "{SPLIT}[dns]\n[[dns.servers]]\nname = \"a\"\naddress = \"tls://1.1.1.1\"\n"
            ));
            assert!(
                issues
                    .iter()
                    .any(|i| i.key == "dns.servers[0].address" && i.message.contains("dns-tls")),
                "{issues:?}"
            );
        }
    }
}
