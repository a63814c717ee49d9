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
//! How a query reaches one server is a [`Transport`]: the seam for
//! `dns::upstream::Upstream` (UDP with TCP retry, DoT, DoH, system). Until
//! it lands, [`PoolTransport`] asks `udp://` servers reached `direct` over
//! UDP and carries every other query as DNS over TCP through the outbound
//! (the existing pooled, pipelined `dns::tcp` code).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_atomic::{AtomicU64, Ordering};
use tracing::{debug, warn};

use super::message::{self, Header, RecordData, TYPE_A, TYPE_AAAA};
use super::names::Names;
use super::rules::{AcceptIp, Action};
use super::tcp::Pools;
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

/// How a query reaches `dns.servers[server]`. One implementation per
/// transport layer: [`PoolTransport`] now; `dns::upstream::Upstream`
/// (one per server, built with the bootstrap's `resolved` address) when it
/// lands. The answer must carry the query's id and question.
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

// ---------------------------------------------------------------------
// SHIM (until helper T's `dns::upstream::Upstream` is merged): a
// `udp://` server reached `direct` is asked over UDP from a socket with
// tproxyd's mark (TCP when the answer is truncated or none comes); every
// other query goes as DNS over TCP through the outbound, on the pools
// the captured-UDP path already uses (their sockets are marked by
// `connect_marked`). The lead replaces this struct with one holding an
// `Upstream` per server (rebuilt when `resolved` changes) and calls
// `Upstream::exchange(query, key, outbound)`.
// ---------------------------------------------------------------------

/// How long a UDP query waits for its answer before TCP is tried.
const UDP_WAIT: Duration = Duration::from_secs(2);

/// Carries queries as UDP (direct) or DNS over TCP (`dns::tcp`).
pub struct PoolTransport {
    addresses: Vec<ServerAddress>,
    pools: Arc<Pools>,
    mark: u32,
}

impl PoolTransport {
    pub fn new(cfg: &Config, pools: Arc<Pools>) -> PoolTransport {
        PoolTransport {
            addresses: cfg.dns.servers.iter().map(|s| s.address.clone()).collect(),
            pools,
            mark: cfg.mark,
        }
    }

    /// One query over UDP from a fresh marked socket (a random port per
    /// query, as stub resolvers do); Ok(None) when the answer is
    /// truncated (TC) and must be asked over TCP.
    async fn udp(&self, to: SocketAddr, query: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        let socket = crate::sys::outbound_udp_socket(&to, false, self.mark)?;
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        socket.send_to(query, to).await?;
        let asked = message::question(query).ok();
        let mut buf = vec![0u8; 65_535];
        let wait = async {
            loop {
                let (n, from) = socket.recv_from(&mut buf).await?;
                let answer = buf.get(..n).unwrap_or_default();
                // Only the server's answer to this query: anything else
                // (a stray or spoofed datagram) is ignored.
                let Ok(h) = Header::parse(answer) else {
                    continue;
                };
                if crate::sys::normalize(from) != to
                    || !h.is_response()
                    || Some(h.id) != message::id(query)
                    || message::question(answer).ok() != asked
                {
                    continue;
                }
                if h.flags & 0x0200 != 0 {
                    return Ok(None);
                }
                return Ok(Some(answer.to_vec()));
            }
        };
        match tokio::time::timeout(UDP_WAIT, wait).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer over UDP",
            )),
        }
    }
}

impl Transport for PoolTransport {
    async fn exchange(
        &self,
        server: usize,
        _resolved: Option<SocketAddr>,
        query: &[u8],
        key: u32,
        outbound: &Arc<Outbound>,
    ) -> Result<Vec<u8>, ExchangeFailed> {
        let (to, udp) = match self.addresses.get(server) {
            Some(ServerAddress::Udp(a)) => (*a, true),
            Some(ServerAddress::Tcp(a)) => (*a, false),
            Some(other) => {
                return Err(ExchangeFailed(format!(
                    "{other:?}: this build reaches named resolvers over plain DNS only"
                )))
            }
            None => return Err(ExchangeFailed("no such server".into())),
        };
        if udp && matches!(**outbound, Outbound::Direct(_)) {
            match self.udp(to, query).await {
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => debug!(%to, "DNS: truncated answer over UDP; asking over TCP"),
                Err(e) => debug!(%to, "DNS over UDP: {e}; asking over TCP"),
            }
        }
        self.pools
            .get(key, outbound, to)
            .exchange(query)
            .await
            .map_err(|e| ExchangeFailed(e.to_string()))
    }
}
// --------------------------- end of SHIM -----------------------------

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
pub struct Resolver<T: Transport = PoolTransport> {
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
        }
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
        let header = Header::parse(query).ok()?;
        if header.is_response() {
            return None;
        }
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        if header.opcode() != 0 {
            return header_only(query, RCODE_NOTIMP);
        }
        let Ok(q) = message::question(query) else {
            return header_only(query, RCODE_FORMERR);
        };
        if self.filter_aaaa && q.qtype == TYPE_AAAA {
            return message::empty_answer(query).ok();
        }
        let Some(rules) = self.policy.dns_rules() else {
            return self.servfail(query, "no [[dns.rules]] compiled");
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
                return message::reply_without_records(query, rcode).ok();
            }
            Action::Server(s) => s,
        };
        if let Some(answer) = fake.and_then(|pool| pool.answer(query)) {
            return Some(answer);
        }
        if let Some(answer) = self.cached(query) {
            return Some(answer);
        }
        let result = match verdict.fallback {
            None => self.ask(server, query, client).await,
            Some((fallback, accept)) => {
                self.ask_with_fallback(server, fallback, accept, query, client)
                    .await
            }
        };
        match result {
            Ok(answer) => {
                self.learn(&answer);
                self.store(query, &answer);
                Some(answer)
            }
            Err(e) => {
                let name = self.servers.get(server).map_or("?", |s| s.name.as_str());
                self.servfail(query, &format!("server {name:?}: {e}"))
            }
        }
    }

    /// CACHE SEAM (helper A's `dns::cache`): the cached answer to
    /// `query`, rewritten with its id and question. No cache yet.
    fn cached(&self, _query: &[u8]) -> Option<Vec<u8>> {
        None
    }

    /// CACHE SEAM: keeps `answer` to `query`. No cache yet.
    fn store(&self, _query: &[u8], _answer: &[u8]) {}

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

    /// Asks server `i` through its outbound.
    async fn ask(
        &self,
        i: usize,
        query: &[u8],
        client: SocketAddr,
    ) -> Result<Vec<u8>, ExchangeFailed> {
        let server = self
            .servers
            .get(i)
            .ok_or_else(|| ExchangeFailed("no such server".into()))?;
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
        let server = self
            .servers
            .get(i)
            .ok_or_else(|| ExchangeFailed("no such server".into()))?;
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
        let server = self
            .servers
            .get(i)
            .ok_or_else(|| ExchangeFailed("no such server".into()))?;
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
