//! `tproxyd doctor`: checks what a working setup needs and says, for each
//! thing, PASS, WARN or FAIL with the fix.
//!
//! Findings measured on the test bed and kept as tests: rp_filter 0, 1 and
//! 2 all work with tproxyd's rules while src_valid_mark is 0; with
//! src_valid_mark=1 every forwarded IPv4 TPROXY packet is dropped (the
//! reverse-path check routes with the fwmark, finds tproxyd's
//! `local default` route and drops before INPUT).

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use super::iptables::Family;
use super::{iptables, nft, policy_route, run_tool, FirewallError, Plan, ToolFailure};
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
            // A batch without BATCH_END: the kernel checks every message
            // (loading modules on the way) and then aborts it, so a
            // missing expression module fails here without changing
            // anything. No `nft` binary needed.
            match nft::probe_kernel() {
                Ok(()) => pass("kernel: nftables tproxy, socket and fib expressions"),
                Err(FirewallError::Tool { detail, .. }) => fail(
                    format!("kernel: cannot talk to nf_tables over netlink ({detail})"),
                    "kernel with CONFIG_NF_TABLES and CONFIG_NF_TABLES_INET (modprobe nf_tables), run as root, or use --firewall iptables",
                ),
                Err(e) => fail(
                    format!("kernel: no nftables tproxy/socket/fib support ({e})"),
                    "kernel >= 4.19 with CONFIG_NFT_TPROXY, CONFIG_NFT_SOCKET and CONFIG_NFT_FIB_INET (modprobe nft_tproxy nft_socket nft_fib_inet; OpenWrt: opkg install kmod-nft-tproxy kmod-nft-socket), or use --firewall iptables",
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
            let text = nft::installed_listing();
            let needle = match plan.mode {
                Mode::Tproxy => nft::tproxy_target(plan.serves, port),
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
                .filter(|t| iptables::capture_installed(t));
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
            std::fs::read_to_string(file).is_ok_and(|text| proc_net_binds(&text, proto, &want))
        })
}

/// Whether a /proc/net/{tcp,udp}[6] listing has a socket whose local
/// address ends in `want` (`:PORT` in hex), listening if TCP.
pub(crate) fn proc_net_binds(text: &str, proto: &str, want: &str) -> bool {
    text.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        // local_address is column 1; state 0A is LISTEN for TCP.
        cols.get(1).is_some_and(|a| a.ends_with(want))
            && (proto == "udp" || cols.get(3) == Some(&"0A"))
    })
}

/// Where an installed rule sends captured flows of one family: the
/// address TPROXY names (None: the incoming interface's, so only a
/// wildcard listener is found) and the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) family: Family,
    pub(crate) addr: Option<IpAddr>,
    pub(crate) port: u16,
}

/// The TPROXY/REDIRECT targets in `nft list table inet tproxyd` output.
pub(crate) fn nft_targets(listing: &str) -> Vec<Target> {
    let mut out = Vec::new();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words
            .iter()
            .position(|w| *w == "tproxy" || *w == "redirect")
        else {
            continue;
        };
        // `tproxy ip to A:P`, `tproxy ip6 to [A]:P`, `tproxy to :P`,
        // `redirect to :P`; a `meta nfproto` earlier narrows the family.
        let (fams, to_at) = match words.get(at + 1) {
            Some(&"ip") => (vec![Family::V4], at + 2),
            Some(&"ip6") => (vec![Family::V6], at + 2),
            _ if line.contains("nfproto ipv4") => (vec![Family::V4], at + 1),
            _ if line.contains("nfproto ipv6") => (vec![Family::V6], at + 1),
            _ => (vec![Family::V4, Family::V6], at + 1),
        };
        if words.get(to_at) != Some(&"to") {
            continue;
        }
        let Some((addr, port)) = words.get(to_at + 1).and_then(|t| split_target(t)) else {
            continue;
        };
        for family in fams {
            out.push(Target { family, addr, port });
        }
    }
    out.dedup();
    out
}

/// `:1090`, `127.0.0.1:1090`, `[::1]:1090` into address and port.
pub(crate) fn split_target(text: &str) -> Option<(Option<IpAddr>, u16)> {
    let (addr, port) = text.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    if addr.is_empty() {
        return Some((None, port));
    }
    let ip: IpAddr = addr.parse().ok()?;
    Some(((!ip.is_unspecified()).then_some(ip), port))
}

