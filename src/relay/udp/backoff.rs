//! Back-off for an outbound that cannot open UDP sessions.
//!
//! While a SOCKS5 server is down, every datagram from a new client port
//! would start a session, and every session would dial the server: a
//! flood of connection attempts and of warnings for one outage. After a
//! failure, new sessions fail fast instead for an interval that doubles
//! with each failed retry (1 s up to 30 s). When the interval is over, one
//! session at a time may try again (the others keep failing fast); the
//! first success ends the back-off.
//!
//! The relay keeps one back-off per outbound: a SOCKS5 server that is down
//! must not make direct sessions fail fast too. Only new sessions, and
//! sessions adding an upstream for another outbound, take the lock here:
//! an established upstream's datagrams never come this way.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lock;

/// The first back-off interval.
pub const FIRST: Duration = Duration::from_secs(1);
/// The longest: short enough that service resumes soon after the server
/// comes back, long enough that a dead server costs one dial per 30 s.
pub const LONGEST: Duration = Duration::from_secs(30);

/// Leave to open a session, from [`Backoff::admit`]. Hand it back through
/// [`Backoff::opened`], [`Backoff::failed`] or [`Backoff::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// No back-off in force: any number of sessions may open.
    Free,
    /// The back-off interval is over and this session is the one retry.
    Probe,
}

/// Why a session may not open now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Until the next retry (zero: a retry is under way).
    pub retry_in: Duration,
    /// What the last failure was.
    pub cause: String,
}

#[derive(Debug, Default)]
struct State {
    /// Failures since the last success (0: no back-off).
    failures: u32,
    /// New sessions fail fast until then.
    until: Option<Instant>,
    /// A retry is under way.
    probing: bool,
    cause: String,
}

#[derive(Debug, Default)]
pub struct Backoff {
    state: Mutex<State>,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff::default()
    }

    /// Whether a new session may open now.
    pub fn admit(&self, now: Instant) -> Result<Permit, Refusal> {
        let mut s = lock(&self.state);
        if s.failures == 0 {
            return Ok(Permit::Free);
        }
        let waiting = s.until.and_then(|until| until.checked_duration_since(now));
        match waiting {
            Some(left) if !left.is_zero() => Err(Refusal {
                retry_in: left,
                cause: s.cause.clone(),
            }),
            _ if s.probing => Err(Refusal {
                retry_in: Duration::ZERO,
                cause: s.cause.clone(),
            }),
            _ => {
                s.probing = true;
                Ok(Permit::Probe)
            }
        }
    }

    /// Whether the outbound failed since its last success: a session
    /// admitted freely just before should not dial after all.
    pub fn failing(&self) -> bool {
        lock(&self.state).failures != 0
    }

    /// The session opened: the outbound works, the back-off ends.
    pub fn opened(&self, _permit: Permit) {
        let mut s = lock(&self.state);
        if s.failures != 0 {
            *s = State::default();
        }
    }

    /// The session failed to open. Returns the interval new sessions now
    /// fail fast for.
    pub fn failed(&self, permit: Permit, now: Instant, cause: &str) -> Duration {
        let mut s = lock(&self.state);
        let in_force = s.until.is_some_and(|until| now < until);
        // Sessions that were already dialing when the first failure came
        // in fail too; they are the same outage, not a failed retry.
        if permit == Permit::Probe || !in_force {
            let exponent = s.failures.min(16);
            s.failures = s.failures.saturating_add(1);
            let interval = FIRST.saturating_mul(1 << exponent).min(LONGEST);
            s.until = now.checked_add(interval);
            s.cause = cause.to_string();
        }
        if permit == Permit::Probe {
            s.probing = false;
        }
        s.until
            .and_then(|until| until.checked_duration_since(now))
            .unwrap_or_default()
    }

    /// The session ended before its outcome was known (evicted while
    /// opening, or refused for a limit): another may retry.
    pub fn release(&self, permit: Permit) {
        if permit == Permit::Probe {
            lock(&self.state).probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_doubling_to_the_longest_and_resets_on_success() {
        let b = Backoff::new();
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Ok(Permit::Free));
        assert!(!b.failing());
        assert_eq!(b.failed(Permit::Free, t0, "refused"), FIRST);
        assert!(b.failing());
        // A session that was dialing at the same time fails too: the
        // interval does not grow for it.
        assert_eq!(
            b.failed(Permit::Free, t0, "refused"),
            FIRST,
            "a concurrent failure is the same outage"
        );
        let refusal = b.admit(t0 + Duration::from_millis(500)).unwrap_err();
        assert_eq!(refusal.retry_in, Duration::from_millis(500));
        assert_eq!(refusal.cause, "refused");

        // Each failed retry doubles the interval, up to the longest.
        let mut now = t0;
        let mut expected = FIRST;
        for _ in 0..8 {
            now += expected;
            assert_eq!(b.admit(now), Ok(Permit::Probe));
            // One retry at a time: the others still fail fast.
            assert_eq!(b.admit(now).unwrap_err().retry_in, Duration::ZERO);
            expected = (expected * 2).min(LONGEST);
            assert_eq!(b.failed(Permit::Probe, now, "refused"), expected);
        }
        assert_eq!(expected, LONGEST);

        // The first success ends it: sessions open freely again.
        now += LONGEST;
        let permit = b.admit(now).unwrap();
        assert_eq!(permit, Permit::Probe);
        b.opened(permit);
        assert!(!b.failing());
        assert_eq!(b.admit(now), Ok(Permit::Free));
        assert_eq!(b.admit(now), Ok(Permit::Free));
        // And a new outage starts again at the first interval.
        assert_eq!(b.failed(Permit::Free, now, "timeout"), FIRST);
    }

    #[test]
    fn a_released_retry_lets_another_try() {
        let b = Backoff::new();
        let t0 = Instant::now();
        b.failed(Permit::Free, t0, "refused");
        let later = t0 + FIRST;
        let permit = b.admit(later).unwrap();
        assert_eq!(permit, Permit::Probe);
        b.release(permit);
        assert_eq!(b.admit(later), Ok(Permit::Probe));
    }

    #[test]
    fn huge_times_do_not_overflow() {
        let b = Backoff::new();
        let t0 = Instant::now();
        for _ in 0..100 {
            b.failed(Permit::Probe, t0, "x");
        }
        assert_eq!(b.admit(t0).unwrap_err().retry_in, LONGEST);
    }
}
