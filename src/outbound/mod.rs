//! Outbounds: where a flow goes once the route decision has picked one.
//!
//! This file is the seam. Every kind of outbound (one file or folder each:
//! [`direct`], [`block`], [`socks5`], [`http`], [`group`]) implements
//! [`Carrier`]; [`Outbound`] is the enum whose arms only delegate, so the
//! dispatch stays static (a UDP upstream's send runs per datagram). The
//! one list of kinds, with their settings as the config file writes them,
//! is `kinds!` in [`kinds`]; this file makes [`Outbound`], [`TcpUpstream`],
//! [`UdpUpstream`] and [`UDP_HEADROOM`] from it. The rest of tproxyd sees
//! outbounds only through this file: [`Outbound`], [`TcpUpstream`],
//! [`UdpUpstream`], and errors that say what failed as a protocol-free
//! [`Failure`].
//!
//! Every socket opened here toward the network carries the configured
//! `SO_MARK`, so the firewall rules let it pass instead of capturing
//! tproxyd's own traffic again.

pub mod block;
pub mod credentials;
pub mod direct;
pub mod group;
pub mod http;
pub mod kinds;
pub mod shadowsocks;
pub mod socks5;
pub mod url;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::sys;

pub use credentials::Credentials;
pub use kinds::{OutboundConfig, OutboundKind, RawOutbound};
pub use url::UrlError;

use group::GroupError;
use http::HttpError;
use shadowsocks::ShadowsocksConnectError;
use socks5::Socks5Error;

/// What building an outbound needs besides its own settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// `SO_MARK` of every socket it opens.
    pub mark: u32,
    /// How long a connect (and a proxy's handshake) may take.
    pub connect_timeout: Duration,
}

/// Why a flow could not be carried, without naming a protocol: what the
/// inbound logs, the registry counts and DNS reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The configuration refused the flow (`block`; UDP to an outbound
    /// that carries TCP only): says nothing about any upstream's health.
    Refused,
    /// The destination (or the proxy on its behalf) said no.
    DestinationRefused,
    /// The destination did not answer in time.
    DestinationTimeout,
    /// The proxy server did not answer in time.
    ProxyTimeout,
    /// The proxy server could not be reached, broke its protocol or
    /// refused us (credentials).
    ProxyFailed,
    /// The proxy takes TCP but refuses to carry UDP (SOCKS5 UDP ASSOCIATE
    /// refused): DNS through it goes over TCP instead.
    UdpRefused,
    /// This process (EMFILE) or the system (ENFILE) ran out of file
    /// descriptors while opening the upstream side.
    OutOfDescriptors,
}

/// The failure an I/O error on the way to `server` (the destination for
/// `direct`, else the proxy) means.
fn io_failure(source: &io::Error, otherwise: Failure) -> Failure {
    match source.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => Failure::OutOfDescriptors,
        _ => otherwise,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("connect to {dst} timed out after {secs}s")]
    ConnectTimeout { dst: SocketAddr, secs: u64 },
    #[error("connect to {dst} failed: {source}")]
    Connect { dst: SocketAddr, source: io::Error },
    #[error("cannot open a UDP socket: {0}")]
    UdpSocket(io::Error),
    #[error(transparent)]
    Socks5(#[from] Socks5Error),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Shadowsocks(#[from] ShadowsocksConnectError),
    /// The `block` outbound: refused on purpose, not a fault.
    #[error("blocked by rule")]
    Blocked,
    /// A fake-ip flow whose name cannot be carried: not a host name, or
    /// (for `direct`) no real address for it.
    #[error("fake-ip name {name}: {why}")]
    FakeName { name: String, why: &'static str },
    #[error(
        "the http outbound (proxy {server}) carries TCP only: HTTP CONNECT has no UDP; \
         send UDP elsewhere with a rule (network = \"udp\", outbound = ...)"
    )]
    TcpOnly { server: SocketAddr },
}

