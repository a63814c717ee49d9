//! `tproxyd doctor`: checks what a working setup needs and says, for each
//! thing, PASS, WARN or FAIL with the fix.
//!
//! Findings measured on the test bed and kept as tests: rp_filter 0, 1 and
//! 2 all work with tproxyd's rules while src_valid_mark is 0; with
//! src_valid_mark=1 every forwarded IPv4 TPROXY packet is dropped (the
//! reverse-path check routes with the fwmark, finds tproxyd's
//! `local default` route and drops before INPUT).

use std::fmt;
use std::path::Path;

use super::{iptables, nft, policy_route, run_tool, Plan, ToolFailure};
use crate::config::{Backend, Config, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub status: Status,
    pub what: String,
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.status {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        write!(f, "{tag}  {}", self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      fix: {fix}")?;
        }
        Ok(())
    }
}

fn pass(what: impl Into<String>) -> Finding {
    Finding {
        status: Status::Pass,
        what: what.into(),
        fix: None,
    }
}

fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        status: Status::Warn,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        status: Status::Fail,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

fn sysctl(path: &str) -> Option<u32> {
    std::fs::read_to_string(Path::new("/proc/sys").join(path))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Runs `tool args` with `input`; Ok(()) when it exits 0, else why not.
fn probe(tool: &str, args: &[&str], input: &str) -> Result<(), String> {
    match run_tool(tool, args, Some(input)) {
        Ok(_) => Ok(()),
        Err(ToolFailure::Spawn(e)) => Err(format!("cannot run {tool}: {e}")),
        Err(ToolFailure::Failed(stderr)) => Err(stderr),
    }
}

fn kernel_support(backend: Backend) -> Finding {
    match backend {
        Backend::Nftables | Backend::None => {
            // --check sends the batch to the kernel and aborts it: a missing
            // expression module fails here without changing anything.
            let probe_table = "table inet tproxyd_doctor {\n chain c {\n  type filter hook prerouting priority mangle; policy accept;\n  meta l4proto tcp socket transparent 1 accept\n  meta l4proto tcp tproxy to :1 accept\n }\n}\n";
            match probe("nft", &["--check", "-f", "-"], probe_table) {
                Ok(()) => pass("kernel: nftables tproxy and socket expressions"),
                Err(e) if e.starts_with("cannot run") => fail(
                    format!("nft: {e}"),
                    "install nftables (Debian: apt install nftables; OpenWrt: it ships with fw4), or use --firewall iptables",
                ),
                Err(e) => fail(
                    format!("kernel: no nftables tproxy/socket support ({e})"),
                    "kernel >= 4.18 with CONFIG_NFT_TPROXY and CONFIG_NFT_SOCKET (OpenWrt: opkg install kmod-nft-tproxy kmod-nft-socket), or use --firewall iptables",
                ),
            }
        }
        Backend::Iptables => {
            let probe_rules = "*mangle\n:TPROXYD_DOCTOR - [0:0]\n-A TPROXYD_DOCTOR -p tcp -m socket --transparent -j ACCEPT\n-A TPROXYD_DOCTOR -p tcp -j TPROXY --on-port 1 --tproxy-mark 0x1/0xffffffff\nCOMMIT\n";
            match probe("iptables-restore", &["--noflush", "--test"], probe_rules) {
                Ok(()) => pass("kernel: xt_TPROXY and xt_socket"),
                Err(e) if e.starts_with("cannot run") => fail(
                    format!("iptables-restore: {e}"),
                    "install iptables, or use --firewall nftables",
                ),
                Err(e) => fail(
                    format!("kernel: no xt_TPROXY/xt_socket ({e})"),
                    "modprobe xt_TPROXY xt_socket (OpenWrt: opkg install kmod-ipt-tproxy kmod-ipt-socket), or use --firewall nftables",
                ),
            }
        }
    }
}

fn forwarding(cfg: &Config) -> Vec<Finding> {
    if cfg.firewall.lan_interfaces.is_empty() && cfg.firewall.source_cidrs.is_empty() {
        return vec![pass(
            "forwarding: not needed (only router-local traffic is captured)",
        )];
    }
    let mut out = Vec::new();
    match sysctl("net/ipv4/ip_forward") {
        Some(1) => out.push(pass("net.ipv4.ip_forward=1")),
        v => out.push(fail(
            format!(
                "net.ipv4.ip_forward={}: the LAN's IPv4 traffic is not forwarded",
                v.map_or("?".into(), |v| v.to_string())
            ),
            "sysctl -w net.ipv4.ip_forward=1 (and set it in /etc/sysctl.d/ to keep it)",
        )),
    }
    match sysctl("net/ipv6/conf/all/forwarding") {
        Some(1) => out.push(pass("net.ipv6.conf.all.forwarding=1")),
        v => out.push(warn(
            format!(
                "net.ipv6.conf.all.forwarding={}: the LAN's IPv6 traffic is not forwarded",
                v.map_or("?".into(), |v| v.to_string())
            ),
            "sysctl -w net.ipv6.conf.all.forwarding=1 if the LAN uses IPv6",
        )),
    }
    out
}

fn interfaces(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let all_vmark = sysctl("net/ipv4/conf/all/src_valid_mark").unwrap_or(0);
    let all_rp = sysctl("net/ipv4/conf/all/rp_filter").unwrap_or(0);
    for name in &cfg.firewall.lan_interfaces {
        if name.ends_with('*') {
            out.push(pass(format!(
                "{name}: wildcard, per-interface checks skipped"
            )));
            continue;
        }
        let Some(if_rp) = sysctl(&format!("net/ipv4/conf/{name}/rp_filter")) else {
            out.push(fail(
                format!("interface {name} does not exist"),
                "fix firewall.lan_interfaces (--lan-interface); see `ip link`",
            ));
            continue;
        };
        let if_vmark = sysctl(&format!("net/ipv4/conf/{name}/src_valid_mark")).unwrap_or(0);
        // The kernel ORs src_valid_mark and takes the larger rp_filter.
        if all_vmark == 1 || if_vmark == 1 {
            out.push(fail(
                format!("src_valid_mark=1 on {name} (all={all_vmark}, {name}={if_vmark}): every forwarded IPv4 TPROXY packet is dropped by the reverse-path check"),
                format!("sysctl -w net.ipv4.conf.all.src_valid_mark=0 net.ipv4.conf.{name}.src_valid_mark=0"),
            ));
        } else {
            out.push(pass(format!("src_valid_mark=0 on {name}")));
        }
        let rp = all_rp.max(if_rp);
        let kind = match rp {
            0 => "off",
            1 => "strict",
            _ => "loose",
        };
        out.push(pass(format!(
            "rp_filter={rp} ({kind}) on {name}: works with tproxyd's rules while src_valid_mark=0"
        )));
    }
    out
}

fn rules(plan: &Plan) -> Finding {
    let port = plan.listen_port;
    let (listing, needle) = match plan.backend {
        Backend::None => return pass("firewall rules: backend none, written by you (not checked)"),
        Backend::Nftables => {
            let text = run_tool("nft", &["list", "table", "inet", nft::TABLE], None).ok();
            let needle = match plan.mode {
                Mode::Tproxy => format!("tproxy to :{port}"),
                Mode::Redirect => format!("redirect to :{port}"),
            };
            (text, needle)
        }
        Backend::Iptables => {
            let table = if plan.mode == Mode::Tproxy {
                "mangle"
            } else {
                "nat"
            };
            let text = run_tool("iptables-save", &["-t", table], None)
                .ok()
                .filter(|t| t.contains(iptables::PRE));
            let needle = match plan.mode {
                Mode::Tproxy => format!("--on-port {port}"),
                Mode::Redirect => format!("--to-ports {port}"),
            };
            (text, needle)
        }
    };
    match listing {
        None => fail(
            format!("firewall rules ({}): not installed", plan.backend),
            "start tproxyd (it installs them), or `tproxyd rules apply` with the same settings",
        ),
        Some(text) if !text.contains(&needle) => fail(
            format!(
                "firewall rules ({}): installed, but not for port {port} as configured",
                plan.backend
            ),
            "restart tproxyd, or `tproxyd rules apply` with the same settings",
        ),
        Some(_) => pass(format!(
            "firewall rules ({}): installed for port {port}",
            plan.backend
        )),
    }
}

async fn routes(plan: &Plan) -> Finding {
    if plan.backend == Backend::None || !plan.needs_policy_routes() {
        return pass("policy routes: not needed");
    }
    match policy_route::present(plan).await {
        Ok((2, 2)) => pass(format!(
            "policy routes: fwmark {:#x} lookup {} and local default dev lo, IPv4 and IPv6",
            plan.route_mark, plan.route_table
        )),
        Ok((r, t)) => fail(
            format!(
                "policy routes: {r} of 2 ip rules and {t} of 2 routes in table {}",
                plan.route_table
            ),
            "start tproxyd, or `tproxyd rules apply` with the same settings",
        ),
        Err(e) => fail(format!("policy routes: {e}"), "run as root"),
    }
}

/// Whether a socket of `proto` ("tcp"/"udp") is bound to `port`, from
/// /proc/net (no traffic is sent to the listener).
fn bound(proto: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    [format!("/proc/net/{proto}"), format!("/proc/net/{proto}6")]
        .iter()
        .any(|file| {
            std::fs::read_to_string(file).is_ok_and(|text| {
                text.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    // local_address is column 1; state 0A is LISTEN for TCP.
                    cols.get(1).is_some_and(|a| a.ends_with(&want))
                        && (proto == "udp" || cols.get(3) == Some(&"0A"))
                })
            })
        })
}

