//! The iptables backend replaces its rules in one transaction per family:
//! a LAN client's connections are captured through reload after reload,
//! never forwarded out directly in between; and when the second family
//! refuses its rules, both families keep the earlier ones and the error
//! says so.
//!
//! The refusal is a real one from the tool tproxyd runs: tproxyd runs with
//! a `PATH` whose `ip6tables-restore` refuses its input while a flag file
//! exists, and is the real one otherwise.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// tproxyd with the iptables backend capturing rlan, bypassing `bypass`.
fn config(bypass: &[String]) -> String {
    let list: Vec<String> = bypass.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "listen = \"[::]:{PROXY_PORT}\"\n\
         [outbound]\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n\
         [firewall]\nbackend = \"iptables\"\nlan_interfaces = [\"rlan\"]\nbypass = [{}]\n",
        list.join(", ")
    )
}

/// Remote A bypassed in both families.
fn bypass_a() -> Vec<String> {
    vec![format!("{REMOTE_A_V4}/32"), format!("{REMOTE_A_V6}/128")]
}

/// Remote B bypassed in both families.
fn bypass_b() -> Vec<String> {
    vec![format!("{REMOTE_B_V4}/32"), format!("{REMOTE_B_V6}/128")]
}

fn bed() -> Option<Testbed> {
    own_bed(
        Backend::Iptables,
        Mode::Tproxy,
        "",
        "lan_interfaces = [\"rlan\"]",
    )
}

fn reloads_done(tb: &Testbed) -> usize {
    tb.tproxyd_log().matches("configuration reloaded").count()
}

fn reloads_refused(tb: &Testbed) -> usize {
    tb.tproxyd_log().matches("reload refused").count()
}

/// Writes `config`, sends SIGHUP and waits until the log says the reload
/// is done.
fn reload_with(tb: &Testbed, config: &str) {
    std::fs::write(tb.config_path(), config).unwrap();
    let before = reloads_done(tb);
    tb.signal_tproxyd("HUP");
    assert!(
        wait_until(WAIT, || reloads_done(tb) > before),
        "reload not reported:\n{}",
        tb.tproxyd_log()
    );
}

/// The real `ip6tables-restore` this system has.
fn real_ip6tables_restore() -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join("ip6tables-restore"))
        .find(|p| p.exists())
        .expect("ip6tables-restore is installed")
}

