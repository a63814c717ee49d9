//! How a query reaches one named resolver (`[[dns.servers]]`) through an
//! outbound, and how its answer is known to be the answer.
//!
//! An [`Upstream`] is made once per configured server; the outbound (and
//! its key, as in [`super::tcp::Pools::get`]) is given per query, so the
//! same server can be reached through whatever the policy picks now.
//!
//! - `udp://` ([`udp`]): one association (a marked socket for `direct`, a
//!   SOCKS5 UDP association, a shadowsocks UDP session) per outbound key,
//!   shared by every query in flight, each sent with a fresh random id of
//!   tproxyd's own; an answer is taken only when its id and its question
//!   are the query's ([`check_answer`]), anything else is dropped and the
//!   wait goes on. A truncated answer (TC) is asked again over TCP; an
//!   outbound that carries no UDP for DNS (a SOCKS5 server without UDP,
//!   `dns_over_tcp`, shadowsocks with `udp = false`, http) gets DNS over
//!   TCP instead.
//! - `tcp://`: the pipelined pools of [`super::tcp`].
//! - `system` ([`system`]): the `nameserver`s of `/etc/resolv.conf`, over
//!   UDP, the next one when the first does not answer. It goes through the
//!   outbound it is given like the others: the caller gives it `direct`
//!   (the router's own resolvers are on its side of any proxy).
//!
//! Every exchange is bounded by [`TIMEOUT`] in all, and a failed attempt
//! is tried once more on a fresh socket or connection. Sockets toward the
//! network are opened by the outbound, which marks them: a query to a
//! resolver is never captured by tproxyd's own firewall rules again.

#[cfg(feature = "dns-tls")]
pub mod https;
pub mod system;
#[cfg(feature = "dns-tls")]
pub mod tls;
pub mod udp;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::message::{self, Header, HEADER_LEN};
use super::tcp::{ExchangeError, Pools};
use crate::config::ServerAddress;
use crate::outbound::Outbound;

/// How long one exchange may take in all, retries included.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Why a resolver gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The outbound refused to carry the query (`block`, or UDP and TCP
    /// both refused by its configuration).
    #[error("refused by the outbound: {0}")]
    Refused(String),
    /// The resolver (or the proxy on the way) could not be reached.
    #[error("cannot reach it: {0}")]
    Unreachable(String),
    #[error("the connection closed before the answer came")]
    Lost,
    #[error("too many queries waiting for an answer")]
    Busy,
    /// What was given to [`Upstream::exchange`] is no DNS query with a
    /// question: the caller answers FORMERR, nobody was asked.
    #[error("not a DNS query with a question")]
    BadQuery,
    /// `system`: no usable `nameserver` line.
    #[error("{0}")]
    NoServers(String),
    /// The server cannot be asked at all in this build or configuration
    /// (`tls://` without the `dns-tls` feature, a host name that was not
    /// resolved).
    #[error("{0}")]
    Unavailable(String),
}

impl From<ExchangeError> for Cause {
    fn from(e: ExchangeError) -> Cause {
        match e {
            ExchangeError::Down(why) => Cause::Unreachable(why),
            ExchangeError::Lost => Cause::Lost,
            ExchangeError::Timeout => Cause::Timeout(super::tcp::QUERY_TIMEOUT),
            ExchangeError::Busy => Cause::Busy,
            ExchangeError::Malformed => Cause::BadQuery,
        }
    }
}

/// A failed exchange: which resolver, through which outbound, and why.
///
/// `outbound` is the outbound's type (`direct`, `socks5`...), the only
/// name an [`Outbound`] knows; the caller, which knows the configured
/// name, may put that in its place ([`UpstreamError::through`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resolver {resolver} through outbound {outbound}: {cause}")]
pub struct UpstreamError {
    pub resolver: String,
    pub outbound: String,
    pub cause: Cause,
}

impl UpstreamError {
    /// The same error naming the outbound `name`.
    pub fn through(mut self, name: &str) -> UpstreamError {
        self.outbound = name.to_string();
        self
    }
}

/// One named resolver.
pub struct Upstream {
    /// As the config writes it, for errors and logs.
    label: String,
    kind: Kind,
    timeout: Duration,
}

enum Kind {
    Udp(udp::UdpResolver),
    Tcp {
        server: SocketAddr,
        pools: Pools,
    },
    System(system::System),
    #[cfg(feature = "dns-tls")]
    Tls(tls::TlsUpstream),
    #[cfg(feature = "dns-tls")]
    Https(https::HttpsUpstream),
    /// Known unusable at build time (the reason): every query fails with
    /// it, so the caller answers SERVFAIL and logs why.
    Unavailable(String),
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("address", &self.label)
            .finish()
    }
}

