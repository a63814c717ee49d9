//! QUIC: the server name in a client's Initial packets (HTTP/3).
//!
//! A QUIC client's first flight carries its TLS ClientHello in CRYPTO
//! frames of Initial packets. Those are encrypted, but with keys anyone
//! can derive from the first packet's Destination Connection ID (RFC 9001
//! 5.2, RFC 9369 3.3): HKDF-SHA256 over a per-version salt, then
//! "client in" and the key/iv/hp labels. The sniffer removes the header
//! protection (an AES-128-ECB mask over a sample of the ciphertext, which
//! also hides the packet number's length: it is read, never assumed),
//! opens the packet with AES-128-GCM, and walks its frames.
//!
//! What real clients send, and peers got wrong: Chrome's ClientHello with
//! a post-quantum key share spans two Initial packets in two datagrams;
//! it starts packet numbers at 1, scatters the ClientHello over many small
//! CRYPTO frames out of order, and mixes PING and PADDING in. So CRYPTO
//! data is reassembled by offset across packets and datagrams, in any
//! order; coalesced packets in one datagram are walked (0-RTT and
//! Handshake ones skipped by their Length); and the contiguous prefix goes
//! to the same ClientHello parser as TCP's ([`tls::sniff_handshake`]).
//!
//! Everything is bounded: CRYPTO data up to [`MAX_CRYPTO_BYTES`] in at
//! most [`MAX_FRAGMENTS`] out-of-order pieces, and [`MAX_DATAGRAMS`]
//! datagrams, after which the flow counts as QUIC without a name. The
//! datagrams themselves are only read: the relay sends them on unchanged.

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes::Aes128;
use aes_gcm::aead::{Nonce, Tag};
use aes_gcm::{AeadInOut, Aes128Gcm};
use hkdf::Hkdf;
use sha2::Sha256;

use super::{tls, Sniff, Sniffed, MAX_SNIFF_BYTES};
use crate::config::SniffProtocol;

/// QUIC version 1 (RFC 9000).
pub const VERSION_1: u32 = 0x0000_0001;
/// QUIC version 2 (RFC 9369).
pub const VERSION_2: u32 = 0x6b33_43cf;

const SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];
const SALT_V2: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb,
    0xf9, 0xbd, 0x2e, 0xd9,
];

/// A client pads every datagram carrying an Initial to at least this
/// (RFC 9000 14.1); servers drop smaller ones, so nothing smaller is
/// worth holding for.
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
/// Most CRYPTO bytes looked at: the TCP sniffer's bound (a ClientHello of
/// any size a real client sends fits many times over).
pub const MAX_CRYPTO_BYTES: usize = MAX_SNIFF_BYTES;
/// Most datagrams fed before giving up on the name: Chrome needs two, a
/// ClientHello of 10 KB would need nine full Initials.
pub const MAX_DATAGRAMS: usize = 8;
/// Most CRYPTO pieces waiting beyond a gap: real clients scatter a few
/// dozen at most; the bound keeps the bookkeeping small.
pub const MAX_FRAGMENTS: usize = 128;
const MAX_CID_LEN: usize = 20;
/// A client's first Destination Connection ID is at least 8 bytes (RFC
/// 9000 7.2); shorter ones are not a first Initial.
const MIN_FIRST_DCID_LEN: usize = 8;
const TAG_LEN: usize = 16;
const SAMPLE_LEN: usize = 16;

/// The QUIC versions whose Initial packets can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn from_wire(version: u32) -> Option<Version> {
        match version {
            VERSION_1 => Some(Version::V1),
            VERSION_2 => Some(Version::V2),
            _ => None,
        }
    }

    pub fn wire(self) -> u32 {
        match self {
            Version::V1 => VERSION_1,
            Version::V2 => VERSION_2,
        }
    }

    fn salt(self) -> &'static [u8; 20] {
        match self {
            Version::V1 => &SALT_V1,
            Version::V2 => &SALT_V2,
        }
    }

    /// The key, iv and hp labels (RFC 9369 3.3.2 renames them).
    fn labels(self) -> [&'static [u8]; 3] {
        match self {
            Version::V1 => [b"quic key", b"quic iv", b"quic hp"],
            Version::V2 => [b"quicv2 key", b"quicv2 iv", b"quicv2 hp"],
        }
    }

    /// The long-header type bits of an Initial: version 2 moved every
    /// type (RFC 9369 3.2), so a v1 sniffer reading v2 would take a
    /// 0-RTT packet for an Initial.
    fn initial_type(self) -> u8 {
        match self {
            Version::V1 => 0b00,
            Version::V2 => 0b01,
        }
    }

    fn retry_type(self) -> u8 {
        match self {
            Version::V1 => 0b11,
            Version::V2 => 0b00,
        }
    }
}

/// Why a packet was not read. Kept for the debug log; the sniff answer
/// itself is [`QuicAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicError {
    #[error("truncated packet")]
    Truncated,
    #[error("a short-header packet (no Initial follows it in the datagram)")]
    ShortHeader,
    #[error("QUIC version {0:#010x} is not one tproxyd reads")]
    Version(u32),
    #[error("a connection ID longer than 20 bytes")]
    CidLength,
    #[error("the first Initial's destination connection ID is shorter than 8 bytes")]
    ShortDcid,
    #[error("a Retry packet from the client")]
    Retry,
    #[error("the packet failed authentication (not an Initial of this connection)")]
    Decrypt,
    #[error("frame type {0:#x} is not allowed in an Initial packet")]
    Frame(u64),
    #[error("CRYPTO data beyond {MAX_CRYPTO_BYTES} bytes")]
    CryptoTooLong,
    #[error("CRYPTO data in more than {MAX_FRAGMENTS} pieces beyond a gap")]
    TooFragmented,
    #[error("the client closed the connection")]
    Closed,
}

