//! Sockets as tproxyd needs them: listeners (transparent, dual-stack,
//! asking for the original destination), marked outbound and reply
//! sockets, the REDIRECT original destination, and the address forms
//! (v4-mapped or not) that the rest of the crate works with.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt, MsgFlags};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Turns an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) back into IPv4.
///
/// A dual-stack `[::]` socket reports IPv4 peers in mapped form; everything
/// past the inbound works with the real family so that rules, logs and the
/// outbound see the address the client actually used.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// The IPv6 form of an address, for sending from a dual-stack socket.
pub fn to_v6(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        v6 => v6,
    }
}

fn domain_of(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// What a listening socket should be able to do.
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    /// `IP_TRANSPARENT`/`IPV6_TRANSPARENT`: accept traffic addressed to
    /// foreign addresses (TPROXY).
    pub transparent: bool,
    /// `IP_RECVORIGDSTADDR`/`IPV6_RECVORIGDSTADDR` (UDP TPROXY).
    pub recv_orig_dst: bool,
    /// `SO_MARK` on the listener. Accepted TCP sockets (and their
    /// SYN-ACKs) inherit it, so what tproxyd sends back to a client is
    /// skipped by an output chain that captures router-local traffic;
    /// unmarked, those replies would be captured and loop back in.
    pub mark: u32,
}

