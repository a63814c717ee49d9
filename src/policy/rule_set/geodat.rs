//! v2ray geoip.dat and geosite.dat (protobuf; v2fly `routercommon`,
//! Xray `geodat.proto`, same field numbers):
//!
//! ```text
//! GeoIPList   { repeated GeoIP entry = 1 }
//! GeoIP       { string country_code = 1; repeated CIDR cidr = 2; bool inverse_match = 3 }
//! CIDR        { bytes ip = 1 /* 4 or 16 */; uint32 prefix = 2 }
//! GeoSiteList { repeated GeoSite entry = 1 }
//! GeoSite     { string country_code = 1; repeated Domain domain = 2 }
//! Domain      { Type type = 1; string value = 2; repeated Attribute attribute = 3 }
//! Domain.Type { Plain = 0 (keyword); Regex = 1; RootDomain = 2 (suffix); Full = 3 (exact) }
//! ```
//!
//! Decoded by hand rather than with prost: the schema is six small
//! messages, and a reader over the file's bytes can look at each entry's
//! `country_code` and skip the rest without decoding or copying it, so
//! only the one category asked for is ever built (a full geosite.dat
//! holds over a million names). Unknown fields are skipped, as protobuf
//! requires; anything malformed is refused with its byte offset.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::cidr::complement;
use super::domains::{normalize, normalize_keyword, normalize_suffix, Domains};
use crate::cidr::Cidr;

/// How many category names a "no such category" message lists.
const LIST_CATEGORIES: usize = 12;

/// A field's value by wire type.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    /// Length-delimited (strings, bytes, messages) and where it starts.
    Bytes(&'a [u8], usize),
    Fixed,
}

/// Reads fields from one message; `base` is its offset in the file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    fn at(&self) -> usize {
        self.base + self.pos
    }

    fn varint(&mut self) -> Result<u64, String> {
        let start = self.at();
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(format!("byte {start}: the file ends inside a number"));
            };
            self.pos += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("byte {start}: a number longer than 10 bytes"))
    }

    /// The next field number and value; None at the end of the message.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let start = self.at();
        let key = self.varint()?;
        let (number, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => Value::Varint(self.varint()?),
            1 => self.skip(8, start).map(|()| Value::Fixed)?,
            5 => self.skip(4, start).map(|()| Value::Fixed)?,
            2 => {
                let len = self.varint()?;
                let from = self.pos;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| from.checked_add(l))
                    .filter(|&e| e <= self.buf.len())
                    .ok_or_else(|| {
                        format!("byte {start}: a field of {len} bytes runs past its end")
                    })?;
                self.pos = end;
                Value::Bytes(&self.buf[from..end], self.base + from)
            }
            w => {
                return Err(format!(
                    "byte {start}: wire type {w} (groups or garbage): not a geoip/geosite file?"
                ))
            }
        };
        Ok(Some((number, value)))
    }

    fn skip(&mut self, n: usize, start: usize) -> Result<(), String> {
        if self.buf.len() - self.pos < n {
            return Err(format!("byte {start}: the file ends inside a field"));
        }
        self.pos += n;
        Ok(())
    }
}

fn text<'a>(bytes: &'a [u8], at: usize, what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("byte {at}: {what} is not UTF-8"))
}

fn want_bytes<'a>(v: Value<'a>, what: &str, at: usize) -> Result<(&'a [u8], usize), String> {
    match v {
        Value::Bytes(b, at) => Ok((b, at)),
        _ => Err(format!("byte {at}: {what} has the wrong wire type")),
    }
}

fn want_varint(v: Value<'_>, what: &str, at: usize) -> Result<u64, String> {
    match v {
        Value::Varint(n) => Ok(n),
        _ => Err(format!("byte {at}: {what} has the wrong wire type")),
    }
}