/// The TPROXY/REDIRECT targets in `iptables-save` output of one family.
pub(crate) fn iptables_targets(listing: &str, family: Family) -> Vec<Target> {
    let mut out = Vec::new();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let value = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .and_then(|i| words.get(i + 1))
        };
        let Some(port) = value("--on-port")
            .or_else(|| value("--to-ports"))
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        let addr = value("--on-ip")
            .and_then(|a| a.parse::<IpAddr>().ok())
            .filter(|a| !a.is_unspecified());
        out.push(Target { family, addr, port });
    }
    out.dedup();
    out
}

/// What the installed rules capture, per family; None when tproxyd's
/// rules are not installed.
fn installed_targets(plan: &Plan) -> Option<Vec<Target>> {
    let tbl = if plan.mode == Mode::Tproxy {
        "mangle"
    } else {
        "nat"
    };
    match plan.backend {
        Backend::None => None,
        Backend::Nftables => nft::installed_listing().map(|t| nft_targets(&t)),
        Backend::Iptables => {
            let mut all = Vec::new();
            let mut present = false;
            for (tool, family) in [
                ("iptables-save", Family::V4),
                ("ip6tables-save", Family::V6),
            ] {
                if let Ok(t) = run_tool(tool, &["-t", tbl], None) {
                    if iptables::capture_installed(&t) {
                        present = true;
                        all.extend(iptables_targets(&t, family));
                    }
                }
            }
            present.then_some(all)
        }
    }
}

/// Sockets listening (TCP) or bound (UDP) on `port`, as `ss` shows their
/// local address: `*` is a dual-stack `[::]` socket, `[::]` an IPv6-only
/// one, which /proc/net cannot tell apart.
fn listening(proto: &str, port: u16) -> Option<Vec<String>> {
    let flag = if proto == "tcp" { "-ltnH" } else { "-lunH" };
    let out = run_tool("ss", &[flag], None).ok()?;
    Some(ss_local_addrs(&out, port))
}

/// The local addresses (port stripped) of the sockets on `port` in `ss -H`
/// output.
pub(crate) fn ss_local_addrs(out: &str, port: u16) -> Vec<String> {
    let suffix = format!(":{port}");
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.strip_suffix(&suffix))
        // A socket bound to a device shows as ADDR%DEV.
        .map(|a| a.split('%').next().unwrap_or(a).to_string())
        .collect()
}

/// Whether TPROXY (or REDIRECT) to `t` finds one of the `sockets` (their
/// local addresses, port stripped, as [`listening`] gives them).
pub(crate) fn reaches(t: &Target, sockets: &[String]) -> bool {
    sockets.iter().any(|s| {
        let s = s.as_str();
        let wildcard = match t.family {
            Family::V4 => s == "*" || s == "0.0.0.0",
            Family::V6 => s == "*" || s == "[::]",
        };
        let exact = t.addr.is_some_and(|a| match a {
            IpAddr::V4(v4) => s == v4.to_string(),
            IpAddr::V6(v6) => s == format!("[{v6}]"),
        });
        wildcard || exact
    })
}

/// What happens to captured traffic that no socket takes.
fn unserved_fate(plan: &Plan) -> &'static str {
    match (plan.backend, plan.mode, plan.fail_closed) {
        (Backend::Iptables, Mode::Tproxy, _) | (_, Mode::Tproxy, true) => "is dropped",
        (_, Mode::Redirect, _) => "is refused",
        _ => "goes out directly, not through the proxy",
    }
}

