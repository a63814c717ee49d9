//! The DNS answer cache, and the coalescing of identical queries in flight.
//!
//! Pure: no sockets, and the time is passed in (`now: Instant`), so the
//! tests move the clock (entries keep it as whole seconds since the
//! cache was made: an entry may expire up to a second early, never late).
//! What it keeps and for how long:
//!
//! - **Key** ([`Key::of`]): the question's name lowercased (RFC 4343: a
//!   0x20 client's mixed case hits the same entry), its type and class,
//!   and the query's EDNS presence, DO bit (RFC 3225: DNSSEC records only
//!   for those who ask) and CD bit (RFC 4035 3.2.2). A scope (the server a
//!   rule chose, [`Key::scoped`]) may be added by the caller. Not cached:
//!   queries with other than one question, an opcode other than QUERY, a
//!   compressed question name, EDNS versions other than 0, an ECS option
//!   (the answer is for someone else's subnet), zone transfers.
//! - **Positive** answers (NOERROR with records): the smallest TTL in the
//!   answer and authority sections, clamped to `ttl_min..=ttl_max`.
//! - **Negative** (NXDOMAIN, or NOERROR with no answer): min(SOA TTL, SOA
//!   MINIMUM) from the authority section (RFC 2308 5), at most
//!   `negative_ttl_max`. Without an SOA: not cached (RFC 2308 5 says SHOULD
//!   NOT; the next query asks again, coalesced with its twins).
//! - **SERVFAIL and REFUSED**: `servfail_ttl` (0: never), never served
//!   stale. Other rcodes, TC answers, a TTL of 0 anywhere in the answer or
//!   authority section (RFC 1035 3.2.1: "should not be cached"; RFC 2181 8:
//!   a TTL with its top bit set counts as 0), TSIG-signed answers: never.
//! - **A hit** is the stored answer with the query's id, RD bit and question
//!   bytes (its own case back) and every TTL lowered by the time spent
//!   here, never below 1 while the entry is fresh (OPT's TTL field holds
//!   flags: left alone). The OPT record is kept (so an EDNS client gets
//!   EDNS back) but without its options: cookies and padding are per hop
//!   (RFC 6891 6.1.1). AA is cleared: a cached answer is not authoritative.
//! - **Serve-stale** (RFC 8767, `serve_stale`): an expired entry up to
//!   `stale_max` past its expiry is [`Lookup::Stale`], with every TTL set
//!   to `stale_answer_ttl`: the caller answers at once and refreshes.
//! - **Bounds**: `max_entries` and `max_bytes` (the entry's allocation +
//!   an upper estimate of the bookkeeping, [`ENTRY_OVERHEAD`]; checked
//!   against the heap by tests/dns_cache_memory.rs), least recently used evicted
//!   first, O(1) per operation (a slab of nodes in a doubly linked list
//!   and a hash table of slot numbers, found by the key's hash and
//!   compared with the node itself).
//! - **Memory**: one allocation per entry (a 6-byte head, the stored
//!   answer, its TTL offsets); the key is not kept apart (its name, type
//!   and class are the stored question, its scope and flags are in the
//!   head). A node is 24 bytes on 64-bit targets (the allocation's address
//!   and length, two times), its place in the recency list 8, in the table
//!   5: 112 bytes an entry for a one-address answer, 100,000 names in
//!   11 MB (tests/dns_cache_memory.rs; bench/DNS.md has the process's
//!   RSS).
//!
//! The lock is held to find, link or unlink a node and to copy a hit out
//! (a few dozen bytes, its TTLs rewritten on the way): parsing an answer
//! happens before it is taken.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use hashbrown::HashTable;
use portable_atomic::AtomicU64;
use tokio::sync::watch;

use super::message::{
    self, Header, Section, EDNS_DO, FLAG_CD, FLAG_TC, HEADER_LEN, RCODE_NOERROR, RCODE_NXDOMAIN,
    RCODE_REFUSED, RCODE_SERVFAIL, TYPE_OPT, TYPE_SOA, TYPE_TSIG,
};
use super::recency::{self, Recency};
use crate::config::DnsCache;

/// RFC 2308 7.1: a server failure may be remembered five minutes at most.
const SERVFAIL_TTL_CAP: u32 = 300;
/// EDNS Client Subnet (RFC 7871): an answer tailored to another network.
const OPT_ECS: u16 = 8;
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;

