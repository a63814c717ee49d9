//! Fake-ip (`[dns.fake_ip]`): A and AAAA questions are answered here with
//! an address from a reserved range (198.18.0.0/15, fc00::/18 by default),
//! one per name, so that every flow to such an address carries its name:
//! the route decision looks the name up ([`FakePool::name_of`]) and the
//! outbound is asked for the name, never for the fake address.
//!
//! - **One address per name**, the same for as long as the name is in the
//!   pool; A and AAAA of one name share a slot (slot k is the range's
//!   network address + 1 + k in each family), so a v4 and a v6 address
//!   never stand for two different names.
//! - **Bounded**: at most [`MAX_ENTRIES`] names (fewer when a range is
//!   smaller). When full, the name used least recently (answered or
//!   connected to) gives its address to the new one. The network address
//!   of each range is never handed out, nor the IPv4 broadcast address.
//!   32,768 names is about a month of a household's distinct names, at
//!   roughly 100 bytes each (3 MiB at most); an address recycled is one
//!   no client has asked for or connected to for longest.
//! - **Exclusions** ([`Exclusions`]): names that must get real addresses
//!   (NTP, STUN, LAN names, captive-portal checks, game consoles, and the
//!   configured `exclude_*`) are not answered here: the real resolver
//!   answers them. Questions other than A/AAAA are not answered here either.
//! - **Persistence**: the mapping is saved atomically to `store` (a temp
//!   file, fsync, rename) every `save_interval` when it changed, and at
//!   stop before anything slow; restored at start only when the file is
//!   whole (checksum), made for the same ranges, and every entry checks
//!   out. Anything else is ignored with a warning: a pool starts empty
//!   rather than trusting a file it cannot vouch for.
//! - **Unmapped fake addresses** (the pool was lost, or an address a client
//!   kept was recycled long ago) are refused at once by the inbounds; they
//!   are never sent anywhere.
//!
//! The name → real address step for `direct` flows is a hook
//! ([`ResolveReal`]) the DNS engine provides; it must ask the real
//! resolvers, never this pool.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use arc_swap::ArcSwap;
use portable_atomic::AtomicU64;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::message::{self, Header, CLASS_IN, RCODE_NOERROR, TYPE_A, TYPE_AAAA};
use super::recency::Recency;
use crate::cidr::Cidr;
use crate::config::FakeIp;
use crate::hostname::{host_name, MAX_HOST_LEN};
use crate::outbound::BoxFuture;

/// The most names the pool holds (see the module's notes).
pub const MAX_ENTRIES: usize = 32_768;

pub use crate::policy::fake_exclusions::{
    Exclusions, DEFAULT_EXCLUDE_REGEXES, DEFAULT_EXCLUDE_SUFFIXES,
};

pub use crate::outbound::ResolveReal;

/// Counters (logs, tests).
#[derive(Debug, Default)]
pub struct FakeStats {
    pub answered: AtomicU64,
    pub allocated: AtomicU64,
    pub recycled: AtomicU64,
    /// TCP connections to a fake address with no name, reset.
    pub unmapped_tcp: AtomicU64,
    /// UDP datagrams to a fake address with no name, dropped.
    pub unmapped_udp: AtomicU64,
}

/// One configured range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    cidr: Cidr,
    /// The network address.
    net: u128,
    /// The last offset in the range (all host bits set).
    last: u128,
    /// Addresses that may be handed out: all but the network address (and
    /// the IPv4 broadcast address).
    usable: u128,
}

impl Range {
    fn new(cidr: Cidr) -> Range {
        let (bits, value) = match cidr.addr {
            IpAddr::V4(a) => (32u32, u128::from(u32::from(a))),
            IpAddr::V6(a) => (128u32, u128::from(a)),
        };
        let host_bits = bits.saturating_sub(u32::from(cidr.prefix)).min(127);
        let last = (1u128 << host_bits) - 1;
        let reserved = if cidr.is_ipv4() { 2 } else { 1 };
        Range {
            cidr,
            net: value & !last,
            last,
            usable: (last + 1).saturating_sub(reserved),
        }
    }

    fn v4(&self) -> bool {
        self.cidr.is_ipv4()
    }

