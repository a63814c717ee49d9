//! The `dns.listen` listener with a real dnsmasq in front of it, as on
//! OpenWrt (`server=127.0.0.1#PORT`, `no-resolv`).
//!
//! - On loopback, with a canned answerer in this process: the listener as
//!   dnsmasq uses it — UDP forwarding, and an answer too long for UDP
//!   going back truncated so that `dig` asks dnsmasq again over TCP, and
//!   dnsmasq asks the listener over TCP, getting every record.
//! - In the namespaces, with tproxyd itself and its named resolver (the
//!   tests' DNS server on remote B, through the SOCKS5 outbound): dnsmasq
//!   on the router forwards to `dns.listen`; and a LAN client's own DNS
//!   over TCP, captured, is answered by the resolver (asked of an address
//!   with no DNS server, so a relayed flow could not have answered).
//! - tproxyd as a DNS forwarder only (`tcp = false`, `udp = false`,
//!   `dns.listen` set), its nftables backend on: it installs no capture
//!   rules or routes, removes a crashed run's, and answers on the
//!   listener.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dns_server::DnsServer as ZoneServer;
use common::*;
use tproxyd::dns::listen::{Answer, Bound, DnsServer, Limits, Listeners};
use tproxyd::dns::message::build::{response, Answer as Rr};
use tproxyd::dns::message::{self, Header};

/// Names starting with "big" get 100 A records (about 1.7 KB, over
/// dnsmasq's 1232-byte EDNS0 size), others one.
struct Canned;

impl Answer for Canned {
    async fn answer(&self, query: Vec<u8>, _client: SocketAddr) -> Option<Vec<u8>> {
        Header::parse(&query).ok()?;
        let q = message::question(&query).ok()?;
        let n = if q.name.starts_with(b"big") { 100 } else { 1 };
        let records: Vec<Rr<'_>> = (0..n)
            .map(|i| Rr::A(None, Ipv4Addr::new(198, 51, 100, i as u8 + 1), 60))
            .collect();
        Some(response(&query, &records))
    }
}

