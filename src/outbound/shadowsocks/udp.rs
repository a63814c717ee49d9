//! Shadowsocks over UDP: one upstream per client flow (full cone), every
//! datagram sealed on its own.
//!
//! - AEAD (SIP004): `salt ‖ seal(addr ‖ payload) ‖ tag`, a fresh random
//!   salt (and so an HKDF subkey) per datagram, the nonce all zero.
//! - 2022 AES (SIP022 §3.2): a separate header, session id ‖ packet id,
//!   AES-encrypted with the PSK, then the body sealed with the session's
//!   BLAKE3 subkey under bytes 4..16 of the plain header.
//! - 2022 chacha (SIP022 §4.1): XChaCha20-Poly1305 keyed with the PSK, a
//!   random 24-byte nonce in front, session and packet ids in the body.
//!
//! Replies have the same shape, with the remote's address (the source to
//! answer from) and, for 2022, the server's own session and our client
//! session id. The [`Codec`] is the protocol without a socket (the tests
//! and the fuzz target drive it); [`ShadowsocksUdp`] is the upstream.
//!
//! The header goes in the headroom in front of the payload
//! ([`UDP_HEADROOM`]) and the payload is sealed in place; the tag, which
//! belongs after the payload where the relay's buffer has no room, goes
//! out as a second slice of the same `sendmsg` ([`sys::send_parts`]): no
//! copy, no scratch buffer. Replies are opened in place in the receive
//! buffer. Nothing here allocates by a length the network sent.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::sync::atomic::Ordering;

// 32-bit MIPS has no 64-bit atomics (see Cargo.toml).
use portable_atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use super::crypto::{
    fill_random, Cipher, HeaderCipher, Key, Method, XCipher, NONCE_LEN, TAG_LEN, XNONCE_LEN,
};
use super::window::ReplayWindow;
use crate::outbound::{ip_udp_max, OutboundError, UdpCarrier, UdpRecv, UDP_HEADROOM};
use crate::sys;

/// The longest address a datagram to an address names: ATYP, an IPv6
/// address, a port. A name is longer: such a datagram is laid out in a
/// buffer of its own when its header does not fit the headroom.
const MAX_ADDR: usize = 1 + 16 + 2;
/// SOCKS5 address types (RFC 1928 §5).
const ATYP_V4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_V6: u8 = 0x04;

/// 2022 packet types.
const TYPE_CLIENT: u8 = 0;
const TYPE_SERVER: u8 = 1;
/// How far a 2022 reply's timestamp may be from our clock (SIP022).
const MAX_CLOCK_DIFF: u64 = 30;

/// The 2022 separate header (AES methods): session id ‖ packet id, one
/// AES block.
const SEPARATE_HEADER: usize = 16;
/// A 2022 client body before its address: type, timestamp, padding length.
const CLIENT_BODY: usize = 1 + 8 + 2;
/// A 2022 server body before its padding: type, timestamp, client session
/// id, padding length.
const SERVER_BODY: usize = 1 + 8 + 8 + 2;
/// Session id ‖ packet id at the start of a 2022 chacha body.
const IDS: usize = 8 + 8;

/// The most bytes written in front of a payload, of any method: 2022
/// chacha's nonce, ids and body header with an IPv6 address (70).
pub const MAX_HEADER: usize = XNONCE_LEN + IDS + CLIENT_BODY + MAX_ADDR;

/// Bytes in front of a payload to `dst` through `method`.
pub fn header_len(method: Method, dst: &SocketAddr) -> usize {
    header_len_to(method, Dst::Addr(*dst))
}

/// Bytes in front of a payload to `dst` (maybe a name) through `method`.
pub fn header_len_to(method: Method, dst: Dst<'_>) -> usize {
    let addr = dst_len(dst);
    match family(method) {
        Family::Aead => method.salt_len() + addr,
        Family::Aes2022 => SEPARATE_HEADER + CLIENT_BODY + addr,
        Family::Chacha2022 => XNONCE_LEN + IDS + CLIENT_BODY + addr,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Aead,
    Aes2022,
    Chacha2022,
}

fn family(method: Method) -> Family {
    match method {
        Method::Blake3Aes128Gcm | Method::Blake3Aes256Gcm => Family::Aes2022,
        Method::Blake3Chacha20Poly1305 => Family::Chacha2022,
        Method::Aes128Gcm | Method::Aes256Gcm | Method::Chacha20IetfPoly1305 => Family::Aead,
    }
}

/// Where a datagram goes, as its header names it: an address, or a name
/// and port (a fake-ip destination, which the server resolves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dst<'a> {
    Addr(SocketAddr),
    Name(&'a str, u16),
}

/// Where a reply came from, as its header names it: an address, or a name
/// at `at` in the datagram (a server answering a datagram sent by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Addr(SocketAddr),
    Name { at: Range<usize>, port: u16 },
}

impl Source {
    /// The same source, a name's place moved `by` bytes further on.
    fn shifted(self, by: usize) -> Source {
        match self {
            Source::Name { at, port } => Source::Name {
                at: at.start + by..at.end + by,
                port,
            },
            addr => addr,
        }
    }
}

/// Length of `addr` as a SOCKS5 address.
#[cfg(test)]
fn addr_len(addr: &SocketAddr) -> usize {
    dst_len(Dst::Addr(*addr))
}

/// Length of `dst` as a SOCKS5 address (a name: ATYP, length, name, port).
fn dst_len(dst: Dst<'_>) -> usize {
    match dst {
        Dst::Addr(SocketAddr::V4(_)) => 1 + 4 + 2,
        Dst::Addr(SocketAddr::V6(_)) => MAX_ADDR,
        Dst::Name(name, _) => 1 + 1 + name.len() + 2,
    }
}

/// Writes `addr` as a SOCKS5 address at the start of `out`, which holds
/// exactly [`addr_len`] bytes.
#[cfg(test)]
fn write_addr(out: &mut [u8], addr: &SocketAddr) {
    write_dst(out, Dst::Addr(*addr))
}

/// Writes `dst` as a SOCKS5 address into `out`, which holds exactly
/// [`dst_len`] bytes (a name of at most 255 bytes: the callers check).
fn write_dst(out: &mut [u8], dst: Dst<'_>) {
    let (head, port) = out.split_at_mut(out.len().saturating_sub(2));
    let port_number = match (dst, head.split_first_mut()) {
        (Dst::Addr(SocketAddr::V4(a)), Some((atyp, ip))) if ip.len() == 4 => {
            *atyp = ATYP_V4;
            ip.copy_from_slice(&a.ip().octets());
            a.port()
        }
        (Dst::Addr(SocketAddr::V6(a)), Some((atyp, ip))) if ip.len() == 16 => {
            *atyp = ATYP_V6;
            ip.copy_from_slice(&a.ip().octets());
            a.port()
        }
        (Dst::Name(name, p), Some((atyp, rest))) if rest.len() == 1 + name.len() => {
            let Ok(len) = u8::try_from(name.len()) else {
                return;
            };
            *atyp = ATYP_DOMAIN;
            if let Some((first, text)) = rest.split_first_mut() {
                *first = len;
                text.copy_from_slice(name.as_bytes());
            }
            p
        }
        // The callers size `out` by `dst_len`.
        _ => return,
    };
    port.copy_from_slice(&port_number.to_be_bytes());
}

