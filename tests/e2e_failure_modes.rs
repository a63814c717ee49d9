//! What an administrator's mistakes and an unlucky night do to capture:
//! a listener on one address or family, SIGHUP, tproxyd gone while its
//! rules stay, packets sent straight to the listener port, and a service
//! user without CAP_NET_BIND_SERVICE. Each was a silent leak or a silent
//! failure (issue 8); each test here failed before its fix.

mod common;

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(5);

fn lan_ip(fam: Family) -> IpAddr {
    fam.lan_any().ip()
}

fn doctor(tb: &Testbed, config: &str) -> (bool, String) {
    let out = tb.tproxyd_cli(&["doctor", "-c", config]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn config(tb: &Testbed) -> String {
    tb.config_path().display().to_string()
}

/// A listener on 127.0.0.1 used to sit behind `tproxy to :1090`, which
/// looks on the LAN interface's address and finds nothing: every flow went
/// out directly while tproxyd logged "listening" and doctor said PASS.
/// Now the rules name the address and capture IPv4 only; IPv6 is left
/// alone, and the start-up and doctor say so.
fn a_listener_on_one_address_is_named_in_the_rules(backend: Backend) {
    let Some(tb) = own_bed(
        backend,
        Mode::Tproxy,
        &format!("listen = \"127.0.0.1:{PROXY_PORT}\"\n"),
        "lan_interfaces = [\"rlan\"]",
    ) else {
        return;
    };
    let v4 = Family::V4;
    assert_eq!(
        tcp_echo(&tb.lan, v4.remote_a(ECHO_PORT)).ip(),
        v4.hop(Upstream::Socks),
        "IPv4 TCP must go through the proxy"
    );
    let dst = v4.remote_a(UDP_ECHO_PORT);
    let (from, peer) = udp_echo(&tb.lan, v4.lan_any(), dst, WAIT).expect("IPv4 UDP answer");
    assert_eq!((from, peer.ip()), (dst, v4.hop(Upstream::Socks)));
    // IPv6 is not captured: it is routed as if tproxyd were not there.
    assert_eq!(
        tcp_echo(&tb.lan, Family::V6.remote_a(ECHO_PORT)).ip(),
        lan_ip(Family::V6)
    );
    let log = tb.tproxyd_log();
    assert!(
        log.contains("serves one family only: IPv6 flows are not captured"),
        "{log}"
    );

    let (ok, text) = doctor(&tb, &config(&tb));
    assert!(ok, "{text}");
    assert!(
        text.contains("WARN  listen 127.0.0.1:1090: serves one family only"),
        "{text}"
    );
    assert!(
        text.contains("PASS  capture reaches the listener: IPv4 tcp"),
        "{text}"
    );
    assert!(
        text.contains("PASS  capture reaches the listener: IPv4 udp"),
        "{text}"
    );
}

#[test]
fn nft_a_listener_on_one_address_is_named_in_the_rules() {
    a_listener_on_one_address_is_named_in_the_rules(Backend::Nftables);
}

#[test]
fn iptables_a_listener_on_one_address_is_named_in_the_rules() {
    a_listener_on_one_address_is_named_in_the_rules(Backend::Iptables);
}

/// Rules that send captured flows where no socket listens (here: rules
/// for a `[::]` listener applied by hand over a 127.0.0.1 one) leak
/// traffic; doctor must say FAIL and why, not PASS.
#[test]
fn doctor_fails_when_captured_traffic_cannot_reach_the_listener() {
    let Some(tb) = own_bed(
        Backend::Nftables,
        Mode::Tproxy,
        &format!("listen = \"127.0.0.1:{PROXY_PORT}\"\n"),
        "lan_interfaces = [\"rlan\"]",
    ) else {
        return;
    };
    let ours = config(&tb);
    let text = std::fs::read_to_string(&ours).unwrap();
    let wildcard = tb.dir.join("wildcard.toml");
    std::fs::write(
        &wildcard,
        text.replace("listen = \"127.0.0.1:1090\"", "listen = \"[::]:1090\""),
    )
    .unwrap();
    let out = tb.tproxyd_cli(&["rules", "apply", "-c", &wildcard.display().to_string()]);
    assert!(out.status.success(), "{out:?}");

    // The leak is real: IPv4 TCP now goes out directly.
    let a = Family::V4.remote_a(ECHO_PORT);
    assert_eq!(tcp_echo(&tb.lan, a).ip(), lan_ip(Family::V4));

    let (ok, text) = doctor(&tb, &ours);
    assert!(!ok, "doctor must exit non-zero:\n{text}");
    assert!(
        text.contains("FAIL  capture cannot reach the listener: IPv4 tcp"),
        "{text}"
    );
    assert!(text.contains("goes out directly"), "{text}");
}

/// SIGHUP used to kill tproxyd (exit 129, no log line) with its rules in
/// place; with nftables captured traffic then leaked out directly.
#[test]
fn sighup_is_logged_and_tproxyd_keeps_serving() {
    let Some(mut tb) = own_bed(
        Backend::Nftables,
        Mode::Tproxy,
        "",
        "lan_interfaces = [\"rlan\"]",
    ) else {
        return;
    };
    assert!(
        tb.tproxyd_log().contains("fail open: should tproxyd die"),
        "{}",
        tb.tproxyd_log()
    );
    tb.signal_tproxyd("HUP");
    assert!(
        tb.wait_for_log("SIGHUP received", WAIT),
        "{}",
        tb.tproxyd_log()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(tb.tproxyd_running(), "SIGHUP ended tproxyd");
    let v4 = Family::V4;
    assert_eq!(
        tcp_echo(&tb.lan, v4.remote_a(ECHO_PORT)).ip(),
        v4.hop(Upstream::Socks)
    );
    tb.stop_tproxyd();
    assert_eq!(tb.snapshot(), tb.baseline, "stop after SIGHUP left rules");
}

/// kill -9 leaves the rules: doctor names it and says what happens to the
/// captured traffic with this backend.
fn doctor_reports_rules_present_without_a_listener(backend: Backend, fate: &str) {
    let Some(mut tb) = own_bed(backend, Mode::Tproxy, "", "lan_interfaces = [\"rlan\"]") else {
        return;
    };
    tb.kill_tproxyd();
    let (ok, text) = doctor(&tb, &config(&tb));
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "FAIL  rules present, no listener: nothing on tcp port 1090, so captured tcp traffic {fate}"
        )),
        "{text}"
    );
    assert!(text.contains("tproxyd rules remove"), "{text}");
}

