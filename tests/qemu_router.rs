//! tproxyd on a router's CPU *and kernel*: scripts/qemu-router boots
//! Debian 12's own arm64 and 4kc-malta (mipsel) kernels in qemu-system
//! (TCG) with an initramfs holding the static tproxyd for that CPU,
//! busybox, ip and nft, and runs
//! `tproxyd demo` there: TCP and UDP over IPv4 and IPv6 through tproxyd's
//! own TPROXY rules, which it must remove at stop; then `tproxyd rules
//! remove` after a SIGKILL (the OpenWrt init script's fallback). qemu-user cannot do
//! this (IP_TRANSPARENT, SO_MARK and nfnetlink are not emulated).
//!
//! The first run fetches the kernel and userland debs into
//! /var/cache/tproxyd-test/qemu (root: `apt-get download`); later runs
//! boot in a few seconds. Under CI a missing piece fails the test.

#[path = "common/router_build.rs"]
mod router_build;

use router_build::{have, in_ci, static_binary, ROOT};
use std::path::Path;
use std::process::{Command, Stdio};

/// After the demo, in the same boot: what the OpenWrt init script's
/// service_stopped relies on. A tproxyd killed with SIGKILL leaves its
/// table and policy rule; `tproxyd rules remove` with the same settings
/// clears them, and with nothing installed it still exits 0.
const AFTER_KILL: &str = r#"set -e
# busybox sh runs its own ip applet before PATH: the real one by path
ip() { /usr/sbin/ip "$@"; }
ns=tpkill
ip netns add $ns
/usr/sbin/ip netns exec $ns ip link set lo up
/usr/sbin/ip netns exec $ns ip link add lan0 type dummy
/usr/sbin/ip netns exec $ns ip link set lan0 up
args="--listen [::]:1090 --mode tproxy --direct --firewall nftables --lan-interface lan0"
/usr/sbin/ip netns exec $ns tproxyd run $args > /tmp/t.log 2>&1 &
pid=$!
i=0
until grep -q 'tproxyd listening' /tmp/t.log; do i=$((i+1)); [ $i -lt 300 ] || { cat /tmp/t.log; exit 1; }; sleep 0.1; done
kill -9 $pid
wait $pid || true
/usr/sbin/ip netns exec $ns nft list tables | grep -q 'inet tproxyd' || { echo "no table after kill -9?"; exit 1; }
echo "after kill -9: $(/usr/sbin/ip netns exec $ns nft list tables | tr '\n' ' ') / $(/usr/sbin/ip netns exec $ns ip rule | grep -c 0x1090) ip rules"
/usr/sbin/ip netns exec $ns tproxyd rules remove $args
if /usr/sbin/ip netns exec $ns nft list tables | grep -q tproxyd || /usr/sbin/ip netns exec $ns ip rule | grep -q 0x1090; then echo "rules left after rules remove"; exit 1; fi
echo "ok  tproxyd rules remove cleared what a kill -9 left"
/usr/sbin/ip netns exec $ns tproxyd rules remove $args
echo "ok  rules remove again, with nothing installed: exit 0"
ip netns del $ns
"#;

fn demo_in_qemu(arch: &str, qemu: &str) {
    if !have(
        &[qemu, "depmod", "cpio", "readelf", "dpkg-deb", "apt-get"],
        "the qemu-system test",
    ) {
        return;
    }
    let debarch = if arch == "aarch64" { "arm64" } else { arch };
    let cached = Path::new("/var/cache/tproxyd-test/qemu")
        .join(debarch)
        .join("kver")
        .exists();
    if !cached && !nix::unistd::geteuid().is_root() {
        let why = "the first qemu run fetches Debian packages with apt-get: run as root";
        assert!(!in_ci(), "{why}");
        eprintln!("skipping: {why}");
        return;
    }
    let Some(bin) = static_binary(arch) else {
        return;
    };
    let script = std::env::temp_dir().join(format!("tproxyd-qemu-{}-kill.sh", std::process::id()));
    std::fs::write(&script, AFTER_KILL).expect("write the guest script");
    let out = Command::new(Path::new(ROOT).join("scripts/qemu-router"))
        .args(["--arch", arch, "--bin"])
        .arg(&bin)
        .arg("--add")
        .arg(format!("{}:/usr/bin/after-kill.sh", script.display()))
        .args(["--", "tproxyd demo && sh /usr/bin/after-kill.sh"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/qemu-router");
    let _ = std::fs::remove_file(&script);
    let console = String::from_utf8_lossy(&out.stdout);
    eprintln!("{console}");
    assert!(
        out.status.success(),
        "tproxyd demo failed in the {arch} guest ({})",
        out.status
    );
    // The exit status came over the serial console; the lines say what
    // was proven, so a demo that silently did less would fail here.
    for needle in [
        "ok  TCP  IPv4",
        "ok  TCP  IPv6",
        "ok  UDP  IPv4",
        "ok  UDP  IPv6",
        "ok  no tproxyd table, chain or ip rule is left in the router",
        "ok  tproxyd rules remove cleared what a kill -9 left",
        "ok  rules remove again, with nothing installed: exit 0",
        "QEMU-ROUTER-EXIT=0",
    ] {
        assert!(console.contains(needle), "{needle:?} not in the console");
    }
}

#[test]
fn the_demo_passes_on_debian_arm64_kernel() {
    demo_in_qemu("aarch64", "qemu-system-aarch64");
}

/// The same on Debian's 4kc-malta kernel (32-bit little-endian MIPS, as in
/// MT7621 routers), with the soft-float mipsel build (no native 64-bit
/// atomics: portable-atomic's fallback).
#[test]
fn the_demo_passes_on_debian_mipsel_kernel() {
    demo_in_qemu("mipsel", "qemu-system-mipsel");
}
