//! The iptables backend, for systems without nft: chains of tproxyd's own
//! (`TPROXYD_*`) in the mangle table (TPROXY) or the nat table (REDIRECT),
//! entered by jump rules tproxyd inserts in the built-in chains. Loaded with
//! `iptables-restore --noflush` / `ip6tables-restore --noflush`, so each
//! family changes in one transaction and nothing else is flushed.
//!
//! Removal reads `iptables-save`, deletes exactly the jump rules that
//! target tproxyd's chains, then flushes and deletes those chains.
//!
//! Note: the xt TPROXY target drops a packet when no socket takes it, so
//! with this backend captured traffic is also dropped while tproxyd is
//! down and its rules are in place.

use super::{run_tool, FirewallError, Plan, Serves, ToolFailure};
use crate::config::Mode;

/// Entry chain from PREROUTING.
pub const PRE: &str = "TPROXYD_PRE";
/// The capture rules proper (after the interface/source checks).
pub const TAKE: &str = "TPROXYD_TAKE";
/// Entry chain from OUTPUT (router-local traffic).
pub const OUT: &str = "TPROXYD_OUT";
/// Drops packets addressed to the listener port itself (mangle, both
/// modes); see the nft backend's `listener_guard`.
pub const GUARD: &str = "TPROXYD_GUARD";
const CHAINS: [&str; 4] = [PRE, TAKE, OUT, GUARD];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

impl Family {
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

fn table(plan: &Plan) -> &'static str {
    match plan.mode {
        Mode::Tproxy => "mangle",
        Mode::Redirect => "nat",
    }
}

/// `-m multiport --dports 53,6000:7000 ` or nothing for all ports.
fn dports(ports: &[String]) -> String {
    if ports.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = ports.iter().map(|p| p.replace('-', ":")).collect();
        format!("-m multiport --dports {} ", list.join(","))
    }
}

/// iptables writes interface wildcards as `eth+`, nft as `eth*`.
fn iface(name: &str) -> String {
    name.replace('*', "+")
}

/// The rules that return early: own traffic, local and broadcast
/// destinations, and the bypass list.
fn guards(out: &mut Vec<String>, chain: &str, plan: &Plan, fam: Family) {
    out.push(format!(
        "-A {chain} -m mark --mark {:#x} -j RETURN",
        plan.proxy_mark
    ));
    for ty in ["LOCAL", "BROADCAST", "MULTICAST"] {
        if fam == Family::V6 && ty == "BROADCAST" {
            continue;
        }
        out.push(format!("-A {chain} -m addrtype --dst-type {ty} -j RETURN"));
    }
    let bypass = match fam {
        Family::V4 => &plan.bypass_v4,
        Family::V6 => &plan.bypass_v6,
    };
    for cidr in bypass {
        out.push(format!("-A {chain} -d {cidr} -j RETURN"));
    }
}

impl Family {
    /// Whether the listener serves this family, and so whether it is
    /// captured (see [`Serves`]).
    fn served_by(self, serves: Serves) -> bool {
        match self {
            Family::V4 => serves.v4(),
            Family::V6 => serves.v6(),
        }
    }
}

/// The guard chain's rules, for the mangle table.
fn guard(r: &mut Vec<String>, plan: &Plan) {
    let port = plan.listen_port;
    r.push(format!(":{GUARD} - [0:0]"));
    r.push(format!("-A {GUARD} -m conntrack --ctstate DNAT -j RETURN"));
    for (on, proto) in [(plan.tcp, "tcp"), (plan.udp, "udp")] {
        if on {
            r.push(format!(
                "-A {GUARD} -p {proto} --dport {port} -m addrtype --dst-type LOCAL -j DROP"
            ));
        }
    }
    r.push(format!("-I PREROUTING 1 -j {GUARD}"));
}

/// The `iptables-restore --noflush` input installing tproxyd's chains for
/// one family. A family the listener does not serve gets only the guard.
pub fn render(plan: &Plan, fam: Family) -> String {
    let tbl = table(plan);
    let mut r: Vec<String> = vec![format!("*{tbl}")];
    if tbl == "mangle" {
        guard(&mut r, plan);
    }
    if fam.served_by(plan.serves) {
        capture(&mut r, plan, fam);
    }
    r.push("COMMIT".into());
    if tbl != "mangle" {
        r.push("*mangle".into());
        guard(&mut r, plan);
        r.push("COMMIT".into());
    }
    r.join("\n") + "\n"
}

