//! DNS over TLS (RFC 7858) to one named resolver, through an outbound
//! (the `dns-tls` feature).
//!
//! The connections are DNS over TCP's ([`crate::dns::tcp::Pool`]) with a
//! TLS stream under the framing: one connection per outbound, reused and
//! pipelined (a second opens only when one has many answers waiting),
//! answers matched by id, a query whose connection closes asked once more
//! on a fresh one, [`TIMEOUT`] for the whole exchange.
//!
//! Certificates are checked (there is no switch to turn that off): the
//! configured `server_name` is the name the certificate must hold and the
//! SNI sent; without one, the resolver's IP must be in the certificate as
//! an IP address (Cloudflare's and Google's are). Trusted: Mozilla's roots
//! (webpki-roots, compiled in: a router image often has no CA bundle) and
//! the system's bundle when there is one ([`SYSTEM_BUNDLES`]).
//!
//! This file also holds what DNS over HTTPS ([`super::https`]) shares:
//! [`tls_config`], the handshake and its errors, [`TlsError`].

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, RootCertStore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

pub use rustls::ClientConfig;

use crate::dns::message;
use crate::dns::tcp::{Dial, ExchangeError, Pool};
use crate::outbound::{Outbound, TcpUpstream};

/// How long one exchange may take, handshake and retry included.
pub const TIMEOUT: Duration = crate::dns::tcp::QUERY_TIMEOUT;

/// CA bundles read when present, first found wins (after `SSL_CERT_FILE`):
/// Debian's and OpenWrt's `ca-bundle` (`/etc/ssl/certs/ca-certificates.crt`,
/// also linked as `/etc/ssl/cert.pem` there), and Entware's.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/cert.pem",
    "/opt/etc/ssl/certs/ca-certificates.crt",
];

/// Upstreams per resolver kept for distinct outbounds at once.
const MAX_POOLS: usize = 16;

/// Why a DoT or DoH exchange gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// DNS over TLS: the connection could not be opened (the message says
    /// why: the handshake's error names the server name and the fix), was
    /// lost twice, or the answer did not come in time.
    #[error("DNS over TLS: {0}")]
    Exchange(#[from] ExchangeError),
    /// DNS over HTTPS: no connection (TCP, TLS or HTTP/2); says why.
    #[error("DNS over HTTPS: {0}")]
    Connect(String),
    /// DNS over HTTPS: the HTTP/2 connection failed under the query, on a
    /// fresh connection too.
    #[error("DNS over HTTPS to {addr}: {why}")]
    Http { addr: SocketAddr, why: String },
    /// DNS over HTTPS: the server answered with something else than a DNS
    /// message (an HTTP error status, another content type, too long).
    #[error("DNS over HTTPS to {addr}: {why}")]
    BadResponse { addr: SocketAddr, why: String },
    #[error("no answer from {addr} within {} s", TIMEOUT.as_secs())]
    Timeout { addr: SocketAddr },
    /// The answer's id or question is not the query's.
    #[error("the answer from {addr} does not match the query (id or question differ)")]
    Mismatch { addr: SocketAddr },
    #[error("not a DNS query")]
    Malformed,
}

/// Mozilla's roots plus the system's bundle, if any.
pub fn root_store() -> RootCertStore {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let builtin = roots.len();
    let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let paths = env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from));
    for path in paths {
        let Ok(pem) = std::fs::read(&path) else {
            continue;
        };
        let (added, bad) = add_pem(&mut roots, &pem);
        debug!(
            "DNS over TLS/HTTPS: {builtin} built-in roots, {added} from {} ({bad} unusable)",
            path.display()
        );
        break;
    }
    roots
}

/// Adds every certificate in a PEM bundle; returns (added, unusable).
pub fn add_pem(roots: &mut RootCertStore, pem: &[u8]) -> (usize, usize) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    roots.add_parsable_certificates(certs)
}

/// A client config trusting `roots`, with ring as the crypto provider.
pub fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    // Deprecated in rustls 0.23.48 only because ring has no post-quantum
    // key exchange (aws-lc-rs has; it needs CMake and does not build for
    // MIPS): X25519 and the NIST curves, as every DoT/DoH server speaks.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // ring implements every default version and cipher suite: this
        // fails only if rustls itself is broken, not on any input.
        .expect("ring supports TLS 1.2 and 1.3");
    Arc::new(builder.with_root_certificates(roots).with_no_client_auth())
}

