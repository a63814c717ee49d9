//! A leg's task: opens its upstream (at most a few at a time per
//! outbound, told to the outbound's back-off), sends what was queued for
//! it, passes the replies back to the client, and for a session's first
//! leg keeps the session's idle timeouts, eviction and close.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::aliases::ReplyFrom;
use super::backoff::Permit;
use super::session::{Leg, SessionShared};
use super::{held_back, lock, runnable, Run, UdpRelay, MAX_DATAGRAM};
use crate::outbound::{Outbound, OutboundError, UdpRecv, UdpUpstream, UDP_HEADROOM};
use crate::registry::{EndReason, FlowGuard};
use crate::spares::Spares;

/// A session's receive buffer: the largest datagram, one byte more so a
/// truncation would show, and room for a SOCKS5 header.
const RECV_BUF: usize = MAX_DATAGRAM + UDP_HEADROOM + 1;

/// Receive buffers between uses; see [`Spares`].
static SPARE_BUFFERS: Spares<Box<[u8]>> = Spares::new(16);

/// A receive buffer from the pool, or a new one.
fn take_buffer() -> Box<[u8]> {
    SPARE_BUFFERS
        .take()
        .unwrap_or_else(|| vec![0u8; RECV_BUF].into_boxed_slice())
}

/// The shortest wait between two looks at a session's idle time, so a
/// tiny timeout cannot make its task spin.
const MIN_IDLE_CHECK: Duration = Duration::from_millis(10);

