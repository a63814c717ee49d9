//! DNS that passes through tproxyd: the captured UDP port-53 datagrams
//! and their answers.
//!
//! - **Hijack** (`[dns] server`): every query goes to one resolver,
//!   whatever address the client asked; the answer comes back from the
//!   address it asked (the UDP relay's reply path, see
//!   [`Dns::on_reply`]).
//! - **AAAA filter** (`[dns] filter_aaaa`): AAAA questions are answered
//!   here with NOERROR and no records ("no data"), for IPv4-only
//!   upstreams. Not NXDOMAIN: that would say the name has no A either.
//! - **DNS over TCP** ([`tcp`]): queries whose outbound is a SOCKS5
//!   server that refused UDP ASSOCIATE, or one with `dns_over_tcp = true`,
//!   go as DNS over TCP through CONNECT, pooled and pipelined.
//! - **Learned names** ([`names`]): answers teach address → name, which
//!   domain rules use for flows that carry no name of their own (route
//!   only: the destination stays the address the client chose).
//!
//! The UDP relay calls in at three points (`relay/udp/dns.rs`): before a
//! query's route decision, after it, and for every reply from port 53.

pub mod cache;
pub mod fakeip;
pub mod listen;
pub mod message;
pub mod names;
pub mod recency;
pub mod resolver;
pub use crate::policy::dns_rules as rules;
pub mod tcp;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use portable_atomic::AtomicU64;

use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError, ConfigIssue};
use crate::outbound::{DnsTransport, Failure, Outbound, OutboundError};
use crate::policy::Policy;
use crate::ratelimit::RateLimit;
use names::Names;
use resolver::{Resolver, UpstreamTransport};
use tcp::{ExchangeError, Pools};

/// The DNS port: only datagrams to it are looked at.
pub const PORT: u16 = 53;

// What is known of a SOCKS5 outbound's UDP. Until an association has
// worked, DNS goes over TCP: CONNECT works on every SOCKS5 server, and a
// query sent as UDP to one that refuses is lost (the client asks again
// only after seconds). The start-up probe settles it at once.
const UDP_UNKNOWN: u8 = 0;
const UDP_WORKS: u8 = 1;
const UDP_REFUSED: u8 = 2;

/// Queries the named resolvers may work on at once.
pub const MAX_RESOLVING: usize = 4096;

/// Hijacked queries waiting for their answer, remembered by (client, id)
/// to answer from the address asked; bounded, and forgotten after this.
const HIJACK_CAP: usize = 16_384;
const HIJACK_KEEP: Duration = Duration::from_secs(10);

/// What to do with a query before the route decision.
#[derive(Debug, PartialEq, Eq)]
pub enum Query {
    /// Route and send it to this address (the one asked, or `[dns] server`).
    Forward(SocketAddr),
    /// Answered here: send this back to the client from the address asked.
    Answer(Vec<u8>),
    /// Answered by the named resolvers ([`Dns::resolve`]): the answer goes
    /// back to the client from the address asked.
    Resolve,
}

/// Counters (for the log and the tests).
#[derive(Debug, Default)]
pub struct DnsStats {
    pub aaaa_filtered: AtomicU64,
    pub hijacked: AtomicU64,
    pub tcp_queries: AtomicU64,
    pub tcp_answered: AtomicU64,
    pub tcp_servfail: AtomicU64,
    pub names_learned: AtomicU64,
    pub cache_flushes: AtomicU64,
}

/// What the configuration says; a reload replaces it whole.
#[derive(Debug, Default)]
struct Settings {
    server: Option<SocketAddr>,
    filter_aaaa: bool,
    /// Whether some rule looks at domains: otherwise nothing is learned
    /// and nothing looked up.
    learn: bool,
}

impl Settings {
    fn new(cfg: &Config, policy: &Policy) -> Settings {
        Settings {
            server: cfg.dns.server,
            filter_aaaa: cfg.dns.filter_aaaa,
            learn: policy.wants_domains(),
        }
    }
}

