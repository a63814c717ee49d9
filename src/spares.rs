//! A small shared stock of reusable relay resources (pipes, receive
//! buffers).
//!
//! A flow or session takes one only while bytes are in flight and gives
//! it back when its socket drains, so idle flows hold none, and busy ones
//! do not pay for creating (pipe2, or allocating and zeroing 64 KiB) and
//! destroying one per burst.

use std::sync::Mutex;

pub struct Spares<T> {
    items: Mutex<Vec<T>>,
    cap: usize,
}

impl<T> Spares<T> {
    /// Keeps at most `cap` spares; more given back are dropped.
    pub const fn new(cap: usize) -> Self {
        Spares {
            items: Mutex::new(Vec::new()),
            cap,
        }
    }

    pub fn take(&self) -> Option<T> {
        self.items.lock().ok().and_then(|mut items| items.pop())
    }

    pub fn give_back(&self, item: T) {
        if let Ok(mut items) = self.items.lock() {
            if items.len() < self.cap {
                items.push(item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_its_cap() {
        let spares = Spares::new(2);
        assert_eq!(spares.take(), None::<u32>);
        for i in 0..5 {
            spares.give_back(i);
        }
        assert_eq!(spares.take(), Some(1));
        assert_eq!(spares.take(), Some(0));
        assert_eq!(spares.take(), None);
    }
}
