//! The in-RAM cluster table, split into stripes so that different clusters never share a lock.
//!
//! Cluster `c` lives in stripe `c % STRIPES` at index `c / STRIPES`. A stripe holds, for its
//! clusters:
//! - the *current* entry (what reads return), 10 bytes per cluster in three parallel arrays;
//! - `pins`: for the few clusters whose current entry differs from the last durable commit, the
//!   regions that must not be overwritten (I1 and group-commit trap 1): the durable version, the
//!   version snapshotted by the commit in flight, regions being released (punched), and the
//!   region a write is filling right now; plus its *stale* units (freed, unreferenced, not yet
//!   punched: the cluster's next version may overwrite them, see [`StaleUnits`]);
//! - `busy`: per-cluster reader/writer exclusion (a write of cluster `c` waits only for other
//!   requests on `c`);
//! - `dirty`: clusters changed since the last snapshot.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::format::{alg, DiskEntry, Layout};

/// Number of stripes (a power of two).
pub const STRIPES: usize = 1024;
const STRIPE_SHIFT: u32 = STRIPES.trailing_zeros();

/// Locks a mutex, ignoring poisoning (a panicking holder leaves plain data behind, no invariant
/// of ours spans a panic: the engine has no panicking paths on purpose).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A cluster's entry in RAM: 10 bytes (slot, crc, packed algorithm/unit/unit count).
///
/// `meta` bits: 0..3 algorithm code, 3..8 first unit, 8..13 unit count − 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Slot index (0 for zero clusters).
    pub slot: u32,
    /// crc32c of the stored units.
    pub crc: u32,
    meta: u16,
}

impl Entry {
    /// The zero cluster.
    pub const ZERO: Entry = Entry {
        slot: 0,
        crc: 0,
        meta: 0,
    };

    /// A stored payload.
    pub fn stored(slot: u32, unit: u32, units: u32, code: u8, crc: u32) -> Entry {
        debug_assert!((1..=32).contains(&units) && unit < 32 && code != alg::ZERO);
        Entry {
            slot,
            crc,
            meta: u16::from(code & 7)
                | ((unit as u16 & 31) << 3)
                | (((units - 1) as u16 & 31) << 8),
        }
    }

    /// Algorithm code.
    pub fn alg(&self) -> u8 {
        (self.meta & 7) as u8
    }

    /// True for the zero cluster.
    pub fn is_zero(&self) -> bool {
        self.alg() == alg::ZERO
    }

    /// First unit in the slot.
    pub fn unit(&self) -> u32 {
        u32::from((self.meta >> 3) & 31)
    }

    /// Number of units (0 for zero clusters).
    pub fn units(&self) -> u32 {
        if self.is_zero() {
            0
        } else {
            u32::from((self.meta >> 8) & 31) + 1
        }
    }

    /// Bit mask of the units this entry occupies in its slot (0 for zero clusters).
    pub fn mask(&self) -> u32 {
        unit_mask(self.unit(), self.units())
    }

    /// From a validated disk entry.
    pub fn from_disk(d: &DiskEntry) -> Entry {
        if d.alg == alg::ZERO {
            return Entry::ZERO;
        }
        Entry::stored(d.slot, u32::from(d.unit), u32::from(d.units), d.alg, d.crc)
    }

    /// To the disk encoding.
    pub fn to_disk(self) -> DiskEntry {
        if self.is_zero() {
            return DiskEntry::default();
        }
        DiskEntry {
            slot: self.slot,
            crc: self.crc,
            unit: self.unit() as u8,
            units: self.units() as u8,
            alg: self.alg(),
        }
    }
}

/// Mask of `units` units starting at `unit`.
pub fn unit_mask(unit: u32, units: u32) -> u32 {
    if units == 0 {
        return 0;
    }
    let m = if units >= 32 {
        u32::MAX
    } else {
        (1u32 << units) - 1
    };
    m << unit
}

/// What protects a cluster's regions beyond its current entry.
#[derive(Clone, Debug, Default)]
pub struct Pins {
    /// The entry of the last durable commit.
    pub durable: Entry,
    /// The entry snapshotted by the commit in flight.
    pub inflight: Option<Entry>,
    /// Changed since the last snapshot (listed in the stripe's `dirty`).
    pub dirty: bool,
    /// Regions no longer referenced, being punched before their space is reused.
    pub releasing: Vec<Entry>,
    /// Region a write is filling now (not yet published).
    pub writing: Option<Entry>,
    /// Freed units not yet punched, in slots where the cluster still holds live regions.
    pub stale: Vec<StaleUnits>,
}