pub struct Dns {
    settings: ArcSwap<Settings>,
    /// The named resolvers' engine, when `[[dns.servers]]` are set;
    /// rebuilt by every reload.
    resolver: ArcSwap<Option<Resolver>>,
    /// Learned names; empty while no rule looks at domains.
    names: Arc<Names>,
    /// Per outbound (by key): what its SOCKS5 server did with UDP
    /// ASSOCIATE. Looked at per query, not per datagram of other flows.
    udp: Mutex<HashMap<u32, u8>>,
    hijacked: Mutex<HashMap<(SocketAddr, u16), (SocketAddr, Instant)>>,
    pools: Arc<Pools>,
    /// Queries the named resolvers are working on now (bounded).
    resolving: std::sync::atomic::AtomicUsize,
    pub stats: DnsStats,
    servfail_warning: RateLimit,
    /// Fake-ip: A/AAAA questions it answers are answered here.
    fake: std::sync::OnceLock<Arc<fakeip::FakePool>>,
    /// The named resolvers' answers; kept across reloads unless
    /// `[dns.cache]` or the servers change.
    cache: ArcSwap<Option<Arc<cache::Cache>>>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("settings", &self.settings.load())
            .field("names", &self.names)
            .finish()
    }
}

/// The cache `cfg` asks for: only with named resolvers, unless disabled.
fn new_cache(cfg: &Config) -> Option<Arc<cache::Cache>> {
    (cfg.dns.answers() && cfg.dns.cache.enabled)
        .then(|| Arc::new(cache::Cache::new(&cfg.dns.cache)))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Dns {
    /// From the config and the policy built from it.
    pub fn new(cfg: &Config, policy: &Arc<Policy>) -> Dns {
        let dns = Dns {
            settings: ArcSwap::from_pointee(Settings::new(cfg, policy)),
            resolver: ArcSwap::from_pointee(None),
            names: Arc::new(Names::new(names::DEFAULT_CAPACITY)),
            udp: Mutex::new(HashMap::new()),
            hijacked: Mutex::new(HashMap::new()),
            pools: Arc::new(Pools::default()),
            resolving: std::sync::atomic::AtomicUsize::new(0),
            stats: DnsStats::default(),
            servfail_warning: RateLimit::default(),
            fake: std::sync::OnceLock::new(),
            cache: ArcSwap::from_pointee(new_cache(cfg)),
        };
        dns.resolver
            .store(Arc::new(dns.build_resolver(cfg, policy)));
        dns
    }

    fn build_resolver(&self, cfg: &Config, policy: &Arc<Policy>) -> Option<Resolver> {
        cfg.dns.answers().then(|| {
            let names = policy.wants_domains().then(|| Arc::clone(&self.names));
            let transport = UpstreamTransport::new(cfg);
            Resolver::new(cfg, Arc::clone(policy), transport, names)
                .with_cache(self.cache.load().as_ref().clone())
        })
    }

    /// A reload: the new `[dns]` keys and rules apply to the next query;
    /// what is known of outbounds the policy kept stays, the rest goes.
    pub fn reconfigure(&self, cfg: &Config, policy: &Arc<Policy>) {
        let settings = Settings::new(cfg, policy);
        if !settings.learn {
            self.names.clear();
        }
        self.settings.store(Arc::new(settings));
        let servers_before = self
            .resolver
            .load()
            .as_ref()
            .as_ref()
            .map(|r| r.servers_config());
        let cache_before = self.cache.load().as_ref().as_ref().map(|c| *c.config());
        let wanted = (cfg.dns.answers() && cfg.dns.cache.enabled).then_some(cfg.dns.cache);
        if cache_before != wanted {
            self.cache.store(Arc::new(new_cache(cfg)));
        }
        let resolver = self.build_resolver(cfg, policy);
        let servers_after = resolver.as_ref().map(|r| r.servers_config());
        if servers_before != servers_after {
            // Answers from servers no longer configured (or configured
            // otherwise) must not outlive them.
            self.flush_cache();
        }
        self.resolver.store(Arc::new(resolver));
        let keys: HashSet<u32> = policy.outbounds().iter().map(|n| n.key).collect();
        lock(&self.udp).retain(|k, _| keys.contains(k));
        self.pools.retain(|k| keys.contains(&k));
    }

    /// Empties the DNS cache (the API, a reload that changed servers).
    pub fn flush_cache(&self) {
        self.stats.cache_flushes.fetch_add(1, Ordering::Relaxed);
        if let Some(cache) = self.cache.load().as_ref() {
            cache.flush();
        }
    }

    /// The named resolvers' cache, if one is kept.
    pub fn cache(&self) -> Option<Arc<cache::Cache>> {
        self.cache.load().as_ref().clone()
    }

    /// Whether tproxyd answers queries itself (named resolvers).
    pub fn answers(&self) -> bool {
        self.resolver.load().is_some()
    }

    /// The answer of the named resolvers to `query` from `client` (see
    /// [`Resolver::resolve`]); None when none are configured or `query` is
    /// no DNS query.
    ///
    /// At most [`MAX_RESOLVING`] at once: beyond that (a flood, or every
    /// server silent) a query is answered SERVFAIL at once rather than
    /// piling up tasks that each wait out their timeout.
    pub async fn resolve(&self, query: &[u8], client: SocketAddr) -> Option<Vec<u8>> {
        let resolver = self.resolver.load_full();
        let r = resolver.as_ref().as_ref()?;
        if self.resolving.fetch_add(1, Ordering::Relaxed) >= MAX_RESOLVING {
            self.resolving.fetch_sub(1, Ordering::Relaxed);
            if let Some(n) = self.servfail_warning.check() {
                warn!(
                    "DNS: {MAX_RESOLVING} queries waiting for their servers; answered SERVFAIL{}",
                    crate::ratelimit::held_back(n)
                );
            }
            return message::Header::parse(query)
                .ok()
                .filter(|h| !h.is_response())
                .and_then(|_| message::servfail(query).ok());
        }
        // Counted down even if the caller drops this future midway.
        struct Done<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _done = Done(&self.resolving);
        let (answer, stale) = r
            .answer(query, client, self.fake.get().map(|p| &**p), true)
            .await;
        if stale {
            // Served stale (RFC 8767): asked again in the background, once
            // however many clients got the stale answer meanwhile (the
            // refreshes of one name share a flight).
            let resolver = Arc::clone(&resolver);
            let query = query.to_vec();
            tokio::spawn(async move {
                if let Some(r) = resolver.as_ref() {
                    r.refresh(&query, client).await;
                }
            });
        }
        answer
    }

    /// [`resolve`](Self::resolve)'s answer when it needs no server (made
    /// here, or a cache hit), given at once without a task: what the
    /// listeners and the captured port 53 answer inline.
    /// [`Now::Later`](listen::Now::Later) when a server must be asked (or
    /// no resolver is configured); then nothing was counted and `resolve`
    /// takes the query from the start.
    ///
    /// Not bounded by [`MAX_RESOLVING`]: an answer given here waits on
    /// nothing, so it is given even while that many wait for their servers.
    pub fn answer_now(&self, query: &[u8], client: SocketAddr) -> listen::Now {
        // The stale refresh is spawned: only inside a runtime (always, but
        // for a caller outside one the query simply takes the slow path).
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return listen::Now::Later;
        };
        let resolver = self.resolver.load();
        let Some(r) = resolver.as_ref().as_ref() else {
            return listen::Now::Later;
        };
        let Some((answer, stale)) = r.answer_cached(query, client, self.fake.get().map(|p| &**p))
        else {
            return listen::Now::Later;
        };
        if stale {
            // As in `resolve`: served stale, refreshed in the background.
            let resolver = arc_swap::Guard::into_inner(resolver);
            let query = query.to_vec();
            runtime.spawn(async move {
                if let Some(r) = resolver.as_ref() {
                    r.refresh(&query, client).await;
                }
            });
        }
        match answer {
            Some(answer) => listen::Now::Answer(answer),
            None => listen::Now::Nothing,
        }
    }

    /// The real addresses of `name` from the named resolvers, never the
    /// fake-ip pool: A and AAAA asked at once, IPv4 first. Empty when no
    /// resolver is configured or none answered.
    pub async fn real_addresses(&self, name: &str) -> Vec<IpAddr> {
        use std::sync::atomic::AtomicU16;
        static ID: AtomicU16 = AtomicU16::new(1);
        let loaded = self.resolver.load_full();
        let Some(resolver) = loaded.as_ref() else {
            return Vec::new();
        };
        let client = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
        let ask = |qtype| {
            let query = message::build::query(ID.fetch_add(1, Ordering::Relaxed), name, qtype);
            async move {
                let answer = resolver.resolve(&query, client).await.unwrap_or_default();
                message::answers(&answer)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|r| match (r.rtype, r.data) {
                        (t, message::RecordData::Addr(ip)) if t == qtype => Some(ip),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            }
        };
        let (mut v4, v6) = tokio::join!(ask(message::TYPE_A), ask(message::TYPE_AAAA));
        v4.extend(v6);
        v4
    }

    /// The name last learned for `ip`, while its TTL lasts; None when
    /// names are not kept (no rule looks at domains).
    pub fn learned_name(&self, ip: IpAddr) -> Option<Arc<str>> {
        if !self.settings.load().learn {
            return None;
        }
        self.names.lookup_with(ip, Instant::now)
    }

    /// The learned names, when they are kept (some rule looks at domains).
    pub fn names(&self) -> Option<&Names> {
        self.settings.load().learn.then_some(&self.names)
    }

    /// Learns from an answer passing through, when names are kept.
    fn learn(&self, answer: &[u8]) {
        let Some(names) = self.names() else { return };
        let now = Instant::now();
        for l in message::learn(answer) {
            names.learn(l.addr, &l.name, l.ttl, now);
            self.stats.names_learned.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Answers the A/AAAA questions `pool` takes from now on (once, at
    /// start; see [`Resolver::resolve_with`]), and gives the pool the
    /// named resolvers for the real addresses of its names (`direct`
    /// flows to fake addresses). The pool holds this weakly: no cycle.
    pub fn set_fake_ip(self: &Arc<Self>, pool: Arc<fakeip::FakePool>) {
        pool.set_resolver(Arc::new(RealResolver(Arc::downgrade(self))));
        let _ = self.fake.set(pool);
    }

    /// A query from `client` to `dst` (port 53), before the route decision.
    pub fn on_query(&self, client: SocketAddr, dst: SocketAddr, query: &[u8]) -> Query {
        let settings = self.settings.load();
        if settings.filter_aaaa {
            if let Some(answer) = filtered_aaaa(query) {
                self.stats.aaaa_filtered.fetch_add(1, Ordering::Relaxed);
                return Query::Answer(answer);
            }
        }
        if self.resolver.load().is_some() && is_query(query) {
            return Query::Resolve;
        }
        match settings.server {
            Some(server) if server != dst => {
                if let Some(id) = message::id(query) {
                    self.remember_hijack(client, id, dst);
                }
                self.stats.hijacked.fetch_add(1, Ordering::Relaxed);
                Query::Forward(server)
            }
            _ => Query::Forward(dst),
        }
    }

    fn remember_hijack(&self, client: SocketAddr, id: u16, asked: SocketAddr) {
        let mut map = lock(&self.hijacked);
        if map.len() >= HIJACK_CAP {
            let now = Instant::now();
            map.retain(|_, (_, at)| now.duration_since(*at) < HIJACK_KEEP);
        }
        // Still full of fresh entries (a flood): this answer will come
        // from the resolver's address, which the client drops, as it
        // would a lost datagram.
        if map.len() < HIJACK_CAP {
            map.insert((client, id), (asked, Instant::now()));
        }
    }

    /// A reply from `from` (port 53) on its way to `client` through a UDP
    /// session: learns from it, and returns the address to send it from
    /// (the one the client asked, for a hijacked query).
    pub fn on_reply(&self, client: SocketAddr, from: SocketAddr, reply: &[u8]) -> SocketAddr {
        self.learn(reply);
        if self.settings.load().server != Some(from) {
            return from;
        }
        let Some(id) = message::id(reply) else {
            return from;
        };
        lock(&self.hijacked)
            .remove(&(client, id))
            .map_or(from, |(asked, _)| asked)
    }

    /// Whether a query through `outbound` (its key `key`) goes as DNS
    /// over TCP.
    pub fn wants_tcp(&self, key: u32, outbound: &Outbound) -> bool {
        match outbound.dns_transport() {
            DnsTransport::Udp => false,
            DnsTransport::Tcp => true,
            DnsTransport::TcpUntilUdpWorks => {
                lock(&self.udp).get(&key).copied().unwrap_or(UDP_UNKNOWN) != UDP_WORKS
            }
        }
    }

    /// Notes how opening UDP through outbound `key` went: an association
    /// that works sends its DNS as UDP; a server that refused UDP ASSOCIATE
    /// gets DNS over TCP from now on (until restart: a server's
    /// configuration rarely grows UDP). Other failures (the server down)
    /// say nothing about UDP.
    pub fn udp_opened(&self, key: u32, name: &str, result: Result<(), &OutboundError>) {
        let mut udp = lock(&self.udp);
        let state = udp.entry(key).or_insert(UDP_UNKNOWN);
        match result {
            Ok(()) => {
                if *state == UDP_UNKNOWN {
                    *state = UDP_WORKS;
                    debug!(
                        outbound = name,
                        "the SOCKS5 server takes UDP ASSOCIATE; DNS through it goes as UDP"
                    );
                }
            }
            Err(e) if e.failure() == Failure::UdpRefused => {
                if std::mem::replace(state, UDP_REFUSED) != UDP_REFUSED {
                    info!(outbound = name, "the SOCKS5 server refuses UDP ASSOCIATE; DNS through it goes as DNS over TCP (CONNECT to the resolver) from now on");
                }
            }
            Err(_) => {}
        }
    }

    /// At start: asks each SOCKS5 outbound that may carry UDP DNS for a
    /// UDP association once, so DNS through a server that takes UDP goes
    /// as UDP from the start (until then it goes over TCP).
    pub async fn probe_udp(self: Arc<Self>, key: u32, name: String, outbound: Arc<Outbound>) {
        if outbound.dns_transport() != DnsTransport::TcpUntilUdpWorks {
            return;
        }
        let result = outbound.open_udp().await.map(drop);
        self.udp_opened(key, &name, result.as_ref().map(|_| ()));
    }

    /// Sends `query` as DNS over TCP to `resolver` through outbound
    /// `key` and returns the answer (names learned from it), or SERVFAIL
    /// when none came. None only for a datagram that is no DNS query
    /// (nothing to answer).
    pub async fn exchange_tcp(
        &self,
        key: u32,
        outbound: &Arc<Outbound>,
        resolver: SocketAddr,
        query: &[u8],
    ) -> Option<Vec<u8>> {
        message::Header::parse(query).ok()?;
        self.stats.tcp_queries.fetch_add(1, Ordering::Relaxed);
        let pool = self.pools.get(key, outbound, resolver);
        match pool.exchange(query).await {
            Ok(answer) => {
                self.stats.tcp_answered.fetch_add(1, Ordering::Relaxed);
                self.learn(&answer);
                Some(answer)
            }
            Err(ExchangeError::Malformed) => None,
            Err(e) => {
                self.stats.tcp_servfail.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = self.servfail_warning.check() {
                    warn!(%resolver, outbound = outbound.name(), "DNS over TCP: {e}; answered SERVFAIL{}", crate::ratelimit::held_back(n));
                }
                message::servfail(query).ok()
            }
        }
    }

    /// The DNS-over-TCP pools (for tests).
    pub fn pools(&self) -> &Pools {
        &self.pools
    }
}

/// A DNS query (a header, QR clear): what the named resolvers answer.
/// Anything else sent to port 53 is relayed as the UDP it is.
fn is_query(payload: &[u8]) -> bool {
    message::Header::parse(payload).is_ok_and(|h| !h.is_response())
}

/// The named resolvers as fake-ip's [`fakeip::ResolveReal`] hook.
struct RealResolver(std::sync::Weak<Dns>);

impl fakeip::ResolveReal for RealResolver {
    fn resolve_real<'a>(&'a self, name: &'a str) -> crate::outbound::BoxFuture<'a, Vec<IpAddr>> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(dns) => dns.real_addresses(name).await,
                None => Vec::new(),
            }
        })
    }
}

