//! The UDP inbound (TPROXY only): read each datagram with its original
//! destination and hand it to the session table.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::outbound::UDP_HEADROOM;
use crate::relay::udp::{UdpRelay, MAX_DATAGRAM};
use crate::sys::{self, RecvError};

/// Reads until the task is dropped.
pub async fn serve(socket: UdpSocket, relay: Arc<UdpRelay>) {
    // One byte more than the largest datagram, so MSG_TRUNC can only mean
    // something is wrong (it never is for UDP over IP, but we check).
    let mut buf = vec![0u8; UDP_HEADROOM + MAX_DATAGRAM + 1];
    let mut cmsg = [0u8; sys::CMSG_SPACE];
    let mut last_warning: Option<Instant> = None;
    loop {
        let got = socket
            .async_io(Interest::READABLE, || {
                match sys::recv_with_orig_dst(&socket, &mut buf[UDP_HEADROOM..], &mut cmsg) {
                    Err(RecvError::Io(e)) => Err(e),
                    other => Ok(other),
                }
            })
            .await;
        match got {
            Ok(Ok(d)) => relay.dispatch(d.src, d.orig_dst, &mut buf[..UDP_HEADROOM + d.len]),
            Ok(Err(e @ RecvError::NoOrigDst { .. })) => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    last_warning = Some(Instant::now());
                    warn!("{e}");
                }
            }
            Ok(Err(e)) => debug!("UDP datagram dropped: {e}"),
            Err(e) => {
                // ICMP errors queued on the socket and the like: not fatal.
                if e.kind() != io::ErrorKind::Interrupted {
                    debug!("UDP receive: {e}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}
