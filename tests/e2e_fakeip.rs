//! Fake-ip end to end in the namespaces (hand-written capture rules for
//! 198.51.100.0/24 and the fake range, 198.18.0.0/15):
//!
//! - a captured A query is answered with a fake address, the same for the
//!   same name, and AAAA without a v6 range gets no records;
//! - a TCP flow to the fake address goes `direct` by name: tproxyd asks
//!   the named resolver (a DNS server on remote B) for the real address
//!   and reaches the echo server there;
//! - a UDP flow to the fake address goes `direct` by name the same way,
//!   to the UDP echo server on remote A, and its reply reaches the client
//!   from the fake address it wrote to;
//! - a TCP connection to a fake address that stands for no name is reset
//!   at once (never sent on), and a UDP datagram to one is dropped;
//! - SIGTERM saves the pool within the first second, and after a restart
//!   the same name has the same address, and the flow to it still works.
//!
//! And through the proxies (`udp_goes_by_name_through_socks5_and_shadowsocks`):
//! UDP to a fake address goes to dante, ssserver and ss-server with the
//! name as its target; they resolve it with the bed's DNS server (their
//! namespace's resolv.conf names it; tproxyd's does not), the reply comes
//! from the fake address, and after a restart the same address still
//! works. The proxies' by-name TCP requests are unit-tested
//! (`outbound::tests::fake_ip_flows_go_by_name`).

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use common::dns_server::{parse_reply, query, DnsServer};
use common::*;
use tproxyd::testbed::shadowsocks::password_for;

const A: u16 = 1;
const AAAA: u16 = 28;
const FAKE_RANGE: &str = "198.18.0.0/15";

/// The zone of the DNS server on remote B: every name is remote A, where
/// the echo server is.
fn zone(_name: &str, qtype: u16) -> Option<IpAddr> {
    match qtype {
        A => REMOTE_A_V4.parse().ok(),
        _ => None,
    }
}

fn config(store: &str) -> String {
    format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n\
         [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [route]\nfinal = \"direct\"\n\
         [dns]\n[[dns.servers]]\nname = \"remote\"\naddress = \"udp://{REMOTE_B_V4}\"\noutbound = \"direct\"\n\
         [dns.fake_ip]\nranges = [\"{FAKE_RANGE}\"]\nstore = \"{store}\"\nsave_interval = 3600\n\
         [firewall]\nbackend = \"none\"\n"
    )
}

/// Asks `name`/`qtype` of remote B's port 53 from the LAN (captured):
/// the rcode and the addresses answered.
fn ask(tb: &Testbed, name: &str, qtype: u16) -> (u8, Vec<IpAddr>) {
    let q = query(0x7a7a, name, qtype);
    let asked = addr(REMOTE_B_V4, DNS_PORT);
    let reply = tb.lan.enter(|| {
        let s = UdpSocket::bind(addr(LAN_V4, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(&q, asked).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = s
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no answer for {name}: {e}"));
        assert_eq!(from, asked);
        buf[..n].to_vec()
    });
    let (id, rcode, addrs) = parse_reply(&reply, &q).expect("a DNS answer");
    assert_eq!(id, 0x7a7a);
    (rcode, addrs)
}

/// An exchange with the echo server through `dst` from the LAN: the peer
/// address the server saw.
fn echo(tb: &Testbed, dst: SocketAddr) -> SocketAddr {
    tb.lan.enter(|| {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to {dst}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.contains(&b'\n') {
            let n = s
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("echo through {dst}: {e}"));
            assert!(n > 0, "closed by the server through {dst}");
            got.extend_from_slice(&buf[..n]);
        }
        let (peer, used) = peer_line(&got);
        s.write_all(b"by name").unwrap();
        let mut back = got[used..].to_vec();
        while back.len() < 7 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            back.extend_from_slice(&buf[..n]);
        }
        assert_eq!(back, b"by name");
        peer
    })
}

