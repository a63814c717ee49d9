//! UDP sessions, full cone.
//!
//! A session is keyed by the client's source address:port alone, not by
//! (source, destination): one upstream socket or SOCKS5 association then
//! serves every destination of that client, and a datagram from *any*
//! remote that reaches the association is passed back to the client. That
//! is endpoint-independent mapping, the "open NAT" games and consoles ask
//! for.
//!
//! Replies must reach the client from the remote's own address:port, so
//! they leave through a transparent socket bound to that remote
//! ([`ReplySockets`]); the sockets are cached, bounded and expire when
//! idle.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::{Limits, Timeouts};
use crate::outbound::{Outbound, UdpRecv, UdpUpstream, UDP_HEADROOM};
use crate::relay::spares::Spares;
use crate::route::{Decision, Protocol, Router};
use crate::sys;

/// Largest UDP payload (65535 − 8 UDP − 20 IPv4 header).
pub const MAX_DATAGRAM: usize = 65_507;

/// Set once the kernel refused UDP segmentation outright (no
/// `UDP_SEGMENT`, or a device that cannot do it): runs then go one
/// datagram at a time, as they would without it.
static SEGMENTS_REFUSED: AtomicBool = AtomicBool::new(false);

/// Most datagrams in one run sent with UDP segmentation offload: below
/// the kernel's limit (64 segments before Linux 6.9, 128 since).
pub const MAX_RUN_DATAGRAMS: usize = 32;
/// Most bytes in one run, a SOCKS5 header per datagram included: one UDP
/// datagram's worth.
pub const MAX_RUN_BYTES: usize = 65_000;
/// Larger datagrams are never gathered: they exceed any link's MTU, which
/// a segment must not, and are too rare to be worth copying.
pub const MAX_RUN_SEGMENT: usize = 9_000;

/// Whether a datagram of `len` bytes may be part of a run.
pub fn runnable(len: usize) -> bool {
    len > 0 && len <= MAX_RUN_SEGMENT
}

/// Whether a run of `count` datagrams of `segment` bytes may take one more.
pub fn run_has_room(count: usize, segment: usize) -> bool {
    // Room for a SOCKS5 header in front of each, should they go there.
    count < MAX_RUN_DATAGRAMS && (count + 1) * (segment + UDP_HEADROOM) <= MAX_RUN_BYTES
}

fn take_buffer() -> Box<[u8]> {
    SPARE_BUFFERS
        .take()
        .unwrap_or_else(|| vec![0u8; RECV_BUF].into_boxed_slice())
}

/// Replies read back to back from one remote, all the same size.
#[derive(Default)]
struct ReplyRun {
    from: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// The payloads back to back in `buf[..len]`; taken on first use.
    buf: Option<Box<[u8]>>,
    len: usize,
}

impl ReplyRun {
    fn extends(&self, from: SocketAddr, len: usize) -> bool {
        self.count > 0
            && self.from == Some(from)
            && len == self.segment
            && run_has_room(self.count, self.segment)
    }

    fn start(&mut self, from: SocketAddr, payload: &[u8]) {
        self.from = Some(from);
        self.segment = payload.len();
        self.push(payload);
    }

    fn push(&mut self, payload: &[u8]) {
        let buf = self.buf.get_or_insert_with(take_buffer);
        buf[self.len..self.len + payload.len()].copy_from_slice(payload);
        self.len += payload.len();
        self.count += 1;
    }

    /// Sends the run to `client` and empties it, adding what was delivered.
    async fn flush(&mut self, relay: &UdpRelay, client: SocketAddr, delivered: &mut (u64, u64)) {
        let (Some(from), Some(buf)) = (self.from, &self.buf) else {
            return;
        };
        if self.count == 0 {
            return;
        }
        let payloads = &buf[..self.len];
        let sent = relay
            .replies
            .send_run(from, client, payloads, self.segment, &relay.stats)
            .await;
        delivered.0 += (sent * self.segment).min(self.len) as u64;
        delivered.1 += sent as u64;
        self.len = 0;
        self.count = 0;
    }
}

fn refuse_segments(e: &io::Error) {
    if !SEGMENTS_REFUSED.swap(true, Ordering::Relaxed) {
        info!("UDP segmentation offload refused ({e}); sending datagrams one by one");
    }
}

/// Datagrams queued for one session while its upstream is slow or still
/// being set up (a SOCKS5 handshake); beyond that they are dropped and
/// counted, as a congested link would.
const SESSION_QUEUE: usize = 256;

/// A session's receive buffer: the largest datagram, one byte more so a
/// truncation would show, and room for a SOCKS5 header.
const RECV_BUF: usize = MAX_DATAGRAM + UDP_HEADROOM + 1;

/// Receive buffers between uses; see [`Spares`].
static SPARE_BUFFERS: Spares<Box<[u8]>> = Spares::new(16);

/// A datagram on its way upstream: `buf[UDP_HEADROOM..]` is the payload.
#[derive(Debug)]
pub struct Packet {
    pub buf: Vec<u8>,
    pub dst: SocketAddr,
}

struct SessionEntry {
    id: u64,
    shared: Arc<SessionShared>,
}

