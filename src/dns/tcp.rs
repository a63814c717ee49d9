//! DNS over TCP (RFC 7766) through an outbound: for UDP DNS whose
//! outbound cannot carry UDP (a SOCKS5 server that refuses UDP
//! ASSOCIATE), or is told not to (`dns_over_tcp = true`).
//!
//! One [`Pool`] per (outbound, resolver) holds up to [`MAX_CONNS`]
//! connections, each opened once (a SOCKS5 CONNECT to the resolver) and
//! reused for many queries, pipelined: a query is written as soon as it
//! comes, with its two-byte length in front, and replies are matched by
//! id in whatever order they come back. Many clients pick the same ids
//! (and every stub starts somewhere), so each query gets an id of the
//! connection's own on the way out, and the client's is put back in the
//! reply.
//!
//! An answer is taken only when its question is the query's too
//! ([`super::upstream::check_answer`], RFC 7766 6.2.1.1): a late answer
//! to an id since given to another query is dropped, and that query
//! waits on.
//!
//! Nothing is lost quietly: a query whose connection closes (the resolver
//! or the proxy hung up, idle or not) is sent once more on another, and
//! when that fails too, or no answer comes within [`QUERY_TIMEOUT`], the
//! caller answers SERVFAIL.
//!
//! The pool is generic over how a connection is opened ([`Dial`]): plain
//! TCP through the outbound ([`Plain`]), or DNS over TLS
//! (`dns::upstream::tls`, the `dns-tls` feature), which speaks the same
//! framing over a TLS stream.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::debug;

use super::message;
use super::upstream::{check_answer, Check};
use crate::outbound::{Outbound, TcpUpstream};

/// How a [`Pool`] opens a connection to its resolver.
pub trait Dial: Send + Sync + 'static {
    /// What the length-prefixed queries and answers travel on.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The transport's name in the log ("DNS over TCP").
    const NAME: &'static str;
    /// Opens one connection to `resolver` through `outbound`; the error
    /// is what the queries waiting on it are told
    /// ([`ExchangeError::Down`]), so it names the cause and the fix.
    fn dial<'a>(
        &'a self,
        outbound: &'a Outbound,
        resolver: SocketAddr,
    ) -> impl Future<Output = Result<Self::Stream, String>> + Send + 'a;
}

/// Plain DNS over TCP: a TCP connection through the outbound.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl Dial for Plain {
    type Stream = TcpUpstream;
    const NAME: &'static str = "DNS over TCP";
    async fn dial(&self, outbound: &Outbound, resolver: SocketAddr) -> Result<TcpUpstream, String> {
        Box::pin(outbound.connect_tcp(resolver, None))
            .await
            .map_err(|e| e.to_string())
    }
}

/// Connections per (outbound, resolver).
pub const MAX_CONNS: usize = 4;
/// A new connection is opened (up to [`MAX_CONNS`]) when the least busy
/// one already waits for this many answers: pipelining has its limits at
/// the resolver (some answer in order), and one slow answer should not
/// hold up every client.
const OPEN_ANOTHER_AT: usize = 16;
/// Answers one connection may wait for at once.
const MAX_IN_FLIGHT: usize = 1024;
/// How long a query waits for its answer, retry included.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// An unused connection is closed after this long (resolvers close idle
/// ones themselves after some seconds; RFC 7766 6.2.3).
const IDLE: Duration = Duration::from_secs(20);
/// After a connection failed to open, queries with no open connection to
/// use are answered SERVFAIL at once for this long instead of each dialing.
const DOWN_FOR: Duration = Duration::from_secs(1);

/// Why a query got no answer from the resolver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("cannot reach the resolver: {0}")]
    Down(String),
    #[error("the connection closed before the answer came")]
    Lost,
    #[error("no answer within {} s", QUERY_TIMEOUT.as_secs())]
    Timeout,
    #[error("every connection has {MAX_IN_FLIGHT} queries waiting")]
    Busy,
    #[error("not a DNS message")]
    Malformed,
}