impl OutboundError {
    /// What failed, in terms every caller understands.
    pub fn failure(&self) -> Failure {
        match self {
            OutboundError::Blocked | OutboundError::TcpOnly { .. } => Failure::Refused,
            OutboundError::ConnectTimeout { .. } => Failure::DestinationTimeout,
            OutboundError::FakeName { .. } => Failure::DestinationRefused,
            OutboundError::Connect { source, .. } => {
                io_failure(source, Failure::DestinationRefused)
            }
            OutboundError::UdpSocket(source) => io_failure(source, Failure::ProxyFailed),
            OutboundError::Socks5(e) => e.failure(),
            OutboundError::Http(e) => e.failure(),
            OutboundError::Shadowsocks(e) => e.failure(),
        }
    }

    /// Whether the configuration refused the flow (block, UDP to an http
    /// outbound) rather than an upstream failing: such a refusal says
    /// nothing about the upstream's health and must not trigger back-off.
    pub fn is_refusal(&self) -> bool {
        self.failure() == Failure::Refused
    }

    /// Whether this process or the system ran out of file descriptors.
    pub fn out_of_descriptors(&self) -> bool {
        self.failure() == Failure::OutOfDescriptors
    }
}

/// How DNS queries sent through an outbound travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsTransport {
    /// As the UDP datagrams they are.
    Udp,
    /// As DNS over TCP (a TCP connection to the resolver through the
    /// outbound) until a UDP upstream through it is known to work, and for
    /// good once one was refused ([`Failure::UdpRefused`]).
    TcpUntilUdpWorks,
    /// Always as DNS over TCP (configured).
    Tcp,
}

/// A future an outbound returns; boxed only where a group recurses.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What every kind of outbound does. [`Outbound`] delegates each method
/// to the kind's own type.
pub trait Carrier {
    /// The most bytes it writes in front of a UDP payload; the relay keeps
    /// [`UDP_HEADROOM`] (the most of any kind) free in front of each.
    const UDP_HEADER: usize;

    /// The config's `type`, as logs name it: `"direct"`, `"socks5"`...
    fn type_name(&self) -> &'static str;

    /// The type the Clash API shows: `"Direct"`, `"Socks5"`, `"Http"`,
    /// `"Reject"`, `"Selector"`, `"Fallback"`.
    fn clash_type(&self) -> &'static str;

    /// Whether it takes UDP flows, as the Clash API shows it (`block`
    /// takes them and drops them).
    fn udp(&self) -> bool;

    /// Why it refuses every UDP datagram, if it does; known without any
    /// I/O, so the UDP relay asks before opening a session.
    fn udp_refusal(&self) -> Option<OutboundError>;

    /// How DNS through it travels.
    fn dns_transport(&self) -> DnsTransport;

    /// Opens a TCP connection to `dst`. `host` is the flow's sniffed host
    /// name, if any: kinds that can name a destination (with
    /// `send_domain`) send it instead of `dst` when it passes
    /// [`crate::hostname::is_host_name`]. A kind that hands over the bare
    /// socket returns [`TcpUpstream::Plain`]; a kind that frames the
    /// stream returns its own arm (its `tcp` type in the list of kinds).
    fn connect_tcp<'a>(
        &'a self,
        dst: SocketAddr,
        host: Option<&'a str>,
    ) -> impl Future<Output = Result<TcpUpstream, OutboundError>> + Send + 'a;

    /// Opens a TCP connection to `name`, port `port`, for a flow to a
    /// fake-ip address (which must never be dialed): kinds that can name a
    /// destination send the name whatever their `send_domain`; `direct`
    /// connects to the real addresses `real` gives for the name.
    fn connect_tcp_named<'a>(
        &'a self,
        name: &'a str,
        port: u16,
        real: &'a dyn ResolveReal,
    ) -> impl Future<Output = Result<TcpUpstream, OutboundError>> + Send + 'a;

    /// Opens the upstream side of one UDP session.
    fn open_udp(&self) -> impl Future<Output = Result<UdpUpstream, OutboundError>> + Send + '_;

    /// Whether its UDP upstreams can address a datagram to a name
    /// ([`UdpCarrier::try_send_named`]): a fake-ip flow through it then
    /// goes by name and the server resolves it; through the others
    /// (`direct`) the relay resolves the name first.
    fn udp_by_name(&self) -> bool {
        false
    }

    /// Whether the upstream answers: at start (the result is only
    /// logged), as a failover group's health check, and the API's delay
    /// test.
    fn probe(&self) -> impl Future<Output = Result<(), OutboundError>> + Send + '_;
}

