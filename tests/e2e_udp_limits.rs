//! UDP limits end to end (issue 8): a flood of new ports from one LAN
//! host must not take the session table from the others, DNS sessions end
//! after the DNS timeout, a dead SOCKS5 server is not dialed per datagram,
//! and datagrams too large to carry are reported.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;

/// A bed where tproxyd installs its own rules and runs from a config file
/// with `settings` (tables such as [limits] and [timeouts]).
fn configured_bed(upstream: Upstream, settings: &str) -> Option<Testbed> {
    can_run().then(|| {
        Testbed::start(Options {
            mode: Mode::Tproxy,
            upstream,
            extra_args: vec![],
            own_rules: Some(OwnRules {
                top: settings.into(),
                firewall: "lan_interfaces = [\"rlan\"]".into(),
            }),
        })
    })
}

/// Log lines at WARN level written after the first `from` bytes.
fn warnings_since(tb: &Testbed, from: usize) -> Vec<String> {
    let log = tb.tproxyd_log();
    log.get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains(" WARN "))
        .map(str::to_string)
        .collect()
}

/// UDP sockets open in the router namespace (tproxyd's listener, its
/// upstream sockets and its reply sockets).
fn router_udp_sockets(tb: &Testbed) -> usize {
    tb.router.exec_output(&["ss", "-Huan"]).lines().count()
}

