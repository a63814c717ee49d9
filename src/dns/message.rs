//! DNS messages (RFC 1035), only as far as tproxyd needs them: the header
//! and its id, the first question, the answer records (A, AAAA, CNAME),
//! and the two replies made locally (an empty answer, SERVFAIL).
//!
//! Everything here reads bytes from the network: every offset is checked,
//! compression pointers may only point backwards (so a chain of them
//! always ends), a name is at most 255 bytes, and no function panics on
//! any input (property-tested below, fuzzed by `fuzz/fuzz_targets/dns_message.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::hostname::host_name;

pub const HEADER_LEN: usize = 12;
pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
pub const CLASS_IN: u16 = 1;
pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_SERVFAIL: u8 = 2;

/// A name on the wire is at most 255 bytes (RFC 1035 3.1).
const MAX_NAME_WIRE: usize = 255;
/// Records read from one answer section; a real answer has a handful, and
/// a message claiming 65535 must not make us walk (or allocate) that many.
const MAX_RECORDS: usize = 64;
/// CNAME links followed from the question's name.
const MAX_CHAIN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("message truncated (needed {needed} bytes, got {got})")]
    Truncated { needed: usize, got: usize },
    #[error("the message has no question")]
    NoQuestion,
    #[error("bad label type 0x{0:02x}")]
    BadLabel(u8),
    #[error("compression pointer to {to} does not point backwards (at {at})")]
    BadPointer { at: usize, to: usize },
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("not a query")]
    NotAQuery,
}

fn need(msg: &[u8], end: usize) -> Result<(), DnsError> {
    if msg.len() < end {
        Err(DnsError::Truncated {
            needed: end,
            got: msg.len(),
        })
    } else {
        Ok(())
    }
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16, DnsError> {
    need(msg, at.saturating_add(2))?;
    Ok(u16::from_be_bytes([msg[at], msg[at + 1]]))
}

fn u32_at(msg: &[u8], at: usize) -> Result<u32, DnsError> {
    need(msg, at.saturating_add(4))?;
    Ok(u32::from_be_bytes([
        msg[at],
        msg[at + 1],
        msg[at + 2],
        msg[at + 3],
    ]))
}

/// The fixed 12-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn parse(msg: &[u8]) -> Result<Header, DnsError> {
        need(msg, HEADER_LEN)?;
        Ok(Header {
            id: u16_at(msg, 0)?,
            flags: u16_at(msg, 2)?,
            qdcount: u16_at(msg, 4)?,
            ancount: u16_at(msg, 6)?,
            nscount: u16_at(msg, 8)?,
            arcount: u16_at(msg, 10)?,
        })
    }

    pub fn is_response(&self) -> bool {
        self.flags & 0x8000 != 0
    }

    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }

    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
}

/// The message's id, if it has a header.
pub fn id(msg: &[u8]) -> Option<u16> {
    u16_at(msg, 0).ok()
}

