//! DNS through tproxyd (issue 10), end to end in the namespaces: a real
//! DNS server (tests/common/dns_server.rs) on remote B's address, port
//! 53, UDP and TCP; `dig` and a small client in the LAN.
//!
//! - Through a SOCKS5 server without UDP (dante with CONNECT only), UDP
//!   queries are answered, carried as DNS over TCP: the server sees TCP
//!   from dante's address, over a few connections, not one per query.
//! - `[dns] server`: a query to another address is answered by that
//!   resolver, and the answer comes from the address asked.
//! - `filter_aaaa`: AAAA gets NOERROR with no answer.
//! - A name learned from an answer routes a later TCP flow without SNI.

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::dns_server::{parse_reply, query, DnsServer, Transport};
use common::*;

const A: u16 = 1;
const AAAA: u16 = 28;

/// The zone: names with "via-proxy" resolve to remote A (where the echo
/// server is), every other name to remote B.
fn zone(name: &str, qtype: u16) -> Option<IpAddr> {
    let ip = match (name.contains("via-proxy"), qtype) {
        (true, A) => REMOTE_A_V4,
        (false, A) => REMOTE_B_V4,
        (true, AAAA) => REMOTE_A_V6,
        (false, AAAA) => REMOTE_B_V6,
        _ => return None,
    };
    ip.parse().ok()
}

/// A bed with hand-written capture rules (198.51.100.0/24 and
/// 2001:db8:100::/64, TCP and UDP, to tproxyd) and the DNS server on
/// remote B; tproxyd runs `config` (its outbounds and [dns]).
fn bed(config_body: &str) -> Option<(Testbed, DnsServer)> {
    if !can_run() {
        return None;
    }
    let dig = Command::new("dig").arg("-v").output().is_ok();
    if !dig {
        let why = "dig is missing (dnsutils; scripts/setup-test-deps installs it)";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipping: {why}");
        return None;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    let server = DnsServer::start(
        &tb.wan,
        &[addr(REMOTE_B_V4, DNS_PORT), addr(REMOTE_B_V6, DNS_PORT)],
        zone,
    );
    tb.restart_tproxyd_with_config(&format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n{config_body}\n[firewall]\nbackend = \"none\"\n"
    ));
    Some((tb, server))
}

fn socks_outbound(name: &str) -> String {
    format!("[[outbounds]]\nname = \"{name}\"\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n")
}