// The key's bytes: scope (2), flags (1), then the question as it stands
// in a message (name in wire form, lowercased; qtype (2), qclass (2)).
const KEY_HEAD: usize = 3;
const KEY_EDNS: u8 = 1;
const KEY_DO: u8 = 2;
const KEY_CD: u8 = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// What identifies a cached answer (see the module docs). Cheap to hash
/// and compare: one boxed byte string.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key(Box<[u8]>);

impl Key {
    /// The key of a query, or None when the query is not cached (see the
    /// module docs) or is not a well-formed query.
    pub fn of(query: &[u8]) -> Option<Key> {
        let h = Header::parse(query).ok()?;
        if h.is_response() || h.opcode() != 0 || h.qdcount != 1 || h.ancount != 0 {
            return None;
        }
        let name_end = message::plain_qname_end(query).ok()?;
        let qtype = u16_at(query, name_end)?;
        let qclass = u16_at(query, name_end + 2)?;
        if qtype == TYPE_AXFR || qtype == TYPE_IXFR {
            return None;
        }
        let mut flags = 0u8;
        if h.flags & FLAG_CD != 0 {
            flags |= KEY_CD;
        }
        let (_, records) = message::records(query).ok()?;
        let mut opts = records.iter().filter(|r| r.rtype == TYPE_OPT);
        match (opts.next(), opts.next()) {
            (None, _) => {}
            (Some(opt), None) => {
                // Version in the TTL field's second byte: only 0 exists.
                if opt.ttl & 0x00ff_0000 != 0 || has_option(query, opt, OPT_ECS) {
                    return None;
                }
                flags |= KEY_EDNS;
                if opt.ttl & EDNS_DO != 0 {
                    flags |= KEY_DO;
                }
            }
            // Two OPT records: a malformed query (RFC 6891 6.1.1).
            (Some(_), Some(_)) => return None,
        }
        let name = query.get(HEADER_LEN..name_end)?;
        let mut bytes = Vec::with_capacity(KEY_HEAD + name.len() + 4);
        bytes.extend_from_slice(&[0, 0, flags]);
        bytes.extend(name.iter().map(u8::to_ascii_lowercase));
        bytes.extend_from_slice(&qtype.to_be_bytes());
        bytes.extend_from_slice(&qclass.to_be_bytes());
        Some(Key(bytes.into_boxed_slice()))
    }

    /// The same question in another scope: answers for one scope are never
    /// served to another (say, the index of the server a rule chose, when
    /// rules can send the same name to different servers).
    pub fn scoped(mut self, scope: u16) -> Key {
        self.0[..2].copy_from_slice(&scope.to_be_bytes());
        self
    }

    pub fn scope(&self) -> u16 {
        u16::from_be_bytes([self.0[0], self.0[1]])
    }

    pub fn qtype(&self) -> u16 {
        let n = self.0.len();
        u16::from_be_bytes([self.0[n - 4], self.0[n - 3]])
    }

    pub fn qclass(&self) -> u16 {
        let n = self.0.len();
        u16::from_be_bytes([self.0[n - 2], self.0[n - 1]])
    }

    /// Scope and flags, as an entry's head starts.
    fn scope_flags(&self) -> &[u8] {
        &self.0[..KEY_HEAD]
    }

    /// The query carried an OPT record (EDNS0).
    pub fn edns(&self) -> bool {
        self.0[2] & KEY_EDNS != 0
    }

    /// The query asked for DNSSEC records (DO).
    pub fn dnssec_ok(&self) -> bool {
        self.0[2] & KEY_DO != 0
    }

    /// The query asked for no validation (CD).
    pub fn checking_disabled(&self) -> bool {
        self.0[2] & KEY_CD != 0
    }

    /// The name in wire form (length-prefixed labels, root), lowercased.
    pub fn name_wire(&self) -> &[u8] {
        &self.0[KEY_HEAD..self.0.len() - 4]
    }

    /// The question as it stands in a message: name (lowercased), type,
    /// class.
    fn question(&self) -> &[u8] {
        &self.0[KEY_HEAD..]
    }

    /// Type and class, as in a message.
    fn type_class(&self) -> &[u8] {
        &self.0[self.0.len() - 4..]
    }

