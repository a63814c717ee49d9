use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::dns::message::build::{self, add_opt, add_soa, query, response, set_rcode, Answer};
use crate::dns::message::{self, TYPE_A, TYPE_AAAA};

fn cfg() -> DnsCache {
    DnsCache::default()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

const IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn a_answer(q: &[u8], ttl: u32) -> Vec<u8> {
    response(q, &[Answer::A(None, IP, ttl)])
}

/// The TTLs of every record but OPT, in order.
fn ttls(msg: &[u8]) -> Vec<u32> {
    let (_, records) = message::records(msg).unwrap();
    records
        .iter()
        .filter(|r| r.rtype != TYPE_OPT)
        .map(|r| r.ttl)
        .collect()
}

fn hit(l: Lookup) -> Vec<u8> {
    match l {
        Lookup::Hit(a) => a,
        other => panic!("expected a hit, got {other:?}"),
    }
}

/// Caches `answer` for `q` at `t0`, then looks `q` up at `t0 + at`.
fn after(cache: &Cache, q: &[u8], answer: &[u8], at: f64) -> Lookup {
    let t0 = Instant::now();
    let key = Key::of(q).unwrap();
    assert!(cache.insert(&key, answer, t0), "not cached");
    cache.get(&key, q, t0 + secs(at))
}

#[test]
fn ttls_are_lowered_by_the_time_spent_here_and_never_reach_zero_while_fresh() {
    let cache = Cache::new(&cfg());
    let q = query(0x1111, "www.example.com", TYPE_A);
    let r = response(
        &q,
        &[
            Answer::Cname(None, "edge.example.net", 600),
            Answer::A(Some("edge.example.net"), IP, 300),
        ],
    );
    let key = Key::of(&q).unwrap();
    let t0 = Instant::now();
    assert!(cache.insert(&key, &r, t0));
    // Another client asks, with its own id.
    let q2 = query(0x2222, "www.example.com", TYPE_A);
    let a = hit(cache.get(&key, &q2, t0 + secs(100.0)));
    assert_eq!(message::id(&a), Some(0x2222));
    assert_eq!(ttls(&a), vec![500, 200]);
    assert_eq!(message::learn(&a)[0].addr, std::net::IpAddr::V4(IP));
    let a = hit(cache.get(&key, &q2, t0 + secs(299.5)));
    assert_eq!(ttls(&a), vec![301, 1]);
    assert_eq!(cache.get(&key, &q2, t0 + secs(300.0)), Lookup::Miss);
    assert_eq!(cache.len(), 0, "an expired entry is dropped when found");
    let s = cache.stats();
    assert_eq!(s.hits.load(Ordering::Relaxed), 2);
    assert_eq!(s.misses.load(Ordering::Relaxed), 1);
}

#[test]
fn the_smallest_ttl_of_answer_and_authority_counts_and_zero_is_not_cached() {
    let cache = Cache::new(&cfg());
    let q = query(1, "a.example", TYPE_A);
    let mut r = a_answer(&q, 300);
    add_soa(&mut r, "example", 40, 3600);
    assert_eq!(
        after(&cache, &q, &r, 39.0),
        Lookup::Hit(hit(after(&cache, &q, &r, 39.0)))
    );
    assert_eq!(after(&cache, &q, &r, 40.0), Lookup::Miss);
    let key = Key::of(&q).unwrap();
    let now = Instant::now();
    assert!(!cache.insert(&key, &a_answer(&q, 0), now), "TTL 0");
    // RFC 2181 8: the top bit set reads as 0.
    assert!(!cache.insert(&key, &a_answer(&q, 0x8000_0001), now));
}

#[test]
fn ttl_min_and_ttl_max_clamp() {
    let cache = Cache::new(&DnsCache {
        ttl_min: 60,
        ttl_max: 100,
        ..cfg()
    });
    let q = query(1, "short.example", TYPE_A);
    let short = a_answer(&q, 5);
    assert_eq!(ttls(&hit(after(&cache, &q, &short, 30.0))), vec![30]);
    assert!(matches!(after(&cache, &q, &short, 59.0), Lookup::Hit(_)));
    assert_eq!(after(&cache, &q, &short, 60.0), Lookup::Miss);
    let long = a_answer(&q, 10_000);
    assert_eq!(ttls(&hit(after(&cache, &q, &long, 0.0))), vec![100]);
    assert_eq!(after(&cache, &q, &long, 100.0), Lookup::Miss);
}

#[test]
fn negative_answers_last_min_of_soa_ttl_and_minimum_capped() {
    let cache = Cache::new(&DnsCache {
        negative_ttl_max: 900,
        ..cfg()
    });
    let q = query(1, "nope.example", TYPE_A);
    // NXDOMAIN: MINIMUM 60 below the SOA's TTL 3600.
    let mut nx = response(&q, &[]);
    set_rcode(&mut nx, RCODE_NXDOMAIN);
    add_soa(&mut nx, "example", 3600, 60);
    let a = hit(after(&cache, &q, &nx, 10.0));
    assert_eq!(message::Header::parse(&a).unwrap().rcode(), RCODE_NXDOMAIN);
    assert_eq!(ttls(&a), vec![50], "the SOA says how long is left");
    assert!(matches!(after(&cache, &q, &nx, 59.0), Lookup::Hit(_)));
    assert_eq!(after(&cache, &q, &nx, 60.0), Lookup::Miss);
    // No data: the SOA's own TTL is the smaller.
    let mut nodata = response(&q, &[]);
    add_soa(&mut nodata, "example", 30, 600);
    assert!(matches!(after(&cache, &q, &nodata, 29.0), Lookup::Hit(_)));
    assert_eq!(after(&cache, &q, &nodata, 30.0), Lookup::Miss);
    // negative_ttl_max caps an SOA asking for hours.
    let mut long = response(&q, &[]);
    set_rcode(&mut long, RCODE_NXDOMAIN);
    add_soa(&mut long, "example", 86_400, 86_400);
    assert!(matches!(after(&cache, &q, &long, 899.0), Lookup::Hit(_)));
    assert_eq!(after(&cache, &q, &long, 900.0), Lookup::Miss);
    // Without an SOA: not cached (RFC 2308 5).
    let mut bare = response(&q, &[]);
    set_rcode(&mut bare, RCODE_NXDOMAIN);
    assert!(!cache.insert(&Key::of(&q).unwrap(), &bare, Instant::now()));
    assert!(!cache.insert(&Key::of(&q).unwrap(), &response(&q, &[]), Instant::now()));
}

#[test]
fn servfail_is_remembered_briefly_and_never_served_stale() {
    let cache = Cache::new(&DnsCache {
        servfail_ttl: 5,
        serve_stale: true,
        ..cfg()
    });
    let q = query(1, "broken.example", TYPE_A);
    let fail = message::servfail(&q).unwrap();
    assert!(matches!(after(&cache, &q, &fail, 4.9), Lookup::Hit(_)));
    assert_eq!(after(&cache, &q, &fail, 5.0), Lookup::Miss);
    let mut refused = response(&q, &[]);
    set_rcode(&mut refused, RCODE_REFUSED);
    assert!(matches!(after(&cache, &q, &refused, 1.0), Lookup::Hit(_)));
    let never = Cache::new(&DnsCache {
        servfail_ttl: 0,
        ..cfg()
    });
    assert!(!never.insert(&Key::of(&q).unwrap(), &fail, Instant::now()));
    // FORMERR, NOTIMP: never.
    let mut formerr = response(&q, &[]);
    set_rcode(&mut formerr, 1);
    assert!(!cache.insert(&Key::of(&q).unwrap(), &formerr, Instant::now()));
}

#[test]
fn truncated_answers_and_answers_to_other_questions_are_not_cached() {
    let cache = Cache::new(&cfg());
    let q = query(1, "big.example", TYPE_A);
    let key = Key::of(&q).unwrap();
    let mut tc = a_answer(&q, 300);
    tc[2] |= 0x02;
    assert!(!cache.insert(&key, &tc, Instant::now()));
    let other = a_answer(&query(1, "other.example", TYPE_A), 300);
    assert!(!cache.insert(&key, &other, Instant::now()));
    let aaaa = a_answer(&query(1, "big.example", TYPE_AAAA), 300);
    assert!(!cache.insert(&key, &aaaa, Instant::now()));
    assert!(!cache.insert(&key, &q, Instant::now()), "a query");
    assert!(!cache.insert(&key, &a_answer(&q, 300)[..20], Instant::now()));
    assert_eq!(cache.len(), 0);
    assert_eq!(cache.stats().uncacheable.load(Ordering::Relaxed), 5);
}

#[test]
fn a_0x20_name_hits_and_gets_its_own_case_back() {
    let cache = Cache::new(&cfg());
    let lower = query(1, "www.example.com", TYPE_A);
    let t0 = Instant::now();
    // The upstream answered in yet another case.
    let r = a_answer(&query(1, "WWW.EXAMPLE.COM", TYPE_A), 300);
    assert!(cache.insert(&Key::of(&lower).unwrap(), &r, t0));
    let mixed = query(9, "wWw.ExAMple.cOm", TYPE_A);
    let key = Key::of(&mixed).unwrap();
    assert_eq!(key, Key::of(&lower).unwrap());
    let a = hit(cache.get(&key, &mixed, t0));
    assert_eq!(message::question(&a).unwrap().name, b"wWw.ExAMple.cOm");
    assert_eq!(a[..mixed.len()][2..], a[2..mixed.len()]);
    assert_eq!(message::id(&a), Some(9));
    assert_eq!(message::learn(&a).len(), 1);
    // A query whose question is not the key's is not answered from it.
    let other = query(9, "www.example.org", TYPE_A);
    assert_eq!(cache.get(&key, &other, t0), Lookup::Miss);
}

#[test]
fn the_do_bit_and_edns_separate_entries_and_opt_options_are_not_kept() {
    let cache = Cache::new(&cfg());
    let plain = query(1, "signed.example", TYPE_A);
    let mut edns = plain.clone();
    add_opt(&mut edns, false, &[]);
    let mut dnssec = plain.clone();
    add_opt(&mut dnssec, true, &[]);
    let keys = [&plain, &edns, &dnssec].map(|q| Key::of(q).unwrap());
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[1], keys[2]);
    assert!(keys[2].dnssec_ok() && keys[2].edns() && !keys[1].dnssec_ok());
    let mut cd = plain.clone();
    cd[3] |= 0x10;
    assert!(Key::of(&cd).unwrap().checking_disabled());
    assert_ne!(Key::of(&cd).unwrap(), keys[0]);

    // The DNSSEC answer, with a cookie option from the upstream.
    let mut r = a_answer(&plain, 300);
    let cookie = [0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
    add_opt(&mut r, true, &cookie);
    let t0 = Instant::now();
    assert!(cache.insert(&keys[2], &r, t0));
    assert_eq!(cache.get(&keys[1], &edns, t0), Lookup::Miss);
    assert_eq!(cache.get(&keys[0], &plain, t0), Lookup::Miss);
    let a = hit(cache.get(&keys[2], &dnssec, t0));
    assert_eq!(a.len(), r.len() - cookie.len());
    let (_, records) = message::records(&a).unwrap();
    let opt = records.iter().find(|r| r.rtype == TYPE_OPT).unwrap();
    assert_eq!((opt.rdata_len, opt.ttl & EDNS_DO), (0, EDNS_DO));
    // An OPT in the answer to a query without one: cached without it.
    assert!(cache.insert(&keys[0], &r, t0));
    let a = hit(cache.get(&keys[0], &plain, t0));
    assert_eq!(message::Header::parse(&a).unwrap().arcount, 0);
    assert_eq!(a.len(), plain.len() + 16);
    assert!(message::records(&a).is_ok());
    // ECS, EDNS versions other than 0: not cached at all.
    let mut ecs = plain.clone();
    add_opt(&mut ecs, false, &[0, 8, 0, 4, 0, 1, 24, 0]);
    assert_eq!(Key::of(&ecs), None);
}

#[test]
fn keys_are_only_made_for_plain_single_questions() {
    let q = query(1, "a.example", TYPE_A);
    assert!(Key::of(&q).is_some());
    let mut two = q.clone();
    two[5] = 2;
    assert_eq!(Key::of(&two), None);
    let mut notify = q.clone();
    notify[2] |= 4 << 3;
    assert_eq!(Key::of(&notify), None);
    assert_eq!(Key::of(&a_answer(&q, 5)), None, "a response");
    // The name as a pointer into the header.
    let mut ptr = q[..HEADER_LEN].to_vec();
    ptr.extend_from_slice(&[0xc0, 0x04, 0, 1, 0, 1]);
    assert_eq!(Key::of(&ptr), None);
    assert_eq!(Key::of(&query(1, "a.example", 252)), None, "AXFR");
    assert_eq!(Key::of(&q[..q.len() - 1]), None);
    let scoped = Key::of(&q).unwrap().scoped(3);
    assert_ne!(scoped, Key::of(&q).unwrap());
    assert_eq!(
        (scoped.scope(), scoped.qtype(), scoped.qclass()),
        (3, TYPE_A, 1)
    );
    assert!(format!("{scoped:?}").contains("a.example"));
}

#[test]
fn the_least_recently_used_entry_goes_first() {
    let cache = Cache::new(&DnsCache {
        max_entries: 3,
        ..cfg()
    });
    let t0 = Instant::now();
    let qs: Vec<Vec<u8>> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| query(1, &format!("{n}.example"), TYPE_A))
        .collect();
    let keys: Vec<Key> = qs.iter().map(|q| Key::of(q).unwrap()).collect();
    for i in 0..3 {
        assert!(cache.insert(&keys[i], &a_answer(&qs[i], 300), t0));
    }
    assert!(matches!(cache.get(&keys[0], &qs[0], t0), Lookup::Hit(_)));
    assert!(cache.insert(&keys[3], &a_answer(&qs[3], 300), t0));
    assert_eq!(cache.len(), 3);
    assert_eq!(
        cache.get(&keys[1], &qs[1], t0),
        Lookup::Miss,
        "b was the oldest"
    );
    for i in [0, 2, 3] {
        assert!(
            matches!(cache.get(&keys[i], &qs[i], t0), Lookup::Hit(_)),
            "{i}"
        );
    }
    assert_eq!(cache.stats().evictions.load(Ordering::Relaxed), 1);
    // Inserting a key again replaces its entry, not adds one.
    assert!(cache.insert(&keys[0], &a_answer(&qs[0], 60), t0));
    assert_eq!(cache.len(), 3);
    assert_eq!(ttls(&hit(cache.get(&keys[0], &qs[0], t0))), vec![60]);
}