/// Datagrams waiting for a session's task, oldest first.
///
/// A deque under a lock and a [`Notify`], not a channel: a bounded tokio
/// channel allocates about 800 bytes when made, in every session of the
/// table, for a queue most sessions use only while they open.
#[derive(Default)]
struct Queue {
    packets: VecDeque<Box<Packet>>,
    /// The session's task has ended: nothing queued now would be sent.
    closed: bool,
}

/// Why a datagram could not be queued.
enum Refused {
    Full,
    /// The session ended; the packet comes back for a fresh one.
    Closed(Box<Packet>),
}

/// What the inbound and a session's task both touch.
///
/// Once the session's upstream is open, the inbound sends an established
/// session's datagrams itself (non-blocking) instead of queueing them for
/// the session's task: no allocation, no channel and no cross-thread
/// wake-up per datagram. The queue remains for the start of a session
/// (a SOCKS5 handshake in progress) and for a full socket buffer.
struct SessionShared {
    upstream: OnceLock<Arc<UdpUpstream>>,
    start: Instant,
    /// Milliseconds since `start` of the last datagram either way.
    last_activity_ms: AtomicU64,
    /// Datagrams handed to the queue and not yet sent by the task; while
    /// any are, the inbound queues too, so datagrams keep their order.
    queued: AtomicUsize,
    queue: Mutex<Queue>,
    /// Wakes the session's task when a datagram is queued.
    queue_ready: Notify,
    /// The last destination was port 53 (shorter idle timeout).
    last_was_dns: AtomicBool,
    up_bytes: AtomicU64,
    up_datagrams: AtomicU64,
}

