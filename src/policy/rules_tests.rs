//! Tests of the rule index: examples, then properties against a linear
//! reference matcher written from the documented semantics.

use super::*;
use crate::cidr::PortRange;
use crate::config::{RawConfig, Rule, RuleSetConfig, RuleSetFormat};
use crate::policy::rule_set::geodat::encode;
use crate::policy::rule_set::testdir::TempDir;
use crate::policy::rule_set::Domains;
use crate::policy::Policy;
use proptest::prelude::*;
use std::path::PathBuf;

fn config(text: &str) -> crate::config::Config {
    RawConfig::from_toml(
        &format!("[[outbounds]]\nname = \"a\"\ntype = \"direct\"\n[[outbounds]]\nname = \"b\"\ntype = \"block\"\n[route]\nfinal = \"a\"\n{text}\n[firewall]\nbackend = \"none\"\n"),
        "t",
    )
    .unwrap()
    .validate(&|_| None)
    .unwrap_or_else(|e| panic!("{e}"))
}

fn rules(text: &str) -> Rules {
    Rules::build(&config(text).route).unwrap_or_else(|e| panic!("{e}"))
}

fn build_err(text: &str) -> String {
    Rules::build(&config(text).route).unwrap_err().to_string()
}

fn flow<'a>(net: Network, dst: &str, domain: Option<&'a str>) -> FlowMeta<'a> {
    FlowMeta {
        network: net,
        src: "192.0.2.2:40000".parse().unwrap(),
        dst: dst.parse().unwrap(),
        domain,
        protocol: None,
    }
}

fn tcp<'a>(dst: &str, domain: Option<&'a str>) -> FlowMeta<'a> {
    flow(Network::Tcp, dst, domain)
}

#[test]
fn suffixes_match_on_label_boundaries_only() {
    assert!(suffix_matches("a.com", "a.com"));
    assert!(suffix_matches("x.a.com", "a.com"));
    assert!(!suffix_matches("ba.com", "a.com"));
    assert!(!suffix_matches("com", "a.com"));
}

#[test]
fn first_match_wins_and_keys_are_anded() {
    let r = rules(
        "[[route.rules]]\nnetwork = \"udp\"\ndst_port = [\"53\", \"1000-2000\"]\noutbound = \"b\"\n\
         [[route.rules]]\ndst = [\"198.51.100.0/24\"]\noutbound = \"a\"\n\
         [[route.rules]]\ndomain_suffix = [\"Ads.Example\"]\noutbound = \"b\"\n",
    );
    assert_eq!(
        r.first_match(&flow(Network::Udp, "198.51.100.1:53", None)),
        Some(0)
    );
    assert_eq!(
        r.first_match(&flow(Network::Udp, "198.51.100.1:1500", None)),
        Some(0)
    );
    assert_eq!(
        r.first_match(&flow(Network::Tcp, "198.51.100.1:53", None)),
        Some(1)
    );
    assert_eq!(r.first_match(&tcp("203.0.113.9:443", None)), None);
    assert_eq!(
        r.first_match(&tcp("203.0.113.9:443", Some("x.ads.example"))),
        Some(2)
    );
    assert_eq!(
        r.first_match(&tcp("203.0.113.9:443", Some("bads.example"))),
        None
    );
    assert!(r.wants_sniffing());
}

#[test]
fn domains_ignore_case_and_a_trailing_dot_and_respect_labels() {
    let r = rules(
        "[[route.rules]]\ndomain_suffix = [\"A.com.\"]\noutbound = \"b\"\n\
         [[route.rules]]\ndomain = [\"www.Example.org\"]\noutbound = \"b\"\n",
    );
    let m = |name| r.first_match(&tcp("203.0.113.9:443", Some(name)));
    assert_eq!(m("a.com"), Some(0));
    assert_eq!(m("X.A.COM."), Some(0));
    assert_eq!(m("deep.x.a.com"), Some(0));
    assert_eq!(m("ba.com"), None);
    assert_eq!(m("a.com.cn"), None);
    assert_eq!(m("com"), None);
    assert_eq!(m("WWW.example.org."), Some(1));
    assert_eq!(m("x.www.example.org"), None);
    assert_eq!(m("example.org"), None);
}

