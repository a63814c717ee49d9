//! Rule-index micro-benchmark (a figure, not a test): builds 100,000
//! domain suffixes and 10,000 prefixes, once as two rule-set files and
//! once as 110,000 separate rules, and prints build time, resident
//! memory added and lookups per second for matching and non-matching
//! flows against an empty rule list.
//!
//!     cargo run --release --example rules_bench

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use tproxyd::cidr::Cidr;
use tproxyd::config::{Network, RouteConfig, Rule, RuleSetConfig, RuleSetFormat};
use tproxyd::policy::rules::Rules;
use tproxyd::policy::FlowMeta;

const NAMES: usize = 100_000;
const PREFIXES: usize = 10_000;
const LOOKUPS: usize = 1_000_000;

/// A small deterministic generator, so runs compare.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Resident set size in bytes (/proc/self/statm counts 4 KiB pages on
/// the machines this runs on).
fn resident() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn suffix(i: usize) -> String {
    format!("s{i:x}.example{}.com", i % 97)
}

/// /24s in 1.0.0.0-223.255.255.255; never 240.0.0.0/4, where the
/// non-matching flows go.
fn prefixes() -> Vec<Cidr> {
    let mut rng = XorShift(0x9e3779b97f4a7c15);
    (0..PREFIXES)
        .map(|_| {
            let a = (rng.next() as u32) % (223 << 24) + (1 << 24);
            Cidr {
                addr: IpAddr::V4(Ipv4Addr::from(a & 0xffff_ff00)),
                prefix: 24,
            }
        })
        .collect()
}

struct Flows {
    names: Vec<String>,
    addrs: Vec<IpAddr>,
}

fn matching(cidrs: &[Cidr]) -> Flows {
    let mut rng = XorShift(7);
    Flows {
        names: (0..4096)
            .map(|_| format!("www.{}", suffix(rng.next() as usize % NAMES)))
            .collect(),
        addrs: (0..4096)
            .map(|_| {
                let c = cidrs[rng.next() as usize % cidrs.len()];
                let IpAddr::V4(a) = c.addr else {
                    return c.addr;
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) | (rng.next() as u32 & 0xff)))
            })
            .collect(),
    }
}

fn missing() -> Flows {
    let mut rng = XorShift(11);
    Flows {
        names: (0..4096)
            .map(|i| format!("www.n{i:x}.example.org"))
            .collect(),
        addrs: (0..4096)
            .map(|_| IpAddr::V4(Ipv4Addr::from(0xf000_0000 | (rng.next() as u32 >> 4))))
            .collect(),
    }
}

/// Lookups per second: half by name (with a non-matching address), half
/// by address only.
fn rate(rules: &Rules, flows: &Flows) -> (f64, f64) {
    let src: SocketAddr = "192.168.1.10:40000"
        .parse()
        .unwrap_or(SocketAddr::from(([0; 4], 0)));
    let far = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(240, 0, 0, 1)), 443);
    let start = Instant::now();
    for i in 0..LOOKUPS {
        let name = &flows.names[i % flows.names.len()];
        let flow = FlowMeta {
            network: Network::Tcp,
            src,
            dst: far,
            domain: Some(name),
            protocol: None,
        };
        black_box(rules.first_match(black_box(&flow)));
    }
    let by_name = LOOKUPS as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for i in 0..LOOKUPS {
        let dst = SocketAddr::new(flows.addrs[i % flows.addrs.len()], 443);
        let flow = FlowMeta::addresses(Network::Tcp, src, dst);
        black_box(rules.first_match(black_box(&flow)));
    }
    let by_addr = LOOKUPS as f64 / start.elapsed().as_secs_f64();
    (by_name, by_addr)
}

fn rule(outbound: &str) -> Rule {
    Rule {
        outbound: outbound.into(),
        ..Rule::default()
    }
}

fn report(what: &str, route: &RouteConfig, cidrs: &[Cidr]) -> Result<(), String> {
    let before = resident();
    let start = Instant::now();
    let rules = Rules::build(route).map_err(|e| e.to_string())?;
    let built = start.elapsed();
    let added = resident().saturating_sub(before);
    println!(
        "{what}: build {:.0} ms, resident +{:.1} MiB",
        built.as_secs_f64() * 1e3,
        added as f64 / (1 << 20) as f64
    );
    for (label, flows) in [("matching", matching(cidrs)), ("non-matching", missing())] {
        let (by_name, by_addr) = rate(&rules, &flows);
        println!(
            "  {label:>12}: {:>6.2} M lookups/s by name, {:>6.2} M/s by address",
            by_name / 1e6,
            by_addr / 1e6
        );
    }
    Ok(())
}

fn main() -> Result<(), String> {
    let cidrs = prefixes();
    let dir = std::env::temp_dir().join(format!("tproxyd-rules-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let names_path: PathBuf = dir.join("names.txt");
    let cidr_path: PathBuf = dir.join("cidrs.txt");
    let mut text = String::new();
    for i in 0..NAMES {
        text.push_str(&suffix(i));
        text.push('\n');
    }
    std::fs::write(&names_path, &text).map_err(|e| e.to_string())?;
    let text: String = cidrs.iter().map(|c| format!("{c}\n")).collect();
    std::fs::write(&cidr_path, &text).map_err(|e| e.to_string())?;

    let empty = RouteConfig {
        final_outbound: "a".into(),
        rules: Vec::new(),
        rule_sets: Vec::new(),
    };
    report("empty rule list", &empty, &cidrs)?;

    let sets = RouteConfig {
        final_outbound: "a".into(),
        rules: vec![
            Rule {
                rule_set: vec!["names".into()],
                ..rule("b")
            },
            Rule {
                rule_set: vec!["cidrs".into()],
                ..rule("b")
            },
        ],
        rule_sets: vec![
            RuleSetConfig {
                name: "names".into(),
                format: RuleSetFormat::Domains,
                path: names_path.clone(),
                category: None,
            },
            RuleSetConfig {
                name: "cidrs".into(),
                format: RuleSetFormat::Cidr,
                path: cidr_path.clone(),
                category: None,
            },
        ],
    };
    report(
        "2 rules over rule-set files (100k suffixes, 10k prefixes)",
        &sets,
        &cidrs,
    )?;
    drop(sets);

    let mut rules: Vec<Rule> = (0..NAMES)
        .map(|i| Rule {
            domain_suffix: vec![suffix(i)],
            ..rule("b")
        })
        .collect();
    rules.extend(cidrs.iter().map(|c| Rule {
        dst: vec![*c],
        ..rule("b")
    }));
    let separate = RouteConfig {
        final_outbound: "a".into(),
        rules,
        rule_sets: Vec::new(),
    };
    report(
        "110k separate rules (one suffix or prefix each)",
        &separate,
        &cidrs,
    )?;

    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
