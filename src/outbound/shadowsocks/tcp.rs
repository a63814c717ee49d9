//! The shadowsocks TCP client stream, AEAD (SIP004) and 2022 (SIP022):
//! a tokio `AsyncRead + AsyncWrite` over any byte stream (a `TcpStream`
//! to the server in use).
//!
//! Writing: the first write carries the request and the client's first
//! bytes in one flight (AEAD: salt, then one chunk holding the target
//! address and the first bytes; 2022: salt, the fixed header, the
//! variable header with the address, padding and the first bytes). If the
//! client has sent nothing [`HEADER_WAIT`] after the first read, the
//! request goes alone so that server-first protocols (SMTP, SSH banners)
//! work. Every later write becomes chunks of at most the method's limit,
//! never an empty one. Shutdown flushes and half-closes; reading goes on.
//!
//! Reading: the server's salt, then (2022) its response header (type 1,
//! timestamp within [`MAX_CLOCK_SKEW`], our request salt echoed), then
//! chunks. Lengths are checked against the method's limit before a byte
//! of the chunk is awaited, and the read buffer only ever has one of two
//! fixed sizes (a chunk over the smaller one, possible with 2022, moves
//! it to the larger), so nothing is allocated from a length the server
//! sent.
//!
//! Memory: an idle stream holds no buffer. The read buffer is taken from
//! a shared stock when a read is tried and given back when the socket
//! has nothing more and every byte read was handed out; the write buffer
//! holds what one write seals and is freed when the relay flushes (its
//! client has nothing more for now). A busy stream keeps both between
//! writes and reads, so bulk transfers pay no allocation per chunk.
//!
//! A wrong password or method gets no answer at all from libev's server
//! (SSR's AEAD server neither; its 2022 server resets). So once client
//! bytes went out, a reply that has not authenticated within
//! `first_byte_timeout` fails the stream with
//! [`ShadowsocksError::NoReply`] — unless another stream of the same
//! outbound got a valid reply meanwhile, which proves the key, and this
//! target is just slow to answer (a long poll).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;

// 32-bit MIPS has no 64-bit atomics (see Cargo.toml).
use portable_atomic::AtomicU64;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tracing::warn;

use super::crypto::{self, Cipher, Key, Method, NonceCounter, MAX_KEY_LEN, TAG_LEN};
use crate::outbound::socks5::proto::Address;
use crate::ratelimit::{self, RateLimit};
use crate::spares::Spares;

/// How long the request waits for the client's first bytes after the
/// first read, before it goes alone (sslocal's figure).
pub const HEADER_WAIT: Duration = Duration::from_millis(500);
/// The most a 2022 reply's timestamp may be off our clock (SIP022).
pub const MAX_CLOCK_SKEW: u64 = 30;
/// The longest 2022 padding (SIP022's MaxPaddingLength).
const MAX_PADDING: usize = 900;
/// Plaintext taken per write, in as few chunks as the method's limit
/// allows, sealed into one buffer and written with one syscall: the
/// relay reads [`SsStream::write_batch`] at a time (four full AEAD
/// chunks, one full 2022 chunk), so a bulk upload costs one read, two
/// seals per chunk and one write per 64 KiB.
const WRITE_BATCH: usize = 64 * 1024;
/// A sealed length chunk.
const LEN_CHUNK: usize = 2 + TAG_LEN;
/// The 2022 request's fixed header: type, timestamp, length.
const FIXED_REQUEST: usize = 1 + 8 + 2;
/// The longest SOCKS5 address: ATYP, length, 255 bytes of name, port.
const MAX_ADDRESS: usize = 1 + 1 + 255 + 2;
/// Reads smaller than this are not worth a syscall: compact first.
const MIN_READ: usize = 2048;
/// The read buffer of every method: room for a whole AEAD chunk at its
/// limit (0x3FFF) and a read of 16 KiB more, and for the 2022 chunks most
/// servers send (one read of the target's).
const READ_BUF: usize = 32 * 1024;
/// The read buffer of a 2022 stream that got a chunk over [`READ_BUF`]:
/// a whole chunk at the 2022 limit (0xFFFF) after the salt and the
/// response header, for the longest salt.
const LARGE_READ_BUF: usize =
    MAX_KEY_LEN + (1 + 8 + MAX_KEY_LEN + 2) + TAG_LEN + LEN_CHUNK + 0xFFFF + TAG_LEN;

/// Read buffers between bursts, one stock per size; see the module's
/// "Memory".
static SPARE_READ_BUFS: Spares<Vec<u8>> = Spares::new(32);
static SPARE_LARGE_READ_BUFS: Spares<Vec<u8>> = Spares::new(8);

fn take_read_buf(large: bool) -> Vec<u8> {
    let (spares, len) = if large {
        (&SPARE_LARGE_READ_BUFS, LARGE_READ_BUF)
    } else {
        (&SPARE_READ_BUFS, READ_BUF)
    };
    spares.take().unwrap_or_else(|| vec![0; len])
}

