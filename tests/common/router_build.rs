//! The static router build the OpenWrt and qemu tests use: scripts/build-router's
//! when that script exists, else `cargo build` for the musl target with
//! rust-lld (aarch64 and x86_64 only: rustup ships their std and CRT).
//! That build locks target/release and target/TRIPLE/release, not the
//! target/debug that `cargo test` holds.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Fails (never skips) under CI; elsewhere a missing tool skips with a note.
pub fn have(tools: &[&str], why: &str) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t} || test -x /usr/sbin/{t}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("{why} needs {missing:?}; run scripts/setup-test-deps");
    assert!(!in_ci(), "{why}");
    eprintln!("skipping: {why}");
    false
}

/// The static tproxyd for `build` (aarch64, mipsel, …), or None when it
/// cannot be built here (outside CI only; in CI that fails).
pub fn static_binary(build: &str) -> Option<PathBuf> {
    let root = Path::new(ROOT);
    let script = root.join("scripts/build-router");
    if script.exists() {
        let out = Command::new(&script)
            .arg(build)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/build-router");
        let text = String::from_utf8_lossy(&out.stdout);
        let path = text
            .split_whitespace()
            .map(PathBuf::from)
            .rfind(|p| p.ends_with("tproxyd") && p.is_file());
        if out.status.success() {
            if let Some(p) = path {
                return Some(p);
            }
        }
        let why = format!("scripts/build-router {build} gave no binary:\n{text}");
        assert!(!in_ci(), "{why}");
        eprintln!("skipping: {why}");
        return None;
    }
    let triple = match build {
        "aarch64" => "aarch64-unknown-linux-musl",
        "x86_64" => "x86_64-unknown-linux-musl",
        other => {
            let why = format!("no scripts/build-router, and {other} needs it");
            assert!(!in_ci(), "{why}");
            eprintln!("skipping: {why}");
            return None;
        }
    };
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == triple)
        })
        .unwrap_or(false);
    if !installed {
        let why = format!("rustup target add {triple}");
        assert!(!in_ci(), "{why} (scripts/setup-test-deps does it)");
        eprintln!("skipping: {why} first");
        return None;
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--locked",
            "--bin",
            "tproxyd",
            "--target",
            triple,
        ])
        .current_dir(root)
        .env("RUSTFLAGS", "-C linker=rust-lld")
        .stdin(Stdio::null())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build for {triple} failed");
    Some(dir.join(triple).join("release/tproxyd"))
}
