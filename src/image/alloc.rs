//! Free-slot allocator, sharded so that concurrent writers rarely meet on one lock.
//!
//! A slot is free when no cluster holds a live region in it (current, durable, in flight,
//! releasing, being written). The allocator is rebuilt from the table at every load; it is never
//! stored. Slots are grouped into shards of contiguous ranges, each with its own bitmap and lock;
//! a writer starts at a shard chosen from its cluster index and moves on when a shard is empty.
//!
//! Free slots come in two kinds. *Clean* slots are holes on the host (never written, or punched).
//! *Stale* slots were freed by a durable commit (or held a version that was never committed) and
//! still hold those old, unreferenced bytes in some units: nothing refers to them (I1 is about
//! referenced bytes), so a new version may overwrite them at once. Reusing a stale slot saves
//! the hole punch of the old version and makes the new write an overwrite of allocated host
//! blocks, about ten times cheaper on ext4 than a write into a hole (docs/PERFORMANCE.md). The
//! metadata writer punches stale slots that nobody reused within a grace period, and all of them
//! before a close, so an idle or closed image stores only what its table refers to (a quiesce
//! leaves them for later: see `Core::adopt_unreferenced` for how another opener finds them).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::table::{lock, unit_mask};

const SLOTS_PER_SHARD_MIN: u64 = 4096;
const MAX_SHARDS: u64 = 64;

/// A free slot whose units `mask` still hold unreferenced old bytes, freed at `since` (ms).
#[derive(Clone, Copy, Debug)]
struct Stale {
    mask: u32,
    since: u64,
}

/// Stale candidates looked at per claim when searching one whose old bytes the new payload
/// overwrites entirely (so that nothing is left to punch).
const FIT_SCAN: usize = 8;

#[derive(Debug, Default)]
struct Shard {
    /// Bit set = slot free and clean.
    free: Vec<u64>,
    free_count: u64,
    cursor: usize,
    /// Stale free slots (not in `free`), by slot.
    stale: HashMap<u32, Stale>,
    /// Stale slots, oldest first. May hold slots that were claimed since (checked against
    /// `stale` when popped).
    stale_order: VecDeque<u32>,
}

impl Shard {
    /// Takes a specific stale slot out of the pool.
    fn take_stale(&mut self, slot: u32) -> Option<u32> {
        self.stale.remove(&slot).map(|s| s.mask)
    }

    /// Takes the newest stale slot whose old bytes lie inside the first `units` units (the
    /// region a new payload of `units` units covers when written at unit 0), looking at a few
    /// of the newest; else the newest.
    fn take_stale_fitting(&mut self, units: u32) -> Option<(u32, u32)> {
        let cover = unit_mask(0, units);
        let mut first: Option<usize> = None;
        let mut k = self.stale_order.len();
        let mut looked = 0;
        while k > 0 && looked < FIT_SCAN {
            k -= 1;
            let slot = self.stale_order[k];
            let Some(st) = self.stale.get(&slot) else {
                // Claimed through `claim_slot` since: drop the leftover.
                self.stale_order.remove(k);
                continue;
            };
            looked += 1;
            if st.mask & !cover == 0 {
                first = Some(k);
                break;
            }
            if first.is_none() {
                first = Some(k);
            }
        }
        let k = first?;
        let slot = self.stale_order.remove(k)?;
        let mask = self.take_stale(slot)?;
        Some((slot, mask))
    }
}

#[repr(align(128))]
#[derive(Debug, Default)]
struct ShardCell(Mutex<Shard>);

/// The allocator.
#[derive(Debug)]
pub struct Allocator {
    shards: Box<[ShardCell]>,
    slots_per_shard: u64,
    slot_count: u64,
    /// Free slots, clean and stale.
    free_total: AtomicU64,
    stale_total: AtomicU64,
}

impl Allocator {
    /// An allocator over `slot_count` slots, all free.
    pub fn new(slot_count: u64) -> Allocator {
        let slots_per_shard = slot_count
            .div_ceil(MAX_SHARDS)
            .max(SLOTS_PER_SHARD_MIN)
            .next_multiple_of(64);
        let shard_count = slot_count.div_ceil(slots_per_shard).max(1);
        let shards = (0..shard_count)
            .map(|k| {
                let start = k * slots_per_shard;
                let n = slot_count.saturating_sub(start).min(slots_per_shard);
                let mut free = vec![0u64; slots_per_shard.div_ceil(64) as usize];
                for bit in 0..n {
                    free[(bit / 64) as usize] |= 1 << (bit % 64);
                }
                ShardCell(Mutex::new(Shard {
                    free,
                    free_count: n,
                    ..Shard::default()
                }))
            })
            .collect();
        Allocator {
            shards,
            slots_per_shard,
            slot_count,
            free_total: AtomicU64::new(slot_count),
            stale_total: AtomicU64::new(0),
        }
    }

