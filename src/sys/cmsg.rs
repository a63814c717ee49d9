//! Reading a TPROXY datagram with `recvmsg`: the datagram, its source and
//! the original destination the kernel hands over in a control message
//! (IP_ORIGDSTADDR / IPV6_ORIGDSTADDR), parsed by a pure walk over bytes
//! that the fuzz target `orig_dst_cmsg` exercises.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{recvmsg, MsgFlags, SockaddrStorage};

use super::socket::normalize;

/// One datagram read by [`recv_with_orig_dst`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    pub len: usize,
    /// The client, normalised (no v4-mapped form).
    pub src: SocketAddr,
    /// The address the client sent to, from the control message.
    pub orig_dst: SocketAddr,
}

/// Why a datagram was read but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("datagram from {src} larger than the {cap}-byte buffer; dropped")]
    Truncated { src: SocketAddr, cap: usize },
    #[error("control message truncated for a datagram from {src}; original destination unknown")]
    ControlTruncated { src: SocketAddr },
    #[error(
        "datagram from {src} carries no original destination: the socket lacks \
         IP_RECVORIGDSTADDR or the packet did not come through a TPROXY rule"
    )]
    NoOrigDst { src: SocketAddr },
    #[error("datagram without a usable source address")]
    NoSource,
    #[error("unreadable control message for a datagram from {src}: {source}")]
    BadControl { src: SocketAddr, source: CmsgError },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Space for one `sockaddr_in6` control message (the larger of the two),
/// with headroom for one more the kernel might add.
pub const CMSG_SPACE: usize = 128;

/// Reads one datagram and the original destination the TPROXY rule kept
/// for it. Non-blocking: returns `WouldBlock` like any socket read.
pub fn recv_with_orig_dst<S: AsRawFd>(
    socket: &S,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> Result<Datagram, RecvError> {
    let cap = buf.len();
    // The buffer is reused for every datagram and the kernel writes only
    // as many control bytes as it has: clear it, so that the walk below
    // can never read a previous datagram's original destination.
    cmsg.fill(0);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let src = msg
        .address
        .as_ref()
        .and_then(storage_to_socket_addr)
        .map(normalize)
        .ok_or(RecvError::NoSource)?;
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(RecvError::Truncated { src, cap });
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(RecvError::ControlTruncated { src });
    }
    let len = msg.bytes;
    // The kernel wrote its control messages at the start of `cmsg`, and
    // the rest is still zero from the fill above: the walk stops at the
    // first zero-length header. (nix does not hand out msg_controllen.)
    let orig_dst =
        orig_dst_from_cmsgs(cmsg).map_err(|source| RecvError::BadControl { src, source })?;
    let orig_dst = orig_dst.ok_or(RecvError::NoOrigDst { src })?;
    Ok(Datagram { len, src, orig_dst })
}

/// Why the control messages of a datagram could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CmsgError {
    #[error("control message at offset {offset} claims {claimed} bytes, {left} are left")]
    Overrun {
        offset: usize,
        claimed: usize,
        left: usize,
    },
    #[error("original-destination message of {got} bytes, {needed} needed")]
    ShortAddress { needed: usize, got: usize },
    #[error("original-destination message with address family {0}")]
    BadFamily(u16),
}

/// `struct cmsghdr` as the kernel lays it out: `cmsg_len` is a
/// `__kernel_size_t`, then level and type as ints; headers and data are
/// aligned to the size of a long (CMSG_ALIGN). 16 bytes on 64-bit
/// targets, 12 on 32-bit routers.
const CMSG_WORD: usize = std::mem::size_of::<usize>();
const CMSG_HDR: usize = (CMSG_WORD + 8).div_ceil(CMSG_WORD) * CMSG_WORD;
/// `sizeof(struct sockaddr_in)` and `sizeof(struct sockaddr_in6)`.
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// The original destination in the control messages `recvmsg` wrote into
/// `control` (IP_ORIGDSTADDR or IPV6_ORIGDSTADDR; the last one wins, the
/// IPv6 form un-mapped). `Ok(None)` when there is none.
///
/// A pure walk over bytes, in safe code, so that it can be tested and
/// fuzzed without a socket: a header whose length is smaller than a header
/// ends the list (the kernel's and glibc's CMSG_NXTHDR do the same, and
/// the zero-filled rest of the buffer looks like that); a length that runs
/// past the buffer or an address message too short for its sockaddr is an
/// error, never an out-of-bounds read.
pub fn orig_dst_from_cmsgs(control: &[u8]) -> Result<Option<SocketAddr>, CmsgError> {
    let mut orig_dst = None;
    let mut offset = 0;
    while control.len().saturating_sub(offset) >= CMSG_HDR {
        let hdr = &control[offset..offset + CMSG_HDR];
        let int = |at: usize| i32::from_ne_bytes([hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]]);
        let mut len_bytes = [0u8; CMSG_WORD];
        len_bytes.copy_from_slice(&hdr[..CMSG_WORD]);
        let claimed = usize::from_ne_bytes(len_bytes);
        if claimed < CMSG_HDR {
            break;
        }
        let left = control.len() - offset;
        if claimed > left {
            return Err(CmsgError::Overrun {
                offset,
                claimed,
                left,
            });
        }
        let data = &control[offset + CMSG_HDR..offset + claimed];
        match (int(CMSG_WORD), int(CMSG_WORD + 4)) {
            (libc::SOL_IP, libc::IP_ORIGDSTADDR) => {
                orig_dst = Some(SocketAddr::V4(sockaddr_in_from_bytes(data)?));
            }
            (libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR) => {
                orig_dst = Some(normalize(SocketAddr::V6(sockaddr_in6_from_bytes(data)?)));
            }
            _ => {}
        }
        // CMSG_ALIGN(cmsg_len); past the end means no next header.
        offset = match claimed.checked_next_multiple_of(CMSG_WORD) {
            Some(step) => offset.saturating_add(step),
            None => break,
        };
    }
    Ok(orig_dst)
}

