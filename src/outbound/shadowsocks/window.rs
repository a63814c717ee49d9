//! The sliding-window replay filter for Shadowsocks 2022 UDP packet IDs
//! (SIP022 §3.2.4): the one WireGuard uses (RFC 6479's bitmap ring), at
//! the size shadowsocks-rust uses, (128 − 1) × 64 = 8128 IDs behind the
//! highest ID seen.
//!
//! It is split in two so that a forged datagram can never move it: the
//! receiver [`check`](ReplayWindow::check)s an ID before it opens the
//! body, and [`commit`](ReplayWindow::commit)s it only once the body
//! authenticated. Pure code: no clock, no socket.

/// Bits in one block of the ring.
const BLOCK_BITS: u64 = 64;
/// Blocks in the ring; one of them is always being refilled, so the
/// window is one block shorter than the ring.
const RING_BLOCKS: u64 = 128;
/// How far behind the highest ID seen an ID is still accepted.
pub const WINDOW: u64 = (RING_BLOCKS - 1) * BLOCK_BITS;

/// Why a packet ID was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// More than [`WINDOW`] behind the highest ID seen: it can no longer
    /// be told apart from a replay.
    TooOld,
    /// Seen before.
    Duplicate,
}

impl std::fmt::Display for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Replay::TooOld => "packet id too old for the replay window",
            Replay::Duplicate => "packet id seen before (replay)",
        })
    }
}

/// Which of the last [`WINDOW`] packet IDs of one session were seen.
/// 1 KiB; a fresh one has seen nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    /// The highest ID committed (0 before any).
    last: u64,
    /// Bit `id % 64` of block `(id / 64) % 128` is set once `id` was
    /// committed, for the IDs within the window.
    ring: [u64; RING_BLOCKS as usize],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The ring is 128 words of bits: only the position is worth a log.
        f.debug_struct("ReplayWindow")
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

/// The ring slot and bit of `id`.
fn slot(id: u64) -> (usize, u64) {
    // `% RING_BLOCKS` keeps the index below 128, so it fits the array.
    let block = ((id / BLOCK_BITS) % RING_BLOCKS) as usize;
    (block, 1u64 << (id % BLOCK_BITS))
}

impl ReplayWindow {
    pub const fn new() -> Self {
        ReplayWindow {
            last: 0,
            ring: [0; RING_BLOCKS as usize],
        }
    }

    /// Whether `id` may be accepted. Changes nothing: call
    /// [`commit`](Self::commit) once the packet authenticated.
    pub fn check(&self, id: u64) -> Result<(), Replay> {
        if id > self.last {
            return Ok(());
        }
        if self.last - id > WINDOW {
            return Err(Replay::TooOld);
        }
        let (block, bit) = slot(id);
        match self.ring.get(block) {
            Some(word) if word & bit == 0 => Ok(()),
            _ => Err(Replay::Duplicate),
        }
    }

    /// Records `id` as seen, moving the window forward if it is the
    /// highest yet. Only for an `id` that passed [`check`](Self::check)
    /// and whose packet authenticated; an ID too old is ignored.
    pub fn commit(&mut self, id: u64) {
        if id > self.last {
            // Clear the blocks the window slides over: those after the
            // last one's, up to the new one's, at most the whole ring.
            let current = self.last / BLOCK_BITS;
            let jump = (id / BLOCK_BITS - current).min(RING_BLOCKS);
            for step in 1..=jump {
                let block = ((current + step) % RING_BLOCKS) as usize;
                if let Some(word) = self.ring.get_mut(block) {
                    *word = 0;
                }
            }
            self.last = id;
        } else if self.last - id > WINDOW {
            return;
        }
        let (block, bit) = slot(id);
        if let Some(word) = self.ring.get_mut(block) {
            *word |= bit;
        }
    }