/// The config every DoT and DoH upstream shares: built once per process
/// ([`root_store`], [`client_config`]).
pub fn tls_config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| client_config(root_store())))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whom a TLS connection must reach: the config, the name checked in the
/// certificate (and sent as SNI when it is a DNS name), as configured.
#[derive(Clone)]
pub(crate) struct Peer {
    pub(crate) config: Arc<ClientConfig>,
    /// The name to check, or why the configured one is not usable.
    name: Result<ServerName<'static>, String>,
    /// `server_name` as configured ("" when none: the IP is checked).
    configured: String,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr, server_name: String, config: Arc<ClientConfig>) -> Peer {
        let name = if server_name.is_empty() {
            Ok(ServerName::IpAddress(addr.ip().into()))
        } else {
            ServerName::try_from(server_name.clone()).map_err(|_| {
                format!(
                    "server_name {server_name:?} is not a host name or an IP address: \
                     write the name the resolver's certificate holds (e.g. \"dns.google\")"
                )
            })
        };
        Peer {
            config,
            name,
            configured: server_name,
        }
    }

    /// The host for an HTTPS URI: the server name, else the IP.
    pub(crate) fn host(&self, addr: SocketAddr) -> String {
        match (&self.name, addr.ip()) {
            (Ok(ServerName::DnsName(n)), _) => n.as_ref().to_string(),
            (_, std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
            (_, ip) => ip.to_string(),
        }
    }

    /// Opens TCP through `outbound` and does the handshake, within
    /// [`TIMEOUT`]; the error says what failed and what to change.
    pub(crate) async fn connect(
        &self,
        outbound: &Outbound,
        addr: SocketAddr,
    ) -> Result<TlsStream<TcpUpstream>, String> {
        let name = self.name.clone()?;
        let handshake = async {
            let tcp = Box::pin(outbound.connect_tcp(addr, None))
                .await
                .map_err(|e| {
                    format!(
                        "cannot connect to {addr} through outbound {:?}: {e}",
                        outbound.name()
                    )
                })?;
            TlsConnector::from(Arc::clone(&self.config))
                .connect(name, tcp)
                .await
                .map_err(|e| self.explain(addr, &e))
        };
        match tokio::time::timeout(TIMEOUT, handshake).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no TLS handshake with {addr} within {} s (is it a DNS over TLS/HTTPS port?)",
                TIMEOUT.as_secs()
            )),
        }
    }

    /// A handshake error in words a user can act on.
    fn explain(&self, addr: SocketAddr, e: &std::io::Error) -> String {
        let checked = if self.configured.is_empty() {
            format!("the IP address {} (no server_name is set)", addr.ip())
        } else {
            format!("server_name {:?}", self.configured)
        };
        let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
        let Some(rustls::Error::InvalidCertificate(cert)) = tls else {
            return format!("TLS handshake with {addr} ({checked}) failed: {e}");
        };
        match cert {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                let holds = match cert {
                    CertificateError::NotValidForNameContext { presented, .. }
                        if !presented.is_empty() =>
                    {
                        format!(" (it holds {})", presented.join(", "))
                    }
                    _ => String::new(),
                };
                format!(
                    "the certificate of {addr} is not valid for {checked}{holds}: set server_name \
                     in this [[dns.servers]] entry to a name the certificate holds"
                )
            }
            CertificateError::UnknownIssuer => format!(
                "the certificate of {addr} ({checked}) is not signed by a CA tproxyd trusts \
                 (Mozilla's roots, built in, and the system bundle {}): add its CA to that \
                 bundle (OpenWrt: the ca-bundle package) or use a resolver with a public \
                 certificate",
                SYSTEM_BUNDLES[0]
            ),
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => format!(
                "the certificate of {addr} ({checked}) is expired or not valid yet: check the \
                 router's clock (NTP) — it must be right before DNS over TLS can work"
            ),
            other => format!("the certificate of {addr} ({checked}) is refused: {other:?}"),
        }
    }
}

