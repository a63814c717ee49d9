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

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Nothing answers here: the WAN side drops every packet to it.
const BLACKHOLE_V4: &str = "198.51.100.66";
/// A second client address on the LAN.
const LAN2_V4: &str = "192.0.2.3";

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

/// A tproxyd this test started itself, in the bed's router namespace.
struct OwnTproxyd {
    child: Child,
    log: PathBuf,
}

impl OwnTproxyd {
    /// Stops the bed's tproxyd and runs `PREFIX... tproxyd ARGS...`
    /// instead (the prefix execs tproxyd in place, as `prlimit` does).
    fn start(tb: &mut Testbed, prefix: &[&str], args: &[&str]) -> OwnTproxyd {
        tb.kill_tproxyd();
        let log = tb.dir.join("own-tproxyd.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &tb.router.name])
            .args(prefix)
            .arg(env!("CARGO_BIN_EXE_tproxyd"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start tproxyd");
        let own = OwnTproxyd { child, log };
        assert!(
            wait_until(Duration::from_secs(10), || own
                .log()
                .contains("tproxyd listening")),
            "tproxyd did not start:\n{}",
            own.log()
        );
        own
    }

    /// From a config file: direct outbound, no rules of its own, and the
    /// given extra sections.
    fn with_config(tb: &mut Testbed, sections: &str) -> OwnTproxyd {
        let file = tb.dir.join("limits.toml");
        std::fs::write(
            &file,
            format!(
                "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n\
                 [outbound]\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\n{sections}"
            ),
        )
        .unwrap();
        let path = file.display().to_string();
        OwnTproxyd::start(tb, &[], &["run", "--verbose", "-c", &path])
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Descriptors tproxyd holds now.
    fn descriptors(&self) -> usize {
        // `ip netns exec` and `prlimit` exec in place: the child is tproxyd.
        let pid = self.child.id();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim(), "tproxyd");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    }
}

impl Drop for OwnTproxyd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- own tproxyd log ----\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// An echo exchange on an open connection; the peer the server saw.
fn echo_on(s: &mut TcpStream, payload: &[u8]) -> std::io::Result<SocketAddr> {
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(payload)?;
    s.shutdown(Shutdown::Write)?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    let (peer, off) = peer_line(&got);
    assert_eq!(&got[off..], payload, "echo changed the bytes");
    Ok(peer)
}

/// The test process holds hundreds of client sockets (and the servers'
/// ends) while other tests run beside it: lift its own soft limit.
fn raise_own_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// Issue 8: under a 256-descriptor limit, 600 concurrent connections were
/// accepted and then many were reset, for lack of a descriptor for their
/// upstream side. Now accepting pauses instead: every connection waits
/// its turn in the listen backlog and gets its echo.
#[test]
fn low_descriptor_limit_makes_connections_wait_not_reset() {
    const CONNECTIONS: usize = 600;
    const CLIENT_THREADS: usize = 16;
    let Some(mut tb) = bed(Mode::Tproxy) else {
        return;
    };
    raise_own_nofile_limit();
    let listen = format!("[::]:{PROXY_PORT}");
    let own = OwnTproxyd::start(
        &mut tb,
        &["prlimit", "--nofile=256:256"],
        &[
            "run",
            "--listen",
            &listen,
            "--mode",
            "tproxy",
            "--firewall",
            "none",
            "--direct",
        ],
    );
    let dst = Family::V4.remote_a(ECHO_PORT);
    let outcomes: Vec<Result<SocketAddr, ErrorKind>> = tb.lan.enter(|| {
        // All open at once: the kernel completes the handshakes, and
        // tproxyd takes them from its backlog as descriptors allow.
        let conns: Vec<std::io::Result<TcpStream>> = (0..CONNECTIONS)
            .map(|_| connect_from(None, dst, Duration::from_secs(10)))
            .collect();
        let mut slots: Vec<Vec<(usize, std::io::Result<TcpStream>)>> =
            (0..CLIENT_THREADS).map(|_| Vec::new()).collect();
        for (i, c) in conns.into_iter().enumerate() {
            slots[i % CLIENT_THREADS].push((i, c));
        }
        let mut outcomes = vec![Err(ErrorKind::Other); CONNECTIONS];
        std::thread::scope(|sc| {
            let workers: Vec<_> = slots
                .into_iter()
                .map(|slot| {
                    sc.spawn(move || {
                        slot.into_iter()
                            .map(|(i, c)| {
                                let payload = format!("connection {i}\n");
                                let r = c.and_then(|mut s| echo_on(&mut s, payload.as_bytes()));
                                (i, r.map_err(|e| e.kind()))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for w in workers {
                for (i, r) in w.join().unwrap() {
                    outcomes[i] = r;
                }
            }
        });
        outcomes
    });
    let resets = outcomes
        .iter()
        .filter(|r| matches!(r, Err(ErrorKind::ConnectionReset)))
        .count();
    let failed: Vec<_> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.err().map(|e| (i, e)))
        .collect();
    assert_eq!(resets, 0, "connections reset: {failed:?}");
    // Nothing is refused either: every connection got its turn.
    assert!(failed.is_empty(), "connections failed: {failed:?}");
    let hop = Family::V4.hop(Upstream::Direct);
    assert!(outcomes.iter().all(|r| r.is_ok_and(|p| p.ip() == hop)));
    let log = own.log();
    assert!(
        log.contains("not accepting TCP connections for now"),
        "no warning about descriptors:\n{log}"
    );
    assert!(!log.contains("Too many open files"), "{log}");
}

/// Issue 8: connects to a blackholed address piled up without bound.
/// Beyond `limits.tcp_connecting_per_client` connects in progress, that
/// client's new connections are reset at once; another client is served
/// as usual, and tproxyd's descriptors stay few.
#[test]
fn connects_in_progress_are_bounded_per_client() {
    const LIMIT: usize = 8;
    const EXTRA: usize = 150;
    let Some(mut tb) = bed(Mode::Tproxy) else {
        return;
    };
    tb.wan.nft(&format!(
        "table inet blackhole {{
           chain pre {{
             type filter hook prerouting priority -300; policy accept;
             ip daddr {BLACKHOLE_V4} drop
           }}
         }}"
    ));
    tb.lan.ip(&format!("addr add {LAN2_V4}/24 dev l0"));
    let own = OwnTproxyd::with_config(
        &mut tb,
        &format!("[timeouts]\nconnect = 60\n[limits]\ntcp_connecting_per_client = {LIMIT}\n"),
    );
    let blackhole = addr(BLACKHOLE_V4, 80);
    let quick = Duration::from_secs(2);
    tb.lan.enter(|| {
        // These wait for an upstream that never answers.
        let hanging: Vec<TcpStream> = (0..LIMIT)
            .map(|i| {
                connect_from(Some(LAN_V4), blackhole, quick)
                    .unwrap_or_else(|e| panic!("connect {i}: {e}"))
            })
            .collect();
        // tproxyd takes its backlog in order: all of these come after the
        // eight and find the client's connects used up.
        for i in 0..EXTRA {
            let start = Instant::now();
            let kind = turned_away(Some(LAN_V4), blackhole, quick);
            assert_eq!(
                kind,
                ErrorKind::ConnectionReset,
                "extra connect {i}: {kind:?} after {:?}",
                start.elapsed()
            );
        }
        // Another client is not held up by the first one's flood.
        let mut s = connect_from(Some(LAN2_V4), Family::V4.remote_a(ECHO_PORT), quick).unwrap();
        let peer = echo_on(&mut s, b"second client\n").unwrap();
        assert_eq!(peer.ip(), Family::V4.hop(Upstream::Direct));
        let fds = own.descriptors();
        // About 15 of its own, two per hanging connect, nothing for the
        // refused ones (the build held two for each of them).
        assert!(fds < 60, "tproxyd holds {fds} descriptors");
        drop(hanging);
    });
    let log = own.log();
    assert!(
        log.contains("limits.tcp_connecting_per_client"),
        "no warning naming the limit:\n{log}"
    );
}

/// Beyond `limits.tcp_flows` open flows, new connections are reset at
/// once; when a flow ends, its place is free again.
#[test]
fn flows_beyond_tcp_flows_are_reset_at_once() {
    const FLOWS: usize = 10;
    let Some(mut tb) = bed(Mode::Tproxy) else {
        return;
    };
    let own = OwnTproxyd::with_config(
        &mut tb,
        &format!("[limits]\ntcp_flows = {FLOWS}\ntcp_connecting_per_client = {FLOWS}\n"),
    );
    let dst = Family::V4.remote_a(ECHO_PORT);
    let quick = Duration::from_secs(2);
    tb.lan.enter(|| {
        // Ten flows, each shown open by the server's first line.
        let mut open: Vec<TcpStream> = (0..FLOWS)
            .map(|i| {
                let mut s = connect_from(None, dst, quick).unwrap();
                s.set_read_timeout(Some(quick)).unwrap();
                let mut line = [0u8; 5];
                s.read_exact(&mut line)
                    .unwrap_or_else(|e| panic!("flow {i} not carried: {e}"));
                assert_eq!(&line, b"peer=");
                s
            })
            .collect();
        for i in 0..5 {
            let kind = turned_away(None, dst, quick);
            assert_eq!(
                kind,
                ErrorKind::ConnectionReset,
                "connection {i} past the limit"
            );
        }
        // One flow ends; its place is free again once tproxyd sees the end.
        let mut first = open.remove(0);
        first.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).unwrap();
        let served = wait_until(Duration::from_secs(5), || {
            connect_from(None, dst, quick)
                .and_then(|mut s| echo_on(&mut s, b"after one ended\n"))
                .is_ok()
        });
        assert!(served, "no place came free after a flow ended");
    });
    let log = own.log();
    assert!(
        log.contains("limits.tcp_flows"),
        "no warning naming the limit:\n{log}"
    );
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
