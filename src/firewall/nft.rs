//! The nftables backend: one table of tproxyd's own, `inet tproxyd`,
//! written and replaced in one atomic `nft -f -` transaction and removed by
//! deleting that table. Nothing else in the ruleset is read or touched.
//!
//! The text form is used rather than JSON: it is what `tproxyd rules
//! print` shows, what a person can read and diff, and `nft -f` applies a
//! whole file as one transaction just the same.

use std::fmt::Write as _;

use super::{run_tool, FirewallError, Plan, Serves, ToolFailure};
use crate::config::Mode;

pub const TABLE: &str = "tproxyd";

/// `tcp dport { 53, 6000-7000 } ` or nothing when all ports are captured.
fn dport_match(proto: &str, ports: &[String]) -> String {
    if ports.is_empty() {
        String::new()
    } else {
        format!("{proto} dport {{ {} }} ", ports.join(", "))
    }
}

/// The match that restricts a rule to the families the listener serves:
/// a family no listener serves is not captured at all.
fn family_match(serves: Serves) -> &'static str {
    match serves {
        Serves::Both => "",
        Serves::V4(_) => "meta nfproto ipv4 ",
        Serves::V6(_) => "meta nfproto ipv6 ",
    }
}

/// The TPROXY statement, naming the listener's address when it has one
/// (see [`Serves`]).
pub fn tproxy_target(serves: Serves, port: u16) -> String {
    match serves {
        Serves::Both => format!("tproxy to :{port}"),
        Serves::V4(None) => format!("tproxy ip to :{port}"),
        Serves::V4(Some(ip)) => format!("tproxy ip to {ip}:{port}"),
        Serves::V6(ip) => format!("tproxy ip6 to [{ip}]:{port}"),
    }
}