    fn value(&self, ip: IpAddr) -> Option<u128> {
        match (ip, self.v4()) {
            (IpAddr::V4(a), true) => Some(u128::from(u32::from(a))),
            (IpAddr::V6(a), false) => Some(u128::from(a)),
            _ => None,
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.value(ip).is_some_and(|v| v & !self.last == self.net)
    }

    fn addr_of(&self, slot: u32) -> IpAddr {
        let v = self.net + 1 + u128::from(slot);
        if self.v4() {
            IpAddr::V4(Ipv4Addr::from(v as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(v))
        }
    }

    /// The slot `ip` stands for, if it is one that can be handed out.
    fn slot_of(&self, ip: IpAddr) -> Option<u32> {
        let v = self.value(ip)?;
        let off = v.checked_sub(self.net)?.checked_sub(1)?;
        if off >= self.usable {
            return None;
        }
        u32::try_from(off).ok()
    }
}

#[derive(Debug)]
struct Slot {
    name: Arc<str>,
}

/// The mapping: slots in use, the names' slots, and their use order.
#[derive(Debug, Default)]
struct Inner {
    slots: Vec<Slot>,
    by_name: HashMap<Arc<str>, u32>,
    order: Recency,
}

impl Inner {
    fn new() -> Inner {
        Inner::default()
    }

    fn push_front(&mut self, i: u32) {
        self.order.push_front(i);
    }

    fn touch(&mut self, i: u32) {
        self.order.touch(i);
    }

    /// The slot of `name`, allocating (or recycling the least recently
    /// used) when it has none; the flag says whether one was recycled.
    fn slot_for(&mut self, name: &str, capacity: usize) -> (u32, bool) {
        if let Some(&i) = self.by_name.get(name) {
            self.touch(i);
            return (i, false);
        }
        let name: Arc<str> = Arc::from(name);
        if self.slots.len() < capacity {
            let i = self.slots.len() as u32;
            self.slots.push(Slot {
                name: Arc::clone(&name),
            });
            self.by_name.insert(name, i);
            self.push_front(i);
            return (i, false);
        }
        let Some(i) = self.order.oldest() else {
            // Capacity 0 (ranges are checked to hold more): no slot.
            return (u32::MAX, true);
        };
        self.order.unlink(i);
        if let Some(s) = self.slots.get_mut(i as usize) {
            let old = std::mem::replace(&mut s.name, Arc::clone(&name));
            self.by_name.remove(&old);
        }
        self.by_name.insert(name, i);
        self.push_front(i);
        (i, true)
    }

    /// (slot, name), least recently used first: the order a load
    /// re-inserts them in.
    fn entries(&self) -> Vec<(u32, Arc<str>)> {
        let mut out = Vec::with_capacity(self.slots.len());
        let mut at = self.order.oldest();
        while let Some(i) = at {
            if let Some(s) = self.slots.get(i as usize) {
                out.push((i, Arc::clone(&s.name)));
            }
            at = self.order.newer(i);
            if out.len() > self.slots.len() {
                break;
            }
        }
        out
    }
}

/// The pool: see the module's notes.
pub struct FakePool {
    v4: Option<Range>,
    v6: Option<Range>,
    capacity: usize,
    ttl: u32,
    store: Option<PathBuf>,
    inner: Mutex<Inner>,
    exclusions: ArcSwap<Exclusions>,
    resolver: OnceLock<Arc<dyn ResolveReal>>,
    /// A name was allocated since the last save (a periodic save is due).
    changed: AtomicBool,
    /// The use order changed since the last save (the stop saves it).
    touched: AtomicBool,
    pub stats: FakeStats,
}

impl std::fmt::Debug for FakePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakePool")
            .field("v4", &self.v4.map(|r| r.cidr))
            .field("v6", &self.v6.map(|r| r.cidr))
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The mapping stays consistent at every step a panic could stop.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a pool file was not restored.
#[derive(Debug, thiserror::Error)]
pub enum PoolFileError {
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    #[error("larger than {max} bytes: not a pool file tproxyd wrote")]
    TooLarge { max: usize },
    #[error("truncated (needed {needed} bytes, has {got})")]
    Truncated { needed: usize, got: usize },
    #[error("not a tproxyd fake-ip pool file (bad magic)")]
    BadMagic,
    #[error("format version {0}, this tproxyd reads version {FILE_VERSION}")]
    Version(u16),
    #[error("checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("made for ranges {file}, configured now: {now}; the addresses clients hold mean nothing in the new ranges")]
    Foreign { file: String, now: String },
    #[error("entry {index}: {why}")]
    BadEntry { index: usize, why: String },
}

const MAGIC: &[u8; 8] = b"TPXFAKE\0";
const FILE_VERSION: u16 = 1;
const SUM_LEN: usize = 32;

/// Appends the checksum a pool file ends with.
pub fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let sum = Sha256::digest(&body);
    body.extend_from_slice(&sum);
    body
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PoolFileError> {
        let end = self.at.saturating_add(n);
        let got = self.buf.get(self.at..end).ok_or(PoolFileError::Truncated {
            needed: end,
            got: self.buf.len(),
        })?;
        self.at = end;
        Ok(got)
    }

    fn u8(&mut self) -> Result<u8, PoolFileError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PoolFileError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PoolFileError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn ranges_text(ranges: &[Cidr]) -> String {
    if ranges.is_empty() {
        return "none".into();
    }
    ranges
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FakePool {
    /// An empty pool for `cfg` (nothing excluded until
    /// [`set_exclusions`](Self::set_exclusions)).
    pub fn new(cfg: &FakeIp) -> FakePool {
        let v4 = cfg
            .ranges
            .iter()
            .find(|c| c.is_ipv4())
            .map(|c| Range::new(*c));
        let v6 = cfg
            .ranges
            .iter()
            .find(|c| !c.is_ipv4())
            .map(|c| Range::new(*c));
        let capacity = [v4, v6]
            .iter()
            .flatten()
            .map(|r| r.usable)
            .fold(MAX_ENTRIES as u128, u128::min) as usize;
        FakePool {
            v4,
            v6,
            capacity,
            ttl: cfg.ttl,
            store: cfg.store.clone(),
            inner: Mutex::new(Inner::new()),
            exclusions: ArcSwap::from_pointee(Exclusions::default()),
            resolver: OnceLock::new(),
            changed: AtomicBool::new(false),
            touched: AtomicBool::new(false),
            stats: FakeStats::default(),
        }
    }

    /// The names given real addresses from now on (at start and on reload).
    pub fn set_exclusions(&self, exclusions: Arc<Exclusions>) {
        self.exclusions.store(exclusions);
    }

    /// The DNS engine's name → real addresses hook; once.
    pub fn set_resolver(&self, resolver: Arc<dyn ResolveReal>) {
        let _ = self.resolver.set(resolver);
    }

    /// How many names the pool holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        lock(&self.inner).slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the pool is kept, if anywhere.
    pub fn store(&self) -> Option<&Path> {
        self.store.as_deref()
    }

    fn ranges(&self) -> Vec<Cidr> {
        [self.v4, self.v6]
            .iter()
            .flatten()
            .map(|r| r.cidr)
            .collect()
    }

    /// Whether `ip` is in a fake range (handed out or not).
    pub fn is_fake(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        [self.v4, self.v6].iter().flatten().any(|r| r.contains(ip))
    }

    /// The name `ip` was given to; None when it is no fake address or has
    /// no name now. Counts as a use (the name is recycled last).
    pub fn name_of(&self, ip: IpAddr) -> Option<Arc<str>> {
        let ip = ip.to_canonical();
        let range = [self.v4, self.v6]
            .into_iter()
            .flatten()
            .find(|r| r.contains(ip))?;
        let slot = range.slot_of(ip)?;
        let mut inner = lock(&self.inner);
        let name = Arc::clone(&inner.slots.get(slot as usize)?.name);
        inner.touch(slot);
        self.touched.store(true, Ordering::Relaxed);
        Some(name)
    }

    /// The fake addresses of `name` (v4, v6), allocating them; for tests
    /// and [`answer`](Self::answer).
    pub fn addresses_of(&self, name: &str) -> (Option<IpAddr>, Option<IpAddr>) {
        let (slot, recycled) = lock(&self.inner).slot_for(name, self.capacity);
        if recycled {
            self.stats.recycled.fetch_add(1, Ordering::Relaxed);
        }
        self.changed.store(true, Ordering::Relaxed);
        self.touched.store(true, Ordering::Relaxed);
        (
            self.v4.map(|r| r.addr_of(slot)),
            self.v6.map(|r| r.addr_of(slot)),
        )
    }

    /// The answer to `query` when the pool answers it: A (and AAAA with a
    /// v6 range) get a fake address with the configured TTL; the other
    /// family, without a range, NOERROR with no records (never NXDOMAIN,
    /// which would deny the name's A as well). None: excluded names, other
    /// types, names that are no host names, anything that is not a plain
    /// query: the real resolver answers those.
    pub fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let header = Header::parse(query).ok()?;
        if header.is_response() || header.opcode() != 0 || header.qdcount != 1 {
            return None;
        }
        let q = message::question(query).ok()?;
        if q.qclass != CLASS_IN || (q.qtype != TYPE_A && q.qtype != TYPE_AAAA) {
            return None;
        }
        let name = q.host()?;
        if self.exclusions.load().excludes(&name) {
            return None;
        }
        let range = if q.qtype == TYPE_A { self.v4 } else { self.v6 };
        let Some(range) = range else {
            return message::empty_answer(query).ok();
        };
        let existed = lock(&self.inner).by_name.contains_key(name.as_str());
        let (v4, v6) = self.addresses_of(&name);
        if !existed {
            self.stats.allocated.fetch_add(1, Ordering::Relaxed);
        }
        let ip = if range.v4() { v4 } else { v6 }?;
        self.stats.answered.fetch_add(1, Ordering::Relaxed);
        fake_answer(query, ip, self.ttl)
    }

    /// The pool file's bytes (see [`load_bytes`](Self::load_bytes)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let entries = lock(&self.inner).entries();
        let mut out = Vec::with_capacity(64 + entries.len() * 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FILE_VERSION.to_be_bytes());
        let ranges = self.ranges();
        out.push(ranges.len() as u8);
        for c in &ranges {
            match c.addr {
                IpAddr::V4(a) => {
                    out.push(4);
                    out.extend_from_slice(&a.to_ipv6_mapped().octets());
                }
                IpAddr::V6(a) => {
                    out.push(6);
                    out.extend_from_slice(&a.octets());
                }
            }
            out.push(c.prefix);
        }
        out.extend_from_slice(&(self.capacity as u32).to_be_bytes());
        out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for (slot, name) in &entries {
            out.extend_from_slice(&slot.to_be_bytes());
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
        }
        seal(out)
    }

    /// The largest file a pool of this capacity writes.
    fn max_file_len(&self) -> usize {
        8 + 2 + 1 + 2 * 18 + 8 + self.capacity * (4 + 1 + MAX_HOST_LEN) + SUM_LEN
    }

    /// Replaces the mapping with the one in `bytes`, if every check
    /// passes (see the module's notes); else leaves the pool as it was.
    /// Returns how many names were restored.
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<usize, PoolFileError> {
        let max = self.max_file_len();
        if bytes.len() > max {
            return Err(PoolFileError::TooLarge { max });
        }
        let body_len = bytes
            .len()
            .checked_sub(SUM_LEN)
            .ok_or(PoolFileError::Truncated {
                needed: SUM_LEN,
                got: bytes.len(),
            })?;
        let (body, sum) = bytes.split_at(body_len);
        let mut r = Reader { buf: body, at: 0 };
        if r.take(MAGIC.len()).map_err(|_| PoolFileError::BadMagic)? != MAGIC {
            return Err(PoolFileError::BadMagic);
        }
        let version = r.u16()?;
        if version != FILE_VERSION {
            return Err(PoolFileError::Version(version));
        }
        if Sha256::digest(body).as_slice() != sum {
            return Err(PoolFileError::Checksum);
        }
        let n = r.u8()?;
        let mut ranges = Vec::new();
        for _ in 0..n.min(2) {
            let family = r.u8()?;
            let mut a = [0u8; 16];
            a.copy_from_slice(r.take(16)?);
            let prefix = r.u8()?;
            let v6 = Ipv6Addr::from(a);
            let addr = match (family, v6.to_ipv4_mapped()) {
                (4, Some(v4)) => IpAddr::V4(v4),
                (6, _) => IpAddr::V6(v6),
                _ => {
                    return Err(PoolFileError::BadEntry {
                        index: 0,
                        why: format!("range of family {family}"),
                    })
                }
            };
            ranges.push(Cidr { addr, prefix });
        }
        let capacity = r.u32()? as usize;
        let now = self.ranges();
        if n > 2 || ranges != now || capacity != self.capacity {
            return Err(PoolFileError::Foreign {
                file: format!("{} ({capacity} names)", ranges_text(&ranges)),
                now: format!("{} ({} names)", ranges_text(&now), self.capacity),
            });
        }
        let count = r.u32()? as usize;
        if count > self.capacity {
            return Err(PoolFileError::BadEntry {
                index: 0,
                why: format!(
                    "{count} names, more than the pool holds ({})",
                    self.capacity
                ),
            });
        }
        let mut entries: Vec<(u32, Arc<str>)> = Vec::with_capacity(count);
        let mut names: HashMap<Arc<str>, u32> = HashMap::with_capacity(count);
        let mut taken = vec![false; self.capacity];
        for index in 0..count {
            let bad = |why: String| PoolFileError::BadEntry { index, why };
            let slot = r.u32()?;
            let len = r.u8()? as usize;
            let raw = r.take(len)?;
            let name = match host_name(raw) {
                Some(n) if n.as_bytes() == raw => n,
                _ => return Err(bad("not a lowercased host name".into())),
            };
            match taken.get_mut(slot as usize) {
                None => return Err(bad(format!("slot {slot} outside the ranges"))),
                Some(true) => return Err(bad(format!("slot {slot} given twice"))),
                Some(t) => *t = true,
            }
            let name: Arc<str> = Arc::from(name);
            if names.insert(Arc::clone(&name), slot).is_some() {
                return Err(bad(format!("{name} given twice")));
            }
            entries.push((slot, name));
        }
        if r.at != body.len() {
            return Err(PoolFileError::BadEntry {
                index: count,
                why: format!("{} bytes after the last entry", body.len() - r.at),
            });
        }
        // Slots are dense when the pool writes them (allocated in order,
        // recycled in place): a gap means the file was not written by a
        // pool of this capacity.
        if let Some(gap) = taken.iter().take(count).position(|t| !t) {
            return Err(PoolFileError::BadEntry {
                index: count,
                why: format!("slot {gap} missing while {count} are in use"),
            });
        }
        let mut inner = Inner::new();
        inner.slots = (0..count)
            .map(|_| Slot {
                name: Arc::from(""),
            })
            .collect();
        for (slot, name) in entries {
            if let Some(s) = inner.slots.get_mut(slot as usize) {
                s.name = Arc::clone(&name);
            }
            inner.by_name.insert(name, slot);
            inner.push_front(slot);
        }
        *lock(&self.inner) = inner;
        Ok(count)
    }

    /// Reads `path` (see [`load_bytes`](Self::load_bytes)).
    pub fn load(&self, path: &Path) -> Result<usize, PoolFileError> {
        let file = fs::File::open(path)?;
        let mut bytes = Vec::new();
        let max = self.max_file_len();
        file.take(max as u64 + 1).read_to_end(&mut bytes)?;
        self.load_bytes(&bytes)
    }

    /// At start: restores the pool from its store, saying what happened.
    /// A missing file is normal (first start, or after a reboot when the
    /// store is on tmpfs); anything wrong with it is a warning, and the
    /// pool starts empty.
    pub fn restore(&self) {
        let Some(path) = self.store.as_deref() else {
            return;
        };
        match self.load(path) {
            Ok(n) => info!(file = %path.display(), names = n, "fake-ip pool restored"),
            Err(PoolFileError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                info!(file = %path.display(), "no fake-ip pool saved yet; starting empty")
            }
            Err(e) => warn!(
                file = %path.display(),
                "fake-ip pool file ignored: {e}; starting with an empty pool (clients holding old fake addresses are refused until they ask DNS again)"
            ),
        }
    }

    /// Writes the pool to `path` atomically: a temp file beside it,
    /// fsync, rename, fsync of the directory. Returns the names written.
    pub fn save_to(&self, path: &Path) -> io::Result<usize> {
        self.changed.store(false, Ordering::Relaxed);
        self.touched.store(false, Ordering::Relaxed);
        let bytes = self.to_bytes();
        let count = self.len();
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            fs::create_dir_all(dir)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            self.changed.store(true, Ordering::Relaxed);
            return Err(e);
        }
        if let Some(dir) = dir {
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(count)
    }

    /// Saves to the store when a name was allocated since the last save;
    /// with `at_stop`, whenever the pool holds names (one write per stop:
    /// it keeps the use order, and puts back a store removed meanwhile).
    /// Logs a failure.
    pub fn save_if_changed(&self, at_stop: bool) {
        let Some(path) = self.store.as_deref() else {
            return;
        };
        let due = self.changed.load(Ordering::Relaxed)
            || (at_stop && (self.touched.load(Ordering::Relaxed) || !self.is_empty()));
        if !due {
            return;
        }
        match self.save_to(path) {
            Ok(n) if at_stop => info!(file = %path.display(), names = n, "fake-ip pool saved"),
            Ok(_) => {}
            Err(e) => {
                warn!(file = %path.display(), "cannot save the fake-ip pool: {e}; clients holding fake addresses will be refused after a restart")
            }
        }
    }

    /// The real addresses of `name` through the DNS engine's hook, fake
    /// ones left out (a resolver that answered from this pool).
    pub async fn real_addresses(&self, name: &str) -> Vec<IpAddr> {
        let Some(resolver) = self.resolver.get() else {
            return Vec::new();
        };
        let mut addrs = resolver.resolve_real(name).await;
        addrs.retain(|ip| !self.is_fake(*ip));
        addrs
    }
}

impl ResolveReal for FakePool {
    fn resolve_real<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Vec<IpAddr>> {
        Box::pin(self.real_addresses(name))
    }
}

/// `query`'s reply with one record: `ip` for the question's name.
fn fake_answer(query: &[u8], ip: IpAddr, ttl: u32) -> Option<Vec<u8>> {
    let mut out = message::reply_without_records(query, RCODE_NOERROR).ok()?;
    out.get_mut(6..8)?.copy_from_slice(&1u16.to_be_bytes());
    // The owner: a pointer to the question's name, right after the header.
    out.extend_from_slice(&[0xc0, message::HEADER_LEN as u8]);
    let (rtype, data) = match ip {
        IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
        IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
    };
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(&data);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::message::build::query;
    use crate::dns::message::{answers, RecordData};
    use crate::policy::rule_set::testdir::TempDir;

    const TYPE_TXT: u16 = 16;
    const TYPE_HTTPS: u16 = 65;

    fn cfg(ranges: &[&str]) -> FakeIp {
        FakeIp {
            ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
            exclude_domain: vec!["exact.example".into()],
            exclude_domain_suffix: vec!["corp.example".into()],
            exclude_rule_set: Vec::new(),
            default_exclude: true,
            ttl: 1,
            store: None,
            save_interval: 300,
        }
    }

    fn no_route() -> crate::config::RouteConfig {
        crate::config::RouteConfig {
            final_outbound: String::new(),
            rules: Vec::new(),
            rule_sets: Vec::new(),
        }
    }

    fn pool(ranges: &[&str]) -> FakePool {
        let c = cfg(ranges);
        let p = FakePool::new(&c);
        let route = no_route();
        p.set_exclusions(Arc::new(Exclusions::build(&c, &route, &[]).unwrap()));
        p
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The address and TTL `pool` answers for `name`'s `qtype` question.
    fn ask(pool: &FakePool, name: &str, qtype: u16) -> Option<(Option<IpAddr>, u32)> {
        let q = query(0x4242, name, qtype);
        let a = pool.answer(&q)?;
        let h = Header::parse(&a).unwrap();
        assert_eq!((h.id, h.rcode(), h.is_response()), (0x4242, 0, true));
        let records = answers(&a).unwrap();
        Some(match records.first() {
            None => (None, 0),
            Some(r) => match r.data {
                RecordData::Addr(ip) => (Some(ip), r.ttl),
                _ => panic!("not an address"),
            },
        })
    }

    fn addr(pool: &FakePool, name: &str) -> IpAddr {
        ask(pool, name, TYPE_A).unwrap().0.unwrap()
    }

    #[test]
    fn one_address_per_name_and_back() {
        let p = pool(&["198.18.0.0/15", "fc00::/18"]);
        assert_eq!(p.capacity(), MAX_ENTRIES);
        let a = addr(&p, "www.example.com");
        assert_eq!(a, ip("198.18.0.1"), "the network address is never given");
        assert_eq!(ask(&p, "WWW.Example.COM", TYPE_A).unwrap(), (Some(a), 1));
        let b = addr(&p, "other.example.com");
        assert_ne!(a, b);
        let (v6, ttl) = ask(&p, "www.example.com", TYPE_AAAA).unwrap();
        assert_eq!((v6, ttl), (Some(ip("fc00::1")), 1));
        assert_eq!(p.name_of(a).as_deref(), Some("www.example.com"));
        assert_eq!(p.name_of(ip("fc00::1")).as_deref(), Some("www.example.com"));
        assert_eq!(
            p.name_of(ip("::ffff:198.18.0.1")).as_deref(),
            Some("www.example.com")
        );
        assert!(p.is_fake(ip("198.19.255.255")) && p.is_fake(ip("198.18.0.0")));
        assert!(!p.is_fake(ip("198.20.0.1")) && !p.is_fake(ip("192.0.2.1")));
        assert_eq!(p.name_of(ip("198.18.0.0")), None);
        assert_eq!(p.name_of(ip("198.18.200.1")), None);
        assert_eq!(p.name_of(ip("192.0.2.1")), None);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn other_questions_go_to_the_real_resolver() {
        let p = pool(&["198.18.0.0/15"]);
        // No v6 range: AAAA is NOERROR without records, never a v4 address.
        assert_eq!(ask(&p, "www.example.com", TYPE_AAAA), Some((None, 0)));
        assert_eq!(ask(&p, "www.example.com", TYPE_TXT), None);
        assert_eq!(ask(&p, "www.example.com", TYPE_HTTPS), None);
        // Not a host name, not a query: not answered here.
        assert_eq!(ask(&p, "_dmarc.example.com", TYPE_A), None);
        let mut response = query(1, "www.example.com", TYPE_A);
        response[2] |= 0x80;
        assert_eq!(p.answer(&response), None);
        assert_eq!(p.answer(b"\x00\x01"), None);
        // The AAAA asked before an A allocated nothing.
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn excluded_names_get_real_addresses() {
        let p = pool(&["198.18.0.0/15", "fc00::/18"]);
        for name in [
            "pool.ntp.org",
            "0.openwrt.pool.ntp.org",
            "time.windows.com",
            "printer.lan",
            "nas.local",
            "router.home.arpa",
            "localhost",
            "stun.l.google.com",
            "stun3.example.net",
            "captive.apple.com",
            "www.msftconnecttest.com",
            "connectivitycheck.gstatic.com",
            "title.mgt.xboxlive.com",
            "ctest.cdn.nintendo.net",
            "exact.example",
            "x.corp.example",
        ] {
            assert_eq!(ask(&p, name, TYPE_A), None, "{name}");
            assert_eq!(ask(&p, name, TYPE_AAAA), None, "{name}");
        }
        assert!(p.is_empty());
        // Near misses are fake.
        for name in ["sub.exact.example", "stunning.example", "lan.example.com"] {
            assert!(ask(&p, name, TYPE_A).is_some(), "{name}");
        }
        // Without the built-in list, only the configured names.
        let mut c = cfg(&["198.18.0.0/15"]);
        c.default_exclude = false;
        let q = FakePool::new(&c);
        q.set_exclusions(Arc::new(Exclusions::build(&c, &no_route(), &[]).unwrap()));
        assert!(ask(&q, "pool.ntp.org", TYPE_A).is_some());
        assert_eq!(ask(&q, "x.corp.example", TYPE_A), None);
        // Nothing to exclude at all: nothing is.
        c.exclude_domain.clear();
        c.exclude_domain_suffix.clear();
        let none = Exclusions::build(&c, &no_route(), &[]).unwrap();
        assert!(!none.excludes("x.corp.example"));
    }

    #[test]
    fn a_full_pool_recycles_the_least_recently_used() {
        // A /24: 254 addresses (not .0, not .255); the /120 has 255.
        let p = pool(&["192.0.2.0/24", "2001:db8::/120"]);
        assert_eq!(p.capacity(), 254);
        let names: Vec<String> = (0..254).map(|i| format!("n{i}.example")).collect();
        let mut seen = std::collections::HashSet::new();
        for n in &names {
            let a = addr(&p, n);
            assert!(a != ip("192.0.2.0") && a != ip("192.0.2.255"), "{a}");
            assert!(seen.insert(a), "{a} given twice");
        }
        // n0 used again (a connection): n1 is now the oldest.
        let a0 = addr(&p, "n0.example");
        assert!(p.name_of(a0).is_some());
        let a1 = addr(&p, "n1.example");
        let a2 = ip("192.0.2.3");
        // n1 used by DNS just now; n2 is the oldest.
        let fresh = addr(&p, "fresh.example");
        assert_eq!(fresh, a2);
        assert_eq!(p.name_of(a2).as_deref(), Some("fresh.example"));
        assert_eq!(p.name_of(a1).as_deref(), Some("n1.example"));
        assert_eq!(p.len(), 254);
        assert_eq!(p.stats.recycled.load(Ordering::Relaxed), 1);
        // n2 asks again: a new address (n3's, the oldest now).
        assert_eq!(addr(&p, "n2.example"), ip("192.0.2.4"));
        assert_eq!(
            ask(&p, "n2.example", TYPE_AAAA).unwrap().0,
            Some(ip("2001:db8::4"))
        );
    }

    #[test]
    fn the_pool_file_round_trips() {
        let dir = TempDir::new();
        let path = dir.0.join("sub").join("fake-ip.pool");
        let p = pool(&["192.0.2.0/24"]);
        for i in 0..254 {
            addr(&p, &format!("n{i}.example"));
        }
        let a0 = addr(&p, "n0.example");
        assert_eq!(p.save_to(&path).unwrap(), 254);
        assert!(!dir.0.join("sub").join("fake-ip.pool.tmp").exists());
        let q = pool(&["192.0.2.0/24"]);
        assert_eq!(q.load(&path).unwrap(), 254);
        assert_eq!(
            q.to_bytes(),
            p.to_bytes(),
            "the same mapping, the same order"
        );
        assert_eq!(q.name_of(a0).as_deref(), Some("n0.example"));
        assert_eq!(addr(&q, "n7.example"), addr(&p, "n7.example"));
        // The use order came along: n1 is the oldest, recycled first.
        assert_eq!(addr(&q, "fresh.example"), ip("192.0.2.2"));
    }

    #[test]
    fn a_missing_store_starts_empty_and_saves_only_when_changed() {
        let dir = TempDir::new();
        let mut c = cfg(&["198.18.0.0/15"]);
        c.store = Some(dir.0.join("pool"));
        let p = FakePool::new(&c);
        p.restore();
        assert!(p.is_empty());
        p.save_if_changed(false);
        assert!(!dir.0.join("pool").exists(), "nothing to save");
        addr(&p, "a.example");
        p.save_if_changed(false);
        let q = FakePool::new(&c);
        q.restore();
        assert_eq!(q.name_of(ip("198.18.0.1")).as_deref(), Some("a.example"));
    }

    fn expect_err(p: &FakePool, bytes: &[u8], what: &str) -> PoolFileError {
        let before = p.to_bytes();
        let e = p.load_bytes(bytes).expect_err(what);
        assert_eq!(p.to_bytes(), before, "{what}: the pool changed");
        e
    }

    /// A file body as the pool writes it, with `entries` (sealed).
    fn forged(p: &FakePool, entries: &[(u32, &[u8])]) -> Vec<u8> {
        let good = p.to_bytes();
        let header_len = 8 + 2 + 1 + 18 + 4;
        let mut body = good[..header_len].to_vec();
        body.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for (slot, name) in entries {
            body.extend_from_slice(&slot.to_be_bytes());
            body.push(name.len() as u8);
            body.extend_from_slice(name);
        }
        seal(body)
    }

    #[test]
    fn corrupt_foreign_and_forged_files_are_ignored() {
        let p = pool(&["198.18.0.0/15"]);
        addr(&p, "a.example");
        addr(&p, "b.example");
        let good = p.to_bytes();
        let q = pool(&["198.18.0.0/15"]);
        addr(&q, "kept.example");

        let mut flipped = good.clone();
        flipped[good.len() - 40] ^= 1;
        assert!(matches!(
            expect_err(&q, &flipped, "flip"),
            PoolFileError::Checksum
        ));
        for cut in [0, 5, 20, good.len() - 1] {
            expect_err(&q, &good[..cut], "truncated");
        }
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(
            expect_err(&q, &magic, "magic"),
            PoolFileError::BadMagic
        ));
        let mut version = good.clone();
        version[9] = 9;
        assert!(matches!(
            expect_err(&q, &version, "version"),
            PoolFileError::Version(9)
        ));
        let huge = vec![0u8; q.max_file_len() + 1];
        assert!(matches!(
            expect_err(&q, &huge, "huge"),
            PoolFileError::TooLarge { .. }
        ));
        // Another range: its addresses mean nothing here.
        let other = pool(&["198.18.0.0/16"]);
        let e = expect_err(&other, &good, "foreign");
        assert!(e.to_string().contains("198.18.0.0/15"), "{e}");
        let v6 = pool(&["198.18.0.0/15", "fc00::/18"]);
        assert!(matches!(
            expect_err(&v6, &good, "v6 added"),
            PoolFileError::Foreign { .. }
        ));

        // Sealed, but wrong inside: every entry is checked.
        for (entries, what) in [
            (
                vec![(0u32, &b"a.example"[..]), (0, b"b.example")],
                "slot twice",
            ),
            (
                vec![(0, &b"a.example"[..]), (1, b"a.example")],
                "name twice",
            ),
            (vec![(0, &b"A.example"[..])], "uppercase"),
            (vec![(0, &b"a b.example"[..])], "not a host name"),
            (vec![(0, &b""[..])], "empty name"),
            (vec![(1, &b"a.example"[..])], "gap"),
            (vec![(40_000, &b"a.example"[..])], "slot out of range"),
        ] {
            let bytes = forged(&q, &entries);
            assert!(
                matches!(expect_err(&q, &bytes, what), PoolFileError::BadEntry { .. }),
                "{what}"
            );
        }
        let mut trailing = forged(&q, &[(0, b"a.example")]);
        trailing.truncate(trailing.len() - SUM_LEN);
        trailing.push(0);
        expect_err(&q, &seal(trailing), "trailing bytes");
        // And the good file loads.
        assert_eq!(q.load_bytes(&good).unwrap(), 2);
        assert_eq!(q.name_of(ip("198.18.0.2")).as_deref(), Some("b.example"));
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn overlaps(a: &Cidr, b: &Cidr) -> bool {
        a.contains(b) || b.contains(a)
    }

    #[test]
    fn bypass_prefixes_are_carved_around_the_fake_ranges() {
        let fake = cidrs(&["198.18.0.0/15", "fc00::/18"]);
        let carved = crate::cidr::carve_fake_ranges(
            &cidrs(&["10.0.0.0/8", "198.18.0.0/16", "198.0.0.0/8", "fc00::/7"]),
            &fake,
        );
        for c in &carved {
            assert!(
                !fake.iter().any(|f| overlaps(c, f)),
                "{c} covers a fake range"
            );
        }
        // Untouched prefixes stay as they were; the rest is still covered.
        assert_eq!(carved[0], "10.0.0.0/8".parse().unwrap());
        for kept in [
            "198.17.255.255/32",
            "198.20.0.0/14",
            "198.0.0.0/12",
            "fd00::/8",
            "fc00:4000::/18",
        ] {
            let k: Cidr = kept.parse().unwrap();
            assert!(carved.iter().any(|c| c.contains(&k)), "{kept} lost");
        }
    }

    /// The default bypass (fc00::/7) and a bypass written over the fake
    /// range are carved in the validated config, and prefix rule sets in
    /// the firewall plan.
    #[test]
    fn the_kernel_bypass_never_covers_the_fake_ranges() {
        let dir = TempDir::new();
        let set = dir.write("private.txt", b"10.0.0.0/8\n198.16.0.0/13\n");
        let text = format!(
            "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
             [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
             [route]\nfinal = \"proxy\"\n\
             [[route.rule_sets]]\nname = \"private\"\nformat = \"cidr\"\npath = \"{}\"\n\
             [[route.rules]]\nrule_set = [\"private\"]\noutbound = \"direct\"\n\
             [dns]\n[[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\noutbound = \"direct\"\n\
             [dns.fake_ip]\nstore = \"\"\n\
             [firewall]\nbackend = \"nftables\"\nlan_interfaces = [\"br-lan\"]\n\
             bypass = [\"198.18.0.0/16\", \"198.0.0.0/8\"]\nbypass_rule_sets = [\"private\"]\n",
            set.display()
        );
        let cfg = crate::config::RawConfig::from_toml(&text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let fake = cfg.dns.fake_ip.as_ref().unwrap().ranges.clone();
        assert_eq!(fake, cidrs(&["198.18.0.0/15", "fc00::/18"]));
        for c in &cfg.firewall.bypass {
            assert!(
                !fake.iter().any(|f| overlaps(c, f)),
                "bypass {c} covers a fake range"
            );
        }
        let ula: Cidr = "fd00::/8".parse().unwrap();
        assert!(cfg.firewall.bypass.iter().any(|c| c.contains(&ula)));
        let plan = crate::firewall::Plan::from_config(&cfg)
            .load_bypass_sets(&cfg)
            .unwrap();
        let set = &plan.bypass_sets[0];
        assert!(set.v4.contains(&"10.0.0.0/8".to_string()), "{:?}", set.v4);
        for p in &set.v4 {
            let c: Cidr = p.parse().unwrap();
            assert!(
                !fake.iter().any(|f| overlaps(&c, f)),
                "set {c} covers a fake range"
            );
        }
    }

    /// The fuzz target's property over its seed corpus: a file is taken
    /// whole (and writes back as it was) or refused with the pool left
    /// as it was.
    #[test]
    fn the_fuzz_seeds_hold_the_fuzz_property() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/fakeip_pool_file");
        let mut loaded = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            let data = fs::read(entry.unwrap().path()).unwrap();
            let Some((&pick, rest)) = data.split_first() else {
                continue;
            };
            let ranges: &[&str] = if pick & 2 == 0 {
                &["198.18.0.0/15", "fc00::/18"]
            } else {
                &["192.0.2.0/24"]
            };
            let p = FakePool::new(&cfg(ranges));
            let bytes = if pick & 1 == 1 {
                seal(rest.to_vec())
            } else {
                rest.to_vec()
            };
            let empty = p.to_bytes();
            match p.load_bytes(&bytes) {
                Ok(n) => {
                    loaded += 1;
                    assert_eq!(n, p.len());
                    assert_eq!(p.to_bytes(), bytes);
                }
                Err(_) => assert_eq!(p.to_bytes(), empty),
            }
        }
        assert!(loaded >= 3, "the seeds that load: {loaded}");
    }
}
