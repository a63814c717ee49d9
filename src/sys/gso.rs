//! UDP generic segmentation offload: many datagrams in one sendmsg.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};

/// Sends `payloads` as consecutive datagrams of `segment` bytes each (the
/// last may be shorter) in one call, with UDP segmentation offload
/// (`UDP_SEGMENT`, Linux 4.18). The stack is walked once for the whole
/// run instead of once per datagram; the receiver sees ordinary
/// datagrams. `dst` is `None` on a connected socket.
///
/// All or nothing: either every datagram is sent or none is. The kernel
/// refuses a run it cannot segment (a segment larger than the route's
/// MTU, too many segments, no support) with an error that
/// [`segments_unsupported`] tells apart; the caller then sends one by one.
pub fn send_segments<S: AsFd>(
    socket: &S,
    payloads: &[u8],
    segment: usize,
    dst: Option<SocketAddr>,
) -> io::Result<usize> {
    // The control message carries the size as 16 bits; a larger one
    // could never fit a datagram anyway.
    let segment = u16::try_from(segment)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "UDP segment over 64 KiB"))?;
    let iov = [io::IoSlice::new(payloads)];
    let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
    let dst = dst.map(SockaddrStorage::from);
    sendmsg(
        socket.as_fd().as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_DONTWAIT,
        dst.as_ref(),
    )
    .map_err(io::Error::from)
}

/// Sends one datagram made of `parts` back to back (`sendmsg` with one
/// slice each), never waiting, on a connected socket: a payload sealed in
/// place goes out with its tag from elsewhere, without copying either.
pub fn send_parts<S: AsFd>(socket: &S, parts: &[&[u8]]) -> io::Result<usize> {
    let mut iov = [io::IoSlice::new(&[]); 4];
    if parts.len() > iov.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a datagram of more than 4 parts",
        ));
    }
    for (slot, part) in iov.iter_mut().zip(parts) {
        *slot = io::IoSlice::new(part);
    }
    sendmsg::<SockaddrStorage>(
        socket.as_fd().as_raw_fd(),
        &iov[..parts.len()],
        &[],
        MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)
}

/// Whether an error from [`send_segments`] means this kernel or device
/// cannot segment UDP at all (rather than this one run): stop trying.
pub fn segments_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EIO)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn send_parts_arrive_as_one_datagram() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        assert_eq!(send_parts(&tx, &[b"head", b"", b"tail"]).unwrap(), 8);
        let mut buf = [0u8; 16];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"headtail");
        let five: [&[u8]; 5] = [b"a"; 5];
        assert!(send_parts(&tx, &five).is_err());
    }

    #[test]
    fn send_segments_arrives_as_separate_datagrams_in_order() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Three segments of 4 bytes and a shorter last one.
        let payloads = b"aaaabbbbccccdd";
        let sent = send_segments(&tx, payloads, 4, Some(rx.local_addr().unwrap())).unwrap();
        assert_eq!(sent, payloads.len());
        let mut buf = [0u8; 64];
        for want in [&b"aaaa"[..], b"bbbb", b"cccc", b"dd"] {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], want);
            assert_eq!(from, tx.local_addr().unwrap());
        }
        // Connected: no destination.
        tx.connect(rx.local_addr().unwrap()).unwrap();
        send_segments(&tx, b"xxyy", 2, None).unwrap();
        for want in [&b"xx"[..], b"yy"] {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], want);
        }
    }

    #[test]
    fn send_segments_refuses_a_run_of_too_many_segments_whole() {
        // Loopback's MTU is 65536, so ask for more segments than the
        // kernel allows instead: the run is refused whole, nothing sent.
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let payloads = vec![1u8; 200];
        let err = send_segments(&tx, &payloads, 1, Some(rx.local_addr().unwrap())).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        assert!(!segments_unsupported(&err));
        let mut buf = [0u8; 8];
        assert_eq!(
            rx.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
