//! First-match rules over a flow's addresses, ports and sniffed name.
//!
//! Within a rule every key given must match (AND); within a key any
//! listed value may (OR). The domain keys (`domain`, `domain_suffix`,
//! `domain_keyword`, `domain_regex`) are one key: any of their values may
//! match. A rule with a domain key never matches a flow whose name is
//! unknown. A rule set named in `rule_set` adds its prefixes to the rule's
//! `dst` and its names to the rule's domain key; naming a set makes that
//! key present even if the set is empty (such a rule matches nothing,
//! rather than everything).
//!
//! Matching does not walk the rules. At build, each selective key
//! (dst, src, dst_port, domain) gets one index over all rules, mapping a
//! value to the sorted list of rules it satisfies: sorted range tables
//! for addresses and ports (binary search), hashed suffixes for names
//! (one lookup per label), Aho-Corasick for keywords and one RegexSet for
//! regexes (each one pass over the name). A lookup merges those few lists
//! in rule order and stops at the first rule whose every present key was
//! satisfied (network and protocol are checked on that rule directly).
//! Its cost depends on the name's labels, log(prefixes) and the rules
//! met before the winner — not on how many prefixes or names there are.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use aho_corasick::AhoCorasick;
// Byte regexes without Unicode: host names are ASCII (IDNs travel as
// punycode), so `\w`, `\d` and case folding need only their ASCII
// meaning, and the regex crate's Unicode tables (hundreds of KiB in a
// router binary) stay out of the build (Cargo.toml).
use regex::bytes::{RegexBuilder, RegexSet, RegexSetBuilder};

use super::rule_set::cidr::range_of;
use super::rule_set::domains::{normalize, normalize_keyword, normalize_suffix};
use super::rule_set::RuleSet;
use super::{FlowMeta, PolicyError};
use crate::cidr::Cidr;
use crate::config::{Network, RouteConfig, SniffProtocol};

// Selective keys, as bits of a rule's `keys`.
const DST: u8 = 1;
const SRC: u8 = 2;
const PORT: u8 = 4;
const DOMAIN: u8 = 8;

/// Compiled regexes may use this much memory in all (the regex crate's
/// default of 10 MiB is too small for geosite's regex-heavy categories).
const REGEX_SIZE_LIMIT: usize = 64 << 20;

/// What is checked on a candidate rule itself.
#[derive(Debug, Clone, Copy)]
struct RuleInfo {
    /// The selective keys the rule has; each must be satisfied.
    keys: u8,
    network: Option<Network>,
    /// Bit per protocol; 0: any.
    protocols: u8,
}

fn protocol_bit(p: SniffProtocol) -> u8 {
    match p {
        SniffProtocol::Tls => 1,
        SniffProtocol::Http => 2,
        SniffProtocol::Quic => 4,
    }
}

impl RuleInfo {
    fn cheap_keys_match(&self, flow: &FlowMeta<'_>) -> bool {
        self.network.is_none_or(|n| n == flow.network)
            && (self.protocols == 0
                || flow
                    .protocol
                    .is_some_and(|p| self.protocols & protocol_bit(p) != 0))
    }
}

/// A point of a range table's space.
trait Point: Copy + Ord {
    const MIN: Self;
    fn succ(self) -> Option<Self>;
}

