//! HTTP/1.1 CONNECT client (RFC 9110 §9.3.6) with optional Basic proxy
//! authentication (RFC 7617). TCP only: CONNECT has no way to carry UDP.
//!
//! The answer's head (status line and headers) is read through a bounded
//! buffer by peeking first and consuming only the bytes that belong to the
//! head, so anything the server sends after the blank line (a server that
//! speaks first, say) stays in the socket for the relay: nothing is lost
//! and the caller still gets a plain [`TcpStream`] it can splice.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::credentials::{self, Credentials};
use super::group::Member;
use super::kinds::{self, Kind};
use super::url::{self, UrlError};
use super::{
    connect_marked, BoxFuture, BuildError, Carrier, Context, DnsTransport, Failure, OutboundError,
    TcpUpstream, UdpUpstream,
};

/// `[[outbounds]] type = "http"` as written.
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
}

/// An `http` outbound's settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub server: SocketAddr,
    pub auth: Option<Credentials>,
    /// CONNECT to the sniffed host name instead of the address.
    pub send_domain: bool,
}

impl Kind for Settings {
    type Raw = Raw;
    type Built = HttpClient;
    const TYPE: &'static str = "http";
    const SCHEMES: &'static [&'static str] = &["http"];

    /// `http://[user:password@]IP:PORT[#name]`, user and password
    /// percent-decoded (Basic auth).
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
            send_domain: false,
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
        }
    }

    fn server(&self) -> Option<SocketAddr> {
        Some(self.server)
    }

    fn describe(&self) -> String {
        let login = kinds::login_note(self.auth.is_some());
        format!("{} {}{login}", Self::TYPE, self.server)
    }

    fn build(&self, _name: &str, ctx: &Context, _: Vec<Member>) -> Result<HttpClient, BuildError> {
        Ok(HttpClient::from_settings(self, ctx))
    }
}

/// Largest answer head accepted. Real proxies send one or two short lines;
/// 8 KiB is what common servers allow for a request head.
pub const MAX_HEAD: usize = 8 * 1024;

/// Longest piece of server-chosen text (reason phrase, challenge) quoted in
/// a log line.
const MAX_QUOTED: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach HTTP proxy {server}: {source}")]
    Unreachable {
        server: SocketAddr,
        source: io::Error,
    },
    #[error("HTTP proxy {server} did not answer within {secs}s")]
    Timeout { server: SocketAddr, secs: u64 },
    #[error("HTTP proxy {server} closed or broke the connection during CONNECT: {source}")]
    Io {
        server: SocketAddr,
        source: io::Error,
    },
    #[error("HTTP proxy {server} sent a malformed answer to CONNECT: {reason}")]
    Malformed {
        server: SocketAddr,
        reason: &'static str,
    },
    #[error("HTTP proxy {server} sent an answer head longer than {MAX_HEAD} bytes; refused")]
    HeadTooLarge { server: SocketAddr },
    #[error(
        "HTTP proxy {server} asks for credentials ({status} {}{}); \
         set username and password (or password_env) on this outbound",
        auth_phrase(*.status),
        challenge_note(.challenge)
    )]
    CredentialsNeeded {
        server: SocketAddr,
        status: u16,
        challenge: Option<String>,
    },
    #[error(
        "HTTP proxy {server} refused username {username:?} ({status} {}): wrong username or \
         password",
        auth_phrase(*.status)
    )]
    AuthFailed {
        server: SocketAddr,
        status: u16,
        username: String,
    },
    #[error("HTTP proxy {server} refused CONNECT {target}: {status} {reason}")]
    Refused {
        server: SocketAddr,
        target: String,
        status: u16,
        reason: String,
    },
}

fn auth_phrase(status: u16) -> &'static str {
    if status == 401 {
        "Unauthorized"
    } else {
        "Proxy Authentication Required"
    }
}

