//! Firewall settings a user writes: CIDR prefixes (`source_cidrs`,
//! `bypass`) and port ranges (`tcp_ports`, `udp_ports`), one per line of
//! the input, and the minimal cover the rule writers build from the
//! prefixes (nft refuses overlapping interval-set elements).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxyd::cidr::{minimal_cover, Cidr, PortRange};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut cidrs = Vec::new();
    for line in text.split('\n') {
        if let Ok(c) = line.parse::<Cidr>() {
            let max = if c.is_ipv4() { 32 } else { 128 };
            assert!(c.prefix <= max);
            // Host bits are cleared: the prefix contains its own address.
            assert!(c.contains(&Cidr::host(c.addr)), "{c}");
            // It prints as something that parses back to itself.
            let shown = c.to_string();
            assert_eq!(shown.parse::<Cidr>(), Ok(c), "{shown}");
            // Text that goes into nft/iptables rules: no spaces, no quotes.
            assert!(!shown.contains(|ch: char| ch.is_whitespace() || ch == '"'));
            cidrs.push(c);
        }
        if let Ok(r) = line.parse::<PortRange>() {
            assert!(r.first >= 1 && r.first <= r.last);
            let shown = r.to_string();
            assert_eq!(shown.parse::<PortRange>(), Ok(r), "{shown}");
        }
    }

    let cover = minimal_cover(&cidrs);
    // The same addresses: every prefix given is inside one kept ...
    for c in &cidrs {
        assert!(cover.iter().any(|k| k.contains(c)), "{c} lost");
    }
    // ... and nothing kept is inside another kept one, or new.
    for (i, a) in cover.iter().enumerate() {
        assert!(cidrs.contains(a));
        for (j, b) in cover.iter().enumerate() {
            assert!(i == j || !a.contains(b), "{b} is inside {a}");
        }
    }
});
