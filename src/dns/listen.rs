//! Where tproxyd answers DNS itself: the `dns.listen` addresses (UDP and
//! TCP on each, for dnsmasq's `server=127.0.0.1#5353` and the router's own
//! lookups) and captured TCP flows to port 53 (clients' own DNS over
//! TCP), served by the same TCP loop.
//!
//! The answers come from an [`Answer`] (the resolver); this module only
//! carries queries in and answers out:
//!
//! - **UDP**: an answer that waits on nothing (a cache hit, a rejection:
//!   [`Answer::answer_now`]) is sent from the receive loop itself, with
//!   no task and no copy of the datagram; any other datagram is answered
//!   in a task of its own, so a slow upstream holds up only its own
//!   queries. At most [`Limits::udp_in_flight`] tasks per listener:
//!   beyond it a query is answered SERVFAIL at once (counted in
//!   `udp_overload`), never left in silence, so dnsmasq moves on instead
//!   of waiting out its timeout. An answer
//!   longer than the client takes (512 bytes, or its EDNS0 size) goes as a
//!   minimal truncated reply (TC set, the question only: no partial
//!   records), and the client asks again over TCP (RFC 1035 4.2.1).
//! - **TCP** (RFC 7766): 2-byte length framing; queries pipelined on one
//!   connection are answered as they complete, out of order; at most
//!   [`Limits::tcp_in_flight`] per connection (then reading pauses until
//!   one is answered) and [`Limits::tcp_connections`] connections; closed
//!   after [`Limits::tcp_idle`] with nothing in flight and nothing
//!   received. A length too short for a DNS header, or a client that
//!   stops reading its answers for [`Limits::write_timeout`], closes that
//!   connection and no other.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use portable_atomic::AtomicU64;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

use super::message::{self, Header, HEADER_LEN};
use crate::ratelimit::{RateLimit, WARN_INTERVAL};
use crate::sys;

/// What answers the queries: the resolver. `None` = drop, `query` is no
/// DNS query at all (otherwise an answer always comes, SERVFAIL on
/// failure).
pub trait Answer: Send + Sync + 'static {
    fn answer(
        &self,
        query: Vec<u8>,
        client: SocketAddr,
    ) -> impl Future<Output = Option<Vec<u8>>> + Send;

    /// The answer to `query` when it can be given at once, without
    /// waiting on anything (a cache hit, a rejection): then the UDP
    /// listener sends it from its receive loop, with no task and no copy
    /// of the query. [`Now::Later`] (the default) hands the query to
    /// [`answer`](Self::answer) in a task of its own; an implementation
    /// that returns it must have done nothing that `answer` will do again
    /// (count, learn, allocate).
    fn answer_now(&self, query: &[u8], client: SocketAddr) -> Now {
        let _ = (query, client);
        Now::Later
    }

    /// Whether it answers now (named resolvers configured): captured TCP
    /// port 53 is answered here only then, and relayed as any flow
    /// otherwise. Asked per connection, so a reload can turn it.
    fn ready(&self) -> bool {
        true
    }
}

/// The named resolvers of the running server answer: `Dns` swaps its
/// resolver on reload, so the listeners follow without being rebuilt.
impl Answer for super::Dns {
    async fn answer(&self, query: Vec<u8>, client: SocketAddr) -> Option<Vec<u8>> {
        self.resolve(&query, client).await
    }

    fn answer_now(&self, query: &[u8], client: SocketAddr) -> Now {
        super::Dns::answer_now(self, query, client)
    }

    fn ready(&self) -> bool {
        self.answers()
    }
}

/// What [`Answer::answer_now`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Now {
    /// It takes waiting: [`Answer::answer`] answers it, in a task.
    Later,
    /// This answer, as [`Answer::answer`] would have given it.
    Answer(Vec<u8>),
    /// No answer, as [`Answer::answer`] giving None.
    Nothing,
}

/// A DNS message without EDNS0 is at most 512 bytes over UDP (RFC 1035
/// 2.3.4); EDNS0 may only raise that (RFC 6891 6.2.5).
const UDP_MIN_LIMIT: usize = 512;
/// The OPT pseudo-record (EDNS0).
const TYPE_OPT: u16 = 41;
/// The TC bit in the header's flags.
const FLAG_TC: u16 = 0x0200;

/// The bounds on what one listener takes on at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// UDP queries being answered per listener address; beyond: SERVFAIL.
    pub udp_in_flight: usize,
    /// TCP connections at once (the listeners and captured port 53
    /// together); beyond: closed at once.
    pub tcp_connections: usize,
    /// Queries being answered per TCP connection; beyond: reading pauses.
    pub tcp_in_flight: usize,
    /// A TCP connection with nothing in flight and nothing received for
    /// this long is closed (RFC 7766 6.2.3; unbound and Cloudflare close
    /// at about 10 s as well).
    pub tcp_idle: Duration,
    /// A client that takes no answer bytes for this long is cut off.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            udp_in_flight: 1024,
            tcp_connections: 256,
            tcp_in_flight: 32,
            tcp_idle: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters, for the log, the API and the tests.
