//! Relays one TCP flow in both directions at once.
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

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::fds;
use crate::registry::Traffic;
use crate::relay::spares::Spares;
use crate::sys;

const COPY_BUF_SIZE: usize = 16 * 1024;

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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
                upstream_side,
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
            upstream_side,
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
                upstream_side,
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
}