    /// [`check`](Self::check), then [`commit`](Self::commit) if it passed:
    /// for a caller that authenticated the packet already.
    #[cfg(test)]
    fn accept(&mut self, id: u64) -> Result<(), Replay> {
        self.check(id)?;
        self.commit(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_ids_pass_once() {
        let mut w = ReplayWindow::new();
        for id in 0..20_000 {
            assert_eq!(w.accept(id), Ok(()), "{id}");
            assert_eq!(w.check(id), Err(Replay::Duplicate), "{id}");
        }
    }

    #[test]
    fn the_first_id_may_be_zero_or_anything() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(0), Ok(()));
        assert_eq!(w.accept(0), Err(Replay::Duplicate));
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(1), Ok(()));
        assert_eq!(w.accept(0), Ok(()));
        assert_eq!(w.accept(0), Err(Replay::Duplicate));
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(0x1234_5678_9abc), Ok(()));
        assert_eq!(w.check(0x1234_5678_9abc), Err(Replay::Duplicate));
    }

    #[test]
    fn reordered_ids_within_the_window_pass_once() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(10_000), Ok(()));
        // Every ID of the window behind it, backwards, then again.
        for id in (10_000 - WINDOW..10_000).rev() {
            assert_eq!(w.accept(id), Ok(()), "{id}");
        }
        for id in 10_000 - WINDOW..=10_000 {
            assert_eq!(w.check(id), Err(Replay::Duplicate), "{id}");
        }
        assert_eq!(w.check(10_000 - WINDOW - 1), Err(Replay::TooOld));
        // Interleaved: odd ones first, then the even ones.
        let mut w = ReplayWindow::new();
        for id in (1..200).step_by(2) {
            assert_eq!(w.accept(id), Ok(()), "{id}");
        }
        for id in (0..200).step_by(2) {
            assert_eq!(w.accept(id), Ok(()), "{id}");
        }
        for id in 0..200 {
            assert_eq!(w.check(id), Err(Replay::Duplicate), "{id}");
        }
    }

    #[test]
    fn the_window_edge_is_exact() {
        for last in [WINDOW + 1, WINDOW + 2, WINDOW + 63, WINDOW + 64, 1 << 40] {
            let mut w = ReplayWindow::new();
            w.commit(last);
            assert_eq!(w.check(last - WINDOW), Ok(()), "{last}");
            assert_eq!(w.check(last - WINDOW - 1), Err(Replay::TooOld), "{last}");
            // An ID too old is not recorded by a stray commit either.
            w.commit(last - WINDOW - 1);
            assert_eq!(w.last, last);
            assert_eq!(w.accept(last - WINDOW), Ok(()), "{last}");
            assert_eq!(w.check(last - WINDOW), Err(Replay::Duplicate), "{last}");
        }
        // Exactly a window ahead of 0: 0 is still inside.
        let mut w = ReplayWindow::new();
        w.commit(WINDOW);
        assert_eq!(w.accept(0), Ok(()));
    }

    #[test]
    fn a_check_alone_changes_nothing() {
        let mut w = ReplayWindow::new();
        w.commit(5);
        let before = w.clone();
        for id in [0, 4, 5, 6, 1 << 20, u64::MAX] {
            let _ = w.check(id);
        }
        assert_eq!(w, before);
        // An ID checked but never committed (its packet failed to
        // authenticate) still passes when the real packet comes.
        assert_eq!(w.check(6), Ok(()));
        assert_eq!(w.accept(6), Ok(()));
    }

    #[test]
    fn a_far_jump_forgets_the_old_window() {
        let mut w = ReplayWindow::new();
        for id in 0..1000 {
            w.commit(id);
        }
        let far = 1_000_000;
        assert_eq!(w.accept(far), Ok(()));
        for id in 0..1000 {
            assert_eq!(w.check(id), Err(Replay::TooOld), "{id}");
        }
        // Everything in the new window but `far` is unseen, although the
        // ring's slots held old IDs before the jump.
        for id in far - WINDOW..far {
            assert_eq!(w.check(id), Ok(()), "{id}");
        }
        // A jump of less than a ring clears only the blocks it passes.
        let mut w = ReplayWindow::new();
        for id in 0..=64 * 3 {
            w.commit(id);
        }
        w.commit(64 * 3 + 64 * 5 + 7);
        assert_eq!(w.check(64 * 3), Err(Replay::Duplicate));
        assert_eq!(w.check(64 * 3 + 1), Ok(()));
        assert_eq!(w.check(64 * 4), Ok(()));
        assert_eq!(w.check(100), Err(Replay::Duplicate));
    }

    #[test]
    fn u64_edges() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(u64::MAX), Ok(()));
        assert_eq!(w.check(u64::MAX), Err(Replay::Duplicate));
        assert_eq!(w.accept(u64::MAX - 1), Ok(()));
        assert_eq!(w.accept(u64::MAX - WINDOW), Ok(()));
        assert_eq!(w.check(u64::MAX - WINDOW - 1), Err(Replay::TooOld));
        assert_eq!(w.check(0), Err(Replay::TooOld));
        // From 0 straight to the top and back within the window.
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(0), Ok(()));
        assert_eq!(w.accept(u64::MAX - 5), Ok(()));
        assert_eq!(w.accept(u64::MAX), Ok(()));
        assert_eq!(w.accept(u64::MAX - 3), Ok(()));
        assert_eq!(w.check(u64::MAX - 5), Err(Replay::Duplicate));
        assert_eq!(w.check(u64::MAX - 4), Ok(()));
    }

    #[test]
    fn a_random_walk_agrees_with_a_set() {
        // A model: every ID ever accepted, and the highest.
        use std::collections::HashSet;
        let mut w = ReplayWindow::new();
        let mut seen = HashSet::new();
        let mut top = 0u64;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            // xorshift: deterministic, no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let id = match state % 8 {
                // Mostly near the top, sometimes ahead, rarely far back.
                0 => top + state % 300,
                1 => top.saturating_sub(WINDOW + state % 3),
                _ => top.saturating_sub(state % (WINDOW + 200)),
            };
            let want = if id + WINDOW < top {
                Err(Replay::TooOld)
            } else if seen.contains(&id) {
                Err(Replay::Duplicate)
            } else {
                Ok(())
            };
            assert_eq!(w.accept(id), want, "id {id}, top {top}");
            if want.is_ok() {
                seen.insert(id);
                top = top.max(id);
            }
        }
    }
}