/// Units of a slot that held an old version of a cluster which nothing refers to any more (the
/// commit that replaced it is durable, or it was never committed), left unpunched on purpose:
/// the cluster's next version may overwrite them at once (I1 protects referenced bytes only),
/// which saves the punch (a synchronous discard under the inode lock on some hosts) and makes
/// the write an overwrite of allocated blocks instead of a write into a hole. They exist only in
/// slots where the cluster holds live regions; when its last live region there goes, they go
/// with the slot to the allocator (as a stale slot). Units nobody overwrote within a grace
/// period are punched by the metadata writer (and all of them before a close).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleUnits {
    /// The slot.
    pub slot: u32,
    /// Its stale units.
    pub mask: u32,
    /// When units were last added (ms on the engine's clock): the grace period runs from here.
    pub since: u64,
}

/// Sectors (512 bytes) per cluster at most: bits of [`Buffered::written`].
const MAX_SECTORS: usize = 256;

/// A cluster's writes held in the write-back buffer (see `engine::writeback`): the bytes of
/// every sector written since the cluster was last stored, over a base that is the cluster's
/// current stored version (not loaded: sectors not in `written` are read from it when needed).
///
/// The bytes are kept in 4 KiB pages allocated as writes first touch them: a guest's random
/// 4 KiB writes cost a page each, not a whole cluster (measured with the side-by-side bench,
/// 4 KiB random writes QD32 × 2: the server's peak resident memory went from 62-65 MiB with
/// whole-cluster entries to 17-18 MiB at 64 KiB clusters, 49-58 to 25-27 MiB at 16 KiB;
/// qemu-storage-daemon's is 10 MiB).
#[derive(Debug)]
pub struct Buffered {
    /// The cluster's pages, `None` until a write touches one; only the sectors set in
    /// `written` are meaningful.
    pages: Vec<Option<Box<[u8; BUFFER_PAGE]>>>,
    /// Bit per 512-byte sector written.
    written: [u64; MAX_SECTORS / 64],
}

/// Allocation unit of a write-back buffer entry.
pub const BUFFER_PAGE: usize = 4096;

impl Buffered {
    /// An empty entry for a cluster of `cluster_size` bytes (a multiple of 4 KiB).
    pub fn new(cluster_size: usize) -> Buffered {
        Buffered {
            pages: vec![None; cluster_size.div_ceil(BUFFER_PAGE)],
            written: [0; MAX_SECTORS / 64],
        }
    }

    fn sectors(at: usize, len: usize) -> std::ops::Range<usize> {
        at / 512..(at + len).div_ceil(512)
    }

    /// Fresh pages for [`Self::merge`] to use: allocate them before taking the stripe lock the
    /// entry lives under, so that no allocation (nor the page faults of memory the allocator
    /// just gave back to the kernel) happens while the lock is held.
    pub fn new_pages(count: usize) -> Vec<Box<[u8; BUFFER_PAGE]>> {
        (0..count).map(|_| Box::new([0; BUFFER_PAGE])).collect()
    }

    fn page_range(at: usize, len: usize) -> std::ops::Range<usize> {
        at / BUFFER_PAGE..(at + len).div_ceil(BUFFER_PAGE)
    }

    /// How many pages a [`Self::merge`] of `len` bytes at `at` would have to add.
    pub fn pages_missing(&self, at: usize, len: usize) -> usize {
        Self::page_range(at, len)
            .filter(|&p| self.pages[p].is_none())
            .count()
    }

    /// Copies `d` in at byte `at` (both multiples of 512 bytes) and marks those sectors. A page
    /// the entry lacks is taken from `spare` (allocated here only if `spare` runs out).
    pub fn merge(&mut self, at: usize, d: &[u8], spare: &mut Vec<Box<[u8; BUFFER_PAGE]>>) {
        let mut pos = 0;
        while pos < d.len() {
            let abs = at + pos;
            let (page, within) = (abs / BUFFER_PAGE, abs % BUFFER_PAGE);
            let n = (BUFFER_PAGE - within).min(d.len() - pos);
            let bytes = self.pages[page]
                .get_or_insert_with(|| spare.pop().unwrap_or_else(|| Box::new([0; BUFFER_PAGE])));
            bytes[within..within + n].copy_from_slice(&d[pos..pos + n]);
            pos += n;
        }
        for k in Self::sectors(at, d.len()) {
            self.written[k / 64] |= 1 << (k % 64);
        }
    }

