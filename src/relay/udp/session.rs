//! A session and its legs: what the inbound and a session's tasks share.
//!
//! A session is one client address:port ([`SessionShared`]); each
//! outbound its datagrams route to is a leg ([`Leg`]) with its own
//! upstream and queue. The inbound sends an open leg's datagrams itself;
//! the queue holds them while the upstream opens or its socket is full.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use portable_atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::aliases::{Aliases, ReplyFrom};
use super::{decide, lock};
use crate::outbound::UdpUpstream;
use crate::registry::Flow;

/// Datagrams queued for one session while its upstream is slow or still
/// being set up (a SOCKS5 handshake); beyond that they are dropped and
/// counted, as a congested link would.
pub(super) const SESSION_QUEUE: usize = 256;

/// A datagram on its way upstream: `buf[UDP_HEADROOM..]` is the payload.
#[derive(Debug)]
pub struct Packet {
    pub buf: Vec<u8>,
    pub dst: SocketAddr,
    /// The name it goes to, `dst` being a fake-ip address (see
    /// [`crate::outbound::UdpUpstream::send_to`]).
    pub name: Option<Arc<str>>,
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
pub(super) enum Refused {
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
pub(super) struct Leg {
    /// The outbound's key ([`crate::policy::Choice::key`]): stable across
    /// reloads, so a session keeps its upstream while its outbound stays.
    pub(super) outbound: u32,
    pub(super) upstream: OnceLock<Arc<UdpUpstream>>,
    /// Datagrams handed to the queue and not yet sent by the task; while
    /// any are, the inbound queues too, so datagrams keep their order.
    pub(super) queued: AtomicUsize,
    queue: Mutex<Queue>,
    /// Wakes the leg's task when a datagram is queued, or when the queue
    /// closes (the session ended: an extra leg's task then stops).
    pub(super) queue_ready: Notify,
}

impl Leg {
    pub(super) fn new(outbound: u32) -> Self {
        Leg {
            outbound,
            upstream: OnceLock::new(),
            queued: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            queue_ready: Notify::new(),
        }
    }