/// Writes `id` into the message's header; false when it has none.
pub fn set_id(msg: &mut [u8], id: u16) -> bool {
    match msg.get_mut(..2) {
        Some(head) => {
            head.copy_from_slice(&id.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Where the name starting at `at` ends (the offset after it), without
/// decoding it.
pub fn skip_name(msg: &[u8], at: usize) -> Result<usize, DnsError> {
    let mut pos = at;
    loop {
        need(msg, pos + 1)?;
        let len = msg[pos];
        match len & 0xc0 {
            0x00 if len == 0 => return Ok(pos + 1),
            0x00 => {
                pos += 1 + len as usize;
                if pos - at > MAX_NAME_WIRE {
                    return Err(DnsError::NameTooLong);
                }
            }
            // A pointer ends the name where it stands.
            0xc0 => {
                need(msg, pos + 2)?;
                return Ok(pos + 2);
            }
            _ => return Err(DnsError::BadLabel(len)),
        }
    }
}

/// The name starting at `at`, pointers followed, as the raw labels joined
/// by dots (not validated: a label may hold any byte), and the offset
/// after it where it stands.
///
/// A pointer must point before the label it is found in: that is what
/// compressors write, and it makes every chain of pointers end.
pub fn read_name(msg: &[u8], at: usize) -> Result<(Vec<u8>, usize), DnsError> {
    let mut out = Vec::new();
    let end = walk_name(msg, at, |label| {
        if !out.is_empty() {
            out.push(b'.');
        }
        out.extend_from_slice(label);
    })?;
    Ok((out, end))
}

/// The name starting at `at` written out uncompressed (length-prefixed
/// labels and the root), pointers followed; returns where it ends in `msg`.
fn copy_name(msg: &[u8], at: usize, out: &mut Vec<u8>) -> Result<usize, DnsError> {
    let end = walk_name(msg, at, |label| {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    })?;
    out.push(0);
    Ok(end)
}

/// Calls `label` for each label of the name at `at`, following pointers
/// (see [`read_name`]), and returns the offset after the name where it
/// stands.
fn walk_name(msg: &[u8], at: usize, mut label: impl FnMut(&[u8])) -> Result<usize, DnsError> {
    let mut pos = at;
    let mut end = None;
    let mut wire = 0usize;
    loop {
        need(msg, pos + 1)?;
        let len = msg[pos];
        match len & 0xc0 {
            0x00 if len == 0 => {
                return Ok(end.unwrap_or(pos + 1));
            }
            0x00 => {
                let label_end = pos + 1 + len as usize;
                need(msg, label_end)?;
                wire += 1 + len as usize;
                if wire > MAX_NAME_WIRE {
                    return Err(DnsError::NameTooLong);
                }
                label(&msg[pos + 1..label_end]);
                pos = label_end;
            }
            0xc0 => {
                need(msg, pos + 2)?;
                let to = (u16::from_be_bytes([msg[pos], msg[pos + 1]]) & 0x3fff) as usize;
                if to >= pos {
                    return Err(DnsError::BadPointer { at: pos, to });
                }
                end.get_or_insert(pos + 2);
                pos = to;
            }
            _ => return Err(DnsError::BadLabel(len)),
        }
    }
}

/// The first question of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The raw labels joined by dots.
    pub name: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset just after the question.
    pub end: usize,
}

impl Question {
    /// The name as a valid lowercased host name (what domain rules
    /// match), or None when it is not one.
    pub fn host(&self) -> Option<String> {
        host_name(&self.name)
    }
}

/// The message's first question.
pub fn question(msg: &[u8]) -> Result<Question, DnsError> {
    let header = Header::parse(msg)?;
    if header.qdcount == 0 {
        return Err(DnsError::NoQuestion);
    }
    let (name, at) = read_name(msg, HEADER_LEN)?;
    Ok(Question {
        name,
        qtype: u16_at(msg, at)?,
        qclass: u16_at(msg, at + 2)?,
        end: at + 4,
    })
}

/// One resource record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: Vec<u8>,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    /// The record's data: for A/AAAA the address, for CNAME the target
    /// (decoded, pointers followed).
    pub data: RecordData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    Addr(IpAddr),
    Name(Vec<u8>),
    Other,
}

/// The answer section's records (at most [`MAX_RECORDS`]); records after
/// a malformed one are not read.
pub fn answers(msg: &[u8]) -> Result<Vec<Record>, DnsError> {
    let header = Header::parse(msg)?;
    let mut pos = HEADER_LEN;
    for _ in 0..header.qdcount {
        pos = skip_name(msg, pos)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..(header.ancount as usize).min(MAX_RECORDS) {
        let (name, at) = read_name(msg, pos)?;
        let rtype = u16_at(msg, at)?;
        let class = u16_at(msg, at + 2)?;
        let ttl = u32_at(msg, at + 4)?;
        let len = u16_at(msg, at + 8)? as usize;
        let start = at + 10;
        need(msg, start + len)?;
        let rdata = &msg[start..start + len];
        let data = match (rtype, len) {
            (TYPE_A, 4) => RecordData::Addr(IpAddr::V4(Ipv4Addr::new(
                rdata[0], rdata[1], rdata[2], rdata[3],
            ))),
            (TYPE_AAAA, 16) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(rdata);
                RecordData::Addr(IpAddr::V6(Ipv6Addr::from(a)))
            }
            (TYPE_CNAME, _) => match read_name(msg, start) {
                Ok((target, end)) if end <= start + len => RecordData::Name(target),
                _ => RecordData::Other,
            },
            _ => RecordData::Other,
        };
        out.push(Record {
            name,
            rtype,
            class,
            ttl,
            data,
        });
        pos = start + len;
    }
    Ok(out)
}

/// What an answer teaches: each address the question's name resolves to
/// (directly, or through a chain of CNAMEs), with the name asked (the one
/// domain rules are written for, not the CDN's) and the shortest TTL on
/// the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    pub addr: IpAddr,
    pub name: String,
    pub ttl: u32,
}

/// The addresses a successful response gives for its question's name; an
/// empty list for anything else (queries, errors, names that are not
/// host names, malformed messages).
pub fn learn(msg: &[u8]) -> Vec<Learned> {
    let Ok(header) = Header::parse(msg) else {
        return Vec::new();
    };
    if !header.is_response() || header.rcode() != RCODE_NOERROR || header.ancount == 0 {
        return Vec::new();
    }
    let Ok(q) = question(msg) else {
        return Vec::new();
    };
    let Some(asked) = q.host() else {
        return Vec::new();
    };
    let Ok(records) = answers(msg) else {
        return Vec::new();
    };
    let same = |a: &[u8], b: &[u8]| a.eq_ignore_ascii_case(b);
    // Names that stand for the question's: it, and what its CNAMEs lead
    // to, each with the shortest TTL of the links that reach it.
    let mut names: Vec<(&[u8], u32)> = vec![(q.name.as_slice(), u32::MAX)];
    for _ in 0..MAX_CHAIN {
        let mut grew = false;
        for r in records.iter().filter(|r| r.class == CLASS_IN) {
            if let RecordData::Name(target) = &r.data {
                let reach = names
                    .iter()
                    .find(|(n, _)| same(n, &r.name))
                    .map(|&(_, ttl)| ttl.min(r.ttl));
                if let Some(ttl) = reach {
                    if !names.iter().any(|(n, _)| same(n, target)) {
                        names.push((target, ttl));
                        grew = true;
                    }
                }
            }
        }
        if !grew {
            break;
        }
    }
    records
        .iter()
        .filter(|r| r.class == CLASS_IN)
        .filter_map(|r| {
            let RecordData::Addr(addr) = r.data else {
                return None;
            };
            let (_, ttl) = names.iter().find(|(n, _)| same(n, &r.name))?;
            Some(Learned {
                addr,
                name: asked.clone(),
                ttl: r.ttl.min(*ttl),
            })
        })
        .collect()
}

/// A reply to `query` made here, with `rcode` and no records: the header
/// (id, opcode and RD kept; QR and RA set) and the first question echoed.
/// Err for anything that is not a query with a question.
pub fn reply_without_records(query: &[u8], rcode: u8) -> Result<Vec<u8>, DnsError> {
    let header = Header::parse(query)?;
    if header.is_response() {
        return Err(DnsError::NotAQuery);
    }
    let q = question(query)?;
    let mut out = Vec::with_capacity(q.end);
    out.extend_from_slice(&header.id.to_be_bytes());
    // QR | opcode | RD as asked | RA | rcode.
    let flags = 0x8000 | (header.flags & 0x7900) | 0x0080 | u16::from(rcode & 0xf);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    // Written out uncompressed, not copied: a pointer in the query's name
    // may point into the header, whose bytes differ in the reply (found by
    // the fuzzer: the echoed question then read as another name).
    copy_name(query, HEADER_LEN, &mut out)?;
    out.extend_from_slice(&q.qtype.to_be_bytes());
    out.extend_from_slice(&q.qclass.to_be_bytes());
    Ok(out)
}

/// NOERROR with no answer ("no data"): what a filtered AAAA question
/// gets. Not NXDOMAIN, which would tell the client the name does not
/// exist at all, A records included.
pub fn empty_answer(query: &[u8]) -> Result<Vec<u8>, DnsError> {
    reply_without_records(query, RCODE_NOERROR)
}

/// SERVFAIL: the query could not be answered (the upstream was lost).
pub fn servfail(query: &[u8]) -> Result<Vec<u8>, DnsError> {
    reply_without_records(query, RCODE_SERVFAIL)
}

pub const TYPE_SOA: u16 = 6;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_TSIG: u16 = 250;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_REFUSED: u8 = 5;
/// Header flags: truncated, checking disabled.
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_CD: u16 = 0x0010;
/// In an OPT record's TTL field: DNSSEC answers wanted (RFC 3225).
pub const EDNS_DO: u32 = 0x8000;

/// Which section a record stands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Answer,
    Authority,
    Additional,
}

