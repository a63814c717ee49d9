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
//!
//! Deciding and carrying are apart, as on the TCP path: `decide.rs` says
//! what becomes of each datagram (DNS hooks, a QUIC pin, the rules, a
//! refusal) as a plain `decide::Verdict`, with no socket; this file
//! takes the inbound's datagrams, asks it and carries the verdict out
//! ([`UdpRelay::dispatch`], `forward`). The rest carries only:
//! `session.rs` (a session and its legs), `table.rs` (the session table
//! and its room), `upstream.rs` (a leg's task: open, send, replies, idle
//! time), `hold.rs` (QUIC flows held for their name), `dns.rs` (the DNS
//! answers and exchanges verdicts ask for), `replies.rs`, `runs.rs` and
//! `backoff.rs`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use portable_atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::config::Network;
use crate::config::{Limits, Timeouts};
use crate::outbound::{Outbound, OutboundError, UDP_HEADROOM};
use crate::outbound::{ResolveReal, UdpUpstream};
use crate::policy::sniff::Sniffed;
use crate::policy::Choice;
use crate::ratelimit::{held_back, RateLimit};
use crate::registry::{FlowStart, Registry};
use crate::route::{Decision, Router};
use crate::sys;

mod aliases;
mod backoff;
mod decide;
mod dns;
#[cfg(feature = "quic")]
mod hold;
mod replies;
mod runs;
mod session;
mod table;
mod upstream;

use backoff::{Backoff, Permit, Refusal};
use decide::Verdict;
#[cfg(feature = "quic")]
pub use hold::HoldStats;
pub use replies::ReplySockets;
use runs::{refuse_segments, SEGMENTS_REFUSED};
pub use runs::{runnable, Run};
pub use session::Packet;
use session::{Leg, Refused, SessionShared};
use table::{SessionEntry, Table};

/// Largest UDP payload (65535 − 8 UDP − 20 IPv4 header).
pub const MAX_DATAGRAM: usize = 65_507;

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
    /// Datagrams to a fake-ip address whose name had no real address (or
    /// that came while too many names were being resolved), dropped.
    pub datagrams_dropped_unresolved: AtomicU64,
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
    fake: RateLimit,
    unresolved: RateLimit,
}

/// How a datagram to a fake-ip address goes (see `aliases.rs`).
enum FakeWay {
    /// To the real address of its name; the client wrote to `fake`.
    Resolved { fake: SocketAddr },
    /// To the name itself, through an outbound that takes names.
    Named(Arc<str>),
}

/// A fake-ip destination of one client whose name is being resolved.
type Resolving = HashMap<(SocketAddr, SocketAddr), Vec<Vec<u8>>>;

/// Most fake-ip destinations being resolved at once, over all clients;
/// a datagram for another is dropped (counted) until one is done.
const MAX_RESOLVING: usize = 1024;

