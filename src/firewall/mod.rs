//! The firewall room: turns the config into one ruleset plus policy
//! routes, applies them, checks them and removes them.
//!
//! tproxyd owns exactly one nftables table (`inet tproxyd`), one `ip rule`
//! per family (its fwmark → its table) and the routes in its own routing
//! table. It never flushes, reads into or edits anything else, and it
//! removes its own leftovers (from a run that was killed) before applying,
//! so a restart never adds anything twice.

pub mod doctor;
pub mod iptables;
pub mod nft;
pub mod nft_ir;
pub mod nft_netlink;
pub mod policy_route;

use std::net::{IpAddr, SocketAddr};

use crate::cidr::{minimal_cover, Cidr};
use crate::config::{Backend, Config, Mode};

/// What the listener's address lets TPROXY reach, per family.
///
/// TPROXY without an address looks for a listener on the address of the
/// interface the packet came in on, so only a wildcard listener is found
/// that way; a listener on one address must be named in the rule, and it
/// serves only its own family. Capturing a family that no listener serves
/// sends its flows nowhere (nftables: out directly; iptables: dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    /// `[::]`: one dual-stack socket for IPv4 and IPv6.
    Both,
    /// `0.0.0.0` or one IPv4 address (`Some`).
    V4(Option<IpAddr>),
    /// One IPv6 address.
    V6(IpAddr),
}

impl Serves {
    pub fn of(listen: SocketAddr) -> Serves {
        match listen.ip() {
            IpAddr::V6(ip) if ip.is_unspecified() => Serves::Both,
            IpAddr::V4(ip) if ip.is_unspecified() => Serves::V4(None),
            ip @ IpAddr::V4(_) => Serves::V4(Some(ip)),
            ip @ IpAddr::V6(_) => Serves::V6(ip),
        }
    }

    pub fn v4(self) -> bool {
        !matches!(self, Serves::V6(_))
    }

    pub fn v6(self) -> bool {
        !matches!(self, Serves::V4(_))
    }

    /// The family left out, for the start-up warning: "IPv6" or "IPv4".
    pub fn missing_family(self) -> Option<&'static str> {
        match self {
            Serves::Both => None,
            Serves::V4(_) => Some("IPv6"),
            Serves::V6(_) => Some("IPv4"),
        }
    }
}

/// How running a firewall tool went wrong.
#[derive(Debug)]
pub(crate) enum ToolFailure {
    /// It could not be started (not installed, no permission).
    Spawn(std::io::Error),
    /// It ran and exited non-zero; its stderr.
    Failed(String),
}

/// Runs `tool args`, feeding `stdin` if given; returns its stdout.
pub(crate) fn run_tool(
    tool: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, ToolFailure> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ToolFailure::Spawn)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe; its stderr says why.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(ToolFailure::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ToolFailure::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run {tool}: {detail}")]
    Tool { tool: &'static str, detail: String },
    #[error("{tool} refused the rules: {detail}")]
    Rejected { tool: &'static str, detail: String },
    #[error("firewall.bypass_rule_sets: rule set {name:?}: {message}")]
    RuleSet { name: String, message: String },
    #[error("policy routing over netlink failed ({what}): {detail}")]
    Netlink { what: String, detail: String },
}

/// Everything the backends need, with addresses already split by family
/// and rendered as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub backend: Backend,
    pub mode: Mode,
    pub listen_port: u16,
    /// Which families are captured, and the address TPROXY names.
    pub serves: Serves,
    pub tcp: bool,
    pub udp: bool,
    pub proxy_mark: u32,
    pub route_mark: u32,
    pub route_table: u32,
    pub rule_priority: u32,
    pub lan_interfaces: Vec<String>,
    pub source_v4: Vec<String>,
    pub source_v6: Vec<String>,
    pub bypass_v4: Vec<String>,
    pub bypass_v6: Vec<String>,
    pub tcp_ports: Vec<String>,
    pub udp_ports: Vec<String>,
    pub proxy_local: bool,
    pub fail_closed: bool,
    /// Rule sets the kernel skips itself (`firewall.bypass_rule_sets`),
    /// filled by [`Plan::load_bypass_sets`].
    pub bypass_sets: Vec<BypassSet>,
}

/// One rule set's prefixes for the kernel to skip, with the transport and
/// ports of the direct rule that uses it (the kernel rule repeats them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BypassSet {
    pub name: String,
    pub v4: Vec<String>,
    pub v6: Vec<String>,
    pub network: Option<crate::config::Network>,
    pub ports: Vec<String>,
}