fn listener(cfg: &Config) -> Vec<Finding> {
    let port = cfg.listen.port();
    let mut out = Vec::new();
    for (on, proto) in [(cfg.tcp, "tcp"), (cfg.udp, "udp")] {
        if !on {
            continue;
        }
        if bound(proto, port) {
            out.push(pass(format!("listener: {proto} port {port} is bound")));
        } else {
            out.push(fail(
                format!("listener: nothing on {proto} port {port}"),
                "start tproxyd",
            ));
        }
    }
    out
}

/// Runs every check for `cfg`.
pub async fn diagnose(cfg: &Config) -> Vec<Finding> {
    let plan = Plan::from_config(cfg);
    let mut out = vec![kernel_support(cfg.firewall.backend)];
    out.extend(forwarding(cfg));
    out.extend(interfaces(cfg));
    out.push(rules(&plan));
    out.push(routes(&plan).await);
    out.extend(listener(cfg));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_print_with_their_fix() {
        let f = fail("src_valid_mark=1 on eth1", "sysctl -w x=0");
        assert_eq!(
            f.to_string(),
            "FAIL  src_valid_mark=1 on eth1\n      fix: sysctl -w x=0"
        );
        assert_eq!(pass("ok").to_string(), "PASS  ok");
    }

    #[test]
    fn proc_net_listing_is_read_for_the_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(bound("tcp", port));
        drop(l);
        assert!(!bound("tcp", port));
    }
}
