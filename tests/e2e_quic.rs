//! QUIC sniffing end to end: a real QUIC client (aioquic) in the LAN
//! namespace talks to a real QUIC server in the WAN namespace; the SNI of
//! its Initials, a ClientHello over two Initial packets in two datagrams,
//! picks the outbound (dante or direct, proved by the client address the
//! server saw), for QUIC versions 1 and 2, IPv4 and IPv6. A `protocol =
//! "quic"` rule on UDP 443 blocks HTTP/3 and nothing else. And the time to
//! the first reply of a QUIC flow whose name matches no rule, against the
//! same flow with sniffing off.
//!
//! Needs python3 with aioquic (scripts/setup-test-deps installs it); with
//! CI=true its absence is a failure, never a skip.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tproxyd::policy::sniff::quic::{crypto_frame, seal_initial, Version};

const QUIC_PORT: u16 = 443;

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/quic_peer.py")
}

/// Whether python3 can import aioquic; under CI its absence fails.
fn have_aioquic() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import aioquic"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let why = "the QUIC tests need python3 with aioquic (scripts/setup-test-deps installs it)";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipping: {why}");
    }
    ok
}

/// dante for *.via-proxy.example, block for *.blocked.example, and
/// direct for everything else; `sniffing` false: no rule looks at names
/// (flows are never held).
fn config(sniffing: bool, extra_rules: &str) -> String {
    let rules = if sniffing {
        "[[route.rules]]\ndomain_suffix = [\"via-proxy.example\"]\noutbound = \"proxy\"\n\
         [[route.rules]]\ndomain_suffix = [\"blocked.example\"]\noutbound = \"deny\"\n"
    } else {
        "[[route.rules]]\ndst_port = [\"1\"]\noutbound = \"proxy\"\n"
    };
    format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n\
         [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n\
         [[outbounds]]\nname = \"deny\"\ntype = \"block\"\n\
         [route]\nfinal = \"direct\"\n{extra_rules}{rules}\
         [firewall]\nbackend = \"none\"\n"
    )
}

