//! The iptables backend, for systems without nft: chains of tproxyd's own
//! (`TPROXYD_*`) in the mangle table (TPROXY) or the nat table (REDIRECT),
//! entered by jump rules tproxyd inserts in the built-in chains. Loaded with
//! `iptables-restore --noflush` / `ip6tables-restore --noflush`, so nothing
//! else is flushed.
//!
//! Start and reload replace tproxyd's chains in one restore input per
//! family, so captured traffic never meets a moment without rules: the new
//! chains are built under the next *generation*'s names (`TPROXYD_PRE_3`
//! beside `TPROXYD_PRE_2`), the jumps from the built-in chains move to them
//! and the earlier chains are flushed and deleted, all in one transaction.
//! Should the second family's input be refused, the first family is put
//! back as it was, so a failed apply leaves the earlier rules of both.
//!
//! Removal reads `iptables-save`, deletes exactly the jump rules that
//! target tproxyd's chains (of any generation), then flushes and deletes
//! those chains.
//!
//! Note: the xt TPROXY target drops a packet when no socket takes it, so
//! with this backend captured traffic is also dropped while tproxyd is
//! down and its rules are in place.

use super::{run_tool, FirewallError, Plan, Serves, ToolFailure};
use crate::config::Mode;

/// Entry chain from PREROUTING (generation 0's name; see [`chain_name`]).
pub const PRE: &str = "TPROXYD_PRE";
/// The capture rules proper (after the interface/source checks).
pub const TAKE: &str = "TPROXYD_TAKE";
/// Entry chain from OUTPUT (router-local traffic).
pub const OUT: &str = "TPROXYD_OUT";
/// Drops packets addressed to the listener port itself (mangle, both
/// modes); see the nft backend's `listener_guard`.
pub const GUARD: &str = "TPROXYD_GUARD";
const CHAINS: [&str; 4] = [PRE, TAKE, OUT, GUARD];
/// The tables tproxyd may have chains in, whichever mode it runs in now.
const TABLES: [&str; 2] = ["mangle", "nat"];

/// The name of chain `base` in generation `gen`: the bare base name for
/// generation 0 (the names of tproxyd versions before generations, and of
/// a first start on a clean system), `BASE_N` after.
pub fn chain_name(base: &str, gen: u32) -> String {
    if gen == 0 {
        base.to_string()
    } else {
        format!("{base}_{gen}")
    }
}

/// The base name and generation of `name` when it is one of tproxyd's
/// chains, of any generation.
pub fn own_chain(name: &str) -> Option<(&'static str, u32)> {
    CHAINS.iter().find_map(|&base| {
        let rest = name.strip_prefix(base)?;
        if rest.is_empty() {
            return Some((base, 0));
        }
        // Only the form chain_name writes: no sign, no leading zero.
        let digits = rest.strip_prefix('_')?;
        if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((base, digits.parse().ok()?))
    })
}

/// Whether `iptables-save` output of a table holds tproxyd's entry chain
/// (of any generation), i.e. its capture rules are installed there.
pub fn capture_installed(save: &str) -> bool {
    Ours::parse(save)
        .chains
        .iter()
        .any(|c| own_chain(c).is_some_and(|(base, _)| base == PRE))
}

/// One generation's chain names.
struct Names {
    pre: String,
    take: String,
    out: String,
    guard: String,
}

impl Names {
    fn of(gen: u32) -> Names {
        Names {
            pre: chain_name(PRE, gen),
            take: chain_name(TAKE, gen),
            out: chain_name(OUT, gen),
            guard: chain_name(GUARD, gen),
        }
    }
}

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
fn guard(r: &mut Vec<String>, plan: &Plan, n: &Names) {
    let port = plan.listen_port;
    let g = &n.guard;
    r.push(format!(":{g} - [0:0]"));
    r.push(format!("-A {g} -m conntrack --ctstate DNAT -j RETURN"));
    for (on, proto) in [(plan.tcp, "tcp"), (plan.udp, "udp")] {
        if on {
            r.push(format!(
                "-A {g} -p {proto} --dport {port} -m addrtype --dst-type LOCAL -j DROP"
            ));
        }
    }
    r.push(format!("-I PREROUTING 1 -j {g}"));
}