/// The local answer to an AAAA question, or None for anything else.
fn filtered_aaaa(query: &[u8]) -> Option<Vec<u8>> {
    let header = message::Header::parse(query).ok()?;
    if header.is_response() || header.opcode() != 0 {
        return None;
    }
    let q = message::question(query).ok()?;
    if q.qtype != message::TYPE_AAAA {
        return None;
    }
    message::empty_answer(query).ok()
}

/// Refuses a `system` server whose resolv.conf names tproxyd's own
/// `dns.listen` (a router whose resolv.conf points at tproxyd): each
/// query would come back to tproxyd and wait for itself, 5 s, then
/// SERVFAIL. Checked where the config is loaded (`check`, the start, a
/// reload), not in [`Config`]'s validation: it reads the system's files.
pub fn check_system_servers(cfg: &Config) -> Result<(), ConfigError> {
    let issues: Vec<ConfigIssue> = cfg
        .dns
        .servers
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s.address, crate::config::ServerAddress::System))
        .filter_map(|(i, _)| {
            let (file, addr) = upstream::system::own_listener_named(&cfg.dns.listen)?;
            Some(ConfigIssue {
                key: format!("dns.servers[{i}].address"),
                message: format!(
                    "\"system\" reads {}, which names {addr}, tproxyd's own dns.listen: \
                     queries would go round in a loop; name the resolver that answers \
                     (udp://IP of the ISP's or a public one)",
                    file.display()
                ),
            })
        })
        .collect();
    if issues.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(issues))
    }
}