fn give_back_read_buf(buf: Vec<u8>) {
    match buf.len() {
        READ_BUF => SPARE_READ_BUFS.give_back(buf),
        LARGE_READ_BUF => SPARE_LARGE_READ_BUFS.give_back(buf),
        _ => {}
    }
}

const TYPE_REQUEST: u8 = 0;
const TYPE_RESPONSE: u8 = 1;

/// What went wrong on a shadowsocks stream; reaches the relay as the
/// inner error of an `io::Error`, so the flow's end reason carries it.
#[derive(Debug, thiserror::Error)]
pub enum ShadowsocksError {
    #[error(
        "the shadowsocks server's {what} did not authenticate: wrong password or method, \
         or the bytes were changed on the way"
    )]
    BadTag { what: &'static str },
    #[error(
        "the shadowsocks server sent a chunk of {len} bytes, over the method's limit of {max}"
    )]
    Oversized { len: usize, max: usize },
    #[error("the shadowsocks server closed the connection in the middle of a {what}")]
    Truncated { what: &'static str },
    #[error("the shadowsocks 2022 reply is of type {0}, not a response (1)")]
    NotAResponse(u8),
    #[error(
        "the shadowsocks 2022 reply echoes a request salt this stream did not send \
         (a replayed reply, or a broken server)"
    )]
    ForeignSalt,
    #[error(
        "the shadowsocks 2022 reply's timestamp is {secs} s {direction} this machine's clock \
         (at most {MAX_CLOCK_SKEW} s allowed): the router's clock is {secs} s off the server's; run NTP"
    )]
    StaleTimestamp { secs: u64, direction: &'static str },
    #[error(
        "no valid reply from the shadowsocks server {server} within {secs} s of the request: \
         wrong password or method?"
    )]
    NoReply { server: SocketAddr, secs: u64 },
    #[error(
        "the shadowsocks 2022 server {server} reset the connection before any reply: wrong key \
         or method, or this machine's clock is more than {MAX_CLOCK_SKEW} s off the server's \
         (run NTP)"
    )]
    Reset2022 { server: SocketAddr },
}

