//! Load generator and servers for `bench/run`.
//!
//! One binary plays both ends so that every configuration of the benchmark
//! is measured with the same client and the same server:
//!
//! ```text
//! loadgen serve    --tcp ADDR --udp ADDR        (on the WAN side)
//! loadgen tcp-crr  --target ADDR --concurrency C --seconds S [--tls NAME]
//! loadgen tcp-lat  --target ADDR --count N [--tls NAME]
//! loadgen udp-rr   --target ADDR --sockets K --seconds S
//! loadgen udp-lat  --target ADDR --count N
//! loadgen hold     --target ADDR --count N     (keeps N idle flows open)
//! loadgen udp-flood --target ADDR --ports N    (one datagram from each of N new ports)
//! loadgen dns-serve --addr ADDR                 (a DNS server, UDP and TCP; every A is ADDR's IP)
//! loadgen dns-load --target ADDR --rate R --seconds S --sockets K
//!                                              (R queries/s, open loop, from K ports)
//! ```
//!
//! Each client mode prints one JSON object on stdout. `hold` prints its
//! object once every connection has exchanged a message (so the proxy has
//! set up its side of each), then keeps them open until stdin closes.
//!
//! The TCP exchange is HTTP/1.0-shaped: a 64-byte request, a 64-byte
//! answer, then the server closes. The server closing first keeps
//! TIME_WAIT off the client's and the proxy's port ranges.
//!
//! With `--tls NAME` the request is instead a TLS ClientHello naming NAME
//! (517 bytes, the classic size of a browser's), echoed and closed the
//! same way: the exchange a proxy that routes by SNI has to sniff.

use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const MESSAGE: usize = 64;
/// First request byte: answer, then close.
const CLOSE_AFTER: u8 = b'C';
/// First request byte: answer, then keep the connection until the client
/// closes it.
const KEEP_OPEN: u8 = b'K';
const UDP_TIMEOUT: Duration = Duration::from_millis(200);
/// A TLS record's header: type, version, length. A request whose first
/// byte is [`TLS_HANDSHAKE`] is one record long.
const TLS_HEADER: usize = 5;
const TLS_HANDSHAKE: u8 = 22;
/// The ClientHello record's length on the wire, padded to it.
const CLIENT_HELLO_LEN: usize = 517;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args
        .first()
        .ok_or("usage: loadgen MODE [--flag value]...")?;
    let flag = |name: &str| -> Result<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or_else(|| format!("{mode} needs {name}").into())
    };
    let addr = |name: &str| -> Result<SocketAddr> { Ok(flag(name)?.parse()?) };
    let number = |name: &str| -> Result<u64> { Ok(flag(name)?.parse()?) };
    // What each TCP exchange sends: the plain request, or a ClientHello.
    let request = || -> Result<Vec<u8>> {
        match args.iter().position(|a| a == "--tls") {
            Some(_) => client_hello(&flag("--tls")?),
            None => Ok(plain_request(CLOSE_AFTER)),
        }
    };
    raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match mode.as_str() {
            "serve" => serve(addr("--tcp")?, addr("--udp")?).await,
            "tcp-crr" => {
                tcp_crr(
                    addr("--target")?,
                    number("--concurrency")?,
                    secs(number("--seconds")?),
                    Arc::new(request()?),
                )
                .await
            }
            "tcp-lat" => tcp_lat(addr("--target")?, number("--count")?, &request()?).await,
            "udp-rr" => {
                udp_rr(
                    addr("--target")?,
                    number("--sockets")?,
                    secs(number("--seconds")?),
                )
                .await
            }
            "udp-lat" => udp_lat(addr("--target")?, number("--count")?).await,
            "hold" => hold(addr("--target")?, number("--count")?).await,
            "udp-flood" => udp_flood(addr("--target")?, number("--ports")?).await,
            "dns-serve" => dns_serve(addr("--addr")?).await,
            "dns-load" => {
                dns_load(
                    addr("--target")?,
                    number("--rate")?,
                    secs(number("--seconds")?),
                    number("--sockets")?,
                )
                .await
            }
            other => Err(format!("unknown mode {other}").into()),
        }
    })
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The plain request: its first byte says what the server does after
/// answering.
fn plain_request(kind: u8) -> Vec<u8> {
    let mut request = vec![b'.'; MESSAGE];
    request[0] = kind;
    request
}