/// What the sniffer says after a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuicAnswer {
    /// A client Initial was read; the ClientHello is not complete yet.
    NeedMore,
    /// Done: QUIC, with the name when the ClientHello had a valid one
    /// (None: the flow is QUIC but no name could be had within bounds).
    Done(Option<Sniffed>),
    /// The first datagram held no client Initial that opened.
    NotQuic,
}

/// The client's Initial packet protection.
struct Keys {
    aead: Aes128Gcm,
    iv: [u8; 12],
    hp: Aes128,
}

impl Keys {
    /// The client Initial keys for a connection whose first Destination
    /// Connection ID is `dcid` (RFC 9001 5.2).
    fn client_initial(version: Version, dcid: &[u8]) -> Keys {
        let (_, initial) = Hkdf::<Sha256>::extract(Some(version.salt()), dcid);
        let mut secret = [0u8; 32];
        expand_label(&initial, b"client in", &mut secret);
        // A 32-byte PRK is exactly SHA-256's length: always accepted.
        let client = Hkdf::<Sha256>::from_prk(&secret).expect("a SHA-256 sized PRK");
        let [key_label, iv_label, hp_label] = version.labels();
        let (mut key, mut iv, mut hp) = ([0u8; 16], [0u8; 12], [0u8; 16]);
        expand_label(&client, key_label, &mut key);
        expand_label(&client, iv_label, &mut iv);
        expand_label(&client, hp_label, &mut hp);
        Keys {
            aead: Aes128Gcm::new(&key.into()),
            iv,
            hp: Aes128::new(&hp.into()),
        }
    }

    /// The header protection mask for a 16-byte sample (RFC 9001 5.4.3).
    fn mask(&self, sample: &[u8; SAMPLE_LEN]) -> [u8; 16] {
        let mut block = aes::Block::from(*sample);
        self.hp.encrypt_block(&mut block);
        block.into()
    }

    fn nonce(&self, pn: u64) -> Nonce<Aes128Gcm> {
        let mut nonce = self.iv;
        for (n, p) in nonce[4..].iter_mut().zip(pn.to_be_bytes()) {
            *n ^= p;
        }
        nonce.into()
    }
}

/// HKDF-Expand-Label of TLS 1.3 (RFC 8446 7.1) with an empty context.
fn expand_label(hkdf: &Hkdf<Sha256>, label: &[u8], out: &mut [u8]) {
    const PREFIX: &[u8] = b"tls13 ";
    // The labels here are at most 10 bytes ("quicv2 key").
    let mut info = [0u8; 2 + 1 + 6 + 16 + 1];
    let full = PREFIX.len() + label.len();
    info[..2].copy_from_slice(&(out.len() as u16).to_be_bytes());
    info[2] = full as u8;
    info[3..3 + PREFIX.len()].copy_from_slice(PREFIX);
    info[3 + PREFIX.len()..3 + full].copy_from_slice(label);
    // info[3 + full] = 0: the empty context.
    // Outputs of at most 32 bytes are far below HKDF's 255 × 32 limit.
    hkdf.expand(&info[..4 + full], out)
        .expect("a short HKDF output");
}

/// A bounds-checked cursor; every read is a `Result`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], QuicError> {
        let end = self.pos.checked_add(n).ok_or(QuicError::Truncated)?;
        let out = self.buf.get(self.pos..end).ok_or(QuicError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, QuicError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, QuicError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A variable-length integer (RFC 9000 16): the top two bits of the
    /// first byte give its length, 1, 2, 4 or 8 bytes.
    fn varint(&mut self) -> Result<u64, QuicError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut value = u64::from(first & 0x3f);
        for &b in self.take(len - 1)? {
            value = value << 8 | u64::from(b);
        }
        Ok(value)
    }

    fn varint_usize(&mut self) -> Result<usize, QuicError> {
        usize::try_from(self.varint()?).map_err(|_| QuicError::Truncated)
    }

    /// A connection ID: one length byte, at most 20 bytes (RFC 9000 17.2).
    fn cid(&mut self) -> Result<&'a [u8], QuicError> {
        let len = usize::from(self.u8()?);
        if len > MAX_CID_LEN {
            return Err(QuicError::CidLength);
        }
        self.take(len)
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

/// Whether `datagram` can be a client's first Initial: a long header of
/// a version read here with the Initial type bits, a first Destination
/// Connection ID of 8 to 20 bytes, and the 1,200-byte minimum. A cheap
/// look at six bytes, for the relay to decide whether to hold a flow;
/// 1-RTT (short header) datagrams fail at the first byte.
pub fn looks_like_initial(datagram: &[u8]) -> bool {
    let (Some(&[b0, v0, v1, v2, v3, dcid_len]), true) = (
        datagram.first_chunk::<6>(),
        datagram.len() >= MIN_INITIAL_DATAGRAM,
    ) else {
        return false;
    };
    if b0 & 0x80 == 0 {
        return false;
    }
    Version::from_wire(u32::from_be_bytes([v0, v1, v2, v3])).is_some_and(|v| {
        (b0 >> 4) & 0b11 == v.initial_type()
            && (MIN_FIRST_DCID_LEN..=MAX_CID_LEN).contains(&usize::from(dcid_len))
    })
}