fn bed(config: &str) -> Option<Testbed> {
    if !can_run() || !have_aioquic() {
        return None;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    tb.restart_tproxyd_with_config(config);
    Some(tb)
}

/// The aioquic server in the WAN namespace, on remote A's port 443, v4
/// and v6; killed when dropped (the bed would kill it too). Its stderr
/// (aioquic's errors) goes to a file in the bed's directory.
struct QuicServer(Child, PathBuf);

impl QuicServer {
    fn start(tb: &Testbed) -> QuicServer {
        let log = tb.dir.join("quic-server.log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &tb.wan.name, "python3"])
            .arg(peer_script())
            .args(["server", REMOTE_A_V4, REMOTE_A_V6, "--port"])
            .arg(QUIC_PORT.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the QUIC server");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        assert_eq!(line.trim(), "ready", "the QUIC server did not start");
        QuicServer(child, log)
    }

    /// What the server complained about: packets that reached it but
    /// began no connection.
    fn errors(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for QuicServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one aioquic request from the LAN saw.
#[derive(Debug)]
enum Reply {
    /// The client address the server saw, the QUIC version, and the
    /// milliseconds from the first Initial to the reply.
    Answered {
        peer: SocketAddr,
        version: u32,
        ms: f64,
    },
    TimedOut,
}

fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let at = json.find(&format!("\"{key}\": "))? + key.len() + 4;
    let rest = &json[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('"'))
}

/// One QUIC request from the LAN namespace with a ClientHello over two
/// Initial packets.
fn quic_request(tb: &Testbed, dst: SocketAddr, sni: &str, version: u8, timeout: f64) -> Reply {
    let out = Command::new("ip")
        .args(["netns", "exec", &tb.lan.name, "python3"])
        .arg(peer_script())
        .args(["client", "--host", &dst.ip().to_string(), "--port"])
        .arg(dst.port().to_string())
        .args(["--sni", sni, "--version", &version.to_string(), "--big"])
        .args(["--timeout", &timeout.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("run the QUIC client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.code() == Some(2) {
        return Reply::TimedOut;
    }
    assert!(
        out.status.success(),
        "QUIC client failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = field(&text, "reply").unwrap_or_else(|| panic!("no reply in {text}"));
    let reply = reply.replace("\\n", "\n");
    let (peer, off) = peer_line(reply.as_bytes());
    assert_eq!(&reply[off..], "quic echo me", "the echo");
    Reply::Answered {
        peer,
        version: field(&text, "version").unwrap().parse().unwrap(),
        ms: field(&text, "ms").unwrap().parse().unwrap(),
    }
}

fn answered(reply: Reply, what: &str) -> (IpAddr, u32) {
    match reply {
        Reply::Answered { peer, version, ms } => {
            eprintln!("{what}: answered in {ms:.1} ms (aioquic, handshake and request)");
            (peer.ip(), version)
        }
        Reply::TimedOut => panic!("{what}: no answer"),
    }
}

/// The QUIC flow lines of the log with this host: how many datagrams
/// each held, and the outbound.
fn routed(tb: &Testbed, host: &str) -> Vec<(usize, String)> {
    let needle = format!("host=\"{host}\" sniffed=\"quic\"");
    tb.tproxyd_log()
        .lines()
        .filter(|l| l.contains("QUIC flow routed") && l.contains(&needle))
        .map(|l| {
            let word = |key: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or("")
                    .to_string()
            };
            (word("held=").parse().unwrap_or(0), word("outbound="))
        })
        .collect()
}

#[test]
fn quic_sni_picks_the_outbound_v1_and_v2() {
    let Some(tb) = bed(&config(true, "")) else {
        return;
    };
    let server = QuicServer::start(&tb);
    for fam in [Family::V4, Family::V6] {
        let dst = fam.remote_a(QUIC_PORT);
        for version in [1u8, 2] {
            let want = if version == 1 {
                0x0000_0001
            } else {
                0x6b33_43cf
            };
            let (peer, v) = answered(
                quic_request(&tb, dst, "www.via-proxy.example", version, 10.0),
                "via-proxy",
            );
            assert_eq!(v, want, "{fam:?}: QUIC version");
            assert_eq!(
                peer,
                fam.hop(Upstream::Socks),
                "{fam:?} v{version}: the SNI www.via-proxy.example must go through dante"
            );
            let (peer, _) = answered(
                quic_request(&tb, dst, "elsewhere.example", version, 10.0),
                "elsewhere",
            );
            assert_eq!(
                peer,
                fam.hop(Upstream::Direct),
                "{fam:?} v{version}: a name no rule matches goes direct"
            );
            // A blocked name: no answer at all.
            assert!(
                matches!(
                    quic_request(&tb, dst, "a.blocked.example", version, 1.5),
                    Reply::TimedOut
                ),
                "{fam:?} v{version}: a blocked name was answered"
            );
        }
    }
    // Each flow was held for its two Initial datagrams, then routed.
    let proxied = routed(&tb, "www.via-proxy.example");
    assert_eq!(proxied.len(), 4, "{proxied:?}\n{}", tb.tproxyd_log());
    assert!(
        proxied
            .iter()
            .all(|(held, out)| *held >= 2 && out == "proxy"),
        "{proxied:?}"
    );
    let direct = routed(&tb, "elsewhere.example");
    assert!(
        direct
            .iter()
            .all(|(held, out)| *held >= 2 && out == "direct"),
        "{direct:?}"
    );
    assert!(!routed(&tb, "a.blocked.example").is_empty());
    // Nothing of the blocked flows reached the server, their clients'
    // retransmitted Initials (PING only, no name) included.
    let errors = server.errors();
    assert!(
        !errors.contains("Error"),
        "the server got packets:\n{errors}"
    );
}

#[test]
fn a_protocol_quic_rule_blocks_http3_and_nothing_else() {
    let rule = "[[route.rules]]\nprotocol = [\"quic\"]\nnetwork = \"udp\"\n\
                dst_port = [\"443\"]\noutbound = \"deny\"\n";
    let Some(tb) = bed(&config(true, rule)) else {
        return;
    };
    let server = QuicServer::start(&tb);
    for fam in [Family::V4, Family::V6] {
        // Even a name that would go through dante: QUIC on 443 is blocked.
        assert!(
            matches!(
                quic_request(
                    &tb,
                    fam.remote_a(QUIC_PORT),
                    "www.via-proxy.example",
                    1,
                    1.5
                ),
                Reply::TimedOut
            ),
            "{fam:?}: QUIC on UDP 443 was not blocked"
        );
        // Other UDP is not QUIC and goes on.
        let (from, peer) = udp_echo(
            &tb.lan,
            fam.lan_any(),
            fam.remote_a(UDP_ECHO_PORT),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("{fam:?}: plain UDP was blocked too"));
        assert_eq!(from, fam.remote_a(UDP_ECHO_PORT));
        assert_eq!(peer.ip(), fam.hop(Upstream::Direct));
    }
    // Refused by the protocol rule, not by the name's rule (dante).
    assert!(routed(&tb, "www.via-proxy.example")
        .iter()
        .all(|(_, out)| out == "deny"));
    let errors = server.errors();
    assert!(
        !errors.contains("Error"),
        "the server got packets:\n{errors}"
    );
}

/// A ClientHello handshake message for `name`, with a key share of `pq`
/// bytes so that with 1,216 it needs two Initial packets.
fn client_hello(name: &str, pq: usize) -> Vec<u8> {
    fn vec16(data: &[u8]) -> Vec<u8> {
        let mut v = (data.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(data);
        v
    }
    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend(vec16(data));
    }
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend(vec16(&[0x13, 0x01]));
    body.extend([1, 0]);
    let mut exts = Vec::new();
    let mut sni = vec![0];
    sni.extend(vec16(name.as_bytes()));
    ext(&mut exts, 0x0000, &vec16(&sni));
    ext(&mut exts, 0x0010, &vec16(b"\x02h3"));
    let mut shares = vec![0x11, 0xec];
    shares.extend(vec16(&vec![0xab; pq]));
    shares.extend([0x00, 0x1d]);
    shares.extend(vec16(&[0xcd; 32]));
    ext(&mut exts, 0x0033, &vec16(&shares));
    ext(&mut exts, 0x002b, &[2, 3, 4]);
    body.extend(vec16(&exts));
    let mut msg = vec![1];
    msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend(body);
    msg
}

/// A QUIC v1 first flight for `name`: two Initial datagrams when the
/// ClientHello is post-quantum sized, one otherwise.
fn first_flight(name: &str, two: bool, n: u32) -> Vec<Vec<u8>> {
    let hello = client_hello(name, if two { 1216 } else { 0 });
    let mut dcid = [0x5au8; 8];
    dcid[..4].copy_from_slice(&n.to_be_bytes());
    if !two {
        return vec![seal_initial(
            Version::V1,
            &dcid,
            b"",
            0,
            1,
            &crypto_frame(0, &hello),
            1250,
        )];
    }
    let (a, b) = hello.split_at(1100);
    vec![
        seal_initial(Version::V1, &dcid, b"", 1, 2, &crypto_frame(0, a), 1250),
        seal_initial(Version::V1, &dcid, b"", 2, 2, &crypto_frame(1100, b), 1250),
    ]
}

/// Sends `count` first flights from new client ports to the UDP echo
/// server (every flight a new session) and returns the times from the
/// first datagram sent to the first reply, sorted, in microseconds.
fn time_to_first_reply(tb: &Testbed, fam: Family, two: bool, count: u32) -> Vec<u64> {
    let dst = fam.remote_a(UDP_ECHO_PORT);
    tb.lan.enter(|| {
        let mut times = Vec::new();
        let mut buf = vec![0u8; 4096];
        for n in 0..count {
            let flight = first_flight("nomatch.example", two, n);
            let s = UdpSocket::bind(fam.lan_any()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let started = Instant::now();
            for d in &flight {
                s.send_to(d, dst).unwrap();
            }
            let (len, _) = s.recv_from(&mut buf).expect("an echo");
            times.push(started.elapsed().as_micros() as u64);
            let (peer, off) = peer_line(&buf[..len]);
            assert_eq!(peer.ip(), fam.hop(Upstream::Direct));
            assert_eq!(
                &buf[off..len],
                &flight[0][..],
                "the first datagram first, unchanged"
            );
            for _ in 1..flight.len() {
                s.recv_from(&mut buf).expect("every datagram echoed");
            }
        }
        times.sort_unstable();
        times
    })
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// The measure: what sniffing adds to the time to the first reply
/// of a QUIC flow whose name matches no rule. Rounds alternate sniffing
/// off and on so drift on the shared machine hits both alike.
#[test]
fn time_to_first_reply_of_an_unmatched_quic_flow() {
    let Some(mut tb) = bed(&config(false, "")) else {
        return;
    };
    const ROUNDS: usize = 3;
    const PER_ROUND: u32 = 100;
    let mut off = (Vec::new(), Vec::new());
    let mut on = (Vec::new(), Vec::new());
    for round in 0..ROUNDS * 2 {
        let sniffing = round % 2 == 1;
        tb.restart_tproxyd_with_config(&config(sniffing, ""));
        // One untimed flight first: the first session pays for warm-up.
        time_to_first_reply(&tb, Family::V4, true, 1);
        let two = time_to_first_reply(&tb, Family::V4, true, PER_ROUND);
        let one = time_to_first_reply(&tb, Family::V4, false, PER_ROUND);
        let into = if sniffing { &mut on } else { &mut off };
        into.0.extend(two);
        into.1.extend(one);
    }
    for v in [&mut off.0, &mut off.1, &mut on.0, &mut on.1] {
        v.sort_unstable();
    }
    let line = |what: &str, v: &[u64]| {
        eprintln!(
            "{what}: p50 {} µs, p90 {} µs, p99 {} µs ({} flows)",
            percentile(v, 50),
            percentile(v, 90),
            percentile(v, 99),
            v.len()
        );
    };
    line("two Initials, sniffing off", &off.0);
    line("two Initials, sniffing on ", &on.0);
    line("one Initial,  sniffing off", &off.1);
    line("one Initial,  sniffing on ", &on.1);
    let added_two = percentile(&on.0, 50) as i64 - percentile(&off.0, 50) as i64;
    let added_one = percentile(&on.1, 50) as i64 - percentile(&off.1, 50) as i64;
    eprintln!("added p50: {added_two} µs (two Initials, held), {added_one} µs (one Initial)");
    // The hold waits only for the second datagram, sent right after the
    // first: the cost is microseconds, nowhere near the 300 ms bound.
    assert!(
        added_two < 5_000,
        "sniffing added {added_two} µs to a held QUIC flow's first reply"
    );
    assert!(
        added_one < 5_000,
        "sniffing added {added_one} µs to a one-Initial QUIC flow's first reply"
    );
    let log = tb.tproxyd_log();
    assert!(
        log.contains("host=\"nomatch.example\" sniffed=\"quic\" outbound=direct"),
        "the flows were not sniffed:\n{log}"
    );
}