/// A TLS 1.3-shaped ClientHello record naming `name`, padded (RFC 7685)
/// to [`CLIENT_HELLO_LEN`] bytes.
fn client_hello(name: &str) -> Result<Vec<u8>> {
    fn u16_be(v: usize) -> [u8; 2] {
        (v as u16).to_be_bytes()
    }
    let host = name.as_bytes();
    let mut sni = Vec::new();
    sni.extend(u16_be(host.len() + 3)); // server_name_list
    sni.push(0); // host_name
    sni.extend(u16_be(host.len()));
    sni.extend(host);
    let mut extensions = Vec::new();
    extensions.extend([0, 0]); // server_name
    extensions.extend(u16_be(sni.len()));
    extensions.extend(&sni);
    extensions.extend([0, 43, 0, 3, 2, 3, 4]); // supported_versions: TLS 1.3
    let mut body = vec![3, 3]; // legacy_version
    body.extend((0..32u8).map(|i| i.wrapping_mul(37))); // random
    body.push(32); // legacy_session_id
    body.extend((0..32u8).map(|i| i.wrapping_mul(11)));
    body.extend([0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]); // cipher_suites
    body.extend([1, 0]); // legacy_compression_methods: null
                         // Everything but the padding extension's body, counted from the record.
    let unpadded = TLS_HEADER + 4 + body.len() + 2 + extensions.len() + 4;
    let pad = CLIENT_HELLO_LEN
        .checked_sub(unpadded)
        .ok_or("--tls: name too long")?;
    extensions.extend([0, 21]); // padding
    extensions.extend(u16_be(pad));
    extensions.resize(extensions.len() + pad, 0);
    body.extend(u16_be(extensions.len()));
    body.extend(&extensions);
    let mut record = vec![TLS_HANDSHAKE, 3, 1];
    record.extend(u16_be(body.len() + 4));
    record.push(1); // client_hello
    record.extend(&(body.len() as u32).to_be_bytes()[1..]);
    record.extend(&body);
    debug_assert_eq!(record.len(), CLIENT_HELLO_LEN);
    Ok(record)
}

fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

async fn serve(tcp: SocketAddr, udp: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(tcp).await?;
    let socket = Arc::new(UdpSocket::bind(udp).await?);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            if let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], peer).await;
            }
        }
    });
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors for a moment: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut request = vec![0u8; MESSAGE];
            if stream.read_exact(&mut request[..TLS_HEADER]).await.is_err() {
                return;
            }
            // A ClientHello is one record; anything else a plain request.
            let len = if request[0] == TLS_HANDSHAKE {
                TLS_HEADER + usize::from(u16::from_be_bytes([request[3], request[4]]))
            } else {
                MESSAGE
            };
            request.resize(len, 0);
            if stream.read_exact(&mut request[TLS_HEADER..]).await.is_err() {
                return;
            }
            if stream.write_all(&request).await.is_err() {
                return;
            }
            if request[0] == KEEP_OPEN {
                let mut rest = [0u8; 1];
                let _ = stream.read(&mut rest).await;
            }
        });
    }
}

/// Longest a TCP exchange may take before it counts as failed (a lost SYN
/// is retried after 1 s, so this leaves room for a few).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// One request/answer over a new connection; returns the open connection
/// when the server keeps it.
async fn exchange(target: SocketAddr, request: &[u8]) -> Result<TcpStream> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange_once(target, request))
        .await
        .map_err(|_| format!("no answer from {target} within {EXCHANGE_TIMEOUT:?}"))?
}

async fn exchange_once(target: SocketAddr, request: &[u8]) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    stream.write_all(request).await?;
    let mut answer = [0u8; CLIENT_HELLO_LEN];
    let answer = &mut answer[..request.len()];
    stream.read_exact(answer).await?;
    if answer != request {
        return Err("answer differs from request".into());
    }
    if request[0] != KEEP_OPEN {
        // Wait for the server's FIN so the exchange is complete.
        let mut rest = [0u8; 1];
        if stream.read(&mut rest).await? != 0 {
            return Err("server sent more than the answer".into());
        }
    }
    Ok(stream)
}