/// What an entry costs besides its answer: a regression here is 10 MB
/// more at 100,000 names (bench/DNS.md, issue 21's target).
#[test]
#[cfg(target_pointer_width = "64")]
fn an_entry_costs_a_24_byte_node_and_little_else() {
    assert_eq!(std::mem::size_of::<Option<Node>>(), 24);
    assert_eq!(crate::dns::recency::SLOT_BYTES, 8);
    assert_eq!(ENTRY_OVERHEAD, 2 * (24 + 8) + 11 + 4 + 23);
}

#[test]
fn the_byte_bound_holds() {
    let one = {
        let q = query(1, "n0000.example", TYPE_A);
        // The head, the answer and its one TTL offset: the key is not
        // stored apart.
        HEAD + a_answer(&q, 300).len() + 2 + ENTRY_OVERHEAD
    };
    let cache = Cache::new(&DnsCache {
        max_entries: 1000,
        max_bytes: one * 10,
        ..cfg()
    });
    let t0 = Instant::now();
    for i in 0..100 {
        let q = query(1, &format!("n{i:04}.example"), TYPE_A);
        assert!(cache.insert(&Key::of(&q).unwrap(), &a_answer(&q, 300), t0));
        assert!(cache.bytes() <= one * 10);
    }
    assert_eq!(cache.len(), 10);
    assert_eq!(cache.bytes(), one * 10);
    // An answer bigger than the whole budget is not cached, and evicts
    // nothing.
    let q = query(1, "huge.example", TYPE_A);
    let big: Vec<Answer<'_>> = (0..200).map(|_| Answer::A(None, IP, 300)).collect();
    assert!(!cache.insert(&Key::of(&q).unwrap(), &response(&q, &big), t0));
    assert_eq!(cache.len(), 10);
}

