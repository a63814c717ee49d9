//! The registry of live flows: every TCP flow and UDP session, from the
//! route decision to its end, with its byte counters and, once it ended,
//! why.
//!
//! One registry per server. The API lists and closes flows through it,
//! the metrics read its totals, and the `--verbose` flow line is written
//! by it when a flow ends, so all three tell the same story.
//!
//! Costs on the data path: registering a flow takes one shard lock and one
//! allocation; its byte counters are the ones the relay counts in anyway;
//! the per-outbound totals are brought up to date once a second by
//! [`Registry::tick`] and when a flow ends, never per byte.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use portable_atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures_util::task::AtomicWaker;

use tokio::sync::Notify;
use tracing::debug;

use crate::config::{Network, SniffProtocol};
use crate::outbound::Failure;

/// Why a flow ended. A metric label and a log field: a fixed set, never a
/// free-form string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EndReason {
    /// Both sides finished (FIN both ways).
    Closed = 1,
    /// No byte either way for the idle timeout.
    Idle,
    /// The client reset the connection or failed.
    ClientError,
    /// The upstream reset or failed mid-flow; the client was reset.
    UpstreamError,
    /// The destination (or the proxy on its behalf) refused the connect.
    UpstreamRefused,
    /// The connect, or the proxy's answer, took longer than allowed.
    ConnectTimeout,
    /// The proxy itself could not be reached or broke its protocol.
    ProxyFailed,
    /// A rule sent the flow to a `block` outbound.
    Blocked,
    /// Closed from the API (`DELETE /connections`).
    ClosedByApi,
    /// A UDP session ended to make room for others (limits).
    Evicted,
    /// The outbound could not open an upstream: for a UDP session, or
    /// for any flow when file descriptors ran out.
    OpenFailed,
    /// tproxyd stopped.
    Shutdown,
}

/// Why a flow that failed to connect ended, from what the outbound says
/// went wrong (protocol-free: the registry never names a proxy kind).
impl From<Failure> for EndReason {
    fn from(failure: Failure) -> EndReason {
        match failure {
            Failure::Refused => EndReason::Blocked,
            Failure::DestinationRefused => EndReason::UpstreamRefused,
            // Either way the connect took longer than allowed: the
            // destination's answer, or the proxy's on its behalf.
            Failure::DestinationTimeout | Failure::ProxyTimeout => EndReason::ConnectTimeout,
            Failure::ProxyFailed | Failure::UdpRefused => EndReason::ProxyFailed,
            // Our own shortage, not the destination's or the proxy's: the
            // upstream side could not be opened.
            Failure::OutOfDescriptors => EndReason::OpenFailed,
        }
    }
}

impl EndReason {
    pub const ALL: [EndReason; 12] = [
        EndReason::Closed,
        EndReason::Idle,
        EndReason::ClientError,
        EndReason::UpstreamError,
        EndReason::UpstreamRefused,
        EndReason::ConnectTimeout,
        EndReason::ProxyFailed,
        EndReason::Blocked,
        EndReason::ClosedByApi,
        EndReason::Evicted,
        EndReason::OpenFailed,
        EndReason::Shutdown,
    ];

    /// The label value: lowercase, hyphenated, stable.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Closed => "closed",
            EndReason::Idle => "idle-timeout",
            EndReason::ClientError => "client-error",
            EndReason::UpstreamError => "upstream-error",
            EndReason::UpstreamRefused => "upstream-refused",
            EndReason::ConnectTimeout => "connect-timeout",
            EndReason::ProxyFailed => "proxy-failed",
            EndReason::Blocked => "blocked",
            EndReason::ClosedByApi => "closed-by-api",
            EndReason::Evicted => "evicted",
            EndReason::OpenFailed => "open-failed",
            EndReason::Shutdown => "shutdown",
        }
    }

    fn from_u8(v: u8) -> Option<EndReason> {
        EndReason::ALL.into_iter().find(|r| *r as u8 == v)
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rule that sent a flow where it went, as the API shows it. Kept by
/// the flow itself: after a reload its rule may no longer exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleLabel {
    /// Position in `route.rules`; None for `route.final`.
    pub index: Option<usize>,
    /// The rule's kind in the Clash API's words (`DomainSuffix`,
    /// `IPCIDR`, `AND` for several keys, `Match` for final).
    pub kind: &'static str,
    /// What it matches, as written in the config.
    pub payload: String,
}

