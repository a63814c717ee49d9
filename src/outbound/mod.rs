//! Outbounds: where a flow goes once the route decision has picked one.
//!
//! Every socket opened here toward the network carries the configured
//! `SO_MARK`, so the firewall rules let it pass instead of capturing
//! tproxyd's own traffic again.

pub mod group;
pub mod http;
pub mod socks5;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::config::{OutboundKind, Timeouts};
use crate::registry::EndReason;
use crate::sys;
use group::{Group, GroupError};
use http::{HttpClient, HttpError};
use socks5::proto::{self, Address};
use socks5::{Socks5Client, Socks5Error, UdpAssociation};

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
    /// The `block` outbound: refused on purpose, not a fault.
    #[error("blocked by rule")]
    Blocked,
    #[error(
        "the http outbound (proxy {server}) carries TCP only: HTTP CONNECT has no UDP; \
         send UDP elsewhere with a rule (network = \"udp\", outbound = ...)"
    )]
    TcpOnly { server: SocketAddr },
}

impl OutboundError {
    /// Whether the configuration refused the flow (block, UDP to an http
    /// outbound) rather than an upstream failing: such a refusal says
    /// nothing about the upstream's health and must not trigger back-off.
    pub fn is_refusal(&self) -> bool {
        matches!(self, OutboundError::Blocked | OutboundError::TcpOnly { .. })
    }

    /// Why a flow that failed to connect ended, as the registry counts it:
    /// the destination said no, something took too long, or the proxy
    /// itself failed.
    pub fn end_reason(&self) -> EndReason {
        match self {
            OutboundError::Blocked | OutboundError::TcpOnly { .. } => EndReason::Blocked,
            OutboundError::ConnectTimeout { .. }
            | OutboundError::Socks5(Socks5Error::Timeout { .. }) => EndReason::ConnectTimeout,
            OutboundError::Connect { .. } | OutboundError::Socks5(Socks5Error::Rejected { .. }) => {
                EndReason::UpstreamRefused
            }
            OutboundError::Http(h) if h.is_destination_failure() => EndReason::UpstreamRefused,
            _ => EndReason::ProxyFailed,
        }
    }
}

/// Connects a marked TCP socket to `dst`.
pub async fn connect_marked(dst: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = sys::outbound_tcp_socket(&dst, mark)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    socket.connect(dst).await
}

/// One configured outbound.
#[derive(Debug)]
pub enum Outbound {
    Direct {
        mark: u32,
        connect_timeout: Duration,
    },
    Socks5(Socks5Client),
    Http(HttpClient),
    /// TCP: refused at once (the client gets a reset); UDP: dropped.
    Block,
    /// Stands for one of its members; the policy resolves it per flow.
    Group(Group),
}