/// tproxyd's chains for one family in generation `gen`, per table: chain
/// declarations, their rules and the jumps into them (`-I` lines), in
/// that order within each kind.
fn install(plan: &Plan, fam: Family, gen: u32) -> Vec<(&'static str, Vec<String>)> {
    let n = Names::of(gen);
    let tbl = table(plan);
    let mut capture_table = Vec::new();
    let mut mangle = Vec::new();
    guard(&mut mangle, plan, &n);
    if fam.served_by(plan.serves) {
        let into = if tbl == "mangle" {
            &mut mangle
        } else {
            &mut capture_table
        };
        capture(into, plan, fam, &n);
    }
    let mut out = vec![("mangle", mangle)];
    if tbl != "mangle" {
        // The capture table first, as tproxyd has always written it.
        out.insert(0, (tbl, capture_table));
    }
    out
}

/// The `iptables-restore --noflush` input installing tproxyd's chains for
/// one family on a system without any (what `tproxyd rules print` shows).
/// A family the listener does not serve gets only the guard.
pub fn render(plan: &Plan, fam: Family) -> String {
    let mut r = Vec::new();
    for (tbl, lines) in install(plan, fam, 0) {
        r.push(format!("*{tbl}"));
        let (decls, rest): (Vec<String>, Vec<String>) =
            lines.into_iter().partition(|l| l.starts_with(':'));
        // Jumps last: the chains are complete before traffic enters them
        // (within one transaction the order is not seen by traffic, but
        // the printed input reads in that order).
        let (jumps, rules): (Vec<String>, Vec<String>) =
            rest.into_iter().partition(|l| l.starts_with("-I "));
        r.extend(decls);
        r.extend(rules);
        r.extend(jumps);
        r.push("COMMIT".into());
    }
    r.join("\n") + "\n"
}

/// The capture chains and their jumps, in the current table.
fn capture(r: &mut Vec<String>, plan: &Plan, fam: Family, n: &Names) {
    let local = plan.proxy_local;
    let (pre, take, out) = (&n.pre, &n.take, &n.out);
    r.push(format!(":{pre} - [0:0]"));
    r.push(format!(":{take} - [0:0]"));
    if local {
        r.push(format!(":{out} - [0:0]"));
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

    guards(r, pre, plan, fam);
    let sources = match fam {
        Family::V4 => &plan.source_v4,
        Family::V6 => &plan.source_v6,
    };
    if plan.source_v4.is_empty() && plan.source_v6.is_empty() {
        r.push(format!("-A {pre} -j {take}"));
    } else {
        if local {
            r.push(format!("-A {pre} -i lo -j {take}"));
        }
        for s in sources {
            r.push(format!("-A {pre} -s {s} -j {take}"));
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
                    "-A {take} -p tcp ! --syn -m socket --transparent -j MARK --set-mark {rm:#x}"
                ));
                r.push(format!(
                    "-A {take} -p tcp ! --syn -m socket --transparent -j ACCEPT"
                ));
                r.push(format!("-A {take} -p tcp {tcp}-j TPROXY --on-port {port}{on_ip} --tproxy-mark {rm:#x}/0xffffffff"));
            }
            if let Some(udp) = &udp {
                r.push(format!("-A {take} -p udp {udp}-j TPROXY --on-port {port}{on_ip} --tproxy-mark {rm:#x}/0xffffffff"));
            }
        }
        Mode::Redirect => {
            let tcp = tcp.clone().unwrap_or_default();
            r.push(format!(
                "-A {take} -p tcp {tcp}-j REDIRECT --to-ports {port}"
            ));
        }
    }
    if local {
        guards(r, out, plan, fam);
        match plan.mode {
            Mode::Tproxy => {
                if let Some(tcp) = &tcp {
                    r.push(format!("-A {out} -p tcp {tcp}-j MARK --set-mark {rm:#x}"));
                }
                if let Some(udp) = &udp {
                    r.push(format!("-A {out} -p udp {udp}-j MARK --set-mark {rm:#x}"));
                }
            }
            Mode::Redirect => {
                let tcp = tcp.clone().unwrap_or_default();
                r.push(format!(
                    "-A {out} -p tcp {tcp}-j REDIRECT --to-ports {port}"
                ));
            }
        }
    }
    for e in entries.iter().rev() {
        r.push(format!("-I PREROUTING 1 {e}-j {pre}"));
    }
    if local {
        r.push(format!("-I OUTPUT 1 -j {out}"));
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

/// A jump into one of tproxyd's chains from a built-in chain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Jump {
    /// The `-A CHAIN …` line as `iptables-save` wrote it.
    line: String,
    /// Its place in its built-in chain, from 1.
    position: usize,
}