/// The entry (GeoIP or GeoSite message) whose country_code equals
/// `category` ignoring case, or the message listing what is there.
fn find_entry<'a>(bytes: &'a [u8], category: &str) -> Result<(&'a [u8], usize), String> {
    if category.contains('@') {
        return Err(format!(
            "category {category:?}: attributes (@...) are not supported; name the category alone"
        ));
    }
    let mut top = Reader::new(bytes, 0);
    let mut names: Vec<String> = Vec::new();
    let mut count = 0usize;
    while let Some((number, value)) = top.field()? {
        if number != 1 {
            continue;
        }
        let at = top.at();
        let (entry, entry_at) = want_bytes(value, "an entry", at)?;
        count += 1;
        let mut r = Reader::new(entry, entry_at);
        let mut code = None;
        while let Some((n, v)) = r.field()? {
            if n == 1 {
                let (b, at) = want_bytes(v, "country_code", r.at())?;
                code = Some(text(b, at, "country_code")?);
                break;
            }
        }
        let code = code.unwrap_or("");
        if code.eq_ignore_ascii_case(category) {
            return Ok((entry, entry_at));
        }
        if names.len() < LIST_CATEGORIES {
            names.push(code.to_string());
        }
    }
    if count == 0 {
        return Err("no categories at all: an empty file, or not a geoip/geosite file".into());
    }
    let more = count.saturating_sub(names.len());
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Err(format!(
        "no category {category:?}; the file has {}{more}",
        names.join(", ")
    ))
}

/// One geoip category's prefixes; an `inverse_match` entry becomes every
/// address outside them.
pub fn geoip(label: &str, bytes: &[u8], category: &str) -> Result<Vec<Cidr>, String> {
    geoip_inner(bytes, category).map_err(|e| format!("{label}: {e}"))
}

fn geoip_inner(bytes: &[u8], category: &str) -> Result<Vec<Cidr>, String> {
    let (entry, at) = find_entry(bytes, category)?;
    let mut r = Reader::new(entry, at);
    let mut out = Vec::new();
    let mut inverse = false;
    while let Some((n, v)) = r.field()? {
        let at = r.at();
        match n {
            2 => {
                let (msg, msg_at) = want_bytes(v, "a cidr", at)?;
                out.push(cidr(msg, msg_at)?);
            }
            3 => inverse = want_varint(v, "inverse_match", at)? != 0,
            _ => {}
        }
    }
    Ok(if inverse { complement(&out) } else { out })
}

fn cidr(msg: &[u8], at: usize) -> Result<Cidr, String> {
    let mut r = Reader::new(msg, at);
    let (mut ip, mut prefix) = (None, 0u64);
    while let Some((n, v)) = r.field()? {
        match n {
            1 => ip = Some(want_bytes(v, "ip", r.at())?.0),
            2 => prefix = want_varint(v, "prefix", r.at())?,
            _ => {}
        }
    }
    let addr = match ip {
        Some(b) if b.len() == 4 => {
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap_or([0; 4])))
        }
        Some(b) if b.len() == 16 => {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap_or([0; 16])))
        }
        Some(b) => {
            return Err(format!(
                "byte {at}: an address of {} bytes (4 or 16 expected)",
                b.len()
            ))
        }
        None => return Err(format!("byte {at}: a cidr without an address")),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!(
            "byte {at}: prefix /{prefix} for {addr} (at most {max})"
        ));
    }
    // Through the parser, which clears host bits as everywhere else.
    format!("{addr}/{prefix}")
        .parse()
        .map_err(|e| format!("byte {at}: {e}"))
}

/// One geosite category's names: Plain → keyword, Regex → regex,
/// RootDomain → suffix, Full → exact; attributes are ignored.
pub fn geosite(label: &str, bytes: &[u8], category: &str) -> Result<Domains, String> {
    geosite_inner(bytes, category).map_err(|e| format!("{label}: {e}"))
}

