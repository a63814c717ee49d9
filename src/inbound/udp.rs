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
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::outbound::UDP_HEADROOM;
use crate::ratelimit::held_back;
use crate::ratelimit::RateLimit;
use crate::relay::udp::{runnable, Run, UdpRelay, MAX_DATAGRAM};
use crate::sys::{self, RecvError};

/// Datagrams without an original destination: a rule problem, repeated
/// for every packet until it is fixed.
static NO_ORIG_DST: RateLimit = RateLimit::new(crate::ratelimit::WARN_INTERVAL);
/// Datagrams larger than tproxyd carries: IPv6 allows UDP payloads up to
/// 65527 bytes, 20 more than IPv4 and than the buffers here.
static OVERSIZE: RateLimit = RateLimit::new(crate::ratelimit::WARN_INTERVAL);

/// Reads until the task is dropped.
pub async fn serve(socket: UdpSocket, relay: Arc<UdpRelay>) {
    // One byte more than the largest datagram, so MSG_TRUNC can only mean
    // something is wrong (it never is for UDP over IP, but we check).
    let mut buf = vec![0u8; UDP_HEADROOM + MAX_DATAGRAM + 1];
    let mut cmsg = [0u8; sys::CMSG_SPACE];
    let mut run = Run::new(UDP_HEADROOM);
    // Where a run through SOCKS5 is laid out again with its headers.
    let mut scratch = Vec::new();
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
                    flush(&mut run, &relay, &mut scratch);
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
                if run.extends((d.src, d.orig_dst), d.len) {
                    run.push(payload);
                    continue;
                }
                flush(&mut run, &relay, &mut scratch);
                if runnable(d.len) {
                    run.start((d.src, d.orig_dst), payload);
                } else {
                    relay.dispatch(d.src, d.orig_dst, &mut buf[..UDP_HEADROOM + d.len]);
                }
            }
            Ok(Err(e @ RecvError::NoOrigDst { .. })) => {
                if let Some(n) = NO_ORIG_DST.check() {
                    warn!("{e}{}", held_back(n));
                }
            }
            Ok(Err(RecvError::Truncated { src, cap })) => {
                // The sender should know, as for an IPv4 datagram too
                // large for the outbound.
                if let Some(n) = OVERSIZE.check() {
                    warn!(
                        client = %src,
                        "UDP datagram from {src} larger than {cap} bytes dropped: tproxyd carries UDP payloads up to {MAX_DATAGRAM} bytes (the IPv4 maximum), IPv6 allows up to 65527{}",
                        held_back(n)
                    );
                }
            }
            Ok(Err(e)) => debug!("UDP datagram dropped: {e}"),
            Err(e) => {
                flush(&mut run, &relay, &mut scratch);
                // ICMP errors queued on the socket and the like: not fatal.
                if e.kind() != io::ErrorKind::Interrupted {
                    debug!("UDP receive: {e}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}

/// Sends on what the run gathered: a lone datagram as it is, several in
/// one call.
fn flush(run: &mut Run<(SocketAddr, SocketAddr)>, relay: &Arc<UdpRelay>, scratch: &mut Vec<u8>) {
    if let Some(((client, dst), segment, count, buf)) = run.parts() {
        if count == 1 {
            relay.dispatch(client, dst, buf);
        } else {
            relay.dispatch_run(client, dst, buf, segment, scratch);
        }
    }
    run.clear();
}