#[test]
fn keywords_and_regexes_match_anywhere_in_the_name() {
    let r = rules(
        "[[route.rules]]\ndomain_keyword = [\"Track\"]\noutbound = \"b\"\n\
         [[route.rules]]\ndomain_regex = [\"^ad[0-9]+\\\\.\", \"\\\\.CN$\"]\noutbound = \"b\"\n\
         [[route.rules]]\ndomain_regex = [\"^ad[0-9]+\\\\.\"]\ndomain_keyword = [\"zzz\"]\noutbound = \"a\"\n",
    );
    let m = |name| r.first_match(&tcp("203.0.113.9:443", Some(name)));
    assert_eq!(m("x.tracking.io"), Some(0));
    assert_eq!(m("ad12.example.com"), Some(1));
    assert_eq!(m("Ad12.Example.com"), Some(1));
    assert_eq!(m("baidu.cn"), Some(1));
    assert_eq!(m("bad12.example.com"), None);
    assert_eq!(m("zzz.io"), Some(2));
    assert_eq!(r.first_match(&tcp("203.0.113.9:443", None)), None);
}

/// Patterns are compiled without Unicode (host names are ASCII): the
/// Perl classes keep their ASCII meaning and case folds ASCII letters.
#[test]
fn perl_classes_in_a_regex_have_their_ascii_meaning() {
    let r = rules(
        "[[route.rules]]\ndomain_regex = [\"^\\\\w+-\\\\d+\\\\.cdn\\\\.\\\\S+$\"]\noutbound = \"b\"\n",
    );
    let m = |name| r.first_match(&tcp("203.0.113.9:443", Some(name)));
    assert_eq!(m("edge_a-42.cdn.example.com"), Some(0));
    assert_eq!(m("EDGE-7.CDN.Example.COM"), Some(0));
    assert_eq!(m("edge-x.cdn.example.com"), None);
    assert_eq!(m("edge-4.cdn."), None);
}

#[test]
fn first_match_orders_across_keys_and_nested_prefixes() {
    let r = rules(
        "[[route.rules]]\ndst = [\"10.1.0.0/16\"]\ndomain_suffix = [\"a.com\"]\noutbound = \"b\"\n\
         [[route.rules]]\ndomain_suffix = [\"a.com\"]\noutbound = \"a\"\n\
         [[route.rules]]\ndst = [\"10.0.0.0/8\"]\noutbound = \"b\"\n\
         [[route.rules]]\ndst = [\"10.1.2.0/24\"]\noutbound = \"a\"\n\
         [[route.rules]]\ndst_port = [\"443\"]\nnetwork = \"udp\"\noutbound = \"b\"\n\
         [[route.rules]]\noutbound = \"a\"\n",
    );
    assert_eq!(r.first_match(&tcp("10.1.2.3:443", Some("a.com"))), Some(0));
    assert_eq!(r.first_match(&tcp("10.2.2.3:443", Some("a.com"))), Some(1));
    assert_eq!(r.first_match(&tcp("10.1.2.3:443", None)), Some(2));
    assert_eq!(r.first_match(&tcp("10.1.2.3:443", Some("b.com"))), Some(2));
    assert_eq!(
        r.first_match(&flow(Network::Udp, "192.0.2.1:443", None)),
        Some(4)
    );
    // The catch-all rule: no key at all.
    assert_eq!(r.first_match(&tcp("192.0.2.1:443", None)), Some(5));
}

#[test]
fn ipv6_prefixes_sources_and_mapped_addresses() {
    let r = rules(
        "[[route.rules]]\ndst = [\"2001:db8::/32\"]\nsrc = [\"fd00::/8\"]\noutbound = \"b\"\n\
         [[route.rules]]\ndst = [\"2001:db8:1::/48\", \"198.51.100.0/24\"]\noutbound = \"a\"\n\
         [[route.rules]]\nsrc = [\"192.0.2.0/24\"]\noutbound = \"a\"\n",
    );
    let f = |src: &str, dst: &str| {
        r.first_match(&FlowMeta::addresses(
            Network::Tcp,
            src.parse().unwrap(),
            dst.parse().unwrap(),
        ))
    };
    assert_eq!(f("[fd00::5]:1", "[2001:db8:1::1]:443"), Some(0));
    assert_eq!(f("[fe80::5]:1", "[2001:db8:1::1]:443"), Some(1));
    assert_eq!(f("[fe80::5]:1", "[2001:db8:2::1]:443"), None);
    // An IPv4 peer seen through a dual-stack socket.
    assert_eq!(f("[fe80::5]:1", "[::ffff:198.51.100.7]:443"), Some(1));
    assert_eq!(f("[::ffff:192.0.2.9]:1", "[2001:db9::1]:443"), Some(2));
    assert_eq!(f("[::ffff:192.0.3.9]:1", "[2001:db9::1]:443"), None);
}