async fn tcp_crr(
    target: SocketAddr,
    concurrency: u64,
    seconds: Duration,
    request: Arc<Vec<u8>>,
) -> Result<()> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
        let request = request.clone();
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match exchange(target, &request).await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(seconds).await;
    let (count, elapsed) = (done.load(Ordering::Relaxed), start.elapsed());
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    println!(
        "{{\"conns_per_s\": {:.1}, \"conns\": {count}, \"errors\": {}}}",
        count as f64 / elapsed.as_secs_f64(),
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

/// p50 and p99 of the samples, in microseconds.
fn percentiles(mut samples: Vec<Duration>) -> Result<(f64, f64)> {
    if samples.is_empty() {
        return Err("no successful exchange to take a latency from".into());
    }
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    Ok((at(0.50), at(0.99)))
}

async fn tcp_lat(target: SocketAddr, count: u64, request: &[u8]) -> Result<()> {
    let mut samples = Vec::new();
    let mut errors = 0u64;
    for _ in 0..count {
        let t = Instant::now();
        match exchange(target, request).await {
            Ok(_) => samples.push(t.elapsed()),
            Err(_) => errors += 1,
        }
    }
    let (p50, p99) = percentiles(samples)?;
    println!("{{\"p50_us\": {p50:.1}, \"p99_us\": {p99:.1}, \"errors\": {errors}}}");
    Ok(())
}

/// Sends one datagram and waits for its echo; `None` when it timed out.
async fn udp_exchange(socket: &UdpSocket, seq: u64) -> io::Result<Option<Duration>> {
    let request = seq.to_be_bytes();
    let t = Instant::now();
    socket.send(&request).await?;
    let mut answer = [0u8; 64];
    let deadline = t + UDP_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline.into(), socket.recv(&mut answer)).await {
            Err(_) => return Ok(None),
            // A late echo of an earlier datagram: keep waiting for ours.
            Ok(Ok(n)) if answer[..n] != request => continue,
            Ok(Ok(_)) => return Ok(Some(t.elapsed())),
            Ok(Err(e)) => return Err(e),
        }
    }
}

async fn connected_udp(target: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal address")
    } else {
        "[::]:0".parse().expect("literal address")
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(target).await?;
    Ok(socket)
}