/// Bytes moved by a flow, counted by whoever moves them: the TCP relay
/// per splice or copy, the UDP relay per datagram.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Client to upstream.
    pub up: AtomicU64,
    /// Upstream to client.
    pub down: AtomicU64,
}

impl Traffic {
    pub fn add_up(&self, n: u64) {
        self.up.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_down(&self, n: u64) {
        self.down.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// What a flow is when it is registered.
#[derive(Debug, Clone)]
pub struct FlowStart {
    pub network: Network,
    pub client: SocketAddr,
    /// The original destination (for a UDP session: of its first datagram).
    pub dst: SocketAddr,
    pub host: Option<String>,
    pub sniffed: Option<SniffProtocol>,
    pub rule: Arc<RuleLabel>,
    /// The outbound that carries the flow first, then the groups it was
    /// reached through, innermost first: the Clash API's `chains` order.
    pub chain: Vec<Arc<str>>,
}

/// One live flow.
#[derive(Debug)]
pub struct Flow {
    pub id: u64,
    pub start: FlowStart,
    pub started_at: SystemTime,
    started: Instant,
    pub traffic: Traffic,
    /// What the totals have been told so far (see [`Registry::tick`]).
    reported_up: AtomicU64,
    reported_down: AtomicU64,
    /// Set by [`Registry::close`]; the flow's task ends it at its next look.
    close_requested: AtomicBool,
    close_reason: AtomicU8,
    close: Notify,
    /// The flow's own task, waiting in [`Flow::closed`]: woken without
    /// the lock [`Notify`] takes at every poll, once per wake-up of a
    /// TCP flow's task.
    owner: AtomicWaker,
}

impl Flow {
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Resolves when the flow is asked to close from outside; at once if
    /// it already was.
    pub async fn close_requested(&self) -> EndReason {
        loop {
            let notified = self.close.notified();
            if self.close_requested.load(Ordering::Acquire) {
                return EndReason::from_u8(self.close_reason.load(Ordering::Relaxed))
                    .unwrap_or(EndReason::ClosedByApi);
            }
            notified.await;
        }
    }

    /// As [`Flow::close_requested`], for the one task that carries the
    /// flow (a TCP flow's): a second task waiting here at the same time
    /// would take the wake-up from the first. Waiting costs a few atomic
    /// operations per poll, and nothing to stop.
    pub fn closed(&self) -> Closed<'_> {
        Closed { flow: self }
    }

    fn requested_reason(&self) -> Option<EndReason> {
        self.close_requested.load(Ordering::Acquire).then(|| {
            EndReason::from_u8(self.close_reason.load(Ordering::Relaxed))
                .unwrap_or(EndReason::ClosedByApi)
        })
    }

    /// Whether a close was asked for (for loops that poll).
    pub fn is_close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    fn request_close(&self, reason: EndReason) {
        self.close_reason.store(reason as u8, Ordering::Relaxed);
        self.close_requested.store(true, Ordering::Release);
        self.close.notify_waiters();
        // A task between its check and its wait gets the permit instead.
        self.close.notify_one();
        self.owner.wake();
    }

    /// Bytes not yet added to the totals, marking them added.
    fn take_unreported(&self) -> (u64, u64) {
        let (up, down) = self.traffic.get();
        let up_before = self.reported_up.swap(up, Ordering::Relaxed);
        let down_before = self.reported_down.swap(down, Ordering::Relaxed);
        (
            up.saturating_sub(up_before),
            down.saturating_sub(down_before),
        )
    }
}

/// The registry's maps: keyed by what tproxyd itself makes (flow ids it
/// numbers, outbound names from the config, fixed enums), never by what a
/// client sends, so SipHash's defence against chosen keys buys nothing,
/// and at seven lookups per flow it cost more than the rest of the
/// bookkeeping.
pub type Map<K, V> = HashMap<K, V, BuildHasherDefault<FastHash>>;

/// A multiply-rotate hash (as rustc's FxHash) for [`Map`].
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHash(u64);

impl FastHash {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FastHash {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // The table takes its bucket from the low bits, which the multiply
        // leaves poorly mixed (a shard's flow ids are all alike mod 16):
        // bring the well-mixed high bits down.
        self.0.rotate_left(26)
    }
}

/// The wait of [`Flow::closed`].
#[derive(Debug)]
pub struct Closed<'a> {
    flow: &'a Flow,
}

impl Future for Closed<'_> {
    type Output = EndReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<EndReason> {
        if let Some(reason) = self.flow.requested_reason() {
            return Poll::Ready(reason);
        }
        self.flow.owner.register(cx.waker());
        // A request between the look and the registration woke the waker
        // that was there before: look again.
        match self.flow.requested_reason() {
            Some(reason) => Poll::Ready(reason),
            None => Poll::Pending,
        }
    }
}