/// The hook that turns a name into its real addresses, for flows to a
/// fake address carried by `direct` (`dns::fakeip`). The DNS engine
/// implements it: it must ask the real resolvers (the DNS rules' choice for the name), never the
/// fake pool, and answer within its own timeout (empty on failure).
pub trait ResolveReal: Send + Sync + 'static {
    fn resolve_real<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Vec<std::net::IpAddr>>;
}

/// Connects a marked TCP socket to `dst`.
pub async fn connect_marked(dst: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = sys::outbound_tcp_socket(&dst, mark)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    socket.connect(dst).await
}

/// Makes, from the list in `kinds!` ([`kinds`]), the run-time side: the
/// [`Outbound`] enum (one arm per carrier), every carrier's
/// [`Carrier::UDP_HEADER`], the [`TcpUpstream`] and [`UdpUpstream`] enums.
macro_rules! run_time_side {
    ([$($kind:ident($settings:ty) => $arm:ident $(($carrier:ty $(, tcp $tcp:ty)? $(, udp $udp:ty)?))?),* $(,)?]) => {
        /// One configured outbound: an arm per carrier in the list of kinds
        /// (`kinds!` in [`kinds`]), each only delegating to the kind's type.
        #[derive(Debug)]
        pub enum Outbound {
            $($($arm($carrier),)?)*
        }

        /// The [`Carrier::UDP_HEADER`] of every arm of [`Outbound`].
        const UDP_HEADERS: &[usize] = &[$($(<$carrier as Carrier>::UDP_HEADER,)?)*];

        /// The upstream side of a TCP flow. `Plain` is a bare socket, for
        /// the kinds that hand the connection over once their handshake is
        /// done (direct, socks5, http): the relay splices it. Every
        /// carrier that names a `tcp` type in the list of kinds (a kind
        /// that frames the byte stream, so the relay cannot splice) gets
        /// an arm of its own; the relay copies through it (see
        /// [`TcpCarrier`]). The dispatch is a `match`: no box, no table.
        #[derive(Debug)]
        pub enum TcpUpstream {
            Plain(TcpStream),
            $($($($arm($tcp),)?)?)*
        }

        impl TcpUpstream {
            /// The bare socket of a `Plain` upstream, which the relay
            /// splices; a framed one back as it was, which it copies.
            pub fn into_plain(self) -> Result<TcpStream, TcpUpstream> {
                match self {
                    TcpUpstream::Plain(s) => Ok(s),
                    $($($(TcpUpstream::$arm(s) => {
                        let s: $tcp = s;
                        Err(TcpUpstream::$arm(s))
                    })?)?)*
                }
            }
        }

        /// The upstream side of a UDP session: an arm per carrier that
        /// names a `udp` type in the list of kinds, each only delegating.
        /// The dispatch is this `match`, per datagram: no box, no table.
        #[derive(Debug)]
        pub enum UdpUpstream {
            $($($($arm($udp),)?)?)*
        }
    };
}
kinds::kinds!(run_time_side);

/// Why an outbound in the config cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("member {0:?} is not the name of an outbound")]
    UnknownMember(String),
    #[error("its members reach it again (a cycle)")]
    Cycle,
    #[error(transparent)]
    Group(#[from] GroupError),
}

/// Calls `$call` on the kind's own type (bound to `$o`), whatever the arm.
macro_rules! delegate {
    ($self:expr, $o:ident => $call:expr) => {
        kinds::kinds!(delegate_arms; $self, $o => $call)
    };
}

/// The `match` of [`delegate!`], one arm per carrier in the list of kinds.
macro_rules! delegate_arms {
    (
        [$($kind:ident($settings:ty) => $arm:ident $(($carrier:ty $(, tcp $tcp:ty)? $(, udp $udp:ty)?))?),* $(,)?]
        $self:expr, $o:ident => $call:expr
    ) => {
        match $self {
            $($(Outbound::$arm($o) => {
                // Typed: the line's carrier type is what the arm holds.
                let $o: &$carrier = $o;
                $call
            })?)*
        }
    };
}

