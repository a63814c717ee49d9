//! Small helpers the packaging and router tests share: running a tool
//! and failing loudly, a fresh temporary directory, and the rule that a
//! missing tool fails under CI and skips (with a note) elsewhere.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

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

/// Runs `cmd` with no stdin; panics with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty directory under the temp dir, named for this test process
/// (`kind` tells the test files apart).
pub fn temp_dir(kind: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tproxyd-{kind}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