/// The connection whose Initials are read: its version, its first
/// Destination Connection ID and the keys derived from it.
struct Flow {
    version: Version,
    dcid: [u8; MAX_CID_LEN],
    dcid_len: usize,
    keys: Keys,
}

impl Flow {
    fn dcid(&self) -> &[u8] {
        &self.dcid[..self.dcid_len]
    }
}

/// A QUIC Initial sniffer for one flow, fed its datagrams one at a time.
///
/// Stateful, unlike the stream parsers: a datagram is gone once read, so
/// the CRYPTO bytes it carried are kept (bounded) until the ClientHello
/// is whole. Once it answers `Done` or `NotQuic` it keeps that answer.
pub struct QuicSniff {
    flow: Option<Flow>,
    datagrams: usize,
    /// The CRYPTO stream from offset 0, without a gap.
    prefix: Vec<u8>,
    /// Pieces beyond a gap, by offset, until the gap fills.
    pending: Vec<(usize, Vec<u8>)>,
    pending_bytes: usize,
    /// A bound was hit: what is not in `prefix` by now never will be.
    overflowed: bool,
    largest_pn: Option<u64>,
    /// Where a packet is decrypted: the datagram itself is not touched.
    scratch: Vec<u8>,
    answer: Option<QuicAnswer>,
    last_error: Option<QuicError>,
}

impl Default for QuicSniff {
    fn default() -> Self {
        Self::new()
    }
}

impl QuicSniff {
    pub fn new() -> QuicSniff {
        QuicSniff {
            flow: None,
            datagrams: 0,
            prefix: Vec::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            overflowed: false,
            largest_pn: None,
            scratch: Vec::new(),
            answer: None,
            last_error: None,
        }
    }

    /// Reads one datagram of the flow, client to server.
    pub fn push(&mut self, datagram: &[u8]) -> QuicAnswer {
        if let Some(answer) = &self.answer {
            return answer.clone();
        }
        self.datagrams += 1;
        let mut at = 0;
        while at < datagram.len() {
            match self.packet(&datagram[at..]) {
                Ok(len) => at += len,
                // The rest of the datagram cannot be delimited.
                Err(e) => {
                    self.last_error = Some(e);
                    break;
                }
            }
        }
        let quic = |host| {
            QuicAnswer::Done(Some(Sniffed {
                protocol: SniffProtocol::Quic,
                host,
            }))
        };
        let answer = if self.flow.is_none() {
            // The first datagram of a client flow starts with its Initial;
            // one that opened nothing is some other protocol.
            QuicAnswer::NotQuic
        } else {
            match tls::sniff_handshake(&self.prefix) {
                Sniff::Found { host } => quic(host),
                Sniff::NotThis => quic(None),
                Sniff::NeedMore if self.overflowed || self.datagrams >= MAX_DATAGRAMS => quic(None),
                Sniff::NeedMore => QuicAnswer::NeedMore,
            }
        };
        if answer != QuicAnswer::NeedMore {
            self.answer = Some(answer.clone());
            // Answered for good: the buffers are not needed any more.
            self.prefix = Vec::new();
            self.pending = Vec::new();
            self.scratch = Vec::new();
        }
        answer
    }

    /// How many datagrams were read.
    pub fn datagrams(&self) -> usize {
        self.datagrams
    }

    /// Why the last packet that was not read was not (for debug logs).
    pub fn last_error(&self) -> Option<&QuicError> {
        self.last_error.as_ref()
    }

