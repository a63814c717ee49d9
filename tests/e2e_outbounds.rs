//! The outbound types end to end: rules sending flows to socks5, direct
//! and block; an http outbound through a real HTTP CONNECT proxy
//! (tinyproxy); a failover group moving between two dante servers and
//! back. Each check looks at which address the echo server saw.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A second WAN address: tinyproxy, or the second dante.
const HTTP_PROXY_V4: &str = "203.0.113.3";
const HTTP_PROXY_PORT: u16 = 3128;
const SOCKS_A_V4: &str = "203.0.113.4";

fn bed() -> Option<Testbed> {
    can_run().then(|| {
        Testbed::start(Options {
            mode: Mode::Tproxy,
            upstream: Upstream::Socks,
            extra_args: vec![],
            own_rules: None,
        })
    })
}

/// A whole config: the bed's hand-written TPROXY rules capture, tproxyd
/// installs none. A short connect timeout keeps failover checks quick.
fn config(body: &str) -> String {
    format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n{body}\n\
         [timeouts]\nconnect = 2\n[firewall]\nbackend = \"none\"\n"
    )
}

/// One echo exchange; the peer the server saw, or what went wrong.
fn try_echo(ns: &Netns, dst: SocketAddr) -> Result<SocketAddr, String> {
    let got = ns.enter(|| -> Result<Vec<u8>, String> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"echo me").map_err(|e| format!("write: {e}"))?;
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
        Ok(got)
    })?;
    if !got.starts_with(b"peer=") || !got.ends_with(b"echo me") {
        return Err(format!("answer {:?}", String::from_utf8_lossy(&got)));
    }
    Ok(peer_line(&got).0)
}

/// An echo exchange that reads the answer before closing: tinyproxy ends
/// both directions when the client half-closes (no half-close relay), so
/// `tcp_echo`'s write-then-FIN would lose the echo there, not in tproxyd.
fn echo_without_fin(ns: &Netns, dst: SocketAddr) -> SocketAddr {
    let got = ns.enter(|| {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"echo me").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"echo me") {
            let n = s
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("read {dst}: {e}"));
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    peer_line(&got).0
}

/// Connects and expects the connection to be reset at once, before any
/// answer: how a client sees `block` (and a refused upstream).
fn expect_reset(ns: &Netns, dst: SocketAddr) {
    let started = Instant::now();
    let outcome = ns.enter(|| {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = s.write_all(b"anyone?");
        let mut buf = [0u8; 64];
        s.read(&mut buf)
    });
    match outcome {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
            ) => {}
        other => panic!("{dst}: expected a reset, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{dst}: the reset took {:?}",
        started.elapsed()
    );
}

#[test]
fn rules_send_flows_to_socks5_direct_and_block() {
    let Some(mut tb) = bed() else { return };
    tb.restart_tproxyd_with_config(&config(&format!(
        r#"
[[outbounds]]
name = "proxy"
type = "socks5"
server = "{SOCKS_V4}:{SOCKS_PORT}"
[[outbounds]]
name = "direct"
type = "direct"
[[outbounds]]
name = "deny"
type = "block"
[route]
final = "proxy"
[[route.rules]]
dst_port = ["{SINK_PORT}"]
outbound = "deny"
[[route.rules]]
network = "udp"
dst = ["{REMOTE_B_V4}/32"]
outbound = "deny"
[[route.rules]]
dst = ["2001:db8:100::/64"]
outbound = "direct"
"#
    )));

    // final: through dante.
    let peer = tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT));
    assert_eq!(peer.ip(), Family::V4.hop(Upstream::Socks), "IPv4 via proxy");
    // dst rule: direct, from the router's own address.
    let peer = tcp_echo(&tb.lan, Family::V6.remote_a(ECHO_PORT));
    assert_eq!(peer.ip(), Family::V6.hop(Upstream::Direct), "IPv6 direct");
    // dst_port rule: block. The sink server listens there, so only the
    // rule can explain the reset.
    expect_reset(&tb.lan, Family::V4.remote_a(SINK_PORT));
    assert!(
        tb.wait_for_log("blocked by rule", Duration::from_secs(3)),
        "no 'blocked by rule' line"
    );

    // UDP: through dante, and blocked by the udp rule without a word
    // above debug and without slowing down the next new session.
    let (_, peer) = udp_echo(
        &tb.lan,
        Family::V4.lan_any(),
        Family::V4.remote_a(UDP_ECHO_PORT),
        Duration::from_secs(5),
    )
    .expect("UDP through the proxy");
    assert_eq!(peer.ip(), Family::V4.hop(Upstream::Socks));
    for _ in 0..3 {
        let blocked = udp_echo(
            &tb.lan,
            Family::V4.lan_any(),
            Family::V4.remote_b(UDP_ECHO_PORT),
            Duration::from_millis(500),
        );
        assert!(blocked.is_none(), "a blocked datagram was answered");
    }
    let (_, peer) = udp_echo(
        &tb.lan,
        Family::V4.lan_any(),
        Family::V4.remote_a(UDP_ECHO_PORT),
        Duration::from_secs(2),
    )
    .expect("UDP after blocked datagrams (no back-off)");
    assert_eq!(peer.ip(), Family::V4.hop(Upstream::Socks));
    let log = tb.tproxyd_log();
    assert!(
        log.contains("UDP datagram dropped: blocked by rule"),
        "{log}"
    );
    for warning in ["failed to open", "fail at once", " WARN "] {
        assert!(!log.contains(warning), "unexpected {warning:?} in:\n{log}");
    }
}

