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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::sys;

const BUF_SIZE: usize = 16 * 1024;

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

/// Progress shared by the two directions and the idle watchdog.
struct Meter {
    start: Instant,
    last_activity_ms: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Meter {
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

/// Copies `from` to `to` until EOF, then shuts down `to`'s write side.
/// An error names the side it came from.
///
/// The buffer exists only while data flows: the copy waits for
/// readiness without one, fills it with non-blocking reads, and drops it
/// when the socket has nothing more. An idle flow (most of a router's
/// flows, most of the time) then costs no buffer at all; measured before
/// this, two 16 KiB buffers per flow made up most of ~19 KB RSS per idle
/// flow.
async fn copy_half(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    meter: &Meter,
    counter: &AtomicU64,
    from_side: Side,
) -> Result<(), (Side, io::Error)> {
    loop {
        from.readable().await.map_err(|e| (from_side, e))?;
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            let n = match from.try_read(&mut buf) {
                Ok(0) => {
                    // EOF: pass the FIN on, keep the other direction open.
                    to.shutdown().await.map_err(|e| (from_side.other(), e))?;
                    meter.touch();
                    return Ok(());
                }
                Ok(n) => n,
                // Drained: give the buffer back and wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err((from_side, e)),
            };
            to.write_all(&buf[..n])
                .await
                .map_err(|e| (from_side.other(), e))?;
            counter.fetch_add(n as u64, Ordering::Relaxed);
            meter.touch();
        }
    }
}

/// Relays until both directions end, one side fails, or the flow idles.
pub async fn relay(mut client: TcpStream, mut upstream: TcpStream, idle: Duration) -> Outcome {
    let meter = Meter {
        start: Instant::now(),
        last_activity_ms: AtomicU64::new(0),
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
    };
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let up = copy_half(&mut cr, &mut uw, &meter, &meter.up, Side::Client);
        let down = copy_half(&mut ur, &mut cw, &meter, &meter.down, Side::Upstream);
        tokio::pin!(up, down);
        let watchdog = idle_watchdog(&meter, idle);
        tokio::pin!(watchdog);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(e) => break side_error(e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(e) => break side_error(e),
                },
                _ = &mut watchdog => break End::Idle,
            }
            if up_done && down_done {
                break End::Closed;
            }
        }
    };
    if matches!(end, End::UpstreamError(_)) {
        // Tell the client the truth: the far side is gone, not finished.
        let _ = sys::set_reset_on_close(&client);
    }
    Outcome {
        up: meter.up.load(Ordering::Relaxed),
        down: meter.down.load(Ordering::Relaxed),
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
    use tokio::io::AsyncReadExt;
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
        let relay = tokio::spawn(relay(client_side, upstream_side, Duration::from_secs(5)));

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
        let outcome = relay(client_side, upstream_side, Duration::from_millis(200)).await;
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
        let relay = tokio::spawn(relay(client_side, upstream_side, Duration::from_secs(5)));
        sys::set_reset_on_close(&server).unwrap();
        drop(server);
        let outcome = relay.await.unwrap();
        assert!(matches!(outcome.end, End::UpstreamError(_)), "{outcome:?}");
        let mut buf = [0u8; 1];
        let err = user.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
