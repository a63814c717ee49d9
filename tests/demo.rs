//! `tproxyd demo`, as a newcomer runs it: it must show every flow going
//! through tproxyd, clean up after itself (also on Ctrl-C), and leave the
//! host's own firewall, rules and namespaces exactly as they were.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tproxyd");

fn can_run() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the demo test needs root under CI"
    );
    eprintln!("skipping: the demo needs root");
    false
}

/// The host's firewall and routing state, and the demo namespaces.
fn host_state() -> (String, Vec<String>) {
    let mut state = String::new();
    for cmd in [
        &["nft", "list", "ruleset"][..],
        &["ip", "rule"],
        &["ip", "-6", "rule"],
    ] {
        let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
        state.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let demo_ns = String::from_utf8_lossy(&netns.stdout)
        .lines()
        .filter(|l| l.starts_with("tpdemo"))
        .map(str::to_string)
        .collect();
    (state, demo_ns)
}

fn own_demo_namespaces(pid: u32) -> Vec<String> {
    host_state()
        .1
        .into_iter()
        .filter(|n| n.starts_with(&format!("tpdemo{pid}-")))
        .collect()
}

#[test]
fn demo_shows_every_flow_through_tproxyd_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let (before, _) = host_state();
    let out = Command::new(BIN)
        .arg("demo")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for flow in ["TCP  IPv4", "TCP  IPv6", "UDP  IPv4", "UDP  IPv6"] {
        let line = text
            .lines()
            .find(|l| l.contains(flow))
            .unwrap_or_else(|| panic!("no {flow} line:\n{text}"));
        assert!(
            line.starts_with("  ok ") && line.contains("tproxyd relayed it"),
            "{line}"
        );
    }
    assert!(text.contains("proto=\"tcp\" client=192.0.2.2"), "{text}");
    assert!(
        text.contains("no tproxyd table, chain or ip rule is left"),
        "{text}"
    );
    let (after, _) = host_state();
    assert_eq!(
        after, before,
        "the demo changed the host's firewall or rules"
    );
}

#[test]
fn demo_cleans_up_on_ctrl_c() {
    if !can_run() {
        return;
    }
    let (before, _) = host_state();
    let mut child = Command::new(BIN)
        .args(["demo", "--hold"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "demo never reached its hold point:\n{seen}"
        );
        let Some(Ok(line)) = lines.next() else {
            panic!("demo ended early:\n{seen}")
        };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("press Ctrl-C") {
            break;
        }
    }
    assert_eq!(
        own_demo_namespaces(pid).len(),
        3,
        "namespaces exist while holding"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    for line in lines.map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(status.success(), "{status}:\n{seen}");
    assert!(
        own_demo_namespaces(pid).is_empty(),
        "namespaces left after Ctrl-C:\n{seen}"
    );
    assert_eq!(host_state().0, before);
}

/// The headline: the demo passes on a machine with neither nft
/// nor iptables installed. Run in a private mount namespace where every
/// nft/iptables binary on PATH (and in the sbin directories) is covered by
/// an empty file that cannot be executed.
#[test]
fn demo_passes_with_nft_and_iptables_hidden() {
    if !can_run() {
        return;
    }
    let (before, _) = host_state();
    let empty = std::env::temp_dir().join(format!("tproxyd-hidden-{}", std::process::id()));
    std::fs::write(&empty, b"").unwrap();
    let mut hide = String::new();
    let path = std::env::var("PATH").unwrap_or_default();
    let mut dirs: Vec<std::path::PathBuf> = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"])
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "nft"
                || name.starts_with("iptables")
                || name.starts_with("ip6tables")
                || name.starts_with("xtables")
            {
                hide.push_str(&format!(
                    "mount --bind {} {}/{name} && ",
                    empty.display(),
                    dir.display()
                ));
            }
        }
    }
    assert!(
        !hide.is_empty(),
        "nothing to hide: the test machine has no nft"
    );
    let script = format!(
        "{hide}true; if nft --version || iptables-restore --version || ip6tables-restore --version; then echo 'nft or iptables still runs' >&2; exit 1; fi; exec {BIN} demo"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&empty);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for flow in ["TCP  IPv4", "TCP  IPv6", "UDP  IPv4", "UDP  IPv6"] {
        let line = text
            .lines()
            .find(|l| l.contains(flow))
            .unwrap_or_else(|| panic!("no {flow} line:\n{text}"));
        assert!(
            line.starts_with("  ok ") && line.contains("tproxyd relayed it"),
            "{line}"
        );
    }
    assert!(text.contains("nft is not installed"), "{text}");
    assert!(text.contains("tproxy to :1090"), "{text}");
    assert!(
        text.contains("no tproxyd table, chain or ip rule is left"),
        "{text}"
    );
    assert_eq!(
        host_state().0,
        before,
        "the demo changed the host's firewall or rules"
    );
}