/// tinyproxy in the WAN namespace, with Basic auth; stopped with the bed
/// (the namespace's processes are killed when it is dropped).
fn start_tinyproxy(tb: &Testbed) -> Child {
    assert!(
        Path::new("/usr/bin/tinyproxy").exists() || std::env::var_os("CI").is_none(),
        "tinyproxy missing: run scripts/setup-test-deps"
    );
    tb.wan.ip(&format!("addr add {HTTP_PROXY_V4}/24 dev w0"));
    let conf = tb.dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port {HTTP_PROXY_PORT}\nListen {HTTP_PROXY_V4}\nBind {HTTP_PROXY_V4}\n\
             Timeout 30\nMaxClients 50\nLogLevel Info\nLogFile \"{}\"\n\
             BasicAuth {AUTH_USER} {AUTH_PASSWORD}\n",
            tb.dir.join("tinyproxy.log").display()
        ),
    )
    .unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &tb.wan.name, "tinyproxy", "-d", "-c"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tb.dir.join("tinyproxy.err")).unwrap())
        .spawn()
        .expect("start tinyproxy");
    let server = addr(HTTP_PROXY_V4, HTTP_PROXY_PORT);
    let up = tb.wan.enter(|| {
        wait_until(Duration::from_secs(10), || {
            TcpStream::connect(server).is_ok()
        })
    });
    assert!(
        up,
        "tinyproxy did not listen on {server}: {}",
        std::fs::read_to_string(tb.dir.join("tinyproxy.err")).unwrap_or_default()
    );
    child
}

#[test]
fn http_outbound_carries_tcp_through_connect_and_refuses_udp() {
    let Some(mut tb) = bed() else { return };
    if !Path::new("/usr/bin/tinyproxy").exists() && std::env::var_os("CI").is_none() {
        eprintln!("skipping: tinyproxy missing (scripts/setup-test-deps)");
        return;
    }
    let mut proxy = start_tinyproxy(&tb);
    tb.restart_tproxyd_with_config(&config(&format!(
        r#"
[[outbounds]]
name = "web"
type = "http"
server = "{HTTP_PROXY_V4}:{HTTP_PROXY_PORT}"
username = "{AUTH_USER}"
password = "{AUTH_PASSWORD}"
[[outbounds]]
name = "web-bad"
type = "http"
server = "{HTTP_PROXY_V4}:{HTTP_PROXY_PORT}"
username = "{AUTH_USER}"
password = "not-the-password"
[route]
final = "web"
[[route.rules]]
dst_port = ["{SINK_PORT}"]
network = "tcp"
outbound = "web-bad"
"#
    )));

    // TCP goes through tinyproxy: the server sees tinyproxy's address.
    let peer = echo_without_fin(&tb.lan, Family::V4.remote_a(ECHO_PORT));
    assert_eq!(peer.ip().to_string(), HTTP_PROXY_V4, "via the http proxy");
    let log = std::fs::read_to_string(tb.dir.join("tinyproxy.log")).unwrap_or_default();
    assert!(log.contains("CONNECT"), "tinyproxy saw no CONNECT:\n{log}");

    // Wrong password: 407, the client is reset, the log says why.
    expect_reset(&tb.lan, Family::V4.remote_a(SINK_PORT));
    assert!(
        tb.wait_for_log(
            &format!("refused username \"{AUTH_USER}\""),
            Duration::from_secs(3)
        ),
        "no 407 explanation in the log"
    );

    // UDP to an http outbound: no answer, and one line saying why.
    let answer = udp_echo(
        &tb.lan,
        Family::V4.lan_any(),
        Family::V4.remote_a(UDP_ECHO_PORT),
        Duration::from_millis(700),
    );
    assert!(answer.is_none(), "UDP went through an http outbound");
    assert!(
        tb.wait_for_log("carries TCP only", Duration::from_secs(3)),
        "no 'carries TCP only' line"
    );
    let _ = proxy.kill();
    let _ = proxy.wait();
}