#[test]
fn network_protocol_and_overlapping_port_ranges() {
    let r = rules(
        "[[route.rules]]\nprotocol = [\"tls\"]\ndst_port = [\"400-500\"]\noutbound = \"b\"\n\
         [[route.rules]]\nnetwork = \"tcp\"\ndst_port = [\"443\", \"8000-8080\"]\noutbound = \"a\"\n\
         [[route.rules]]\ndst_port = [\"1-65535\"]\nnetwork = \"udp\"\noutbound = \"b\"\n",
    );
    let mut f = tcp("192.0.2.1:443", None);
    assert_eq!(r.first_match(&f), Some(1));
    f.protocol = Some(SniffProtocol::Tls);
    assert_eq!(r.first_match(&f), Some(0));
    f.protocol = Some(SniffProtocol::Http);
    assert_eq!(r.first_match(&f), Some(1));
    assert_eq!(r.first_match(&tcp("192.0.2.1:8080", None)), Some(1));
    assert_eq!(r.first_match(&tcp("192.0.2.1:8081", None)), None);
    assert_eq!(
        r.first_match(&flow(Network::Udp, "192.0.2.1:1", None)),
        Some(2)
    );
    assert!(r.wants_sniffing());
    // protocol = "quic" with network and port: the rule that blocks
    // HTTP/3 so browsers fall back to TCP.
    let q = rules(
        "[[route.rules]]\nprotocol = [\"quic\"]\nnetwork = \"udp\"\ndst_port = [\"443\"]\noutbound = \"a\"\n",
    );
    let mut f = flow(Network::Udp, "192.0.2.1:443", None);
    assert_eq!(q.first_match(&f), None);
    f.protocol = Some(SniffProtocol::Quic);
    assert_eq!(q.first_match(&f), Some(0));
    f.protocol = Some(SniffProtocol::Tls);
    assert_eq!(q.first_match(&f), None);
    assert!(q.wants_sniffing());
    let plain = rules("[[route.rules]]\ndst = [\"10.0.0.0/8\"]\noutbound = \"b\"\n");
    assert!(!plain.wants_sniffing());
}

/// A temp dir with one file of each format.
fn rule_set_files() -> (TempDir, String) {
    let d = TempDir::new();
    let cidr = d.write("chnroute.txt", b"# cn\n1.0.1.0/24\n240e::/20\n");
    let list = d.write(
        "chnlist.conf",
        b"server=/baidu.com/114.114.114.114\nqq.com\nfull:www.163.com\n",
    );
    let geoip = d.write(
        "geoip.dat",
        &encode::geoip(&[
            ("US", vec![(vec![8, 8, 8, 0], 24)], false),
            ("PRIVATE", vec![(vec![10, 0, 0, 0], 8)], true),
        ]),
    );
    let geosite = d.write(
        "geosite.dat",
        &encode::geosite(&[(
            "CATEGORY-ADS",
            vec![
                (0, "doubleclick"),
                (1, "^ad\\d+\\."),
                (2, "ads.com"),
                (3, "x.io"),
            ],
        )]),
    );
    let sets = format!(
        "[[route.rule_sets]]\nname = \"cn-ip\"\nformat = \"cidr\"\npath = {:?}\n\
         [[route.rule_sets]]\nname = \"cn-site\"\nformat = \"domains\"\npath = {:?}\n\
         [[route.rule_sets]]\nname = \"us\"\nformat = \"geoip\"\npath = {:?}\ncategory = \"us\"\n\
         [[route.rule_sets]]\nname = \"public\"\nformat = \"geoip\"\npath = {:?}\ncategory = \"private\"\n\
         [[route.rule_sets]]\nname = \"ads\"\nformat = \"geosite\"\npath = {:?}\ncategory = \"category-ads\"\n",
        cidr, list, geoip, geoip, geosite
    );
    (d, sets)
}

