//! tproxyd as a service: started as root, it installs its rules and then
//! runs as an unprivileged user with CAP_NET_ADMIN (and
//! CAP_NET_BIND_SERVICE for UDP) only, carries TCP, UDP and DNS, and still
//! removes its rules at stop; and the static build, alone in a chroot.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(5);
/// The system user scripts/setup-test-deps creates.
const SERVICE_USER: &str = AUTH_USER;
/// CAP_NET_ADMIN (12) and CAP_NET_BIND_SERVICE (10).
const BOTH_CAPS: u64 = (1 << 12) | (1 << 10);

/// The uid and gid of `user` as /etc/passwd has them.
fn ids_of(user: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == user).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
        })
        .unwrap_or_else(|| panic!("user {user} missing: run scripts/setup-test-deps"))
}

/// One field of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
        .to_string()
}

fn caps(pid: u32, key: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, key), 16).unwrap()
}

/// tproxyd runs as `uid`/`gid`, no other groups, with both capabilities in
/// every set: effective, permitted, inheritable, ambient and bounding.
fn assert_runs_as(tb: &Testbed, uid: u32, gid: u32) {
    let pid = tb.tproxyd_pid().unwrap();
    assert_eq!(
        status_field(pid, "Uid:"),
        format!("{uid}\t{uid}\t{uid}\t{uid}"),
        "{}",
        tb.tproxyd_log()
    );
    assert_eq!(
        status_field(pid, "Gid:"),
        format!("{gid}\t{gid}\t{gid}\t{gid}")
    );
    assert_eq!(status_field(pid, "Groups:"), "");
    for key in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
        assert_eq!(caps(pid, key), BOTH_CAPS, "{key}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
}

/// TCP, UDP and DNS (port 53: a reply socket needs CAP_NET_BIND_SERVICE)
/// through the SOCKS5 server, both families.
fn assert_carries_everything(tb: &Testbed) {
    for fam in [Family::V4, Family::V6] {
        let hop = fam.hop(Upstream::Socks);
        assert_eq!(
            tcp_echo(&tb.lan, fam.remote_a(ECHO_PORT)).ip(),
            hop,
            "{fam:?} TCP"
        );
        for port in [UDP_ECHO_PORT, DNS_PORT] {
            let dst = fam.remote_a(port);
            let (from, peer) = udp_echo(&tb.lan, fam.lan_any(), dst, WAIT).unwrap_or_else(|| {
                panic!("{fam:?} UDP to {dst} unanswered:\n{}", tb.tproxyd_log())
            });
            assert_eq!((from, peer.ip()), (dst, hop), "{fam:?} UDP {port}");
        }
    }
}

/// Started as root with a user (from the config file, or from `--user`),
/// tproxyd installs its rules, becomes that user, carries everything, and
/// at SIGTERM removes its rules as that user: nft, iptables-restore and
/// netlink all need CAP_NET_ADMIN, the first two across exec (ambient).
fn runs_as_its_user_and_removes_its_rules(backend: Backend, from_cli: bool) {
    if !can_run() {
        return;
    }
    let (uid, gid) = ids_of(SERVICE_USER);
    let name = match backend {
        Backend::Nftables => "nftables",
        Backend::Iptables => "iptables",
    };
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: if from_cli {
            vec!["--user".into(), SERVICE_USER.into()]
        } else {
            vec![]
        },
        own_rules: Some(OwnRules {
            top: if from_cli {
                String::new()
            } else {
                format!("user = \"{SERVICE_USER}\"\n")
            },
            firewall: format!("backend = \"{name}\"\nlan_interfaces = [\"rlan\"]\n"),
        }),
    });
    assert!(
        tb.wait_for_log(
            &format!(
                "running as user {SERVICE_USER} (uid {uid}, gid {gid}) with \
                 CAP_NET_BIND_SERVICE, CAP_NET_ADMIN only"
            ),
            WAIT
        ),
        "{}",
        tb.tproxyd_log()
    );
    assert_ne!(tb.snapshot(), tb.baseline, "no rules installed");
    assert_runs_as(&tb, uid, gid);
    assert_carries_everything(&tb);

    tb.stop_tproxyd();
    let log = tb.tproxyd_log();
    assert!(
        log.contains("firewall rules and policy routes removed"),
        "{log}"
    );
    for bad in [
        "Permission denied",
        "Operation not permitted",
        "WARN",
        "ERROR",
    ] {
        assert!(!log.contains(bad), "{bad:?} in\n{log}");
    }
    assert_eq!(tb.snapshot(), tb.baseline, "rules left after stop");
}

#[test]
fn nft_runs_as_its_user_and_removes_its_rules() {
    runs_as_its_user_and_removes_its_rules(Backend::Nftables, false);
}

#[test]
fn iptables_runs_as_its_user_and_removes_its_rules() {
    runs_as_its_user_and_removes_its_rules(Backend::Iptables, true);
}

