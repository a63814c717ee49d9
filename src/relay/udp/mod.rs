//! UDP sessions, full cone.
//!
//! A session is keyed by the client's source address:port alone, not by
//! (source, destination): one upstream socket or SOCKS5 association per
//! outbound then serves every destination of that client, and a datagram
//! from *any* remote that reaches one of them is passed back to the
//! client. That is endpoint-independent mapping, the "open NAT" games and
//! consoles ask for.
//!
//! The rules decide per datagram, by its destination: a client that talks
//! to a domestic and a foreign address uses direct and the proxy at once,
//! one upstream each (a session's "legs"), and stays full cone through both.
//!
//! Replies must reach the client from the remote's own address:port, so
//! they leave through a transparent socket bound to that remote
//! ([`ReplySockets`]); the sockets are cached, bounded and expire when
//! idle.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::config::Network;
use crate::config::{Limits, Timeouts};
use crate::outbound::{Outbound, OutboundError, UdpRecv, UdpUpstream, UDP_HEADROOM};
use crate::policy::sniff::Sniffed;
#[cfg(test)]
use crate::policy::Policy;
use crate::policy::{Choice, FlowMeta};
use crate::ratelimit::{held_back, RateLimit};
use crate::registry::{EndReason, Flow, FlowGuard, FlowStart, Registry};
use crate::relay::spares::Spares;
use crate::route::{Decision, Router};
use crate::sys;

mod backoff;
mod dns;
mod hold;
mod replies;
mod runs;

use backoff::{Backoff, Permit, Refusal};
pub use hold::HoldStats;
pub use replies::ReplySockets;
use runs::{refuse_segments, SEGMENTS_REFUSED};
pub use runs::{runnable, Run};

/// Largest UDP payload (65535 − 8 UDP − 20 IPv4 header).
pub const MAX_DATAGRAM: usize = 65_507;

/// Datagrams queued for one session while its upstream is slow or still
/// being set up (a SOCKS5 handshake); beyond that they are dropped and
/// counted, as a congested link would.
const SESSION_QUEUE: usize = 256;

/// A session's receive buffer: the largest datagram, one byte more so a
/// truncation would show, and room for a SOCKS5 header.
const RECV_BUF: usize = MAX_DATAGRAM + UDP_HEADROOM + 1;

/// Receive buffers between uses; see [`Spares`].
static SPARE_BUFFERS: Spares<Box<[u8]>> = Spares::new(16);

/// A receive buffer from the pool, or a new one.
fn take_buffer() -> Box<[u8]> {
    SPARE_BUFFERS
        .take()
        .unwrap_or_else(|| vec![0u8; RECV_BUF].into_boxed_slice())
}

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

/// One upstream of a session: the outbound it goes through, its socket or
/// SOCKS5 association once open, and the datagrams waiting for it.
///
/// Once the upstream is open, the inbound sends the leg's datagrams
/// itself (non-blocking) instead of queueing them for the leg's task: no
/// allocation, no channel and no cross-thread wake-up per datagram. The
/// queue remains for the start (a SOCKS5 handshake in progress) and for
/// a full socket buffer.
struct Leg {
    /// The outbound's key ([`crate::policy::Choice::key`]): stable across
    /// reloads, so a session keeps its upstream while its outbound stays.
    outbound: u32,
    upstream: OnceLock<Arc<UdpUpstream>>,
    /// Datagrams handed to the queue and not yet sent by the task; while
    /// any are, the inbound queues too, so datagrams keep their order.
    queued: AtomicUsize,
    queue: Mutex<Queue>,
    /// Wakes the leg's task when a datagram is queued, or when the queue
    /// closes (the session ended: an extra leg's task then stops).
    queue_ready: Notify,
}

impl Leg {
    fn new(outbound: u32) -> Self {
        Leg {
            outbound,
            upstream: OnceLock::new(),
            queued: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            queue_ready: Notify::new(),
        }
    }

    /// Queues a datagram for the leg's task.
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

    /// Ends the queue: later datagrams for this outbound start a fresh leg
    /// (or session). Returns how many were still waiting (they will not
    /// be sent). Wakes the task, which stops if it is an extra leg's.
    fn close_queue(&self) -> usize {
        let mut queue = lock(&self.queue);
        queue.closed = true;
        let left = queue.packets.len();
        queue.packets = VecDeque::new();
        self.queued.fetch_sub(left, Ordering::AcqRel);
        drop(queue);
        // Stores a permit when the task is not waiting right now, so a
        // task that has not started yet sees the close too.
        self.queue_ready.notify_one();
        left
    }

    fn is_closed(&self) -> bool {
        lock(&self.queue).closed
    }

    /// The open upstream, when the inbound may send on it directly: open,
    /// and nothing queued that must go first.
    fn ready(&self) -> Option<Arc<UdpUpstream>> {
        let upstream = self.upstream.get()?;
        (self.queued.load(Ordering::Acquire) == 0).then(|| Arc::clone(upstream))
    }
}

/// What the inbound and a session's tasks all touch.
///
/// A session has one upstream per outbound its datagrams' destinations
/// route to: the rules decide per datagram, and a client that talks to a
/// domestic and a foreign address uses direct and the proxy at once.
/// Most sessions use one outbound, so the first leg lives inline and the
/// vector of the others allocates only when a second outbound is used.
/// The session's own task serves the first leg and keeps the session's
/// timeouts; each extra leg has a task of its own, which the session's
/// task stops when the session ends.
struct SessionShared {
    first: Leg,
    /// The other legs, at most one per outbound; `None` once the session
    /// ended (a leg added later would never be stopped).
    extra: Mutex<Option<Vec<Arc<Leg>>>>,
    start: Instant,
    /// Milliseconds since `start` of the last datagram either way.
    last_activity_ms: AtomicU64,
    /// The last destination was port 53 (shorter idle timeout).
    last_was_dns: AtomicBool,
    /// A datagram came back from upstream at least once. Sessions that
    /// never got one are what a flood of new ports (or a scan) leaves
    /// behind: they idle out sooner and are the ones evicted.
    replied: AtomicBool,
    /// Wakes the session's task to end it: it was evicted from the table.
    evicted: Notify,
    /// The session in the registry: its byte counters, and a close asked
    /// for from the API.
    flow: Arc<Flow>,
    up_datagrams: AtomicU64,
    /// The route of a QUIC flow sniffed by name (see `hold.rs`).
    pin: OnceLock<hold::Pin>,
}

impl SessionShared {
    fn new(outbound: u32, flow: Arc<Flow>) -> Self {
        SessionShared {
            first: Leg::new(outbound),
            extra: Mutex::new(Some(Vec::new())),
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            last_was_dns: AtomicBool::new(false),
            replied: AtomicBool::new(false),
            evicted: Notify::new(),
            flow,
            up_datagrams: AtomicU64::new(0),
            pin: OnceLock::new(),
        }
    }

