//! The one room for system calls and socket options.
//!
//! Everything that touches the kernel below the level of `std`/`tokio`
//! sockets lives here behind safe functions: transparent sockets, original
//! destination lookups, control messages, marks, capabilities and limits.
//! The rest of the crate never calls `libc` or `nix` directly, so this file
//! is the only place to audit for kernel-facing mistakes.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, MsgFlags, SockaddrStorage,
};
use nix::unistd::pipe2;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Bits of the capabilities tproxyd needs, in the masks of
/// `/proc/self/status` (linux/capability.h).
const CAP_NET_BIND_SERVICE_BIT: u32 = 10;
const CAP_NET_ADMIN_BIT: u32 = 12;

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

/// Whether this process holds CAP_NET_ADMIN in its effective set.
///
/// Read from `/proc/self/status` rather than probed with a setsockopt, so
/// the answer can name the missing capability before anything is bound.
pub fn has_cap_net_admin() -> io::Result<bool> {
    has_capability(CAP_NET_ADMIN_BIT)
}

/// Whether this process may bind ports below
/// `net.ipv4.ip_unprivileged_port_start`: UDP replies leave from the port
/// the client wrote to (53 for DNS), so a transparent reply socket must
/// bind it.
pub fn has_cap_net_bind_service() -> io::Result<bool> {
    has_capability(CAP_NET_BIND_SERVICE_BIT)
}

fn has_capability(bit: u32) -> io::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    Ok(parse_cap_eff(&status).is_some_and(|caps| caps & (1 << bit) != 0))
}

/// The lowest port anyone may bind without CAP_NET_BIND_SERVICE in this
/// network namespace (IPv4 and IPv6 alike); 1024 unless changed.
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// A set of capabilities as the kernel's 64-bit masks hold them: bit N is
/// capability N of linux/capability.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

const CAP_SETPCAP_BIT: u32 = 8;

impl CapSet {
    pub const EMPTY: CapSet = CapSet(0);
    pub const NET_BIND_SERVICE: CapSet = CapSet(1 << CAP_NET_BIND_SERVICE_BIT);
    pub const NET_ADMIN: CapSet = CapSet(1 << CAP_NET_ADMIN_BIT);
    const SETPCAP: CapSet = CapSet(1 << CAP_SETPCAP_BIT);

    pub fn union(self, other: CapSet) -> CapSet {
        CapSet(self.0 | other.0)
    }

    pub fn contains(self, other: CapSet) -> bool {
        self.0 & other.0 == other.0
    }

    fn has_bit(self, bit: u32) -> bool {
        self.0 & (1 << bit) != 0
    }

    /// The capability numbers in the set, lowest first.
    pub fn bits(self) -> impl Iterator<Item = u32> {
        (0..64).filter(move |&b| self.has_bit(b))
    }
}

impl std::fmt::Display for CapSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return f.write_str("no capabilities");
        }
        let names: Vec<String> = self
            .bits()
            .map(|b| match b {
                CAP_SETPCAP_BIT => "CAP_SETPCAP".to_string(),
                CAP_NET_BIND_SERVICE_BIT => "CAP_NET_BIND_SERVICE".to_string(),
                CAP_NET_ADMIN_BIT => "CAP_NET_ADMIN".to_string(),
                other => format!("capability {other}"),
            })
            .collect();
        f.write_str(&names.join(", "))
    }
}

