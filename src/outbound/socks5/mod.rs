//! SOCKS5 client: CONNECT and UDP ASSOCIATE (RFC 1928) with optional
//! username/password (RFC 1929). The wire format lives in [`proto`].

pub mod proto;

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UdpSocket};

use super::credentials::{self, Credentials};
use super::group::Member;
use super::kinds::{self, Kind};
use super::url::{self, UrlError};
use super::{
    connect_marked, ip_udp_max, BoxFuture, BuildError, Carrier, Context, DnsTransport, Failure,
    OutboundError, TcpUpstream, UdpCarrier, UdpRecv, UdpUpstream, UDP_HEADROOM,
};
use crate::sys;
use proto::{Address, MethodChoice, ProtoError};

/// `[[outbounds]] type = "socks5"` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub name: Option<String>,
    #[serde(deserialize_with = "super::kinds::server")]
    pub server: SocketAddr,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_env: Option<String>,
    #[serde(default)]
    pub send_domain: bool,
    #[serde(default, deserialize_with = "super::kinds::dns_over_tcp")]
    pub dns_over_tcp: bool,
}

/// A `socks5` outbound's settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub server: SocketAddr,
    pub auth: Option<Credentials>,
    /// Send the sniffed host name instead of the address (ATYP 3).
    pub send_domain: bool,
    /// Carry UDP DNS (port 53) as DNS over TCP through CONNECT, even if
    /// the server would take UDP ASSOCIATE (see `crate::dns`).
    pub dns_over_tcp: bool,
}

impl Kind for Settings {
    type Raw = Raw;
    type Built = Socks5Client;
    const TYPE: &'static str = "socks5";
    const SCHEMES: &'static [&'static str] = &["socks5", "socks5h"];

    /// `socks5://[user:password@]IP:PORT[#name]`, user and password
    /// percent-decoded; `socks5h://` (curl's name for "the proxy resolves
    /// names") also sends the sniffed host name (`send_domain`).
    fn raw_from_url(text: &str) -> Result<Raw, UrlError> {
        let parts = url::split(text)?;
        parts.no_path_or_query()?;
        let (username, password) = parts
            .credentials()?
            .map_or((None, None), |(user, password)| (Some(user), password));
        Ok(Raw {
            name: parts.name()?,
            server: parts.server()?,
            username,
            password,
            password_env: None,
            send_domain: parts.scheme.eq_ignore_ascii_case("socks5h"),
            dns_over_tcp: false,
        })
    }

    fn validate(
        raw: &Raw,
        key: &str,
        env: &dyn Fn(&str) -> Option<String>,
        issue: &mut dyn FnMut(&str, String),
    ) -> Settings {
        Settings {
            server: raw.server,
            auth: credentials::validate(
                key,
                &raw.username,
                &raw.password,
                &raw.password_env,
                env,
                issue,
            ),
            send_domain: raw.send_domain,
            dns_over_tcp: raw.dns_over_tcp,
        }
    }

    fn server(&self) -> Option<SocketAddr> {
        Some(self.server)
    }

    fn describe(&self) -> String {
        let login = kinds::login_note(self.auth.is_some());
        format!("{} {}{login}", Self::TYPE, self.server)
    }

    fn build(
        &self,
        _name: &str,
        ctx: &Context,
        _: Vec<Member>,
    ) -> Result<Socks5Client, BuildError> {
        Ok(Socks5Client::new(self, ctx))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("cannot reach SOCKS5 server {server}: {source}")]
    Unreachable {
        server: SocketAddr,
        source: io::Error,
    },
    #[error("SOCKS5 server {server} did not answer within {secs}s")]
    Timeout { server: SocketAddr, secs: u64 },
    #[error(
        "SOCKS5 server {server} closed or broke the connection during the handshake: {source}"
    )]
    Io {
        server: SocketAddr,
        source: io::Error,
    },
    #[error("SOCKS5 server {server} sent a malformed reply: {source}")]
    Protocol {
        server: SocketAddr,
        source: ProtoError,
    },
    #[error(
        "SOCKS5 server {server} accepts none of the offered methods (no-auth{}); \
         if it needs a login, set outbound.username and outbound.password (--username/--password)",
        if *.offered_user_pass { ", username/password" } else { "" }
    )]
    NoAcceptableMethod {
        server: SocketAddr,
        offered_user_pass: bool,
    },
    #[error("SOCKS5 server {server} asks for a username and password but none is configured; set --username/--password or outbound.username/password")]
    CredentialsNeeded { server: SocketAddr },
    #[error("SOCKS5 server {server} refused username {username:?}: wrong username or password (RFC 1929 status {status})")]
    AuthFailed {
        server: SocketAddr,
        username: String,
        status: u8,
    },
    #[error("SOCKS5 server {server} refused {command} to {dst}: {meaning} (reply {code})")]
    Rejected {
        server: SocketAddr,
        command: &'static str,
        dst: Address,
        code: u8,
        meaning: &'static str,
    },
    #[error(
        "SOCKS5 server {server} does not support UDP ASSOCIATE ({meaning}, reply {code}); \
         UDP cannot go through this server: use one with UDP support, or run with --tcp-only"
    )]
    UdpRefused {
        server: SocketAddr,
        code: u8,
        meaning: &'static str,
    },
    #[error("SOCKS5 server {server} named a relay by domain name ({name}); only IP relays are supported")]
    DomainRelay { server: SocketAddr, name: String },
    #[error(
        "SOCKS5 server {server} accepted UDP ASSOCIATE but gave no usable UDP relay port \
         (BND {bound}); datagrams sent there would vanish, so the association is refused"
    )]
    NoRelayPort {
        server: SocketAddr,
        bound: SocketAddr,
    },
}