/// tproxyd's part of one table, as `iptables-save -t T` lists it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Ours {
    /// Its chains, of any generation, in the order listed.
    chains: Vec<String>,
    /// The rules in those chains (`-A TPROXYD_… …` lines, as listed).
    rules: Vec<String>,
    /// The jumps into them from PREROUTING and OUTPUT.
    jumps: Vec<Jump>,
}

impl Ours {
    fn parse(save: &str) -> Ours {
        let mut ours = Ours::default();
        let mut positions: Vec<(&str, usize)> = Vec::new();
        for line in save.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(c) = decl.split_whitespace().next() {
                    if own_chain(c).is_some() && !ours.chains.iter().any(|k| k == c) {
                        ours.chains.push(c.to_string());
                    }
                }
                continue;
            }
            let Some(rest) = line.strip_prefix("-A ") else {
                continue;
            };
            // iptables-save separates the chain with one space; a line in
            // any other shape is not one it wrote, and is left alone (so
            // a deletion always names PREROUTING or OUTPUT as written).
            let Some(chain) = rest.split(' ').next() else {
                continue;
            };
            if own_chain(chain).is_some() {
                ours.rules.push(line.to_string());
                continue;
            }
            if chain != "PREROUTING" && chain != "OUTPUT" {
                continue;
            }
            let position = match positions.iter_mut().find(|(c, _)| *c == chain) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    positions.push((chain, 1));
                    1
                }
            };
            // The target is after the last -j outside quotes: a comment
            // may say "-j TPROXYD_PRE", and a rule may have no target.
            let words = restore_words(line);
            let target = words
                .iter()
                .rposition(|w| w == "-j")
                .and_then(|i| words.get(i + 1));
            if target.is_some_and(|t| own_chain(t).is_some()) {
                ours.jumps.push(Jump {
                    line: line.to_string(),
                    position,
                });
            }
        }
        ours
    }

    fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.rules.is_empty() && self.jumps.is_empty()
    }

    /// The highest generation among these chains.
    fn generation(&self) -> Option<u32> {
        self.chains
            .iter()
            .filter_map(|c| own_chain(c).map(|(_, g)| g))
            .max()
    }

    /// These chains as lines for [`swap`]: declarations, rules, then the
    /// jumps inserted where they were. Inserted in rising order of place
    /// into a chain that lacks them, each lands exactly where it was.
    fn as_install(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .chains
            .iter()
            .map(|c| format!(":{c} - [0:0]"))
            .collect();
        lines.extend(self.rules.iter().cloned());
        let mut jumps = self.jumps.clone();
        jumps.sort_by_key(|j| j.position);
        for j in jumps {
            let rest = &j.line["-A ".len()..];
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            lines.push(
                format!("-I {chain} {} {spec}", j.position)
                    .trim_end()
                    .to_string(),
            );
        }
        lines
    }
}