/// The calling thread's effective, permitted and inheritable sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub effective: CapSet,
    pub permitted: CapSet,
    pub inheritable: CapSet,
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapUserHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: version 3 passes two of them, the low
/// and the high 32 capabilities.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapUserData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// capget(2) for the calling thread.
pub fn get_caps() -> io::Result<Caps> {
    let mut header = CapUserHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapUserData::default(); 2];
    // SAFETY: version 3 reads one header and writes two data structs,
    // both of the layout the kernel defines and both valid for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapUserHeader,
            data.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| CapSet(u64::from(lo) | (u64::from(hi) << 32));
    Ok(Caps {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// capset(2) for the calling thread only: capabilities are per thread.
pub fn set_caps(caps: Caps) -> io::Result<()> {
    let mut header = CapUserHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |s: CapSet, high: bool| if high { (s.0 >> 32) as u32 } else { s.0 as u32 };
    let data: [CapUserData; 2] = [false, true].map(|high| CapUserData {
        effective: half(caps.effective, high),
        permitted: half(caps.permitted, high),
        inheritable: half(caps.inheritable, high),
    });
    // SAFETY: as in get_caps; the kernel only reads the data here.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapUserHeader,
            data.as_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// prctl(2) with integer arguments only.
fn prctl(option: libc::c_int, arg2: u64, arg3: u64) -> io::Result<libc::c_int> {
    // SAFETY: every option used in this file takes plain integers, no
    // pointers; the unused arguments must be zero.
    let r = unsafe {
        libc::prctl(
            option,
            arg2 as libc::c_ulong,
            arg3 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// The ambient set: capabilities a program keeps across exec (Linux 4.3).
/// This is how the firewall tools tproxyd runs (nft, iptables-restore)
/// get CAP_NET_ADMIN when tproxyd itself is not root.
pub fn ambient_caps() -> io::Result<CapSet> {
    let mut set = CapSet::EMPTY;
    for bit in 0..64u32 {
        match prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as u64,
            bit.into(),
        ) {
            Ok(1) => set.0 |= 1 << bit,
            Ok(_) => {}
            // Past the last capability this kernel knows.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(set)
}

/// Replaces the ambient set with `set`, which must be in both the permitted
/// and the inheritable set.
pub fn set_ambient_caps(set: CapSet) -> io::Result<()> {
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as u64,
        0,
    )?;
    for bit in set.bits() {
        prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as u64,
            bit.into(),
        )?;
    }
    Ok(())
}

/// The bounding set: the most any program this process runs can gain.
pub fn bounding_caps() -> io::Result<CapSet> {
    let mut set = CapSet::EMPTY;
    for bit in 0..64u32 {
        match prctl(libc::PR_CAPBSET_READ, bit.into(), 0) {
            Ok(1) => set.0 |= 1 << bit,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(set)
}

/// Drops everything but `keep` from the bounding set (needs CAP_SETPCAP
/// in the effective set).
fn limit_bounding_caps(keep: CapSet) -> io::Result<()> {
    for bit in bounding_caps()?.bits().filter(|&b| !keep.has_bit(b)) {
        prctl(libc::PR_CAPBSET_DROP, bit.into(), 0)?;
    }
    Ok(())
}

/// The user tproxyd runs as after start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// As given (a name, or the numbers).
    pub name: String,
    pub uid: u32,
    /// The primary group; supplementary groups are dropped.
    pub gid: u32,
}

/// How `user` may be written: a name, a UID (both looked up in
/// /etc/passwd), or UID:GID (taken as is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    Name(String),
    Uid(u32),
    UidGid(u32, u32),
}

impl UserSpec {
    pub fn parse(text: &str) -> Result<UserSpec, String> {
        let numbers = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if let Some((u, g)) = text.split_once(':') {
            return match (numbers(u), numbers(g), u.parse(), g.parse()) {
                (true, true, Ok(u), Ok(g)) => Ok(UserSpec::UidGid(u, g)),
                _ => Err(format!("{text:?} is neither a user name nor UID:GID")),
            };
        }
        if numbers(text) {
            return text
                .parse()
                .map(UserSpec::Uid)
                .map_err(|_| format!("{text:?} is not a 32-bit UID"));
        }
        let name_char = |c: char| c.is_ascii_alphanumeric() || "._-$".contains(c);
        if text.is_empty() || !text.chars().all(name_char) || text.starts_with('-') {
            return Err(format!("{text:?} is not a user name"));
        }
        Ok(UserSpec::Name(text.to_string()))
    }
}

/// Finds `spec` in the text of an /etc/passwd file.
pub fn find_account(passwd: &str, spec: &UserSpec) -> Option<Account> {
    if let UserSpec::UidGid(uid, gid) = *spec {
        return Some(Account {
            name: format!("{uid}:{gid}"),
            uid,
            gid,
        });
    }
    passwd
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (name, uid, gid) = (f.first()?, f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            Some(Account {
                name: name.to_string(),
                uid,
                gid,
            })
        })
        .find(|a| match spec {
            UserSpec::Name(n) => a.name == *n,
            UserSpec::Uid(u) => a.uid == *u,
            UserSpec::UidGid(..) => false,
        })
}

pub const PASSWD: &str = "/etc/passwd";

/// Why tproxyd could not become its service user.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("user: {0}")]
    BadSpec(String),
    #[error(
        "user {user:?} is not in {PASSWD}: create it (useradd --system --no-create-home \
         --shell /usr/sbin/nologin {user}) or give the numbers as UID:GID. tproxyd reads \
         {PASSWD} itself (no NSS, so the static build behaves the same)"
    )]
    UnknownUser { user: String },
    #[error("cannot read {PASSWD} to find user {user:?}: {source}")]
    Passwd { user: String, source: io::Error },
    #[error(
        "cannot switch to user {user}: the process has {threads} threads, and capabilities \
         are per thread (a bug in tproxyd: the switch must come before any thread starts)"
    )]
    Threads { user: String, threads: usize },
    #[error("cannot switch to user {user}: tproxyd does not hold {missing} itself")]
    Missing { user: String, missing: CapSet },
    #[error("cannot switch to user {user}: {step}: {source}{hint}")]
    Step {
        user: String,
        step: &'static str,
        source: io::Error,
        hint: &'static str,
    },
}

