//! DNS over UDP to one resolver, through whatever outbound a query is
//! given.
//!
//! Per outbound key, one association (the outbound's UDP upstream: a
//! marked socket for `direct`, a SOCKS5 UDP association, a shadowsocks
//! session) carries every query in flight; each goes out with a random id
//! of tproxyd's own (clients all start their ids somewhere, and a random
//! id is what makes a forged answer a guess), and the answer gets the
//! client's back. An answer is delivered only when it comes from the
//! resolver's address with a waiting id and the same question
//! ([`super::check_answer`]); anything else is dropped and the wait goes
//! on.
//!
//! A query unanswered after [`RETRY_AFTER`] (or whose association broke)
//! is sent once more on a fresh association, and the first answer from
//! either wins; when the fresh one answers, it replaces the shared one (a
//! source port a resolver or a NAT stopped answering is not used again).
//! An association is retired after [`ROTATE_AFTER`] or
//! [`ROTATE_QUERIES`], so the source port changes now and then (some
//! resolvers block one port that sends too much, zfl9/chinadns-ng#125).
//!
//! Outbounds that carry no UDP for DNS (configured so, or a SOCKS5
//! server that refused UDP ASSOCIATE, or an http proxy) get DNS over TCP
//! through the pools of [`crate::dns::tcp`], as does a truncated answer.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::time::Instant as Deadline;
use tracing::{debug, info};

use super::{check_answer, is_truncated, Cause, Check};
use crate::dns::message;
use crate::dns::tcp::Pools;
use crate::outbound::{
    DnsTransport, Failure, Outbound, OutboundError, UdpRecv, UdpUpstream, UDP_HEADROOM,
};

/// A query unanswered this long is sent again on a fresh association (at
/// most half the time left).
pub const RETRY_AFTER: Duration = Duration::from_secs(2);
/// An association older than this takes no new query.
pub const ROTATE_AFTER: Duration = Duration::from_secs(120);
/// Nor one that has carried this many.
pub const ROTATE_QUERIES: u32 = 10_000;
/// An association with nothing asked for this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// How often an association looks whether it is done.
const TICK: Duration = Duration::from_secs(1);
/// Queries waiting on one association at once.
const MAX_PENDING: usize = 4096;

type Reply = Result<Vec<u8>, Cause>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A random query id; a counter's next value if the system has no
/// randomness to give (never seen on Linux after boot).
fn random_id() -> u16 {
    static FALLBACK: portable_atomic::AtomicU32 = portable_atomic::AtomicU32::new(0x5bd1);
    getrandom::u32().map_or_else(
        |_| FALLBACK.fetch_add(40_503, std::sync::atomic::Ordering::Relaxed) as u16,
        |r| r as u16,
    )
}

/// The same resolver: the address and port (a scope id or flow label the
/// kernel reports need not be what was sent to).
fn same_server(from: SocketAddr, server: SocketAddr) -> bool {
    crate::sys::normalize(from).ip() == crate::sys::normalize(server).ip()
        && from.port() == server.port()
}

type AssocMap = Mutex<HashMap<u32, Arc<Assoc>>>;

/// One resolver reached over UDP.
pub(crate) struct UdpResolver {
    server: SocketAddr,
    assocs: Arc<AssocMap>,
    /// One association opened at a time: a burst of first queries shares
    /// the first, not one SOCKS5 association each.
    opening: tokio::sync::Mutex<()>,
    /// For truncated answers and outbounds without UDP.
    pools: Pools,
    /// Keys whose SOCKS5 server refused UDP ASSOCIATE: DNS over TCP from
    /// now on (a server's configuration rarely grows UDP).
    udp_refused: Mutex<HashSet<u32>>,
}

/// Why UDP did not carry the query.
enum UdpFailed {
    /// The outbound carries no UDP: ask over TCP instead.
    NoUdp,
    Cause(Cause),
}

impl From<Cause> for UdpFailed {
    fn from(c: Cause) -> UdpFailed {
        UdpFailed::Cause(c)
    }
}

impl UdpResolver {
    pub(crate) fn new(server: SocketAddr) -> UdpResolver {
        UdpResolver {
            server: crate::sys::normalize(server),
            assocs: Arc::default(),
            opening: tokio::sync::Mutex::new(()),
            pools: Pools::default(),
            udp_refused: Mutex::default(),
        }
    }