/// A directory holding an `ip6tables-restore` that refuses while `flag`
/// exists and runs the real one otherwise.
fn refusing_ip6tables_restore(dir: &Path, flag: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let tool = bin.join("ip6tables-restore");
    std::fs::write(
        &tool,
        format!(
            "#!/bin/sh\n\
             if [ -e '{}' ]; then\n  cat >/dev/null\n  echo 'ip6tables-restore: line 2 failed (refused by the test)' >&2\n  exit 1\nfi\n\
             exec '{}' \"$@\"\n",
            flag.display(),
            real_ip6tables_restore().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// tproxyd's rules in both families as iptables-save lists them.
fn iptables_rules(tb: &Testbed) -> String {
    let mut out = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        out.push_str(&format!("## {tool}\n"));
        for line in tb.router.exec_output(&[tool]).lines() {
            if !line.starts_with('#') {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn ip6tables_refusing_a_reload_leaves_the_earlier_rules_of_both_families() {
    let Some(mut tb) = bed() else { return };
    let flag = tb.dir.join("refuse-ipv6");
    let bin = refusing_ip6tables_restore(&tb.dir, &flag);
    let path = format!(
        "PATH={}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    tb.run_tproxyd_under(&["env", &path]);
    tb.restart_tproxyd_with_config(&config(&[]));
    for fam in [Family::V4, Family::V6] {
        assert_eq!(
            tcp_echo(&tb.lan, fam.remote_a(ECHO_PORT)).ip(),
            fam.hop(Upstream::Socks),
            "{fam:?} captured at the start"
        );
    }
    let before = iptables_rules(&tb);
    let snapshot = tb.snapshot();
    assert!(before.contains("-j TPROXYD_PRE"), "{before}");

    // Remote A bypassed: IPv4 takes it, IPv6 refuses.
    std::fs::write(&flag, "").unwrap();
    std::fs::write(tb.config_path(), config(&bypass_a())).unwrap();
    let refused = reloads_refused(&tb);
    tb.signal_tproxyd("HUP");
    assert!(
        wait_until(WAIT, || reloads_refused(&tb) > refused),
        "refusal not reported:\n{}",
        tb.tproxyd_log()
    );
    let log = tb.tproxyd_log();
    for said in [
        "ip6tables-restore refused the rules",
        "refused by the test",
        "the IPv6 rules were refused; tproxyd's earlier rules of both families are left in place",
    ] {
        assert!(log.contains(said), "the log says {said:?}:\n{log}");
    }
    assert_eq!(
        iptables_rules(&tb),
        before,
        "the earlier rules of both families are in place"
    );
    assert_eq!(tb.snapshot(), snapshot, "and nothing else changed");
    for fam in [Family::V4, Family::V6] {
        assert_eq!(
            tcp_echo(&tb.lan, fam.remote_a(ECHO_PORT)).ip(),
            fam.hop(Upstream::Socks),
            "{fam:?} still captured as before the refused reload"
        );
    }

    // Once IPv6 takes rules again, the same reload goes through.
    std::fs::remove_file(&flag).unwrap();
    reload_with(&tb, &config(&bypass_a()));
    for fam in [Family::V4, Family::V6] {
        assert_eq!(
            tcp_echo(&tb.lan, fam.remote_a(ECHO_PORT)).ip(),
            fam.lan_any().ip(),
            "{fam:?} bypassed after the reload"
        );
    }

    // A start refused the same way leaves nothing behind either.
    tb.stop_tproxyd();
    assert_eq!(tb.snapshot(), tb.baseline, "stop removes every rule");
    std::fs::write(&flag, "").unwrap();
    let (ok, stderr) = tb.run_to_exit(&["env", &path], &tb.tproxyd_args());
    assert!(!ok, "a refused start fails:\n{stderr}");
    assert!(
        stderr.contains("ip6tables-restore refused the rules"),
        "{stderr}"
    );
    assert_eq!(
        tb.snapshot(),
        tb.baseline,
        "a refused start leaves the system as it was"
    );
}

/// One TCP exchange with `dst`: the address the server saw, or why not.
fn echo_peer(dst: SocketAddr) -> Result<IpAddr, String> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
        .map_err(|e| format!("connect {dst}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"echo me")
        .and_then(|()| s.shutdown(Shutdown::Write))
        .map_err(|e| format!("send to {dst}: {e}"))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .map_err(|e| format!("read from {dst}: {e}"))?;
    let (peer, off) = peer_line(&got);
    if &got[off..] != b"echo me" {
        return Err(format!("wrong echo from {dst}"));
    }
    Ok(peer.ip())
}

/// The measurement: 30 reloads that add and remove a bypass
/// prefix while a LAN client connects again and again. Removing the
/// chains and adding the new ones let about 8% of the connections out
/// directly, with the client's own address; swapped in one transaction,
/// none is.
#[test]
fn connections_are_captured_through_thirty_reloads() {
    let Some(mut tb) = bed() else { return };
    tb.restart_tproxyd_with_config(&config(&[]));
    let stop = AtomicBool::new(false);
    let lan = &tb.lan;
    let (proxied, direct, failed) = thread::scope(|s| {
        let client = s.spawn(|| {
            lan.enter(|| {
                let (mut proxied, mut direct, mut failed) = (0usize, Vec::new(), Vec::new());
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) || n < 100 {
                    // Remote A is never bypassed: every exchange must go
                    // through the proxy.
                    let fam = if n.is_multiple_of(2) {
                        Family::V4
                    } else {
                        Family::V6
                    };
                    n += 1;
                    match echo_peer(fam.remote_a(ECHO_PORT)) {
                        Ok(ip) if ip == fam.hop(Upstream::Socks) => proxied += 1,
                        Ok(ip) => direct.push(ip),
                        Err(e) => failed.push(e),
                    }
                }
                (proxied, direct, failed)
            })
        });
        for round in 0..30 {
            let bypass = if round % 2 == 0 { bypass_b() } else { vec![] };
            reload_with(&tb, &config(&bypass));
        }
        stop.store(true, Ordering::Relaxed);
        client.join().expect("the client thread")
    });
    assert!(
        direct.is_empty() && failed.is_empty(),
        "of {} exchanges, {} went out directly ({direct:?}) and {} failed ({failed:?})",
        proxied + direct.len() + failed.len(),
        direct.len(),
        failed.len()
    );
    assert!(proxied >= 100, "{proxied} exchanges");
    assert_eq!(reloads_done(&tb), 30);

    // The rules are those of the last reload, once, in both families.
    let rules = iptables_rules(&tb);
    assert_eq!(
        rules
            .matches("-A PREROUTING -i rlan -j TPROXYD_PRE")
            .count(),
        2,
        "{rules}"
    );
    assert!(!rules.contains(REMOTE_B_V4), "{rules}");
    tb.stop_tproxyd();
    assert_eq!(tb.snapshot(), tb.baseline, "stop removes every rule");
}