    fn question_len(&self) -> usize {
        self.question().len()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = message::read_name(self.name_wire(), 0)
            .map(|(n, _)| String::from_utf8_lossy(&n).into_owned())
            .unwrap_or_default();
        f.debug_struct("Key")
            .field("name", &name)
            .field("qtype", &self.qtype())
            .field("qclass", &self.qclass())
            .field("edns", &self.edns())
            .field("do", &self.dnssec_ok())
            .field("cd", &self.checking_disabled())
            .field("scope", &self.scope())
            .finish()
    }
}

/// Whether the OPT record carries an option with this code.
fn has_option(msg: &[u8], opt: &message::RecordAt, code: u16) -> bool {
    let mut at = opt.rdata_at;
    let end = opt.end();
    while at + 4 <= end {
        let (Some(c), Some(len)) = (u16_at(msg, at), u16_at(msg, at + 2)) else {
            return false;
        };
        if c == code {
            return true;
        }
        at += 4 + len as usize;
    }
    false
}

/// What [`Cache::get`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A fresh answer, ready to send.
    Hit(Vec<u8>),
    /// An expired answer within the serve-stale window, ready to send:
    /// answer with it now and refresh the entry in the background.
    Stale(Vec<u8>),
    Miss,
}

/// Counters, for the log, /metrics and the tests.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub stale: AtomicU64,
    pub misses: AtomicU64,
    pub inserted: AtomicU64,
    /// Answers offered to `insert` that are never cached (TC, TTL 0,
    /// malformed, an rcode not cached, ...).
    pub uncacheable: AtomicU64,
    /// Entries pushed out to stay within the bounds.
    pub evictions: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Positive,
    Negative,
    Error,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Positive => 0,
            Kind::Negative => 1,
            Kind::Error => 2,
        }
    }

    fn of_byte(b: u8) -> Kind {
        match b {
            0 => Kind::Positive,
            1 => Kind::Negative,
            _ => Kind::Error,
        }
    }
}

/// An entry's head, before its answer: the key's scope (2) and flags (1),
/// as in the key's own first bytes; the kind (1); the answer's length (2).
const HEAD: usize = 6;

/// A cached answer: one allocation (`data`) and its times. 24 bytes on
/// 64-bit targets (pinned by a test): with the recency list's 8, most of
/// an entry's cost besides its bytes.
struct Node {
    /// The [`HEAD`], the answer as stored (id zero, question lowercased,
    /// OPT options cut), then the offsets of its TTL fields in the answer
    /// (u16 each, big-endian). The answer's question is the key's name,
    /// type and class.
    data: Box<[u8]>,
    /// When it was stored: whole seconds since the cache's `epoch`.
    at: u32,
    /// Seconds the entry is fresh for, from `at`.
    ttl: u32,
}

/// Memory an entry takes besides its bytes: its node in the slab and its
/// place in the recency list (both arrays grow by doubling: counted
/// twice), its slot in the table (4 bytes and a control byte; the table
/// doubles when 7 in 8 slots are used: 7 in 16 just after), its number in
/// the free list, and the allocator's header and rounding (glibc: 8 bytes
/// and up to 15 more). An upper estimate, so that `max_bytes` bounds what
/// the process allocates, not only the answers.
pub const ENTRY_OVERHEAD: usize = 2 * (std::mem::size_of::<Option<Node>>() + recency::SLOT_BYTES)
    + (std::mem::size_of::<u32>() + 1) * 16 / 7
    + std::mem::size_of::<u32>()
    + 8
    + 15;

impl Node {
    fn cost(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD
    }

    /// The key's scope and flags.
    fn scope_flags(&self) -> &[u8] {
        self.data.get(..KEY_HEAD).unwrap_or_default()
    }

    fn kind(&self) -> Kind {
        Kind::of_byte(self.data.get(3).copied().unwrap_or(u8::MAX))
    }

    fn answer_len(&self) -> usize {
        u16_at(&self.data, 4).unwrap_or(0) as usize
    }

    fn answer(&self) -> &[u8] {
        self.data
            .get(HEAD..HEAD + self.answer_len())
            .unwrap_or_default()
    }

    /// The TTL fields' offsets in the answer, two bytes each.
    fn offsets(&self) -> &[u8] {
        self.data
            .get(HEAD + self.answer_len()..)
            .unwrap_or_default()
    }

    /// The stored question: name, type, class (empty if the stored name
    /// does not parse, which `prepare` rules out).
    fn question(&self) -> &[u8] {
        let answer = self.answer();
        message::plain_qname_end(answer)
            .ok()
            .and_then(|end| answer.get(HEADER_LEN..end + 4))
            .unwrap_or_default()
    }