/// Where one resource record stands in a message, for code that reads or
/// rewrites fields in place (the cache decrements TTLs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAt {
    pub section: Section,
    /// Offset of the record's first byte (its owner name).
    pub at: usize,
    pub rtype: u16,
    pub class: u16,
    /// For OPT: the extended rcode, version and flags (RFC 6891 6.1.3).
    pub ttl: u32,
    /// Offset of the 4-byte TTL field.
    pub ttl_at: usize,
    /// Offset and length of the record's data.
    pub rdata_at: usize,
    pub rdata_len: usize,
}

impl RecordAt {
    /// Offset just after the record.
    pub fn end(&self) -> usize {
        self.rdata_at + self.rdata_len
    }
}

/// Every record of every section, after the questions (all of them
/// skipped), and where the questions end. Err when any part is malformed
/// or the counts promise more than the message holds; how many are read
/// is bounded by the message's length (a record takes at least 11 bytes).
pub fn records(msg: &[u8]) -> Result<(usize, Vec<RecordAt>), DnsError> {
    let header = Header::parse(msg)?;
    let mut pos = HEADER_LEN;
    for _ in 0..header.qdcount {
        pos = skip_name(msg, pos)? + 4;
        need(msg, pos)?;
    }
    let questions_end = pos;
    let mut out = Vec::new();
    for (section, count) in [
        (Section::Answer, header.ancount),
        (Section::Authority, header.nscount),
        (Section::Additional, header.arcount),
    ] {
        for _ in 0..count {
            let start = pos;
            let at = skip_name(msg, pos)?;
            let rtype = u16_at(msg, at)?;
            let class = u16_at(msg, at + 2)?;
            let ttl = u32_at(msg, at + 4)?;
            let rdata_len = u16_at(msg, at + 8)? as usize;
            let rdata_at = at + 10;
            need(msg, rdata_at + rdata_len)?;
            out.push(RecordAt {
                section,
                at: start,
                rtype,
                class,
                ttl,
                ttl_at: at + 4,
                rdata_at,
                rdata_len,
            });
            pos = rdata_at + rdata_len;
        }
    }
    Ok((questions_end, out))
}