/// The capture chains and their jumps, in the current table.
fn capture(r: &mut Vec<String>, plan: &Plan, fam: Family) {
    let local = plan.proxy_local;
    r.push(format!(":{PRE} - [0:0]"));
    r.push(format!(":{TAKE} - [0:0]"));
    if local {
        r.push(format!(":{OUT} - [0:0]"));
    }

    // Entry: per LAN interface (and lo for rerouted local traffic).
    let mut entries: Vec<String> = plan
        .lan_interfaces
        .iter()
        .map(|i| format!("-i {} ", iface(i)))
        .collect();
    if plan.lan_interfaces.is_empty() {
        entries.push(String::new());
    } else if local {
        entries.push("-i lo ".into());
    }

    guards(r, PRE, plan, fam);
    let sources = match fam {
        Family::V4 => &plan.source_v4,
        Family::V6 => &plan.source_v6,
    };
    if plan.source_v4.is_empty() && plan.source_v6.is_empty() {
        r.push(format!("-A {PRE} -j {TAKE}"));
    } else {
        if local {
            r.push(format!("-A {PRE} -i lo -j {TAKE}"));
        }
        for s in sources {
            r.push(format!("-A {PRE} -s {s} -j {TAKE}"));
        }
    }

    let rm = plan.route_mark;
    let port = plan.listen_port;
    let tcp = plan.tcp.then(|| dports(&plan.tcp_ports));
    let udp = plan.udp.then(|| dports(&plan.udp_ports));
    // A listener on one address must be named: TPROXY otherwise looks on
    // the incoming interface's address.
    let on_ip = match plan.serves {
        Serves::V4(Some(ip)) | Serves::V6(ip) => format!(" --on-ip {ip}"),
        Serves::Both | Serves::V4(None) => String::new(),
    };
    match plan.mode {
        Mode::Tproxy => {
            if let Some(tcp) = &tcp {
                // Packets of flows that already have a transparent socket
                // skip the TPROXY lookup (TCP only, and never a new
                // connection's SYN, which could match a TIME_WAIT socket:
                // see the nft backend).
                r.push(format!(
                    "-A {TAKE} -p tcp ! --syn -m socket --transparent -j MARK --set-mark {rm:#x}"
                ));
                r.push(format!(
                    "-A {TAKE} -p tcp ! --syn -m socket --transparent -j ACCEPT"
                ));
                r.push(format!("-A {TAKE} -p tcp {tcp}-j TPROXY --on-port {port}{on_ip} --tproxy-mark {rm:#x}/0xffffffff"));
            }
            if let Some(udp) = &udp {
                r.push(format!("-A {TAKE} -p udp {udp}-j TPROXY --on-port {port}{on_ip} --tproxy-mark {rm:#x}/0xffffffff"));
            }
        }
        Mode::Redirect => {
            let tcp = tcp.clone().unwrap_or_default();
            r.push(format!(
                "-A {TAKE} -p tcp {tcp}-j REDIRECT --to-ports {port}"
            ));
        }
    }
    if local {
        guards(r, OUT, plan, fam);
        match plan.mode {
            Mode::Tproxy => {
                if let Some(tcp) = &tcp {
                    r.push(format!("-A {OUT} -p tcp {tcp}-j MARK --set-mark {rm:#x}"));
                }
                if let Some(udp) = &udp {
                    r.push(format!("-A {OUT} -p udp {udp}-j MARK --set-mark {rm:#x}"));
                }
            }
            Mode::Redirect => {
                let tcp = tcp.clone().unwrap_or_default();
                r.push(format!(
                    "-A {OUT} -p tcp {tcp}-j REDIRECT --to-ports {port}"
                ));
            }
        }
    }
    // Jumps last: the chains are complete before traffic enters them.
    for e in entries.iter().rev() {
        r.push(format!("-I PREROUTING 1 {e}-j {PRE}"));
    }
    if local {
        r.push(format!("-I OUTPUT 1 -j {OUT}"));
    }
}

fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    run_tool(tool, args, stdin).map_err(|f| match f {
        ToolFailure::Spawn(e) => FirewallError::Tool {
            tool,
            detail: format!("{e}; install the iptables package, or use --firewall nftables"),
        },
        ToolFailure::Failed(stderr) => {
            let hint = if stderr.contains("TPROXY") || stderr.contains("socket") {
                "\n(the kernel may lack xt_TPROXY or xt_socket; run tproxyd doctor)"
            } else {
                ""
            };
            FirewallError::Rejected {
                tool,
                detail: format!("{stderr}{hint}"),
            }
        }
    })
}