/// Looks `spec` up in /etc/passwd (read directly, see [`PrivilegeError::UnknownUser`]).
pub fn lookup_account(spec: &str) -> Result<Account, PrivilegeError> {
    let parsed = UserSpec::parse(spec).map_err(PrivilegeError::BadSpec)?;
    if let UserSpec::UidGid(..) = parsed {
        return Ok(find_account("", &parsed).expect("UID:GID needs no lookup"));
    }
    let text = std::fs::read_to_string(PASSWD).map_err(|source| PrivilegeError::Passwd {
        user: spec.to_string(),
        source,
    })?;
    find_account(&text, &parsed).ok_or_else(|| PrivilegeError::UnknownUser {
        user: spec.to_string(),
    })
}

/// Threads of this process, from /proc.
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Becomes `account` (its UID, its primary group, no supplementary groups)
/// and keeps only `keep`: in the effective, permitted and inheritable
/// sets, in the ambient set so that the firewall tools tproxyd runs get
/// them too, and (when tproxyd may change it) in the bounding set. Sets
/// no_new_privs last: nothing tproxyd runs can gain privileges again.
///
/// Capabilities and the keep-capabilities flag belong to each thread,
/// while glibc's setresuid changes every thread's UID: another thread
/// would lose all capabilities, so this refuses to run unless the process
/// has exactly one thread.
///
/// Already running as `account` (a service manager started tproxyd as
/// that user), it only trims the capabilities.
pub fn switch_user(account: &Account, keep: CapSet) -> Result<(), PrivilegeError> {
    use nix::unistd::{getgroups, getresgid, getresuid, setgroups, setresgid, setresuid};
    use nix::unistd::{Gid, Uid};
    let user = format!(
        "{} (uid {}, gid {})",
        account.name, account.uid, account.gid
    );
    let step = |step: &'static str, hint: &'static str| {
        let user = user.clone();
        move |source: io::Error| PrivilegeError::Step {
            user,
            step,
            source,
            hint,
        }
    };
    let threads = thread_count().map_err(step("counting threads in /proc/self/task", ""))?;
    if threads != 1 {
        return Err(PrivilegeError::Threads { user, threads });
    }
    let before = get_caps().map_err(step("capget", ""))?;
    if !before.permitted.contains(keep) {
        return Err(PrivilegeError::Missing {
            user,
            missing: CapSet(keep.0 & !before.permitted.0),
        });
    }
    let uids = getresuid()
        .map_err(io::Error::from)
        .map_err(step("getresuid", ""))?;
    let gids = getresgid()
        .map_err(io::Error::from)
        .map_err(step("getresgid", ""))?;
    let groups = getgroups()
        .map_err(io::Error::from)
        .map_err(step("getgroups", ""))?;
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    let already = [uids.real, uids.effective, uids.saved] == [uid; 3]
        && [gids.real, gids.effective, gids.saved] == [gid; 3]
        && groups.iter().all(|g| *g == gid);
    const NEEDS_ROOT: &str = " (switching users needs root, or CAP_SETUID and CAP_SETGID)";
    if !already {
        // Without it, leaving UID 0 empties the permitted set.
        prctl(libc::PR_SET_KEEPCAPS, 1, 0).map_err(step("prctl(PR_SET_KEEPCAPS)", ""))?;
        setgroups(&[])
            .map_err(io::Error::from)
            .map_err(step("setgroups", NEEDS_ROOT))?;
        setresgid(gid, gid, gid)
            .map_err(io::Error::from)
            .map_err(step("setresgid", NEEDS_ROOT))?;
        setresuid(uid, uid, uid)
            .map_err(io::Error::from)
            .map_err(step("setresuid", NEEDS_ROOT))?;
        prctl(libc::PR_SET_KEEPCAPS, 0, 0).map_err(step("prctl(PR_SET_KEEPCAPS)", ""))?;
    }
    // The UID change emptied the effective set; the permitted set is intact.
    let now = get_caps().map_err(step("capget", ""))?;
    let wanted = Caps {
        effective: keep,
        permitted: keep,
        inheritable: keep,
    };
    let ambient = ambient_caps().map_err(step("prctl(PR_CAP_AMBIENT_IS_SET)", ""))?;
    if already && now == wanted && ambient == keep {
        // Started as the user with exactly these (systemd's User= and
        // AmbientCapabilities=, whose syscall filter may refuse capset).
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(step("prctl(PR_SET_NO_NEW_PRIVS)", ""))?;
        return Ok(());
    }
    if now.permitted.contains(CapSet::SETPCAP) {
        set_caps(Caps {
            effective: keep.union(CapSet::SETPCAP),
            permitted: now.permitted,
            inheritable: CapSet::EMPTY,
        })
        .map_err(step("capset", ""))?;
        limit_bounding_caps(keep).map_err(step("prctl(PR_CAPBSET_DROP)", ""))?;
    }
    set_caps(wanted).map_err(step("capset", ""))?;
    set_ambient_caps(keep).map_err(step("prctl(PR_CAP_AMBIENT)", ""))?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(step("prctl(PR_SET_NO_NEW_PRIVS)", ""))?;
    Ok(())
}

