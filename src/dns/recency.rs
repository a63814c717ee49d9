//! The use order of numbered slots, most recent first: a doubly linked
//! list through an array of index pairs, so touching, adding and dropping
//! a slot are O(1) and no slot holds a pointer. The answer cache and the
//! fake-ip pool keep their entries in slabs and their order here.

const NIL: u32 = u32::MAX;

/// What each slot costs here: its two neighbours' numbers.
pub const SLOT_BYTES: usize = std::mem::size_of::<Links>();

/// Slot `i`'s neighbours: towards the most recent, towards the least.
#[derive(Debug, Clone, Copy)]
struct Links {
    newer: u32,
    older: u32,
}

#[derive(Debug)]
pub struct Recency {
    links: Vec<Links>,
    head: u32,
    tail: u32,
}

impl Default for Recency {
    fn default() -> Self {
        Recency::new()
    }
}

impl Recency {
    pub fn new() -> Recency {
        Recency {
            links: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    /// The most recently used slot.
    pub fn newest(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    /// The least recently used slot.
    pub fn oldest(&self) -> Option<u32> {
        (self.tail != NIL).then_some(self.tail)
    }

    /// The slot used just after `i`.
    pub fn newer(&self, i: u32) -> Option<u32> {
        let n = self.links.get(i as usize)?.newer;
        (n != NIL).then_some(n)
    }

    /// Puts `i`, not in the list, first (the slot array grows to hold it).
    pub fn push_front(&mut self, i: u32) {
        let at = i as usize;
        if self.links.len() <= at {
            self.links.resize(
                at + 1,
                Links {
                    newer: NIL,
                    older: NIL,
                },
            );
        }
        let old = self.head;
        if let Some(l) = self.links.get_mut(at) {
            *l = Links {
                newer: NIL,
                older: old,
            };
        }
        match self.links.get_mut(old as usize) {
            Some(h) => h.newer = i,
            None => self.tail = i,
        }
        self.head = i;
    }

    /// Takes `i` out of the list (it must be in it).
    pub fn unlink(&mut self, i: u32) {
        let Some(&Links { newer, older }) = self.links.get(i as usize) else {
            return;
        };
        match self.links.get_mut(newer as usize) {
            Some(n) => n.older = older,
            None => self.head = older,
        }
        match self.links.get_mut(older as usize) {
            Some(o) => o.newer = newer,
            None => self.tail = newer,
        }
        if let Some(l) = self.links.get_mut(i as usize) {
            *l = Links {
                newer: NIL,
                older: NIL,
            };
        }
    }

    /// Makes `i`, in the list, the most recent.
    pub fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(r: &Recency) -> Vec<u32> {
        let mut out = Vec::new();
        let mut at = r.oldest();
        while let Some(i) = at {
            out.push(i);
            at = r.newer(i);
            assert!(out.len() <= 16, "a cycle");
        }
        out
    }

    #[test]
    fn touched_slots_move_first_and_unlinked_ones_leave() {
        let mut r = Recency::new();
        assert_eq!((r.newest(), r.oldest()), (None, None));
        for i in [0, 1, 2, 3] {
            r.push_front(i);
        }
        assert_eq!(order(&r), [0, 1, 2, 3]);
        r.touch(1);
        assert_eq!(order(&r), [0, 2, 3, 1]);
        r.touch(1);
        assert_eq!(order(&r), [0, 2, 3, 1]);
        r.unlink(0);
        assert_eq!((r.oldest(), r.newest()), (Some(2), Some(1)));
        r.unlink(1);
        assert_eq!(order(&r), [2, 3]);
        r.push_front(0);
        assert_eq!(order(&r), [2, 3, 0]);
        r.unlink(3);
        r.unlink(2);
        r.unlink(0);
        assert_eq!((r.newest(), r.oldest()), (None, None));
        // A slot far past the others grows the array.
        r.push_front(9);
        assert_eq!(order(&r), [9]);
    }
}
