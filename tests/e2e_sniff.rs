//! Sniffing end to end: the TLS SNI or HTTP Host a LAN client sends picks
//! the outbound (dante or direct, proved by the address the WAN server
//! saw), the peeked bytes reach the server unchanged, server-first
//! protocols are not held up, and `send_domain` makes the SOCKS5 CONNECT
//! name the host.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(10);
/// A port where nothing is server-first by convention, served by the
/// banner server below: sniffing waits there.
const BANNER_PORT: u16 = 2222;
/// SSH: sniffing is skipped there.
const SSH_PORT: u16 = 22;
/// The banner server of the time-to-first-byte measurement.
const TTFB_PORT: u16 = 8443;
/// The fake SOCKS5 server of the send_domain check.
const FAKE_SOCKS_PORT: u16 = 1082;

/// Two outbounds, direct by default, dante for one domain; a third,
/// `named`, is the fake SOCKS5 server with send_domain.
fn config(sniffing_rules: bool) -> String {
    let rules = if sniffing_rules {
        "[[route.rules]]\ndomain_suffix = [\"via-proxy.example\"]\noutbound = \"proxy\"\n\
         [[route.rules]]\ndomain = [\"named.example\"]\noutbound = \"named\"\n"
    } else {
        // A rule that needs no name: flows are never held.
        "[[route.rules]]\ndst_port = [\"1\"]\noutbound = \"proxy\"\n"
    };
    format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n\
         [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n\
         [[outbounds]]\nname = \"named\"\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{FAKE_SOCKS_PORT}\"\nsend_domain = true\n\
         [route]\nfinal = \"direct\"\n{rules}\
         [firewall]\nbackend = \"none\"\n"
    )
}