/// Whether the capture the rules install can reach the listener, family by
/// family: a listener on one family or one address that the rules do not
/// name captures into nothing. Also "rules present, no listener".
fn capture(cfg: &Config, plan: &Plan) -> Vec<Finding> {
    let port = cfg.listen.port();
    let mut out = Vec::new();
    if let Some(missing) = plan.serves.missing_family() {
        if plan.backend != Backend::None {
            out.push(warn(
                format!("listen {}: serves one family only; {missing} flows are not captured and go out directly", cfg.listen),
                format!("listen on [::]:{port} to capture IPv4 and IPv6"),
            ));
        }
    }
    let Some(targets) = installed_targets(plan) else {
        // No rules of ours: only whether something is bound can be said.
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
        return out;
    };
    let fate = unserved_fate(plan);
    for (on, proto) in [(cfg.tcp, "tcp"), (cfg.udp, "udp")] {
        if !on {
            continue;
        }
        let Some(sockets) = listening(proto, port) else {
            out.push(warn(
                format!("listener: cannot run `ss` to see what listens on {proto} port {port}"),
                "install iproute2",
            ));
            continue;
        };
        if sockets.is_empty() && targets.iter().any(|t| t.port == port) {
            out.push(fail(
                format!("rules present, no listener: nothing on {proto} port {port}, so captured {proto} traffic {fate}"),
                "start tproxyd, or remove its rules: tproxyd rules remove (same settings)",
            ));
            continue;
        }
        for family in [Family::V4, Family::V6] {
            let captured: Vec<&Target> = targets.iter().filter(|t| t.family == family).collect();
            if captured.is_empty() {
                continue;
            }
            match captured.iter().find(|t| !reaches(t, &sockets)) {
                None => out.push(pass(format!(
                    "capture reaches the listener: {family} {proto} to port {port} ({})",
                    sockets.join(", ")
                ))),
                Some(t) => out.push(fail(
                    format!(
                        "capture cannot reach the listener: {family} {proto} is sent to {}:{} but the sockets on that port are [{}]; captured {family} {proto} traffic {fate}",
                        t.addr.map_or("(incoming interface's address)".to_string(), |a| a.to_string()),
                        t.port,
                        sockets.join(", ")
                    ),
                    "restart tproxyd so it installs rules for its own listen address, or listen on [::]:PORT",
                )),
            }
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
    out.extend(capture(cfg, &plan));
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
    fn targets_are_read_from_nft_listings() {
        let listing = "\t\tmeta l4proto tcp tproxy to :1090 meta mark set 0x00001090 accept\n\
            \t\tmeta l4proto udp tproxy ip to 127.0.0.1:1091 meta mark set 0x00001090 accept\n\
            \t\tmeta l4proto udp tproxy ip6 to [2001:db8::1]:1092 accept\n\
            \t\tmeta nfproto ipv4 meta l4proto tcp redirect to :1093\n";
        let v4 = Family::V4;
        let v6 = Family::V6;
        let t = |family, addr: Option<&str>, port| Target {
            family,
            addr: addr.map(|a| a.parse().unwrap()),
            port,
        };
        assert_eq!(
            nft_targets(listing),
            vec![
                t(v4, None, 1090),
                t(v6, None, 1090),
                t(v4, Some("127.0.0.1"), 1091),
                t(v6, Some("2001:db8::1"), 1092),
                t(v4, None, 1093),
            ]
        );
        let save = "-A TPROXYD_TAKE -p udp -j TPROXY --on-port 1090 --on-ip 0.0.0.0 --tproxy-mark 0x1090/0xffffffff\n\
            -A TPROXYD_TAKE -p tcp -j TPROXY --on-port 1090 --on-ip 127.0.0.1 --tproxy-mark 0x1090/0xffffffff\n";
        assert_eq!(
            iptables_targets(save, v4),
            vec![t(v4, None, 1090), t(v4, Some("127.0.0.1"), 1090)]
        );
    }

    #[test]
    fn a_target_reaches_wildcards_of_its_family_and_its_own_address() {
        let t = |family, addr: Option<&str>| Target {
            family,
            addr: addr.map(|a| a.parse().unwrap()),
            port: 1090,
        };
        let socks = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // The bug of issue 8: a 127.0.0.1 listener behind `tproxy to :P`.
        assert!(!reaches(&t(Family::V4, None), &socks(&["127.0.0.1"])));
        assert!(reaches(
            &t(Family::V4, Some("127.0.0.1")),
            &socks(&["127.0.0.1"])
        ));
        // A v4 wildcard serves no IPv6; only a dual-stack socket (`*`) does.
        assert!(!reaches(&t(Family::V6, None), &socks(&["0.0.0.0"])));
        assert!(!reaches(&t(Family::V4, None), &socks(&["[::]"])));
        assert!(reaches(&t(Family::V4, None), &socks(&["*"])));
        assert!(reaches(&t(Family::V6, None), &socks(&["*"])));
        assert!(reaches(
            &t(Family::V6, Some("2001:db8::1")),
            &socks(&["[2001:db8::1]"])
        ));
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