/// Counts by label, for the metrics: they only grow.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    /// (network, outbound) → flows opened.
    pub opened: Map<(Network, Arc<str>), u64>,
    /// (network, outbound, reason) → flows ended.
    pub closed: Map<(Network, Arc<str>, EndReason), u64>,
    /// outbound → bytes (up, down), of ended flows and of live ones up to
    /// the last tick.
    pub bytes: Map<Arc<str>, (u64, u64)>,
    /// Rule index (None: final) → flows it decided.
    pub rule_hits: Map<Option<usize>, u64>,
    /// All bytes, every outbound: what `/traffic` differences.
    pub up: u64,
    pub down: u64,
    /// outbound → how long its TCP connects took (those that succeeded).
    pub connect_times: Map<Arc<str>, ConnectTimes>,
}

/// Upper bounds of the connect-time buckets, in seconds: from a LAN hop
/// (under a millisecond) to the default connect timeout (10 s).
pub const CONNECT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A histogram of connect times: a count per bucket of
/// [`CONNECT_BUCKETS`] (not cumulative), then the ones above the last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectTimes {
    pub buckets: [u64; CONNECT_BUCKETS.len() + 1],
    pub sum_secs: f64,
    pub count: u64,
}

impl ConnectTimes {
    fn observe(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = CONNECT_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(CONNECT_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum_secs += secs;
        self.count += 1;
    }
}

impl Totals {
    fn add_bytes(&mut self, outbound: Arc<str>, up: u64, down: u64) {
        let entry = self.bytes.entry(outbound).or_default();
        entry.0 += up;
        entry.1 += down;
        self.up += up;
        self.down += down;
    }
}

/// Bytes per second over the last tick, and the totals at it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rate {
    pub up: u64,
    pub down: u64,
    pub up_total: u64,
    pub down_total: u64,
}

const SHARDS: usize = 16;

/// Live flows of one shard, by id.
type Shard = Mutex<Map<u64, Arc<Flow>>>;