/// One table's part of a restore input that turns tproxyd's chains from
/// `current` into `install` (lines as [`install`] makes them: `:` chain
/// declarations, `-A` rules, `-I` jumps). None when both are empty.
///
/// The order: declare the new chains and flush the current ones
/// (declaring an existing chain under `--noflush` flushes it), fill the
/// new chains, delete the current jumps, insert the new jumps, delete the
/// current chains that are not kept. The kernel takes the table in one
/// commit, so no packet sees any state in between.
fn swap(tbl: &str, current: &Ours, install: &[String]) -> Option<String> {
    if current.is_empty() && install.is_empty() {
        return None;
    }
    let mut r = vec![format!("*{tbl}")];
    let mut declared: Vec<&str> = Vec::new();
    for l in install.iter().filter(|l| l.starts_with(':')) {
        declared.extend(l[1..].split_whitespace().next());
        r.push(l.clone());
    }
    for c in &current.chains {
        if !declared.contains(&c.as_str()) {
            r.push(format!(":{c} - [0:0]"));
        }
    }
    r.extend(install.iter().filter(|l| l.starts_with("-A ")).cloned());
    r.extend(
        current
            .jumps
            .iter()
            .map(|j| format!("-D{}", &j.line["-A".len()..])),
    );
    r.extend(install.iter().filter(|l| l.starts_with("-I ")).cloned());
    for c in &current.chains {
        if !declared.contains(&c.as_str()) {
            r.push(format!("-X {c}"));
        }
    }
    r.push("COMMIT".into());
    Some(r.join("\n") + "\n")
}

/// The removal transaction for one table, from its `iptables-save -t T`
/// output: delete tproxyd's jump rules, flush and delete its chains (of
/// any generation). None when there is nothing of tproxyd's.
pub fn removal(save: &str, tbl: &str) -> Option<String> {
    swap(tbl, &Ours::parse(save), &[])
}

/// One family's tables as `iptables-save -t T` lists them now.
struct Saved {
    tables: Vec<(&'static str, Ours)>,
}

impl Saved {
    fn read(fam: Family) -> Result<Saved, FirewallError> {
        let mut tables = Vec::new();
        for tbl in TABLES {
            let save = run(fam.save(), &["-t", tbl], None)?;
            tables.push((tbl, Ours::parse(&save)));
        }
        Ok(Saved { tables })
    }

    fn ours(&self, tbl: &str) -> Ours {
        self.tables
            .iter()
            .find(|(t, _)| *t == tbl)
            .map(|(_, o)| o.clone())
            .unwrap_or_default()
    }