#[test]
fn rule_sets_join_the_rules_own_values() {
    let (_d, sets) = rule_set_files();
    let r = rules(&format!(
        "{sets}\
         [[route.rules]]\nrule_set = [\"ads\"]\ndomain = [\"own.example\"]\noutbound = \"b\"\n\
         [[route.rules]]\nrule_set = [\"cn-ip\", \"us\"]\ndst = [\"192.0.2.0/24\"]\noutbound = \"a\"\n\
         [[route.rules]]\nrule_set = [\"cn-site\"]\noutbound = \"a\"\n\
         [[route.rules]]\nrule_set = [\"public\"]\nnetwork = \"udp\"\noutbound = \"b\"\n"
    ));
    let m = |dst: &str, name| r.first_match(&tcp(dst, name));
    let far = "203.0.113.1:443";
    assert_eq!(m(far, Some("doubleclick.net")), Some(0));
    assert_eq!(m(far, Some("ad7.example")), Some(0));
    assert_eq!(m(far, Some("x.ads.com")), Some(0));
    assert_eq!(m(far, Some("x.io")), Some(0));
    assert_eq!(m(far, Some("y.x.io")), None);
    assert_eq!(m(far, Some("own.example")), Some(0));
    assert_eq!(m("1.0.1.9:443", None), Some(1));
    assert_eq!(m("[240e:1::1]:443", None), Some(1));
    assert_eq!(m("8.8.8.8:53", None), Some(1));
    assert_eq!(m("192.0.2.1:53", None), Some(1));
    assert_eq!(m(far, Some("www.baidu.com")), Some(2));
    assert_eq!(m(far, Some("qq.com")), Some(2));
    assert_eq!(m(far, Some("www.163.com")), Some(2));
    assert_eq!(m(far, Some("a.www.163.com")), None);
    let udp = |dst: &str| r.first_match(&flow(Network::Udp, dst, None));
    assert_eq!(udp("203.0.113.1:53"), Some(3));
    assert_eq!(udp("10.1.1.1:53"), None);
    assert!(r.wants_sniffing());
}

#[test]
fn an_empty_rule_set_matches_nothing_and_set_kinds_are_anded() {
    let d = TempDir::new();
    let empty = d.write("empty.txt", b"# nothing yet\n");
    let ips = d.write("ips.txt", b"10.0.0.0/8\n");
    let names = d.write("names.txt", b"a.com\n");
    let r = rules(&format!(
        "[[route.rule_sets]]\nname = \"none\"\nformat = \"cidr\"\npath = {empty:?}\n\
         [[route.rule_sets]]\nname = \"ips\"\nformat = \"cidr\"\npath = {ips:?}\n\
         [[route.rule_sets]]\nname = \"names\"\nformat = \"domains\"\npath = {names:?}\n\
         [[route.rules]]\nrule_set = [\"none\"]\noutbound = \"b\"\n\
         [[route.rules]]\nrule_set = [\"ips\", \"names\"]\noutbound = \"b\"\n"
    ));
    assert_eq!(r.first_match(&tcp("192.0.2.1:1", Some("a.com"))), None);
    assert_eq!(r.first_match(&tcp("10.0.0.1:1", None)), None);
    assert_eq!(r.first_match(&tcp("10.0.0.1:1", Some("a.com"))), Some(1));
}