/// Live flows by id, and totals of everything that passed.
#[derive(Debug)]
pub struct Registry {
    next_id: AtomicU64,
    shards: Box<[Shard]>,
    totals: Mutex<Totals>,
    last_tick: Mutex<(Instant, u64, u64)>,
    rate: Mutex<Rate>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters and maps stay usable after a panic elsewhere; losing the
    // registry would lose the API and the metrics with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            next_id: AtomicU64::new(1),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            totals: Mutex::default(),
            last_tick: Mutex::new((Instant::now(), 0, 0)),
            rate: Mutex::default(),
        }
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.shards[(id as usize) % SHARDS]
    }

    /// Registers a flow; it stays listed until the returned guard ends it
    /// (or is dropped: then it ended with [`EndReason::Shutdown`], its task
    /// cut by the stop).
    pub fn open(self: &Arc<Self>, start: FlowStart) -> FlowGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut t = lock(&self.totals);
            *t.opened
                .entry((start.network, chain_head(&start)))
                .or_default() += 1;
            *t.rule_hits.entry(start.rule.index).or_default() += 1;
        }
        let flow = Arc::new(Flow {
            id,
            start,
            started_at: SystemTime::now(),
            started: Instant::now(),
            traffic: Traffic::default(),
            reported_up: AtomicU64::new(0),
            reported_down: AtomicU64::new(0),
            close_requested: AtomicBool::new(false),
            close_reason: AtomicU8::new(0),
            close: Notify::new(),
            owner: AtomicWaker::new(),
        });
        lock(self.shard(id)).insert(id, Arc::clone(&flow));
        FlowGuard {
            registry: Arc::clone(self),
            flow,
            ended: false,
        }
    }

    /// The live flows, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Flow>> {
        let mut all: Vec<Arc<Flow>> = self
            .shards
            .iter()
            .flat_map(|s| lock(s).values().cloned().collect::<Vec<_>>())
            .collect();
        all.sort_unstable_by_key(|f| f.id);
        all
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live flows of one network.
    pub fn count(&self, network: Network) -> usize {
        self.shards
            .iter()
            .map(|s| {
                lock(s)
                    .values()
                    .filter(|f| f.start.network == network)
                    .count()
            })
            .sum()
    }

    pub fn get(&self, id: u64) -> Option<Arc<Flow>> {
        lock(self.shard(id)).get(&id).cloned()
    }

    /// Asks flow `id` to end (both sides reset, like a stop); false when
    /// no such flow is live.
    pub fn close(&self, id: u64, reason: EndReason) -> bool {
        match self.get(id) {
            Some(flow) => {
                flow.request_close(reason);
                true
            }
            None => false,
        }
    }

    /// Asks every live flow to end; how many were asked.
    pub fn close_all(&self, reason: EndReason) -> usize {
        let flows = self.snapshot();
        for f in &flows {
            f.request_close(reason);
        }
        flows.len()
    }

    /// Brings the byte totals up to date with the live flows and records
    /// the rate since the last tick. The server calls it once a second.
    pub fn tick(&self) -> Rate {
        let (up_total, down_total) = self.account_live_bytes();
        let mut last = lock(&self.last_tick);
        let secs = last.0.elapsed().as_secs_f64().max(0.001);
        let rate = Rate {
            up: ((up_total - last.1.min(up_total)) as f64 / secs) as u64,
            down: ((down_total - last.2.min(down_total)) as f64 / secs) as u64,
            up_total,
            down_total,
        };
        *last = (Instant::now(), up_total, down_total);
        *lock(&self.rate) = rate;
        rate
    }

    /// Records how long a connect through `outbound` took, once per flow
    /// when it connects (one lock, like [`Registry::open`]).
    pub fn record_connect(&self, outbound: &Arc<str>, took: Duration) {
        let mut t = lock(&self.totals);
        match t.connect_times.get_mut(outbound) {
            Some(h) => h.observe(took),
            None => {
                let mut h = ConnectTimes::default();
                h.observe(took);
                t.connect_times.insert(Arc::clone(outbound), h);
            }
        }
    }

    /// The rate the last tick measured.
    pub fn rate(&self) -> Rate {
        *lock(&self.rate)
    }

    /// A copy of the totals as of now: live flows' bytes since the last
    /// tick are added first, so the counts only grow and never lag.
    pub fn totals(&self) -> Totals {
        self.account_live_bytes();
        lock(&self.totals).clone()
    }

    /// Adds the live flows' bytes not yet counted to the totals; returns
    /// the totals of all bytes (up, down) after it.
    fn account_live_bytes(&self) -> (u64, u64) {
        let flows = self.snapshot();
        let mut t = lock(&self.totals);
        for f in &flows {
            let (up, down) = f.take_unreported();
            t.add_bytes(chain_head(&f.start), up, down);
        }
        (t.up, t.down)
    }

    fn end(&self, flow: &Flow, reason: EndReason) {
        lock(self.shard(flow.id)).remove(&flow.id);
        let (up, down) = flow.take_unreported();
        let outbound = chain_head(&flow.start);
        let mut t = lock(&self.totals);
        t.add_bytes(Arc::clone(&outbound), up, down);
        *t.closed
            .entry((flow.start.network, outbound, reason))
            .or_default() += 1;
    }
}