/// Makes a socket for `addr` and applies the options every listener needs.
///
/// An IPv6 wildcard address is made dual-stack so that one `[::]:PORT`
/// listener serves both families, the default a router wants.
fn listener_socket(addr: SocketAddr, ty: Type, opts: ListenOptions) -> io::Result<Socket> {
    let proto = if ty == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let socket = Socket::new(domain_of(&addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    set_mark(&socket, opts.mark)?;
    if opts.transparent {
        // IPV6_TRANSPARENT and IP_TRANSPARENT set the same flag in the
        // kernel; setting both keeps older kernels and either family happy.
        if addr.is_ipv6() {
            socket.set_ip_transparent_v6(true)?;
        }
        socket.set_ip_transparent_v4(true)?;
    }
    if opts.recv_orig_dst {
        // IPv4 datagrams on a dual-stack socket carry the SOL_IP control
        // message, IPv6 ones the SOL_IPV6 one: ask for both.
        setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true).map_err(io::Error::from)?;
        if addr.is_ipv6() {
            setsockopt(&socket, sockopt::Ipv6OrigDstAddr, &true).map_err(io::Error::from)?;
        }
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A non-blocking TCP listener bound to `addr`.
pub fn tcp_listener(addr: SocketAddr, opts: ListenOptions) -> io::Result<std::net::TcpListener> {
    let socket = listener_socket(addr, Type::STREAM, opts)?;
    // Accepted sockets inherit TCP_NODELAY (Linux copies it with the rest
    // of the listener's state), so no flow pays a setsockopt for it.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The UDP listener's receive buffer: about 3,000 full-size datagrams
/// from all clients together, a few milliseconds at line rate.
const UDP_LISTENER_RCVBUF: usize = 4 << 20;

/// A non-blocking UDP socket bound to `addr` for the TPROXY inbound.
pub fn udp_listener(addr: SocketAddr, opts: ListenOptions) -> io::Result<std::net::UdpSocket> {
    let socket = listener_socket(addr, Type::DGRAM, opts)?;
    // Datagrams of up to 64 KiB arrive in bursts; the default buffer drops
    // them under load before the relay can read. SO_RCVBUFFORCE, which
    // CAP_NET_ADMIN allows, because SO_RCVBUF is capped by
    // net.core.rmem_max: 208 KiB on a stock kernel, OpenWrt's included.
    if setsockopt(&socket, sockopt::RcvBufForce, &UDP_LISTENER_RCVBUF).is_err() {
        let _ = socket.set_recv_buffer_size(UDP_LISTENER_RCVBUF);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A plain, marked, non-blocking UDP socket bound to `addr` for a service
/// tproxyd runs itself (the `dns.listen` DNS listener).
///
/// Unlike the other listeners it has no `SO_REUSEADDR`: on UDP that flag
/// lets two sockets that both set it share a port, and dnsmasq sets it,
/// so a clash would bind "fine" and split the queries between the two
/// programs. Without it, a port in use fails here with `EADDRINUSE`.
pub fn service_udp_socket(addr: SocketAddr, mark: u32) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(domain_of(&addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // `[::]` serves both families, as the other listeners do.
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    set_mark(&socket, mark)?;
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The destination a REDIRECTed TCP connection was originally sent to.
///
/// The address family of the accepted socket's *local* address decides
/// the call: an IPv4 (or v4-mapped) connection answers `SO_ORIGINAL_DST`,
/// an IPv6 one `IP6T_SO_ORIGINAL_DST`. Asking the wrong one fails with
/// `EOPNOTSUPP` or `ENOENT`.
pub fn original_dst<S: AsFd>(stream: &S, local: SocketAddr) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = match normalize(local) {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .map(normalize)
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// Sets `SO_MARK`, the mark the firewall rules skip so that tproxyd never
/// captures its own traffic.
pub fn set_mark<S: AsFd>(socket: &S, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    SockRef::from(socket).set_mark(mark)
}

/// Makes `close` send RST instead of FIN, so a client whose flow cannot be
/// carried fails at once rather than waiting for a timeout.
pub fn set_reset_on_close<S: AsFd>(socket: &S) -> io::Result<()> {
    SockRef::from(socket).set_linger(Some(Duration::ZERO))
}

/// A non-blocking TCP socket for an outbound connection, marked.
pub fn outbound_tcp_socket(dst: &SocketAddr, mark: u32) -> io::Result<Socket> {
    // Non-blocking from the start (SOCK_NONBLOCK): two fcntl calls fewer
    // per flow than setting it afterwards.
    let socket = Socket::new(
        domain_of(dst),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    set_mark(&socket, mark)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

/// A non-blocking, marked UDP socket bound to the wildcard address.
///
/// With `dual_stack` the socket is `[::]:0` and reaches both families (the
/// direct outbound); otherwise it has the family of `family_of`.
pub fn outbound_udp_socket(
    family_of: &SocketAddr,
    dual_stack: bool,
    mark: u32,
) -> io::Result<std::net::UdpSocket> {
    let (domain, bind): (Domain, SocketAddr) = if dual_stack || family_of.is_ipv6() {
        (Domain::IPV6, (Ipv6Addr::UNSPECIFIED, 0).into())
    } else {
        (Domain::IPV4, (Ipv4Addr::UNSPECIFIED, 0).into())
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if domain == Domain::IPV6 {
        socket.set_only_v6(!dual_stack)?;
    }
    set_mark(&socket, mark)?;
    let _ = socket.set_recv_buffer_size(1 << 20);
    socket.bind(&bind.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A transparent UDP socket bound to a *remote* address, used to send a
/// reply to a client so that it appears to come from that remote.
///
/// `SO_REUSEADDR`/`SO_REUSEPORT` let several such sockets (and the reply
/// sockets of other processes) share the address; the mark keeps the reply
/// out of the capture rules. Binding fails with `EADDRINUSE` when a local
/// service owns the address, which the caller must survive.
pub fn reply_socket(remote: SocketAddr, mark: u32) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(domain_of(&remote), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if remote.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    set_mark(&socket, mark)?;
    socket.bind(&remote.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Whether `ip` is an address of this host (in the current namespace).
///
/// Binding a plain, non-transparent socket to an address succeeds only for
/// local addresses, which is exactly the question the loop guard asks.
pub fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Fields of `sockaddr_in` are in network byte order.
pub fn sockaddr_in_to_std(sin: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )
}

pub fn sockaddr_in6_to_std(sin6: &libc::sockaddr_in6) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        u32::from_be(sin6.sin6_flowinfo),
        sin6.sin6_scope_id,
    )
}

/// Copies the bytes waiting in a TCP socket's receive queue into `buf`
/// without taking them (`MSG_PEEK`), never waiting (`MSG_DONTWAIT`):
/// `WouldBlock` when nothing is there, 0 once the peer has closed. Each
/// call starts again at the first unread byte, so sniffing can look at a
/// flow's first bytes while they stay queued for the relay to carry
/// upstream unchanged (splice included).
pub fn peek<S: AsFd>(socket: &S, buf: &mut [u8]) -> io::Result<usize> {
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    nix::sys::socket::recv(socket.as_fd().as_raw_fd(), buf, flags).map_err(io::Error::from)
}

/// Shuts down the write side of a TCP socket (sends FIN) without needing
/// a mutable or async handle to it.
pub fn shutdown_write<S: AsFd>(socket: &S) -> io::Result<()> {
    match SockRef::from(socket).shutdown(std::net::Shutdown::Write) {
        // The peer is already gone: nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

#[cfg(test)]
/// A UDP listener on 127.0.0.1, not transparent (no root needed).
pub(super) fn loopback_udp_listener(recv_orig_dst: bool) -> std::net::UdpSocket {
    let opts = ListenOptions {
        transparent: false,
        recv_orig_dst,
        mark: 0,
    };
    udp_listener("127.0.0.1:0".parse().unwrap(), opts).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::has_cap_net_admin;

    #[test]
    fn udp_listener_buffer_is_not_capped_by_rmem_max() {
        let socket = loopback_udp_listener(false);
        let got = SockRef::from(&socket).recv_buffer_size().unwrap();
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The kernel doubles what it is asked for (bookkeeping overhead).
        if has_cap_net_admin().unwrap() {
            assert!(got >= 2 * UDP_LISTENER_RCVBUF, "got {got}");
        } else {
            assert!(got >= 2 * UDP_LISTENER_RCVBUF.min(rmem_max), "got {got}");
        }
    }

    #[test]
    fn service_udp_socket_refuses_a_port_taken_with_reuseaddr() {
        // What dnsmasq does: SO_REUSEADDR on its UDP socket. A listener
        // that set it too would share the port silently.
        let other = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        other.set_reuse_address(true).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        other.bind(&any.into()).unwrap();
        let taken = other.local_addr().unwrap().as_socket().unwrap();
        let e = service_udp_socket(taken, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let own = service_udp_socket(any, 0).unwrap();
        assert!(own.local_addr().unwrap().port() != 0);
    }

    #[test]
    fn normalize_unmaps_v4_mapped_addresses() {
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:53".parse().unwrap();
        assert_eq!(normalize(mapped), "198.51.100.7:53".parse().unwrap());
        let real_v6: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
        assert_eq!(normalize(real_v6), real_v6);
        assert_eq!(
            to_v6("192.0.2.1:9".parse().unwrap()),
            "[::ffff:192.0.2.1]:9".parse().unwrap()
        );
    }

    #[test]
    fn sockaddr_conversions_use_network_byte_order() {
        // SAFETY: all-zero bytes are a valid sockaddr_in/sockaddr_in6.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = 53u16.to_be();
        sin.sin_addr.s_addr = u32::from(Ipv4Addr::new(198, 51, 100, 7)).to_be();
        assert_eq!(sockaddr_in_to_std(&sin), "198.51.100.7:53".parse().unwrap());

        let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sin6.sin6_port = 443u16.to_be();
        sin6.sin6_addr.s6_addr = "2001:db8::5".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(
            sockaddr_in6_to_std(&sin6),
            "[2001:db8::5]:443".parse().unwrap()
        );
    }

    #[test]
    fn local_address_probe() {
        assert!(is_local_address(Ipv4Addr::LOCALHOST.into()));
        // 192.0.2.0/24 is documentation space, never assigned on a CI host.
        assert!(!is_local_address(Ipv4Addr::new(192, 0, 2, 123).into()));
    }

    #[test]
    fn original_dst_without_nat_is_an_error_not_a_panic() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let local = stream.local_addr().unwrap();
        // Without conntrack/NAT state the kernel has no original
        // destination to give: any outcome but a panic is acceptable, and
        // if it answers it must be the address we connected to.
        if let Ok(dst) = original_dst(&stream, local) {
            assert_eq!(dst, local);
        }
    }
}
