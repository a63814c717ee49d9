//! One log line per interval for events that can repeat per packet.
//!
//! A flood of datagrams to the listener port, or a SOCKS5 server that is
//! down while every datagram asks for a new association, must not write a
//! warning per packet: the log would grow by megabytes and bury the one
//! line that matters. Each such warning gets a [`RateLimit`]; it lets one
//! line through per interval and counts the ones it held back, so the
//! next line can say how many there were.

use std::sync::atomic::Ordering;

use portable_atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The interval most warnings use.
pub const WARN_INTERVAL: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    // +1 so that 0 can mean "never logged".
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Lets one event through per interval; safe to share between threads.
#[derive(Debug)]
pub struct RateLimit {
    interval_ms: u64,
    /// When the last event was let through (ms since the origin; 0: never).
    last_ms: AtomicU64,
    held_back: AtomicU64,
}

/// What a rate-limited warning adds when its limit held some back: the
/// text after the line, from the `n` that [`RateLimit::check`] returned.
pub(crate) fn held_back(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more like it since the last such line)")
    }
}

impl RateLimit {
    pub const fn new(interval: Duration) -> Self {
        RateLimit {
            interval_ms: interval.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event should be logged, `n` being how many were
    /// held back since the last one logged; `None` (and counted) otherwise.
    pub fn check(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval_ms;
        // Of several threads due at once, the one that wins the swap logs.
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(WARN_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_through_per_interval_and_counts_the_rest() {
        let limit = RateLimit::new(Duration::from_millis(50));
        assert_eq!(limit.check(), Some(0));
        for _ in 0..9 {
            assert_eq!(limit.check(), None);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.check(), Some(9));
        assert_eq!(limit.check(), None);
    }

    #[test]
    fn one_of_many_threads_logs_a_burst() {
        let limit = std::sync::Arc::new(RateLimit::new(Duration::from_secs(60)));
        let logged: usize = (0..4)
            .map(|_| {
                let limit = std::sync::Arc::clone(&limit);
                std::thread::spawn(move || (0..1000).filter(|_| limit.check().is_some()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(logged, 1);
        assert_eq!(limit.held_back.load(Ordering::Relaxed), 3999);
    }
}