#[derive(Debug, Default)]
pub struct ListenStats {
    pub udp_queries: AtomicU64,
    pub udp_answered: AtomicU64,
    /// Answers too long for the client, sent as TC replies.
    pub udp_truncated: AtomicU64,
    /// Queries over the in-flight cap, answered SERVFAIL at once.
    pub udp_overload: AtomicU64,
    /// Datagrams that were no DNS query (nothing sent back).
    pub udp_not_dns: AtomicU64,
    pub tcp_connections: AtomicU64,
    /// Connections over the cap, closed at once.
    pub tcp_refused: AtomicU64,
    pub tcp_queries: AtomicU64,
    pub tcp_answered: AtomicU64,
    /// Connections closed for a length that cannot be a DNS message.
    pub tcp_malformed: AtomicU64,
    /// Connections closed idle.
    pub tcp_idle: AtomicU64,
    /// Connections closed because the client stopped reading.
    pub tcp_stalled: AtomicU64,
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

static OVERLOAD: RateLimit = RateLimit::new(WARN_INTERVAL);
static TCP_FULL: RateLimit = RateLimit::new(WARN_INTERVAL);

/// What the UDP and TCP loops share: the answerer, the bounds, the
/// counters and the TCP connection slots.
pub struct DnsServer<A> {
    answer: Arc<A>,
    limits: Limits,
    stats: Arc<ListenStats>,
    tcp_slots: Arc<Semaphore>,
}

impl<A: Answer> DnsServer<A> {
    pub fn new(answer: Arc<A>, limits: Limits) -> Arc<Self> {
        Arc::new(DnsServer {
            answer,
            limits,
            stats: Arc::new(ListenStats::default()),
            tcp_slots: Arc::new(Semaphore::new(limits.tcp_connections)),
        })
    }

    pub fn stats(&self) -> &Arc<ListenStats> {
        &self.stats
    }

    /// Serves DNS datagrams on `socket` until the task is aborted; the
    /// queries still being answered end with it.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut queries = JoinSet::new();
        let mut buf = vec![0u8; u16::MAX as usize];
        loop {
            tokio::select! {
                biased;
                Some(_) = queries.join_next(), if !queries.is_empty() => {}
                received = socket.recv_from(&mut buf) => {
                    let (n, peer) = match received {
                        Ok(r) => r,
                        Err(e) => {
                            // ICMP errors of earlier replies surface here
                            // (ECONNREFUSED); nothing to do but go on.
                            debug!("DNS listener: receive failed: {e}");
                            continue;
                        }
                    };
                    let query = buf.get(..n).unwrap_or_default();
                    let client = sys::normalize(peer);
                    count(&self.stats.udp_queries);
                    // A hit (or a rejection) is answered here: no task, no
                    // copy, and no in-flight slot taken, so it is answered
                    // even while the slots are full of slow queries.
                    match self.answer.answer_now(query, client) {
                        Now::Later => {}
                        Now::Nothing => {
                            count(&self.stats.udp_not_dns);
                            continue;
                        }
                        Now::Answer(answer) => {
                            self.send_now(&socket, &mut queries, answer, udp_limit(query), peer);
                            continue;
                        }
                    }
                    let query = query.to_vec();
                    if queries.len() >= self.limits.udp_in_flight {
                        self.overloaded(&socket, &query, peer);
                        continue;
                    }
                    let server = Arc::clone(&self);
                    let socket = Arc::clone(&socket);
                    queries.spawn(async move {
                        server.answer_udp(&socket, query, peer, client).await;
                    });
                }
            }
        }
    }

    fn overloaded(&self, socket: &UdpSocket, query: &[u8], peer: SocketAddr) {
        count(&self.stats.udp_overload);
        if let Some(held_back) = OVERLOAD.check() {
            warn!(
                held_back,
                limit = self.limits.udp_in_flight,
                "DNS listener: too many queries waiting for their answer; new ones get SERVFAIL \
                 until some are answered (the resolvers are slow or unreachable)"
            );
        }
        if let Ok(reply) = message::servfail(query) {
            // Not awaited: a full socket buffer drops it, as it would the
            // datagram itself.
            let _ = socket.try_send_to(&reply, peer);
        }
    }

    async fn answer_udp(
        &self,
        socket: &UdpSocket,
        query: Vec<u8>,
        peer: SocketAddr,
        client: SocketAddr,
    ) {
        let limit = udp_limit(&query);
        let Some(answer) = self.answer.answer(query, client).await else {
            count(&self.stats.udp_not_dns);
            return;
        };
        let answer = self.fit(answer, limit);
        self.sent(socket.send_to(&answer, peer).await, peer);
    }

