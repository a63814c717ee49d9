//! Runs: datagrams that arrive back to back with the same size, between
//! the same two ends, sent on in one call with UDP segmentation offload
//! (`UDP_SEGMENT`). The kernel then walks its output path once per run
//! instead of once per datagram; the receiver sees the same datagrams.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::info;

use super::{take_buffer, UdpRelay, SPARE_BUFFERS};
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
pub fn run_has_room(count: usize, segment: usize) -> bool {
    // Room for a SOCKS5 header in front of each, should they go there.
    count < MAX_RUN_DATAGRAMS && (count + 1) * (segment + UDP_HEADROOM) <= MAX_RUN_BYTES
}

/// Replies read back to back from one remote, all the same size.
#[derive(Default)]
pub(super) struct ReplyRun {
    from: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// The payloads back to back in `buf[..len]`; taken on first use.
    buf: Option<Box<[u8]>>,
    len: usize,
}

impl ReplyRun {
    pub(super) fn extends(&self, from: SocketAddr, len: usize) -> bool {
        self.count > 0
            && self.from == Some(from)
            && len == self.segment
            && run_has_room(self.count, self.segment)
    }

    pub(super) fn start(&mut self, from: SocketAddr, payload: &[u8]) {
        self.from = Some(from);
        self.segment = payload.len();
        self.push(payload);
    }

    pub(super) fn push(&mut self, payload: &[u8]) {
        let buf = self.buf.get_or_insert_with(take_buffer);
        buf[self.len..self.len + payload.len()].copy_from_slice(payload);
        self.len += payload.len();
        self.count += 1;
    }

    /// Returns the run's buffer to the pool.
    pub(super) fn release(mut self) {
        if let Some(buf) = self.buf.take() {
            SPARE_BUFFERS.give_back(buf);
        }
    }

    /// Sends the run to `client` and empties it, adding what was delivered.
    pub(super) async fn flush(
        &mut self,
        relay: &UdpRelay,
        client: SocketAddr,
        delivered: &mut (u64, u64),
    ) {
        let (Some(from), Some(buf)) = (self.from, &self.buf) else {
            return;
        };
        if self.count == 0 {
            return;
        }
        let payloads = &buf[..self.len];
        let sent = relay
            .replies
            .send_run(from, client, payloads, self.segment, &relay.stats)
            .await;
        delivered.0 += (sent * self.segment).min(self.len) as u64;
        delivered.1 += sent as u64;
        self.len = 0;
        self.count = 0;
    }
}

pub(super) fn refuse_segments(e: &io::Error) {
    if !SEGMENTS_REFUSED.swap(true, Ordering::Relaxed) {
        info!("UDP segmentation offload refused ({e}); sending datagrams one by one");
    }
}
