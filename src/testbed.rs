//! The LAN/router/WAN test bed: three network namespaces joined by veth
//! pairs, IPv4 and IPv6, built in one place for the demo, the end-to-end
//! tests and the benchmark (through the hidden `tproxyd testbed` command).
//!
//! ```text
//!  lan                router                             wan
//!  l0 192.0.2.2  ──  rlan 192.0.2.1    rwan 203.0.113.1 ── w0 203.0.113.2 (dante :1080)
//!     2001:db8:1::2     2001:db8:1::1      2001:db8:2::1      2001:db8:2::2
//!                                                           lo 198.51.100.10/.11
//!                                                              2001:db8:100::10/::11
//! ```
//!
//! The "internet" servers live on the WAN namespace's loopback, on
//! documentation addresses, so every packet stays inside the namespaces.
//! The namespaces are named `PREFIX-lan`, `PREFIX-rtr` and `PREFIX-wan`
//! from a prefix the caller makes unique; [`teardown`] kills what runs
//! inside them and deletes them, and a [`Bed`] does so when dropped.
//!
//! It needs root and iproute2; nothing here runs unless called.
//!
//! The namespaces are part of every build, since `tproxyd demo` builds
//! them. What only the tests and the benchmark use (dante in the WAN
//! namespace, the bed as JSON, and with them the hidden `tproxyd testbed`
//! command) is in `harness`, behind the `testbed` feature (Cargo.toml):
//! `cargo test` turns it on, a plain release build leaves it out.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

#[cfg(feature = "testbed")]
mod harness;
#[cfg(feature = "testbed")]
pub use harness::{dante_config, dante_config_with, socks_v4, spawn_dante, spawn_dante_with};
#[cfg(feature = "testbed")]
pub mod shadowsocks;
#[cfg(any(test, feature = "testbed"))]
pub mod unbound;

pub const LAN_IF: &str = "l0";
pub const ROUTER_LAN_IF: &str = "rlan";
pub const ROUTER_WAN_IF: &str = "rwan";
pub const WAN_IF: &str = "w0";

pub const LAN_V4: &str = "192.0.2.2";
pub const LAN_V6: &str = "2001:db8:1::2";
pub const ROUTER_LAN_V4: &str = "192.0.2.1";
pub const ROUTER_LAN_V6: &str = "2001:db8:1::1";
pub const ROUTER_WAN_V4: &str = "203.0.113.1";
pub const ROUTER_WAN_V6: &str = "2001:db8:2::1";
/// The WAN host's own address, where dante listens.
pub const SOCKS_V4: &str = "203.0.113.2";
pub const SOCKS_V6: &str = "2001:db8:2::2";
/// Remote A: the "internet" server address (on the WAN namespace's `lo`).
pub const REMOTE_A_V4: &str = "198.51.100.10";
pub const REMOTE_A_V6: &str = "2001:db8:100::10";
/// Remote B: a second remote host (the full-cone checks).
pub const REMOTE_B_V4: &str = "198.51.100.11";
pub const REMOTE_B_V6: &str = "2001:db8:100::11";
/// The remote networks the router routes to the WAN side.
pub const REMOTE_NET_V4: &str = "198.51.100.0/24";
pub const REMOTE_NET_V6: &str = "2001:db8:100::/64";
/// dante's port on the WAN host.
pub const SOCKS_PORT: u16 = 1080;

/// The roles, as the namespace names end.
pub const ROLES: [&str; 3] = ["lan", "rtr", "wan"];

/// `PREFIX-ROLE`.
pub fn ns_name(prefix: &str, role: &str) -> String {
    format!("{prefix}-{role}")
}