/// An SOA record's MINIMUM field (RFC 1035 3.3.13, the negative-caching
/// TTL of RFC 2308), when its data is well formed: two names, then five
/// 32-bit numbers ending exactly where the data ends.
pub fn soa_minimum(msg: &[u8], soa: &RecordAt) -> Option<u32> {
    let end = soa.end();
    let after_mname = skip_name(msg, soa.rdata_at).ok()?;
    let after_rname = skip_name(msg, after_mname).ok()?;
    if after_rname.checked_add(20)? != end {
        return None;
    }
    u32_at(msg, end - 4).ok()
}

/// The end of the first question's name when it is written out plainly
/// (labels only, no compression pointer), as every client writes it.
pub fn plain_qname_end(msg: &[u8]) -> Result<usize, DnsError> {
    let mut pos = HEADER_LEN;
    loop {
        need(msg, pos + 1)?;
        let len = msg[pos];
        if len == 0 {
            return Ok(pos + 1);
        }
        if len & 0xc0 != 0 {
            return Err(DnsError::BadLabel(len));
        }
        pos += 1 + len as usize;
        if pos - HEADER_LEN > MAX_NAME_WIRE {
            return Err(DnsError::NameTooLong);
        }
    }
}

/// Builders for tests and the fuzz target's seeds: a query and a response
/// in the layout resolvers write (names compressed against the question).
pub mod build {
    use super::*;