fn termination_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    set
}

/// Blocks SIGINT, SIGTERM and SIGHUP for this thread and the threads it
/// starts: they stay pending until [`unblock_termination_signals`].
/// Programs it runs start with an empty mask (`std::process::Command`
/// clears it).
pub fn block_termination_signals() -> io::Result<()> {
    termination_signals()
        .thread_block()
        .map_err(io::Error::from)
}

/// Unblocks SIGINT, SIGTERM and SIGHUP for this thread and the threads it
/// starts.
///
/// A blocked signal mask is inherited across exec: a parent that blocks
/// them (a supervisor, or `tproxyd demo` catching Ctrl-C) would otherwise
/// leave tproxyd deaf to SIGTERM, and its rules would never be removed.
///
/// SIGHUP is caught and logged (reload is not supported yet); blocked, it
/// would never reach the handler that says so.
pub fn unblock_termination_signals() -> io::Result<()> {
    termination_signals()
        .thread_unblock()
        .map_err(io::Error::from)
}

/// Raises the soft open-file limit to the hard limit and returns it.
///
/// Each TCP flow costs two descriptors and each UDP session one or two; the
/// common soft limit of 1024 is reached by a few hundred flows.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard)
}

/// The soft open-files limit (RLIMIT_NOFILE) in force now: the most
/// descriptors this process may hold at once. `usize::MAX` when the
/// kernel reports no limit.
pub fn nofile_limit() -> io::Result<usize> {
    use nix::sys::resource::{getrlimit, Resource};
    let (soft, _hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(usize::try_from(soft).unwrap_or(usize::MAX))
}

/// How many descriptors this process holds now, counted in
/// `/proc/self/fd`. A directory walk: for start-up and rare checks, not
/// for every flow.
pub fn open_descriptors() -> io::Result<usize> {
    // The walk itself holds one descriptor for the directory; leave it out.
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// A kernel pipe that moves a relay's bytes from one socket to another
/// with splice(2), so they are never copied into user space.
///
/// Both ends are non-blocking: a full pipe or an empty socket answers
/// `WouldBlock` instead of parking a runtime thread.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        Ok(Pipe { read, write })
    }

    /// Moves up to `max` bytes from the socket `src` into the pipe.
    /// `Ok(0)` means the peer closed its write side (EOF).
    pub fn fill_from<S: AsFd>(&self, src: &S, max: usize) -> io::Result<usize> {
        splice(
            src,
            None,
            &self.write,
            None,
            max,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )
        .map_err(io::Error::from)
    }

    /// Moves up to `max` bytes from the pipe into the socket `dst`.
    pub fn drain_to<S: AsFd>(&self, dst: &S, max: usize) -> io::Result<usize> {
        splice(
            &self.read,
            None,
            dst,
            None,
            max,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )
        .map_err(io::Error::from)
    }
}

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