/// Runs a command to completion; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace by name. One made by [`Netns::create`] is deleted
/// (after killing what runs in it) when dropped; one from [`Netns::named`]
/// is only a handle.
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Creates the namespace; it goes away with the returned value.
    pub fn create(name: &str) -> Result<Netns> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        Ok(Netns {
            name: name.to_string(),
            owned: true,
        })
    }

    /// A handle to a namespace someone else owns.
    pub fn named(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...` (ARGS split on whitespace).
    pub fn ip(&self, args: &str) -> Result<()> {
        run(Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace()))
        .map(|_| ())
    }

    /// `ip netns exec NAME PROGRAM`, to add arguments to and run.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs a command inside the namespace; its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("exec: no command")?;
        run(self.command(program).args(rest))
    }

    /// `sysctl -qw SETTING` inside the namespace.
    pub fn sysctl(&self, setting: &str) -> Result<()> {
        self.exec(&["sysctl", "-qw", setting]).map(|_| ())
    }

    /// Loads an nft ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft")?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft -f failed in {}: {}\ninput:\n{ruleset}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// makes stay in the namespace whichever thread uses them later. A
    /// panic in `f` goes on in the caller.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(|| {
                let fd = File::open(&path).with_context(|| format!("open {path}"))?;
                setns(&fd, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns {}", self.name))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Processes whose network namespace is this one (never this process).
    pub fn pids(&self) -> Vec<u32> {
        let me = std::process::id();
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stderr(Stdio::null())
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .filter(|&p| p != me)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILLs every process inside.
    pub fn kill_all(&self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Kills what runs inside and deletes the namespace (if it exists).
    pub fn delete(&self) {
        self.kill_all();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Whether `within` passes with something accepting TCP on `addr`,
    /// as seen from inside this namespace.
    pub fn wait_tcp(&self, addr: SocketAddr, within: Duration) -> Result<bool> {
        self.enter(|| {
            let deadline = Instant::now() + within;
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            self.delete();
        }
    }
}

/// Choices beyond the common topology.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// For connection-rate loads (the benchmark): in every namespace, a
    /// wide ephemeral port range starting above every listener's port,
    /// `tcp_tw_reuse` and large accept backlogs.
    pub bench: bool,
}

/// The three namespaces, built and addressed. Dropping it tears it down,
/// unless [`Bed::keep`] was called.
#[derive(Debug)]
pub struct Bed {
    pub prefix: String,
    pub lan: Netns,
    pub router: Netns,
    pub wan: Netns,
    keep: bool,
}

impl Bed {
    /// Builds the topology under `prefix` (letters, digits, `_` and `-`).
    /// On failure, whatever was made is removed again.
    pub fn up(prefix: &str, opts: &Options) -> Result<Bed> {
        check_prefix(prefix)?;
        let taken = existing(prefix);
        if !taken.is_empty() {
            // Not ours to remove: no Bed exists yet, so nothing is torn down.
            bail!(
                "namespaces {} exist already (`tproxyd testbed down --prefix {prefix}` removes them)",
                taken.join(", ")
            );
        }
        let bed = Bed {
            prefix: prefix.to_string(),
            lan: Netns::named(&ns_name(prefix, "lan")),
            router: Netns::named(&ns_name(prefix, "rtr")),
            wan: Netns::named(&ns_name(prefix, "wan")),
            keep: false,
        };
        bed.build(opts)
            .with_context(|| format!("cannot build the test bed {prefix}"))?;
        Ok(bed)
    }

    fn spaces(&self) -> [&Netns; 3] {
        [&self.lan, &self.router, &self.wan]
    }

    fn build(&self, opts: &Options) -> Result<()> {
        for ns in self.spaces() {
            run(Command::new("ip").args(["netns", "add", ns.name()]))?;
        }
        for ns in self.spaces() {
            // Before any veth exists: otherwise IPv6 addresses stay
            // "tentative" for about 2 s.
            ns.sysctl("net.ipv6.conf.all.accept_dad=0")?;
            ns.sysctl("net.ipv6.conf.default.accept_dad=0")?;
            ns.ip("link set lo up")?;
            if opts.bench {
                // Ephemeral ports start above every port a service here
                // listens on, so no outgoing flow takes a listener's port.
                ns.sysctl("net.ipv4.ip_local_port_range=10000 65535")?;
                ns.sysctl("net.ipv4.tcp_tw_reuse=1")?;
                ns.sysctl("net.core.somaxconn=65535")?;
                ns.sysctl("net.ipv4.tcp_max_syn_backlog=65535")?;
            }
        }
        let (lan, router, wan) = (&self.lan, &self.router, &self.wan);
        lan.ip(&format!(
            "link add {LAN_IF} type veth peer name {ROUTER_LAN_IF} netns {}",
            router.name()
        ))?;
        router.ip(&format!(
            "link add {ROUTER_WAN_IF} type veth peer name {WAN_IF} netns {}",
            wan.name()
        ))?;
        for (ns, dev, v4, v6) in [
            (lan, LAN_IF, LAN_V4, LAN_V6),
            (router, ROUTER_LAN_IF, ROUTER_LAN_V4, ROUTER_LAN_V6),
            (router, ROUTER_WAN_IF, ROUTER_WAN_V4, ROUTER_WAN_V6),
            (wan, WAN_IF, SOCKS_V4, SOCKS_V6),
        ] {
            ns.ip(&format!("addr add {v4}/24 dev {dev}"))?;
            ns.ip(&format!("addr add {v6}/64 dev {dev} nodad"))?;
        }
        for a in [REMOTE_A_V4, REMOTE_B_V4] {
            wan.ip(&format!("addr add {a}/32 dev lo"))?;
        }
        for a in [REMOTE_A_V6, REMOTE_B_V6] {
            wan.ip(&format!("addr add {a}/128 dev lo"))?;
        }
        lan.ip(&format!("link set {LAN_IF} up"))?;
        router.ip(&format!("link set {ROUTER_LAN_IF} up"))?;
        router.ip(&format!("link set {ROUTER_WAN_IF} up"))?;
        wan.ip(&format!("link set {WAN_IF} up"))?;

        lan.ip(&format!("route add default via {ROUTER_LAN_V4}"))?;
        lan.ip(&format!("-6 route add default via {ROUTER_LAN_V6}"))?;
        router.ip(&format!("route add {REMOTE_NET_V4} via {SOCKS_V4}"))?;
        router.ip(&format!("-6 route add {REMOTE_NET_V6} via {SOCKS_V6}"))?;
        wan.ip(&format!("route add 192.0.2.0/24 via {ROUTER_WAN_V4}"))?;
        wan.ip(&format!("-6 route add 2001:db8:1::/64 via {ROUTER_WAN_V6}"))?;

        router.sysctl("net.ipv4.ip_forward=1")?;
        router.sysctl("net.ipv6.conf.all.forwarding=1")?;
        // src_valid_mark=1 silently drops forwarded IPv4 TPROXY traffic.
        router.sysctl("net.ipv4.conf.all.src_valid_mark=0")?;
        Ok(())
    }

    /// Leaves the namespaces (and what runs in them) in place when this
    /// value goes; [`teardown`] with the prefix removes them later.
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// Tears the bed down now; fails if a namespace could not be removed.
    pub fn down(mut self) -> Result<()> {
        self.keep = true;
        teardown(&self.prefix)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if !self.keep {
            let _ = teardown(&self.prefix);
        }
    }
}

fn check_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 40
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        bail!("test bed prefix {prefix:?}: use 1 to 40 letters, digits, '_' or '-'");
    }
    Ok(())
}

/// The bed's namespaces that exist now.
pub fn existing(prefix: &str) -> Vec<String> {
    let names: Vec<String> = ROLES.iter().map(|r| ns_name(prefix, r)).collect();
    names
        .into_iter()
        .filter(|n| Path::new("/var/run/netns").join(n).exists())
        .collect()
}

/// Kills what runs in the bed's namespaces and deletes them; only these
/// three exact names, so `tb1` never touches `tb10`'s. Fails if any is
/// still there afterwards.
pub fn teardown(prefix: &str) -> Result<()> {
    check_prefix(prefix)?;
    for role in ROLES {
        Netns::named(&ns_name(prefix, role)).delete();
    }
    let left = existing(prefix);
    if !left.is_empty() {
        bail!("could not delete namespaces {}", left.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked_and_names_exact() {
        assert!(check_prefix("tpd12x3").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("a b").is_err());
        assert!(check_prefix("../x").is_err());
        assert_eq!(ns_name("tb1", "rtr"), "tb1-rtr");
    }
}
