//! The nftables backend: one table of tproxyd's own, `inet tproxyd`,
//! written and replaced in one atomic `nft -f -` transaction and removed by
//! deleting that table. Nothing else in the ruleset is read or touched.
//!
//! The text form is used rather than JSON: it is what `tproxyd rules
//! print` shows, what a person can read and diff, and `nft -f` applies a
//! whole file as one transaction just the same.

use super::nft_ir::{
    AddrType, Chain, ChainType, Family, Hook, Item, Proto, Rule, Ruleset, Set, Verdict,
};
use super::{run_tool, FirewallError, Plan, Serves, ToolFailure};
use crate::cidr::{Cidr, PortRange};
use crate::config::{Mode, Network};

pub const TABLE: &str = "tproxyd";

fn bad(what: &str, text: &str) -> FirewallError {
    FirewallError::Rejected {
        tool: "nftables",
        detail: format!("cannot use {what} {text:?} in the ruleset"),
    }
}

fn ports(list: &[String]) -> Result<Vec<(u16, u16)>, FirewallError> {
    list.iter()
        .map(|p| {
            p.parse::<PortRange>()
                .map(|r| (r.first, r.last))
                .map_err(|_| bad("port", p))
        })
        .collect()
}

fn cidrs(list: &[String]) -> Result<Vec<Cidr>, FirewallError> {
    list.iter()
        .map(|c| c.parse::<Cidr>().map_err(|_| bad("prefix", c)))
        .collect()
}

/// `tcp dport { 53, 6000-7000 }`, or nothing when all ports are captured.
fn dport_match(proto: Proto, ports: &[(u16, u16)]) -> Option<Item> {
    (!ports.is_empty()).then(|| Item::Dport {
        proto: Some(proto),
        ports: ports.to_vec(),
        braces: true,
    })
}

/// The match that restricts a rule to the families the listener serves:
/// a family no listener serves is not captured at all.
fn family_match(serves: Serves) -> Option<Item> {
    match serves {
        Serves::Both => None,
        Serves::V4(_) => Some(Item::NfProto(Family::V4)),
        Serves::V6(_) => Some(Item::NfProto(Family::V6)),
    }
}

/// The TPROXY statement, naming the listener's address when it has one
/// (see [`Serves`]).
pub fn tproxy_target(serves: Serves, port: u16) -> String {
    Item::Tproxy(serves, port).to_string()
}

fn rule(items: impl IntoIterator<Item = Option<Item>>) -> Rule {
    Rule(items.into_iter().flatten().collect())
}

/// A chain that drops what reaches the listener port without being
/// captured: a packet addressed to one of the router's own addresses at
/// that port (from the WAN, the LAN or the router itself). tproxyd would
/// only refuse it, and a flood of them would otherwise cost a warning and
/// a wake-up each. Captured packets keep their remote destination, so
/// they never match; REDIRECTed router-local flows come back in through
/// lo already rewritten, and conntrack's `dnat` status lets them pass.
fn listener_guard(plan: &Plan) -> Chain {
    let port = plan.listen_port;
    let mut rules = vec![rule([
        Some(Item::CtStatusDnat),
        Some(Item::Verdict(Verdict::Accept)),
    ])];
    for (on, proto) in [(plan.tcp, Proto::Tcp), (plan.udp, Proto::Udp)] {
        if on {
            rules.push(rule([
                Some(Item::FibDaddrType(vec![AddrType::Local])),
                Some(Item::L4Proto(vec![proto])),
                Some(Item::Dport {
                    proto: Some(proto),
                    ports: vec![(port, port)],
                    braces: false,
                }),
                Some(Item::Counter),
                Some(Item::Verdict(Verdict::Drop)),
            ]));
        }
    }
    Chain {
        name: "listener_guard",
        kind: ChainType::Filter,
        hook: Hook::Prerouting,
        priority: -150,
        priority_text: "mangle",
        rules,
    }
}

fn ret() -> Option<Item> {
    Some(Item::Verdict(Verdict::Return))
}