/// The words of a rule line as iptables-restore splits them: at spaces
/// and tabs outside double quotes, a quoted word kept whole (iptables-save
/// quotes a comment with spaces and writes `\"` for a quote in it). An
/// unterminated quote runs to the end of the line.
pub(crate) fn restore_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted && matches!(chars.peek(), Some('"' | '\\')) => {
                word.extend(chars.next());
            }
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The removal transaction for one family, from its `iptables-save -t T`
/// output: delete tproxyd's jump rules, flush and delete its chains.
/// None when there is nothing of tproxyd's.
pub fn removal(save: &str, tbl: &str) -> Option<String> {
    let ours = |chain: &str| CHAINS.contains(&chain);
    let present: Vec<&str> = save
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| ours(c))
        .collect();
    let jumps: Vec<String> = save
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING ") || l.starts_with("-A OUTPUT "))
        .filter(|l| {
            // The target is after the last -j outside quotes: a comment
            // may say "-j TPROXYD_PRE", and a rule may have no target.
            let words = restore_words(l);
            words
                .iter()
                .rposition(|w| w == "-j")
                .and_then(|i| words.get(i + 1))
                .is_some_and(|t| ours(t))
        })
        .map(|l| format!("-D{}", &l[2..]))
        .collect();
    if present.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut r = vec![format!("*{tbl}")];
    for c in &present {
        // Declaring an existing chain under --noflush flushes it.
        r.push(format!(":{c} - [0:0]"));
    }
    r.extend(jumps);
    for c in &present {
        r.push(format!("-X {c}"));
    }
    r.push("COMMIT".into());
    Some(r.join("\n") + "\n")
}

fn remove_family(fam: Family) -> Result<bool, FirewallError> {
    let mut removed = false;
    for tbl in ["mangle", "nat"] {
        let save = run(fam.save(), &["-t", tbl], None)?;
        if let Some(tx) = removal(&save, tbl) {
            run(fam.restore(), &["--noflush"], Some(&tx))?;
            removed = true;
        }
    }
    Ok(removed)
}

pub fn remove() -> Result<bool, FirewallError> {
    let v4 = remove_family(Family::V4)?;
    let v6 = remove_family(Family::V6)?;
    Ok(v4 || v6)
}

