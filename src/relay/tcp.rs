//! Relays one TCP flow in both directions at once.
//!
//! A plain upstream (a bare socket: direct, SOCKS5, HTTP CONNECT) is
//! spliced, the kernel moving the bytes; an upstream that frames the
//! stream ([`TcpUpstream`]'s other arms) is copied through its
//! [`TcpCarrier`] by a lean loop, one buffer per direction held only
//! while bytes are in flight. Both paths behave alike:
//!
//! A FIN from one side is passed on as a shutdown of the other side's
//! write half only, and the other direction keeps flowing until it ends
//! too: a client that sends its request and then shuts down its write side
//! still receives the whole answer. A reset or error on either side ends
//! the flow, and a reset from the upstream is passed on as a reset to the
//! client. A flow with no byte in either direction for the idle timeout is
//! closed, so no half-dead connection lingers in CLOSE-WAIT.

use std::io;
use std::sync::atomic::Ordering;

use portable_atomic::AtomicU64;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use std::future::Future;

use std::pin::Pin;

use tokio::io::{Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::fds;
use crate::outbound::{TcpCarrier, TcpUpstream};
use crate::registry::Traffic;
use crate::spares::Spares;
use crate::sys;

const COPY_BUF_SIZE: usize = 16 * 1024;
/// A framed flow's copy buffer: every byte costs a seal or an open there,
/// and syscalls per byte are half the proxy's CPU in a bulk transfer
/// (a profile of a shadowsocks 2022 upload), so it reads as much as one
/// full 2022 chunk (0xFFFF) or four AEAD chunks (0x3FFF) at once.
const FRAMED_BUF_SIZE: usize = 64 * 1024;

/// Copy buffers of framed flows between bursts: a direction takes one when
/// it reads and gives it back when its source has nothing more, so an idle
/// flow holds none (issue 20: per-flow memory of shadowsocks flows), while
/// a busy one does not allocate and zero 64 KiB per burst.
static SPARE_COPY_BUFS: Spares<Box<[u8]>> = Spares::new(16);

fn take_copy_buf() -> Box<[u8]> {
    SPARE_COPY_BUFS
        .take()
        .unwrap_or_else(|| vec![0u8; FRAMED_BUF_SIZE].into_boxed_slice())
}

/// How a relayed flow ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both sides closed normally.
    Closed,
    /// No traffic for the idle timeout.
    Idle,
    /// The client failed (reset, error).
    ClientError(String),
    /// The upstream failed; the client was reset.
    UpstreamError(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::Idle => f.write_str("idle-timeout"),
            End::ClientError(e) => write!(f, "client-error: {e}"),
            End::UpstreamError(e) => write!(f, "upstream-error: {e}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes from the client to the upstream.
    pub up: u64,
    /// Bytes from the upstream to the client.
    pub down: u64,
    pub end: End,
}

/// Progress shared by the two directions and the idle watchdog; the
/// bytes are counted in the flow's [`Traffic`], which the registry reads.
struct Meter {
    start: Instant,
    last_activity_ms: AtomicU64,
}

impl Meter {
    fn new() -> Self {
        Meter {
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_activity_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// A pipe and its place in the descriptor count ([`fds`]): pipes are
/// counted so that the accept loop leaves room for them, and a pipe that
/// would eat into the reserve is not made at all.
struct CountedPipe {
    pipe: sys::Pipe,
    _held: fds::Held,
}

/// Pipes kept for reuse. A direction takes one when data arrives and gives
/// it back, empty, when its socket has nothing more to read, so an idle
/// flow holds no pipe (two descriptors and kernel buffers) at all, while a
/// busy one does not pay pipe2/close per burst.
static SPARE_PIPES: Spares<CountedPipe> = Spares::new(64);

/// A pipe from the pool or a new one; `None` when none can be had (no
/// room in the descriptor budget, or pipe2 failed): the caller copies
/// instead.
fn take_pipe() -> Option<CountedPipe> {
    if let Some(pipe) = SPARE_PIPES.take() {
        return Some(pipe);
    }
    let budget = fds::global();
    if !budget.room_for(fds::PER_PIPE) {
        return None;
    }
    let held = budget.hold(fds::PER_PIPE);
    sys::Pipe::new()
        .ok()
        .map(|pipe| CountedPipe { pipe, _held: held })
}

fn give_back_pipe(pipe: CountedPipe) {
    SPARE_PIPES.give_back(pipe)
}

/// Closes the pooled pipes. The accept loop calls it when it runs short of
/// descriptors: a connection waiting to be accepted needs them more than
/// an idle pipe does.
pub fn release_spare_pipes() -> usize {
    let mut released = 0;
    while SPARE_PIPES.take().is_some() {
        released += 1;
    }
    released
}

/// The most one splice call moves: the default pipe capacity.
const SPLICE_CHUNK: usize = 64 * 1024;

/// One direction of a flow, driven by [`OneWay::poll`].
///
/// The relay is written as a poll function rather than as two async
/// copies under `select!`: an idle flow's task then holds only these few
/// words per direction instead of two suspended readiness futures, which
/// measured as most of its memory. A direction holds a pipe (or, on the
/// copy path, a buffer) only while bytes are in flight.
struct OneWay {
    from_side: Side,
    pipe: Option<CountedPipe>,
    /// Bytes spliced into the pipe and not yet out of it.
    in_pipe: usize,
    moved_any: bool,
    /// Set once the kernel refused splice, or no pipe could be had: the
    /// copy path, for the rest of the flow (a flow that ran short once is
    /// likely to again, and copying is correct, only dearer).
    copy: Option<CopyState>,
    done: bool,
}

#[derive(Default)]
struct CopyState {
    buf: Option<Box<[u8]>>,
    len: usize,
    written: usize,
}

type DirResult = Result<(), (Side, io::Error)>;

/// What one direction works on: its two sockets and where it counts.
#[derive(Clone, Copy)]
struct Ends<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    meter: &'a Meter,
    counter: &'a AtomicU64,
}

impl OneWay {
    fn new(from_side: Side) -> Self {
        OneWay {
            from_side,
            pipe: None,
            in_pipe: 0,
            moved_any: false,
            copy: None,
            done: false,
        }
    }

    fn src_err(&self, e: io::Error) -> (Side, io::Error) {
        (self.from_side, e)
    }

    fn dst_err(&self, e: io::Error) -> (Side, io::Error) {
        (self.from_side.other(), e)
    }

    /// Moves bytes `from` → `to` until EOF (then shuts down `to`'s write
    /// side and returns `Ready(Ok)`), an error, or nothing to do.
    fn poll(&mut self, cx: &mut Context<'_>, ends: &Ends<'_>) -> Poll<DirResult> {
        if self.copy.is_some() {
            return self.poll_copy(cx, ends);
        }
        let Ends {
            from,
            to,
            meter,
            counter,
        } = *ends;
        loop {
            while self.in_pipe > 0 {
                ready!(to.poll_write_ready(cx)).map_err(|e| self.dst_err(e))?;
                let Some(pipe) = &self.pipe else { break };
                match to.try_io(Interest::WRITABLE, || pipe.pipe.drain_to(to, self.in_pipe)) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        meter.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A pipe with bytes left in it is dropped, not reused.
                    Err(e) => return Poll::Ready(Err(self.dst_err(e))),
                }
            }
            ready!(from.poll_read_ready(cx)).map_err(|e| self.src_err(e))?;
            let pipe = match self.pipe.take() {
                Some(pipe) => pipe,
                // No pipe to be had (out of descriptors): copy instead. A
                // direction without a pipe has nothing in one, so switching
                // loses no byte, and the flow lives on instead of failing.
                None => match take_pipe() {
                    Some(pipe) => pipe,
                    None => return self.fall_back_to_copy(cx, ends),
                },
            };
            match from.try_io(Interest::READABLE, || {
                pipe.pipe.fill_from(from, SPLICE_CHUNK)
            }) {
                Ok(0) => {
                    give_back_pipe(pipe);
                    meter.touch();
                    // EOF: pass the FIN on, keep the other direction open.
                    return Poll::Ready(sys::shutdown_write(to).map_err(|e| self.dst_err(e)));
                }
                Ok(n) => {
                    self.in_pipe = n;
                    self.moved_any = true;
                    self.pipe = Some(pipe);
                }
                // Drained: the pipe goes back to the pool until data comes.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => give_back_pipe(pipe),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !self.moved_any => {
                    return self.fall_back_to_copy(cx, ends)
                }
                Err(e) => return Poll::Ready(Err(self.src_err(e))),
            }
        }
    }

    fn fall_back_to_copy(&mut self, cx: &mut Context<'_>, ends: &Ends<'_>) -> Poll<DirResult> {
        self.copy = Some(CopyState::default());
        self.poll_copy(cx, ends)
    }

    /// The copy path, for sockets the kernel will not splice or when no
    /// pipe is to be had. Its buffer
    /// exists only while data flows, like the pipe.
    fn poll_copy(&mut self, cx: &mut Context<'_>, ends: &Ends<'_>) -> Poll<DirResult> {
        let (from_side, to_side) = (self.from_side, self.from_side.other());
        let Ends {
            from,
            to,
            meter,
            counter,
        } = *ends;
        let Some(state) = self.copy.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        loop {
            while state.written < state.len {
                ready!(to.poll_write_ready(cx)).map_err(|e| (to_side, e))?;
                let Some(buf) = &state.buf else { break };
                match to.try_write(&buf[state.written..state.len]) {
                    Ok(n) => {
                        state.written += n;
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        meter.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err((to_side, e))),
                }
            }
            ready!(from.poll_read_ready(cx)).map_err(|e| (from_side, e))?;
            let buf = state
                .buf
                .get_or_insert_with(|| vec![0u8; COPY_BUF_SIZE].into_boxed_slice());
            match from.try_read(buf) {
                Ok(0) => {
                    meter.touch();
                    return Poll::Ready(sys::shutdown_write(to).map_err(|e| (to_side, e)));
                }
                Ok(n) => (state.len, state.written) = (n, 0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => state.buf = None,
                Err(e) => return Poll::Ready(Err((from_side, e))),
            }
        }
    }
}

/// Resets both sockets when the relay is dropped before the flow ended:
/// tproxyd is stopping. A reset leaves no state behind on either side,
/// where a FIN would leave the socket waiting for its peer's answer.
struct ResetIfCut<'a> {
    sockets: [&'a TcpStream; 2],
    ended: bool,
}

impl Drop for ResetIfCut<'_> {
    fn drop(&mut self) {
        if !self.ended {
            for socket in self.sockets {
                let _ = sys::set_reset_on_close(socket);
            }
        }
    }
}

/// Relays until both directions end, one side fails, or the flow idles,
/// counting bytes in `traffic` as they go. Dropped midway (tproxyd
/// stopping, the flow closed from the API), it resets both sides.
pub async fn relay(
    client: TcpStream,
    upstream: TcpUpstream,
    idle: Duration,
    traffic: &Traffic,
) -> Outcome {
    match upstream.into_plain() {
        Ok(upstream) => splice(client, upstream, idle, traffic).await,
        Err(framed) => copy_framed(client, framed, idle, traffic).await,
    }
}

/// [`relay`] for a plain upstream: splice, each direction holding a pipe
/// only while bytes are in flight.
async fn splice(
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    traffic: &Traffic,
) -> Outcome {
    let before = traffic.get();
    let mut cut = ResetIfCut {
        sockets: [&client, &upstream],
        ended: false,
    };
    let meter = Meter::new();
    let mut up = OneWay::new(Side::Client);
    let mut down = OneWay::new(Side::Upstream);
    let watchdog = idle_watchdog(&meter, idle);
    tokio::pin!(watchdog);
    let end = std::future::poll_fn(|cx| {
        for (dir, from, to, counter) in [
            (&mut up, &client, &upstream, &traffic.up),
            (&mut down, &upstream, &client, &traffic.down),
        ] {
            if !dir.done {
                let ends = Ends {
                    from,
                    to,
                    meter: &meter,
                    counter,
                };
                match dir.poll(cx, &ends) {
                    Poll::Ready(Ok(())) => dir.done = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(side_error(e)),
                    Poll::Pending => {}
                }
            }
        }
        if up.done && down.done {
            return Poll::Ready(End::Closed);
        }
        match watchdog.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(End::Idle),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    cut.ended = true;
    drop(cut);
    if matches!(end, End::UpstreamError(_)) {
        // Tell the client the truth: the far side is gone, not finished.
        let _ = sys::set_reset_on_close(&client);
    }
    let after = traffic.get();
    Outcome {
        up: after.0 - before.0,
        down: after.1 - before.1,
        end,
    }
}

/// One direction of a framed flow, driven by [`Framed::poll`]: bytes are
/// read into the direction's buffer and written out before the next read.
struct Framed {
    from_side: Side,
    /// Taken while bytes are in flight, given back when the source has
    /// nothing more for now and everything read was written.
    buf: Option<Box<[u8]>>,
    /// The unwritten bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes were written since the last flush.
    unflushed: bool,
    /// The source ended: the FIN is being passed on.
    eof: bool,
    done: bool,
}

impl Drop for Framed {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            SPARE_COPY_BUFS.give_back(buf);
        }
    }
}

impl Framed {
    fn new(from_side: Side) -> Self {
        Framed {
            from_side,
            buf: None,
            start: 0,
            end: 0,
            unflushed: false,
            eof: false,
            done: false,
        }
    }

    /// Moves bytes `from` → `to` through `buf` until EOF (then passes the
    /// FIN on and returns `Ready(Ok)`), an error, or nothing to do. When
    /// the source has nothing for now, `to` is flushed: a framed stream may
    /// hold what it was given until then.
    fn poll<F: TcpCarrier, T: TcpCarrier>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut F,
        to: &mut T,
        meter: &Meter,
        counter: &AtomicU64,
    ) -> Poll<DirResult> {
        let (from_side, to_side) = (self.from_side, self.from_side.other());
        loop {
            if self.eof {
                ready!(match to_side {
                    // A framed upstream may have bytes to send before its
                    // FIN (and a tag to seal them): its own shutdown does.
                    Side::Upstream => Pin::new(&mut *to).poll_shutdown(cx),
                    // The client's socket: as the splice path does.
                    Side::Client => Poll::Ready(sys::shutdown_write(to.socket())),
                })
                .map_err(|e| (to_side, e))?;
                return Poll::Ready(Ok(()));
            }
            while self.start < self.end {
                let Some(pending) = self
                    .buf
                    .as_deref()
                    .and_then(|b| b.get(self.start..self.end))
                else {
                    break;
                };
                let n =
                    ready!(Pin::new(&mut *to).poll_write(cx, pending)).map_err(|e| (to_side, e))?;
                if n == 0 {
                    return Poll::Ready(Err((to_side, io::ErrorKind::WriteZero.into())));
                }
                self.start += n;
                self.unflushed = true;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                meter.touch();
            }
            let buf = self.buf.get_or_insert_with(take_copy_buf);
            let batch = to.write_batch().min(buf.len());
            let mut read = ReadBuf::new(&mut buf[..batch]);
            match Pin::new(&mut *from).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    meter.touch();
                    (self.start, self.end) = (0, n);
                    self.eof = n == 0;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err((from_side, e))),
                Poll::Pending => {
                    // Everything read was written: an idle direction holds
                    // no buffer.
                    if let Some(buf) = self.buf.take() {
                        SPARE_COPY_BUFS.give_back(buf);
                    }
                    if self.unflushed {
                        ready!(Pin::new(&mut *to).poll_flush(cx)).map_err(|e| (to_side, e))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Both ends of a framed flow; like [`ResetIfCut`], resets both when
/// dropped before the flow ended. It owns them, as the relay polls them
/// through `&mut`.
struct FramedEnds<S: TcpCarrier> {
    client: TcpStream,
    upstream: S,
    ended: bool,
}

impl<S: TcpCarrier> Drop for FramedEnds<S> {
    fn drop(&mut self) {
        if !self.ended {
            let _ = sys::set_reset_on_close(&self.client);
            let _ = sys::set_reset_on_close(self.upstream.socket());
        }
    }
}

/// [`relay`] for an upstream that frames the stream: copied through one
/// buffer per direction, held only while bytes are in flight (see
/// [`SPARE_COPY_BUFS`]), with the splice path's half-close, reset, idle timeout and
/// counting. Both directions are polled from the start, so the upstream's
/// `poll_read` runs before the client sends anything.
async fn copy_framed<S: TcpCarrier>(
    client: TcpStream,
    upstream: S,
    idle: Duration,
    traffic: &Traffic,
) -> Outcome {
    let before = traffic.get();
    let mut ends = FramedEnds {
        client,
        upstream,
        ended: false,
    };
    let meter = Meter::new();
    let mut up = Framed::new(Side::Client);
    let mut down = Framed::new(Side::Upstream);
    let watchdog = idle_watchdog(&meter, idle);
    tokio::pin!(watchdog);
    let end = std::future::poll_fn(|cx| {
        let FramedEnds {
            client, upstream, ..
        } = &mut ends;
        if !up.done {
            match up.poll(cx, client, upstream, &meter, &traffic.up) {
                Poll::Ready(Ok(())) => up.done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(side_error(e)),
                Poll::Pending => {}
            }
        }
        if !down.done {
            match down.poll(cx, upstream, client, &meter, &traffic.down) {
                Poll::Ready(Ok(())) => down.done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(side_error(e)),
                Poll::Pending => {}
            }
        }
        if up.done && down.done {
            return Poll::Ready(End::Closed);
        }
        match watchdog.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(End::Idle),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    ends.ended = true;
    if matches!(end, End::UpstreamError(_)) {
        // As on the splice path: the far side is gone, not finished.
        let _ = sys::set_reset_on_close(&ends.client);
    }
    drop(ends);
    let after = traffic.get();
    Outcome {
        up: after.0 - before.0,
        down: after.1 - before.1,
        end,
    }
}

fn side_error((side, e): (Side, io::Error)) -> End {
    match side {
        Side::Client => End::ClientError(e.to_string()),
        Side::Upstream => End::UpstreamError(e.to_string()),
    }
}

async fn idle_watchdog(meter: &Meter, idle: Duration) {
    loop {
        let last = Duration::from_millis(meter.last_activity_ms.load(Ordering::Relaxed));
        let since = meter.start.elapsed().saturating_sub(last);
        if since >= idle {
            return;
        }
        tokio::time::sleep(idle - since).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback streams.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn half_close_still_delivers_the_whole_answer() {
        // user <-> client_side [relay] upstream_side <-> server
        let (mut user, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            relay(
                client_side,
                TcpUpstream::Plain(upstream_side),
                Duration::from_secs(5),
                &Traffic::default(),
            )
            .await
        });

        user.write_all(b"request").await.unwrap();
        user.shutdown().await.unwrap();
        // The server reads to EOF, waits, and only then answers.
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.write_all(b"answer after FIN").await.unwrap();
        server.shutdown().await.unwrap();

        let mut answer = Vec::new();
        user.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after FIN");
        let outcome = relay.await.unwrap();
        assert_eq!(
            outcome,
            Outcome {
                up: 7,
                down: 16,
                end: End::Closed
            }
        );
    }

    #[tokio::test]
    async fn idle_flows_are_closed() {
        let (mut user, client_side) = pair().await;
        let (upstream_side, _server) = pair().await;
        let outcome = relay(
            client_side,
            TcpUpstream::Plain(upstream_side),
            Duration::from_millis(200),
            &Traffic::default(),
        )
        .await;
        assert_eq!(outcome.end, End::Idle);
        let mut buf = [0u8; 1];
        assert_eq!(
            user.read(&mut buf).await.unwrap(),
            0,
            "client sees the close"
        );
    }

    #[tokio::test]
    async fn upstream_reset_resets_the_client() {
        let (mut user, client_side) = pair().await;
        let (upstream_side, server) = pair().await;
        let relay = tokio::spawn(async move {
            relay(
                client_side,
                TcpUpstream::Plain(upstream_side),
                Duration::from_secs(5),
                &Traffic::default(),
            )
            .await
        });
        sys::set_reset_on_close(&server).unwrap();
        drop(server);
        let outcome = relay.await.unwrap();
        assert!(matches!(outcome.end, End::UpstreamError(_)), "{outcome:?}");
        let mut buf = [0u8; 1];
        let err = user.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
    /// The copy path is only taken when the kernel refuses splice, which
    /// TCP sockets never do, so it gets its own test.
    #[tokio::test]
    async fn copy_fallback_moves_every_byte_and_passes_the_fin() {
        let (mut user, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            user.write_all(&sent).await.unwrap();
            user.shutdown().await.unwrap();
            user
        });
        let meter = Meter::new();
        let traffic = Traffic::default();
        let mut dir = OneWay::new(Side::Client);
        dir.copy = Some(CopyState::default());
        let ends = Ends {
            from: &client_side,
            to: &upstream_side,
            meter: &meter,
            counter: &traffic.up,
        };
        let copy = std::future::poll_fn(|cx| dir.poll(cx, &ends));
        let mut got = Vec::new();
        let (copied, read) = tokio::join!(copy, server.read_to_end(&mut got));
        assert!(copied.is_ok());
        read.unwrap();
        assert_eq!(got, payload, "all bytes, in order, then EOF");
        assert_eq!(traffic.get().0, payload.len() as u64);
        writer.await.unwrap();
    }

    /// A framed stream for the tests, standing in for a kind that frames
    /// TCP: each write becomes a frame (a 2-byte length, then the bytes
    /// XORed with 0x5a) that stays in the stream's buffer until a flush,
    /// a shutdown or 64 KiB piled up, as an encrypting stream may hold a
    /// chunk; an empty frame is garbage. A `header` given at the start is
    /// sent from `poll_read`, before anything is written: as a stream that
    /// must speak first does.
    #[derive(Debug)]
    struct Chunked {
        inner: TcpStream,
        out: Vec<u8>,
        sent: usize,
        header_pending: bool,
        inb: Vec<u8>,
        plain: Vec<u8>,
        delivered: usize,
    }

    const PILE: usize = 64 * 1024;
    const FRAME: usize = 4096;

    impl Chunked {
        fn new(inner: TcpStream, header: &[u8]) -> Self {
            let mut c = Chunked {
                inner,
                out: Vec::new(),
                sent: 0,
                header_pending: !header.is_empty(),
                inb: Vec::new(),
                plain: Vec::new(),
                delivered: 0,
            };
            if !header.is_empty() {
                c.frame(header);
            }
            c
        }

        fn frame(&mut self, bytes: &[u8]) {
            self.out
                .extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            self.out.extend(bytes.iter().map(|b| b ^ 0x5a));
        }

        fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            while self.sent < self.out.len() {
                let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.sent += n;
            }
            self.out.clear();
            self.sent = 0;
            self.header_pending = false;
            Poll::Ready(Ok(()))
        }

        /// The next frame's payload out of `inb`, if a whole one is there.
        fn decode(&mut self) -> io::Result<bool> {
            if self.inb.len() < 2 {
                return Ok(false);
            }
            let len = u16::from_be_bytes([self.inb[0], self.inb[1]]) as usize;
            if len == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "empty frame"));
            }
            if self.inb.len() < 2 + len {
                return Ok(false);
            }
            self.plain.clear();
            self.plain
                .extend(self.inb[2..2 + len].iter().map(|b| b ^ 0x5a));
            self.delivered = 0;
            self.inb.drain(..2 + len);
            Ok(true)
        }
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.header_pending {
                if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            loop {
                if this.delivered < this.plain.len() {
                    let n = buf.remaining().min(this.plain.len() - this.delivered);
                    buf.put_slice(&this.plain[this.delivered..this.delivered + n]);
                    this.delivered += n;
                    return Poll::Ready(Ok(()));
                }
                if this.decode()? {
                    continue;
                }
                let mut raw = [0u8; 8192];
                let mut read = ReadBuf::new(&mut raw);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
                if read.filled().is_empty() {
                    if this.inb.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                this.inb.extend_from_slice(read.filled());
            }
        }
    }

    impl AsyncWrite for Chunked {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.out.len() >= PILE {
                ready!(this.poll_drain(cx))?;
            }
            let n = buf.len().min(FRAME);
            if n > 0 {
                this.frame(&buf[..n]);
            }
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            ready!(this.poll_drain(cx))?;
            Pin::new(&mut this.inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            ready!(this.poll_drain(cx))?;
            Pin::new(&mut this.inner).poll_shutdown(cx)
        }
    }

    impl TcpCarrier for Chunked {
        fn socket(&self) -> &TcpStream {
            &self.inner
        }
    }

    /// user ↔ client side [relay] framed upstream ↔ server (framed too):
    /// the relay's task, the user's end and the server's.
    async fn framed_flow(
        idle: Duration,
        header: &[u8],
    ) -> (
        tokio::task::JoinHandle<(Outcome, Traffic)>,
        TcpStream,
        Chunked,
    ) {
        let (user, client_side) = pair().await;
        let (upstream_side, server) = pair().await;
        let upstream = Chunked::new(upstream_side, header);
        let relay = tokio::spawn(async move {
            let traffic = Traffic::default();
            let outcome = copy_framed(client_side, upstream, idle, &traffic).await;
            (outcome, traffic)
        });
        (relay, user, Chunked::new(server, &[]))
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
            .collect()
    }

    #[tokio::test]
    async fn framed_moves_every_byte_both_ways_at_once() {
        const LEN: usize = 4 << 20;
        let (relay, user, mut server) = framed_flow(Duration::from_secs(10), &[]).await;
        let (up, down) = (pattern(LEN, 1), pattern(LEN + 17, 2));
        let (mut user_rd, mut user_wr) = user.into_split();
        let to_send = up.clone();
        let user_writes = tokio::spawn(async move {
            user_wr.write_all(&to_send).await.unwrap();
            user_wr.shutdown().await.unwrap();
            user_wr
        });
        let user_reads = tokio::spawn(async move {
            let mut got = Vec::new();
            user_rd.read_to_end(&mut got).await.unwrap();
            got
        });
        let (mut server_rd, mut server_wr) = tokio::io::split(&mut server);
        let to_answer = down.clone();
        let mut got_up = Vec::new();
        let (read, written) = tokio::join!(server_rd.read_to_end(&mut got_up), async {
            server_wr.write_all(&to_answer).await?;
            server_wr.shutdown().await
        });
        read.unwrap();
        written.unwrap();
        assert!(got_up == up, "upstream got every byte, in order, then EOF");
        let got_down = user_reads.await.unwrap();
        assert!(
            got_down == down,
            "the user got every byte, in order, then EOF"
        );
        let _user_wr = user_writes.await.unwrap();
        let (outcome, traffic) = relay.await.unwrap();
        assert_eq!(
            outcome,
            Outcome {
                up: LEN as u64,
                down: LEN as u64 + 17,
                end: End::Closed
            }
        );
        assert_eq!(traffic.get(), (LEN as u64, LEN as u64 + 17));
    }

    /// Nothing is half-closed: only the relay's flush, when the user
    /// pauses, gets the bytes out of the framed stream's buffer.
    #[tokio::test]
    async fn framed_writes_are_flushed_when_the_client_pauses() {
        let (_relay, mut user, mut server) = framed_flow(Duration::from_secs(5), &[]).await;
        let wait = Duration::from_secs(2);
        for round in 0..3u8 {
            user.write_all(&[b'p', round]).await.unwrap();
            let mut ping = [0u8; 2];
            tokio::time::timeout(wait, server.read_exact(&mut ping))
                .await
                .expect("the relay flushed the upstream")
                .unwrap();
            assert_eq!(ping, [b'p', round]);
            server.write_all(&[b'q', round]).await.unwrap();
            server.flush().await.unwrap();
            let mut pong = [0u8; 2];
            tokio::time::timeout(wait, user.read_exact(&mut pong))
                .await
                .expect("the answer came through")
                .unwrap();
            assert_eq!(pong, [b'q', round]);
        }
    }

    #[tokio::test]
    async fn framed_half_close_from_the_client_still_delivers_the_answer() {
        let (relay, mut user, mut server) = framed_flow(Duration::from_secs(5), &[]).await;
        user.write_all(b"request").await.unwrap();
        user.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.write_all(b"answer after FIN").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        user.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after FIN");
        let (outcome, _) = relay.await.unwrap();
        assert_eq!(
            outcome,
            Outcome {
                up: 7,
                down: 16,
                end: End::Closed
            }
        );
    }

    #[tokio::test]
    async fn framed_half_close_from_the_upstream_leaves_the_client_sending() {
        let (relay, mut user, mut server) = framed_flow(Duration::from_secs(5), &[]).await;
        server.write_all(b"banner").await.unwrap();
        server.shutdown().await.unwrap();
        let mut banner = Vec::new();
        user.read_to_end(&mut banner).await.unwrap();
        assert_eq!(banner, b"banner", "then the client's EOF");
        tokio::time::sleep(Duration::from_millis(100)).await;
        user.write_all(b"still talking").await.unwrap();
        user.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"still talking");
        let (outcome, _) = relay.await.unwrap();
        assert_eq!(
            outcome,
            Outcome {
                up: 13,
                down: 6,
                end: End::Closed
            }
        );
    }

    /// The upstream is read from the start: a stream that must speak
    /// first gets to, though the client sends nothing.
    #[tokio::test]
    async fn framed_upstream_is_read_before_the_client_sends() {
        let (_relay, _user, mut server) =
            framed_flow(Duration::from_secs(5), b"header alone").await;
        let mut header = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(2), server.read_exact(&mut header))
            .await
            .expect("the header is sent without the client's bytes")
            .unwrap();
        assert_eq!(&header, b"header alone");
    }

    #[tokio::test]
    async fn framed_upstream_reset_resets_the_client() {
        let (relay, mut user, server) = framed_flow(Duration::from_secs(5), &[]).await;
        sys::set_reset_on_close(server.socket()).unwrap();
        drop(server);
        let (outcome, _) = relay.await.unwrap();
        assert!(matches!(outcome.end, End::UpstreamError(_)), "{outcome:?}");
        let mut buf = [0u8; 1];
        let err = user.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    /// The framing's own error (here an empty frame) ends the flow as an
    /// upstream error with its reason, and resets the client.
    #[tokio::test]
    async fn framed_garbage_from_the_upstream_resets_the_client() {
        let (relay, mut user, mut server) = framed_flow(Duration::from_secs(5), &[]).await;
        server.inner.write_all(&[0, 0]).await.unwrap();
        let (outcome, _) = relay.await.unwrap();
        assert_eq!(outcome.end, End::UpstreamError("empty frame".into()));
        let mut buf = [0u8; 1];
        let err = user.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn framed_client_reset_ends_the_flow() {
        let (relay, user, _server) = framed_flow(Duration::from_secs(5), &[]).await;
        sys::set_reset_on_close(&user).unwrap();
        drop(user);
        let (outcome, _) = relay.await.unwrap();
        assert!(matches!(outcome.end, End::ClientError(_)), "{outcome:?}");
    }

    #[tokio::test]
    async fn framed_idle_flows_are_closed() {
        let (relay, mut user, mut server) = framed_flow(Duration::from_millis(300), &[]).await;
        // Traffic first: the watchdog counts from the last byte.
        user.write_all(b"x").await.unwrap();
        let mut x = [0u8; 1];
        server.read_exact(&mut x).await.unwrap();
        let (outcome, _) = relay.await.unwrap();
        assert_eq!(outcome.end, End::Idle);
        assert_eq!(
            user.read(&mut x).await.unwrap(),
            0,
            "the client sees the close"
        );
    }

    /// The framed path through [`TcpUpstream`]'s own delegation (its
    /// `Plain` arm, the only one every build has).
    #[tokio::test]
    async fn framed_path_through_tcp_upstream_moves_every_byte() {
        let (mut user, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let traffic = Traffic::default();
            let upstream = TcpUpstream::Plain(upstream_side);
            copy_framed(client_side, upstream, Duration::from_secs(5), &traffic).await
        });
        let payload = pattern(1 << 20, 3);
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            user.write_all(&sent).await.unwrap();
            user.shutdown().await.unwrap();
            user
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == payload);
        server.write_all(b"bye").await.unwrap();
        drop(server);
        let mut user = writer.await.unwrap();
        let mut bye = Vec::new();
        user.read_to_end(&mut bye).await.unwrap();
        assert_eq!(bye, b"bye");
        let outcome = relay.await.unwrap();
        assert_eq!(outcome.up, 1 << 20);
        assert_eq!(outcome.down, 3);
        assert_eq!(outcome.end, End::Closed);
    }
}
