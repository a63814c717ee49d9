//! The upstreams against tiny resolvers on loopback: one that answers,
//! one that answers with a wrong id or a wrong question first, with TC
//! set, never, or only the second time.

use super::*;
use crate::dns::message::build::{query, response, Answer};
use crate::dns::message::{question, TYPE_A, TYPE_AAAA};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

fn direct() -> Arc<Outbound> {
    Arc::new(Outbound::Direct(crate::outbound::direct::Direct {
        mark: 0,
        connect_timeout: Duration::from_secs(2),
    }))
}

fn block() -> Arc<Outbound> {
    Arc::new(Outbound::Block(crate::outbound::block::Block))
}

const ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// The honest answer to `q`.
fn answer(q: &[u8]) -> Vec<u8> {
    response(q, &[Answer::A(None, ADDR, 60)])
}

fn a_of(answer: &[u8]) -> Vec<std::net::IpAddr> {
    message::answers(answer)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.data {
            message::RecordData::Addr(ip) => Some(ip),
            _ => None,
        })
        .collect()
}

/// What a test resolver saw: each query's source and bytes.
type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A UDP resolver on `bind`: `reply(query, n)` (n counts from 1) says
/// what datagrams to send back, each after a delay that varies by query
/// so answers come back out of order.
async fn udp_resolver_at(
    bind: SocketAddr,
    reply: impl Fn(&[u8], usize) -> Vec<Vec<u8>> + Send + Sync + 'static,
) -> (SocketAddr, Seen) {
    let s = Arc::new(UdpSocket::bind(bind).await.unwrap());
    let addr = s.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        let mut n = 0usize;
        loop {
            let Ok((len, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            n += 1;
            let q = buf[..len].to_vec();
            log.lock().unwrap().push((from, q.clone()));
            let out = reply(&q, n);
            let s = Arc::clone(&s);
            let delay = Duration::from_millis((n * 7 % 5) as u64);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                for d in out {
                    let _ = s.send_to(&d, from).await;
                }
            });
        }
    });
    (addr, seen)
}

async fn udp_resolver(
    reply: impl Fn(&[u8], usize) -> Vec<Vec<u8>> + Send + Sync + 'static,
) -> (SocketAddr, Seen) {
    udp_resolver_at("127.0.0.1:0".parse().unwrap(), reply).await
}

