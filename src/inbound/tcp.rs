//! The TCP inbound: accept, recover the original destination, ask the
//! route decision, connect the outbound and hand both to the relay.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::Mode;
use crate::outbound::OutboundError;
use crate::ratelimit::{RateLimit, WARN_INTERVAL};
use crate::relay::tcp::relay;
use crate::route::{Decision, Protocol, Router};
use crate::sys;

/// What every accepted connection needs to know.
#[derive(Debug)]
pub struct TcpContext {
    pub mode: Mode,
    pub router: Router,
    pub idle: Duration,
}

// Every warning below can repeat per connection: a flood must not write
// one line each. One line per interval, with the count held back since.
static ACCEPT_FAILED: RateLimit = RateLimit::new(WARN_INTERVAL);
static NO_ORIG_DST: RateLimit = RateLimit::new(WARN_INTERVAL);
static LOOP: RateLimit = RateLimit::new(WARN_INTERVAL);
static UPSTREAM_FAILED: RateLimit = RateLimit::new(WARN_INTERVAL);

/// Accepts until `stop` turns true, then ends every flow it carries (each
/// is reset, see [`relay`]) and returns once all are gone. The caller
/// removes the firewall rules only after that: a socket closed once the
/// rules are gone would wait in vain for its peer's last packets, and a
/// new client that reused its port would hang on it.
pub async fn serve(listener: TcpListener, ctx: Arc<TcpContext>, mut stop: watch::Receiver<bool>) {
    let mut flows = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    flows.spawn(handle(stream, peer, Arc::clone(&ctx)));
                }
                Err(e) => {
                    // EMFILE/ENFILE: out of descriptors. The connection stays in
                    // the backlog; back off instead of spinning, and say why.
                    let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                    if let Some(held_back) = ACCEPT_FAILED.check() {
                        if exhausted {
                            warn!(held_back, "accept failed: out of file descriptors ({e}); new TCP flows wait until some close. Raise the open-files limit (LimitNOFILE=) if this is normal load");
                        } else {
                            warn!(held_back, "accept failed: {e}");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(if exhausted { 100 } else { 10 })).await;
                }
            },
            // Reap finished flows so the set holds only live ones.
            Some(_) = flows.join_next(), if !flows.is_empty() => {}
            // Any change is the stop (only `true` is ever sent), and a
            // dropped sender means stop as well.
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let open = flows.len();
    flows.abort_all();
    while flows.join_next().await.is_some() {}
    if open > 0 {
        info!(flows = open, "open TCP flows reset");
    }
}

fn original_destination(stream: &TcpStream, mode: Mode) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    match mode {
        Mode::Tproxy => Ok(sys::normalize(local)),
        Mode::Redirect => sys::original_dst(stream, local),
    }
}

/// Closes the client's connection with RST so it fails at once.
fn reset(stream: TcpStream) {
    let _ = sys::set_reset_on_close(&stream);
    drop(stream);
}

async fn handle(stream: TcpStream, peer: SocketAddr, ctx: Arc<TcpContext>) {
    let started = Instant::now();
    let client = sys::normalize(peer);
    let dst = match original_destination(&stream, ctx.mode) {
        Ok(d) => d,
        Err(e) => {
            if let Some(held_back) = NO_ORIG_DST.check() {
                warn!(%client, held_back, "no original destination for TCP connection ({e}): it did not come through a {} rule; refused", ctx.mode);
            }
            return reset(stream);
        }
    };
    let outbound = match ctx.router.decide(Protocol::Tcp, dst) {
        Decision::Forward(o) => o,
        Decision::RefuseLoop => {
            if let Some(held_back) = LOOP.check() {
                warn!(%client, %dst, held_back, "refused TCP connection to tproxyd's own listener (routing loop or a direct connection to the listener)");
            }
            return reset(stream);
        }
    };
    let _ = stream.set_nodelay(true);
    // Boxed so the connect state (a SOCKS5 handshake is large) is freed
    // once connected instead of sizing the task of every long-lived flow.
    let upstream = match Box::pin(outbound.connect_tcp(dst)).await {
        Ok(u) => u,
        Err(e) => {
            log_connect_failure(client, dst, outbound.name(), &e);
            debug!(proto = "tcp", %client, %dst, outbound = outbound.name(), up_bytes = 0u64, down_bytes = 0u64,
                duration_ms = started.elapsed().as_millis() as u64, end = "connect-failed", "flow");
            return reset(stream);
        }
    };
    let outcome = relay(stream, upstream, ctx.idle).await;
    debug!(
        proto = "tcp",
        %client,
        %dst,
        outbound = outbound.name(),
        up_bytes = outcome.up,
        down_bytes = outcome.down,
        duration_ms = started.elapsed().as_millis() as u64,
        end = %outcome.end,
        "flow"
    );
}

/// Problems with the upstream itself are worth a warning; a destination
/// that refuses is an ordinary event on the internet.
fn log_connect_failure(client: SocketAddr, dst: SocketAddr, outbound: &str, e: &OutboundError) {
    use crate::outbound::socks5::Socks5Error;
    match e {
        OutboundError::Socks5(Socks5Error::Rejected { .. })
        | OutboundError::Connect { .. }
        | OutboundError::ConnectTimeout { .. } => {
            debug!(%client, %dst, outbound, "connect failed: {e}")
        }
        _ => {
            if let Some(held_back) = UPSTREAM_FAILED.check() {
                warn!(%client, %dst, outbound, held_back, "{e}")
            }
        }
    }
}