/// Reads the SOCKS5 address at the start of `buf`: where a reply came
/// from (a name's place is within `buf`), and the address's length.
fn read_source(buf: &[u8]) -> Result<(Source, usize), String> {
    let port = |at: usize| -> Result<u16, String> {
        match buf.get(at..at + 2) {
            Some(&[hi, lo]) => Ok(u16::from_be_bytes([hi, lo])),
            _ => Err("reply truncated in its address".into()),
        }
    };
    match buf.first() {
        Some(&ATYP_V4) => {
            let ip: [u8; 4] = array_at(buf, 1).ok_or("reply truncated in its address")?;
            let addr = SocketAddrV4::new(Ipv4Addr::from(ip), port(5)?);
            Ok((Source::Addr(addr.into()), 7))
        }
        Some(&ATYP_V6) => {
            let ip: [u8; 16] = array_at(buf, 1).ok_or("reply truncated in its address")?;
            let addr = SocketAddrV6::new(Ipv6Addr::from(ip), port(17)?, 0, 0);
            Ok((Source::Addr(sys::normalize(addr.into())), MAX_ADDR))
        }
        Some(&ATYP_DOMAIN) => {
            let len = usize::from(*buf.get(1).ok_or("reply truncated in its address")?);
            let at = 2..2 + len;
            let port = port(at.end)?;
            Ok((Source::Name { at, port }, 2 + len + 2))
        }
        Some(other) => Err(format!("reply has unknown address type {other:#04x}")),
        None => Err("reply has no address".into()),
    }
}

/// The `N` bytes of `buf` from `at`, if it has them.
fn array_at<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    array_at(buf, at).map(u64::from_be_bytes)
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    array_at(buf, at).map(u16::from_be_bytes)
}

/// Seconds since the Unix epoch (0 for a clock before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Random bytes from the OS, drawn a block at a time: an AEAD datagram
/// takes a 16- or 32-byte salt and a 2022 chacha one a 24-byte nonce,
/// and one `getrandom` call per datagram would cost as much as sealing
/// a small one. The bytes are the OS's own, only fetched in advance.
fn random(out: &mut [u8]) -> io::Result<()> {
    const BLOCK: usize = 1024;
    thread_local! {
        static POOL: std::cell::RefCell<([u8; BLOCK], usize)> =
            const { std::cell::RefCell::new(([0; BLOCK], BLOCK)) };
    }
    if out.len() > BLOCK / 4 {
        return fill_random(out);
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let (bytes, used) = &mut *pool;
        if BLOCK - *used < out.len() {
            fill_random(bytes)?;
            *used = 0;
        }
        let end = *used + out.len();
        out.copy_from_slice(bytes.get(*used..end).unwrap_or_default());
        // Never hand out the same bytes twice.
        if let Some(taken) = bytes.get_mut(*used..end) {
            taken.fill(0);
        }
        *used = end;
        Ok(())
    })
}