    /// Sends an answer given at once ([`Answer::answer_now`]) from the
    /// receive loop without waiting: when the socket's buffer is full, a
    /// task waits for room (in an in-flight slot; with none free the
    /// answer is dropped, as the kernel drops a datagram, and the client
    /// asks again).
    fn send_now(
        &self,
        socket: &Arc<UdpSocket>,
        queries: &mut JoinSet<()>,
        answer: Vec<u8>,
        limit: usize,
        peer: SocketAddr,
    ) {
        let answer = self.fit(answer, limit);
        match socket.try_send_to(&answer, peer) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if queries.len() >= self.limits.udp_in_flight {
                    debug!(%peer, "DNS listener: socket buffer full; an answer dropped");
                    return;
                }
                let stats = Arc::clone(&self.stats);
                let socket = Arc::clone(socket);
                queries.spawn(async move {
                    match socket.send_to(&answer, peer).await {
                        Ok(_) => count(&stats.udp_answered),
                        Err(e) => debug!(%peer, "DNS listener: cannot send the answer: {e}"),
                    }
                });
            }
            sent => self.sent(sent, peer),
        }
    }

    /// `answer` as it goes out to a client that takes `limit` bytes
    /// (truncated ones counted).
    fn fit(&self, answer: Vec<u8>, limit: usize) -> Vec<u8> {
        match fit_udp(answer, limit) {
            Fit::Whole(a) => a,
            Fit::Truncated(a) => {
                count(&self.stats.udp_truncated);
                a
            }
        }
    }

    fn sent(&self, sent: io::Result<usize>, peer: SocketAddr) {
        match sent {
            Ok(_) => count(&self.stats.udp_answered),
            Err(e) => debug!(%peer, "DNS listener: cannot send the answer: {e}"),
        }
    }

    /// Accepts DNS-over-TCP connections on `listener` until the task is
    /// aborted; its connections end with it.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Some(slot) = self.tcp_slot() else { continue };
                        let server = Arc::clone(&self);
                        connections.spawn(server.connection(stream, sys::normalize(peer), slot));
                    }
                    Err(e) => {
                        debug!("DNS listener: accept failed: {e}");
                        // EMFILE and the like: do not spin on them.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// A connection slot, or None (counted and warned) when all are taken.
    fn tcp_slot(&self) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.tcp_slots).try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                count(&self.stats.tcp_refused);
                if let Some(held_back) = TCP_FULL.check() {
                    warn!(
                        held_back,
                        limit = self.limits.tcp_connections,
                        "DNS over TCP: too many connections at once; new ones are closed until \
                         some end"
                    );
                }
                None
            }
        }
    }

    /// Serves one DNS-over-TCP connection (a listener's, or a captured
    /// flow to port 53) until the client closes it, it idles, or it
    /// breaks the framing.
    pub async fn connection<S>(
        self: Arc<Self>,
        mut stream: S,
        client: SocketAddr,
        _slot: OwnedSemaphorePermit,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        count(&self.stats.tcp_connections);
        let end = self.frames(&mut stream, client).await;
        match &end {
            TcpEnd::Closed => {}
            TcpEnd::Malformed => count(&self.stats.tcp_malformed),
            TcpEnd::Idle => count(&self.stats.tcp_idle),
            TcpEnd::Stalled => count(&self.stats.tcp_stalled),
            TcpEnd::Error(e) => debug!(%client, "DNS over TCP: {e}"),
        }
        if matches!(end, TcpEnd::Closed | TcpEnd::Idle) {
            // A FIN after the last answer; the others just drop the socket.
            let _ = tokio::time::timeout(self.limits.write_timeout, stream.shutdown()).await;
        }
    }

    async fn frames<S>(&self, stream: &mut S, client: SocketAddr) -> TcpEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut buf: Vec<u8> = Vec::with_capacity(1024);
        let mut in_flight = JoinSet::new();
        let mut eof = false;
        let idle = tokio::time::sleep(self.limits.tcp_idle);
        tokio::pin!(idle);
        loop {
            // Every whole frame received, while there is room for it.
            while in_flight.len() < self.limits.tcp_in_flight {
                match take_frame(&mut buf) {
                    Frame::Query(query) => {
                        count(&self.stats.tcp_queries);
                        let answer = Arc::clone(&self.answer);
                        in_flight.spawn(async move { answer_tcp(&*answer, query, client).await });
                    }
                    Frame::Partial => break,
                    Frame::Malformed => return TcpEnd::Malformed,
                }
            }
            if eof && in_flight.is_empty() {
                // What was received whole has been answered; a partial
                // frame left over has nobody to answer to.
                return TcpEnd::Closed;
            }
            let can_read = !eof && in_flight.len() < self.limits.tcp_in_flight;
            tokio::select! {
                biased;
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    let Ok(Some(framed)) = done else { continue };
                    match tokio::time::timeout(self.limits.write_timeout, stream.write_all(&framed)).await {
                        Ok(Ok(())) => count(&self.stats.tcp_answered),
                        Ok(Err(e)) => return TcpEnd::Error(e),
                        Err(_) => return TcpEnd::Stalled,
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + self.limits.tcp_idle);
                }
                read = stream.read_buf(&mut buf), if can_read => match read {
                    Ok(0) => eof = true,
                    Ok(_) => idle.as_mut().reset(tokio::time::Instant::now() + self.limits.tcp_idle),
                    Err(e) => return TcpEnd::Error(e),
                },
                () = &mut idle, if in_flight.is_empty() => return TcpEnd::Idle,
            }
        }
    }
}

/// Why a DNS-over-TCP connection ended.
#[derive(Debug)]
enum TcpEnd {
    Closed,
    Malformed,
    Idle,
    Stalled,
    Error(io::Error),
}

/// One query's answer, framed for TCP; None when `query` was no DNS query.
async fn answer_tcp<A: Answer>(answer: &A, query: Vec<u8>, client: SocketAddr) -> Option<Vec<u8>> {
    // Kept for a SERVFAIL should the answer not fit a frame.
    let header = query.get(..HEADER_LEN).map(<[u8]>::to_vec);
    let reply = answer.answer(query, client).await?;
    let reply = match u16::try_from(reply.len()) {
        Ok(_) => reply,
        // Over 65535 bytes cannot be framed: the question is gone with
        // the query, so SERVFAIL from its header alone (no question).
        Err(_) => servfail_header(&header?)?,
    };
    let len = u16::try_from(reply.len()).ok()?;
    let mut framed = Vec::with_capacity(2 + reply.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&reply);
    Some(framed)
}