/// `struct sockaddr_in` from its bytes: family in host order, port and
/// address in network order.
fn sockaddr_in_from_bytes(data: &[u8]) -> Result<SocketAddrV4, CmsgError> {
    let Some(b) = data.get(..SOCKADDR_IN_LEN) else {
        return Err(CmsgError::ShortAddress {
            needed: SOCKADDR_IN_LEN,
            got: data.len(),
        });
    };
    let family = u16::from_ne_bytes([b[0], b[1]]);
    if i32::from(family) != libc::AF_INET {
        return Err(CmsgError::BadFamily(family));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::new(b[4], b[5], b[6], b[7]),
        u16::from_be_bytes([b[2], b[3]]),
    ))
}

/// `struct sockaddr_in6` from its bytes: family and scope id in host
/// order, port and flow info in network order.
fn sockaddr_in6_from_bytes(data: &[u8]) -> Result<SocketAddrV6, CmsgError> {
    let Some(b) = data.get(..SOCKADDR_IN6_LEN) else {
        return Err(CmsgError::ShortAddress {
            needed: SOCKADDR_IN6_LEN,
            got: data.len(),
        });
    };
    let family = u16::from_ne_bytes([b[0], b[1]]);
    if i32::from(family) != libc::AF_INET6 {
        return Err(CmsgError::BadFamily(family));
    }
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&b[8..24]);
    Ok(SocketAddrV6::new(
        Ipv6Addr::from(octets),
        u16::from_be_bytes([b[2], b[3]]),
        u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[24], b[25], b[26], b[27]]),
    ))
}