/// A TCP resolver on `addr` that answers every query honestly; counts
/// the queries.
async fn tcp_resolver(l: TcpListener) -> Arc<Mutex<usize>> {
    let count = Arc::new(Mutex::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    *c.lock().unwrap() += 1;
                    let a = answer(&q);
                    let mut out = (a.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&a);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    count
}

fn udp(addr: SocketAddr) -> Upstream {
    Upstream::new(&ServerAddress::Udp(addr), None, None)
}

fn source_ports(seen: &Seen) -> std::collections::HashSet<u16> {
    seen.lock().unwrap().iter().map(|(f, _)| f.port()).collect()
}

#[tokio::test]
async fn an_answer_comes_back_with_the_clients_id_and_a_random_one_on_the_wire() {
    let (addr, seen) = udp_resolver(|q, _| vec![answer(q)]).await;
    let up = udp(addr);
    let q = query(4242, "a.example", TYPE_A);
    let a = up.exchange(&q, 0, &direct()).await.unwrap();
    assert_eq!(message::id(&a), Some(4242));
    assert_eq!(a_of(&a), vec![std::net::IpAddr::V4(ADDR)]);
    // Ten more: tproxyd's own ids go out, not the client's every time.
    for _ in 0..10 {
        up.exchange(&q, 0, &direct()).await.unwrap();
    }
    let ids: std::collections::HashSet<u16> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, q)| message::id(q).unwrap())
        .collect();
    assert!(ids.len() >= 9, "ids on the wire: {ids:?}");
    // One socket for all.
    assert_eq!(source_ports(&seen).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_share_one_socket_and_each_gets_its_own_answer() {
    let (addr, seen) = udp_resolver(|q, _| vec![answer(q)]).await;
    let up = Arc::new(udp(addr));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let up = Arc::clone(&up);
        tasks.push(tokio::spawn(async move {
            // Every client picks the same id.
            let q = query(7, &format!("q{i}.example"), TYPE_A);
            let a = up.exchange(&q, 3, &direct()).await.unwrap();
            assert_eq!(message::id(&a), Some(7));
            assert_eq!(question(&a).unwrap().name, question(&q).unwrap().name);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(source_ports(&seen).len(), 1);
    let Kind::Udp(u) = &up.kind else {
        unreachable!()
    };
    assert_eq!(u.associations(), 1);
}

#[tokio::test]
async fn an_answer_with_a_wrong_id_is_dropped_and_the_right_one_taken() {
    let (addr, _) = udp_resolver(|q, _| {
        let mut wrong = response(q, &[Answer::A(None, Ipv4Addr::new(203, 0, 113, 66), 60)]);
        let id = message::id(q).unwrap();
        message::set_id(&mut wrong, id.wrapping_add(1));
        vec![wrong, answer(q)]
    })
    .await;
    let q = query(9, "a.example", TYPE_A);
    let a = udp(addr).exchange(&q, 0, &direct()).await.unwrap();
    assert_eq!(a_of(&a), vec![std::net::IpAddr::V4(ADDR)]);
}

#[tokio::test]
async fn an_answer_to_another_question_is_dropped_and_the_right_one_taken() {
    let (addr, _) = udp_resolver(|q, _| {
        // The same id, another name: a forgery or a late answer.
        let mut other = query(0, "evil.example", TYPE_A);
        message::set_id(&mut other, message::id(q).unwrap());
        let forged = response(
            &other,
            &[Answer::A(None, Ipv4Addr::new(203, 0, 113, 66), 60)],
        );
        // The same name, another type.
        let mut aaaa = query(0, "a.example", TYPE_AAAA);
        message::set_id(&mut aaaa, message::id(q).unwrap());
        vec![forged, response(&aaaa, &[]), answer(q)]
    })
    .await;
    let q = query(9, "a.example", TYPE_A);
    let a = udp(addr).exchange(&q, 0, &direct()).await.unwrap();
    assert_eq!(a_of(&a), vec![std::net::IpAddr::V4(ADDR)]);
}

#[tokio::test]
async fn only_wrong_answers_end_in_a_timeout() {
    let (addr, _) = udp_resolver(|q, _| {
        let mut other = query(0, "evil.example", TYPE_A);
        message::set_id(&mut other, message::id(q).unwrap());
        vec![answer(&other)]
    })
    .await;
    let up = udp(addr).with_timeout(Duration::from_millis(600));
    let q = query(9, "a.example", TYPE_A);
    let e = up.exchange(&q, 0, &direct()).await.unwrap_err();
    assert!(matches!(e.cause, Cause::Timeout(_)), "{e}");
}

#[tokio::test]
async fn a_resolver_that_never_answers_is_asked_twice_on_two_sockets_then_fails() {
    let (addr, seen) = udp_resolver(|_, _| Vec::new()).await;
    let up = udp(addr).with_timeout(Duration::from_millis(800));
    let q = query(9, "a.example", TYPE_A);
    let started = std::time::Instant::now();
    let e = up.exchange(&q, 0, &direct()).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e.cause, Cause::Timeout(_)), "{e}");
    assert!(
        took >= Duration::from_millis(750) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // The message names the resolver, the outbound and the cause.
    let text = e.to_string();
    assert!(text.contains(&format!("udp://{addr}")), "{text}");
    assert!(
        text.contains("direct") && text.contains("no answer"),
        "{text}"
    );
    assert_eq!(e.clone().through("isp-direct").outbound, "isp-direct");
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(source_ports(&seen).len(), 2);
}

#[tokio::test]
async fn a_lost_query_is_answered_on_the_retry_and_its_socket_kept() {
    // The first query is lost; every later one answered.
    let (addr, seen) = udp_resolver(|q, n| if n == 1 { Vec::new() } else { vec![answer(q)] }).await;
    let up = udp(addr).with_timeout(Duration::from_secs(2));
    let q = query(9, "a.example", TYPE_A);
    let a = up.exchange(&q, 0, &direct()).await.unwrap();
    assert_eq!(a_of(&a), vec![std::net::IpAddr::V4(ADDR)]);
    let (first, second) = {
        let s = seen.lock().unwrap();
        (s[0].0, s[1].0)
    };
    assert_ne!(first.port(), second.port());
    // The socket that answered is the one the next query uses.
    up.exchange(&q, 0, &direct()).await.unwrap();
    assert_eq!(seen.lock().unwrap()[2].0, second);
}

#[tokio::test]
async fn a_truncated_answer_is_asked_again_over_tcp() {
    // UDP and TCP on the same port, as a resolver has them.
    let (udp_addr, tcp) = loop {
        let (addr, _) = udp_resolver(|q, _| {
            let mut tc = response(q, &[]);
            tc[2] |= 0x02;
            vec![tc]
        })
        .await;
        if let Ok(l) = TcpListener::bind(addr).await {
            break (addr, l);
        }
    };
    let count = tcp_resolver(tcp).await;
    let q = query(11, "big.example", TYPE_A);
    let a = udp(udp_addr).exchange(&q, 0, &direct()).await.unwrap();
    assert!(!is_truncated(&a));
    assert_eq!(message::id(&a), Some(11));
    assert_eq!(a_of(&a), vec![std::net::IpAddr::V4(ADDR)]);
    assert_eq!(*count.lock().unwrap(), 1);
}

#[tokio::test]
async fn tcp_servers_use_the_pipelined_pools() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = tcp_resolver(l).await;
    let up = Upstream::new(&ServerAddress::Tcp(addr), None, None);
    for i in 0..5 {
        let q = query(i, "t.example", TYPE_A);
        let a = up.exchange(&q, 0, &direct()).await.unwrap();
        assert_eq!(message::id(&a), Some(i));
    }
    assert_eq!(*count.lock().unwrap(), 5);
    assert_eq!(up.label(), format!("tcp://{addr}"));
}

#[tokio::test]
async fn the_clients_letter_case_comes_back_when_the_resolver_lowercases() {
    let (addr, _) = udp_resolver(|q, _| {
        let mut lower = q.to_vec();
        lower[HEADER_LEN..].make_ascii_lowercase();
        vec![answer(&lower)]
    })
    .await;
    let q = query(5, "MiXeD.ExAmPle", TYPE_A);
    let a = udp(addr).exchange(&q, 0, &direct()).await.unwrap();
    assert_eq!(question(&a).unwrap().name, b"MiXeD.ExAmPle");
}

#[tokio::test]
async fn an_error_without_a_question_is_passed_on_with_the_question() {
    let (addr, _) = udp_resolver(|q, _| {
        // REFUSED, header only (some servers answer so).
        let mut r = q[..HEADER_LEN].to_vec();
        r[2] |= 0x80;
        r[3] = (r[3] & 0xf0) | 5;
        r[4..6].copy_from_slice(&[0, 0]);
        vec![r]
    })
    .await;
    let q = query(5, "a.example", TYPE_A);
    let a = udp(addr).exchange(&q, 0, &direct()).await.unwrap();
    let h = Header::parse(&a).unwrap();
    assert_eq!((h.id, h.rcode(), h.qdcount), (5, 5, 1));
    assert_eq!(question(&a).unwrap().name, b"a.example");
}

#[tokio::test]
async fn what_is_no_query_is_refused_without_asking() {
    let (addr, seen) = udp_resolver(|q, _| vec![answer(q)]).await;
    let up = udp(addr);
    let q = query(5, "a.example", TYPE_A);
    for bad in [&b"junk"[..], &answer(&q), &q[..HEADER_LEN]] {
        let e = up.exchange(bad, 0, &direct()).await.unwrap_err();
        assert_eq!(e.cause, Cause::BadQuery);
    }
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_block_outbound_refuses() {
    let (addr, seen) = udp_resolver(|q, _| vec![answer(q)]).await;
    let q = query(5, "a.example", TYPE_A);
    let e = udp(addr).exchange(&q, 0, &block()).await.unwrap_err();
    assert!(matches!(e.cause, Cause::Refused(_)), "{e}");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn tls_without_the_feature_or_an_address_says_why() {
    let addr: ServerAddress = "tls://dns.example".parse().unwrap();
    let up = Upstream::new(&addr, None, None);
    let q = query(5, "a.example", TYPE_A);
    let e = up.exchange(&q, 0, &direct()).await.unwrap_err();
    assert!(e.to_string().contains("not resolved"), "{e}");
    if cfg!(feature = "dns-tls") {
        // With the feature it would connect: not to an address off this host.
        return;
    }
    let addr: ServerAddress = "tls://192.0.2.1".parse().unwrap();
    let e = Upstream::new(&addr, None, None)
        .exchange(&q, 0, &direct())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("dns-tls"), "{e}");
}

// ---- system ----

/// A file in the temp directory, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(tag: &str, text: &str) -> TempFile {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tproxyd-upstream-{}-{n}-{tag}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn resolv_conf_lines_are_read_as_the_c_library_reads_them() {
    let text = "# comment\nsearch lan\nnameserver 192.0.2.1\n nameserver\t2001:db8::53 \n\
                nameserver 192.0.2.1\nnameserver junk\nnameserver 10.0.0.1%eth0\n\
                nameserver fe80::1%eth0\nnameserver fe80::2%7\nnameserver fe80::3\n\
                nameserver 198.51.100.1\n";
    let eth0 = |name: &str| (name == "eth0").then_some(4);
    let got = system::nameservers(text, &eth0);
    let want: Vec<SocketAddr> = vec![
        "192.0.2.1:53".parse().unwrap(),
        "[2001:db8::53]:53".parse().unwrap(),
        "[fe80::1%4]:53".parse().unwrap(),
    ];
    assert_eq!(got, want);
    // Past the first three, nothing; scopes: by number, unknown name left out.
    let got = system::nameservers(
        "nameserver fe80::2%7\nnameserver fe80::9%nosuch\nnameserver ::ffff:192.0.2.9\n\
         nameserver 2001:db8::1%3\n",
        &eth0,
    );
    let want: Vec<SocketAddr> = vec![
        "[fe80::2%7]:53".parse().unwrap(),
        "192.0.2.9:53".parse().unwrap(),
        "[2001:db8::1]:53".parse().unwrap(),
    ];
    assert_eq!(got, want);
}

#[test]
fn dnsmasq_on_loopback_gives_way_to_the_upstream_list() {
    let conf = TempFile::new("resolv", "nameserver 127.0.0.1\nsearch lan\n");
    let auto = TempFile::new("auto", "nameserver 192.0.2.53\nnameserver 192.0.2.54\n");
    let missing = std::env::temp_dir().join("tproxyd-upstream-no-such-file");
    let s = system::System::at(conf.0.clone(), vec![missing, auto.0.clone()]);
    let want: Vec<SocketAddr> = vec![
        "192.0.2.53:53".parse().unwrap(),
        "192.0.2.54:53".parse().unwrap(),
    ];
    assert_eq!(s.nameservers(), want);
    // Without such a list, the file as it is (the caller checks it).
    let s = system::System::at(conf.0.clone(), Vec::new());
    assert_eq!(s.nameservers(), vec!["127.0.0.1:53".parse().unwrap()]);
}

#[test]
fn a_resolv_conf_naming_the_own_listener_is_found() {
    let conf = TempFile::new("resolv", "nameserver 192.0.2.1\nnameserver 127.0.0.1\n");
    let s = system::System::at(conf.0.clone(), Vec::new());
    let own = |listen: &[&str]| {
        let listen: Vec<SocketAddr> = listen.iter().map(|a| a.parse().unwrap()).collect();
        system::own_listener_in(&s, &listen)
    };
    let found = Some((conf.0.clone(), "127.0.0.1:53".parse().unwrap()));
    assert_eq!(own(&["127.0.0.1:53"]), found);
    assert_eq!(own(&["0.0.0.0:53"]), found, "a wildcard takes loopback");
    assert_eq!(own(&["127.0.0.1:5353"]), None, "another port");
    assert_eq!(own(&[]), None);
    // OpenWrt: dnsmasq on loopback gives way to the upstream list, which
    // does not name tproxyd.
    let auto = TempFile::new("auto", "nameserver 192.0.2.53\n");
    let lo = TempFile::new("resolv", "nameserver 127.0.0.1\n");
    let s = system::System::at(lo.0.clone(), vec![auto.0.clone()]);
    let listen = ["127.0.0.1:53".parse().unwrap()];
    assert_eq!(system::own_listener_in(&s, &listen), None);
}

#[test]
fn the_file_is_read_again_when_it_changes() {
    let conf = TempFile::new("resolv", "nameserver 192.0.2.1\n");
    let up = Upstream::system_at(&conf.0);
    assert_eq!(
        up.system_nameservers(),
        Some(vec!["192.0.2.1:53".parse().unwrap()])
    );
    std::fs::write(&conf.0, "nameserver 192.0.2.2\n").unwrap();
    let f = std::fs::File::options().write(true).open(&conf.0).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(10))
        .unwrap();
    drop(f);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        up.system_nameservers(),
        Some(vec!["192.0.2.2:53".parse().unwrap()])
    );
    // Gone: no nameserver, and a query says why.
    std::fs::remove_file(&conf.0).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(up.system_nameservers(), Some(Vec::new()));
}

