//! `direct`: straight to the destination, from a socket with tproxyd's
//! mark. UDP goes through one dual-stack socket per session, which is
//! what makes a session full cone.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use serde::Deserialize;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::group::Member;
use super::kinds::Kind;
use super::{
    connect_marked, ip_udp_max, BuildError, Carrier, Context, DnsTransport, OutboundError,
    TcpUpstream, UdpCarrier, UdpRecv, UdpUpstream, UDP_HEADROOM,
};
use crate::sys;

/// `[[outbounds]] type = "direct"` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub name: Option<String>,
}

/// A `direct` outbound's settings: none beyond the [`Context`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings;

impl Kind for Settings {
    type Raw = Raw;
    type Built = Direct;
    const TYPE: &'static str = "direct";

    fn validate(
        _: &Raw,
        _: &str,
        _: &dyn Fn(&str) -> Option<String>,
        _: &mut dyn FnMut(&str, String),
    ) -> Settings {
        Settings
    }

    fn build(&self, _name: &str, ctx: &Context, _: Vec<Member>) -> Result<Direct, BuildError> {
        Ok(Direct::new(ctx))
    }
}

/// The `direct` outbound.
#[derive(Debug, Clone)]
pub struct Direct {
    pub mark: u32,
    pub connect_timeout: std::time::Duration,
}

impl Direct {
    pub fn new(ctx: &Context) -> Direct {
        Direct {
            mark: ctx.mark,
            connect_timeout: ctx.connect_timeout,
        }
    }
}

impl Carrier for Direct {
    const UDP_HEADER: usize = 0;

    fn type_name(&self) -> &'static str {
        // One spelling: the config's `type`, from the kind's settings.
        <Settings as Kind>::TYPE
    }

    fn clash_type(&self) -> &'static str {
        "Direct"
    }

    fn udp(&self) -> bool {
        true
    }

    fn udp_refusal(&self) -> Option<OutboundError> {
        None
    }

    fn dns_transport(&self) -> DnsTransport {
        DnsTransport::Udp
    }

    async fn connect_tcp(
        &self,
        dst: SocketAddr,
        _host: Option<&str>,
    ) -> Result<TcpUpstream, OutboundError> {
        match tokio::time::timeout(self.connect_timeout, connect_marked(dst, self.mark)).await {
            Err(_) => Err(OutboundError::ConnectTimeout {
                dst,
                secs: self.connect_timeout.as_secs(),
            }),
            Ok(Err(source)) => Err(OutboundError::Connect { dst, source }),
            Ok(Ok(s)) => Ok(TcpUpstream::Plain(s)),
        }
    }

    /// The name's real addresses from the DNS engine, tried in turn.
    async fn connect_tcp_named(
        &self,
        name: &str,
        port: u16,
        real: &dyn crate::outbound::ResolveReal,
    ) -> Result<TcpUpstream, OutboundError> {
        let addrs = real.resolve_real(name).await;
        let mut last = OutboundError::FakeName {
            name: name.to_string(),
            why: "the DNS engine found no real address for it",
        };
        for ip in addrs {
            match self.connect_tcp(SocketAddr::new(ip, port), None).await {
                Ok(up) => return Ok(up),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn open_udp(&self) -> Result<UdpUpstream, OutboundError> {
        // One dual-stack socket reaches every destination of the session,
        // v4 and v6: that is what makes it full cone.
        let any: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
        let socket =
            sys::outbound_udp_socket(&any, true, self.mark).map_err(OutboundError::UdpSocket)?;
        let socket = UdpSocket::from_std(socket).map_err(OutboundError::UdpSocket)?;
        Ok(UdpUpstream::Direct(DirectUdp(socket)))
    }

    /// No upstream to fail.
    async fn probe(&self) -> Result<(), OutboundError> {
        Ok(())
    }
}

/// A `direct` UDP session's socket.
#[derive(Debug)]
pub struct DirectUdp(pub UdpSocket);

impl UdpCarrier for DirectUdp {
    fn socket(&self) -> &UdpSocket {
        &self.0
    }

    fn max_payload(&self, dst: SocketAddr) -> usize {
        ip_udp_max(dst)
    }

    fn try_send(&self, buf: &mut [u8], dst: SocketAddr) -> io::Result<()> {
        self.0.try_send_to(&buf[UDP_HEADROOM..], sys::to_v6(dst))?;
        Ok(())
    }

    fn try_send_segments(
        &self,
        payloads: &[u8],
        segment: usize,
        dst: SocketAddr,
        _scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let to = Some(sys::to_v6(dst));
        self.0.try_io(Interest::WRITABLE, || {
            sys::send_segments(&self.0, payloads, segment, to)
        })?;
        Ok(())
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<UdpRecv> {
        let (n, from) = self.0.try_recv_from(buf)?;
        Ok(UdpRecv::Datagram {
            from: sys::normalize(from),
            start: 0,
            end: n,
        })
    }

    fn closed(&self) -> impl Future<Output = String> + Send + '_ {
        std::future::pending()
    }
}