    /// The next generation: one above any of tproxyd's chains in either
    /// table, so the new names are free.
    fn next_generation(&self) -> u32 {
        self.tables
            .iter()
            .filter_map(|(_, o)| o.generation())
            .max()
            .map_or(0, |g| g.wrapping_add(1))
    }
}

/// The restore input that replaces `now`'s chains with `plan`'s, or None
/// when there is nothing to do. One input for all tables of the family.
fn replacement(plan: &Plan, fam: Family, now: &Saved) -> Option<String> {
    let gen = now.next_generation();
    let new = install(plan, fam, gen);
    let parts: Vec<String> = TABLES
        .iter()
        .filter_map(|&tbl| {
            let lines = new
                .iter()
                .find(|(t, _)| *t == tbl)
                .map(|(_, l)| l.as_slice())
                .unwrap_or(&[]);
            swap(tbl, &now.ours(tbl), lines)
        })
        .collect();
    (!parts.is_empty()).then(|| parts.concat())
}

/// The restore input that puts tproxyd's chains of `fam` back as `before`
/// listed them, from what is there now; None when nothing changed.
fn restoration(now: &Saved, before: &Saved) -> Option<String> {
    let parts: Vec<String> = TABLES
        .iter()
        .filter_map(|&tbl| {
            let (now, before) = (now.ours(tbl), before.ours(tbl));
            if now == before {
                return None;
            }
            swap(tbl, &now, &before.as_install())
        })
        .collect();
    (!parts.is_empty()).then(|| parts.concat())
}

fn restore(fam: Family, input: &str) -> Result<(), FirewallError> {
    run(fam.restore(), &["--noflush"], Some(input)).map(|_| ())
}

/// Puts `fam`'s chains back as `before` listed them.
fn put_back(fam: Family, before: &Saved) -> Result<(), FirewallError> {
    let now = Saved::read(fam)?;
    match restoration(&now, before) {
        Some(input) => restore(fam, &input),
        None => Ok(()),
    }
}

fn remove_family(fam: Family) -> Result<bool, FirewallError> {
    let now = Saved::read(fam)?;
    let parts: Vec<String> = TABLES
        .iter()
        .filter_map(|&tbl| swap(tbl, &now.ours(tbl), &[]))
        .collect();
    if parts.is_empty() {
        return Ok(false);
    }
    restore(fam, &parts.concat())?;
    Ok(true)
}

pub fn remove() -> Result<bool, FirewallError> {
    let v4 = remove_family(Family::V4)?;
    let v6 = remove_family(Family::V6)?;
    Ok(v4 || v6)
}

/// Replaces any earlier tproxyd chains with `plan`'s, one transaction per
/// family. On failure the earlier chains of both families are in place
/// (put back in IPv4 when IPv6 refused its input) and the error says so.
pub fn apply(plan: &Plan) -> Result<(), FirewallError> {
    // Both families are read before either changes: a family that cannot
    // even be listed fails the apply with nothing changed.
    let before = [Saved::read(Family::V4)?, Saved::read(Family::V6)?];
    let families = [Family::V4, Family::V6];
    for (i, fam) in families.into_iter().enumerate() {
        let Some(input) = replacement(plan, fam, &before[i]) else {
            continue;
        };
        let Err(e) = restore(fam, &input) else {
            continue;
        };
        // Put back every family, this one included: an input of two
        // tables is committed table by table by the legacy iptables.
        let mut undo_failed = Vec::new();
        for (j, done) in families.into_iter().enumerate().take(i + 1) {
            if let Err(u) = put_back(done, &before[j]) {
                undo_failed.push(format!("{done}: {u}"));
            }
        }
        return Err(with_outcome(e, fam, &undo_failed));
    }
    Ok(())
}

/// `e` with what became of the earlier rules after `fam` refused.
fn with_outcome(e: FirewallError, fam: Family, undo_failed: &[String]) -> FirewallError {
    let outcome = if undo_failed.is_empty() {
        format!("the {fam} rules were refused; tproxyd's earlier rules of both families are left in place")
    } else {
        format!(
            "the {fam} rules were refused, and putting the earlier rules back failed too ({}); run tproxyd doctor",
            undo_failed.join("; ")
        )
    };
    match e {
        FirewallError::Rejected { tool, detail } => FirewallError::Rejected {
            tool,
            detail: format!("{detail}\n({outcome})"),
        },
        FirewallError::Tool { tool, detail } => FirewallError::Tool {
            tool,
            detail: format!("{detail}\n({outcome})"),
        },
        other => other,
    }
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
    fn chains_of_every_generation_are_recognised() {
        assert_eq!(own_chain("TPROXYD_PRE"), Some((PRE, 0)));
        assert_eq!(own_chain("TPROXYD_GUARD_17"), Some((GUARD, 17)));
        assert_eq!(chain_name(TAKE, 4), "TPROXYD_TAKE_4");
        assert_eq!(own_chain(&chain_name(OUT, u32::MAX)), Some((OUT, u32::MAX)));
        for other in [
            "TPROXYD_PRE_",
            "TPROXYD_PRE_01",
            "TPROXYD_PRE_+1",
            "TPROXYD_PRE_x",
            "TPROXYD_PREX",
            "TPROXYD_DOCTOR",
            "TPROXYD_PRE_99999999999",
            "PREROUTING",
        ] {
            assert_eq!(own_chain(other), None, "{other}");
        }
        // The longest name fits iptables' limit of 28 characters.
        assert!(chain_name(GUARD, u32::MAX).len() <= 28);
    }

    fn saved(mangle: &str) -> Saved {
        Saved {
            tables: vec![("mangle", Ours::parse(mangle)), ("nat", Ours::default())],
        }
    }

    /// Rules of generation 2 behind another program's rule in PREROUTING.
    const GEN_2: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TPROXYD_GUARD_2 - [0:0]
:TPROXYD_PRE_2 - [0:0]
:TPROXYD_TAKE_2 - [0:0]
-A PREROUTING -j OTHER_APP
-A PREROUTING -i br-lan -j TPROXYD_PRE_2
-A PREROUTING -j TPROXYD_GUARD_2
-A TPROXYD_GUARD_2 -m conntrack --ctstate DNAT -j RETURN
-A TPROXYD_PRE_2 -d 10.0.0.0/8 -j RETURN
-A TPROXYD_PRE_2 -j TPROXYD_TAKE_2
-A TPROXYD_TAKE_2 -p tcp -j TPROXY --on-port 1090 --tproxy-mark 0x1090/0xffffffff
COMMIT
";

    fn position(input: &str, line: &str) -> usize {
        input
            .lines()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("missing {line:?} in\n{input}"))
    }