/// A chain that drops what reaches the listener port without being
/// captured: a packet addressed to one of the router's own addresses at
/// that port (from the WAN, the LAN or the router itself). tproxyd would
/// only refuse it, and a flood of them would otherwise cost a warning and
/// a wake-up each. Captured packets keep their remote destination, so
/// they never match; REDIRECTed router-local flows come back in through
/// lo already rewritten, and conntrack's `dnat` status lets them pass.
fn listener_guard(out: &mut String, plan: &Plan) {
    let port = plan.listen_port;
    let _ = writeln!(
        out,
        "\tchain listener_guard {{\n\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
    let _ = writeln!(out, "\t\tct status dnat accept");
    for (on, proto) in [(plan.tcp, "tcp"), (plan.udp, "udp")] {
        if on {
            let _ = writeln!(
                out,
                "\t\tfib daddr type local meta l4proto {proto} {proto} dport {port} counter drop"
            );
        }
    }
    let _ = writeln!(out, "\t}}");
}

/// The filters every capturing chain starts with: what must never be
/// captured, then who may be.
fn common_filters(out: &mut String, plan: &Plan, prerouting: bool) {
    let _ = writeln!(out, "\t\tmeta mark {:#x} return", plan.proxy_mark);
    if prerouting {
        // Router-local traffic marked in output comes back in through lo.
        let mut ifaces: Vec<String> = plan
            .lan_interfaces
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect();
        if plan.proxy_local {
            ifaces.push("\"lo\"".into());
        }
        if plan.source_v4.is_empty() && plan.source_v6.is_empty() {
            let _ = writeln!(out, "\t\tiifname != {{ {} }} return", ifaces.join(", "));
        } else {
            // Sources given: they are taken on the LAN interfaces (or any
            // interface when none is named), plus lo for local traffic.
            if !plan.lan_interfaces.is_empty() {
                let _ = writeln!(out, "\t\tiifname != {{ {} }} return", ifaces.join(", "));
            }
            for (fam, set, empty) in [
                ("ip", "source_v4", plan.source_v4.is_empty()),
                ("ip6", "source_v6", plan.source_v6.is_empty()),
            ] {
                let nfproto = if fam == "ip" { "ipv4" } else { "ipv6" };
                if empty {
                    let _ = writeln!(out, "\t\tiifname != \"lo\" meta nfproto {nfproto} return");
                } else {
                    let _ = writeln!(out, "\t\tiifname != \"lo\" {fam} saddr != @{set} return");
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "\t\tfib daddr type {{ local, broadcast, multicast }} return"
    );
    let _ = writeln!(out, "\t\tip daddr @bypass_v4 return");
    let _ = writeln!(out, "\t\tip6 daddr @bypass_v6 return");
    // Rule sets a leading direct rule sends direct: skipped here, so their
    // flows are routed at the kernel's speed and never reach tproxyd. The
    // direct rule's transport and ports are repeated.
    for (i, set) in plan.bypass_sets.iter().enumerate() {
        let l4 = match (set.network, set.ports.is_empty()) {
            (Some(crate::config::Network::Tcp), true) => "meta l4proto tcp ".to_string(),
            (Some(crate::config::Network::Udp), true) => "meta l4proto udp ".to_string(),
            (Some(crate::config::Network::Tcp), false) => dport_match("tcp", &set.ports),
            (Some(crate::config::Network::Udp), false) => dport_match("udp", &set.ports),
            (None, true) => String::new(),
            (None, false) => format!(
                "meta l4proto {{ tcp, udp }} th dport {{ {} }} ",
                set.ports.join(", ")
            ),
        };
        for (fam, suffix, elems) in [("ip", "v4", &set.v4), ("ip6", "v6", &set.v6)] {
            if !elems.is_empty() {
                let _ = writeln!(out, "\t\t{l4}{fam} daddr @rule_set_{i}_{suffix} return");
            }
        }
    }
}

/// The whole table, as `nft -f` reads it.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table inet {TABLE} {{");
    for (name, ty, elems) in [
        ("bypass_v4", "ipv4_addr", &plan.bypass_v4),
        ("bypass_v6", "ipv6_addr", &plan.bypass_v6),
        ("source_v4", "ipv4_addr", &plan.source_v4),
        ("source_v6", "ipv6_addr", &plan.source_v6),
    ] {
        if name.starts_with("source") && elems.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\tset {name} {{\n\t\ttype {ty}\n\t\tflags interval");
        if !elems.is_empty() {
            let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
        }
        let _ = writeln!(out, "\t}}");
    }
    // One pair of interval sets per bypassed rule set, named by position
    // (rule-set names are the user's text and stay out of the ruleset).
    for (i, set) in plan.bypass_sets.iter().enumerate() {
        for (suffix, ty, elems) in [("v4", "ipv4_addr", &set.v4), ("v6", "ipv6_addr", &set.v6)] {
            if elems.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "\tset rule_set_{i}_{suffix} {{\n\t\ttype {ty}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}",
                elems.join(", ")
            );
        }
    }
    let port = plan.listen_port;
    let rmark = plan.route_mark;
    let fam = family_match(plan.serves);
    let tcp = plan.tcp.then(|| {
        format!(
            "{fam}meta l4proto tcp {}",
            dport_match("tcp", &plan.tcp_ports)
        )
    });
    let udp = plan.udp.then(|| {
        format!(
            "{fam}meta l4proto udp {}",
            dport_match("udp", &plan.udp_ports)
        )
    });
    let target = tproxy_target(plan.serves, port);
    listener_guard(&mut out, plan);

    match plan.mode {
        Mode::Tproxy => {
            let _ = writeln!(
                out,
                "\tchain prerouting {{\n\t\ttype filter hook prerouting priority mangle; policy accept;"
            );
            common_filters(&mut out, plan, true);
            if let Some(tcp) = &tcp {
                // Packets of flows that already have a transparent socket
                // skip the TPROXY lookup. TCP only: a UDP reply socket
                // bound to the remote would match and swallow datagrams.
                // Not for a new connection's SYN: a TIME_WAIT socket left
                // by an earlier flow with the same addresses and ports
                // matches too, and the SYN would then be delivered to it
                // instead of the listener. The client gets an ACK it did
                // not ask for, resets, and retries later; measured, every
                // such connection took ~10 ms longer. TPROXY handles a
                // SYN on a TIME_WAIT socket itself: it ends it and picks
                // the listener.
                let _ = writeln!(
                    out,
                    "\t\t{fam}meta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 meta mark set {rmark:#x} accept"
                );
                let _ = writeln!(out, "\t\t{tcp}{target} meta mark set {rmark:#x} accept");
            }
            if let Some(udp) = &udp {
                let _ = writeln!(out, "\t\t{udp}{target} meta mark set {rmark:#x} accept");
            }
            if plan.fail_closed {
                // TPROXY found no socket: tproxyd is down. Drop instead of
                // letting the flow go out directly.
                if let Some(tcp) = &tcp {
                    let _ = writeln!(out, "\t\t{tcp}drop");
                }
                if let Some(udp) = &udp {
                    let _ = writeln!(out, "\t\t{udp}drop");
                }
            }
            let _ = writeln!(out, "\t}}");
            if plan.proxy_local {
                // type route: changing the mark re-routes the packet, and
                // the policy route sends it via lo into prerouting.
                let _ = writeln!(
                    out,
                    "\tchain output {{\n\t\ttype route hook output priority mangle; policy accept;"
                );
                common_filters(&mut out, plan, false);
                if let Some(tcp) = &tcp {
                    let _ = writeln!(out, "\t\t{tcp}meta mark set {rmark:#x}");
                }
                if let Some(udp) = &udp {
                    let _ = writeln!(out, "\t\t{udp}meta mark set {rmark:#x}");
                }
                let _ = writeln!(out, "\t}}");
            }
        }
        Mode::Redirect => {
            let tcp = tcp.unwrap_or_default();
            let _ = writeln!(
                out,
                "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;"
            );
            common_filters(&mut out, plan, true);
            let _ = writeln!(out, "\t\t{tcp}redirect to :{port}");
            let _ = writeln!(out, "\t}}");
            if plan.proxy_local {
                let _ = writeln!(
                    out,
                    "\tchain output {{\n\t\ttype nat hook output priority -100; policy accept;"
                );
                common_filters(&mut out, plan, false);
                let _ = writeln!(out, "\t\t{tcp}redirect to :{port}");
                let _ = writeln!(out, "\t}}");
            }
        }
    }
    let _ = writeln!(out, "}}");
    out
}

/// The transaction `apply` feeds to `nft -f -`: create the table if
/// missing, delete it (removing whatever an earlier run left), and write
/// it anew. All or nothing.
pub fn transaction(plan: &Plan) -> String {
    format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\n{}",
        render(plan)
    )
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    run_tool("nft", args, stdin).map_err(|f| match f {
        ToolFailure::Spawn(e) => FirewallError::Tool {
            tool: "nft",
            detail: format!("{e}; install the nftables package, or use --firewall iptables"),
        },
        ToolFailure::Failed(stderr) => FirewallError::Rejected {
            tool: "nft",
            detail: explain_nft_error(&stderr),
        },
    })
}

/// Adds the likely cause to the kernel's terse answers.
fn explain_nft_error(stderr: &str) -> String {
    let hint = if stderr.contains("Could not process rule: No such file or directory")
        || stderr.contains("Operation not supported")
    {
        "\n(the kernel may lack nft_tproxy/nft_socket (kernel >= 4.18, CONFIG_NFT_TPROXY, CONFIG_NFT_SOCKET); run tproxyd doctor, or try --firewall iptables)"
    } else if stderr.contains("Operation not permitted") {
        "\n(needs CAP_NET_ADMIN: run as root)"
    } else {
        ""
    };
    format!("{}{hint}", stderr.trim())
}

pub fn apply(plan: &Plan) -> Result<(), FirewallError> {
    nft(&["-f", "-"], Some(&transaction(plan))).map(|_| ())
}

/// Whether tproxyd's table exists.
pub fn present() -> Result<bool, FirewallError> {
    let tables = nft(&["list", "tables"], None)?;
    Ok(tables
        .lines()
        .any(|l| l.trim() == format!("table inet {TABLE}")))
}

/// Deletes tproxyd's table if it exists. Touches nothing else.
pub fn remove() -> Result<bool, FirewallError> {
    if !present()? {
        return Ok(false);
    }
    nft(&["delete", "table", "inet", TABLE], None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::tests::plan_for;

    #[test]
    fn tproxy_ruleset_has_every_guard_in_order() {
        let plan = plan_for("lan_interfaces = [\"br-lan\"]\nproxy_local = true\n");
        let text = render(&plan);
        let pre = text.split("chain prerouting").nth(1).unwrap();
        let order = [
            "meta mark 0xff return",
            "iifname != { \"br-lan\", \"lo\" } return",
            "fib daddr type { local, broadcast, multicast } return",
            "ip daddr @bypass_v4 return",
            "ip6 daddr @bypass_v6 return",
            "meta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 meta mark set 0x1090 accept",
            "meta l4proto tcp tproxy to :1090 meta mark set 0x1090 accept",
            "meta l4proto udp tproxy to :1090 meta mark set 0x1090 accept",
        ];
        let mut at = 0;
        for rule in order {
            let pos = pre[at..]
                .find(rule)
                .unwrap_or_else(|| panic!("{rule:?} missing or out of order in\n{text}"));
            at += pos + rule.len();
        }
        assert!(!text.contains(
            "socket transparent 1 meta mark set 0x1090 accept\n\t\tmeta l4proto udp socket"
        ));
        assert!(text.contains("type route hook output priority mangle"));
        assert!(
            text.contains("203.0.113.2"),
            "the SOCKS5 server is bypassed:\n{text}"
        );
        assert!(!pre.contains("drop"), "fail open by default:\n{text}");
    }

    #[test]
    fn udp_53_only_and_fail_closed() {
        let plan = plan_for_top(
            "tcp = false\nudp = true\n",
            "lan_interfaces = [\"eth1\"]\nudp_ports = [\"53\"]\nfail_closed = true\n",
        );
        let text = render(&plan);
        assert!(
            text.contains("meta l4proto udp udp dport { 53 } tproxy to :1090"),
            "{text}"
        );
        assert!(
            text.contains("meta l4proto udp udp dport { 53 } drop"),
            "{text}"
        );
        assert!(!text.contains("l4proto tcp"), "{text}");
        assert!(!text.contains("chain output"), "{text}");
    }

    #[test]
    fn redirect_uses_nat_chains() {
        let plan = plan_for_top(
            "mode = \"redirect\"\n",
            "lan_interfaces = [\"eth1\"]\nproxy_local = true\n",
        );
        let text = render(&plan);
        assert!(
            text.contains("type nat hook prerouting priority dstnat"),
            "{text}"
        );
        assert!(
            text.contains("meta l4proto tcp redirect to :1090"),
            "{text}"
        );
        assert!(
            text.contains("type nat hook output priority -100"),
            "{text}"
        );
        assert!(!text.contains("tproxy to"), "{text}");
    }

    #[test]
    fn source_cidrs_restrict_by_family() {
        let plan = plan_for("source_cidrs = [\"192.0.2.0/24\"]\n");
        let text = render(&plan);
        assert!(text.contains("set source_v4"), "{text}");
        assert!(
            text.contains("iifname != \"lo\" ip saddr != @source_v4 return"),
            "{text}"
        );
        assert!(
            text.contains("iifname != \"lo\" meta nfproto ipv6 return"),
            "{text}"
        );
    }

    #[test]
    fn the_transaction_replaces_the_table_atomically() {
        let t = transaction(&plan_for("proxy_local = true\n"));
        assert!(
            t.starts_with("table inet tproxyd\ndelete table inet tproxyd\ntable inet tproxyd {")
        );
    }

    #[test]
    fn a_listener_on_one_family_or_address_is_named_and_only_its_family_captured() {
        let fw = "lan_interfaces = [\"eth1\"]\nproxy_local = true\nfail_closed = true\n";
        let text = render(&plan_for_top("listen = \"127.0.0.1:1090\"\n", fw));
        for rule in [
            "meta nfproto ipv4 meta l4proto tcp tproxy ip to 127.0.0.1:1090 meta mark set 0x1090 accept",
            "meta nfproto ipv4 meta l4proto udp tproxy ip to 127.0.0.1:1090 meta mark set 0x1090 accept",
            "meta nfproto ipv4 meta l4proto tcp drop",
            "meta nfproto ipv4 meta l4proto udp meta mark set 0x1090",
        ] {
            assert!(text.contains(rule), "missing {rule:?} in\n{text}");
        }
        assert!(!text.contains("tproxy to"), "{text}");
        let text = render(&plan_for_top("listen = \"0.0.0.0:1090\"\n", fw));
        assert!(
            text.contains("meta nfproto ipv4 meta l4proto tcp tproxy ip to :1090"),
            "{text}"
        );
        let text = render(&plan_for_top("listen = \"[::1]:1090\"\n", fw));
        assert!(
            text.contains("meta nfproto ipv6 meta l4proto udp tproxy ip6 to [::1]:1090"),
            "{text}"
        );
        assert!(!text.contains("nfproto ipv4"), "{text}");
    }

    #[test]
    fn traffic_addressed_to_the_listener_port_is_dropped_in_both_modes() {
        for top in ["", "mode = \"redirect\"\n"] {
            let text = render(&plan_for_top(top, "lan_interfaces = [\"eth1\"]\n"));
            let guard = text
                .split("chain listener_guard {")
                .nth(1)
                .unwrap_or_else(|| panic!("no guard chain in\n{text}"));
            let guard = &guard[..guard.find('}').unwrap()];
            assert!(guard.contains("type filter hook prerouting priority mangle"));
            assert!(guard.contains("ct status dnat accept"), "{guard}");
            assert!(
                guard.contains("fib daddr type local meta l4proto tcp tcp dport 1090 counter drop"),
                "{guard}"
            );
            assert_eq!(guard.contains("udp dport 1090"), top.is_empty(), "{guard}");
        }
    }

    fn plan_for_top(top: &str, fw: &str) -> Plan {
        crate::firewall::tests::plan_with(top, fw)
    }
}