impl SessionShared {
    fn new() -> Self {
        SessionShared {
            upstream: OnceLock::new(),
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            queue_ready: Notify::new(),
            last_was_dns: AtomicBool::new(false),
            up_bytes: AtomicU64::new(0),
            up_datagrams: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_activity_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Queues a datagram for the session's task.
    fn enqueue(&self, packet: Box<Packet>) -> Result<(), Refused> {
        let mut queue = lock(&self.queue);
        if queue.closed {
            return Err(Refused::Closed(packet));
        }
        if queue.packets.len() >= SESSION_QUEUE {
            return Err(Refused::Full);
        }
        // Counted before the task can see it, so the inbound's fast path
        // never overtakes a queued datagram.
        self.queued.fetch_add(1, Ordering::AcqRel);
        queue.packets.push_back(packet);
        drop(queue);
        self.queue_ready.notify_one();
        Ok(())
    }

    fn dequeue(&self) -> Option<Box<Packet>> {
        lock(&self.queue).packets.pop_front()
    }

    /// Ends the queue: later datagrams start a fresh session. Returns how
    /// many were still waiting (they will not be sent).
    fn close_queue(&self) -> usize {
        let mut queue = lock(&self.queue);
        queue.closed = true;
        let left = queue.packets.len();
        queue.packets = VecDeque::new();
        self.queued.fetch_sub(left, Ordering::AcqRel);
        left
    }

    fn sent_up(&self, len: usize, dst: SocketAddr) {
        self.sent_up_many(len, 1, dst)
    }

    fn sent_up_many(&self, bytes: usize, datagrams: usize, dst: SocketAddr) {
        self.up_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.up_datagrams
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        self.last_was_dns.store(dst.port() == 53, Ordering::Relaxed);
        self.touch();
    }

    fn idle_since(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Logs a failed send upstream at the level it deserves.
fn report_send_error(
    client: SocketAddr,
    dst: SocketAddr,
    len: usize,
    outbound: &str,
    e: &io::Error,
) {
    if e.raw_os_error() == Some(libc::EMSGSIZE) {
        // Too large for the outbound (SOCKS5 adds a header to a datagram
        // that may already be at the IPv4 maximum): the sender should know.
        warn!(
            %client, %dst,
            "UDP datagram of {len} bytes does not fit the {outbound} outbound ({e}); dropped. Through SOCKS5 the largest is 65497 bytes to an IPv4 destination and 65485 to IPv6 (the header adds 10 or 22 bytes)"
        );
    } else {
        debug!(%client, %dst, "UDP send upstream failed: {e}");
    }
}

/// Counters worth logging and, later, exporting.
#[derive(Debug, Default)]
pub struct UdpStats {
    pub sessions_refused_full: AtomicU64,
    pub datagrams_dropped_queue: AtomicU64,
    /// Datagrams that went through a session's queue rather than straight
    /// out from the inbound (session opening, or a full socket buffer).
    pub datagrams_queued: AtomicU64,
    /// Datagrams that went upstream in runs, several per send call.
    pub datagrams_segmented: AtomicU64,
    /// Replies that went to clients in runs.
    pub replies_segmented: AtomicU64,
    pub replies_dropped_bind: AtomicU64,
}

/// The session table and the reply sockets of one UDP listener.
pub struct UdpRelay {
    router: Router,
    timeouts: Timeouts,
    limits: Limits,
    sessions: Mutex<HashMap<SocketAddr, SessionEntry>>,
    next_id: AtomicU64,
    pub replies: ReplySockets,
    pub stats: UdpStats,
    /// Last time a "table full" warning was logged, so a flood of new
    /// client ports produces one line a few seconds, not one per datagram.
    last_full_warning: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps inconsistent in
    // a way that matters more than stopping UDP for every client would.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl UdpRelay {
    pub fn new(router: Router, timeouts: Timeouts, limits: Limits, mark: u32) -> Arc<Self> {
        Arc::new(UdpRelay {
            router,
            timeouts,
            limits,
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            replies: ReplySockets::new(limits.udp_reply_sockets, mark),
            stats: UdpStats::default(),
            last_full_warning: Mutex::new(None),
        })
    }

    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Hands one datagram from `client` to `dst` to its session, creating
    /// the session when this client has none. `buf[UDP_HEADROOM..]` is the
    /// payload; the headroom in front of it is scratch space for a SOCKS5
    /// header.
    pub fn dispatch(self: &Arc<Self>, client: SocketAddr, dst: SocketAddr, buf: &mut [u8]) {
        let outbound = match self.router.decide(Protocol::Udp, dst) {
            Decision::Forward(outbound) => outbound,
            Decision::RefuseLoop => {
                warn!(%client, %dst, "refused UDP datagram addressed to tproxyd's own listener (routing loop); check that the rules skip tproxyd's mark");
                return;
            }
        };
        let len = buf.len() - UDP_HEADROOM;
        if let Some((upstream, shared)) = self.ready_upstream(client) {
            match upstream.try_send(buf, dst) {
                Ok(()) => return shared.sent_up(len, dst),
                // The socket buffer is full: the task waits for room.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return report_send_error(client, dst, len, outbound.name(), &e),
            }
        }
        self.stats.datagrams_queued.fetch_add(1, Ordering::Relaxed);
        let mut packet = Box::new(Packet {
            buf: buf.to_vec(),
            dst,
        });

        let mut sessions = lock(&self.sessions);
        if let Some(entry) = sessions.get(&client) {
            match entry.shared.enqueue(packet) {
                Ok(()) => return,
                Err(Refused::Full) => {
                    self.stats
                        .datagrams_dropped_queue
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(%client, %dst, "UDP session queue full; datagram dropped");
                    return;
                }
                // The session is ending; start a fresh one below.
                Err(Refused::Closed(p)) => {
                    sessions.remove(&client);
                    packet = p;
                }
            }
        }
        if sessions.len() >= self.limits.udp_sessions {
            drop(sessions);
            self.stats
                .sessions_refused_full
                .fetch_add(1, Ordering::Relaxed);
            self.warn_table_full(client);
            return;
        }
        let shared = Arc::new(SessionShared::new());
        // A fresh queue is open and empty: it takes the packet.
        let _ = shared.enqueue(packet);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        sessions.insert(
            client,
            SessionEntry {
                id,
                shared: Arc::clone(&shared),
            },
        );
        drop(sessions);
        tokio::spawn(Arc::clone(self).run_session(id, client, outbound, shared));
    }

    /// Hands a run of datagrams from `client` to `dst`, read back to back
    /// and all `segment` bytes long, to its session: `run[UDP_HEADROOM..]`
    /// holds the payloads one after another. An established session sends
    /// the whole run in one call; otherwise (or if the kernel refuses the
    /// run) each datagram goes through [`dispatch`](Self::dispatch) in order.
    pub fn dispatch_run(
        self: &Arc<Self>,
        client: SocketAddr,
        dst: SocketAddr,
        run: &mut [u8],
        segment: usize,
        scratch: &mut Vec<u8>,
    ) {
        let bytes = run.len().saturating_sub(UDP_HEADROOM);
        if segment == 0 || bytes == 0 {
            return;
        }
        let count = bytes.div_ceil(segment);
        let routed = matches!(self.router.decide(Protocol::Udp, dst), Decision::Forward(_));
        if count > 1 && routed && !SEGMENTS_REFUSED.load(Ordering::Relaxed) {
            if let Some((upstream, shared)) = self.ready_upstream(client) {
                match upstream.try_send_segments(&run[UDP_HEADROOM..], segment, dst, scratch) {
                    Ok(()) => {
                        self.stats
                            .datagrams_segmented
                            .fetch_add(count as u64, Ordering::Relaxed);
                        return shared.sent_up_many(bytes, count, dst);
                    }
                    Err(e) if sys::segments_unsupported(&e) => refuse_segments(&e),
                    // A full buffer, or a run this route cannot segment
                    // (a segment over its MTU): one by one, each datagram
                    // then queued or reported on its own.
                    Err(_) => {}
                }
            }
        }
        for i in 0..count {
            let start = UDP_HEADROOM + i * segment;
            let end = (start + segment).min(run.len());
            // dispatch wants headroom in front of the payload: here that is
            // the previous payload, already sent or copied by then.
            self.dispatch(client, dst, &mut run[start - UDP_HEADROOM..end]);
        }
    }

    /// The open upstream of `client`'s session, when the inbound may send
    /// on it directly: open, and nothing queued that must go first.
    fn ready_upstream(&self, client: SocketAddr) -> Option<(Arc<UdpUpstream>, Arc<SessionShared>)> {
        let shared = lock(&self.sessions)
            .get(&client)
            .map(|entry| Arc::clone(&entry.shared))?;
        let upstream = Arc::clone(shared.upstream.get()?);
        (shared.queued.load(Ordering::Acquire) == 0).then_some((upstream, shared))
    }

    /// Passes every reply waiting on the upstream to the client; returns
    /// the bytes and datagrams delivered.
    ///
    /// Replies that arrive back to back from one remote with the same size
    /// (a download) are gathered into runs and sent with UDP segmentation
    /// offload, as the inbound does for uploads.
    async fn forward_replies(
        &self,
        upstream: &UdpUpstream,
        client: SocketAddr,
        shared: &SessionShared,
    ) -> (u64, u64) {
        // The buffers live only while replies are waiting: an idle session
        // (most of a full table, most of the time) holds none.
        let mut buf = take_buffer();
        let mut run = ReplyRun::default();
        let mut delivered = (0u64, 0u64);
        // The remote and size of the reply sent last on its own. A reply
        // goes out at once unless it follows one like it: a lone answer
        // (DNS, a game's tick) is never copied or held back, and a burst
        // is gathered from its second datagram on.
        let mut last_alone: Option<(SocketAddr, usize)> = None;
        loop {
            match upstream.try_recv(&mut buf) {
                Ok(UdpRecv::Datagram { from, start, end }) => {
                    shared.touch();
                    let payload = &buf[start..end];
                    if run.extends(from, payload.len()) {
                        run.push(payload);
                        continue;
                    }
                    run.flush(self, client, &mut delivered).await;
                    if last_alone == Some((from, payload.len())) && runnable(payload.len()) {
                        run.start(from, payload);
                        last_alone = None;
                        continue;
                    }
                    last_alone = Some((from, payload.len()));
                    if self.replies.send(from, client, payload, &self.stats).await {
                        delivered.0 += payload.len() as u64;
                        delivered.1 += 1;
                    }
                }
                Ok(UdpRecv::Dropped(reason)) => debug!(%client, "UDP reply dropped: {reason}"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors surface here (ECONNREFUSED on a connected
                // socket); the session goes on.
                Err(e) => {
                    debug!(%client, "UDP receive from upstream: {e}");
                    break;
                }
            }
        }
        run.flush(self, client, &mut delivered).await;
        if let Some(gathered) = run.buf.take() {
            SPARE_BUFFERS.give_back(gathered);
        }
        SPARE_BUFFERS.give_back(buf);
        delivered
    }

    fn warn_table_full(&self, client: SocketAddr) {
        let mut last = lock(&self.last_full_warning);
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            *last = Some(Instant::now());
            warn!(
                %client,
                limit = self.limits.udp_sessions,
                refused = self.stats.sessions_refused_full.load(Ordering::Relaxed),
                "UDP session table full; new clients are refused until sessions expire (raise limits.udp_sessions if this is normal load)"
            );
        }
    }

    fn idle_for(&self, shared: &SessionShared) -> Duration {
        if shared.last_was_dns.load(Ordering::Relaxed) {
            self.timeouts.udp_dns_idle
        } else {
            self.timeouts.udp_idle
        }
    }

    async fn run_session(
        self: Arc<Self>,
        id: u64,
        client: SocketAddr,
        outbound: Arc<Outbound>,
        shared: Arc<SessionShared>,
    ) {
        let started = Instant::now();
        let outbound_name = outbound.name();
        let mut first_dst = None;
        let (mut down_bytes, mut down_n) = (0u64, 0u64);

        // Boxed so the opening state (a SOCKS5 handshake) is freed once
        // open instead of sizing every session's task for its whole life.
        let end = match Box::pin(outbound.open_udp()).await {
            Err(e) => {
                // Count what was queued so nothing is lost silently.
                let lost = shared.close_queue();
                warn!(%client, outbound = outbound_name, dropped = lost, "UDP session failed to open: {e}");
                format!("open-failed: {e}")
            }
            Ok(upstream) => {
                debug!(proto = "udp", %client, outbound = outbound_name, "session open");
                let upstream = Arc::new(upstream);
                let _ = shared.upstream.set(Arc::clone(&upstream));
                let deadline = tokio::time::sleep(self.timeouts.udp_idle);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        () = shared.queue_ready.notified() => {
                            while let Some(mut p) = shared.dequeue() {
                                first_dst.get_or_insert(p.dst);
                                let len = p.buf.len() - UDP_HEADROOM;
                                match upstream.send(&mut p.buf, p.dst).await {
                                    Ok(()) => shared.sent_up(len, p.dst),
                                    Err(e) => report_send_error(client, p.dst, len, outbound_name, &e),
                                }
                                shared.queued.fetch_sub(1, Ordering::AcqRel);
                            }
                        }
                        r = upstream.readable() => {
                            if let Err(e) = r {
                                debug!(%client, "UDP upstream socket: {e}");
                                continue;
                            }
                            // Boxed: its buffers and sends exist only while
                            // replies flow, not in every idle session's task.
                            let (bytes, datagrams) =
                                Box::pin(self.forward_replies(&upstream, client, &shared)).await;
                            down_bytes += bytes;
                            down_n += datagrams;
                        }
                        reason = upstream.closed() => {
                            info!(%client, "UDP session ended: {reason}");
                            break reason;
                        }
                        _ = &mut deadline => {
                            // Datagrams the inbound sent itself count as
                            // activity too: sleep on until the real end.
                            let idle = self.idle_for(&shared);
                            let since = shared.idle_since();
                            if since >= idle {
                                break "idle-timeout".to_string();
                            }
                            deadline.as_mut().reset(tokio::time::Instant::now() + (idle - since));
                        }
                    }
                }
            }
        };
        // Closed before the entry leaves the table: a datagram that comes
        // now is refused and starts a fresh session instead of waiting
        // here for ever.
        let left = shared.close_queue();
        if left > 0 {
            self.stats
                .datagrams_dropped_queue
                .fetch_add(left as u64, Ordering::Relaxed);
            debug!(%client, dropped = left, "UDP session ended with datagrams queued");
        }
        let up_bytes = shared.up_bytes.load(Ordering::Relaxed);
        let up_n = shared.up_datagrams.load(Ordering::Relaxed);

        {
            let mut sessions = lock(&self.sessions);
            if sessions.get(&client).is_some_and(|e| e.id == id) {
                sessions.remove(&client);
            }
        }
        debug!(
            proto = "udp",
            %client,
            dst = %first_dst.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
            outbound = outbound_name,
            up_bytes, down_bytes, up_datagrams = up_n, down_datagrams = down_n,
            duration_ms = started.elapsed().as_millis() as u64,
            end = %end,
            "flow"
        );
    }
}

enum ReplyEntry {
    Ready {
        socket: Arc<UdpSocket>,
        last_used: Instant,
    },
    /// Binding failed (EADDRINUSE: a local service owns the address);
    /// remembered so the warning is not repeated for every datagram.
    Failed { since: Instant },
}

/// Transparent sockets bound to remote addresses, for sending replies that
/// carry the remote's address as their source. Bounded: the least recently
/// used socket is closed when a new one is needed and the cache is full.
pub struct ReplySockets {
    cap: usize,
    mark: u32,
    map: Mutex<HashMap<SocketAddr, ReplyEntry>>,
}

/// How long a failed bind is remembered before it is tried again.
const BIND_RETRY: Duration = Duration::from_secs(30);

impl ReplySockets {
    pub fn new(cap: usize, mark: u32) -> Self {
        ReplySockets {
            cap,
            mark,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.map)
            .values()
            .filter(|e| matches!(e, ReplyEntry::Ready { .. }))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn socket_for(&self, from: SocketAddr, stats: &UdpStats) -> Option<Arc<UdpSocket>> {
        let mut map = lock(&self.map);
        let now = Instant::now();
        match map.get_mut(&from) {
            Some(ReplyEntry::Ready { socket, last_used }) => {
                *last_used = now;
                return Some(Arc::clone(socket));
            }
            Some(ReplyEntry::Failed { since }) if since.elapsed() < BIND_RETRY => {
                stats.replies_dropped_bind.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            _ => {}
        }
        if map.len() >= self.cap {
            evict_oldest(&mut map);
        }
        let made = sys::reply_socket(from, self.mark).and_then(UdpSocket::from_std);
        match made {
            Ok(socket) => {
                let socket = Arc::new(socket);
                map.insert(
                    from,
                    ReplyEntry::Ready {
                        socket: Arc::clone(&socket),
                        last_used: now,
                    },
                );
                Some(socket)
            }
            Err(e) => {
                stats.replies_dropped_bind.fetch_add(1, Ordering::Relaxed);
                map.insert(from, ReplyEntry::Failed { since: now });
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    warn!(remote = %from, "cannot send UDP replies from {from}: a local service already uses that address and port (EADDRINUSE); replies from it are dropped. Exclude this destination from capture in the firewall rules.");
                } else {
                    warn!(remote = %from, "cannot open a reply socket bound to {from}: {e}; replies from it are dropped");
                }
                None
            }
        }
    }

    /// Sends `payload` to `client` from `from`. Returns whether it was sent.
    pub async fn send(
        &self,
        from: SocketAddr,
        client: SocketAddr,
        payload: &[u8],
        stats: &UdpStats,
    ) -> bool {
        if from.is_ipv4() != client.is_ipv4() {
            debug!(%from, %client, "UDP reply across address families cannot be delivered; dropped");
            return false;
        }
        let Some(socket) = self.socket_for(from, stats) else {
            return false;
        };
        // Every session's task is sized for the largest state it can wait
        // in; waiting for room in a full socket buffer is rare, so that
        // state is boxed and the common case waits in nothing at all.
        let sent = match socket.try_send_to(payload, client) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Box::pin(async {
                    loop {
                        socket.writable().await?;
                        match socket.try_send_to(payload, client) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            other => return other,
                        }
                    }
                })
                .await
            }
            other => other,
        };
        match sent {
            Ok(_) => true,
            Err(e) => {
                debug!(%from, %client, "UDP reply send failed: {e}");
                false
            }
        }
    }

    /// Sends a run of replies from `from` to `client`: `payloads` holds
    /// them back to back, `segment` bytes each (the last may be shorter).
    /// One call with UDP segmentation offload where the kernel takes it,
    /// else one by one. Returns how many were delivered.
    pub async fn send_run(
        &self,
        from: SocketAddr,
        client: SocketAddr,
        payloads: &[u8],
        segment: usize,
        stats: &UdpStats,
    ) -> usize {
        let segment = segment.max(1);
        let count = payloads.len().div_ceil(segment);
        let segmentable = count > 1
            && from.is_ipv4() == client.is_ipv4()
            && !SEGMENTS_REFUSED.load(Ordering::Relaxed);
        if let (true, Ok(segment_size)) = (segmentable, u16::try_from(segment)) {
            if let Some(socket) = self.socket_for(from, stats) {
                let sent = socket.try_io(Interest::WRITABLE, || {
                    sys::send_segments(&*socket, payloads, segment_size, Some(client))
                });
                match sent {
                    Ok(_) => {
                        stats
                            .replies_segmented
                            .fetch_add(count as u64, Ordering::Relaxed);
                        return count;
                    }
                    Err(e) if sys::segments_unsupported(&e) => refuse_segments(&e),
                    // A full buffer (the sends below wait for room) or a
                    // run this route cannot segment.
                    Err(_) => {}
                }
            }
        }
        let mut delivered = 0;
        for payload in payloads.chunks(segment) {
            if self.send(from, client, payload, stats).await {
                delivered += 1;
            }
        }
        delivered
    }

    /// Closes sockets unused for `idle`; run periodically.
    pub fn expire(&self, idle: Duration) -> usize {
        let mut map = lock(&self.map);
        let before = map.len();
        map.retain(|_, e| match e {
            ReplyEntry::Ready { last_used, .. } => last_used.elapsed() < idle,
            ReplyEntry::Failed { since } => since.elapsed() < BIND_RETRY,
        });
        before - map.len()
    }
}

fn evict_oldest(map: &mut HashMap<SocketAddr, ReplyEntry>) {
    let oldest = map
        .iter()
        .min_by_key(|(_, e)| match e {
            // Failed entries go first: they hold no socket worth keeping.
            ReplyEntry::Failed { .. } => None,
            ReplyEntry::Ready { last_used, .. } => Some(*last_used),
        })
        .map(|(k, _)| *k);
    if let Some(k) = oldest {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_prefers_failed_then_least_recently_used() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut map = HashMap::new();
            let t0 = Instant::now();
            let sock = || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                Arc::new(UdpSocket::from_std(s).unwrap())
            };
            let a: SocketAddr = "198.51.100.1:1".parse().unwrap();
            let b: SocketAddr = "198.51.100.2:1".parse().unwrap();
            let c: SocketAddr = "198.51.100.3:1".parse().unwrap();
            map.insert(
                a,
                ReplyEntry::Ready {
                    socket: sock(),
                    last_used: t0 + Duration::from_millis(5),
                },
            );
            map.insert(
                b,
                ReplyEntry::Ready {
                    socket: sock(),
                    last_used: t0,
                },
            );
            map.insert(
                c,
                ReplyEntry::Failed {
                    since: t0 + Duration::from_millis(9),
                },
            );
            evict_oldest(&mut map);
            assert!(!map.contains_key(&c));
            evict_oldest(&mut map);
            assert!(!map.contains_key(&b));
            assert!(map.contains_key(&a));
        });
    }

    fn relay_with(limit: usize) -> Arc<UdpRelay> {
        relay_idling_after(limit, Duration::from_secs(60))
    }

    fn relay_idling_after(limit: usize, udp_idle: Duration) -> Arc<UdpRelay> {
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            tcp_idle: Duration::from_secs(1),
            udp_idle,
            udp_dns_idle: Duration::from_secs(10),
        };
        let limits = Limits {
            udp_sessions: limit,
            udp_reply_sockets: 4,
            threads: 1,
        };
        let outbound = Outbound::Direct {
            mark: 0,
            connect_timeout: Duration::from_secs(1),
        };
        let router = Router::new("127.0.0.1:1090".parse().unwrap(), outbound);
        UdpRelay::new(router, timeouts, limits, 0)
    }

    /// Where direct sessions send in tests: a loopback socket that waits
    /// up to 5 s for each datagram, and its address.
    fn loopback_sink() -> (std::net::UdpSocket, SocketAddr) {
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let addr = sink.local_addr().unwrap();
        (sink, addr)
    }

    /// A payload behind the headroom the inbound leaves in front of it.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; UDP_HEADROOM];
        buf.extend_from_slice(payload);
        buf
    }

    #[tokio::test]
    async fn session_table_stays_bounded_under_a_flood_of_client_ports() {
        let relay = relay_with(3);
        // A loopback sink so the direct sessions send somewhere harmless.
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = sink.local_addr().unwrap();
        for port in 40000..40010u16 {
            let client: SocketAddr = ([127, 0, 0, 1], port).into();
            relay.dispatch(client, dst, &mut framed(b"x"));
        }
        assert_eq!(relay.session_count(), 3);
        assert_eq!(relay.stats.sessions_refused_full.load(Ordering::Relaxed), 7);
        // A known client keeps its session: no new slot needed.
        relay.dispatch(([127, 0, 0, 1], 40000).into(), dst, &mut framed(b"y"));
        assert_eq!(relay.stats.sessions_refused_full.load(Ordering::Relaxed), 7);
    }

    /// The first datagrams wait in the queue while the session opens; the
    /// later ones go out from the inbound directly. None may overtake another.
    #[tokio::test]
    async fn datagrams_keep_their_order_from_the_queue_to_the_fast_path() {
        let relay = relay_with(3);
        let (sink, dst) = loopback_sink();
        let client: SocketAddr = "127.0.0.1:40100".parse().unwrap();
        for i in 0..200u32 {
            relay.dispatch(client, dst, &mut framed(&i.to_be_bytes()));
            if i % 20 == 0 {
                // Let the session's task run, so both paths are taken.
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut buf = [0u8; 16];
        for i in 0..200u32 {
            let n = sink.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &i.to_be_bytes(), "datagram {i} out of order");
        }
        let queued = relay.stats.datagrams_queued.load(Ordering::Relaxed);
        assert!(
            queued > 0 && queued < 200,
            "both paths taken: {queued} queued"
        );
        let sessions = lock(&relay.sessions);
        let shared = &sessions[&client].shared;
        assert!(shared.upstream.get().is_some(), "session open");
        assert_eq!(shared.up_datagrams.load(Ordering::Relaxed), 200);
        assert_eq!(shared.queued.load(Ordering::Relaxed), 0);
    }

    /// Runs of datagrams go one by one while the session opens, then in
    /// one call each; either way the receiver gets every datagram, whole
    /// and in order.
    #[tokio::test]
    async fn runs_arrive_as_their_datagrams_in_order() {
        let relay = relay_with(3);
        let (sink, dst) = loopback_sink();
        let client: SocketAddr = "127.0.0.1:40200".parse().unwrap();
        let mut scratch = Vec::new();
        for first in (0..200u32).step_by(4) {
            let mut run = vec![0u8; UDP_HEADROOM];
            for i in first..first + 4 {
                run.extend_from_slice(&i.to_be_bytes());
            }
            relay.dispatch_run(client, dst, &mut run, 4, &mut scratch);
            if first % 40 == 0 {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut buf = [0u8; 64];
        for i in 0..200u32 {
            let n = sink.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &i.to_be_bytes(), "datagram {i}");
        }
        let segmented = relay.stats.datagrams_segmented.load(Ordering::Relaxed);
        assert!(
            segmented > 0 && segmented % 4 == 0 && segmented < 200,
            "both paths taken: {segmented} in runs"
        );
        let sessions = lock(&relay.sessions);
        let shared = &sessions[&client].shared;
        assert_eq!(shared.up_datagrams.load(Ordering::Relaxed), 200);
        assert_eq!(shared.up_bytes.load(Ordering::Relaxed), 800);
    }

    /// A run the kernel will not segment (here: more segments than it
    /// allows in one call; on a real link, a segment over the MTU) is sent
    /// one datagram at a time instead, nothing lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_run_the_kernel_refuses_goes_one_by_one() {
        let relay = relay_with(3);
        let (sink, dst) = loopback_sink();
        let client: SocketAddr = "127.0.0.1:40400".parse().unwrap();
        let mut buf = [0u8; 16];
        relay.dispatch(client, dst, &mut framed(b"open"));
        let n = sink.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"open");
        let deadline = Instant::now() + Duration::from_secs(5);
        while relay.ready_upstream(client).is_none() {
            assert!(Instant::now() < deadline, "the session never opened");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // More than UDP_MAX_SEGMENTS (64, or 128 since Linux 6.9), and
        // room in the sink for all of them.
        socket2::SockRef::from(&sink)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        let mut run = vec![0u8; UDP_HEADROOM];
        for i in 0..200u32 {
            run.extend_from_slice(&i.to_be_bytes());
        }
        relay.dispatch_run(client, dst, &mut run, 4, &mut Vec::new());
        for i in 0..200u32 {
            let n = sink.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &i.to_be_bytes(), "datagram {i}");
        }
        assert_eq!(relay.stats.datagrams_segmented.load(Ordering::Relaxed), 0);
        assert!(
            !SEGMENTS_REFUSED.load(Ordering::Relaxed),
            "one refusal is not for good"
        );
    }

    #[test]
    fn a_session_queue_is_bounded_and_refuses_once_closed() {
        let shared = SessionShared::new();
        let packet = || {
            Box::new(Packet {
                buf: framed(b"q"),
                dst: "127.0.0.1:9".parse().unwrap(),
            })
        };
        for _ in 0..SESSION_QUEUE {
            assert!(shared.enqueue(packet()).is_ok());
        }
        assert!(matches!(shared.enqueue(packet()), Err(Refused::Full)));
        assert_eq!(shared.queued.load(Ordering::Relaxed), SESSION_QUEUE);
        assert!(shared.dequeue().is_some());
        shared.queued.fetch_sub(1, Ordering::Relaxed);
        // What is left when the task ends is counted, not sent, and the
        // fast path is free again.
        assert_eq!(shared.close_queue(), SESSION_QUEUE - 1);
        assert_eq!(shared.queued.load(Ordering::Relaxed), 0);
        assert!(matches!(
            shared.enqueue(packet()),
            Err(Refused::Closed(p)) if p.buf == framed(b"q")
        ));
        assert_eq!(shared.close_queue(), 0);
    }

    // A worker thread runs the sessions while the test blocks in recv.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_datagram_after_the_session_ended_opens_a_fresh_one() {
        let relay = relay_idling_after(3, Duration::from_millis(50));
        let (sink, dst) = loopback_sink();
        let client: SocketAddr = "127.0.0.1:40300".parse().unwrap();
        let mut buf = [0u8; 16];
        relay.dispatch(client, dst, &mut framed(b"first"));
        let n = sink.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"first");
        let deadline = Instant::now() + Duration::from_secs(5);
        while relay.session_count() > 0 {
            assert!(Instant::now() < deadline, "the session never idled out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        relay.dispatch(client, dst, &mut framed(b"again"));
        let n = sink.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"again");
        assert_eq!(relay.session_count(), 1);
        assert_eq!(
            relay.stats.datagrams_dropped_queue.load(Ordering::Relaxed),
            0
        );
    }

    #[tokio::test]
    async fn flows_to_the_listener_never_get_a_session() {
        let relay = relay_with(3);
        relay.dispatch(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:1090".parse().unwrap(),
            &mut framed(b"loop"),
        );
        assert_eq!(relay.session_count(), 0);
    }

    #[tokio::test]
    async fn dns_sessions_idle_out_sooner() {
        let relay = relay_with(1);
        let shared = SessionShared::new();
        shared.sent_up(1, "198.51.100.1:53".parse().unwrap());
        assert_eq!(relay.idle_for(&shared), Duration::from_secs(10));
        shared.sent_up(1, "198.51.100.1:443".parse().unwrap());
        assert_eq!(relay.idle_for(&shared), Duration::from_secs(60));
    }

    /// Replies leave from the remote's own address; an address a local
    /// service holds (EADDRINUSE) costs that reply, with a count and a
    /// warning, never the process. Needs CAP_NET_ADMIN for IP_TRANSPARENT.
    #[tokio::test]
    async fn reply_sockets_send_from_the_remote_and_survive_eaddrinuse() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "needs root under CI");
            return;
        }
        let stats = UdpStats::default();
        let replies = ReplySockets::new(4, 0);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let client_addr = client.local_addr().unwrap();

        // 127.0.0.2 is loopback too: stands in for a remote host.
        let remote: SocketAddr = "127.0.0.2:45053".parse().unwrap();
        assert!(
            replies
                .send(remote, client_addr, b"from remote", &stats)
                .await
        );
        let mut buf = [0u8; 64];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"from remote"[..], remote));
        assert_eq!(replies.len(), 1);

        // A local service owns this address without SO_REUSEADDR.
        let service = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken = service.local_addr().unwrap();
        assert!(!replies.send(taken, client_addr, b"x", &stats).await);
        assert!(!replies.send(taken, client_addr, b"x", &stats).await);
        assert_eq!(stats.replies_dropped_bind.load(Ordering::Relaxed), 2);
        assert_eq!(replies.len(), 1, "the failed address holds no socket");
        assert_eq!(replies.expire(Duration::ZERO), 1, "idle sockets expire");
    }

    /// A run of replies reaches the client as its datagrams, in order and
    /// from the remote's address, whether the kernel segments it (4 of 3
    /// bytes) or refuses and it goes one by one (200 of 1 byte: more
    /// segments than one call may carry). Needs CAP_NET_ADMIN.
    #[tokio::test]
    async fn reply_runs_arrive_as_their_datagrams_from_the_remote() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "needs root under CI");
            return;
        }
        let stats = UdpStats::default();
        let replies = ReplySockets::new(4, 0);
        let (client, client_addr) = loopback_sink();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        let remote: SocketAddr = "127.0.0.2:45054".parse().unwrap();
        let mut buf = [0u8; 64];

        // A fresh reply socket is not yet known to be writable, so its
        // first run goes one by one; the next is segmented.
        for segmented in [0, 4] {
            let sent = replies
                .send_run(remote, client_addr, b"aaabbbcccddd", 3, &stats)
                .await;
            assert_eq!(sent, 4);
            for want in [b"aaa", b"bbb", b"ccc", b"ddd"] {
                let (n, from) = client.recv_from(&mut buf).unwrap();
                assert_eq!((&buf[..n], from), (&want[..], remote));
            }
            assert_eq!(stats.replies_segmented.load(Ordering::Relaxed), segmented);
        }

        let many: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        let sent = replies
            .send_run(remote, client_addr, &many, 1, &stats)
            .await;
        assert_eq!(sent, 200);
        for i in 0..200u32 {
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&[i as u8][..], remote), "reply {i}");
        }
        assert_eq!(stats.replies_segmented.load(Ordering::Relaxed), 4);
    }
}