    /// Start and reload swap generations in one input per family: the
    /// next generation's chains built and filled, the jumps moved to them,
    /// the earlier chains flushed and deleted, with no COMMIT in between.
    #[test]
    fn a_reload_swaps_generations_in_one_transaction() {
        let plan = plan_for("lan_interfaces = [\"br-lan\"]\n");
        let input = replacement(&plan, Family::V4, &saved(GEN_2)).unwrap();
        assert_eq!(input.matches("*mangle").count(), 1, "{input}");
        assert_eq!(input.matches("COMMIT").count(), 1, "{input}");
        assert!(!input.contains("*nat"), "nothing to do in nat: {input}");
        let at = |l: &str| position(&input, l);
        // New chains declared, filled, entered; the old ones flushed
        // (declared), left and deleted; all before the one COMMIT.
        let new_decl = at(":TPROXYD_PRE_3 - [0:0]");
        let old_flush = at(":TPROXYD_PRE_2 - [0:0]");
        let filled = at("-A TPROXYD_PRE_3 -j TPROXYD_TAKE_3");
        let tproxy =
            at("-A TPROXYD_TAKE_3 -p tcp -j TPROXY --on-port 1090 --tproxy-mark 0x1090/0xffffffff");
        let old_jump = at("-D PREROUTING -i br-lan -j TPROXYD_PRE_2");
        let new_jump = at("-I PREROUTING 1 -i br-lan -j TPROXYD_PRE_3");
        let old_guard_jump = at("-D PREROUTING -j TPROXYD_GUARD_2");
        let new_guard_jump = at("-I PREROUTING 1 -j TPROXYD_GUARD_3");
        let deleted = at("-X TPROXYD_PRE_2");
        let commit = at("COMMIT");
        assert!(new_decl < filled && filled < new_jump, "{input}");
        assert!(old_flush < old_jump && old_jump < deleted, "{input}");
        assert!(
            tproxy < new_jump && new_jump < deleted && deleted < commit,
            "{input}"
        );
        assert!(old_guard_jump < new_guard_jump, "{input}");
        for c in ["TPROXYD_GUARD_2", "TPROXYD_TAKE_2"] {
            at(&format!("-X {c}"));
        }
        // The other program's rule and chain are never named.
        assert!(!input.contains("OTHER_APP"), "{input}");
        // Nothing of tproxyd's yet: generation 0, the bare names, as
        // `rules print` shows them.
        let fresh = replacement(&plan, Family::V4, &saved("*mangle\nCOMMIT\n")).unwrap();
        assert_eq!(fresh, render(&plan, Family::V4));
    }

