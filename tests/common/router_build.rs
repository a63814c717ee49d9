//! The static router builds the OpenWrt and qemu tests use, from
//! scripts/build-router (a stable build locks target/router/cargo-stable,
//! a -Zbuild-std one target/router/cargo-nightly:
//! never the target/debug that `cargo test` holds).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[path = "tools.rs"]
mod tools;
pub use tools::*;

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The static tproxyd for `build` (aarch64, mipsel, …) from
/// `scripts/build-router TRIPLE`, or None when it cannot be built here
/// (outside CI only; in CI that fails).
pub fn static_binary(build: &str) -> Option<PathBuf> {
    let root = Path::new(ROOT);
    let triple = match build {
        "aarch64" => "aarch64-unknown-linux-musl",
        "x86_64" => "x86_64-unknown-linux-musl",
        "armv7" => "armv7-unknown-linux-musleabihf",
        "mipsel" => "mipsel-unknown-linux-musl",
        "mips" => "mips-unknown-linux-musl",
        other => panic!("no router build named {other}"),
    };
    // It prints "PATH<TAB>SIZE…<TAB>CHECKS" and exits non-zero when a check
    // fails; --no-smoke: the binary is run under qemu-system by the tests.
    let out = Command::new(root.join("scripts/build-router"))
        .args(["--no-smoke", triple])
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-router");
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text
        .lines()
        .filter_map(|l| l.split('\t').next())
        .map(|p| root.join(p))
        .rfind(|p| p.is_file());
    match path {
        Some(p) if out.status.success() => Some(p),
        _ => {
            let why = format!("scripts/build-router {triple} gave no binary:\n{text}");
            assert!(!in_ci(), "{why}");
            eprintln!("skipping: {why}");
            None
        }
    }
}