impl Socks5Error {
    /// Whether the server itself could not be reached (as opposed to a
    /// refusal by a server that answered).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Socks5Error::Unreachable { .. } | Socks5Error::Timeout { .. }
        )
    }

    /// What failed, without the protocol.
    pub fn failure(&self) -> Failure {
        match self {
            Socks5Error::Timeout { .. } => Failure::ProxyTimeout,
            Socks5Error::Unreachable { source, .. } => {
                super::io_failure(source, Failure::ProxyFailed)
            }
            Socks5Error::Rejected { .. } => Failure::DestinationRefused,
            Socks5Error::UdpRefused { .. } => Failure::UdpRefused,
            _ => Failure::ProxyFailed,
        }
    }
}

/// A configured SOCKS5 upstream.
#[derive(Debug, Clone)]
pub struct Socks5Client {
    pub server: SocketAddr,
    pub auth: Option<Credentials>,
    pub mark: u32,
    pub connect_timeout: Duration,
    /// CONNECT names the flow's sniffed host name (ATYP 3) instead of its
    /// address, so the server resolves it ([`target`](Self::target)).
    pub send_domain: bool,
    /// UDP DNS through it goes as DNS over TCP, always.
    pub dns_over_tcp: bool,
}

/// A UDP association: datagrams go through `socket` (connected to the
/// server's relay) and live as long as `control` stays open.
#[derive(Debug)]
pub struct UdpAssociation {
    pub control: TcpStream,
    pub socket: UdpSocket,
    pub relay: SocketAddr,
}

impl Socks5Client {
    pub fn new(settings: &Settings, ctx: &Context) -> Socks5Client {
        Socks5Client {
            server: settings.server,
            auth: settings.auth.clone(),
            mark: ctx.mark,
            connect_timeout: ctx.connect_timeout,
            send_domain: settings.send_domain,
            dns_over_tcp: settings.dns_over_tcp,
        }
    }

    /// What a CONNECT for a flow to `dst` names: with `send_domain`, the
    /// flow's sniffed `host` and the original port, when it is a valid
    /// host name (checked again here: an invalid name must never reach
    /// the server, which would fail or resolve it somewhere odd); else
    /// the address.
    pub fn target(&self, dst: SocketAddr, host: Option<&str>) -> Address {
        match host {
            Some(name) if self.send_domain && crate::hostname::is_host_name(name) => {
                Address::Domain(name.to_string(), dst.port())
            }
            _ => Address::Ip(dst),
        }
    }

    /// Opens a TCP connection to `dst` through the server.
    pub async fn connect(&self, dst: SocketAddr) -> Result<TcpStream, Socks5Error> {
        self.connect_to(Address::Ip(dst)).await
    }