#[test]
fn nft_doctor_reports_rules_present_without_a_listener() {
    doctor_reports_rules_present_without_a_listener(
        Backend::Nftables,
        "goes out directly, not through the proxy",
    );
}

#[test]
fn iptables_doctor_reports_rules_present_without_a_listener() {
    doctor_reports_rules_present_without_a_listener(Backend::Iptables, "is dropped");
}

/// Connecting from `ns` to `dst` must time out: the packets are dropped,
/// not answered (neither accepted nor reset).
fn assert_dropped(ns: &Netns, dst: SocketAddr) {
    let got = ns.enter(|| TcpStream::connect_timeout(&dst, Duration::from_millis(800)));
    match got {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{dst}: {e}"),
        Ok(_) => panic!("{dst}: connection to the listener port was accepted"),
    }
}

/// Packets addressed to the router's own listener port (from the WAN, the
/// LAN, or a flood) used to reach tproxyd, which refused each with a
/// warning: 25,000 lines from one small flood. They are dropped in
/// tproxyd's own table now; capture is unaffected, and router-local
/// REDIRECT (which comes back in through lo rewritten to the listener)
/// still works.
fn traffic_to_the_listener_port_is_dropped_before_tproxyd(backend: Backend) {
    let Some(tb) = own_bed(
        backend,
        Mode::Tproxy,
        "",
        "lan_interfaces = [\"rlan\"]\nproxy_local = true",
    ) else {
        return;
    };
    let router_wan = addr(ROUTER_WAN_V4, PROXY_PORT);
    let router_lan: SocketAddr = format!("192.0.2.1:{PROXY_PORT}").parse().unwrap();
    let router_lan_v6: SocketAddr = format!("[2001:db8:1::1]:{PROXY_PORT}").parse().unwrap();
    assert_dropped(&tb.wan, router_wan);
    assert_dropped(&tb.lan, router_lan);
    assert_dropped(&tb.lan, router_lan_v6);
    tb.wan.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..500 {
            let _ = s.send_to(b"flood", router_wan);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let log = tb.tproxyd_log();
    for needle in ["refused", "no original destination", "carries no original"] {
        assert!(!log.contains(needle), "{needle:?} in\n{log}");
    }
    // Capture still works, for the LAN and for the router itself.
    let v4 = Family::V4;
    assert_eq!(
        tcp_echo(&tb.lan, v4.remote_a(ECHO_PORT)).ip(),
        v4.hop(Upstream::Socks)
    );
    assert_eq!(
        tcp_echo(&tb.router, v4.remote_a(ECHO_PORT)).ip(),
        v4.hop(Upstream::Socks)
    );
    let dropped = match backend {
        Backend::Nftables => {
            let t = tb.router.exec_output(&[
                "nft",
                "list",
                "chain",
                "inet",
                "tproxyd",
                "listener_guard",
            ]);
            t.lines()
                .filter(|l| l.contains("dport 1090 counter packets"))
                .filter_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    let i = w.iter().position(|x| *x == "packets")?;
                    w.get(i + 1)?.parse::<u64>().ok()
                })
                .sum::<u64>()
        }
        Backend::Iptables => {
            let t = tb
                .router
                .exec_output(&["iptables", "-t", "mangle", "-nvxL", "TPROXYD_GUARD"]);
            t.lines()
                .filter(|l| l.contains("DROP"))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .sum::<u64>()
        }
    };
    assert!(dropped >= 500, "guard counted {dropped} packets");
}

