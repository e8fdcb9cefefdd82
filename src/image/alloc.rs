//! Free-slot allocator, sharded so that concurrent writers rarely meet on one lock.
//!
//! A slot is free when no cluster holds a live region in it (current, durable, in flight,
//! releasing, being written). The allocator is rebuilt from the table at every load; it is never
//! stored. Slots are grouped into shards of contiguous ranges, each with its own bitmap and lock;
//! a writer starts at a shard chosen from its cluster index and moves on when a shard is empty.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::table::lock;

const SLOTS_PER_SHARD_MIN: u64 = 4096;
const MAX_SHARDS: u64 = 64;

#[derive(Debug, Default)]
struct Shard {
    /// Bit set = slot free.
    free: Vec<u64>,
    free_count: u64,
    cursor: usize,
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
    free_total: AtomicU64,
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
                    cursor: 0,
                }))
            })
            .collect();
        Allocator {
            shards,
            slots_per_shard,
            slot_count,
            free_total: AtomicU64::new(slot_count),
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

    /// Claims a specific slot if it is free.
    pub fn claim(&self, slot: u32) -> bool {
        if u64::from(slot) >= self.slot_count {
            return false;
        }
        let (k, w, m) = self.split(slot);
        let mut shard = lock(&self.shards[k].0);
        if shard.free[w] & m == 0 {
            return false;
        }
        shard.free[w] &= !m;
        shard.free_count -= 1;
        self.free_total.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Claims any free slot, starting the search at a shard derived from `hint`.
    pub fn claim_any(&self, hint: u64) -> Option<u32> {
        let n = self.shards.len();
        let start = (hint as usize) % n;
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
        if u64::from(slot) >= self.slot_count {
            return;
        }
        let (k, w, m) = self.split(slot);
        let mut shard = lock(&self.shards[k].0);
        if shard.free[w] & m != 0 {
            log::warn!("slot {slot} released twice");
            return;
        }
        shard.free[w] |= m;
        shard.free_count += 1;
        self.free_total.fetch_add(1, Ordering::Relaxed);
    }

    /// True when the slot is free.
    #[cfg(test)]
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
        }
        self.free_total.store(self.slot_count, Ordering::Relaxed);
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
            let s = a.claim_any(i * 7).expect("slot");
            assert!(seen.insert(s), "slot {s} handed out twice");
            assert!(u64::from(s) < 10_000);
        }
        assert_eq!(a.claim_any(0), None);
        assert_eq!(a.free_slots(), 0);
        a.release(1234);
        assert!(a.is_free(1234));
        assert_eq!(a.claim_any(99), Some(1234));
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
