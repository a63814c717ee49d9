//! `tproxyd::testbed`, the namespaces the demo, the end-to-end tests and
//! the benchmark share: it comes up with working routes both ways over
//! IPv4 and IPv6, and goes away completely, also after a panic and
//! through the `tproxyd testbed` command the benchmark uses.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tproxyd::testbed::{self, Bed, Netns, Options};

fn can_run() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the test bed needs root under CI"
    );
    eprintln!("skipping: the test bed needs root");
    false
}

fn prefix() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "tbt{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Every namespace on the host whose name starts with `prefix-`.
fn namespaces(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

/// A TCP exchange from the LAN to remote A on the WAN side, routed by
/// the router; returns the client address the server saw.
fn exchange(bed: &Bed, remote: &str, port: u16) -> SocketAddr {
    let dst = SocketAddr::new(remote.parse().unwrap(), port);
    let listener = bed.wan.enter(|| TcpListener::bind(dst).unwrap()).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&got).unwrap();
        peer
    });
    let echoed = bed
        .lan
        .enter(|| {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
            s.write_all(b"across").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        })
        .unwrap();
    assert_eq!(echoed, b"across");
    server.join().unwrap()
}

#[test]
fn up_routes_both_families_and_down_removes_everything() {
    if !can_run() {
        return;
    }
    let p = prefix();
    let bed = Bed::up(&p, &Options::default()).unwrap();
    assert_eq!(namespaces(&p).len(), 3);
    // Plain routing: the server sees the client's own address.
    let seen = exchange(&bed, testbed::REMOTE_A_V4, 7001);
    assert_eq!(seen.ip().to_string(), testbed::LAN_V4);
    let seen = exchange(&bed, testbed::REMOTE_B_V6, 7002);
    assert_eq!(seen.ip().to_string(), testbed::LAN_V6);
    let forwarding = bed.router.exec(&["sysctl", "-n", "net.ipv4.ip_forward"]);
    assert_eq!(forwarding.unwrap().trim(), "1");
    // A process inside is killed on the way down.
    let mut sleeper = bed.wan.command("sleep").arg("600").spawn().unwrap();
    bed.down().unwrap();
    assert!(namespaces(&p).is_empty(), "{:?}", namespaces(&p));
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "the process inside was not killed");
}

#[test]
fn a_panic_with_the_bed_up_leaves_nothing_behind() {
    if !can_run() {
        return;
    }
    let p = prefix();
    let p2 = p.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let bed = Bed::up(&p2, &Options { bench: true }).unwrap();
        let range = bed
            .lan
            .exec(&["sysctl", "-n", "net.ipv4.ip_local_port_range"])
            .unwrap();
        assert_eq!(
            range.split_whitespace().collect::<Vec<_>>(),
            ["10000", "65535"]
        );
        tx.send(bed.router.command("sleep").arg("600").spawn().unwrap())
            .unwrap();
        panic!("a failing test");
    })
    .join();
    assert!(result.is_err());
    assert!(namespaces(&p).is_empty(), "{:?}", namespaces(&p));
    let status = rx.recv().unwrap().wait().unwrap();
    assert!(!status.success(), "the process inside was not killed");
}

#[test]
fn a_taken_prefix_is_refused_and_left_alone() {
    if !can_run() {
        return;
    }
    let p = prefix();
    let other = Netns::create(&testbed::ns_name(&p, "rtr")).unwrap();
    let err = Bed::up(&p, &Options::default()).unwrap_err();
    assert!(format!("{err:#}").contains("exist already"), "{err:#}");
    assert_eq!(namespaces(&p), [other.name().to_string()]);
    drop(other);
    assert!(namespaces(&p).is_empty());
}

#[test]
fn the_command_brings_the_bed_up_and_down() {
    if !can_run() {
        return;
    }
    let p = prefix();
    let bin = env!("CARGO_BIN_EXE_tproxyd");
    let out = Command::new(bin)
        .args(["testbed", "up", "--prefix", &p, "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // Whatever happens next, nothing stays behind.
    let _guard = Guard(p.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains(&format!("\"router\": \"{p}-rtr\"")), "{json}");
    assert!(
        json.contains("\"remote_a_v4\": \"198.51.100.10\""),
        "{json}"
    );
    assert_eq!(
        namespaces(&p).len(),
        3,
        "the bed stays up after the command"
    );
    let status = Command::new(bin)
        .args(["testbed", "down", "--prefix", &p])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(namespaces(&p).is_empty(), "{:?}", namespaces(&p));
}

struct Guard(String);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = testbed::teardown(&self.0);
    }
}
