//! TLS: the server name (SNI) of a ClientHello.
//!
//! The ClientHello is reassembled from as many handshake records as it
//! was cut into, and from however many TCP segments the caller has seen:
//! with post-quantum key shares (X25519MLKEM768 adds 1,184 bytes) it is
//! ~1.8 KB, more than one MTU, and Go's crypto/tls sends it in two
//! segments; anti-DPI tools cut it into several TLS records on purpose.
//! Peers that parse a single record only (mihomo, Xray) miss those names.
//!
//! The name is the client's claim, not the destination's: an ECH client
//! puts its ECHConfig's public name (e.g. `cloudflare-ech.com`) in this
//! outer SNI, and clients such as cloudflared dial one host while naming
//! another. Hence the name routes the flow and never replaces its
//! address unless an outbound is told to send it (`send_domain`).

use super::{Sniff, MAX_SNIFF_BYTES};
use crate::hostname::host_name;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER: usize = 5;
/// A plaintext record carries at most 2^14 bytes (RFC 8446 5.1); anything
/// longer is not TLS from a client that follows the RFC.
const MAX_RECORD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// Sniffs `bytes`, the start of a TCP stream.
pub fn sniff(bytes: &[u8]) -> Sniff {
    match reassemble(bytes) {
        Reassembly::Complete(body) => parse_client_hello(&body),
        Reassembly::NeedMore if bytes.len() < MAX_SNIFF_BYTES => Sniff::NeedMore,
        Reassembly::NeedMore | Reassembly::NotThis => Sniff::NotThis,
    }
}

/// Sniffs `message`, a bare handshake stream without the record layer, as
/// QUIC carries it in CRYPTO frames (RFC 9001 4.1): the ClientHello's
/// 4-byte header and body, possibly followed by more.
pub fn sniff_handshake(message: &[u8]) -> Sniff {
    match message {
        [] => return Sniff::NeedMore,
        [t, ..] if *t != HANDSHAKE_CLIENT_HELLO => return Sniff::NotThis,
        _ if message.len() < 4 => return Sniff::NeedMore,
        _ => {}
    }
    let body_len =
        usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]);
    if body_len > MAX_SNIFF_BYTES {
        return Sniff::NotThis;
    }
    match message.get(4..4 + body_len) {
        Some(body) => parse_client_hello(body),
        None => Sniff::NeedMore,
    }
}

enum Reassembly {
    /// The ClientHello body (after its 4-byte handshake header).
    Complete(Vec<u8>),
    NeedMore,
    NotThis,
}

/// Joins the handshake records' payloads until the first handshake
/// message is whole. Every header byte is checked as soon as it is there,
/// so a stream that is not TLS is told apart from its first byte on.
fn reassemble(bytes: &[u8]) -> Reassembly {
    let mut message: Vec<u8> = Vec::new();
    let mut rest = bytes;
    loop {
        // Record header: type 22, version 3.x (x ≤ 4), length.
        match rest {
            [] => return Reassembly::NeedMore,
            [t, ..] if *t != CONTENT_HANDSHAKE => return Reassembly::NotThis,
            [_, major, ..] if *major != 3 => return Reassembly::NotThis,
            [_, _, minor, ..] if *minor > 4 => return Reassembly::NotThis,
            _ if rest.len() < RECORD_HEADER => return Reassembly::NeedMore,
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        // Zero-length handshake fragments are forbidden (RFC 8446 5.1).
        if len == 0 || len > MAX_RECORD {
            return Reassembly::NotThis;
        }
        let payload = &rest[RECORD_HEADER..];
        let available = len.min(payload.len());
        message.extend_from_slice(&payload[..available]);
        // Handshake header: type 1, 24-bit length.
        if message
            .first()
            .is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO)
        {
            return Reassembly::NotThis;
        }
        if message.len() >= 4 {
            let body_len = usize::from(message[1]) << 16
                | usize::from(message[2]) << 8
                | usize::from(message[3]);
            if body_len > MAX_SNIFF_BYTES {
                return Reassembly::NotThis;
            }
            if message.len() >= 4 + body_len {
                message.truncate(4 + body_len);
                message.drain(..4);
                return Reassembly::Complete(message);
            }
        }
        if available < len {
            return Reassembly::NeedMore;
        }
        rest = &payload[len..];
    }
}