/// A second dante on its own address, in the bed's WAN namespace.
struct Dante {
    conf: PathBuf,
    pid_file: PathBuf,
    child: Option<Child>,
}

impl Dante {
    fn new(tb: &Testbed, ip: &str) -> Dante {
        tb.wan.ip(&format!("addr add {ip}/24 dev w0"));
        let conf = tb.dir.join("danted-a.conf");
        let mut rules = String::new();
        for from in ["0.0.0.0/0", "::/0"] {
            for to in ["0.0.0.0/0", "::/0"] {
                rules.push_str(&format!(
                    "socks pass {{ from: {from} to: {to} command: connect udpassociate udpreply }}\n"
                ));
            }
        }
        std::fs::write(
            &conf,
            format!(
                "logoutput: {log}\ninternal: {ip} port = {SOCKS_PORT}\nexternal: {ip}\n\
                 clientmethod: none\nsocksmethod: none\nudp.connectdst: no\n\
                 user.privileged: root\nuser.unprivileged: nobody\n\
                 client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}\n\
                 client pass {{ from: ::/0 to: ::/0 }}\n{rules}",
                log = tb.dir.join("danted-a.log").display()
            ),
        )
        .unwrap();
        Dante {
            conf,
            pid_file: tb.dir.join("danted-a.pid"),
            child: None,
        }
    }

    fn start(&mut self, tb: &Testbed, ip: &str) {
        let child = Command::new("ip")
            .args(["netns", "exec", &tb.wan.name, "danted", "-f"])
            .arg(&self.conf)
            .arg("-p")
            .arg(&self.pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start danted");
        self.child = Some(child);
        let server = addr(ip, SOCKS_PORT);
        let up = tb.wan.enter(|| {
            wait_until(Duration::from_secs(10), || {
                TcpStream::connect(server).is_ok()
            })
        });
        assert!(up, "second dante did not listen on {server}");
    }

    /// Kills this dante and its helpers (they share its command line),
    /// never the bed's own dante.
    fn kill(&mut self, tb: &Testbed) {
        let conf = self.conf.display().to_string();
        for pid in tb.wan.pids() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&conf) {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn failover_moves_to_the_second_proxy_and_back() {
    let Some(mut tb) = bed() else { return };
    let mut dante_a = Dante::new(&tb, SOCKS_A_V4);
    dante_a.start(&tb, SOCKS_A_V4);
    tb.restart_tproxyd_with_config(&config(&format!(
        r#"
[[outbounds]]
name = "auto"
type = "failover"
outbounds = ["proxy-a", "proxy-b"]
interval = 1
[[outbounds]]
name = "proxy-a"
type = "socks5"
server = "{SOCKS_A_V4}:{SOCKS_PORT}"
[[outbounds]]
name = "proxy-b"
type = "socks5"
server = "{SOCKS_V4}:{SOCKS_PORT}"
[route]
final = "auto"
"#
    )));
    let dst = Family::V4.remote_a(ECHO_PORT);
    let via = |tb: &Testbed| try_echo(&tb.lan, dst).map(|p| p.ip().to_string());
    assert_eq!(via(&tb), Ok(SOCKS_A_V4.to_string()), "starts on proxy-a");

    // proxy-a goes away: within interval + connect timeout (1 s + 2 s),
    // new flows go to proxy-b.
    dante_a.kill(&tb);
    let killed = Instant::now();
    let moved = wait_until(Duration::from_secs(6), || {
        via(&tb) == Ok(SOCKS_V4.to_string())
    });
    assert!(moved, "flows did not move to proxy-b: last {:?}", via(&tb));
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "moving took {:?}",
        killed.elapsed()
    );
    assert!(
        tb.wait_for_log("failover \"auto\": proxy-a down (", Duration::from_secs(1)),
        "no failover line"
    );
    assert!(tb.tproxyd_log().contains("new flows go to proxy-b"));

    // proxy-a comes back: new flows return to it.
    dante_a.start(&tb, SOCKS_A_V4);
    let back = wait_until(Duration::from_secs(6), || {
        via(&tb) == Ok(SOCKS_A_V4.to_string())
    });
    assert!(back, "flows did not return to proxy-a: last {:?}", via(&tb));
    assert!(tb.wait_for_log(
        "failover \"auto\": proxy-a is back up, new flows go to proxy-a",
        Duration::from_secs(1)
    ));
    dante_a.kill(&tb);
}