/// A point `wait` from now, or a far one when `now + wait` does not fit
/// (a timeout of `Duration::MAX`): a deadline must never panic.
fn deadline_in(wait: Duration) -> tokio::time::Instant {
    // As tokio's own sleep does for an unrepresentable deadline.
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    let now = tokio::time::Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// Why a session's upstream did not open.
enum OpenFailure {
    /// Another session's open failed while this one waited: back-off.
    BackingOff,
    /// The outbound refuses UDP by design (see [`UdpRelay::refuse`]).
    Refused(OutboundError),
    Failed {
        error: String,
        /// How long new sessions now fail at once.
        backing_off: Duration,
    },
}

/// The registry's reason for how a session's first leg ended.
fn session_end_reason(end: &str) -> EndReason {
    match end {
        "evicted" => EndReason::Evicted,
        "idle-timeout" => EndReason::Idle,
        "closed-by-api" => EndReason::ClosedByApi,
        "backing-off" => EndReason::OpenFailed,
        e if e.starts_with("open-failed") => EndReason::OpenFailed,
        e if e.starts_with("refused") => EndReason::Blocked,
        _ => EndReason::UpstreamError,
    }
}

/// How a leg went, for the session's log line.
#[derive(Default)]
struct Served {
    end: String,
    /// The destination of the first datagram it sent.
    first_dst: Option<SocketAddr>,
    down_bytes: u64,
    down_datagrams: u64,
}

impl UdpRelay {
    /// The shortest of the UDP idle timeouts: the longest a session's task
    /// sleeps before it looks again which timeout applies.
    pub(super) fn idle_check(&self) -> Duration {
        let t = self.timeouts.load();
        t.udp_idle
            .min(t.udp_dns_idle)
            .min(t.udp_unreplied)
            .max(MIN_IDLE_CHECK)
    }

    /// Passes every reply waiting on the upstream (the leg of outbound
    /// key `outbound`) to the client; returns the bytes and datagrams
    /// delivered.
    ///
    /// Replies that arrive back to back from one remote with the same size
    /// (a download) are gathered into runs and sent with UDP segmentation
    /// offload, as the inbound does for uploads.
    async fn forward_replies(
        &self,
        upstream: &UdpUpstream,
        outbound: u32,
        id: u64,
        client: SocketAddr,
        shared: &SessionShared,
    ) -> (u64, u64) {
        // The buffers live only while replies are waiting: an idle session
        // (most of a full table, most of the time) holds none.
        let mut buf = take_buffer();
        let mut run = Run::new(0);
        let mut delivered = (0u64, 0u64);
        // The remote and size of the reply sent last on its own. A reply
        // goes out at once unless it follows one like it: a lone answer
        // (DNS, a game's tick) is never copied or held back, and a burst
        // is gathered from its second datagram on.
        let mut last_alone: Option<(SocketAddr, usize)> = None;
        loop {
            let received = match upstream.try_recv(&mut buf) {
                Ok(UdpRecv::Datagram { from, start, end }) => shared
                    .reply_source(outbound, ReplyFrom::Addr(from))
                    .map(|f| (f, start, end)),
                // A server naming the source by domain: only a fake-ip
                // destination sent by that name can claim it.
                Ok(UdpRecv::Named {
                    name,
                    port,
                    start,
                    end,
                }) => {
                    let named = buf.get(name).unwrap_or_default();
                    let from = shared.reply_source(outbound, ReplyFrom::Name(named, port));
                    if from.is_none() {
                        debug!(%client, port, "UDP reply from a name no destination of the session has; dropped");
                    }
                    from.map(|f| (f, start, end))
                }
                Ok(UdpRecv::Dropped(reason)) => {
                    debug!(%client, "UDP reply dropped: {reason}");
                    None
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors surface here (ECONNREFUSED on a connected
                // socket); the session goes on.
                Err(e) => {
                    debug!(%client, "UDP receive from upstream: {e}");
                    break;
                }
            };
            let Some((from, start, end)) = received else {
                continue;
            };
            shared.touch();
            // The first reply makes the session a live one: the
            // table hears of it once, not per datagram.
            if !shared.replied.load(Ordering::Relaxed)
                && !shared.replied.swap(true, Ordering::Relaxed)
            {
                lock(&self.table).replied(client, id);
            }
            let payload = buf.get(start..end).unwrap_or_default();
            let from = self.dns_reply(client, from, payload);
            if run.extends(from, payload.len()) {
                run.push(payload);
                continue;
            }
            self.send_replies(&mut run, client, &mut delivered).await;
            if last_alone == Some((from, payload.len())) && runnable(payload.len()) {
                run.start(from, payload);
                last_alone = None;
                continue;
            }
            last_alone = Some((from, payload.len()));
            if self.replies.send(from, client, payload, &self.stats).await {
                delivered.0 += payload.len() as u64;
                delivered.1 += 1;
            }
        }
        self.send_replies(&mut run, client, &mut delivered).await;
        SPARE_BUFFERS.give_back(buf);
        delivered
    }

    /// Sends a run of replies to `client` and empties it, adding what was
    /// delivered (bytes, datagrams).
    async fn send_replies(
        &self,
        run: &mut Run<SocketAddr>,
        client: SocketAddr,
        delivered: &mut (u64, u64),
    ) {
        if let Some((from, segment, _, payloads)) = run.parts() {
            let sent = self
                .replies
                .send_run(from, client, payloads, segment, &self.stats)
                .await;
            delivered.0 += (sent * segment).min(payloads.len()) as u64;
            delivered.1 += sent as u64;
        }
        run.clear();
    }

    /// The idle timeout that applies to the session now: the DNS one
    /// while its last datagram went to port 53, and never more than
    /// `udp_unreplied` while nothing ever came back.
    pub(super) fn idle_for(&self, shared: &SessionShared) -> Duration {
        let t = self.timeouts.load();
        let timeout = if shared.last_was_dns.load(Ordering::Relaxed) {
            t.udp_dns_idle
        } else {
            t.udp_idle
        };
        if shared.replied.load(Ordering::Relaxed) {
            timeout
        } else {
            timeout.min(t.udp_unreplied)
        }
    }

    /// How long the session may still sleep before it looks again; `None`
    /// when it has been idle for the timeout that applies now.
    ///
    /// The session ends at its last activity plus that timeout. Which one
    /// applies can change between two looks (the inbound sends datagrams
    /// itself, to port 53 or not), so a look is never further away than
    /// the shortest timeout: a change at some moment is also activity at
    /// that moment, so the next look comes before the new end.
    fn idle_wait(&self, shared: &SessionShared) -> Option<Duration> {
        let timeout = self.idle_for(shared);
        let idle = shared.idle_since();
        if idle >= timeout {
            return None;
        }
        Some((timeout - idle).min(self.idle_check()))
    }

    /// Opens an upstream through outbound `index`, at most
    /// [`OPENING_AT_ONCE`] at a time per outbound, and tells that
    /// outbound's back-off how it went.
    ///
    /// The failure is recorded before the slot is given back, so sessions
    /// waiting for a slot see it and fail at once instead of dialing: a
    /// burst of new ports while the server is down costs about one slot's
    /// worth of dials, however busy the machine.
    async fn open_upstream(
        &self,
        key: u32,
        outbound: &Outbound,
        permit: Permit,
    ) -> Result<UdpUpstream, OpenFailure> {
        let state = self.outbound_state(key);
        // The semaphore is never closed; should it be, open anyway.
        let _slot = state.opening.acquire().await.ok();
        if permit == Permit::Free && state.backoff.failing() {
            return Err(OpenFailure::BackingOff);
        }
        match outbound.open_udp().await {
            Ok(upstream) => {
                state.backoff.opened(permit);
                self.dns_udp_opened(key, outbound.name(), Ok(()));
                Ok(upstream)
            }
            // Not an upstream failure: no back-off. `dispatch` refuses
            // these before a session exists; this covers a group whose
            // member changed in between.
            Err(e) if e.is_refusal() => {
                state.backoff.release(permit);
                Err(OpenFailure::Refused(e))
            }
            Err(e) => {
                self.dns_udp_opened(key, outbound.name(), Err(&e));
                let error = e.to_string();
                let backing_off = state.backoff.failed(permit, Instant::now(), &error);
                Err(OpenFailure::Failed { error, backing_off })
            }
        }
    }

    /// Sends what waits in `leg`'s queue, oldest first.
    async fn send_queued(
        &self,
        client: SocketAddr,
        outbound: &Outbound,
        shared: &SessionShared,
        leg: &Leg,
        upstream: &UdpUpstream,
        first_dst: &mut Option<SocketAddr>,
    ) {
        while let Some(mut p) = leg.dequeue() {
            first_dst.get_or_insert(p.dst);
            let len = p.buf.len() - UDP_HEADROOM;
            match upstream.send_to(&mut p.buf, p.dst, p.name.as_deref()).await {
                Ok(()) => shared.sent_up(len, p.dst),
                Err(e) => self.report_send_error(client, p.dst, len, outbound.name(), upstream, &e),
            }
            leg.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Opens `leg`'s upstream and carries its datagrams both ways until it
    /// ends. The session's task (`main`) serves the first leg and also
    /// ends on eviction and the idle timeouts, which are the session's as
    /// a whole; an extra leg's task ends when its queue closes (the
    /// session ended) or its upstream does.
    #[allow(clippy::too_many_arguments)]
    async fn serve_leg(
        &self,
        id: u64,
        client: SocketAddr,
        outbound: &Outbound,
        shared: &SessionShared,
        leg: &Leg,
        permit: Permit,
        main: bool,
    ) -> Served {
        let name = outbound.name();
        let mut served = Served::default();
        let stopped = async {
            if main {
                tokio::select! {
                    () = shared.evicted.notified() => {}
                    _ = shared.flow.close_requested() => {}
                }
            } else {
                // Wake-ups for datagrams queued meanwhile come here too;
                // they are sent once the upstream is open.
                while !leg.is_closed() {
                    leg.queue_ready.notified().await;
                }
            }
        };
        // Boxed so the opening state (a SOCKS5 handshake) is freed once
        // open instead of sizing every session's task for its whole life.
        // An eviction during the handshake ends it there.
        let opened = tokio::select! {
            r = Box::pin(self.open_upstream(leg.outbound, outbound, permit)) => Some(r),
            () = stopped => None,
        };
        served.end = match opened {
            None => {
                // Ended before the outbound's verdict: another may retry.
                self.outbound_state(leg.outbound).backoff.release(permit);
                if main { "evicted" } else { "session-ended" }.to_string()
            }
            Some(Err(OpenFailure::BackingOff)) => {
                // Admitted just before another session's failure came in.
                let lost = leg.close_queue() as u64;
                self.stats
                    .datagrams_dropped_backoff
                    .fetch_add(lost, Ordering::Relaxed);
                "backing-off".to_string()
            }
            Some(Err(OpenFailure::Refused(e))) => {
                let lost = leg.close_queue();
                self.stats
                    .datagrams_refused
                    .fetch_add(lost as u64, Ordering::Relaxed);
                if matches!(e, OutboundError::Blocked) {
                    debug!(%client, outbound = name, dropped = lost, "UDP session dropped: blocked by rule");
                } else if let Some(n) = self.warnings.tcp_only.check() {
                    warn!(%client, outbound = name, dropped = lost, "UDP datagrams dropped: {e}{}", held_back(n));
                }
                format!("refused: {e}")
            }
            Some(Err(OpenFailure::Failed { error, backing_off })) => {
                // Count what was queued so nothing is lost silently.
                let lost = leg.close_queue();
                self.stats
                    .sessions_open_failed
                    .fetch_add(1, Ordering::Relaxed);
                self.stats
                    .datagrams_dropped_queue
                    .fetch_add(lost as u64, Ordering::Relaxed);
                if let Some(n) = self.warnings.open_failed.check() {
                    warn!(
                        %client, outbound = name, dropped = lost,
                        "UDP session failed to open{}: {error}; new sessions through {name} fail at once for the next {} ms{}",
                        if main { String::new() } else { format!(" its {name} upstream (its others go on)") },
                        backing_off.as_millis(), held_back(n)
                    );
                }
                format!("open-failed: {error}")
            }
            Some(Ok(upstream)) => {
                debug!(proto = "udp", %client, outbound = name, "session open");
                let upstream = Arc::new(upstream);
                let _ = leg.upstream.set(Arc::clone(&upstream));
                let deadline = tokio::time::sleep_until(deadline_in(self.idle_check()));
                tokio::pin!(deadline);
                // What was queued while the upstream opened (an extra
                // leg's wake-ups for it went to the wait above).
                self.send_queued(
                    client,
                    outbound,
                    shared,
                    leg,
                    &upstream,
                    &mut served.first_dst,
                )
                .await;
                loop {
                    tokio::select! {
                        () = leg.queue_ready.notified() => {
                            self.send_queued(client, outbound, shared, leg, &upstream, &mut served.first_dst).await;
                            if !main && leg.is_closed() {
                                break "session-ended".to_string();
                            }
                        }
                        r = upstream.readable() => {
                            if let Err(e) = r {
                                debug!(%client, "UDP upstream socket: {e}");
                                continue;
                            }
                            // Boxed: its buffers and sends exist only while
                            // replies flow, not in every idle session's task.
                            let (bytes, datagrams) =
                                Box::pin(self.forward_replies(&upstream, leg.outbound, id, client, shared)).await;
                            served.down_bytes += bytes;
                            shared.flow.traffic.add_down(bytes);
                            served.down_datagrams += datagrams;
                        }
                        reason = upstream.closed() => {
                            if main {
                                info!(%client, outbound = name, "UDP session ended: {reason}");
                            } else {
                                info!(%client, outbound = name, "UDP session's {name} upstream ended (its others go on): {reason}");
                            }
                            break reason;
                        }
                        () = shared.evicted.notified(), if main => break "evicted".to_string(),
                        _ = shared.flow.close_requested(), if main => break "closed-by-api".to_string(),
                        _ = &mut deadline, if main => match self.idle_wait(shared) {
                            None => break "idle-timeout".to_string(),
                            // Datagrams the inbound sent itself count as
                            // activity too: sleep on until the real end.
                            Some(wait) => deadline.as_mut().reset(deadline_in(wait)),
                        },
                    }
                }
            }
        };
        served
    }

    /// Closes a leg's queue as its task ends, counting what was left.
    /// Closed before the leg is forgotten: a datagram that comes now is
    /// refused and starts a fresh leg (or session) instead of waiting
    /// here for ever.
    fn close_leg(&self, client: SocketAddr, leg: &Leg) {
        let left = leg.close_queue();
        if left > 0 {
            self.stats
                .datagrams_dropped_queue
                .fetch_add(left as u64, Ordering::Relaxed);
            debug!(%client, dropped = left, "UDP session ended with datagrams queued");
        }
    }

    /// The task of a session: serves its first leg, and when the session
    /// ends, ends its other legs too.
    pub(super) async fn run_session(
        self: Arc<Self>,
        id: u64,
        client: SocketAddr,
        outbound: Arc<Outbound>,
        shared: Arc<SessionShared>,
        permit: Permit,
        flow: FlowGuard,
    ) {
        let served = self
            .serve_leg(id, client, &outbound, &shared, &shared.first, permit, true)
            .await;
        // The extra legs first: once they are closed, a datagram for a new
        // outbound of this client finds no session to add a leg to, and
        // starts a fresh one. Their tasks stop and close their upstreams.
        let left = shared.close_extra_legs();
        if left > 0 {
            self.stats
                .datagrams_dropped_queue
                .fetch_add(left as u64, Ordering::Relaxed);
        }
        self.close_leg(client, &shared.first);
        lock(&self.table).remove_if(client, id);
        // The upstream socket (and a SOCKS5 association's control
        // connection) closes as this task ends: the table no longer holds
        // `shared`, and the inbound holds it only during a send.
        flow.end(session_end_reason(&served.end), Some(&served.end));
    }

    /// The task of a session's extra leg (a second outbound's upstream).
    pub(super) async fn run_leg(
        self: Arc<Self>,
        id: u64,
        client: SocketAddr,
        outbound: Arc<Outbound>,
        shared: Arc<SessionShared>,
        leg: Arc<Leg>,
        permit: Permit,
    ) {
        let started = Instant::now();
        let served = self
            .serve_leg(id, client, &outbound, &shared, &leg, permit, false)
            .await;
        self.close_leg(client, &leg);
        shared.remove_leg(&leg);
        // The session's counters going up are shared by its legs; the
        // session's own line has them.
        debug!(
            proto = "udp",
            %client,
            dst = %served.first_dst.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
            outbound = outbound.name(),
            down_bytes = served.down_bytes, down_datagrams = served.down_datagrams,
            duration_ms = started.elapsed().as_millis() as u64,
            end = %served.end,
            "flow leg"
        );
    }
}