/// A cursor over a message; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a 1-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    /// A vector with a 2-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The ClientHello body: version, random, session id, cipher suites,
/// compression methods, extensions (RFC 8446 4.1.2, RFC 5246 7.4.1.2).
fn parse_client_hello(body: &[u8]) -> Sniff {
    match server_name(body) {
        Some(host) => Sniff::Found { host },
        None => Sniff::NotThis,
    }
}

/// None: malformed. Some(None): well-formed, without a usable name.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    let version = r.take(2)?;
    if version[0] != 3 {
        return None;
    }
    r.take(32)?;
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.vec8()?.is_empty() {
        return None;
    }
    if r.is_empty() {
        // No extensions at all (SSL 3.0 style): TLS, but nameless.
        return Some(None);
    }
    let mut extensions = Reader(r.vec16()?);
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind == EXT_SERVER_NAME {
            return sni_host(data);
        }
    }
    Some(None)
}

/// server_name extension (RFC 6066 3): a list of (type, name); the first
/// host_name entry is the one servers use.
fn sni_host(data: &[u8]) -> Option<Option<String>> {
    let mut ext = Reader(data);
    let mut list = Reader(ext.vec16()?);
    while !list.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == NAME_TYPE_HOST {
            // RFC 6066: no trailing dot, never an IP literal; host_name
            // refuses both, and the flow is then routed by address.
            return Some(host_name(name));
        }
    }
    Some(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A real ClientHello, as `openssl s_client -servername www.Example.com
    /// -alpn h2,http/1.1` (OpenSSL 3.0) sent it: one record, 339 bytes.
    const OPENSSL: &[u8] = include_bytes!("testdata/openssl_client_hello.bin");

    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }

    fn vec16(data: &[u8]) -> Vec<u8> {
        let mut v = (data.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(data);
        v
    }

    /// A handshake message shaped like Chrome's ClientHello: GREASE,
    /// X25519MLKEM768 (0x11EC) key share of `pq_share` bytes (1,216 for a
    /// real one: ML-KEM-768 1,184 + X25519 32) beside X25519, a GREASE ECH
    /// extension, and the server_name after several other extensions.
    pub(crate) fn client_hello(sni: Option<&str>, pq_share: usize) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend((0..32u8).map(|i| i.wrapping_mul(37)));
        body.push(32);
        body.extend((0..32u8).map(|i| i ^ 0x5a));
        let suites: [u16; 16] = [
            0x8a8a, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
            0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
        ];
        let suites: Vec<u8> = suites.iter().flat_map(|s| s.to_be_bytes()).collect();
        body.extend(vec16(&suites));
        body.extend([1, 0]);
        let mut exts = Vec::new();
        ext(&mut exts, 0x3a3a, &[]);
        ext(&mut exts, 0x0017, &[]);
        ext(&mut exts, 0xff01, &[0]);
        ext(
            &mut exts,
            0x000a,
            &vec16(&[0x4a, 0x4a, 0x11, 0xec, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18]),
        );
        ext(&mut exts, 0x000b, &[1, 0]);
        ext(&mut exts, 0x0023, &[]);
        if let Some(name) = sni {
            let mut entry = vec![NAME_TYPE_HOST];
            entry.extend(vec16(name.as_bytes()));
            ext(&mut exts, EXT_SERVER_NAME, &vec16(&entry));
        }
        ext(&mut exts, 0x0010, &vec16(b"\x02h2\x08http/1.1"));
        ext(&mut exts, 0x0005, &[1, 0, 0, 0, 0]);
        ext(
            &mut exts,
            0x000d,
            &vec16(&[4, 3, 8, 4, 4, 1, 5, 3, 8, 5, 5, 1, 8, 6, 6, 1]),
        );
        ext(&mut exts, 0x0012, &[]);
        let mut shares = Vec::new();
        shares.extend([0x4a, 0x4a, 0, 1, 0]);
        if pq_share > 0 {
            shares.extend([0x11, 0xec]);
            shares.extend(vec16(&vec![0xab; pq_share]));
        }
        shares.extend([0x00, 0x1d]);
        shares.extend(vec16(&[0xcd; 32]));
        ext(&mut exts, 0x0033, &vec16(&shares));
        ext(&mut exts, 0x002d, &[1, 1]);
        ext(&mut exts, 0x002b, &[6, 0x6a, 0x6a, 3, 4, 3, 3]);
        ext(&mut exts, 0x001b, &[2, 0, 2]);
        ext(&mut exts, 0x4469, &vec16(b"\x02h2"));
        let mut ech = vec![0, 0, 1, 0, 1, 0x42];
        ech.extend(vec16(&[0x11; 32]));
        ech.extend(vec16(&[0x22; 144]));
        ext(&mut exts, 0xfe0d, &ech);
        ext(&mut exts, 0x1a1a, &[0]);
        body.extend(vec16(&exts));
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    /// `message` cut into handshake records of at most `fragment` bytes.
    pub(crate) fn records(message: &[u8], fragment: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(fragment.max(1)) {
            out.extend([CONTENT_HANDSHAKE, 3, 1]);
            out.extend((chunk.len() as u16).to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    fn found(host: &str) -> Sniff {
        Sniff::Found {
            host: Some(host.into()),
        }
    }

    #[test]
    fn a_real_openssl_client_hello() {
        assert_eq!(sniff(OPENSSL), found("www.example.com"));
        // Every strict prefix is a valid beginning.
        for n in 0..OPENSSL.len() {
            assert_eq!(sniff(&OPENSSL[..n]), Sniff::NeedMore, "prefix {n}");
        }
    }

    #[test]
    fn a_post_quantum_client_hello_over_one_mtu_in_two_records() {
        let hello = client_hello(Some("pq.example"), 1216);
        assert!(hello.len() > 1500, "{}", hello.len());
        let one = records(&hello, 16384);
        assert_eq!(sniff(&one), found("pq.example"));
        // The key share cut in the middle: two records, as anti-DPI
        // tools do; and as two TCP segments (a prefix is NeedMore).
        let two = records(&hello, 1000);
        assert_eq!(two.len(), hello.len() + 10);
        assert_eq!(sniff(&two), found("pq.example"));
        assert_eq!(sniff(&two[..500]), Sniff::NeedMore);
        assert_eq!(sniff(&two[..1005]), Sniff::NeedMore);
        assert_eq!(sniff(&two[..1006]), Sniff::NeedMore);
        // Tiny records: the handshake header itself is split.
        assert_eq!(sniff(&records(&hello, 1)), found("pq.example"));
        assert_eq!(sniff(&records(&hello, 3)), found("pq.example"));
    }

    #[test]
    fn a_bare_handshake_stream_as_quic_carries_it() {
        let hello = client_hello(Some("q.example"), 1216);
        assert_eq!(sniff_handshake(&hello), found("q.example"));
        for n in 0..hello.len() {
            assert_eq!(sniff_handshake(&hello[..n]), Sniff::NeedMore, "prefix {n}");
        }
        let mut more = hello.clone();
        more.extend(b"\x0bsomething else");
        assert_eq!(sniff_handshake(&more), found("q.example"));
        assert_eq!(sniff_handshake(b"\x02\x00\x00\x01"), Sniff::NotThis);
        assert_eq!(sniff_handshake(b"\x01\x01\x00\x01"), Sniff::NotThis);
    }

    #[test]
    fn bytes_after_the_client_hello_are_ignored() {
        let mut stream = records(&client_hello(Some("a.example"), 0), 16384);
        stream.extend(b"\x14\x03\x03\x00\x01\x01garbage");
        assert_eq!(sniff(&stream), found("a.example"));
    }

    #[test]
    fn tls_without_a_usable_name_is_still_tls() {
        let nameless = Sniff::Found { host: None };
        assert_eq!(sniff(&records(&client_hello(None, 0), 16384)), nameless);
        for bad in ["192.0.2.1", "example.com.", "a_b.example", ""] {
            let hello = client_hello(Some(bad), 0);
            assert_eq!(sniff(&records(&hello, 16384)), nameless, "{bad:?}");
        }
    }

    #[test]
    fn not_tls_is_told_at_the_first_wrong_byte() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"G"), Sniff::NotThis);
        assert_eq!(sniff(b"\x16\x02"), Sniff::NotThis);
        assert_eq!(sniff(b"\x16\x03\x09"), Sniff::NotThis);
        // Zero-length and oversized records.
        assert_eq!(sniff(b"\x16\x03\x01\x00\x00"), Sniff::NotThis);
        assert_eq!(sniff(b"\x16\x03\x01\x40\x01"), Sniff::NotThis);
        // A handshake that is not a ClientHello (ServerHello = 2).
        assert_eq!(sniff(b"\x16\x03\x03\x00\x04\x02"), Sniff::NotThis);
        // A ClientHello claiming more than the bound.
        assert_eq!(
            sniff(b"\x16\x03\x01\x00\x04\x01\x01\x00\x01"),
            Sniff::NotThis
        );
        // An alert record between two fragments.
        let hello = client_hello(Some("a.example"), 0);
        let mut split = records(&hello[..100], 100);
        split.extend(b"\x15\x03\x03\x00\x02\x02\x28");
        assert_eq!(sniff(&split), Sniff::NotThis);
    }

    #[test]
    fn malformed_lengths_are_not_tls() {
        let hello = client_hello(Some("a.example"), 0);
        // Session id length 33.
        let mut bad = hello.clone();
        bad[4 + 34] = 33;
        assert_eq!(sniff(&records(&bad, 16384)), Sniff::NotThis);
        // The extensions block longer than the message.
        let mut bad = hello.clone();
        let ext_len_at = 4 + 2 + 32 + 1 + 32 + 2 + 32 + 2;
        bad[ext_len_at] = 0xff;
        assert_eq!(sniff(&records(&bad, 16384)), Sniff::NotThis);
    }

    #[test]
    fn a_stream_that_never_completes_is_dropped_at_the_bound() {
        // Records of 16 KiB carrying a ClientHello that claims just under
        // 64 KiB: with the record headers it is over the bound.
        let hello = {
            let mut h = vec![HANDSHAKE_CLIENT_HELLO, 0x00, 0xff, 0xf0];
            h.resize(4 + 0xfff0, 0);
            h
        };
        let stream = records(&hello, MAX_RECORD);
        assert_eq!(sniff(&stream[..MAX_SNIFF_BYTES - 1]), Sniff::NeedMore);
        assert_eq!(sniff(&stream[..MAX_SNIFF_BYTES]), Sniff::NotThis);
    }

    fn streams() -> impl Strategy<Value = (Vec<u8>, String)> {
        let name = "[a-z][a-z0-9-]{0,20}[a-z0-9](\\.[a-z][a-z0-9]{0,10}){0,3}";
        (name, 0usize..1500, 1usize..=16384, any::<bool>()).prop_map(
            |(name, pq, fragment, real)| {
                if real {
                    (OPENSSL.to_vec(), "www.example.com".to_string())
                } else {
                    (records(&client_hello(Some(&name), pq), fragment), name)
                }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = sniff(&bytes);
        }

        #[test]
        fn never_panics_on_random_bytes_behind_a_tls_header(
            len in 0u16..=u16::MAX,
            body in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let mut bytes = vec![CONTENT_HANDSHAKE, 3, 1];
            bytes.extend(len.to_be_bytes());
            bytes.push(HANDSHAKE_CLIENT_HELLO);
            bytes.extend(body);
            let _ = sniff(&bytes);
        }

        #[test]
        fn every_record_split_and_prefix_gives_the_name((stream, name) in streams(), cut in 0.0f64..1.0) {
            prop_assert_eq!(sniff(&stream), found(&name));
            let at = (stream.len() as f64 * cut) as usize;
            prop_assert_eq!(sniff(&stream[..at]), Sniff::NeedMore);
        }

        #[test]
        fn never_panics_on_mutated_client_hellos(
            (stream, _) in streams(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = stream;
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let answer = sniff(&bytes[..cut.index(bytes.len() + 1)]);
            if let Sniff::Found { host: Some(h) } = answer {
                prop_assert!(crate::hostname::is_host_name(&h), "{:?}", h);
            }
        }
    }
}