/// Whether an error from [`send_segments`] means this kernel or device
/// cannot segment UDP at all (rather than this one run): stop trying.
pub fn segments_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EIO)
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
mod tests {
    use super::*;

    /// A UDP listener on 127.0.0.1, not transparent (no root needed).
    fn loopback_udp_listener(recv_orig_dst: bool) -> std::net::UdpSocket {
        let opts = ListenOptions {
            transparent: false,
            recv_orig_dst,
            mark: 0,
        };
        udp_listener("127.0.0.1:0".parse().unwrap(), opts).unwrap()
    }

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
    fn cap_eff_is_parsed_from_proc_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000001000\n";
        assert_eq!(parse_cap_eff(status), Some(0x1000));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn user_specs_parse_names_uids_and_pairs() {
        assert_eq!(
            UserSpec::parse("tproxyd"),
            Ok(UserSpec::Name("tproxyd".into()))
        );
        assert_eq!(UserSpec::parse("999"), Ok(UserSpec::Uid(999)));
        assert_eq!(UserSpec::parse("999:995"), Ok(UserSpec::UidGid(999, 995)));
        for bad in ["", "a b", "-x", "999:", ":1", "x:1", "99999999999", "a/b"] {
            assert!(UserSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn accounts_are_found_in_passwd_text() {
        let passwd = "# comment\nroot:x:0:0:root:/root:/bin/bash\nbroken line\n\
                      tproxyd:x:999:995::/nonexistent:/usr/sbin/nologin\n";
        let want = Account {
            name: "tproxyd".into(),
            uid: 999,
            gid: 995,
        };
        let find = |s: &str| find_account(passwd, &UserSpec::parse(s).unwrap());
        assert_eq!(find("tproxyd"), Some(want.clone()));
        assert_eq!(find("999"), Some(want));
        assert_eq!(find("nobody"), None);
        assert_eq!(find("1000"), None);
        // Numbers need no entry.
        assert_eq!(
            find("1000:1000").map(|a| (a.uid, a.gid)),
            Some((1000, 1000))
        );
        assert!(matches!(
            lookup_account("no-such-user-tpd"),
            Err(PrivilegeError::UnknownUser { .. })
        ));
        assert_eq!(lookup_account("root").unwrap().uid, 0);
    }

    #[test]
    fn capget_agrees_with_proc_and_capset_round_trips() {
        let caps = get_caps().unwrap();
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert_eq!(Some(caps.effective.0), parse_cap_eff(&status));
        set_caps(caps).unwrap();
        assert_eq!(get_caps().unwrap(), caps);
        // Every thread has a bounding set; root's holds CAP_NET_ADMIN.
        let bounding = bounding_caps().unwrap();
        assert!(bounding.contains(caps.permitted), "{bounding:?} {caps:?}");
        assert!(ambient_caps().unwrap().0 & !caps.permitted.0 == 0);
        assert_eq!(
            CapSet::NET_ADMIN
                .union(CapSet::NET_BIND_SERVICE)
                .to_string(),
            "CAP_NET_BIND_SERVICE, CAP_NET_ADMIN"
        );
    }

    #[test]
    fn switching_users_is_refused_while_other_threads_run() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let before = (nix::unistd::getresuid().unwrap(), get_caps().unwrap());
        let nobody = Account {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        let err = switch_user(&nobody, CapSet::NET_ADMIN).unwrap_err();
        assert!(matches!(err, PrivilegeError::Threads { .. }), "{err}");
        assert_eq!(
            (nix::unistd::getresuid().unwrap(), get_caps().unwrap()),
            before,
            "nothing may change"
        );
        tx.send(()).unwrap();
        other.join().unwrap().unwrap();
    }

    /// Runs the ignored test `name` alone in a new process of this test
    /// binary (on its main thread, so single-threaded, as tproxyd is when
    /// it switches) and fails if it fails. Needs root.
    fn in_own_process(name: &str) {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{name} needs root (CI=true: failing, not skipping)"
            );
            eprintln!("skipping {name}: needs root");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                name,
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the test did not run:\n{text}");
    }

    /// What a program this process starts would hold: the capability
    /// lines of its /proc/self/status.
    fn child_caps() -> (u64, u64) {
        let out = std::process::Command::new("/bin/cat")
            .arg("/proc/self/status")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
                .unwrap()
        };
        (field("CapEff:"), field("CapAmb:"))
    }

    /// Runs `f` in a forked child, single-threaded as tproxyd is when it
    /// switches (libtest runs each test on a thread of its own), and fails
    /// if `f` fails.
    fn in_forked_child(f: impl FnOnce()) {
        // SAFETY: this process runs this one test; its only other thread
        // is libtest's main thread, waiting for the test and holding no
        // lock the child could need.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
            // SAFETY: ends the child without running the parent's exit code.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` is valid.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child failed (status {status:#x})"
        );
    }