fn geosite_inner(bytes: &[u8], category: &str) -> Result<Domains, String> {
    let (entry, at) = find_entry(bytes, category)?;
    let mut r = Reader::new(entry, at);
    let mut out = Domains::default();
    while let Some((n, v)) = r.field()? {
        if n != 2 {
            continue;
        }
        let (msg, msg_at) = want_bytes(v, "a domain", r.at())?;
        let mut d = Reader::new(msg, msg_at);
        let (mut kind, mut value) = (0u64, "");
        while let Some((n, v)) = d.field()? {
            match n {
                1 => kind = want_varint(v, "type", d.at())?,
                2 => {
                    let (b, at) = want_bytes(v, "value", d.at())?;
                    value = text(b, at, "value")?;
                }
                _ => {}
            }
        }
        let bad = |e: String| format!("byte {msg_at}: {e}");
        match kind {
            0 => out.keyword.push(normalize_keyword(value).map_err(bad)?),
            1 => {
                if value.is_empty() {
                    return Err(bad("an empty regex".into()));
                }
                out.regex.push(value.to_string());
            }
            2 => out.suffix.push(normalize_suffix(value).map_err(bad)?),
            3 => out.exact.push(normalize(value).map_err(bad)?),
            k => return Err(bad(format!("domain type {k} (0 to 3 expected)"))),
        }
    }
    Ok(out)
}

/// A protobuf writer for tests and benchmarks: geoip.dat/geosite.dat bytes
/// built from the schema above.
#[cfg(test)]
pub(crate) mod encode {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn bytes_field(out: &mut Vec<u8>, number: u64, b: &[u8]) {
        varint(out, number << 3 | 2);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }

    pub fn varint_field(out: &mut Vec<u8>, number: u64, v: u64) {
        varint(out, number << 3);
        varint(out, v);
    }