impl ShadowsocksError {
    /// The error as an `io::Error` of the fitting kind, carrying `self`.
    pub fn into_io(self) -> io::Error {
        let kind = match self {
            ShadowsocksError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            ShadowsocksError::NoReply { .. } => io::ErrorKind::TimedOut,
            ShadowsocksError::Reset2022 { .. } => io::ErrorKind::ConnectionReset,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

impl From<ShadowsocksError> for io::Error {
    fn from(e: ShadowsocksError) -> io::Error {
        e.into_io()
    }
}

/// What every stream of one outbound shares: the key, the server, the
/// first-byte timeout, and whether replies authenticate.
pub struct Upstream {
    pub name: String,
    pub server: SocketAddr,
    pub key: Key,
    /// Zero: no first-byte timeout.
    pub first_byte_timeout: Duration,
    origin: Instant,
    /// When a reply last authenticated (ms since `origin`, +1; 0: never).
    last_valid_ms: AtomicU64,
    no_reply_log: RateLimit,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("server", &self.server)
            .field("method", &self.key.method())
            .field("first_byte_timeout", &self.first_byte_timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(name: &str, server: SocketAddr, key: Key, first_byte_timeout: Duration) -> Self {
        Upstream {
            name: name.to_string(),
            server,
            key,
            first_byte_timeout,
            origin: Instant::now(),
            last_valid_ms: AtomicU64::new(0),
            no_reply_log: RateLimit::new(ratelimit::WARN_INTERVAL),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// A reply authenticated: the key is right.
    fn note_valid(&self) {
        self.last_valid_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether a reply authenticated at or after `ms`.
    fn proven_since(&self, ms: u64) -> bool {
        self.last_valid_ms.load(Ordering::Relaxed) >= ms
    }

    /// A stream got no valid reply in time: logged once per interval.
    fn note_no_reply(&self, e: &ShadowsocksError) {
        if let Some(n) = self.no_reply_log.check() {
            warn!(outbound = %self.name, "{e}{}", ratelimit::held_back(n));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Salt,
    /// 2022: the response's fixed header, which is also the first length.
    Header,
    Length,
    Payload(usize),
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    None,
    /// For the client's first bytes before the request goes alone.
    Header,
    /// For the first reply that authenticates.
    FirstByte,
}

/// A shadowsocks client stream to one target over `io`.
pub struct SsStream<S> {
    io: S,
    up: Arc<Upstream>,
    // The client → server direction.
    enc: Cipher,
    enc_nonce: NonceCounter,
    salt: [u8; MAX_KEY_LEN],
    /// The request, until it is sent.
    target: Option<Address>,
    /// Sealed bytes not yet written, from `wpos`; sized to the largest
    /// write since the last flush, freed by a flush.
    wbuf: Vec<u8>,
    wpos: usize,
    // The server → client direction.
    dec: Option<Cipher>,
    dec_nonce: NonceCounter,
    /// Empty while nothing is buffered and the socket has nothing to read;
    /// else [`READ_BUF`] or [`LARGE_READ_BUF`] bytes.
    rbuf: ReadBuffer,
    /// A chunk needed [`LARGE_READ_BUF`]: take that size from now on.
    large_reads: bool,
    /// Received, not yet decoded: `rbuf[rstart..rend]`.
    rstart: usize,
    rend: usize,
    /// Decoded, not yet handed out: `rbuf[plain.0..plain.1]`.
    plain: (usize, usize),
    rstate: ReadState,
    // Timers.
    timer: Option<Pin<Box<Sleep>>>,
    wait: Wait,
    /// When client bytes first went out (Upstream's ms; 0: not yet).
    request_ms: u64,
    replied: bool,
}

impl<S> fmt::Debug for SsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SsStream")
            .field("server", &self.up.server)
            .field("method", &self.up.key.method())
            .field("request_sent", &self.target.is_none())
            .field("replied", &self.replied)
            .finish_non_exhaustive()
    }
}

/// The read buffer, given back to the stock when the stream is dropped (a
/// field of its own, so the stream itself has no `Drop` and may borrow).
#[derive(Default)]
struct ReadBuffer(Vec<u8>);

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        give_back_read_buf(std::mem::take(&mut self.0));
    }
}

impl std::ops::Deref for ReadBuffer {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for ReadBuffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

/// Appends `target` as a SOCKS5 address (ATYP, address, port).
fn put_address(out: &mut Vec<u8>, target: &Address) {
    match target {
        Address::Ip(SocketAddr::V4(a)) => {
            out.push(0x01);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Address::Ip(SocketAddr::V6(a)) => {
            out.push(0x04);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Address::Domain(name, port) => {
            // Callers pass names that passed `is_host_name` (≤ 253 bytes);
            // cut anyway rather than send a length that lies.
            let name = &name.as_bytes()[..name.len().min(255)];
            out.push(0x03);
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            out.extend_from_slice(&port.to_be_bytes());
        }
    }
}

fn address_len(target: &Address) -> usize {
    match target {
        Address::Ip(SocketAddr::V4(_)) => 7,
        Address::Ip(SocketAddr::V6(_)) => 19,
        Address::Domain(name, _) => 4 + name.len().min(255),
    }
}

/// Appends 16 bytes for a tag and seals `buf[start..]` with the next nonce.
fn seal_from(buf: &mut Vec<u8>, cipher: &Cipher, nonce: &mut NonceCounter, start: usize) {
    buf.extend_from_slice(&[0; TAG_LEN]);
    if let Some(tail) = buf.get_mut(start..) {
        cipher.seal_tail(&nonce.take(), tail);
    }
}

/// Appends `data` as chunks of at most `max` bytes (none if empty), as
/// few as fit and of even sizes: 16 KiB for AEAD is two chunks of 8 KiB,
/// not one of 0x3FFF and a runt of one byte.
fn push_chunks(
    buf: &mut Vec<u8>,
    cipher: &Cipher,
    nonce: &mut NonceCounter,
    max: usize,
    data: &[u8],
) {
    let pieces = data.len().div_ceil(max.max(1));
    let size = data.len().div_ceil(pieces.max(1)).max(1);
    for piece in data.chunks(size) {
        let start = buf.len();
        buf.extend_from_slice(&(piece.len() as u16).to_be_bytes());
        seal_from(buf, cipher, nonce, start);
        let start = buf.len();
        buf.extend_from_slice(piece);
        seal_from(buf, cipher, nonce, start);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The room a write of `len` bytes may need: with the request, the salt
/// and a 2022 request's headers at their largest; then the chunks'
/// framing.
fn write_capacity(method: Method, len: usize, with_request: bool) -> usize {
    let chunks = len / method.max_chunk() + 2;
    let request = if with_request {
        MAX_KEY_LEN + FIXED_REQUEST + TAG_LEN + MAX_ADDRESS + 2 + MAX_PADDING + TAG_LEN
    } else {
        0
    };
    request + len + chunks * (LEN_CHUNK + TAG_LEN)
}

/// The 2022 response header: type, timestamp, request salt, length.
fn response_header_len(method: Method) -> usize {
    1 + 8 + method.salt_len() + 2
}

/// The most the read buffer must hold: a whole chunk at the method's
/// limit after the salt and headers, so any length the server may send
/// fits: at most [`LARGE_READ_BUF`] (checked by a test).
#[cfg(test)]
fn read_capacity(method: Method) -> usize {
    method.salt_len()
        + response_header_len(method)
        + TAG_LEN
        + LEN_CHUNK
        + method.max_chunk()
        + TAG_LEN
}

impl<S: AsyncRead + AsyncWrite + Unpin> SsStream<S> {
    /// A stream to `target` over `io`, a connection to `up`'s server.
    /// Nothing is sent until the first write (or [`HEADER_WAIT`] after
    /// the first read).
    pub fn new(io: S, up: Arc<Upstream>, target: Address) -> io::Result<Self> {
        let method = up.key.method();
        let mut salt = [0u8; MAX_KEY_LEN];
        crypto::random_salt(&mut salt[..method.salt_len()])?;
        let enc = up.key.session(&salt[..method.salt_len()]);
        Ok(SsStream {
            io,
            up,
            enc,
            enc_nonce: NonceCounter::default(),
            salt,
            target: Some(target),
            wbuf: Vec::new(),
            wpos: 0,
            dec: None,
            dec_nonce: NonceCounter::default(),
            rbuf: ReadBuffer::default(),
            large_reads: false,
            rstart: 0,
            rend: 0,
            plain: (0, 0),
            rstate: ReadState::Salt,
            timer: None,
            wait: Wait::None,
            request_ms: 0,
            replied: false,
        })
    }

    /// The most a write should bring: [`WRITE_BATCH`] rounded down to
    /// whole chunks of the method's limit.
    pub fn write_batch(&self) -> usize {
        let max = self.method().max_chunk();
        (WRITE_BATCH / max).max(1) * max
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The bytes the stream holds in buffers: the read buffer's length
    /// and the write buffer's capacity (both 0 when idle).
    #[cfg(test)]
    pub fn buffers(&self) -> (usize, usize) {
        (self.rbuf.len(), self.wbuf.capacity())
    }

    /// Whether a reply from the server has authenticated.
    pub fn replied(&self) -> bool {
        self.replied
    }

    fn arm(&mut self, wait: Wait, after: Duration) {
        let deadline = tokio::time::Instant::now() + after;
        match &mut self.timer {
            Some(t) => t.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.wait = wait;
    }

    fn disarm(&mut self) {
        // The Sleep is kept for the next `arm`: one allocation per stream.
        self.wait = Wait::None;
    }

    /// Puts the request in front of `data` (all of it) into `wbuf`.
    fn encode_request(&mut self, target: &Address, data: &[u8]) -> io::Result<()> {
        let method = self.method();
        let max = method.max_chunk();
        let salt_len = method.salt_len();
        let buf = &mut self.wbuf;
        buf.extend_from_slice(&self.salt[..salt_len]);
        let addr_len = address_len(target);
        if !method.is_2022() {
            // One chunk: address and as much of the data as fits.
            let first = data.len().min(max - addr_len);
            let start = buf.len();
            buf.extend_from_slice(&((addr_len + first) as u16).to_be_bytes());
            seal_from(buf, &self.enc, &mut self.enc_nonce, start);
            let start = buf.len();
            put_address(buf, target);
            buf.extend_from_slice(&data[..first]);
            seal_from(buf, &self.enc, &mut self.enc_nonce, start);
            push_chunks(buf, &self.enc, &mut self.enc_nonce, max, &data[first..]);
            return Ok(());
        }
        // The variable header holds address, padding and as much data as
        // its u16 length allows; padding only when there is no data (a
        // request with neither is refused by SIP022 servers).
        let first = data.len().min(0xFFFF - addr_len - 2);
        let padding = if first == 0 {
            let mut r = [0u8; 2];
            crypto::fill_random(&mut r)?;
            1 + usize::from(u16::from_be_bytes(r)) % MAX_PADDING
        } else {
            0
        };
        let var_len = addr_len + 2 + padding + first;
        let start = buf.len();
        buf.push(TYPE_REQUEST);
        buf.extend_from_slice(&unix_now().to_be_bytes());
        buf.extend_from_slice(&(var_len as u16).to_be_bytes());
        seal_from(buf, &self.enc, &mut self.enc_nonce, start);
        let start = buf.len();
        put_address(buf, target);
        buf.extend_from_slice(&(padding as u16).to_be_bytes());
        // Padding is sealed like the rest: zeros are as good as random.
        buf.resize(buf.len() + padding, 0);
        buf.extend_from_slice(&data[..first]);
        seal_from(buf, &self.enc, &mut self.enc_nonce, start);
        push_chunks(buf, &self.enc, &mut self.enc_nonce, max, &data[first..]);
        Ok(())
    }

    fn method(&self) -> Method {
        self.up.key.method()
    }

    /// Writes out `wbuf`; Ready once it is all gone.
    fn poll_flush_wbuf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// Room in `wbuf` for a write of `len` bytes (and the request, if it
    /// has not gone): reused while it suffices, so a bulk transfer
    /// allocates once.
    fn reserve_wbuf(&mut self, len: usize) {
        let need = write_capacity(self.method(), len, self.target.is_some());
        self.wbuf.reserve_exact(need);
    }

    /// The socket has nothing more for now and everything read was handed
    /// out: the read buffer goes back to the stock.
    fn release_rbuf(&mut self) {
        if !self.rbuf.is_empty() {
            give_back_read_buf(std::mem::take(&mut self.rbuf.0));
        }
        self.rstart = 0;
        self.rend = 0;
        self.plain = (0, 0);
    }

    /// Sends the request with no data (the client's first bytes did not
    /// come in time, or it shut down without any).
    fn send_request_alone(&mut self) -> io::Result<()> {
        if self.target.is_some() {
            self.reserve_wbuf(0);
        }
        if let Some(target) = self.target.take() {
            self.encode_request(&target, &[])?;
        }
        if self.wait == Wait::Header {
            self.disarm();
        }
        Ok(())
    }

    /// Polls the armed timer, if any, while the read side waits.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Some(timer) = &mut self.timer else {
                return Poll::Pending;
            };
            if self.wait == Wait::None || timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            match self.wait {
                Wait::None => return Poll::Pending,
                Wait::Header => {
                    self.send_request_alone()?;
                    if let Poll::Ready(Err(e)) = self.poll_flush_wbuf(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                Wait::FirstByte => {
                    self.disarm();
                    if self.up.proven_since(self.request_ms) {
                        // Another stream's reply authenticated since this
                        // request: the key is right, this target is slow.
                        return Poll::Pending;
                    }
                    let e = ShadowsocksError::NoReply {
                        server: self.up.server,
                        secs: self.up.first_byte_timeout.as_secs(),
                    };
                    self.up.note_no_reply(&e);
                    return Poll::Ready(Err(e.into()));
                }
            }
        }
    }

    /// The bytes the read state needs before it can go on.
    fn need(&self) -> usize {
        let method = self.method();
        match self.rstate {
            ReadState::Salt => method.salt_len(),
            ReadState::Header => response_header_len(method) + TAG_LEN,
            ReadState::Length => LEN_CHUNK,
            ReadState::Payload(n) => n + TAG_LEN,
            ReadState::Eof => 0,
        }
    }

    fn note_reply(&mut self) {
        if !self.replied {
            self.replied = true;
            self.up.note_valid();
            if self.wait == Wait::FirstByte {
                self.disarm();
            }
        }
    }

    /// Decodes the `need` bytes at `rstart` for the current state.
    fn decode(&mut self, need: usize) -> Result<(), ShadowsocksError> {
        let method = self.method();
        let max = method.max_chunk();
        let start = self.rstart;
        let Some(piece) = self.rbuf.get_mut(start..start + need) else {
            return Err(ShadowsocksError::Truncated { what: "chunk" });
        };
        let state = self.rstate;
        if state == ReadState::Salt {
            self.dec = Some(self.up.key.session(piece));
            self.rstart += need;
            self.rstate = if method.is_2022() {
                ReadState::Header
            } else {
                ReadState::Length
            };
            return Ok(());
        }
        let Some(dec) = &self.dec else {
            return Err(ShadowsocksError::Truncated { what: "salt" });
        };
        let what = match state {
            ReadState::Header => "response header",
            ReadState::Length => "length chunk",
            _ => "payload chunk",
        };
        dec.open_tail(&self.dec_nonce.take(), piece)
            .map_err(|_| ShadowsocksError::BadTag { what })?;
        self.rstart += need;
        let be16 = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
        match state {
            ReadState::Header => {
                // type · timestamp · request salt · length
                if piece[0] != TYPE_RESPONSE {
                    return Err(ShadowsocksError::NotAResponse(piece[0]));
                }
                let mut ts = [0u8; 8];
                ts.copy_from_slice(&piece[1..9]);
                let theirs = u64::from_be_bytes(ts);
                let ours = unix_now();
                if theirs.abs_diff(ours) > MAX_CLOCK_SKEW {
                    return Err(ShadowsocksError::StaleTimestamp {
                        secs: theirs.abs_diff(ours),
                        direction: if theirs > ours { "ahead of" } else { "behind" },
                    });
                }
                let salt_len = method.salt_len();
                if piece[9..9 + salt_len] != self.salt[..salt_len] {
                    return Err(ShadowsocksError::ForeignSalt);
                }
                let len = be16(&piece[9 + salt_len..]);
                self.note_reply();
                self.rstate = ReadState::Payload(len);
            }
            ReadState::Length => {
                let len = be16(piece);
                if len > max {
                    return Err(ShadowsocksError::Oversized { len, max });
                }
                self.note_reply();
                self.rstate = ReadState::Payload(len);
            }
            _ => {
                self.plain = (start, start + need - TAG_LEN);
                self.rstate = ReadState::Length;
            }
        }
        Ok(())
    }

    /// The connection ended: cleanly between chunks, or in the middle of
    /// one.
    fn at_eof(&mut self) -> io::Result<()> {
        let between = self.rstart == self.rend;
        match self.rstate {
            ReadState::Salt | ReadState::Length if between => {
                self.rstate = ReadState::Eof;
                if self.wait == Wait::FirstByte {
                    self.disarm();
                }
                Ok(())
            }
            ReadState::Salt => Err(ShadowsocksError::Truncated { what: "salt" }.into()),
            ReadState::Header => Err(ShadowsocksError::Truncated {
                what: "response header",
            }
            .into()),
            _ => Err(ShadowsocksError::Truncated { what: "chunk" }.into()),
        }
    }

    /// A read error, named when it is a 2022 server's refusal.
    fn read_error(&self, e: io::Error) -> io::Error {
        if self.method().is_2022()
            && !self.replied
            && self.target.is_none()
            && e.kind() == io::ErrorKind::ConnectionReset
        {
            return ShadowsocksError::Reset2022 {
                server: self.up.server,
            }
            .into();
        }
        e
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for SsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rbuf.is_empty() {
            this.rbuf.0 = take_read_buf(this.large_reads);
        }
        if this.target.is_some() && this.wait == Wait::None {
            this.arm(Wait::Header, HEADER_WAIT);
        }
        // A request that went alone may still be on its way out.
        if this.wpos < this.wbuf.len() {
            if let Poll::Ready(Err(e)) = this.poll_flush_wbuf(cx) {
                return Poll::Ready(Err(e));
            }
        }
        let mut gave = false;
        loop {
            let (p0, p1) = this.plain;
            if p0 < p1 {
                let n = out.remaining().min(p1 - p0);
                out.put_slice(&this.rbuf[p0..p0 + n]);
                this.plain.0 += n;
                gave = true;
                if out.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.rstate == ReadState::Eof {
                return Poll::Ready(Ok(()));
            }
            let need = this.need();
            if this.rend - this.rstart >= need {
                this.decode(need)?;
                continue;
            }
            if gave {
                return Poll::Ready(Ok(()));
            }
            // Room for the rest of what is needed, and a read worth making.
            if need > this.rbuf.len() && this.rbuf.len() < LARGE_READ_BUF {
                // A 2022 chunk over READ_BUF (its length was checked
                // against the method's limit, so it fits the larger one).
                let mut large = take_read_buf(true);
                let kept = this.rend - this.rstart;
                large[..kept].copy_from_slice(&this.rbuf[this.rstart..this.rend]);
                give_back_read_buf(std::mem::replace(&mut this.rbuf.0, large));
                (this.rstart, this.rend) = (0, kept);
                this.large_reads = true;
            }
            if this.rstart == this.rend {
                this.rstart = 0;
                this.rend = 0;
            } else if this.rstart + need > this.rbuf.len() || this.rbuf.len() - this.rend < MIN_READ
            {
                this.rbuf.copy_within(this.rstart..this.rend, 0);
                this.rend -= this.rstart;
                this.rstart = 0;
            }
            let mut free = ReadBuf::new(&mut this.rbuf[this.rend..]);
            match Pin::new(&mut this.io).poll_read(cx, &mut free) {
                Poll::Pending => {
                    if this.rstart == this.rend {
                        this.release_rbuf();
                    }
                    return this.poll_timer(cx);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(this.read_error(e))),
                Poll::Ready(Ok(())) => {
                    let n = free.filled().len();
                    if n == 0 {
                        return Poll::Ready(this.at_eof());
                    }
                    this.rend += n;
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for SsStream<S> {
    /// Takes up to [`WRITE_BATCH`] bytes, sealed into `wbuf` and written
    /// as far as the socket takes them; the rest goes out with the next
    /// write or flush (callers flush, as every copy loop does).
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_flush_wbuf(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(WRITE_BATCH);
        this.reserve_wbuf(n);
        if let Some(target) = this.target.take() {
            if this.wait == Wait::Header {
                this.disarm();
            }
            this.encode_request(&target, &data[..n])?;
        } else {
            let max = this.method().max_chunk();
            push_chunks(
                &mut this.wbuf,
                &this.enc,
                &mut this.enc_nonce,
                max,
                &data[..n],
            );
        }
        if !this.replied && this.request_ms == 0 && !this.up.first_byte_timeout.is_zero() {
            // Client bytes are out: the server has something to answer.
            this.request_ms = this.up.now_ms();
            this.arm(Wait::FirstByte, this.up.first_byte_timeout);
        }
        if let Poll::Ready(Err(e)) = this.poll_flush_wbuf(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    /// Writes out what is sealed; then frees the write buffer, as the
    /// relay flushes when its client has nothing more for now.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_wbuf(cx))?;
        this.wbuf = Vec::new();
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Half-close: the request goes out if it has not (the target must
    /// see the connection, then its FIN), then the buffer, then our FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.target.is_some() {
            this.send_request_alone()?;
        }
        ready!(this.poll_flush_wbuf(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod buffer_tests {
    use super::*;

    /// Whatever length a server may send (within the method's limit), the
    /// chunk fits the read buffer: AEAD's always, 2022's the larger one.
    #[test]
    fn a_whole_chunk_fits_the_read_buffers() {
        for m in Method::ALL {
            assert!(read_capacity(m) <= LARGE_READ_BUF, "{m}");
            if !m.is_2022() {
                assert!(read_capacity(m) + MIN_READ <= READ_BUF, "{m}");
            }
        }
    }

    /// A write is cut into as few chunks as the limit allows, of even
    /// sizes: no runt chunk of a byte or two after a full one.
    #[test]
    fn writes_become_few_even_chunks() {
        for (m, len, chunks) in [
            (Method::Aes128Gcm, 16 * 1024, 2),
            (Method::Aes128Gcm, 4 * 0x3FFF, 4),
            (Method::Aes128Gcm, 1, 1),
            (Method::Blake3Aes128Gcm, 0xFFFF, 1),
            (Method::Blake3Aes128Gcm, 0x10000, 2),
        ] {
            let cipher = Cipher::new(m, &[0; MAX_KEY_LEN]);
            let mut out = Vec::new();
            push_chunks(
                &mut out,
                &cipher,
                &mut NonceCounter::default(),
                m.max_chunk(),
                &vec![7; len],
            );
            assert_eq!(out.len(), len + chunks * (LEN_CHUNK + TAG_LEN), "{m} {len}");
            // The first chunk's length: the even share, not the limit.
            let mut first = [0u8; LEN_CHUNK];
            first.copy_from_slice(&out[..LEN_CHUNK]);
            let mut nonce = NonceCounter::default();
            assert!(cipher.open_tail(&nonce.take(), &mut first).is_ok());
            let first = usize::from(u16::from_be_bytes([first[0], first[1]]));
            assert_eq!(first, len.div_ceil(chunks), "{m} {len}");
        }
    }
}

/// The server's side of a stream, for the tests and the fuzz target: a
/// request decoder and a reply encoder built from the same crypto.
#[cfg(any(test, feature = "fuzzing"))]
pub mod server {
    use super::*;

    /// Seals a reply: the server's salt, then (2022) the response header
    /// with the first payload, then chunks.
    pub struct ReplyEncoder {
        method: Method,
        cipher: Cipher,
        nonce: NonceCounter,
        salt: Vec<u8>,
        request_salt: Vec<u8>,
        started: bool,
        /// The response's timestamp (2022).
        pub timestamp: u64,
    }

    impl ReplyEncoder {
        pub fn new(key: &Key, request_salt: &[u8], salt: &[u8]) -> Self {
            ReplyEncoder {
                method: key.method(),
                cipher: key.session(salt),
                nonce: NonceCounter::default(),
                salt: salt.to_vec(),
                request_salt: request_salt.to_vec(),
                started: false,
                timestamp: unix_now(),
            }
        }

        /// Appends `data` as the next piece of the reply (the first with
        /// the salt and header); `len` overrides the length written
        /// (for oversized or lying chunks), else it is `data`'s.
        pub fn push(&mut self, out: &mut Vec<u8>, data: &[u8], len: Option<u16>) {
            let len = len.unwrap_or(data.len() as u16);
            if !self.started {
                self.started = true;
                out.extend_from_slice(&self.salt);
                if self.method.is_2022() {
                    let start = out.len();
                    out.push(TYPE_RESPONSE);
                    out.extend_from_slice(&self.timestamp.to_be_bytes());
                    out.extend_from_slice(&self.request_salt);
                    out.extend_from_slice(&len.to_be_bytes());
                    seal_from(out, &self.cipher, &mut self.nonce, start);
                    let start = out.len();
                    out.extend_from_slice(data);
                    seal_from(out, &self.cipher, &mut self.nonce, start);
                    return;
                }
            }
            let start = out.len();
            out.extend_from_slice(&len.to_be_bytes());
            seal_from(out, &self.cipher, &mut self.nonce, start);
            let start = out.len();
            out.extend_from_slice(data);
            seal_from(out, &self.cipher, &mut self.nonce, start);
        }
    }

    /// What a server reads from a request.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Request {
        pub salt: Vec<u8>,
        pub target: Address,
        pub padding: usize,
        pub timestamp: Option<u64>,
        /// The bytes after the address, in the request and every chunk
        /// decoded with it.
        pub payload: Vec<u8>,
        /// Sizes of the payload chunks after the first.
        pub chunks: Vec<usize>,
    }

    fn address(b: &[u8]) -> Option<(Address, usize)> {
        crate::outbound::socks5::proto::parse_address(b).ok()
    }

    /// Decodes a whole client stream (`wire`) as a server would; None if
    /// any of it fails to authenticate or parse, or stops mid-chunk.
    pub fn decode_request(key: &Key, wire: &[u8]) -> Option<Request> {
        let method = key.method();
        let sl = method.salt_len();
        let salt = wire.get(..sl)?.to_vec();
        let cipher = key.session(&salt);
        let mut nonce = NonceCounter::default();
        let mut pos = sl;
        let mut open = |pos: &mut usize, len: usize| -> Option<Vec<u8>> {
            let mut piece = wire.get(*pos..*pos + len + TAG_LEN)?.to_vec();
            cipher.open_tail(&nonce.take(), &mut piece).ok()?;
            piece.truncate(len);
            *pos += len + TAG_LEN;
            Some(piece)
        };
        let be16 = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
        let (target, padding, timestamp, mut payload);
        if method.is_2022() {
            let fixed = open(&mut pos, FIXED_REQUEST)?;
            if fixed[0] != TYPE_REQUEST {
                return None;
            }
            timestamp = Some(u64::from_be_bytes(fixed[1..9].try_into().ok()?));
            let var = open(&mut pos, be16(&fixed[9..]))?;
            let (t, used) = address(&var)?;
            padding = be16(var.get(used..used + 2)?);
            payload = var.get(used + 2 + padding..)?.to_vec();
            target = t;
        } else {
            let len = open(&mut pos, 2)?;
            let first = open(&mut pos, be16(&len))?;
            let (t, used) = address(&first)?;
            target = t;
            padding = 0;
            timestamp = None;
            payload = first[used..].to_vec();
        }
        let mut chunks = Vec::new();
        while pos < wire.len() {
            let len = be16(&open(&mut pos, 2)?);
            if len == 0 || len > method.max_chunk() {
                return None;
            }
            payload.extend_from_slice(&open(&mut pos, len)?);
            chunks.push(len);
        }
        Some(Request {
            salt,
            target,
            padding,
            timestamp,
            payload,
            chunks,
        })
    }
}

/// The fuzz target's entry (`fuzz/fuzz_targets/ss_tcp_chunks.rs`): a
/// server reply built from `data` — valid chunks of fuzzer-chosen sizes
/// and lengths, then a byte flipped or the stream cut where the fuzzer
/// says, delivered in fuzzer-sized reads — through the client stream's
/// decoder. It must end in data or a typed error, never a panic.
#[cfg(feature = "fuzzing")]
pub fn fuzz_reply(data: &[u8]) {
    use std::task::Waker;

    /// Replays `input` in reads of the sizes `cuts` says; swallows writes.
    struct Wire<'a> {
        input: &'a [u8],
        pos: usize,
        cuts: &'a [u8],
        turn: usize,
    }
    impl AsyncRead for Wire<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let step = self.cuts.get(self.turn % self.cuts.len().max(1)).copied();
            self.turn += 1;
            let step = usize::from(step.unwrap_or(255)).max(1) * 7;
            let end = (self.pos + step.min(out.remaining())).min(self.input.len());
            out.put_slice(&self.input[self.pos..end]);
            self.pos = end;
            Poll::Ready(Ok(()))
        }
    }
    impl AsyncWrite for Wire<'_> {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    let [m, flip_hi, flip_lo, flip_bit, skew, ref rest @ ..] = *data else {
        return;
    };
    let method = Method::ALL[usize::from(m) % Method::ALL.len()];
    let key = crypto::example_key(method);
    let up = Arc::new(Upstream::new(
        "fuzz",
        ([127, 0, 0, 1], 1).into(),
        key.clone(),
        Duration::ZERO,
    ));
    let (cuts, chunks) = rest.split_at(rest.len().min(8));
    // The reply: chunks described by (len hi, len lo, size) triples.
    let salt = vec![0x5a; method.salt_len()];
    let mut stream = match SsStream::new(
        Wire {
            input: &[],
            pos: 0,
            cuts,
            turn: 0,
        },
        up,
        Address::Ip(([192, 0, 2, 1], 80).into()),
    ) {
        Ok(s) => s,
        Err(_) => return,
    };
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    // Send the request, so the reply's salt check has ours.
    let _ = Pin::new(&mut stream).poll_write(&mut cx, b"GET / HTTP/1.0\r\n\r\n");
    let request_salt = stream.salt[..method.salt_len()].to_vec();
    let mut enc = server::ReplyEncoder::new(&stream.up.key, &request_salt, &salt);
    enc.timestamp = enc
        .timestamp
        .wrapping_add(u64::from(skew))
        .wrapping_sub(128);
    let mut wire = Vec::new();
    for c in chunks.chunks(3) {
        let [hi, lo, size] = *c else { break };
        let payload = vec![0x41; usize::from(size) * 97];
        let len = u16::from_be_bytes([hi, lo]);
        let lie = (len != 0 && hi & 0x80 != 0).then_some(len);
        enc.push(&mut wire, &payload, lie);
        if wire.len() > 300_000 {
            break;
        }
    }
    let flip = usize::from(u16::from_be_bytes([flip_hi, flip_lo]));
    if flip < wire.len() && flip_bit & 0x80 != 0 {
        wire[flip] ^= 1 << (flip_bit & 7);
    } else if flip < wire.len() && flip_bit & 0x40 != 0 {
        wire.truncate(flip);
    }
    stream.io.input = &wire;
    let mut out = [0u8; 5000];
    for _ in 0..10_000 {
        let mut rb = ReadBuf::new(&mut out);
        match Pin::new(&mut stream).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return,
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                // Every failure is typed.
                assert!(
                    e.get_ref().is_some_and(|i| i.is::<ShadowsocksError>()),
                    "{e}"
                );
                return;
            }
            Poll::Pending => return,
        }
    }
}