fn challenge_note(challenge: &Option<String>) -> String {
    challenge
        .as_ref()
        .map_or(String::new(), |c| format!(", challenge {c:?}"))
}

impl HttpError {
    /// The HTTP status of a refusal, if the proxy answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Refused { status, .. } => Some(*status),
            HttpError::CredentialsNeeded { status, .. } | HttpError::AuthFailed { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    /// Whether the proxy's answer most likely means the destination, not
    /// the proxy, failed: an ordinary event, not worth a warning. Proxies
    /// differ in the status they use for that (tinyproxy 500 "Unable to
    /// connect", squid 503, others 502 or 504).
    pub fn is_destination_failure(&self) -> bool {
        matches!(self.status(), Some(500 | 502 | 503 | 504))
    }

    /// What failed, without the protocol.
    pub fn failure(&self) -> Failure {
        match self {
            HttpError::Timeout { .. } => Failure::ProxyTimeout,
            HttpError::Unreachable { source, .. } => {
                super::io_failure(source, Failure::ProxyFailed)
            }
            e if e.is_destination_failure() => Failure::DestinationRefused,
            _ => Failure::ProxyFailed,
        }
    }
}

/// A configured HTTP CONNECT upstream.
#[derive(Clone)]
pub struct HttpClient {
    pub server: SocketAddr,
    pub auth: Option<Credentials>,
    /// CONNECT to the host name the caller passes instead of the address.
    pub send_domain: bool,
    pub mark: u32,
    pub connect_timeout: Duration,
    /// `Proxy-Authorization` header line, built once.
    authorization: Option<String>,
}

impl fmt::Debug for HttpClient {
    // The header line holds the password (base64 is no secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("server", &self.server)
            .field("auth", &self.auth)
            .field("send_domain", &self.send_domain)
            .field("mark", &self.mark)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl HttpClient {
    pub fn from_settings(settings: &Settings, ctx: &Context) -> Self {
        HttpClient::new(
            settings.server,
            settings.auth.clone(),
            settings.send_domain,
            ctx.mark,
            ctx.connect_timeout,
        )
    }

    pub fn new(
        server: SocketAddr,
        auth: Option<Credentials>,
        send_domain: bool,
        mark: u32,
        connect_timeout: Duration,
    ) -> Self {
        let authorization = auth.as_ref().map(|c| {
            format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64(format!("{}:{}", c.username, c.password).as_bytes())
            )
        });
        HttpClient {
            server,
            auth,
            send_domain,
            mark,
            connect_timeout,
            authorization,
        }
    }

    /// Opens a TCP connection to `dst` (or `host`, see [`target`]) through
    /// the proxy.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        host: Option<&str>,
    ) -> Result<TcpStream, HttpError> {
        let mut stream = self.open().await?;
        let target = target(dst, host.filter(|_| self.send_domain));
        match tokio::time::timeout(self.connect_timeout, self.handshake(&mut stream, &target)).await
        {
            Err(_) => Err(self.timeout()),
            Ok(r) => r.map(|()| stream),
        }
    }

    /// Opens a TCP connection to `name`:`port` through the proxy, by name
    /// whatever `send_domain` says (a fake-ip flow; `name` is a host name).
    pub async fn connect_named(&self, name: &str, port: u16) -> Result<TcpStream, HttpError> {
        let mut stream = self.open().await?;
        let target = format!("{name}:{port}");
        match tokio::time::timeout(self.connect_timeout, self.handshake(&mut stream, &target)).await
        {
            Err(_) => Err(self.timeout()),
            Ok(r) => r.map(|()| stream),
        }
    }

    /// Whether the proxy accepts a TCP connection. A CONNECT to the proxy
    /// itself would tell nothing more (most proxies refuse that target),
    /// so this is the health check.
    pub async fn reachable(&self) -> Result<(), HttpError> {
        self.open().await.map(drop)
    }

