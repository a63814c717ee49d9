//! Held datagrams: a new UDP flow whose first datagram is a QUIC Initial
//! waits, bounded, until the server name in its ClientHello is known, and
//! is then routed by that name.
//!
//! Only when some rule looks at names or protocols, and only for a client
//! with no session yet (a new QUIC connection uses a new client port). Its
//! datagrams to that destination are kept, in order, until the sniffer
//! ([`QuicSniff`]) answers, at most [`HOLD_DATAGRAMS`] datagrams,
//! [`HOLD_BYTES`] bytes or [`HOLD_WAIT`]; then the route is decided once,
//! with the name and protocol `quic`, and the held datagrams go out in
//! order through it. Nothing is dialed before that: Xray dialed at the
//! first datagram and so routed QUIC by address (Xray-core #4665). A sniff
//! that fails or times out routes by address; either way the flow has
//! cost only the wait for its held datagrams. A ClientHello that fits one
//! Initial (most, without post-quantum key shares) waits for nothing.
//!
//! Rules decide per datagram by destination, and a QUIC connection's later
//! datagrams carry no name, so the route found is pinned on the session
//! for that destination ([`decide::Pin`]): the rest of the connection
//! follows it.
//!
//! What to do at each step (hold a first Initial or not, release when,
//! route by which name) is decided in `decide.rs`; this file keeps the
//! held datagrams, their timers and the refused flows' memory.
//!
//! The inbound's hot path is unchanged for everything else: a datagram
//! that is no Initial, while nothing is held, costs one atomic load and a
//! look at its first byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use portable_atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::debug;

use super::decide::{self, Opening};
use super::{lock, UdpRelay};
use crate::outbound::UDP_HEADROOM;
use crate::policy::sniff::quic::{self, QuicAnswer, QuicSniff};
use crate::policy::sniff::Sniffed;
use crate::policy::Choice;

/// Longest a flow waits for its name, like the TCP sniff's wait: the
/// rest of a first flight follows its first datagram within microseconds;
/// a client whose next Initial is later is retransmitting, and routing it
/// by address then is better than waiting on.
pub const HOLD_WAIT: Duration = Duration::from_millis(300);
/// Most datagrams held per flow (the sniffer reads no more).
pub const HOLD_DATAGRAMS: usize = quic::MAX_DATAGRAMS;
/// Most payload bytes held per flow: a first flight of Initials is a few
/// datagrams of about 1,250 bytes.
pub const HOLD_BYTES: usize = 16 * 1024;
/// Most flows held at once; beyond that new QUIC flows are routed by
/// address at once. Bounds what a flood of Initials can make us keep:
/// 256 × 16 KiB.
pub const MAX_HOLDS: usize = 256;

/// How long a flow whose name a rule refuses (`block`) stays refused. It
/// opens no session to pin the route on, and its client retransmits
/// Initials (some only PING and PADDING, with no name to read) for as
/// long as its handshake timeout: sniffed again, those would go by
/// address and reach the server.
pub const REFUSED_MEMORY: Duration = Duration::from_secs(30);
/// Most refused flows remembered at once.
pub const MAX_REFUSED: usize = 1024;

/// A refused flow's route, until `until`.
struct Refused {
    dst: SocketAddr,
    choice: Choice,
    until: Instant,
}

/// Counters of the holds.
#[derive(Debug, Default)]
pub struct HoldStats {
    /// Flows whose first datagram was held (their ClientHello needed more
    /// than one datagram).
    pub flows_held: AtomicU64,
    /// Flows routed with a name found in their QUIC Initials.
    pub quic_named: AtomicU64,
    /// QUIC flows without a usable name (none sent, or not within the
    /// bounds): routed as protocol `quic` by address.
    pub quic_nameless: AtomicU64,
    /// Held flows released by [`HOLD_WAIT`] before the sniff ended.
    pub timeouts: AtomicU64,
    /// New QUIC flows routed by address because [`MAX_HOLDS`] were held.
    pub over_limit: AtomicU64,
}

/// One held flow.
struct Hold {
    /// Tells the timer's hold from a later one of the same client.
    id: u64,
    dst: SocketAddr,
    sniff: QuicSniff,
    /// The datagrams as the inbound framed them (headroom included).
    datagrams: Vec<Vec<u8>>,
    bytes: usize,
    started: Instant,
}