/// Replaces any earlier tproxyd chains with fresh ones, both families.
pub fn apply(plan: &Plan) -> Result<(), FirewallError> {
    remove()?;
    let result = run(
        Family::V4.restore(),
        &["--noflush"],
        Some(&render(plan, Family::V4)),
    )
    .and_then(|_| {
        run(
            Family::V6.restore(),
            &["--noflush"],
            Some(&render(plan, Family::V6)),
        )
    });
    if result.is_err() {
        let _ = remove();
    }
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::tests::{plan_for, plan_with};

    #[test]
    fn tproxy_chains_for_each_family() {
        let plan = plan_for("lan_interfaces = [\"br-lan\", \"eth*\"]\nproxy_local = true\n");
        let v4 = render(&plan, Family::V4);
        for rule in [
            "*mangle",
            ":TPROXYD_PRE - [0:0]",
            "-A TPROXYD_PRE -m mark --mark 0xff -j RETURN",
            "-A TPROXYD_PRE -d 10.0.0.0/8 -j RETURN",
            "-A TPROXYD_PRE -d 203.0.113.2/32 -j RETURN",
            "-A TPROXYD_TAKE -p tcp ! --syn -m socket --transparent -j ACCEPT",
            "-A TPROXYD_TAKE -p tcp -j TPROXY --on-port 1090 --tproxy-mark 0x1090/0xffffffff",
            "-A TPROXYD_TAKE -p udp -j TPROXY --on-port 1090 --tproxy-mark 0x1090/0xffffffff",
            "-A TPROXYD_OUT -p udp -j MARK --set-mark 0x1090",
            "-I PREROUTING 1 -i br-lan -j TPROXYD_PRE",
            "-I PREROUTING 1 -i eth+ -j TPROXYD_PRE",
            "-I PREROUTING 1 -i lo -j TPROXYD_PRE",
            "-I OUTPUT 1 -j TPROXYD_OUT",
            "COMMIT",
        ] {
            assert!(v4.lines().any(|l| l == rule), "missing {rule:?} in\n{v4}");
        }
        assert!(!v4.contains("fc00::/7"));
        let v6 = render(&plan, Family::V6);
        assert!(v6.contains("-A TPROXYD_PRE -d fc00::/7 -j RETURN"), "{v6}");
        assert!(!v6.contains("BROADCAST"), "{v6}");
    }

    #[test]
    fn redirect_and_udp_53_only() {
        let plan = plan_with(
            "mode = \"redirect\"\n",
            "lan_interfaces = [\"eth1\"]\ntcp_ports = [\"80\", \"8000-8080\"]\n",
        );
        let v4 = render(&plan, Family::V4);
        assert!(v4.starts_with("*nat\n"), "{v4}");
        assert!(v4.contains("-A TPROXYD_TAKE -p tcp -m multiport --dports 80,8000:8080 -j REDIRECT --to-ports 1090"), "{v4}");
        let dns = plan_with(
            "tcp = false\nudp = true\n",
            "lan_interfaces = [\"eth1\"]\nudp_ports = [\"53\"]\n",
        );
        let v4 = render(&dns, Family::V4);
        assert!(
            v4.contains("-A TPROXYD_TAKE -p udp -m multiport --dports 53 -j TPROXY"),
            "{v4}"
        );
        assert!(!v4.contains("-p tcp"), "{v4}");
    }

    #[test]
    fn a_listener_on_one_address_is_named_and_the_other_family_only_guarded() {
        let plan = plan_with(
            "listen = \"127.0.0.1:1090\"\n",
            "lan_interfaces = [\"eth1\"]\n",
        );
        let v4 = render(&plan, Family::V4);
        assert!(v4.contains("-A TPROXYD_TAKE -p tcp -j TPROXY --on-port 1090 --on-ip 127.0.0.1 --tproxy-mark 0x1090/0xffffffff"), "{v4}");
        let v6 = render(&plan, Family::V6);
        assert!(!v6.contains("TPROXY "), "{v6}");
        assert!(!v6.contains(PRE), "{v6}");
        assert!(
            v6.contains(
                "-A TPROXYD_GUARD -p tcp --dport 1090 -m addrtype --dst-type LOCAL -j DROP"
            ),
            "{v6}"
        );
    }

    #[test]
    fn the_guard_lives_in_mangle_in_both_modes() {
        let redirect = plan_with("mode = \"redirect\"\n", "lan_interfaces = [\"eth1\"]\n");
        let v4 = render(&redirect, Family::V4);
        let mangle = v4
            .split("*mangle\n")
            .nth(1)
            .unwrap_or_else(|| panic!("{v4}"));
        for rule in [
            ":TPROXYD_GUARD - [0:0]",
            "-A TPROXYD_GUARD -m conntrack --ctstate DNAT -j RETURN",
            "-A TPROXYD_GUARD -p tcp --dport 1090 -m addrtype --dst-type LOCAL -j DROP",
            "-I PREROUTING 1 -j TPROXYD_GUARD",
            "COMMIT",
        ] {
            assert!(
                mangle.lines().any(|l| l == rule),
                "missing {rule:?} in\n{v4}"
            );
        }
        assert!(v4.starts_with("*nat\n"), "{v4}");
    }

    #[test]
    fn removal_touches_only_tproxyds_rules() {
        let save = "\
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TPROXYD_PRE - [0:0]
:TPROXYD_TAKE - [0:0]
:OTHER_APP - [0:0]
-A PREROUTING -i br-lan -j TPROXYD_PRE
-A PREROUTING -j OTHER_APP
-A PREROUTING -p tcp -m comment --comment \"mentions -j TPROXYD_PRE in text\" -j ACCEPT
-A TPROXYD_PRE -j TPROXYD_TAKE
COMMIT
";
        let tx = removal(save, "mangle").unwrap();
        assert_eq!(
            tx,
            "*mangle\n:TPROXYD_PRE - [0:0]\n:TPROXYD_TAKE - [0:0]\n-D PREROUTING -i br-lan -j TPROXYD_PRE\n-X TPROXYD_PRE\n-X TPROXYD_TAKE\nCOMMIT\n"
        );
        assert_eq!(
            removal("*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", "mangle"),
            None
        );
    }

    /// Found by the tool_output fuzz target: a rule without a target whose
    /// comment names a tproxyd chain was taken for tproxyd's jump, so the
    /// removal deleted another program's rule.
    #[test]
    fn removal_reads_the_target_outside_quoted_comments() {
        let save = "\
*mangle
:TPROXYD_PRE - [0:0]
-A PREROUTING -m comment --comment \"count -j TPROXYD_PRE hits\"
-A PREROUTING -p tcp -m comment --comment \"mentions -j TPROXYD_PRE in te-mark 0xff -j TPROXYD_OUT
-A PREROUTING -m comment --comment \"say \\\" -j TPROXYD_PRE\" -j ACCEPT
-A PREROUTING -m comment --comment \"ours\" -j TPROXYD_PRE
COMMIT
";
        assert_eq!(
            removal(save, "mangle").unwrap(),
            "*mangle\n:TPROXYD_PRE - [0:0]\n-D PREROUTING -m comment --comment \"ours\" -j TPROXYD_PRE\n-X TPROXYD_PRE\nCOMMIT\n"
        );
        assert_eq!(
            restore_words("-m comment --comment \"a \\\"b\\\\\" -j\tX"),
            ["-m", "comment", "--comment", "a \"b\\", "-j", "X"]
        );
    }
}