    /// Reads the packet at the start of `bytes`; returns its length, so
    /// the caller can walk on to a coalesced one.
    fn packet(&mut self, bytes: &[u8]) -> Result<usize, QuicError> {
        let mut r = Reader::new(bytes);
        let b0 = r.u8()?;
        if b0 & 0x80 == 0 {
            // A short header runs to the end of the datagram.
            return Err(QuicError::ShortHeader);
        }
        let wire = r.u32()?;
        let version = Version::from_wire(wire).ok_or(QuicError::Version(wire))?;
        let dcid = r.cid()?;
        r.cid()?; // source connection ID
        let kind = (b0 >> 4) & 0b11;
        if kind == version.retry_type() {
            // A Retry has no Length: nothing after it can be found.
            return Err(QuicError::Retry);
        }
        let initial = kind == version.initial_type();
        if initial {
            let token = r.varint_usize()?;
            r.take(token)?;
        }
        let length = r.varint_usize()?;
        let pn_offset = r.pos;
        let end = pn_offset
            .checked_add(length)
            .filter(|&end| end <= bytes.len())
            .ok_or(QuicError::Truncated)?;
        if !initial {
            return Ok(end); // 0-RTT or Handshake: not ours to read
        }
        // Keys from the first Initial's DCID (RFC 9001 5.2); later
        // Initials of the connection use the same ones.
        let mut derived = None;
        let keys = match &self.flow {
            Some(flow) if flow.version == version && flow.dcid() == dcid => &flow.keys,
            // Another connection's packet (or one after a Retry, which
            // cannot happen while the flow is held): skipped.
            Some(_) => return Ok(end),
            None if dcid.len() < MIN_FIRST_DCID_LEN => {
                self.last_error = Some(QuicError::ShortDcid);
                return Ok(end);
            }
            None => &*derived.insert(Keys::client_initial(version, dcid)),
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        let opened = open(
            keys,
            &bytes[..end],
            pn_offset,
            self.largest_pn,
            &mut scratch,
        );
        let result = match opened {
            Ok((pn, header_len)) => {
                self.largest_pn = Some(self.largest_pn.map_or(pn, |l| l.max(pn)));
                if let Some(keys) = derived {
                    let mut id = [0u8; MAX_CID_LEN];
                    id[..dcid.len()].copy_from_slice(dcid);
                    self.flow = Some(Flow {
                        version,
                        dcid: id,
                        dcid_len: dcid.len(),
                        keys,
                    });
                }
                // A frame the sniffer cannot read ends this packet's walk,
                // not the datagram's: the packet's length is known.
                if let Err(e) = self.frames(&scratch[header_len..]) {
                    self.last_error = Some(e);
                }
                Ok(end)
            }
            // A packet that does not open is dropped, as an endpoint would
            // (RFC 9001 5.2); coalesced ones after it may still open.
            Err(e) => {
                self.last_error = Some(e);
                Ok(end)
            }
        };
        self.scratch = scratch;
        result
    }

    /// Walks the frames of an opened Initial packet. Only PADDING, PING,
    /// ACK, CRYPTO and CONNECTION_CLOSE may appear there (RFC 9000 12.4).
    fn frames(&mut self, plain: &[u8]) -> Result<(), QuicError> {
        let mut r = Reader::new(plain);
        while !r.is_empty() {
            let kind = r.varint()?;
            match kind {
                // PADDING: a run of zeros, skipped at once.
                0x00 => {
                    let zeros = plain[r.pos..].iter().take_while(|&&b| b == 0).count();
                    r.pos += zeros;
                }
                0x01 => {} // PING
                0x02 | 0x03 => {
                    // ACK: largest, delay, range count, first range, then
                    // (gap, length) pairs; 0x03 adds three ECN counts.
                    // Each pair is at least two bytes, so a huge count
                    // ends at the packet's end.
                    r.varint()?;
                    r.varint()?;
                    let ranges = r.varint()?;
                    r.varint()?;
                    for _ in 0..ranges {
                        r.varint()?;
                        r.varint()?;
                    }
                    if kind == 0x03 {
                        for _ in 0..3 {
                            r.varint()?;
                        }
                    }
                }
                0x06 => {
                    let offset = r.varint_usize()?;
                    let len = r.varint_usize()?;
                    let data = r.take(len)?;
                    self.add_crypto(offset, data)?;
                }
                0x1c => return Err(QuicError::Closed),
                other => return Err(QuicError::Frame(other)),
            }
        }
        Ok(())
    }

    /// Adds CRYPTO data at `offset`: onto the prefix when it reaches it,
    /// otherwise kept aside until the gap before it fills. Overlaps carry
    /// the same bytes (RFC 9000 19.6), so the first copy stands.
    fn add_crypto(&mut self, offset: usize, data: &[u8]) -> Result<(), QuicError> {
        let end = offset
            .checked_add(data.len())
            .filter(|&end| end <= MAX_CRYPTO_BYTES);
        let Some(end) = end else {
            self.overflowed = true;
            return Err(QuicError::CryptoTooLong);
        };
        let have = self.prefix.len();
        if offset <= have {
            if end > have {
                self.prefix.extend_from_slice(&data[have - offset..]);
                self.absorb_pending();
            }
            return Ok(());
        }
        if self.pending.len() >= MAX_FRAGMENTS {
            self.overflowed = true;
            return Err(QuicError::TooFragmented);
        }
        if have + self.pending_bytes + data.len() > MAX_CRYPTO_BYTES {
            self.overflowed = true;
            return Err(QuicError::CryptoTooLong);
        }
        self.pending_bytes += data.len();
        self.pending.push((offset, data.to_vec()));
        Ok(())
    }

    /// Moves every kept piece that the prefix now reaches onto it.
    fn absorb_pending(&mut self) {
        while let Some(i) = self
            .pending
            .iter()
            .position(|(offset, _)| *offset <= self.prefix.len())
        {
            let (offset, data) = self.pending.swap_remove(i);
            self.pending_bytes -= data.len();
            let have = self.prefix.len();
            if offset + data.len() > have {
                self.prefix.extend_from_slice(&data[have - offset..]);
            }
        }
    }
}

/// Removes header protection from the Initial `packet` (exactly one
/// packet, up to its Length) and decrypts it into `out`: the header, then
/// the plaintext. Returns the full packet number and the header's length.
fn open(
    keys: &Keys,
    packet: &[u8],
    pn_offset: usize,
    largest_pn: Option<u64>,
    out: &mut Vec<u8>,
) -> Result<(u64, usize), QuicError> {
    // The sample starts 4 bytes past the packet number's start, whatever
    // its length (RFC 9001 5.4.2).
    let sample_at = pn_offset + 4;
    let sample = packet
        .get(sample_at..sample_at + SAMPLE_LEN)
        .and_then(|s| <&[u8; SAMPLE_LEN]>::try_from(s).ok())
        .ok_or(QuicError::Truncated)?;
    let mask = keys.mask(sample);
    let b0 = packet[0] ^ (mask[0] & 0x0f);
    let pn_len = usize::from(b0 & 0b11) + 1;
    let header_len = pn_offset + pn_len;
    let Some(body_end) = packet
        .len()
        .checked_sub(TAG_LEN)
        .filter(|&e| e >= header_len)
    else {
        return Err(QuicError::Truncated);
    };
    out.clear();
    out.extend_from_slice(&packet[..body_end]);
    out[0] = b0;
    let mut truncated = 0u64;
    for (i, m) in mask[1..=pn_len].iter().enumerate() {
        out[pn_offset + i] ^= m;
        truncated = truncated << 8 | u64::from(out[pn_offset + i]);
    }
    let pn = decode_pn(largest_pn, truncated, pn_len);
    let tag = Tag::<Aes128Gcm>::try_from(&packet[body_end..]).map_err(|_| QuicError::Truncated)?;
    let (header, body) = out.split_at_mut(header_len);
    keys.aead
        .decrypt_inout_detached(&keys.nonce(pn), header, body.into(), &tag)
        .map_err(|_| QuicError::Decrypt)?;
    Ok((pn, header_len))
}

/// The full packet number nearest the next expected one (RFC 9000 A.3).
fn decode_pn(largest: Option<u64>, truncated: u64, pn_len: usize) -> u64 {
    const MAX_PN: u64 = 1 << 62;
    let expected = largest.map_or(0, |l| l.saturating_add(1));
    let window = 1u64 << (pn_len * 8);
    let half = window / 2;
    let candidate = (expected & !(window - 1)) | truncated;
    if candidate.saturating_add(half) <= expected && candidate < MAX_PN - window {
        candidate + window
    } else if candidate > expected.saturating_add(half) && candidate >= window {
        candidate - window
    } else {
        candidate
    }
}

/// A QUIC variable-length integer (for building packets in tests).
#[doc(hidden)]
pub fn varint(value: u64) -> Vec<u8> {
    match value {
        0..=0x3f => vec![value as u8],
        0x40..=0x3fff => ((value as u16) | 0x4000).to_be_bytes().to_vec(),
        0x4000..=0x3fff_ffff => ((value as u32) | 0x8000_0000).to_be_bytes().to_vec(),
        _ => (value | 0xc000_0000_0000_0000).to_be_bytes().to_vec(),
    }
}

/// A CRYPTO frame carrying `data` at `offset`.
#[doc(hidden)]
pub fn crypto_frame(offset: usize, data: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x06];
    frame.extend(varint(offset as u64));
    frame.extend(varint(data.len() as u64));
    frame.extend_from_slice(data);
    frame
}