    /// One GeoIP entry: code, [(ip bytes, prefix)], inverse_match.
    pub type GeoIp<'a> = (&'a str, Vec<(Vec<u8>, u32)>, bool);

    pub fn geoip(entries: &[GeoIp<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (code, cidrs, inverse) in entries {
            let mut e = Vec::new();
            bytes_field(&mut e, 1, code.as_bytes());
            for (ip, prefix) in cidrs {
                let mut c = Vec::new();
                bytes_field(&mut c, 1, ip);
                varint_field(&mut c, 2, u64::from(*prefix));
                bytes_field(&mut e, 2, &c);
            }
            if *inverse {
                varint_field(&mut e, 3, 1);
            }
            bytes_field(&mut out, 1, &e);
        }
        out
    }

    /// (code, [(type, value)]); every domain gets an attribute, which the
    /// reader must skip.
    pub fn geosite(entries: &[(&str, Vec<(u64, &str)>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (code, domains) in entries {
            let mut e = Vec::new();
            bytes_field(&mut e, 1, code.as_bytes());
            for (kind, value) in domains {
                let mut d = Vec::new();
                if *kind != 0 {
                    varint_field(&mut d, 1, *kind);
                }
                bytes_field(&mut d, 2, value.as_bytes());
                let mut attr = Vec::new();
                bytes_field(&mut attr, 1, b"ads");
                varint_field(&mut attr, 2, 1);
                bytes_field(&mut d, 3, &attr);
                bytes_field(&mut e, 2, &d);
            }
            bytes_field(&mut out, 1, &e);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn sample_geoip() -> Vec<u8> {
        encode::geoip(&[
            ("US", vec![(vec![8, 8, 8, 0], 24)], false),
            (
                "CN",
                vec![
                    (vec![1, 0, 1, 9], 24),
                    (
                        vec![0x24, 0x0e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        12,
                    ),
                ],
                false,
            ),
            ("NOTPRIV", vec![(vec![10, 0, 0, 0], 8)], true),
        ])
    }

    #[test]
    fn geoip_selects_a_category_ignoring_case() {
        let bytes = sample_geoip();
        assert_eq!(
            geoip("geoip.dat", &bytes, "cn").unwrap(),
            vec![c("1.0.1.0/24"), c("2400::/12")]
        );
        assert_eq!(
            geoip("geoip.dat", &bytes, "Us").unwrap(),
            vec![c("8.8.8.0/24")]
        );
    }

    #[test]
    fn geoip_inverse_match_is_everything_else() {
        let inv = geoip("g", &sample_geoip(), "notpriv").unwrap();
        let has = |a: &str| inv.iter().any(|x| x.contains(&c(a)));
        assert!(!has("10.1.2.3") && has("11.0.0.1") && has("9.255.255.255") && has("::1"));
    }

    #[test]
    fn a_missing_category_lists_those_present() {
        let e = geoip("geoip.dat", &sample_geoip(), "jp").unwrap_err();
        assert_eq!(
            e,
            "geoip.dat: no category \"jp\"; the file has US, CN, NOTPRIV"
        );
        let many: Vec<_> = (0..20).map(|i| (format!("C{i}"), vec![], false)).collect();
        let many: Vec<_> = many
            .iter()
            .map(|(n, v, i)| (n.as_str(), v.clone(), *i))
            .collect();
        let e = geoip("g", &encode::geoip(&many), "x").unwrap_err();
        assert!(e.ends_with("C11 and 8 more"), "{e}");
        let e = geoip("g", &[], "cn").unwrap_err();
        assert!(e.contains("no categories"), "{e}");
        let e = geosite("g", &[], "google@ads").unwrap_err();
        assert!(e.contains("attributes"), "{e}");
    }

    #[test]
    fn geoip_refuses_bad_cidrs_with_their_offset() {
        let bad_len = encode::geoip(&[("CN", vec![(vec![1, 2, 3], 24)], false)]);
        let e = geoip("g", &bad_len, "cn").unwrap_err();
        assert!(e.starts_with("g: byte ") && e.contains("3 bytes"), "{e}");
        let bad_prefix = encode::geoip(&[("CN", vec![(vec![1, 2, 3, 4], 33)], false)]);
        let e = geoip("g", &bad_prefix, "cn").unwrap_err();
        assert!(e.contains("/33"), "{e}");
        let mut cut = sample_geoip();
        cut.truncate(cut.len() - 3);
        let e = geoip("g", &cut, "notpriv").unwrap_err();
        assert!(e.contains("runs past its end"), "{e}");
    }

    #[test]
    fn geosite_maps_domain_types() {
        let bytes = encode::geosite(&[
            ("GOOGLE", vec![(2, "google.com")]),
            (
                "CN",
                vec![
                    (0, "Baidu"),
                    (1, "^ad\\d+\\."),
                    (2, "QQ.com"),
                    (3, "www.163.com."),
                ],
            ),
        ]);
        let d = geosite("geosite.dat", &bytes, "cn").unwrap();
        assert_eq!(d.keyword, vec!["baidu"]);
        assert_eq!(d.regex, vec!["^ad\\d+\\."]);
        assert_eq!(d.suffix, vec!["qq.com"]);
        assert_eq!(d.exact, vec!["www.163.com"]);
        let bad = encode::geosite(&[("CN", vec![(7, "x")])]);
        assert!(geosite("g", &bad, "cn").unwrap_err().contains("type 7"));
        let bad = encode::geosite(&[("CN", vec![(2, "a..b")])]);
        assert!(geosite("g", &bad, "cn")
            .unwrap_err()
            .contains("empty label"));
    }

    #[test]
    fn wrong_wire_types_and_garbage_are_refused() {
        // Field 1 as a varint where an entry message is expected.
        assert!(geoip("g", &[0x08, 0x01], "cn")
            .unwrap_err()
            .contains("wrong wire type"));
        assert!(geoip("g", &[0x0b], "cn")
            .unwrap_err()
            .contains("wire type 3"));
        assert!(geoip("g", &[0x0a, 0xff], "cn")
            .unwrap_err()
            .contains("inside a number"));
        assert!(geoip("g", &[0x0a; 11].map(|_| 0xff), "cn")
            .unwrap_err()
            .contains("longer than 10"));
    }
}