/// What the rule skipping one bypassed rule set matches: its position,
/// the direct rule's transport and ports, and which families it has.
struct RuleSetMatch {
    index: usize,
    network: Option<Network>,
    ports: Vec<(u16, u16)>,
    v4: bool,
    v6: bool,
}

/// The filters every capturing chain starts with: what must never be
/// captured, then who may be.
fn common_filters(plan: &Plan, prerouting: bool, sets: &[RuleSetMatch]) -> Vec<Rule> {
    let mut out = vec![rule([Some(Item::MetaMark(plan.proxy_mark)), ret()])];
    if prerouting {
        // Router-local traffic marked in output comes back in through lo.
        let mut ifaces = plan.lan_interfaces.clone();
        if plan.proxy_local {
            ifaces.push("lo".into());
        }
        let not_lan = Item::IifnameNotIn {
            names: ifaces,
            braces: true,
        };
        let not_lo = || {
            Some(Item::IifnameNotIn {
                names: vec!["lo".into()],
                braces: false,
            })
        };
        if plan.source_v4.is_empty() && plan.source_v6.is_empty() {
            out.push(rule([Some(not_lan), ret()]));
        } else {
            // Sources given: they are taken on the LAN interfaces (or any
            // interface when none is named), plus lo for local traffic.
            if !plan.lan_interfaces.is_empty() {
                out.push(rule([Some(not_lan), ret()]));
            }
            for (family, set, empty) in [
                (Family::V4, "source_v4", plan.source_v4.is_empty()),
                (Family::V6, "source_v6", plan.source_v6.is_empty()),
            ] {
                if empty {
                    out.push(rule([not_lo(), Some(Item::NfProto(family)), ret()]));
                } else {
                    out.push(rule([
                        not_lo(),
                        Some(Item::InSet {
                            family,
                            source: true,
                            negate: true,
                            set: set.into(),
                        }),
                        ret(),
                    ]));
                }
            }
        }
    }
    out.push(rule([
        Some(Item::FibDaddrType(vec![
            AddrType::Local,
            AddrType::Broadcast,
            AddrType::Multicast,
        ])),
        ret(),
    ]));
    for (family, set) in [(Family::V4, "bypass_v4"), (Family::V6, "bypass_v6")] {
        out.push(rule([
            Some(Item::InSet {
                family,
                source: false,
                negate: false,
                set: set.into(),
            }),
            ret(),
        ]));
    }
    // Rule sets a leading direct rule sends direct: skipped here, so their
    // flows are routed at the kernel's speed and never reach tproxyd. The
    // direct rule's transport and ports are repeated.
    for RuleSetMatch {
        index: i,
        network,
        ports,
        v4: has_v4,
        v6: has_v6,
    } in sets
    {
        let l4: Vec<Item> = match (network, ports.is_empty()) {
            (Some(Network::Tcp), true) => vec![Item::L4Proto(vec![Proto::Tcp])],
            (Some(Network::Udp), true) => vec![Item::L4Proto(vec![Proto::Udp])],
            (Some(Network::Tcp), false) => dport_match(Proto::Tcp, ports).into_iter().collect(),
            (Some(Network::Udp), false) => dport_match(Proto::Udp, ports).into_iter().collect(),
            (None, true) => Vec::new(),
            (None, false) => vec![
                Item::L4Proto(vec![Proto::Tcp, Proto::Udp]),
                Item::Dport {
                    proto: None,
                    ports: ports.clone(),
                    braces: true,
                },
            ],
        };
        for (family, suffix, present) in [(Family::V4, "v4", has_v4), (Family::V6, "v6", has_v6)] {
            if *present {
                let mut items = l4.clone();
                items.push(Item::InSet {
                    family,
                    source: false,
                    negate: false,
                    set: format!("rule_set_{i}_{suffix}"),
                });
                items.push(Item::Verdict(Verdict::Return));
                out.push(Rule(items));
            }
        }
    }
    out
}