    fn is_written(&self, k: usize) -> bool {
        self.written[k / 64] & (1 << (k % 64)) != 0
    }

    /// True when every sector of `at..at + len` was written.
    pub fn covers(&self, at: usize, len: usize) -> bool {
        Self::sectors(at, len).all(|k| self.is_written(k))
    }

    /// True when the whole cluster was written (its stored version is not needed any more).
    pub fn is_complete(&self) -> bool {
        self.covers(0, self.pages.len() * BUFFER_PAGE)
    }

    /// Copies the written sectors of `at..at + out.len()` into `out` (all of it when
    /// [`Self::covers`] that range).
    pub fn overlay(&self, at: usize, out: &mut [u8]) {
        for k in Self::sectors(at, out.len()) {
            if !self.is_written(k) {
                continue;
            }
            let src = k * 512;
            let Some(page) = &self.pages[src / BUFFER_PAGE] else {
                // A written sector's page always exists (`merge` fills it before marking it).
                debug_assert!(false, "sector {k} marked written without its page");
                continue;
            };
            let within = src % BUFFER_PAGE;
            let dst = src - at;
            out[dst..dst + 512].copy_from_slice(&page[within..within + 512]);
        }
    }
}

/// Per-cluster request exclusion.
#[derive(Clone, Copy, Debug, Default)]
pub struct Busy {
    /// A writer holds the cluster.
    pub writer: bool,
    /// Readers hold the cluster.
    pub readers: u32,
    /// Threads waiting for this cluster.
    pub waiters: u32,
    /// Of those, the writers: while one waits, no new reader enters, so a stream of reads on
    /// several queues cannot starve a write (nor the FLUSH that must store it).
    pub writers_waiting: u32,
}

/// One stripe of the table.
#[derive(Debug, Default)]
pub struct Stripe {
    slots: Vec<u32>,
    crcs: Vec<u32>,
    metas: Vec<u16>,
    /// Protection of changed clusters.
    pub pins: HashMap<u32, Pins>,
    /// Request exclusion.
    pub busy: HashMap<u32, Busy>,
    /// Clusters changed since the last snapshot.
    pub dirty: Vec<u32>,
    /// Clusters with writes in the write-back buffer.
    pub buffered: HashMap<u32, Box<Buffered>>,
    /// Clusters stored compressed (current entries).
    pub compressed: u64,
    /// Clusters stored raw.
    pub raw: u64,
    /// Units held by current entries.
    pub stored_units: u64,
    /// Bumped by every change of an entry in this stripe. Caches of decompressed clusters key on
    /// it: an entry alone (slot, units, algorithm, crc32c) does not identify a version, since a
    /// later version can land in the same region with a colliding crc.
    pub changes: u64,
}

impl Stripe {
    /// Current entry of the cluster at local index `i`.
    pub fn get(&self, i: usize) -> Entry {
        Entry {
            slot: self.slots[i],
            crc: self.crcs[i],
            meta: self.metas[i],
        }
    }

    /// Sets the current entry, keeping the counters right.
    pub fn set(&mut self, i: usize, e: Entry) {
        self.changes = self.changes.wrapping_add(1);
        let old = self.get(i);
        self.account(&old, false);
        self.account(&e, true);
        self.slots[i] = e.slot;
        self.crcs[i] = e.crc;
        self.metas[i] = e.meta;
    }

    fn account(&mut self, e: &Entry, add: bool) {
        let units = u64::from(e.units());
        let (c, r) = match e.alg() {
            alg::ZERO => (0, 0),
            alg::RAW => (0, 1),
            _ => (1, 0),
        };
        if add {
            self.compressed += c;
            self.raw += r;
            self.stored_units += units;
        } else {
            self.compressed -= c;
            self.raw -= r;
            self.stored_units -= units;
        }
    }

    /// Calls `f` with every stored region cluster `c` (local index `i`) holds: current, durable,
    /// in flight, being written, releasing. Zero entries are skipped.
    fn for_each_region(&self, c: u32, i: usize, mut f: impl FnMut(&Entry)) {
        let mut visit = |e: &Entry| {
            if !e.is_zero() {
                f(e);
            }
        };
        visit(&self.get(i));
        if let Some(p) = self.pins.get(&c) {
            visit(&p.durable);
            p.inflight.iter().for_each(&mut visit);
            p.writing.iter().for_each(&mut visit);
            p.releasing.iter().for_each(&mut visit);
        }
    }