    /// Opens a TCP connection to `target` (an address or a domain).
    pub async fn connect_to(&self, target: Address) -> Result<TcpStream, Socks5Error> {
        let mut stream = self.open_control().await?;
        let reply = self
            .with_timeout(self.handshake(&mut stream, proto::CMD_CONNECT, &target))
            .await?;
        self.connect_outcome(&reply, &target)?;
        Ok(stream)
    }

    /// Whether a CONNECT reply grants the connection.
    pub fn connect_outcome(
        &self,
        reply: &proto::Reply,
        target: &Address,
    ) -> Result<(), Socks5Error> {
        if reply.code != proto::REP_SUCCEEDED {
            return Err(Socks5Error::Rejected {
                server: self.server,
                command: "CONNECT",
                dst: target.clone(),
                code: reply.code,
                meaning: proto::reply_meaning(reply.code),
            });
        }
        Ok(())
    }

    /// The relay address a UDP ASSOCIATE reply names, or why there is none.
    pub fn udp_relay(&self, reply: proto::Reply) -> Result<SocketAddr, Socks5Error> {
        if reply.code != proto::REP_SUCCEEDED {
            return Err(Socks5Error::UdpRefused {
                server: self.server,
                code: reply.code,
                meaning: proto::reply_meaning(reply.code),
            });
        }
        match reply.bound {
            Address::Ip(a) => relay_address(a, self.server),
            Address::Domain(name, _) => Err(Socks5Error::DomainRelay {
                server: self.server,
                name,
            }),
        }
    }

    /// Opens a UDP association.
    ///
    /// DST.ADDR/DST.PORT of the request say where datagrams will come
    /// *from*; the socket's port is not known to the server until the
    /// first datagram, so the wildcard 0.0.0.0:0 (or [::]:0) is sent, as
    /// RFC 1928 allows. Naming the target instead makes dante drop every
    /// datagram.
    pub async fn udp_associate(&self) -> Result<UdpAssociation, Socks5Error> {
        let mut control = self.open_control().await?;
        let from: SocketAddr = match self.server.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let reply = self
            .with_timeout(self.handshake(
                &mut control,
                proto::CMD_UDP_ASSOCIATE,
                &Address::Ip(from),
            ))
            .await?;
        let relay = self.udp_relay(reply)?;
        let io_err = |source| Socks5Error::Io {
            server: self.server,
            source,
        };
        let socket = sys::outbound_udp_socket(&relay, false, self.mark).map_err(io_err)?;
        let socket = UdpSocket::from_std(socket).map_err(io_err)?;
        socket.connect(relay).await.map_err(io_err)?;
        Ok(UdpAssociation {
            control,
            socket,
            relay,
        })
    }

    /// Whether the server accepts a TCP connection (no SOCKS exchange).
    pub async fn reachable(&self) -> Result<(), Socks5Error> {
        self.open_control().await.map(drop)
    }

    /// Health check: connects and completes the greeting (and the login,
    /// if one is configured), then closes. Unlike [`reachable`], it finds
    /// a server that accepts connections but no longer speaks SOCKS5 or
    /// refuses our credentials.
    ///
    /// [`reachable`]: Self::reachable
    pub async fn check(&self) -> Result<(), Socks5Error> {
        let mut stream = self.open_control().await?;
        self.with_timeout(self.negotiate(&mut stream)).await
    }

    async fn open_control(&self) -> Result<TcpStream, Socks5Error> {
        match tokio::time::timeout(self.connect_timeout, connect_marked(self.server, self.mark))
            .await
        {
            Err(_) => Err(Socks5Error::Timeout {
                server: self.server,
                secs: self.connect_timeout.as_secs(),
            }),
            Ok(Err(source)) => Err(Socks5Error::Unreachable {
                server: self.server,
                source,
            }),
            Ok(Ok(s)) => Ok(s),
        }
    }