fn bed() -> Option<Testbed> {
    if !can_run() {
        return None;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    tb.restart_tproxyd_with_config(&config(true));
    Some(tb)
}

fn connect(dst: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&dst, T).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Sends `parts` (with `gap` between them) to the echo server, half-closes
/// and returns the peer the server saw; the echo must be the bytes sent.
fn echo_parts(tb: &Testbed, dst: SocketAddr, parts: &[&[u8]], gap: Duration) -> SocketAddr {
    let got = tb.lan.enter(|| {
        let mut s = connect(dst);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                thread::sleep(gap);
            }
            s.write_all(p).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let (peer, off) = peer_line(&got);
    assert_eq!(
        got[off..],
        parts.concat()[..],
        "the server must get the peeked bytes unchanged"
    );
    peer
}

fn http_request(host: &str) -> Vec<u8> {
    format!("GET /sniff HTTP/1.1\r\nUser-Agent: e2e\r\nHost: {host}\r\nAccept: */*\r\n\r\n")
        .into_bytes()
}

fn vec16(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend(vec16(data));
}

/// A ClientHello handshake message with SNI `name` and, like Chrome's
/// today, an X25519MLKEM768 key share (1,216 bytes) beside X25519 and a
/// GREASE ECH extension: over 1,500 bytes.
fn client_hello(name: &str) -> Vec<u8> {
    client_hello_with(name, 1216)
}

/// The same with a key share of `pq` bytes (0: X25519 only, ~500 bytes,
/// one segment).
fn client_hello_with(name: &str, pq: usize) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(32);
    body.extend([9u8; 32]);
    body.extend(vec16(&[0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0xc0, 0x2b]));
    body.extend([1, 0]);
    let mut exts = Vec::new();
    ext(&mut exts, 0x000a, &vec16(&[0x11, 0xec, 0x00, 0x1d]));
    let mut sni = vec![0];
    sni.extend(vec16(name.as_bytes()));
    ext(&mut exts, 0x0000, &vec16(&sni));
    ext(&mut exts, 0x0010, &vec16(b"\x02h2\x08http/1.1"));
    let mut shares = Vec::new();
    if pq > 0 {
        shares.extend([0x11, 0xec]);
        shares.extend(vec16(&vec![0xab; pq]));
    }
    shares.extend([0x00, 0x1d]);
    shares.extend(vec16(&[0xcd; 32]));
    ext(&mut exts, 0x0033, &vec16(&shares));
    ext(&mut exts, 0x002b, &[2, 3, 4]);
    // GREASE ECH, as Chrome sends it.
    let mut ech = vec![0, 0, 1, 0, 1, 0x42];
    ech.extend(vec16(&[0x11; 32]));
    ech.extend(vec16(&[0x22; 144]));
    ext(&mut exts, 0xfe0d, &ech);
    body.extend(vec16(&exts));
    let mut msg = vec![1];
    msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend(body);
    msg
}

/// `message` in TLS handshake records of at most `fragment` bytes.
fn records(message: &[u8], fragment: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(fragment) {
        out.extend([22, 3, 1]);
        out.extend((chunk.len() as u16).to_be_bytes());
        out.extend(chunk);
    }
    out
}

fn proxied(fam: Family) -> std::net::IpAddr {
    fam.hop(Upstream::Socks)
}

fn direct(fam: Family) -> std::net::IpAddr {
    fam.hop(Upstream::Direct)
}

#[test]
fn http_host_and_tls_sni_pick_the_outbound() {
    let Some(tb) = bed() else { return };
    for fam in [Family::V4, Family::V6] {
        let dst = fam.remote_a(ECHO_PORT);
        // (a) HTTP Host.
        let req = http_request("www.Via-Proxy.example:80");
        assert_eq!(
            echo_parts(&tb, dst, &[&req], Duration::ZERO).ip(),
            proxied(fam),
            "{fam:?}: HTTP Host via-proxy.example must go through dante"
        );
        let req = http_request("other.example");
        assert_eq!(
            echo_parts(&tb, dst, &[&req], Duration::ZERO).ip(),
            direct(fam),
            "{fam:?}: another Host goes direct"
        );

        // (b) TLS SNI, one record, all at once.
        let hello = records(&client_hello("via-proxy.example"), 16384);
        assert!(hello.len() > 1500);
        assert_eq!(
            echo_parts(&tb, dst, &[&hello], Duration::ZERO).ip(),
            proxied(fam),
            "{fam:?}: SNI"
        );
        let other = records(&client_hello("elsewhere.example"), 16384);
        assert_eq!(
            echo_parts(&tb, dst, &[&other], Duration::ZERO).ip(),
            direct(fam),
            "{fam:?}: other SNI"
        );
        // Two TCP segments, 50 ms apart.
        assert_eq!(
            echo_parts(
                &tb,
                dst,
                &[&hello[..500], &hello[500..]],
                Duration::from_millis(50)
            )
            .ip(),
            proxied(fam),
            "{fam:?}: ClientHello over two segments"
        );
        // Two TLS records (the key share cut in the middle), and those
        // again over two segments.
        let two = records(&client_hello("a.via-proxy.example"), 1000);
        assert_eq!(two.len(), client_hello("a.via-proxy.example").len() + 10);
        assert_eq!(
            echo_parts(&tb, dst, &[&two], Duration::ZERO).ip(),
            proxied(fam),
            "{fam:?}: ClientHello over two records"
        );
        assert_eq!(
            echo_parts(
                &tb,
                dst,
                &[&two[..700], &two[700..]],
                Duration::from_millis(50)
            )
            .ip(),
            proxied(fam),
            "{fam:?}: two records over two segments"
        );
    }
    for needle in [
        "host=\"www.via-proxy.example\" sniffed=\"http\" outbound=proxy",
        "host=\"a.via-proxy.example\" sniffed=\"tls\" outbound=proxy",
        "host=\"elsewhere.example\" sniffed=\"tls\" outbound=direct",
    ] {
        assert!(
            tb.wait_for_log(needle, Duration::from_secs(3)),
            "no flow line with {needle}:\n{}",
            tb.tproxyd_log()
        );
    }
}

/// A server that speaks first: "peer=ADDR\n", then echoes. It blocks in
/// accept (the bed's echo server polls every 5 ms), so it also serves
/// the time-to-first-byte measurement.
fn start_banner_servers(tb: &Testbed, ports: &[u16]) {
    let listeners = tb.wan.enter(|| {
        let mut ls = Vec::new();
        for &port in ports {
            for ip in [REMOTE_A_V4, REMOTE_A_V6] {
                ls.push(TcpListener::bind(addr(ip, port)).unwrap());
            }
        }
        ls
    });
    for l in listeners {
        thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(mut s) = stream else { continue };
                thread::spawn(move || {
                    let peer = s.peer_addr().unwrap();
                    let _ = s.write_all(format!("peer={peer}\n").as_bytes());
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
}

/// Connects, sends nothing, and returns the banner's peer and how long it
/// took to arrive.
fn wait_for_banner(tb: &Testbed, dst: SocketAddr) -> (SocketAddr, Duration) {
    tb.lan.enter(|| {
        let started = Instant::now();
        let mut s = connect(dst);
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\n") {
            let n = s.read(&mut byte).unwrap();
            assert!(n > 0, "{dst}: closed before the banner");
            line.push(byte[0]);
        }
        let took = started.elapsed();
        // The flow still carries the client's bytes afterwards.
        s.write_all(b"after").unwrap();
        let mut echo = [0u8; 5];
        s.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"after");
        (peer_line(&line).0, took)
    })
}

#[test]
fn server_first_protocols_are_routed_by_address() {
    let Some(tb) = bed() else { return };
    start_banner_servers(&tb, &[SSH_PORT, BANNER_PORT]);
    for fam in [Family::V4, Family::V6] {
        // (c) Port 22: no wait at all.
        let (peer, took) = wait_for_banner(&tb, fam.remote_a(SSH_PORT));
        assert_eq!(peer.ip(), direct(fam), "{fam:?}");
        eprintln!("{fam:?} port {SSH_PORT}: banner after {took:?}");
        assert!(
            took < Duration::from_millis(200),
            "{fam:?}: port 22 must not wait for the client's bytes ({took:?})"
        );
        // Another port: the short sniff wait, then by address.
        let (peer, took) = wait_for_banner(&tb, fam.remote_a(BANNER_PORT));
        assert_eq!(peer.ip(), direct(fam), "{fam:?}");
        eprintln!("{fam:?} port {BANNER_PORT}: banner after {took:?}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{fam:?}: expected about the 300 ms sniff wait, got {took:?}"
        );
    }
}

/// (d) A fake SOCKS5 server on the WAN side that records the CONNECT
/// request, then answers "target=ATYP:NAME:PORT\n" and echoes.
fn start_fake_socks(tb: &Testbed) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tb
        .wan
        .enter(|| TcpListener::bind(addr(SOCKS_V4, FAKE_SOCKS_PORT)).unwrap());
    let log = Arc::clone(&seen);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let log = Arc::clone(&log);
            // tproxyd's start-up probe connects and closes without a
            // word: a broken exchange just ends that connection.
            thread::spawn(move || {
                let _ = fake_socks_exchange(&mut s, &log);
            });
        }
    });
    seen
}