impl Plan {
    pub fn from_config(cfg: &Config) -> Plan {
        let fw = &cfg.firewall;
        let mut bypass = fw.bypass.clone();
        // The upstreams' own addresses must never be captured, or
        // tproxyd's connections to them (were a mark ever lost) would loop.
        for server in cfg.outbounds.iter().filter_map(|o| o.kind.server()) {
            bypass.push(Cidr::host(crate::sys::normalize(server).ip()));
        }
        let split = |list: &[Cidr]| -> (Vec<String>, Vec<String>) {
            let cover = minimal_cover(list);
            let text = |v4: bool| {
                cover
                    .iter()
                    .filter(|c| c.is_ipv4() == v4)
                    .map(|c| c.to_string())
                    .collect()
            };
            (text(true), text(false))
        };
        let (bypass_v4, bypass_v6) = split(&bypass);
        let (source_v4, source_v6) = split(&fw.source_cidrs);
        Plan {
            backend: fw.backend,
            mode: cfg.mode,
            listen_port: cfg.listen.port(),
            serves: Serves::of(cfg.listen),
            tcp: cfg.tcp,
            udp: cfg.udp,
            proxy_mark: cfg.mark,
            route_mark: fw.route_mark,
            route_table: fw.route_table,
            rule_priority: fw.rule_priority,
            lan_interfaces: fw.lan_interfaces.clone(),
            source_v4,
            source_v6,
            bypass_v4,
            bypass_v6,
            tcp_ports: fw.tcp_ports.iter().map(|p| p.to_string()).collect(),
            udp_ports: fw.udp_ports.iter().map(|p| p.to_string()).collect(),
            proxy_local: fw.proxy_local,
            fail_closed: fw.fail_closed,
            bypass_sets: Vec::new(),
        }
    }

    /// Reads the rule sets named by `firewall.bypass_rule_sets` (validation
    /// made sure each is an address set used by a leading direct rule).
    pub fn load_bypass_sets(mut self, cfg: &Config) -> Result<Plan, FirewallError> {
        for name in &cfg.firewall.bypass_rule_sets {
            let (Some(set), Some(rule)) = (
                cfg.route.rule_sets.iter().find(|s| &s.name == name),
                cfg.route.rules.iter().find(|r| r.rule_set.contains(name)),
            ) else {
                continue;
            };
            let prefixes = match crate::policy::rule_set::RuleSet::load(set) {
                Ok(crate::policy::rule_set::RuleSet::Prefixes(p)) => p,
                Ok(_) => Vec::new(),
                Err(message) => {
                    return Err(FirewallError::RuleSet {
                        name: name.clone(),
                        message,
                    })
                }
            };
            // Never a fake-ip range (see `carve_fake_ranges`).
            let prefixes = match &cfg.dns.fake_ip {
                Some(fake) => crate::cidr::carve_fake_ranges(&prefixes, &fake.ranges),
                None => prefixes,
            };
            let (v4, v6) = merged_prefixes(&prefixes);
            self.bypass_sets.push(BypassSet {
                name: name.clone(),
                v4,
                v6,
                network: rule.network,
                ports: rule.dst_port.iter().map(|p| p.to_string()).collect(),
            });
        }
        Ok(self)
    }

    /// Policy routes are only needed for TPROXY (and for REDIRECT nothing
    /// is marked).
    pub fn needs_policy_routes(&self) -> bool {
        self.mode == Mode::Tproxy
    }

    /// Whether there is a transparent listener to capture flows into.
    /// Without one (tcp and udp off: tproxyd only answers DNS on
    /// `dns.listen`) capture rules would send traffic into nothing, so
    /// none are installed.
    pub fn captures(&self) -> bool {
        self.tcp || self.udp
    }