/// The relay's held flows, by client address:port.
#[derive(Default)]
pub(super) struct Holds {
    /// Some rule looks at names or protocols; otherwise nothing is held.
    /// A reload may turn it either way.
    enabled: std::sync::atomic::AtomicBool,
    /// How many flows are held: the inbound looks at the map only when
    /// this is not zero or the datagram is an Initial.
    held: AtomicUsize,
    map: Mutex<HashMap<SocketAddr, Hold>>,
    /// Flows whose name a rule refused, by client (taken after `map`).
    refused: Mutex<HashMap<SocketAddr, Refused>>,
    next_id: AtomicU64,
    /// [`HOLD_WAIT`], in milliseconds; a test stretches it so that a slow
    /// (debug, loaded) machine cannot expire holds while it is still
    /// filling the table.
    wait_ms: AtomicU64,
    pub stats: HoldStats,
}

impl Holds {
    pub fn new(enabled: bool) -> Holds {
        Holds {
            enabled: std::sync::atomic::AtomicBool::new(enabled),
            wait_ms: AtomicU64::new(HOLD_WAIT.as_millis() as u64),
            ..Holds::default()
        }
    }

    /// How long a flow is held at most before it goes by address.
    fn wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms.load(Ordering::Relaxed))
    }

    #[cfg(test)]
    fn set_wait(&self, wait: Duration) {
        self.wait_ms
            .store(wait.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// After a reload: hold (or stop holding) new QUIC flows.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    /// The route a client's flow to `dst` was refused by, a moment ago.
    fn refused_route(&self, client: SocketAddr, dst: SocketAddr) -> Option<Choice> {
        let mut refused = lock(&self.refused);
        let r = refused.get(&client)?;
        if r.until <= Instant::now() {
            refused.remove(&client);
            return None;
        }
        (r.dst == dst).then(|| r.choice.clone())
    }

    fn remember_refused(&self, client: SocketAddr, dst: SocketAddr, choice: &Choice) {
        let mut refused = lock(&self.refused);
        let now = Instant::now();
        if refused.len() >= MAX_REFUSED {
            refused.retain(|_, r| r.until > now);
        }
        if refused.len() < MAX_REFUSED || refused.contains_key(&client) {
            refused.insert(
                client,
                Refused {
                    dst,
                    choice: choice.clone(),
                    until: now + REFUSED_MEMORY,
                },
            );
        }
    }

    /// Held flows now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

/// The inbound's hook, before the route decision: takes the datagram when
/// it belongs to a held flow or starts one (true), or leaves it to the
/// usual path (false). Call only when [`Holds::enabled`].
///
/// Lock order: the holds' map, then the session table (the usual path
/// never takes the map while it holds the table).
pub(super) fn intercept(
    relay: &Arc<UdpRelay>,
    client: SocketAddr,
    dst: SocketAddr,
    buf: &mut [u8],
) -> bool {
    let holds = &relay.holds;
    let initial = quic::looks_like_initial(&buf[UDP_HEADROOM..]);
    if !initial && holds.held.load(Ordering::Acquire) == 0 {
        return false;
    }
    let mut map = lock(&holds.map);
    if let Some(hold) = map.get_mut(&client) {
        if hold.dst != dst {
            return false; // another destination goes its own way
        }
        let payload = &buf[UDP_HEADROOM..];
        hold.bytes += payload.len();
        hold.datagrams.push(buf.to_vec());
        let answer = hold.sniff.push(payload);
        if !decide::release_now(&answer, hold.datagrams.len(), hold.bytes) {
            return true;
        }
        if let Some(hold) = map.remove(&client) {
            // Released with the map still locked: a datagram of this flow
            // arriving meanwhile waits, and then finds the pin.
            release(relay, client, hold, answer, "sniffed");
            holds.held.fetch_sub(1, Ordering::AcqRel);
        }
        return true;
    }
    // Only a new session starts a hold: an established one is routed
    // already, and its Initials are retransmissions.
    if !initial || lock(&relay.table).sessions.contains_key(&client) {
        return false;
    }
    // A fake-ip destination carries its name already: never held, and
    // never sent as held datagrams are (to the address as it is).
    if relay.router.fake_ip().is_some_and(|p| p.is_fake(dst.ip())) {
        return false;
    }
    // A retransmission of a flow refused by its name stays refused.
    if let Some(choice) = holds.refused_route(client, dst) {
        relay.carry(client, buf, decide::carried(dst, choice), None, None);
        return true;
    }
    let mut sniff = QuicSniff::new();
    let payload = &buf[UDP_HEADROOM..];
    match decide::opening(sniff.push(payload), map.len()) {
        Opening::ByAddress => false,
        Opening::RouteNow(sniffed) => {
            route(
                relay,
                client,
                dst,
                sniffed,
                std::iter::once(buf),
                Instant::now(),
                "sniffed",
            );
            true
        }
        Opening::OverLimit => {
            holds.stats.over_limit.fetch_add(1, Ordering::Relaxed);
            false
        }
        Opening::Hold => {
            let id = holds.next_id.fetch_add(1, Ordering::Relaxed);
            map.insert(
                client,
                Hold {
                    id,
                    dst,
                    sniff,
                    bytes: payload.len(),
                    datagrams: vec![buf.to_vec()],
                    started: Instant::now(),
                },
            );
            holds.held.fetch_add(1, Ordering::AcqRel);
            holds.stats.flows_held.fetch_add(1, Ordering::Relaxed);
            let wait = holds.wait();
            let relay = Arc::clone(relay);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                expire(&relay, client, id);
            });
            true
        }
    }
}

