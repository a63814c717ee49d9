//! Shadowsocks client: AEAD (SIP004) and 2022 (SIP022) methods. The
//! settings (`[[outbounds]] type = "shadowsocks"`, or one `url`), the
//! carrier ([`Client`]); the cryptography is in [`crypto`], the TCP
//! stream in [`tcp`], `ss://` URLs in [`url`].

pub mod blake3;
pub mod crypto;
pub mod tcp;
pub mod udp;
pub mod url;
pub mod window;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use super::group::Member;
use super::kinds::Kind;
use super::socks5::proto::Address;
use super::url::UrlError;
use super::{
    connect_marked, BoxFuture, BuildError, Carrier, Context, DnsTransport, Failure, OutboundError,
    TcpCarrier, TcpUpstream, UdpUpstream,
};
use crypto::{Key, Method};
pub use tcp::ShadowsocksError;
use tcp::{SsStream, Upstream};

/// The default `first_byte_timeout`, seconds.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: u64 = 10;
/// A week: the bound of every duration in the config.
const MAX_SECS: u64 = 7 * 24 * 3600;

/// `[[outbounds]] type = "shadowsocks"` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "opt_server")]
    pub server: Option<SocketAddr>,
    pub method: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    /// `ss://…` instead of server, method and password.
    pub url: Option<String>,
    pub udp: Option<bool>,
    pub send_domain: Option<bool>,
    pub first_byte_timeout: Option<u64>,
}

fn opt_server<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    crate::addr::parse_ip_port(&text)
        .map(Some)
        .map_err(|e| de::Error::custom(format!("server: {e}")))
}

/// A `shadowsocks` outbound's settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub server: SocketAddr,
    /// The method is the key's; its Debug shows no byte of it.
    pub key: Key,
    pub udp: bool,
    /// Send the sniffed host name instead of the address.
    pub send_domain: bool,
    /// Zero: off.
    pub first_byte_timeout: Duration,
}

/// Where the password came from, for messages that name the key.
fn password(
    raw: &Raw,
    from_url: Option<&str>,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    issue: &mut dyn FnMut(&str, String),
) -> Option<String> {
    let given = [
        raw.password.is_some(),
        raw.password_file.is_some(),
        raw.password_env.is_some(),
        from_url.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        issue(
            &format!("{key}.password"),
            "set one of password, password_file, password_env or url, not several".into(),
        );
        return None;
    }
    if let Some(p) = &raw.password {
        return Some(p.clone());
    }
    if let Some(path) = &raw.password_file {
        return match std::fs::read_to_string(path) {
            // One line; the newline an editor or `echo` adds is not part of it.
            Ok(text) => Some(text.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) => {
                issue(
                    &format!("{key}.password_file"),
                    format!("cannot read {path}: {e}"),
                );
                None
            }
        };
    }
    if let Some(var) = &raw.password_env {
        return match env(var) {
            Some(p) => Some(p),
            None => {
                issue(
                    &format!("{key}.password_env"),
                    format!("environment variable {var} is not set"),
                );
                None
            }
        };
    }
    if let Some(p) = from_url {
        return Some(p.to_string());
    }
    issue(
        &format!("{key}.password"),
        "a shadowsocks outbound needs password, password_file, password_env or url".into(),
    );
    None
}