#[test]
fn bad_files_and_regexes_are_refused_with_where_and_why() {
    let d = TempDir::new();
    let bad = d.write("bad.txt", b"1.0.1.0/24\n1.0.2.0/24 extra\n");
    let e = build_err(&format!(
        "[[route.rule_sets]]\nname = \"cn\"\nformat = \"cidr\"\npath = {bad:?}\n"
    ));
    assert!(
        e.starts_with("route.rule_sets[0] (cn): ") && e.contains("bad.txt:2: "),
        "{e}"
    );
    let geo = d.write(
        "geoip.dat",
        &encode::geoip(&[("CN", vec![], false), ("US", vec![], false)]),
    );
    let e = build_err(&format!(
        "[[route.rule_sets]]\nname = \"jp\"\nformat = \"geoip\"\npath = {geo:?}\ncategory = \"jp\"\n"
    ));
    assert!(
        e.ends_with("no category \"jp\"; the file has CN, US"),
        "{e}"
    );
    let e = build_err(
        "[[route.rules]]\ndst = [\"10.0.0.0/8\"]\noutbound = \"b\"\n\
         [[route.rules]]\ndomain_regex = [\"ok\", \"(unclosed\"]\noutbound = \"b\"\n",
    );
    assert!(
        e.starts_with("route.rules[1]: domain_regex \"(unclosed\": "),
        "{e}"
    );
    let e =
        build_err("[[route.rules]]\ndomain_regex = [\"^\\\\p{Han}+\\\\.cn$\"]\noutbound = \"b\"\n");
    assert!(
        e.starts_with("route.rules[0]: domain_regex ") && e.contains("xn--"),
        "{e}"
    );
    let site = d.write("geosite.dat", &encode::geosite(&[("ADS", vec![(1, "a[")])]));
    let e = build_err(&format!(
        "[[route.rule_sets]]\nname = \"ads\"\nformat = \"geosite\"\npath = {site:?}\ncategory = \"ads\"\n\
         [[route.rules]]\nrule_set = [\"ads\"]\noutbound = \"b\"\n"
    ));
    assert!(
        e.starts_with("route.rule_sets[0] (ads): regex \"a[\": "),
        "{e}"
    );
    let e = build_err("[[route.rules]]\ndomain_suffix = [\"*.a.com\"]\noutbound = \"b\"\n");
    assert!(
        e.starts_with("route.rules[0]: domain_suffix: ") && e.contains("wildcard"),
        "{e}"
    );
}

#[test]
fn policy_check_builds_the_rules_only() {
    let d = TempDir::new();
    let missing = d.0.join("gone.txt");
    let cfg = config(&format!(
        "[[route.rule_sets]]\nname = \"cn\"\nformat = \"cidr\"\npath = {missing:?}\n"
    ));
    let e = Policy::check(&cfg).unwrap_err().to_string();
    assert!(e.contains("gone.txt: cannot open"), "{e}");
    assert!(Policy::check(&config("")).is_ok());
}

// ---------------------------------------------------------------------
// The reference: each rule's values expanded, tested one by one.

struct RefRule {
    network: Option<Network>,
    has_dst: bool,
    dst: Vec<Cidr>,
    src: Vec<Cidr>,
    ports: Vec<PortRange>,
    has_domain: bool,
    exact: Vec<String>,
    suffix: Vec<String>,
    keyword: Vec<String>,
    regex: Vec<regex::bytes::Regex>,
    protocols: Vec<SniffProtocol>,
}

fn reference(route: &RouteConfig, sets: &[RuleSet]) -> Vec<RefRule> {
    let lower = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
            .collect()
    };
    route
        .rules
        .iter()
        .map(|r| {
            let mut x = RefRule {
                network: r.network,
                has_dst: !r.dst.is_empty(),
                dst: r.dst.clone(),
                src: r.src.clone(),
                ports: r.dst_port.clone(),
                has_domain: !(r.domain.is_empty()
                    && r.domain_suffix.is_empty()
                    && r.domain_keyword.is_empty()
                    && r.domain_regex.is_empty()),
                exact: lower(&r.domain),
                suffix: lower(&r.domain_suffix),
                // A keyword's dot is part of it ("google." is meant).
                keyword: r
                    .domain_keyword
                    .iter()
                    .map(|k| k.to_ascii_lowercase())
                    .collect(),
                regex: Vec::new(),
                protocols: r.protocol.clone(),
            };
            let mut patterns = r.domain_regex.clone();
            for name in &r.rule_set {
                let i = route
                    .rule_sets
                    .iter()
                    .position(|s| &s.name == name)
                    .unwrap();
                match &sets[i] {
                    RuleSet::Prefixes(p) => {
                        x.has_dst = true;
                        x.dst.extend(p.iter().copied());
                    }
                    RuleSet::Domains(d) => {
                        x.has_domain = true;
                        x.exact.extend(d.exact.iter().cloned());
                        x.suffix.extend(d.suffix.iter().cloned());
                        x.keyword.extend(d.keyword.iter().cloned());
                        patterns.extend(d.regex.iter().cloned());
                    }
                }
            }
            x.regex = patterns
                .iter()
                .map(|p| {
                    RegexBuilder::new(p)
                        .unicode(false)
                        .case_insensitive(true)
                        .build()
                        .unwrap()
                })
                .collect();
            x
        })
        .collect()
}