#[test]
fn expired_answers_are_served_stale_within_the_window() {
    let cache = Cache::new(&DnsCache {
        serve_stale: true,
        stale_answer_ttl: 30,
        stale_max: 100,
        ..cfg()
    });
    let q = query(1, "slow.example", TYPE_A);
    let r = a_answer(&q, 60);
    match after(&cache, &q, &r, 70.0) {
        Lookup::Stale(a) => {
            assert_eq!(ttls(&a), vec![30]);
            assert_eq!(message::id(&a), Some(1));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(after(&cache, &q, &r, 159.0), Lookup::Stale(_)));
    assert_eq!(after(&cache, &q, &r, 160.0), Lookup::Miss);
    assert_eq!(cache.stats().stale.load(Ordering::Relaxed), 2);
    // The refresh failed: the SERVFAIL does not replace what can still be
    // served stale, and is cached once nothing is left to serve.
    let t0 = Instant::now();
    let key = Key::of(&q).unwrap();
    assert!(cache.insert(&key, &r, t0));
    let fail = message::servfail(&q).unwrap();
    assert!(!cache.insert(&key, &fail, t0 + secs(70.0)));
    assert!(matches!(
        cache.get(&key, &q, t0 + secs(70.0)),
        Lookup::Stale(_)
    ));
    assert!(cache.insert(&key, &fail, t0 + secs(160.0)));
    let a = hit(cache.get(&key, &q, t0 + secs(161.0)));
    assert_eq!(message::Header::parse(&a).unwrap().rcode(), RCODE_SERVFAIL);
    // Off: expired is a miss.
    let strict = Cache::new(&cfg());
    assert_eq!(after(&strict, &q, &r, 60.0), Lookup::Miss);
}

#[test]
fn flush_forgets_everything() {
    let cache = Cache::new(&cfg());
    let t0 = Instant::now();
    let q = query(1, "a.example", TYPE_A);
    let key = Key::of(&q).unwrap();
    assert!(cache.insert(&key, &a_answer(&q, 300), t0));
    assert!(cache.bytes() > 0);
    cache.flush();
    assert_eq!((cache.len(), cache.bytes()), (0, 0));
    assert_eq!(cache.get(&key, &q, t0), Lookup::Miss);
    // And works after.
    assert!(cache.insert(&key, &a_answer(&q, 300), t0));
    assert!(matches!(cache.get(&key, &q, t0), Lookup::Hit(_)));
}

#[test]
fn a_disabled_cache_keeps_nothing() {
    let cache = Cache::new(&DnsCache {
        enabled: false,
        ..cfg()
    });
    let q = query(1, "a.example", TYPE_A);
    let key = Key::of(&q).unwrap();
    assert!(!cache.insert(&key, &a_answer(&q, 300), Instant::now()));
    assert_eq!(cache.get(&key, &q, Instant::now()), Lookup::Miss);
}

fn distinct_names(n: u32) {
    let cache = Cache::new(&DnsCache {
        max_entries: 10_000,
        max_bytes: 1 << 20,
        ..cfg()
    });
    let t0 = Instant::now();
    let mut q = query(1, "n0000000.example", TYPE_A);
    let mut r = a_answer(&q, 300);
    for i in 0..n {
        // The name's digits rewritten in place: no formatting per name.
        let digits = format!("{i:07}");
        q[HEADER_LEN + 2..HEADER_LEN + 9].copy_from_slice(digits.as_bytes());
        r[HEADER_LEN + 2..HEADER_LEN + 9].copy_from_slice(digits.as_bytes());
        let key = Key::of(&q).unwrap();
        assert!(cache.insert(&key, &r, t0));
        if i % 4096 == 0 {
            assert!(cache.len() <= 10_000);
            assert!(cache.bytes() <= 1 << 20);
        }
    }
    assert!(cache.len() <= 10_000);
    assert!(cache.bytes() <= 1 << 20);
    let evicted = cache.stats().evictions.load(Ordering::Relaxed);
    assert_eq!(evicted + cache.len() as u64, u64::from(n));
    // The newest is there, the first long gone.
    assert!(matches!(
        cache.get(&Key::of(&q).unwrap(), &q, t0),
        Lookup::Hit(_)
    ));
}

#[test]
fn bounds_hold_under_200k_distinct_names() {
    distinct_names(200_000);
}

/// The figure; `cargo test --release -- --ignored` (a few seconds
/// in debug builds). The fuzz target `dns_cache` also drives the bounds.
#[test]
#[ignore]
fn bounds_hold_under_a_million_distinct_names() {
    distinct_names(1_000_000);
}

#[tokio::test]
async fn a_hundred_identical_queries_make_one_fetch() {
    let flights: Flights<()> = Flights::new();
    let fetches = AtomicUsize::new(0);
    let upstream_q = query(0, "www.example.com", TYPE_A);
    let answer = a_answer(&upstream_q, 300);
    let queries: Vec<Vec<u8>> = (0..100u16)
        .map(|i| {
            let name = if i % 2 == 0 {
                "www.example.com"
            } else {
                "WWW.example.COM"
            };
            query(1000 + i, name, TYPE_A)
        })
        .collect();
    let key = Key::of(&queries[0]).unwrap();
    let runs = queries.iter().map(|q| {
        flights.run(&key, q, || async {
            fetches.fetch_add(1, StdOrdering::SeqCst);
            // Long enough for every other caller to join.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(answer.clone())
        })
    });
    let answers = futures_util::future::join_all(runs).await;
    assert_eq!(fetches.load(StdOrdering::SeqCst), 1);
    assert_eq!(flights.joined(), 99);
    assert_eq!(flights.in_flight(), 0);
    for (q, a) in queries.iter().zip(answers) {
        let a = a.unwrap();
        assert_eq!(message::id(&a), message::id(q));
        assert_eq!(
            message::question(&a).unwrap().name,
            message::question(q).unwrap().name
        );
        assert_eq!(message::learn(&a).len(), 1);
    }
}

#[tokio::test]
async fn an_error_is_shared_and_the_next_query_fetches_again() {
    let flights: Flights<&'static str> = Flights::new();
    let q = query(1, "down.example", TYPE_A);
    let key = Key::of(&q).unwrap();
    let fetches = AtomicUsize::new(0);
    let fetch = || async {
        fetches.fetch_add(1, StdOrdering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        Err("timed out")
    };
    let (a, b) = tokio::join!(flights.run(&key, &q, fetch), flights.run(&key, &q, fetch));
    assert_eq!((a, b), (Err("timed out"), Err("timed out")));
    assert_eq!(fetches.load(StdOrdering::SeqCst), 1);
    let _ = flights.run(&key, &q, fetch).await;
    assert_eq!(fetches.load(StdOrdering::SeqCst), 2);
}

#[tokio::test]
async fn a_waiter_takes_over_when_the_leader_is_dropped() {
    let flights: Arc<Flights<()>> = Arc::new(Flights::new());
    let q = query(1, "gone.example", TYPE_A);
    let key = Key::of(&q).unwrap();
    let leader = {
        let (flights, key, q) = (flights.clone(), key.clone(), q.clone());
        tokio::spawn(async move {
            flights
                .run(&key, &q, std::future::pending::<Result<Vec<u8>, ()>>)
                .await
        })
    };
    while flights.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    let answer = a_answer(&q, 300);
    let waiter = {
        let (flights, key, answer) = (flights.clone(), key.clone(), answer.clone());
        let q2 = query(2, "gone.example", TYPE_A);
        tokio::spawn(async move { flights.run(&key, &q2, || async { Ok(answer) }).await })
    };
    while flights.joined() == 0 {
        tokio::task::yield_now().await;
    }
    leader.abort();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter hung")
        .unwrap()
        .unwrap();
    assert_eq!(message::id(&got), Some(2));
    assert_eq!(got[2..], answer[2..]);
    assert_eq!(flights.in_flight(), 0);
}

#[test]
fn reply_to_keeps_the_askers_id_rd_and_case() {
    let q = query(0x4242, "MiXeD.example", TYPE_A);
    let r = a_answer(&query(7, "mixed.example", TYPE_A), 300);
    let a = reply_to(&q, &r);
    assert_eq!(message::id(&a), Some(0x4242));
    assert_eq!(message::question(&a).unwrap().name, b"MiXeD.example");
    // Another question: only the id changes.
    let other = query(5, "other.example", TYPE_A);
    let b = reply_to(&other, &r);
    assert_eq!(b[2..], r[2..]);
    let _ = reply_to(&[], &r);
    let _ = reply_to(&q, &[]);
    let _ = build::name("x");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

    /// Random and mutated answers: no panic, bounds hold, and a hit is a
    /// message that parses with the asker's id.
    #[test]
    fn arbitrary_answers_never_panic(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 0..6),
        at in 0u64..100_000,
    ) {
        let cache = Cache::new(&DnsCache { max_entries: 4, max_bytes: 2000, serve_stale: true, ..cfg() });
        let plain = query(77, "a.example", TYPE_A);
        let mut q = plain.clone();
        add_opt(&mut q, false, &[]);
        let key = Key::of(&q).unwrap();
        let mut r = a_answer(&plain, 300);
        add_soa(&mut r, "example", 500, 60);
        add_opt(&mut r, false, &[0, 10, 0, 2, 1, 2]);
        for (i, b) in edits {
            let at = i.index(r.len());
            r[at] = b;
        }
        let t0 = Instant::now();
        for answer in [&bytes, &r] {
            cache.insert(&key, answer, t0);
            let _ = Key::of(answer);
            let _ = reply_to(&q, answer);
            let _ = reply_to(answer, &q);
            if let Lookup::Hit(a) | Lookup::Stale(a) = cache.get(&key, &q, t0 + Duration::from_secs(at)) {
                proptest::prop_assert_eq!(message::id(&a), Some(77));
                proptest::prop_assert!(message::records(&a).is_ok());
            }
            proptest::prop_assert!(cache.len() <= 4 && cache.bytes() <= 2000);
        }
    }
}
