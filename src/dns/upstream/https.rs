//! DNS over HTTPS (RFC 8484) to one named resolver, through an outbound
//! (the `dns-tls` feature).
//!
//! POST with `application/dns-message` over HTTP/2 (ALPN `h2`; RFC 8484
//! 5.2 makes HTTP/2 the minimum it recommends, and every public resolver
//! has it). One connection per outbound, opened by the first query (the
//! others wait for it rather than each dialing) and shared: each query is
//! a stream of its own, concurrently. The query goes with id 0 (RFC 8484
//! 4.1: cache friendly) and the answer gets the client's id back.
//!
//! A query whose connection fails (GOAWAY, reset, closed, a stream
//! refused) is asked once more on a fresh connection; [`TIMEOUT`] bounds
//! the whole exchange. An HTTP error status or a body that is not a DNS
//! message is an error, not retried. An unused connection is closed after
//! [`IDLE`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use tracing::debug;

use super::tls::{answers, ClientConfig, Peer, TlsError, TIMEOUT};
use crate::dns::message;
use crate::outbound::Outbound;

/// An unused connection is closed after this long.
pub const IDLE: Duration = Duration::from_secs(60);
/// The media type of RFC 8484 4.1.
const DNS_MESSAGE: &str = "application/dns-message";
/// The longest DNS message.
const MAX_ANSWER: usize = 65_535;
/// Upstreams per resolver kept for distinct outbounds at once.
const MAX_SLOTS: usize = 16;
/// After a connection failed to open, queries are told why at once for
/// this long instead of each dialing (as DNS over TCP's pools do).
const DOWN_FOR: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a connection's task and its users share.
struct Shared {
    dead: AtomicBool,
    in_flight: AtomicUsize,
    last_used: Mutex<Instant>,
}

/// One HTTP/2 connection: requests go through `send` (a handle, cloned
/// per query); its task drives the connection.
#[derive(Clone)]
struct Live {
    send: SendRequest<Bytes>,
    shared: Arc<Shared>,
}

/// The connection through one outbound.
struct Slot {
    outbound: Arc<Outbound>,
    /// Async: while one query opens the connection, the others wait for
    /// it instead of opening their own.
    live: tokio::sync::Mutex<Option<Live>>,
    /// The last open failed: until then, no new dial.
    down: Mutex<Option<(Instant, String)>>,
    last_used: Mutex<Instant>,
}

/// How a request failed.
enum Failure {
    /// The connection (or the stream) failed: worth a fresh connection.
    Connection(String),
    /// The server answered, but not with a DNS message.
    Response(String),
}

/// One DNS-over-HTTPS resolver (`https://` in `[[dns.servers]]`).
pub struct HttpsUpstream {
    addr: SocketAddr,
    peer: Peer,
    /// `https://host[:port]/path`, or why it cannot be made.
    uri: Result<http::Uri, String>,
    slots: Mutex<HashMap<u32, Arc<Slot>>>,
    opened: AtomicUsize,
}