/// `dig ARGS` in the LAN namespace; its whole output.
fn dig(tb: &Testbed, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &tb.lan.name, "dig", "+time=3", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asks `count` questions at once from the LAN, `per_socket` on each of
/// several sockets, every socket using the same ids (as unrelated stub
/// resolvers do); returns how many were answered correctly within `wait`.
fn ask_in_parallel(
    tb: &Testbed,
    dst: SocketAddr,
    count: usize,
    per_socket: usize,
    wait: Duration,
) -> usize {
    tb.lan.enter(|| {
        let bind = if dst.is_ipv4() { LAN_V4 } else { LAN_V6 };
        let sockets: Vec<UdpSocket> = (0..count.div_ceil(per_socket))
            .map(|_| {
                let s = UdpSocket::bind(addr(bind, 0)).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let mut expected = Vec::new();
        for (i, s) in sockets.iter().enumerate() {
            for j in 0..per_socket {
                if i * per_socket + j >= count {
                    break;
                }
                let name = format!("q{i}-{j}.example");
                let q = query(1000 + j as u16, &name, A);
                s.send_to(&q, dst).unwrap();
                expected.push((i, q));
            }
        }
        let mut answered = HashSet::new();
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while answered.len() < expected.len() && Instant::now() < deadline {
            let mut got = false;
            for (i, s) in sockets.iter().enumerate() {
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    got = true;
                    assert_eq!(from, dst, "answer from elsewhere");
                    for (k, (si, q)) in expected.iter().enumerate() {
                        if *si != i {
                            continue;
                        }
                        if let Some((id, rcode, addrs)) = parse_reply(&buf[..n], q) {
                            let want = u16::from_be_bytes([q[0], q[1]]);
                            if id == want
                                && rcode == 0
                                && addrs == [REMOTE_B_V4.parse::<IpAddr>().unwrap()]
                            {
                                answered.insert(k);
                            }
                        }
                    }
                }
            }
            if !got {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        answered.len()
    })
}

#[test]
fn udp_dns_through_a_socks5_server_without_udp_goes_as_dns_over_tcp() {
    let Some((mut tb, server)) = bed(&format!(
        "{}[route]\nfinal = \"proxy\"\n",
        socks_outbound("proxy")
    )) else {
        return;
    };
    tb.restart_dante_without_udp();
    // Restarted after dante, so its start-up probe meets the refusal.
    let config = std::fs::read_to_string(tb.config_path()).unwrap();
    tb.restart_tproxyd_with_config(&config);
    assert!(
        tb.wait_for_log("refuses UDP ASSOCIATE", Duration::from_secs(5)),
        "{}",
        tb.tproxyd_log()
    );
    let resolver = addr(REMOTE_B_V4, DNS_PORT);

    // A real client.
    let out = dig(&tb, &[&format!("@{REMOTE_B_V4}"), "one.example", "A"]);
    assert!(
        out.contains("status: NOERROR"),
        "{out}\n{}",
        tb.tproxyd_log()
    );
    assert!(
        out.contains(REMOTE_B_V4) && out.contains(&format!("SERVER: {REMOTE_B_V4}#53")),
        "{out}"
    );
    // dig's batch mode: several questions from one process.
    let batch = tb.dir.join("batch.txt");
    std::fs::write(
        &batch,
        (0..20)
            .map(|i| format!("@{REMOTE_B_V4} b{i}.example A\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out = dig(&tb, &["+noall", "+answer", "-f", batch.to_str().unwrap()]);
    assert_eq!(out.matches(REMOTE_B_V4).count(), 20, "{out}");

    // 200 at once from 50 sockets that all use the same ids.
    let answered = ask_in_parallel(&tb, resolver, 200, 4, Duration::from_secs(10));
    assert_eq!(answered, 200, "{}", tb.tproxyd_log());
    // And over IPv6, to the v6 resolver.
    let answered = ask_in_parallel(
        &tb,
        addr(REMOTE_B_V6, DNS_PORT),
        40,
        4,
        Duration::from_secs(10),
    );
    assert_eq!(answered, 40, "{}", tb.tproxyd_log());

    let asked = server.asked();
    assert!(asked.len() >= 261, "{}", asked.len());
    assert!(
        asked.iter().all(|a| a.transport == Transport::Tcp),
        "a query arrived over UDP: {:?}",
        asked.iter().find(|a| a.transport == Transport::Udp)
    );
    let hops: HashSet<IpAddr> = asked.iter().map(|a| a.peer.ip()).collect();
    let dante: HashSet<IpAddr> = [SOCKS_V4.parse().unwrap(), SOCKS_V6.parse().unwrap()].into();
    assert!(
        hops.is_subset(&dante),
        "queries must come from dante: {hops:?}"
    );
    // Pooled: a few connections per resolver (4 at most each), never one per query.
    let connections = server
        .tcp_connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (2..=8).contains(&connections),
        "{connections} TCP connections for {} queries",
        asked.len()
    );
}

#[test]
fn dns_server_hijack_answers_from_the_address_asked() {
    let body = format!(
        "[[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n[route]\nfinal = \"direct\"\n\
         [dns]\nserver = \"{REMOTE_B_V4}:53\"\n"
    );
    let Some((tb, server)) = bed(&body) else {
        return;
    };
    // Remote A's port 53 is only an echo: without the hijack the answer
    // would be its echo, not DNS.
    for asked in [addr(REMOTE_A_V4, DNS_PORT), addr(REMOTE_A_V6, DNS_PORT)] {
        let q = query(0x5151, "hijacked.example", A);
        let (from, reply) = tb.lan.enter(|| {
            let bind = if asked.is_ipv4() { LAN_V4 } else { LAN_V6 };
            let s = UdpSocket::bind(addr(bind, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.send_to(&q, asked).unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no answer via {asked}: {e}"));
            (from, buf[..n].to_vec())
        });
        assert_eq!(from, asked, "the answer must come from the address asked");
        let (id, rcode, addrs) = parse_reply(&reply, &q).expect("a DNS answer");
        assert_eq!((id, rcode), (0x5151, 0));
        assert_eq!(addrs, [REMOTE_B_V4.parse::<IpAddr>().unwrap()]);
    }
    // dig too (it checks the source of the answer itself).
    let out = dig(&tb, &[&format!("@{REMOTE_A_V4}"), "dig.example", "A"]);
    assert!(
        out.contains("status: NOERROR") && out.contains(REMOTE_B_V4),
        "{out}"
    );
    let asked = server.asked();
    let router: IpAddr = ROUTER_WAN_V4.parse().unwrap();
    for name in ["hijacked.example", "dig.example"] {
        assert!(
            asked
                .iter()
                .any(|a| a.name == name && a.transport == Transport::Udp && a.peer.ip() == router),
            "the resolver never saw {name} from the router: {asked:?}"
        );
    }
}

#[test]
fn filter_aaaa_answers_noerror_with_no_records() {
    let body = "[[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n[route]\nfinal = \"direct\"\n\
                [dns]\nfilter_aaaa = true\n";
    let Some((tb, server)) = bed(body) else {
        return;
    };
    let out = dig(&tb, &[&format!("@{REMOTE_B_V4}"), "v6.example", "AAAA"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    assert!(
        out.contains("QUERY: 1") && out.contains(";v6.example."),
        "question echoed: {out}"
    );
    // A still goes to the resolver.
    let out = dig(&tb, &[&format!("@{REMOTE_B_V4}"), "v4.example", "A"]);
    assert!(
        out.contains("ANSWER: 1") && out.contains(REMOTE_B_V4),
        "{out}"
    );
    let asked = server.asked();
    assert!(
        asked.iter().all(|a| a.qtype != AAAA),
        "an AAAA reached the resolver: {asked:?}"
    );
    assert!(asked.iter().any(|a| a.name == "v4.example"));
}

#[test]
fn a_name_learned_from_dns_routes_a_tcp_flow_without_sni() {
    let body = format!(
        "{}[[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n[route]\nfinal = \"direct\"\n\
         [[route.rules]]\ndomain_suffix = [\"via-proxy.example\"]\noutbound = \"proxy\"\n",
        socks_outbound("proxy")
    );
    let Some((tb, _server)) = bed(&body) else {
        return;
    };
    let echo = addr(REMOTE_A_V4, ECHO_PORT);
    // Before any answer: no name, so final (direct).
    assert_eq!(
        tcp_echo(&tb.lan, echo).ip(),
        Family::V4.hop(Upstream::Direct)
    );
    // The client resolves the name; the answer (remote A) passes tproxyd.
    let out = dig(
        &tb,
        &[&format!("@{REMOTE_B_V4}"), "ssh.via-proxy.example", "A"],
    );
    assert!(out.contains(REMOTE_A_V4), "{out}");
    // The same flow, still without SNI or Host, now matches the domain rule.
    assert_eq!(
        tcp_echo(&tb.lan, echo).ip(),
        Family::V4.hop(Upstream::Socks),
        "{}",
        tb.tproxyd_log()
    );
    // Another address stays direct.
    assert_eq!(
        tcp_echo(&tb.lan, addr(REMOTE_A_V6, ECHO_PORT)).ip(),
        Family::V6.hop(Upstream::Direct)
    );
}