impl Point for u16 {
    const MIN: Self = 0;
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Point for u32 {
    const MIN: Self = 0;
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Point for u128 {
    const MIN: Self = 0;
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

/// The space cut into intervals at every range boundary; interval k
/// covers `starts[k]..starts[k+1]` and its rules are list `lists[k]`.
#[derive(Debug)]
struct RangeTable<T> {
    starts: Vec<T>,
    lists: Vec<u32>,
}

impl<T> Default for RangeTable<T> {
    fn default() -> Self {
        RangeTable {
            starts: Vec::new(),
            lists: Vec::new(),
        }
    }
}

impl<T: Point> RangeTable<T> {
    fn lookup(&self, x: T) -> u32 {
        let i = self.starts.partition_point(|s| *s <= x);
        if i == 0 {
            0
        } else {
            self.lists[i - 1]
        }
    }

    /// From `(first, last, rule)` triples, in any order.
    fn build(mut ranges: Vec<(T, T, u32)>, lists: &mut Interner) -> Self {
        // One rule's ranges merged first, so that a rule is in or out of
        // the active set, never in it twice.
        ranges.sort_unstable_by_key(|&(lo, hi, rule)| (rule, lo, hi));
        let mut events: Vec<(T, bool, u32)> = Vec::with_capacity(ranges.len() * 2);
        let mut push_range = |lo: T, hi: T, rule: u32| {
            events.push((lo, true, rule));
            if let Some(end) = hi.succ() {
                events.push((end, false, rule));
            }
        };
        let mut current: Option<(T, T, u32)> = None;
        for (lo, hi, rule) in ranges {
            match &mut current {
                Some((_, chi, crule))
                    if *crule == rule && chi.succ().is_none_or(|next| lo <= next) =>
                {
                    *chi = (*chi).max(hi);
                }
                _ => {
                    if let Some((a, b, r)) = current {
                        push_range(a, b, r);
                    }
                    current = Some((lo, hi, rule));
                }
            }
        }
        if let Some((a, b, r)) = current {
            push_range(a, b, r);
        }
        // Ends before starts at one point, so a start is never undone.
        events.sort_unstable_by_key(|&(at, start, rule)| (at, start, rule));
        let mut table = RangeTable {
            starts: vec![T::MIN],
            lists: vec![0],
        };
        let mut active = BTreeSet::new();
        let mut scratch = Vec::new();
        let mut i = 0;
        while i < events.len() {
            let at = events[i].0;
            while i < events.len() && events[i].0 == at {
                let (_, start, rule) = events[i];
                if start {
                    active.insert(rule);
                } else {
                    active.remove(&rule);
                }
                i += 1;
            }
            scratch.clear();
            scratch.extend(active.iter().copied());
            let id = lists.intern(&scratch);
            if table.starts.last() == Some(&at) {
                // Only at MIN: replace the initial empty interval.
                if let Some(l) = table.lists.last_mut() {
                    *l = id;
                }
            } else if table.lists.last() != Some(&id) {
                table.starts.push(at);
                table.lists.push(id);
            }
        }
        table.starts.shrink_to_fit();
        table.lists.shrink_to_fit();
        table
    }
}

/// Sorted lists of rule indexes, each stored once; id 0 is the empty list.
struct Interner {
    lists: Vec<Box<[u32]>>,
    by_content: HashMap<Box<[u32]>, u32>,
    /// (list, rule) → the list with rule appended: the domain index adds
    /// rules one value at a time, mostly giving the same few lists.
    appended: HashMap<(u32, u32), u32>,
}

impl Interner {
    fn new() -> Self {
        let empty: Box<[u32]> = Box::new([]);
        Interner {
            lists: vec![empty.clone()],
            by_content: HashMap::from([(empty, 0)]),
            appended: HashMap::new(),
        }
    }

    fn intern(&mut self, content: &[u32]) -> u32 {
        if let Some(&id) = self.by_content.get(content) {
            return id;
        }
        let id = self.lists.len() as u32;
        self.lists.push(content.into());
        self.by_content.insert(content.into(), id);
        id
    }

    /// List `id` with `rule` added; rules come in increasing order.
    fn append(&mut self, id: u32, rule: u32) -> u32 {
        let list = &self.lists[id as usize];
        if list.last() == Some(&rule) {
            return id;
        }
        if let Some(&next) = self.appended.get(&(id, rule)) {
            return next;
        }
        let mut content = list.to_vec();
        content.push(rule);
        let next = self.intern(&content);
        self.appended.insert((id, rule), next);
        next
    }
}

/// The domain key's index over all rules.
#[derive(Default)]
struct DomainIndex {
    exact: HashMap<Box<str>, u32>,
    suffix: HashMap<Box<str>, u32>,
    /// Keywords, and the list of each pattern.
    keywords: Option<(AhoCorasick, Vec<u32>)>,
    regexes: Option<(RegexSet, Vec<u32>)>,
}

impl DomainIndex {
    /// Calls `hit` with the list of every value `name` satisfies.
    fn lookup(&self, name: &str, mut hit: impl FnMut(u32)) {
        if let Some(&id) = self.exact.get(name) {
            hit(id);
        }
        if !self.suffix.is_empty() {
            // `x.a.com`, then `a.com`, then `com`: label boundaries only.
            let mut rest = name;
            loop {
                if let Some(&id) = self.suffix.get(rest) {
                    hit(id);
                }
                match rest.find('.') {
                    Some(dot) => rest = &rest[dot + 1..],
                    None => break,
                }
            }
        }
        if let Some((ac, ids)) = &self.keywords {
            let mut found: Vec<usize> = ac
                .find_overlapping_iter(name)
                .map(|m| m.pattern().as_usize())
                .collect();
            found.sort_unstable();
            found.dedup();
            for p in found {
                hit(ids[p]);
            }
        }
        if let Some((set, ids)) = &self.regexes {
            for p in set.matches(name.as_bytes()).iter() {
                hit(ids[p]);
            }
        }
    }
}

/// The domain index being built: each value's list of rules.
#[derive(Default)]
struct DomainBuilder {
    exact: HashMap<Box<str>, u32>,
    suffix: HashMap<Box<str>, u32>,
    keywords: HashMap<Box<str>, u32>,
    /// (pattern, list, where it came from), in first-seen order.
    regexes: Vec<(String, u32, Origin)>,
    regex_at: HashMap<String, usize>,
}

impl DomainBuilder {
    fn add(map: &mut HashMap<Box<str>, u32>, lists: &mut Interner, value: &str, rule: u32) {
        match map.get_mut(value) {
            Some(id) => *id = lists.append(*id, rule),
            // Allocates only for values not seen before.
            None => {
                map.insert(value.into(), lists.append(0, rule));
            }
        }
    }

    fn add_regex(&mut self, lists: &mut Interner, pattern: &str, origin: Origin, rule: u32) {
        match self.regex_at.get(pattern) {
            Some(&at) => self.regexes[at].1 = lists.append(self.regexes[at].1, rule),
            None => {
                self.regex_at
                    .insert(pattern.to_string(), self.regexes.len());
                let id = lists.append(0, rule);
                self.regexes.push((pattern.to_string(), id, origin));
            }
        }
    }
}

/// Where a regex came from, to say so when it does not compile.
#[derive(Clone, Copy)]
enum Origin {
    Rule(usize),
    Set(usize),
}

/// The route's rules, indexed.
#[derive(Default)]
pub struct Rules {
    info: Vec<RuleInfo>,
    /// Rule lists by id (see [`Interner`]).
    lists: Vec<Box<[u32]>>,
    /// Rules with no selective key (only network/protocol, or nothing):
    /// candidates for every flow.
    unselective: Box<[u32]>,
    /// Every selective key some rule has.
    used: u8,
    dst4: RangeTable<u32>,
    dst6: RangeTable<u128>,
    src4: RangeTable<u32>,
    src6: RangeTable<u128>,
    port: RangeTable<u16>,
    domains: DomainIndex,
    sniffing: bool,
}

impl fmt::Debug for Rules {
    // The indexes can hold hundreds of thousands of entries: sizes only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("rules", &self.info.len())
            .field("lists", &self.lists.len())
            .field(
                "dst_intervals",
                &(self.dst4.starts.len() + self.dst6.starts.len()),
            )
            .field(
                "src_intervals",
                &(self.src4.starts.len() + self.src6.starts.len()),
            )
            .field("exact", &self.domains.exact.len())
            .field("suffix", &self.domains.suffix.len())
            .finish()
    }
}

/// `name` is `suffix` or ends with `.suffix` (label boundary).
pub fn suffix_matches(name: &str, suffix: &str) -> bool {
    name == suffix
        || (name.len() > suffix.len()
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.')
}

/// A flow's name as the index stores names: lowercase, no trailing dot.
/// Sniffers already lowercase, so this rarely allocates.
fn flow_name(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// Addresses as the tables hold them. A dual-stack socket reports IPv4
/// peers as `::ffff:a.b.c.d`; they must meet the IPv4 prefixes.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Collects one address key's ranges, by family.
#[derive(Default)]
struct AddrRanges {
    v4: Vec<(u32, u32, u32)>,
    v6: Vec<(u128, u128, u32)>,
}

impl AddrRanges {
    fn add(&mut self, c: &Cidr, rule: u32) {
        let (lo, hi) = range_of(c);
        if c.is_ipv4() {
            self.v4.push((lo as u32, hi as u32, rule));
        } else {
            self.v6.push((lo, hi, rule));
        }
    }
}

impl Rules {
    /// Reads every rule set, then indexes the rules. A rule-set file or a
    /// regex that is wrong is refused here, with where and why.
    pub fn build(route: &RouteConfig) -> Result<Rules, PolicyError> {
        Self::with_sets(route, &load_sets(route)?)
    }

    /// Indexes the rules with rule sets already read; `sets[i]` is the
    /// contents of `route.rule_sets[i]`.
    pub fn with_sets(route: &RouteConfig, sets: &[RuleSet]) -> Result<Rules, PolicyError> {
        let set_index: HashMap<&str, usize> = route
            .rule_sets
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut lists = Interner::new();
        let mut info = Vec::with_capacity(route.rules.len());
        let mut unselective = Vec::new();
        let (mut dst, mut src) = (AddrRanges::default(), AddrRanges::default());
        let mut ports: Vec<(u16, u16, u32)> = Vec::new();
        let mut names = DomainBuilder::default();

        for (index, r) in route.rules.iter().enumerate() {
            let rule = index as u32;
            let bad = |key: &str, message: String| PolicyError::Rule {
                index,
                message: format!("{key}: {message}"),
            };
            let mut keys = 0u8;
            let mut rule_sets = Vec::with_capacity(r.rule_set.len());
            for name in &r.rule_set {
                let Some(&i) = set_index.get(name.as_str()) else {
                    return Err(bad(
                        "rule_set",
                        format!("{name:?} is not the name of a route.rule_sets entry"),
                    ));
                };
                let Some(set) = sets.get(i) else {
                    return Err(bad("rule_set", format!("{name:?} was not read")));
                };
                rule_sets.push((i, set));
            }

            for c in &r.dst {
                dst.add(c, rule);
            }
            for c in &r.src {
                src.add(c, rule);
            }
            for p in &r.dst_port {
                ports.push((p.first, p.last, rule));
            }
            if !r.dst.is_empty() {
                keys |= DST;
            }
            if !r.src.is_empty() {
                keys |= SRC;
            }
            if !r.dst_port.is_empty() {
                keys |= PORT;
            }
            for d in &r.domain {
                let v = normalize(d).map_err(|e| bad("domain", e))?;
                DomainBuilder::add(&mut names.exact, &mut lists, &v, rule);
            }
            for d in &r.domain_suffix {
                let v = normalize_suffix(d).map_err(|e| bad("domain_suffix", e))?;
                DomainBuilder::add(&mut names.suffix, &mut lists, &v, rule);
            }
            for d in &r.domain_keyword {
                let v = normalize_keyword(d).map_err(|e| bad("domain_keyword", e))?;
                DomainBuilder::add(&mut names.keywords, &mut lists, &v, rule);
            }
            for pattern in &r.domain_regex {
                names.add_regex(&mut lists, pattern, Origin::Rule(index), rule);
            }
            if !(r.domain.is_empty()
                && r.domain_suffix.is_empty()
                && r.domain_keyword.is_empty()
                && r.domain_regex.is_empty())
            {
                keys |= DOMAIN;
            }
            for (set_at, set) in rule_sets {
                match set {
                    RuleSet::Prefixes(list) => {
                        keys |= DST;
                        for c in list {
                            dst.add(c, rule);
                        }
                    }
                    RuleSet::Domains(d) => {
                        keys |= DOMAIN;
                        // Already normalized by the parsers.
                        for v in &d.exact {
                            DomainBuilder::add(&mut names.exact, &mut lists, v, rule);
                        }
                        for v in &d.suffix {
                            DomainBuilder::add(&mut names.suffix, &mut lists, v, rule);
                        }
                        for v in &d.keyword {
                            DomainBuilder::add(&mut names.keywords, &mut lists, v, rule);
                        }
                        for pattern in &d.regex {
                            names.add_regex(&mut lists, pattern, Origin::Set(set_at), rule);
                        }
                    }
                }
            }
            if keys == 0 {
                unselective.push(rule);
            }
            info.push(RuleInfo {
                keys,
                network: r.network,
                protocols: r.protocol.iter().fold(0, |m, p| m | protocol_bit(*p)),
            });
        }

        let DomainBuilder {
            mut exact,
            mut suffix,
            keywords,
            regexes,
            ..
        } = names;
        let keywords = if keywords.is_empty() {
            None
        } else {
            let (words, ids): (Vec<Box<str>>, Vec<u32>) = keywords.into_iter().unzip();
            // Overlapping search (every keyword found, not the leftmost
            // only) needs the standard match kind, the default.
            let ac = AhoCorasick::new(words.iter().map(|w| w.as_bytes())).map_err(|e| {
                PolicyError::Rule {
                    index: 0,
                    message: format!("domain_keyword: too many keywords: {e}"),
                }
            })?;
            Some((ac, ids))
        };
        let regexes = compile_regexes(route, &regexes)?;
        let used = info.iter().fold(0, |m, r| m | r.keys);
        let sniffing = info
            .iter()
            .any(|r| r.keys & DOMAIN != 0 || r.protocols != 0);
        exact.shrink_to_fit();
        suffix.shrink_to_fit();
        let mut rules = Rules {
            dst4: RangeTable::build(dst.v4, &mut lists),
            dst6: RangeTable::build(dst.v6, &mut lists),
            src4: RangeTable::build(src.v4, &mut lists),
            src6: RangeTable::build(src.v6, &mut lists),
            port: RangeTable::build(ports, &mut lists),
            info,
            lists: Vec::new(),
            unselective: unselective.into(),
            used,
            domains: DomainIndex {
                exact,
                suffix,
                keywords,
                regexes,
            },
            sniffing,
        };
        rules.lists = lists.lists;
        Ok(rules)
    }

    /// The index of the first rule that matches `flow`.
    pub fn first_match(&self, flow: &FlowMeta<'_>) -> Option<usize> {
        self.first_match_with(flow, true)
    }

    /// The first rule that matches `flow` when its destination address
    /// means nothing (a fake-ip address): rules with a `dst` key (prefixes
    /// or prefix rule sets) never match.
    pub fn first_match_by_name(&self, flow: &FlowMeta<'_>) -> Option<usize> {
        self.first_match_with(flow, false)
    }

    fn first_match_with<'a>(&'a self, flow: &FlowMeta<'_>, by_dst: bool) -> Option<usize> {
        // Sorted lists of rules that some key of the flow satisfies, each
        // with the key it stands for (0: rules without selective keys).
        // The address and port keys give one list each: a flow without a
        // name (most of them) merges from the stack, without allocating.
        let mut fixed: [(&[u32], u8); 4] = [(&[], 0); 4];
        let mut n = 0;
        let mut add = |list: &'a [u32], key: u8| {
            if !list.is_empty() {
                fixed[n] = (list, key);
                n += 1;
            }
        };
        let list = |id: u32| self.lists.get(id as usize).map_or(&[][..], |l| &l[..]);
        let addr = |v4: &RangeTable<u32>, v6: &RangeTable<u128>, ip: IpAddr| match canonical(ip) {
            IpAddr::V4(a) => v4.lookup(u32::from(a)),
            IpAddr::V6(a) => v6.lookup(u128::from(a)),
        };
        add(&self.unselective[..], 0);
        if by_dst && self.used & DST != 0 {
            add(list(addr(&self.dst4, &self.dst6, flow.dst.ip())), DST);
        }
        if self.used & SRC != 0 {
            add(list(addr(&self.src4, &self.src6, flow.src.ip())), SRC);
        }
        if self.used & PORT != 0 {
            add(list(self.port.lookup(flow.dst.port())), PORT);
        }
        match flow.domain {
            Some(name) if self.used & DOMAIN != 0 => {
                // A name may satisfy any number of values (each suffix,
                // keyword, regex): these go to the heap.
                let mut sources: Vec<(&[u32], u8)> = Vec::with_capacity(n + 4);
                sources.extend_from_slice(&fixed[..n]);
                self.domains.lookup(&flow_name(name), |id| {
                    let l = list(id);
                    if !l.is_empty() {
                        sources.push((l, DOMAIN));
                    }
                });
                self.merge(&mut sources, flow)
            }
            _ => self.merge(&mut fixed[..n], flow),
        }
    }

    /// The first rule, in rule order, whose every key is satisfied: the
    /// smallest head of `sources` is the next candidate, and the keys
    /// whose lists hold it are the keys it satisfies.
    fn merge(&self, sources: &mut [(&[u32], u8)], flow: &FlowMeta<'_>) -> Option<usize> {
        loop {
            let next = sources
                .iter()
                .filter_map(|(l, _)| l.first())
                .min()
                .copied()?;
            let mut satisfied = 0u8;
            for (list, key) in sources.iter_mut() {
                if list.first() == Some(&next) {
                    satisfied |= *key;
                    *list = &list[1..];
                }
            }
            let rule = &self.info[next as usize];
            if rule.keys & !satisfied == 0 && rule.cheap_keys_match(flow) {
                return Some(next as usize);
            }
        }
    }

    /// Whether any rule looks at the sniffed name or protocol.
    pub fn wants_sniffing(&self) -> bool {
        self.sniffing
    }

    /// Whether any rule looks at the flow's name (a domain key or a rule
    /// set of names).
    pub fn wants_domains(&self) -> bool {
        self.used & DOMAIN != 0
    }

    pub fn len(&self) -> usize {
        self.info.len()
    }

    pub fn is_empty(&self) -> bool {
        self.info.is_empty()
    }
}

/// Reads every `route.rule_sets` file, in order: what [`Rules::with_sets`]
/// indexes (the route's rules and the DNS rules, from one reading).
pub fn load_sets(route: &RouteConfig) -> Result<Vec<RuleSet>, PolicyError> {
    let mut sets = Vec::with_capacity(route.rule_sets.len());
    for (index, cfg) in route.rule_sets.iter().enumerate() {
        let set = RuleSet::load(cfg).map_err(|message| PolicyError::RuleSet {
            index,
            name: cfg.name.clone(),
            message,
        })?;
        sets.push(set);
    }
    Ok(sets)
}

/// One RegexSet for every regex of every rule. On failure, each regex is
/// compiled alone to name the one at fault and where it came from.
fn compile_regexes(
    route: &RouteConfig,
    regexes: &[(String, u32, Origin)],
) -> Result<Option<(RegexSet, Vec<u32>)>, PolicyError> {
    if regexes.is_empty() {
        return Ok(None);
    }
    let set = RegexSetBuilder::new(regexes.iter().map(|(p, _, _)| p))
        .unicode(false)
        .case_insensitive(true)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build();
    match set {
        Ok(set) => Ok(Some((set, regexes.iter().map(|r| r.1).collect()))),
        Err(all) => {
            let blame = |origin: Origin, message: String| match origin {
                Origin::Rule(index) => PolicyError::Rule { index, message },
                Origin::Set(index) => PolicyError::RuleSet {
                    index,
                    name: route
                        .rule_sets
                        .get(index)
                        .map_or_else(String::new, |s| s.name.clone()),
                    message,
                },
            };
            for (pattern, _, origin) in regexes {
                if let Err(e) = RegexBuilder::new(pattern)
                    .unicode(false)
                    .case_insensitive(true)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                {
                    let what = match origin {
                        Origin::Rule(_) => "domain_regex",
                        Origin::Set(_) => "regex",
                    };
                    // \p{…} and friends: say why, and what to write.
                    let hint = if e.to_string().contains("Unicode") {
                        " (host names are ASCII, so patterns are matched without \
                         Unicode classes: write [a-z0-9] instead of \\p{..}, and \
                         international names in their xn-- form)"
                    } else {
                        ""
                    };
                    return Err(blame(*origin, format!("{what} {pattern:?}: {e}{hint}")));
                }
            }
            Err(blame(
                regexes[0].2,
                format!("the regexes of all rules together do not compile: {all}"),
            ))
        }
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