    fn switch_to_nobody_keeping(keep: CapSet) {
        assert_eq!(thread_count().unwrap(), 1, "must run single-threaded");
        let nobody = Account {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        switch_user(&nobody, keep).unwrap();
        let ids = nix::unistd::getresuid().unwrap();
        assert_eq!(
            [ids.real, ids.effective, ids.saved].map(|u| u.as_raw()),
            [65534; 3]
        );
        let gids = nix::unistd::getresgid().unwrap();
        assert_eq!(
            [gids.real, gids.effective, gids.saved].map(|g| g.as_raw()),
            [65534; 3]
        );
        assert!(nix::unistd::getgroups().unwrap().is_empty());
        let caps = get_caps().unwrap();
        assert_eq!(
            (caps.effective, caps.permitted, caps.inheritable),
            (keep, keep, keep)
        );
        assert_eq!(ambient_caps().unwrap(), keep);
        assert_eq!(bounding_caps().unwrap(), keep);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        // The capabilities survive exec, as nft and iptables-restore need.
        assert_eq!(child_caps(), (keep.0, keep.0));
        // And they work: SO_MARK needs CAP_NET_ADMIN.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_mark(&socket, 7).unwrap();
        let low = std::net::UdpSocket::bind("127.0.0.1:1");
        if keep.contains(CapSet::NET_BIND_SERVICE) {
            low.unwrap();
        } else if unprivileged_port_start() > 1 {
            assert_eq!(low.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        }
        // Already that user with those capabilities (a service manager
        // started it so): nothing to change, and no setuid/capset needed.
        switch_user(&nobody, keep).unwrap();
        assert_eq!(get_caps().unwrap(), caps);
        // Asking for more than it holds names what is missing.
        let err = switch_user(&nobody, CapSet(keep.0 | 1)).unwrap_err();
        assert!(matches!(err, PrivilegeError::Missing { .. }), "{err}");
    }

    #[test]
    #[ignore = "run in a process of its own by switch_user_keeps_only_net_admin"]
    fn own_process_switch_keeping_net_admin() {
        in_forked_child(|| switch_to_nobody_keeping(CapSet::NET_ADMIN));
    }

    #[test]
    #[ignore = "run in a process of its own by switch_user_keeps_both_capabilities"]
    fn own_process_switch_keeping_both() {
        let both = CapSet::NET_ADMIN.union(CapSet::NET_BIND_SERVICE);
        in_forked_child(|| switch_to_nobody_keeping(both));
    }

    #[test]
    fn switch_user_keeps_only_net_admin() {
        in_own_process("sys::tests::own_process_switch_keeping_net_admin");
    }

    #[test]
    fn switch_user_keeps_both_capabilities() {
        in_own_process("sys::tests::own_process_switch_keeping_both");
    }

    #[test]
    fn capabilities_match_what_root_holds() {
        let root = nix::unistd::Uid::effective().is_root();
        // Root (as the tests run in CI) holds both; anyone else neither,
        // unless granted, in which case there is nothing to compare.
        if root {
            assert!(has_cap_net_admin().unwrap());
            assert!(has_cap_net_bind_service().unwrap());
        }
        let start = unprivileged_port_start();
        assert!(start <= 1024, "ip_unprivileged_port_start = {start}");
    }

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
    /// The soft limit, checked against what the kernel shows in
    /// /proc/self/limits ("Max open files  SOFT  HARD  files").
    #[test]
    fn nofile_limit_is_the_soft_limit_in_force() {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let soft = line.split_whitespace().nth(3).unwrap();
        let got = nofile_limit().unwrap();
        if soft == "unlimited" {
            assert_eq!(got, usize::MAX);
        } else {
            assert_eq!(got, soft.parse::<usize>().unwrap());
        }
    }

    #[test]
    fn open_descriptors_counts_this_process() {
        let n = open_descriptors().unwrap();
        // stdin, stdout and stderr at least, and never past the limit.
        assert!(n >= 3, "{n}");
        assert!(n <= nofile_limit().unwrap(), "{n}");
        // Other tests open and close descriptors in parallel, so compare
        // loosely: holding 200 more must show.
        let pipes: Vec<Pipe> = (0..100).map(|_| Pipe::new().unwrap()).collect();
        assert!(open_descriptors().unwrap() >= 200, "pipes not counted");
        drop(pipes);
    }

    #[test]
    fn pipe_moves_bytes_between_sockets_and_reports_eof() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sender = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (src, _) = listener.accept().unwrap();
        let listener2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut receiver = std::net::TcpStream::connect(listener2.local_addr().unwrap()).unwrap();
        let (dst, _) = listener2.accept().unwrap();
        src.set_nonblocking(true).unwrap();

        let pipe = Pipe::new().unwrap();
        // Nothing sent yet: the non-blocking splice must not block.
        let err = pipe.fill_from(&src, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        std::io::Write::write_all(&mut sender, b"spliced bytes").unwrap();
        let mut moved = 0;
        while moved < 13 {
            match pipe.fill_from(&src, 4096) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(pipe.drain_to(&dst, 4096).unwrap(), 13);
        let mut got = [0u8; 13];
        std::io::Read::read_exact(&mut receiver, &mut got).unwrap();
        assert_eq!(&got, b"spliced bytes");

        sender.shutdown(std::net::Shutdown::Write).unwrap();
        let eof = loop {
            match pipe.fill_from(&src, 4096) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(eof, 0, "EOF reads as zero bytes");
        shutdown_write(&dst).unwrap();
        assert_eq!(std::io::Read::read(&mut receiver, &mut got).unwrap(), 0);
    }
}
