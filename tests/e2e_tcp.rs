//! TCP end to end: a LAN client's connections are captured on the router
//! by hand-written rules (TPROXY or REDIRECT), carried by tproxyd through
//! dante or direct, and checked at the server (which hop the flow came
//! from) and at the client (what came back).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(10);

fn bed(mode: Mode, upstream: Upstream) -> Option<Testbed> {
    can_run().then(|| {
        Testbed::start(Options {
            mode,
            upstream,
            extra_args: vec![],
            own_rules: None,
        })
    })
}

fn connect(dst: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&dst, T).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    s
}

/// Echo through the proxy: the server must have seen the expected hop and
/// the client must get its bytes back.
fn check_echo(tb: &Testbed, fam: Family, upstream: Upstream) {
    let dst = fam.remote_a(ECHO_PORT);
    let got = tb.lan.enter(|| {
        let mut s = connect(dst);
        assert_eq!(s.local_addr().unwrap().ip(), fam.lan_any().ip());
        s.write_all(b"hello through tproxyd\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let (peer, off) = peer_line(&got);
    assert_eq!(
        peer.ip(),
        fam.hop(upstream),
        "{fam:?}: server saw the flow from the wrong hop"
    );
    assert_eq!(&got[off..], b"hello through tproxyd\n", "{fam:?}");
    assert!(
        tb.wait_for_log(&format!("dst={dst}"), Duration::from_secs(3)),
        "{fam:?}: tproxyd logged no flow to {dst}"
    );
}

/// The client sends, shuts down its write side, and must still receive
/// the answer the server only sends 300 ms after seeing EOF.
fn check_half_close(tb: &Testbed, fam: Family, upstream: Upstream) {
    let dst = fam.remote_a(SINK_PORT);
    let payload = pattern(100_000, 7);
    let got = tb.lan.enter(|| {
        let mut s = connect(dst);
        s.write_all(&payload).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        got
    });
    let (peer, _) = peer_line(got.as_bytes());
    assert_eq!(peer.ip(), fam.hop(upstream), "{fam:?}");
    assert!(
        got.trim_end().ends_with("bytes=100000"),
        "{fam:?}: answer after FIN lost or short: {got:?}"
    );
}

fn check_paths(mode: Mode, upstream: Upstream) {
    let Some(tb) = bed(mode, upstream) else {
        return;
    };
    for fam in [Family::V4, Family::V6] {
        check_echo(&tb, fam, upstream);
        check_half_close(&tb, fam, upstream);
    }
}

#[test]
fn tproxy_tcp_through_socks5_v4_and_v6() {
    check_paths(Mode::Tproxy, Upstream::Socks);
}

#[test]
fn tproxy_tcp_direct_v4_and_v6() {
    check_paths(Mode::Tproxy, Upstream::Direct);
}

#[test]
fn redirect_tcp_through_socks5_v4_and_v6() {
    check_paths(Mode::Redirect, Upstream::Socks);
}

#[test]
fn redirect_tcp_direct_v4_and_v6() {
    check_paths(Mode::Redirect, Upstream::Direct);
}

/// Fifty flows open at once on two relay threads: every client gets its
/// own bytes back, whichever thread carried its flow.
#[test]
fn fifty_concurrent_flows_on_two_relay_threads() {
    let Some(tb) = can_run().then(|| {
        Testbed::start(Options {
            mode: Mode::Tproxy,
            upstream: Upstream::Direct,
            extra_args: vec!["--threads".into(), "2".into()],
            own_rules: None,
        })
    }) else {
        return;
    };
    let dst = Family::V4.remote_a(ECHO_PORT);
    tb.lan.enter(|| {
        let mut flows: Vec<(TcpStream, Vec<u8>)> = (0..50u64)
            .map(|i| (connect(dst), pattern(20_000, i << 1)))
            .collect();
        for (s, data) in &mut flows {
            s.write_all(data).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        }
        for (i, (s, data)) in flows.iter_mut().enumerate() {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            let (peer, off) = peer_line(&got);
            assert_eq!(peer.ip(), Family::V4.hop(Upstream::Direct), "flow {i}");
            assert_eq!(
                &got[off..],
                &data[..],
                "flow {i}: bytes changed or mixed up"
            );
        }
    });
    let log = tb.tproxyd_log();
    assert!(
        log.contains("threads=2") && log.contains("tproxyd listening"),
        "{log}"
    );
}

/// 16 MiB each way at once, compared by checksum, both families.
#[test]
fn sixteen_mib_transfer_is_intact() {
    let Some(tb) = bed(Mode::Tproxy, Upstream::Socks) else {
        return;
    };
    for (fam, seed) in [(Family::V4, 1), (Family::V6, 2)] {
        let dst = fam.remote_a(ECHO_PORT);
        let data = pattern(16 << 20, seed);
        let got = tb.lan.enter(|| {
            let s = connect(dst);
            let mut writer = s.try_clone().unwrap();
            let sent = std::thread::scope(|sc| {
                let w = sc.spawn(|| {
                    writer.write_all(&data).unwrap();
                    writer.shutdown(Shutdown::Write).unwrap();
                });
                let mut got = Vec::with_capacity(data.len() + 64);
                (&s).read_to_end(&mut got).unwrap();
                w.join().unwrap();
                got
            });
            sent
        });
        let (peer, off) = peer_line(&got);
        assert_eq!(peer.ip(), fam.hop(Upstream::Socks));
        assert_eq!(got.len() - off, data.len(), "{fam:?}: length");
        assert_eq!(checksum(&got[off..]), checksum(&data), "{fam:?}: checksum");
    }
}

/// Connects and reads until the flow ends; returns how it ended and how
/// long that took. A reset can surface at connect already (the RST may
/// arrive before the client looks at the handshake's outcome) or at the
/// first read: both are the same fast failure.
fn ending_of(dst: std::net::SocketAddr, read_timeout: Duration) -> (ErrorKind, Duration) {
    let start = Instant::now();
    match TcpStream::connect_timeout(&dst, T) {
        Err(e) => (e.kind(), start.elapsed()),
        Ok(mut s) => {
            s.set_read_timeout(Some(read_timeout)).unwrap();
            let (kind, _) = read_until_error(&mut s);
            (kind, start.elapsed())
        }
    }
}

/// Reads until error; returns the error kind and how long it took.
fn read_until_error(s: &mut TcpStream) -> (ErrorKind, Duration) {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (ErrorKind::UnexpectedEof, start.elapsed()),
            Ok(_) => continue,
            Err(e) => return (e.kind(), start.elapsed()),
        }
    }
}

#[test]
fn upstream_down_resets_the_client_within_a_second() {
    let Some(tb) = bed(Mode::Tproxy, Upstream::SocksDown) else {
        return;
    };
    // Not fatal at start: tproxyd runs and says the upstream is unreachable.
    assert!(
        tb.wait_for_log("upstream not reachable at start", Duration::from_secs(5)),
        "no start-up warning about the unreachable upstream"
    );
    for fam in [Family::V4, Family::V6] {
        let (kind, took) = tb
            .lan
            .enter(|| ending_of(fam.remote_a(ECHO_PORT), Duration::from_secs(1)));
        assert_eq!(
            kind,
            ErrorKind::ConnectionReset,
            "{fam:?}: expected a reset within 1 s, got {kind:?} after {took:?}"
        );
    }
    assert!(
        tb.tproxyd_log().contains("cannot reach SOCKS5 server"),
        "{}",
        tb.tproxyd_log()
    );
}

#[test]
fn refused_destination_resets_the_client() {
    // Direct and through dante: nothing listens on port 1 of the remote.
    for upstream in [Upstream::Direct, Upstream::Socks] {
        let Some(tb) = bed(Mode::Tproxy, upstream) else {
            return;
        };
        for fam in [Family::V4, Family::V6] {
            let (kind, took) = tb
                .lan
                .enter(|| ending_of(fam.remote_a(1), Duration::from_secs(1)));
            assert_eq!(
                kind,
                ErrorKind::ConnectionReset,
                "{upstream:?} {fam:?}: got {kind:?} after {took:?}"
            );
        }
    }
}

#[test]
fn socks5_username_password_is_accepted() {
    let Some(tb) = bed(Mode::Tproxy, Upstream::SocksAuth) else {
        return;
    };
    check_echo(&tb, Family::V4, Upstream::SocksAuth);
    check_echo(&tb, Family::V6, Upstream::SocksAuth);
}

#[test]
fn socks5_wrong_password_is_refused_with_a_clear_log_line() {
    let Some(tb) = bed(Mode::Tproxy, Upstream::SocksWrongPassword) else {
        return;
    };
    let (kind, _) = tb
        .lan
        .enter(|| ending_of(Family::V4.remote_a(ECHO_PORT), Duration::from_secs(2)));
    assert_eq!(kind, ErrorKind::ConnectionReset);
    let expected = format!("refused username \"{AUTH_USER}\": wrong username or password");
    assert!(
        tb.wait_for_log(&expected, Duration::from_secs(3)),
        "log lacks {expected:?}:\n{}",
        tb.tproxyd_log()
    );
}

/// A connection straight to the listener (no NAT happened) has itself as
/// original destination: relaying it would loop, so it is refused.
#[test]
fn connection_to_the_listener_itself_is_refused() {
    let Some(tb) = bed(Mode::Redirect, Upstream::Direct) else {
        return;
    };
    let (kind, _) = tb
        .lan
        .enter(|| ending_of(addr("192.0.2.1", PROXY_PORT), Duration::from_secs(2)));
    assert_eq!(kind, ErrorKind::ConnectionReset);
    assert!(
        tb.wait_for_log(
            "refused TCP connection to tproxyd's own listener",
            Duration::from_secs(3)
        ),
        "{}",
        tb.tproxyd_log()
    );
}