fn reference_match(rules: &[RefRule], flow: &FlowMeta<'_>) -> Option<usize> {
    let inside = |list: &[Cidr], ip: IpAddr| {
        list.iter()
            .any(|c| c.contains(&Cidr::host(ip.to_canonical())))
    };
    rules.iter().position(|r| {
        if r.network.is_some_and(|n| n != flow.network)
            || (r.has_dst && !inside(&r.dst, flow.dst.ip()))
            || (!r.src.is_empty() && !inside(&r.src, flow.src.ip()))
            || (!r.ports.is_empty()
                && !r
                    .ports
                    .iter()
                    .any(|p| (p.first..=p.last).contains(&flow.dst.port())))
            || (!r.protocols.is_empty() && !flow.protocol.is_some_and(|p| r.protocols.contains(&p)))
        {
            return false;
        }
        if !r.has_domain {
            return true;
        }
        let Some(name) = flow.domain else {
            return false;
        };
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        r.exact.contains(&name)
            || r.suffix.iter().any(|s| suffix_matches(&name, s))
            || r.keyword.iter().any(|k| name.contains(k.as_str()))
            || r.regex.iter().any(|re| re.is_match(name.as_bytes()))
    })
}

// Small pools so that random rules and flows meet often.
const V4: [&str; 6] = [
    "10.0.0.0",
    "10.0.0.1",
    "10.1.2.3",
    "192.168.0.1",
    "0.0.0.0",
    "255.255.255.255",
];
const V6: [&str; 5] = [
    "2001:db8::",
    "2001:db8::1",
    "::",
    "ffff::1",
    "::ffff:10.0.0.1",
];
const LABELS: [&str; 5] = ["a", "b", "ab", "com", "x-y"];
const KEYWORDS: [&str; 4] = ["a", "b.", "om", "x"];
const REGEXES: [&str; 6] = ["^a\\.", "b$", "x-y", "^[a-z]+\\.com$", "A", "ab|com"];
const PORTS: [u16; 6] = [0, 53, 80, 443, 1000, 65535];

fn cidr_strategy() -> impl Strategy<Value = Cidr> {
    prop_oneof![
        (
            prop::sample::select(&V4[..]),
            prop::sample::select(&[0u8, 1, 8, 16, 24, 31, 32][..])
        )
            .prop_map(|(a, p)| format!("{a}/{p}")),
        (
            prop::sample::select(&V6[..]),
            prop::sample::select(&[0u8, 16, 32, 64, 127, 128][..])
        )
            .prop_map(|(a, p)| format!("{a}/{p}")),
        (any::<u32>(), 0u8..=32).prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv4Addr::from(a))),
    ]
    .prop_map(|s| s.parse().unwrap())
}

fn name_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(&LABELS[..]), 1..=3).prop_map(|l| l.join("."))
}

fn some<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Vec<T>> {
    // Mostly empty: rules with every key would rarely match anything.
    prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(s, 1..=3)]
}

fn port_strategy() -> impl Strategy<Value = PortRange> {
    (
        prop::sample::select(&PORTS[..]),
        prop::sample::select(&PORTS[..]),
    )
        .prop_map(|(a, b)| PortRange {
            first: a.min(b),
            last: a.max(b),
        })
}

fn protocol_strategy() -> impl Strategy<Value = SniffProtocol> {
    prop_oneof![
        Just(SniffProtocol::Tls),
        Just(SniffProtocol::Http),
        Just(SniffProtocol::Quic)
    ]
}

fn network_strategy() -> impl Strategy<Value = Network> {
    prop_oneof![Just(Network::Tcp), Just(Network::Udp)]
}