fn fake_socks_exchange(s: &mut TcpStream, log: &Mutex<Vec<Vec<u8>>>) -> std::io::Result<()> {
    s.set_read_timeout(Some(T))?;
    let mut greeting = [0u8; 3];
    s.read_exact(&mut greeting)?;
    assert_eq!(greeting, [5, 1, 0]);
    s.write_all(&[5, 0])?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len)?;
            usize::from(len[0])
        }
        other => panic!("bad ATYP {other}"),
    };
    let mut rest = vec![0u8; addr_len + 2];
    s.read_exact(&mut rest)?;
    let port = u16::from_be_bytes([rest[addr_len], rest[addr_len + 1]]);
    let target = if head[3] == 3 {
        String::from_utf8_lossy(&rest[..addr_len]).into_owned()
    } else {
        "ip".into()
    };
    let mut request = head.to_vec();
    if head[3] == 3 {
        request.push(addr_len as u8);
    }
    request.extend(&rest);
    log.lock().unwrap().push(request);
    s.write_all(&[5, 0, 0, 1, 203, 0, 113, 2, 0x04, 0x38])?;
    s.write_all(format!("target={}:{target}:{port}\n", head[3]).as_bytes())?;
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
    }
    s.shutdown(Shutdown::Write)
}

fn through_fake_socks(tb: &Testbed, dst: SocketAddr, first: &[u8]) -> String {
    tb.lan.enter(|| {
        let mut s = connect(dst);
        s.write_all(first).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        let end = got.iter().position(|&b| b == b'\n').unwrap_or(got.len());
        assert_eq!(
            got.get(end + 1..).unwrap_or_default(),
            first,
            "{dst}: bytes must pass unchanged"
        );
        String::from_utf8_lossy(&got[..end]).into_owned()
    })
}

