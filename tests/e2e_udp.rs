//! UDP end to end through TPROXY: datagram sizes, many client ports at
//! once, and full-cone replies from a remote the client never wrote to.
//! Every check looks at both ends: the server's "peer=" line says which hop
//! the datagram came from, and the client checks the reply's source.
//!
//! No datagram is ever re-sent: a loss is a failure, not noise, since
//! everything runs over veth and loopback.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

fn bed(upstream: Upstream) -> Option<Testbed> {
    bed_with(upstream, &[])
}

fn bed_with(upstream: Upstream, extra_args: &[&str]) -> Option<Testbed> {
    can_run().then(|| {
        Testbed::start(Options {
            mode: Mode::Tproxy,
            upstream,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            own_rules: None,
        })
    })
}

fn client_socket(fam: Family) -> UdpSocket {
    let s = UdpSocket::bind(fam.lan_any()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Sends `payload` to `dst` and returns (reply source, hop seen by the
/// server, echoed payload).
fn exchange(s: &UdpSocket, dst: SocketAddr, payload: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
    s.send_to(payload, dst).unwrap();
    let mut buf = vec![0u8; 70_000];
    let (n, from) = s.recv_from(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no answer from {dst} for a {}-byte datagram: {e}",
            payload.len()
        )
    });
    let (peer, off) = peer_line(&buf[..n]);
    (from, peer, buf[off..n].to_vec())
}

fn check_sizes(upstream: Upstream) {
    let Some(tb) = bed(upstream) else { return };
    for fam in [Family::V4, Family::V6] {
        let dst = fam.remote_a(UDP_ECHO_PORT);
        tb.lan.enter(|| {
            let s = client_socket(fam);
            for size in [32usize, 1400, 9000, UDP_ECHO_MAX] {
                let payload = pattern(size, size as u64);
                let (from, peer, echoed) = exchange(&s, dst, &payload);
                assert_eq!(from, dst, "{fam:?} {size} B: reply from the wrong source");
                assert_eq!(
                    peer.ip(),
                    fam.hop(upstream),
                    "{fam:?} {size} B: server saw the wrong hop"
                );
                assert_eq!(echoed, payload, "{fam:?} {size} B: payload changed");
            }
            // The largest datagram the outbound can carry passes whole
            // upstream; the server answers with its length and checksum.
            // Direct: the IPv4 maximum. SOCKS5 wraps each datagram in a
            // header (10 bytes for an IPv4 target, 22 for IPv6) on the
            // way to an IPv4 relay, which leaves that much less.
            let largest = match (upstream, fam) {
                (Upstream::Direct, _) => UDP_MAX,
                (_, Family::V4) => UDP_MAX - 10,
                (_, Family::V6) => UDP_MAX - 22,
            };
            let payload = pattern(largest, 7);
            let (from, peer, answer) = exchange(&s, dst, &payload);
            assert_eq!(from, dst, "{fam:?} {largest} B");
            assert_eq!(peer.ip(), fam.hop(upstream), "{fam:?} {largest} B");
            let expected = format!("len={largest} fnv={:016x}", checksum(&payload));
            assert_eq!(String::from_utf8_lossy(&answer), expected, "{fam:?}");
        });
    }
    if upstream != Upstream::Direct {
        // One byte more than SOCKS5 can carry: dropped, and said so.
        tb.lan.enter(|| {
            let s = client_socket(Family::V4);
            s.send_to(&pattern(UDP_MAX - 9, 9), Family::V4.remote_a(UDP_ECHO_PORT))
                .unwrap();
        });
        assert!(
            tb.wait_for_log(
                "bytes does not fit the socks5 outbound",
                Duration::from_secs(3)
            ),
            "{}",
            tb.tproxyd_log()
        );
    }
    assert!(tb.tproxyd_log().contains("tproxyd listening"));
}

#[test]
fn tproxy_udp_through_socks5_v4_and_v6_32_bytes_to_65507() {
    check_sizes(Upstream::Socks);
}

#[test]
fn tproxy_udp_direct_v4_and_v6_32_bytes_to_65507() {
    check_sizes(Upstream::Direct);
}

fn check_full_cone(upstream: Upstream) {
    let Some(tb) = bed(upstream) else { return };
    for fam in [Family::V4, Family::V6] {
        let a = fam.remote_a(UDP_ECHO_PORT);
        let b = fam.remote_b(UDP_ECHO_PORT);
        tb.lan.enter(|| {
            let s = client_socket(fam);
            // The client writes only to A; A has B answer. The reply must
            // arrive, and from B's address, not A's.
            let (from, peer, echoed) = exchange(&s, a, b"CONE please answer from B");
            assert_eq!(from, b, "{fam:?}: reply must carry remote B's address");
            assert_eq!(peer.ip(), fam.hop(upstream), "{fam:?}");
            assert_eq!(echoed, b"CONE please answer from B");
            // And the same session keeps serving A itself.
            let (from, _, _) = exchange(&s, a, b"plain");
            assert_eq!(from, a, "{fam:?}");
        });
    }
}

#[test]
fn full_cone_through_socks5_v4_and_v6() {
    check_full_cone(Upstream::Socks);
}

#[test]
fn full_cone_direct_v4_and_v6() {
    check_full_cone(Upstream::Direct);
}

/// 200 client ports at once, each must get exactly its own answers.
/// Bursts of same-size datagrams from one client port, the traffic the
/// inbound gathers into runs and sends upstream in one call each: every
/// datagram must come back whole, once and in order.
fn check_bursts(upstream: Upstream, fam: Family, threads: &str) {
    // With more than one relay thread the inbound and the sessions' tasks
    // run on different threads, and the fast path races the queue.
    let Some(tb) = bed_with(upstream, &["--threads", threads]) else {
        return;
    };
    const BURSTS: u32 = 10;
    const PER_BURST: u32 = 20;
    let dst = fam.remote_a(UDP_ECHO_PORT);
    tb.lan.enter(|| {
        let s = client_socket(fam);
        // Opens the session, so the bursts find it established.
        exchange(&s, dst, b"open");
        let mut buf = vec![0u8; 4096];
        for burst in 0..BURSTS {
            let first = burst * PER_BURST;
            for seq in first..first + PER_BURST {
                s.send_to(&pattern(1000, u64::from(seq) << 1), dst).unwrap();
            }
            for seq in first..first + PER_BURST {
                let (n, from) = s
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("{fam:?}: no echo of datagram {seq}: {e}"));
                assert_eq!(from, dst, "{fam:?} datagram {seq}");
                let (peer, off) = peer_line(&buf[..n]);
                assert_eq!(peer.ip(), fam.hop(upstream), "{fam:?} datagram {seq}");
                assert_eq!(
                    &buf[off..n],
                    &pattern(1000, u64::from(seq) << 1)[..],
                    "{fam:?}: datagram {seq} changed, lost or out of order"
                );
            }
        }
    });
    let log = tb.tproxyd_log();
    assert!(log.contains(&format!("threads={threads}")), "{log}");
}