    pub(crate) fn server(&self) -> SocketAddr {
        self.server
    }

    pub(crate) fn retain(&self, keep: &dyn Fn(u32) -> bool) {
        lock(&self.assocs).retain(|k, _| keep(*k));
        lock(&self.udp_refused).retain(|k| keep(*k));
        self.pools.retain(keep);
    }

    /// Associations open now (for the tests).
    #[cfg(test)]
    pub(crate) fn associations(&self) -> usize {
        lock(&self.assocs).len()
    }

    /// Asks `query` (with the client's id) and returns the answer with
    /// the client's id, UDP until `deadline` for each attempt's wait, then
    /// over TCP when the answer was truncated.
    pub(crate) async fn exchange(
        &self,
        query: &[u8],
        key: u32,
        outbound: &Arc<Outbound>,
        deadline: Deadline,
    ) -> Reply {
        match outbound.udp_refusal() {
            Some(OutboundError::Blocked) => {
                return Err(Cause::Refused(OutboundError::Blocked.to_string()))
            }
            Some(_) => return self.over_tcp(query, key, outbound).await,
            None => {}
        }
        if outbound.dns_transport() == DnsTransport::Tcp || lock(&self.udp_refused).contains(&key) {
            return self.over_tcp(query, key, outbound).await;
        }
        match self.over_udp(query, key, outbound, deadline).await {
            Ok(answer) if is_truncated(&answer) => {
                debug!(resolver = %self.server, "truncated answer; asking again over TCP");
                self.over_tcp(query, key, outbound).await
            }
            Ok(answer) => Ok(answer),
            Err(UdpFailed::NoUdp) => self.over_tcp(query, key, outbound).await,
            Err(UdpFailed::Cause(c)) => Err(c),
        }
    }

    async fn over_tcp(&self, query: &[u8], key: u32, outbound: &Arc<Outbound>) -> Reply {
        self.pools
            .get(key, outbound, self.server)
            .exchange(query)
            .await
            .map_err(Cause::from)
    }

    async fn over_udp(
        &self,
        query: &[u8],
        key: u32,
        outbound: &Arc<Outbound>,
        deadline: Deadline,
    ) -> Result<Vec<u8>, UdpFailed> {
        let start = Deadline::now();
        let retry_at = start + RETRY_AFTER.min(deadline.saturating_duration_since(start) / 2);
        let timeout = Cause::Timeout(deadline.saturating_duration_since(start));
        let first = self.shared(key, outbound).await?;
        let mut last = timeout.clone();
        let mut first_rx = match first.ask(query).await {
            Ok(rx) => Some(rx),
            Err(c) => {
                last = c;
                None
            }
        };
        if first_rx.is_some() {
            tokio::select! {
                reply = recv_or_pending(&mut first_rx) => match reply {
                    Ok(answer) => return Ok(answer),
                    Err(c) => last = c,
                },
                () = tokio::time::sleep_until(retry_at) => last = timeout.clone(),
            }
        }
        // Once more, on a fresh association; the first still counts if its
        // answer comes late.
        debug!(resolver = %self.server, "UDP query: {last}; asking again on a fresh socket");
        let fresh = match self.open(key, outbound).await {
            Ok(a) => Some(a),
            Err(UdpFailed::NoUdp) => return Err(UdpFailed::NoUdp),
            Err(UdpFailed::Cause(c)) => {
                last = c;
                None
            }
        };
        let broken = first_rx.is_none();
        let mut fresh_rx = None;
        if let Some(fresh) = &fresh {
            if broken {
                // The shared one broke: the fresh one takes its place now.
                self.install(key, &first, fresh);
            }
            match fresh.ask(query).await {
                Ok(rx) => fresh_rx = Some(rx),
                Err(c) => last = c,
            }
        }
        while first_rx.is_some() || fresh_rx.is_some() {
            tokio::select! {
                reply = recv_or_pending(&mut first_rx) => match reply {
                    Ok(answer) => return Ok(answer),
                    Err(c) => last = c,
                },
                reply = recv_or_pending(&mut fresh_rx) => match reply {
                    Ok(answer) => {
                        if let Some(fresh) = &fresh {
                            self.install(key, &first, fresh);
                        }
                        return Ok(answer);
                    }
                    Err(c) => last = c,
                },
                () = tokio::time::sleep_until(deadline) => return Err(timeout.into()),
            }
        }
        Err(last.into())
    }