use std::time::SystemTime;

/// A loopback address of its own per test run, for resolvers on port 53
/// (resolv.conf has no port).
fn loopback_53(last: u8) -> SocketAddr {
    let pid = std::process::id();
    SocketAddr::from((
        Ipv4Addr::new(127, 100 + (pid % 100) as u8, (pid >> 8) as u8, last),
        53,
    ))
}

#[tokio::test]
async fn system_falls_to_the_next_nameserver_when_one_is_silent() {
    // Port 53 needs root (or a low ip_unprivileged_port_start).
    let silent = loopback_53(1);
    let honest = loopback_53(2);
    let (_, silent_seen) = udp_resolver_at(silent, |_, _| Vec::new()).await;
    let (_, honest_seen) = udp_resolver_at(honest, |q, _| vec![answer(q)]).await;
    let conf = TempFile::new(
        "resolv",
        &format!("nameserver {}\nnameserver {}\n", silent.ip(), honest.ip()),
    );
    let up = Upstream::system_at(&conf.0).with_timeout(Duration::from_secs(2));
    let q = query(77, "sys.example", TYPE_A);
    let a = up.exchange(&q, 0, &direct()).await.unwrap();
    assert_eq!(message::id(&a), Some(77));
    assert_eq!(a_of(&a), vec![std::net::IpAddr::V4(ADDR)]);
    assert!(!silent_seen.lock().unwrap().is_empty());
    assert_eq!(honest_seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn system_without_nameservers_says_so() {
    let conf = TempFile::new("resolv", "search lan\n");
    let up = Upstream::system_at(&conf.0);
    let q = query(77, "sys.example", TYPE_A);
    let e = up.exchange(&q, 0, &direct()).await.unwrap_err();
    assert!(matches!(e.cause, Cause::NoServers(_)), "{e}");
    assert!(e.to_string().contains("lists no nameserver"), "{e}");
}

// ---- matching, without sockets ----

#[test]
fn answers_are_checked_against_the_query() {
    let q = query(100, "a.example", TYPE_A);
    let a = answer(&q);
    assert_eq!(check_answer(&q, &a), Check::Match);
    assert_eq!(check_answer(&q, &q), Check::NotAResponse);
    assert_eq!(check_answer(&q, b"short"), Check::Malformed);
    let mut other_id = a.clone();
    message::set_id(&mut other_id, 101);
    assert_eq!(check_answer(&q, &other_id), Check::WrongId);
    let other_name = answer(&query(100, "b.example", TYPE_A));
    assert_eq!(check_answer(&q, &other_name), Check::WrongQuestion);
    let other_type = answer(&query(100, "a.example", TYPE_AAAA));
    assert_eq!(check_answer(&q, &other_type), Check::WrongQuestion);
    let upper = answer(&query(100, "A.EXAMPLE", TYPE_A));
    assert_eq!(check_answer(&q, &upper), Check::Match);
    // No question: an error matches by id, NOERROR does not.
    let mut bare = a[..HEADER_LEN].to_vec();
    bare[4..8].copy_from_slice(&[0, 0, 0, 0]);
    assert_eq!(check_answer(&q, &bare), Check::WrongQuestion);
    bare[3] |= 2;
    assert_eq!(check_answer(&q, &bare), Check::Match);
    // Another opcode.
    let mut notify = a.clone();
    notify[2] |= 4 << 3;
    assert_eq!(check_answer(&q, &notify), Check::WrongQuestion);
}

#[test]
fn finishing_restores_the_id_and_the_letter_case() {
    let q = query(100, "MiXed.Example", TYPE_A);
    let mut a = answer(&query(3, "mixed.example", TYPE_A));
    finish_answer(&q, &mut a);
    assert_eq!(message::id(&a), Some(100));
    assert_eq!(question(&a).unwrap().name, b"MiXed.Example");
    assert_eq!(check_answer(&q, &a), Check::Match);
    // Another name entirely: left alone.
    let mut other = answer(&query(3, "other.example", TYPE_A));
    finish_answer(&q, &mut other);
    assert_eq!(question(&other).unwrap().name, b"other.example");
    // Junk stays junk, without a panic.
    let mut junk = vec![1, 2, 3];
    finish_answer(&q, &mut junk);
    assert_eq!(junk, [1, 2, 3]);
}

#[test]
fn truncation_is_the_tc_bit() {
    let q = query(1, "a.example", TYPE_A);
    let mut a = answer(&q);
    assert!(!is_truncated(&a));
    a[2] |= 0x02;
    assert!(is_truncated(&a));
    assert!(!is_truncated(b"x"));
}

// ---- through a SOCKS5 server that takes CONNECT but refuses UDP ----

/// A SOCKS5 server on loopback (no auth) that refuses UDP ASSOCIATE
/// (code 7) and carries CONNECT; counts the ASSOCIATEs asked.
async fn socks5_without_udp() -> (SocketAddr, Arc<Mutex<usize>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let associates = Arc::new(Mutex::new(0));
    let count = Arc::clone(&associates);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut head = [0u8; 2];
                s.read_exact(&mut head).await.ok()?;
                let mut methods = vec![0u8; usize::from(head[1])];
                s.read_exact(&mut methods).await.ok()?;
                s.write_all(&[5, 0]).await.ok()?;
                let mut req = [0u8; 4];
                s.read_exact(&mut req).await.ok()?;
                let dst = match req[3] {
                    1 => {
                        let mut a = [0u8; 6];
                        s.read_exact(&mut a).await.ok()?;
                        SocketAddr::from((
                            Ipv4Addr::new(a[0], a[1], a[2], a[3]),
                            u16::from_be_bytes([a[4], a[5]]),
                        ))
                    }
                    _ => return None,
                };
                let refused = [5, 7, 0, 1, 0, 0, 0, 0, 0, 0];
                if req[1] == 3 {
                    *count.lock().unwrap() += 1;
                    s.write_all(&refused).await.ok()?;
                    return None;
                }
                let mut up = tokio::net::TcpStream::connect(dst).await.ok()?;
                s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await.ok()?;
                tokio::io::copy_bidirectional(&mut s, &mut up).await.ok()?;
                Some(())
            });
        }
    });
    (addr, associates)
}