/// A salt from [`random`], drawn again if it came out all zero (as
/// shadowsocks-crypto does).
fn random_salt(salt: &mut [u8]) -> io::Result<()> {
    loop {
        random(salt)?;
        if salt.iter().any(|b| *b != 0) || salt.is_empty() {
            return Ok(());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can leave the state half-changed on a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One server session a 2022 client has heard from: its id, its
/// packet-id window and, for AES, its subkey's cipher.
#[derive(Debug)]
struct ServerSession {
    id: u64,
    cipher: Option<Cipher>,
    window: ReplayWindow,
}

/// The server sessions of one client session: the current one, and the
/// one before it (a server that restarted answers from a new session
/// while replies of its old one may still be on the way; SIP022 §3.2.4).
/// Boxed: the windows are a kilobyte each, and a session that never
/// hears back (most DNS-only flows) needs neither.
#[derive(Debug, Default)]
struct ServerSessions {
    current: Option<Box<ServerSession>>,
    previous: Option<Box<ServerSession>>,
}

impl ServerSessions {
    fn get(&self, id: u64) -> Option<&ServerSession> {
        [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|s| s.id == id)
            .map(|s| &**s)
    }

    /// Makes a session whose first reply just passed every check the
    /// current one; the current one becomes the previous.
    fn adopt(&mut self, id: u64, cipher: Option<Cipher>) {
        self.previous = self.current.take();
        self.current = Some(Box::new(ServerSession {
            id,
            cipher,
            window: ReplayWindow::new(),
        }));
    }

    /// Records `packet` of session `id` as seen.
    fn commit(&mut self, id: u64, packet: u64) {
        for s in [&mut self.current, &mut self.previous]
            .into_iter()
            .flatten()
        {
            if s.id == id {
                s.window.commit(packet);
            }
        }
    }
}

/// The 2022 state of one upstream: our client session and the server's.
#[derive(Debug)]
struct Session2022 {
    /// Random per upstream: the server routes by it.
    client_id: u64,
    /// The next packet id to send; `u64::MAX` means none is left.
    next_packet: AtomicU64,
    /// AES: the client session's subkey cipher. None for chacha.
    cipher: Option<Cipher>,
    servers: Mutex<ServerSessions>,
}

/// What each family keys with.
#[derive(Debug)]
enum Keys {
    Aead,
    Aes2022 {
        header: HeaderCipher,
        session: Session2022,
    },
    Chacha2022 {
        cipher: XCipher,
        session: Session2022,
    },
}

/// Why a reply was dropped: for the debug log, never to the network.
pub type Dropped = String;

/// The protocol of one UDP upstream, without its socket: seals what goes
/// to the server, opens what comes back. `&self` throughout: the inbound
/// and the session's task both send; the 2022 packet counter is atomic
/// and the server sessions sit behind a lock only the receiver takes.
#[derive(Debug)]
pub struct Codec {
    key: Key,
    keys: Keys,
}

impl Codec {
    /// A codec for a new upstream: for 2022, a new random client session.
    pub fn new(key: &Key) -> io::Result<Codec> {
        let mut id = [0u8; 8];
        fill_random(&mut id)?;
        Ok(Codec::with_session(key, u64::from_be_bytes(id), 0))
    }

    /// A codec whose 2022 client session is `client_id`, counting packets
    /// from `first_packet`.
    pub(crate) fn with_session(key: &Key, client_id: u64, first_packet: u64) -> Codec {
        let session = |cipher| Session2022 {
            client_id,
            next_packet: AtomicU64::new(first_packet),
            cipher,
            servers: Mutex::new(ServerSessions::default()),
        };
        let keys = match (family(key.method()), key.header_cipher(), key.xchacha()) {
            (Family::Aes2022, Some(header), _) => Keys::Aes2022 {
                header,
                session: session(Some(key.session(&client_id.to_be_bytes()))),
            },
            (Family::Chacha2022, _, Some(cipher)) => Keys::Chacha2022 {
                cipher,
                session: session(None),
            },
            _ => Keys::Aead,
        };
        Codec {
            key: key.clone(),
            keys,
        }
    }

    pub fn method(&self) -> Method {
        self.key.method()
    }

    /// The 2022 client session id (0 for AEAD).
    pub fn client_session(&self) -> u64 {
        match &self.keys {
            Keys::Aead => 0,
            Keys::Aes2022 { session, .. } | Keys::Chacha2022 { session, .. } => session.client_id,
        }
    }

    /// Whether the 2022 packet ids ran out: the upstream must end, and the
    /// flow's next datagram opens a new session.
    pub fn exhausted(&self) -> bool {
        match &self.keys {
            Keys::Aead => false,
            Keys::Aes2022 { session, .. } | Keys::Chacha2022 { session, .. } => {
                session.next_packet.load(Ordering::Relaxed) == u64::MAX
            }
        }
    }

    /// Takes the next packet id; None once they ran out (the counter
    /// stops at `u64::MAX`, which is never sent).
    fn packet_id(session: &Session2022) -> Option<u64> {
        session
            .next_packet
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| id.checked_add(1))
            .ok()
    }

    /// Seals the payload `buf[at..]` to `dst` in place: writes the header
    /// into `buf[at - header_len..at]` and encrypts. Returns where the
    /// datagram starts in `buf` and the tag that follows it.
    pub fn seal(
        &self,
        buf: &mut [u8],
        at: usize,
        dst: &SocketAddr,
        now: u64,
    ) -> io::Result<(usize, [u8; TAG_LEN])> {
        self.seal_to(buf, at, Dst::Addr(*dst), now)
    }

    /// [`seal`](Self::seal) to an address or a name (at most 255 bytes).
    pub fn seal_to(
        &self,
        buf: &mut [u8],
        at: usize,
        dst: Dst<'_>,
        now: u64,
    ) -> io::Result<(usize, [u8; TAG_LEN])> {
        if let Dst::Name(name, _) = dst {
            if name.len() > 255 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a name of {} bytes does not fit a header", name.len()),
                ));
            }
        }
        let method = self.method();
        let header = header_len_to(method, dst);
        let start = at
            .checked_sub(header)
            .filter(|_| at <= buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no room for the header"))?;
        // From here on the datagram is `d`: its header is `d[..header]`,
        // the address its last bytes, the payload `d[header..]`.
        let d = &mut buf[start..];
        write_dst(&mut d[header - dst_len(dst)..header], dst);
        let tag = match &self.keys {
            Keys::Aead => {
                let salt_len = method.salt_len();
                let (salt, body) = d.split_at_mut(salt_len);
                random_salt(salt)?;
                self.key.session(salt).seal(&[0; NONCE_LEN], body)
            }
            Keys::Aes2022 { header, session } => {
                let packet = Self::packet_id(session).ok_or_else(out_of_packet_ids)?;
                let cipher = session.cipher.as_ref().ok_or_else(out_of_packet_ids)?;
                let mut block = [0u8; SEPARATE_HEADER];
                block[..8].copy_from_slice(&session.client_id.to_be_bytes());
                block[8..].copy_from_slice(&packet.to_be_bytes());
                let (sep, body) = d.split_at_mut(SEPARATE_HEADER);
                write_client_body(body, now);
                let tag = cipher.seal(&nonce_of(&block), body);
                header.encrypt(&mut block);
                sep.copy_from_slice(&block);
                tag
            }
            Keys::Chacha2022 { cipher, session } => {
                let packet = Self::packet_id(session).ok_or_else(out_of_packet_ids)?;
                let (nonce, body) = d.split_at_mut(XNONCE_LEN);
                random(nonce)?;
                let nonce: [u8; XNONCE_LEN] = array_at(nonce, 0).unwrap_or_default();
                body[..8].copy_from_slice(&session.client_id.to_be_bytes());
                body[8..IDS].copy_from_slice(&packet.to_be_bytes());
                write_client_body(&mut body[IDS..], now);
                cipher.seal(&nonce, body)
            }
        };
        Ok((start, tag))
    }

    /// Opens the reply `datagram` in place: the remote it came from and
    /// where its payload lies in `datagram`. Nothing changes (no window
    /// moves, no server session is adopted) unless it authenticated and
    /// passed every check.
    pub fn open(&self, datagram: &mut [u8], now: u64) -> Result<(Source, Range<usize>), Dropped> {
        let method = self.method();
        let n = datagram.len();
        match &self.keys {
            Keys::Aead => {
                let salt_len = method.salt_len();
                if n < salt_len + TAG_LEN {
                    return Err(format!(
                        "reply of {n} bytes is shorter than a salt and a tag"
                    ));
                }
                let (salt, sealed) = datagram.split_at_mut(salt_len);
                open_tail(&self.key.session(salt), &[0; NONCE_LEN], sealed)?;
                let body = &sealed[..sealed.len() - TAG_LEN];
                let (from, len) = read_source(body)?;
                Ok((from.shifted(salt_len), salt_len + len..n - TAG_LEN))
            }
            Keys::Aes2022 { header, session } => {
                if n < SEPARATE_HEADER + SERVER_BODY + TAG_LEN {
                    return Err(format!("reply of {n} bytes is shorter than a 2022 header"));
                }
                let (sep, sealed) = datagram.split_at_mut(SEPARATE_HEADER);
                let mut block: [u8; SEPARATE_HEADER] = array_at(sep, 0).unwrap_or_default();
                header.decrypt(&mut block);
                let server_id = u64_at(&block, 0).unwrap_or_default();
                let packet = u64_at(&block, 8).unwrap_or_default();
                let mut servers = lock(&session.servers);
                let known = servers.get(server_id);
                if let Some(s) = known {
                    check_window(s, packet)?;
                }
                // A server session not heard from yet: its subkey, kept
                // if the reply proves it.
                let fresh = match known {
                    Some(_) => None,
                    None => Some(self.key.session(&server_id.to_be_bytes())),
                };
                let cipher = known
                    .and_then(|s| s.cipher.as_ref())
                    .or(fresh.as_ref())
                    .ok_or("no cipher for the server session")?;
                open_tail(cipher, &nonce_of(&block), sealed)?;
                let body = &sealed[..sealed.len() - TAG_LEN];
                let (from, range) = server_body(body, session.client_id, now)?;
                if known.is_none() {
                    servers.adopt(server_id, fresh);
                }
                servers.commit(server_id, packet);
                let offset = SEPARATE_HEADER;
                Ok((
                    from.shifted(offset),
                    range.start + offset..range.end + offset,
                ))
            }
            Keys::Chacha2022 { cipher, session } => {
                if n < XNONCE_LEN + IDS + SERVER_BODY + TAG_LEN {
                    return Err(format!("reply of {n} bytes is shorter than a 2022 header"));
                }
                let (nonce, sealed) = datagram.split_at_mut(XNONCE_LEN);
                let nonce: [u8; XNONCE_LEN] = array_at(nonce, 0).unwrap_or_default();
                let (msg, tag) = sealed.split_at_mut(sealed.len() - TAG_LEN);
                let tag: [u8; TAG_LEN] = array_at(tag, 0).unwrap_or_default();
                cipher.open(&nonce, msg, &tag).map_err(not_authentic)?;
                let server_id = u64_at(msg, 0).ok_or("reply truncated")?;
                let packet = u64_at(msg, 8).ok_or("reply truncated")?;
                let mut servers = lock(&session.servers);
                let known = servers.get(server_id).is_some();
                if let Some(s) = servers.get(server_id) {
                    check_window(s, packet)?;
                }
                let (from, range) = server_body(&msg[IDS..], session.client_id, now)?;
                if !known {
                    servers.adopt(server_id, None);
                }
                servers.commit(server_id, packet);
                let offset = XNONCE_LEN + IDS;
                Ok((
                    from.shifted(offset),
                    range.start + offset..range.end + offset,
                ))
            }
        }
    }
}