impl Outbound {
    /// The config's `type` of this outbound, for logs.
    pub fn name(&self) -> &'static str {
        delegate!(self, o => o.type_name())
    }

    /// The type the Clash API shows.
    pub fn clash_type(&self) -> &'static str {
        delegate!(self, o => o.clash_type())
    }

    /// Whether it takes UDP flows, as the Clash API shows it.
    pub fn udp(&self) -> bool {
        delegate!(self, o => o.udp())
    }

    /// How DNS through it travels.
    pub fn dns_transport(&self) -> DnsTransport {
        delegate!(self, o => o.dns_transport())
    }

    /// Opens a TCP connection to `dst` through this outbound; see
    /// [`Carrier::connect_tcp`].
    pub async fn connect_tcp(
        &self,
        dst: SocketAddr,
        host: Option<&str>,
    ) -> Result<TcpUpstream, OutboundError> {
        // Every kind connects through `connect_marked`, whose socket has
        // TCP_NODELAY before it connects: not set again here. The
        // proxies box their handshakes themselves (kilobytes of state), so
        // that this future, which every flow's task holds, stays the size
        // of a direct connect (`the_connect_future_stays_small`).
        delegate!(self, o => o.connect_tcp(dst, host).await)
    }

    /// Opens a TCP connection to `name`:`port` (a fake-ip flow); see
    /// [`Carrier::connect_tcp_named`].
    pub async fn connect_tcp_named(
        &self,
        name: &str,
        port: u16,
        real: &dyn ResolveReal,
    ) -> Result<TcpUpstream, OutboundError> {
        // Checked once here for every kind: a name that goes on the wire
        // (SOCKS5, CONNECT, a shadowsocks header) or to the resolver.
        if !crate::hostname::is_host_name(name) {
            return Err(OutboundError::FakeName {
                name: name.to_string(),
                why: "not a host name",
            });
        }
        delegate!(self, o => o.connect_tcp_named(name, port, real).await)
    }

    /// Why this outbound refuses every UDP datagram, if it does; known
    /// without any I/O, so the UDP relay asks before opening a session.
    pub fn udp_refusal(&self) -> Option<OutboundError> {
        delegate!(self, o => o.udp_refusal())
    }

    /// Whether a fake-ip datagram through it goes by name; see
    /// [`Carrier::udp_by_name`].
    pub fn udp_by_name(&self) -> bool {
        delegate!(self, o => o.udp_by_name())
    }

    /// Opens the upstream side of one UDP session.
    pub async fn open_udp(&self) -> Result<UdpUpstream, OutboundError> {
        if let Some(refusal) = self.udp_refusal() {
            return Err(refusal);
        }
        delegate!(self, o => o.open_udp().await)
    }

    /// Whether the upstream answers: at start (the result is only logged;
    /// flows fail fast until it is back) and as a failover group's health
    /// check. Direct and block have no upstream to fail; a group's members
    /// are checked on their own.
    pub async fn probe(&self) -> Result<(), OutboundError> {
        delegate!(self, o => o.probe().await)
    }
}

/// The largest of `values` (0 for none), usable in a `const`.
const fn max_of(values: &[usize]) -> usize {
    let mut max = 0;
    let mut i = 0;
    while i < values.len() {
        if values[i] > max {
            max = values[i];
        }
        i += 1;
    }
    max
}

/// Room kept in front of every UDP payload so that any kind's header can
/// be written in place, without copying the payload: the largest
/// [`Carrier::UDP_HEADER`] of all kinds.
pub const UDP_HEADROOM: usize = max_of(UDP_HEADERS);

/// Largest UDP payload the IP layer carries to an address of this family:
/// 65,535 less the IPv4 header and the UDP header's 8 (IPv6's length
/// field leaves its own header out).
pub fn ip_udp_max(dst: SocketAddr) -> usize {
    if dst.is_ipv4() {
        65_535 - 20 - 8
    } else {
        65_535 - 8
    }
}