    /// What `tproxyd rules print` shows: the exact ruleset and the route
    /// changes, as commands a person can read.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if !self.captures() && self.backend != Backend::None {
            out.push_str(
                "# tcp and udp are off (no transparent listener): tproxyd installs no capture rules \
                 or routes, and removes any an earlier run left\n",
            );
            return out;
        }
        match self.backend {
            Backend::None => out.push_str("# firewall backend none: tproxyd installs no rules\n"),
            Backend::Nftables => {
                out.push_str(
                    "# nft -f - (one atomic transaction; tproxyd sends the same table over netlink, no nft needed)\n",
                );
                out.push_str(&nft::transaction(self));
            }
            Backend::Iptables => {
                // What runs is one input per family that builds these
                // chains under the next free generation's names, moves the
                // jumps to them and deletes the earlier chains.
                out.push_str(
                    "# iptables-restore --noflush (in one transaction with replacing earlier tproxyd chains)\n",
                );
                out.push_str(&iptables::render(self, iptables::Family::V4));
                out.push_str("\n# ip6tables-restore --noflush\n");
                out.push_str(&iptables::render(self, iptables::Family::V6));
            }
        }
        if self.backend != Backend::None && self.needs_policy_routes() {
            out.push_str("\n# policy routing (applied over netlink)\n");
            for fam in ["", "-6 "] {
                out.push_str(&format!(
                    "ip {fam}rule add fwmark {:#x} lookup {} priority {}\n",
                    self.route_mark, self.route_table, self.rule_priority
                ));
                out.push_str(&format!(
                    "ip {fam}route add local default dev lo table {}\n",
                    self.route_table
                ));
            }
        }
        out
    }
}

/// The same addresses as `list` in the fewest prefixes, per family, as
/// text: overlapping and adjacent prefixes merged (nft refuses overlaps in
/// an interval set). Sorting ranges keeps this O(n log n) for the tens of
/// thousands of prefixes a country list holds.
fn merged_prefixes(list: &[Cidr]) -> (Vec<String>, Vec<String>) {
    use crate::policy::rule_set::cidr::{prefixes_of_range, sorted_ranges};
    let mut out = (Vec::new(), Vec::new());
    for v4 in [true, false] {
        let ranges = sorted_ranges(list, v4);
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        let mut prefixes = Vec::new();
        for (lo, hi) in merged {
            prefixes_of_range(lo, hi, v4, &mut prefixes);
        }
        let text = prefixes.iter().map(|c| c.to_string()).collect();
        if v4 {
            out.0 = text;
        } else {
            out.1 = text;
        }
    }
    out
}

/// Installs the rules and routes, replacing any earlier ones (a reload's,
/// or leftovers of an earlier run) in one transaction per family. On
/// failure what was in place before stays in place: the backends keep or
/// put back their earlier rules, and the policy routes are removed only
/// when this call added them.
pub async fn apply(plan: &Plan) -> Result<(), FirewallError> {
    if plan.backend == Backend::None {
        return Ok(());
    }
    // Nothing to capture into: an earlier run's rules (fail_closed, a
    // crash) would only blackhole traffic.
    if !plan.captures() {
        return remove(plan).await;
    }
    remove_other_backend(plan.backend);
    let added_routes = if plan.needs_policy_routes() {
        policy_route::apply(plan).await?
    } else {
        policy_route::remove(plan).await?;
        false
    };
    let rules = match plan.backend {
        Backend::Iptables => iptables::apply(plan),
        _ => nft::apply(plan),
    };
    if let Err(e) = rules {
        if added_routes {
            let _ = policy_route::remove(plan).await;
        }
        return Err(e);
    }
    Ok(())
}

/// Removes tproxyd's own leftovers from the backend *not* in use: a run
/// with the other backend (before the user switched) may have left them.
/// A tool that is not installed has nothing of ours; other failures are
/// logged, since the backend in use is what matters for this run.
fn remove_other_backend(backend: Backend) {
    let result = match backend {
        Backend::Nftables => iptables::remove(),
        Backend::Iptables => nft::remove(),
        Backend::None => return,
    };
    match result {
        Ok(true) => tracing::info!(
            "removed tproxyd rules left by an earlier run with the other firewall backend"
        ),
        Ok(false) | Err(FirewallError::Tool { .. }) => {}
        Err(e) => {
            tracing::warn!("could not check the other firewall backend for tproxyd leftovers: {e}")
        }
    }
}