    /// Whether this is the entry for `key`. Wire names end with their
    /// root label, so an equal prefix is an equal name.
    fn is(&self, key: &Key) -> bool {
        let q = key.question();
        self.scope_flags() == key.scope_flags()
            && self
                .data
                .get(HEAD + HEADER_LEN..HEAD + HEADER_LEN + q.len())
                == Some(q)
    }
}

/// The table's hash of a key, from its parts, so that a node (which keeps
/// the same parts, not the key) hashes the same.
fn hash_of(state: &RandomState, scope_flags: &[u8], question: &[u8]) -> u64 {
    state.hash_one((scope_flags, question))
}

/// The table and the recency list: slot numbers into `slots`.
struct Lru {
    /// The slot numbers of the entries, by the hash of their key.
    table: HashTable<u32>,
    /// Keyed by the process's random SipHash keys: names come from the
    /// network, and a flood of colliding ones must not be possible.
    state: RandomState,
    slots: Vec<Option<Node>>,
    free: Vec<u32>,
    order: Recency,
    bytes: usize,
}

impl Lru {
    /// Empty, and nothing allocated: the arrays grow as entries come
    /// (a table sized for `max_entries` up front would hold more pages
    /// than the entries need until it fills; the slab's and the list's
    /// arrays are large enough that the allocator grows them in place with
    /// mremap, untouched capacity is never resident).
    fn new() -> Lru {
        Lru {
            table: HashTable::new(),
            state: RandomState::new(),
            slots: Vec::new(),
            free: Vec::new(),
            order: Recency::new(),
            bytes: 0,
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn key_hash(&self, key: &Key) -> u64 {
        hash_of(&self.state, key.scope_flags(), key.question())
    }

    fn node(&self, i: u32) -> Option<&Node> {
        self.slots.get(i as usize)?.as_ref()
    }

    /// The slot of `key`'s entry.
    fn find(&self, key: &Key) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(self.key_hash(key), |&i| {
                slots
                    .get(i as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|n| n.is(key))
            })
            .copied()
    }

    fn touch(&mut self, i: u32) {
        self.order.touch(i);
    }

    fn remove(&mut self, i: u32) -> Option<Node> {
        let node = self.slots.get_mut(i as usize).and_then(Option::take)?;
        self.order.unlink(i);
        let hash = hash_of(&self.state, node.scope_flags(), node.question());
        if let Ok(entry) = self.table.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
        self.bytes -= node.cost();
        self.free.push(i);
        Some(node)
    }

    /// Removes the least recently used entry.
    fn pop_back(&mut self) -> Option<Node> {
        self.remove(self.order.oldest()?)
    }

    /// Stores `node` as `key`'s entry; returns the one it replaces.
    fn insert(&mut self, key: &Key, node: Node) -> Option<Node> {
        let old = self.find(key).and_then(|i| self.remove(i));
        self.bytes += node.cost();
        let i = match self.free.pop() {
            Some(i) => {
                if let Some(slot) = self.slots.get_mut(i as usize) {
                    *slot = Some(node);
                }
                i
            }
            None => {
                self.slots.push(Some(node));
                (self.slots.len() - 1) as u32
            }
        };
        let hash = self.key_hash(key);
        let Lru {
            table,
            state,
            slots,
            ..
        } = self;
        // Growing the table rehashes every entry from its node.
        table.insert_unique(hash, i, |&j| {
            let node = slots.get(j as usize).and_then(Option::as_ref);
            node.map_or(0, |n| hash_of(state, n.scope_flags(), n.question()))
        });
        self.order.push_front(i);
        old
    }
}

/// The DNS answer cache (see the module docs).
pub struct Cache {
    cfg: DnsCache,
    /// The clock's origin for the entries' times (seconds as u32, not a
    /// 16-byte `Instant` in every node).
    epoch: Instant,
    lru: Mutex<Lru>,
    stats: CacheStats,
}

/// An answer checked and laid out for storing, before the lock is taken.
struct Prepared {
    data: Box<[u8]>,
    kind: Kind,
    ttl: u32,
}

/// RFC 2181 8: a TTL with the top bit set is taken as 0.
fn effective(ttl: u32) -> u32 {
    if ttl > 0x7fff_ffff {
        0
    } else {
        ttl
    }
}

impl Cache {
    pub fn new(cfg: &DnsCache) -> Cache {
        Cache::since(cfg, Instant::now())
    }