/// A user that does not exist stops tproxyd before it binds or installs
/// anything, with a message that says what to do.
#[test]
fn an_unknown_user_is_refused_before_anything_is_installed() {
    if !can_run() {
        return;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: Some(OwnRules {
            top: String::new(),
            firewall: "backend = \"nftables\"\nlan_interfaces = [\"rlan\"]\n".into(),
        }),
    });
    tb.stop_tproxyd();
    assert_eq!(tb.snapshot(), tb.baseline);
    let mut args = tb.tproxyd_args();
    args.extend(["--user".into(), "no-such-user-tpd".into()]);
    let (ok, err) = tb.run_to_exit(&[], &args);
    assert!(!ok, "{err}");
    assert!(
        err.contains("user \"no-such-user-tpd\" is not in /etc/passwd"),
        "{err}"
    );
    assert!(err.contains("useradd --system"), "{err}");
    assert!(!err.contains("installed"), "{err}");
    assert_eq!(tb.snapshot(), tb.baseline, "something was installed");
}

/// Builds the static binary with scripts/build-static (its own target
/// directory, so this works while `cargo test` holds target/) and returns
/// its path.
pub fn static_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/build-static"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-static");
    assert!(out.status.success(), "scripts/build-static failed");
    let path = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        path.lines()
            .last()
            .expect("build-static printed no path")
            .trim(),
    )
}

/// The static build needs nothing from the system: alone in a chroot
/// with /proc (capabilities and sysctls are read there) and a one-line
/// /etc/passwd for `--user`, it carries TCP, UDP and DNS with the bed's
/// hand-written rules, and switches user without NSS.
#[test]
fn the_static_binary_runs_alone_in_a_chroot() {
    if !can_run() {
        return;
    }
    let bin = static_binary();
    let file = Command::new("file").arg("-L").arg(&bin).output().unwrap();
    let file = String::from_utf8_lossy(&file.stdout);
    assert!(
        file.contains("static-pie linked") || file.contains("statically linked"),
        "{file}"
    );

    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    tb.stop_tproxyd();
    let root = tb.dir.join("chroot");
    std::fs::create_dir_all(root.join("proc")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::copy(&bin, root.join("tproxyd")).unwrap();
    std::fs::write(root.join("etc/passwd"), "svc:x:4242:4243::/:/nonexistent\n").unwrap();
    // `ip netns exec` runs this in a mount namespace of its own: the proc
    // mount ends with it. The bed's binary path ($1) gives way to the copy.
    let script = "mount -t proc proc \"$0/proc\" && shift && \
                  exec chroot \"$0\" /tproxyd \"$@\" --user svc";
    let dir = root.display().to_string();
    tb.run_tproxyd_under(&["sh", "-c", script, &dir]);
    tb.spawn_tproxyd();
    let pid = tb.tproxyd_pid().unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    // Seen from outside the chroot.
    assert_eq!(exe, root.join("tproxyd"), "not the chroot's binary");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        root,
        "not in the chroot"
    );
    assert_runs_as(&tb, 4242, 4243);
    assert_carries_everything(&tb);
    tb.stop_tproxyd();
    let log = tb.tproxyd_log();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&dir), "the proc mount leaked:\n{mounts}");
}

/// What the unit's ExecStopPost does after a crash: `tproxyd rules
/// remove` as the service user, with the unit's ambient capabilities and
/// no_new_privs (setpriv stands in for systemd, which is not PID 1 here),
/// removes everything a killed tproxyd left.
#[test]
fn after_a_crash_the_service_user_removes_the_rules() {
    if !can_run() {
        return;
    }
    let (uid, gid) = ids_of(SERVICE_USER);
    for backend in ["nftables", "iptables"] {
        let mut tb = Testbed::start(Options {
            mode: Mode::Tproxy,
            upstream: Upstream::Socks,
            extra_args: vec![],
            own_rules: Some(OwnRules {
                top: String::new(),
                firewall: format!("backend = \"{backend}\"\nlan_interfaces = [\"rlan\"]\n"),
            }),
        });
        tb.kill_tproxyd();
        assert_ne!(
            tb.snapshot(),
            tb.baseline,
            "{backend}: kill -9 left no rules?"
        );
        let caps = "+net_admin,+net_bind_service";
        let out = Command::new("ip")
            .args(["netns", "exec", &tb.router.name, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", "--no-new-privs"])
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(format!("--bounding-set=-all,{caps}"))
            .arg(env!("CARGO_BIN_EXE_tproxyd"))
            .args(["rules", "remove", "-c"])
            .arg(tb.config_path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{backend}: {text}");
        assert!(!text.contains("WARN"), "{backend}: {text}");
        assert_eq!(tb.snapshot(), tb.baseline, "{backend}: rules left");
    }
}