    /// Union of the units cluster `c` (local index `i`) occupies in `slot`: current, durable,
    /// in flight, releasing, being written.
    pub fn live_mask(&self, c: u32, i: usize, slot: u32) -> u32 {
        let mut m = 0;
        self.for_each_region(c, i, |e| {
            if e.slot == slot {
                m |= e.mask();
            }
        });
        m
    }

    /// Slots cluster `c` holds regions in (at most a handful).
    pub fn owned_slots(&self, c: u32, i: usize, out: &mut Vec<u32>) {
        out.clear();
        self.for_each_region(c, i, |e| {
            if !out.contains(&e.slot) {
                out.push(e.slot);
            }
        });
    }

    /// Stale units of cluster `c` in `slot`.
    pub fn stale_mask(&self, c: u32, slot: u32) -> u32 {
        self.pins
            .get(&c)
            .and_then(|p| p.stale.iter().find(|s| s.slot == slot))
            .map_or(0, |s| s.mask)
    }

    /// Adds `mask` to the stale units of `c` in `slot`, dated `now` (an existing entry is
    /// re-dated). Returns true when the entry is new (the caller queues it for the writer; a
    /// re-dated one is queued already, and the writer re-queues it when it finds it younger).
    pub fn add_stale(&mut self, c: u32, i: usize, slot: u32, mask: u32, now: u64) -> bool {
        let p = self.pins_mut(c, i);
        match p.stale.iter_mut().find(|s| s.slot == slot) {
            Some(s) => {
                s.mask |= mask;
                s.since = now;
                false
            }
            None => {
                p.stale.push(StaleUnits {
                    slot,
                    mask,
                    since: now,
                });
                true
            }
        }
    }

    /// Date of the stale units of `c` in `slot`, if it has any there.
    pub fn stale_since(&self, c: u32, slot: u32) -> Option<u64> {
        self.pins
            .get(&c)
            .and_then(|p| p.stale.iter().find(|s| s.slot == slot))
            .map(|s| s.since)
    }

    /// Removes `mask` from the stale units of `c` in `slot` (a new version is placed over them).
    /// Returns true when that removed the cluster's whole stale entry for the slot.
    pub fn cover_stale(&mut self, c: u32, slot: u32, mask: u32) -> bool {
        if let Some(p) = self.pins.get_mut(&c) {
            if let Some(k) = p.stale.iter().position(|s| s.slot == slot) {
                p.stale[k].mask &= !mask;
                if p.stale[k].mask == 0 {
                    p.stale.swap_remove(k);
                    return true;
                }
            }
        }
        false
    }

    /// Takes all stale units of `c` in `slot` (its last live region there is gone, or the
    /// writer punches them).
    pub fn take_stale(&mut self, c: u32, slot: u32) -> u32 {
        let Some(p) = self.pins.get_mut(&c) else {
            return 0;
        };
        let Some(k) = p.stale.iter().position(|s| s.slot == slot) else {
            return 0;
        };
        p.stale.swap_remove(k).mask
    }

    /// Pins of `c`, created from the current entry (which then equals the durable one).
    pub fn pins_mut(&mut self, c: u32, i: usize) -> &mut Pins {
        let cur = self.get(i);
        self.pins.entry(c).or_insert_with(|| Pins {
            durable: cur,
            ..Pins::default()
        })
    }

    /// Drops the pins of `c` when they protect nothing beyond the current entry.
    pub fn tidy(&mut self, c: u32, i: usize) {
        let cur = self.get(i);
        if let Some(p) = self.pins.get(&c) {
            if p.durable == cur
                && p.inflight.is_none()
                && !p.dirty
                && p.releasing.is_empty()
                && p.writing.is_none()
                && p.stale.is_empty()
            {
                self.pins.remove(&c);
            }
        }
    }