/// What the stream of a kind that frames TCP (its `tcp` type in the list
/// of kinds) is: a byte stream of the flow's payload, read and written
/// through tokio's traits, over one TCP socket. [`TcpUpstream`] delegates
/// to it, and the relay copies through it (splice cannot see inside a
/// framing) with the same semantics as the splice path:
///
/// - `poll_read` is polled from the start, before the client sends
///   anything, and whenever the relay waits: a stream that must send
///   something of its own (a request header a server-first protocol needs
///   before the client speaks) does it from there, with its own timer.
/// - `poll_write` may keep bytes in the stream's buffers: the relay calls
///   `poll_flush` whenever the client has nothing more for the moment,
///   and `poll_shutdown` (which flushes, then sends a FIN) when the client
///   half-closes.
/// - `Ok(0)` from `poll_read` is the upstream's FIN (passed on to the
///   client as a half-close); an error ends the flow and resets the client.
///
/// Keep it small (a few words, large state behind a `Box`): the flow's
/// task holds a [`TcpUpstream`] as long as the flow lives.
pub trait TcpCarrier: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug {
    /// The TCP socket under the framing: the relay resets it when a flow is
    /// cut (tproxyd stopping, a flow closed from the API).
    fn socket(&self) -> &TcpStream;

    /// The most the relay should hand one `poll_write` (never more than its
    /// buffer): a framing that seals chunks of a fixed limit wants a
    /// multiple of it, so a full read never leaves a runt chunk behind.
    fn write_batch(&self) -> usize {
        usize::MAX
    }
}

impl TcpCarrier for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

/// Calls `$call` on the stream inside a [`TcpUpstream`] (bound to `$s`, a
/// `&mut` or `&`, as `$self` is), whatever the arm.
macro_rules! delegate_tcp {
    ($self:expr, $s:ident => $call:expr) => {
        kinds::kinds!(delegate_tcp_arms; $self, $s => $call)
    };
}

/// The `match` of [`delegate_tcp!`]: `Plain`, then one arm per `tcp` type
/// in the list of kinds.
macro_rules! delegate_tcp_arms {
    (
        [$($kind:ident($settings:ty) => $arm:ident $(($carrier:ty $(, tcp $tcp:ty)? $(, udp $udp:ty)?))?),* $(,)?]
        $self:expr, $s:ident => $call:expr
    ) => {
        match $self {
            TcpUpstream::Plain($s) => $call,
            $($($(TcpUpstream::$arm($s) => {
                // Names the line's `tcp` type, which the repetition needs.
                let _: &$tcp = &*$s;
                $call
            })?)?)*
        }
    };
}

impl TcpUpstream {
    /// The TCP socket under it (the stream itself for `Plain`).
    pub fn socket(&self) -> &TcpStream {
        delegate_tcp!(self, s => TcpCarrier::socket(s))
    }
}

impl TcpCarrier for TcpUpstream {
    fn socket(&self) -> &TcpStream {
        TcpUpstream::socket(self)
    }

    fn write_batch(&self) -> usize {
        delegate_tcp!(self, s => TcpCarrier::write_batch(s))
    }
}

impl AsyncRead for TcpUpstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate_tcp!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for TcpUpstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate_tcp!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate_tcp!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        delegate_tcp!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        delegate_tcp!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        delegate_tcp!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// What one kind's UDP upstream does; [`UdpUpstream`] delegates to it.
pub trait UdpCarrier {
    /// The socket datagrams leave and arrive on.
    fn socket(&self) -> &tokio::net::UdpSocket;

    /// The largest payload to `dst` that still fits one datagram through
    /// this upstream, its header included.
    fn max_payload(&self, dst: SocketAddr) -> usize;

    /// Sends `buf[UDP_HEADROOM..]` to `dst`, never waiting; the headroom
    /// is scratch space.
    fn try_send(&self, buf: &mut [u8], dst: SocketAddr) -> io::Result<()>;

