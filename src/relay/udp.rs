//! UDP sessions, full cone.
//!
//! A session is keyed by the client's source address:port alone, not by
//! (source, destination): one upstream socket or SOCKS5 association then
//! serves every destination of that client, and a datagram from *any*
//! remote that reaches the association is passed back to the client. That
//! is endpoint-independent mapping, the "open NAT" games and consoles ask
//! for.
//!
//! Replies must reach the client from the remote's own address:port, so
//! they leave through a transparent socket bound to that remote
//! ([`ReplySockets`]); the sockets are cached, bounded and expire when
//! idle.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::{Limits, Timeouts};
use crate::outbound::{Outbound, UdpRecv, UDP_HEADROOM};
use crate::route::{Decision, Protocol, Router};
use crate::sys;

/// Largest UDP payload (65535 − 8 UDP − 20 IPv4 header).
pub const MAX_DATAGRAM: usize = 65_507;

/// Datagrams queued for one session while its upstream is slow or still
/// being set up (a SOCKS5 handshake); beyond that they are dropped and
/// counted, as a congested link would.
const SESSION_QUEUE: usize = 256;

/// A datagram on its way upstream: `buf[UDP_HEADROOM..]` is the payload.
#[derive(Debug)]
pub struct Packet {
    pub buf: Vec<u8>,
    pub dst: SocketAddr,
}

struct SessionEntry {
    id: u64,
    tx: mpsc::Sender<Packet>,
}

/// Counters worth logging and, later, exporting.
#[derive(Debug, Default)]
pub struct UdpStats {
    pub sessions_refused_full: AtomicU64,
    pub datagrams_dropped_queue: AtomicU64,
    pub replies_dropped_bind: AtomicU64,
}

