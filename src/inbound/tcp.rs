//! The TCP inbound: accept, recover the original destination, sniff the
//! first bytes when a rule needs a name, ask the route decision, connect
//! the outbound and hand both to the relay.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::Mode;
use crate::config::Network;
use crate::dns::listen::CapturedTcp;
use crate::fds;
use crate::inbound::admission::{Admission, Refusal, Ticket};
use crate::outbound::{Failure, OutboundError};
use crate::policy::sniff::{self, Sniffed, StreamSniff, MAX_SNIFF_BYTES};
use crate::policy::FlowMeta;
use crate::ratelimit::{RateLimit, WARN_INTERVAL};
use crate::registry::{EndReason, FlowStart, Registry};
use crate::relay::tcp::{relay, release_spare_pipes, End};
use crate::route::{Decision, FakeDst, Router};
use crate::sys;

/// What every accepted connection needs to know.
#[derive(Debug)]
pub struct TcpContext {
    pub mode: Mode,
    pub router: Router,
    /// The idle timeout in milliseconds: a reload changes it for flows
    /// that start from then on.
    pub idle_ms: portable_atomic::AtomicU64,
    pub admission: Arc<Admission>,
    pub registry: Arc<Registry>,
    /// When tproxyd answers DNS itself (`cfg.dns.answers()`): captured
    /// flows to port 53 are answered here instead of connected out.
    pub dns: arc_swap::ArcSwapOption<CapturedTcp>,
}

// Every warning below can repeat per connection: a flood must not write
// one line each. One line per interval, with the count held back since.
static ACCEPT_FAILED: RateLimit = RateLimit::new(WARN_INTERVAL);
static PAUSED: RateLimit = RateLimit::new(WARN_INTERVAL);
static OVER_FLOWS: RateLimit = RateLimit::new(WARN_INTERVAL);
static OVER_CONNECTING: RateLimit = RateLimit::new(WARN_INTERVAL);
static NO_ORIG_DST: RateLimit = RateLimit::new(WARN_INTERVAL);
static LOOP: RateLimit = RateLimit::new(WARN_INTERVAL);
static UNMAPPED_FAKE: RateLimit = RateLimit::new(WARN_INTERVAL);
static UPSTREAM_NO_FDS: RateLimit = RateLimit::new(WARN_INTERVAL);
static UPSTREAM_FAILED: RateLimit = RateLimit::new(WARN_INTERVAL);

/// How long a new flow may wait for its client's first bytes when a rule
/// needs its host name. A client-first protocol's first segment comes
/// right after the handshake (well within a LAN round trip plus the
/// client's own work); a client that has sent nothing by then is taken
/// for a server-first protocol and routed by address. sing-box uses 300
/// ms as well, Xray 200 ms.
pub const SNIFF_WAIT: Duration = Duration::from_millis(300);

/// The first peek buffer: a whole ClientHello with post-quantum key
/// shares (~1.8 KB) fits; it doubles, up to [`MAX_SNIFF_BYTES`], only when
/// a parser needs more than it holds.
const SNIFF_FIRST_BUF: usize = 4096;

thread_local! {
    /// The first peek's buffer, one per thread (see [`sniff_first_bytes`]).
    static FIRST_PEEK: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SNIFF_FIRST_BUF].into_boxed_slice());
}

/// Whether there is a descriptor for one more flow's upstream side; if
/// not, the pooled pipes are closed first and the question asked again.
fn room_for_a_flow(budget: &fds::Budget) -> bool {
    budget.room_for(fds::PER_FLOW) || (release_spare_pipes() > 0 && budget.room_for(fds::PER_FLOW))
}