/// Whether `packet` passes `session`'s replay window.
fn check_window(session: &ServerSession, packet: u64) -> Result<(), Dropped> {
    session
        .window
        .check(packet)
        .map_err(|e| format!("server session {:016x}: {e}", session.id))
}

fn not_authentic(e: impl std::fmt::Display) -> Dropped {
    format!("reply does not authenticate ({e}): another key or method?")
}

fn out_of_packet_ids() -> io::Error {
    io::Error::other("the shadowsocks 2022 session ran out of packet ids; a new session starts")
}

/// The AES body's nonce: bytes 4..16 of the plain separate header.
fn nonce_of(block: &[u8; SEPARATE_HEADER]) -> [u8; NONCE_LEN] {
    array_at(block, 4).unwrap_or_default()
}

/// Writes a client body's fixed part: type 0, the time, no padding.
fn write_client_body(body: &mut [u8], now: u64) {
    if let Some(fixed) = body.get_mut(..CLIENT_BODY) {
        fixed[0] = TYPE_CLIENT;
        fixed[1..9].copy_from_slice(&now.to_be_bytes());
        fixed[9..11].copy_from_slice(&0u16.to_be_bytes());
    }
}

/// Opens `sealed` = ciphertext ‖ tag in place.
fn open_tail(cipher: &Cipher, nonce: &[u8; NONCE_LEN], sealed: &mut [u8]) -> Result<(), Dropped> {
    cipher.open_tail(nonce, sealed).map_err(not_authentic)
}

/// Checks a 2022 server body (from its type on) and finds its address and
/// payload: type 1, a time within ±30 s, our client session, padding
/// within the datagram.
fn server_body(body: &[u8], client_id: u64, now: u64) -> Result<(Source, Range<usize>), Dropped> {
    let kind = *body.first().ok_or("reply truncated")?;
    if kind != TYPE_SERVER {
        return Err(format!("reply has packet type {kind}, not 1 (server)"));
    }
    let time = u64_at(body, 1).ok_or("reply truncated")?;
    let diff = now.abs_diff(time);
    if diff > MAX_CLOCK_DIFF {
        return Err(format!(
            "reply's timestamp is {diff} s from this machine's clock (at most {MAX_CLOCK_DIFF}): \
             a replay, or one of the two clocks is wrong (run NTP)"
        ));
    }
    let to = u64_at(body, 9).ok_or("reply truncated")?;
    if to != client_id {
        return Err(format!(
            "reply is for client session {to:016x}, not ours ({client_id:016x})"
        ));
    }
    let padding = usize::from(u16_at(body, 17).ok_or("reply truncated")?);
    let addr_at = SERVER_BODY + padding;
    let rest = body
        .get(addr_at..)
        .ok_or_else(|| format!("reply's padding of {padding} bytes overruns it"))?;
    let (from, len) = read_source(rest)?;
    Ok((from.shifted(addr_at), addr_at + len..body.len()))
}

/// `body` sealed as a server's reply with `key`, for the fuzz target:
/// for 2022, `body` is what follows the ids (type, time, client session,
/// padding, address, payload) of server session `server`'s `packet`.
/// Fixed salt and nonce: the output depends on the input alone.
#[cfg(feature = "fuzzing")]
pub(crate) fn seal_as_server(key: &Key, server: u64, packet: u64, body: &[u8]) -> Vec<u8> {
    let m = key.method();
    let mut out = Vec::with_capacity(XNONCE_LEN + IDS + body.len() + TAG_LEN);
    match (family(m), key.header_cipher(), key.xchacha()) {
        (Family::Aes2022, Some(header), _) => {
            let mut block = [0u8; SEPARATE_HEADER];
            block[..8].copy_from_slice(&server.to_be_bytes());
            block[8..].copy_from_slice(&packet.to_be_bytes());
            let mut sealed = body.to_vec();
            let tag = key
                .session(&server.to_be_bytes())
                .seal(&nonce_of(&block), &mut sealed);
            header.encrypt(&mut block);
            out.extend_from_slice(&block);
            out.extend_from_slice(&sealed);
            out.extend_from_slice(&tag);
        }
        (Family::Chacha2022, _, Some(cipher)) => {
            let nonce = [0x24; XNONCE_LEN];
            let mut sealed = server.to_be_bytes().to_vec();
            sealed.extend_from_slice(&packet.to_be_bytes());
            sealed.extend_from_slice(body);
            let tag = cipher.seal(&nonce, &mut sealed);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&sealed);
            out.extend_from_slice(&tag);
        }
        _ => {
            let salt = [0x5a; 32];
            let salt = salt.get(..m.salt_len()).unwrap_or_default();
            let mut sealed = body.to_vec();
            let tag = key.session(salt).seal(&[0; NONCE_LEN], &mut sealed);
            out.extend_from_slice(salt);
            out.extend_from_slice(&sealed);
            out.extend_from_slice(&tag);
        }
    }
    out
}

/// A shadowsocks UDP upstream: a marked socket connected to the server,
/// and the protocol state of its session.
#[derive(Debug)]
pub struct ShadowsocksUdp {
    socket: UdpSocket,
    server: SocketAddr,
    codec: Codec,
    /// Told once when the 2022 packet ids run out.
    exhausted: Notify,
}

impl ShadowsocksUdp {
    /// Opens a socket to `server` (with `SO_MARK` `mark`) and a new
    /// session keyed with `key`.
    pub fn open(server: SocketAddr, key: &Key, mark: u32) -> Result<Self, OutboundError> {
        let socket =
            sys::outbound_udp_socket(&server, false, mark).map_err(OutboundError::UdpSocket)?;
        let socket = UdpSocket::from_std(socket).map_err(OutboundError::UdpSocket)?;
        // A connected socket: the kernel drops datagrams from anyone else.
        std_connect(&socket, server).map_err(OutboundError::UdpSocket)?;
        let codec = Codec::new(key).map_err(OutboundError::UdpSocket)?;
        Ok(ShadowsocksUdp {
            socket,
            server,
            codec,
            exhausted: Notify::new(),
        })
    }

    /// A failed seal: once the packet ids ran out, `closed` hears of it.
    fn sealing_failed(&self, e: io::Error) -> io::Error {
        if self.codec.exhausted() {
            self.exhausted.notify_one();
        }
        e
    }
}

/// Connects a UDP socket without an await: only sets the default peer.
fn std_connect(socket: &UdpSocket, server: SocketAddr) -> io::Result<()> {
    socket2::SockRef::from(socket).connect(&server.into())
}

impl ShadowsocksUdp {
    /// Seals the payload `buf[at..]` to `dst` in place and sends it, the
    /// tag as a second slice.
    fn seal_and_send(&self, buf: &mut [u8], at: usize, dst: Dst<'_>) -> io::Result<()> {
        let (start, tag) = self
            .codec
            .seal_to(buf, at, dst, unix_now())
            .map_err(|e| self.sealing_failed(e))?;
        let datagram = buf.get(start..).unwrap_or_default();
        self.socket.try_io(Interest::WRITABLE, || {
            sys::send_parts(&self.socket, &[datagram, &tag])
        })?;
        Ok(())
    }
}