/// One LAN address floods 5,000 new source ports toward a port that
/// never answers. With a table of 64 sessions, the flood must keep
/// evicting its own unanswered sessions, and a second LAN address must
/// get its DNS answer at once, from the right source, through tproxyd.
#[test]
fn a_port_flood_from_one_host_leaves_room_for_another_hosts_dns() {
    const TABLE: usize = 64;
    let settings = format!(
        "[limits]\nudp_sessions = {TABLE}\n# The whole table: the flood fills it, the newcomer must evict.\nudp_sessions_per_client = {TABLE}\n"
    );
    let Some(tb) = configured_bed(Upstream::Direct, &settings) else {
        return;
    };
    const SECOND_HOST: &str = "192.0.2.3";
    tb.lan.ip(&format!("addr add {SECOND_HOST}/24 dev l0"));

    // Nothing listens on this port: no session of the flood is answered.
    let silent = Family::V4.remote_a(9999);
    let sent = tb.lan.enter(|| {
        let mut sent = 0;
        for port in 20_000..25_000u16 {
            let s = UdpSocket::bind(addr(LAN_V4, port)).unwrap();
            if s.send_to(b"flood", silent).is_ok() {
                sent += 1;
            }
        }
        sent
    });
    assert_eq!(sent, 5_000);
    // Let tproxyd read the flood before the newcomer asks.
    std::thread::sleep(Duration::from_secs(1));

    let dns = Family::V4.remote_a(DNS_PORT);
    let answer = udp_echo(&tb.lan, addr(SECOND_HOST, 0), dns, Duration::from_secs(3));
    let (from, peer) = answer.unwrap_or_else(|| {
        panic!(
            "the second host's DNS got no answer while the table was full of the flood:\n{}",
            tail(&tb.tproxyd_log(), 30)
        )
    });
    assert_eq!(from, dns, "reply from the wrong source");
    assert_eq!(
        peer.ip(),
        Family::V4.hop(Upstream::Direct),
        "not through tproxyd"
    );

    // Evicted sessions really ended: tproxyd holds about a table's worth
    // of upstream sockets, not one per flooded port. Their tasks close
    // them asynchronously: wait for that (a loaded machine lags) before
    // counting.
    wait_until(Duration::from_secs(5), || {
        router_udp_sockets(&tb) <= TABLE + 8
    });
    let sockets = router_udp_sockets(&tb);
    assert!(
        sockets <= TABLE + 8,
        "{sockets} UDP sockets open in the router for a table of {TABLE}"
    );
    let log = tb.tproxyd_log();
    assert!(log.contains("oldest unanswered"), "no eviction warning");
    assert!(log.contains("end=evicted"), "no session ended as evicted");
    // A flood of 5,000 datagrams makes a few warning lines, not thousands.
    let warnings = warnings_since(&tb, 0);
    assert!(
        warnings.len() <= 10,
        "{} warning lines:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
}

/// A DNS exchange through SOCKS5 with udp_dns_idle = 2 s and udp_idle =
/// 60 s: the session and its association end about 2 s after the answer,
/// not a minute later.
#[test]
fn a_dns_session_ends_after_the_dns_idle_timeout() {
    let settings = "[timeouts]\nudp_idle = 60\nudp_dns_idle = 2\n";
    let Some(tb) = configured_bed(Upstream::Socks, settings) else {
        return;
    };
    let dns = Family::V4.remote_a(DNS_PORT);
    let (from, peer) = udp_echo(&tb.lan, Family::V4.lan_any(), dns, Duration::from_secs(5))
        .expect("no DNS answer");
    assert_eq!((from, peer.ip()), (dns, Family::V4.hop(Upstream::Socks)));
    assert_eq!(
        tb.socks_control_connections(),
        1,
        "one association while the session lives"
    );
    assert!(
        tb.wait_for_log("end=idle-timeout", Duration::from_secs(8)),
        "the DNS session did not end after udp_dns_idle:\n{}",
        tb.tproxyd_log()
    );
    assert!(
        wait_until(Duration::from_secs(3), || tb.socks_control_connections()
            == 0),
        "the association's control connection outlived its session"
    );
}

/// Connection attempts (SYN) from the router to dante's port, counted by
/// a rule of this test's own in the router namespace.
fn socks_dials(tb: &Testbed) -> u64 {
    let out = tb
        .router
        .exec_output(&["nft", "list", "table", "inet", "dialcount"]);
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

/// dante is down and 2,000 datagrams come from 2,000 ports: tproxyd must
/// not dial the server 2,000 times nor write 2,000 warnings; once dante
/// is back, new sessions work again.
#[test]
fn a_dead_socks_server_is_not_dialed_per_datagram() {
    if !can_run() {
        return;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    tb.router.nft(&format!(
        "table inet dialcount {{
           chain out {{
             type filter hook output priority 0; policy accept;
             tcp dport {SOCKS_PORT} tcp flags & (syn | ack) == syn counter
           }}
         }}"
    ));
    tb.stop_dante();
    let log_before = tb.tproxyd_log().len();
    const DATAGRAMS: u16 = 2_000;
    let dst = Family::V4.remote_a(UDP_ECHO_PORT);
    tb.lan.enter(|| {
        for port in 30_000..30_000 + DATAGRAMS {
            let s = UdpSocket::bind(addr(LAN_V4, port)).unwrap();
            s.send_to(b"anyone?", dst).unwrap();
        }
    });
    assert!(
        tb.wait_for_log("UDP session failed to open", Duration::from_secs(5)),
        "{}",
        tb.tproxyd_log()
    );
    // The failure is known now, so the back-off holds: a second burst of
    // new ports is dropped without dialing and said with a count. (On a
    // loaded machine the whole first burst may have been admitted before
    // the first failure came back, so it alone proves nothing about the
    // drops.)
    tb.lan.enter(|| {
        for port in 30_000 + DATAGRAMS..30_000 + DATAGRAMS + 200 {
            let s = UdpSocket::bind(addr(LAN_V4, port)).unwrap();
            s.send_to(b"anyone?", dst).unwrap();
        }
    });
    assert!(
        tb.wait_for_log("of a new session dropped", Duration::from_secs(5)),
        "{}",
        tb.tproxyd_log()
    );
    std::thread::sleep(Duration::from_millis(500));
    let dials = socks_dials(&tb);
    let warnings = warnings_since(&tb, log_before);
    eprintln!(
        "{dials} dials and {} warning lines for {} datagrams",
        warnings.len(),
        DATAGRAMS + 200
    );
    // About one opening slot's worth (64) before the first failure is
    // known, then one retry per back-off interval.
    assert!(
        dials <= 100,
        "{dials} connection attempts to the dead server for {} datagrams",
        DATAGRAMS + 200
    );
    assert!(
        warnings.len() <= 6,
        "{} warning lines:\n{}",
        warnings.len(),
        warnings.join("\n")
    );

    // The datagrams dropped while backing off are said, with a count.
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("of a new session dropped") && l.contains("dropped=")),
        "{}",
        warnings.join("\n")
    );

    // Back up: the next retry succeeds and sessions open again. Each try
    // uses a new port (a new session); those before the retry are dropped.
    tb.restart_dante();
    let answered = tb.lan.enter(|| {
        wait_until(Duration::from_secs(40), || {
            let s = UdpSocket::bind(Family::V4.lan_any()).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s.send_to(b"back?", dst).unwrap();
            let mut buf = [0u8; 256];
            matches!(s.recv_from(&mut buf), Ok((_, from)) if from == dst)
        })
    });
    assert!(
        answered,
        "no session after dante came back:\n{}",
        tail(&tb.tproxyd_log(), 30)
    );
}

/// An IPv6 datagram over 65,508 bytes (IPv6 allows 65,527) cannot be
/// carried; the sender is told in a warning, not just a debug line.
#[test]
fn an_ipv6_datagram_too_large_to_carry_is_warned_about() {
    if !can_run() {
        return;
    }
    let tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Direct,
        extra_args: vec![],
        own_rules: None,
    });
    let dst: SocketAddr = Family::V6.remote_a(UDP_ECHO_PORT);
    tb.lan.enter(|| {
        let s = UdpSocket::bind(Family::V6.lan_any()).unwrap();
        s.send_to(&pattern(65_520, 3), dst).unwrap();
    });
    let warned = wait_until(Duration::from_secs(5), || {
        warnings_since(&tb, 0)
            .iter()
            .any(|l| l.contains("larger than") && l.contains("IPv6 allows up to 65527"))
    });
    assert!(warned, "no warning:\n{}", tb.tproxyd_log());
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
