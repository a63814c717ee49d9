//! What only the tests and the benchmark need from the test bed, behind
//! the `testbed` feature so that a plain release build leaves it out:
//! dante in the WAN namespace, and the bed as JSON (for `tproxyd testbed
//! up --json`, which bench/ reads). `tproxyd demo` needs neither.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};

use anyhow::{Context, Result};

use super::*;

impl Bed {
    /// The namespaces, interfaces and addresses, as one JSON object.
    pub fn json(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.escape_default());
        let obj = |pairs: &[(&str, String)]| {
            let body: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}: {v}", q(k)))
                .collect();
            format!("{{{}}}", body.join(", "))
        };
        obj(&[
            ("prefix", q(&self.prefix)),
            (
                "namespaces",
                obj(&[
                    ("lan", q(self.lan.name())),
                    ("router", q(self.router.name())),
                    ("wan", q(self.wan.name())),
                ]),
            ),
            (
                "interfaces",
                obj(&[
                    ("lan", q(LAN_IF)),
                    ("router_lan", q(ROUTER_LAN_IF)),
                    ("router_wan", q(ROUTER_WAN_IF)),
                    ("wan", q(WAN_IF)),
                ]),
            ),
            (
                "addresses",
                obj(&[
                    ("lan_v4", q(LAN_V4)),
                    ("lan_v6", q(LAN_V6)),
                    ("router_lan_v4", q(ROUTER_LAN_V4)),
                    ("router_lan_v6", q(ROUTER_LAN_V6)),
                    ("router_wan_v4", q(ROUTER_WAN_V4)),
                    ("router_wan_v6", q(ROUTER_WAN_V6)),
                    ("wan_v4", q(SOCKS_V4)),
                    ("wan_v6", q(SOCKS_V6)),
                    ("remote_a_v4", q(REMOTE_A_V4)),
                    ("remote_a_v6", q(REMOTE_A_V6)),
                    ("remote_b_v4", q(REMOTE_B_V4)),
                    ("remote_b_v6", q(REMOTE_B_V6)),
                    ("remote_net_v4", q(REMOTE_NET_V4)),
                    ("remote_net_v6", q(REMOTE_NET_V6)),
                ]),
            ),
            ("socks_port", SOCKS_PORT.to_string()),
        ])
    }
}

/// dante's configuration: listening on the WAN host's addresses, both
/// families, logging to `log`; `auth` asks clients for username/password
/// (checked against the system's users).
pub fn dante_config(log: &Path, auth: bool) -> String {
    dante_config_with(log, auth, true)
}

/// [`dante_config`], with UDP ASSOCIATE allowed or not: many SOCKS5
/// servers carry no UDP, and DNS must still get through them (as DNS over
/// TCP, see `crate::dns`).
pub fn dante_config_with(log: &Path, auth: bool, udp: bool) -> String {
    let method = if auth { "username" } else { "none" };
    let mut conf = format!(
        "logoutput: {log}
internal: {SOCKS_V4} port = {SOCKS_PORT}
internal: {SOCKS_V6} port = {SOCKS_PORT}
external: {SOCKS_V4}
external: {SOCKS_V6}
clientmethod: none
# Full cone: by default dante connects its UDP socket to the first
# destination, and the kernel then drops replies from any other remote.
udp.connectdst: no
socksmethod: {method}
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
client pass {{ from: ::/0 to: ::/0 }}
",
        log = log.display()
    );
    // dante matches rules per address family: a v4 client asking for a v6
    // target (and every other mix) needs its own rule.
    let commands = if udp {
        "connect udpassociate udpreply"
    } else {
        "connect"
    };
    for from in ["0.0.0.0/0", "::/0"] {
        for to in ["0.0.0.0/0", "::/0"] {
            conf.push_str(&format!(
                "socks pass {{ from: {from} to: {to} command: {commands} }}\n"
            ));
        }
    }
    conf
}

/// Starts dante in `wan` with [`dante_config`], its files in `dir`
/// (danted.conf, danted.log, danted.pid, danted.out, danted.err). Does not
/// wait: see [`Netns::wait_tcp`] on `SOCKS_V4:SOCKS_PORT`.
pub fn spawn_dante(wan: &Netns, dir: &Path, auth: bool) -> Result<Child> {
    spawn_dante_with(wan, dir, auth, true)
}

/// [`spawn_dante`] with [`dante_config_with`]'s `udp`.
pub fn spawn_dante_with(wan: &Netns, dir: &Path, auth: bool, udp: bool) -> Result<Child> {
    let conf = dir.join("danted.conf");
    std::fs::write(&conf, dante_config_with(&dir.join("danted.log"), auth, udp))
        .with_context(|| format!("write {}", conf.display()))?;
    wan.command("danted")
        .arg("-f")
        .arg(&conf)
        .arg("-p")
        .arg(dir.join("danted.pid"))
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("danted.out"))?)
        .stderr(File::create(dir.join("danted.err"))?)
        .spawn()
        .context("cannot start danted")
}

/// The address dante listens on (IPv4).
pub fn socks_v4() -> SocketAddr {
    SocketAddr::new(SOCKS_V4.parse().expect("constant"), SOCKS_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dante_config_is_full_cone_with_a_rule_per_family_pair() {
        let conf = dante_config(Path::new("/tmp/d.log"), false);
        assert!(conf.contains("udp.connectdst: no"));
        assert!(conf.contains("socksmethod: none"));
        assert!(conf.contains("logoutput: /tmp/d.log"));
        assert_eq!(conf.matches("socks pass").count(), 4);
        assert!(conf.contains("from: 0.0.0.0/0 to: ::/0 command: connect udpassociate udpreply"));
        let auth = dante_config(Path::new("/tmp/d.log"), true);
        assert!(auth.contains("socksmethod: username"));
        assert!(auth.contains("clientmethod: none"));
    }

    #[test]
    fn json_names_everything() {
        let bed = Bed {
            prefix: "p".into(),
            lan: Netns::named("p-lan"),
            router: Netns::named("p-rtr"),
            wan: Netns::named("p-wan"),
            keep: true,
        };
        let j = bed.json();
        assert!(j.starts_with("{\"prefix\": \"p\", \"namespaces\": {\"lan\": \"p-lan\""));
        assert!(j.contains("\"remote_a_v4\": \"198.51.100.10\""));
        assert!(j.contains("\"socks_port\": 1080}"));
    }
}