/// SERVFAIL with no question, from a query's 12-byte header.
fn servfail_header(header: &[u8]) -> Option<Vec<u8>> {
    let h = Header::parse(header).ok()?;
    let flags = 0x8000 | (h.flags & 0x7900) | 0x0080 | u16::from(message::RCODE_SERVFAIL);
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&h.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

enum Frame {
    Query(Vec<u8>),
    Partial,
    Malformed,
}

/// Takes the first whole length-prefixed message off `buf`.
fn take_frame(buf: &mut Vec<u8>) -> Frame {
    let Some(&[hi, lo]) = buf.get(..2) else {
        return Frame::Partial;
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    // Shorter than a header cannot be a DNS message: the framing is lost
    // (or it never was DNS), so nothing after it can be trusted either.
    if len < HEADER_LEN {
        return Frame::Malformed;
    }
    if buf.len() < 2 + len {
        // Room for the rest of it, so the next read takes it whole.
        buf.reserve(2 + len - buf.len());
        return Frame::Partial;
    }
    let query = buf.get(2..2 + len).map(<[u8]>::to_vec).unwrap_or_default();
    buf.drain(..2 + len);
    Frame::Query(query)
}

/// The largest UDP answer `query`'s sender takes: 512 bytes, or the size
/// its EDNS0 OPT record gives when that is larger (RFC 6891 6.2.5).
pub fn udp_limit(query: &[u8]) -> usize {
    edns_size(query).map_or(UDP_MIN_LIMIT, |size| usize::from(size).max(UDP_MIN_LIMIT))
}

/// The UDP payload size of the query's OPT record, if it has one.
fn edns_size(msg: &[u8]) -> Option<u16> {
    let header = Header::parse(msg).ok()?;
    let mut pos = HEADER_LEN;
    for _ in 0..header.qdcount {
        pos = message::skip_name(msg, pos).ok()?.checked_add(4)?;
    }
    // Each record is at least 11 bytes, so a count larger than the
    // message fails on the bytes, never loops long.
    let before = usize::from(header.ancount) + usize::from(header.nscount);
    for i in 0..before + usize::from(header.arcount) {
        let at = message::skip_name(msg, pos).ok()?;
        let rtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
        if i >= before && rtype == TYPE_OPT {
            return Some(u16::from_be_bytes([*msg.get(at + 2)?, *msg.get(at + 3)?]));
        }
        let rdlen = usize::from(u16::from_be_bytes([*msg.get(at + 8)?, *msg.get(at + 9)?]));
        pos = at + 10 + rdlen;
    }
    None
}

/// An answer as it goes out over UDP.
#[derive(Debug, PartialEq, Eq)]
pub enum Fit {
    Whole(Vec<u8>),
    /// Too long: the header with TC set and the question, no records.
    Truncated(Vec<u8>),
}

/// `answer` as is when it fits in `limit` bytes, otherwise the minimal
/// truncated reply: its header with TC set and no records, and its
/// question. Records are never cut in half (RFC 2181 9: a client would
/// take a partial answer for the whole), and the client asks again over
/// TCP.
pub fn fit_udp(answer: Vec<u8>, limit: usize) -> Fit {
    if answer.len() <= limit {
        return Fit::Whole(answer);
    }
    let Ok(header) = Header::parse(&answer) else {
        // Not even a header: nothing to truncate from; sent as is, the
        // client drops it (cannot happen with a resolver's answers).
        return Fit::Whole(answer);
    };
    // The question section's bytes copied whole: its offsets stay the
    // same, so a pointer within it stays right.
    let question_end = if header.qdcount == 1 {
        message::skip_name(&answer, HEADER_LEN)
            .ok()
            .and_then(|end| end.checked_add(4))
            .filter(|&end| end <= answer.len() && end <= limit)
    } else {
        None
    };
    let mut out = Vec::with_capacity(question_end.unwrap_or(HEADER_LEN));
    out.extend_from_slice(&header.id.to_be_bytes());
    out.extend_from_slice(&(header.flags | FLAG_TC).to_be_bytes());
    let qdcount: u16 = question_end.map_or(0, |_| 1);
    out.extend_from_slice(&qdcount.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    if let Some(end) = question_end {
        out.extend_from_slice(answer.get(HEADER_LEN..end).unwrap_or_default());
    }
    Fit::Truncated(out)
}

/// Why a `dns.listen` address cannot be listened on.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "cannot listen for DNS on {proto} {addr} (dns.listen): the port is in use by another \
         program (dnsmasq? systemd-resolved? see: ss -lntup 'sport = :{port}'); choose another \
         port, e.g. {ip}:5353, and point dnsmasq at it (server={ip}#5353)",
        port = addr.port(), ip = addr.ip()
    )]
    InUse {
        proto: &'static str,
        addr: SocketAddr,
    },
    #[error(
        "cannot listen for DNS on {addr} (dns.listen): {ip} is not an address of this host; use \
         127.0.0.1, [::1] or an address of one of its interfaces",
        ip = addr.ip()
    )]
    NotLocal { addr: SocketAddr },
    #[error(
        "cannot listen for DNS on {addr} (dns.listen): port {port} needs CAP_NET_BIND_SERVICE, \
         which tproxyd lacks (now); choose a port from 1024 up (e.g. 5353) or grant it \
         (AmbientCapabilities=CAP_NET_BIND_SERVICE, setcap)",
        port = addr.port()
    )]
    Permission { addr: SocketAddr },
    #[error("cannot listen for DNS on {proto} {addr} (dns.listen): {source}")]
    Other {
        proto: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
}

fn listen_error(proto: &'static str, addr: SocketAddr, source: io::Error) -> ListenError {
    match source.kind() {
        io::ErrorKind::AddrInUse => ListenError::InUse { proto, addr },
        io::ErrorKind::AddrNotAvailable => ListenError::NotLocal { addr },
        io::ErrorKind::PermissionDenied => ListenError::Permission { addr },
        _ => ListenError::Other {
            proto,
            addr,
            source,
        },
    }
}

/// One `dns.listen` address bound, UDP and TCP, not yet served.
#[derive(Debug)]
pub struct Bound {
    addr: SocketAddr,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

impl Bound {
    /// Binds UDP and TCP on `addr`, marked with `mark` (so an output
    /// chain that captures the router's own traffic lets the answers be).
    pub fn bind(addr: SocketAddr, mark: u32) -> Result<Bound, ListenError> {
        let opts = sys::ListenOptions {
            transparent: false,
            recv_orig_dst: false,
            mark,
        };
        // Port 0 (tests): TCP on the port UDP got, which some other TCP
        // socket may hold already; another port is tried then.
        let mut tries = if addr.port() == 0 { 8 } else { 1 };
        loop {
            let udp =
                sys::service_udp_socket(addr, mark).map_err(|e| listen_error("udp", addr, e))?;
            let got = udp.local_addr().map_err(|e| listen_error("udp", addr, e))?;
            match sys::tcp_listener(got, opts) {
                Ok(tcp) => {
                    return Ok(Bound {
                        addr: got,
                        udp,
                        tcp,
                    })
                }
                Err(e) if tries > 1 && e.kind() == io::ErrorKind::AddrInUse => tries -= 1,
                Err(e) => return Err(listen_error("tcp", got, e)),
            }
        }
    }

