//! The DNS engine for named resolvers (`[[dns.servers]]`): a query in, an
//! answer out. The rules ([`super::rules`]) pick a server or reject; the
//! server is asked through its outbound (named, or the route's decision
//! for a flow to the server's address); names are learned from the
//! answer for routing; a failure is answered SERVFAIL, never silence.
//!
//! With a fallback rule (`fallback` + `accept_ip`, mosdns / chinadns
//! style) both servers are asked at once: the rule server's answer is kept
//! when every address in it is in the accepted prefixes (a domestic
//! resolver telling the truth about a domestic name), else the fallback's
//! answer is used (a poisoned one replaced).
//!
//! Answers are kept in the cache (`dns::cache`), keyed also by the server
//! the rules chose, and identical queries in flight share one exchange.
//!
//! How a query reaches one server is a [`Transport`]: [`UpstreamTransport`]
//! (one `dns::upstream::Upstream` per server: UDP with TCP on truncation,
//! TCP, DoT, DoH, system) in tproxyd, a fake in the tests.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_atomic::{AtomicU64, Ordering};
use tracing::{debug, warn};

use super::cache::{Cache, Flights, Key, Lookup};
use super::message::{self, Header, RecordData, TYPE_A, TYPE_AAAA};
use super::names::Names;
use super::rules::{AcceptIp, Action};
use super::upstream::Upstream;
use crate::config::{Config, DnsServer, Network, Reject, ServerAddress};
use crate::outbound::Outbound;
use crate::policy::{FlowMeta, Policy};
use crate::ratelimit::RateLimit;

const RCODE_FORMERR: u8 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;

/// A bootstrap lookup's address is kept at least / at most this long,
/// whatever the TTL says (a TTL of 0 must not mean a lookup per query).
const BOOTSTRAP_MIN: Duration = Duration::from_secs(30);
const BOOTSTRAP_MAX: Duration = Duration::from_secs(86_400);

/// Why a server gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExchangeFailed(pub String);

/// How a query reaches `dns.servers[server]`: [`UpstreamTransport`], or a
/// fake in the tests. The answer must carry the query's id and question.
pub trait Transport: Send + Sync + 'static {
    /// Sends `query` through `outbound` (its policy `key`); `resolved` is
    /// the address looked up for a server given by host name.
    fn exchange<'a>(
        &'a self,
        server: usize,
        resolved: Option<SocketAddr>,
        query: &'a [u8],
        key: u32,
        outbound: &'a Arc<Outbound>,
    ) -> impl Future<Output = Result<Vec<u8>, ExchangeFailed>> + Send + 'a;
}

/// The transport of a running tproxyd: one [`Upstream`] per server (UDP
/// with TCP on truncation, TCP pools, DoT, DoH, the system's resolvers).
/// A server given by host name gets a new one when its looked-up address
/// changes.
pub struct UpstreamTransport {
    slots: Vec<Slot>,
}

struct Slot {
    name: String,
    address: ServerAddress,
    server_name: Option<String>,
    /// Built once for a server given by IP (or `system`); for a host name,
    /// built for the address looked up last.
    upstream: Mutex<Option<(Option<SocketAddr>, Arc<Upstream>)>>,
}

impl UpstreamTransport {
    pub fn new(cfg: &Config) -> UpstreamTransport {
        let slots = cfg
            .dns
            .servers
            .iter()
            .map(|s| Slot {
                name: s.name.clone(),
                address: s.address.clone(),
                server_name: s.server_name.clone(),
                upstream: Mutex::new(None),
            })
            .collect();
        UpstreamTransport { slots }
    }

    fn upstream(
        &self,
        server: usize,
        resolved: Option<SocketAddr>,
    ) -> Option<(&str, Arc<Upstream>)> {
        let slot = self.slots.get(server)?;
        let mut held = lock(&slot.upstream);
        match &*held {
            Some((at, u)) if *at == resolved => Some((&slot.name, Arc::clone(u))),
            _ => {
                let u = Arc::new(Upstream::new(
                    &slot.address,
                    resolved,
                    slot.server_name.as_deref(),
                ));
                *held = Some((resolved, Arc::clone(&u)));
                Some((&slot.name, u))
            }
        }
    }
}