    /// Puts `fresh` in the place of `old` for the next queries, unless
    /// another query already replaced `old`.
    fn install(&self, key: u32, old: &Arc<Assoc>, fresh: &Arc<Assoc>) {
        let mut map = lock(&self.assocs);
        let replace = match map.get(&key) {
            Some(cur) => Arc::ptr_eq(cur, old) || !cur.usable(),
            None => true,
        };
        if replace {
            map.insert(key, Arc::clone(fresh));
        }
    }

    /// The association queries through `key` share, opened if there is
    /// none that takes queries.
    async fn shared(&self, key: u32, outbound: &Arc<Outbound>) -> Result<Arc<Assoc>, UdpFailed> {
        let current = || lock(&self.assocs).get(&key).filter(|a| a.usable()).cloned();
        if let Some(a) = current() {
            return Ok(a);
        }
        let _opening = self.opening.lock().await;
        if let Some(a) = current() {
            return Ok(a);
        }
        let a = self.open(key, outbound).await?;
        lock(&self.assocs).insert(key, Arc::clone(&a));
        Ok(a)
    }

    /// A new association through `outbound` (not shared until installed).
    async fn open(&self, key: u32, outbound: &Arc<Outbound>) -> Result<Arc<Assoc>, UdpFailed> {
        match outbound.open_udp().await {
            Ok(up) => {
                let a = Arc::new(Assoc::new(up, self.server));
                tokio::spawn(Arc::clone(&a).run(Arc::downgrade(&self.assocs), key));
                Ok(a)
            }
            Err(e) if e.failure() == Failure::UdpRefused => {
                if lock(&self.udp_refused).insert(key) {
                    info!(resolver = %self.server, outbound = outbound.name(), "{e}; DNS through it goes over TCP from now on");
                }
                Err(UdpFailed::NoUdp)
            }
            Err(e) if e.is_refusal() => Err(UdpFailed::NoUdp),
            Err(e) => Err(Cause::Unreachable(e.to_string()).into()),
        }
    }
}

/// The reply on `rx`, or never when there is no receiver; the receiver
/// is gone once it gave its reply.
async fn recv_or_pending(rx: &mut Option<oneshot::Receiver<Reply>>) -> Reply {
    let Some(r) = rx.as_mut() else {
        return std::future::pending().await;
    };
    let out = r.await.unwrap_or(Err(Cause::Lost));
    *rx = None;
    out
}

struct Pending {
    /// The query as sent (tproxyd's id in it), to check answers against.
    sent: Vec<u8>,
    client_id: u16,
    tx: oneshot::Sender<Reply>,
}

#[derive(Default)]
struct AssocState {
    pending: HashMap<u16, Pending>,
    /// Why it ended, once it has.
    closed: Option<Cause>,
    asked: u32,
    last_active: Option<Instant>,
}

/// One UDP upstream to the resolver and the queries waiting on it; its
/// task ([`Assoc::run`]) reads the answers.
struct Assoc {
    up: UdpUpstream,
    server: SocketAddr,
    opened: Instant,
    state: Mutex<AssocState>,
}

impl Assoc {
    fn new(up: UdpUpstream, server: SocketAddr) -> Assoc {
        Assoc {
            up,
            server,
            opened: Instant::now(),
            state: Mutex::default(),
        }
    }

    /// Whether new queries may use it: open, and not yet due to rotate.
    fn usable(&self) -> bool {
        let st = lock(&self.state);
        st.closed.is_none() && st.asked < ROTATE_QUERIES && self.opened.elapsed() < ROTATE_AFTER
    }

    /// Sends `query` with an id of its own; the receiver gets the answer
    /// with the client's id back.
    async fn ask(&self, query: &[u8]) -> Result<oneshot::Receiver<Reply>, Cause> {
        let client_id = message::id(query).ok_or(Cause::BadQuery)?;
        let mut buf = vec![0u8; UDP_HEADROOM + query.len()];
        let (tx, rx) = oneshot::channel();
        let wire_id = {
            let mut st = lock(&self.state);
            if let Some(why) = &st.closed {
                return Err(why.clone());
            }
            if st.pending.len() >= MAX_PENDING {
                // Callers that gave up leave their entry behind.
                st.pending.retain(|_, p| !p.tx.is_closed());
                if st.pending.len() >= MAX_PENDING {
                    return Err(Cause::Busy);
                }
            }
            let mut wire_id = random_id();
            while st.pending.contains_key(&wire_id) {
                wire_id = random_id();
            }
            let payload = &mut buf[UDP_HEADROOM..];
            payload.copy_from_slice(query);
            message::set_id(payload, wire_id);
            st.pending.insert(
                wire_id,
                Pending {
                    sent: payload.to_vec(),
                    client_id,
                    tx,
                },
            );
            st.asked = st.asked.saturating_add(1);
            st.last_active = Some(Instant::now());
            wire_id
        };
        if let Err(e) = self.up.send(&mut buf, self.server).await {
            lock(&self.state).pending.remove(&wire_id);
            return Err(Cause::Unreachable(format!("cannot send: {e}")));
        }
        Ok(rx)
    }

