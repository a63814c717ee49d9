//! Descriptor accounting: how many of the process's descriptors (bounded
//! by the soft RLIMIT_NOFILE) TCP flows and relay pipes hold, so that a
//! connection is accepted only when its upstream side is sure to get a
//! descriptor too.
//!
//! Without it, a flood under a low limit was accepted until `accept`
//! itself failed, and every accepted flow whose upstream `socket()` then
//! failed with EMFILE was reset: 334 of 600 under a 256 limit. With it,
//! the accept loop pauses while [`Budget::room_for`] says no, and connections wait
//! in the listen backlog (the client's SYN is retried once it is full)
//! until flows end.
//!
//! The numbers are kept in atomics rather than measured: counting
//! `/proc/self/fd` per connection would cost a directory walk per flow.
//! What is counted:
//! - a baseline: descriptors open when serving starts (stdio, listeners,
//!   the runtime's epoll and wakers);
//! - two per TCP flow from accept on: the client socket and the upstream
//!   socket it will open (reserved before it exists);
//! - two per relay pipe, pooled or in use.
//!
//! A reserve on top covers what is not counted: UDP sessions and reply
//! sockets (bounded by their own limits), the loop guard's probe socket,
//! the SOCKS5 probe. The accounting is process-wide because the limit is.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Descriptors a TCP flow holds: the client's socket and the upstream's.
pub const PER_FLOW: usize = 2;
/// Descriptors a pipe holds: its two ends.
pub const PER_PIPE: usize = 2;

/// The reserve for a given limit: a sixteenth of it, at least 16 and at
/// most 256. Under a 256 limit that leaves about 110 flows; under 1024
/// about 470; past 4096 the reserve stays at 256, more than the uncounted
/// transient sockets ever take at once.
pub fn reserve_for(limit: usize) -> usize {
    (limit / 16).clamp(16, 256)
}

/// The process's one budget.
static GLOBAL: Budget = Budget::new();

pub fn global() -> &'static Budget {
    &GLOBAL
}

/// Descriptors against the open-files limit.
#[derive(Debug)]
pub struct Budget {
    /// Soft RLIMIT_NOFILE; 0 means "not set up": no accounting, everything
    /// has room (unit tests, and a process that could not read its limit).
    limit: AtomicUsize,
    baseline: AtomicUsize,
    reserve: AtomicUsize,
    /// Descriptors held (or reserved) by TCP flows and pipes.
    held: AtomicUsize,
}

impl Budget {
    pub const fn new() -> Budget {
        Budget {
            limit: AtomicUsize::new(0),
            baseline: AtomicUsize::new(0),
            reserve: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
        }
    }

    /// Turns accounting on: `limit` is the soft RLIMIT_NOFILE, `baseline`
    /// the descriptors open now that no flow holds.
    pub fn init(&self, limit: usize, baseline: usize) {
        // Under a tiny limit the reserve must not take all that is left,
        // or no flow would ever be accepted: at most a quarter of it.
        let reserve = reserve_for(limit).min(limit.saturating_sub(baseline) / 4);
        self.baseline.store(baseline, Ordering::Relaxed);
        self.reserve.store(reserve, Ordering::Relaxed);
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The soft limit accounting works with (0: accounting off).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn reserve(&self) -> usize {
        self.reserve.load(Ordering::Relaxed)
    }

    /// Descriptors in use by tproxyd's count: baseline plus what flows
    /// and pipes hold.
    pub fn in_use(&self) -> usize {
        self.baseline.load(Ordering::Relaxed) + self.held.load(Ordering::Relaxed)
    }

    /// Whether `n` more descriptors fit and still leave the reserve free.
    pub fn room_for(&self, n: usize) -> bool {
        let limit = self.limit();
        limit == 0 || self.in_use() + n + self.reserve() <= limit
    }

    /// About how many flows fit at once besides the baseline, for the
    /// start-up message; `None` when accounting is off.
    pub fn flow_capacity(&self) -> Option<usize> {
        let limit = self.limit();
        (limit != 0).then(|| {
            limit.saturating_sub(self.baseline.load(Ordering::Relaxed) + self.reserve()) / PER_FLOW
        })
    }

    /// Counts `n` descriptors as held until the guard is dropped, so no
    /// path can leak them from the count.
    pub fn hold(&'static self, n: usize) -> Held {
        self.held.fetch_add(n, Ordering::Relaxed);
        Held { budget: self, n }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new()
    }
}

/// Descriptors counted as held by one flow or pipe; released on drop.
#[derive(Debug)]
pub struct Held {
    budget: &'static Budget,
    n: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_a_sixteenth_within_bounds() {
        assert_eq!(reserve_for(64), 16);
        assert_eq!(reserve_for(256), 16);
        assert_eq!(reserve_for(1024), 64);
        assert_eq!(reserve_for(1 << 20), 256);
    }

    #[test]
    fn held_counts_until_dropped_and_room_keeps_the_reserve() {
        // Its own budget: the global one is shared with the relay's tests.
        let budget: &'static Budget = Box::leak(Box::new(Budget::new()));
        assert!(budget.room_for(1_000_000), "accounting off until init");
        budget.init(100, 20);
        let h = budget.hold(PER_FLOW);
        assert_eq!(budget.in_use(), 22);
        drop(h);
        assert_eq!(budget.in_use(), 20);
        // 100 - 20 baseline - 16 reserve = 64 free: 32 flows.
        assert_eq!(budget.flow_capacity(), Some(32));
        let flows: Vec<Held> = (0..32).map(|_| budget.hold(PER_FLOW)).collect();
        assert!(!budget.room_for(PER_FLOW), "the 33rd would eat the reserve");
        drop(flows);
        assert!(budget.room_for(PER_FLOW));
    }

    #[test]
    fn a_tiny_limit_still_leaves_room_for_flows() {
        let budget: &'static Budget = Box::leak(Box::new(Budget::new()));
        // 32 descriptors, 15 taken at start: a reserve of 16 would leave
        // none for a flow.
        budget.init(32, 15);
        assert_eq!(budget.reserve(), 4);
        assert_eq!(budget.flow_capacity(), Some(6));
    }
}