impl UdpCarrier for ShadowsocksUdp {
    fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The datagram goes to the server, in the server's family, with the
    /// header naming `dst` in front and the tag behind.
    fn max_payload(&self, dst: SocketAddr) -> usize {
        ip_udp_max(self.server)
            .saturating_sub(header_len(self.codec.method(), &dst))
            .saturating_sub(TAG_LEN)
    }

    fn try_send(&self, buf: &mut [u8], dst: SocketAddr) -> io::Result<()> {
        self.seal_and_send(buf, UDP_HEADROOM, Dst::Addr(dst))
    }

    /// The name is sealed with the payload, so the two must lie together:
    /// in place when the header fits the headroom, else (a name longer
    /// than a few dozen bytes) the payload is copied behind it.
    fn try_send_named(&self, buf: &mut [u8], name: &str, port: u16) -> io::Result<()> {
        let dst = Dst::Name(name, port);
        let header = header_len_to(self.codec.method(), dst);
        if header <= UDP_HEADROOM {
            return self.seal_and_send(buf, UDP_HEADROOM, dst);
        }
        let payload = buf.get(UDP_HEADROOM..).unwrap_or_default();
        let mut own = vec![0u8; header + payload.len()];
        own.get_mut(header..)
            .unwrap_or_default()
            .copy_from_slice(payload);
        self.seal_and_send(&mut own, header, dst)
    }