async fn udp_rr(target: SocketAddr, sockets: u64, seconds: Duration) -> Result<()> {
    let done = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let start = Instant::now();
    for _ in 0..sockets {
        let socket = connected_udp(target).await?;
        let (done, lost, stop) = (done.clone(), lost.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                match udp_exchange(&socket, seq).await {
                    Ok(Some(_)) => done.fetch_add(1, Ordering::Relaxed),
                    _ => lost.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(seconds).await;
    let (count, elapsed) = (done.load(Ordering::Relaxed), start.elapsed());
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    println!(
        "{{\"exchanges_per_s\": {:.1}, \"timeouts\": {}}}",
        count as f64 / elapsed.as_secs_f64(),
        lost.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn udp_lat(target: SocketAddr, count: u64) -> Result<()> {
    let socket = connected_udp(target).await?;
    let mut samples = Vec::new();
    let mut timeouts = 0u64;
    for seq in 0..count {
        match udp_exchange(&socket, seq).await? {
            Some(rtt) => samples.push(rtt),
            None => timeouts += 1,
        }
    }
    let (p50, p99) = percentiles(samples)?;
    println!("{{\"p50_us\": {p50:.1}, \"p99_us\": {p99:.1}, \"timeouts\": {timeouts}}}");
    Ok(())
}

async fn hold(target: SocketAddr, count: u64) -> Result<()> {
    // Open in waves so the proxy and the server see a realistic accept
    // backlog instead of one burst of thousands of SYNs.
    const WAVE: u64 = 200;
    let request = Arc::new(plain_request(KEEP_OPEN));
    let mut open = Vec::with_capacity(count as usize);
    let mut failed = 0u64;
    let mut started = 0u64;
    while started < count {
        let wave = WAVE.min(count - started);
        let attempts: Vec<_> = (0..wave)
            .map(|_| {
                let request = request.clone();
                tokio::spawn(async move { exchange(target, &request).await })
            })
            .collect();
        for attempt in attempts {
            match attempt.await {
                Ok(Ok(stream)) => open.push(stream),
                _ => failed += 1,
            }
        }
        started += wave;
    }
    println!("{{\"open\": {}, \"failed\": {failed}}}", open.len());
    io::stdout().flush()?;
    // Hold until the caller closes stdin.
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while io::stdin()
            .lock()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            line.clear();
        }
    })
    .await?;
    drop(open);
    Ok(())
}

/// One datagram from each of `ports` new source ports, as a scan or a
/// flood of new clients would send: every one asks the proxy for a new
/// session. Paced a little so the proxy's receive queue does not simply
/// overflow, which would test the queue rather than the session table.
async fn udp_flood(target: SocketAddr, ports: u64) -> Result<()> {
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut sent = 0u64;
    for i in 0..ports {
        let socket = std::net::UdpSocket::bind(any)?;
        if socket.send_to(b"flood", target).is_ok() {
            sent += 1;
        }
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    println!("{{\"sent\": {sent}}}");
    Ok(())
}

/// The answer to a DNS query: the question echoed, one A record with
/// `ip` (none for other types), no additional section (the query's EDNS
/// record is dropped). None for what is not a query.
fn dns_answer(query: &[u8], ip: std::net::Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut at = 12;
    loop {
        let len = *query.get(at)? as usize;
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let end = at + 4;
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let mut reply = query.get(..end)?.to_vec();
    reply[2] = 0x84 | (query[2] & 1);
    reply[3] = 0x80;
    reply[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    if qtype == 1 {
        reply[7] = 1;
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

/// A DNS server on `addr`, UDP and TCP (RFC 7766 framing, pipelined
/// queries answered in order): the benchmark's resolver.
async fn dns_serve(addr: SocketAddr) -> Result<()> {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        return Err("dns-serve needs an IPv4 address".into());
    };
    let udp = UdpSocket::bind(addr).await?;
    let tcp = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.split();
                let mut rd = tokio::io::BufReader::new(&mut rd);
                loop {
                    let mut len = [0u8; 2];
                    if rd.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if rd.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    if let Some(a) = dns_answer(&q, ip) {
                        let mut out = (a.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&a);
                        if wr.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = udp.recv_from(&mut buf).await?;
        if let Some(a) = dns_answer(&buf[..n], ip) {
            let _ = udp.send_to(&a, peer).await;
        }
    }
}

/// Sends `rate` DNS queries a second for `seconds`, open loop (on a
/// schedule, whatever the answers do), spread over `sockets` ports, and
/// waits up to 3 s for the last answers. Prints how many were sent,
/// answered and lost, and the latency of the answered ones.
async fn dns_load(target: SocketAddr, rate: u64, seconds: Duration, sockets: u64) -> Result<()> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let total = rate * seconds.as_secs();
    let mut socks = Vec::new();
    for _ in 0..sockets.max(1) {
        let s = UdpSocket::bind(bind).await?;
        s.connect(target).await?;
        socks.push(Arc::new(s));
    }
    // Send time by query number; the id and the socket name the query.
    let sent_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; total as usize]));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    let k = socks.len() as u64;
    for (i, s) in socks.iter().enumerate() {
        let (s, sent_at, latencies) = (Arc::clone(s), Arc::clone(&sent_at), Arc::clone(&latencies));
        readers.push(tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut seen = std::collections::HashSet::new();
            loop {
                let Ok(n) = s.recv(&mut buf).await else {
                    continue;
                };
                if n < 12 {
                    continue;
                }
                // Query number = id * sockets + socket index.
                let id = u64::from(u16::from_be_bytes([buf[0], buf[1]]));
                let q = id * k + i as u64;
                let at = sent_at.lock().map(|v| v.get(q as usize).copied().flatten());
                if let Ok(Some(at)) = at {
                    if seen.insert(q) {
                        latencies.lock().map(|mut l| l.push(at.elapsed())).ok();
                    }
                }
            }
        }));
    }
    if total / k > u64::from(u16::MAX) {
        return Err("more queries per socket than DNS ids: add --sockets".into());
    }
    let start = Instant::now();
    let interval = Duration::from_secs(1).as_nanos() as u64 / rate.max(1);
    for q in 0..total {
        let due = start + Duration::from_nanos(q * interval);
        tokio::time::sleep_until(due.into()).await;
        let (id, i) = ((q / k) as u16, (q % k) as usize);
        let mut query = id.to_be_bytes().to_vec();
        query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        let name = format!("q{q}");
        query.push(name.len() as u8);
        query.extend_from_slice(name.as_bytes());
        query.extend_from_slice(b"\x05bench\x07example\x00\x00\x01\x00\x01");
        if let Ok(mut v) = sent_at.lock() {
            v[q as usize] = Some(Instant::now());
        }
        socks[i].send(&query).await?;
    }
    let send_secs = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if latencies.lock().map(|l| l.len() as u64).unwrap_or(0) >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for r in readers {
        r.abort();
    }
    let samples = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let answered = samples.len() as u64;
    let max = samples.iter().max().copied().unwrap_or_default();
    let (p50, p99) = percentiles(samples)?;
    println!(
        "{{\"sent\": {total}, \"answered\": {answered}, \"lost\": {}, \"rate\": {:.1}, \"p50_us\": {p50:.1}, \"p99_us\": {p99:.1}, \"max_us\": {:.1}}}",
        total - answered,
        total as f64 / send_secs,
        max.as_secs_f64() * 1e6
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tproxyd::config::SniffProtocol;
    use tproxyd::policy::sniff::{sniff_stream, Sniffed, StreamSniff};

    #[test]
    fn the_client_hello_is_sniffed_as_tls_with_its_name() {
        let hello = client_hello("www.tproxyd-bench.com").unwrap();
        assert_eq!(hello.len(), CLIENT_HELLO_LEN);
        assert_eq!(
            sniff_stream(&hello),
            StreamSniff::Done(Some(Sniffed {
                protocol: SniffProtocol::Tls,
                host: Some("www.tproxyd-bench.com".into()),
            }))
        );
    }

    #[test]
    fn the_plain_request_is_recognised_as_neither_at_once() {
        assert_eq!(
            sniff_stream(&plain_request(CLOSE_AFTER)),
            StreamSniff::Done(None)
        );
    }
}