    /// Sends a run of `segment`-byte payloads to `dst` in one call, never
    /// waiting; `scratch` holds the run laid out again if headers must go
    /// in between.
    fn try_send_segments(
        &self,
        payloads: &[u8],
        segment: usize,
        dst: SocketAddr,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()>;

    /// Sends `buf[UDP_HEADROOM..]` to `name`:`port` (a fake-ip
    /// destination; the server resolves the name), never waiting. A name
    /// whose header does not fit the headroom is laid out again in a
    /// buffer of its own. Only kinds whose carrier says
    /// [`Carrier::udp_by_name`] implement it; the others refuse.
    fn try_send_named(&self, buf: &mut [u8], name: &str, port: u16) -> io::Result<()> {
        let _ = (buf, port);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this upstream cannot send to a name ({name})"),
        ))
    }

    /// Receives one datagram, never waiting.
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<UdpRecv>;

    /// Resolves when the upstream can no longer carry datagrams, with the
    /// reason.
    fn closed(&self) -> impl Future<Output = String> + Send + '_;
}

/// What one read from the upstream gave.
#[derive(Debug, PartialEq, Eq)]
pub enum UdpRecv {
    /// A datagram from `from`, payload at `buf[start..end]`.
    Datagram {
        from: SocketAddr,
        start: usize,
        end: usize,
    },
    /// A datagram whose source the server named by domain (an answer to
    /// a datagram sent by name): the name at `buf[name]`, its port, the
    /// payload at `buf[start..end]`. Only a fake-ip destination can claim
    /// it; the relay drops it otherwise.
    Named {
        name: Range<usize>,
        port: u16,
        start: usize,
        end: usize,
    },
    /// Something that is not a usable datagram (fragment, bad header);
    /// the reason, for the debug log.
    Dropped(String),
}

/// Calls `$call` on the kind's own UDP upstream (bound to `$u`),
/// whatever the arm.
macro_rules! delegate_udp {
    ($self:expr, $u:ident => $call:expr) => {
        kinds::kinds!(delegate_udp_arms; $self, $u => $call)
    };
}

/// The `match` of [`delegate_udp!`], one arm per UDP upstream in the list
/// of kinds.
macro_rules! delegate_udp_arms {
    (
        [$($kind:ident($settings:ty) => $arm:ident $(($carrier:ty $(, tcp $tcp:ty)? $(, udp $udp:ty)?))?),* $(,)?]
        $self:expr, $u:ident => $call:expr
    ) => {
        match $self {
            $($($(UdpUpstream::$arm($u) => {
                let $u: &$udp = $u;
                $call
            })?)?)*
        }
    };
}

impl UdpUpstream {
    fn socket(&self) -> &tokio::net::UdpSocket {
        delegate_udp!(self, u => u.socket())
    }

    /// The largest payload to `dst` that still fits one datagram through
    /// this upstream, header included.
    pub fn max_payload(&self, dst: SocketAddr) -> usize {
        delegate_udp!(self, u => u.max_payload(dst))
    }