#[test]
fn bursts_of_one_client_direct_v4_and_socks5_v6() {
    check_bursts(Upstream::Direct, Family::V4, "1");
    check_bursts(Upstream::Socks, Family::V6, "1");
}

#[test]
fn bursts_of_one_client_on_two_relay_threads() {
    check_bursts(Upstream::Direct, Family::V6, "2");
    check_bursts(Upstream::Socks, Family::V4, "2");
}

fn check_many_ports(upstream: Upstream, fam: Family) {
    let Some(tb) = bed(upstream) else { return };
    const PORTS: usize = 200;
    let dst = fam.remote_a(UDP_ECHO_PORT);
    let mut seen_hops = HashMap::new();
    tb.lan.enter(|| {
        let sockets: Vec<UdpSocket> = (0..PORTS).map(|_| client_socket(fam)).collect();
        for (i, s) in sockets.iter().enumerate() {
            s.send_to(format!("client {i}").as_bytes(), dst).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for (i, s) in sockets.iter().enumerate() {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10));
            s.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 256];
            let (n, from) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("client port {i} got no answer: {e}"));
            assert_eq!(from, dst, "client {i}");
            let (peer, off) = peer_line(&buf[..n]);
            assert_eq!(
                &buf[off..n],
                format!("client {i}").as_bytes(),
                "client {i} got another's answer"
            );
            *seen_hops.entry(peer.ip()).or_insert(0) += 1;
        }
    });
    assert_eq!(
        seen_hops.get(&fam.hop(upstream)),
        Some(&PORTS),
        "hops seen: {seen_hops:?}"
    );
}

#[test]
fn two_hundred_client_ports_through_socks5_v4() {
    check_many_ports(Upstream::Socks, Family::V4);
}

#[test]
fn two_hundred_client_ports_direct_v6() {
    check_many_ports(Upstream::Direct, Family::V6);
}

#[test]
fn idle_udp_session_expires_and_closes_its_association() {
    if !can_run() {
        return;
    }
    let tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec!["--udp-timeout".into(), "1".into()],
        own_rules: None,
    });
    let dst = Family::V4.remote_a(UDP_ECHO_PORT);
    tb.lan.enter(|| {
        let s = client_socket(Family::V4);
        let (from, _, _) = exchange(&s, dst, b"once");
        assert_eq!(from, dst);
    });
    assert_eq!(
        tb.socks_control_connections(),
        1,
        "one association while the session lives"
    );
    assert!(
        tb.wait_for_log("end=idle-timeout", Duration::from_secs(5)),
        "session did not expire:\n{}",
        tb.tproxyd_log()
    );
    assert!(
        wait_until(Duration::from_secs(3), || tb.socks_control_connections()
            == 0),
        "the association's control connection outlived its session"
    );
}

#[test]
fn socks_control_connection_loss_ends_the_session_and_is_logged() {
    let Some(mut tb) = bed(Upstream::Socks) else {
        return;
    };
    let dst = Family::V4.remote_a(UDP_ECHO_PORT);
    let s = tb.lan.enter(|| {
        let s = client_socket(Family::V4);
        let (from, _, _) = exchange(&s, dst, b"before");
        assert_eq!(from, dst);
        s
    });
    tb.stop_dante();
    assert!(
        tb.wait_for_log(
            "closed the UDP association's control connection",
            Duration::from_secs(5)
        ),
        "{}",
        tb.tproxyd_log()
    );
    // With the server gone, a new datagram cannot get a session; that is
    // said in the log with the count of datagrams it cost.
    s.send_to(b"after", dst).unwrap();
    assert!(
        tb.wait_for_log("UDP session failed to open", Duration::from_secs(5)),
        "{}",
        tb.tproxyd_log()
    );
    assert!(
        tb.tproxyd_log().contains("dropped=1"),
        "{}",
        tb.tproxyd_log()
    );
}