    fn timeout(&self) -> HttpError {
        HttpError::Timeout {
            server: self.server,
            secs: self.connect_timeout.as_secs(),
        }
    }

    async fn open(&self) -> Result<TcpStream, HttpError> {
        match tokio::time::timeout(self.connect_timeout, connect_marked(self.server, self.mark))
            .await
        {
            Err(_) => Err(self.timeout()),
            Ok(Err(source)) => Err(HttpError::Unreachable {
                server: self.server,
                source,
            }),
            Ok(Ok(s)) => Ok(s),
        }
    }

    async fn handshake(&self, stream: &mut TcpStream, target: &str) -> Result<(), HttpError> {
        let server = self.server;
        let io_err = |source| HttpError::Io { server, source };
        let request = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\n",
            self.authorization.as_deref().unwrap_or("")
        );
        stream.write_all(request.as_bytes()).await.map_err(io_err)?;
        let mut head = [0u8; MAX_HEAD];
        let len = read_head(stream, &mut head).await.map_err(|e| match e {
            HeadError::Io(source) => HttpError::Io { server, source },
            HeadError::TooLarge => HttpError::HeadTooLarge { server },
        })?;
        let answer =
            parse_head(&head[..len]).map_err(|reason| HttpError::Malformed { server, reason })?;
        match answer.status {
            200..=299 => Ok(()),
            // 407 is the proxy's own status; some proxies (tinyproxy
            // 1.11) answer a CONNECT with bad or missing credentials with
            // 401 instead. Either way the credentials are the problem.
            status @ (401 | 407) => Err(match &self.auth {
                Some(c) => HttpError::AuthFailed {
                    server,
                    status,
                    username: c.username.clone(),
                },
                None => HttpError::CredentialsNeeded {
                    server,
                    status,
                    challenge: answer.challenge,
                },
            }),
            status => Err(HttpError::Refused {
                server,
                target: target.to_string(),
                status,
                reason: answer.reason,
            }),
        }
    }
}

impl Carrier for HttpClient {
    /// It carries no UDP.
    const UDP_HEADER: usize = 0;

    fn type_name(&self) -> &'static str {
        // One spelling: the config's `type`, from the kind's settings.
        <Settings as Kind>::TYPE
    }

    fn clash_type(&self) -> &'static str {
        "Http"
    }

    fn udp(&self) -> bool {
        false
    }

    fn udp_refusal(&self) -> Option<OutboundError> {
        Some(OutboundError::TcpOnly {
            server: self.server,
        })
    }

    /// UDP is refused before any DNS could go through it.
    fn dns_transport(&self) -> DnsTransport {
        DnsTransport::Udp
    }

    // The handshake holds kilobytes of state: boxed, so that the future of
    // `Outbound::connect_tcp`, which every flow's task holds (and moves),
    // stays the size of a direct connect.
    fn connect_tcp<'a>(
        &'a self,
        dst: SocketAddr,
        host: Option<&'a str>,
    ) -> impl Future<Output = Result<TcpUpstream, OutboundError>> + Send + 'a {
        let boxed: BoxFuture<'a, _> =
            Box::pin(async move { Ok(TcpUpstream::Plain(self.connect(dst, host).await?)) });
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
        let boxed: BoxFuture<'a, _> =
            Box::pin(async move { Ok(TcpUpstream::Plain(self.connect_named(name, port).await?)) });
        boxed
    }

    async fn open_udp(&self) -> Result<UdpUpstream, OutboundError> {
        Err(OutboundError::TcpOnly {
            server: self.server,
        })
    }

    /// A TCP connect: a CONNECT to the proxy itself would prove nothing
    /// more.
    async fn probe(&self) -> Result<(), OutboundError> {
        Ok(self.reachable().await?)
    }
}