type Answer = Result<Vec<u8>, ExchangeError>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Pending {
    client_id: u16,
    /// The query as written (the connection's id in it), to check the
    /// answer's question against.
    sent: Vec<u8>,
    tx: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct ConnState {
    pending: HashMap<u16, Pending>,
    next_id: u16,
    closed: bool,
    last_active: Option<Instant>,
}

/// One TCP connection to the resolver; its task writes what `tx` carries
/// and reads answers.
struct Conn {
    state: Mutex<ConnState>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    closed: Notify,
}

impl Conn {
    fn new(first_id: u16) -> (Arc<Conn>, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Conn {
            state: Mutex::new(ConnState {
                next_id: first_id,
                ..ConnState::default()
            }),
            tx,
            closed: Notify::new(),
        };
        (Arc::new(conn), rx)
    }

    fn in_flight(&self) -> usize {
        lock(&self.state).pending.len()
    }

    fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Queues `query` (with an id of this connection's) for writing; the
    /// receiver gets the answer with the client's id back.
    fn submit(&self, query: &[u8]) -> Result<oneshot::Receiver<Answer>, ExchangeError> {
        let client_id = message::id(query).ok_or(ExchangeError::Malformed)?;
        let len = u16::try_from(query.len()).map_err(|_| ExchangeError::Malformed)?;
        let mut st = lock(&self.state);
        if st.closed {
            return Err(ExchangeError::Lost);
        }
        if st.pending.len() >= MAX_IN_FLIGHT {
            // Callers that gave up (timed out) leave their entry behind.
            st.pending.retain(|_, p| !p.tx.is_closed());
            if st.pending.len() >= MAX_IN_FLIGHT {
                return Err(ExchangeError::Busy);
            }
        }
        let mut wire_id = st.next_id;
        while st.pending.contains_key(&wire_id) {
            wire_id = wire_id.wrapping_add(1);
        }
        st.next_id = wire_id.wrapping_add(1);
        let mut frame = Vec::with_capacity(2 + query.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(query);
        message::set_id(&mut frame[2..], wire_id);
        let (tx, rx) = oneshot::channel();
        let sent = frame[2..].to_vec();
        st.pending.insert(
            wire_id,
            Pending {
                client_id,
                sent,
                tx,
            },
        );
        st.last_active = Some(Instant::now());
        // Under the lock: the task closes the connection under it too, so
        // a frame is either written or its query answered Lost.
        if self.tx.send(frame).is_err() {
            st.pending.remove(&wire_id);
            return Err(ExchangeError::Lost);
        }
        Ok(rx)
    }

    /// Hands an answer read from the connection to its query.
    fn deliver(&self, mut answer: Vec<u8>) {
        let Some(wire_id) = message::id(&answer) else {
            return;
        };
        let mut st = lock(&self.state);
        st.last_active = Some(Instant::now());
        let matches = st
            .pending
            .get(&wire_id)
            .is_some_and(|p| check_answer(&p.sent, &answer) == Check::Match);
        if !matches {
            debug!(
                wire_id,
                "DNS over TCP: an answer that matches no query waiting, dropped"
            );
            return;
        }
        if let Some(p) = st.pending.remove(&wire_id) {
            drop(st);
            message::set_id(&mut answer, p.client_id);
            let _ = p.tx.send(Ok(answer));
        }
    }

    /// Ends the connection: later submits are refused, and every query
    /// still waiting gets `why` (its caller then retries or answers
    /// SERVFAIL).
    fn close(&self, why: ExchangeError) {
        let pending = {
            let mut st = lock(&self.state);
            st.closed = true;
            std::mem::take(&mut st.pending)
        };
        for (_, p) in pending {
            let _ = p.tx.send(Err(why.clone()));
        }
        self.closed.notify_waiters();
    }

    /// Closes when nothing is waiting and nothing was asked for `IDLE`;
    /// returns whether it did.
    fn close_if_idle(&self) -> bool {
        let mut st = lock(&self.state);
        let idle = st.last_active.is_none_or(|t| t.elapsed() >= IDLE);
        if idle && st.pending.is_empty() {
            st.closed = true;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct PoolState {
    conns: Vec<Arc<Conn>>,
    /// The last open failed: until then, no new dial.
    down: Option<(Instant, String)>,
    last_used: Option<Instant>,
    next_first_id: u16,
}

/// The connections to one resolver through one outbound.
pub struct Pool<D: Dial = Plain> {
    dial: D,
    outbound: Arc<Outbound>,
    resolver: SocketAddr,
    state: Mutex<PoolState>,
    /// Connections opened so far (for the tests and the log).
    opened: portable_atomic::AtomicU64,
}

impl Pool {
    pub fn new(outbound: Arc<Outbound>, resolver: SocketAddr) -> Arc<Pool> {
        Pool::with_dial(Plain, outbound, resolver)
    }
}

impl<D: Dial> Pool<D> {
    /// A pool whose connections `dial` opens.
    pub fn with_dial(dial: D, outbound: Arc<Outbound>, resolver: SocketAddr) -> Arc<Pool<D>> {
        Arc::new(Pool {
            dial,
            outbound,
            resolver,
            state: Mutex::new(PoolState {
                // Each connection counts its ids from another place, so
                // the same query twice (a retry) never shows one id.
                next_first_id: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.subsec_nanos() as u16),
                ..PoolState::default()
            }),
            opened: portable_atomic::AtomicU64::new(0),
        })
    }

    pub fn connections_opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Open connections now.
    pub fn open_connections(&self) -> usize {
        lock(&self.state)
            .conns
            .iter()
            .filter(|c| !c.is_closed())
            .count()
    }

    pub(super) fn last_used(&self) -> Option<Instant> {
        lock(&self.state).last_used
    }

    /// Sends `query` and waits for its answer (the client's id in it):
    /// once more on another connection when the first closes under it.
    pub async fn exchange(self: &Arc<Self>, query: &[u8]) -> Answer {
        let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
        let mut last = ExchangeError::Lost;
        for attempt in 0..2 {
            let conn = self.pick()?;
            let rx = match conn.submit(query) {
                Ok(rx) => rx,
                Err(ExchangeError::Malformed) => return Err(ExchangeError::Malformed),
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match tokio::time::timeout_at(deadline, rx).await {
                Err(_) => return Err(ExchangeError::Timeout),
                Ok(Ok(Ok(answer))) => return Ok(answer),
                Ok(Ok(Err(e))) => last = e,
                Ok(Err(_)) => last = ExchangeError::Lost,
            }
            if attempt == 0 {
                debug!(resolver = %self.resolver, "{}: {last}; asking again on another connection", D::NAME);
            }
        }
        Err(last)
    }

    /// The connection for the next query: the least busy open one, or a
    /// new one while there are fewer than [`MAX_CONNS`] and every open one
    /// is busy.
    fn pick(self: &Arc<Self>) -> Result<Arc<Conn>, ExchangeError> {
        let mut st = lock(&self.state);
        st.last_used = Some(Instant::now());
        st.conns.retain(|c| !c.is_closed());
        let best = st.conns.iter().min_by_key(|c| c.in_flight()).cloned();
        if let Some(c) = &best {
            if c.in_flight() < OPEN_ANOTHER_AT || st.conns.len() >= MAX_CONNS {
                return Ok(Arc::clone(c));
            }
        }
        if best.is_none() {
            if let Some((until, why)) = &st.down {
                if Instant::now() < *until {
                    return Err(ExchangeError::Down(why.clone()));
                }
            }
        }
        let first_id = st.next_first_id;
        st.next_first_id = first_id.wrapping_add(0x4000 + 1);
        let (conn, rx) = Conn::new(first_id);
        st.conns.push(Arc::clone(&conn));
        drop(st);
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(Arc::clone(self).run(Arc::clone(&conn), rx));
        Ok(conn)
    }

    /// A connection's life: open it, then write queries and read answers
    /// until it closes, fails or idles out.
    async fn run(self: Arc<Self>, conn: Arc<Conn>, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
        let opened = self.dial.dial(&self.outbound, self.resolver).await;
        let stream = match opened {
            Ok(s) => s,
            Err(why) => {
                debug!(resolver = %self.resolver, "{}: cannot connect: {why}", D::NAME);
                lock(&self.state).down = Some((Instant::now() + DOWN_FOR, why.clone()));
                conn.close(ExchangeError::Down(why));
                return;
            }
        };
        lock(&self.state).down = None;
        debug!(resolver = %self.resolver, outbound = self.outbound.name(), "{} connection open", D::NAME);
        // Split through a lock, not `into_split`: the upstream may be a
        // framed stream (any arm of `TcpUpstream`), and a query is rare
        // next to the lock's cost.
        let (mut rd, mut wr) = tokio::io::split(stream);
        let reader = async {
            let mut len = [0u8; 2];
            loop {
                if rd.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
                if rd.read_exact(&mut answer).await.is_err() {
                    return;
                }
                conn.deliver(answer);
            }
        };
        let writer = async {
            let mut batch = Vec::new();
            loop {
                let frame = tokio::select! {
                    f = rx.recv() => f,
                    () = tokio::time::sleep(IDLE) => {
                        if conn.close_if_idle() {
                            return;
                        }
                        continue;
                    }
                };
                let Some(frame) = frame else { return };
                // Whatever else is queued goes in the same write.
                batch.clear();
                batch.extend_from_slice(&frame);
                while let Ok(more) = rx.try_recv() {
                    batch.extend_from_slice(&more);
                    if batch.len() > 64 * 1024 {
                        break;
                    }
                }
                // Flushed: a framed upstream may hold the bytes until then.
                if wr.write_all(&batch).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            () = reader => {}
            () = writer => {}
        }
        conn.close(ExchangeError::Lost);
        debug!(resolver = %self.resolver, "{} connection closed", D::NAME);
    }
}

/// The pools of every (outbound, resolver) in use, bounded: a client
/// asking thousands of resolvers must not make thousands of pools.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<(u32, std::net::SocketAddr), Arc<Pool>>>,
}

/// Most pools at once.
const MAX_POOLS: usize = 256;

impl Pools {
    /// Keeps only the pools of outbounds `keep` says yes to (a reload
    /// dropped or rebuilt the others); their connections close as the
    /// last query on them ends.
    pub fn retain(&self, keep: impl Fn(u32) -> bool) {
        lock(&self.pools).retain(|(key, _), _| keep(*key));
    }

    /// The pool for `resolver` through the outbound with `key`.
    pub fn get(
        &self,
        key: u32,
        outbound: &Arc<Outbound>,
        resolver: std::net::SocketAddr,
    ) -> Arc<Pool> {
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.get(&(key, resolver)) {
            return Arc::clone(p);
        }
        if pools.len() >= MAX_POOLS {
            pools.retain(|_, p| p.open_connections() > 0);
            if pools.len() >= MAX_POOLS {
                // The one used longest ago; its connections end by
                // themselves once idle.
                if let Some(key) = pools
                    .iter()
                    .min_by_key(|(_, p)| p.last_used())
                    .map(|(k, _)| *k)
                {
                    pools.remove(&key);
                }
            }
        }
        let pool = Pool::new(Arc::clone(outbound), resolver);
        pools.insert((key, resolver), Arc::clone(&pool));
        pool
    }

    pub fn len(&self) -> usize {
        lock(&self.pools).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::message::{build, question, Header, TYPE_A};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    fn direct() -> Arc<Outbound> {
        Arc::new(Outbound::Direct(crate::outbound::direct::Direct {
            mark: 0,
            connect_timeout: Duration::from_secs(2),
        }))
    }

    /// A TCP resolver on loopback: answers each query with the query
    /// itself marked as a response, after a delay that varies by query
    /// (so answers come back out of order), and closes a connection
    /// without answering at its `drop_at`-th query (0: never).
    async fn resolver(drop_at: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let (mut rd, mut wr) = s.into_split();
                let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
                tokio::spawn(async move {
                    while let Some(out) = rx.recv().await {
                        if wr.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut n = 0usize;
                    loop {
                        let mut len = [0u8; 2];
                        if rd.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                        if rd.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        n += 1;
                        if drop_at > 0 && n >= drop_at {
                            // Dropping both halves closes the connection
                            // with this query (and any late ones) unanswered.
                            return;
                        }
                        q[2] |= 0x80;
                        let mut out = (q.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&q);
                        let tx = tx.clone();
                        let delay = Duration::from_millis((n * 7 % 5) as u64);
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = tx.send(out);
                        });
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn ask_many(pool: &Arc<Pool>, n: usize) -> Vec<Answer> {
        let mut tasks = Vec::new();
        for i in 0..n {
            let pool = Arc::clone(pool);
            tasks.push(tokio::spawn(async move {
                // Every client picks the same id: the pool must not mix
                // their answers up.
                let q = build::query(7, &format!("q{i}.example"), TYPE_A);
                let a = pool.exchange(&q).await;
                if let Ok(a) = &a {
                    assert_eq!(Header::parse(a).unwrap().id, 7);
                    assert_eq!(question(a).unwrap().name, question(&q).unwrap().name);
                }
                a
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_queries_share_a_few_connections_and_each_gets_its_answer() {
        let (addr, accepted) = resolver(0).await;
        let pool = Pool::new(direct(), addr);
        let answers = ask_many(&pool, 500).await;
        assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
        let n = accepted.load(Ordering::Relaxed);
        assert!((1..=MAX_CONNS).contains(&n), "{n} connections");
        // Reused afterwards.
        ask_many(&pool, 10).await;
        assert_eq!(accepted.load(Ordering::Relaxed), n);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_on_a_connection_that_closes_are_asked_again() {
        // Each connection dies at its 5th query: every query caught there
        // is asked again on another connection, and answered.
        let (addr, accepted) = resolver(5).await;
        let pool = Pool::new(direct(), addr);
        for _ in 0..10 {
            let answers = ask_many(&pool, 3).await;
            for a in &answers {
                assert!(matches!(a, Ok(_) | Err(ExchangeError::Lost)), "{a:?}");
            }
        }
        // Sequential single queries: a retry always lands on a fresh one.
        for i in 0..20 {
            let q = build::query(1, &format!("s{i}.example"), TYPE_A);
            assert!(pool.exchange(&q).await.is_ok(), "query {i}");
        }
        assert!(accepted.load(Ordering::Relaxed) > 1);
    }

    #[tokio::test]
    async fn an_answer_to_another_question_is_dropped_and_the_wait_goes_on() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.unwrap();
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut q).await.unwrap();
            // First the answer to another name with the query's id...
            let mut other = build::query(0, "other.example", TYPE_A);
            other[..2].copy_from_slice(&q[..2]);
            // ...then the right one.
            for mut a in [other, q] {
                a[2] |= 0x80;
                let mut out = (a.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&a);
                s.write_all(&out).await.unwrap();
            }
            // Held open until the test ends.
            let _ = s.read(&mut len).await;
        });
        let pool = Pool::new(direct(), addr);
        let q = build::query(3, "right.example", TYPE_A);
        let a = pool.exchange(&q).await.unwrap();
        assert_eq!(question(&a).unwrap().name, b"right.example");
        assert_eq!(Header::parse(&a).unwrap().id, 3);
    }

    #[tokio::test]
    async fn a_resolver_that_cannot_be_reached_fails_fast() {
        // Bound and closed: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = Pool::new(direct(), addr);
        let q = build::query(1, "a.example", TYPE_A);
        assert!(matches!(
            pool.exchange(&q).await,
            Err(ExchangeError::Down(_))
        ));
        // Within DOWN_FOR: no new dial.
        let before = pool.connections_opened();
        assert!(matches!(
            pool.exchange(&q).await,
            Err(ExchangeError::Down(_))
        ));
        assert_eq!(pool.connections_opened(), before);
    }
}