fn free_port() -> u16 {
    // Free for UDP and TCP both, as dnsmasq needs.
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tools_present() -> bool {
    let found = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    let missing: Vec<&str> = ["dnsmasq", "dig"]
        .into_iter()
        .filter(|c| !found(c) && !std::path::Path::new("/usr/sbin").join(c).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{missing:?} missing (dnsmasq-base, dnsutils; scripts/setup-test-deps installs them)"
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipping: {why}");
    false
}

fn dig(port: u16, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=3", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn answers(dig_output: &str) -> usize {
    dig_output
        .lines()
        .filter(|l| !l.starts_with(';') && l.contains("\tA\t"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsmasq_forwards_to_the_listener_over_udp_and_tcp() {
    if !tools_present() {
        return;
    }
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = DnsServer::new(Arc::new(Canned), Limits::default());
    let bound = Bound::bind_all(&[listen], 0).unwrap();
    let _listeners = Listeners::start(&server, &[listen], bound, 0).unwrap();

    let front = free_port();
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--cache-size=0",
            "--user=root",
            "--pid-file=",
            "--conf-file=/dev/null",
            "--log-queries",
            "--log-facility=-",
            &format!("--port={front}"),
            &format!("--server=127.0.0.1#{}", listen.port()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq");
    let _dnsmasq = Dnsmasq(child);

    // dnsmasq is up once it answers.
    let out = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = dig(front, &["a.example", "A"]);
            if out.contains("status: NOERROR") || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("198.51.100.1"), "{out}");
    assert_eq!(answers(&out), 1, "{out}");
    let stats = Arc::clone(server.stats());
    assert!(
        stats
            .udp_answered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // Too long for UDP: the listener truncates, dig retries over TCP
    // through dnsmasq, which asks the listener over TCP.
    let out = tokio::task::spawn_blocking(move || dig(front, &["big.example", "A"]))
        .await
        .unwrap();
    assert!(out.contains("status: NOERROR"), "{out}");
    assert_eq!(answers(&out), 100, "{out}");
    assert!(
        stats
            .udp_truncated
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert!(
        stats
            .tcp_answered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

/// Every name resolves to remote B.
fn zone(_name: &str, qtype: u16) -> Option<IpAddr> {
    match qtype {
        1 => REMOTE_B_V4.parse().ok(),
        _ => None,
    }
}

/// `dig ARGS` in namespace `ns`; its whole output.
fn dig_in(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "dig", "+time=3", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dnsmasq_on_the_router_and_captured_dns_over_tcp_are_answered_by_the_resolver() {
    if !can_run() || !tools_present() {
        return;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    let server = ZoneServer::start(&tb.wan, &[addr(REMOTE_B_V4, DNS_PORT)], zone);
    tb.restart_tproxyd_with_config(&format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n\
         [[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n\
         [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [route]\nfinal = \"proxy\"\n\
         [dns]\nlisten = [\"127.0.0.1:5353\"]\nfinal = \"b\"\n\
         [[dns.servers]]\nname = \"b\"\naddress = \"udp://{REMOTE_B_V4}\"\noutbound = \"proxy\"\n\
         [firewall]\nbackend = \"none\"\n"
    ));
    let child = Command::new("ip")
        .args(["netns", "exec", &tb.router.name, "dnsmasq"])
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--cache-size=0",
            "--user=root",
            "--pid-file=",
            "--conf-file=/dev/null",
            "--port=5300",
            "--server=127.0.0.1#5353",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq");
    let _dnsmasq = Dnsmasq(child);

    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = dig_in(
            &tb.router,
            &["@127.0.0.1", "-p", "5300", "router.example", "A"],
        );
        if out.contains("status: NOERROR") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        out.contains("status: NOERROR") && out.contains(REMOTE_B_V4),
        "{out}\n{}",
        tb.tproxyd_log()
    );
    assert!(
        server
            .asked()
            .iter()
            .any(|a| a.name.contains("router.example")),
        "the resolver was not asked: {:?}",
        server.asked()
    );

    // A LAN client's own DNS over TCP to remote A, where no DNS server
    // runs: answered by tproxyd's resolver, never connected out.
    let out = dig_in(
        &tb.lan,
        &["+tcp", &format!("@{REMOTE_A_V4}"), "lan-tcp.example", "A"],
    );
    assert!(
        out.contains("status: NOERROR") && out.contains(REMOTE_B_V4),
        "{out}\n{}",
        tb.tproxyd_log()
    );
    assert!(server
        .asked()
        .iter()
        .any(|a| a.name.contains("lan-tcp.example")));
}

#[test]
fn a_dns_forwarder_only_installs_no_capture_rules_and_answers() {
    if !can_run() || !tools_present() {
        return;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    let server = ZoneServer::start(&tb.wan, &[addr(REMOTE_B_V4, DNS_PORT)], zone);
    let outbounds = format!(
        "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n\
         [dns]\nlisten = [\"127.0.0.1:5353\"]\nfinal = \"b\"\n\
         [[dns.servers]]\nname = \"b\"\naddress = \"udp://{REMOTE_B_V4}\"\noutbound = \"proxy\"\n"
    );
    // The bed's own hand-written capture has a policy route too: tproxyd's
    // is what differs from this.
    let bed_rules = tb.router.exec_output(&["ip", "rule"]);
    let installed = |tb: &Testbed| {
        let tables = tb.router.exec_output(&["nft", "list", "tables"]);
        let rules = tb.router.exec_output(&["ip", "rule"]);
        (tables.contains("tproxyd"), rules != bed_rules)
    };
    // A run that captures, then crashes: its rules and routes stay.
    tb.restart_tproxyd_with_config(&format!(
        "listen = \"[::]:{PROXY_PORT}\"\n{outbounds}\
         [firewall]\nbackend = \"nftables\"\nlan_interfaces = [\"rlan\"]\n"
    ));
    assert_eq!(installed(&tb), (true, true), "{}", tb.tproxyd_log());
    tb.kill_tproxyd();
    assert_eq!(installed(&tb), (true, true));

    // The forwarder: no LAN named, no listener, and those leftovers gone.
    tb.restart_tproxyd_with_config(&format!(
        "tcp = false\nudp = false\n{outbounds}[firewall]\nbackend = \"nftables\"\n"
    ));
    let log = tb.tproxyd_log();
    assert!(log.contains("no firewall rules installed"), "{log}");
    assert_eq!(installed(&tb), (false, false), "{log}");
    let rules = tb.tproxyd_cli(&[
        "rules",
        "print",
        "-c",
        &tb.config_path().display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&rules.stdout);
    assert!(text.contains("installs no capture rules"), "{text}");

    let out = dig_in(
        &tb.router,
        &["@127.0.0.1", "-p", "5353", "forwarder.example", "A"],
    );
    assert!(
        out.contains("status: NOERROR") && out.contains(REMOTE_B_V4),
        "{out}\n{}",
        tb.tproxyd_log()
    );
    assert!(server
        .asked()
        .iter()
        .any(|a| a.name.contains("forwarder.example")));
    tb.stop_tproxyd();
    assert_eq!(installed(&tb), (false, false));
}