impl Upstream {
    /// The resolver at `address`. `resolved` is the address of a `tls://`
    /// or `https://` host name, looked up through the server's
    /// `bootstrap`; `server_name` the TLS name to verify.
    pub fn new(
        address: &ServerAddress,
        resolved: Option<SocketAddr>,
        server_name: Option<&str>,
    ) -> Upstream {
        let (label, kind) = match address {
            ServerAddress::Udp(a) => (format!("udp://{a}"), Kind::Udp(udp::UdpResolver::new(*a))),
            ServerAddress::Tcp(a) => (
                format!("tcp://{a}"),
                Kind::Tcp {
                    server: *a,
                    pools: Pools::default(),
                },
            ),
            ServerAddress::System => {
                let s = system::System::new();
                (format!("system ({})", s.path().display()), Kind::System(s))
            }
            ServerAddress::Tls(e) => (
                format!("tls://{}:{}", e.host, e.port),
                tls_kind(address, resolved, server_name, None),
            ),
            ServerAddress::Https { endpoint: e, path } => (
                format!("https://{}:{}{path}", e.host, e.port),
                tls_kind(address, resolved, server_name, Some(path)),
            ),
        };
        Upstream {
            label,
            kind,
            timeout: TIMEOUT,
        }
    }

    /// `system` reading `path` instead of `/etc/resolv.conf` (and no other
    /// file).
    pub fn system_at(path: impl Into<std::path::PathBuf>) -> Upstream {
        let s = system::System::at(path.into(), Vec::new());
        Upstream {
            label: format!("system ({})", s.path().display()),
            kind: Kind::System(s),
            timeout: TIMEOUT,
        }
    }

    /// Another bound than [`TIMEOUT`] for the whole exchange.
    pub fn with_timeout(mut self, timeout: Duration) -> Upstream {
        self.timeout = timeout;
        self
    }

    /// The address as the config writes it (`udp://1.1.1.1:53`...).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// For `system`: the nameservers it reads now (re-read if the file
    /// changed). The caller checks them against tproxyd's own listeners:
    /// a nameserver that is tproxyd (or forwards to it, as dnsmasq on a
    /// router does) would loop. None for the other kinds.
    pub fn system_nameservers(&self) -> Option<Vec<SocketAddr>> {
        match &self.kind {
            Kind::System(s) => Some(s.nameservers()),
            _ => None,
        }
    }

    /// Forgets the sockets and connections of outbounds `keep` says no to
    /// (a reload dropped or rebuilt them).
    pub fn retain(&self, keep: impl Fn(u32) -> bool) {
        match &self.kind {
            Kind::Udp(u) => u.retain(&keep),
            Kind::Tcp { pools, .. } => pools.retain(keep),
            Kind::System(s) => s.retain(&keep),
            #[cfg(feature = "dns-tls")]
            Kind::Tls(t) => t.retain(keep),
            #[cfg(feature = "dns-tls")]
            Kind::Https(h) => h.retain(keep),
            Kind::Unavailable(_) => {}
        }
    }

    /// Asks `query` through `outbound` (its key `key`) and returns the
    /// answer, with the query's id and question (the query's letter case
    /// kept). Bounded by [`TIMEOUT`] in all.
    pub async fn exchange(
        &self,
        query: &[u8],
        key: u32,
        outbound: &Arc<Outbound>,
    ) -> Result<Vec<u8>, UpstreamError> {
        let fail = |cause| UpstreamError {
            resolver: self.label.clone(),
            outbound: outbound.name().to_string(),
            cause,
        };
        if !is_query(query) {
            return Err(fail(Cause::BadQuery));
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let asked = async {
            match &self.kind {
                Kind::Udp(u) => u.exchange(query, key, outbound, deadline).await,
                Kind::Tcp { server, pools } => pools
                    .get(key, outbound, *server)
                    .exchange(query)
                    .await
                    .map_err(Cause::from),
                Kind::System(s) => s.exchange(query, key, outbound, deadline).await,
                #[cfg(feature = "dns-tls")]
                Kind::Tls(t) => t
                    .exchange(query, key, outbound)
                    .await
                    .map_err(|e| Cause::Unreachable(e.to_string())),
                #[cfg(feature = "dns-tls")]
                Kind::Https(h) => h
                    .exchange(query, key, outbound)
                    .await
                    .map_err(|e| Cause::Unreachable(e.to_string())),
                Kind::Unavailable(why) => Err(Cause::Unavailable(why.clone())),
            }
        };
        let mut answer = match tokio::time::timeout_at(deadline, asked).await {
            Err(_) => return Err(fail(Cause::Timeout(self.timeout))),
            Ok(Err(cause)) => return Err(fail(cause)),
            Ok(Ok(answer)) => answer,
        };
        finish_answer(query, &mut answer);
        Ok(answer)
    }
}

/// A `tls://` or `https://` server (`path` for HTTPS): its client in a
/// build with `dns-tls`, else why it cannot be asked. The name checked on
/// its certificate: `server_name`, else the host name it was given by,
/// else its IP (empty: an IP SAN).
fn tls_kind(
    address: &ServerAddress,
    resolved: Option<SocketAddr>,
    server_name: Option<&str>,
    path: Option<&String>,
) -> Kind {
    let Some(addr) = address.socket_addr().or(resolved) else {
        let host = address.host_name().unwrap_or("?");
        return Kind::Unavailable(format!(
            "its host name {host} was not resolved (give it a bootstrap resolver, or an IP)"
        ));
    };
    #[cfg(feature = "dns-tls")]
    {
        let name = server_name
            .or(address.host_name())
            .unwrap_or_default()
            .to_string();
        let config = tls::tls_config();
        match path {
            None => Kind::Tls(tls::TlsUpstream::new(addr, name, config)),
            Some(path) => Kind::Https(https::HttpsUpstream::new(addr, name, path.clone(), config)),
        }
    }
    #[cfg(not(feature = "dns-tls"))]
    {
        let _ = (addr, server_name, path);
        Kind::Unavailable(
            "DNS over TLS and HTTPS need tproxyd built with the dns-tls feature".to_string(),
        )
    }
}

/// Whether `msg` is a standard query with a question: what an upstream
/// is asked.
fn is_query(msg: &[u8]) -> bool {
    let Ok(h) = Header::parse(msg) else {
        return false;
    };
    !h.is_response() && message::question(msg).is_ok()
}

/// How an answer read from a resolver relates to the query sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// It answers this query.
    Match,
    /// No DNS header, or a question that does not parse.
    Malformed,
    /// QR is not set: a query, perhaps our own reflected.
    NotAResponse,
    /// Another id: the answer to another query (or a forgery).
    WrongId,
    /// The same id but another question (or opcode): a late answer to an
    /// id since reused, or a forgery (RFC 5452 9.1).
    WrongQuestion,
}