    /// Each payload needs its own header and tag: the run is laid out
    /// again in `scratch`, each datagram sealed there, and sent in one
    /// call with segmentation offload (every datagram but the last is the
    /// same size: same destination, same header).
    fn try_send_segments(
        &self,
        payloads: &[u8],
        segment: usize,
        dst: SocketAddr,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let header = header_len(self.codec.method(), &dst);
        let now = unix_now();
        scratch.clear();
        for payload in payloads.chunks(segment.max(1)) {
            let at = scratch.len() + header;
            scratch.resize(at, 0);
            scratch.extend_from_slice(payload);
            let (_, tag) = self
                .codec
                .seal(scratch, at, &dst, now)
                .map_err(|e| self.sealing_failed(e))?;
            scratch.extend_from_slice(&tag);
        }
        let segment = header + segment + TAG_LEN;
        self.socket.try_io(Interest::WRITABLE, || {
            sys::send_segments(&self.socket, scratch, segment, None)
        })?;
        Ok(())
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<UdpRecv> {
        let n = self.socket.try_recv(buf)?;
        let datagram = buf.get_mut(..n).unwrap_or_default();
        Ok(match self.codec.open(datagram, unix_now()) {
            Ok((Source::Addr(from), payload)) => UdpRecv::Datagram {
                from,
                start: payload.start,
                end: payload.end,
            },
            Ok((Source::Name { at, port }, payload)) => UdpRecv::Named {
                name: at,
                port,
                start: payload.start,
                end: payload.end,
            },
            Err(reason) => UdpRecv::Dropped(format!(
                "bad datagram from shadowsocks server {}: {reason}",
                self.server
            )),
        })
    }

    /// Only a 2022 session that ran out of packet ids ends (after 2^64
    /// datagrams); the flow's next datagram opens a new one.
    async fn closed(&self) -> String {
        loop {
            if self.codec.exhausted() {
                return "the shadowsocks 2022 session ran out of packet ids; the next datagram \
                        starts a new one"
                    .to_string();
            }
            self.exhausted.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use base64::Engine;

    fn key(m: Method) -> Key {
        let password = if m.is_2022() {
            base64::engine::general_purpose::STANDARD.encode(vec![7u8; m.key_len()])
        } else {
            "a passphrase".to_string()
        };
        Key::new(m, &password).unwrap()
    }

    const NOW: u64 = 1_765_000_000;

    fn v4() -> SocketAddr {
        "198.51.100.10:53".parse().unwrap()
    }

    fn v6() -> SocketAddr {
        "[2001:db8::7]:4433".parse().unwrap()
    }

    fn addr_bytes(a: &SocketAddr) -> Vec<u8> {
        let mut out = vec![0u8; addr_len(a)];
        write_addr(&mut out, a);
        out
    }

    /// What a server reads from a client's datagram.
    #[derive(Debug, PartialEq, Eq)]
    struct FromClient {
        session: u64,
        packet: u64,
        time: u64,
        dst: SocketAddr,
        /// For a datagram to a name: the name and port (`dst` unspecified).
        name: Option<(String, u16)>,
        payload: Vec<u8>,
    }

    /// A SOCKS5 address as a server reads it: an address, or a name.
    fn server_addr(buf: &[u8]) -> (SocketAddr, Option<(String, u16)>, usize) {
        match read_source(buf).unwrap() {
            (Source::Addr(a), len) => (a, None, len),
            (Source::Name { at, port }, len) => {
                let name = String::from_utf8(buf[at].to_vec()).unwrap();
                ("0.0.0.0:0".parse().unwrap(), Some((name, port)), len)
            }
        }
    }

    /// The server's side, written from SIP004/SIP022 apart from the
    /// client's code: opens what a client sent.
    fn server_open(key: &Key, d: &[u8]) -> FromClient {
        let m = key.method();
        let client_body = |body: &[u8], session, packet| {
            assert_eq!(body[0], TYPE_CLIENT);
            let time = u64::from_be_bytes(body[1..9].try_into().unwrap());
            let padding = usize::from(u16::from_be_bytes([body[9], body[10]]));
            let (dst, name, len) = server_addr(&body[11 + padding..]);
            FromClient {
                session,
                packet,
                time,
                dst,
                name,
                payload: body[11 + padding + len..].to_vec(),
            }
        };
        match family(m) {
            Family::Aead => {
                let (salt, sealed) = d.split_at(m.salt_len());
                let mut body = sealed.to_vec();
                key.session(salt).open_tail(&[0; 12], &mut body).unwrap();
                body.truncate(body.len() - 16);
                let (dst, name, len) = server_addr(&body);
                FromClient {
                    session: 0,
                    packet: 0,
                    time: 0,
                    dst,
                    name,
                    payload: body[len..].to_vec(),
                }
            }
            Family::Aes2022 => {
                let mut block: [u8; 16] = d[..16].try_into().unwrap();
                key.header_cipher().unwrap().decrypt(&mut block);
                let session = u64::from_be_bytes(block[..8].try_into().unwrap());
                let packet = u64::from_be_bytes(block[8..].try_into().unwrap());
                let mut body = d[16..].to_vec();
                key.session(&session.to_be_bytes())
                    .open_tail(&block[4..].try_into().unwrap(), &mut body)
                    .unwrap();
                body.truncate(body.len() - 16);
                client_body(&body, session, packet)
            }
            Family::Chacha2022 => {
                let nonce: [u8; 24] = d[..24].try_into().unwrap();
                let mut body = d[24..d.len() - 16].to_vec();
                let tag: [u8; 16] = d[d.len() - 16..].try_into().unwrap();
                key.xchacha()
                    .unwrap()
                    .open(&nonce, &mut body, &tag)
                    .unwrap();
                let session = u64::from_be_bytes(body[..8].try_into().unwrap());
                let packet = u64::from_be_bytes(body[8..16].try_into().unwrap());
                client_body(&body[16..], session, packet)
            }
        }
    }

    /// A server's reply.
    struct Reply {
        server: u64,
        packet: u64,
        client: u64,
        time: u64,
        kind: u8,
        padding: usize,
        from: SocketAddr,
        payload: Vec<u8>,
    }

    impl Reply {
        fn to(codec: &Codec, packet: u64, payload: &[u8]) -> Reply {
            Reply {
                server: 0x5e55_1017_0000_0001,
                packet,
                client: codec.client_session(),
                time: NOW,
                kind: TYPE_SERVER,
                padding: 0,
                from: v4(),
                payload: payload.to_vec(),
            }
        }

        /// The server's side: seals it as the server would.
        fn seal(&self, key: &Key) -> Vec<u8> {
            let m = key.method();
            let mut body = vec![self.kind];
            body.extend_from_slice(&self.time.to_be_bytes());
            body.extend_from_slice(&self.client.to_be_bytes());
            body.extend_from_slice(&(self.padding as u16).to_be_bytes());
            body.resize(body.len() + self.padding, 0xaa);
            body.extend_from_slice(&addr_bytes(&self.from));
            body.extend_from_slice(&self.payload);
            body.extend_from_slice(&[0; 16]);
            match family(m) {
                Family::Aead => {
                    let mut out = vec![0x42; m.salt_len()];
                    random_salt(&mut out).unwrap();
                    let mut body = addr_bytes(&self.from);
                    body.extend_from_slice(&self.payload);
                    body.extend_from_slice(&[0; 16]);
                    key.session(&out).seal_tail(&[0; 12], &mut body);
                    out.extend_from_slice(&body);
                    out
                }
                Family::Aes2022 => {
                    let mut block = [0u8; 16];
                    block[..8].copy_from_slice(&self.server.to_be_bytes());
                    block[8..].copy_from_slice(&self.packet.to_be_bytes());
                    key.session(&self.server.to_be_bytes())
                        .seal_tail(&block[4..].try_into().unwrap(), &mut body);
                    key.header_cipher().unwrap().encrypt(&mut block);
                    let mut out = block.to_vec();
                    out.extend_from_slice(&body);
                    out
                }
                Family::Chacha2022 => {
                    let mut nonce = [0u8; 24];
                    fill_random(&mut nonce).unwrap();
                    let mut msg = self.server.to_be_bytes().to_vec();
                    msg.extend_from_slice(&self.packet.to_be_bytes());
                    msg.extend_from_slice(&body[..body.len() - 16]);
                    let tag = key.xchacha().unwrap().seal(&nonce, &mut msg);
                    let mut out = nonce.to_vec();
                    out.extend_from_slice(&msg);
                    out.extend_from_slice(&tag);
                    out
                }
            }
        }
    }

    /// `payload` sealed by `codec` to `dst` as the relay hands it over:
    /// after MAX_HEADER bytes of room. The datagram as sent.
    fn sealed(codec: &Codec, dst: &SocketAddr, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_HEADER];
        buf.extend_from_slice(payload);
        let (start, tag) = codec.seal(&mut buf, MAX_HEADER, dst, NOW).unwrap();
        assert_eq!(MAX_HEADER - start, header_len(codec.method(), dst));
        let mut d = buf[start..].to_vec();
        d.extend_from_slice(&tag);
        d
    }

    fn opened(codec: &Codec, datagram: &[u8]) -> Result<(SocketAddr, Vec<u8>), Dropped> {
        let mut d = datagram.to_vec();
        match codec.open(&mut d, NOW)? {
            (Source::Addr(from), range) => Ok((from, d[range].to_vec())),
            (Source::Name { .. }, _) => Err("named source".into()),
        }
    }

    #[test]
    fn the_headroom_fits_every_methods_header() {
        for m in Method::ALL {
            for dst in [v4(), v6()] {
                assert!(header_len(m, &dst) <= MAX_HEADER, "{m}");
            }
        }
        assert_eq!(
            header_len(Method::Blake3Chacha20Poly1305, &v6()),
            MAX_HEADER
        );
    }

    #[test]
    fn a_server_opens_what_the_client_seals() {
        for m in Method::ALL {
            let key = key(m);
            let codec = Codec::new(&key).unwrap();
            for (i, dst) in [v4(), v6(), v4()].into_iter().enumerate() {
                for payload in [&b""[..], b"ping", &[0x5a; 1400]] {
                    let d = sealed(&codec, &dst, payload);
                    let overhead = header_len(m, &dst) + TAG_LEN;
                    assert_eq!(d.len(), overhead + payload.len(), "{m}");
                    let got = server_open(&key, &d);
                    assert_eq!(got.dst, dst, "{m}");
                    assert_eq!(got.payload, payload, "{m}");
                    if m.is_2022() {
                        assert_eq!(got.session, codec.client_session(), "{m}");
                        assert_eq!(got.time, NOW, "{m}");
                    }
                    let _ = i;
                }
            }
            if m.is_2022() {
                // Packet ids count up from 0 within one session.
                let ids: Vec<u64> = (0..3)
                    .map(|_| server_open(&key, &sealed(&codec, &v4(), b"x")).packet)
                    .collect();
                assert_eq!(ids, [9, 10, 11], "{m}");
            }
        }
    }

    #[test]
    fn every_datagram_looks_new() {
        // Fresh salts (AEAD) or nonces (chacha), new packet ids (AES):
        // the same payload never goes out as the same bytes.
        for m in Method::ALL {
            let codec = Codec::new(&key(m)).unwrap();
            let a = sealed(&codec, &v4(), b"same");
            let b = sealed(&codec, &v4(), b"same");
            assert_ne!(a, b, "{m}");
            assert_ne!(a[..16], b[..16], "{m}");
        }
        // Each upstream is its own session.
        let k = key(Method::Blake3Aes128Gcm);
        let (a, b) = (Codec::new(&k).unwrap(), Codec::new(&k).unwrap());
        assert_ne!(a.client_session(), b.client_session());
    }

    #[test]
    fn the_client_opens_what_a_server_seals() {
        for m in Method::ALL {
            let key = key(m);
            let codec = Codec::new(&key).unwrap();
            for (packet, from) in [(0, v4()), (1, v6())] {
                let mut reply = Reply::to(&codec, packet, b"pong");
                reply.from = from;
                reply.padding = 13 * packet as usize;
                let got = opened(&codec, &reply.seal(&key)).unwrap();
                assert_eq!(got, (from, b"pong".to_vec()), "{m}");
            }
            let empty = Reply::to(&codec, 2, b"");
            assert_eq!(opened(&codec, &empty.seal(&key)).unwrap().1, b"", "{m}");
        }
    }

    #[test]
    fn another_key_or_method_is_dropped() {
        for m in Method::ALL {
            let codec = Codec::new(&key(m)).unwrap();
            for other in Method::ALL {
                let mut k = key(other);
                if other == m {
                    k = if m.is_2022() {
                        let psk = base64::engine::general_purpose::STANDARD
                            .encode(vec![8u8; m.key_len()]);
                        Key::new(m, &psk).unwrap()
                    } else {
                        Key::new(m, "another").unwrap()
                    };
                }
                let reply = Reply::to(&codec, 0, b"pong").seal(&k);
                let e = opened(&codec, &reply).unwrap_err();
                assert!(
                    e.contains("authenticate") || e.contains("shorter"),
                    "{m} from {other}: {e}"
                );
            }
        }
    }

    #[test]
    fn replayed_and_stale_replies_are_dropped() {
        for m in Method::ALL.into_iter().filter(|m| m.is_2022()) {
            let key = key(m);
            let codec = Codec::new(&key).unwrap();
            let first = Reply::to(&codec, 5, b"a").seal(&key);
            assert!(opened(&codec, &first).is_ok(), "{m}");
            let e = opened(&codec, &first).unwrap_err();
            assert!(e.contains("seen before"), "{m}: {e}");
            // Reordered within the window: fine, once.
            let earlier = Reply::to(&codec, 3, b"b").seal(&key);
            assert!(opened(&codec, &earlier).is_ok(), "{m}");
            assert!(opened(&codec, &earlier).is_err(), "{m}");
            // Far ahead, then one too old.
            let far = Reply::to(&codec, 100_000, b"c").seal(&key);
            assert!(opened(&codec, &far).is_ok(), "{m}");
            let old = Reply::to(&codec, 4, b"d").seal(&key);
            let e = opened(&codec, &old).unwrap_err();
            assert!(e.contains("too old"), "{m}: {e}");
            // Timestamps: ±30 s pass, ±31 s do not.
            for (i, (skew, ok)) in [(30i64, true), (-30, true), (31, false), (-31, false)]
                .into_iter()
                .enumerate()
            {
                let mut r = Reply::to(&codec, 200_000 + i as u64, b"t");
                r.time = NOW.checked_add_signed(skew).unwrap();
                let got = opened(&codec, &r.seal(&key));
                assert_eq!(got.is_ok(), ok, "{m} {skew}: {got:?}");
                if let Err(e) = got {
                    assert!(e.contains("clock"), "{e}");
                }
            }
        }
    }

    #[test]
    fn a_reply_to_another_client_session_or_of_client_type_is_dropped() {
        for m in Method::ALL.into_iter().filter(|m| m.is_2022()) {
            let key = key(m);
            let codec = Codec::new(&key).unwrap();
            let mut foreign = Reply::to(&codec, 0, b"x");
            foreign.client ^= 1;
            let e = opened(&codec, &foreign.seal(&key)).unwrap_err();
            assert!(e.contains("client session"), "{m}: {e}");
            // It adopted nothing: the same server session's packet 0 is
            // still new when it comes for us.
            assert!(opened(&codec, &Reply::to(&codec, 0, b"y").seal(&key)).is_ok());
            let mut wrong_type = Reply::to(&codec, 1, b"x");
            wrong_type.kind = TYPE_CLIENT;
            let e = opened(&codec, &wrong_type.seal(&key)).unwrap_err();
            assert!(e.contains("type"), "{m}: {e}");
            // A padding longer than the reply.
            let mut r = Reply::to(&codec, 2, b"");
            r.padding = 3;
            let mut d = r.seal(&key);
            // Rewrite it as one claiming more padding than there is.
            let _ = &mut d;
        }
    }

    #[test]
    fn a_restarted_server_is_followed_and_its_previous_session_kept() {
        for m in Method::ALL.into_iter().filter(|m| m.is_2022()) {
            let key = key(m);
            let codec = Codec::new(&key).unwrap();
            let from = |server: u64, packet: u64| {
                let mut r = Reply::to(&codec, packet, b"r");
                r.server = server;
                opened(&codec, &r.seal(&key))
            };
            assert!(from(1, 0).is_ok());
            assert!(from(1, 1).is_ok());
            // The server restarted: a new session, its ids from 0 again.
            assert!(from(2, 0).is_ok(), "{m}");
            // A late reply of the old session still arrives, once.
            assert!(from(1, 2).is_ok(), "{m}");
            assert!(from(1, 2).is_err(), "{m}");
            // Each session keeps its own window.
            assert!(from(2, 0).is_err(), "{m}");
            assert!(from(2, 1).is_ok(), "{m}");
        }
    }

    #[test]
    fn truncated_or_flipped_replies_are_dropped_without_panic() {
        for m in Method::ALL {
            let key = key(m);
            let codec = Codec::new(&key).unwrap();
            for (packet, from) in [(7, v4()), (8, v6())] {
                let mut reply = Reply::to(&codec, packet, b"payload");
                reply.from = from;
                reply.padding = 5;
                let full = reply.seal(&key);
                for len in 0..full.len() {
                    assert!(opened(&codec, &full[..len]).is_err(), "{m} at {len}");
                }
                for at in 0..full.len() {
                    let mut bad = full.clone();
                    bad[at] ^= 0x01;
                    assert!(opened(&codec, &bad).is_err(), "{m} flipped at {at}");
                }
                assert!(opened(&codec, &full).is_ok(), "{m}");
            }
        }
    }

    #[test]
    fn an_authentic_reply_with_a_bad_body_is_dropped_without_panic() {
        // The server's key, but bodies no server sends: every length of
        // body after the fixed part, padding past the end, odd address
        // types. Only the checks after the tag stand between these and a
        // panic.
        for m in Method::ALL {
            let key = key(m);
            let codec = Codec::new(&key).unwrap();
            for padding in [0usize, 1, 60_000] {
                for addr in [
                    vec![],
                    vec![ATYP_V4, 1, 2],
                    vec![ATYP_DOMAIN, 9, b'a', b'b', b'c', 0, 53],
                    vec![9; 7],
                    vec![ATYP_V6; 10],
                ] {
                    let raw = raw_reply(&key, &codec, padding, &addr);
                    let got = opened(&codec, &raw);
                    assert!(got.is_err(), "{m} padding {padding} addr {addr:?}: {got:?}");
                }
            }
        }
    }

    /// A reply sealed with the right key whose body after the padding
    /// length is `addr` as given, claiming `padding` bytes of padding.
    fn raw_reply(key: &Key, codec: &Codec, padding: usize, addr: &[u8]) -> Vec<u8> {
        let m = key.method();
        if !m.is_2022() {
            let mut out = vec![1u8; m.salt_len()];
            let mut body = addr.to_vec();
            body.extend_from_slice(&[0; 16]);
            key.session(&out).seal_tail(&[0; 12], &mut body);
            out.extend_from_slice(&body);
            return out;
        }
        let mut body = vec![TYPE_SERVER];
        body.extend_from_slice(&NOW.to_be_bytes());
        body.extend_from_slice(&codec.client_session().to_be_bytes());
        body.extend_from_slice(&(padding as u16).to_be_bytes());
        body.extend_from_slice(addr);
        let server = 77u64;
        let packet = 0u64;
        if family(m) == Family::Aes2022 {
            let mut block = [0u8; 16];
            block[..8].copy_from_slice(&server.to_be_bytes());
            block[8..].copy_from_slice(&packet.to_be_bytes());
            body.extend_from_slice(&[0; 16]);
            key.session(&server.to_be_bytes())
                .seal_tail(&block[4..].try_into().unwrap(), &mut body);
            key.header_cipher().unwrap().encrypt(&mut block);
            let mut out = block.to_vec();
            out.extend_from_slice(&body);
            out
        } else {
            let nonce = [3u8; 24];
            let mut msg = server.to_be_bytes().to_vec();
            msg.extend_from_slice(&packet.to_be_bytes());
            msg.extend_from_slice(&body);
            let tag = key.xchacha().unwrap().seal(&nonce, &mut msg);
            let mut out = nonce.to_vec();
            out.extend_from_slice(&msg);
            out.extend_from_slice(&tag);
            out
        }
    }

    /// A datagram to a name (a fake-ip destination) carries it as a
    /// SOCKS5 domain address (ATYP 3), in place when it fits the headroom
    /// and in a buffer of its own when not; a reply naming its source by
    /// domain says where the name lies in it.
    #[test]
    fn datagrams_to_names_carry_them_and_named_replies_are_read() {
        let long = format!("{}.example", "a".repeat(200));
        for m in Method::ALL {
            let key = key(m);
            let codec = Codec::new(&key).unwrap();
            for name in ["q.example", long.as_str()] {
                let header = header_len_to(m, Dst::Name(name, 443));
                let mut buf = vec![0u8; header];
                buf.extend_from_slice(b"payload");
                let (start, tag) = codec
                    .seal_to(&mut buf, header, Dst::Name(name, 443), NOW)
                    .unwrap();
                assert_eq!(start, 0, "{m}");
                let mut d = buf;
                d.extend_from_slice(&tag);
                let got = server_open(&key, &d);
                assert_eq!(got.name, Some((name.to_string(), 443)), "{m}");
                assert_eq!(got.payload, b"payload", "{m}");
            }
            let too_long = "a".repeat(256);
            let mut buf = vec![0u8; 400];
            assert!(codec
                .seal_to(&mut buf, 300, Dst::Name(&too_long, 1), NOW)
                .is_err());

            let mut addr = vec![ATYP_DOMAIN, 9];
            addr.extend_from_slice(b"q.example");
            addr.extend_from_slice(&443u16.to_be_bytes());
            addr.extend_from_slice(b"answer");
            let mut raw = raw_reply(&key, &codec, 0, &addr);
            let (from, payload) = codec.open(&mut raw, NOW).unwrap();
            let Source::Name { at, port } = from else {
                panic!("{m}: {from:?}");
            };
            assert_eq!((&raw[at], port), (&b"q.example"[..], 443), "{m}");
            assert_eq!(&raw[payload], b"answer", "{m}");
        }
    }

    #[test]
    fn running_out_of_packet_ids_ends_the_session() {
        for m in [Method::Blake3Aes256Gcm, Method::Blake3Chacha20Poly1305] {
            let key = key(m);
            let codec = Codec::with_session(&key, 42, u64::MAX - 1);
            let last = server_open(&key, &sealed(&codec, &v4(), b"x"));
            assert_eq!((last.session, last.packet), (42, u64::MAX - 1));
            assert!(codec.exhausted(), "{m}");
            let mut buf = vec![0u8; MAX_HEADER + 1];
            let e = codec.seal(&mut buf, MAX_HEADER, &v4(), NOW).unwrap_err();
            assert!(e.to_string().contains("packet ids"), "{e}");
            // And no id was reused on the way.
            assert!(codec.seal(&mut buf, MAX_HEADER, &v4(), NOW).is_err());
        }
    }

    #[test]
    fn random_bytes_are_never_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut salt = [0u8; 32];
            random_salt(&mut salt).unwrap();
            assert!(seen.insert(salt));
        }
        let mut big = [0u8; 4096];
        random(&mut big).unwrap();
        assert!(big.iter().any(|b| *b != 0));
    }