    async fn with_timeout<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Socks5Error>>,
    ) -> Result<T, Socks5Error> {
        tokio::time::timeout(self.connect_timeout, fut)
            .await
            .unwrap_or(Err(Socks5Error::Timeout {
                server: self.server,
                secs: self.connect_timeout.as_secs(),
            }))
    }

    /// Method selection, login when asked, then `cmd` for `addr`; returns
    /// the server's reply. Generic over the stream so that the fuzz target
    /// can run this very code over bytes in memory.
    pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        cmd: u8,
        addr: &Address,
    ) -> Result<proto::Reply, Socks5Error> {
        self.negotiate(stream).await?;
        self.command(stream, cmd, addr).await
    }

    async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
    ) -> Result<(), Socks5Error> {
        let server = self.server;
        let io_err = |source| Socks5Error::Io { server, source };
        let proto_err = |source| Socks5Error::Protocol { server, source };
        let offered_user_pass = self.auth.is_some();
        stream
            .write_all(proto::greeting(offered_user_pass))
            .await
            .map_err(io_err)?;
        let mut choice = [0u8; 2];
        stream.read_exact(&mut choice).await.map_err(io_err)?;
        match proto::parse_method_choice(choice, offered_user_pass).map_err(proto_err)? {
            MethodChoice::NoAuth => Ok(()),
            MethodChoice::NoneAcceptable if !offered_user_pass => {
                Err(Socks5Error::CredentialsNeeded { server })
            }
            MethodChoice::NoneAcceptable => Err(Socks5Error::NoAcceptableMethod {
                server,
                offered_user_pass,
            }),
            MethodChoice::UserPass => {
                // parse_method_choice only returns UserPass when it was offered.
                let Some(creds) = &self.auth else {
                    return Err(Socks5Error::CredentialsNeeded { server });
                };
                stream
                    .write_all(&proto::user_pass_request(&creds.username, &creds.password))
                    .await
                    .map_err(io_err)?;
                let mut status = [0u8; 2];
                stream.read_exact(&mut status).await.map_err(io_err)?;
                if proto::parse_user_pass_reply(status).map_err(proto_err)? {
                    Ok(())
                } else {
                    Err(Socks5Error::AuthFailed {
                        server,
                        username: creds.username.clone(),
                        status: status[1],
                    })
                }
            }
        }
    }

    async fn command<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        cmd: u8,
        addr: &Address,
    ) -> Result<proto::Reply, Socks5Error> {
        let server = self.server;
        let io_err = |source| Socks5Error::Io { server, source };
        let proto_err = |source| Socks5Error::Protocol { server, source };
        let request = proto::request_to(cmd, addr).map_err(proto_err)?;
        stream.write_all(&request).await.map_err(io_err)?;
        let mut reply = [0u8; 4 + 1 + 255 + 2];
        stream.read_exact(&mut reply[..5]).await.map_err(io_err)?;
        let head: [u8; 5] = [reply[0], reply[1], reply[2], reply[3], reply[4]];
        let rest = proto::reply_remaining(head).map_err(proto_err)?;
        stream
            .read_exact(&mut reply[5..5 + rest])
            .await
            .map_err(io_err)?;
        proto::parse_reply(&reply[..5 + rest]).map_err(proto_err)
    }
}

/// Many servers answer UDP ASSOCIATE with BND.ADDR 0.0.0.0 or `::`,
/// meaning "the address you reached me at"; send to the server's own IP
/// with BND.PORT then. BND.PORT 0 has no such reading: no datagram sent to
/// port 0 arrives anywhere, so it is an error rather than a session whose
/// datagrams vanish without a word.
pub fn relay_address(bound: SocketAddr, server: SocketAddr) -> Result<SocketAddr, Socks5Error> {
    let bound = sys::normalize(bound);
    if bound.port() == 0 {
        return Err(Socks5Error::NoRelayPort { server, bound });
    }
    Ok(if bound.ip().is_unspecified() {
        SocketAddr::new(server.ip(), bound.port())
    } else {
        bound
    })
}

impl Carrier for Socks5Client {
    const UDP_HEADER: usize = proto::MAX_UDP_HEADER;