/// The timer's end of a hold: releases it, by address, if the sniff has
/// not ended it already.
fn expire(relay: &Arc<UdpRelay>, client: SocketAddr, id: u64) {
    let holds = &relay.holds;
    let mut map = lock(&holds.map);
    if map.get(&client).is_some_and(|h| h.id == id) {
        if let Some(hold) = map.remove(&client) {
            holds.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            release(relay, client, hold, QuicAnswer::NeedMore, "timeout");
            holds.held.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Routes a held flow by what the sniff found and sends its datagrams.
fn release(relay: &Arc<UdpRelay>, client: SocketAddr, hold: Hold, answer: QuicAnswer, why: &str) {
    let sniffed = decide::sniffed_of(answer);
    let Hold {
        dst,
        mut datagrams,
        started,
        ..
    } = hold;
    let bufs = datagrams.iter_mut().map(|d| d.as_mut_slice());
    route(relay, client, dst, sniffed, bufs, started, why);
}

/// Decides the route of a QUIC flow once, with its name, pins it on the
/// session, and sends `datagrams` through it in order.
fn route<'a>(
    relay: &Arc<UdpRelay>,
    client: SocketAddr,
    dst: SocketAddr,
    sniffed: Option<Sniffed>,
    datagrams: impl Iterator<Item = &'a mut [u8]>,
    started: Instant,
    why: &str,
) {
    let stats = &relay.holds.stats;
    let host = sniffed.as_ref().and_then(|s| s.host.as_deref());
    match (&sniffed, host) {
        (Some(_), Some(_)) => &stats.quic_named,
        _ => &stats.quic_nameless,
    }
    .fetch_add(1, Ordering::Relaxed);
    let Some(choice) = decide::sniffed_route(&relay.router, client, dst, sniffed.as_ref()) else {
        return;
    };
    if choice.outbound.udp_refusal().is_some() {
        relay.holds.remember_refused(client, dst, &choice);
    }
    let mut held = 0usize;
    for (i, buf) in datagrams.enumerate() {
        let named = if i == 0 { sniffed.as_ref() } else { None };
        let verdict = decide::carried(dst, choice.clone());
        relay.carry(client, buf, verdict, relay.session_of(client), named);
        if i == 0 {
            // The first datagram opened the session (unless the route
            // refuses UDP): the rest of the connection follows it.
            if let Some(shared) = relay.session_of(client) {
                let _ = shared.pin.set(decide::Pin {
                    dst,
                    choice: choice.clone(),
                });
            }
        }
        held += 1;
    }
    debug!(
        proto = "udp", %client, %dst, host, sniffed = "quic",
        outbound = %relay.router.policy().route(&choice),
        held, waited_us = started.elapsed().as_micros() as u64, why,
        "QUIC flow routed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, Timeouts};
    use crate::policy::sniff::quic::{crypto_frame, seal_initial, Version};
    use crate::policy::sniff::tls::tests::client_hello;

    const DCID: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    /// Outbound `a` (direct, final) and `b` (direct too, or `block`),
    /// with QUIC flows named *.via-b.example sent through `b`.
    fn relay(b_kind: &str) -> Arc<UdpRelay> {
        let text = format!(
            "[[outbounds]]\nname = \"a\"\ntype = \"direct\"\n\
             [[outbounds]]\nname = \"b\"\ntype = \"{b_kind}\"\n\
             [route]\nfinal = \"a\"\n\
             [[route.rules]]\ndomain_suffix = [\"via-b.example\"]\noutbound = \"b\"\n\
             [firewall]\nbackend = \"none\"\n"
        );
        let limits = Limits {
            udp_sessions: 16,
            udp_sessions_per_client: 16,
            udp_reply_sockets: 4,
            threads: 1,
            tcp_flows: 16,
            tcp_connecting_per_client: 16,
        };
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            tcp_idle: Duration::from_secs(1),
            udp_idle: Duration::from_secs(60),
            udp_dns_idle: Duration::from_secs(10),
            udp_unreplied: Duration::from_secs(10),
        };
        super::super::tests::relay_from_toml(&text, limits, timeouts)
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; UDP_HEADROOM];
        buf.extend_from_slice(payload);
        buf
    }

    /// A first flight over two datagrams (post-quantum sized ClientHello).
    fn flight(sni: &str) -> [Vec<u8>; 2] {
        let hello = client_hello(Some(sni), 1216);
        [
            seal_initial(
                Version::V1,
                &DCID,
                b"",
                1,
                2,
                &crypto_frame(0, &hello[..1000]),
                1250,
            ),
            seal_initial(
                Version::V1,
                &DCID,
                b"",
                2,
                2,
                &crypto_frame(1000, &hello[1000..]),
                1250,
            ),
        ]
    }

    fn sink() -> (std::net::UdpSocket, SocketAddr) {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    }

    fn recv(s: &std::net::UdpSocket) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        let n = s.recv(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// The policy index of the outbound of `client`'s first leg.
    fn first_leg(relay: &UdpRelay, client: SocketAddr) -> Option<usize> {
        let key = {
            let table = lock(&relay.table);
            table.sessions.get(&client)?.shared.first.outbound
        };
        Some(crate::relay::udp::tests::index_of_key(relay, key))
    }

    fn pinned(relay: &UdpRelay, client: SocketAddr) -> Option<(SocketAddr, usize)> {
        let shared = relay.session_of(client)?;
        let pin = shared.pin.get()?;
        Some((pin.dst, pin.choice.index))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_two_datagram_flight_is_held_then_routed_by_name_in_order() {
        let relay = relay("direct");
        let (sink, dst) = sink();
        let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let [d1, d2] = flight("www.via-b.example");
        relay.dispatch(client, dst, &mut framed(&d1));
        // Held: no session, nothing sent.
        assert_eq!(relay.holds.len(), 1);
        assert!(relay.session_of(client).is_none());
        relay.dispatch(client, dst, &mut framed(&d2));
        assert_eq!(relay.holds.len(), 0);
        assert_eq!(recv(&sink), d1, "held datagrams go out in order");
        assert_eq!(recv(&sink), d2);
        assert_eq!(
            first_leg(&relay, client),
            Some(1),
            "routed by the name to b"
        );
        assert_eq!(pinned(&relay, client), Some((dst, 1)));
        // A later 1-RTT datagram (short header) follows the pin, though
        // its address alone would go to a.
        relay.dispatch(client, dst, &mut framed(b"\x40short header"));
        assert_eq!(recv(&sink), b"\x40short header");
        assert_eq!(first_leg(&relay, client), Some(1));
        let s = &relay.holds.stats;
        assert_eq!(s.flows_held.load(Ordering::Relaxed), 1);
        assert_eq!(s.quic_named.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_one_datagram_client_hello_is_never_held() {
        let relay = relay("direct");
        let (sink, dst) = sink();
        let client: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        let hello = client_hello(Some("x.via-b.example"), 0);
        let d = seal_initial(
            Version::V2,
            &DCID,
            b"",
            0,
            1,
            &crypto_frame(0, &hello),
            1200,
        );
        relay.dispatch(client, dst, &mut framed(&d));
        assert_eq!(relay.holds.stats.flows_held.load(Ordering::Relaxed), 0);
        assert_eq!(recv(&sink), d);
        assert_eq!(first_leg(&relay, client), Some(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_name_no_rule_matches_and_other_udp_go_by_address() {
        let relay = relay("direct");
        let (sink, dst) = sink();
        let client: SocketAddr = "127.0.0.1:5002".parse().unwrap();
        let [d1, d2] = flight("elsewhere.example");
        relay.dispatch(client, dst, &mut framed(&d1));
        relay.dispatch(client, dst, &mut framed(&d2));
        assert_eq!(recv(&sink), d1);
        assert_eq!(recv(&sink), d2);
        assert_eq!(first_leg(&relay, client), Some(0));
        // Not QUIC: sent at once, never held.
        let other: SocketAddr = "127.0.0.1:5003".parse().unwrap();
        relay.dispatch(other, dst, &mut framed(b"a game tick"));
        assert_eq!(recv(&sink), b"a game tick");
        // A datagram that looks like an Initial but does not open.
        let mut fake = d1.clone();
        let last = fake.len() - 1;
        fake[last] ^= 1;
        let third: SocketAddr = "127.0.0.1:5004".parse().unwrap();
        relay.dispatch(third, dst, &mut framed(&fake));
        assert_eq!(recv(&sink), fake);
        assert_eq!(relay.holds.stats.flows_held.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_incomplete_flight_is_released_by_address_after_the_wait() {
        let relay = relay("direct");
        let (sink, dst) = sink();
        let client: SocketAddr = "127.0.0.1:5005".parse().unwrap();
        let [d1, _] = flight("www.via-b.example");
        let started = Instant::now();
        relay.dispatch(client, dst, &mut framed(&d1));
        assert_eq!(recv(&sink), d1);
        let waited = started.elapsed();
        assert!(waited >= HOLD_WAIT, "{waited:?}");
        assert!(waited < HOLD_WAIT * 4, "{waited:?}");
        assert_eq!(first_leg(&relay, client), Some(0), "by address");
        assert_eq!(relay.holds.stats.timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(relay.holds.len(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_blocked_name_costs_only_the_held_datagrams() {
        let relay = relay("block");
        let (sink, dst) = sink();
        sink.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let client: SocketAddr = "127.0.0.1:5006".parse().unwrap();
        let [d1, d2] = flight("www.via-b.example");
        relay.dispatch(client, dst, &mut framed(&d1));
        relay.dispatch(client, dst, &mut framed(&d2));
        assert!(sink.recv(&mut [0u8; 64]).is_err(), "a blocked flow leaked");
        assert!(relay.session_of(client).is_none());
        assert_eq!(relay.stats.datagrams_refused.load(Ordering::Relaxed), 2);
        // The client's retransmission, here a PING-only Initial with no
        // name to read: refused as its flow was, not sent by address.
        let ping = seal_initial(Version::V1, &DCID, b"", 3, 2, &[0x01], 1250);
        relay.dispatch(client, dst, &mut framed(&ping));
        assert!(
            sink.recv(&mut [0u8; 64]).is_err(),
            "a retransmission leaked"
        );
        assert_eq!(relay.stats.datagrams_refused.load(Ordering::Relaxed), 3);
        assert_eq!(relay.holds.len(), 0);
        // Another client port is a new flow, sniffed anew.
        let other: SocketAddr = "127.0.0.1:5099".parse().unwrap();
        relay.dispatch(other, dst, &mut framed(&ping));
        assert_eq!(relay.holds.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn holds_are_bounded_in_datagrams_and_flows() {
        let relay = relay("direct");
        // Filling the table takes a debug build on a loaded machine longer
        // than HOLD_WAIT: no hold may expire before the bound is reached.
        relay.holds.set_wait(Duration::from_secs(60));
        let (sink, dst) = sink();
        let client: SocketAddr = "127.0.0.1:5007".parse().unwrap();
        // Initials whose CRYPTO data never starts at 0: the sniff never
        // ends, the datagram bound releases them as nameless QUIC.
        let hello = client_hello(Some("www.via-b.example"), 0);
        let sent: Vec<Vec<u8>> = (0..HOLD_DATAGRAMS as u64)
            .map(|pn| {
                seal_initial(
                    Version::V1,
                    &DCID,
                    b"",
                    pn,
                    2,
                    &crypto_frame(50, &hello[50..60]),
                    1200,
                )
            })
            .collect();
        for d in &sent {
            relay.dispatch(client, dst, &mut framed(d));
        }
        for d in &sent {
            assert_eq!(&recv(&sink), d);
        }
        assert_eq!(relay.holds.stats.quic_nameless.load(Ordering::Relaxed), 1);
        // At MAX_HOLDS held flows, a new one goes by address at once.
        for p in 0..MAX_HOLDS as u16 {
            let c: SocketAddr = ([127, 0, 0, 1], 20_000 + p).into();
            relay.dispatch(c, dst, &mut framed(&sent[0]));
        }
        assert_eq!(relay.holds.len(), MAX_HOLDS);
        let extra: SocketAddr = "127.0.0.1:6000".parse().unwrap();
        relay.dispatch(extra, dst, &mut framed(&sent[0]));
        assert_eq!(relay.holds.stats.over_limit.load(Ordering::Relaxed), 1);
        assert_eq!(recv(&sink), sent[0]);
    }
}
