//! Deserializers for values that have a text form of their own: addresses,
//! prefixes, port ranges, marks. serde types them while the file is read,
//! so a wrong value is reported with its key, line and column, and with a
//! message that says what was expected instead of a bare "invalid".

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::one_or_many;

/// Any `FromStr` type whose error is a message, from a TOML string.
pub fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let text = String::deserialize(d)?;
    text.parse().map_err(de::Error::custom)
}

/// The optional form of [`from_str`], for `#[serde(default)]` fields.
pub fn opt_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    from_str(d).map(Some)
}

/// A list of strings, each parsed with `FromStr`; one string alone is a
/// list of one (`dst_port = "53"`), as [`crate::one_or_many`] reads every
/// list key.
pub fn list_from_str<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let texts: Vec<String> = one_or_many::vec(d)?;
    texts
        .iter()
        .map(|text| text.parse().map_err(de::Error::custom))
        .collect()
}

/// The optional form of [`list_from_str`].
pub fn opt_list_from_str<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    list_from_str(d).map(Some)
}

/// An `IP:PORT` the user writes: a listen address or a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPort(pub SocketAddr);

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::addr::parse_ip_port(s).map(HostPort)
    }
}

/// An `IP:PORT` field.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    from_str::<D, HostPort>(d).map(|h| h.0)
}

/// An optional `IP:PORT` field.
pub fn opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

/// A mark, as iptables writes them: an integer (TOML allows `0xff`), or a
/// string in decimal or `0x` hex.
pub fn parse_mark(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed
        .map_err(|_| format!("{text:?} is not a 32-bit mark (decimal like 255, or hex like 0xff)"))
}

/// An optional mark field: integer or string.
pub fn opt_mark<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct MarkVisitor;
    impl Visitor<'_> for MarkVisitor {
        type Value = u32;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a 32-bit mark: an integer (255, 0xff) or a string (\"0xff\")")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::custom(format!("{v} is not a 32-bit mark")))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::custom(format!("{v} is not a 32-bit mark")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u32, E> {
            parse_mark(v).map_err(E::custom)
        }
    }
    d.deserialize_any(MarkVisitor).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_decimal_or_hex() {
        assert_eq!(parse_mark("255"), Ok(255));
        assert_eq!(parse_mark("0xff"), Ok(255));
        assert_eq!(parse_mark("0X1090"), Ok(0x1090));
        assert!(parse_mark("0x1_0000_0000").is_err());
        assert!(parse_mark("ff").is_err());
        assert!(parse_mark("-1").is_err());
    }

    #[test]
    fn a_host_name_is_refused_with_the_reason() {
        let e = "proxy.example:1080".parse::<HostPort>().unwrap_err();
        assert!(e.contains("host name is refused"), "{e}");
        assert_eq!(
            "[::1]:1080".parse::<HostPort>().unwrap().0,
            "[::1]:1080".parse::<SocketAddr>().unwrap()
        );
    }
}
