//! CPU-bound micro-benchmark for comparing builds (a figure, not a test):
//! the same three loops in every build profile and on every target, so
//! bench/size can put a profile's cost in throughput next to its size.
//! Run natively and under qemu-user (`qemu-aarch64-static cpu_bench`):
//! the ratio between two builds on the same emulator is what counts, not
//! the absolute figure.
//!
//! - `aes-128-gcm seal`: 16 KiB records sealed in place, as a
//!   shadowsocks AEAD stream does (MB/s);
//! - `quic initial open`: a client Initial's keys derived (HKDF-SHA256),
//!   its header protection removed and the packet opened (AES-128-GCM),
//!   as the QUIC sniffer does per new UDP flow (only with `quic`);
//! - `rule lookups`: first-match over 10,000 domain suffixes and 1,000
//!   /24 prefixes, by name and by address.
//!
//! Each loop runs for about a second (`CPU_BENCH_SECONDS` changes it)
//! and prints one line: `name: value unit`.
//!
//!     cargo run --release --example cpu_bench

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use tproxyd::cidr::Cidr;
use tproxyd::config::{Network, RouteConfig, Rule};
use tproxyd::policy::rules::Rules;
use tproxyd::policy::FlowMeta;

const RECORD: usize = 16 * 1024;

/// Runs `step` (which does `per_step` units of work) until `budget` has
/// passed; returns units per second.
fn rate(budget: Duration, per_step: f64, mut step: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    let mut steps = 0u64;
    loop {
        // The clock is read once per 16 steps: cheap against the work.
        for _ in 0..16 {
            step(steps);
            steps += 1;
        }
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return steps as f64 * per_step / elapsed.as_secs_f64();
        }
    }
}

fn seal(budget: Duration) -> f64 {
    let cipher = Aes128Gcm::new(&[7u8; 16].into());
    let mut record = vec![0x5au8; RECORD];
    let mut nonce = [0u8; 12];
    rate(budget, RECORD as f64 / 1e6, |i| {
        nonce[..8].copy_from_slice(&i.to_le_bytes());
        let tag =
            cipher.encrypt_inout_detached(&Nonce::from(nonce), b"", record.as_mut_slice().into());
        black_box(tag.ok());
    })
}

#[cfg(feature = "quic")]
fn quic_open(budget: Duration) -> f64 {
    use tproxyd::policy::sniff::quic::{crypto_frame, seal_initial, QuicSniff, Version};
    // A CRYPTO frame that is not a ClientHello: the sniffer derives the
    // keys, opens the packet and reads the frame, then gives up on the
    // name, which is the whole per-flow cost of a nameless Initial.
    let frames = crypto_frame(0, &[1, 0, 0, 4, 3, 3, 0, 0]);
    let dcid = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
    let packet = seal_initial(Version::V1, &dcid, &[], 1, 2, &frames, 1200);
    rate(budget, 1.0, |_| {
        let mut sniff = QuicSniff::new();
        black_box(sniff.push(black_box(&packet)));
    })
}

fn rules() -> Result<(Rules, Vec<String>, Vec<IpAddr>), String> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let names: Vec<String> = (0..10_000)
        .map(|i| format!("s{i:x}.example{}.com", i % 97))
        .collect();
    let prefixes: Vec<Cidr> = (0..1_000)
        .map(|_| Cidr {
            addr: IpAddr::V4(Ipv4Addr::from(
                ((next() as u32) % (223 << 24) + (1 << 24)) & 0xffff_ff00,
            )),
            prefix: 24,
        })
        .collect();
    let route = RouteConfig {
        final_outbound: "a".into(),
        rules: vec![
            Rule {
                domain_suffix: names.clone(),
                outbound: "b".into(),
                ..Rule::default()
            },
            Rule {
                dst: prefixes.clone(),
                outbound: "b".into(),
                ..Rule::default()
            },
        ],
        rule_sets: Vec::new(),
    };
    let rules = Rules::build(&route).map_err(|e| e.to_string())?;
    // Half the names match, half do not; the same for addresses.
    let lookups: Vec<String> = (0..4096)
        .map(|i| {
            if i % 2 == 0 {
                format!("www.{}", names[next() as usize % names.len()])
            } else {
                format!("www.n{i:x}.example.org")
            }
        })
        .collect();
    let addrs: Vec<IpAddr> = (0..4096)
        .map(
            |i| match (i % 2, prefixes[next() as usize % prefixes.len()].addr) {
                (0, IpAddr::V4(a)) => IpAddr::V4(Ipv4Addr::from(u32::from(a) | 7)),
                _ => IpAddr::V4(Ipv4Addr::from(0xf000_0000 | (next() as u32 >> 4))),
            },
        )
        .collect();
    Ok((rules, lookups, addrs))
}

fn lookups(budget: Duration) -> Result<f64, String> {
    let (rules, names, addrs) = rules()?;
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)), 40000);
    let far = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(240, 0, 0, 1)), 443);
    Ok(rate(budget, 1e-6, |i| {
        let i = i as usize;
        let by_name = FlowMeta {
            network: Network::Tcp,
            src,
            dst: far,
            domain: Some(&names[i % names.len()]),
            protocol: None,
        };
        black_box(rules.first_match(black_box(&by_name)));
        let dst = SocketAddr::new(addrs[i % addrs.len()], 443);
        black_box(rules.first_match(black_box(&FlowMeta::addresses(Network::Tcp, src, dst))));
    }) * 2.0)
}

fn main() -> Result<(), String> {
    let seconds: f64 = std::env::var("CPU_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let budget = Duration::from_secs_f64(seconds);
    println!("aes-128-gcm seal: {:.1} MB/s", seal(budget));
    #[cfg(feature = "quic")]
    println!("quic initial open: {:.0} /s", quic_open(budget));
    println!("rule lookups: {:.3} M/s", lookups(budget)?);
    Ok(())
}