    /// Hands a datagram from the resolver to the query it answers, if any.
    fn deliver(&self, answer: &[u8]) {
        let Some(wire_id) = message::id(answer) else {
            return;
        };
        let mut st = lock(&self.state);
        let check = st
            .pending
            .get(&wire_id)
            .map(|p| check_answer(&p.sent, answer));
        match check {
            Some(Check::Match) => {}
            Some(other) => {
                debug!(resolver = %self.server, wire_id, ?other, "UDP answer dropped: it does not answer the query with its id");
                return;
            }
            None => {
                debug!(resolver = %self.server, wire_id, "UDP answer dropped: no query waits with its id");
                return;
            }
        }
        let Some(p) = st.pending.remove(&wire_id) else {
            return;
        };
        st.last_active = Some(Instant::now());
        drop(st);
        let mut out = answer.to_vec();
        message::set_id(&mut out, p.client_id);
        let _ = p.tx.send(Ok(out));
    }

    /// Ends it: later queries are refused, and every query waiting gets
    /// `why` (its caller then asks on a fresh one).
    fn close(&self, why: Cause) {
        let pending = {
            let mut st = lock(&self.state);
            st.closed.get_or_insert(why.clone());
            std::mem::take(&mut st.pending)
        };
        for (_, p) in pending {
            let _ = p.tx.send(Err(why.clone()));
        }
    }

    /// Whether it can end: nothing waits, and it is idle, rotated out or
    /// no longer the one queries through `key` share.
    fn done(self: &Arc<Self>, map: &Weak<AssocMap>, key: u32) -> bool {
        {
            let mut st = lock(&self.state);
            st.pending.retain(|_, p| !p.tx.is_closed());
            if !st.pending.is_empty() {
                return false;
            }
            if st.last_active.is_none_or(|t| t.elapsed() >= IDLE) {
                return true;
            }
        }
        if !self.usable() {
            return true;
        }
        map.upgrade()
            .is_none_or(|m| lock(&m).get(&key).is_none_or(|cur| !Arc::ptr_eq(cur, self)))
    }

    /// Reads answers until the upstream fails or closes, or it is done.
    async fn run(self: Arc<Self>, map: Weak<AssocMap>, key: u32) {
        let mut buf = vec![0u8; 65_536];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let why = loop {
            tokio::select! {
                r = self.up.recv(&mut buf) => match r {
                    Ok(UdpRecv::Datagram { from, start, end }) => {
                        if !same_server(from, self.server) {
                            debug!(resolver = %self.server, %from, "UDP datagram from another address dropped");
                        } else if let Some(answer) = buf.get(start..end) {
                            self.deliver(answer);
                        }
                    }
                    Ok(UdpRecv::Named { port, .. }) => {
                        debug!(resolver = %self.server, "UDP datagram from a name (port {port}) dropped: a resolver is asked by address");
                    }
                    Ok(UdpRecv::Dropped(why)) => {
                        debug!(resolver = %self.server, "UDP datagram dropped: {why}");
                    }
                    Err(e) => break Cause::Unreachable(format!("the UDP upstream failed: {e}")),
                },
                why = self.up.closed() => break Cause::Unreachable(format!("the UDP upstream closed: {why}")),
                _ = tick.tick() => {
                    if self.done(&map, key) {
                        break Cause::Lost;
                    }
                }
            }
        };
        debug!(resolver = %self.server, "UDP association ends: {why}");
        self.close(why);
        if let Some(map) = map.upgrade() {
            let mut m = lock(&map);
            if m.get(&key).is_some_and(|cur| Arc::ptr_eq(cur, &self)) {
                m.remove(&key);
            }
        }
    }
}