    /// Binds every address; the first failure ends it (nothing stays bound).
    pub fn bind_all(addrs: &[SocketAddr], mark: u32) -> Result<Vec<Bound>, ListenError> {
        addrs.iter().map(|&a| Bound::bind(a, mark)).collect()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// One address being served: its UDP and TCP loops, aborted on drop.
struct Running {
    /// As configured (port 0 stays 0), to compare with a reload's list.
    configured: SocketAddr,
    addr: SocketAddr,
    tasks: [AbortHandle; 2],
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

type Start = dyn Fn(Bound) -> io::Result<[AbortHandle; 2]> + Send + Sync;

/// The `dns.listen` listeners of a running server: started with the
/// answerer, closed on drop, and on reload rebound only where the list of
/// addresses changed (the sockets of the addresses kept stay open).
pub struct Listeners {
    mark: u32,
    start: Box<Start>,
    running: Vec<Running>,
    stats: Arc<ListenStats>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("addrs", &self.addrs())
            .finish()
    }
}

/// Addresses bound for a reload that has not been committed yet.
#[derive(Debug)]
pub struct Pending {
    addrs: Vec<SocketAddr>,
    bound: Vec<(SocketAddr, Bound)>,
}

impl Listeners {
    /// Serves each of `bound` (with its configured address, see
    /// [`Listeners::pending`]) with `server`. Must run in the runtime.
    pub fn start<A: Answer>(
        server: &Arc<DnsServer<A>>,
        configured: &[SocketAddr],
        bound: Vec<Bound>,
        mark: u32,
    ) -> io::Result<Listeners> {
        let server = Arc::clone(server);
        let stats = Arc::clone(server.stats());
        let start = move |b: Bound| -> io::Result<[AbortHandle; 2]> {
            let udp = UdpSocket::from_std(b.udp)?;
            let tcp = TcpListener::from_std(b.tcp)?;
            let u = tokio::spawn(Arc::clone(&server).serve_udp(udp)).abort_handle();
            let t = tokio::spawn(Arc::clone(&server).serve_tcp(tcp)).abort_handle();
            Ok([u, t])
        };
        let mut listeners = Listeners {
            mark,
            start: Box::new(start),
            running: Vec::new(),
            stats,
        };
        let pending = Pending {
            addrs: configured.to_vec(),
            bound: configured.iter().copied().zip(bound).collect(),
        };
        listeners.commit(pending)?;
        Ok(listeners)
    }

    /// The addresses served now (ports as bound).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.running.iter().map(|r| r.addr).collect()
    }

    pub fn stats(&self) -> &Arc<ListenStats> {
        &self.stats
    }

    /// The first half of a reload to `addrs`: binds the addresses not
    /// served yet, and nothing else. A failure changes nothing; the
    /// sockets bound are closed again when the result is dropped.
    pub fn pending(&self, addrs: &[SocketAddr]) -> Result<Pending, ListenError> {
        let served: HashSet<SocketAddr> = self.running.iter().map(|r| r.configured).collect();
        let mut bound = Vec::new();
        for &a in addrs {
            if !served.contains(&a) {
                bound.push((a, Bound::bind(a, self.mark)?));
            }
        }
        Ok(Pending {
            addrs: addrs.to_vec(),
            bound,
        })
    }

    /// The second half: closes the addresses no longer listed and serves
    /// the new ones.
    pub fn commit(&mut self, pending: Pending) -> io::Result<()> {
        let keep: HashSet<SocketAddr> = pending.addrs.iter().copied().collect();
        self.running.retain(|r| keep.contains(&r.configured));
        for (configured, b) in pending.bound {
            let addr = b.addr;
            let tasks = (self.start)(b)?;
            self.running.push(Running {
                configured,
                addr,
                tasks,
            });
            info!(%addr, "answering DNS on UDP and TCP (dns.listen)");
        }
        Ok(())
    }
}

/// Serves captured TCP flows to port 53 with the listeners' TCP loop:
/// what `inbound::tcp` holds, without knowing the answerer's type.
pub struct CapturedTcp {
    serve: Box<ServeFn>,
    ready: Box<dyn Fn() -> bool + Send + Sync>,
}

type ServeFn =
    dyn Fn(TcpStream, SocketAddr) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

impl std::fmt::Debug for CapturedTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CapturedTcp")
    }
}

impl CapturedTcp {
    pub fn new<A: Answer>(server: &Arc<DnsServer<A>>) -> CapturedTcp {
        let server = Arc::clone(server);
        let answerer = Arc::clone(&server.answer);
        CapturedTcp {
            ready: Box::new(move || answerer.ready()),
            serve: Box::new(move |stream, client| {
                let server = Arc::clone(&server);
                Box::pin(async move {
                    match server.tcp_slot() {
                        Some(slot) => server.connection(stream, client, slot).await,
                        // Over the cap: reset, so the client fails at once.
                        None => {
                            let _ = sys::set_reset_on_close(&stream);
                        }
                    }
                })
            }),
        }
    }

    /// Whether captured flows to port 53 are answered here now.
    pub fn ready(&self) -> bool {
        (self.ready)()
    }

    /// Answers the DNS queries on `stream` (a captured flow from `client`
    /// to port 53) until it ends.
    pub async fn serve(&self, stream: TcpStream, client: SocketAddr) {
        (self.serve)(stream, client).await;
    }
}

#[cfg(test)]
mod tests {
    use super::message::build::{query, response, Answer as Rr};
    use super::message::{TYPE_A, TYPE_AAAA};
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::sync::watch;

