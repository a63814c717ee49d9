//! Runs: datagrams that arrive back to back with the same size, between
//! the same two ends, sent on in one call with UDP segmentation offload
//! (`UDP_SEGMENT`). The kernel then walks its output path once per run
//! instead of once per datagram; the receiver sees the same datagrams.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::info;

use crate::outbound::UDP_HEADROOM;

/// Set once the kernel refused UDP segmentation outright (no
/// `UDP_SEGMENT`, or a device that cannot do it): runs then go one
/// datagram at a time, as they would without it.
pub(super) static SEGMENTS_REFUSED: AtomicBool = AtomicBool::new(false);

/// Most datagrams in one run sent with UDP segmentation offload: below
/// the kernel's limit (64 segments before Linux 6.9, 128 since).
pub const MAX_RUN_DATAGRAMS: usize = 32;
/// Most bytes in one run, a SOCKS5 header per datagram included: one UDP
/// datagram's worth.
pub const MAX_RUN_BYTES: usize = 65_000;
/// Larger datagrams are never gathered: they exceed any link's MTU, which
/// a segment must not, and are too rare to be worth copying.
pub const MAX_RUN_SEGMENT: usize = 9_000;

/// Whether a datagram of `len` bytes may be part of a run.
pub fn runnable(len: usize) -> bool {
    len > 0 && len <= MAX_RUN_SEGMENT
}

/// Whether a run of `count` datagrams of `segment` bytes may take one more.
fn run_has_room(count: usize, segment: usize) -> bool {
    // Room for a SOCKS5 header in front of each, should they go there.
    count < MAX_RUN_DATAGRAMS && (count + 1) * (segment + UDP_HEADROOM) <= MAX_RUN_BYTES
}

/// Datagrams read back to back between the same two ends (`K`: client
/// and destination on the way up, the remote on the way back), all the
/// same size, not yet sent on. The inbound and the reply path both gather
/// them here.
pub struct Run<K> {
    key: Option<K>,
    segment: usize,
    count: usize,
    headroom: usize,
    /// `headroom` bytes, then the payloads back to back; allocated by the
    /// first datagram and kept for the next run.
    buf: Vec<u8>,
}

impl<K: Copy + PartialEq> Run<K> {
    /// An empty run whose buffer keeps `headroom` bytes in front of the
    /// payloads (the inbound's room for a SOCKS5 header).
    pub fn new(headroom: usize) -> Self {
        Run {
            key: None,
            segment: 0,
            count: 0,
            headroom,
            buf: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether a datagram of `len` bytes between `key` may join this run.
    pub fn extends(&self, key: K, len: usize) -> bool {
        self.count > 0
            && self.key == Some(key)
            && len == self.segment
            && run_has_room(self.count, self.segment)
    }

    /// Starts a run with its first datagram; the run must be empty.
    pub fn start(&mut self, key: K, payload: &[u8]) {
        self.key = Some(key);
        self.segment = payload.len();
        self.push(payload);
    }

    /// Adds a datagram that [`extends`](Self::extends) the run.
    pub fn push(&mut self, payload: &[u8]) {
        if self.buf.is_empty() {
            self.buf.reserve(self.headroom + MAX_RUN_BYTES);
            self.buf.resize(self.headroom, 0);
        }
        self.buf.extend_from_slice(payload);
        self.count += 1;
    }

    /// What the run holds, unless it is empty: its ends, the size of each
    /// datagram, how many there are, and the buffer (`headroom` bytes,
    /// then the payloads). [`clear`](Self::clear) it once sent.
    pub fn parts(&mut self) -> Option<(K, usize, usize, &mut [u8])> {
        let key = self.key.filter(|_| self.count > 0)?;
        Some((key, self.segment, self.count, &mut self.buf[..]))
    }

    /// Empties the run, keeping its buffer.
    pub fn clear(&mut self) {
        self.buf.truncate(self.headroom);
        self.count = 0;
    }
}

pub(super) fn refuse_segments(e: &io::Error) {
    if !SEGMENTS_REFUSED.swap(true, Ordering::Relaxed) {
        info!("UDP segmentation offload refused ({e}); sending datagrams one by one");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn ends(client: &str, dst: &str) -> (SocketAddr, SocketAddr) {
        (client.parse().unwrap(), dst.parse().unwrap())
    }

    #[test]
    fn a_run_takes_only_same_size_datagrams_between_the_same_ends() {
        let key = ends("192.0.2.2:5000", "198.51.100.10:443");
        let mut run = Run::new(UDP_HEADROOM);
        assert!(
            !run.extends(key, 1200),
            "an empty run starts, it is not extended"
        );
        run.start(key, &[1; 1200]);
        assert!(run.extends(key, 1200));
        assert!(!run.extends(ends("192.0.2.2:5001", "198.51.100.10:443"), 1200));
        assert!(!run.extends(ends("192.0.2.2:5000", "198.51.100.10:444"), 1200));
        assert!(!run.extends(key, 1199));
        assert!(!run.extends(key, 1201));
    }

    #[test]
    fn a_run_stops_at_the_kernels_limits() {
        let key = ends("192.0.2.2:5000", "198.51.100.10:443");
        // Small datagrams: the segment count is the limit.
        let mut run = Run::new(UDP_HEADROOM);
        run.start(key, &[0; 100]);
        while run.extends(key, 100) {
            run.push(&[0; 100]);
        }
        let (_, _, count, _) = run.parts().unwrap();
        assert_eq!(count, MAX_RUN_DATAGRAMS);
        // Large ones: the bytes, SOCKS5 headers counted, are.
        let mut run = Run::new(UDP_HEADROOM);
        run.start(key, &[0; MAX_RUN_SEGMENT]);
        while run.extends(key, MAX_RUN_SEGMENT) {
            run.push(&[0; MAX_RUN_SEGMENT]);
        }
        let (_, _, count, buf) = run.parts().unwrap();
        assert_eq!(count, MAX_RUN_BYTES / (MAX_RUN_SEGMENT + UDP_HEADROOM));
        assert_eq!(buf.len(), UDP_HEADROOM + count * MAX_RUN_SEGMENT);
    }

    #[test]
    fn a_cleared_run_is_empty_and_keeps_its_headroom() {
        let key = ends("192.0.2.2:5000", "198.51.100.10:443");
        let mut run = Run::new(UDP_HEADROOM);
        assert!(run.parts().is_none());
        run.start(key, b"abcd");
        run.push(b"efgh");
        let (got_key, segment, count, buf) = run.parts().unwrap();
        assert_eq!((got_key, segment, count), (key, 4, 2));
        assert_eq!(&buf[UDP_HEADROOM..], b"abcdefgh");
        run.clear();
        assert!(run.is_empty() && run.parts().is_none());
        run.start(key, b"ij");
        let (_, segment, count, buf) = run.parts().unwrap();
        assert_eq!((segment, count, buf.len()), (2, 1, UDP_HEADROOM + 2));
    }
}
