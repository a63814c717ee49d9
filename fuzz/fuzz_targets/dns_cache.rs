//! The DNS answer cache fed arbitrary answers and queries: never panics,
//! stays within its bounds in entries and bytes, an answer it took is a
//! hit at once, and every hit is a message that parses, with the asker's
//! id and question.
//!
//! Input: a config byte (serve-stale, ttl_min), then chunks of
//! `op, len_hi, len_lo, payload`:
//! - op % 4 == 0: the payload is an answer; the query it answers is made
//!   from its header and question (QR cleared, only the question kept),
//!   then the answer is inserted and looked up;
//! - 1: the clock moves `payload[0] << (op >> 4)` seconds and every query
//!   seen so far is looked up again;
//! - 2: the payload is a query, looked up, and answered with the last
//!   answer seen (`reply_to`);
//! - 3: flush.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tproxyd::config::DnsCache;
use tproxyd::dns::cache::{reply_to, Cache, Key, Lookup};
use tproxyd::dns::message::{self, HEADER_LEN};

const MAX_ENTRIES: usize = 6;
const MAX_BYTES: usize = 3000;

/// The query an answer answers: its id, flags without QR, one question.
fn query_of(answer: &[u8]) -> Option<Vec<u8>> {
    let end = message::plain_qname_end(answer).ok()? + 4;
    let mut q = answer.get(..end)?.to_vec();
    q[2] &= 0x7f;
    q[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    Some(q)
}

fn check(lookup: &Lookup, query: &[u8]) {
    if let Lookup::Hit(a) | Lookup::Stale(a) = lookup {
        assert_eq!(message::id(a), message::id(query));
        let end = message::plain_qname_end(query).expect("a cached query's name") + 4;
        assert_eq!(a.get(HEADER_LEN..end), query.get(HEADER_LEN..end));
        assert!(message::records(a).is_ok(), "a hit that does not parse");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, mut rest)) = data.split_first() else {
        return;
    };
    let cache = Cache::new(&DnsCache {
        max_entries: MAX_ENTRIES,
        max_bytes: MAX_BYTES,
        serve_stale: config & 1 != 0,
        ttl_min: u32::from(config >> 1),
        ..DnsCache::default()
    });
    let mut now = Instant::now();
    let mut seen: Vec<(Key, Vec<u8>)> = Vec::new();
    let mut last_answer: Vec<u8> = Vec::new();
    while let [op, hi, lo, tail @ ..] = rest {
        let len = (usize::from(*hi) << 8 | usize::from(*lo)).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        match op % 4 {
            0 => {
                last_answer = payload.to_vec();
                let Some(query) = query_of(payload) else {
                    continue;
                };
                let Some(key) = Key::of(&query) else {
                    continue;
                };
                if cache.insert(&key, payload, now) {
                    let found = cache.get(&key, &query, now);
                    assert!(matches!(found, Lookup::Hit(_)), "taken, then {found:?}");
                    check(&found, &query);
                }
                if seen.len() < 16 {
                    seen.push((key, query));
                }
            }
            1 => {
                let step = u64::from(payload.first().copied().unwrap_or(1)) << (op >> 4);
                now += Duration::from_secs(step);
                for (key, query) in &seen {
                    check(&cache.get(key, query, now), query);
                }
            }
            2 => {
                if let Some(key) = Key::of(payload) {
                    check(&cache.get(&key, payload, now), payload);
                }
                let _ = reply_to(payload, &last_answer);
            }
            _ => cache.flush(),
        }
        assert!(cache.len() <= MAX_ENTRIES, "{} entries", cache.len());
        assert!(cache.bytes() <= MAX_BYTES, "{} bytes", cache.bytes());
    }
});