impl Transport for UpstreamTransport {
    async fn exchange(
        &self,
        server: usize,
        resolved: Option<SocketAddr>,
        query: &[u8],
        key: u32,
        outbound: &Arc<Outbound>,
    ) -> Result<Vec<u8>, ExchangeFailed> {
        let (name, upstream) = self
            .upstream(server, resolved)
            .ok_or_else(|| ExchangeFailed("no such server".into()))?;
        upstream.exchange(query, key, outbound).await.map_err(|e| {
            debug!(server = name, "DNS: {e}");
            ExchangeFailed(e.to_string())
        })
    }
}

/// One `[[dns.servers]]` entry as the resolver uses it.
#[derive(Debug)]
struct Server {
    name: String,
    address: ServerAddress,
    /// `outbound`'s index in the policy; None: the route decides.
    outbound: Option<usize>,
    /// For a server given by host name: who looks it up, and the port.
    bootstrap: Option<(usize, String, u16)>,
    /// The looked-up address and until when it holds.
    resolved: Mutex<Option<(SocketAddr, Instant)>>,
}

/// Counters, for the log and the tests.
#[derive(Debug, Default)]
pub struct ResolverStats {
    pub queries: AtomicU64,
    pub rejected: AtomicU64,
    pub servfail: AtomicU64,
    /// Answers of a fallback rule's server replaced by its fallback's.
    pub fallback_used: AtomicU64,
}

/// Answers queries from the named resolvers, as the config and the
/// policy built from it say; a reload builds a new one.
pub struct Resolver<T: Transport = UpstreamTransport> {
    policy: Arc<Policy>,
    /// `[[dns.servers]]` as configured: a reload that changes them
    /// flushes the cache.
    config: Vec<DnsServer>,
    servers: Vec<Server>,
    filter_aaaa: bool,
    transport: T,
    /// Where learned names go; None when no rule looks at names.
    names: Option<Arc<Names>>,
    pub stats: ResolverStats,
    warning: RateLimit,
    /// Answers kept for their TTL, shared across reloads (see
    /// [`Resolver::with_cache`]); None when `[dns.cache] enabled = false`.
    cache: Option<Arc<Cache>>,
    /// Identical queries in flight share one exchange.
    flights: Flights<ExchangeFailed>,
}

impl<T: Transport> std::fmt::Debug for Resolver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("servers", &self.servers)
            .finish()
    }
}