    /// Sends `buf[UDP_HEADROOM..]` to `dst`, waiting while the socket's
    /// buffer is full; the headroom is scratch space.
    pub async fn send(&self, buf: &mut [u8], dst: SocketAddr) -> io::Result<()> {
        loop {
            self.socket().writable().await?;
            match self.try_send(buf, dst) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Sends `buf[UDP_HEADROOM..]` to `dst`, or by `name` to its port
    /// when given (a fake-ip destination `dst`; see
    /// [`UdpCarrier::try_send_named`]), waiting while the socket's buffer
    /// is full.
    pub async fn send_to(
        &self,
        buf: &mut [u8],
        dst: SocketAddr,
        name: Option<&str>,
    ) -> io::Result<()> {
        loop {
            self.socket().writable().await?;
            match self.try_send_to(buf, dst, name) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// [`send_to`](Self::send_to) without waiting.
    pub fn try_send_to(
        &self,
        buf: &mut [u8],
        dst: SocketAddr,
        name: Option<&str>,
    ) -> io::Result<()> {
        match name {
            Some(name) => delegate_udp!(self, u => u.try_send_named(buf, name, dst.port())),
            None => self.try_send(buf, dst),
        }
    }

    /// Like [`send`](Self::send) but never waits: `WouldBlock` when the
    /// socket's buffer is full. The inbound uses it to send a datagram of
    /// an established session itself, without a hop to the session's task.
    pub fn try_send(&self, buf: &mut [u8], dst: SocketAddr) -> io::Result<()> {
        delegate_udp!(self, u => u.try_send(buf, dst))
    }

    /// Sends a run of datagrams to `dst` in one call, never waiting:
    /// `payloads` holds them back to back, each `segment` bytes long (the
    /// last may be shorter). All or nothing, as [`sys::send_segments`].
    pub fn try_send_segments(
        &self,
        payloads: &[u8],
        segment: usize,
        dst: SocketAddr,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        delegate_udp!(self, u => u.try_send_segments(payloads, segment, dst, scratch))
    }

    /// Receives one datagram from any remote into `buf`.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<UdpRecv> {
        loop {
            self.readable().await?;
            match self.try_recv(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Resolves when a datagram is waiting, without needing a buffer: a
    /// session holds its 64 KiB receive buffer only while replies flow.
    pub async fn readable(&self) -> io::Result<()> {
        self.socket().readable().await
    }

    /// Like [`recv`](Self::recv) but never waits: `WouldBlock` when no
    /// datagram is waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<UdpRecv> {
        delegate_udp!(self, u => u.try_recv(buf))
    }

    /// Resolves when the upstream can no longer carry datagrams (the
    /// SOCKS5 control connection closed). Never resolves for `direct`.
    pub async fn closed(&self) -> String {
        delegate_udp!(self, u => u.closed().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_headroom_fits_every_kinds_header() {
        assert_eq!(UDP_HEADROOM, shadowsocks::udp::MAX_HEADER);
        for room in UDP_HEADERS {
            assert!(*room <= UDP_HEADROOM);
        }
    }

    #[test]
    fn errors_say_their_failure() {
        let dst: SocketAddr = "198.51.100.10:7".parse().unwrap();
        let io = |code| io::Error::from_raw_os_error(code);
        let cases = [
            (OutboundError::Blocked, Failure::Refused),
            (OutboundError::TcpOnly { server: dst }, Failure::Refused),
            (
                OutboundError::ConnectTimeout { dst, secs: 1 },
                Failure::DestinationTimeout,
            ),
            (
                OutboundError::Connect {
                    dst,
                    source: io(libc::ECONNREFUSED),
                },
                Failure::DestinationRefused,
            ),
            (
                OutboundError::Connect {
                    dst,
                    source: io(libc::EMFILE),
                },
                Failure::OutOfDescriptors,
            ),
            (
                Socks5Error::Timeout {
                    server: dst,
                    secs: 1,
                }
                .into(),
                Failure::ProxyTimeout,
            ),
            (
                Socks5Error::Unreachable {
                    server: dst,
                    source: io(libc::ENFILE),
                }
                .into(),
                Failure::OutOfDescriptors,
            ),
            (
                HttpError::Timeout {
                    server: dst,
                    secs: 1,
                }
                .into(),
                Failure::ProxyTimeout,
            ),
            (
                HttpError::Refused {
                    server: dst,
                    target: dst.to_string(),
                    status: 502,
                    reason: "Bad Gateway".into(),
                }
                .into(),
                Failure::DestinationRefused,
            ),
            (
                HttpError::Refused {
                    server: dst,
                    target: dst.to_string(),
                    status: 403,
                    reason: "Forbidden".into(),
                }
                .into(),
                Failure::ProxyFailed,
            ),
        ];
        for (e, failure) in cases {
            assert_eq!(e.failure(), failure, "{e}");
            assert_eq!(e.is_refusal(), failure == Failure::Refused, "{e}");
        }
    }

    /// A flow's task holds its upstream for the flow's life: a framed
    /// kind keeps its large state (ciphers, buffers) behind a `Box`.
    #[test]
    fn the_tcp_upstream_stays_small() {
        let size = std::mem::size_of::<TcpUpstream>();
        assert!(size <= 128, "TcpUpstream is {size} bytes");
    }

    #[test]
    fn the_largest_payload_leaves_room_for_the_header() {
        let v4: SocketAddr = "198.51.100.10:53".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
        assert_eq!(ip_udp_max(v4), 65_507);
        assert_eq!(ip_udp_max(v6), 65_527);
        // Through SOCKS5 to a relay on IPv4: 10 bytes of header to an IPv4
        // destination, 22 to IPv6.
        assert_eq!(ip_udp_max(v4) - socks5::proto::udp_header_len(&v4), 65_497);
        assert_eq!(ip_udp_max(v4) - socks5::proto::udp_header_len(&v6), 65_485);
    }

    /// Resolves every name to the addresses it was made with.
    struct FixedResolver(Vec<std::net::IpAddr>);

    impl ResolveReal for FixedResolver {
        fn resolve_real<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Vec<std::net::IpAddr>> {
            let addrs = self.0.clone();
            Box::pin(async move { addrs })
        }
    }

    fn built(toml_text: &str) -> Outbound {
        let ctx = Context {
            mark: 0,
            connect_timeout: Duration::from_secs(2),
        };
        let raw: kinds::RawOutbound = toml::from_str(toml_text).unwrap();
        raw.validate("outbound", "x".into(), &|_| None, &mut |k, m| {
            panic!("{k}: {m}")
        })
        .kind
        .build("x", &ctx, Vec::new())
        .unwrap()
    }

    /// A fake-ip flow goes by name through a proxy even without
    /// `send_domain`, and `direct` dials the real address the DNS engine
    /// gives; nothing ever dials the fake address.
    #[tokio::test]
    async fn fake_ip_flows_go_by_name() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let none = FixedResolver(Vec::new());

        // SOCKS5: the request names the domain (ATYP 3).
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = server.local_addr().unwrap();
        let seen = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut greeting = [0u8; 3];
            s.read_exact(&mut greeting).await.unwrap();
            s.write_all(&[5, 0]).await.unwrap();
            let mut head = [0u8; 5];
            s.read_exact(&mut head).await.unwrap();
            let mut rest = vec![0u8; head[4] as usize + 2];
            s.read_exact(&mut rest).await.unwrap();
            s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
            (head, rest)
        });
        let socks = built(&format!(
            "type = \"socks5\"\nserver = \"{at}\"\nsend_domain = false"
        ));
        // A name that is no host name never reaches the wire (nor the
        // server: the one connection it accepts is the next one's).
        for bad in ["", "bad name", "a..example", "1.2.3.4"] {
            let e = socks.connect_tcp_named(bad, 443, &none).await.unwrap_err();
            assert!(matches!(e, OutboundError::FakeName { .. }), "{bad:?}: {e}");
        }
        socks
            .connect_tcp_named("www.example.com", 443, &none)
            .await
            .unwrap();
        let (head, rest) = seen.await.unwrap();
        assert_eq!(&head[..4], &[5, 1, 0, 3]);
        assert_eq!(&rest[..rest.len() - 2], b"www.example.com");
        assert_eq!(&rest[rest.len() - 2..], &443u16.to_be_bytes());

        // HTTP: CONNECT names the host.
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = server.local_addr().unwrap();
        let seen = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
            String::from_utf8(got).unwrap()
        });
        let http = built(&format!("type = \"http\"\nserver = \"{at}\""));
        http.connect_tcp_named("www.example.com", 8443, &none)
            .await
            .unwrap();
        assert!(seen
            .await
            .unwrap()
            .starts_with("CONNECT www.example.com:8443 "));

        // direct: the real address from the hook; none found: an error
        // that names the name, and no connection anywhere.
        let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = target.local_addr().unwrap().port();
        let direct = built("type = \"direct\"");
        let real = FixedResolver(vec!["127.0.0.1".parse().unwrap()]);
        direct
            .connect_tcp_named("www.example.com", port, &real)
            .await
            .unwrap();
        target.accept().await.unwrap();
        let e = direct
            .connect_tcp_named("www.example.com", port, &none)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("www.example.com"), "{e}");
        assert_eq!(e.failure(), Failure::DestinationRefused);

        // block stays blocked.
        let block = built("type = \"block\"");
        assert!(matches!(
            block.connect_tcp_named("www.example.com", 443, &real).await,
            Err(OutboundError::Blocked)
        ));
    }
}
