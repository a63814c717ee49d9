//! What the DNS answer cache really allocates per entry, counted by a
//! global allocator that exists in this test binary alone (the library and
//! tproxyd itself use the system's as it is): the heap that 100,000 cached
//! names take, against the bytes the cache accounts for them (what
//! `max_bytes` bounds) and against issue 21's budget (RSS at most 20 MiB
//! with 100,000 names, about 8 MiB of it the process before any name).
//!
//! Allocations are counted as glibc's malloc lays them out (an 8-byte
//! header, rounded up to 16 bytes, 32 at least), and the arrays at their
//! full capacity, touched or not: an upper figure next to the RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tproxyd::config::DnsCache;
use tproxyd::dns::cache::{Cache, Key, Lookup, ENTRY_OVERHEAD};
use tproxyd::dns::message::build::{query, response, Answer};
use tproxyd::dns::message::{HEADER_LEN, TYPE_A};

/// Bytes held, as the allocator lays them out.
static HELD: AtomicUsize = AtomicUsize::new(0);

fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; the
// counter is only arithmetic beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HELD.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HELD.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
            HELD.fetch_add(chunk(new_size), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const NAMES: u32 = 100_000;

/// bench/dns_cache.py's names (`n0.example` to `n99999.example`, one A
/// record each) into a cache configured as there; what the heap grew by.
#[test]
fn a_hundred_thousand_names_fit_the_budget_and_the_accounting() {
    let cache = Cache::new(&DnsCache {
        max_entries: 200_000,
        max_bytes: 64 << 20,
        ..DnsCache::default()
    });
    let t0 = Instant::now();
    // The queries and answers are made before counting starts and freed
    // after it ends.
    let pairs: Vec<(Key, Vec<u8>, Vec<u8>)> = (0..NAMES)
        .map(|i| {
            let q = query(1, &format!("n{i}.example"), TYPE_A);
            let a = response(&q, &[Answer::A(None, [127, 0, 0, 1].into(), 3600)]);
            (Key::of(&q).expect("a plain query"), q, a)
        })
        .collect();
    let before = HELD.load(Ordering::Relaxed);
    for (key, _, answer) in &pairs {
        assert!(cache.insert(key, answer, t0));
    }
    let grown = HELD.load(Ordering::Relaxed) - before;
    let per_entry = grown / NAMES as usize;
    let answer_len = pairs.last().map_or(0, |p| p.2.len());
    eprintln!(
        "{NAMES} names: {grown} bytes allocated, {per_entry} an entry (answers of \
         {answer_len} bytes), {} accounted, ENTRY_OVERHEAD {ENTRY_OVERHEAD}",
        cache.bytes()
    );
    assert_eq!(cache.len(), NAMES as usize);
    // What max_bytes bounds is at least what is allocated.
    assert!(
        cache.bytes() >= grown,
        "accounted {} < allocated {grown}: ENTRY_OVERHEAD is too low",
        cache.bytes()
    );
    // Measured: 112 (a 64-byte malloc chunk for the head, the 48-byte
    // answer and its TTL offset; the 24-byte node and 8-byte recency slot
    // at the arrays' capacity, 131,072; the table's 5-byte slots). Under
    // 120: 100,000 names in under 11.5 MiB of the 12 that issue 21's RSS
    // target leaves besides the process itself.
    assert!(
        per_entry <= 120,
        "{per_entry} bytes an entry: the node, the table or the allocation grew"
    );
    // And they are all there.
    for (key, q, _) in pairs.iter().step_by(997) {
        assert!(matches!(cache.get(key, q, t0), Lookup::Hit(_)));
    }
    let name = &pairs[0].1[HEADER_LEN..];
    assert!(name.starts_with(b"\x02n0"));
}