/// The whole table: the one description both the text and the netlink
/// batch are made from.
pub fn ruleset(plan: &Plan) -> Result<Ruleset, FirewallError> {
    let mut sets = Vec::new();
    for (name, family, elems) in [
        ("bypass_v4", Family::V4, &plan.bypass_v4),
        ("bypass_v6", Family::V6, &plan.bypass_v6),
        ("source_v4", Family::V4, &plan.source_v4),
        ("source_v6", Family::V6, &plan.source_v6),
    ] {
        if name.starts_with("source") && elems.is_empty() {
            continue;
        }
        sets.push(Set {
            name: name.into(),
            family,
            elems: cidrs(elems)?,
        });
    }
    // One pair of interval sets per bypassed rule set, named by position
    // (rule-set names are the user's text and stay out of the ruleset).
    let mut rule_sets = Vec::new();
    for (i, set) in plan.bypass_sets.iter().enumerate() {
        for (suffix, family, elems) in [("v4", Family::V4, &set.v4), ("v6", Family::V6, &set.v6)] {
            if !elems.is_empty() {
                sets.push(Set {
                    name: format!("rule_set_{i}_{suffix}"),
                    family,
                    elems: cidrs(elems)?,
                });
            }
        }
        rule_sets.push(RuleSetMatch {
            index: i,
            network: set.network,
            ports: ports(&set.ports)?,
            v4: !set.v4.is_empty(),
            v6: !set.v6.is_empty(),
        });
    }
    let port = plan.listen_port;
    let rmark = plan.route_mark;
    let fam = family_match(plan.serves);
    let tcp_ports = ports(&plan.tcp_ports)?;
    let udp_ports = ports(&plan.udp_ports)?;
    let tcp: Option<Vec<Item>> = plan.tcp.then(|| {
        [
            fam.clone(),
            Some(Item::L4Proto(vec![Proto::Tcp])),
            dport_match(Proto::Tcp, &tcp_ports),
        ]
        .into_iter()
        .flatten()
        .collect()
    });
    let udp: Option<Vec<Item>> = plan.udp.then(|| {
        [
            fam.clone(),
            Some(Item::L4Proto(vec![Proto::Udp])),
            dport_match(Proto::Udp, &udp_ports),
        ]
        .into_iter()
        .flatten()
        .collect()
    });
    let with = |head: &Vec<Item>, tail: Vec<Item>| Rule(head.iter().cloned().chain(tail).collect());
    let target = Item::Tproxy(plan.serves, port);
    let mut chains = vec![listener_guard(plan)];

    match plan.mode {
        Mode::Tproxy => {
            let mut rules = common_filters(plan, true, &rule_sets);
            let capture = vec![
                target.clone(),
                Item::MarkSet(rmark),
                Item::Verdict(Verdict::Accept),
            ];
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
                rules.push(rule([
                    fam.clone(),
                    Some(Item::L4Proto(vec![Proto::Tcp])),
                    Some(Item::TcpFlagsNotSyn),
                    Some(Item::SocketTransparent),
                    Some(Item::MarkSet(rmark)),
                    Some(Item::Verdict(Verdict::Accept)),
                ]));
                rules.push(with(tcp, capture.clone()));
            }
            if let Some(udp) = &udp {
                rules.push(with(udp, capture));
            }
            if plan.fail_closed {
                // TPROXY found no socket: tproxyd is down. Drop instead of
                // letting the flow go out directly.
                for head in tcp.iter().chain(udp.iter()) {
                    rules.push(with(head, vec![Item::Verdict(Verdict::Drop)]));
                }
            }
            chains.push(Chain {
                name: "prerouting",
                kind: ChainType::Filter,
                hook: Hook::Prerouting,
                priority: -150,
                priority_text: "mangle",
                rules,
            });
            if plan.proxy_local {
                // type route: changing the mark re-routes the packet, and
                // the policy route sends it via lo into prerouting.
                let mut rules = common_filters(plan, false, &rule_sets);
                for head in tcp.iter().chain(udp.iter()) {
                    rules.push(with(head, vec![Item::MarkSet(rmark)]));
                }
                chains.push(Chain {
                    name: "output",
                    kind: ChainType::Route,
                    hook: Hook::Output,
                    priority: -150,
                    priority_text: "mangle",
                    rules,
                });
            }
        }
        Mode::Redirect => {
            let tcp = tcp.unwrap_or_default();
            let redirect = vec![Item::Redirect(port)];
            let mut rules = common_filters(plan, true, &rule_sets);
            rules.push(with(&tcp, redirect.clone()));
            chains.push(Chain {
                name: "prerouting",
                kind: ChainType::Nat,
                hook: Hook::Prerouting,
                priority: -100,
                priority_text: "dstnat",
                rules,
            });
            if plan.proxy_local {
                let mut rules = common_filters(plan, false, &rule_sets);
                rules.push(with(&tcp, redirect));
                chains.push(Chain {
                    name: "output",
                    kind: ChainType::Nat,
                    hook: Hook::Output,
                    priority: -100,
                    priority_text: "-100",
                    rules,
                });
            }
        }
    }
    Ok(Ruleset {
        table: TABLE,
        sets,
        chains,
    })
}