/// Removes tproxyd's rules and routes; a no-op when there are none.
pub async fn remove(plan: &Plan) -> Result<(), FirewallError> {
    remove_other_backend(plan.backend);
    let rules = match plan.backend {
        Backend::None => return Ok(()),
        Backend::Iptables => iptables::remove(),
        Backend::Nftables => nft::remove(),
    };
    policy_route::remove(plan).await?;
    rules.map(|_| ())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::RawConfig;

    pub fn plan_with(top: &str, fw: &str) -> Plan {
        let text = format!(
            "{top}[outbound]\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n[firewall]\n{fw}"
        );
        let cfg = RawConfig::from_toml(&text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        Plan::from_config(&cfg)
    }

    pub fn plan_for(fw: &str) -> Plan {
        plan_with("", fw)
    }

    /// Without a transparent listener (a DNS forwarder only) no capture
    /// rule or route is printed (and `apply` installs none).
    #[test]
    fn no_listener_no_capture_rules() {
        let plan = plan_with(
            "tcp = false\nudp = false\n[dns]\nlisten = [\"127.0.0.1:5353\"]\n\
             [[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\n",
            "lan_interfaces = [\"br-lan\"]\n",
        );
        assert!(!plan.captures());
        let text = plan.describe();
        assert!(text.contains("installs no capture rules"), "{text}");
        assert!(
            !text.contains("tproxy to") && !text.contains("TPROXY"),
            "{text}"
        );
        assert!(!text.contains("fwmark"), "{text}");
        assert!(plan_for("lan_interfaces = [\"br-lan\"]\n").captures());
    }

    #[test]
    fn socks_server_is_bypassed_and_families_are_split() {
        let plan = plan_for("lan_interfaces = [\"br-lan\"]\nbypass = [\"2001:db8:5::/48\"]\n");
        assert!(plan.bypass_v4.contains(&"203.0.113.2/32".to_string()));
        assert!(plan.bypass_v6.contains(&"2001:db8:5::/48".to_string()));
        assert!(plan.bypass_v4.iter().all(|c| !c.contains(':')));
        assert!(plan.bypass_v6.iter().all(|c| c.contains(':')));
    }

    /// nft refuses overlapping prefixes in one interval set: a user who
    /// bypasses the subnet of the SOCKS5 server (or a subnet of a default
    /// range) must still get a ruleset nft accepts.
    #[test]
    fn overlapping_bypass_prefixes_are_merged() {
        let plan = plan_for(
            "lan_interfaces = [\"br-lan\"]\nbypass = [\"10.1.0.0/16\", \"203.0.113.0/24\", \"10.1.0.0/16\"]\n",
        );
        assert!(plan.bypass_v4.contains(&"203.0.113.0/24".to_string()));
        assert!(
            !plan.bypass_v4.contains(&"203.0.113.2/32".to_string()),
            "{:?}",
            plan.bypass_v4
        );
        assert!(
            !plan.bypass_v4.contains(&"10.1.0.0/16".to_string()),
            "{:?}",
            plan.bypass_v4
        );
        assert!(plan.bypass_v4.contains(&"10.0.0.0/8".to_string()));
    }

    #[test]
    fn bypass_prefixes_are_merged_in_order_without_overlaps() {
        let list: Vec<Cidr> = [
            "10.0.1.0/24",
            "10.0.0.0/24",
            "10.0.0.128/25",
            "2001:db8::/33",
            "2001:db8:8000::/33",
            "192.0.2.7",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let (v4, v6) = merged_prefixes(&list);
        assert_eq!(v4, ["10.0.0.0/23", "192.0.2.7/32"]);
        assert_eq!(v6, ["2001:db8::/32"]);
    }

    #[test]
    fn describe_lists_the_routes_for_both_families() {
        let text = plan_for("proxy_local = true\n").describe();
        assert!(
            text.contains("ip rule add fwmark 0x1090 lookup 1090 priority 1090"),
            "{text}"
        );
        assert!(
            text.contains("ip -6 route add local default dev lo table 1090"),
            "{text}"
        );
    }
}
