//! The write-back buffer: merging of partial-cluster writes in the volatile window.
//!
//! A write smaller than a cluster would otherwise cost a read-modify-write of the whole cluster
//! (read, verify, decompress, merge, compress, write out of place). Here it is copied into a
//! per-cluster entry ([`Buffered`], kept in the cluster's stripe) and completes; later writes to
//! the same cluster merge into the entry. The entry is stored as one new version of the cluster
//! (one compress + place, and no read at all when the writes covered the whole cluster):
//! - at once, by the write that completes the cluster (sequential small writes);
//! - by a FLUSH, before it asks for its commit (I2: every write completed before the FLUSH is in
//!   that commit's snapshot);
//! - by the metadata writer before a timer commit, and by quiesce/close before the final commit.
//!
//! Nothing buffered is referenced by metadata, so I1 and I3 are untouched: a crash loses the
//! buffered writes exactly like it loses any completed write not yet covered by a FLUSH, and the
//! stored version is always a whole cluster as the guest had written it at some moment.
//!
//! Exclusion: an entry is read or changed only by a holder of its cluster's exclusion (writers
//! change it, readers overlay it), under the stripe lock for the copy itself. An entry stays in
//! its stripe until the version made from it is published, so a FLUSH that looks for buffered
//! clusters while another thread stores one waits for that cluster and then finds it stored.
//!
//! RAM is bounded by `wb_limit` entries of one cluster each: when the buffer is full, partial
//! writes to clusters without an entry are stored at once (the old read-modify-write path).

use std::cell::RefCell;
use std::sync::atomic::Ordering;

use super::{with_scratch, Change, ClusterGuard, Core};
use crate::image::format::BLOCK_USIZE;
use crate::image::table::{locate, lock, Buffered, Entry};
use crate::image::Result;