/// The session table and the reply sockets of one UDP listener.
pub struct UdpRelay {
    router: Router,
    timeouts: Timeouts,
    limits: Limits,
    sessions: Mutex<HashMap<SocketAddr, SessionEntry>>,
    next_id: AtomicU64,
    pub replies: ReplySockets,
    pub stats: UdpStats,
    /// Last time a "table full" warning was logged, so a flood of new
    /// client ports produces one line a few seconds, not one per datagram.
    last_full_warning: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps inconsistent in
    // a way that matters more than stopping UDP for every client would.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl UdpRelay {
    pub fn new(router: Router, timeouts: Timeouts, limits: Limits, mark: u32) -> Arc<Self> {
        Arc::new(UdpRelay {
            router,
            timeouts,
            limits,
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            replies: ReplySockets::new(limits.udp_reply_sockets, mark),
            stats: UdpStats::default(),
            last_full_warning: Mutex::new(None),
        })
    }

    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Hands one datagram from `client` to `dst` to its session, creating
    /// the session when this client has none.
    pub fn dispatch(self: &Arc<Self>, client: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let outbound = match self.router.decide(Protocol::Udp, dst) {
            Decision::Forward(outbound) => outbound,
            Decision::RefuseLoop => {
                warn!(%client, %dst, "refused UDP datagram addressed to tproxyd's own listener (routing loop); check that the rules skip tproxyd's mark");
                return;
            }
        };
        let mut buf = Vec::with_capacity(UDP_HEADROOM + payload.len());
        buf.resize(UDP_HEADROOM, 0);
        buf.extend_from_slice(payload);
        let mut packet = Packet { buf, dst };

        let mut sessions = lock(&self.sessions);
        if let Some(entry) = sessions.get(&client) {
            match entry.tx.try_send(packet) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.stats
                        .datagrams_dropped_queue
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(%client, %dst, "UDP session queue full; datagram dropped");
                    return;
                }
                // The session is ending; start a fresh one below.
                Err(mpsc::error::TrySendError::Closed(p)) => {
                    sessions.remove(&client);
                    packet = p;
                }
            }
        }
        if sessions.len() >= self.limits.udp_sessions {
            drop(sessions);
            self.stats
                .sessions_refused_full
                .fetch_add(1, Ordering::Relaxed);
            self.warn_table_full(client);
            return;
        }
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        // A fresh channel has room for one.
        let _ = tx.try_send(packet);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        sessions.insert(client, SessionEntry { id, tx });
        drop(sessions);
        tokio::spawn(Arc::clone(self).run_session(id, client, outbound, rx));
    }

    fn warn_table_full(&self, client: SocketAddr) {
        let mut last = lock(&self.last_full_warning);
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            *last = Some(Instant::now());
            warn!(
                %client,
                limit = self.limits.udp_sessions,
                refused = self.stats.sessions_refused_full.load(Ordering::Relaxed),
                "UDP session table full; new clients are refused until sessions expire (raise limits.udp_sessions if this is normal load)"
            );
        }
    }

    fn idle_for(&self, last_dst: SocketAddr) -> Duration {
        if last_dst.port() == 53 {
            self.timeouts.udp_dns_idle
        } else {
            self.timeouts.udp_idle
        }
    }

    async fn run_session(
        self: Arc<Self>,
        id: u64,
        client: SocketAddr,
        outbound: Arc<Outbound>,
        mut rx: mpsc::Receiver<Packet>,
    ) {
        let started = Instant::now();
        let outbound_name = outbound.name();
        let mut first_dst = None;
        let (mut up_bytes, mut down_bytes, mut up_n, mut down_n) = (0u64, 0u64, 0u64, 0u64);

        let end = match outbound.open_udp().await {
            Err(e) => {
                // Count what was queued so nothing is lost silently.
                rx.close();
                let mut lost = 0;
                while rx.try_recv().is_ok() {
                    lost += 1;
                }
                warn!(%client, outbound = outbound_name, dropped = lost, "UDP session failed to open: {e}");
                format!("open-failed: {e}")
            }
            Ok(upstream) => {
                debug!(proto = "udp", %client, outbound = outbound_name, "session open");
                let mut buf = vec![0u8; UDP_HEADROOM + MAX_DATAGRAM + 1];
                let mut idle = self.timeouts.udp_idle;
                let deadline = tokio::time::sleep(idle);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        packet = rx.recv() => {
                            let Some(mut p) = packet else { break "closed".to_string() };
                            first_dst.get_or_insert(p.dst);
                            let len = p.buf.len() - UDP_HEADROOM;
                            match upstream.send(&mut p.buf, p.dst).await {
                                Ok(()) => { up_bytes += len as u64; up_n += 1; }
                                // Too large for the outbound (SOCKS5 adds a
                                // header to a datagram that may already be at
                                // the IPv4 maximum): the sender should know.
                                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => warn!(
                                    %client, dst = %p.dst,
                                    "UDP datagram of {len} bytes does not fit the {outbound_name} outbound ({e}); dropped. Through SOCKS5 the largest is 65497 bytes to an IPv4 destination and 65485 to IPv6 (the header adds 10 or 22 bytes)"
                                ),
                                Err(e) => debug!(%client, dst = %p.dst, "UDP send upstream failed: {e}"),
                            }
                            idle = self.idle_for(p.dst);
                            deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                        }
                        r = upstream.recv(&mut buf) => match r {
                            Ok(UdpRecv::Datagram { from, start, end }) => {
                                if self.replies.send(from, client, &buf[start..end], &self.stats).await {
                                    down_bytes += (end - start) as u64;
                                    down_n += 1;
                                }
                                deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                            }
                            Ok(UdpRecv::Dropped(reason)) => debug!(%client, "UDP reply dropped: {reason}"),
                            // ICMP errors surface here (ECONNREFUSED on a
                            // connected socket); the session goes on.
                            Err(e) => debug!(%client, "UDP receive from upstream: {e}"),
                        },
                        reason = upstream.closed() => {
                            info!(%client, "UDP session ended: {reason}");
                            break reason;
                        }
                        _ = &mut deadline => break "idle-timeout".to_string(),
                    }
                }
            }
        };

        {
            let mut sessions = lock(&self.sessions);
            if sessions.get(&client).is_some_and(|e| e.id == id) {
                sessions.remove(&client);
            }
        }
        debug!(
            proto = "udp",
            %client,
            dst = %first_dst.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
            outbound = outbound_name,
            up_bytes, down_bytes, up_datagrams = up_n, down_datagrams = down_n,
            duration_ms = started.elapsed().as_millis() as u64,
            end = %end,
            "flow"
        );
    }
}