/// Connects from the LAN to `dst`: how long the refusal took, or None
/// when the connection was accepted.
fn connect(tb: &Testbed, dst: SocketAddr) -> Option<(ErrorKind, Duration)> {
    tb.lan.enter(|| {
        let start = Instant::now();
        match TcpStream::connect_timeout(&dst, Duration::from_secs(5)) {
            Ok(s) => {
                // tproxyd accepts first, then decides: an RST follows at
                // once for a refused flow.
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = [0u8; 1];
                match std::io::Read::read(&mut &s, &mut buf) {
                    Err(e)
                        if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::TimedOut =>
                    {
                        Some((e.kind(), start.elapsed()))
                    }
                    _ => None,
                }
            }
            Err(e) => Some((e.kind(), start.elapsed())),
        }
    })
}

/// A UDP exchange from the LAN with the echo server on remote A through
/// its fake address `fake`: sent direct from the router, and the reply
/// comes from `fake`, not from the real address.
fn udp_by_name(tb: &Testbed, fake: IpAddr) {
    let dst = SocketAddr::new(fake, UDP_ECHO_PORT);
    for _ in 0..2 {
        let (from, peer) = udp_echo(&tb.lan, addr(LAN_V4, 0), dst, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no UDP echo through {dst}\n{}", tb.tproxyd_log()));
        assert_eq!(from, dst, "the reply must come from the fake address");
        assert_eq!(
            peer.ip().to_string(),
            ROUTER_WAN_V4,
            "not sent direct from the router"
        );
    }
}

/// The bed with TPROXY capture of the fake range as well (the bed's own
/// rules capture only its remote addresses).
fn fake_ip_bed() -> Testbed {
    let tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    tb.router.nft(&format!(
        "add rule inet tpdtest pre iifname \"rlan\" ip daddr {FAKE_RANGE} meta l4proto {{ tcp, udp }} tproxy ip to :{PROXY_PORT} meta mark set 1 accept\n"
    ));
    tb
}

#[test]
fn fake_addresses_survive_a_restart_and_unmapped_ones_are_reset() {
    if !can_run() {
        return;
    }
    let mut tb = fake_ip_bed();
    let _server = DnsServer::start(&tb.wan, &[addr(REMOTE_B_V4, DNS_PORT)], zone);
    let store = tb.dir.join("state").join("fake-ip.pool");
    let text = config(&store.display().to_string());
    tb.restart_tproxyd_with_config(&text);
    let range: tproxyd::cidr::Cidr = FAKE_RANGE.parse().unwrap();

    let (rcode, first) = ask(&tb, "www.via-proxy.example", A);
    assert_eq!(rcode, 0);
    assert_eq!(first.len(), 1, "{first:?}");
    let fake = first[0];
    assert!(
        range.contains(&tproxyd::cidr::Cidr::host(fake)),
        "{fake} not in {FAKE_RANGE}"
    );
    assert_eq!(
        ask(&tb, "WWW.via-proxy.EXAMPLE", A).1,
        first,
        "same name, same address"
    );
    let (_, other) = ask(&tb, "other.example", A);
    assert_ne!(other, first);
    assert_eq!(ask(&tb, "www.via-proxy.example", AAAA), (0, vec![]));

    // A TCP flow to the fake address: direct, by name, to the real one.
    let peer = echo(&tb, SocketAddr::new(fake, ECHO_PORT));
    assert_eq!(
        peer.ip().to_string(),
        ROUTER_WAN_V4,
        "not sent direct from the router"
    );

    // A UDP flow to the fake address: direct, to the real address of the
    // name, answered from the fake address the client wrote to.
    udp_by_name(&tb, fake);

    // An address of the range nobody was given: reset at once.
    let unmapped: IpAddr = "198.19.200.1".parse().unwrap();
    let (kind, took) = connect(&tb, SocketAddr::new(unmapped, ECHO_PORT)).expect("refused");
    assert!(
        matches!(
            kind,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused | ErrorKind::UnexpectedEof
        ),
        "{kind:?}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // UDP to it: dropped, never sent on (no echo comes back).
    let lost = udp_echo(
        &tb.lan,
        addr(LAN_V4, 0),
        SocketAddr::new(unmapped, UDP_ECHO_PORT),
        Duration::from_secs(1),
    );
    assert_eq!(
        lost, None,
        "a datagram to an unmapped fake address got through"
    );
    assert!(
        tb.wait_for_log("stands for no name", Duration::from_secs(2)),
        "{}",
        tb.tproxyd_log()
    );

    // SIGTERM: the pool is on disk within the first second.
    assert!(
        !store.exists(),
        "saved before the stop (save_interval is an hour)"
    );
    let stopped_at = SystemTime::now();
    tb.stop_tproxyd();
    let saved_at = std::fs::metadata(&store)
        .unwrap_or_else(|e| panic!("no pool file at stop: {e}\n{}", tb.tproxyd_log()))
        .modified()
        .unwrap();
    let after = saved_at.duration_since(stopped_at).unwrap_or_default();
    assert!(
        after < Duration::from_secs(1),
        "saved {after:?} after SIGTERM"
    );
    let log = tb.tproxyd_log();
    let saved = log.find("fake-ip pool saved").expect("no save in the log");
    let stopping = log.find("tproxyd stopping").unwrap();
    assert!(stopping < saved);

    // Restarted: the same name, the same address; the other name too.
    tb.spawn_tproxyd();
    assert!(
        tb.wait_for_log("fake-ip pool restored", Duration::from_secs(2)),
        "{}",
        tb.tproxyd_log()
    );
    assert_eq!(ask(&tb, "www.via-proxy.example", A).1, first);
    assert_eq!(ask(&tb, "other.example", A).1, other);
    // The address a client kept across the restart still works.
    echo(&tb, SocketAddr::new(fake, ECHO_PORT));
    udp_by_name(&tb, fake);

    // A corrupt file is ignored with a warning naming it.
    tb.stop_tproxyd();
    let mut bytes = std::fs::read(&store).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&store, &bytes).unwrap();
    tb.spawn_tproxyd();
    assert!(
        tb.wait_for_log("fake-ip pool file ignored", Duration::from_secs(2)),
        "{}",
        tb.tproxyd_log()
    );
    assert!(tb.tproxyd_log().contains(&store.display().to_string()));
    let (kind, _) =
        connect(&tb, SocketAddr::new(fake, ECHO_PORT)).expect("refused after the pool was lost");
    assert_ne!(kind, ErrorKind::TimedOut);
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` mounts over
/// /etc/resolv.conf for what it starts (dante, the shadowsocks servers):
/// the WAN namespace's own resolver. Removed when dropped, also when the
/// test fails.
struct NetnsResolver {
    dir: std::path::PathBuf,
}

impl NetnsResolver {
    fn new(netns: &str, nameserver: &str) -> NetnsResolver {
        let dir = std::path::Path::new("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\noptions timeout:1 attempts:2\n"),
        )
        .unwrap();
        NetnsResolver { dir }
    }
}

impl Drop for NetnsResolver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A config whose every flow goes through `outbound` (the TOML of one
/// `[[outbounds]]` named "proxy").
fn proxied_config(outbound: &str, store: &str) -> String {
    format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n\
         {outbound}\
         [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [route]\nfinal = \"proxy\"\n\
         [dns]\n[[dns.servers]]\nname = \"remote\"\naddress = \"udp://{REMOTE_B_V4}\"\noutbound = \"direct\"\n\
         [dns.fake_ip]\nranges = [\"{FAKE_RANGE}\"]\nstore = \"{store}\"\nsave_interval = 3600\n\
         [firewall]\nbackend = \"none\"\n"
    )
}

/// UDP from the LAN to `name`'s fake address, through a proxy on the WAN
/// host: the reply comes from the fake address, and the proxy (not
/// tproxyd) asked the bed's DNS server for the name. Returns the fake
/// address.
fn udp_through_proxy(tb: &Testbed, dns: &DnsServer, name: &str, who: &str) -> IpAddr {
    let (rcode, fake) = ask(tb, name, A);
    assert_eq!(rcode, 0);
    let fake = *fake.first().expect("a fake address");
    let dst = SocketAddr::new(fake, UDP_ECHO_PORT);
    for _ in 0..2 {
        let (from, peer) = udp_echo(&tb.lan, addr(LAN_V4, 0), dst, Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!(
                    "no UDP echo through {who} to {dst} ({name})\n{}",
                    tb.tproxyd_log()
                )
            });
        assert_eq!(
            from, dst,
            "through {who}: the reply must come from the fake address"
        );
        // From the proxy's host (dante binds its external address, the
        // shadowsocks servers let the kernel pick one), never the router.
        assert_ne!(
            peer.ip().to_string(),
            ROUTER_WAN_V4,
            "through {who}: sent from the router, not the proxy"
        );
    }
    let router: IpAddr = ROUTER_WAN_V4.parse().unwrap();
    let asked: Vec<_> = dns
        .asked()
        .into_iter()
        .filter(|a| a.name.eq_ignore_ascii_case(name))
        .collect();
    assert!(
        asked.iter().any(|a| a.peer.ip() != router),
        "{who} did not resolve {name} itself (so it was not sent the name): {asked:?}"
    );
    assert!(
        asked.iter().all(|a| a.peer.ip() != router),
        "tproxyd resolved {name} for a flow through {who}: {asked:?}"
    );
    fake
}

#[test]
fn udp_goes_by_name_through_socks5_and_shadowsocks() {
    if !can_run() {
        return;
    }
    let mut tb = fake_ip_bed();
    let dns = DnsServer::start(&tb.wan, &[addr(REMOTE_B_V4, DNS_PORT)], zone);
    // The proxies resolve with the bed's DNS server: dante again, started
    // after its namespace has a resolver of its own.
    let _resolver = NetnsResolver::new(&tb.wan.name, REMOTE_B_V4);
    tb.stop_dante();
    tb.restart_dante();
    let store = tb.dir.join("state").join("fake-ip.pool");
    let store = store.display().to_string();

    // SOCKS5 (dante): ATYP 3 in the UDP header.
    let socks = format!(
        "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n"
    );
    tb.restart_tproxyd_with_config(&proxied_config(&socks, &store));
    let name = "udp.via-socks.example";
    let fake = udp_through_proxy(&tb, &dns, name, "dante");
    // A restart in the middle: the client keeps its address, and it still
    // goes by name.
    tb.stop_tproxyd();
    tb.spawn_tproxyd();
    assert!(
        tb.wait_for_log("fake-ip pool restored", Duration::from_secs(2)),
        "{}",
        tb.tproxyd_log()
    );
    let dst = SocketAddr::new(fake, UDP_ECHO_PORT);
    let (from, _) =
        udp_echo(&tb.lan, addr(LAN_V4, 0), dst, Duration::from_secs(5)).unwrap_or_else(|| {
            panic!(
                "no UDP echo to {dst} after the restart\n{}",
                tb.tproxyd_log()
            )
        });
    assert_eq!(from, dst);

    // Shadowsocks: the same address form in the sealed header. A 2022
    // chacha header with this name does not fit the relay's headroom (the
    // datagram is laid out again), an AEAD one does.
    for (kind, method, name) in [
        (
            SsImpl::Rust,
            "2022-blake3-chacha20-poly1305",
            "udp.via-ssserver.example",
        ),
        (SsImpl::Libev, "aes-256-gcm", "udp.via-ss-server.example"),
    ] {
        let password = password_for(method, "fakeip");
        let server = tb.start_ss(kind, method, &password);
        let outbound = format!(
            "[[outbounds]]\nname = \"proxy\"\ntype = \"shadowsocks\"\nserver = \"{}\"\n\
             method = \"{method}\"\npassword = \"{password}\"\nudp = true\n",
            server.addr_v4()
        );
        tb.restart_tproxyd_with_config(&proxied_config(&outbound, &store));
        let who = format!("{} ({method})", kind.name());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            udp_through_proxy(&tb, &dns, name, &who)
        }));
        if let Err(e) = result {
            eprintln!("{who} log:\n{}", server.log());
            std::panic::resume_unwind(e);
        }
    }
}