/// The DoT side of a [`Pool`]: TCP through the outbound, then TLS.
#[derive(Clone)]
pub(crate) struct TlsDial(Peer);

impl Dial for TlsDial {
    type Stream = TlsStream<TcpUpstream>;
    const NAME: &'static str = "DNS over TLS";
    fn dial<'a>(
        &'a self,
        outbound: &'a Outbound,
        resolver: SocketAddr,
    ) -> impl Future<Output = Result<Self::Stream, String>> + Send + 'a {
        self.0.connect(outbound, resolver)
    }
}

/// Whether `answer` answers `query`: a response, the same id, the same
/// question (name compared without case: a resolver may not keep 0x20).
pub(crate) fn answers(query: &[u8], answer: &[u8]) -> bool {
    let (Ok(qh), Ok(ah)) = (
        message::Header::parse(query),
        message::Header::parse(answer),
    ) else {
        return false;
    };
    if !ah.is_response() || qh.id != ah.id {
        return false;
    }
    match (message::question(query), message::question(answer)) {
        (Ok(q), Ok(a)) => {
            q.name.eq_ignore_ascii_case(&a.name) && q.qtype == a.qtype && q.qclass == a.qclass
        }
        // No question asked: nothing to compare.
        (Err(_), _) => true,
        // Some resolvers leave the question out of an error answer.
        (Ok(_), Err(_)) => ah.rcode() != 0,
    }
}

/// One DNS-over-TLS resolver (`tls://` in `[[dns.servers]]`).
pub struct TlsUpstream {
    addr: SocketAddr,
    dial: TlsDial,
    /// A pool per outbound key (as in [`crate::dns::tcp::Pools::get`]).
    pools: Mutex<HashMap<u32, Arc<Pool<TlsDial>>>>,
}

impl TlsUpstream {
    /// The resolver at `addr`; its certificate must hold `server_name`
    /// (or, when that is empty, `addr`'s IP). `config`: [`tls_config`]
    /// (tests pass their own CA).
    pub fn new(addr: SocketAddr, server_name: String, config: Arc<ClientConfig>) -> TlsUpstream {
        TlsUpstream {
            addr,
            dial: TlsDial(Peer::new(addr, server_name, config)),
            pools: Mutex::new(HashMap::new()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `query` through the outbound (`key` as in
    /// [`crate::dns::tcp::Pools::get`]) and returns the answer, with the
    /// query's id; checked to answer the query's question.
    pub async fn exchange(
        &self,
        query: &[u8],
        key: u32,
        outbound: &Arc<Outbound>,
    ) -> Result<Vec<u8>, TlsError> {
        if message::Header::parse(query).is_err() {
            return Err(TlsError::Malformed);
        }
        let pool = self.pool(key, outbound);
        let answer = pool.exchange(query).await.map_err(|e| match e {
            ExchangeError::Malformed => TlsError::Malformed,
            ExchangeError::Timeout => TlsError::Timeout { addr: self.addr },
            e => TlsError::Exchange(e),
        })?;
        if !answers(query, &answer) {
            return Err(TlsError::Mismatch { addr: self.addr });
        }
        Ok(answer)
    }

    fn pool(&self, key: u32, outbound: &Arc<Outbound>) -> Arc<Pool<TlsDial>> {
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.get(&key) {
            return Arc::clone(p);
        }
        if pools.len() >= MAX_POOLS {
            // The one used longest ago; its connection ends once idle.
            if let Some(old) = pools
                .iter()
                .min_by_key(|(_, p)| p.last_used())
                .map(|(k, _)| *k)
            {
                pools.remove(&old);
            }
        }
        let pool = Pool::with_dial(self.dial.clone(), Arc::clone(outbound), self.addr);
        pools.insert(key, Arc::clone(&pool));
        pool
    }

    /// Keeps only the connections of outbounds `keep` says yes to (after
    /// a reload).
    pub fn retain(&self, keep: impl Fn(u32) -> bool) {
        lock(&self.pools).retain(|key, _| keep(*key));
    }

    /// TLS connections opened so far, over every outbound.
    pub fn connections_opened(&self) -> u64 {
        lock(&self.pools)
            .values()
            .map(|p| p.connections_opened())
            .sum()
    }
}

#[cfg(test)]
pub(crate) mod tests;