/// Accepts until `stop` turns true, then ends every flow it carries (each
/// is reset, see [`relay`]) and returns once all are gone. The caller
/// removes the firewall rules only after that: a socket closed once the
/// rules are gone would wait in vain for its peer's last packets, and a
/// new client that reused its port would hang on it.
///
/// Accepting pauses while the descriptor budget ([`fds`]) has no room for
/// one more flow: a connection accepted then would have no descriptor for
/// its upstream side and be reset. Paused, connections wait in the listen
/// backlog (and, once it is full, in the clients' SYN retries) until
/// flows end.
pub async fn serve(listener: TcpListener, ctx: Arc<TcpContext>, mut stop: watch::Receiver<bool>) {
    let budget = fds::global();
    let mut flows = JoinSet::new();
    let mut paused = false;
    // The stop is looked at first on every turn (an atomic load), so no
    // load of connections keeps it waiting. Its wait, which takes the
    // channel's lock at every poll, is one for the whole loop (not a new
    // one per turn) and polled last, only when nothing else is ready.
    let stop_seen = stop.clone();
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        // Any change is the stop (only `true` is ever sent), and a
        // dropped sender means stop as well.
        if stop_seen.has_changed().unwrap_or(true) {
            break;
        }
        let room = room_for_a_flow(budget);
        if !room && !paused {
            if let Some(held_back) = PAUSED.check() {
                warn!(
                    in_use = budget.in_use(),
                    limit = budget.limit(),
                    reserve = budget.reserve(),
                    flows = flows.len(),
                    held_back,
                    "not accepting TCP connections for now: the open-files limit leaves no \
                     descriptor for one more flow's upstream side; new connections wait in the \
                     listen backlog until flows end. Raise the open-files limit (LimitNOFILE= \
                     in the service unit, ulimit -n), or set limits.tcp_flows lower to refuse \
                     the excess at once instead"
                );
            }
        }
        paused = !room;
        tokio::select! {
            biased;
            // Reap finished flows first, so the set holds only live ones.
            Some(_) = flows.join_next(), if !flows.is_empty() => {}
            accepted = listener.accept(), if room => match accepted {
                Ok((stream, peer)) => {
                    // Counted at once, the upstream's descriptor included,
                    // so the next turn of the loop sees this flow.
                    let held = budget.hold(fds::PER_FLOW);
                    let client = sys::normalize(peer);
                    match ctx.admission.admit(client.ip()) {
                        Ok(ticket) => {
                            flows.spawn(handle(stream, client, Arc::clone(&ctx), ticket, held));
                        }
                        Err(refusal) => refuse(stream, client, refusal),
                    }
                }
                Err(e) => {
                    // EMFILE/ENFILE: descriptors ran out outside the
                    // budget's count (UDP sessions, other uses). The
                    // connection stays in the backlog; back off instead of
                    // spinning, and say why.
                    let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                    if let Some(held_back) = ACCEPT_FAILED.check() {
                        if exhausted {
                            warn!(held_back, "accept failed: out of file descriptors ({e}); new TCP connections wait in the listen backlog until descriptors are free. Raise the open-files limit (LimitNOFILE= in the service unit, ulimit -n)");
                        } else {
                            warn!(held_back, "accept failed: {e}");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(if exhausted { 100 } else { 10 })).await;
                }
            },
            // Paused: look again when a flow ends (the branch below) or
            // after a moment, for descriptors freed outside flows (pipes).
            // In an async block, so the timer (and its clock read) is made
            // only when paused, not on every turn.
            _ = async { tokio::time::sleep(Duration::from_millis(50)).await }, if !room => {}
            _ = &mut stopped => break,
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

/// Resets a connection over a flow limit, with a warning that names the
/// limit.
fn refuse(stream: TcpStream, client: SocketAddr, refusal: Refusal) {
    let limit = match refusal {
        Refusal::Flows { .. } => &OVER_FLOWS,
        Refusal::ConnectingPerClient { .. } => &OVER_CONNECTING,
    };
    if let Some(held_back) = limit.check() {
        warn!(%client, held_back, "TCP connection reset: {refusal}");
    }
    reset(stream);
}

fn original_destination(stream: &TcpStream, mode: Mode) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    match mode {
        Mode::Tproxy => Ok(sys::normalize(local)),
        Mode::Redirect => sys::original_dst(stream, local),
    }
}

/// Resets a connection to a fake-ip address that stands for no name (the
/// pool was lost, or the address recycled since the client resolved it):
/// the client fails at once and resolves the name again.
fn refuse_unmapped(stream: TcpStream, ctx: &TcpContext, client: SocketAddr, dst: SocketAddr) {
    if let Some(pool) = ctx.router.fake_ip() {
        pool.stats
            .unmapped_tcp
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(held_back) = UNMAPPED_FAKE.check() {
        warn!(%client, %dst, held_back, "TCP connection to a fake-ip address that stands for no name reset (the pool was lost or the address recycled); the client gets a new address when it asks DNS again");
    }
    reset(stream);
}

/// Closes the client's connection with RST so it fails at once.
fn reset(stream: TcpStream) {
    let _ = sys::set_reset_on_close(&stream);
    drop(stream);
}

async fn handle(
    stream: TcpStream,
    client: SocketAddr,
    ctx: Arc<TcpContext>,
    mut ticket: Ticket,
    _held: fds::Held,
) {
    let dst = match original_destination(&stream, ctx.mode) {
        Ok(d) => d,
        Err(e) => {
            if let Some(held_back) = NO_ORIG_DST.check() {
                warn!(%client, held_back, "no original destination for TCP connection ({e}): it did not come through a {} rule; refused", ctx.mode);
            }
            return reset(stream);
        }
    };
    // Clients' own DNS over TCP, answered by tproxyd's resolver: never
    // routed, never connected out.
    if dst.port() == crate::dns::PORT {
        if let Some(dns) = ctx.dns.load_full().filter(|d| d.ready()) {
            ticket.connected();
            return dns.serve(stream, client).await;
        }
    }
    let addresses = FlowMeta::addresses(Network::Tcp, client, dst);
    // One policy for the whole decision, read once: a reload meanwhile
    // applies to the next flow, never to half of this one.
    let policy = ctx.router.policy();
    // A fake-ip destination goes by the name its address stands for (one
    // look-up, which counts as a use of the name), or is reset at once
    // when it stands for none: it must never be dialed.
    let fake_name = match ctx.router.fake_dst(dst.ip()) {
        FakeDst::Real => None,
        FakeDst::Name(name) => Some(name),
        FakeDst::Unmapped => return refuse_unmapped(stream, &ctx, client, dst),
    };
    // The loop check first: a flow to ourselves is refused before anyone
    // waits for its bytes.
    let decided = match &fake_name {
        Some(name) => Decision::Forward(policy.decide_by_name(&addresses, name)),
        None => ctx.router.decide_with(&policy, &addresses),
    };
    let mut choice = match decided {
        Decision::Forward(choice) => choice,
        Decision::RefuseLoop => {
            if let Some(held_back) = LOOP.check() {
                warn!(%client, %dst, held_back, "refused TCP connection to tproxyd's own listener (routing loop or a direct connection to the listener)");
            }
            return reset(stream);
        }
        Decision::RefuseFake => return refuse_unmapped(stream, &ctx, client, dst),
    };
    // Only when some rule looks at names or protocols: otherwise a flow
    // never waits for its first bytes.
    let sniffed = if policy.wants_sniffing() && !sniff::skip_port(dst.port()) {
        sniff_first_bytes(&stream, SNIFF_WAIT).await
    } else {
        None
    };
    let (host, protocol) = match sniffed {
        Some(s) => (s.host, Some(s.protocol)),
        None => (None, None),
    };
    if protocol.is_some() {
        let meta = FlowMeta {
            domain: host.as_deref(),
            protocol,
            ..addresses
        };
        // The destination is unchanged, so this cannot be the loop; should
        // it ever be, the address-only choice stands. A fake-ip flow keeps
        // its name (the one its client resolved), with the protocol found.
        match &fake_name {
            Some(name) => choice = policy.decide_by_name(&meta, name),
            None => {
                if let Decision::Forward(c) = ctx.router.decide_with(&policy, &meta) {
                    choice = c;
                }
            }
        }
    }
    let host = match &fake_name {
        Some(name) => Some(name.to_string()),
        None => host,
    };
    // The sniffed name moves into the registry (no copy); the connect
    // reads it from there.
    let flow = ctx.registry.open(FlowStart {
        network: Network::Tcp,
        client,
        dst,
        host,
        sniffed: protocol,
        rule: Arc::clone(policy.rule_label(choice.rule)),
        chain: policy.chain_names(&choice),
    });
    let host = flow.flow().start.host.as_deref();
    let outbound = &choice.outbound;
    // No set_nodelay here: the client's socket has TCP_NODELAY from the
    // listener (sys::tcp_listener), as accepted sockets inherit it.
    // Not boxed: `connect_tcp` boxes the large states (the proxies'
    // handshakes) itself, so a direct flow neither allocates nor copies
    // kilobytes for its connect (it once cost ~9,000 instructions of
    // memcpy per flow), and the task stays small.
    let pool = fake_name.as_ref().and(ctx.router.fake_ip());
    let connect = async {
        match (host, pool) {
            // Boxed: only fake-ip flows pay for the name's path.
            (Some(name), Some(pool)) => {
                Box::pin(outbound.connect_tcp_named(name, dst.port(), &**pool)).await
            }
            _ => outbound.connect_tcp(dst, host).await,
        }
    };
    let connected = tokio::select! {
        c = connect => c,
        reason = flow.flow().closed() => {
            flow.end(reason, None);
            return reset(stream);
        }
    };
    ticket.connected();
    let upstream = match connected {
        Ok(u) => {
            // The connect-time histogram (metrics): once per flow. The
            // flow was registered just before the connect began, so its
            // age is the connect's time, without a clock read of its own.
            if let Some(outbound) = flow.flow().start.chain.first() {
                ctx.registry.record_connect(outbound, flow.flow().age());
            }
            u
        }
        Err(e) => {
            log_connect_failure(client, dst, &policy.route(&choice), &e);
            flow.end(e.failure().into(), Some(&e.to_string()));
            return reset(stream);
        }
    };
    drop(policy);
    let idle = Duration::from_millis(ctx.idle_ms.load(std::sync::atomic::Ordering::Relaxed));
    // Closed from outside: the relay is dropped, which resets both sides.
    let (reason, detail) = tokio::select! {
        outcome = relay(stream, upstream, idle, flow.traffic()) => match outcome.end {
            End::Closed => (EndReason::Closed, None),
            End::Idle => (EndReason::Idle, None),
            End::ClientError(e) => (EndReason::ClientError, Some(e)),
            End::UpstreamError(e) => (EndReason::UpstreamError, Some(e)),
        },
        reason = flow.flow().closed() => (reason, None),
    };
    flow.end(reason, detail.as_deref());
}

/// Peeks at the client's first bytes (they stay queued for the relay)
/// until the parsers decide, [`MAX_SNIFF_BYTES`] have been looked at, or
/// `wait` has passed since the call; None when nothing was recognised in
/// time (a server-first client sends nothing at all).
async fn sniff_first_bytes(stream: &TcpStream, wait: Duration) -> Option<Sniffed> {
    // A client that sends at once has its first bytes queued by the time
    // its connection is accepted. Look before waiting for readiness: a
    // socket just accepted has none recorded yet, so `async_io` would
    // first wait for the next turn of the I/O driver (behind every other
    // ready task), which cost each flow ~30 µs and a second poll. The
    // bytes stay queued either way, and epoll still reports them, so the
    // wait below sees them if more are needed.
    //
    // This first look needs no buffer of the flow's own: it is over
    // before the task yields, so the thread's buffer serves, and most
    // flows are decided by it (a whole ClientHello, a request line, or
    // bytes of no known protocol).
    let mut seen = 0usize;
    let mut len = SNIFF_FIRST_BUF;
    let first = FIRST_PEEK.with_borrow_mut(|buf| {
        let n = sys::peek(stream, &mut buf[..]).ok()?;
        if n == 0 {
            return Some(None); // closed before sending
        }
        seen = n;
        match sniff::sniff_stream(&buf[..n]) {
            StreamSniff::Done(found) => Some(found),
            StreamSniff::NeedMore => {
                if n == buf.len() {
                    len = (buf.len() * 2).min(MAX_SNIFF_BYTES);
                }
                None
            }
        }
    });
    if let Some(found) = first {
        return found;
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; len];
    loop {
        let peek = stream.async_io(Interest::READABLE, || {
            let n = sys::peek(stream, &mut buf)?;
            // Nothing new since the last look: report WouldBlock so tokio
            // clears the readiness and the wait sleeps until more bytes
            // (or the FIN) arrive, instead of peeking the same bytes in a
            // busy loop. (Readiness that arrived meanwhile is kept.)
            if n == seen && n > 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match tokio::time::timeout_at(deadline, peek).await {
            Ok(Ok(n)) if n > 0 => n,
            // Out of time, closed before sending, or failed: by address.
            _ => return None,
        };
        seen = n;
        match sniff::sniff_stream(&buf[..n]) {
            StreamSniff::Done(found) => return found,
            StreamSniff::NeedMore if n == buf.len() => {
                if buf.len() >= MAX_SNIFF_BYTES {
                    return None;
                }
                buf.resize((buf.len() * 2).min(MAX_SNIFF_BYTES), 0);
            }
            StreamSniff::NeedMore => {}
        }
    }
}

/// Problems with the upstream itself, and running out of descriptors, are
/// worth a warning; a destination that refuses is an ordinary event on
/// the internet.
fn log_connect_failure(
    client: SocketAddr,
    dst: SocketAddr,
    outbound: &dyn std::fmt::Display,
    e: &OutboundError,
) {
    if e.out_of_descriptors() {
        if let Some(held_back) = UPSTREAM_NO_FDS.check() {
            warn!(%client, %dst, %outbound, held_back, "TCP connection reset: no file descriptor left for its upstream side ({e}). Descriptors taken outside the TCP flows' count (UDP sessions, reply sockets) ran out the open-files limit; raise it (LimitNOFILE= in the service unit, ulimit -n) or lower limits.tcp_flows and limits.udp_sessions");
        }
        return;
    }
    match e.failure() {
        // Intended: a rule sent the flow to `block`.
        Failure::Refused => {
            debug!(%client, %dst, %outbound, "TCP connection reset: blocked by rule")
        }
        Failure::DestinationRefused | Failure::DestinationTimeout => {
            debug!(%client, %dst, %outbound, "connect failed: {e}")
        }
        Failure::ProxyTimeout
        | Failure::ProxyFailed
        | Failure::UdpRefused
        | Failure::OutOfDescriptors => {
            if let Some(held_back) = UPSTREAM_FAILED.check() {
                warn!(%client, %dst, %outbound, held_back, "{e}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::socks5::Socks5Error;
    use tokio::io::AsyncWriteExt;

    /// A connected pair over loopback: (client side, accepted side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    }

    const HELLO: &[u8] = include_bytes!("../policy/sniff/testdata/openssl_client_hello.bin");

    fn hello_host() -> Option<String> {
        match sniff::sniff_stream(HELLO) {
            StreamSniff::Done(Some(s)) => s.host,
            other => panic!("the test ClientHello does not sniff: {other:?}"),
        }
    }

    #[tokio::test]
    async fn bytes_already_queued_are_sniffed_without_waiting() {
        let (mut client, accepted) = pair().await;
        client.write_all(HELLO).await.unwrap();
        // Queued before the sniff starts, as from a client that sends at once.
        while sys::peek(&accepted, &mut [0u8; 1]).is_err() {
            tokio::task::yield_now().await;
        }
        let found = sniff_first_bytes(&accepted, Duration::from_secs(10))
            .await
            .expect("sniffed");
        assert_eq!(found.host, hello_host());
        // Still queued for the relay.
        let mut buf = vec![0u8; HELLO.len()];
        assert_eq!(sys::peek(&accepted, &mut buf).unwrap(), HELLO.len());
    }

    #[tokio::test]
    async fn bytes_that_come_in_parts_are_waited_for() {
        let (mut client, accepted) = pair().await;
        let (first, rest) = HELLO.split_at(7);
        client.write_all(first).await.unwrap();
        while sys::peek(&accepted, &mut [0u8; 1]).is_err() {
            tokio::task::yield_now().await;
        }
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(rest).await.unwrap();
            client
        });
        let found = sniff_first_bytes(&accepted, Duration::from_secs(10))
            .await
            .expect("sniffed");
        assert_eq!(found.host, hello_host());
        drop(later.await.unwrap());
    }

    #[tokio::test]
    async fn a_silent_client_is_given_up_on_after_the_wait() {
        let (_client, accepted) = pair().await;
        let started = std::time::Instant::now();
        assert!(sniff_first_bytes(&accepted, Duration::from_millis(100))
            .await
            .is_none());
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    /// The flows' client sides get TCP_NODELAY from the listener, not
    /// from a setsockopt per flow.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let opts = sys::ListenOptions {
            transparent: false,
            recv_orig_dst: false,
            mark: 0,
        };
        let listener = sys::tcp_listener("127.0.0.1:0".parse().unwrap(), opts).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// The connect future lives in every flow's task: the proxies' large
    /// handshake states must stay behind a box inside it.
    #[test]
    fn the_connect_future_stays_small() {
        let direct = crate::outbound::Outbound::Direct(crate::outbound::direct::Direct {
            mark: 0,
            connect_timeout: Duration::from_secs(1),
        });
        let dst: SocketAddr = "198.51.100.10:7".parse().unwrap();
        let connect = direct.connect_tcp(dst, Some("a.example"));
        let size = std::mem::size_of_val(&connect);
        assert!(size <= 1024, "connect_tcp's future is {size} bytes");
    }

    #[test]
    fn descriptor_exhaustion_is_told_apart_from_other_connect_failures() {
        let dst: SocketAddr = "198.51.100.10:7".parse().unwrap();
        let emfile = OutboundError::Connect {
            dst,
            source: io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert!(emfile.out_of_descriptors());
        let socks = OutboundError::Socks5(Socks5Error::Unreachable {
            server: dst,
            source: io::Error::from_raw_os_error(libc::ENFILE),
        });
        assert!(socks.out_of_descriptors());
        let refused = OutboundError::Connect {
            dst,
            source: io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        assert!(!refused.out_of_descriptors());
        assert!(!OutboundError::ConnectTimeout { dst, secs: 1 }.out_of_descriptors());
    }
}