enum ReplyEntry {
    Ready {
        socket: Arc<UdpSocket>,
        last_used: Instant,
    },
    /// Binding failed (EADDRINUSE: a local service owns the address);
    /// remembered so the warning is not repeated for every datagram.
    Failed { since: Instant },
}

/// Transparent sockets bound to remote addresses, for sending replies that
/// carry the remote's address as their source. Bounded: the least recently
/// used socket is closed when a new one is needed and the cache is full.
pub struct ReplySockets {
    cap: usize,
    mark: u32,
    map: Mutex<HashMap<SocketAddr, ReplyEntry>>,
}

/// How long a failed bind is remembered before it is tried again.
const BIND_RETRY: Duration = Duration::from_secs(30);

impl ReplySockets {
    pub fn new(cap: usize, mark: u32) -> Self {
        ReplySockets {
            cap,
            mark,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.map)
            .values()
            .filter(|e| matches!(e, ReplyEntry::Ready { .. }))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn socket_for(&self, from: SocketAddr, stats: &UdpStats) -> Option<Arc<UdpSocket>> {
        let mut map = lock(&self.map);
        let now = Instant::now();
        match map.get_mut(&from) {
            Some(ReplyEntry::Ready { socket, last_used }) => {
                *last_used = now;
                return Some(Arc::clone(socket));
            }
            Some(ReplyEntry::Failed { since }) if since.elapsed() < BIND_RETRY => {
                stats.replies_dropped_bind.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            _ => {}
        }
        if map.len() >= self.cap {
            evict_oldest(&mut map);
        }
        let made = sys::reply_socket(from, self.mark).and_then(UdpSocket::from_std);
        match made {
            Ok(socket) => {
                let socket = Arc::new(socket);
                map.insert(
                    from,
                    ReplyEntry::Ready {
                        socket: Arc::clone(&socket),
                        last_used: now,
                    },
                );
                Some(socket)
            }
            Err(e) => {
                stats.replies_dropped_bind.fetch_add(1, Ordering::Relaxed);
                map.insert(from, ReplyEntry::Failed { since: now });
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    warn!(remote = %from, "cannot send UDP replies from {from}: a local service already uses that address and port (EADDRINUSE); replies from it are dropped. Exclude this destination from capture in the firewall rules.");
                } else {
                    warn!(remote = %from, "cannot open a reply socket bound to {from}: {e}; replies from it are dropped");
                }
                None
            }
        }
    }

    /// Sends `payload` to `client` from `from`. Returns whether it was sent.
    pub async fn send(
        &self,
        from: SocketAddr,
        client: SocketAddr,
        payload: &[u8],
        stats: &UdpStats,
    ) -> bool {
        if from.is_ipv4() != client.is_ipv4() {
            debug!(%from, %client, "UDP reply across address families cannot be delivered; dropped");
            return false;
        }
        let Some(socket) = self.socket_for(from, stats) else {
            return false;
        };
        match socket.send_to(payload, client).await {
            Ok(_) => true,
            Err(e) => {
                debug!(%from, %client, "UDP reply send failed: {e}");
                false
            }
        }
    }

    /// Closes sockets unused for `idle`; run periodically.
    pub fn expire(&self, idle: Duration) -> usize {
        let mut map = lock(&self.map);
        let before = map.len();
        map.retain(|_, e| match e {
            ReplyEntry::Ready { last_used, .. } => last_used.elapsed() < idle,
            ReplyEntry::Failed { since } => since.elapsed() < BIND_RETRY,
        });
        before - map.len()
    }
}

fn evict_oldest(map: &mut HashMap<SocketAddr, ReplyEntry>) {
    let oldest = map
        .iter()
        .min_by_key(|(_, e)| match e {
            // Failed entries go first: they hold no socket worth keeping.
            ReplyEntry::Failed { .. } => None,
            ReplyEntry::Ready { last_used, .. } => Some(*last_used),
        })
        .map(|(k, _)| *k);
    if let Some(k) = oldest {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_prefers_failed_then_least_recently_used() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut map = HashMap::new();
            let t0 = Instant::now();
            let sock = || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                Arc::new(UdpSocket::from_std(s).unwrap())
            };
            let a: SocketAddr = "198.51.100.1:1".parse().unwrap();
            let b: SocketAddr = "198.51.100.2:1".parse().unwrap();
            let c: SocketAddr = "198.51.100.3:1".parse().unwrap();
            map.insert(
                a,
                ReplyEntry::Ready {
                    socket: sock(),
                    last_used: t0 + Duration::from_millis(5),
                },
            );
            map.insert(
                b,
                ReplyEntry::Ready {
                    socket: sock(),
                    last_used: t0,
                },
            );
            map.insert(
                c,
                ReplyEntry::Failed {
                    since: t0 + Duration::from_millis(9),
                },
            );
            evict_oldest(&mut map);
            assert!(!map.contains_key(&c));
            evict_oldest(&mut map);
            assert!(!map.contains_key(&b));
            assert!(map.contains_key(&a));
        });
    }

    fn relay_with(limit: usize) -> Arc<UdpRelay> {
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            tcp_idle: Duration::from_secs(1),
            udp_idle: Duration::from_secs(60),
            udp_dns_idle: Duration::from_secs(10),
        };
        let limits = Limits {
            udp_sessions: limit,
            udp_reply_sockets: 4,
        };
        let outbound = Outbound::Direct {
            mark: 0,
            connect_timeout: Duration::from_secs(1),
        };
        let router = Router::new("127.0.0.1:1090".parse().unwrap(), outbound);
        UdpRelay::new(router, timeouts, limits, 0)
    }

    #[tokio::test]
    async fn session_table_stays_bounded_under_a_flood_of_client_ports() {
        let relay = relay_with(3);
        // A loopback sink so the direct sessions send somewhere harmless.
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = sink.local_addr().unwrap();
        for port in 40000..40010u16 {
            let client: SocketAddr = ([127, 0, 0, 1], port).into();
            relay.dispatch(client, dst, b"x");
        }
        assert_eq!(relay.session_count(), 3);
        assert_eq!(relay.stats.sessions_refused_full.load(Ordering::Relaxed), 7);
        // A known client keeps its session: no new slot needed.
        relay.dispatch(([127, 0, 0, 1], 40000).into(), dst, b"y");
        assert_eq!(relay.stats.sessions_refused_full.load(Ordering::Relaxed), 7);
    }

    #[tokio::test]
    async fn flows_to_the_listener_never_get_a_session() {
        let relay = relay_with(3);
        relay.dispatch(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:1090".parse().unwrap(),
            b"loop",
        );
        assert_eq!(relay.session_count(), 0);
    }

    #[tokio::test]
    async fn dns_sessions_idle_out_sooner() {
        let relay = relay_with(1);
        assert_eq!(
            relay.idle_for("198.51.100.1:53".parse().unwrap()),
            Duration::from_secs(10)
        );
        assert_eq!(
            relay.idle_for("198.51.100.1:443".parse().unwrap()),
            Duration::from_secs(60)
        );
    }

    /// Replies leave from the remote's own address; an address a local
    /// service holds (EADDRINUSE) costs that reply, with a count and a
    /// warning, never the process. Needs CAP_NET_ADMIN for IP_TRANSPARENT.
    #[tokio::test]
    async fn reply_sockets_send_from_the_remote_and_survive_eaddrinuse() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "needs root under CI");
            return;
        }
        let stats = UdpStats::default();
        let replies = ReplySockets::new(4, 0);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let client_addr = client.local_addr().unwrap();

        // 127.0.0.2 is loopback too: stands in for a remote host.
        let remote: SocketAddr = "127.0.0.2:45053".parse().unwrap();
        assert!(
            replies
                .send(remote, client_addr, b"from remote", &stats)
                .await
        );
        let mut buf = [0u8; 64];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"from remote"[..], remote));
        assert_eq!(replies.len(), 1);

        // A local service owns this address without SO_REUSEADDR.
        let service = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken = service.local_addr().unwrap();
        assert!(!replies.send(taken, client_addr, b"x", &stats).await);
        assert!(!replies.send(taken, client_addr, b"x", &stats).await);
        assert_eq!(stats.replies_dropped_bind.load(Ordering::Relaxed), 2);
        assert_eq!(replies.len(), 1, "the failed address holds no socket");
        assert_eq!(replies.expire(Duration::ZERO), 1, "idle sockets expire");
    }
}