#[test]
fn send_domain_connects_by_the_sniffed_name() {
    let Some(tb) = bed() else { return };
    let seen = start_fake_socks(&tb);
    for fam in [Family::V4, Family::V6] {
        let dst = fam.remote_a(443);
        let hello = records(&client_hello("named.example"), 16384);
        assert_eq!(
            through_fake_socks(&tb, dst, &hello),
            "target=3:named.example:443",
            "{fam:?}: TLS"
        );
        let dst = fam.remote_a(8080);
        assert_eq!(
            through_fake_socks(&tb, dst, &http_request("Named.Example:8080")),
            "target=3:named.example:8080",
            "{fam:?}: HTTP"
        );
    }
    let requests = seen.lock().unwrap();
    let mut want = vec![5, 1, 0, 3, 13];
    want.extend(b"named.example");
    want.extend(443u16.to_be_bytes());
    assert_eq!(requests[0], want, "the CONNECT request, byte for byte");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Time to first byte of a TLS exchange (connect, ClientHello, first byte
/// back), 200 times with sniffing on and off. Measured, not asserted: the
/// figures are printed (`--nocapture`).
#[test]
fn measure_time_to_first_byte_with_and_without_sniffing() {
    let Some(mut tb) = bed() else { return };
    // The banner server answers at once on accept: its first byte comes
    // as soon as tproxyd has connected upstream (direct).
    start_banner_servers(&tb, &[TTFB_PORT]);
    let dst = Family::V4.remote_a(TTFB_PORT);
    let small = records(&client_hello_with("elsewhere.example", 0), 16384);
    let large = records(&client_hello("elsewhere.example"), 16384);
    let mut report = Vec::new();
    for sniffing in [true, false] {
        tb.restart_tproxyd_with_config(&config(sniffing));
        for (label, hello) in [("one segment", &small), ("two segments (PQ)", &large)] {
            let mut times = tb.lan.enter(|| {
                let mut times = Vec::with_capacity(200);
                for i in 0..220 {
                    let started = Instant::now();
                    let mut s = connect(dst);
                    s.write_all(hello).unwrap();
                    let mut byte = [0u8; 1];
                    s.read_exact(&mut byte).unwrap();
                    let took = started.elapsed();
                    // The first 20 warm up.
                    if i >= 20 {
                        times.push(took);
                    }
                }
                times
            });
            times.sort();
            report.push(format!(
                "sniffing {}, ClientHello {} B, {label}: p50 {:?} p90 {:?} p99 {:?} max {:?} (n={})",
                if sniffing { "on " } else { "off" },
                hello.len(),
                percentile(&times, 0.5),
                percentile(&times, 0.9),
                percentile(&times, 0.99),
                times[times.len() - 1],
                times.len()
            ));
        }
    }
    eprintln!(
        "TLS time to first byte, direct, IPv4:\n  {}",
        report.join("\n  ")
    );
}

/// Real clients: curl's own HTTP request and its own TLS ClientHello
/// (OpenSSL's, with whatever extensions this curl sends), IPv4 and IPv6,
/// are routed by name. The echo server is not an HTTP or TLS server, so
/// curl's exchange itself fails; what counts is where the flow went: the
/// server's `peer=` line (HTTP, read with --http0.9) and tproxyd's flow
/// line (TLS).
#[test]
fn curl_http_and_tls_are_routed_by_name() {
    let Some(tb) = bed() else { return };
    for fam in [Family::V4, Family::V6] {
        let ip = fam.remote_a(ECHO_PORT).ip();
        let literal = match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        for (host, hop) in [
            ("www.via-proxy.example", fam.hop(Upstream::Socks)),
            ("elsewhere.example", fam.hop(Upstream::Direct)),
        ] {
            let resolve = format!("{host}:{ECHO_PORT}:{literal}");
            let out = tb.lan.exec_output(&[
                "curl",
                "-s",
                "--http0.9",
                // The echo server waits for more: curl stops at the limit.
                "--max-time",
                "2",
                "--resolve",
                &resolve,
                &format!("http://{host}:{ECHO_PORT}/curl"),
            ]);
            let (peer, _) = peer_line(out.as_bytes());
            assert_eq!(peer.ip(), hop, "{fam:?} curl http {host}: {out}");

            // TLS: the handshake fails against an echo server; the flow
            // line says which name tproxyd read and where it sent it.
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &tb.lan.name, "curl", "-s", "-k"])
                .args(["--max-time", "2", "--resolve", &resolve])
                .arg(format!("https://{host}:{ECHO_PORT}/curl"))
                .output();
            let route = if host.starts_with("www.via") {
                "proxy"
            } else {
                "direct"
            };
            let dst = fam.remote_a(ECHO_PORT);
            let needle = format!("dst={dst} host=\"{host}\" sniffed=\"tls\" outbound={route}");
            assert!(
                tb.wait_for_log(&needle, Duration::from_secs(5)),
                "{fam:?}: no flow line with {needle}:\n{}",
                tb.tproxyd_log()
            );
        }
    }
}
