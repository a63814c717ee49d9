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
