//! The `dns.listen` listener with a real dnsmasq in front of it, as on
//! OpenWrt (`server=127.0.0.1#PORT`, `no-resolv`), on loopback. The
//! answers come from a canned answerer in this process (the resolver is
//! not part of this test): what is tested is the listener as dnsmasq
//! uses it — UDP forwarding, and an answer too long for UDP going back
//! truncated so that `dig` asks dnsmasq again over TCP, and dnsmasq asks
//! the listener over TCP, getting every record.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