/// The whole table, as `nft -f` reads it.
pub fn render(plan: &Plan) -> String {
    match ruleset(plan) {
        Ok(r) => r.text(),
        Err(e) => format!(
            "# {e}
"
        ),
    }
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
            detail: format!(
                "{e}; install the nftables package, or unset {NFT_CLI_ENV} to use netlink"
            ),
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
        "\n(the kernel may lack nft_tproxy/nft_socket (kernel >= 4.19, CONFIG_NFT_TPROXY, CONFIG_NFT_SOCKET); run tproxyd doctor, or try --firewall iptables)"
    } else if stderr.contains("Operation not permitted") {
        "\n(needs CAP_NET_ADMIN: run as root)"
    } else {
        ""
    };
    format!("{}{hint}", stderr.trim())
}

/// Set to 1 to apply the ruleset with `nft -f -` (the text `rules print`
/// shows) instead of netlink: a debugging aid, for comparing the two.
pub const NFT_CLI_ENV: &str = "TPROXYD_NFT_CLI";

fn use_cli() -> bool {
    std::env::var_os(NFT_CLI_ENV).is_some_and(|v| v == "1")
}

/// Installs the table over netlink in one transaction that replaces an
/// earlier one (no `nft` binary needed).
pub fn apply(plan: &Plan) -> Result<(), FirewallError> {
    let rs = ruleset(plan)?;
    if use_cli() {
        return nft(&["-f", "-"], Some(&transaction(plan))).map(|_| ());
    }
    super::nft_netlink::apply(&rs)
}

/// Whether tproxyd's table exists.
pub fn present() -> Result<bool, FirewallError> {
    super::nft_netlink::table_exists(TABLE)
}

/// Deletes tproxyd's table if it exists. Touches nothing else.
pub fn remove() -> Result<bool, FirewallError> {
    super::nft_netlink::delete_table(TABLE)
}

/// Whether the kernel takes the expressions tproxyd's rules use, tried
/// with a scratch table in a batch that is never committed.
pub fn probe_kernel() -> Result<(), FirewallError> {
    let probe = Ruleset {
        table: "tproxyd_doctor",
        sets: Vec::new(),
        chains: vec![Chain {
            name: "c",
            kind: ChainType::Filter,
            hook: Hook::Prerouting,
            priority: -150,
            priority_text: "mangle",
            rules: vec![
                rule([
                    Some(Item::L4Proto(vec![Proto::Tcp])),
                    Some(Item::SocketTransparent),
                    Some(Item::Verdict(Verdict::Accept)),
                ]),
                rule([
                    Some(Item::FibDaddrType(vec![AddrType::Local])),
                    Some(Item::L4Proto(vec![Proto::Tcp])),
                    Some(Item::Tproxy(Serves::Both, 1)),
                    Some(Item::Verdict(Verdict::Accept)),
                ]),
            ],
        }],
    };
    super::nft_netlink::probe(&probe)
}

/// The capture statements of the installed table, as nft prints them
/// (see [`super::nft_netlink::capture_listing`]); None when not installed.
pub fn installed_listing() -> Option<String> {
    super::nft_netlink::capture_listing(TABLE).ok().flatten()
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