/// The outbound that carries a flow (`chains[0]`), the totals' key.
fn chain_head(start: &FlowStart) -> Arc<str> {
    start
        .chain
        .first()
        .cloned()
        .unwrap_or_else(|| Arc::from("?"))
}

/// A registered flow, held by the task that carries it. Ending it (or
/// dropping it) removes it from the registry, counts it, and writes the
/// `--verbose` flow line.
#[derive(Debug)]
pub struct FlowGuard {
    registry: Arc<Registry>,
    flow: Arc<Flow>,
    ended: bool,
}

impl FlowGuard {
    pub fn flow(&self) -> &Arc<Flow> {
        &self.flow
    }

    pub fn traffic(&self) -> &Traffic {
        &self.flow.traffic
    }

    /// Ends the flow for `reason`; `detail` (an error's text) goes to the
    /// log line only.
    pub fn end(mut self, reason: EndReason, detail: Option<&str>) {
        self.finish(reason, detail);
    }

    fn finish(&mut self, reason: EndReason, detail: Option<&str>) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.registry.end(&self.flow, reason);
        let f = &self.flow;
        let (up, down) = f.traffic.get();
        let route = RouteText(&f.start.chain);
        debug!(
            proto = match f.start.network {
                Network::Tcp => "tcp",
                Network::Udp => "udp",
            },
            client = %f.start.client,
            dst = %f.start.dst,
            host = f.start.host.as_deref(),
            sniffed = f.start.sniffed.map(|p| p.name()),
            outbound = %route,
            up_bytes = up,
            down_bytes = down,
            duration_ms = f.age().as_millis() as u64,
            end = %reason,
            detail,
            id = f.id,
            "flow"
        );
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.finish(EndReason::Shutdown, None);
    }
}

/// A chain as the logs name it, outermost group first: `pick/auto/proxy-a`.
struct RouteText<'a>(&'a [Arc<str>]);