    fn touch(&self) {
        self.last_activity_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The extra leg for `outbound`, if the session has one.
    fn extra_leg(&self, outbound: u32) -> Option<Arc<Leg>> {
        lock(&self.extra)
            .as_ref()?
            .iter()
            .find(|leg| leg.outbound == outbound)
            .cloned()
    }

    /// The open upstream for `outbound`, when the inbound may send on it
    /// directly. The first leg costs no lock; another takes the extra
    /// legs' (uncontended) lock.
    fn ready(&self, outbound: u32) -> Option<Arc<UdpUpstream>> {
        if self.first.outbound == outbound {
            return self.first.ready();
        }
        let extra = lock(&self.extra);
        extra
            .as_ref()?
            .iter()
            .find(|leg| leg.outbound == outbound)?
            .ready()
    }

    /// Adds an extra leg; false when the session has ended meanwhile.
    fn add_leg(&self, leg: Arc<Leg>) -> bool {
        match lock(&self.extra).as_mut() {
            Some(legs) => {
                legs.push(leg);
                true
            }
            None => false,
        }
    }

    /// Forgets an extra leg that ended (if still listed).
    fn remove_leg(&self, leg: &Arc<Leg>) {
        if let Some(legs) = lock(&self.extra).as_mut() {
            legs.retain(|l| !Arc::ptr_eq(l, leg));
        }
    }

    /// Ends the session's extra legs and refuses new ones; returns the
    /// datagrams that were still queued for them.
    fn close_extra_legs(&self) -> usize {
        let legs = lock(&self.extra).take().unwrap_or_default();
        legs.iter().map(|leg| leg.close_queue()).sum()
    }

    fn sent_up(&self, len: usize, dst: SocketAddr) {
        self.sent_up_many(len, 1, dst)
    }

    fn sent_up_many(&self, bytes: usize, datagrams: usize, dst: SocketAddr) {
        self.flow.traffic.add_up(bytes as u64);
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

/// The session table: sessions by client address:port, and per client
/// address how many it has and which never got a reply.
///
/// Both maps change only when a session opens, ends or gets its first
/// reply, never per datagram.
#[derive(Default)]
struct Table {
    sessions: HashMap<SocketAddr, SessionEntry>,
    clients: HashMap<IpAddr, ClientSessions>,
}

#[derive(Default)]
struct ClientSessions {
    count: usize,
    /// Sessions that never got a reply, by id: ids grow, so the first is
    /// the oldest.
    unreplied: BTreeMap<u64, SocketAddr>,
}

impl Table {
    fn insert(&mut self, client: SocketAddr, entry: SessionEntry) {
        let c = self.clients.entry(client.ip()).or_default();
        c.count += 1;
        c.unreplied.insert(entry.id, client);
        if let Some(old) = self.sessions.insert(client, entry) {
            // Callers remove a client's session before opening another;
            // keep the counts right should that ever change.
            self.forget(client, old.id);
        }
    }

    /// Takes `client`'s session out of the table.
    fn remove(&mut self, client: SocketAddr) -> Option<SessionEntry> {
        let entry = self.sessions.remove(&client)?;
        self.forget(client, entry.id);
        Some(entry)
    }

    /// Takes `client`'s session out if it is still the one numbered `id`
    /// (a session that ended may have been replaced already).
    fn remove_if(&mut self, client: SocketAddr, id: u64) -> Option<SessionEntry> {
        if self.sessions.get(&client)?.id == id {
            self.remove(client)
        } else {
            None
        }
    }

    fn forget(&mut self, client: SocketAddr, id: u64) {
        let ip = client.ip();
        if let Some(c) = self.clients.get_mut(&ip) {
            c.count = c.count.saturating_sub(1);
            c.unreplied.remove(&id);
            if c.count == 0 {
                self.clients.remove(&ip);
            }
        }
    }

    fn replied(&mut self, client: SocketAddr, id: u64) {
        if let Some(c) = self.clients.get_mut(&client.ip()) {
            c.unreplied.remove(&id);
        }
    }

    fn count_of(&self, ip: IpAddr) -> usize {
        self.clients.get(&ip).map_or(0, |c| c.count)
    }

    /// The oldest session of `ip` that never got a reply.
    fn oldest_unreplied_of(&self, ip: IpAddr) -> Option<SocketAddr> {
        let c = self.clients.get(&ip)?;
        c.unreplied.values().next().copied()
    }

    /// The session to give up when the table is full: the oldest that
    /// never got a reply, of the client address with the most sessions
    /// (a flood's source, not the host that asked once).
    fn oldest_unreplied(&self) -> Option<SocketAddr> {
        self.clients
            .values()
            .filter_map(|c| {
                let (id, addr) = c.unreplied.iter().next()?;
                Some((c.count, std::cmp::Reverse(*id), *addr))
            })
            .max()
            .map(|(_, _, addr)| addr)
    }
}

/// Counters worth logging and, later, exporting.
#[derive(Debug, Default)]
pub struct UdpStats {
    pub sessions_refused_full: AtomicU64,
    /// New sessions refused because their client address had its limit of
    /// sessions, all of them answered.
    pub sessions_refused_client: AtomicU64,
    /// Sessions that never got a reply, ended to make room for new ones.
    pub sessions_evicted: AtomicU64,
    /// Sessions, or upstreams a session added for another outbound, that
    /// failed to open.
    pub sessions_open_failed: AtomicU64,
    /// Datagrams of new sessions dropped at once because the outbound
    /// failed to open a session a moment ago (see [`backoff`]).
    pub datagrams_dropped_backoff: AtomicU64,
    pub datagrams_dropped_queue: AtomicU64,
    /// Datagrams that went through a session's queue rather than straight
    /// out from the inbound (session opening, or a full socket buffer).
    pub datagrams_queued: AtomicU64,
    /// Datagrams that went upstream in runs, several per send call.
    pub datagrams_segmented: AtomicU64,
    /// Replies that went to clients in runs.
    pub replies_segmented: AtomicU64,
    pub replies_dropped_bind: AtomicU64,
    /// Datagrams dropped because their outbound refuses UDP by design:
    /// `block`, or an `http` outbound (TCP only).
    pub datagrams_refused: AtomicU64,
}

/// One rate limit per warning that can repeat per datagram or per
/// session, so a flood writes a line every few seconds, not per packet.
#[derive(Debug, Default)]
struct Warnings {
    table_full: RateLimit,
    client_limit: RateLimit,
    evicting: RateLimit,
    refused_loop: RateLimit,
    open_failed: RateLimit,
    tcp_only: RateLimit,
    backoff: RateLimit,
    oversize: RateLimit,
}

/// The shortest wait between two looks at a session's idle time, so a
/// tiny timeout cannot make its task spin.
const MIN_IDLE_CHECK: Duration = Duration::from_millis(10);

/// A point `wait` from now, or a far one when `now + wait` does not fit
/// (a timeout of `Duration::MAX`): a deadline must never panic.
fn deadline_in(wait: Duration) -> tokio::time::Instant {
    // As tokio's own sleep does for an unrepresentable deadline.
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    let now = tokio::time::Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// The session table and the reply sockets of one UDP listener.
pub struct UdpRelay {
    router: Router,
    /// Swapped whole by a reload; read when a session looks at its idle
    /// time or a new session needs room, never per datagram.
    timeouts: ArcSwap<Timeouts>,
    limits: ArcSwap<Limits>,
    table: Mutex<Table>,
    next_id: AtomicU64,
    pub replies: ReplySockets,
    pub stats: UdpStats,
    /// Per outbound, by key: one outbound that cannot open sessions must
    /// not hold back the others. Looked up when a session or leg opens,
    /// never per datagram; outbounds a reload dropped are forgotten then.
    outbounds: Mutex<HashMap<u32, Arc<OutboundState>>>,
    registry: Arc<Registry>,
    warnings: Warnings,
    /// New QUIC flows waiting for their name (see `hold.rs`).
    holds: hold::Holds,
}

/// What the relay keeps per outbound.
struct OutboundState {
    backoff: Backoff,
    /// Slots for legs opening their upstream (see [`OPENING_AT_ONCE`]).
    opening: Semaphore,
}

/// Most sessions opening an upstream through one outbound at once (a
/// SOCKS5 handshake each). Others wait in turn, their datagrams queued; 64
/// handshakes at once still open hundreds of sessions a second over a
/// slow link.
const OPENING_AT_ONCE: usize = 64;

/// Why a session's upstream did not open.
enum OpenFailure {
    /// Another session's open failed while this one waited: back-off.
    BackingOff,
    /// The outbound refuses UDP by design (see [`UdpRelay::refuse`]).
    Refused(OutboundError),
    Failed {
        error: String,
        /// How long new sessions now fail at once.
        backing_off: Duration,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps inconsistent in
    // a way that matters more than stopping UDP for every client would.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl UdpRelay {
    pub fn new(
        router: Router,
        timeouts: Timeouts,
        limits: Limits,
        mark: u32,
        registry: Arc<Registry>,
    ) -> Arc<Self> {
        Arc::new(UdpRelay {
            timeouts: ArcSwap::from_pointee(timeouts),
            limits: ArcSwap::from_pointee(limits),
            table: Mutex::new(Table::default()),
            next_id: AtomicU64::new(1),
            replies: ReplySockets::new(limits.udp_reply_sockets, mark),
            stats: UdpStats::default(),
            outbounds: Mutex::default(),
            registry,
            warnings: Warnings::default(),
            holds: hold::Holds::new(router.policy().wants_sniffing()),
            router,
        })
    }

    /// The back-off and opening slots of the outbound with `key`.
    fn outbound_state(&self, key: u32) -> Arc<OutboundState> {
        Arc::clone(lock(&self.outbounds).entry(key).or_insert_with(|| {
            Arc::new(OutboundState {
                backoff: Backoff::new(),
                opening: Semaphore::new(OPENING_AT_ONCE),
            })
        }))
    }

    /// A reload's timeouts and limits, for sessions from now on (the
    /// session table's size and each session's idle time included).
    pub fn set_timeouts_and_limits(&self, timeouts: Timeouts, limits: Limits) {
        self.timeouts.store(Arc::new(timeouts));
        self.limits.store(Arc::new(limits));
    }

    /// The shortest of the UDP idle timeouts: the longest a session's task
    /// sleeps before it looks again which timeout applies.
    fn idle_check(&self) -> Duration {
        let t = self.timeouts.load();
        t.udp_idle
            .min(t.udp_dns_idle)
            .min(t.udp_unreplied)
            .max(MIN_IDLE_CHECK)
    }

    /// After a reload: forgets the state of outbounds the policy no longer
    /// has (sessions still on them keep their own upstreams), and holds
    /// new QUIC flows for their name only if the new rules look at names.
    pub fn policy_changed(&self, policy: &crate::policy::Policy) {
        self.holds.set_enabled(policy.wants_sniffing());
        let keys: std::collections::HashSet<u32> =
            policy.outbounds().iter().map(|n| n.key).collect();
        lock(&self.outbounds).retain(|k, _| keys.contains(k));
    }

    pub fn session_count(&self) -> usize {
        lock(&self.table).sessions.len()
    }

    /// Logs a failed send upstream at the level it deserves.
    fn report_send_error(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
        len: usize,
        outbound: &str,
        upstream: &UdpUpstream,
        e: &io::Error,
    ) {
        if e.raw_os_error() == Some(libc::EMSGSIZE) {
            // Too large for the outbound (a proxy adds a header to a
            // datagram that may already be at the IP maximum): the sender
            // should know.
            if let Some(n) = self.warnings.oversize.check() {
                warn!(
                    %client, %dst,
                    "UDP datagram of {len} bytes does not fit the {outbound} outbound ({e}); dropped. Through it the largest to {dst} is {} bytes{}",
                    upstream.max_payload(dst),
                    held_back(n)
                );
            }
        } else {
            debug!(%client, %dst, "UDP send upstream failed: {e}");
        }
    }

    /// Hands one datagram from `client` to `dst` to its session, creating
    /// the session when this client has none. `buf[UDP_HEADROOM..]` is the
    /// payload; the headroom in front of it is scratch space for a SOCKS5
    /// header.
    ///
    /// The rules decide per datagram, by its destination: the session
    /// sends it through the upstream of the outbound they pick, opening
    /// that upstream when the session has none for it yet.
    pub fn dispatch(self: &Arc<Self>, client: SocketAddr, asked: SocketAddr, buf: &mut [u8]) {
        // A new flow starting with a QUIC Initial may wait for its name.
        if self.holds.enabled() && hold::intercept(self, client, asked, buf) {
            return;
        }
        // DNS may be answered here or sent to `[dns] server` (dns.rs).
        let Some(dst) = self.dns_query(client, asked, buf) else {
            return;
        };
        let session = self.session_of(client);
        let choice = match self.route_of(session.as_deref(), client, dst) {
            Decision::Forward(choice) => choice,
            Decision::RefuseLoop => {
                if let Some(n) = self.warnings.refused_loop.check() {
                    warn!(%client, %dst, "refused UDP datagram addressed to tproxyd's own listener (routing loop); check that the rules skip tproxyd's mark{}", held_back(n));
                }
                return;
            }
        };
        // DNS through an outbound that carries it over TCP (dns.rs); a
        // refusing outbound (block) is left to `forward`.
        if choice.outbound.udp_refusal().is_none()
            && self.dns_over_tcp(client, asked, dst, &choice, buf)
        {
            return;
        }
        self.forward(client, dst, buf, choice, session, None)
    }

    /// `client`'s session, if it has one.
    fn session_of(&self, client: SocketAddr) -> Option<Arc<SessionShared>> {
        lock(&self.table)
            .sessions
            .get(&client)
            .map(|entry| Arc::clone(&entry.shared))
    }

    /// The route of a datagram: where its session pinned a sniffed flow to
    /// `dst`, else the rules by address.
    fn route_of(
        &self,
        session: Option<&SessionShared>,
        client: SocketAddr,
        dst: SocketAddr,
    ) -> Decision {
        match session.and_then(|s| s.pin.get()).filter(|p| p.dst == dst) {
            Some(pin) => Decision::Forward(pin.choice.clone()),
            None => self
                .router
                .decide(&FlowMeta::addresses(Network::Udp, client, dst)),
        }
    }

    /// Sends a datagram the way `choice` says, through `session` (the
    /// client's, looked up by the caller) or a new one.
    fn forward(
        self: &Arc<Self>,
        client: SocketAddr,
        dst: SocketAddr,
        buf: &mut [u8],
        choice: Choice,
        session: Option<Arc<SessionShared>>,
        sniffed: Option<&Sniffed>,
    ) {
        // Before the session is used: a block rule must hold even for a
        // client whose session another rule opened. No session, no
        // back-off: the configuration refused it, no upstream failed.
        if let Some(refusal) = choice.outbound.udp_refusal() {
            return self.refuse(client, dst, choice.outbound.name(), &refusal);
        }
        let len = buf.len() - UDP_HEADROOM;
        let ready = session.and_then(|shared| Some((shared.ready(choice.key)?, shared)));
        if let Some((upstream, shared)) = ready {
            match upstream.try_send(buf, dst) {
                Ok(()) => return shared.sent_up(len, dst),
                // The socket buffer is full: the task waits for room.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    return self.report_send_error(
                        client,
                        dst,
                        len,
                        choice.outbound.name(),
                        &upstream,
                        &e,
                    )
                }
            }
        }
        let packet = || {
            Box::new(Packet {
                buf: buf.to_vec(),
                dst,
            })
        };

        let mut table = lock(&self.table);
        let mut reused = None;
        if let Some(entry) = table.sessions.get(&client) {
            let (id, shared) = (entry.id, Arc::clone(&entry.shared));
            let extra = if shared.first.outbound == choice.key {
                None
            } else {
                shared.extra_leg(choice.key)
            };
            let fresh_leg = if shared.first.outbound == choice.key || extra.is_some() {
                let leg = extra.as_deref().unwrap_or(&shared.first);
                match leg.enqueue(packet()) {
                    Ok(()) => {
                        self.stats.datagrams_queued.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(Refused::Full) => {
                        self.stats
                            .datagrams_dropped_queue
                            .fetch_add(1, Ordering::Relaxed);
                        debug!(%client, %dst, "UDP session queue full; datagram dropped");
                        return;
                    }
                    // The session is ending; start a fresh one below.
                    Err(Refused::Closed(p)) if extra.is_none() => {
                        table.remove(client);
                        reused = Some(p);
                        None
                    }
                    // Only that leg ended (its upstream closed or failed
                    // to open): the session opens a fresh one.
                    Err(Refused::Closed(p)) => {
                        if let Some(leg) = &extra {
                            shared.remove_leg(leg);
                        }
                        Some(p)
                    }
                }
            } else {
                Some(packet())
            };
            if let Some(p) = fresh_leg {
                match self.add_leg(client, dst, &shared, &choice, p) {
                    Ok(None) => return,
                    Ok(Some((leg, permit))) => {
                        drop(table);
                        let task = Arc::clone(self).run_leg(
                            id,
                            client,
                            choice.outbound,
                            shared,
                            leg,
                            permit,
                        );
                        tokio::spawn(task);
                        return;
                    }
                    // The session ended meanwhile: a fresh one below.
                    Err(p) => {
                        table.remove(client);
                        reused = Some(p);
                    }
                }
            }
        }

        // A new session. The outbound failed a moment ago: fail fast.
        let state = self.outbound_state(choice.key);
        let backoff = &state.backoff;
        let permit = match backoff.admit(Instant::now()) {
            Ok(permit) => permit,
            Err(refusal) => {
                drop(table);
                self.refused_for_backoff(client, dst, &choice.outbound, &refusal);
                return;
            }
        };
        if !self.make_room(&mut table, client) {
            drop(table);
            backoff.release(permit);
            return;
        }
        // The labels from the policy of the moment: the choice is that
        // policy's, or a pin's from the session before, which this client
        // no longer has.
        let policy = self.router.current();
        let flow = self.registry.open(FlowStart {
            network: Network::Udp,
            client,
            dst,
            host: sniffed.and_then(|s| s.host.clone()),
            sniffed: sniffed.map(|s| s.protocol),
            rule: Arc::clone(policy.rule_label(choice.rule)),
            chain: policy.chain_names(&choice),
        });
        let shared = Arc::new(SessionShared::new(choice.key, Arc::clone(flow.flow())));
        // A fresh queue is open and empty: it takes the packet.
        let _ = shared.first.enqueue(reused.unwrap_or_else(packet));
        self.stats.datagrams_queued.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        table.insert(
            client,
            SessionEntry {
                id,
                shared: Arc::clone(&shared),
            },
        );
        drop(table);
        tokio::spawn(Arc::clone(self).run_session(
            id,
            client,
            choice.outbound,
            shared,
            permit,
            flow,
        ));
    }

    /// Adds a leg for `choice`'s outbound to an established session, with
    /// `packet` queued on it. `Ok(Some)`: the leg to start a task for;
    /// `Ok(None)`: the outbound is backing off and the datagram was
    /// dropped (the session goes on); `Err`: the session ended meanwhile,
    /// and the packet comes back for a fresh one.
    fn add_leg(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
        shared: &SessionShared,
        choice: &Choice,
        packet: Box<Packet>,
    ) -> Result<Option<(Arc<Leg>, Permit)>, Box<Packet>> {
        let state = self.outbound_state(choice.key);
        let backoff = &state.backoff;
        let permit = match backoff.admit(Instant::now()) {
            Ok(permit) => permit,
            Err(refusal) => {
                self.refused_for_backoff(client, dst, &choice.outbound, &refusal);
                return Ok(None);
            }
        };
        let leg = Arc::new(Leg::new(choice.key));
        if !shared.add_leg(Arc::clone(&leg)) {
            backoff.release(permit);
            return Err(packet);
        }
        // Listed first, so a session ending right now closes this queue:
        // then the packet is refused here and comes back.
        if let Err(refused) = leg.enqueue(packet) {
            backoff.release(permit);
            shared.remove_leg(&leg);
            return match refused {
                Refused::Closed(p) => Err(p),
                // A new queue is empty; should it not be, count the drop.
                Refused::Full => {
                    self.stats
                        .datagrams_dropped_queue
                        .fetch_add(1, Ordering::Relaxed);
                    Ok(None)
                }
            };
        }
        self.stats.datagrams_queued.fetch_add(1, Ordering::Relaxed);
        debug!(proto = "udp", %client, %dst, outbound = choice.outbound.name(), "session adds an upstream");
        Ok(Some((leg, permit)))
    }

    /// Counts and warns (rate-limited) about a datagram dropped because
    /// its outbound is backing off.
    fn refused_for_backoff(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
        outbound: &Outbound,
        refusal: &Refusal,
    ) {
        let dropped = self
            .stats
            .datagrams_dropped_backoff
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if let Some(n) = self.warnings.backoff.check() {
            warn!(
                %client, %dst, outbound = outbound.name(), dropped,
                "UDP datagram of a new session dropped: the {} outbound failed to open a session ({}); retrying in {} ms, meanwhile new sessions fail at once{}",
                outbound.name(), refusal.cause, refusal.retry_in.as_millis(), held_back(n)
            );
        }
    }

    /// Drops a datagram whose outbound refuses UDP: quietly for `block`
    /// (intended), with a rate-limited warning otherwise (a rule sends UDP
    /// where it cannot go, which the user will want to fix).
    fn refuse(&self, client: SocketAddr, dst: SocketAddr, outbound: &str, e: &OutboundError) {
        self.stats.datagrams_refused.fetch_add(1, Ordering::Relaxed);
        if matches!(e, OutboundError::Blocked) {
            debug!(%client, %dst, outbound, "UDP datagram dropped: blocked by rule");
        } else if let Some(n) = self.warnings.tcp_only.check() {
            warn!(%client, %dst, outbound, "UDP datagram dropped: {e}{}", held_back(n));
        }
    }

    /// Makes room in the table for a new session of `client`: within its
    /// address's limit and the table's, evicting the oldest session that
    /// never got a reply where one is needed. Returns false (and counts and
    /// warns) when no room can be made.
    fn make_room(&self, table: &mut Table, client: SocketAddr) -> bool {
        let ip = client.ip();
        let limits = **self.limits.load();
        let per_client = limits.udp_sessions_per_client;
        if table.count_of(ip) >= per_client {
            let Some(victim) = table.oldest_unreplied_of(ip) else {
                let refused = self
                    .stats
                    .sessions_refused_client
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if let Some(n) = self.warnings.client_limit.check() {
                    warn!(
                        %client, limit = per_client, refused,
                        "UDP client {ip} has {per_client} sessions, its limit, all of them answered; its new ports are refused until some expire (raise limits.udp_sessions_per_client if this is normal load){}",
                        held_back(n)
                    );
                }
                return false;
            };
            if let Some(n) = self.warnings.evicting.check() {
                warn!(
                    %client, limit = per_client,
                    "UDP client {ip} is at its limit of {per_client} sessions; its oldest unanswered ones are closed to make room (limits.udp_sessions_per_client){}",
                    held_back(n)
                );
            }
            self.evict(table, victim);
        }
        if table.sessions.len() >= limits.udp_sessions {
            let Some(victim) = table.oldest_unreplied() else {
                let refused = self
                    .stats
                    .sessions_refused_full
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if let Some(n) = self.warnings.table_full.check() {
                    warn!(
                        %client, limit = limits.udp_sessions, refused,
                        "UDP session table full of answered sessions; new clients are refused until sessions expire (raise limits.udp_sessions if this is normal load){}",
                        held_back(n)
                    );
                }
                return false;
            };
            if let Some(n) = self.warnings.evicting.check() {
                warn!(
                    %client, limit = limits.udp_sessions, evicted = %victim,
                    "UDP session table full; the oldest unanswered session of the busiest client is closed to make room (limits.udp_sessions){}",
                    held_back(n)
                );
            }
            self.evict(table, victim);
        }
        true
    }

    /// Ends `victim`'s session: out of the table now, so its slot is free,
    /// and its task told to stop (closing its upstream socket or SOCKS5
    /// association).
    fn evict(&self, table: &mut Table, victim: SocketAddr) {
        if let Some(entry) = table.remove(victim) {
            self.stats.sessions_evicted.fetch_add(1, Ordering::Relaxed);
            // Stores a permit if the task is not waiting right now.
            entry.shared.evicted.notify_one();
        }
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
        // DNS is looked at query by query (dns.rs); a run never skips it.
        let dns = dst.port() == crate::dns::PORT && self.router.dns().is_some();
        // The whole run goes to one destination, so one decision routes it.
        let session = self.session_of(client);
        let outbound = match self.route_of(session.as_deref(), client, dst) {
            Decision::Forward(choice) => Some(choice.key),
            Decision::RefuseLoop => None,
        };
        if count > 1 && !dns && !SEGMENTS_REFUSED.load(Ordering::Relaxed) {
            let ready = session
                .zip(outbound)
                .and_then(|(shared, key)| Some((shared.ready(key)?, shared)));
            if let Some((upstream, shared)) = ready {
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

    /// The open upstream of `client`'s session through outbound `index`,
    /// when the inbound may send on it directly: open, and nothing queued
    /// that must go first. No allocation: two reference counts and, for a
    /// session's second outbound, one uncontended lock more.
    #[cfg(test)]
    fn ready_upstream(
        &self,
        client: SocketAddr,
        key: u32,
    ) -> Option<(Arc<UdpUpstream>, Arc<SessionShared>)> {
        let shared = lock(&self.table)
            .sessions
            .get(&client)
            .map(|entry| Arc::clone(&entry.shared))?;
        let upstream = shared.ready(key)?;
        Some((upstream, shared))
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
        id: u64,
        client: SocketAddr,
        shared: &SessionShared,
    ) -> (u64, u64) {
        // The buffers live only while replies are waiting: an idle session
        // (most of a full table, most of the time) holds none.
        let mut buf = take_buffer();
        let mut run = Run::new(0);
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
                    // The first reply makes the session a live one: the
                    // table hears of it once, not per datagram.
                    if !shared.replied.load(Ordering::Relaxed)
                        && !shared.replied.swap(true, Ordering::Relaxed)
                    {
                        lock(&self.table).replied(client, id);
                    }
                    let payload = &buf[start..end];
                    let from = self.dns_reply(client, from, payload);
                    if run.extends(from, payload.len()) {
                        run.push(payload);
                        continue;
                    }
                    self.send_replies(&mut run, client, &mut delivered).await;
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
        self.send_replies(&mut run, client, &mut delivered).await;
        SPARE_BUFFERS.give_back(buf);
        delivered
    }

    /// Sends a run of replies to `client` and empties it, adding what was
    /// delivered (bytes, datagrams).
    async fn send_replies(
        &self,
        run: &mut Run<SocketAddr>,
        client: SocketAddr,
        delivered: &mut (u64, u64),
    ) {
        if let Some((from, segment, _, payloads)) = run.parts() {
            let sent = self
                .replies
                .send_run(from, client, payloads, segment, &self.stats)
                .await;
            delivered.0 += (sent * segment).min(payloads.len()) as u64;
            delivered.1 += sent as u64;
        }
        run.clear();
    }

    /// The idle timeout that applies to the session now: the DNS one
    /// while its last datagram went to port 53, and never more than
    /// `udp_unreplied` while nothing ever came back.
    fn idle_for(&self, shared: &SessionShared) -> Duration {
        let t = self.timeouts.load();
        let timeout = if shared.last_was_dns.load(Ordering::Relaxed) {
            t.udp_dns_idle
        } else {
            t.udp_idle
        };
        if shared.replied.load(Ordering::Relaxed) {
            timeout
        } else {
            timeout.min(t.udp_unreplied)
        }
    }

    /// How long the session may still sleep before it looks again; `None`
    /// when it has been idle for the timeout that applies now.
    ///
    /// The session ends at its last activity plus that timeout. Which one
    /// applies can change between two looks (the inbound sends datagrams
    /// itself, to port 53 or not), so a look is never further away than
    /// the shortest timeout: a change at some moment is also activity at
    /// that moment, so the next look comes before the new end.
    fn idle_wait(&self, shared: &SessionShared) -> Option<Duration> {
        let timeout = self.idle_for(shared);
        let idle = shared.idle_since();
        if idle >= timeout {
            return None;
        }
        Some((timeout - idle).min(self.idle_check()))
    }

    /// Opens an upstream through outbound `index`, at most
    /// [`OPENING_AT_ONCE`] at a time per outbound, and tells that
    /// outbound's back-off how it went.
    ///
    /// The failure is recorded before the slot is given back, so sessions
    /// waiting for a slot see it and fail at once instead of dialing: a
    /// burst of new ports while the server is down costs about one slot's
    /// worth of dials, however busy the machine.
    async fn open_upstream(
        &self,
        key: u32,
        outbound: &Outbound,
        permit: Permit,
    ) -> Result<UdpUpstream, OpenFailure> {
        let state = self.outbound_state(key);
        // The semaphore is never closed; should it be, open anyway.
        let _slot = state.opening.acquire().await.ok();
        if permit == Permit::Free && state.backoff.failing() {
            return Err(OpenFailure::BackingOff);
        }
        match outbound.open_udp().await {
            Ok(upstream) => {
                state.backoff.opened(permit);
                self.dns_udp_opened(key, outbound.name(), Ok(()));
                Ok(upstream)
            }
            // Not an upstream failure: no back-off. `dispatch` refuses
            // these before a session exists; this covers a group whose
            // member changed in between.
            Err(e) if e.is_refusal() => {
                state.backoff.release(permit);
                Err(OpenFailure::Refused(e))
            }
            Err(e) => {
                self.dns_udp_opened(key, outbound.name(), Err(&e));
                let error = e.to_string();
                let backing_off = state.backoff.failed(permit, Instant::now(), &error);
                Err(OpenFailure::Failed { error, backing_off })
            }
        }
    }

    /// Sends what waits in `leg`'s queue, oldest first.
    async fn send_queued(
        &self,
        client: SocketAddr,
        outbound: &Outbound,
        shared: &SessionShared,
        leg: &Leg,
        upstream: &UdpUpstream,
        first_dst: &mut Option<SocketAddr>,
    ) {
        while let Some(mut p) = leg.dequeue() {
            first_dst.get_or_insert(p.dst);
            let len = p.buf.len() - UDP_HEADROOM;
            match upstream.send(&mut p.buf, p.dst).await {
                Ok(()) => shared.sent_up(len, p.dst),
                Err(e) => self.report_send_error(client, p.dst, len, outbound.name(), upstream, &e),
            }
            leg.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Opens `leg`'s upstream and carries its datagrams both ways until it
    /// ends. The session's task (`main`) serves the first leg and also
    /// ends on eviction and the idle timeouts, which are the session's as
    /// a whole; an extra leg's task ends when its queue closes (the
    /// session ended) or its upstream does.
    #[allow(clippy::too_many_arguments)]
    async fn serve_leg(
        &self,
        id: u64,
        client: SocketAddr,
        outbound: &Outbound,
        shared: &SessionShared,
        leg: &Leg,
        permit: Permit,
        main: bool,
    ) -> Served {
        let name = outbound.name();
        let mut served = Served::default();
        let stopped = async {
            if main {
                tokio::select! {
                    () = shared.evicted.notified() => {}
                    _ = shared.flow.close_requested() => {}
                }
            } else {
                // Wake-ups for datagrams queued meanwhile come here too;
                // they are sent once the upstream is open.
                while !leg.is_closed() {
                    leg.queue_ready.notified().await;
                }
            }
        };
        // Boxed so the opening state (a SOCKS5 handshake) is freed once
        // open instead of sizing every session's task for its whole life.
        // An eviction during the handshake ends it there.
        let opened = tokio::select! {
            r = Box::pin(self.open_upstream(leg.outbound, outbound, permit)) => Some(r),
            () = stopped => None,
        };
        served.end = match opened {
            None => {
                // Ended before the outbound's verdict: another may retry.
                self.outbound_state(leg.outbound).backoff.release(permit);
                if main { "evicted" } else { "session-ended" }.to_string()
            }
            Some(Err(OpenFailure::BackingOff)) => {
                // Admitted just before another session's failure came in.
                let lost = leg.close_queue() as u64;
                self.stats
                    .datagrams_dropped_backoff
                    .fetch_add(lost, Ordering::Relaxed);
                "backing-off".to_string()
            }
            Some(Err(OpenFailure::Refused(e))) => {
                let lost = leg.close_queue();
                self.stats
                    .datagrams_refused
                    .fetch_add(lost as u64, Ordering::Relaxed);
                if matches!(e, OutboundError::Blocked) {
                    debug!(%client, outbound = name, dropped = lost, "UDP session dropped: blocked by rule");
                } else if let Some(n) = self.warnings.tcp_only.check() {
                    warn!(%client, outbound = name, dropped = lost, "UDP datagrams dropped: {e}{}", held_back(n));
                }
                format!("refused: {e}")
            }
            Some(Err(OpenFailure::Failed { error, backing_off })) => {
                // Count what was queued so nothing is lost silently.
                let lost = leg.close_queue();
                self.stats
                    .sessions_open_failed
                    .fetch_add(1, Ordering::Relaxed);
                self.stats
                    .datagrams_dropped_queue
                    .fetch_add(lost as u64, Ordering::Relaxed);
                if let Some(n) = self.warnings.open_failed.check() {
                    warn!(
                        %client, outbound = name, dropped = lost,
                        "UDP session failed to open{}: {error}; new sessions through {name} fail at once for the next {} ms{}",
                        if main { String::new() } else { format!(" its {name} upstream (its others go on)") },
                        backing_off.as_millis(), held_back(n)
                    );
                }
                format!("open-failed: {error}")
            }
            Some(Ok(upstream)) => {
                debug!(proto = "udp", %client, outbound = name, "session open");
                let upstream = Arc::new(upstream);
                let _ = leg.upstream.set(Arc::clone(&upstream));
                let deadline = tokio::time::sleep_until(deadline_in(self.idle_check()));
                tokio::pin!(deadline);
                // What was queued while the upstream opened (an extra
                // leg's wake-ups for it went to the wait above).
                self.send_queued(
                    client,
                    outbound,
                    shared,
                    leg,
                    &upstream,
                    &mut served.first_dst,
                )
                .await;
                loop {
                    tokio::select! {
                        () = leg.queue_ready.notified() => {
                            self.send_queued(client, outbound, shared, leg, &upstream, &mut served.first_dst).await;
                            if !main && leg.is_closed() {
                                break "session-ended".to_string();
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
                                Box::pin(self.forward_replies(&upstream, id, client, shared)).await;
                            served.down_bytes += bytes;
                            shared.flow.traffic.add_down(bytes);
                            served.down_datagrams += datagrams;
                        }
                        reason = upstream.closed() => {
                            if main {
                                info!(%client, outbound = name, "UDP session ended: {reason}");
                            } else {
                                info!(%client, outbound = name, "UDP session's {name} upstream ended (its others go on): {reason}");
                            }
                            break reason;
                        }
                        () = shared.evicted.notified(), if main => break "evicted".to_string(),
                        _ = shared.flow.close_requested(), if main => break "closed-by-api".to_string(),
                        _ = &mut deadline, if main => match self.idle_wait(shared) {
                            None => break "idle-timeout".to_string(),
                            // Datagrams the inbound sent itself count as
                            // activity too: sleep on until the real end.
                            Some(wait) => deadline.as_mut().reset(deadline_in(wait)),
                        },
                    }
                }
            }
        };
        served
    }

    /// Closes a leg's queue as its task ends, counting what was left.
    /// Closed before the leg is forgotten: a datagram that comes now is
    /// refused and starts a fresh leg (or session) instead of waiting
    /// here for ever.
    fn close_leg(&self, client: SocketAddr, leg: &Leg) {
        let left = leg.close_queue();
        if left > 0 {
            self.stats
                .datagrams_dropped_queue
                .fetch_add(left as u64, Ordering::Relaxed);
            debug!(%client, dropped = left, "UDP session ended with datagrams queued");
        }
    }

    /// The task of a session: serves its first leg, and when the session
    /// ends, ends its other legs too.
    async fn run_session(
        self: Arc<Self>,
        id: u64,
        client: SocketAddr,
        outbound: Arc<Outbound>,
        shared: Arc<SessionShared>,
        permit: Permit,
        flow: FlowGuard,
    ) {
        let served = self
            .serve_leg(id, client, &outbound, &shared, &shared.first, permit, true)
            .await;
        // The extra legs first: once they are closed, a datagram for a new
        // outbound of this client finds no session to add a leg to, and
        // starts a fresh one. Their tasks stop and close their upstreams.
        let left = shared.close_extra_legs();
        if left > 0 {
            self.stats
                .datagrams_dropped_queue
                .fetch_add(left as u64, Ordering::Relaxed);
        }
        self.close_leg(client, &shared.first);
        lock(&self.table).remove_if(client, id);
        // The upstream socket (and a SOCKS5 association's control
        // connection) closes as this task ends: the table no longer holds
        // `shared`, and the inbound holds it only during a send.
        flow.end(session_end_reason(&served.end), Some(&served.end));
    }

    /// The task of a session's extra leg (a second outbound's upstream).
    async fn run_leg(
        self: Arc<Self>,
        id: u64,
        client: SocketAddr,
        outbound: Arc<Outbound>,
        shared: Arc<SessionShared>,
        leg: Arc<Leg>,
        permit: Permit,
    ) {
        let started = Instant::now();
        let served = self
            .serve_leg(id, client, &outbound, &shared, &leg, permit, false)
            .await;
        self.close_leg(client, &leg);
        shared.remove_leg(&leg);
        // The session's counters going up are shared by its legs; the
        // session's own line has them.
        debug!(
            proto = "udp",
            %client,
            dst = %served.first_dst.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
            outbound = outbound.name(),
            down_bytes = served.down_bytes, down_datagrams = served.down_datagrams,
            duration_ms = started.elapsed().as_millis() as u64,
            end = %served.end,
            "flow leg"
        );
    }
}

/// The registry's reason for how a session's first leg ended.
fn session_end_reason(end: &str) -> EndReason {
    match end {
        "evicted" => EndReason::Evicted,
        "idle-timeout" => EndReason::Idle,
        "closed-by-api" => EndReason::ClosedByApi,
        "backing-off" => EndReason::OpenFailed,
        e if e.starts_with("open-failed") => EndReason::OpenFailed,
        e if e.starts_with("refused") => EndReason::Blocked,
        _ => EndReason::UpstreamError,
    }
}

/// How a leg went, for the session's log line.
#[derive(Default)]
struct Served {
    end: String,
    /// The destination of the first datagram it sent.
    first_dst: Option<SocketAddr>,
    down_bytes: u64,
    down_datagrams: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_with(limit: usize) -> Arc<UdpRelay> {
        relay_idling_after(limit, Duration::from_secs(60))
    }

    fn relay_idling_after(limit: usize, udp_idle: Duration) -> Arc<UdpRelay> {
        relay_for(limit, limit, timeouts(udp_idle, secs(10), secs(10)))
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn timeouts(udp_idle: Duration, udp_dns_idle: Duration, udp_unreplied: Duration) -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            tcp_idle: Duration::from_secs(1),
            udp_idle,
            udp_dns_idle,
            udp_unreplied,
        }
    }

    fn relay_for(sessions: usize, per_client: usize, timeouts: Timeouts) -> Arc<UdpRelay> {
        let outbound = Outbound::Direct(crate::outbound::direct::Direct {
            mark: 0,
            connect_timeout: Duration::from_secs(1),
        });
        relay_through(outbound, sessions, per_client, timeouts)
    }

    fn relay_through(
        outbound: Outbound,
        sessions: usize,
        per_client: usize,
        timeouts: Timeouts,
    ) -> Arc<UdpRelay> {
        let limits = Limits {
            udp_sessions: sessions,
            udp_sessions_per_client: per_client,
            udp_reply_sockets: 4,
            threads: 1,
            tcp_flows: 16,
            tcp_connecting_per_client: 16,
        };
        let router = Router::new("127.0.0.1:1090".parse().unwrap(), Policy::single(outbound));
        UdpRelay::new(router, timeouts, limits, 0, Arc::new(Registry::new()))
    }

    /// A relay whose policy has outbounds `a` (direct, `route.final`) and
    /// `b` (`b_kind`: the TOML keys of its table), with flows to
    /// 127.0.0.3 sent through `b`.
    fn relay_two_ways(
        b_kind: &str,
        sessions: usize,
        per_client: usize,
        timeouts: Timeouts,
    ) -> Arc<UdpRelay> {
        let text = format!(
            "[[outbounds]]\nname = \"a\"\ntype = \"direct\"\n\
             [[outbounds]]\nname = \"b\"\n{b_kind}\n\
             [route]\nfinal = \"a\"\n\
             [[route.rules]]\ndst = [\"127.0.0.3/32\"]\noutbound = \"b\"\n\
             [firewall]\nbackend = \"none\"\n"
        );
        let cfg = crate::config::RawConfig::from_toml(&text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let limits = Limits {
            udp_sessions: sessions,
            udp_sessions_per_client: per_client,
            udp_reply_sockets: 8,
            threads: 1,
            tcp_flows: 16,
            tcp_connecting_per_client: 16,
        };
        let router = Router::new(
            "127.0.0.1:1090".parse().unwrap(),
            Policy::from_config(&cfg).unwrap(),
        );
        UdpRelay::new(router, timeouts, limits, 0, Arc::new(Registry::new()))
    }

    /// A remote for full-cone checks: it listens on `listen_ip` and echoes
    /// every datagram from `answer_ip` (another port, as a server behind
    /// its own NAT would), telling the test whom it heard from. The answer
    /// socket shares its port (SO_REUSEPORT) with the reply socket the
    /// relay binds there; it never receives, so none of its datagrams can
    /// be steered away.
    fn cone_remote(
        listen_ip: &str,
        answer_ip: &str,
    ) -> (
        SocketAddr,
        SocketAddr,
        std::sync::mpsc::Receiver<SocketAddr>,
    ) {
        let listen = std::net::UdpSocket::bind((listen_ip, 0)).unwrap();
        listen
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let answer = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        answer.set_reuse_address(true).unwrap();
        answer.set_reuse_port(true).unwrap();
        let answer_addr: SocketAddr = (answer_ip.parse::<IpAddr>().unwrap(), 0).into();
        answer.bind(&answer_addr.into()).unwrap();
        let answer: std::net::UdpSocket = answer.into();
        let (listen_addr, answer_addr) =
            (listen.local_addr().unwrap(), answer.local_addr().unwrap());
        let (heard, peers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut quiet = 0;
            // Ends some seconds after the test stopped sending.
            while quiet < 50 {
                let Ok((n, peer)) = listen.recv_from(&mut buf) else {
                    quiet += 1;
                    continue;
                };
                quiet = 0;
                let _ = heard.send(peer);
                let _ = answer.send_to(&buf[..n], peer);
            }
        });
        (listen_addr, answer_addr, peers)
    }

    /// Transparent reply sockets need CAP_NET_ADMIN: without it a test
    /// that checks replies is skipped, except under CI where that fails.
    fn may_bind_replies() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(std::env::var_os("CI").is_none(), "needs root under CI");
        false
    }

    /// The policy index of the outbound with `key`.
    pub(super) fn index_of_key(relay: &UdpRelay, key: u32) -> usize {
        let policy = relay.router.policy();
        policy
            .outbounds()
            .iter()
            .position(|n| n.key == key)
            .expect("a key of the policy")
    }

    /// The key of the policy's outbound `index`.
    fn key_at(relay: &UdpRelay, index: usize) -> u32 {
        relay.router.policy().outbounds()[index].key
    }

    /// The back-off state of the policy's outbound `index`.
    fn state_at(relay: &UdpRelay, index: usize) -> Arc<OutboundState> {
        let key = relay.router.policy().outbounds()[index].key;
        relay.outbound_state(key)
    }

    /// The session of `client`'s upstreams, by outbound index: the first
    /// leg's and the extra legs'.
    fn upstreams_of(relay: &UdpRelay, client: SocketAddr) -> Vec<(usize, Arc<UdpUpstream>)> {
        let table = lock(&relay.table);
        let Some(entry) = table.sessions.get(&client) else {
            return Vec::new();
        };
        let shared = &entry.shared;
        let extra = lock(&shared.extra).clone().unwrap_or_default();
        std::iter::once(&shared.first)
            .chain(extra.iter().map(|l| &**l))
            .filter_map(|leg| {
                Some((
                    index_of_key(relay, leg.outbound),
                    Arc::clone(leg.upstream.get()?),
                ))
            })
            .collect()
    }

    /// Waits until `client`'s session has open upstreams through exactly
    /// `outbounds` (by index, in the order they opened).
    async fn wait_for_upstreams(relay: &UdpRelay, client: SocketAddr, outbounds: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let open: Vec<usize> = upstreams_of(relay, client).iter().map(|u| u.0).collect();
            if open == outbounds {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "upstreams open: {open:?}, wanted {outbounds:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Where direct sessions send in tests: a loopback socket that waits
    /// up to 5 s for each datagram, and its address.
    fn loopback_sink() -> (std::net::UdpSocket, SocketAddr) {
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let addr = sink.local_addr().unwrap();
        (sink, addr)
    }

    /// Receives datagrams numbered 0 to `count` - 1 (big-endian u32), each
    /// whole and in order.
    fn expect_numbered(sink: &std::net::UdpSocket, count: u32) {
        let mut buf = [0u8; 16];
        for i in 0..count {
            let n = sink.recv(&mut buf).unwrap();
            assert_eq!(
                &buf[..n],
                &i.to_be_bytes(),
                "datagram {i} lost or out of order"
            );
        }
    }

    /// Lets the sessions' tasks run for a moment, so a test's datagrams
    /// take both paths: queued while a session opens, then direct.
    async fn let_sessions_run() {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    /// A payload behind the headroom the inbound leaves in front of it.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; UDP_HEADROOM];
        buf.extend_from_slice(payload);
        buf
    }

    /// The clients in the table, in no particular order.
    fn clients_in(relay: &UdpRelay) -> Vec<SocketAddr> {
        let mut clients: Vec<_> = lock(&relay.table).sessions.keys().copied().collect();
        clients.sort();
        clients
    }

    /// Marks `client`'s session as answered, as its first reply would.
    fn answered(relay: &UdpRelay, client: SocketAddr) {
        let mut table = lock(&relay.table);
        let entry = &table.sessions[&client];
        let id = entry.id;
        entry.shared.replied.store(true, Ordering::Relaxed);
        table.replied(client, id);
    }

    fn port(ip: [u8; 4], port: u16) -> SocketAddr {
        (ip, port).into()
    }

    /// Whether `client`'s session task still runs: it holds the session's
    /// shared state besides the table.
    fn task_alive(relay: &UdpRelay, client: SocketAddr) -> bool {
        lock(&relay.table)
            .sessions
            .get(&client)
            .is_some_and(|e| Arc::strong_count(&e.shared) > 1)
    }

    #[tokio::test]
    async fn session_table_stays_bounded_under_a_flood_of_client_ports() {
        let relay = relay_with(3);
        // A loopback sink so the direct sessions send somewhere harmless;
        // it never answers, so every session is an unanswered one.
        let (_sink, dst) = loopback_sink();
        for p in 40000..40010u16 {
            relay.dispatch(port([127, 0, 0, 1], p), dst, &mut framed(b"x"));
        }
        // The newest stay, the oldest unanswered made room for them.
        assert_eq!(
            clients_in(&relay),
            (40007..40010u16)
                .map(|p| port([127, 0, 0, 1], p))
                .collect::<Vec<_>>()
        );
        assert_eq!(relay.stats.sessions_evicted.load(Ordering::Relaxed), 7);
        assert_eq!(relay.stats.sessions_refused_full.load(Ordering::Relaxed), 0);
        // A known client keeps its session: no new slot needed.
        relay.dispatch(port([127, 0, 0, 1], 40009), dst, &mut framed(b"y"));
        assert_eq!(relay.stats.sessions_evicted.load(Ordering::Relaxed), 7);
        // Answered sessions are never evicted: with all of them answered,
        // a new port is refused.
        for p in 40007..40010u16 {
            answered(&relay, port([127, 0, 0, 1], p));
        }
        relay.dispatch(port([127, 0, 0, 1], 40010), dst, &mut framed(b"z"));
        assert_eq!(relay.session_count(), 3);
        assert_eq!(
            relay.stats.sessions_refused_client.load(Ordering::Relaxed),
            1
        );
    }

    /// A client at its own limit gives up its oldest unanswered session;
    /// answered ones and other clients' sessions stay.
    #[tokio::test]
    async fn a_client_at_its_limit_evicts_its_own_oldest_unanswered_session() {
        let relay = relay_for(10, 3, timeouts(secs(60), secs(10), secs(10)));
        let (_sink, dst) = loopback_sink();
        let a = [127, 0, 0, 1];
        let b = [127, 0, 0, 2];
        relay.dispatch(port(b, 1000), dst, &mut framed(b"b"));
        for p in 1..=3 {
            relay.dispatch(port(a, p), dst, &mut framed(b"a"));
        }
        answered(&relay, port(a, 1));
        relay.dispatch(port(a, 4), dst, &mut framed(b"a"));
        // Port 1 answered: port 2 was the oldest unanswered.
        assert_eq!(
            clients_in(&relay),
            vec![port(a, 1), port(a, 3), port(a, 4), port(b, 1000)]
        );
        relay.dispatch(port(a, 5), dst, &mut framed(b"a"));
        assert_eq!(
            clients_in(&relay),
            vec![port(a, 1), port(a, 4), port(a, 5), port(b, 1000)]
        );
        assert_eq!(relay.stats.sessions_evicted.load(Ordering::Relaxed), 2);
        // Each client's count follows its sessions.
        let table = lock(&relay.table);
        assert_eq!(table.count_of(std::net::IpAddr::from(a)), 3);
        assert_eq!(table.count_of(std::net::IpAddr::from(b)), 1);
    }

    /// A full table gives up the oldest unanswered session of the client
    /// with the most sessions, not the oldest session of all.
    #[tokio::test]
    async fn a_full_table_evicts_from_the_busiest_client_first() {
        let relay = relay_for(5, 5, timeouts(secs(60), secs(10), secs(10)));
        let (_sink, dst) = loopback_sink();
        let (a, b, c) = ([127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]);
        // b opens first (oldest of all), then a opens three.
        relay.dispatch(port(b, 1), dst, &mut framed(b"b"));
        relay.dispatch(port(b, 2), dst, &mut framed(b"b"));
        for p in 1..=3 {
            relay.dispatch(port(a, p), dst, &mut framed(b"a"));
        }
        answered(&relay, port(a, 1));
        relay.dispatch(port(c, 1), dst, &mut framed(b"c"));
        assert_eq!(
            clients_in(&relay),
            vec![port(a, 1), port(a, 3), port(b, 1), port(b, 2), port(c, 1)]
        );
        // Now a and b have two each; b's oldest unanswered is the oldest.
        relay.dispatch(port(c, 2), dst, &mut framed(b"c"));
        assert_eq!(
            clients_in(&relay),
            vec![port(a, 1), port(a, 3), port(b, 2), port(c, 1), port(c, 2)]
        );
        // Everything answered: a newcomer is refused, nobody evicted.
        for client in clients_in(&relay) {
            answered(&relay, client);
        }
        relay.dispatch(port(c, 3), dst, &mut framed(b"c"));
        assert_eq!(relay.session_count(), 5);
        assert_eq!(relay.stats.sessions_evicted.load(Ordering::Relaxed), 2);
        assert_eq!(relay.stats.sessions_refused_full.load(Ordering::Relaxed), 1);
    }

    /// An evicted session really ends: its task stops and lets go of the
    /// upstream socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_evicted_session_ends_and_closes_its_upstream() {
        let relay = relay_for(1, 1, timeouts(secs(60), secs(10), secs(10)));
        let (sink, dst) = loopback_sink();
        let first = port([127, 0, 0, 1], 1);
        relay.dispatch(first, dst, &mut framed(b"1"));
        let mut buf = [0u8; 8];
        sink.recv(&mut buf).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while relay.ready_upstream(first, key_at(&relay, 0)).is_none() {
            assert!(Instant::now() < deadline, "the session never opened");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Weak: this test must not keep the session's state alive itself.
        let (upstream, shared) = relay
            .ready_upstream(first, key_at(&relay, 0))
            .map(|(u, s)| (Arc::downgrade(&u), Arc::downgrade(&s)))
            .expect("session open");
        relay.dispatch(port([127, 0, 0, 1], 2), dst, &mut framed(b"2"));
        assert_eq!(relay.stats.sessions_evicted.load(Ordering::Relaxed), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while upstream.upgrade().is_some() || shared.upgrade().is_some() {
            assert!(Instant::now() < deadline, "the evicted session lives on");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
                let_sessions_run().await;
            }
        }
        expect_numbered(&sink, 200);
        let queued = relay.stats.datagrams_queued.load(Ordering::Relaxed);
        assert!(
            queued > 0 && queued < 200,
            "both paths taken: {queued} queued"
        );
        let sessions = lock(&relay.table);
        let shared = &sessions.sessions[&client].shared;
        assert!(shared.first.upstream.get().is_some(), "session open");
        assert_eq!(shared.up_datagrams.load(Ordering::Relaxed), 200);
        assert_eq!(shared.first.queued.load(Ordering::Relaxed), 0);
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
                let_sessions_run().await;
            }
        }
        expect_numbered(&sink, 200);
        let segmented = relay.stats.datagrams_segmented.load(Ordering::Relaxed);
        assert!(
            segmented > 0 && segmented.is_multiple_of(4) && segmented < 200,
            "both paths taken: {segmented} in runs"
        );
        let sessions = lock(&relay.table);
        let shared = &sessions.sessions[&client].shared;
        assert_eq!(shared.up_datagrams.load(Ordering::Relaxed), 200);
        assert_eq!(shared.flow.traffic.get().0, 800);
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
        while relay.ready_upstream(client, key_at(&relay, 0)).is_none() {
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
        expect_numbered(&sink, 200);
        assert_eq!(relay.stats.datagrams_segmented.load(Ordering::Relaxed), 0);
        assert!(
            !SEGMENTS_REFUSED.load(Ordering::Relaxed),
            "one refusal is not for good"
        );
    }

    #[test]
    fn a_session_queue_is_bounded_and_refuses_once_closed() {
        let shared = Leg::new(0);
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
    async fn dns_and_unanswered_sessions_idle_out_sooner() {
        let relay = relay_for(1, 1, timeouts(secs(60), secs(10), secs(20)));
        let registry = Arc::new(Registry::new());
        let guard = registry.open(crate::registry::FlowStart {
            network: Network::Udp,
            client: "192.0.2.2:1".parse().unwrap(),
            dst: "198.51.100.1:53".parse().unwrap(),
            host: None,
            sniffed: None,
            rule: Arc::new(crate::registry::RuleLabel {
                index: None,
                kind: "Match",
                payload: String::new(),
            }),
            chain: vec![Arc::from("direct")],
        });
        let shared = SessionShared::new(0, Arc::clone(guard.flow()));
        shared.sent_up(1, "198.51.100.1:53".parse().unwrap());
        assert_eq!(relay.idle_for(&shared), secs(10));
        shared.sent_up(1, "198.51.100.1:443".parse().unwrap());
        assert_eq!(relay.idle_for(&shared), secs(20), "never answered");
        shared.replied.store(true, Ordering::Relaxed);
        assert_eq!(relay.idle_for(&shared), secs(60));
        assert_eq!(relay.idle_check(), secs(10));
    }

    /// Waits until `client` has no session; false after `within`.
    async fn ended_within(relay: &UdpRelay, client: SocketAddr, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while lock(&relay.table).sessions.contains_key(&client) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// A session that turns into a DNS one mid-way ends at its last
    /// activity plus the DNS timeout, not the general one it started with.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_session_turning_to_dns_ends_after_the_dns_timeout() {
        let relay = relay_for(
            4,
            4,
            timeouts(secs(30), Duration::from_millis(300), secs(30)),
        );
        let (sink, dst) = loopback_sink();
        let client = port([127, 0, 0, 1], 2000);
        relay.dispatch(client, dst, &mut framed(b"not dns"));
        let mut buf = [0u8; 16];
        sink.recv(&mut buf).unwrap();
        // Longer than the DNS timeout: a non-DNS session is still there.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            relay.ready_upstream(client, key_at(&relay, 0)).is_some(),
            "ended too soon"
        );
        // Nothing listens on that port; the datagram only has to leave.
        relay.dispatch(client, "127.0.0.1:53".parse().unwrap(), &mut framed(b"q"));
        assert!(
            ended_within(&relay, client, Duration::from_secs(5)).await,
            "a DNS session outlived the DNS timeout by seconds"
        );
    }

    /// A session that never got a reply ends after `udp_unreplied`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_unanswered_session_ends_after_the_unreplied_timeout() {
        let relay = relay_for(
            4,
            4,
            timeouts(secs(30), secs(30), Duration::from_millis(200)),
        );
        let (sink, dst) = loopback_sink();
        let client = port([127, 0, 0, 1], 2001);
        relay.dispatch(client, dst, &mut framed(b"hello?"));
        let mut buf = [0u8; 16];
        sink.recv(&mut buf).unwrap();
        assert!(
            ended_within(&relay, client, Duration::from_secs(5)).await,
            "an unanswered session lived on"
        );
    }

    /// Timeouts too large to add to an instant must not panic the
    /// session's task (they did: "overflow when adding duration to
    /// instant").
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn huge_timeouts_never_panic_a_session() {
        for (idle, dns, unreplied) in [
            (Duration::from_millis(50), Duration::MAX, Duration::MAX),
            (Duration::MAX, Duration::MAX, Duration::MAX),
            (Duration::MAX, Duration::from_millis(50), Duration::MAX),
        ] {
            let relay = relay_for(4, 4, timeouts(idle, dns, unreplied));
            let (sink, dst) = loopback_sink();
            let client = port([127, 0, 0, 1], 2002);
            relay.dispatch(client, dst, &mut framed(b"x"));
            let mut buf = [0u8; 16];
            sink.recv(&mut buf).unwrap();
            relay.dispatch(client, dst, &mut framed(b"y"));
            sink.recv(&mut buf).unwrap();
            // Last to port 53: the DNS timeout applies from here.
            relay.dispatch(client, "127.0.0.1:53".parse().unwrap(), &mut framed(b"q"));
            tokio::time::sleep(Duration::from_millis(300)).await;
            // A panicked task would have dropped its hold on the session.
            let ended = !lock(&relay.table).sessions.contains_key(&client);
            assert!(
                ended || task_alive(&relay, client),
                "the session's task died ({idle:?}, {dns:?}, {unreplied:?})"
            );
        }
    }

    /// A SOCKS5 server that accepts and hangs up at once, as a broken one
    /// would: 1,000 new client ports at once must not dial it 1,000 times.
    /// Sessions waiting for an opening slot see the first failure and
    /// fail at once; every datagram is counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_failing_server_is_not_dialed_per_new_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                drop(stream);
            }
        });
        let outbound = Outbound::Socks5(crate::outbound::socks5::Socks5Client {
            server,
            auth: None,
            mark: 0,
            connect_timeout: Duration::from_secs(2),
            send_domain: false,
            dns_over_tcp: false,
        });
        let relay = relay_through(outbound, 4096, 4096, timeouts(secs(60), secs(10), secs(10)));
        let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for p in 0..1000u16 {
            relay.dispatch(port([127, 0, 0, 1], 10_000 + p), dst, &mut framed(b"x"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while relay.session_count() > 0 {
            assert!(Instant::now() < deadline, "sessions left opening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let dials = accepted.load(Ordering::Relaxed);
        assert!(
            (1..=OPENING_AT_ONCE + 1).contains(&dials),
            "{dials} dials for 1,000 new ports"
        );
        let stats = &relay.stats;
        let dropped = stats.datagrams_dropped_backoff.load(Ordering::Relaxed)
            + stats.datagrams_dropped_queue.load(Ordering::Relaxed);
        assert_eq!(dropped, 1000, "every datagram counted");
        assert!(state_at(&relay, 0).backoff.failing());
    }

    /// One client port talks to two remotes whose destinations the rules
    /// send through different outbounds: the session opens one upstream
    /// per outbound, and the answers of each remote reach the client from
    /// that remote's own address. Runs follow their destination too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn one_session_two_outbounds_two_upstreams_each_answered_from_its_remote() {
        if !may_bind_replies() {
            return;
        }
        let relay = relay_two_ways(
            "type = \"direct\"",
            4,
            4,
            timeouts(secs(60), secs(10), secs(10)),
        );
        let (a, a_answer, a_heard) = cone_remote("127.0.0.2", "127.0.0.12");
        let (b, b_answer, b_heard) = cone_remote("127.0.0.3", "127.0.0.13");
        let client_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client_socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let client = client_socket.local_addr().unwrap();
        let mut buf = [0u8; 64];
        let mut expect = |payload: &[u8], from: SocketAddr| {
            let (n, got_from) = client_socket
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no answer {payload:?} from {from}: {e}"));
            assert_eq!((&buf[..n], got_from), (payload, from));
        };
        for round in 0..3u8 {
            relay.dispatch(client, a, &mut framed(&[b'a', round]));
            expect(&[b'a', round], a_answer);
            relay.dispatch(client, b, &mut framed(&[b'b', round]));
            expect(&[b'b', round], b_answer);
        }
        wait_for_upstreams(&relay, client, &[0, 1]).await;
        assert_eq!(relay.session_count(), 1, "one session, full cone");

        // A run to b goes through b's upstream, whole.
        let mut run = vec![0u8; UDP_HEADROOM];
        run.extend_from_slice(b"r0r1r2r3");
        relay.dispatch_run(client, b, &mut run, 2, &mut Vec::new());
        for want in [b"r0", b"r1", b"r2", b"r3"] {
            expect(want, b_answer);
        }

        // Each remote heard one upstream socket, and not the other's.
        let a_peers: Vec<SocketAddr> = a_heard.try_iter().collect();
        let b_peers: Vec<SocketAddr> = b_heard.try_iter().collect();
        assert_eq!(a_peers.len(), 3);
        assert_eq!(b_peers.len(), 7);
        assert!(a_peers.iter().all(|p| *p == a_peers[0]), "{a_peers:?}");
        assert!(b_peers.iter().all(|p| *p == b_peers[0]), "{b_peers:?}");
        assert_ne!(a_peers[0], b_peers[0], "both outbounds shared one socket");
        let stats = &relay.stats;
        assert_eq!(stats.sessions_open_failed.load(Ordering::Relaxed), 0);
        assert_eq!(stats.datagrams_dropped_queue.load(Ordering::Relaxed), 0);
    }

    /// The second outbound of a session fails to open (a SOCKS5 server
    /// that hangs up): the datagrams for it are counted and dropped, its
    /// back-off starts, and the first outbound's upstream carries on
    /// untouched, answers and all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_second_outbound_failing_leaves_the_first_alone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let relay = relay_two_ways(
            &format!("type = \"socks5\"\nserver = \"{server}\""),
            4,
            4,
            timeouts(secs(60), secs(10), secs(10)),
        );
        let (sink_a, _) = loopback_sink();
        let a = sink_a.local_addr().unwrap();
        let b: SocketAddr = "127.0.0.3:9".parse().unwrap();
        let client = port([127, 0, 0, 1], 3000);
        let mut buf = [0u8; 16];

        relay.dispatch(client, a, &mut framed(b"a0"));
        let n = sink_a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"a0");
        wait_for_upstreams(&relay, client, &[0]).await;
        let first = Arc::clone(&upstreams_of(&relay, client)[0].1);

        relay.dispatch(client, b, &mut framed(b"b0"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while relay.stats.sessions_open_failed.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "the second outbound never failed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(state_at(&relay, 1).backoff.failing());
        assert!(
            !state_at(&relay, 0).backoff.failing(),
            "back-off is per outbound"
        );
        // The failed leg is gone; while b backs off, its datagrams are
        // dropped at once and the session stays.
        wait_for_upstreams(&relay, client, &[0]).await;
        relay.dispatch(client, b, &mut framed(b"b1"));
        assert_eq!(
            relay
                .stats
                .datagrams_dropped_backoff
                .load(Ordering::Relaxed),
            1
        );
        for i in 1..=3u8 {
            relay.dispatch(client, a, &mut framed(&[b'a', b'0' + i]));
            let n = sink_a.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[b'a', b'0' + i]);
        }
        let now = upstreams_of(&relay, client);
        assert_eq!(now.len(), 1);
        assert!(
            Arc::ptr_eq(&now[0].1, &first),
            "the first upstream was replaced"
        );
        assert_eq!(relay.session_count(), 1);
        assert_eq!(
            relay.stats.datagrams_dropped_queue.load(Ordering::Relaxed),
            1,
            "b0, queued while b opened"
        );
    }

    /// Waits until nothing holds `upstreams` any more (their sockets are
    /// closed).
    async fn all_closed(upstreams: &[std::sync::Weak<UdpUpstream>], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while upstreams.iter().any(|u| u.upgrade().is_some()) {
            assert!(
                Instant::now() < deadline,
                "{what}: an upstream outlived its session"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A session with two upstreams: eviction ends both, and so does the
    /// session's idle timeout (kept for the session as a whole).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn eviction_and_idle_timeout_close_every_upstream_of_a_session() {
        for evict in [true, false] {
            let idle = if evict {
                secs(60)
            } else {
                Duration::from_millis(100)
            };
            let relay = relay_two_ways("type = \"direct\"", 1, 1, timeouts(idle, idle, idle));
            let (sink_a, _) = loopback_sink();
            let a = sink_a.local_addr().unwrap();
            let sink_b = std::net::UdpSocket::bind("127.0.0.3:0").unwrap();
            sink_b
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let b = sink_b.local_addr().unwrap();
            let client = port([127, 0, 0, 1], 3100);
            let mut buf = [0u8; 16];
            relay.dispatch(client, a, &mut framed(b"a"));
            sink_a.recv(&mut buf).unwrap();
            relay.dispatch(client, b, &mut framed(b"b"));
            sink_b.recv(&mut buf).unwrap();
            wait_for_upstreams(&relay, client, &[0, 1]).await;
            // Weak: this test must not keep the upstreams alive itself.
            let upstreams: Vec<_> = upstreams_of(&relay, client)
                .iter()
                .map(|(_, u)| Arc::downgrade(u))
                .collect();
            if evict {
                // The table holds one session: a new port evicts this one.
                relay.dispatch(port([127, 0, 0, 1], 3101), a, &mut framed(b"x"));
                assert_eq!(relay.stats.sessions_evicted.load(Ordering::Relaxed), 1);
                all_closed(&upstreams, "evicted").await;
            } else {
                all_closed(&upstreams, "idle").await;
                assert_eq!(relay.session_count(), 0);
            }
        }
    }

    /// `block` and `http` refuse UDP by design: their datagrams are
    /// counted and dropped without a session, and the back-off (which
    /// would fail every other outbound's new sessions too) stays off.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn refused_udp_opens_no_session_and_no_back_off() {
        let http = Outbound::Http(crate::outbound::http::HttpClient::new(
            "127.0.0.1:9".parse().unwrap(),
            None,
            false,
            0,
            secs(1),
        ));
        let block = Outbound::Block(crate::outbound::block::Block);
        for outbound in [block, http] {
            let relay = relay_through(outbound, 16, 16, timeouts(secs(60), secs(10), secs(10)));
            let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
            for p in 0..10u16 {
                relay.dispatch(port([127, 0, 0, 1], 20_000 + p), dst, &mut framed(b"x"));
            }
            let_sessions_run().await;
            assert_eq!(relay.session_count(), 0);
            assert_eq!(relay.stats.datagrams_refused.load(Ordering::Relaxed), 10);
            assert!(!state_at(&relay, 0).backoff.failing());
            assert_eq!(relay.stats.sessions_open_failed.load(Ordering::Relaxed), 0);
        }
    }
}
