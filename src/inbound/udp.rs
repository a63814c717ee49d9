//! The UDP inbound (TPROXY only): read each datagram with its original
//! destination and hand it to the session table.
//!
//! Datagrams that arrive back to back from one client to one destination
//! with the same size (a bulk transfer: a file over QUIC, a video call)
//! are gathered into a run and sent upstream in one call with UDP
//! segmentation offload; the kernel then walks its output path once per
//! run instead of once per datagram. A run ends when the socket has
//! nothing more to read, so no datagram waits for later ones.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::outbound::UDP_HEADROOM;
use crate::relay::udp::{run_has_room, runnable, UdpRelay, MAX_DATAGRAM};
use crate::sys::{self, Datagram, RecvError};

/// Reads until the task is dropped.
pub async fn serve(socket: UdpSocket, relay: Arc<UdpRelay>) {
    // One byte more than the largest datagram, so MSG_TRUNC can only mean
    // something is wrong (it never is for UDP over IP, but we check).
    let mut buf = vec![0u8; UDP_HEADROOM + MAX_DATAGRAM + 1];
    let mut cmsg = [0u8; sys::CMSG_SPACE];
    let mut run = Run::new();
    // Where a run through SOCKS5 is laid out again with its headers.
    let mut scratch = Vec::new();
    let mut last_warning: Option<Instant> = None;
    let mut recv = |buf: &mut [u8]| match sys::recv_with_orig_dst(&socket, buf, &mut cmsg) {
        Err(RecvError::Io(e)) => Err(e),
        other => Ok(other),
    };
    loop {
        let got = if run.is_empty() {
            socket
                .async_io(Interest::READABLE, || recv(&mut buf[UDP_HEADROOM..]))
                .await
        } else {
            match socket.try_io(Interest::READABLE, || recv(&mut buf[UDP_HEADROOM..])) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    run.flush(&relay, &mut scratch);
                    // try_io spends no task budget: give other tasks (the
                    // replies, TCP flows) their turn between runs.
                    tokio::task::consume_budget().await;
                    continue;
                }
                other => other,
            }
        };
        match got {
            Ok(Ok(d)) => {
                let payload = &buf[UDP_HEADROOM..UDP_HEADROOM + d.len];
                if run.extends(&d) {
                    run.push(payload);
                    continue;
                }
                run.flush(&relay, &mut scratch);
                if runnable(d.len) {
                    run.start(&d, payload);
                } else {
                    relay.dispatch(d.src, d.orig_dst, &mut buf[..UDP_HEADROOM + d.len]);
                }
            }
            Ok(Err(e @ RecvError::NoOrigDst { .. })) => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    last_warning = Some(Instant::now());
                    warn!("{e}");
                }
            }
            Ok(Err(e)) => debug!("UDP datagram dropped: {e}"),
            Err(e) => {
                run.flush(&relay, &mut scratch);
                // ICMP errors queued on the socket and the like: not fatal.
                if e.kind() != io::ErrorKind::Interrupted {
                    debug!("UDP receive: {e}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}

/// Datagrams read back to back from one client to one destination, all
/// the same size, not yet handed on.
struct Run {
    client: SocketAddr,
    dst: SocketAddr,
    segment: usize,
    count: usize,
    /// `UDP_HEADROOM` bytes, then the payloads one after another.
    buf: Vec<u8>,
}

impl Run {
    fn new() -> Self {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        Run {
            client: unspecified,
            dst: unspecified,
            segment: 0,
            count: 0,
            buf: vec![0; UDP_HEADROOM],
        }
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether `d` may join this run.
    fn extends(&self, d: &Datagram) -> bool {
        self.count > 0
            && d.src == self.client
            && d.orig_dst == self.dst
            && d.len == self.segment
            && run_has_room(self.count, self.segment)
    }

    fn start(&mut self, d: &Datagram, payload: &[u8]) {
        self.client = d.src;
        self.dst = d.orig_dst;
        self.segment = d.len;
        self.push(payload);
    }

    fn push(&mut self, payload: &[u8]) {
        self.buf.extend_from_slice(payload);
        self.count += 1;
    }

    fn flush(&mut self, relay: &Arc<UdpRelay>, scratch: &mut Vec<u8>) {
        if self.count == 0 {
            return;
        }
        if self.count == 1 {
            relay.dispatch(self.client, self.dst, &mut self.buf);
        } else {
            relay.dispatch_run(self.client, self.dst, &mut self.buf, self.segment, scratch);
        }
        self.buf.truncate(UDP_HEADROOM);
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::udp::{MAX_RUN_BYTES, MAX_RUN_DATAGRAMS, MAX_RUN_SEGMENT};

    fn datagram(src: &str, dst: &str, len: usize) -> Datagram {
        Datagram {
            len,
            src: src.parse().unwrap(),
            orig_dst: dst.parse().unwrap(),
        }
    }

    #[test]
    fn a_run_takes_only_same_size_datagrams_of_one_client_to_one_destination() {
        let (client, dst) = ("192.0.2.2:5000", "198.51.100.10:443");
        let mut run = Run::new();
        let first = datagram(client, dst, 1200);
        assert!(
            !run.extends(&first),
            "an empty run starts, it is not extended"
        );
        run.start(&first, &[1; 1200]);
        assert!(run.extends(&datagram(client, dst, 1200)));
        assert!(!run.extends(&datagram("192.0.2.2:5001", dst, 1200)));
        assert!(!run.extends(&datagram(client, "198.51.100.10:444", 1200)));
        assert!(!run.extends(&datagram(client, dst, 1199)));
        assert!(!run.extends(&datagram(client, dst, 1201)));
    }

    #[test]
    fn a_run_stops_at_the_kernels_limits() {
        let (client, dst) = ("192.0.2.2:5000", "198.51.100.10:443");
        // Small datagrams: the segment count is the limit.
        let mut run = Run::new();
        let small = datagram(client, dst, 100);
        run.start(&small, &[0; 100]);
        while run.extends(&small) {
            run.push(&[0; 100]);
        }
        assert_eq!(run.count, MAX_RUN_DATAGRAMS);
        // Large ones: the bytes, SOCKS5 headers counted, are.
        let mut run = Run::new();
        let large = datagram(client, dst, MAX_RUN_SEGMENT);
        run.start(&large, &[0; MAX_RUN_SEGMENT]);
        while run.extends(&large) {
            run.push(&[0; MAX_RUN_SEGMENT]);
        }
        assert_eq!(run.count, MAX_RUN_BYTES / (MAX_RUN_SEGMENT + UDP_HEADROOM));
        assert_eq!(run.buf.len(), UDP_HEADROOM + run.count * MAX_RUN_SEGMENT);
    }
}