/// What CONNECT names: `host:port` when a host name is given and passes
/// the one name rule ([`crate::hostname::is_host_name`]), else the address
/// (`[v6]:port` for IPv6).
pub fn target(dst: SocketAddr, host: Option<&str>) -> String {
    match host {
        // The name comes from the client's own bytes (SNI, Host): anything
        // but a plain DNS name could inject a header; use the address then.
        Some(h) if crate::hostname::is_host_name(h) => format!("{h}:{}", dst.port()),
        _ => dst.to_string(),
    }
}

enum HeadError {
    Io(io::Error),
    TooLarge,
}

/// Reads the answer head (through its blank line) into `buf`, returning
/// its length, and leaves every later byte unread in the socket.
///
/// Each round peeks at what has arrived; if the blank line is there, only
/// the bytes through it are consumed. If not, everything peeked belongs to
/// the head and is consumed, so the next peek waits for new bytes instead
/// of returning the same ones again.
async fn read_head(stream: &mut TcpStream, buf: &mut [u8]) -> Result<usize, HeadError> {
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(HeadError::TooLarge);
        }
        let n = stream.peek(&mut buf[len..]).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the answer head",
            )));
        }
        // The blank line may straddle the previous round's bytes.
        let from = len.saturating_sub(3);
        // The bytes are already in place from the peek; reading them again
        // only takes them out of the socket (a TCP stream hands out the
        // same bytes it showed).
        match head_end(&buf[from..len + n]) {
            Some(end) => {
                let take = (from + end).saturating_sub(len);
                stream
                    .read_exact(&mut buf[len..len + take])
                    .await
                    .map_err(HeadError::Io)?;
                return Ok(len + take);
            }
            None => {
                stream
                    .read_exact(&mut buf[len..len + n])
                    .await
                    .map_err(HeadError::Io)?;
                len += n;
            }
        }
    }
}

/// Index just past the blank line that ends a head (`\r\n\r\n`, or a bare
/// `\n\n` as RFC 9112 §2.2 lets recipients accept).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1..) {
                Some([b'\n', ..]) => return Some(i + 2),
                Some([b'\r', b'\n', ..]) => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    reason: String,
    /// `Proxy-Authenticate` (or `WWW-Authenticate`), for the message.
    challenge: Option<String>,
}

/// Parses a complete head: `HTTP/1.x SSS reason` and `Name: value` lines.
fn parse_head(head: &[u8]) -> Result<Answer, &'static str> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().ok_or("empty answer")?;
    let rest = status_line
        .strip_prefix(b"HTTP/1.")
        .ok_or("not an HTTP/1 status line")?;
    let (minor, rest) = rest.split_first().ok_or("truncated status line")?;
    if !minor.is_ascii_digit() {
        return Err("bad HTTP version");
    }
    let rest = rest.strip_prefix(b" ").ok_or("no status code")?;
    let code = rest.get(..3).ok_or("truncated status code")?;
    if !code.iter().all(u8::is_ascii_digit) {
        return Err("status code is not three digits");
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&status) {
        return Err("status code out of range");
    }
    let reason = match &rest[3..] {
        [] => String::new(),
        [b' ', text @ ..] => quote(text),
        _ => return Err("no space after the status code"),
    };
    let mut challenge = None;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or("header line without a colon")?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_token(b)) {
            return Err("bad header name");
        }
        let auth = name.eq_ignore_ascii_case(b"proxy-authenticate")
            || name.eq_ignore_ascii_case(b"www-authenticate");
        if auth && challenge.is_none() {
            challenge = Some(quote(line[colon + 1..].trim_ascii()));
        }
    }
    Ok(Answer {
        status,
        reason,
        challenge,
    })
}