/// A reply with only a header: for a message whose question cannot be
/// read (FORMERR) or an opcode not served (NOTIMP). The id, opcode and RD
/// as asked.
fn header_only(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let h = Header::parse(query).ok()?;
    let flags = 0x8000 | (h.flags & 0x7900) | 0x0080 | u16::from(rcode & 0xf);
    let mut out = Vec::with_capacity(message::HEADER_LEN);
    out.extend_from_slice(&h.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// What a query needs, before anything is awaited ([`Resolver::step`]).
enum Step<'a> {
    /// No DNS query (shorter than a header, or a response): no answer.
    NotDns,
    /// Answered here (None: not even a reply could be made).
    Answered(Option<Vec<u8>>),
    /// Server `server` is asked (with `fallback`, by answer), unless the
    /// cache holds the answer under `key`.
    Ask {
        server: usize,
        fallback: Option<(usize, &'a AcceptIp)>,
        key: Option<Key>,
    },
}

/// Whether every A/AAAA address of `answer` is in `accept` (true for an
/// answer with none: nothing in it is a lie about an address).
fn accepted(answer: &[u8], accept: &AcceptIp) -> bool {
    match message::answers(answer) {
        Ok(records) => records.iter().all(|r| match r.data {
            RecordData::Addr(ip) => accept.contains(ip),
            _ => true,
        }),
        Err(_) => false,
    }
}

impl<T: Transport> Resolver<T> {
    /// For `cfg` (which has named resolvers) and the policy built from it;
    /// `names` receives what answers teach.
    pub fn new(
        cfg: &Config,
        policy: Arc<Policy>,
        transport: T,
        names: Option<Arc<Names>>,
    ) -> Resolver<T> {
        let index = |name: &str| cfg.dns.servers.iter().position(|s| s.name == name);
        let servers =
            cfg.dns
                .servers
                .iter()
                .map(|s| Server {
                    name: s.name.clone(),
                    address: s.address.clone(),
                    outbound: s.outbound.as_deref().and_then(|o| policy.index_of(o)),
                    bootstrap: match (s.address.host_name(), &s.bootstrap) {
                        (Some(host), Some(b)) => index(b).map(|b| {
                            let port = match &s.address {
                                ServerAddress::Tls(e)
                                | ServerAddress::Https { endpoint: e, .. } => e.port,
                                _ => 0,
                            };
                            (b, host.to_string(), port)
                        }),
                        _ => None,
                    },
                    resolved: Mutex::new(None),
                })
                .collect();
        Resolver {
            policy,
            config: cfg.dns.servers.clone(),
            servers,
            filter_aaaa: cfg.dns.filter_aaaa,
            transport,
            names,
            stats: ResolverStats::default(),
            warning: RateLimit::default(),
            cache: None,
            flights: Flights::new(),
        }
    }

    /// Answers are kept in `cache` (keyed also by the server a rule
    /// chose, so one rule's answer is never served for another's).
    pub fn with_cache(mut self, cache: Option<Arc<Cache>>) -> Resolver<T> {
        self.cache = cache;
        self
    }

    /// `[[dns.servers]]` as this resolver was built with them.
    pub fn servers_config(&self) -> Vec<DnsServer> {
        self.config.clone()
    }

    /// The answer to `query` from `client`. None only when `query` is no
    /// DNS query (shorter than a header, or a response); otherwise always
    /// an answer with the query's id and question: FORMERR for a question
    /// that cannot be read, SERVFAIL when no server answered.
    pub async fn resolve(&self, query: &[u8], client: SocketAddr) -> Option<Vec<u8>> {
        self.resolve_with(query, client, None).await
    }

    /// [`resolve`](Self::resolve), with the fake-ip pool answering the
    /// A/AAAA questions it takes: after the rules' rejections (a name a
    /// rule rejects stays rejected), before any server is asked.
    pub async fn resolve_with(
        &self,
        query: &[u8],
        client: SocketAddr,
        fake: Option<&super::fakeip::FakePool>,
    ) -> Option<Vec<u8>> {
        self.answer(query, client, fake, true).await.0
    }

    /// What `query` needs, decided without waiting on anything: an answer
    /// made here (rejections, the fake-ip pool, FORMERR, ...), or a server
    /// to ask. Counts what it answers itself (rejected, SERVFAIL) but not
    /// the query: the caller counts it unless it is [`Step::NotDns`].
    fn step<'a>(
        &'a self,
        query: &[u8],
        client: SocketAddr,
        fake: Option<&super::fakeip::FakePool>,
    ) -> Step<'a> {
        let Ok(header) = Header::parse(query) else {
            return Step::NotDns;
        };
        if header.is_response() {
            return Step::NotDns;
        }
        if header.opcode() != 0 {
            return Step::Answered(header_only(query, RCODE_NOTIMP));
        }
        let Ok(q) = message::question(query) else {
            return Step::Answered(header_only(query, RCODE_FORMERR));
        };
        if self.filter_aaaa && q.qtype == TYPE_AAAA {
            return Step::Answered(message::empty_answer(query).ok());
        }
        let Some(rules) = self.policy.dns_rules() else {
            return Step::Answered(self.servfail(query, "no [[dns.rules]] compiled"));
        };
        let name = String::from_utf8_lossy(&q.name);
        let verdict = rules.lookup(&name, q.qtype, client.ip());
        let server = match verdict.action {
            Action::Reject(kind) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                let rcode = match kind {
                    Reject::Nxdomain => RCODE_NXDOMAIN,
                    Reject::Nodata => message::RCODE_NOERROR,
                };
                return Step::Answered(message::reply_without_records(query, rcode).ok());
            }
            Action::Server(s) => s,
        };
        // Fake answers never enter the cache: they are made here, and a
        // cached fake address would outlive its mapping.
        if let Some(answer) = fake.and_then(|pool| pool.answer(query)) {
            return Step::Answered(Some(answer));
        }
        let key = self
            .cache
            .as_ref()
            .and_then(|_| Key::of(query))
            .map(|k| k.scoped(u16::try_from(server).unwrap_or(u16::MAX)));
        Step::Ask {
            server,
            fallback: verdict.fallback,
            key,
        }
    }

    /// The answer to `query` when it needs no server: made here, or a hit
    /// in the cache. `Some((answer, stale))` is what
    /// [`answer`](Self::answer) would have given (stale: the caller
    /// refreshes it in the background, as after `answer`); None when a
    /// server must be asked (a miss, an answer not cached) or `query` is
    /// no DNS query: then nothing was counted, and `answer` takes it from
    /// the start. What the DNS listeners answer inline, without a task.
    pub fn answer_cached(
        &self,
        query: &[u8],
        client: SocketAddr,
        fake: Option<&super::fakeip::FakePool>,
    ) -> Option<(Option<Vec<u8>>, bool)> {
        let found = match self.step(query, client, fake) {
            Step::NotDns => return None,
            Step::Answered(answer) => (answer, false),
            Step::Ask { key, .. } => {
                let (cache, key) = (self.cache.as_ref()?, key?);
                match cache.get_hit(&key, query, Instant::now()) {
                    Lookup::Hit(answer) => (Some(answer), false),
                    Lookup::Stale(answer) => (Some(answer), true),
                    Lookup::Miss => return None,
                }
            }
        };
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        Some(found)
    }

    /// The answer, and whether it came stale from the cache (RFC 8767):
    /// then the caller refreshes it in the background with
    /// [`refresh`](Self::refresh). `from_cache` false asks the server
    /// whatever the cache holds.
    pub async fn answer(
        &self,
        query: &[u8],
        client: SocketAddr,
        fake: Option<&super::fakeip::FakePool>,
        from_cache: bool,
    ) -> (Option<Vec<u8>>, bool) {
        let step = self.step(query, client, fake);
        if !matches!(step, Step::NotDns) {
            self.stats.queries.fetch_add(1, Ordering::Relaxed);
        }
        let (server, fallback, key) = match step {
            Step::NotDns => return (None, false),
            Step::Answered(answer) => return (answer, false),
            Step::Ask {
                server,
                fallback,
                key,
            } => (server, fallback, key),
        };
        if let (true, Some(cache), Some(key)) = (from_cache, &self.cache, &key) {
            match cache.get(key, query, Instant::now()) {
                Lookup::Hit(answer) => return (Some(answer), false),
                Lookup::Stale(answer) => return (Some(answer), true),
                Lookup::Miss => {}
            }
        }
        let fetch = || async {
            let result = match fallback {
                None => self.ask(server, query, client).await,
                Some((fallback, accept)) => {
                    self.ask_with_fallback(server, fallback, accept, query, client)
                        .await
                }
            };
            if let Ok(answer) = &result {
                self.learn(answer);
                if let (Some(cache), Some(key)) = (&self.cache, &key) {
                    cache.insert(key, answer, Instant::now());
                }
            }
            result
        };
        let result = match &key {
            Some(key) => self.flights.run(key, query, fetch).await,
            None => fetch().await,
        };
        match result {
            Ok(answer) => (Some(answer), false),
            Err(e) => {
                let name = self.servers.get(server).map_or("?", |s| s.name.as_str());
                (
                    self.servfail(query, &format!("server {name:?}: {e}")),
                    false,
                )
            }
        }
    }

    /// Asks the server for `query` again and keeps its answer: the
    /// background refresh of an answer served stale.
    pub async fn refresh(&self, query: &[u8], client: SocketAddr) {
        let _ = self.answer(query, client, None, false).await;
    }

    /// The cache the answers go to, if any.
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }

    fn servfail(&self, query: &[u8], why: &str) -> Option<Vec<u8>> {
        self.stats.servfail.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.warning.check() {
            warn!(
                "DNS: {why}; answered SERVFAIL{}",
                crate::ratelimit::held_back(n)
            );
        }
        message::servfail(query).ok()
    }

    fn learn(&self, answer: &[u8]) {
        let Some(names) = &self.names else { return };
        let now = Instant::now();
        for l in message::learn(answer) {
            names.learn(l.addr, &l.name, l.ttl, now);
        }
    }

    /// Both servers at once: the first's answer if accepted (without
    /// waiting for the second), else the second's; whichever answered
    /// when the other failed.
    async fn ask_with_fallback(
        &self,
        server: usize,
        fallback: usize,
        accept: &AcceptIp,
        query: &[u8],
        client: SocketAddr,
    ) -> Result<Vec<u8>, ExchangeFailed> {
        let first = self.ask(server, query, client);
        let second = self.ask(fallback, query, client);
        tokio::pin!(first, second);
        let mut early = None;
        let first = loop {
            tokio::select! {
                r = &mut first => break r,
                r = &mut second, if early.is_none() => early = Some(r),
            }
        };
        if let Ok(a) = &first {
            if accepted(a, accept) {
                return first;
            }
        }
        let second = match early {
            Some(r) => r,
            None => second.await,
        };
        match (first, second) {
            (_, Ok(b)) => {
                self.stats.fallback_used.fetch_add(1, Ordering::Relaxed);
                debug!("DNS: an answer outside accept_ip replaced by the fallback's");
                Ok(b)
            }
            (Ok(a), Err(_)) => Ok(a),
            (Err(e), Err(_)) => Err(e),
        }
    }

    fn server(&self, i: usize) -> Result<&Server, ExchangeFailed> {
        self.servers
            .get(i)
            .ok_or_else(|| ExchangeFailed("no such server".into()))
    }

    /// Asks server `i` through its outbound.
    async fn ask(
        &self,
        i: usize,
        query: &[u8],
        client: SocketAddr,
    ) -> Result<Vec<u8>, ExchangeFailed> {
        let server = self.server(i)?;
        let resolved = match &server.bootstrap {
            Some((b, host, port)) => Some(self.bootstrap(i, *b, host, *port, client).await?),
            None => None,
        };
        self.exchange_with(i, resolved, query, client).await
    }

    /// The exchange itself, through the server's outbound.
    async fn exchange_with(
        &self,
        i: usize,
        resolved: Option<SocketAddr>,
        query: &[u8],
        client: SocketAddr,
    ) -> Result<Vec<u8>, ExchangeFailed> {
        let server = self.server(i)?;
        let choice = match server.outbound {
            Some(index) => {
                let (index, _) = self.policy.resolve(index);
                let named = self
                    .policy
                    .outbounds()
                    .get(index)
                    .ok_or_else(|| ExchangeFailed("outbound gone".into()))?;
                (named.key, Arc::clone(&named.outbound))
            }
            None => {
                // As for any flow from the client to the resolver.
                let network = match server.address {
                    ServerAddress::Udp(_) | ServerAddress::System => Network::Udp,
                    _ => Network::Tcp,
                };
                let dst = server
                    .address
                    .socket_addr()
                    .or(resolved)
                    .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 53));
                let c = self
                    .policy
                    .decide(&FlowMeta::addresses(network, client, dst));
                (c.key, c.outbound)
            }
        };
        self.transport
            .exchange(i, resolved, query, choice.0, &choice.1)
            .await
    }

    /// The address of server `i` (given by host name), looked up through
    /// server `b`: A, then AAAA; kept for its TTL.
    async fn bootstrap(
        &self,
        i: usize,
        b: usize,
        host: &str,
        port: u16,
        client: SocketAddr,
    ) -> Result<SocketAddr, ExchangeFailed> {
        let server = self.server(i)?;
        if let Some((addr, until)) = *lock(&server.resolved) {
            if Instant::now() < until {
                return Ok(addr);
            }
        }
        let mut why = String::from("no address");
        for qtype in [TYPE_A, TYPE_AAAA] {
            let id = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.subsec_nanos() as u16);
            let query = message::build::query(id, host, qtype);
            // The bootstrap server is given by IP (checked in config).
            match self.exchange_with(b, None, &query, client).await {
                Ok(answer) => {
                    let found = message::answers(&answer).ok().and_then(|rs| {
                        rs.iter().find_map(|r| match r.data {
                            RecordData::Addr(ip) if r.rtype == qtype => Some((ip, r.ttl)),
                            _ => None,
                        })
                    });
                    if let Some((ip, ttl)) = found {
                        let addr = SocketAddr::new(ip, port);
                        let keep =
                            Duration::from_secs(u64::from(ttl)).clamp(BOOTSTRAP_MIN, BOOTSTRAP_MAX);
                        *lock(&server.resolved) = Some((addr, Instant::now() + keep));
                        return Ok(addr);
                    }
                }
                Err(e) => why = e.0,
            }
        }
        Err(ExchangeFailed(format!(
            "looking up {host:?} through its bootstrap server: {why}"
        )))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[path = "resolver_tests.rs"]
mod tests;