    /// The fake resolver.
    enum Fake {
        /// One A record for the question.
        Echo,
        /// `n` A records: too long for 512 bytes when n is large.
        Big(usize),
        /// Answers a query once the test has released its id.
        Gate(watch::Receiver<Vec<u16>>),
        /// Never answers.
        Hang,
        /// Answers at once (`answer_now`) with `n` A records, and never
        /// from a task; a query for "none.example" gets no answer.
        Inline(usize),
    }

    impl Answer for Fake {
        async fn answer(&self, query: Vec<u8>, _client: SocketAddr) -> Option<Vec<u8>> {
            let header = Header::parse(&query).ok()?;
            let a = |n: usize| -> Vec<u8> {
                let records: Vec<Rr<'_>> = (0..n)
                    .map(|i| Rr::A(None, Ipv4Addr::new(198, 51, 100, (i % 250) as u8), 60))
                    .collect();
                response(&query, &records)
            };
            match self {
                Fake::Echo => Some(a(1)),
                Fake::Big(n) => Some(a(*n)),
                Fake::Gate(released) => {
                    let mut released = released.clone();
                    released.wait_for(|r| r.contains(&header.id)).await.ok()?;
                    Some(a(1))
                }
                Fake::Hang | Fake::Inline(_) => std::future::pending().await,
            }
        }

        fn answer_now(&self, query: &[u8], _client: SocketAddr) -> Now {
            let Fake::Inline(n) = self else {
                return Now::Later;
            };
            if message::question(query).is_ok_and(|q| q.name == b"none.example") {
                return Now::Nothing;
            }
            let records: Vec<Rr<'_>> = (0..*n)
                .map(|i| Rr::A(None, Ipv4Addr::new(198, 51, 100, (i % 250) as u8), 60))
                .collect();
            Now::Answer(response(query, &records))
        }
    }

    fn lo() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn start(fake: Fake, limits: Limits) -> (Listeners, SocketAddr, Arc<ListenStats>) {
        let server = DnsServer::new(Arc::new(fake), limits);
        let bound = Bound::bind_all(&[lo()], 0).unwrap();
        let l = Listeners::start(&server, &[lo()], bound, 0).unwrap();
        let addr = l.addrs()[0];
        (l, addr, Arc::clone(server.stats()))
    }

    async fn udp_ask(to: SocketAddr, q: &[u8]) -> Vec<u8> {
        let from: SocketAddr = if to.is_ipv6() {
            "[::1]:0".parse().unwrap()
        } else {
            lo()
        };
        let s = UdpSocket::bind(from).await.unwrap();
        s.send_to(q, to).await.unwrap();
        let mut buf = vec![0u8; 65535];
        let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
            .await
            .expect("no UDP answer")
            .unwrap();
        buf.truncate(n);
        buf
    }

    fn framed(q: &[u8]) -> Vec<u8> {
        let mut f = (q.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(q);
        f
    }

    async fn read_framed(s: &mut TcpStream) -> Vec<u8> {
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
            .await
            .expect("no TCP answer")
            .unwrap();
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut m).await.unwrap();
        m
    }

    /// Whether the server closed `s` (EOF or reset) within 5 s.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// A query with an OPT record advertising `size`.
    fn edns_query(id: u16, name: &str, size: u16) -> Vec<u8> {
        let mut q = query(id, name, TYPE_A);
        q[11] = 1; // ARCOUNT
        q.extend_from_slice(&[0, 0, 41]); // root name, TYPE OPT
        q.extend_from_slice(&size.to_be_bytes());
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // TTL (ext. rcode, flags), RDLEN
        q
    }