    /// `name` as labels, uncompressed.
    pub fn name(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len().min(63) as u8);
            out.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
        }
        out.push(0);
        out
    }

    /// A recursive query for `qname`/`qtype`.
    pub fn query(id: u16, qname: &str, qtype: u16) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&name(qname));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m
    }

    /// One answer record of a response.
    pub enum Answer<'a> {
        /// Owner: the question's name (a pointer to it) or a name given.
        A(Option<&'a str>, Ipv4Addr, u32),
        Aaaa(Option<&'a str>, Ipv6Addr, u32),
        Cname(Option<&'a str>, &'a str, u32),
    }

    /// The response to `query` with `answers`.
    pub fn response(query: &[u8], answers: &[Answer<'_>]) -> Vec<u8> {
        let mut m = query.to_vec();
        m[2] |= 0x80;
        m[3] |= 0x80;
        let n = answers.len() as u16;
        m[6..8].copy_from_slice(&n.to_be_bytes());
        for a in answers {
            let (owner, rtype, ttl, data) = match a {
                Answer::A(o, ip, ttl) => (o, TYPE_A, ttl, ip.octets().to_vec()),
                Answer::Aaaa(o, ip, ttl) => (o, TYPE_AAAA, ttl, ip.octets().to_vec()),
                Answer::Cname(o, target, ttl) => (o, TYPE_CNAME, ttl, name(target)),
            };
            match owner {
                None => m.extend_from_slice(&[0xc0, HEADER_LEN as u8]),
                Some(o) => m.extend_from_slice(&name(o)),
            }
            m.extend_from_slice(&rtype.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(data.len() as u16).to_be_bytes());
            m.extend_from_slice(&data);
        }
        m
    }

    fn bump(m: &mut [u8], at: usize) {
        let n = u16::from_be_bytes([m[at], m[at + 1]]).wrapping_add(1);
        m[at..at + 2].copy_from_slice(&n.to_be_bytes());
    }

    /// Appends an SOA for `zone` to the authority section (call before
    /// [`add_opt`]): what a negative answer carries (RFC 2308).
    pub fn add_soa(m: &mut Vec<u8>, zone: &str, ttl: u32, minimum: u32) {
        m.extend_from_slice(&name(zone));
        m.extend_from_slice(&TYPE_SOA.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&ttl.to_be_bytes());
        let mut data = name(&format!("ns.{zone}"));
        data.extend_from_slice(&name(&format!("hostmaster.{zone}")));
        for v in [2026120701u32, 7200, 900, 1_209_600, minimum] {
            data.extend_from_slice(&v.to_be_bytes());
        }
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(&data);
        bump(m, 8);
    }

    /// Appends an OPT record (EDNS0, 1232-byte payload, DO as given, the
    /// option bytes as given) to the additional section.
    pub fn add_opt(m: &mut Vec<u8>, dnssec_ok: bool, options: &[u8]) {
        m.push(0);
        m.extend_from_slice(&TYPE_OPT.to_be_bytes());
        m.extend_from_slice(&1232u16.to_be_bytes());
        let flags = if dnssec_ok { EDNS_DO } else { 0 };
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&(options.len() as u16).to_be_bytes());
        m.extend_from_slice(options);
        bump(m, 10);
    }

    /// Sets the response code (the low four bits of the flags).
    pub fn set_rcode(m: &mut [u8], rcode: u8) {
        m[3] = (m[3] & 0xf0) | (rcode & 0xf);
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_query_reads_back() {
        let q = query(0x1234, "WWW.Example.com", TYPE_AAAA);
        assert_eq!(id(&q), Some(0x1234));
        let question = question(&q).unwrap();
        assert_eq!(question.name, b"WWW.Example.com");
        assert_eq!(question.host().as_deref(), Some("www.example.com"));
        assert_eq!((question.qtype, question.qclass), (TYPE_AAAA, CLASS_IN));
        assert_eq!(question.end, q.len());
        let h = Header::parse(&q).unwrap();
        assert!(!h.is_response());
        assert_eq!((h.opcode(), h.qdcount), (0, 1));
    }

    #[test]
    fn answers_through_a_cname_chain_teach_the_name_asked() {
        let q = query(7, "www.example.com", TYPE_A);
        let r = response(
            &q,
            &[
                Answer::Cname(None, "www.example.com.cdn.example.net", 300),
                Answer::Cname(
                    Some("www.example.com.cdn.example.net"),
                    "edge7.cdn.example.net",
                    60,
                ),
                Answer::A(
                    Some("edge7.cdn.example.net"),
                    Ipv4Addr::new(198, 51, 100, 7),
                    120,
                ),
                // Not on the chain: never learned.
                Answer::A(
                    Some("other.example.org"),
                    Ipv4Addr::new(198, 51, 100, 9),
                    120,
                ),
            ],
        );
        let learned = learn(&r);
        assert_eq!(
            learned,
            vec![Learned {
                addr: v4("198.51.100.7"),
                name: "www.example.com".into(),
                ttl: 60
            }]
        );
        let direct = response(
            &query(8, "a.example", TYPE_AAAA),
            &[Answer::Aaaa(None, "2001:db8::7".parse().unwrap(), 30)],
        );
        assert_eq!(
            learn(&direct)[0].addr,
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(learn(&direct)[0].ttl, 30);
    }

    #[test]
    fn nothing_is_learned_from_queries_errors_or_odd_names() {
        let q = query(7, "a.example", TYPE_A);
        assert!(learn(&q).is_empty());
        let mut r = response(&q, &[Answer::A(None, Ipv4Addr::new(198, 51, 100, 1), 5)]);
        assert_eq!(learn(&r).len(), 1);
        r[3] |= 3; // NXDOMAIN
        assert!(learn(&r).is_empty());
        let odd = response(
            &query(7, "_dmarc.example", TYPE_A),
            &[Answer::A(None, Ipv4Addr::new(198, 51, 100, 1), 5)],
        );
        assert!(learn(&odd).is_empty());
    }

    #[test]
    fn the_empty_answer_echoes_the_question_with_noerror() {
        let q = query(0xbeef, "v6only.example", TYPE_AAAA);
        let r = empty_answer(&q).unwrap();
        let h = Header::parse(&r).unwrap();
        assert_eq!(h.id, 0xbeef);
        assert!(h.is_response());
        assert_eq!(h.rcode(), RCODE_NOERROR);
        assert_eq!((h.qdcount, h.ancount, h.nscount, h.arcount), (1, 0, 0, 0));
        assert_eq!(h.flags & 0x0100, 0x0100, "RD kept");
        assert_eq!(question(&r).unwrap(), question(&q).unwrap());
        assert_eq!(Header::parse(&servfail(&q).unwrap()).unwrap().rcode(), 2);
        // A response is not answered.
        assert_eq!(empty_answer(&r), Err(DnsError::NotAQuery));
    }

    #[test]
    fn pointer_loops_and_forward_pointers_are_refused() {
        let mut m = query(1, "a.example", TYPE_A);
        // The question's name becomes a pointer to itself.
        m.truncate(HEADER_LEN);
        m.extend_from_slice(&[0xc0, HEADER_LEN as u8, 0, 1, 0, 1]);
        assert!(matches!(question(&m), Err(DnsError::BadPointer { .. })));
        // A pointer past its own place.
        let mut f = m.clone();
        f[HEADER_LEN + 1] = 40;
        assert!(matches!(question(&f), Err(DnsError::BadPointer { .. })));
    }

    /// The fuzzer's find: a question whose name points into the header
    /// was echoed byte for byte, and in the reply's header (other flags
    /// and counts) the pointer read another name.
    #[test]
    fn a_question_pointing_into_the_header_is_echoed_as_the_same_name() {
        let input = include_bytes!("../../fuzz/corpus/dns_message/question-points-into-header");
        let q = question(input).unwrap();
        for reply in [empty_answer(input).unwrap(), servfail(input).unwrap()] {
            assert_eq!(
                question(&reply).unwrap(),
                Question {
                    end: reply.len(),
                    ..q.clone()
                }
            );
        }
    }

    #[test]
    fn set_id_rewrites_only_the_id() {
        let mut q = query(1, "a.example", TYPE_A);
        let before = q.clone();
        assert!(set_id(&mut q, 0xabcd));
        assert_eq!(id(&q), Some(0xabcd));
        assert_eq!(q[2..], before[2..]);
        assert!(!set_id(&mut [0u8; 1], 5));
    }

    /// The fuzz target's seeds are what they say (written by hand, with
    /// compression pointers a resolver would use).
    #[test]
    fn the_fuzz_seeds_parse() {
        let chain = include_bytes!("../../fuzz/corpus/dns_message/response-cname-chain");
        let learned = learn(chain);
        assert_eq!(learned.len(), 1, "{learned:?}");
        assert_eq!(learned[0].name, "www.example.com");
        assert_eq!(learned[0].addr, v4("198.51.100.7"));
        assert_eq!(learned[0].ttl, 60);
        let edns = include_bytes!("../../fuzz/corpus/dns_message/query-edns");
        assert_eq!(
            Header::parse(&empty_answer(edns).unwrap()).unwrap().arcount,
            0
        );
        let aaaa = include_bytes!("../../fuzz/corpus/dns_message/query-aaaa");
        assert_eq!(question(aaaa).unwrap().qtype, TYPE_AAAA);
        let looped = include_bytes!("../../fuzz/corpus/dns_message/pointer-loop");
        assert!(question(looped).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Random bytes: every reader returns, never panics.
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = Header::parse(&bytes);
            let _ = question(&bytes);
            let _ = answers(&bytes);
            let _ = learn(&bytes);
            let _ = empty_answer(&bytes);
            let _ = servfail(&bytes);
            for at in 0..bytes.len().min(32) {
                let _ = read_name(&bytes, at);
                let _ = skip_name(&bytes, at);
            }
        }

        /// Real responses with bytes changed, cut or added: no panic, and
        /// whatever is learned names a valid host.
        #[test]
        fn mutated_responses_never_panic(
            name in "[a-z]{1,10}(\\.[a-z0-9]{1,10}){0,3}\\.[a-z]{2,6}",
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let q = query(9, &name, TYPE_A);
            let mut r = response(&q, &[
                Answer::Cname(None, "c.example", 50),
                Answer::A(Some("c.example"), Ipv4Addr::new(198, 51, 100, 3), 10),
                Answer::Aaaa(None, "2001:db8::3".parse().unwrap(), 10),
            ]);
            prop_assert_eq!(learn(&r).len(), 2);
            for (i, b) in edits {
                let at = i.index(r.len());
                r[at] = b;
            }
            r.truncate(cut.index(r.len() + 1));
            for l in learn(&r) {
                prop_assert!(crate::hostname::is_host_name(&l.name), "{:?}", l.name);
            }
            let _ = answers(&r);
            if let Ok(reply) = empty_answer(&r) {
                let same = |q: Question| (q.name, q.qtype, q.qclass);
                prop_assert_eq!(question(&reply).ok().map(same), question(&r).ok().map(same));
            }
        }

        /// The local answers echo any well-formed query's question and id.
        #[test]
        fn local_answers_echo_the_question(
            id in any::<u16>(), name in "[a-zA-Z0-9-]{1,20}(\\.[a-z]{1,8}){0,4}", qtype in any::<u16>(),
        ) {
            let q = query(id, &name, qtype);
            for r in [empty_answer(&q).unwrap(), servfail(&q).unwrap()] {
                let h = Header::parse(&r).unwrap();
                prop_assert_eq!(h.id, id);
                prop_assert!(h.is_response());
                prop_assert_eq!(h.ancount, 0);
                prop_assert_eq!(question(&r).unwrap(), question(&q).unwrap());
            }
        }
    }
}