    fn type_name(&self) -> &'static str {
        // One spelling: the config's `type`, from the kind's settings.
        <Settings as Kind>::TYPE
    }

    fn clash_type(&self) -> &'static str {
        "Socks5"
    }

    fn udp(&self) -> bool {
        true
    }

    fn udp_refusal(&self) -> Option<OutboundError> {
        None
    }

    /// Every SOCKS5 server takes CONNECT, not every one UDP ASSOCIATE.
    fn dns_transport(&self) -> DnsTransport {
        if self.dns_over_tcp {
            DnsTransport::Tcp
        } else {
            DnsTransport::TcpUntilUdpWorks
        }
    }

    // The handshake holds kilobytes of state: boxed, so that the future of
    // `Outbound::connect_tcp`, which every flow's task holds (and moves),
    // stays the size of a direct connect.
    fn connect_tcp<'a>(
        &'a self,
        dst: SocketAddr,
        host: Option<&'a str>,
    ) -> impl Future<Output = Result<TcpUpstream, OutboundError>> + Send + 'a {
        let boxed: BoxFuture<'a, _> = Box::pin(async move {
            Ok(TcpUpstream::Plain(
                self.connect_to(self.target(dst, host)).await?,
            ))
        });
        boxed
    }

    /// By name, whatever `send_domain` says: the address is a fake one
    /// (the name is checked by [`Outbound::connect_tcp_named`]).
    fn connect_tcp_named<'a>(
        &'a self,
        name: &'a str,
        port: u16,
        _real: &'a dyn crate::outbound::ResolveReal,
    ) -> impl Future<Output = Result<TcpUpstream, OutboundError>> + Send + 'a {
        let boxed: BoxFuture<'a, _> = Box::pin(async move {
            let target = Address::Domain(name.to_string(), port);
            Ok(TcpUpstream::Plain(self.connect_to(target).await?))
        });
        boxed
    }

    async fn open_udp(&self) -> Result<UdpUpstream, OutboundError> {
        Ok(UdpUpstream::Socks5(self.udp_associate().await?))
    }

    /// RFC 1928 lets a UDP header name a domain (ATYP 3).
    fn udp_by_name(&self) -> bool {
        true
    }

    /// Connect and greeting (and login, if configured), so a server that
    /// accepts connections but not us counts as down.
    async fn probe(&self) -> Result<(), OutboundError> {
        Ok(self.check().await?)
    }
}

impl UdpCarrier for UdpAssociation {
    fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The datagram goes to the relay, in the relay's family, with a
    /// header naming `dst`.
    fn max_payload(&self, dst: SocketAddr) -> usize {
        ip_udp_max(self.relay).saturating_sub(proto::udp_header_len(&dst))
    }

    fn try_send(&self, buf: &mut [u8], dst: SocketAddr) -> io::Result<()> {
        let start = UDP_HEADROOM - proto::udp_header_len(&dst);
        proto::write_udp_header(&mut buf[start..UDP_HEADROOM], &dst);
        self.socket.try_send(&buf[start..])?;
        Ok(())
    }

    /// The header (ATYP 3) goes out as a slice of its own in front of the
    /// payload: no copy whatever the name's length.
    fn try_send_named(&self, buf: &mut [u8], name: &str, port: u16) -> io::Result<()> {
        let mut header = [0u8; proto::MAX_UDP_NAMED_HEADER];
        let len = proto::write_udp_header_named(&mut header, name, port)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let payload = buf.get(UDP_HEADROOM..).unwrap_or_default();
        self.socket.try_io(Interest::WRITABLE, || {
            sys::send_parts(
                &self.socket,
                &[header.get(..len).unwrap_or_default(), payload],
            )
        })?;
        Ok(())
    }