fn set_strategy() -> impl Strategy<Value = RuleSet> {
    prop_oneof![
        prop::collection::vec(cidr_strategy(), 0..6).prop_map(RuleSet::Prefixes),
        (
            some(name_strategy()),
            some(name_strategy()),
            some(prop::sample::select(&KEYWORDS[..]).prop_map(String::from)),
            some(prop::sample::select(&REGEXES[..]).prop_map(String::from)),
        )
            .prop_map(|(exact, suffix, keyword, regex)| RuleSet::Domains(Domains {
                exact,
                suffix,
                keyword,
                regex
            })),
    ]
}

fn rule_strategy(sets: usize) -> impl Strategy<Value = Rule> {
    let names: Vec<String> = (0..sets).map(|i| format!("s{i}")).collect();
    let set_names = if names.is_empty() {
        Just(Vec::new()).boxed()
    } else {
        some(prop::sample::select(names)).boxed()
    };
    (
        (
            prop::option::of(network_strategy()),
            some(cidr_strategy()),
            some(cidr_strategy()),
            some(port_strategy()),
            some(protocol_strategy()),
        ),
        (
            some(name_strategy()),
            // Upper case and a trailing dot, which the index must ignore.
            some(name_strategy().prop_map(|n| format!("{}.", n.to_uppercase()))),
            some(prop::sample::select(&KEYWORDS[..]).prop_map(String::from)),
            some(prop::sample::select(&REGEXES[..]).prop_map(String::from)),
            set_names,
        ),
    )
        .prop_map(
            |(
                (network, dst, src, dst_port, protocol),
                (domain, suffix, keyword, regex, rule_set),
            )| {
                Rule {
                    network,
                    dst,
                    src,
                    dst_port,
                    domain,
                    domain_suffix: suffix,
                    domain_keyword: keyword,
                    domain_regex: regex,
                    rule_set,
                    protocol,
                    outbound: "a".into(),
                }
            },
        )
}

fn addr_strategy() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        prop::sample::select(&V4[..]).prop_map(|a| a.parse().unwrap()),
        prop::sample::select(&V6[..]).prop_map(|a| a.parse().unwrap()),
        any::<u32>().prop_map(|a| IpAddr::V4(a.into())),
        any::<u128>().prop_map(|a| IpAddr::V6(a.into())),
    ]
}

#[derive(Debug, Clone)]
struct TestFlow {
    network: Network,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    domain: Option<String>,
    protocol: Option<SniffProtocol>,
}

fn flow_strategy() -> impl Strategy<Value = TestFlow> {
    (
        network_strategy(),
        addr_strategy(),
        addr_strategy(),
        prop_oneof![prop::sample::select(&PORTS[..]), any::<u16>()],
        prop::option::of(prop_oneof![
            name_strategy(),
            name_strategy().prop_map(|n| format!("{}.", n.to_uppercase())),
        ]),
        prop::option::of(protocol_strategy()),
    )
        .prop_map(|(network, src, dst, port, domain, protocol)| TestFlow {
            network,
            src,
            dst,
            port,
            domain,
            protocol,
        })
}

fn case_strategy() -> impl Strategy<Value = (Vec<RuleSet>, Vec<Rule>, Vec<TestFlow>)> {
    prop::collection::vec(set_strategy(), 0..=3).prop_flat_map(|sets| {
        let n = sets.len();
        (
            Just(sets),
            prop::collection::vec(rule_strategy(n), 1..=12),
            prop::collection::vec(flow_strategy(), 32),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn the_index_agrees_with_a_linear_reference((sets, rules, flows) in case_strategy()) {
        let route = RouteConfig {
            final_outbound: "a".into(),
            rules,
            rule_sets: (0..sets.len())
                .map(|i| RuleSetConfig {
                    name: format!("s{i}"),
                    format: RuleSetFormat::Cidr,
                    path: PathBuf::from("unused"),
                    category: None,
                })
                .collect(),
        };
        let fast = Rules::with_sets(&route, &sets).unwrap();
        let slow = reference(&route, &sets);
        for f in &flows {
            let meta = FlowMeta {
                network: f.network,
                src: std::net::SocketAddr::new(f.src, 40000),
                dst: std::net::SocketAddr::new(f.dst, f.port),
                domain: f.domain.as_deref(),
                protocol: f.protocol,
            };
            prop_assert_eq!(fast.first_match(&meta), reference_match(&slow, &meta), "{:?}", f);
        }
    }
}