#[cfg(test)]
mod tests {
    use super::message::build::{query, response, Answer};
    use super::message::{Header, TYPE_A, TYPE_AAAA};
    use super::*;
    use crate::config::RawConfig;
    use std::net::Ipv4Addr;

    fn dns(extra: &str) -> Dns {
        let text = format!(
            "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
             [[outbounds]]\nname = \"tcp\"\ntype = \"socks5\"\nserver = \"203.0.113.3:1080\"\ndns_over_tcp = true\n\
             [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
             [route]\nfinal = \"proxy\"\n{extra}\n[firewall]\nbackend = \"none\"\n"
        );
        let cfg = RawConfig::from_toml(&text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap();
        let policy = Arc::new(Policy::from_config(&cfg).unwrap());
        Dns::new(&cfg, &policy)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn reload(d: &Dns, extra: &str) {
        let text = format!(
            "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
             [route]\nfinal = \"proxy\"\n{extra}\n[firewall]\nbackend = \"none\"\n"
        );
        let cfg = RawConfig::from_toml(&text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap();
        d.reconfigure(&cfg, &Arc::new(Policy::from_config(&cfg).unwrap()));
    }

    #[test]
    fn a_reload_rebuilds_the_resolver_and_flushes_when_servers_change() {
        let isp = "[dns]\n[[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\n";
        let d = dns(isp);
        let flushes = || d.stats.cache_flushes.load(Ordering::Relaxed);
        let client = sa("192.0.2.2:5000");
        let q = query(1, "a.example", TYPE_A);
        assert!(d.answers());
        assert_eq!(d.on_query(client, sa("8.8.8.8:53"), &q), Query::Resolve);
        // The same servers (rules may differ): the cache stays.
        reload(
            &d,
            &format!("{isp}[[dns.rules]]\nquery_type = [\"AAAA\"]\nreject = \"nodata\"\n"),
        );
        assert_eq!(flushes(), 0);
        // Another address: flushed.
        reload(
            &d,
            "[dns]\n[[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.54\"\n",
        );
        assert_eq!(flushes(), 1);
        // Back to the one-resolver shape: nothing answered here any more.
        reload(&d, "[dns]\nserver = \"198.51.100.53:53\"\n");
        assert!(!d.answers());
        assert_eq!(flushes(), 2);
        assert_eq!(
            d.on_query(client, sa("8.8.8.8:53"), &q),
            Query::Forward(sa("198.51.100.53:53"))
        );
    }

    #[tokio::test]
    async fn beyond_the_bound_queries_get_servfail_at_once() {
        let d = dns("[dns]\n[[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\n");
        d.resolving
            .store(MAX_RESOLVING, std::sync::atomic::Ordering::Relaxed);
        let q = query(8, "a.example", TYPE_A);
        let a = d.resolve(&q, sa("192.0.2.2:5000")).await.unwrap();
        let h = Header::parse(&a).unwrap();
        assert_eq!((h.id, h.rcode()), (8, message::RCODE_SERVFAIL));
        assert_eq!(
            d.resolving.load(std::sync::atomic::Ordering::Relaxed),
            MAX_RESOLVING
        );
        // Not a query: nothing.
        assert_eq!(d.resolve(b"junk", sa("192.0.2.2:5000")).await, None);
    }

    #[tokio::test]
    async fn a_cache_hit_is_answered_now_as_resolve_answers_it() {
        let client = sa("192.0.2.2:5000");
        let q = query(12, "Hit.Example", TYPE_A);
        // Without named resolvers: always later (the relay's own paths).
        assert_eq!(dns("").answer_now(&q, client), listen::Now::Later);
        let d = dns("[dns]\n[[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\n");
        // A miss: later, and nothing counted.
        assert_eq!(d.answer_now(&q, client), listen::Now::Later);
        let cache = d.cache().unwrap();
        assert_eq!(cache.stats().misses.load(Ordering::Relaxed), 0);
        let stored = query(1, "hit.example", TYPE_A);
        let answer = response(
            &stored,
            &[Answer::A(None, Ipv4Addr::new(198, 51, 100, 7), 60)],
        );
        let key = cache::Key::of(&stored).unwrap().scoped(0);
        assert!(cache.insert(&key, &answer, Instant::now()));
        let listen::Now::Answer(now) = d.answer_now(&q, client) else {
            panic!("a hit not answered now");
        };
        assert_eq!(Some(now), d.resolve(&q, client).await);
        assert_eq!(cache.stats().hits.load(Ordering::Relaxed), 2);
        // Junk: left to the slow path, which drops it.
        assert_eq!(d.answer_now(b"junk", client), listen::Now::Later);
    }

    #[test]
    fn aaaa_is_answered_here_only_when_filtered() {
        let client = sa("192.0.2.2:5000");
        let dst = sa("198.51.100.10:53");
        let q6 = query(3, "a.example", TYPE_AAAA);
        let q4 = query(4, "a.example", TYPE_A);
        let off = dns("");
        assert_eq!(off.on_query(client, dst, &q6), Query::Forward(dst));
        let on = dns("[dns]\nfilter_aaaa = true\n");
        let Query::Answer(a) = on.on_query(client, dst, &q6) else {
            panic!("AAAA not answered");
        };
        let h = Header::parse(&a).unwrap();
        assert_eq!((h.id, h.rcode(), h.ancount), (3, 0, 0));
        assert_eq!(on.on_query(client, dst, &q4), Query::Forward(dst));
        // Not a query: forwarded as it is.
        assert_eq!(on.on_query(client, dst, b"junk"), Query::Forward(dst));
    }

    #[test]
    fn hijacked_answers_come_back_from_the_address_asked() {
        let d = dns("[dns]\nserver = \"198.51.100.53:53\"\n");
        let server = sa("198.51.100.53:53");
        let client = sa("192.0.2.2:5000");
        let asked = sa("8.8.8.8:53");
        let q = query(77, "a.example", TYPE_A);
        assert_eq!(d.on_query(client, asked, &q), Query::Forward(server));
        let r = response(&q, &[Answer::A(None, Ipv4Addr::new(198, 51, 100, 7), 60)]);
        assert_eq!(d.on_reply(client, server, &r), asked);
        // Once: a second copy has no query waiting.
        assert_eq!(d.on_reply(client, server, &r), server);
        // Asking the server itself needs no mapping.
        assert_eq!(d.on_query(client, server, &q), Query::Forward(server));
        // Other remotes' replies pass as they are.
        assert_eq!(d.on_reply(client, asked, &r), asked);
    }

    #[test]
    fn names_are_learned_only_when_a_rule_looks_at_domains() {
        let q = query(1, "learned.example", TYPE_A);
        let r = response(&q, &[Answer::A(None, Ipv4Addr::new(198, 51, 100, 7), 60)]);
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let client = sa("192.0.2.2:5000");
        let from = sa("198.51.100.10:53");
        let plain = dns("");
        assert!(plain.names().is_none());
        plain.on_reply(client, from, &r);
        assert_eq!(plain.learned_name(ip), None);
        let ruled = dns("[[route.rules]]\ndomain_suffix = [\"example\"]\noutbound = \"direct\"\n");
        ruled.on_reply(client, from, &r);
        assert_eq!(ruled.learned_name(ip).as_deref(), Some("learned.example"));
    }

    #[test]
    fn tcp_is_for_socks5_that_asks_for_it_or_refused_udp() {
        let d = dns("");
        let ctx = crate::outbound::Context {
            mark: 1,
            connect_timeout: Duration::from_secs(1),
        };
        let socks = |port, dns_over_tcp| {
            let text = format!(
                "type = \"socks5\"\nserver = \"203.0.113.2:{port}\"\ndns_over_tcp = {dns_over_tcp}"
            );
            let raw: crate::outbound::RawOutbound = toml::from_str(&text).unwrap();
            raw.validate("outbound", "proxy".into(), &|_| None, &mut |_, _| {})
                .kind
                .build("proxy", &ctx, Vec::new())
                .unwrap()
        };
        let proxy = socks(1080, false);
        // Unknown yet: TCP, which every SOCKS5 server carries.
        assert!(d.wants_tcp(0, &proxy));
        d.udp_opened(0, "proxy", Ok(()));
        assert!(!d.wants_tcp(0, &proxy));
        assert!(d.wants_tcp(1, &proxy));
        let direct = Outbound::Direct(crate::outbound::direct::Direct::new(&ctx));
        assert!(!d.wants_tcp(2, &direct));
        // Configured so: always, whatever its UDP did.
        let configured = socks(1081, true);
        assert!(d.wants_tcp(3, &configured));
        d.udp_opened(3, "tcp", Ok(()));
        assert!(d.wants_tcp(3, &configured));
        // Refused UDP ASSOCIATE: from now on over TCP; other failures
        // (the server down) change nothing.
        use crate::outbound::socks5::Socks5Error;
        let down = OutboundError::Socks5(Socks5Error::Timeout {
            server: sa("203.0.113.2:1080"),
            secs: 1,
        });
        d.udp_opened(0, "proxy", Err(&down));
        assert!(!d.wants_tcp(0, &proxy));
        let refused = OutboundError::Socks5(Socks5Error::UdpRefused {
            server: sa("203.0.113.2:1080"),
            code: 7,
            meaning: "command not supported",
        });
        d.udp_opened(0, "proxy", Err(&refused));
        assert!(d.wants_tcp(0, &proxy));
        // Refused stays refused.
        d.udp_opened(0, "proxy", Ok(()));
        assert!(d.wants_tcp(0, &proxy));
    }
}