impl fmt::Display for RouteText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.0.iter().rev().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(outbound: &str, rule: Option<usize>) -> FlowStart {
        FlowStart {
            network: Network::Tcp,
            client: "192.0.2.2:40000".parse().unwrap(),
            dst: "198.51.100.1:443".parse().unwrap(),
            host: None,
            sniffed: None,
            rule: Arc::new(RuleLabel {
                index: rule,
                kind: "Match",
                payload: String::new(),
            }),
            chain: vec![Arc::from(outbound), Arc::from("pick")],
        }
    }

    #[test]
    fn flows_are_listed_until_they_end_and_counted_by_reason() {
        let r = Arc::new(Registry::new());
        let a = r.open(start("proxy", Some(0)));
        let b = r.open(start("direct", None));
        assert_eq!(r.len(), 2);
        assert_ne!(a.flow().id, b.flow().id);
        a.traffic().add_up(100);
        a.traffic().add_down(1000);
        a.end(EndReason::Closed, None);
        drop(b); // a task cut by the stop
        assert!(r.is_empty());
        let t = r.totals();
        let proxy: Arc<str> = Arc::from("proxy");
        let direct: Arc<str> = Arc::from("direct");
        assert_eq!(
            t.closed
                .get(&(Network::Tcp, proxy.clone(), EndReason::Closed)),
            Some(&1)
        );
        assert_eq!(
            t.closed
                .get(&(Network::Tcp, direct.clone(), EndReason::Shutdown)),
            Some(&1)
        );
        assert_eq!(t.opened.get(&(Network::Tcp, proxy.clone())), Some(&1));
        assert_eq!(t.bytes.get(&proxy), Some(&(100, 1000)));
        assert_eq!(t.rule_hits.get(&Some(0)), Some(&1));
        assert_eq!(t.rule_hits.get(&None), Some(&1));
        assert_eq!((t.up, t.down), (100, 1000));
    }

    #[test]
    fn totals_include_live_flows_and_never_count_a_byte_twice() {
        let r = Arc::new(Registry::new());
        let a = r.open(start("proxy", None));
        a.traffic().add_up(10);
        assert_eq!(r.tick().up_total, 10);
        a.traffic().add_up(5);
        assert_eq!(r.totals().up, 15);
        assert_eq!(r.tick().up_total, 15);
        a.traffic().add_up(1);
        a.end(EndReason::Idle, None);
        assert_eq!(r.totals().up, 16);
        assert_eq!(r.tick().up_total, 16);
    }

    #[test]
    fn connect_times_fall_in_their_buckets() {
        let r = Registry::new();
        let proxy: Arc<str> = Arc::from("proxy");
        r.record_connect(&proxy, Duration::from_micros(500));
        r.record_connect(&proxy, Duration::from_millis(30));
        r.record_connect(&proxy, Duration::from_secs(20));
        let t = r.totals();
        let h = &t.connect_times[&proxy];
        assert_eq!(h.count, 3);
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[5], 1); // 30 ms: <= 0.05 s
        assert_eq!(h.buckets[CONNECT_BUCKETS.len()], 1);
        assert!((h.sum_secs - 20.0305).abs() < 1e-9);
    }

    #[tokio::test]
    async fn a_close_request_reaches_the_flow_even_before_it_waits() {
        let r = Arc::new(Registry::new());
        let a = r.open(start("proxy", None));
        let id = a.flow().id;
        assert!(r.close(id, EndReason::ClosedByApi));
        assert!(!r.close(id + 1000, EndReason::ClosedByApi));
        let reason = tokio::time::timeout(Duration::from_secs(5), a.flow().close_requested())
            .await
            .expect("the request was not lost");
        assert_eq!(reason, EndReason::ClosedByApi);

        let b = r.open(start("proxy", None));
        let flow = Arc::clone(b.flow());
        let waiter = tokio::spawn(async move { flow.close_requested().await });
        tokio::task::yield_now().await;
        assert_eq!(r.close_all(EndReason::Shutdown), 2);
        assert_eq!(waiter.await.unwrap(), EndReason::Shutdown);
    }

    #[tokio::test]
    async fn the_owner_task_sees_a_close_request() {
        let r = Arc::new(Registry::new());
        let a = r.open(start("proxy", None));
        let flow = Arc::clone(a.flow());
        let waiter = tokio::spawn(async move { flow.closed().await });
        tokio::task::yield_now().await;
        assert!(r.close(a.flow().id, EndReason::ClosedByApi));
        let reason = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(reason, EndReason::ClosedByApi);
        // Asked already: at once.
        assert_eq!(a.flow().closed().await, EndReason::ClosedByApi);
    }

    #[test]
    fn reasons_round_trip_and_have_distinct_labels() {
        let mut seen = std::collections::HashSet::new();
        for r in EndReason::ALL {
            assert_eq!(EndReason::from_u8(r as u8), Some(r));
            assert!(seen.insert(r.as_str()), "{r:?}");
        }
        assert_eq!(
            RouteText(&[Arc::from("proxy-a"), Arc::from("auto"), Arc::from("pick")]).to_string(),
            "pick/auto/proxy-a"
        );
    }

    #[test]
    fn failures_map_to_end_reasons() {
        use crate::outbound::Failure;
        let cases = [
            (Failure::Refused, EndReason::Blocked),
            (Failure::DestinationRefused, EndReason::UpstreamRefused),
            (Failure::DestinationTimeout, EndReason::ConnectTimeout),
            (Failure::ProxyTimeout, EndReason::ConnectTimeout),
            (Failure::ProxyFailed, EndReason::ProxyFailed),
            (Failure::UdpRefused, EndReason::ProxyFailed),
            (Failure::OutOfDescriptors, EndReason::OpenFailed),
        ];
        for (failure, reason) in cases {
            assert_eq!(EndReason::from(failure), reason, "{failure:?}");
        }
    }
}
