//! Which offsets may be committed. Offsets are registered in the order they are read and
//! completed in any order (a dead letter may finish before an earlier message's vector is
//! written); the position to commit moves only over the contiguous prefix of completed
//! offsets, so a crash can replay work but never skip it.

use std::collections::{BTreeMap, HashMap};

/// A topic partition.
pub type Tp = (String, i32);

#[derive(Debug, Default)]
struct Partition {
    /// Assignment generation; completions from an older generation are ignored.
    generation: u64,
    /// Registered but not yet committable, with a done flag.
    pending: BTreeMap<i64, bool>,
    /// Everything below this was committable already (re-deliveries below it are ignored).
    floor: i64,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<Tp, Partition>,
    next_generation: u64,
    /// Store writes in flight per partition and generation (see [`hold`](Self::hold)).
    writing: HashMap<(Tp, u64), usize>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking a partition (on assignment) and returns its generation.
    pub fn assign(&mut self, tp: &Tp) -> u64 {
        self.next_generation += 1;
        let generation = self.next_generation;
        self.parts.insert(
            tp.clone(),
            Partition {
                generation,
                pending: BTreeMap::new(),
                floor: i64::MIN,
            },
        );
        generation
    }

    /// Stops tracking a partition (after revoke); late completions for it are ignored.
    pub fn revoke(&mut self, tp: &Tp) {
        self.parts.remove(tp);
    }

    pub fn generation(&self, tp: &Tp) -> Option<u64> {
        self.parts.get(tp).map(|p| p.generation)
    }

    /// Records that `offset` entered the pipeline, tracking the partition if it is not
    /// yet (files in a backfill).
    pub fn register(&mut self, tp: &Tp, offset: i64) -> u64 {
        if !self.parts.contains_key(tp) {
            self.assign(tp);
        }
        self.register_assigned(tp, offset).expect("assigned above")
    }

    /// As [`register`](Self::register), but only for an assigned partition: `None` means
    /// the partition was revoked and the record must not enter the pipeline.
    pub fn register_assigned(&mut self, tp: &Tp, offset: i64) -> Option<u64> {
        let p = self.parts.get_mut(tp)?;
        if offset >= p.floor {
            p.pending.entry(offset).or_insert(false);
        }
        Some(p.generation)
    }

    /// Marks `offset` finished. Returns the offset to commit (the next one to read) when
    /// the finished prefix grew.
    pub fn complete(&mut self, tp: &Tp, generation: u64, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(tp)?;
        if p.generation != generation {
            return None;
        }
        *p.pending.get_mut(&offset)? = true;
        let mut next = None;
        while let Some((&o, &true)) = p.pending.first_key_value() {
            next = Some(o + 1);
            p.floor = o + 1;
            p.pending.pop_first();
        }
        next
    }

    /// The fence against stale writes: for each (partition, generation) of items about to
    /// be written, whether that generation is still the partition's current one; the
    /// current ones are counted as being written until [`release`](Self::release). A
    /// revoke first removes the partition (so later holds fail), then waits for
    /// [`writing`](Self::writing) to reach 0, so after it returns no item of the old
    /// assignment reaches the store.
    pub fn hold(&mut self, items: &[(Tp, u64)]) -> Vec<bool> {
        items
            .iter()
            .map(|(tp, g)| {
                let owned = self.parts.get(tp).is_some_and(|p| p.generation == *g);
                if owned {
                    *self.writing.entry((tp.clone(), *g)).or_insert(0) += 1;
                }
                owned
            })
            .collect()
    }

    /// Ends holds taken by [`hold`](Self::hold) (only the owned ones).
    pub fn release(&mut self, items: &[(Tp, u64)]) {
        for key in items {
            if let Some(n) = self.writing.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    self.writing.remove(key);
                }
            }
        }
    }

    /// Writes in flight for any generation of this partition.
    pub fn writing(&self, tp: &Tp) -> usize {
        self.writing
            .iter()
            .filter(|((t, _), _)| t == tp)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Offsets read but not yet committable on this partition.
    pub fn in_flight(&self, tp: &Tp) -> usize {
        self.parts.get(tp).map_or(0, |p| p.pending.len())
    }

    pub fn total_in_flight(&self) -> usize {
        self.parts.values().map(|p| p.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> Tp {
        ("t".into(), 0)
    }

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut t = OffsetTracker::new();
        let g = t.assign(&tp());
        for o in 10..15 {
            t.register(&tp(), o);
        }
        assert_eq!(t.complete(&tp(), g, 12), None);
        assert_eq!(t.complete(&tp(), g, 11), None);
        assert_eq!(t.complete(&tp(), g, 10), Some(13));
        assert_eq!(t.in_flight(&tp()), 2);
        assert_eq!(t.complete(&tp(), g, 14), None);
        assert_eq!(t.complete(&tp(), g, 13), Some(15));
        assert_eq!(t.total_in_flight(), 0);
    }

    #[test]
    fn stale_generation_is_ignored() {
        let mut t = OffsetTracker::new();
        let g1 = t.assign(&tp());
        t.register(&tp(), 5);
        t.revoke(&tp());
        let g2 = t.assign(&tp());
        t.register(&tp(), 5);
        assert_eq!(t.complete(&tp(), g1, 5), None);
        assert_eq!(t.complete(&tp(), g2, 5), Some(6));
    }

    #[test]
    fn redeliveries_out_of_order_and_twice() {
        let mut t = OffsetTracker::new();
        let g = t.assign(&tp());
        t.register(&tp(), 100);
        // Re-fetched from the committed offset after a re-assignment: lower offsets follow.
        for o in 97..=100 {
            t.register(&tp(), o);
        }
        assert_eq!(t.in_flight(&tp()), 4);
        assert_eq!(t.complete(&tp(), g, 100), None);
        assert_eq!(t.complete(&tp(), g, 98), None);
        assert_eq!(t.complete(&tp(), g, 97), Some(99));
        assert_eq!(t.complete(&tp(), g, 99), Some(101));
        // A re-delivery below the committed position is not tracked again.
        t.register(&tp(), 99);
        assert_eq!(t.in_flight(&tp()), 0);
        assert_eq!(t.complete(&tp(), g, 99), None);
        assert_eq!(t.register_assigned(&("other".into(), 0), 1), None);
    }

    #[test]
    fn holds_fence_off_a_revoked_generation() {
        let mut t = OffsetTracker::new();
        let g1 = t.assign(&tp());
        let items = vec![(tp(), g1)];
        assert_eq!(t.hold(&items), vec![true]);
        assert_eq!(t.writing(&tp()), 1);
        t.revoke(&tp());
        // A write that started before the revoke is still counted (the revoke waits)...
        assert_eq!(t.writing(&tp()), 1);
        t.release(&items);
        assert_eq!(t.writing(&tp()), 0);
        // ...and none of the old generation starts after it, even once re-assigned.
        assert_eq!(t.hold(&items), vec![false]);
        let g2 = t.assign(&tp());
        assert_eq!(t.hold(&items), vec![false]);
        assert_eq!(t.hold(&[(tp(), g2)]), vec![true]);
        assert_eq!(t.writing(&tp()), 1);
    }

    #[test]
    fn unknown_offsets_do_not_panic() {
        let mut t = OffsetTracker::new();
        let g = t.assign(&tp());
        assert_eq!(t.complete(&tp(), g, 99), None);
        assert_eq!(t.complete(&("x".into(), 1), g, 1), None);
    }
}