fn socks5(server: SocketAddr, dns_over_tcp: bool) -> Arc<Outbound> {
    let ctx = crate::outbound::Context {
        mark: 0,
        connect_timeout: Duration::from_secs(2),
    };
    let text = format!("type = \"socks5\"\nserver = \"{server}\"\ndns_over_tcp = {dns_over_tcp}");
    let raw: crate::outbound::RawOutbound = toml::from_str(&text).unwrap();
    Arc::new(
        raw.validate("outbound", "proxy".into(), &|_| None, &mut |_, _| {})
            .kind
            .build("proxy", &ctx, Vec::new())
            .unwrap(),
    )
}

#[tokio::test]
async fn a_socks5_server_without_udp_gets_dns_over_tcp_and_is_asked_once() {
    let (proxy, associates) = socks5_without_udp().await;
    // The resolver: UDP that must not be used, TCP on the same port.
    let (resolver, udp_seen, tcp) = loop {
        let (addr, seen) = udp_resolver(|q, _| vec![answer(q)]).await;
        if let Ok(l) = TcpListener::bind(addr).await {
            break (addr, seen, l);
        }
    };
    let tcp_count = tcp_resolver(tcp).await;
    let up = udp(resolver);
    let outbound = socks5(proxy, false);
    for i in 0..3 {
        let q = query(i, "s.example", TYPE_A);
        let a = up.exchange(&q, 5, &outbound).await.unwrap();
        assert_eq!(message::id(&a), Some(i));
    }
    assert_eq!(*tcp_count.lock().unwrap(), 3);
    assert!(udp_seen.lock().unwrap().is_empty());
    // Refused once: not asked again for every query.
    assert_eq!(*associates.lock().unwrap(), 1);
    // Configured for TCP: no ASSOCIATE at all.
    let configured = socks5(proxy, true);
    let q = query(9, "s.example", TYPE_A);
    up.exchange(&q, 6, &configured).await.unwrap();
    assert_eq!(*associates.lock().unwrap(), 1);
    assert_eq!(*tcp_count.lock().unwrap(), 4);
}