    /// Commit snapshot: moves every dirty cluster's current entry into `out` and marks it as the
    /// entry in flight (from now on its region counts as committed: trap 1).
    pub fn snapshot_dirty(&mut self, out: &mut Vec<(u32, DiskEntry)>) -> usize {
        let n = self.dirty.len();
        for k in 0..n {
            let c = self.dirty[k];
            let (_, i) = locate(c);
            let e = self.get(i);
            if let Some(p) = self.pins.get_mut(&c) {
                p.dirty = false;
                p.inflight = Some(e);
            }
            out.push((c, e.to_disk()));
        }
        self.dirty.clear();
        n
    }

    /// The commit that snapshotted `c` is durable: its entry becomes the durable one. The entry
    /// it replaces, when nothing references it any more, moves to `releasing` and is pushed to
    /// `frees` (to be punched, then its slot returned).
    pub fn commit_done(&mut self, c: u32, i: usize, frees: &mut Vec<(u32, Entry)>) {
        let cur = self.get(i);
        if let Some(p) = self.pins.get_mut(&c) {
            if let Some(newd) = p.inflight.take() {
                let old = std::mem::replace(&mut p.durable, newd);
                if !old.is_zero() && old != newd && old != cur && p.writing != Some(old) {
                    p.releasing.push(old);
                    frees.push((c, old));
                }
            }
        }
        self.tidy(c, i);
    }

    /// A released region has been punched: forget it. Returns, when `c` holds nothing live
    /// in that slot any more, the mask of its stale units there (taken: the caller returns the
    /// slot to the allocator, stale with that mask or clean when 0); `None` while it still holds
    /// something there.
    pub fn release_done(&mut self, c: u32, i: usize, e: &Entry) -> Option<u32> {
        if let Some(p) = self.pins.get_mut(&c) {
            if let Some(k) = p.releasing.iter().position(|r| r == e) {
                p.releasing.swap_remove(k);
            }
        }
        let free = self.live_mask(c, i, e.slot) == 0;
        let stale = if free {
            Some(self.take_stale(c, e.slot))
        } else {
            None
        };
        self.tidy(c, i);
        stale
    }

    /// The entry as of the last commit (durable or in flight): what a checkpoint must contain.
    pub fn committed_view(&self, c: u32, i: usize) -> Entry {
        match self.pins.get(&c) {
            Some(p) => p.inflight.unwrap_or(p.durable),
            None => self.get(i),
        }
    }

    /// Clusters changed and not yet durable.
    pub fn uncommitted(&self) -> u64 {
        self.pins
            .values()
            .filter(|p| p.dirty || p.inflight.is_some())
            .count() as u64
    }

    /// Bytes of RAM this stripe holds.
    pub fn ram_bytes(&self) -> u64 {
        (self.slots.capacity() * 4 + self.crcs.capacity() * 4 + self.metas.capacity() * 2) as u64
            + (self.pins.capacity() * (std::mem::size_of::<Pins>() + 8)) as u64
            + (self.busy.capacity() * (std::mem::size_of::<Busy>() + 8)) as u64
            + (self.dirty.capacity() * 4) as u64
    }
}

/// A stripe with its condition variable, on its own cache lines.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct StripeCell {
    /// The stripe.
    pub stripe: Mutex<Stripe>,
    /// Signalled when a busy cluster of this stripe is released.
    pub cv: Condvar,
}

/// The whole table.
#[derive(Debug)]
pub struct Table {
    /// The stripes.
    pub cells: Box<[StripeCell]>,
    /// Number of clusters.
    pub cluster_count: u64,
}

/// (stripe, local index) of a cluster.
pub fn locate(c: u32) -> (usize, usize) {
    ((c as usize) & (STRIPES - 1), (c >> STRIPE_SHIFT) as usize)
}

impl Table {
    /// A table of `layout.cluster_count` zero clusters.
    pub fn new(layout: &Layout) -> Table {
        let n = layout.cluster_count as usize;
        let cells: Box<[StripeCell]> = (0..STRIPES)
            .map(|s| {
                let len = if s < n { (n - s).div_ceil(STRIPES) } else { 0 };
                StripeCell {
                    stripe: Mutex::new(Stripe {
                        slots: vec![0; len],
                        crcs: vec![0; len],
                        metas: vec![0; len],
                        ..Stripe::default()
                    }),
                    cv: Condvar::new(),
                }
            })
            .collect();
        Table {
            cells,
            cluster_count: layout.cluster_count,
        }
    }

    /// Sets an entry while loading (exclusive access, no locking cost).
    pub fn load_set(&mut self, c: u32, e: Entry) {
        let (s, i) = locate(c);
        let stripe = self.cells[s]
            .stripe
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        stripe.set(i, e);
    }