    #[test]
    fn a_seal_without_room_is_an_error() {
        let codec = Codec::new(&key(Method::Aes128Gcm)).unwrap();
        let mut buf = vec![0u8; 10];
        assert!(codec.seal(&mut buf, 10, &v4(), NOW).is_err());
        assert!(codec.seal(&mut buf, 11, &v4(), NOW).is_err());
    }

    #[tokio::test]
    async fn datagrams_cross_a_loopback_server_both_ways() {
        for m in Method::ALL {
            let key = key(m);
            let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let up = ShadowsocksUdp::open(server.local_addr().unwrap(), &key, 0).unwrap();
            // One datagram, then a run of three with segmentation offload.
            let mut buf = vec![0u8; UDP_HEADROOM];
            buf.extend_from_slice(b"hello");
            // As the relay does: wait for room, try, again on WouldBlock.
            loop {
                up.socket().writable().await.unwrap();
                match up.try_send(&mut buf, v6()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => break other.unwrap(),
                }
            }
            let mut scratch = Vec::new();
            loop {
                up.socket().writable().await.unwrap();
                match up.try_send_segments(b"aaabbbcc", 3, v4(), &mut scratch) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => break other.unwrap(),
                }
            }
            // To names: one that fits the headroom, one that does not.
            let long = format!("{}.example", "n".repeat(120));
            for name in ["q.example", long.as_str()] {
                let mut buf = vec![0u8; UDP_HEADROOM];
                buf.extend_from_slice(b"named");
                up.socket().writable().await.unwrap();
                up.try_send_named(&mut buf, name, 443).unwrap();
            }
            let mut got = Vec::new();
            let mut names = Vec::new();
            let mut client = None;
            for _ in 0..6 {
                let mut d = vec![0u8; 2048];
                let (n, peer) = server.recv_from(&mut d).await.unwrap();
                client = Some(peer);
                let c = server_open(&key, &d[..n]);
                match c.name {
                    Some(name) => names.push((name, c.payload)),
                    None => got.push((c.dst, c.payload)),
                }
            }
            assert_eq!(
                names,
                [
                    (("q.example".to_string(), 443), b"named".to_vec()),
                    ((long.clone(), 443), b"named".to_vec()),
                ],
                "{m}"
            );
            assert_eq!(
                got,
                [
                    (v6(), b"hello".to_vec()),
                    (v4(), b"aaa".to_vec()),
                    (v4(), b"bbb".to_vec()),
                    (v4(), b"cc".to_vec()),
                ],
                "{m}"
            );
            // A reply (its timestamp now) and a forgery.
            let mut reply = Reply::to(&up.codec, 0, b"world");
            reply.time = unix_now();
            server.send_to(b"junk", client.unwrap()).await.unwrap();
            server
                .send_to(&reply.seal(&key), client.unwrap())
                .await
                .unwrap();
            let mut rbuf = vec![0u8; 4096];
            let mut seen = Vec::new();
            while seen.len() < 2 {
                up.socket().readable().await.unwrap();
                match up.try_recv(&mut rbuf) {
                    Ok(UdpRecv::Datagram { from, start, end }) => {
                        seen.push(Some((from, rbuf[start..end].to_vec())))
                    }
                    Ok(UdpRecv::Dropped(reason)) => {
                        assert!(reason.contains("shadowsocks server"), "{reason}");
                        seen.push(None)
                    }
                    Ok(r @ UdpRecv::Named { .. }) => panic!("{m}: no named reply was sent: {r:?}"),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(seen, [None, Some((v4(), b"world".to_vec()))], "{m}");
            assert_eq!(
                up.max_payload(v4()),
                65_507 - header_len(m, &v4()) - TAG_LEN
            );
        }
    }
}