impl Kind for Settings {
    type Raw = Raw;
    type Built = Client;
    const TYPE: &'static str = "shadowsocks";
    const SCHEMES: &'static [&'static str] = &["ss"];

    /// `ss://…` (SIP002, [`url`]): read here so a bad URL is refused with
    /// its reason at once; the settings keep it as `url`, which
    /// [`validate`](Kind::validate) reads as it reads a file's.
    fn raw_from_url(text: &str) -> Result<Raw, UrlError> {
        let parsed = url::parse(text).map_err(|e| UrlError::invalid("ss", e.to_string()))?;
        Ok(Raw {
            name: parsed.tag,
            server: None,
            method: None,
            password: None,
            password_file: None,
            password_env: None,
            url: Some(text.trim().to_string()),
            udp: None,
            send_domain: None,
            first_byte_timeout: None,
        })
    }

    fn validate(
        raw: &Raw,
        key: &str,
        env: &dyn Fn(&str) -> Option<String>,
        issue: &mut dyn FnMut(&str, String),
    ) -> Settings {
        let parsed = match raw.url.as_deref().map(url::parse) {
            Some(Ok(u)) => Some(u),
            Some(Err(e)) => {
                issue(&format!("{key}.url"), e.to_string());
                None
            }
            None => None,
        };
        if raw.url.is_some() && (raw.server.is_some() || raw.method.is_some()) {
            issue(
                &format!("{key}.url"),
                "url names the server, method and password: leave out server and method".into(),
            );
        }
        let server = match (raw.server, &parsed) {
            (Some(s), _) => Some(s),
            (None, Some(u)) => Some(u.server),
            (None, None) => {
                if raw.url.is_none() {
                    issue(
                        &format!("{key}.server"),
                        "a shadowsocks outbound needs server = \"IP:PORT\" (or url = \"ss://…\")"
                            .into(),
                    );
                }
                None
            }
        };
        let method_name = raw
            .method
            .clone()
            .or_else(|| parsed.as_ref().map(|u| u.method.clone()));
        let method = match &method_name {
            Some(name) => {
                let m = Method::from_name(name);
                if m.is_none() {
                    issue(&format!("{key}.method"), Method::unknown(name));
                }
                m
            }
            None => {
                if raw.url.is_none() {
                    issue(
                        &format!("{key}.method"),
                        format!(
                            "a shadowsocks outbound needs a method, one of: {}",
                            Method::names()
                        ),
                    );
                }
                None
            }
        };
        let password = password(
            raw,
            parsed.as_ref().map(|u| u.password.as_str()),
            key,
            env,
            issue,
        );
        let key_bytes = match (method, password) {
            (Some(m), Some(p)) => match Key::new(m, &p) {
                Ok(k) => Some(k),
                Err(e) => {
                    issue(&format!("{key}.password"), e.to_string());
                    None
                }
            },
            _ => None,
        };
        let timeout = raw.first_byte_timeout.unwrap_or(DEFAULT_FIRST_BYTE_TIMEOUT);
        if timeout > MAX_SECS {
            issue(
                &format!("{key}.first_byte_timeout"),
                format!("{timeout} s is over a week; 0 turns it off"),
            );
        }
        Settings {
            // Placeholders when something is wrong: the issues above fail
            // the config, so these are never used.
            server: server.unwrap_or(([0, 0, 0, 0], 0).into()),
            key: key_bytes.unwrap_or_else(Key::unusable),
            udp: raw.udp.unwrap_or(true),
            send_domain: raw.send_domain.unwrap_or(false),
            first_byte_timeout: Duration::from_secs(timeout.min(MAX_SECS)),
        }
    }

    fn server(&self) -> Option<SocketAddr> {
        Some(self.server)
    }

    fn describe(&self) -> String {
        format!("{} {} {}", Self::TYPE, self.server, self.key.method())
    }

    fn build(&self, name: &str, ctx: &Context, _: Vec<Member>) -> Result<Client, BuildError> {
        Ok(Client::new(name, self, ctx))
    }
}

/// The TCP stream of a shadowsocks flow (boxed: the flow's task holds
/// it, and [`TcpUpstream`] stays small).
pub type Stream = Box<SsStream<tokio::net::TcpStream>>;

impl TcpCarrier for Stream {
    fn socket(&self) -> &tokio::net::TcpStream {
        self.get_ref()
    }

    fn write_batch(&self) -> usize {
        SsStream::write_batch(self)
    }
}

/// A configured shadowsocks server.
#[derive(Debug, Clone)]
pub struct Client {
    pub up: Arc<Upstream>,
    pub mark: u32,
    pub connect_timeout: Duration,
    pub udp: bool,
    pub send_domain: bool,
}

impl Client {
    pub fn new(name: &str, settings: &Settings, ctx: &Context) -> Client {
        Client {
            up: Arc::new(Upstream::new(
                name,
                settings.server,
                settings.key.clone(),
                settings.first_byte_timeout,
            )),
            mark: ctx.mark,
            connect_timeout: ctx.connect_timeout,
            udp: settings.udp,
            send_domain: settings.send_domain,
        }
    }

    pub fn server(&self) -> SocketAddr {
        self.up.server
    }

    pub fn method(&self) -> Method {
        self.up.key.method()
    }

    /// What the request names for a flow to `dst`: with `send_domain`,
    /// the sniffed `host` when it is a valid host name (checked here
    /// again: an invalid one must never reach the server), else `dst`.
    pub fn target(&self, dst: SocketAddr, host: Option<&str>) -> Address {
        match host {
            Some(name) if self.send_domain && crate::hostname::is_host_name(name) => {
                Address::Domain(name.to_string(), dst.port())
            }
            _ => Address::Ip(dst),
        }
    }

    /// A marked TCP connection to the server, within the connect timeout.
    async fn open(&self) -> Result<tokio::net::TcpStream, ShadowsocksConnectError> {
        let server = self.up.server;
        match tokio::time::timeout(self.connect_timeout, connect_marked(server, self.mark)).await {
            Err(_) => Err(ShadowsocksConnectError::Timeout {
                server,
                secs: self.connect_timeout.as_secs(),
            }),
            Ok(Err(source)) => Err(ShadowsocksConnectError::Unreachable { server, source }),
            Ok(Ok(s)) => Ok(s),
        }
    }

    /// A stream to `target` through the server. Nothing is sent yet: the
    /// request goes with the client's first bytes.
    pub async fn connect_to(&self, target: Address) -> Result<Stream, ShadowsocksConnectError> {
        let tcp = self.open().await?;
        SsStream::new(tcp, self.up.clone(), target)
            .map(Box::new)
            .map_err(ShadowsocksConnectError::Random)
    }