#[test]
fn nft_traffic_to_the_listener_port_is_dropped_before_tproxyd() {
    traffic_to_the_listener_port_is_dropped_before_tproxyd(Backend::Nftables);
}

#[test]
fn iptables_traffic_to_the_listener_port_is_dropped_before_tproxyd() {
    traffic_to_the_listener_port_is_dropped_before_tproxyd(Backend::Iptables);
}

/// The guard must let REDIRECTed router-local flows through: they come
/// back in through lo already addressed to the listener.
fn redirect_router_local_passes_the_guard(backend: Backend) {
    let Some(tb) = own_bed(
        backend,
        Mode::Redirect,
        "",
        "lan_interfaces = [\"rlan\"]\nproxy_local = true",
    ) else {
        return;
    };
    for fam in [Family::V4, Family::V6] {
        assert_eq!(
            tcp_echo(&tb.router, fam.remote_a(ECHO_PORT)).ip(),
            fam.hop(Upstream::Socks),
            "{fam:?}"
        );
        assert_eq!(
            tcp_echo(&tb.lan, fam.remote_a(ECHO_PORT)).ip(),
            fam.hop(Upstream::Socks),
            "{fam:?}"
        );
    }
    assert_dropped(&tb.wan, addr(ROUTER_WAN_V4, PROXY_PORT));
}

#[test]
fn nft_redirect_router_local_passes_the_guard() {
    redirect_router_local_passes_the_guard(Backend::Nftables);
}

#[test]
fn iptables_redirect_router_local_passes_the_guard() {
    redirect_router_local_passes_the_guard(Backend::Iptables);
}

fn setpriv(caps: &str) -> Vec<String> {
    [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps={caps}"),
        &format!("--ambient-caps={caps}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// As a service user with CAP_NET_ADMIN only (what the README used to
/// say), TCP worked and every UDP reply from a port below 1024 (DNS)
/// failed at run time. Now tproxyd refuses to start and names the missing
/// capability; with both, DNS through the proxy works unprivileged.
#[test]
fn udp_needs_cap_net_bind_service_and_works_with_it() {
    if !can_run() {
        return;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    tb.stop_tproxyd();
    let args = tb.tproxyd_args();
    let only_admin = setpriv("+net_admin");
    let prefix: Vec<&str> = only_admin.iter().map(String::as_str).collect();
    let (ok, err) = tb.run_to_exit(&prefix, &args);
    assert!(!ok, "{err}");
    assert!(err.contains("CAP_NET_BIND_SERVICE"), "{err}");
    assert!(
        err.contains("setcap cap_net_admin,cap_net_bind_service+ep"),
        "{err}"
    );

    let both = setpriv("+net_admin,+net_bind_service");
    let prefix: Vec<&str> = both.iter().map(String::as_str).collect();
    tb.run_tproxyd_under(&prefix);
    tb.spawn_tproxyd();
    let pid = tb.tproxyd_pid().unwrap();
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert!(uid.contains("65534"), "not unprivileged: {uid}");
    for fam in [Family::V4, Family::V6] {
        let dst = fam.remote_a(DNS_PORT);
        let (from, peer) = udp_echo(&tb.lan, fam.lan_any(), dst, WAIT)
            .unwrap_or_else(|| panic!("{fam:?} DNS unanswered:\n{}", tb.tproxyd_log()));
        assert_eq!(
            (from, peer.ip()),
            (dst, fam.hop(Upstream::Socks)),
            "{fam:?}"
        );
    }
    let log = tb.tproxyd_log();
    assert!(!log.contains("Permission denied"), "{log}");
}

/// Start-up mistakes that passed `check` and then failed at run time, or
/// silently captured into nothing: each now ends at once with a message
/// that names the problem.
#[test]
fn bad_start_up_values_exit_at_once_with_a_clear_message() {
    if !can_run() {
        return;
    }
    let tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Direct,
        extra_args: vec![],
        own_rules: None,
    });
    let base = ["run", "--direct", "--firewall", "none"];
    let cases: [(&[&str], &str); 3] = [
        (
            &["--listen", "10.99.99.99:1091"],
            "10.99.99.99 is not an address of this host",
        ),
        (
            &["--threads", "100000"],
            "limits.threads: 100000 is more than 256",
        ),
        (
            &["--udp-timeout", "18446744073709551615"],
            "timeouts.udp_idle",
        ),
    ];
    for (extra, needle) in cases {
        let args: Vec<String> = base.iter().chain(extra).map(|s| s.to_string()).collect();
        let (ok, err) = tb.run_to_exit(&[], &args);
        assert!(!ok, "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
}