    /// Each payload needs its own header in front, so the run is laid out
    /// again in `scratch`.
    fn try_send_segments(
        &self,
        payloads: &[u8],
        segment: usize,
        dst: SocketAddr,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let mut header = [0u8; proto::MAX_UDP_HEADER];
        let len = proto::write_udp_header(&mut header, &dst);
        let header = &header[..len];
        scratch.clear();
        for payload in payloads.chunks(segment) {
            scratch.extend_from_slice(header);
            scratch.extend_from_slice(payload);
        }
        let segment = header.len() + segment;
        self.socket.try_io(Interest::WRITABLE, || {
            sys::send_segments(&self.socket, scratch, segment, None)
        })?;
        Ok(())
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<UdpRecv> {
        let n = self.socket.try_recv(buf)?;
        Ok(match proto::parse_udp_header(&buf[..n]) {
            Ok((Address::Ip(from), start)) => UdpRecv::Datagram {
                from: sys::normalize(from),
                start,
                end: n,
            },
            // RSV FRAG ATYP LEN, then the name.
            Ok((Address::Domain(name, port), start)) => UdpRecv::Named {
                name: 5..5 + name.len(),
                port,
                start,
                end: n,
            },
            Err(e) => UdpRecv::Dropped(format!("bad datagram from relay {}: {e}", self.relay)),
        })
    }

    /// The control connection closed: the association is over.
    async fn closed(&self) -> String {
        loop {
            if let Err(e) = self.control.readable().await {
                return format!("UDP association's control connection failed: {e}");
            }
            // Declared after the await, so a waiting session's task does
            // not carry it.
            let mut scratch = [0u8; 64];
            match self.control.try_read(&mut scratch) {
                Ok(0) => {
                    return "SOCKS5 server closed the UDP association's control connection".into()
                }
                // Servers send nothing here; ignore anything that comes.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return format!("UDP association's control connection failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(send_domain: bool) -> Socks5Client {
        Socks5Client {
            server: "203.0.113.2:1080".parse().unwrap(),
            auth: None,
            mark: 0,
            connect_timeout: Duration::from_secs(1),
            send_domain,
            dns_over_tcp: false,
        }
    }

    #[test]
    fn send_domain_names_only_valid_sniffed_hosts() {
        let dst: SocketAddr = "198.51.100.10:443".parse().unwrap();
        let on = client(true);
        assert_eq!(
            on.target(dst, Some("via-proxy.example")),
            Address::Domain("via-proxy.example".into(), 443)
        );
        assert_eq!(on.target(dst, None), Address::Ip(dst));
        for bad in [
            "198.51.100.10",
            "Upper.example",
            "a..b",
            "x.example.",
            "a b",
            "",
        ] {
            assert_eq!(on.target(dst, Some(bad)), Address::Ip(dst), "{bad:?}");
        }
        let off = client(false);
        assert_eq!(off.target(dst, Some("via-proxy.example")), Address::Ip(dst));
    }

    #[test]
    fn unspecified_relay_means_the_server_address() {
        let server: SocketAddr = "203.0.113.2:1080".parse().unwrap();
        let relay = |bound: &str| relay_address(bound.parse().unwrap(), server).unwrap();
        assert_eq!(relay("0.0.0.0:40000"), "203.0.113.2:40000".parse().unwrap());
        assert_eq!(relay("[::]:40000"), "203.0.113.2:40000".parse().unwrap());
        assert_eq!(relay("203.0.113.9:5"), "203.0.113.9:5".parse().unwrap());
    }

    #[test]
    fn a_relay_on_port_0_is_refused() {
        let server: SocketAddr = "203.0.113.2:1080".parse().unwrap();
        for bound in ["0.0.0.0:0", "[::]:0", "203.0.113.9:0"] {
            let err = relay_address(bound.parse().unwrap(), server).unwrap_err();
            assert!(matches!(err, Socks5Error::NoRelayPort { .. }), "{err}");
        }
    }

    /// A datagram to a name goes with an ATYP 3 header, whatever the
    /// name's length; a reply naming its source by domain says where the
    /// name lies, and one from an address is a plain datagram.
    #[tokio::test]
    async fn udp_datagrams_to_names_and_replies_from_names() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(relay.local_addr().unwrap()).await.unwrap();
        let assoc = UdpAssociation {
            control,
            socket,
            relay: relay.local_addr().unwrap(),
        };
        let long = format!("{}.example", "x".repeat(240));
        let mut d = vec![0u8; 1024];
        for name in ["quic.example", long.as_str()] {
            let mut buf = vec![0u8; UDP_HEADROOM];
            buf.extend_from_slice(b"hello");
            assoc.socket.writable().await.unwrap();
            assoc.try_send_named(&mut buf, name, 443).unwrap();
            let (n, client) = relay.recv_from(&mut d).await.unwrap();
            let (target, at) = proto::parse_udp_header(&d[..n]).unwrap();
            assert_eq!(target, Address::Domain(name.to_string(), 443));
            assert_eq!(&d[at..n], b"hello");

            relay.send_to(&d[..n], client).await.unwrap();
            assoc.socket.readable().await.unwrap();
            let mut r = vec![0u8; 1024];
            match assoc.try_recv(&mut r).unwrap() {
                UdpRecv::Named {
                    name: place,
                    port,
                    start,
                    end,
                } => {
                    assert_eq!(&r[place], name.as_bytes());
                    assert_eq!(port, 443);
                    assert_eq!(&r[start..end], b"hello");
                }
                other => panic!("{other:?}"),
            }
        }
        let too_long = "a".repeat(256);
        let mut buf = vec![0u8; UDP_HEADROOM + 1];
        let e = assoc.try_send_named(&mut buf, &too_long, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