/// RFC 9110 token characters (header names).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Server-chosen text made safe for a log line: printable ASCII only,
/// bounded.
fn quote(text: &[u8]) -> String {
    text.iter()
        .take(MAX_QUOTED)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// Standard base64 with padding (RFC 4648 §4), for the Basic credentials;
/// a dozen lines do not justify a dependency.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            // RFC 7617's example.
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn heads_are_parsed_and_garbage_refused() {
        let ok = parse_head(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n").unwrap();
        assert_eq!(
            (ok.status, ok.reason.as_str()),
            (200, "Connection established")
        );
        assert_eq!(parse_head(b"HTTP/1.0 200\n\n").unwrap().status, 200);
        let auth = parse_head(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"x\"\r\n\r\n",
        )
        .unwrap();
        assert_eq!(auth.challenge.as_deref(), Some("Basic realm=\"x\""));
        for bad in [
            &b"SSH-2.0-OpenSSH_9.2\r\n\r\n"[..],
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 2000 x\r\n\r\n",
            b"HTTP/1.1 20x\r\n\r\n",
            b"HTTP/1.1 099 x\r\n\r\n",
            b"HTTP/1.1 200 ok\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 ok\r\nbad name: x\r\n\r\n",
            b"",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Control bytes in the reason never reach a log line.
        let odd = parse_head(b"HTTP/1.1 403 no\x1b[31mpe\r\n\r\n").unwrap();
        assert_eq!(odd.reason, "no?[31mpe");
    }

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\n\r\nrest"), Some(19));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\n\nrest"), Some(17));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\n\r"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn connect_target_uses_a_safe_host_name_only() {
        let v4: SocketAddr = "198.51.100.10:443".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(target(v4, None), "198.51.100.10:443");
        assert_eq!(target(v6, None), "[2001:db8::1]:443");
        assert_eq!(target(v4, Some("example.com")), "example.com:443");
        assert_eq!(
            target(v4, Some("evil.com\r\nX-Injected: 1")),
            "198.51.100.10:443"
        );
        assert_eq!(target(v4, Some("")), "198.51.100.10:443");
        // The same rule as SOCKS5's send_domain: an IP literal, a trailing
        // dot, an underscore or capitals are no host name to send.
        for odd in ["192.0.2.1", "example.com.", "_x.example", "Example.com"] {
            assert_eq!(target(v4, Some(odd)), "198.51.100.10:443", "{odd:?}");
        }
    }

    /// A fake proxy: reads one request head and sends `answer` in pieces,
    /// pausing between them; returns the request it saw.
    async fn fake_proxy(
        pieces: Vec<Vec<u8>>,
        pause: Duration,
    ) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while head_end(&request).is_none() {
                if s.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                request.push(byte[0]);
            }
            for piece in pieces {
                s.write_all(&piece).await.unwrap();
                tokio::time::sleep(pause).await;
            }
            // Hold the connection open for the slow-server case.
            tokio::time::sleep(Duration::from_secs(3)).await;
            String::from_utf8(request).unwrap()
        });
        (server, task)
    }

    fn client(server: SocketAddr, auth: Option<(&str, &str)>, send_domain: bool) -> HttpClient {
        HttpClient::new(
            server,
            auth.map(|(u, p)| Credentials {
                username: u.into(),
                password: p.into(),
            }),
            send_domain,
            0,
            Duration::from_millis(500),
        )
    }

    const DST: &str = "198.51.100.10:7";

    #[tokio::test]
    async fn a_200_answer_connects_and_keeps_early_bytes() {
        // The head arrives split, the blank line across two pieces, and the
        // server's first bytes in the same piece as the head's end.
        let (server, task) = fake_proxy(
            vec![
                b"HTTP/1.1 200 Connection est".to_vec(),
                b"ablished\r\nProxy-Agent: fake\r\n\r".to_vec(),
                b"\nEARLY BYTES".to_vec(),
            ],
            Duration::from_millis(30),
        )
        .await;
        let mut s = client(server, Some(("user", "pass")), false)
            .connect(DST.parse().unwrap(), Some("example.com"))
            .await
            .unwrap();
        let mut got = [0u8; 11];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"EARLY BYTES");
        drop(s);
        let request = task.await.unwrap();
        assert!(
            request.starts_with("CONNECT 198.51.100.10:7 HTTP/1.1\r\nHost: 198.51.100.10:7\r\n"),
            "{request:?}"
        );
        assert!(
            request.contains("Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"),
            "{request:?}"
        );
    }

    #[tokio::test]
    async fn send_domain_connects_to_the_host_name() {
        let (server, task) =
            fake_proxy(vec![b"HTTP/1.1 200 OK\r\n\r\n".to_vec()], Duration::ZERO).await;
        let s = client(server, None, true)
            .connect(DST.parse().unwrap(), Some("example.com"))
            .await
            .unwrap();
        drop(s);
        let request = task.await.unwrap();
        assert!(
            request.starts_with("CONNECT example.com:7 HTTP/1.1\r\n"),
            "{request:?}"
        );
        assert!(!request.contains("Proxy-Authorization"), "{request:?}");
    }

    #[tokio::test]
    async fn a_407_says_credentials_are_needed_or_wrong() {
        let answer =
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"p\"\r\n\r\n";
        let (server, _task) = fake_proxy(vec![answer.to_vec()], Duration::ZERO).await;
        let err = client(server, None, false)
            .connect(DST.parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::CredentialsNeeded { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("407") && text.contains("username and password"),
            "{text}"
        );
        assert!(text.contains(r#"challenge "Basic realm=\"p\"""#), "{text}");

        // tinyproxy answers 401, not 407: the same meaning for a proxy.
        let (server, _task) = fake_proxy(
            vec![b"HTTP/1.0 401 Unauthorized\r\n\r\n".to_vec()],
            Duration::ZERO,
        )
        .await;
        let err = client(server, None, false)
            .connect(DST.parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, HttpError::CredentialsNeeded { status: 401, .. }),
            "{err}"
        );

        let (server, _task) = fake_proxy(vec![answer.to_vec()], Duration::ZERO).await;
        let err = client(server, Some(("user", "wrong")), false)
            .connect(DST.parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::AuthFailed { .. }), "{err}");
        assert!(
            err.to_string().contains("wrong username or password"),
            "{err}"
        );
        assert!(
            !err.to_string().contains("wrong\""),
            "password shown: {err}"
        );
    }

    #[tokio::test]
    async fn other_statuses_are_typed_refusals() {
        let (server, _task) = fake_proxy(
            vec![b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n".to_vec()],
            Duration::ZERO,
        )
        .await;
        let err = client(server, None, false)
            .connect(DST.parse().unwrap(), None)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(502));
        assert!(err.is_destination_failure());
        assert!(
            err.to_string()
                .contains("refused CONNECT 198.51.100.10:7: 502 Bad Gateway"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_and_endless_heads_are_errors() {
        let (server, _task) = fake_proxy(
            vec![b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()],
            Duration::ZERO,
        )
        .await;
        let err = client(server, None, false)
            .connect(DST.parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Malformed { .. }), "{err}");

        let endless = vec![b"HTTP/1.1 200 OK\r\nX: ".to_vec(), vec![b'a'; MAX_HEAD]];
        let (server, _task) = fake_proxy(endless, Duration::ZERO).await;
        let err = client(server, None, false)
            .connect(DST.parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::HeadTooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_silent_or_closing_server_fails_in_time() {
        let (server, _task) = fake_proxy(vec![], Duration::ZERO).await;
        let started = std::time::Instant::now();
        let err = client(server, None, false)
            .connect(DST.parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.write_all(b"HTTP/1.1 200").await;
        });
        let err = client(server, None, false)
            .connect(DST.parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Io { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_proxy_is_told_apart() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        drop(listener);
        let c = client(server, None, false);
        let err = c.connect(DST.parse().unwrap(), None).await.unwrap_err();
        assert!(matches!(err, HttpError::Unreachable { .. }), "{err}");
        assert!(c.reachable().await.is_err());
    }
}