    #[tokio::test]
    async fn udp_queries_are_answered() {
        let (_l, addr, stats) = start(Fake::Echo, Limits::default());
        let q = query(4242, "a.example", TYPE_A);
        let a = udp_ask(addr, &q).await;
        let h = Header::parse(&a).unwrap();
        assert_eq!((h.id, h.ancount, h.flags & FLAG_TC), (4242, 1, 0));
        assert_eq!(message::question(&a).unwrap().name, b"a.example");
        assert_eq!(stats.udp_answered.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_udp_limit_is_512_or_the_edns_size() {
        assert_eq!(udp_limit(&query(1, "a.example", TYPE_A)), 512);
        assert_eq!(udp_limit(&edns_query(1, "a.example", 1232)), 1232);
        // EDNS may only raise it.
        assert_eq!(udp_limit(&edns_query(1, "a.example", 100)), 512);
        // Garbage and lying counts: the floor.
        assert_eq!(udp_limit(b"junk"), 512);
        let mut lying = query(1, "a.example", TYPE_A);
        lying[6..12].copy_from_slice(&[0xff; 6]);
        assert_eq!(udp_limit(&lying), 512);
    }

    #[test]
    fn a_long_answer_becomes_the_header_with_tc_and_the_question() {
        let q = query(7, "big.example", TYPE_AAAA);
        let big = response(
            &q,
            &(0..40)
                .map(|_| Rr::Aaaa(None, "2001:db8::1".parse().unwrap(), 60))
                .collect::<Vec<_>>(),
        );
        assert!(big.len() > 512);
        let Fit::Truncated(t) = fit_udp(big.clone(), 512) else {
            panic!("not truncated");
        };
        let h = Header::parse(&t).unwrap();
        assert_eq!(
            (h.id, h.qdcount, h.ancount, h.nscount, h.arcount),
            (7, 1, 0, 0, 0)
        );
        assert_ne!(h.flags & FLAG_TC, 0);
        assert!(h.is_response());
        assert_eq!(t.get(HEADER_LEN..), q.get(HEADER_LEN..));
        assert_eq!(fit_udp(big.clone(), big.len()), Fit::Whole(big));
        // No question to keep: the header alone.
        let Fit::Truncated(t) = fit_udp(vec![0u8; 600], 512) else {
            panic!("not truncated");
        };
        assert_eq!(t.len(), HEADER_LEN);
    }

    #[tokio::test]
    async fn a_big_answer_to_a_client_without_edns_is_truncated_and_whole_over_tcp() {
        let (_l, addr, stats) = start(Fake::Big(60), Limits::default());
        let q = query(9, "big.example", TYPE_A);
        let a = udp_ask(addr, &q).await;
        let h = Header::parse(&a).unwrap();
        assert_ne!(h.flags & FLAG_TC, 0, "TC not set");
        assert_eq!((h.id, h.qdcount, h.ancount), (9, 1, 0));
        assert_eq!(a.get(HEADER_LEN..), q.get(HEADER_LEN..));
        assert_eq!(stats.udp_truncated.load(Ordering::Relaxed), 1);
        // With EDNS0 room for it: whole.
        let a = udp_ask(addr, &edns_query(10, "big.example", 4096)).await;
        assert_eq!(Header::parse(&a).unwrap().ancount, 60);
        // The retry over TCP gets it whole.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&framed(&q)).await.unwrap();
        let a = read_framed(&mut s).await;
        let h = Header::parse(&a).unwrap();
        assert_eq!((h.id, h.ancount, h.flags & FLAG_TC), (9, 60, 0));
    }

    #[tokio::test]
    async fn queries_over_the_udp_cap_get_servfail_at_once() {
        let limits = Limits {
            udp_in_flight: 2,
            ..Limits::default()
        };
        let (_l, addr, stats) = start(Fake::Hang, limits);
        let s = UdpSocket::bind(lo()).await.unwrap();
        for id in 1..=2 {
            s.send_to(&query(id, "slow.example", TYPE_A), addr)
                .await
                .unwrap();
        }
        // The two are taken before the third arrives (one receive loop).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stats.udp_queries.load(Ordering::Relaxed) < 2 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.send_to(&query(3, "slow.example", TYPE_A), addr)
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
            .await
            .expect("no SERVFAIL")
            .unwrap();
        let h = Header::parse(&buf[..n]).unwrap();
        assert_eq!((h.id, h.rcode()), (3, message::RCODE_SERVFAIL));
        assert_eq!(stats.udp_overload.load(Ordering::Relaxed), 1);
        // The two held ones got nothing (yet).
        assert!(
            tokio::time::timeout(Duration::from_millis(100), s.recv(&mut buf))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn answers_given_at_once_take_no_slot_and_are_fitted_and_counted() {
        // No in-flight slot at all: every query that needs a task gets
        // SERVFAIL, so an answer here came from the receive loop.
        let limits = Limits {
            udp_in_flight: 0,
            ..Limits::default()
        };
        let (_l, addr, stats) = start(Fake::Inline(1), limits);
        let a = udp_ask(addr, &query(31, "a.example", TYPE_A)).await;
        let h = Header::parse(&a).unwrap();
        assert_eq!((h.id, h.rcode(), h.ancount), (31, 0, 1));
        assert_eq!(stats.udp_answered.load(Ordering::Relaxed), 1);
        assert_eq!(stats.udp_overload.load(Ordering::Relaxed), 0);
        // No answer: counted, nothing sent (the next query's answer is
        // the next datagram).
        let s = UdpSocket::bind(lo()).await.unwrap();
        s.send_to(&query(32, "none.example", TYPE_A), addr)
            .await
            .unwrap();
        s.send_to(&query(33, "a.example", TYPE_A), addr)
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert_eq!(Header::parse(&buf[..n]).unwrap().id, 33);
        assert_eq!(stats.udp_not_dns.load(Ordering::Relaxed), 1);
        // Too long for the client: truncated as from a task.
        let (_l, addr, stats) = start(Fake::Inline(60), limits);
        let a = udp_ask(addr, &query(34, "big.example", TYPE_A)).await;
        let h = Header::parse(&a).unwrap();
        assert_ne!(h.flags & FLAG_TC, 0, "TC not set");
        assert_eq!((h.id, h.ancount), (34, 0));
        assert_eq!(stats.udp_truncated.load(Ordering::Relaxed), 1);
        assert_eq!(stats.udp_queries.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn twenty_pipelined_queries_are_answered_as_they_complete() {
        let (release, released) = watch::channel(Vec::new());
        let (_l, addr, stats) = start(Fake::Gate(released), Limits::default());
        let mut s = TcpStream::connect(addr).await.unwrap();
        // All twenty in one write: one connection, nothing answered yet.
        let mut all = Vec::new();
        for id in 1..=20u16 {
            all.extend(framed(&query(id, &format!("n{id}.example"), TYPE_A)));
        }
        s.write_all(&all).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stats.tcp_queries.load(Ordering::Relaxed) < 20 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not all 20 in flight"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Released last to first: each answer comes as its query completes,
        // before the ones sent ahead of it.
        for id in (1..=20u16).rev() {
            release.send_modify(|r| r.push(id));
            let a = read_framed(&mut s).await;
            let q = message::question(&a).unwrap();
            assert_eq!(Header::parse(&a).unwrap().id, id);
            assert_eq!(q.name, format!("n{id}.example").into_bytes());
        }
        assert_eq!(stats.tcp_answered.load(Ordering::Relaxed), 20);
    }

    #[tokio::test]
    async fn reading_pauses_at_the_per_connection_cap() {
        let (release, released) = watch::channel(Vec::new());
        let limits = Limits {
            tcp_in_flight: 2,
            ..Limits::default()
        };
        let (_l, addr, stats) = start(Fake::Gate(released), limits);
        let mut s = TcpStream::connect(addr).await.unwrap();
        for id in 1..=3u16 {
            s.write_all(&framed(&query(id, "c.example", TYPE_A)))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(stats.tcp_queries.load(Ordering::Relaxed), 2);
        release.send_modify(|r| r.extend([1, 2, 3]));
        let mut ids: Vec<u16> = Vec::new();
        for _ in 0..3 {
            ids.push(Header::parse(&read_framed(&mut s).await).unwrap().id);
        }
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_malformed_length_closes_that_connection_only() {
        let (_l, addr, stats) = start(Fake::Echo, Limits::default());
        let mut good = TcpStream::connect(addr).await.unwrap();
        let mut bad = TcpStream::connect(addr).await.unwrap();
        good.write_all(&framed(&query(1, "a.example", TYPE_A)))
            .await
            .unwrap();
        assert_eq!(Header::parse(&read_framed(&mut good).await).unwrap().id, 1);
        // Length 3: no DNS message is that short.
        bad.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
        assert!(closed(&mut bad).await, "the bad connection stays open");
        assert_eq!(stats.tcp_malformed.load(Ordering::Relaxed), 1);
        good.write_all(&framed(&query(2, "a.example", TYPE_A)))
            .await
            .unwrap();
        assert_eq!(Header::parse(&read_framed(&mut good).await).unwrap().id, 2);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_but_not_one_waiting_for_an_answer() {
        let limits = Limits {
            tcp_idle: Duration::from_millis(200),
            ..Limits::default()
        };
        let (_l, addr, stats) = start(Fake::Hang, limits);
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut waiting = TcpStream::connect(addr).await.unwrap();
        waiting
            .write_all(&framed(&query(1, "a.example", TYPE_A)))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        assert!(closed(&mut idle).await);
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(stats.tcp_idle.load(Ordering::Relaxed), 1);
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(400), waiting.read(&mut b))
                .await
                .is_err(),
            "a connection with a query in flight was closed"
        );
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off_alone() {
        let limits = Limits {
            write_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        // About 64 KB per answer: a few hundred fill any socket buffers.
        let (_l, addr, stats) = start(Fake::Big(4000), limits);
        let mut deaf = TcpStream::connect(addr).await.unwrap();
        let mut queries = Vec::new();
        for id in 0..400u16 {
            queries.extend(framed(&query(id, "big.example", TYPE_A)));
        }
        deaf.write_all(&queries).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while stats.tcp_stalled.load(Ordering::Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never cut off");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Others are still served.
        let mut other = TcpStream::connect(addr).await.unwrap();
        other
            .write_all(&framed(&query(1, "a.example", TYPE_A)))
            .await
            .unwrap();
        let a = read_framed(&mut other).await;
        assert_eq!(Header::parse(&a).unwrap().id, 1);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed() {
        let limits = Limits {
            tcp_connections: 1,
            ..Limits::default()
        };
        let (_l, addr, stats) = start(Fake::Echo, limits);
        let mut first = TcpStream::connect(addr).await.unwrap();
        first
            .write_all(&framed(&query(1, "a.example", TYPE_A)))
            .await
            .unwrap();
        read_framed(&mut first).await;
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut second).await);
        assert_eq!(stats.tcp_refused.load(Ordering::Relaxed), 1);
        drop(first);
        // The slot is back once the first has gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut third = TcpStream::connect(addr).await.unwrap();
            third
                .write_all(&framed(&query(3, "a.example", TYPE_A)))
                .await
                .unwrap();
            let mut len = [0u8; 2];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), third.read_exact(&mut len)).await
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the slot never came back"
            );
        }
    }

    #[tokio::test]
    async fn a_captured_flow_is_served_by_the_same_loop() {
        let server = DnsServer::new(Arc::new(Fake::Echo), Limits::default());
        let captured = CapturedTcp::new(&server);
        let listener = TcpListener::bind(lo()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            captured.serve(stream, peer).await;
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        for id in [5u16, 6] {
            s.write_all(&framed(&query(id, "c.example", TYPE_A)))
                .await
                .unwrap();
            assert_eq!(Header::parse(&read_framed(&mut s).await).unwrap().id, id);
        }
        drop(s);
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(server.stats().tcp_answered.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_reload_rebinds_only_what_changed() {
        let server = DnsServer::new(Arc::new(Fake::Echo), Limits::default());
        let v4 = lo();
        let v6: SocketAddr = "[::1]:0".parse().unwrap();
        let mut l =
            Listeners::start(&server, &[v4], Bound::bind_all(&[v4], 0).unwrap(), 0).unwrap();
        let first = l.addrs()[0];
        // The same list: nothing bound.
        let same = l.pending(&[v4]).unwrap();
        assert!(same.bound.is_empty());
        l.commit(same).unwrap();
        assert_eq!(l.addrs(), [first]);
        // One more: only it is bound; the first keeps its socket.
        let more = l.pending(&[v4, v6]).unwrap();
        assert_eq!(more.bound.len(), 1);
        l.commit(more).unwrap();
        let addrs = l.addrs();
        assert_eq!(addrs[0], first);
        assert!(addrs[1].is_ipv6());
        for a in &addrs {
            let ans = udp_ask(*a, &query(1, "a.example", TYPE_A)).await;
            assert_eq!(Header::parse(&ans).unwrap().ancount, 1);
        }
        // The first dropped: its port is free again.
        let fewer = l.pending(&[v6]).unwrap();
        l.commit(fewer).unwrap();
        assert_eq!(l.addrs(), [addrs[1]]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Bound::bind(first, 0).is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{first} still bound"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_port_in_use_is_named_with_the_fix() {
        let (_l, addr, _) = start(Fake::Echo, Limits::default());
        let e = Bound::bind(addr, 0).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ListenError::InUse { .. }), "{e:?}");
        assert!(
            text.contains(&addr.to_string()) && text.contains("in use"),
            "{text}"
        );
        assert!(
            text.contains("dnsmasq") && text.contains("choose another port"),
            "{text}"
        );
        // A listener that failed to bind leaves nothing bound.
        let free = Bound::bind(lo(), 0).unwrap().addr();
        let e = Bound::bind_all(&[free, addr], 0).unwrap_err();
        assert!(matches!(e, ListenError::InUse { .. }));
        assert!(Bound::bind(free, 0).is_ok());
    }
}
