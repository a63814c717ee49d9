//! The relay from its edges: sessions, legs, limits, eviction, back-off
//! and replies, through real loopback sockets.

use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::session::SESSION_QUEUE;
use super::*;
use crate::policy::Policy;

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
    let limits = Limits {
        udp_sessions: sessions,
        udp_sessions_per_client: per_client,
        udp_reply_sockets: 8,
        threads: 1,
        tcp_flows: 16,
        tcp_connecting_per_client: 16,
    };
    relay_from_toml(&text, limits, timeouts)
}

/// A relay listening at 127.0.0.1:1090 with the policy a whole config
/// file (`text`, which must be valid) describes.
pub(super) fn relay_from_toml(text: &str, limits: Limits, timeouts: Timeouts) -> Arc<UdpRelay> {
    let cfg = crate::config::RawConfig::from_toml(text, "t")
        .unwrap()
        .validate(&|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
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
    let (listen_addr, answer_addr) = (listen.local_addr().unwrap(), answer.local_addr().unwrap());
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
            name: None,
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

/// A session's fake-ip aliases: datagrams to the fake address go to the
/// real one, replies from the real one come from the fake one (a
/// v4-mapped source too), other sources pass as they are, and the list
/// stays bounded.
#[tokio::test]
async fn fake_ip_aliases_answer_from_the_fake_address() {
    let relay = relay_with(8);
    let client = port([192, 0, 2, 2], 40000);
    let meta = crate::policy::FlowMeta::addresses(Network::Udp, client, port([203, 0, 113, 1], 7));
    let Decision::Forward(choice) = relay.router.decide(&meta) else {
        panic!("not forwarded");
    };
    let policy = relay.router.current();
    let flow = relay.registry.open(FlowStart {
        network: Network::Udp,
        client,
        dst: port([198, 18, 0, 1], 7),
        host: None,
        sniffed: None,
        rule: Arc::clone(policy.rule_label(choice.rule)),
        chain: Vec::new(),
    });
    let shared = SessionShared::new(choice.key, Arc::clone(flow.flow()));
    let (fake, real, other) = (
        port([198, 18, 0, 1], 7),
        port([192, 0, 2, 9], 7),
        port([192, 0, 2, 10], 7),
    );
    let src = |from| {
        shared
            .reply_source(choice.key, super::aliases::ReplyFrom::Addr(from))
            .unwrap()
    };
    assert_eq!(shared.real_of(fake), None);
    assert_eq!(src(real), real, "no alias yet");
    shared.add_alias(fake, real);
    assert_eq!(shared.real_of(fake), Some(real));
    assert_eq!(src(real), fake);
    let mapped: SocketAddr = "[::ffff:192.0.2.9]:7".parse().unwrap();
    assert_eq!(src(mapped), fake);
    assert_eq!(src(other), other);
    assert_eq!(src(port([192, 0, 2, 9], 8)), port([192, 0, 2, 9], 8));
    // Bounded: the oldest destination is forgotten first.
    for i in 0..64u16 {
        shared.add_alias(
            port([198, 18, 1, 0], 1000 + i),
            port([192, 0, 2, 20], 1000 + i),
        );
    }
    assert_eq!(shared.real_of(fake), None, "the oldest forgotten");
    assert_eq!(src(real), real);
    assert_eq!(
        shared.real_of(port([198, 18, 1, 0], 1063)),
        Some(port([192, 0, 2, 20], 1063))
    );
}

/// The real address a fake one goes to: the fake one's family first, its
/// port kept; none without real addresses.
#[test]
fn a_fake_address_goes_to_a_real_one_of_its_family() {
    let v4: IpAddr = "192.0.2.9".parse().unwrap();
    let v6: IpAddr = "2001:db8::9".parse().unwrap();
    let fake4 = port([198, 18, 0, 1], 443);
    let fake6: SocketAddr = "[fc00::1]:443".parse().unwrap();
    assert_eq!(real_for(fake4, &[v6, v4]), Some(SocketAddr::new(v4, 443)));
    assert_eq!(real_for(fake6, &[v4, v6]), Some(SocketAddr::new(v6, 443)));
    assert_eq!(real_for(fake4, &[v6]), Some(SocketAddr::new(v6, 443)));
    assert_eq!(real_for(fake4, &[]), None);
}
