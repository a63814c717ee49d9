//! tproxyd on a router's CPU *and kernel*: scripts/qemu-router boots
//! Debian 12's own arm64 kernel in qemu-system (TCG) with an initramfs
//! holding the static aarch64 tproxyd, busybox, ip and nft, and runs
//! `tproxyd demo` there: TCP and UDP over IPv4 and IPv6 through tproxyd's
//! own TPROXY rules, which it must remove at stop. qemu-user cannot do
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

fn demo_in_qemu(arch: &str, qemu: &str) {
    if !have(
        &[qemu, "depmod", "cpio", "readelf", "dpkg-deb", "apt-get"],
        "the qemu-system test",
    ) {
        return;
    }
    let cached = Path::new("/var/cache/tproxyd-test/qemu").exists();
    if !cached && !nix::unistd::geteuid().is_root() {
        let why = "the first qemu run fetches Debian packages with apt-get: run as root";
        assert!(!in_ci(), "{why}");
        eprintln!("skipping: {why}");
        return;
    }
    let Some(bin) = static_binary(arch) else {
        return;
    };
    let out = Command::new(Path::new(ROOT).join("scripts/qemu-router"))
        .args(["--arch", arch, "--bin"])
        .arg(&bin)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/qemu-router");
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
        "QEMU-ROUTER-EXIT=0",
    ] {
        assert!(console.contains(needle), "{needle:?} not in the console");
    }
}

#[test]
fn the_demo_passes_on_debian_arm64_kernel() {
    demo_in_qemu("aarch64", "qemu-system-aarch64");
}