impl HttpsUpstream {
    /// The resolver at `addr`, queried at `path` (e.g. `/dns-query`); the
    /// certificate must hold `server_name` (or, when that is empty,
    /// `addr`'s IP), which is also the URI's host. `config`:
    /// [`super::tls::tls_config`] (ALPN `h2` is set here).
    pub fn new(
        addr: SocketAddr,
        server_name: String,
        path: String,
        config: Arc<ClientConfig>,
    ) -> HttpsUpstream {
        let mut h2_config = ClientConfig::clone(&config);
        h2_config.alpn_protocols = vec![b"h2".to_vec()];
        let peer = Peer::new(addr, server_name, Arc::new(h2_config));
        let host = peer.host(addr);
        let port = if addr.port() == 443 {
            String::new()
        } else {
            format!(":{}", addr.port())
        };
        let path = if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        };
        let uri = http::Uri::try_from(format!("https://{host}{port}{path}"))
            .map_err(|e| format!("the path {path:?} does not make a URI: {e}"));
        HttpsUpstream {
            addr,
            peer,
            uri,
            slots: Mutex::new(HashMap::new()),
            opened: AtomicUsize::new(0),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// HTTP/2 connections opened so far, over every outbound.
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed) as u64
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
        let client_id = message::id(query).ok_or(TlsError::Malformed)?;
        let uri = self.uri.clone().map_err(TlsError::Connect)?;
        let mut wire = query.to_vec();
        message::set_id(&mut wire, 0);
        let wire = Bytes::from(wire);
        let slot = self.slot(key, outbound);
        let attempts = async {
            let mut last = String::new();
            for attempt in 0..2 {
                let live = self.live(&slot).await.map_err(TlsError::Connect)?;
                match post(&live, uri.clone(), wire.clone()).await {
                    Ok(answer) => return Ok(answer),
                    Err(Failure::Response(why)) => {
                        return Err(TlsError::BadResponse {
                            addr: self.addr,
                            why,
                        })
                    }
                    Err(Failure::Connection(why)) => {
                        // Not for the next query either.
                        live.shared.dead.store(true, Ordering::Relaxed);
                        if attempt == 0 {
                            debug!(resolver = %self.addr, "DNS over HTTPS: {why}; asking again on a new connection");
                        }
                        last = why;
                    }
                }
            }
            Err(TlsError::Http {
                addr: self.addr,
                why: last,
            })
        };
        let mut answer = tokio::time::timeout(TIMEOUT, attempts)
            .await
            .map_err(|_| TlsError::Timeout { addr: self.addr })??;
        message::set_id(&mut answer, client_id);
        if !answers(query, &answer) {
            return Err(TlsError::Mismatch { addr: self.addr });
        }
        Ok(answer)
    }

    fn slot(&self, key: u32, outbound: &Arc<Outbound>) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get(&key) {
            *lock(&s.last_used) = Instant::now();
            return Arc::clone(s);
        }
        if slots.len() >= MAX_SLOTS {
            // The one used longest ago; its connection ends once idle.
            if let Some(old) = slots
                .iter()
                .min_by_key(|(_, s)| *lock(&s.last_used))
                .map(|(k, _)| *k)
            {
                slots.remove(&old);
            }
        }
        let slot = Arc::new(Slot {
            outbound: Arc::clone(outbound),
            live: tokio::sync::Mutex::new(None),
            down: Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
        });
        slots.insert(key, Arc::clone(&slot));
        slot
    }

    /// Keeps only the connections of outbounds `keep` says yes to (after
    /// a reload).
    pub fn retain(&self, keep: impl Fn(u32) -> bool) {
        lock(&self.slots).retain(|key, _| keep(*key));
    }

    /// The slot's connection, opened now if it has none that works.
    async fn live(&self, slot: &Slot) -> Result<Live, String> {
        let mut live = slot.live.lock().await;
        if let Some(l) = live.as_ref() {
            if !l.shared.dead.load(Ordering::Relaxed) {
                return Ok(l.clone());
            }
        }
        *live = None;
        if let Some((until, why)) = lock(&slot.down).as_ref() {
            if Instant::now() < *until {
                return Err(why.clone());
            }
        }
        match self.open(&slot.outbound).await {
            Ok(l) => {
                *lock(&slot.down) = None;
                *live = Some(l.clone());
                Ok(l)
            }
            Err(why) => {
                debug!(resolver = %self.addr, "DNS over HTTPS: {why}");
                *lock(&slot.down) = Some((Instant::now() + DOWN_FOR, why.clone()));
                Err(why)
            }
        }
    }

    /// TCP through the outbound, TLS with ALPN h2, the HTTP/2 preface;
    /// then a task drives the connection until it fails or idles out.
    async fn open(&self, outbound: &Outbound) -> Result<Live, String> {
        let addr = self.addr;
        let tls = self.peer.connect(outbound, addr).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(format!(
                "{addr} did not agree to HTTP/2 (ALPN h2): it is not a DNS over HTTPS server, \
                 or one that speaks only HTTP/1.1, which tproxyd does not"
            ));
        }
        let handshake = h2::client::Builder::new()
            .initial_window_size(MAX_ANSWER as u32)
            .handshake::<_, Bytes>(tls);
        let (send, conn) = tokio::time::timeout(TIMEOUT, handshake)
            .await
            .map_err(|_| {
                format!(
                    "no HTTP/2 preface from {addr} within {} s",
                    TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("HTTP/2 with {addr} failed to start: {e}"))?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            dead: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        });
        debug!(resolver = %addr, outbound = outbound.name(), "DNS over HTTPS connection open");
        let task_shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let shared = task_shared;
            let mut conn = conn;
            let idle = async {
                loop {
                    tokio::time::sleep(IDLE / 4).await;
                    let quiet = lock(&shared.last_used).elapsed() >= IDLE;
                    if quiet && shared.in_flight.load(Ordering::Relaxed) == 0 {
                        return;
                    }
                }
            };
            let why = tokio::select! {
                r = &mut conn => match r {
                    Ok(()) => "closed".to_string(),
                    Err(e) => e.to_string(),
                },
                () = idle => "idle".to_string(),
            };
            shared.dead.store(true, Ordering::Relaxed);
            debug!(resolver = %addr, "DNS over HTTPS connection ended: {why}");
        });
        Ok(Live { send, shared })
    }
}

/// Counts a request in flight while it lives.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn new(shared: &'a Shared) -> InFlight<'a> {
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        *lock(&shared.last_used) = Instant::now();
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        *lock(&self.0.last_used) = Instant::now();
    }
}

/// One POST on `live`: the answer's bytes (id as the server sent it).
async fn post(live: &Live, uri: http::Uri, query: Bytes) -> Result<Vec<u8>, Failure> {
    let _in_flight = InFlight::new(&live.shared);
    let conn = |e: h2::Error| Failure::Connection(e.to_string());
    let request = http::Request::post(uri)
        .header(CONTENT_TYPE, DNS_MESSAGE)
        .header(ACCEPT, DNS_MESSAGE)
        .header(CONTENT_LENGTH, query.len())
        .body(())
        .map_err(|e| Failure::Response(format!("cannot make the request: {e}")))?;
    // Waits while the server's limit of concurrent streams is reached.
    let mut send = live.send.clone().ready().await.map_err(conn)?;
    let (response, mut body) = send.send_request(request, false).map_err(conn)?;
    body.send_data(query, true).map_err(conn)?;
    let response = response.await.map_err(conn)?;
    let status = response.status();
    if status != http::StatusCode::OK {
        return Err(Failure::Response(format!(
            "HTTP status {status} (is the path right? the usual one is /dns-query)"
        )));
    }
    if let Some(kind) = response.headers().get(CONTENT_TYPE) {
        if kind.as_bytes() != DNS_MESSAGE.as_bytes() {
            return Err(Failure::Response(format!(
                "the answer is {kind:?}, not {DNS_MESSAGE}"
            )));
        }
    }
    let mut body = response.into_body();
    let mut answer = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(conn)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if answer.len() + chunk.len() > MAX_ANSWER {
            return Err(Failure::Response(format!(
                "the answer is longer than {MAX_ANSWER} bytes"
            )));
        }
        answer.extend_from_slice(&chunk);
    }
    Ok(answer)
}

#[cfg(test)]
mod tests;