    /// Calls `f(cluster, entry)` for every cluster whose current entry stores something, one
    /// stripe lock per stripe (a walk of a large table locking per cluster costs ~10× more).
    pub fn for_each_stored(&self, mut f: impl FnMut(u32, Entry)) {
        for (s, cell) in self.cells.iter().enumerate() {
            let stripe = lock(&cell.stripe);
            let mut i = 0usize;
            loop {
                let c = (i * STRIPES + s) as u64;
                if c >= self.cluster_count {
                    break;
                }
                let e = stripe.get(i);
                if !e.is_zero() {
                    f(c as u32, e);
                }
                i += 1;
            }
        }
    }

    /// Current entry (locks the stripe).
    pub fn current(&self, c: u32) -> Entry {
        let (s, i) = locate(c);
        lock(&self.cells[s].stripe).get(i)
    }

    /// Replaces this table's contents with `other`'s (both must describe the same geometry).
    pub fn replace_with(&self, other: Table) {
        for (mine, theirs) in self.cells.iter().zip(Vec::from(other.cells)) {
            let mut m = lock(&mine.stripe);
            *m = theirs
                .stripe
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_packs_into_ten_bytes_of_fields_and_round_trips() {
        let e = Entry::stored(123_456, 31, 1, alg::ZSTD, 0xabcd_ef01);
        assert_eq!(e.alg(), alg::ZSTD);
        assert_eq!(e.unit(), 31);
        assert_eq!(e.units(), 1);
        let e = Entry::stored(7, 0, 32, alg::RAW, 9);
        assert_eq!(e.units(), 32);
        assert_eq!(e.mask(), u32::MAX);
        assert_eq!(Entry::from_disk(&e.to_disk()), e);
        assert!(Entry::ZERO.is_zero());
        assert_eq!(Entry::ZERO.mask(), 0);
    }

    #[test]
    fn buffered_sectors_are_tracked_and_overlaid_exactly() {
        let mut b = Buffered::new(16384);
        assert!(!b.is_complete());
        b.merge(512, &[7u8; 1024], &mut Vec::new());
        assert!(b.covers(512, 1024));
        assert!(!b.covers(0, 1024));
        assert!(!b.covers(1024, 1024));
        let mut out = vec![1u8; 2048];
        b.overlay(0, &mut out);
        assert_eq!(&out[..512], &[1u8; 512][..]);
        assert_eq!(&out[512..1536], &[7u8; 1024][..]);
        assert_eq!(&out[1536..], &[1u8; 512][..]);
        let mut out = vec![1u8; 512];
        b.overlay(1024, &mut out);
        assert_eq!(out, vec![7u8; 512]);
        b.merge(0, &[9u8; 16384], &mut Vec::new());
        assert!(b.is_complete());
        let mut whole = vec![0u8; 16384];
        b.overlay(0, &mut whole);
        assert_eq!(whole, vec![9u8; 16384]);
        let mut b = Buffered::new(128 * 1024);
        b.merge(0, &vec![3u8; 128 * 1024], &mut Vec::new());
        assert!(b.is_complete());
        // Pages are allocated only where writes land, and a write across a page boundary
        // fills both.
        let mut b = Buffered::new(65536);
        assert_eq!(b.pages_missing(4096 - 512, 1024), 2);
        let mut spare = Buffered::new_pages(3);
        b.merge(4096 - 512, &[5u8; 1024], &mut spare);
        assert_eq!(spare.len(), 1, "the missing pages come from the spares");
        assert_eq!(b.pages.iter().filter(|p| p.is_some()).count(), 2);
        assert_eq!(b.pages_missing(0, 8192), 0);
        assert_eq!(b.pages_missing(0, 8193), 1);
        let mut out = vec![0u8; 2048];
        b.overlay(3072, &mut out);
        assert_eq!(&out[..512], &[0u8; 512][..]);
        assert_eq!(&out[512..1536], &[5u8; 1024][..]);
        assert_eq!(&out[1536..], &[0u8; 512][..]);
    }

    #[test]
    fn unit_masks_cover_exactly_the_units() {
        assert_eq!(unit_mask(0, 1), 1);
        assert_eq!(unit_mask(3, 2), 0b11000);
        assert_eq!(unit_mask(8, 8), 0xff00);
        assert_eq!(unit_mask(0, 0), 0);
    }
}
