//! Names learned from DNS answers that pass through tproxyd: address →
//! the name the client asked for, until the answer's TTL runs out.
//!
//! Domain rules then also see flows that carry no name of their own (no
//! TLS SNI, no HTTP Host: SSH, a game, a TLS client without SNI) through
//! the name the client resolved just before. Route only: the name never
//! replaces the destination the client chose.
//!
//! Bounded: a fixed number of entries in all, spread over shards so the
//! inbound's lookups (one per new TCP flow, one per UDP datagram when a
//! domain rule exists) rarely meet. When a shard is full the entry learned
//! or refreshed longest ago goes (first in, first out, a refresh moving an
//! entry to the back): "LRU-ish" without touching the order on lookups.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Entries when the config names no other number.
pub const DEFAULT_CAPACITY: usize = 65_536;
const SHARDS: usize = 16;
/// A record with TTL 0 (or a few seconds) is still what the client
/// connects to a moment later: keep every name at least this long.
pub const MIN_KEEP: Duration = Duration::from_secs(10);
/// And at most a day, whatever the TTL says.
pub const MAX_KEEP: Duration = Duration::from_secs(86_400);

struct Entry {
    name: Arc<str>,
    expires: Instant,
    stamp: u64,
}

#[derive(Default)]
struct Shard {
    map: HashMap<IpAddr, Entry>,
    /// Addresses in the order they were learned or refreshed, with the
    /// stamp of that time; an entry refreshed since is found again later
    /// in the queue, and its older place is skipped.
    order: VecDeque<(IpAddr, u64)>,
    stamp: u64,
}

pub struct Names {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names").field("len", &self.len()).finish()
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A shard is a cache: whatever a panic left is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn shard_of(addr: &IpAddr) -> usize {
    // The low bits of a mixed address: neighbours (a CDN's /24) spread.
    let x = match addr {
        IpAddr::V4(a) => u64::from(a.to_bits()),
        IpAddr::V6(a) => {
            let b = a.to_bits();
            (b as u64) ^ ((b >> 64) as u64)
        }
    };
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS
}

impl Names {
    pub fn new(capacity: usize) -> Self {
        Names {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    /// Remembers that `addr` answered for `name` for `ttl` seconds.
    pub fn learn(&self, addr: IpAddr, name: &str, ttl: u32, now: Instant) {
        let keep = Duration::from_secs(u64::from(ttl)).clamp(MIN_KEEP, MAX_KEEP);
        let mut shard = lock(&self.shards[shard_of(&addr)]);
        shard.stamp += 1;
        let stamp = shard.stamp;
        // One allocation per name learned, shared by every lookup after.
        let name = match shard.map.get(&addr) {
            Some(e) if &*e.name == name => Arc::clone(&e.name),
            _ => Arc::from(name),
        };
        shard.map.insert(
            addr,
            Entry {
                name,
                expires: now + keep,
                stamp,
            },
        );
        shard.order.push_back((addr, stamp));
        while shard.map.len() > self.per_shard {
            let Some((old, s)) = shard.order.pop_front() else {
                break;
            };
            if shard.map.get(&old).is_some_and(|e| e.stamp == s) {
                shard.map.remove(&old);
            }
        }
        // Refreshes leave stale places behind: compact before the queue
        // grows past twice the entries.
        if shard.order.len() > 2 * self.per_shard + 16 {
            let Shard { map, order, .. } = &mut *shard;
            order.retain(|(a, s)| map.get(a).is_some_and(|e| e.stamp == *s));
        }
    }

    /// The name `addr` was last learned for, while its time lasts.
    #[cfg(test)]
    pub fn lookup(&self, addr: IpAddr, now: Instant) -> Option<Arc<str>> {
        self.lookup_with(addr, || now)
    }

    /// As [`Names::lookup`], reading the clock only when `addr` has a
    /// name: every new flow asks, and most have none.
    pub fn lookup_with(&self, addr: IpAddr, now: impl FnOnce() -> Instant) -> Option<Arc<str>> {
        let shard = lock(&self.shards[shard_of(&addr)]);
        let e = shard.map.get(&addr)?;
        (e.expires > now()).then(|| Arc::clone(&e.name))
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every name (a reload left no rule that looks at domains).
    pub fn clear(&self) {
        for s in self.shards.iter() {
            *lock(s) = Shard::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_name_lasts_its_ttl_within_bounds() {
        let names = Names::new(100);
        let t0 = Instant::now();
        names.learn(ip("198.51.100.7"), "a.example", 60, t0);
        names.learn(ip("2001:db8::7"), "b.example", 0, t0);
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            names.lookup(ip("198.51.100.7"), at(59)).as_deref(),
            Some("a.example")
        );
        assert_eq!(names.lookup(ip("198.51.100.7"), at(61)), None);
        // TTL 0: still there for the connect that follows the answer.
        assert_eq!(
            names.lookup(ip("2001:db8::7"), at(5)).as_deref(),
            Some("b.example")
        );
        assert_eq!(names.lookup(ip("2001:db8::7"), at(11)), None);
        assert_eq!(names.lookup(ip("198.51.100.8"), t0), None);
    }

    #[test]
    fn the_last_answer_for_an_address_wins() {
        let names = Names::new(100);
        let t0 = Instant::now();
        names.learn(ip("198.51.100.7"), "old.example", 600, t0);
        names.learn(ip("198.51.100.7"), "new.example", 600, t0);
        assert_eq!(
            names.lookup(ip("198.51.100.7"), t0).as_deref(),
            Some("new.example")
        );
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn the_table_stays_bounded_and_drops_the_oldest_first() {
        let cap = 256;
        let names = Names::new(cap);
        let t0 = Instant::now();
        let addr = |i: u32| IpAddr::V4(std::net::Ipv4Addr::from(0xc633_0000 + i));
        for i in 0..10_000u32 {
            names.learn(addr(i), "x.example", 600, t0);
            // A refresh of an early entry keeps it.
            names.learn(addr(0), "first.example", 600, t0);
        }
        assert!(names.len() <= cap, "{}", names.len());
        assert_eq!(names.lookup(addr(0), t0).as_deref(), Some("first.example"));
        assert!(names.lookup(addr(9_999), t0).is_some());
        assert!(names.lookup(addr(1), t0).is_none());
        for s in names.shards.iter() {
            assert!(lock(s).order.len() <= 2 * names.per_shard + 16);
        }
    }
}