fn storage_to_socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    s.as_sockaddr_in6().map(|v6| {
        SocketAddr::V6(SocketAddrV6::new(
            v6.ip(),
            v6.port(),
            v6.flowinfo(),
            v6.scope_id(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::socket::loopback_udp_listener;
    use crate::sys::{udp_listener, ListenOptions};
    use std::time::Duration;

    /// A real round trip through recvmsg: a plain UDP socket with the
    /// option set gets the control message for loopback traffic too, so
    /// the parsing is checked against what the kernel really writes.
    #[test]
    fn recv_with_orig_dst_reads_the_kernel_control_message() {
        for bind in ["127.0.0.1:0", "[::1]:0", "[::]:0"] {
            let addr: SocketAddr = bind.parse().unwrap();
            let opts = ListenOptions {
                transparent: false,
                recv_orig_dst: true,
                mark: 0,
            };
            let server = udp_listener(addr, opts).unwrap();
            let port = server.local_addr().unwrap().port();
            let target: SocketAddr = if bind.starts_with("127") || bind == "[::]:0" {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
            } else {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)
            };
            let client = std::net::UdpSocket::bind(SocketAddr::new(
                if target.is_ipv4() {
                    Ipv4Addr::LOCALHOST.into()
                } else {
                    Ipv6Addr::LOCALHOST.into()
                },
                0,
            ))
            .unwrap();
            client.send_to(b"hello", target).unwrap();
            server.set_nonblocking(false).unwrap();
            server
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 64];
            let mut cmsg = [0u8; CMSG_SPACE];
            // The socket is blocking now, MSG_DONTWAIT aside: retry briefly.
            let got = loop {
                match recv_with_orig_dst(&server, &mut buf, &mut cmsg) {
                    Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    other => break other.unwrap(),
                }
            };
            assert_eq!(&buf[..got.len], b"hello");
            assert_eq!(got.orig_dst, target, "bind {bind}");
            assert_eq!(got.src, client.local_addr().unwrap(), "bind {bind}");
        }
    }

    /// One control message as the kernel lays it out (put_cmsg), padded
    /// to CMSG_ALIGN.
    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(CMSG_HDR + data.len()).to_ne_bytes());
        out.extend_from_slice(&level.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.resize(CMSG_HDR, 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(CMSG_WORD), 0);
        out
    }

    fn sin6_bytes(ip: Ipv6Addr, port: u16) -> Vec<u8> {
        let mut b = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&ip.octets());
        b.extend_from_slice(&[0; 4]);
        b
    }

    /// Bytes recvmsg wrote on x86_64 for the loopback round trip above
    /// (IPv4 to 127.0.0.1:59150, IPv6 to [::1]:55319), in a zeroed
    /// 128-byte buffer.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn orig_dst_from_real_kernel_control_bytes() {
        let mut v4 = [0u8; CMSG_SPACE];
        v4[..24].copy_from_slice(&[
            0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 0x02, 0, 0xe7, 0x0e, 0x7f, 0, 0,
            1,
        ]);
        assert_eq!(
            orig_dst_from_cmsgs(&v4),
            Ok(Some("127.0.0.1:59150".parse().unwrap()))
        );
        let mut v6 = [0u8; CMSG_SPACE];
        v6[..20].copy_from_slice(&[
            0x2c, 0, 0, 0, 0, 0, 0, 0, 0x29, 0, 0, 0, 0x4a, 0, 0, 0, 0x0a, 0, 0xd8, 0x17,
        ]);
        v6[39] = 1;
        assert_eq!(
            orig_dst_from_cmsgs(&v6),
            Ok(Some("[::1]:55319".parse().unwrap()))
        );
    }

    #[test]
    fn orig_dst_walk_skips_other_messages_and_unmaps_v6() {
        assert_eq!(orig_dst_from_cmsgs(&[]), Ok(None));
        assert_eq!(orig_dst_from_cmsgs(&[0u8; CMSG_SPACE]), Ok(None));
        // A timestamp first, then the destination: the walk steps over it.
        let mut buf = cmsg(libc::SOL_SOCKET, libc::SO_TIMESTAMP, &[7u8; 16]);
        let mapped: Ipv6Addr = "::ffff:198.51.100.7".parse().unwrap();
        buf.extend(cmsg(
            libc::SOL_IPV6,
            libc::IPV6_ORIGDSTADDR,
            &sin6_bytes(mapped, 53),
        ));
        buf.resize(CMSG_SPACE, 0);
        assert_eq!(
            orig_dst_from_cmsgs(&buf),
            Ok(Some("198.51.100.7:53".parse().unwrap()))
        );
    }

    #[test]
    fn malformed_control_messages_are_errors_not_reads_past_the_end() {
        // A length running past the buffer, up to usize::MAX.
        for claimed in [CMSG_HDR + 17, usize::MAX] {
            let mut buf = claimed.to_ne_bytes().to_vec();
            buf.resize(CMSG_HDR + 16, 0);
            assert!(
                matches!(orig_dst_from_cmsgs(&buf), Err(CmsgError::Overrun { .. })),
                "claimed {claimed}"
            );
        }
        // An address message too short for its sockaddr.
        let short = cmsg(libc::SOL_IP, libc::IP_ORIGDSTADDR, &[2, 0, 0, 53]);
        assert_eq!(
            orig_dst_from_cmsgs(&short),
            Err(CmsgError::ShortAddress { needed: 16, got: 4 })
        );
        let short6 = cmsg(libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR, &[0; 16]);
        assert_eq!(
            orig_dst_from_cmsgs(&short6),
            Err(CmsgError::ShortAddress {
                needed: 28,
                got: 16
            })
        );
        // An IPv6 sockaddr in the IPv4 message.
        let wrong = cmsg(
            libc::SOL_IP,
            libc::IP_ORIGDSTADDR,
            &sin6_bytes(Ipv6Addr::LOCALHOST, 1),
        );
        assert_eq!(
            orig_dst_from_cmsgs(&wrong),
            Err(CmsgError::BadFamily(libc::AF_INET6 as u16))
        );
        // A header shorter than a header ends the list, like CMSG_NXTHDR.
        let mut tiny = 3usize.to_ne_bytes().to_vec();
        tiny.resize(CMSG_SPACE, 0xff);
        assert_eq!(orig_dst_from_cmsgs(&tiny), Ok(None));
    }

    #[test]
    fn recv_reports_truncation_instead_of_a_short_datagram() {
        let server = loopback_udp_listener(true);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .send_to(&[7u8; 100], server.local_addr().unwrap())
            .unwrap();
        let mut buf = [0u8; 10];
        let mut cmsg = [0u8; CMSG_SPACE];
        let err = loop {
            match recv_with_orig_dst(&server, &mut buf, &mut cmsg) {
                Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => break other.unwrap_err(),
            }
        };
        assert!(matches!(err, RecvError::Truncated { cap: 10, .. }), "{err}");
    }
}
