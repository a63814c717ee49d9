//! The `cidr` format (chnroute and the like): one prefix per line, bare
//! addresses allowed, `#` comments, blank lines; IPv4 and IPv6 mixed.
//! Also prefix arithmetic for geoip's `inverse_match`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::cidr::Cidr;

pub fn parse(label: &str, bytes: &[u8]) -> Result<Vec<Cidr>, String> {
    let mut out = Vec::new();
    for line in super::lines(label, bytes) {
        let (n, text) = line?;
        // Cidr's own message already quotes the text and says what is wanted.
        let c: Cidr = text.parse().map_err(|e| format!("{label}:{n}: {e}"))?;
        out.push(c);
    }
    Ok(out)
}

/// The first and last address of a prefix, IPv4 in the low 32 bits.
pub fn range_of(c: &Cidr) -> (u128, u128) {
    let (value, bits) = match c.addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    let host_bits = bits - u32::from(c.prefix);
    let span = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    (value, value | span)
}

/// The address ranges of one family's prefixes in `list` (IPv4 when
/// `v4`), sorted by their first address.
pub fn sorted_ranges(list: &[Cidr], v4: bool) -> Vec<(u128, u128)> {
    let mut ranges: Vec<(u128, u128)> = list
        .iter()
        .filter(|c| c.is_ipv4() == v4)
        .map(range_of)
        .collect();
    ranges.sort_unstable();
    ranges
}

/// The fewest prefixes that cover exactly `lo..=hi` (IPv4 when `v4`).
pub fn prefixes_of_range(mut lo: u128, hi: u128, v4: bool, out: &mut Vec<Cidr>) {
    let bits: u32 = if v4 { 32 } else { 128 };
    let last_of = |lo: u128, size: u32| {
        if size >= 128 {
            u128::MAX
        } else {
            lo | ((1u128 << size) - 1)
        }
    };
    while lo <= hi {
        // The largest block aligned at lo that ends within hi (size 0, one
        // address, always does).
        let mut size = lo.trailing_zeros().min(bits);
        while last_of(lo, size) > hi {
            size -= 1;
        }
        let addr = if v4 {
            IpAddr::V4(Ipv4Addr::from(lo as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(lo))
        };
        out.push(Cidr {
            addr,
            prefix: (bits - size) as u8,
        });
        let last = last_of(lo, size);
        if last >= hi {
            break;
        }
        lo = last + 1;
    }
}

/// Every address of both families not in `list`: what a geoip entry with
/// `inverse_match` matches (v2ray inverts the whole match, so an IPv6
/// address matches an inverted IPv4-only list).
pub fn complement(list: &[Cidr]) -> Vec<Cidr> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        let max: u128 = if v4 { u128::from(u32::MAX) } else { u128::MAX };
        let ranges = sorted_ranges(list, v4);
        // `next` is the first address not yet covered; None past the end.
        let mut next = Some(0u128);
        for (lo, hi) in ranges {
            let Some(n) = next else { break };
            if lo > n {
                prefixes_of_range(n, lo - 1, v4, &mut out);
            }
            if hi >= n {
                next = if hi == max { None } else { Some(hi + 1) };
            }
        }
        if let Some(n) = next {
            prefixes_of_range(n, max, v4, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_prefixes_addresses_comments_and_both_families() {
        let text = b"# chnroute\n1.0.1.0/24\n\n1.0.2.3 # a host\n2001:db8::/32\r\n10.1.2.3/8\n";
        assert_eq!(
            parse("cn.txt", text).unwrap(),
            vec![
                c("1.0.1.0/24"),
                c("1.0.2.3/32"),
                c("2001:db8::/32"),
                c("10.0.0.0/8")
            ]
        );
    }

    #[test]
    fn a_bad_line_is_refused_with_file_and_line() {
        let e = parse("cn.txt", b"1.0.1.0/24\n\nexample.com\n").unwrap_err();
        assert!(e.starts_with("cn.txt:3: "), "{e}");
        let e = parse("cn.txt", b"1.0.0.0/33\n").unwrap_err();
        assert!(e.starts_with("cn.txt:1: ") && e.contains("0 to 32"), "{e}");
    }

    #[test]
    fn ranges_become_the_fewest_prefixes() {
        let mut out = Vec::new();
        prefixes_of_range(0x0a000000, 0x0a0000ff, true, &mut out);
        assert_eq!(out, vec![c("10.0.0.0/24")]);
        out.clear();
        prefixes_of_range(1, 6, true, &mut out);
        assert_eq!(
            out,
            vec![
                c("0.0.0.1/32"),
                c("0.0.0.2/31"),
                c("0.0.0.4/31"),
                c("0.0.0.6/32")
            ]
        );
        out.clear();
        prefixes_of_range(0, u128::MAX, false, &mut out);
        assert_eq!(out, vec![c("::/0")]);
        out.clear();
        prefixes_of_range(0, u128::from(u32::MAX), true, &mut out);
        assert_eq!(out, vec![c("0.0.0.0/0")]);
    }

    #[test]
    fn complement_covers_everything_else_in_both_families() {
        let inv = complement(&[c("128.0.0.0/1"), c("64.0.0.0/2"), c("100.0.0.0/8")]);
        assert_eq!(inv, vec![c("0.0.0.0/2"), c("::/0")]);
        assert_eq!(complement(&[]), vec![c("0.0.0.0/0"), c("::/0")]);
        assert_eq!(complement(&[c("0.0.0.0/0"), c("::/0")]), vec![]);
        let inv = complement(&[c("2001:db8::/32")]);
        for p in [c("2001:db8::1"), c("2001:db8:ffff::/48")] {
            assert!(!inv.iter().any(|x| x.contains(&p)), "{p}");
        }
        for p in [c("2001:db9::1"), c("::1"), c("1.2.3.4")] {
            assert!(inv.iter().any(|x| x.contains(&p)), "{p}");
        }
    }
}