thread_local! {
    /// Whole-cluster buffer for storing an entry (apart from `Scratch`, which the store uses).
    static WB_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Core {
    /// A partial write of `d` at byte `at` of cluster `c` (writer exclusion held): merged into
    /// the cluster's buffer entry. Returns false when the buffer is full and the caller must
    /// store the write itself.
    pub(super) fn buffer_write(
        &self,
        c: u32,
        cur: Entry,
        changes: u64,
        at: usize,
        d: &[u8],
    ) -> Result<bool> {
        let (s, _) = locate(c);
        let cell = &self.table.cells[s];
        // Pages the entry lacks are allocated before the lock is taken for the copy (this thread
        // holds the cluster: the entry cannot gain or lose pages in between; if it did, `merge`
        // would still allocate what it lacks).
        let missing = lock(&cell.stripe)
            .buffered
            .get(&c)
            .map(|b| b.pages_missing(at, d.len()));
        let complete = missing.and_then(|missing| {
            let mut spare = Buffered::new_pages(missing);
            let mut st = lock(&cell.stripe);
            st.buffered.get_mut(&c).map(|b| {
                b.merge(at, d, &mut spare);
                b.is_complete()
            })
        });
        let complete = match complete {
            Some(complete) => complete,
            None => {
                if self.wb_entries.fetch_add(1, Ordering::AcqRel) >= self.wb_limit {
                    self.wb_entries.fetch_sub(1, Ordering::AcqRel);
                    return Ok(false);
                }
                // The stored version is verified now (not decoded): a partial write into a
                // corrupt cluster fails itself (I4), not a later FLUSH.
                if let Err(e) = self.verify_stored(c, &cur) {
                    self.wb_entries.fetch_sub(1, Ordering::AcqRel);
                    return Err(e);
                }
                // Allocated outside the stripe lock; nobody else adds an entry for `c` (this
                // thread holds the cluster).
                let mut b = Box::new(Buffered::new(self.layout.cluster_size as usize));
                b.merge(at, d, &mut Vec::new());
                let complete = b.is_complete();
                lock(&cell.stripe).buffered.insert(c, b);
                complete
            }
        };
        if complete {
            self.buffer_store(c, cur, changes)?;
        }
        Ok(true)
    }

    /// A whole-cluster write or zeroing replaces whatever is buffered for `c` (writer exclusion
    /// held).
    pub(super) fn buffer_discard(&self, c: u32) {
        if self.wb_entries.load(Ordering::Acquire) == 0 {
            return;
        }
        let (s, _) = locate(c);
        if lock(&self.table.cells[s].stripe)
            .buffered
            .remove(&c)
            .is_some()
        {
            self.wb_entries.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Stores `c`'s buffer entry as a new version of the cluster (writer exclusion held) and then
    /// drops the entry. On failure the entry stays buffered.
    fn buffer_store(&self, c: u32, cur: Entry, changes: u64) -> Result<()> {
        let (s, _) = locate(c);
        let cell = &self.table.cells[s];
        let cs = self.layout.cluster_size as usize;
        WB_SCRATCH.with(|cell_buf| {
            let mut content = cell_buf.borrow_mut();
            content.resize(cs, 0);
            let complete = {
                let st = lock(&cell.stripe);
                let Some(b) = st.buffered.get(&c) else {
                    return Ok(());
                };
                let complete = b.is_complete();
                if complete {
                    b.overlay(0, &mut content);
                }
                complete
            };
            if !complete {
                // The sectors not written come from the stored version.
                self.load_base(c, &cur, &mut content)?;
                let st = lock(&cell.stripe);
                if let Some(b) = st.buffered.get(&c) {
                    b.overlay(0, &mut content);
                }
            }
            self.write_locked(c, cur, changes, Change::Full(&content))
        })?;
        if lock(&cell.stripe).buffered.remove(&c).is_some() {
            self.wb_entries.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Reads the stored version `cur` of cluster `c` and checks its crc32c.
    fn verify_stored(&self, c: u32, cur: &Entry) -> Result<()> {
        if cur.is_zero() {
            return Ok(());
        }
        with_scratch(|sc| {
            let len = cur.units() as usize * BLOCK_USIZE;
            sc.stored.resize(len.max(sc.stored.len()), 0);
            let buf = &mut sc.stored[..len];
            let off = self.layout.region_offset(cur.slot, cur.unit());
            self.storage
                .read_at(off, buf)
                .map_err(Core::io("read data", off))?;
            self.verify(c, cur, buf)
        })
    }

    /// The stored version `cur` of cluster `c`, decoded into `out` (zeros for a zero cluster).
    fn load_base(&self, c: u32, cur: &Entry, out: &mut [u8]) -> Result<()> {
        if cur.is_zero() {
            out.fill(0);
            return Ok(());
        }
        with_scratch(|sc| self.load_payload(c, cur, &mut sc.codecs, &mut sc.stored, out))
    }

    /// Read hook (reader exclusion held, `e` the current entry): when `c` has buffered writes,
    /// fills `out` (bytes `at..` of the cluster) from them over the stored version and returns
    /// true; false when nothing is buffered for `c`.
    pub(super) fn read_buffered(
        &self,
        c: u32,
        e: &Entry,
        at: usize,
        out: &mut [u8],
    ) -> Result<bool> {
        let (s, _) = locate(c);
        let cell = &self.table.cells[s];
        {
            let st = lock(&cell.stripe);
            let Some(b) = st.buffered.get(&c) else {
                return Ok(false);
            };
            if b.covers(at, out.len()) {
                b.overlay(at, out);
                return Ok(true);
            }
        }
        let cs = self.layout.cluster_size as usize;
        WB_SCRATCH.with(|cell_buf| {
            let mut base = cell_buf.borrow_mut();
            base.resize(cs, 0);
            self.load_base(c, e, &mut base)?;
            out.copy_from_slice(&base[at..at + out.len()]);
            // Readers exclude writers: the entry cannot have changed meanwhile.
            if let Some(b) = lock(&cell.stripe).buffered.get(&c) {
                b.overlay(at, out);
            }
            Ok(true)
        })
    }

    /// Clusters that have buffer entries now.
    fn buffered_clusters(&self) -> Vec<u32> {
        let mut out = Vec::new();
        if self.wb_entries.load(Ordering::Acquire) == 0 {
            return out;
        }
        for cell in self.table.cells.iter() {
            let st = lock(&cell.stripe);
            out.extend(st.buffered.keys().copied());
        }
        out
    }

    /// Stores every buffered cluster (FLUSH, quiesce). Waits for clusters other requests hold.
    /// Returns the first error (the entries not stored stay buffered); the caller reports it,
    /// rate-limited. After a host ENOSPC the rest is not tried: each attempt would merge and
    /// compress a cluster only to fail the same way (on a full host filesystem every FLUSH
    /// would otherwise redo that for the whole buffer).
    pub fn write_back_all(&self) -> Result<()> {
        let mut first_err = None;
        for c in self.buffered_clusters() {
            let (_guard, cur, changes) = self.lock_cluster(c, true);
            if let Err(e) = self.buffer_store(c, cur, changes) {
                log::debug!("storing buffered writes of cluster {c} failed: {e}");
                let out_of_space = e.is_host_out_of_space();
                first_err.get_or_insert(e);
                if out_of_space {
                    break;
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The metadata writer's write-back before a timer commit: skips clusters a request holds
    /// (their holder or the next round stores them; waiting could deadlock with a writer that
    /// waits for this thread's commit) and stops when no slot is free (this thread is the one
    /// that frees slots).
    pub fn write_back_idle(&self) {
        for c in self.buffered_clusters() {
            let Some((_guard, cur, changes)) = self.try_lock_cluster_writer(c) else {
                continue;
            };
            if let Err(e) = self.buffer_store(c, cur, changes) {
                log::debug!("timer write-back stopped at cluster {c}: {e}");
                return;
            }
        }
    }

    /// Writer exclusion of `c` if nobody holds or waits for the cluster.
    fn try_lock_cluster_writer(&self, c: u32) -> Option<(ClusterGuard<'_>, Entry, u64)> {
        let (s, i) = locate(c);
        let mut st = lock(&self.table.cells[s].stripe);
        let b = st.busy.entry(c).or_default();
        if b.writer || b.readers > 0 || b.waiters > 0 {
            return None;
        }
        b.writer = true;
        Some((
            ClusterGuard {
                core: self,
                cluster: c,
                writer: true,
            },
            st.get(i),
            st.changes,
        ))
    }

    /// Forgets every buffered write (the table is being replaced: a reload after another
    /// process wrote the image; a quiesce stored them before, unless that failed).
    pub(super) fn buffer_drop_all(&self) {
        let mut dropped = 0usize;
        for cell in self.table.cells.iter() {
            let mut st = lock(&cell.stripe);
            dropped += st.buffered.len();
            st.buffered.clear();
        }
        self.wb_entries.store(0, Ordering::Release);
        if dropped > 0 {
            log::warn!("{dropped} clusters of buffered writes dropped at reload");
        }
    }
}
