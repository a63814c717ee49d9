//! Address prefixes and port ranges: values the config reads (rules,
//! firewall capture and bypass), the policy matches and the firewall writes
//! into its rules. They sit at the top because all three use them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP prefix such as `10.0.0.0/8` or `2001:db8::/32`. Host bits are
/// cleared on parsing, so `10.1.2.3/8` means `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether every address of `other` is in `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        if self.prefix > other.prefix {
            return false;
        }
        match (self.addr, other.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(a) == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(a) == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// The same set of addresses with no prefix inside another (duplicates
/// included), in the order first given. nft refuses overlapping elements
/// in an interval set ("conflicting intervals"), and for iptables each
/// dropped prefix is one rule fewer.
pub fn minimal_cover(list: &[Cidr]) -> Vec<Cidr> {
    let mut kept: Vec<Cidr> = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        // Covered by a wider prefix, or by an equal one given earlier.
        let covered = list
            .iter()
            .enumerate()
            .any(|(j, other)| j != i && other.contains(c) && (other.prefix < c.prefix || j < i));
        if !covered {
            kept.push(*c);
        }
    }
    kept
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.trim().parse().map_err(|_| {
            format!("{s:?} is not an address or prefix (like 10.0.0.0/8 or 2001:db8::/32)")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{s:?}: prefix length must be 0 to {max}")),
            },
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - prefix)
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - prefix)
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A destination port or inclusive range: `53` or `6000-7000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port or range (like 53 or 6000-7000)");
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
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

/// `list` without the addresses of `fake` (the fake-ip ranges), as
/// prefixes, in `list`'s order: what the kernel bypass may cover. A
/// bypass prefix holding a fake range (the default bypass has fc00::/7,
/// which holds fc00::/18) is carved around it rather than refused: the
/// rest of it stays bypassed, and flows to fake addresses reach tproxyd,
/// which is the only place they mean anything.
pub fn carve_fake_ranges(list: &[Cidr], fake: &[Cidr]) -> Vec<Cidr> {
    // A prefix's first and last address, host bits cleared in the first.
    let bounds = |c: &Cidr| {
        let (value, last) = range_of(c);
        let host = if c.is_ipv4() { 32 } else { 128 } - u32::from(c.prefix);
        let first = if host >= 128 {
            0
        } else {
            value >> host << host
        };
        (first, last)
    };
    let mut out = Vec::with_capacity(list.len());
    for c in list {
        let whole = bounds(c);
        let mut pieces = vec![whole];
        for f in fake.iter().filter(|f| f.is_ipv4() == c.is_ipv4()) {
            let (flo, fhi) = bounds(f);
            let mut next = Vec::with_capacity(pieces.len() + 1);
            for (a, b) in pieces {
                if fhi < a || flo > b {
                    next.push((a, b));
                    continue;
                }
                if a < flo {
                    next.push((a, flo - 1));
                }
                if fhi < b {
                    next.push((fhi + 1, b));
                }
            }
            pieces = next;
        }
        if pieces == [whole] {
            out.push(*c);
            continue;
        }
        for (a, b) in pieces {
            prefixes_of_range(a, b, c.is_ipv4(), &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_clear_host_bits() {
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            "2001:db8::1/32".parse::<Cidr>().unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
    }

    #[test]
    fn minimal_cover_drops_contained_and_repeated_prefixes() {
        let list: Vec<Cidr> = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "203.0.113.2",
            "203.0.113.0/24",
            "10.0.0.0/8",
            "2001:db8::/32",
            "2001:db8:5::1",
            "0.0.0.0/0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let kept: Vec<String> = minimal_cover(&list).iter().map(|c| c.to_string()).collect();
        assert_eq!(kept, ["2001:db8::/32", "0.0.0.0/0"]);
        let disjoint: Vec<Cidr> = ["10.0.0.0/8", "192.168.0.0/16", "::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(minimal_cover(&disjoint), disjoint);
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(a.contains(&"10.255.0.0/16".parse().unwrap()));
        assert!(!a.contains(&"11.0.0.0/16".parse().unwrap()));
        assert!(!a.contains(&"::/0".parse().unwrap()));
    }

    #[test]
    fn ports_and_ranges() {
        assert_eq!("53".parse::<PortRange>().unwrap().to_string(), "53");
        assert_eq!(
            "6000-7000".parse::<PortRange>().unwrap().to_string(),
            "6000-7000"
        );
        assert!("0".parse::<PortRange>().is_err());
        assert!("9-3".parse::<PortRange>().is_err());
        assert!("http".parse::<PortRange>().is_err());
    }
}
