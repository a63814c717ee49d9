//! Reload without dropping flows: SIGHUP re-reads the file while a long
//! TCP transfer and a UDP exchange go on; new flows follow the new rules
//! at once; a broken file, or a key only a restart can change, is refused
//! and everything stays as it was; the firewall's capture changes in one
//! transaction.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(10);

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

/// Two outbounds; flows to `direct_to` go direct, the rest through dante.
fn config(direct_to: &str, extra: &str) -> String {
    format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n\
         [[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n\
         [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [route]\nfinal = \"proxy\"\n\
         [[route.rules]]\ndst = [\"{direct_to}/32\"]\noutbound = \"direct\"\n\
         {extra}\n[firewall]\nbackend = \"none\"\n"
    )
}

/// How many reloads the log reports as done.
fn reloads_done(tb: &Testbed) -> usize {
    tb.tproxyd_log().matches("configuration reloaded").count()
}

fn reloads_refused(tb: &Testbed) -> usize {
    tb.tproxyd_log().matches("reload refused").count()
}

/// Sends SIGHUP and waits until the log says the reload is done.
fn reload(tb: &Testbed) {
    let before = reloads_done(tb);
    tb.signal_tproxyd("HUP");
    assert!(
        wait_until(WAIT, || reloads_done(tb) > before),
        "reload not reported:\n{}",
        tb.tproxyd_log()
    );
}

/// Sends SIGHUP and waits until the log says the reload was refused.
fn reload_refused(tb: &Testbed) -> String {
    let before = reloads_refused(tb);
    tb.signal_tproxyd("HUP");
    assert!(
        wait_until(WAIT, || reloads_refused(tb) > before),
        "refusal not reported:\n{}",
        tb.tproxyd_log()
    );
    tb.tproxyd_log()
}

#[test]
fn a_long_transfer_and_a_udp_exchange_survive_ten_reloads_and_new_flows_follow_the_rules() {
    let Some(mut tb) = bed() else { return };
    // A: remote B direct, so remote A goes through the proxy.
    let config_a = config(REMOTE_B_V4, "");
    // B: remote A direct.
    let config_b = config(REMOTE_A_V4, "");
    tb.restart_tproxyd_with_config(&config_a);
    let proxied = Family::V4.hop(Upstream::Socks);
    let direct = Family::V4.hop(Upstream::Direct);
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        proxied
    );

    // The long transfer: 64 KiB chunks echoed back, all checked at the end.
    let dst = Family::V4.remote_a(ECHO_PORT);
    let mut conn = tb
        .lan
        .enter(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .expect("connect the long flow");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut first = [0u8; 64];
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        let n = conn.read(&mut first).expect("the peer line");
        assert!(n > 0);
        line.extend_from_slice(&first[..n]);
    }
    let (long_peer, off) = peer_line(&line);
    assert_eq!(long_peer.ip(), proxied);
    let mut echoed = line[off..].to_vec();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut w = conn.try_clone().unwrap();
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut sent = Vec::new();
            let mut seed = 1;
            while !stop.load(Ordering::Relaxed) {
                let chunk = pattern(64 * 1024, seed);
                seed += 1;
                w.write_all(&chunk)
                    .expect("the long flow broke while writing");
                sent.extend_from_slice(&chunk);
                thread::sleep(Duration::from_millis(20));
            }
            w.shutdown(std::net::Shutdown::Write).unwrap();
            sent
        })
    };
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(echoed),
                Ok(n) => echoed.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    });

    // The UDP exchange: one datagram at a time, each answered before the
    // next; any datagram without its answer is a loss.
    let udp_dst = Family::V4.remote_a(UDP_ECHO_PORT);
    let udp = tb
        .lan
        .enter(|| UdpSocket::bind(Family::V4.lan_any()))
        .unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let udp_stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let stop = Arc::clone(&udp_stop);
        thread::spawn(move || {
            let mut answered = 0u32;
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let payload = format!("ping {answered}");
                udp.send_to(payload.as_bytes(), udp_dst).unwrap();
                let (n, from) = udp
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("datagram {answered} unanswered: {e}"));
                assert_eq!(from, udp_dst, "answer from the address written to");
                let (_, off) = peer_line(&buf[..n]);
                assert_eq!(&buf[off..n], payload.as_bytes(), "answer {answered}");
                answered += 1;
                thread::sleep(Duration::from_millis(10));
            }
            answered
        })
    };

    for round in 0..10 {
        let (next, expect) = if round % 2 == 0 {
            (&config_b, direct)
        } else {
            (&config_a, proxied)
        };
        std::fs::write(tb.config_path(), next).unwrap();
        reload(&tb);
        // The next new flow follows the new rules at once.
        assert_eq!(
            tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
            expect,
            "round {round}: a new flow after the reload"
        );
        thread::sleep(Duration::from_millis(150));
    }

    udp_stop.store(true, Ordering::Relaxed);
    let answered = pinger.join().expect("the UDP exchange lost a datagram");
    assert!(answered > 20, "only {answered} datagrams exchanged");
    stop.store(true, Ordering::Relaxed);
    let sent = writer.join().expect("the long flow broke");
    let echoed = reader
        .join()
        .unwrap()
        .expect("the long flow was cut by a reload");
    assert!(
        sent.len() >= 10 * 64 * 1024,
        "sent only {} bytes",
        sent.len()
    );
    assert_eq!(echoed.len(), sent.len(), "bytes lost across the reloads");
    assert!(echoed == sent, "the echo differs from what was sent");
    assert!(tb.tproxyd_running());
}