    fn split(&self, slot: u32) -> (usize, usize, u64) {
        let s = u64::from(slot);
        let shard = (s / self.slots_per_shard) as usize;
        let bit = s % self.slots_per_shard;
        (shard, (bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// Marks a slot used while loading. Returns false when it already was (two clusters claim it).
    pub fn mark_used(&self, slot: u32) -> bool {
        self.claim(slot)
    }

    /// Claims a specific slot if it is free, clean or stale. Returns the mask of units that
    /// still hold old bytes (0 for a clean slot).
    pub fn claim_slot(&self, slot: u32) -> Option<u32> {
        if u64::from(slot) >= self.slot_count {
            return None;
        }
        let (k, w, m) = self.split(slot);
        let mut shard = lock(&self.shards[k].0);
        if shard.free[w] & m != 0 {
            shard.free[w] &= !m;
            shard.free_count -= 1;
            self.free_total.fetch_sub(1, Ordering::Relaxed);
            return Some(0);
        }
        let mask = shard.take_stale(slot)?;
        self.free_total.fetch_sub(1, Ordering::Relaxed);
        self.stale_total.fetch_sub(1, Ordering::Relaxed);
        Some(mask)
    }

    /// Claims any free slot for a payload of `units` units, preferring a stale slot (whose old
    /// bytes the payload overwrites, if one is found), starting at a shard derived from `hint`.
    /// Returns the slot and the mask of its units that still hold old bytes.
    pub fn claim_any(&self, hint: u64, units: u32) -> Option<(u32, u32)> {
        let n = self.shards.len();
        let start = (hint as usize) % n;
        if self.stale_total.load(Ordering::Relaxed) > 0 {
            for step in 0..n {
                let k = (start + step) % n;
                let mut shard = lock(&self.shards[k].0);
                if shard.stale.is_empty() {
                    continue;
                }
                if let Some(found) = shard.take_stale_fitting(units) {
                    self.free_total.fetch_sub(1, Ordering::Relaxed);
                    self.stale_total.fetch_sub(1, Ordering::Relaxed);
                    return Some(found);
                }
            }
        }
        self.claim_clean(start).map(|slot| (slot, 0))
    }

    /// Returns a slot whose units `mask` still hold unreferenced old bytes to the free pool, at
    /// time `now_ms` (a mask of 0 returns it clean).
    pub fn release_stale(&self, slot: u32, mask: u32, now_ms: u64) {
        if mask == 0 {
            return self.release(slot);
        }
        self.put_back(
            slot,
            Some(Stale {
                mask,
                since: now_ms,
            }),
        );
    }

    /// Returns `slot` to the pool: clean (`None`), or holding old bytes to punch later. A slot
    /// already in the pool is a bug elsewhere: logged and ignored.
    fn put_back(&self, slot: u32, stale: Option<Stale>) {
        if u64::from(slot) >= self.slot_count {
            return;
        }
        let (k, w, m) = self.split(slot);
        let mut shard = lock(&self.shards[k].0);
        if shard.free[w] & m != 0 || shard.stale.contains_key(&slot) {
            log::warn!("slot {slot} released twice");
            return;
        }
        match stale {
            None => {
                shard.free[w] |= m;
                shard.free_count += 1;
            }
            Some(stale) => {
                shard.stale.insert(slot, stale);
                shard.stale_order.push_back(slot);
                self.stale_total.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.free_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes up to `max` stale slots freed at or before `before_ms` (oldest first) out of the
    /// pool, for punching: the caller owns them and returns each with [`Allocator::release`].
    pub fn take_stale_older(&self, before_ms: u64, max: usize, out: &mut Vec<(u32, u32)>) {
        out.clear();
        if self.stale_total.load(Ordering::Relaxed) == 0 {
            return;
        }
        for cell in self.shards.iter() {
            let mut shard = lock(&cell.0);
            while out.len() < max {
                let Some(&slot) = shard.stale_order.front() else {
                    break;
                };
                match shard.stale.get(&slot) {
                    None => {
                        shard.stale_order.pop_front();
                    }
                    Some(st) if st.since <= before_ms => {
                        let mask = st.mask;
                        shard.stale_order.pop_front();
                        shard.stale.remove(&slot);
                        self.free_total.fetch_sub(1, Ordering::Relaxed);
                        self.stale_total.fetch_sub(1, Ordering::Relaxed);
                        out.push((slot, mask));
                    }
                    Some(_) => break,
                }
            }
            if out.len() >= max {
                return;
            }
        }
    }

    /// Turns the free, clean slot `slot` into a stale one whose units `mask` hold unreferenced
    /// old bytes, dated `now_ms` (loading an image that a quiesce left with freed space
    /// unpunched: the writer punches it after the grace period unless a new version overwrites
    /// it first). Returns false, changing nothing, when the slot is not free and clean.
    pub fn mark_stale(&self, slot: u32, mask: u32, now_ms: u64) -> bool {
        if mask == 0 {
            return false;
        }
        let Some(mut shard) = self.take_free_clean(slot) else {
            return false;
        };
        shard.stale.insert(
            slot,
            Stale {
                mask,
                since: now_ms,
            },
        );
        shard.stale_order.push_back(slot);
        // Still free (only of another kind): `free_total` is unchanged.
        self.stale_total.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Stale free slots right now.
    pub fn stale_slots(&self) -> u64 {
        self.stale_total.load(Ordering::Relaxed)
    }

    /// Claims a specific slot if it is free and clean (loading: stale slots exist only while
    /// running).
    pub fn claim(&self, slot: u32) -> bool {
        if self.take_free_clean(slot).is_none() {
            return false;
        }
        self.free_total.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Takes `slot` out of its shard's free, clean set and returns the shard still locked (the
    /// caller records what the slot becomes); None, changing nothing, when it is not there.
    fn take_free_clean(&self, slot: u32) -> Option<std::sync::MutexGuard<'_, Shard>> {
        if u64::from(slot) >= self.slot_count {
            return None;
        }
        let (k, w, m) = self.split(slot);
        let mut shard = lock(&self.shards[k].0);
        if shard.free[w] & m == 0 {
            return None;
        }
        shard.free[w] &= !m;
        shard.free_count -= 1;
        Some(shard)
    }

    /// Claims any clean free slot, starting the search at shard `start`.
    fn claim_clean(&self, start: usize) -> Option<u32> {
        let n = self.shards.len();
        for step in 0..n {
            let k = (start + step) % n;
            let mut shard = lock(&self.shards[k].0);
            if shard.free_count == 0 {
                continue;
            }
            let words = shard.free.len();
            for j in 0..words {
                let w = (shard.cursor + j) % words;
                let bits = shard.free[w];
                if bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    shard.free[w] &= !(1u64 << b);
                    shard.free_count -= 1;
                    shard.cursor = w;
                    self.free_total.fetch_sub(1, Ordering::Relaxed);
                    let slot = k as u64 * self.slots_per_shard + w as u64 * 64 + b;
                    return Some(slot as u32);
                }
            }
        }
        None
    }

    /// Returns a slot to the free pool.
    pub fn release(&self, slot: u32) {
        self.put_back(slot, None);
    }

    /// True when the slot is free and clean.
    pub fn is_free(&self, slot: u32) -> bool {
        if u64::from(slot) >= self.slot_count {
            return false;
        }
        let (k, w, m) = self.split(slot);
        lock(&self.shards[k].0).free[w] & m != 0
    }

    /// Marks every slot free again (before a reload rebuilds the used set).
    pub fn reset(&self) {
        for (k, cell) in self.shards.iter().enumerate() {
            let mut shard = lock(&cell.0);
            let start = k as u64 * self.slots_per_shard;
            let n = self
                .slot_count
                .saturating_sub(start)
                .min(self.slots_per_shard);
            shard.free.fill(0);
            for bit in 0..n {
                shard.free[(bit / 64) as usize] |= 1 << (bit % 64);
            }
            shard.free_count = n;
            shard.cursor = 0;
            shard.stale.clear();
            shard.stale_order.clear();
        }
        self.free_total.store(self.slot_count, Ordering::Relaxed);
        self.stale_total.store(0, Ordering::Relaxed);
    }

    /// Bytes of RAM the bitmaps hold.
    pub fn ram_bytes(&self) -> u64 {
        self.shards.len() as u64 * (self.slots_per_shard / 8 + 128)
    }

    /// Free slots right now.
    pub fn free_slots(&self) -> u64 {
        self.free_total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_every_slot_once_then_runs_dry() {
        let a = Allocator::new(10_000);
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000u64 {
            let (s, stale) = a.claim_any(i * 7, 16).expect("slot");
            assert_eq!(stale, 0);
            assert!(seen.insert(s), "slot {s} handed out twice");
            assert!(u64::from(s) < 10_000);
        }
        assert_eq!(a.claim_any(0, 16), None);
        assert_eq!(a.free_slots(), 0);
        a.release(1234);
        assert!(a.is_free(1234));
        assert_eq!(a.claim_any(99, 16), Some((1234, 0)));
    }

    #[test]
    fn a_clean_free_slot_marked_stale_is_handed_out_once_and_a_used_one_is_refused() {
        let a = Allocator::new(100);
        assert!(a.claim(7));
        // Used, or nothing stale: refused, nothing changes.
        assert!(!a.mark_stale(7, 0b11, 1));
        assert!(!a.mark_stale(8, 0, 1));
        assert!(!a.mark_stale(100, 1, 1));
        assert_eq!(a.stale_slots(), 0);
        assert!(a.mark_stale(8, 0b11, 1));
        assert!(!a.mark_stale(8, 0b11, 1), "marked twice");
        assert!(!a.is_free(8));
        assert_eq!(a.free_slots(), 99);
        assert_eq!(a.stale_slots(), 1);
        assert_eq!(a.claim_any(0, 2), Some((8, 0b11)));
        assert_eq!(a.free_slots(), 98);
        assert_eq!(a.stale_slots(), 0);
        assert!(a.mark_stale(9, 1, 5));
        let mut out = Vec::new();
        a.take_stale_older(4, 10, &mut out);
        assert!(out.is_empty());
        a.take_stale_older(5, 10, &mut out);
        assert_eq!(out, vec![(9, 1)]);
    }

    #[test]
    fn stale_slots_are_preferred_fitting_first_and_handed_out_once() {
        let a = Allocator::new(10_000);
        for s in 0..10_000 {
            assert!(a.claim(s));
        }
        // Old bytes in units 0..8 of slot 10, in units 0..16 of slot 20, newest last.
        a.release_stale(10, unit_mask(0, 8), 1);
        a.release_stale(20, unit_mask(0, 16), 2);
        a.release(30);
        assert_eq!(a.free_slots(), 3);
        assert_eq!(a.stale_slots(), 2);
        // An 8-unit payload covers slot 10's old bytes entirely: taken although 20 is newer.
        assert_eq!(a.claim_any(0, 8), Some((10, unit_mask(0, 8))));
        // Nothing stale fits 4 units: the newest stale slot, then the clean one.
        assert_eq!(a.claim_any(0, 4), Some((20, unit_mask(0, 16))));
        assert_eq!(a.claim_any(0, 4), Some((30, 0)));
        assert_eq!(a.claim_any(0, 4), None);
        // A specific stale slot is claimed once, and then no longer handed out elsewhere.
        a.release_stale(40, 1, 5);
        a.release_stale(50, 1, 9);
        assert_eq!(a.claim_slot(40), Some(1));
        assert_eq!(a.claim_slot(40), None);
        let mut out = Vec::new();
        a.take_stale_older(5, 10, &mut out);
        assert!(out.is_empty(), "{out:?}");
        a.take_stale_older(9, 10, &mut out);
        assert_eq!(out, vec![(50, 1)]);
        assert_eq!(a.free_slots(), 0);
        assert_eq!(a.stale_slots(), 0);
        a.release(50);
        assert!(a.is_free(50));
        a.release_stale(60, 3, 1);
        a.reset();
        assert_eq!(a.stale_slots(), 0);
        assert_eq!(a.free_slots(), 10_000);
    }

    #[test]
    fn a_specific_slot_is_claimed_only_when_free() {
        let a = Allocator::new(100);
        assert!(a.claim(5));
        assert!(!a.claim(5));
        assert!(!a.claim(100));
        a.release(5);
        assert!(a.claim(5));
    }
}
