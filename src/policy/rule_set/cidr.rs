//! The `cidr` format (chnroute and the like): one prefix per line, bare
//! addresses allowed, `#` comments, blank lines; IPv4 and IPv6 mixed.
//! Also prefix arithmetic for geoip's `inverse_match`.

use crate::cidr::Cidr;
pub use crate::cidr::{prefixes_of_range, range_of};

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