/// Why an outbound in the config cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("outbound type {0:?} is not available in this build yet")]
    Unsupported(&'static str),
    #[error("member {0:?} is not the name of an outbound")]
    UnknownMember(String),
    #[error("its members reach it again (a cycle)")]
    Cycle,
    #[error(transparent)]
    Group(#[from] GroupError),
}

impl Outbound {
    /// The outbound a config entry describes; every socket it opens carries
    /// `mark`.
    pub fn from_kind(
        kind: &OutboundKind,
        mark: u32,
        timeouts: &Timeouts,
    ) -> Result<Self, BuildError> {
        match kind {
            OutboundKind::Direct => Ok(Outbound::Direct {
                mark,
                connect_timeout: timeouts.connect,
            }),
            OutboundKind::Socks5 {
                server,
                auth,
                send_domain,
                ..
            } => Ok(Outbound::Socks5(Socks5Client {
                server: *server,
                auth: auth.clone(),
                mark,
                connect_timeout: timeouts.connect,
                send_domain: *send_domain,
            })),
            OutboundKind::Http {
                server,
                auth,
                send_domain,
            } => Ok(Outbound::Http(HttpClient::new(
                *server,
                auth.clone(),
                *send_domain,
                mark,
                timeouts.connect,
            ))),
            OutboundKind::Block => Ok(Outbound::Block),
            // Groups need their members built first: the policy builds
            // them (see `Policy::from_config`).
            other => Err(BuildError::Unsupported(other.type_name())),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Outbound::Direct { .. } => "direct",
            Outbound::Socks5(_) => "socks5",
            Outbound::Http(_) => "http",
            Outbound::Block => "block",
            Outbound::Group(g) => g.kind.type_name(),
        }
    }

    /// Opens a TCP connection to `dst` through this outbound. `host` is the
    /// flow's sniffed host name, if any: outbounds that can name a
    /// destination (SOCKS5 with `send_domain`) send it instead of `dst`;
    /// the others connect to `dst` (route-only sniffing).
    pub async fn connect_tcp(
        &self,
        dst: SocketAddr,
        host: Option<&str>,
    ) -> Result<TcpStream, OutboundError> {
        match self {
            Outbound::Direct {
                mark,
                connect_timeout,
            } => match tokio::time::timeout(*connect_timeout, connect_marked(dst, *mark)).await {
                Err(_) => Err(OutboundError::ConnectTimeout {
                    dst,
                    secs: connect_timeout.as_secs(),
                }),
                Ok(Err(source)) => Err(OutboundError::Connect { dst, source }),
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    Ok(s)
                }
            },
            Outbound::Socks5(client) => {
                let s = client.connect_to(client.target(dst, host)).await?;
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Outbound::Http(client) => {
                let s = client.connect(dst, host).await?;
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Outbound::Block => Err(OutboundError::Blocked),
            // The policy hands out leaves; a group reached here anyway
            // goes to its member of the moment. Boxed: recursion.
            Outbound::Group(g) => {
                let member = Arc::clone(&g.selected().outbound);
                Box::pin(member.connect_tcp(dst, host)).await
            }
        }
    }

    /// Why this outbound refuses every UDP datagram, if it does; known
    /// without any I/O, so the UDP relay asks before opening a session.
    pub fn udp_refusal(&self) -> Option<OutboundError> {
        match self {
            Outbound::Block => Some(OutboundError::Blocked),
            Outbound::Http(client) => Some(OutboundError::TcpOnly {
                server: client.server,
            }),
            Outbound::Group(g) => g.selected().outbound.udp_refusal(),
            Outbound::Direct { .. } | Outbound::Socks5(_) => None,
        }
    }

    /// Opens the upstream side of one UDP session.
    pub async fn open_udp(&self) -> Result<UdpUpstream, OutboundError> {
        if let Some(refusal) = self.udp_refusal() {
            return Err(refusal);
        }
        match self {
            Outbound::Direct { mark, .. } => {
                // One dual-stack socket reaches every destination of the
                // session, v4 and v6: that is what makes it full cone.
                let any: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
                let socket = sys::outbound_udp_socket(&any, true, *mark)
                    .map_err(OutboundError::UdpSocket)?;
                let socket = UdpSocket::from_std(socket).map_err(OutboundError::UdpSocket)?;
                Ok(UdpUpstream::Direct(socket))
            }
            Outbound::Socks5(client) => Ok(UdpUpstream::Socks5(client.udp_associate().await?)),
            Outbound::Group(g) => {
                let member = Arc::clone(&g.selected().outbound);
                Box::pin(member.open_udp()).await
            }
            // Refused above.
            Outbound::Http(_) | Outbound::Block => Err(OutboundError::Blocked),
        }
    }

    /// Whether the upstream answers: at start (the result is only logged;
    /// flows fail fast until it is back) and as a failover group's health
    /// check. SOCKS5: connect and greeting (and login, if configured), so
    /// a server that accepts connections but not us counts as down. HTTP:
    /// a TCP connect (a CONNECT to the proxy itself would prove nothing
    /// more). Direct and block have no upstream to fail; a group's members
    /// are checked on their own.
    pub async fn probe(&self) -> Result<(), OutboundError> {
        match self {
            Outbound::Direct { .. } | Outbound::Block | Outbound::Group(_) => Ok(()),
            Outbound::Socks5(client) => Ok(client.check().await?),
            Outbound::Http(client) => Ok(client.reachable().await?),
        }
    }
}

/// Room kept in front of every UDP payload so the SOCKS5 header can be
/// written in place, without copying the payload.
pub const UDP_HEADROOM: usize = proto::MAX_UDP_HEADER;

/// The upstream side of a UDP session.
#[derive(Debug)]
pub enum UdpUpstream {
    Direct(UdpSocket),
    Socks5(UdpAssociation),
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
    /// Something that is not a usable datagram (fragment, bad header,
    /// domain source); the reason, for the debug log.
    Dropped(String),
}

impl UdpUpstream {
    fn socket(&self) -> &UdpSocket {
        match self {
            UdpUpstream::Direct(socket) => socket,
            UdpUpstream::Socks5(assoc) => &assoc.socket,
        }
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

    /// Like [`send`](Self::send) but never waits: `WouldBlock` when the
    /// socket's buffer is full. The inbound uses it to send a datagram of
    /// an established session itself, without a hop to the session's task.
    pub fn try_send(&self, buf: &mut [u8], dst: SocketAddr) -> io::Result<()> {
        match self {
            UdpUpstream::Direct(socket) => {
                socket.try_send_to(&buf[UDP_HEADROOM..], sys::to_v6(dst))?;
            }
            UdpUpstream::Socks5(assoc) => {
                let start = UDP_HEADROOM - proto::udp_header_len(&dst);
                proto::write_udp_header(&mut buf[start..UDP_HEADROOM], &dst);
                assoc.socket.try_send(&buf[start..])?;
            }
        }
        Ok(())
    }

    /// Sends a run of datagrams to `dst` in one call, never waiting:
    /// `payloads` holds them back to back, each `segment` bytes long (the
    /// last may be shorter). Through SOCKS5 each needs its own header in
    /// front, so the run is laid out again in `scratch`. All or nothing,
    /// as [`sys::send_segments`].
    pub fn try_send_segments(
        &self,
        payloads: &[u8],
        segment: usize,
        dst: SocketAddr,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let (socket, run, segment, to) = match self {
            UdpUpstream::Direct(socket) => (socket, payloads, segment, Some(sys::to_v6(dst))),
            UdpUpstream::Socks5(assoc) => {
                let mut header = [0u8; proto::MAX_UDP_HEADER];
                let len = proto::write_udp_header(&mut header, &dst);
                let header = &header[..len];
                scratch.clear();
                for payload in payloads.chunks(segment) {
                    scratch.extend_from_slice(header);
                    scratch.extend_from_slice(payload);
                }
                (&assoc.socket, &scratch[..], header.len() + segment, None)
            }
        };
        socket.try_io(Interest::WRITABLE, || {
            sys::send_segments(socket, run, segment, to)
        })?;
        Ok(())
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
        match self {
            UdpUpstream::Direct(socket) => {
                let (n, from) = socket.try_recv_from(buf)?;
                Ok(UdpRecv::Datagram {
                    from: sys::normalize(from),
                    start: 0,
                    end: n,
                })
            }
            UdpUpstream::Socks5(assoc) => {
                let n = assoc.socket.try_recv(buf)?;
                Ok(match proto::parse_udp_header(&buf[..n]) {
                    Ok((Address::Ip(from), start)) => UdpRecv::Datagram {
                        from: sys::normalize(from),
                        start,
                        end: n,
                    },
                    Ok((Address::Domain(name, port), _)) => UdpRecv::Dropped(format!(
                        "reply from domain {name}:{port} has no address to answer from"
                    )),
                    Err(e) => {
                        UdpRecv::Dropped(format!("bad datagram from relay {}: {e}", assoc.relay))
                    }
                })
            }
        }
    }

    /// Resolves when the association can no longer carry datagrams: the
    /// SOCKS5 control connection closed. Never resolves for `direct`.
    pub async fn closed(&self) -> String {
        match self {
            UdpUpstream::Direct(_) => std::future::pending().await,
            UdpUpstream::Socks5(assoc) => {
                loop {
                    if let Err(e) = assoc.control.readable().await {
                        return format!("UDP association's control connection failed: {e}");
                    }
                    // Declared after the await, so a waiting session's
                    // task does not carry it.
                    let mut scratch = [0u8; 64];
                    match assoc.control.try_read(&mut scratch) {
                        Ok(0) => {
                            return "SOCKS5 server closed the UDP association's control connection"
                                .into()
                        }
                        // Servers send nothing here; ignore anything that comes.
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => {
                            return format!("UDP association's control connection failed: {e}")
                        }
                    }
                }
            }
        }
    }
}