/// Whether `answer` answers `query` (as sent, with the id on the wire):
/// QR set, the same id and opcode, and the same first question, its name
/// compared without regard to ASCII case (not every resolver keeps the
/// case of a 0x20-mixed name). An error answer may leave the question out
/// (RFC 7766 6.2.1.1 matches the question "if present"): it matches by
/// id; a NOERROR answer without it does not.
///
/// Pure, and total on any bytes (fuzzed by
/// `fuzz/fuzz_targets/dns_upstream_answer.rs`).
pub fn check_answer(query: &[u8], answer: &[u8]) -> Check {
    let (Ok(q), Ok(a)) = (Header::parse(query), Header::parse(answer)) else {
        return Check::Malformed;
    };
    if !a.is_response() {
        return Check::NotAResponse;
    }
    if a.id != q.id {
        return Check::WrongId;
    }
    if a.opcode() != q.opcode() {
        return Check::WrongQuestion;
    }
    let Ok(asked) = message::question(query) else {
        return Check::Malformed;
    };
    if a.qdcount == 0 {
        return if a.rcode() != message::RCODE_NOERROR {
            Check::Match
        } else {
            Check::WrongQuestion
        };
    }
    let Ok(got) = message::question(answer) else {
        return Check::Malformed;
    };
    if got.name.eq_ignore_ascii_case(&asked.name)
        && got.qtype == asked.qtype
        && got.qclass == asked.qclass
    {
        Check::Match
    } else {
        Check::WrongQuestion
    }
}

/// Makes a matching answer the client's: the query's id, and the query's
/// question as it wrote it (0x20 letter case) when the resolver changed
/// only the case. An error answer without a question gets the query's
/// question and header back, with the answer's rcode. Anything else is
/// left as it is. Never panics.
pub fn finish_answer(query: &[u8], answer: &mut Vec<u8>) {
    let Some(id) = message::id(query) else {
        return;
    };
    let Ok(h) = Header::parse(answer) else {
        return;
    };
    if h.qdcount == 0 && h.rcode() != message::RCODE_NOERROR {
        if let Ok(rebuilt) = message::reply_without_records(query, h.rcode()) {
            *answer = rebuilt;
        }
        return;
    }
    message::set_id(answer, id);
    // Only names written out label by label, no pointer, in both: then the
    // bytes line up one for one, and only letters differ.
    if let (Some(qe), Some(ae)) = (plain_name_end(query), plain_name_end(answer)) {
        if let (Some(qn), Some(an)) = (query.get(HEADER_LEN..qe), answer.get_mut(HEADER_LEN..ae)) {
            if qn.len() == an.len() && qn.eq_ignore_ascii_case(an) {
                an.copy_from_slice(qn);
            }
        }
    }
}

/// Where the first question's name ends when it is written without
/// compression pointers.
fn plain_name_end(msg: &[u8]) -> Option<usize> {
    let mut pos = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(pos)?);
        if len == 0 {
            return Some(pos + 1);
        }
        if len > 63 {
            return None;
        }
        pos += 1 + len;
    }
}

/// Whether the TC bit is set: the answer did not fit the datagram.
pub fn is_truncated(answer: &[u8]) -> bool {
    Header::parse(answer).is_ok_and(|h| h.flags & 0x0200 != 0)
}

#[cfg(test)]
mod tests;