    /// Health check that proves the key: a request for the server's own
    /// loopback port 1 (nothing listens there), which a server with our
    /// key answers by closing the connection at once, as its connect to
    /// the target fails. A wrong key gets silence (libev, shadowsocks-rust
    /// AEAD) or a reset (shadowsocks-rust 2022) instead.
    pub async fn check(&self) -> Result<(), ShadowsocksConnectError> {
        let server = self.up.server;
        let probe_target = match server {
            SocketAddr::V4(_) => Address::Ip(([127, 0, 0, 1], 1).into()),
            SocketAddr::V6(_) => Address::Ip((std::net::Ipv6Addr::LOCALHOST, 1).into()),
        };
        let mut stream = self.connect_to(probe_target).await?;
        let wait = if self.up.first_byte_timeout.is_zero() {
            self.connect_timeout
        } else {
            self.up.first_byte_timeout.min(self.connect_timeout)
        };
        let closed = async {
            // The request alone (padded for 2022), then wait for the end.
            tokio::io::AsyncWriteExt::flush(&mut stream).await?;
            let mut byte = [0u8; 1];
            stream.read(&mut byte).await
        };
        match tokio::time::timeout(wait, closed).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ShadowsocksConnectError::Check {
                server,
                reason: e.to_string(),
            }),
            Err(_) => Err(ShadowsocksConnectError::Check {
                server,
                reason: format!(
                    "no answer within {} s to a request the server should have refused at once: \
                     wrong password or method?",
                    wait.as_secs()
                ),
            }),
        }
    }
}

/// Why a shadowsocks connection could not be opened or checked (the
/// stream's own failures are [`ShadowsocksError`], inside `io::Error`).
#[derive(Debug, thiserror::Error)]
pub enum ShadowsocksConnectError {
    #[error("cannot reach shadowsocks server {server}: {source}")]
    Unreachable {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("shadowsocks server {server} did not answer within {secs}s")]
    Timeout { server: SocketAddr, secs: u64 },
    #[error("no salt for a shadowsocks stream: {0}")]
    Random(std::io::Error),
    #[error("shadowsocks server {server} failed its check: {reason}")]
    Check { server: SocketAddr, reason: String },
    #[error(
        "the shadowsocks outbound (server {server}) has udp = false: UDP routed to it is dropped; \
         send UDP elsewhere with a rule (network = \"udp\", outbound = ...), or set udp = true \
         if the server relays UDP (ss-server -u, ssserver -U)"
    )]
    NoUdp { server: SocketAddr },
}

impl ShadowsocksConnectError {
    pub fn failure(&self) -> Failure {
        match self {
            ShadowsocksConnectError::Timeout { .. } => Failure::ProxyTimeout,
            ShadowsocksConnectError::Unreachable { source, .. } => {
                super::io_failure(source, Failure::ProxyFailed)
            }
            ShadowsocksConnectError::NoUdp { .. } => Failure::Refused,
            _ => Failure::ProxyFailed,
        }
    }
}

impl Carrier for Client {
    const UDP_HEADER: usize = udp::MAX_HEADER;

    fn type_name(&self) -> &'static str {
        <Settings as Kind>::TYPE
    }

    fn clash_type(&self) -> &'static str {
        "Shadowsocks"
    }

    fn udp(&self) -> bool {
        self.udp
    }

    /// `udp = false`: refused without I/O, so a rule sends UDP elsewhere
    /// and DNS goes over TCP ([`dns_transport`](Carrier::dns_transport)).
    fn udp_refusal(&self) -> Option<OutboundError> {
        (!self.udp).then(|| {
            ShadowsocksConnectError::NoUdp {
                server: self.up.server,
            }
            .into()
        })
    }

    fn dns_transport(&self) -> DnsTransport {
        if self.udp() {
            DnsTransport::Udp
        } else {
            DnsTransport::Tcp
        }
    }

    fn connect_tcp<'a>(
        &'a self,
        dst: SocketAddr,
        host: Option<&'a str>,
    ) -> impl Future<Output = Result<TcpUpstream, OutboundError>> + Send + 'a {
        let boxed: BoxFuture<'a, _> = Box::pin(async move {
            let stream = self.connect_to(self.target(dst, host)).await?;
            Ok(TcpUpstream::Shadowsocks(stream))
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
            let stream = self
                .connect_to(Address::Domain(name.to_string(), port))
                .await?;
            Ok(TcpUpstream::Shadowsocks(stream))
        });
        boxed
    }

    /// A socket to the server and, for 2022, a new session: no I/O, the
    /// server learns of it from the first datagram.
    async fn open_udp(&self) -> Result<UdpUpstream, OutboundError> {
        if let Some(refusal) = self.udp_refusal() {
            return Err(refusal);
        }
        let upstream = udp::ShadowsocksUdp::open(self.up.server, &self.up.key, self.mark)?;
        Ok(UdpUpstream::Shadowsocks(upstream))
    }

    /// A datagram's address is a SOCKS5 address, which may be a name.
    fn udp_by_name(&self) -> bool {
        true
    }

    /// Proves the key, not only that the server listens; see
    /// [`Client::check`].
    async fn probe(&self) -> Result<(), OutboundError> {
        Ok(self.check().await?)
    }
}

#[cfg(test)]
mod tests;
