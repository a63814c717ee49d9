//! Reply sockets: transparent sockets bound to remote addresses, so a
//! reply reaches the client from the address:port it wrote to.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::runs::{refuse_segments, SEGMENTS_REFUSED};
use super::{lock, UdpStats};
use crate::ratelimit::held_back;
use crate::ratelimit::{RateLimit, WARN_INTERVAL};
use crate::sys;

pub(super) enum ReplyEntry {
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
                // Once per remote and retry interval, but a flood of
                // remotes (or EMFILE) would still make it one per packet.
                static IN_USE: RateLimit = RateLimit::new(WARN_INTERVAL);
                static FAILED: RateLimit = RateLimit::new(WARN_INTERVAL);
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    if let Some(n) = IN_USE.check() {
                        warn!(remote = %from, "cannot send UDP replies from {from}: a local service already uses that address and port (EADDRINUSE); replies from it are dropped. Exclude this destination from capture in the firewall rules.{}", held_back(n));
                    }
                } else if let Some(n) = FAILED.check() {
                    warn!(remote = %from, "cannot open a reply socket bound to {from}: {e}; replies from it are dropped{}", held_back(n));
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
        // Every session's task is sized for the largest state it can wait
        // in; waiting for room in a full socket buffer is rare, so that
        // state is boxed and the common case waits in nothing at all.
        let sent = match socket.try_send_to(payload, client) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Box::pin(async {
                    loop {
                        socket.writable().await?;
                        match socket.try_send_to(payload, client) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            other => return other,
                        }
                    }
                })
                .await
            }
            other => other,
        };
        match sent {
            Ok(_) => true,
            Err(e) => {
                debug!(%from, %client, "UDP reply send failed: {e}");
                false
            }
        }
    }

    /// Sends a run of replies from `from` to `client`: `payloads` holds
    /// them back to back, `segment` bytes each (the last may be shorter).
    /// One call with UDP segmentation offload where the kernel takes it,
    /// else one by one. Returns how many were delivered.
    pub async fn send_run(
        &self,
        from: SocketAddr,
        client: SocketAddr,
        payloads: &[u8],
        segment: usize,
        stats: &UdpStats,
    ) -> usize {
        let segment = segment.max(1);
        let count = payloads.len().div_ceil(segment);
        let segmentable = count > 1
            && from.is_ipv4() == client.is_ipv4()
            && !SEGMENTS_REFUSED.load(Ordering::Relaxed);
        if segmentable {
            if let Some(socket) = self.socket_for(from, stats) {
                let sent = socket.try_io(Interest::WRITABLE, || {
                    sys::send_segments(&*socket, payloads, segment, Some(client))
                });
                match sent {
                    Ok(_) => {
                        stats
                            .replies_segmented
                            .fetch_add(count as u64, Ordering::Relaxed);
                        return count;
                    }
                    Err(e) if sys::segments_unsupported(&e) => refuse_segments(&e),
                    // A full buffer (the sends below wait for room) or a
                    // run this route cannot segment.
                    Err(_) => {}
                }
            }
        }
        let mut delivered = 0;
        for payload in payloads.chunks(segment) {
            if self.send(from, client, payload, stats).await {
                delivered += 1;
            }
        }
        delivered
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

pub(super) fn evict_oldest(map: &mut HashMap<SocketAddr, ReplyEntry>) {
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

    /// Reply sockets (they need CAP_NET_ADMIN for IP_TRANSPARENT; without
    /// it the test is skipped, except under CI where that fails), and a
    /// loopback client that waits up to 2 s for each reply.
    fn reply_bed() -> Option<(UdpStats, ReplySockets, std::net::UdpSocket, SocketAddr)> {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "needs root under CI");
            return None;
        }
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let client_addr = client.local_addr().unwrap();
        Some((
            UdpStats::default(),
            ReplySockets::new(4, 0),
            client,
            client_addr,
        ))
    }

    /// Replies leave from the remote's own address; an address a local
    /// service holds (EADDRINUSE) costs that reply, with a count and a
    /// warning, never the process. Needs CAP_NET_ADMIN for IP_TRANSPARENT.
    #[tokio::test]
    async fn reply_sockets_send_from_the_remote_and_survive_eaddrinuse() {
        let Some((stats, replies, client, client_addr)) = reply_bed() else {
            return;
        };

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

    /// A run of replies reaches the client as its datagrams, in order and
    /// from the remote's address, whether the kernel segments it (4 of 3
    /// bytes) or refuses and it goes one by one (200 of 1 byte: more
    /// segments than one call may carry). Needs CAP_NET_ADMIN.
    #[tokio::test]
    async fn reply_runs_arrive_as_their_datagrams_from_the_remote() {
        let Some((stats, replies, client, client_addr)) = reply_bed() else {
            return;
        };
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        let remote: SocketAddr = "127.0.0.2:45054".parse().unwrap();
        let mut buf = [0u8; 64];

        // A fresh reply socket is not yet known to be writable, so its
        // first run goes one by one; the next is segmented.
        for segmented in [0, 4] {
            let sent = replies
                .send_run(remote, client_addr, b"aaabbbcccddd", 3, &stats)
                .await;
            assert_eq!(sent, 4);
            for want in [b"aaa", b"bbb", b"ccc", b"ddd"] {
                let (n, from) = client.recv_from(&mut buf).unwrap();
                assert_eq!((&buf[..n], from), (&want[..], remote));
            }
            assert_eq!(stats.replies_segmented.load(Ordering::Relaxed), segmented);
        }

        let many: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        let sent = replies
            .send_run(remote, client_addr, &many, 1, &stats)
            .await;
        assert_eq!(sent, 200);
        for i in 0..200u32 {
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&[i as u8][..], remote), "reply {i}");
        }
        assert_eq!(stats.replies_segmented.load(Ordering::Relaxed), 4);
    }
}