/// A client Initial packet as a client builds one: `frames` padded with
/// PADDING so the packet is at least `pad_to` bytes, sealed with the
/// keys of `dcid`, packet number `pn` sent in `pn_len` bytes, header
/// protected. For the tests, the fuzz target and the benchmark: tproxyd
/// itself never sends an Initial.
#[doc(hidden)]
pub fn seal_initial(
    version: Version,
    dcid: &[u8],
    scid: &[u8],
    pn: u64,
    pn_len: usize,
    frames: &[u8],
    pad_to: usize,
) -> Vec<u8> {
    let keys = Keys::client_initial(version, dcid);
    let pn_len = pn_len.clamp(1, 4);
    let mut header = vec![0xc0 | version.initial_type() << 4 | (pn_len as u8 - 1)];
    header.extend(version.wire().to_be_bytes());
    header.push(dcid.len() as u8);
    header.extend_from_slice(dcid);
    header.push(scid.len() as u8);
    header.extend_from_slice(scid);
    header.push(0); // no token
                    // The header protection sample needs 4 + 16 bytes after the packet
                    // number's start, whatever its length.
    let mut payload = frames.to_vec();
    let min_payload = (4 + SAMPLE_LEN).saturating_sub(pn_len + TAG_LEN);
    let fixed = header.len() + 2 + pn_len + TAG_LEN;
    let want = pad_to.saturating_sub(fixed).max(min_payload);
    if payload.len() < want {
        payload.resize(want, 0);
    }
    let length = (pn_len + payload.len() + TAG_LEN) as u64;
    // Always the 2-byte form, as most clients write it.
    header.extend(((length.min(0x3fff) as u16) | 0x4000).to_be_bytes());
    let pn_offset = header.len();
    header.extend(&pn.to_be_bytes()[8 - pn_len..]);
    let tag = keys
        .aead
        .encrypt_inout_detached(&keys.nonce(pn), &header, payload.as_mut_slice().into())
        .expect("an Initial-sized payload");
    let mut packet = header;
    packet.extend(payload);
    packet.extend_from_slice(&tag);
    let mut sample = [0u8; SAMPLE_LEN];
    sample.copy_from_slice(&packet[pn_offset + 4..pn_offset + 4 + SAMPLE_LEN]);
    let mask = keys.mask(&sample);
    packet[0] ^= mask[0] & 0x0f;
    for i in 0..pn_len {
        packet[pn_offset + i] ^= mask[1 + i];
    }
    packet
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sniff::tls::tests::client_hello;
    use proptest::prelude::*;

    /// RFC 9001 A.2: the client's first Initial, protected, 1,200 bytes
    /// (a ClientHello for example.com, packet number 2 in 4 bytes).
    const RFC9001: &[u8] = include_bytes!("testdata/rfc9001_client_initial.bin");
    /// RFC 9369 A.2: the same ClientHello in a QUIC v2 Initial.
    const RFC9369: &[u8] = include_bytes!("testdata/rfc9369_client_initial.bin");
    const RFC_DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
    const DCID: [u8; 8] = [0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07, 0x18];

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn named(host: &str) -> QuicAnswer {
        QuicAnswer::Done(Some(Sniffed {
            protocol: SniffProtocol::Quic,
            host: Some(host.into()),
        }))
    }

    fn nameless() -> QuicAnswer {
        QuicAnswer::Done(Some(Sniffed {
            protocol: SniffProtocol::Quic,
            host: None,
        }))
    }

    fn sniff_all(datagrams: &[Vec<u8>]) -> Vec<QuicAnswer> {
        let mut s = QuicSniff::new();
        datagrams.iter().map(|d| s.push(d)).collect()
    }

    #[test]
    fn rfc9001_initial_keys_and_header_protection() {
        let keys = Keys::client_initial(Version::V1, &RFC_DCID);
        assert_eq!(keys.iv.to_vec(), hex("fa044b2f42a3fd3b46fb255c"));
        // A.2: the sample and the mask it gives.
        let sample: [u8; 16] = hex("d1b1c98dd7689fb8ec11d242b123dc9b").try_into().unwrap();
        assert_eq!(keys.mask(&sample)[..5], hex("437b9aec36")[..]);
        // The key and hp key, through what they do: the vector opens.
        let mut out = Vec::new();
        let (pn, header_len) = open(&keys, RFC9001, 18, None, &mut out).unwrap();
        assert_eq!(pn, 2);
        assert_eq!(
            out[..header_len],
            hex("c300000001088394c8f03e5157080000449e00000002")[..]
        );
        assert_eq!(out[header_len..header_len + 4], hex("060040f1")[..]);
        assert_eq!(out.len() - header_len, 1162);
    }

    #[test]
    fn rfc9001_key_schedule_values() {
        // A.1 with the library's HKDF directly, label by label.
        let (_, initial) = Hkdf::<Sha256>::extract(Some(&SALT_V1), &RFC_DCID);
        let mut client = [0u8; 32];
        expand_label(&initial, b"client in", &mut client);
        assert_eq!(
            client.to_vec(),
            hex("c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea")
        );
        let c = Hkdf::<Sha256>::from_prk(&client).unwrap();
        let (mut key, mut hp) = ([0u8; 16], [0u8; 16]);
        expand_label(&c, b"quic key", &mut key);
        expand_label(&c, b"quic hp", &mut hp);
        assert_eq!(key.to_vec(), hex("1f369613dd76d5467730efcbe3b1a22d"));
        assert_eq!(hp.to_vec(), hex("9f50449e04a0e810283a1e9933adedd2"));
    }

    #[test]
    fn rfc9369_v2_key_schedule_and_initial() {
        let (_, initial) = Hkdf::<Sha256>::extract(Some(&SALT_V2), &RFC_DCID);
        let mut client = [0u8; 32];
        expand_label(&initial, b"client in", &mut client);
        assert_eq!(
            client.to_vec(),
            hex("14ec9d6eb9fd7af83bf5a668bc17a7e283766aade7ecd0891f70f9ff7f4bf47b")
        );
        let c = Hkdf::<Sha256>::from_prk(&client).unwrap();
        let (mut key, mut hp) = ([0u8; 16], [0u8; 16]);
        expand_label(&c, b"quicv2 key", &mut key);
        expand_label(&c, b"quicv2 hp", &mut hp);
        assert_eq!(key.to_vec(), hex("8b1a0bc121284290a29e0971b5cd045d"));
        assert_eq!(hp.to_vec(), hex("45b95e15235d6f45a6b19cbcb0294ba9"));
        let keys = Keys::client_initial(Version::V2, &RFC_DCID);
        assert_eq!(keys.iv.to_vec(), hex("91f73e2351d8fa91660e909f"));
        let mut out = Vec::new();
        let (pn, header_len) = open(&keys, RFC9369, 18, None, &mut out).unwrap();
        assert_eq!(pn, 2);
        // Type bits 0b01: an Initial in v2.
        assert_eq!(
            out[..header_len],
            hex("d36b3343cf088394c8f03e5157080000449e00000002")[..]
        );
    }

    #[test]
    fn the_rfc_vectors_sniff_example_com() {
        for packet in [RFC9001, RFC9369] {
            assert!(looks_like_initial(packet));
            assert_eq!(sniff_all(&[packet.to_vec()]), [named("example.com")]);
        }
    }

    #[test]
    fn v1_type_bits_under_the_v2_version_are_not_an_initial() {
        // The v2 vector with its type bits set to v1's Initial (0b00):
        // for v2 that is a 0-RTT packet, skipped, so nothing opens.
        let mut packet = RFC9369.to_vec();
        packet[0] &= !0x30;
        assert!(!looks_like_initial(&packet));
        assert_eq!(sniff_all(&[packet]), [QuicAnswer::NotQuic]);
        // And v1's vector under the v2 version: the keys differ.
        let mut packet = RFC9001.to_vec();
        packet[1..5].copy_from_slice(&VERSION_2.to_be_bytes());
        packet[0] |= 0x10;
        assert_eq!(sniff_all(&[packet]), [QuicAnswer::NotQuic]);
    }

    /// A Chrome-like first flight: the ClientHello (with a post-quantum
    /// key share, ~1.8 KB) in two Initials in two datagrams, packet
    /// numbers from 1, the second packet's CRYPTO frames scattered out of
    /// order between PING and PADDING.
    fn chrome_flight(version: Version, sni: &str, pn_len: usize) -> Vec<Vec<u8>> {
        let hello = client_hello(Some(sni), 1216);
        assert!(hello.len() > 1500);
        let first = crypto_frame(0, &hello[..1100]);
        let rest = &hello[1100..];
        let cut = [0, 90, 200, 350, 500, rest.len()];
        let mut second = vec![0x01, 0x00, 0x00];
        for i in [3, 0, 4, 2, 1] {
            second.extend(crypto_frame(1100 + cut[i], &rest[cut[i]..cut[i + 1]]));
            second.extend([0x01, 0x00]);
        }
        vec![
            seal_initial(version, &DCID, b"scid", 1, pn_len, &first, 1250),
            seal_initial(version, &DCID, b"scid", 2, pn_len, &second, 1250),
        ]
    }

    #[test]
    fn a_client_hello_over_two_initials_in_two_datagrams() {
        for version in [Version::V1, Version::V2] {
            for pn_len in 1..=4 {
                let flight = chrome_flight(version, "pq.example", pn_len);
                assert!(flight.iter().all(|d| looks_like_initial(d)));
                assert_eq!(
                    sniff_all(&flight),
                    [QuicAnswer::NeedMore, named("pq.example")],
                    "{version:?} pn_len {pn_len}"
                );
                // Reordered on the way: the second datagram first.
                let reversed: Vec<_> = flight.iter().rev().cloned().collect();
                assert_eq!(
                    sniff_all(&reversed),
                    [QuicAnswer::NeedMore, named("pq.example")],
                    "{version:?} reversed"
                );
            }
        }
    }

    #[test]
    fn coalesced_packets_are_walked_and_others_skipped() {
        let hello = client_hello(Some("coalesced.example"), 0);
        let (a, b) = hello.split_at(200);
        let p1 = seal_initial(Version::V1, &DCID, b"", 0, 2, &crypto_frame(0, a), 0);
        let p2 = seal_initial(Version::V1, &DCID, b"", 1, 2, &crypto_frame(200, b), 0);
        // A 0-RTT packet (type 0b01 in v1) between them: skipped by Length.
        let mut zero_rtt = vec![0xd1, 0, 0, 0, 1, 8];
        zero_rtt.extend(DCID);
        zero_rtt.extend([0, 0x40, 30]);
        zero_rtt.extend([0xee; 30]);
        let mut datagram = p1;
        datagram.extend(&zero_rtt);
        datagram.extend(&p2);
        datagram.resize(1200, 0); // trailing zeros, as some pad
        assert_eq!(sniff_all(&[datagram]), [named("coalesced.example")]);
    }

    #[test]
    fn a_later_initial_with_another_dcid_is_skipped() {
        let hello = client_hello(Some("a.example"), 0);
        let (a, b) = hello.split_at(100);
        let p1 = seal_initial(Version::V1, &DCID, b"", 0, 1, &crypto_frame(0, a), 1200);
        let other = seal_initial(
            Version::V1,
            &RFC_DCID,
            b"",
            1,
            1,
            &crypto_frame(100, b),
            1200,
        );
        let p2 = seal_initial(Version::V1, &DCID, b"", 1, 1, &crypto_frame(100, b), 1200);
        assert_eq!(
            sniff_all(&[p1, other, p2]),
            [
                QuicAnswer::NeedMore,
                QuicAnswer::NeedMore,
                named("a.example")
            ]
        );
    }

    #[test]
    fn ack_frames_and_a_nameless_client_hello() {
        let hello = client_hello(None, 0);
        let mut frames = vec![0x02, 0x05, 0x00, 0x01, 0x00, 0x01, 0x01];
        frames.extend([0x03, 0x05, 0x00, 0x00, 0x00, 0x07, 0x08, 0x09]);
        frames.extend(crypto_frame(0, &hello));
        let packet = seal_initial(Version::V1, &DCID, b"", 0, 4, &frames, 1200);
        assert_eq!(sniff_all(&[packet]), [nameless()]);
    }

    #[test]
    fn not_quic_is_told_at_the_first_datagram() {
        let mut bad_tag = RFC9001.to_vec();
        bad_tag[1199] ^= 1;
        let mut short_dcid = RFC9001.to_vec();
        short_dcid[5] = 4;
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x40; 1200],          // a short header
            vec![0xc0, 0, 0, 0, 2, 8], // unknown version
            RFC9001[..600].to_vec(),   // truncated
            bad_tag,
            short_dcid,
            b"\x00\x01 a DNS query or a game tick".to_vec(),
        ];
        for case in cases {
            assert_eq!(
                sniff_all(std::slice::from_ref(&case)),
                [QuicAnswer::NotQuic],
                "{case:02x?}"
            );
        }
        // Once answered, the answer stays.
        let mut s = QuicSniff::new();
        assert_eq!(s.push(b"nope"), QuicAnswer::NotQuic);
        assert_eq!(s.push(RFC9001), QuicAnswer::NotQuic);
    }

    #[test]
    fn bounds_end_the_sniff_as_nameless_quic() {
        let hello = client_hello(Some("big.example"), 0);
        // A gap that never fills: after MAX_DATAGRAMS, QUIC without name.
        let mut s = QuicSniff::new();
        for pn in 0..MAX_DATAGRAMS as u64 - 1 {
            let frame = crypto_frame(10 + pn as usize, &hello[10..20]);
            let d = seal_initial(Version::V1, &DCID, b"", pn, 2, &frame, 1200);
            assert_eq!(s.push(&d), QuicAnswer::NeedMore);
        }
        let d = seal_initial(
            Version::V1,
            &DCID,
            b"",
            9,
            2,
            &crypto_frame(0, &hello[..5]),
            1200,
        );
        assert_eq!(s.push(&d), nameless());
        // CRYPTO data beyond 64 KiB.
        let frame = crypto_frame(MAX_CRYPTO_BYTES - 4, &[1; 8]);
        let d = seal_initial(Version::V1, &DCID, b"", 0, 2, &frame, 1200);
        assert_eq!(sniff_all(&[d]), [nameless()]);
        // Too many pieces beyond a gap.
        let mut frames = Vec::new();
        for i in 0..=MAX_FRAGMENTS {
            frames.extend(crypto_frame(100 + 2 * i, &[1]));
        }
        let d = seal_initial(Version::V1, &DCID, b"", 0, 2, &frames, 1200);
        assert_eq!(sniff_all(&[d]), [nameless()]);
        // A frame not allowed in an Initial (STREAM) ends the packet's
        // walk; the CRYPTO before it counts.
        let mut frames = crypto_frame(0, &hello);
        frames.extend([0x08, 0x00, 0x01, 0x61]);
        let d = seal_initial(Version::V1, &DCID, b"", 0, 2, &frames, 1200);
        assert_eq!(sniff_all(&[d]), [named("big.example")]);
    }

    #[test]
    fn packet_numbers_decode_near_the_expected_one() {
        // RFC 9000 A.3's example.
        assert_eq!(decode_pn(Some(0xa82f30ea), 0x9b32, 2), 0xa82f9b32);
        assert_eq!(decode_pn(None, 0, 1), 0);
        assert_eq!(decode_pn(None, 1, 4), 1);
        assert_eq!(decode_pn(Some(255), 0, 1), 256);
        assert_eq!(decode_pn(Some(u64::MAX), 0xff, 1), u64::MAX - 0xff + 0xff);
        // The high end never overflows.
        let _ = decode_pn(Some((1 << 62) - 1), 0, 1);
    }

    #[test]
    fn varints_round_trip() {
        for v in [
            0u64,
            63,
            64,
            16383,
            16384,
            (1 << 30) - 1,
            1 << 30,
            (1 << 62) - 1,
        ] {
            let bytes = varint(v);
            assert_eq!(Reader::new(&bytes).varint().unwrap(), v);
        }
    }

    /// A ClientHello cut into CRYPTO frames, shuffled over packets of
    /// random packet-number lengths, in random datagram order.
    fn flights() -> impl Strategy<Value = (Vec<Vec<u8>>, String)> {
        let name = "[a-z][a-z0-9-]{0,20}[a-z0-9](\\.[a-z][a-z0-9]{0,10}){0,3}";
        (
            name,
            0usize..1300,
            proptest::collection::vec(16usize..600, 1..6),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(|(name, pq, cuts, seed, v2)| {
                let hello = client_hello(Some(&name), pq);
                let mut frames = Vec::new();
                let mut at = 0;
                for c in cuts.iter().cycle() {
                    if at >= hello.len() {
                        break;
                    }
                    let end = (at + c).min(hello.len());
                    frames.push(crypto_frame(at, &hello[at..end]));
                    at = end;
                }
                // A deterministic shuffle from the seed.
                let mut x = seed | 1;
                for i in (1..frames.len()).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    frames.swap(i, (x % (i as u64 + 1)) as usize);
                }
                let version = if v2 { Version::V2 } else { Version::V1 };
                let mut datagrams = Vec::new();
                let mut payload = Vec::new();
                let mut pn = 1;
                for f in frames {
                    if !payload.is_empty() && payload.len() + f.len() > 1100 {
                        let pn_len = (x >> pn) as usize % 4 + 1;
                        datagrams.push(seal_initial(
                            version, &DCID, b"", pn, pn_len, &payload, 1200,
                        ));
                        payload.clear();
                        pn += 1;
                    }
                    payload.extend(f);
                    payload.push(0x01);
                }
                datagrams.push(seal_initial(version, &DCID, b"", pn, 2, &payload, 1200));
                if seed & 2 != 0 {
                    datagrams.reverse();
                }
                (datagrams, name)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_split_and_order_gives_the_name((datagrams, name) in flights()) {
            prop_assume!(datagrams.len() <= MAX_DATAGRAMS);
            let answers = sniff_all(&datagrams);
            let (last, before) = answers.split_last().unwrap();
            prop_assert_eq!(last, &named(&name));
            prop_assert!(before.iter().all(|a| *a == QuicAnswer::NeedMore));
        }

        #[test]
        fn never_panics_on_random_datagrams(
            datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1500), 1..4),
            header in any::<bool>(),
        ) {
            let mut s = QuicSniff::new();
            for mut d in datagrams {
                if header && d.len() > 6 {
                    // A valid long header in front makes the parser go deeper.
                    d[..5].copy_from_slice(&[0xc3, 0, 0, 0, 1]);
                    d[5] = 8;
                }
                let _ = s.push(&d);
            }
        }

        #[test]
        fn never_panics_on_mutated_initials(
            (datagrams, _) in flights(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            rfc in any::<bool>(),
        ) {
            let mut s = QuicSniff::new();
            let mut datagrams = datagrams;
            if rfc {
                datagrams.insert(0, RFC9001.to_vec());
            }
            // The first datagram mutated (header and protected bytes
            // alike) and cut; the others as sent.
            let first = &mut datagrams[0];
            for (at, value) in &edits {
                let j = at.index(first.len());
                first[j] = *value;
            }
            let keep = cut.index(first.len() + 1);
            first.truncate(keep);
            for d in &datagrams {
                if let QuicAnswer::Done(Some(Sniffed { host: Some(h), .. })) = s.push(d) {
                    prop_assert!(crate::hostname::is_host_name(&h), "{:?}", h);
                }
            }
        }

        #[test]
        fn never_panics_on_random_frames(frames in proptest::collection::vec(any::<u8>(), 0..1200), pn_len in 1usize..=4) {
            // Random plaintext behind a valid seal: the frame walker and
            // the reassembly see arbitrary input.
            let d = seal_initial(Version::V1, &DCID, b"", 0, pn_len, &frames, 0);
            let _ = sniff_all(&[d.clone(), d]);
        }
    }
}
