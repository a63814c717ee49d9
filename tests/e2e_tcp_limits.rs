//! TCP under pressure, end to end: a low open-files limit, the flow
//! limits (`limits.tcp_flows`, `limits.tcp_connecting_per_client`) and
//! floods of connections straight to the listener. Each test checks what
//! the clients get (echo, prompt reset, or a wait) and what tproxyd logs
//! and holds.
//!
//! The bed's rules are the hand-written ones (`--firewall none`). Where a
//! test needs tproxyd under `prlimit` or with a config file, it stops the
//! bed's tproxyd and starts its own in the router namespace.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

fn bed(mode: Mode) -> Option<Testbed> {
    can_run().then(|| {
        Testbed::start(Options {
            mode,
            upstream: Upstream::Direct,
            extra_args: vec![],
            own_rules: None,
        })
    })
}

/// Connects from `bind` (any address if None) within `within`.
fn connect_from(
    bind: Option<&str>,
    dst: SocketAddr,
    within: Duration,
) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(ip) = bind {
        socket.bind(&addr(ip, 0).into())?;
    }
    socket.connect_timeout(&dst.into(), within)?;
    Ok(socket.into())
}

/// How a connection that should be turned away ends: its error kind
/// (at connect or at the first read) within `wait`, or `TimedOut`.
fn turned_away(bind: Option<&str>, dst: SocketAddr, wait: Duration) -> ErrorKind {
    let mut s = match connect_from(bind, dst, wait) {
        Ok(s) => s,
        Err(e) => return e.kind(),
    };
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => ErrorKind::UnexpectedEof,
        Ok(_) => ErrorKind::Other,
        Err(e) if e.kind() == ErrorKind::WouldBlock => ErrorKind::TimedOut,
        Err(e) => e.kind(),
    }
}

/// A flood of connections straight to the listener writes a few warning
/// lines, not one per connection; a later line says how many were held
/// back.
#[test]
fn connections_straight_to_the_listener_warn_rate_limited() {
    const FLOOD: usize = 300;
    let Some(tb) = bed(Mode::Redirect) else {
        return;
    };
    let listener = addr("192.0.2.1", PROXY_PORT);
    let needle = "refused TCP connection to tproxyd's own listener";
    let flood = |n: usize| {
        tb.lan.enter(|| {
            for i in 0..n {
                let kind = turned_away(None, listener, Duration::from_secs(2));
                assert_eq!(kind, ErrorKind::ConnectionReset, "connection {i}");
            }
        })
    };
    flood(FLOOD);
    assert!(tb.wait_for_log(needle, Duration::from_secs(3)));
    let lines = tb.tproxyd_log().matches(needle).count();
    assert!(lines <= 2, "{lines} warning lines for {FLOOD} connections");
    // Past the interval, the next one is let through with the count.
    std::thread::sleep(Duration::from_millis(5200));
    flood(1);
    assert!(wait_until(Duration::from_secs(3), || tb
        .tproxyd_log()
        .matches(needle)
        .count()
        > lines));
    // Every connection is accounted for: logged, or counted in a later
    // line's held_back.
    let log = tb.tproxyd_log();
    let warned: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
    let held: usize = warned.iter().map(|l| held_back(l)).sum();
    assert_eq!(warned.len() + held, FLOOD + 1, "{log}");
    assert!(held > 0);
}

/// The `held_back=N` field of a log line.
fn held_back(line: &str) -> usize {
    let at = line
        .find("held_back=")
        .unwrap_or_else(|| panic!("no held_back in {line:?}"));
    line[at + "held_back=".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad held_back in {line:?}"))
}