    /// Chains an older tproxyd left under the bare names are replaced by
    /// generation 1 in the same transaction.
    #[test]
    fn chains_of_an_older_version_are_replaced_too() {
        let plan = plan_for("lan_interfaces = [\"br-lan\"]\n");
        let old = "*mangle\n:TPROXYD_PRE - [0:0]\n:TPROXYD_TAKE - [0:0]\n-A PREROUTING -i br-lan -j TPROXYD_PRE\n-A TPROXYD_PRE -j TPROXYD_TAKE\nCOMMIT\n";
        let input = replacement(&plan, Family::V4, &saved(old)).unwrap();
        for l in [
            ":TPROXYD_PRE_1 - [0:0]",
            "-D PREROUTING -i br-lan -j TPROXYD_PRE",
            "-I PREROUTING 1 -i br-lan -j TPROXYD_PRE_1",
            "-X TPROXYD_PRE",
            "-X TPROXYD_TAKE",
        ] {
            position(&input, l);
        }
        assert!(capture_installed(old));
        assert!(capture_installed(GEN_2));
        assert!(!capture_installed(
            "*mangle\n:TPROXYD_GUARD_4 - [0:0]\n-A OTHER -j TPROXYD_PRE\nCOMMIT\n"
        ));
    }

    /// Putting a family back recreates the earlier generation verbatim,
    /// its jumps at their earlier places, and deletes the newer one.
    #[test]
    fn putting_back_recreates_the_earlier_chains_where_they_were() {
        let before = saved(GEN_2);
        let now_text = "\
*mangle
:TPROXYD_GUARD_3 - [0:0]
:TPROXYD_PRE_3 - [0:0]
-A PREROUTING -j TPROXYD_GUARD_3
-A PREROUTING -i br-lan -j TPROXYD_PRE_3
-A PREROUTING -j OTHER_APP
-A TPROXYD_PRE_3 -j RETURN
COMMIT
";
        let input = restoration(&saved(now_text), &before).unwrap();
        let at = |l: &str| position(&input, l);
        for l in GEN_2.lines().filter(|l| l.starts_with("-A TPROXYD_")) {
            at(l);
        }
        let del = at("-D PREROUTING -i br-lan -j TPROXYD_PRE_3");
        let ins = at("-I PREROUTING 2 -i br-lan -j TPROXYD_PRE_2");
        let guard = at("-I PREROUTING 3 -j TPROXYD_GUARD_2");
        assert!(del < ins && ins < guard, "{input}");
        at("-X TPROXYD_PRE_3");
        at("-X TPROXYD_GUARD_3");
        assert!(!input.contains("-X TPROXYD_PRE_2"), "{input}");
        // Nothing changed: nothing to put back.
        assert_eq!(restoration(&before, &saved(GEN_2)), None);
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

    /// Found by the tool_output fuzz target: a jump written with a tab
    /// after the chain (never iptables-save's shape) was read as
    /// PREROUTING's and its deletion echoed the odd spacing. Only lines in
    /// iptables-save's own shape are read as tproxyd's.
    #[test]
    fn removal_reads_only_lines_in_iptables_saves_shape() {
        let save = "\
*mangle
:TPROXYD_PRE - [0:0]
-A PREROUTING\t-i br-lan -j TPROXYD_PRE
-A PREROUTING -i br-lan -j TPROXYD_PRE
COMMIT
";
        assert_eq!(
            removal(save, "mangle").unwrap(),
            "*mangle\n:TPROXYD_PRE - [0:0]\n-D PREROUTING -i br-lan -j TPROXYD_PRE\n-X TPROXYD_PRE\nCOMMIT\n"
        );
    }
}