#[test]
fn a_broken_file_or_a_restart_only_key_is_refused_and_nothing_changes() {
    let Some(mut tb) = bed() else { return };
    let good = config(REMOTE_A_V4, "");
    tb.restart_tproxyd_with_config(&good);
    let direct = Family::V4.hop(Upstream::Direct);
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        direct
    );

    // A rule naming an outbound that does not exist, and a bad timeout:
    // both named, neither applied.
    let broken = good.replace(
        "outbound = \"direct\"",
        "outbound = \"nowhere\"\n[timeouts]\ntcp_idle = 0",
    );
    std::fs::write(tb.config_path(), &broken).unwrap();
    let log = reload_refused(&tb);
    assert!(
        log.contains("nowhere"),
        "the unknown outbound is named:\n{log}"
    );
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        direct,
        "the old rules still apply"
    );

    // Not TOML at all.
    std::fs::write(tb.config_path(), "listen = [").unwrap();
    reload_refused(&tb);
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        direct
    );

    // The listen port can only change with a restart.
    let moved = good.replace(&format!(":{PROXY_PORT}\""), ":1999\"");
    std::fs::write(tb.config_path(), moved).unwrap();
    let log = reload_refused(&tb);
    assert!(
        log.contains("listen can only change with a restart"),
        "the restart-only key is named:\n{log}"
    );
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        direct
    );
    assert_eq!(reloads_done(&tb), 0);

    // And a good file after all that is applied.
    std::fs::write(tb.config_path(), config(REMOTE_B_V4, "")).unwrap();
    reload(&tb);
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        Family::V4.hop(Upstream::Socks)
    );
    assert!(tb.tproxyd_running());
}

#[test]
fn a_reload_changes_the_firewall_capture_in_place() {
    let Some(mut tb) = own_bed(
        Backend::Nftables,
        Mode::Tproxy,
        "",
        "lan_interfaces = [\"rlan\"]",
    ) else {
        return;
    };
    let with_bypass = |bypass: &str| {
        format!(
            "listen = \"[::]:{PROXY_PORT}\"\n\
             [outbound]\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n\
             [firewall]\nbackend = \"nftables\"\nlan_interfaces = [\"rlan\"]\n{bypass}\n"
        )
    };
    tb.restart_tproxyd_with_config(&with_bypass(""));
    let lan = Family::V4.lan_any().ip();
    let proxied = Family::V4.hop(Upstream::Socks);
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        proxied
    );

    // Remote A bypassed: the kernel forwards it, tproxyd never sees it.
    std::fs::write(
        tb.config_path(),
        with_bypass(&format!("bypass = [\"{REMOTE_A_V4}/32\"]")),
    )
    .unwrap();
    reload(&tb);
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        lan,
        "after the reload the bypass is the kernel's"
    );
    assert_eq!(
        tcp_echo(&tb.lan, Family::V6.remote_a(ECHO_PORT)).ip(),
        Family::V6.hop(Upstream::Socks),
        "other destinations still captured"
    );
    // And back.
    std::fs::write(tb.config_path(), with_bypass("")).unwrap();
    reload(&tb);
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        proxied
    );

    // Stopping still removes everything, the reloaded rules included.
    tb.stop_tproxyd();
    assert_eq!(
        tb.snapshot(),
        tb.baseline,
        "rules left after a reload and stop"
    );
}