    /// Queues a datagram for the leg's task.
    pub(super) fn enqueue(&self, packet: Box<Packet>) -> Result<(), Refused> {
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

    pub(super) fn dequeue(&self) -> Option<Box<Packet>> {
        lock(&self.queue).packets.pop_front()
    }

    /// Ends the queue: later datagrams for this outbound start a fresh leg
    /// (or session). Returns how many were still waiting (they will not
    /// be sent). Wakes the task, which stops if it is an extra leg's.
    pub(super) fn close_queue(&self) -> usize {
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

    pub(super) fn is_closed(&self) -> bool {
        lock(&self.queue).closed
    }

    /// The open upstream, when the inbound may send on it directly: open,
    /// and nothing queued that must go first.
    pub(super) fn ready(&self) -> Option<Arc<UdpUpstream>> {
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
pub(super) struct SessionShared {
    pub(super) first: Leg,
    /// The other legs, at most one per outbound; `None` once the session
    /// ended (a leg added later would never be stopped).
    pub(super) extra: Mutex<Option<Vec<Arc<Leg>>>>,
    pub(super) start: Instant,
    /// Milliseconds since `start` of the last datagram either way.
    pub(super) last_activity_ms: AtomicU64,
    /// The last destination was port 53 (shorter idle timeout).
    pub(super) last_was_dns: AtomicBool,
    /// A datagram came back from upstream at least once. Sessions that
    /// never got one are what a flood of new ports (or a scan) leaves
    /// behind: they idle out sooner and are the ones evicted.
    pub(super) replied: AtomicBool,
    /// Wakes the session's task to end it: it was evicted from the table.
    pub(super) evicted: Notify,
    /// The session in the registry: its byte counters, and a close asked
    /// for from the API.
    pub(super) flow: Arc<Flow>,
    pub(super) up_datagrams: AtomicU64,
    /// The route of a QUIC flow sniffed by name (see `hold.rs`).
    pub(super) pin: OnceLock<decide::Pin>,
    /// Fake-ip destinations the session sends to, each with the way its
    /// datagrams go; `aliased` says there are any, so the replies of every
    /// other session pass without a lock.
    aliases: Mutex<Aliases>,
    aliased: AtomicBool,
}

impl SessionShared {
    pub(super) fn new(outbound: u32, flow: Arc<Flow>) -> Self {
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
            aliases: Mutex::new(Aliases::default()),
            aliased: AtomicBool::new(false),
        }
    }

    /// The real address datagrams to the fake-ip address `fake` go to,
    /// once its name was resolved for this session.
    pub(super) fn real_of(&self, fake: SocketAddr) -> Option<SocketAddr> {
        if !self.aliased.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.aliases).real_of(fake)
    }

    /// Datagrams to `fake` go to `real`, and replies from `real` reach
    /// the client from `fake`.
    pub(super) fn add_alias(&self, fake: SocketAddr, real: SocketAddr) {
        lock(&self.aliases).add_real(fake, real);
        self.aliased.store(true, Ordering::Release);
    }

    /// Datagrams to `fake` go by `name` through the leg of `outbound`, and
    /// its replies reach the client from `fake` (see [`Aliases`]).
    pub(super) fn add_named(&self, fake: SocketAddr, name: &Arc<str>, outbound: u32) {
        lock(&self.aliases).add_named(fake, name, outbound);
        self.aliased.store(true, Ordering::Release);
    }

    /// The address a reply from `from` through the leg of `outbound`
    /// reaches the client from: the fake-ip address the client wrote to
    /// when it answers one, else `from` itself; None for a reply from a
    /// name no destination has. One atomic load for a session with no
    /// fake-ip destination.
    pub(super) fn reply_source(&self, outbound: u32, from: ReplyFrom<'_>) -> Option<SocketAddr> {
        if !self.aliased.load(Ordering::Acquire) {
            return match from {
                ReplyFrom::Addr(addr) => Some(addr),
                ReplyFrom::Name(..) => None,
            };
        }
        lock(&self.aliases).reply_source(outbound, from)
    }

    pub(super) fn touch(&self) {
        self.last_activity_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The extra leg for `outbound`, if the session has one.
    pub(super) fn extra_leg(&self, outbound: u32) -> Option<Arc<Leg>> {
        lock(&self.extra)
            .as_ref()?
            .iter()
            .find(|leg| leg.outbound == outbound)
            .cloned()
    }

    /// The open upstream for `outbound`, when the inbound may send on it
    /// directly. The first leg costs no lock; another takes the extra
    /// legs' (uncontended) lock.
    pub(super) fn ready(&self, outbound: u32) -> Option<Arc<UdpUpstream>> {
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
    pub(super) fn add_leg(&self, leg: Arc<Leg>) -> bool {
        match lock(&self.extra).as_mut() {
            Some(legs) => {
                legs.push(leg);
                true
            }
            None => false,
        }
    }

    /// Forgets an extra leg that ended (if still listed).
    pub(super) fn remove_leg(&self, leg: &Arc<Leg>) {
        if let Some(legs) = lock(&self.extra).as_mut() {
            legs.retain(|l| !Arc::ptr_eq(l, leg));
        }
    }

    /// Ends the session's extra legs and refuses new ones; returns the
    /// datagrams that were still queued for them.
    pub(super) fn close_extra_legs(&self) -> usize {
        let legs = lock(&self.extra).take().unwrap_or_default();
        legs.iter().map(|leg| leg.close_queue()).sum()
    }

    pub(super) fn sent_up(&self, len: usize, dst: SocketAddr) {
        self.sent_up_many(len, 1, dst)
    }

    pub(super) fn sent_up_many(&self, bytes: usize, datagrams: usize, dst: SocketAddr) {
        self.flow.traffic.add_up(bytes as u64);
        self.up_datagrams
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        self.last_was_dns.store(dst.port() == 53, Ordering::Relaxed);
        self.touch();
    }

    pub(super) fn idle_since(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}