    /// A cache whose clock starts at `epoch`: times before it count as
    /// the epoch itself, so a test that stores an answer "in the past"
    /// makes its cache with an epoch before that.
    pub(crate) fn since(cfg: &DnsCache, epoch: Instant) -> Cache {
        Cache {
            cfg: *cfg,
            epoch,
            lru: Mutex::new(Lru::new()),
            stats: CacheStats::default(),
        }
    }

    /// `now` as whole seconds since the cache was made.
    fn secs(&self, now: Instant) -> u32 {
        let s = now.saturating_duration_since(self.epoch).as_secs();
        u32::try_from(s).unwrap_or(u32::MAX)
    }

    pub fn config(&self) -> &DnsCache {
        &self.cfg
    }

    fn enabled(&self) -> bool {
        self.cfg.enabled && self.cfg.max_entries > 0 && self.cfg.max_bytes > 0
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Entries held (fresh or expired but not yet dropped).
    pub fn len(&self) -> usize {
        lock(&self.lru).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the entries count against `max_bytes`.
    pub fn bytes(&self) -> usize {
        lock(&self.lru).bytes
    }

    /// Forgets every entry (the API's flush, a reload that changes the
    /// servers) and gives the memory back.
    pub fn flush(&self) {
        let old = std::mem::replace(&mut *lock(&self.lru), Lru::new());
        // Freed outside the lock.
        drop(old);
    }

    /// The answer for `query`, whose key is `key` (from [`Key::of`] of this
    /// same query), rewritten for it. `Miss` also when the query's question
    /// is not the key's.
    pub fn get(&self, key: &Key, query: &[u8], now: Instant) -> Lookup {
        self.lookup(key, query, now, true)
    }

    /// [`get`](Self::get) for a caller that asks `get` again after a miss
    /// (the DNS listeners' inline answers): its miss is not counted, so a
    /// query counts one miss however many times it looked.
    pub fn get_hit(&self, key: &Key, query: &[u8], now: Instant) -> Lookup {
        self.lookup(key, query, now, false)
    }

    fn lookup(&self, key: &Key, query: &[u8], now: Instant, count_miss: bool) -> Lookup {
        let result = if self.enabled() {
            self.find(key, query, now)
        } else {
            None
        };
        let counter = match &result {
            Some(Lookup::Hit(_)) => Some(&self.stats.hits),
            Some(Lookup::Stale(_)) => Some(&self.stats.stale),
            _ => count_miss.then_some(&self.stats.misses),
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        result.unwrap_or(Lookup::Miss)
    }

    /// Whether the entry may still be served `age` seconds after it was
    /// stored: fresh, or stale within the serve-stale window (answers
    /// only, not failures).
    fn servable(&self, node: &Node, age: u32) -> bool {
        age < node.ttl
            || (self.cfg.serve_stale
                && node.kind() != Kind::Error
                && u64::from(age) < u64::from(node.ttl) + u64::from(self.cfg.stale_max))
    }

    /// Under the lock: the entry rewritten for `query`. Drops an entry too
    /// old to serve.
    fn find(&self, key: &Key, query: &[u8], now: Instant) -> Option<Lookup> {
        let now = self.secs(now);
        let mut lru = lock(&self.lru);
        let i = lru.find(key)?;
        let node = lru.node(i)?;
        let age = now.saturating_sub(node.at);
        let stale = if age < node.ttl {
            false
        } else if self.servable(node, age) {
            true
        } else {
            drop(lru.remove(i));
            return None;
        };
        let ttl = if stale {
            Ttl::Fixed(self.cfg.stale_answer_ttl.max(1))
        } else {
            Ttl::Minus(age)
        };
        let out = rewrite(node, key, query, ttl)?;
        lru.touch(i);
        drop(lru);
        Some(if stale {
            Lookup::Stale(out)
        } else {
            Lookup::Hit(out)
        })
    }

    /// Stores `answer` (an upstream's reply to a query whose key is `key`)
    /// when it may be cached; true when it was. The least recently used
    /// entries make room.
    pub fn insert(&self, key: &Key, answer: &[u8], now: Instant) -> bool {
        let prepared = if self.enabled() {
            self.prepare(key, answer)
        } else {
            None
        };
        let Some(p) = prepared else {
            self.stats.uncacheable.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let at = self.secs(now);
        let node = Node {
            data: p.data,
            at,
            ttl: p.ttl,
        };
        if node.cost() > self.cfg.max_bytes {
            self.stats.uncacheable.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut evicted = Vec::new();
        let replaced;
        {
            let mut lru = lock(&self.lru);
            // A failure does not push out an answer that can still be
            // served: RFC 8767 serves stale data exactly when the refresh
            // fails.
            if p.kind == Kind::Error {
                let old = lru.find(key).and_then(|i| lru.node(i));
                if old.is_some_and(|o| {
                    o.kind() != Kind::Error && self.servable(o, at.saturating_sub(o.at))
                }) {
                    return false;
                }
            }
            replaced = lru.insert(key, node);
            while lru.len() > self.cfg.max_entries || lru.bytes > self.cfg.max_bytes {
                match lru.pop_back() {
                    // Freed after the lock is let go.
                    Some(old) => evicted.push(old),
                    None => break,
                }
            }
        }
        drop(replaced);
        self.stats
            .evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        self.stats.inserted.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Checks `answer` and lays it out for storing: the classification
    /// and TTL rules of the module docs.
    fn prepare(&self, key: &Key, answer: &[u8]) -> Option<Prepared> {
        let cfg = &self.cfg;
        u16::try_from(answer.len()).ok()?;
        let h = Header::parse(answer).ok()?;
        if !h.is_response() || h.opcode() != 0 || h.qdcount != 1 || h.flags & FLAG_TC != 0 {
            return None;
        }
        // The same question as the key's (the case aside).
        let name_end = message::plain_qname_end(answer).ok()?;
        let question = answer.get(HEADER_LEN..name_end + 4)?;
        let name_len = key.name_wire().len();
        if question.len() != key.question_len()
            || !question[..name_len].eq_ignore_ascii_case(key.name_wire())
            || question[name_len..] != *key.type_class()
        {
            return None;
        }
        let (_, records) = message::records(answer).ok()?;
        let mut opt = None;
        for r in &records {
            match r.rtype {
                TYPE_TSIG => return None,
                TYPE_OPT if opt.is_some() => return None,
                TYPE_OPT => opt = Some(*r),
                _ => {}
            }
        }
        // The stored length: the OPT record's options cut off (or the
        // whole record, for a query that had none), which needs it to be
        // the last record (it is, in every answer but signed ones, refused
        // above).
        let mut keep = answer.len();
        let mut drop_opt = false;
        if let Some(opt) = opt {
            // An extended rcode (BADVERS, BADCOOKIE...) is about this hop.
            if opt.ttl >> 24 != 0 {
                return None;
            }
            if !key.edns() || opt.rdata_len > 0 {
                if opt.end() != answer.len() || opt.section != Section::Additional {
                    return None;
                }
                if key.edns() {
                    keep = opt.rdata_at;
                } else {
                    keep = opt.at;
                    drop_opt = true;
                }
            }
        }
        let not_opt = || records.iter().filter(|r| r.rtype != TYPE_OPT);
        let min_of = |section: Section| {
            not_opt()
                .filter(|r| r.section == section)
                .map(|r| effective(r.ttl))
                .min()
        };
        let rcode = h.rcode();
        let answers = min_of(Section::Answer);
        let (kind, ttl) = match rcode {
            RCODE_SERVFAIL | RCODE_REFUSED => (Kind::Error, cfg.servfail_ttl.min(SERVFAIL_TTL_CAP)),
            RCODE_NOERROR if answers.is_some() => {
                // (Option's min would take a missing authority
                // section for the smallest.)
                let least = answers
                    .into_iter()
                    .chain(min_of(Section::Authority))
                    .min()
                    .unwrap_or(0);
                if least == 0 {
                    return None;
                }
                (Kind::Positive, least.max(cfg.ttl_min).min(cfg.ttl_max))
            }
            RCODE_NOERROR | RCODE_NXDOMAIN => {
                let soa =
                    not_opt().find(|r| r.section == Section::Authority && r.rtype == TYPE_SOA)?;
                let minimum = effective(message::soa_minimum(answer, soa)?);
                let ttl = effective(soa.ttl)
                    .min(minimum)
                    .min(cfg.negative_ttl_max)
                    // An NXDOMAIN after a CNAME lasts no longer than it.
                    .min(answers.unwrap_or(u32::MAX));
                (Kind::Negative, ttl)
            }
            _ => return None,
        };
        if ttl == 0 {
            return None;
        }

        let offsets: Vec<usize> = not_opt().map(|r| r.ttl_at).collect();
        let mut data = Vec::with_capacity(HEAD + keep + 2 * offsets.len());
        data.extend_from_slice(key.scope_flags());
        data.push(kind.byte());
        data.extend_from_slice(&u16::try_from(keep).ok()?.to_be_bytes());
        let head = data.len();
        data.extend_from_slice(answer.get(..keep)?);
        let body = data.get_mut(head..)?;
        // The id and question are the asker's on every hit; stored as
        // zero and lowercase so no client's id or case is kept. AA off.
        body.get_mut(..2)?.fill(0);
        *body.get_mut(2)? &= !0x04;
        body.get_mut(HEADER_LEN..name_end)?.make_ascii_lowercase();
        if drop_opt {
            let arcount = body.get_mut(10..12)?;
            let n = u16::from_be_bytes([arcount[0], arcount[1]]).saturating_sub(1);
            arcount.copy_from_slice(&n.to_be_bytes());
        } else if keep != answer.len() {
            // OPT's RDLENGTH, just before its (cut) data.
            body.get_mut(keep - 2..keep)?.fill(0);
        }
        for &at in &offsets {
            let field = body.get_mut(at..at + 4)?;
            let orig = effective(u32::from_be_bytes([field[0], field[1], field[2], field[3]]));
            let stored = match kind {
                Kind::Positive => orig.max(cfg.ttl_min).min(cfg.ttl_max),
                Kind::Negative | Kind::Error => orig.min(ttl),
            };
            field.copy_from_slice(&stored.to_be_bytes());
        }
        for &at in &offsets {
            data.extend_from_slice(&u16::try_from(at).ok()?.to_be_bytes());
        }
        Some(Prepared {
            data: data.into_boxed_slice(),
            kind,
            ttl,
        })
    }
}

/// How a hit's TTLs are written.
#[derive(Clone, Copy)]
enum Ttl {
    /// Each stored TTL less the entry's age, at least 1.
    Minus(u32),
    /// Every TTL this value (serve-stale).
    Fixed(u32),
}

/// The stored answer made the reply to `query`: its id, RD bit and
/// question, the TTLs as `ttl` says. None when the query's question is
/// not the key's.
fn rewrite(node: &Node, key: &Key, query: &[u8], ttl: Ttl) -> Option<Vec<u8>> {
    let question_end = HEADER_LEN + key.question_len();
    let asked = query.get(HEADER_LEN..question_end)?;
    let name_len = key.name_wire().len();
    if !asked[..name_len].eq_ignore_ascii_case(key.name_wire())
        || asked[name_len..] != *key.type_class()
    {
        return None;
    }
    let mut out = node.answer().to_vec();
    out.get_mut(HEADER_LEN..question_end)?
        .copy_from_slice(asked);
    out.get_mut(..2)?.copy_from_slice(query.get(..2)?);
    let rd = query.get(2)? & 0x01;
    *out.get_mut(2)? = (out[2] & !0x01) | rd;
    for at in node.offsets().chunks_exact(2) {
        let at = u16::from_be_bytes([at[0], at[1]]) as usize;
        let field = out.get_mut(at..at + 4)?;
        let value = match ttl {
            Ttl::Fixed(v) => v,
            Ttl::Minus(age) => u32::from_be_bytes([field[0], field[1], field[2], field[3]])
                .saturating_sub(age)
                .max(1),
        };
        field.copy_from_slice(&value.to_be_bytes());
    }
    Some(out)
}

/// `answer` (to the same question, from anyone) as the reply to `query`:
/// the query's id and RD bit, and its question bytes when the question is
/// the same (compared case-insensitively) and written plainly in both, so
/// a 0x20 client gets its own case back. What [`Flights`] hands each
/// waiter.
pub fn reply_to(query: &[u8], answer: &[u8]) -> Vec<u8> {
    let mut out = answer.to_vec();
    if let (Some(id), Some(head)) = (query.get(..2), out.get_mut(..2)) {
        head.copy_from_slice(id);
    }
    if let (Some(&q), Some(a)) = (query.get(2), out.get_mut(2)) {
        *a = (*a & !0x01) | (q & 0x01);
    }
    let ends = (
        message::plain_qname_end(query),
        message::plain_qname_end(answer),
    );
    if let (Ok(q_end), Ok(a_end)) = ends {
        if q_end == a_end {
            let asked = query.get(HEADER_LEN..q_end + 4);
            let given = out.get_mut(HEADER_LEN..a_end + 4);
            if let (Some(asked), Some(given)) = (asked, given) {
                let n = q_end - HEADER_LEN;
                if asked[..n].eq_ignore_ascii_case(&given[..n]) && asked[n..] == given[n..] {
                    given.copy_from_slice(asked);
                }
            }
        }
    }
    out
}

/// What a flight's followers receive: the answer, or the leader's error.
type Outcome<E> = Option<Result<Arc<[u8]>, E>>;

struct Flight<E> {
    id: u64,
    rx: watch::Receiver<Outcome<E>>,
}

/// Coalescing: callers asking the same [`Key`] at the same time share one
/// upstream fetch. The first runs its `fetch` (the leader); the others wait
/// for its outcome, each getting the answer rewritten for its own query
/// ([`reply_to`]). When the leader's future is dropped before it finishes
/// (its client went away), a waiter takes over with its own `fetch`; no
/// one waits on a fetch that no longer runs.
pub struct Flights<E> {
    map: Mutex<HashMap<Key, Flight<E>>>,
    next_id: AtomicU64,
    joined: AtomicU64,
}

impl<E> Default for Flights<E> {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            joined: AtomicU64::new(0),
        }
    }
}

/// The leader's hold on its flight: removes it from the map when the
/// leader finishes or is dropped, and only then lets the sender go, so a
/// woken waiter never finds the dead flight still listed.
struct Leading<'a, E> {
    flights: &'a Flights<E>,
    key: &'a Key,
    id: u64,
    tx: Option<watch::Sender<Outcome<E>>>,
}

impl<E> Flights<E> {
    /// Removes the flight `id` from the map, if it is still listed.
    fn forget(&self, key: &Key, id: u64) {
        let mut map = lock(&self.map);
        if map.get(key).is_some_and(|f| f.id == id) {
            map.remove(key);
        }
    }
}

impl<E> Drop for Leading<'_, E> {
    fn drop(&mut self) {
        self.flights.forget(self.key, self.id);
        drop(self.tx.take());
    }
}

enum Role<E> {
    Lead(u64, watch::Sender<Outcome<E>>),
    Follow(u64, watch::Receiver<Outcome<E>>),
}

impl<E: Clone> Flights<E> {
    pub fn new() -> Flights<E> {
        Flights::default()
    }

    /// Callers that waited on another's fetch instead of fetching.
    pub fn joined(&self) -> u64 {
        self.joined.load(Ordering::Relaxed)
    }

    /// Fetches in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.map).len()
    }

    /// The answer to `query` (whose key is `key`): from the fetch already
    /// in flight for the key, else from `fetch`, which the others asking
    /// meanwhile then share.
    pub async fn run<F, Fut>(&self, key: &Key, query: &[u8], fetch: F) -> Result<Vec<u8>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        let (id, tx) = loop {
            let role = {
                let mut map = lock(&self.map);
                match map.get(key) {
                    Some(f) => Role::Follow(f.id, f.rx.clone()),
                    None => {
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        let (tx, rx) = watch::channel(None);
                        map.insert(key.clone(), Flight { id, rx });
                        Role::Lead(id, tx)
                    }
                }
            };
            match role {
                Role::Lead(id, tx) => break (id, tx),
                Role::Follow(id, mut rx) => {
                    self.joined.fetch_add(1, Ordering::Relaxed);
                    let outcome = rx
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|v| v.clone());
                    match outcome {
                        Some(Ok(answer)) => return Ok(reply_to(query, &answer)),
                        Some(Err(e)) => return Err(e),
                        // The leader was dropped: lead (or follow a new
                        // leader) in its place.
                        None => self.forget(key, id),
                    }
                }
            }
        };
        let leading = Leading {
            flights: self,
            key,
            id,
            tx: Some(tx),
        };
        let result = fetch().await;
        let shared = match &result {
            Ok(answer) => Ok(Arc::from(answer.as_slice())),
            Err(e) => Err(e.clone()),
        };
        if let Some(tx) = leading.tx.as_ref() {
            tx.send_replace(Some(shared));
        }
        drop(leading);
        // The leader too gets the answer as a reply to its own query (the
        // fetch may have asked in another form).
        result.map(|answer| reply_to(query, &answer))
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
