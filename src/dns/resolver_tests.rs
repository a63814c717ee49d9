//! The resolver with a fake transport: no sockets. Each server answers
//! from a closure; every exchange is recorded with the outbound it went
//! through.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::*;
use crate::config::RawConfig;
use crate::dns::message::build::{query, response, Answer};
use crate::dns::message::RCODE_SERVFAIL;

type Reply = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, ExchangeFailed> + Send + Sync>;

/// One exchange: server, outbound type, resolved address, query name.
type Call = (usize, &'static str, Option<SocketAddr>, String);

/// Per server: a delay and how it answers.
#[derive(Default)]
struct Fake {
    servers: Vec<(Duration, Reply)>,
    /// (server, outbound type, resolved, qname of the query).
    calls: Mutex<Vec<Call>>,
}

impl Transport for Fake {
    async fn exchange(
        &self,
        server: usize,
        resolved: Option<SocketAddr>,
        query: &[u8],
        _key: u32,
        outbound: &Arc<Outbound>,
    ) -> Result<Vec<u8>, ExchangeFailed> {
        let qname = message::question(query)
            .map(|q| String::from_utf8_lossy(&q.name).into_owned())
            .unwrap_or_default();
        lock(&self.calls).push((server, outbound.name(), resolved, qname));
        let (delay, reply) = self
            .servers
            .get(server)
            .ok_or_else(|| ExchangeFailed("no fake".into()))?;
        tokio::time::sleep(*delay).await;
        reply(query)
    }
}

fn answers_a(ip: [u8; 4]) -> Reply {
    Box::new(move |q| Ok(response(q, &[Answer::A(None, Ipv4Addr::from(ip), 300)])))
}

fn fails() -> Reply {
    Box::new(|_| Err(ExchangeFailed("timed out".into())))
}

const CLIENT: &str = "192.168.1.10:40000";

/// Servers: 0 isp (udp, direct), 1 foreign (udp, proxy), 2 routed (no
/// outbound: the route decides), then `extra` TOML. Rule sets: cn
/// (domains), cn-ip (192.0.2.0/24).
fn resolver(extra: &str, fake: Fake, route_rules: &str) -> Resolver<Fake> {
    resolver_with(extra, fake, route_rules, |_| {})
}

/// `resolver`, with the validated config changed by `change` before the
/// policy is built (for what this build's config would refuse).
fn resolver_with(
    extra: &str,
    fake: Fake,
    route_rules: &str,
    change: impl FnOnce(&mut Config),
) -> Resolver<Fake> {
    let dir = crate::policy::rule_set::testdir::TempDir::new();
    let d = &dir.0;
    std::fs::write(d.join("cn.txt"), "cn\n").unwrap();
    std::fs::write(d.join("cn-ip.txt"), "192.0.2.0/24\n").unwrap();
    let text = format!(
        "[[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
         [route]\nfinal = \"proxy\"\n{route_rules}\n\
         [[route.rule_sets]]\nname = \"cn\"\nformat = \"domains\"\npath = \"{d}/cn.txt\"\n\
         [[route.rule_sets]]\nname = \"cn-ip\"\nformat = \"cidr\"\npath = \"{d}/cn-ip.txt\"\n\
         [dns]\nfinal = \"foreign\"\n\
         [[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\noutbound = \"direct\"\n\
         [[dns.servers]]\nname = \"foreign\"\naddress = \"udp://198.51.100.1\"\noutbound = \"proxy\"\n\
         [[dns.servers]]\nname = \"routed\"\naddress = \"udp://192.0.2.99\"\n\
         {extra}\n[firewall]\nbackend = \"none\"\n",
        d = d.display()
    );
    let mut cfg = RawConfig::from_toml(&text, "t")
        .unwrap()
        .validate(&|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    change(&mut cfg);
    let policy = Arc::new(Policy::from_config(&cfg).unwrap());
    let names = policy.wants_domains().then(|| Arc::new(Names::new(64)));
    Resolver::new(&cfg, policy, fake, names)
}

fn fake(servers: Vec<Reply>) -> Fake {
    Fake {
        servers: servers.into_iter().map(|r| (Duration::ZERO, r)).collect(),
        ..Fake::default()
    }
}

fn calls(r: &Resolver<Fake>) -> Vec<Call> {
    lock(&r.transport.calls).clone()
}

fn addrs(answer: &[u8]) -> Vec<IpAddr> {
    message::answers(answer)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.data {
            RecordData::Addr(ip) => Some(ip),
            _ => None,
        })
        .collect()
}

fn client() -> SocketAddr {
    CLIENT.parse().unwrap()
}

#[tokio::test]
async fn rules_pick_the_server_and_its_outbound() {
    let r = resolver(
        "[[dns.rules]]\nrule_set = [\"cn\"]\nserver = \"isp\"\n",
        fake(vec![
            answers_a([192, 0, 2, 7]),
            answers_a([198, 51, 100, 7]),
            fails(),
        ]),
        "",
    );
    // 0x20 case: the question comes back as asked.
    let q = query(11, "WwW.Example.CN", TYPE_A);
    let a = r.resolve(&q, client()).await.unwrap();
    let h = Header::parse(&a).unwrap();
    assert_eq!((h.id, h.rcode()), (11, 0));
    assert_eq!(message::question(&a).unwrap().name, b"WwW.Example.CN");
    assert_eq!(addrs(&a), vec![IpAddr::from([192, 0, 2, 7])]);
    let a = r
        .resolve(&query(12, "example.org", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(addrs(&a), vec![IpAddr::from([198, 51, 100, 7])]);
    let c = calls(&r);
    assert_eq!(
        c.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(),
        vec![(0, "direct"), (1, "socks5")]
    );
}

#[tokio::test]
async fn a_server_without_outbound_goes_where_the_route_sends_its_address() {
    let extra = "[[dns.rules]]\nserver = \"routed\"\n";
    let f = || fake(vec![fails(), fails(), answers_a([192, 0, 2, 8])]);
    let r = resolver(extra, f(), "");
    r.resolve(&query(1, "a.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(calls(&r)[0].1, "socks5", "route.final");
    let r = resolver(
        extra,
        f(),
        "[[route.rules]]\ndst = [\"192.0.2.99/32\"]\noutbound = \"direct\"\n",
    );
    r.resolve(&query(1, "a.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(
        calls(&r)[0].1,
        "direct",
        "the rule for the resolver's address"
    );
}

#[tokio::test]
async fn rejects_are_answered_here() {
    let r = resolver(
        "[[dns.rules]]\ndomain_suffix = [\"ads.example\"]\nreject = \"nxdomain\"\n\
         [[dns.rules]]\nquery_type = [\"HTTPS\"]\nreject = \"nodata\"\n",
        fake(vec![fails(), fails(), fails()]),
        "",
    );
    let a = r
        .resolve(&query(5, "x.ads.example", TYPE_A), client())
        .await
        .unwrap();
    let h = Header::parse(&a).unwrap();
    assert_eq!((h.id, h.rcode(), h.ancount), (5, RCODE_NXDOMAIN, 0));
    let a = r
        .resolve(&query(6, "a.example", 65), client())
        .await
        .unwrap();
    let h = Header::parse(&a).unwrap();
    assert_eq!((h.id, h.rcode(), h.ancount), (6, 0, 0));
    assert!(calls(&r).is_empty());
    assert_eq!(r.stats.rejected.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_failure_is_servfail_never_silence() {
    let r = resolver("", fake(vec![fails(), fails(), fails()]), "");
    let a = r
        .resolve(&query(9, "a.example", TYPE_A), client())
        .await
        .unwrap();
    let h = Header::parse(&a).unwrap();
    assert_eq!((h.id, h.rcode()), (9, RCODE_SERVFAIL));
    assert_eq!(message::question(&a).unwrap().name, b"a.example");
    assert_eq!(r.stats.servfail.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn bad_input_gets_formerr_or_nothing() {
    let r = resolver("", fake(vec![fails(), fails(), fails()]), "");
    // Not DNS, or a response: nothing to answer.
    assert_eq!(r.resolve(b"short", client()).await, None);
    let q = query(3, "a.example", TYPE_A);
    let resp = response(&q, &[]);
    assert_eq!(r.resolve(&resp, client()).await, None);
    // A header whose question is cut off: FORMERR with the id.
    let a = r.resolve(&q[..14], client()).await.unwrap();
    let h = Header::parse(&a).unwrap();
    assert_eq!((h.id, h.rcode(), h.qdcount), (3, RCODE_FORMERR, 0));
    // Another opcode (NOTIFY = 4): NOTIMP.
    let mut notify = q.clone();
    notify[2] = (notify[2] & 0x87) | (4 << 3);
    let a = r.resolve(&notify, client()).await.unwrap();
    assert_eq!(Header::parse(&a).unwrap().rcode(), RCODE_NOTIMP);
    assert!(calls(&r).is_empty());
}

const FALLBACK: &str =
    "[[dns.rules]]\nserver = \"isp\"\nfallback = \"foreign\"\naccept_ip = [\"cn-ip\"]\n";

#[tokio::test]
async fn fallback_by_answer_replaces_a_poisoned_answer() {
    // The ISP lies about foreign names (an address outside cn-ip) and
    // tells the truth about domestic ones; the foreign server is honest.
    let isp: Reply = Box::new(|q| {
        let name = message::question(q).unwrap().name;
        let ip = if name.ends_with(b".cn") {
            [192, 0, 2, 10]
        } else {
            [203, 0, 113, 66]
        };
        Ok(response(q, &[Answer::A(None, Ipv4Addr::from(ip), 60)]))
    });
    let r = resolver(
        FALLBACK,
        fake(vec![isp, answers_a([198, 51, 100, 20]), fails()]),
        "",
    );
    let a = r
        .resolve(&query(1, "blocked.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(addrs(&a), vec![IpAddr::from([198, 51, 100, 20])]);
    assert_eq!(r.stats.fallback_used.load(Ordering::Relaxed), 1);
    let a = r
        .resolve(&query(2, "www.example.cn", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(addrs(&a), vec![IpAddr::from([192, 0, 2, 10])]);
    assert_eq!(r.stats.fallback_used.load(Ordering::Relaxed), 1);
    // Both were asked each time.
    assert_eq!(calls(&r).len(), 4);
}

#[tokio::test]
async fn an_accepted_answer_does_not_wait_for_the_fallback() {
    let mut f = fake(vec![
        answers_a([192, 0, 2, 10]),
        answers_a([198, 51, 100, 20]),
        fails(),
    ]);
    f.servers[1].0 = Duration::from_secs(30);
    let r = resolver(FALLBACK, f, "");
    let started = Instant::now();
    let a = r
        .resolve(&query(1, "a.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(addrs(&a), vec![IpAddr::from([192, 0, 2, 10])]);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn fallback_failures_fall_back_to_whatever_answered() {
    // The fallback fails: the rule server's answer, accepted or not.
    let r = resolver(
        FALLBACK,
        fake(vec![answers_a([203, 0, 113, 66]), fails(), fails()]),
        "",
    );
    let a = r
        .resolve(&query(1, "a.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(addrs(&a), vec![IpAddr::from([203, 0, 113, 66])]);
    // The rule server fails: the fallback's.
    let r = resolver(
        FALLBACK,
        fake(vec![fails(), answers_a([198, 51, 100, 20]), fails()]),
        "",
    );
    let a = r
        .resolve(&query(1, "a.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(addrs(&a), vec![IpAddr::from([198, 51, 100, 20])]);
    // Both fail: SERVFAIL.
    let r = resolver(FALLBACK, fake(vec![fails(), fails(), fails()]), "");
    let a = r
        .resolve(&query(1, "a.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(Header::parse(&a).unwrap().rcode(), RCODE_SERVFAIL);
}

#[tokio::test]
async fn names_are_learned_when_a_route_rule_looks_at_names() {
    let route = "[[route.rules]]\ndomain_suffix = [\"example.org\"]\noutbound = \"direct\"\n";
    let r = resolver(
        "",
        fake(vec![fails(), answers_a([198, 51, 100, 30]), fails()]),
        route,
    );
    r.resolve(&query(1, "www.example.org", TYPE_A), client())
        .await
        .unwrap();
    let names = r.names.as_ref().unwrap();
    assert_eq!(
        names
            .lookup(IpAddr::from([198, 51, 100, 30]), Instant::now())
            .as_deref(),
        Some("www.example.org")
    );
}

#[tokio::test]
async fn filter_aaaa_answers_no_data_here() {
    let r = resolver_with("", fake(vec![fails(), fails(), fails()]), "", |cfg| {
        cfg.dns.filter_aaaa = true
    });
    let a = r
        .resolve(&query(4, "a.example", TYPE_AAAA), client())
        .await
        .unwrap();
    let h = Header::parse(&a).unwrap();
    assert_eq!((h.rcode(), h.ancount), (0, 0));
    assert!(calls(&r).is_empty());
}

#[tokio::test]
async fn a_server_by_host_name_is_looked_up_through_its_bootstrap_once() {
    // A fake speaking for the DoT server too: the transport is the seam,
    // so a tls:// address needs no TLS here. Server 3 "dot" (by name),
    // bootstrap "isp" (server 0).
    let isp: Reply = Box::new(|q| {
        let question = message::question(q).unwrap();
        Ok(match question.qtype {
            TYPE_A => response(q, &[Answer::A(None, Ipv4Addr::new(192, 0, 2, 44), 600)]),
            _ => response(q, &[Answer::Aaaa(None, Ipv6Addr::LOCALHOST, 600)]),
        })
    });
    let servers = vec![isp, fails(), fails(), answers_a([198, 51, 100, 40])];
    let fake = Fake {
        servers: servers.into_iter().map(|r| (Duration::ZERO, r)).collect(),
        ..Fake::default()
    };
    // Added after validation: a build without dns-tls refuses tls://.
    let r = resolver_with("", fake, "", |cfg| {
        cfg.dns.servers.push(crate::config::DnsServer {
            name: "dot".into(),
            address: "tls://dns.example:853".parse().unwrap(),
            outbound: Some("proxy".into()),
            server_name: None,
            bootstrap: Some("isp".into()),
        });
        cfg.dns.final_server = Some("dot".into());
    });
    for id in 0..2 {
        let a = r
            .resolve(&query(id, "a.example", TYPE_A), client())
            .await
            .unwrap();
        assert_eq!(addrs(&a), vec![IpAddr::from([198, 51, 100, 40])]);
    }
    let c = calls(&r);
    let expect: SocketAddr = "192.0.2.44:853".parse().unwrap();
    assert_eq!(c.len(), 3, "{c:?}");
    assert_eq!((c[0].0, c[0].3.as_str()), (0, "dns.example"));
    assert_eq!((c[1].0, c[1].2), (3, Some(expect)));
    assert_eq!((c[2].0, c[2].2), (3, Some(expect)));
}

/// Fake-ip answers after the rules' rejections and before any server:
/// no server is asked for a fake name; excluded names and other types
/// go to the servers as before.
#[tokio::test]
async fn the_fake_pool_answers_after_rejections_before_servers() {
    let r = resolver(
        "[[dns.rules]]\ndomain_suffix = [\"ads.example\"]\nreject = \"nxdomain\"\n\
         [dns.fake_ip]\nranges = [\"198.18.0.0/15\"]\nstore = \"\"\n",
        fake(vec![fails(), answers_a([198, 51, 100, 7]), fails()]),
        "",
    );
    let cfg = crate::config::FakeIp {
        ranges: vec!["198.18.0.0/15".parse().unwrap()],
        exclude_domain: Vec::new(),
        exclude_domain_suffix: Vec::new(),
        exclude_rule_set: Vec::new(),
        default_exclude: true,
        ttl: 1,
        store: None,
        save_interval: 300,
    };
    let pool = crate::dns::fakeip::FakePool::new(&cfg);
    pool.set_exclusions(Arc::clone(r.policy.fake_ip_exclusions().unwrap()));
    let ask = |name: &'static str, qtype| {
        let q = query(7, name, qtype);
        let (r, pool) = (&r, &pool);
        async move { r.resolve_with(&q, client(), Some(pool)).await.unwrap() }
    };
    let a = ask("www.example.com", TYPE_A).await;
    assert_eq!(addrs(&a), ["198.18.0.1".parse::<IpAddr>().unwrap()]);
    let a = ask("x.ads.example", TYPE_A).await;
    assert_eq!(Header::parse(&a).unwrap().rcode(), RCODE_NXDOMAIN);
    assert!(calls(&r).is_empty(), "a server was asked: {:?}", calls(&r));
    // Excluded (NTP) and other types: the real answer.
    let a = ask("pool.ntp.org", TYPE_A).await;
    assert_eq!(addrs(&a), ["198.51.100.7".parse::<IpAddr>().unwrap()]);
    let a = ask("www.example.com", 16).await;
    assert_eq!(Header::parse(&a).unwrap().ancount, 1);
    assert_eq!(calls(&r).len(), 2);
}

/// The shim transport over loopback: a `udp://` server reached `direct`
/// is asked over UDP from a marked socket (strays ignored), and asked
/// again over TCP when its UDP answer is truncated. Marking needs
/// CAP_NET_ADMIN: skipped without root, except under CI.
#[tokio::test]
async fn the_shim_asks_direct_udp_servers_over_udp_then_tcp_when_truncated() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "needs root under CI");
        return;
    }
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = udp.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind(server).await.unwrap();
    let udp_seen = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&udp_seen);
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            seen.fetch_add(1, Ordering::Relaxed);
            let q = buf[..n].to_vec();
            let name = message::question(&q).unwrap().name;
            let mut answer = response(&q, &[Answer::A(None, Ipv4Addr::new(192, 0, 2, 1), 60)]);
            // A stray first: another id.
            let mut stray = answer.clone();
            stray[0] ^= 0xff;
            udp.send_to(&stray, peer).await.unwrap();
            if name == b"big.example" {
                answer[2] |= 0x02;
            }
            udp.send_to(&answer, peer).await.unwrap();
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    s.read_exact(&mut q).await.unwrap();
                    let answer = response(&q, &[Answer::A(None, Ipv4Addr::new(192, 0, 2, 2), 60)]);
                    s.write_all(&(answer.len() as u16).to_be_bytes())
                        .await
                        .unwrap();
                    s.write_all(&answer).await.unwrap();
                }
            });
        }
    });
    let text = format!(
        "[[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n[route]\nfinal = \"direct\"\n\
         [dns]\n[[dns.servers]]\nname = \"local\"\naddress = \"udp://{server}\"\noutbound = \"direct\"\n\
         [firewall]\nbackend = \"none\"\n"
    );
    let cfg = RawConfig::from_toml(&text, "t")
        .unwrap()
        .validate(&|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let policy = Arc::new(Policy::from_config(&cfg).unwrap());
    let transport = UpstreamTransport::new(&cfg);
    let r = Resolver::new(&cfg, Arc::clone(&policy), transport, None);
    let a = r
        .resolve(&query(21, "small.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(Header::parse(&a).unwrap().id, 21);
    assert_eq!(addrs(&a), vec![IpAddr::from([192, 0, 2, 1])], "over UDP");
    let a = r
        .resolve(&query(22, "big.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(Header::parse(&a).unwrap().id, 22);
    assert_eq!(addrs(&a), vec![IpAddr::from([192, 0, 2, 2])], "over TCP");
    assert_eq!(udp_seen.load(Ordering::Relaxed), 2);
    // With a cache: the second ask of a name is answered from it, with
    // its own id and letter case; 100 at once make one upstream query.
    let cache = Arc::new(crate::dns::cache::Cache::new(&cfg.dns.cache));
    let r = Arc::new(
        Resolver::new(&cfg, policy, UpstreamTransport::new(&cfg), None).with_cache(Some(cache)),
    );
    let before = udp_seen.load(Ordering::Relaxed);
    let a = r
        .resolve(&query(23, "small.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(addrs(&a), vec![IpAddr::from([192, 0, 2, 1])]);
    let a = r
        .resolve(&query(24, "SMALL.example", TYPE_A), client())
        .await
        .unwrap();
    assert_eq!(Header::parse(&a).unwrap().id, 24);
    assert_eq!(message::question(&a).unwrap().name, b"SMALL.example");
    assert_eq!(
        udp_seen.load(Ordering::Relaxed),
        before + 1,
        "the second from the cache"
    );
    let asks = (0..100u16).map(|i| {
        let r = Arc::clone(&r);
        tokio::spawn(async move {
            r.resolve(&query(100 + i, "many.example", TYPE_A), client())
                .await
                .map(|a| Header::parse(&a).unwrap().id)
        })
    });
    let ids: Vec<_> = futures_join(asks).await;
    assert_eq!(ids, (0..100u16).map(|i| Some(100 + i)).collect::<Vec<_>>());
    assert_eq!(
        udp_seen.load(Ordering::Relaxed),
        before + 2,
        "100 alike, one upstream query"
    );
}

async fn futures_join<T>(tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks.collect::<Vec<_>>() {
        out.push(t.await.unwrap());
    }
    out
}

/// A resolver with a cache (serve-stale on), "foreign" (server 1)
/// answering every name with 198.51.100.7, TTL 300.
fn cached_resolver(extra: &str) -> Resolver<Fake> {
    // Its clock starts an hour back: the tests store answers minutes ago.
    let epoch = Instant::now()
        .checked_sub(Duration::from_secs(3600))
        .unwrap_or_else(Instant::now);
    let cache = super::super::cache::Cache::since(
        &crate::config::DnsCache {
            serve_stale: true,
            ..crate::config::DnsCache::default()
        },
        epoch,
    );
    resolver(
        extra,
        fake(vec![fails(), answers_a([198, 51, 100, 7]), fails()]),
        "",
    )
    .with_cache(Some(Arc::new(cache)))
}

/// The TTL of the answer's first record.
fn first_ttl(answer: &[u8]) -> u32 {
    message::answers(answer).unwrap()[0].ttl
}

fn cache_counts(r: &Resolver<Fake>) -> (u64, u64, u64) {
    let s = r.cache().unwrap().stats();
    (
        s.hits.load(Ordering::Relaxed),
        s.stale.load(Ordering::Relaxed),
        s.misses.load(Ordering::Relaxed),
    )
}

#[tokio::test]
async fn a_miss_is_left_to_the_slow_path_with_nothing_counted() {
    let r = cached_resolver("");
    let q = query(21, "a.example", TYPE_A);
    assert_eq!(r.answer_cached(&q, client(), None), None);
    assert_eq!(r.stats.queries.load(Ordering::Relaxed), 0);
    assert_eq!(cache_counts(&r), (0, 0, 0));
    // The slow path then counts it once, and fills the cache.
    let slow = r.resolve(&q, client()).await.unwrap();
    assert_eq!(r.stats.queries.load(Ordering::Relaxed), 1);
    assert_eq!(cache_counts(&r), (0, 0, 1));
    // Now a hit: answered inline, the same bytes, counted as a hit.
    let (now, stale) = r.answer_cached(&q, client(), None).unwrap();
    assert_eq!((now.as_deref(), stale), (Some(&slow[..]), false));
    assert_eq!(r.stats.queries.load(Ordering::Relaxed), 2);
    assert_eq!(cache_counts(&r), (1, 0, 1));
    assert_eq!(calls(&r).len(), 1);
    // Not DNS: left to the slow path (which drops it), nothing counted.
    assert_eq!(r.answer_cached(b"junk", client(), None), None);
    assert_eq!(r.stats.queries.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_hit_inline_is_the_slow_paths_answer_with_case_id_and_ttl() {
    let r = cached_resolver("");
    let cache = Arc::clone(r.cache().unwrap());
    let stored = query(1, "www.example.org", TYPE_A);
    let answer = response(
        &stored,
        &[Answer::A(None, Ipv4Addr::new(198, 51, 100, 9), 300)],
    );
    // Kept 100.5 s ago, under the scope of the server the rules pick
    // (foreign: 1). The cache counts whole seconds of its own clock, so
    // 100 or 101 of them have passed.
    let key = super::super::cache::Key::of(&stored).unwrap().scoped(1);
    let then = Instant::now() - Duration::from_millis(100_500);
    assert!(cache.insert(&key, &answer, then));
    // A 0x20 client with its own id.
    let q = query(0xbeef, "WwW.ExAmPlE.oRg", TYPE_A);
    let (fast, stale) = r.answer_cached(&q, client(), None).unwrap();
    let fast = fast.unwrap();
    assert!(!stale);
    let (slow, slow_stale) = r.answer(&q, client(), None, true).await;
    assert_eq!((Some(&fast), slow_stale), (slow.as_ref(), false));
    let h = Header::parse(&fast).unwrap();
    assert_eq!((h.id, h.ancount), (0xbeef, 1));
    assert_eq!(message::question(&fast).unwrap().name, b"WwW.ExAmPlE.oRg");
    assert!(
        (199..=200).contains(&first_ttl(&fast)),
        "{}",
        first_ttl(&fast)
    );
    assert_eq!(addrs(&fast), vec![IpAddr::from([198, 51, 100, 9])]);
    assert!(calls(&r).is_empty(), "no server asked");
    assert_eq!(r.stats.queries.load(Ordering::Relaxed), 2);
    assert_eq!(cache_counts(&r), (2, 0, 0));
    // Another server's scope is not this one's: a rule sending the name
    // to "isp" misses.
    let r2 = cached_resolver("[[dns.rules]]\ndomain_suffix = [\"org\"]\nserver = \"isp\"\n")
        .with_cache(Some(Arc::clone(&cache)));
    assert_eq!(r2.answer_cached(&q, client(), None), None);
}

#[tokio::test]
async fn a_stale_entry_is_served_inline_only_with_the_refresh_asked_for() {
    let r = cached_resolver("");
    let cache = Arc::clone(r.cache().unwrap());
    let stored = query(1, "old.example", TYPE_A);
    let answer = response(
        &stored,
        &[Answer::A(None, Ipv4Addr::new(198, 51, 100, 9), 300)],
    );
    let key = super::super::cache::Key::of(&stored).unwrap().scoped(1);
    assert!(cache.insert(&key, &answer, Instant::now() - Duration::from_secs(310)));
    let q = query(2, "old.example", TYPE_A);
    let (fast, stale) = r.answer_cached(&q, client(), None).unwrap();
    // Stale: the caller must refresh (Dns::answer_now spawns it, as
    // Dns::resolve does), with the stale answer TTL.
    assert!(stale);
    let fast = fast.unwrap();
    assert_eq!(
        first_ttl(&fast),
        crate::config::DnsCache::default().stale_answer_ttl.max(1)
    );
    let (slow, slow_stale) = r.answer(&q, client(), None, true).await;
    assert_eq!((slow, slow_stale), (Some(fast), true));
    assert_eq!(cache_counts(&r), (0, 2, 0));
    // The refresh asks the server and the entry is fresh again.
    r.refresh(&q, client()).await;
    assert_eq!(calls(&r).len(), 1);
    let (fresh, stale) = r.answer_cached(&q, client(), None).unwrap();
    assert!(!stale);
    assert_eq!(
        addrs(&fresh.unwrap()),
        vec![IpAddr::from([198, 51, 100, 7])]
    );
}

#[tokio::test]
async fn rejections_and_formerr_are_answered_inline_as_by_the_slow_path() {
    let extra = "[[dns.rules]]\ndomain_suffix = [\"ads.example\"]\nreject = \"nxdomain\"\n";
    let fast_r = cached_resolver(extra);
    let slow_r = cached_resolver(extra);
    let reject = query(5, "x.ads.example", TYPE_A);
    let cut = query(6, "a.example", TYPE_A)[..14].to_vec();
    for q in [&reject, &cut] {
        let (fast, stale) = fast_r.answer_cached(q, client(), None).unwrap();
        assert!(!stale);
        assert_eq!(fast, slow_r.resolve(q, client()).await);
    }
    for r in [&fast_r, &slow_r] {
        assert_eq!(r.stats.rejected.load(Ordering::Relaxed), 1);
        assert_eq!(r.stats.queries.load(Ordering::Relaxed), 2);
        assert_eq!(cache_counts(r), (0, 0, 0));
    }
}