/// Most datagrams one destination keeps while its name resolves.
const RESOLVING_QUEUE: usize = 32;

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
    #[cfg(feature = "quic")]
    holds: hold::Holds,
    /// Fake-ip destinations whose names are being resolved, by (client,
    /// fake address), with the datagrams that wait for it.
    resolving: Mutex<Resolving>,
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
            #[cfg(feature = "quic")]
            holds: hold::Holds::new(router.policy().wants_sniffing()),
            resolving: Mutex::default(),
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

    /// After a reload: forgets the state of outbounds the policy no longer
    /// has (sessions still on them keep their own upstreams), and holds
    /// new QUIC flows for their name only if the new rules look at names.
    pub fn policy_changed(&self, policy: &crate::policy::Policy) {
        #[cfg(feature = "quic")]
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

    /// Hands one datagram from `client` to `asked` to its session,
    /// creating the session when this client has none.
    /// `buf[UDP_HEADROOM..]` is the payload; the headroom in front of it is
    /// scratch space for a SOCKS5 header.
    ///
    /// The decision stage ([`decide`]) says what becomes of it, per
    /// datagram, by its destination; the relay then carries that out
    /// ([`carry`](Self::carry)): the session sends it through the upstream
    /// of the outbound chosen, opening that upstream when the session has
    /// none for it yet.
    pub fn dispatch(self: &Arc<Self>, client: SocketAddr, asked: SocketAddr, buf: &mut [u8]) {
        // A new flow starting with a QUIC Initial may wait for its name.
        #[cfg(feature = "quic")]
        if self.holds.enabled() && hold::intercept(self, client, asked, buf) {
            return;
        }
        let session = self.session_of(client);
        let pin = session.as_deref().and_then(|s| s.pin.get());
        let verdict = decide::datagram(&self.router, client, asked, &buf[UDP_HEADROOM..], pin);
        self.carry(client, buf, verdict, session, None)
    }

    /// Carries out what the decision stage said about a datagram from
    /// `client` (`buf` as [`dispatch`](Self::dispatch) takes it), through
    /// `session` (the client's, looked up by the caller) or a new one;
    /// `sniffed` labels a new session.
    fn carry(
        self: &Arc<Self>,
        client: SocketAddr,
        buf: &mut [u8],
        verdict: Verdict,
        session: Option<Arc<SessionShared>>,
        sniffed: Option<&Sniffed>,
    ) {
        match verdict {
            Verdict::Forward { dst, choice } => {
                self.forward(client, dst, buf, choice, session, sniffed, None)
            }
            Verdict::ForwardNamed { fake, name, choice } => {
                self.forward_named(client, fake, name, buf, choice, session, sniffed)
            }
            // No session, no back-off: the configuration refused it, no
            // upstream failed.
            Verdict::Refuse { dst, choice, error } => {
                self.refuse(client, dst, choice.outbound.name(), &error)
            }
            Verdict::RefuseLoop { dst } => {
                if let Some(n) = self.warnings.refused_loop.check() {
                    warn!(%client, %dst, "refused UDP datagram addressed to tproxyd's own listener (routing loop); check that the rules skip tproxyd's mark{}", held_back(n));
                }
            }
            Verdict::RefuseFake { dst } => self.refuse_fake(client, dst),
            Verdict::Answer { from, answer } => self.send_dns_answer(client, from, answer),
            Verdict::Resolve { from } => self.send_dns_resolved(client, from, &buf[UDP_HEADROOM..]),
            Verdict::DnsOverTcp { from, dst, choice } => {
                self.send_dns_over_tcp(client, from, dst, choice, &buf[UDP_HEADROOM..])
            }
        }
    }

    /// `client`'s session, if it has one.
    fn session_of(&self, client: SocketAddr) -> Option<Arc<SessionShared>> {
        lock(&self.table)
            .sessions
            .get(&client)
            .map(|entry| Arc::clone(&entry.shared))
    }

    /// Sends a datagram to a fake-ip address `fake` by its `name`. Through
    /// an outbound that takes names (SOCKS5, shadowsocks), to the name
    /// itself: the server resolves it. Through the others (`direct`), to
    /// the real address the session resolved for it, or, the first time,
    /// once the name is resolved (through the DNS engine's real
    /// resolvers, never the pool); datagrams that come meanwhile wait
    /// with the first. Either way the replies reach the client from
    /// `fake` (see `aliases.rs`, and docs/dns.md, Fake-ip).
    #[allow(clippy::too_many_arguments)]
    fn forward_named(
        self: &Arc<Self>,
        client: SocketAddr,
        fake: SocketAddr,
        name: Arc<str>,
        buf: &mut [u8],
        choice: Choice,
        session: Option<Arc<SessionShared>>,
        sniffed: Option<&Sniffed>,
    ) {
        // The name goes on the wire or to the resolver: checked once here.
        if !crate::hostname::is_host_name(&name) {
            return self.unresolved(client, fake, &name, 1, "not a host name");
        }
        if choice.outbound.udp_by_name() {
            let way = Some(FakeWay::Named(name));
            return self.forward(client, fake, buf, choice, session, sniffed, way);
        }
        if let Some(real) = session.as_deref().and_then(|s| s.real_of(fake)) {
            let way = Some(FakeWay::Resolved { fake });
            return self.forward(client, real, buf, choice, session, sniffed, way);
        }
        let key = (client, fake);
        {
            let mut resolving = lock(&self.resolving);
            if let Some(waiting) = resolving.get_mut(&key) {
                if waiting.len() < RESOLVING_QUEUE {
                    waiting.push(buf.to_vec());
                } else {
                    self.stats
                        .datagrams_dropped_queue
                        .fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            if resolving.len() >= MAX_RESOLVING {
                drop(resolving);
                return self.unresolved(client, fake, &name, 1, "too many names being resolved");
            }
            resolving.insert(key, vec![buf.to_vec()]);
        }
        let relay = Arc::clone(self);
        let sniffed = sniffed.cloned();
        tokio::spawn(async move {
            let real = match relay.router.fake_ip() {
                Some(pool) => real_for(fake, &pool.resolve_real(&name).await),
                None => None,
            };
            let waiting = lock(&relay.resolving).remove(&key).unwrap_or_default();
            let Some(real) = real else {
                let why = "the DNS engine found no real address for it";
                return relay.unresolved(client, fake, &name, waiting.len(), why);
            };
            debug!(proto = "udp", %client, %fake, %name, %real, "fake-ip destination resolved");
            for mut buf in waiting {
                let session = relay.session_of(client);
                let choice = choice.clone();
                relay.forward(
                    client,
                    real,
                    &mut buf,
                    choice,
                    session,
                    sniffed.as_ref(),
                    Some(FakeWay::Resolved { fake }),
                );
            }
        });
    }

    /// Counts and warns (rate-limited) about `dropped` datagrams to the
    /// fake-ip address `fake` whose `name` could not be resolved.
    fn unresolved(
        &self,
        client: SocketAddr,
        fake: SocketAddr,
        name: &str,
        dropped: usize,
        why: &str,
    ) {
        self.stats
            .datagrams_dropped_unresolved
            .fetch_add(dropped as u64, Ordering::Relaxed);
        if let Some(n) = self.warnings.unresolved.check() {
            warn!(%client, %fake, name, dropped, "UDP datagram to a fake-ip address dropped: no real address for its name ({why}){}", held_back(n));
        }
    }

    /// Sends a datagram through the upstream of `choice`'s outbound (one
    /// that carries UDP: the decision refused the others), through
    /// `session` (the client's, looked up by the caller) or a new one.
    /// `fake`: how it goes when the client wrote to a fake-ip address
    /// (`dst` is then the real address of its name, or for one sent by
    /// name the fake address itself); the session answers from it.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        self: &Arc<Self>,
        client: SocketAddr,
        dst: SocketAddr,
        buf: &mut [u8],
        choice: Choice,
        session: Option<Arc<SessionShared>>,
        sniffed: Option<&Sniffed>,
        fake: Option<FakeWay>,
    ) {
        let len = buf.len() - UDP_HEADROOM;
        let name = match &fake {
            Some(FakeWay::Named(name)) => Some(name),
            _ => None,
        };
        // Told to the session before the datagram leaves: no reply can
        // come before it.
        let aliased = |shared: &SessionShared| match &fake {
            Some(FakeWay::Resolved { fake }) => shared.add_alias(*fake, dst),
            Some(FakeWay::Named(name)) => shared.add_named(dst, name, choice.key),
            None => {}
        };
        let ready = session.and_then(|shared| Some((shared.ready(choice.key)?, shared)));
        if let Some((upstream, shared)) = ready {
            aliased(&shared);
            match upstream.try_send_to(buf, dst, name.map(|n| &**n)) {
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
                name: name.cloned(),
            })
        };

        let mut table = lock(&self.table);
        let mut reused = None;
        if let Some(entry) = table.sessions.get(&client) {
            let (id, shared) = (entry.id, Arc::clone(&entry.shared));
            aliased(&shared);
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
            host: sniffed
                .and_then(|s| s.host.clone())
                .or_else(|| name.map(|n| n.to_string())),
            sniffed: sniffed.map(|s| s.protocol),
            rule: Arc::clone(policy.rule_label(choice.rule)),
            chain: policy.chain_names(&choice),
        });
        let shared = Arc::new(SessionShared::new(choice.key, Arc::clone(flow.flow())));
        aliased(&shared);
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

    /// Drops a datagram to a fake-ip address, counted. No ICMP
    /// unreachable is sent: tproxyd holds no raw socket, and a client
    /// retrying its UDP gets nothing better from one; it asks DNS again
    /// once its cached answer expires (TTL 1 s).
    fn refuse_fake(&self, client: SocketAddr, dst: SocketAddr) {
        if let Some(pool) = self.router.fake_ip() {
            pool.stats.unmapped_udp.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(n) = self.warnings.fake.check() {
            warn!(%client, %dst, "UDP datagram to a fake-ip address that stands for no name dropped (the pool was lost or the address recycled); the client gets a new address when it asks DNS again{}", held_back(n))
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
        let dns = decide::is_dns(&self.router, dst);
        // The whole run goes to one destination, so one decision routes it.
        let session = self.session_of(client);
        let pin = session.as_deref().and_then(|s| s.pin.get());
        let outbound = match decide::route(&self.router, pin, client, dst) {
            // A fake-ip address goes datagram by datagram (by its name, or
            // refused, there): a run is never sent to it.
            Decision::Forward(_) if self.router.fake_ip().is_some_and(|p| p.is_fake(dst.ip())) => {
                None
            }
            Decision::Forward(choice) => Some(choice.key),
            Decision::RefuseLoop | Decision::RefuseFake => None,
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
}

/// The real address a fake-ip address `fake` stands for, from the real
/// addresses of its name: one of the fake address's family first (the
/// client wrote to that family), else any; the fake address's port.
fn real_for(fake: SocketAddr, addrs: &[std::net::IpAddr]) -> Option<SocketAddr> {
    addrs
        .iter()
        .find(|ip| ip.is_ipv4() == fake.is_ipv4())
        .or_else(|| addrs.first())
        .map(|ip| SocketAddr::new(*ip, fake.port()))
}

#[cfg(test)]
mod tests;
