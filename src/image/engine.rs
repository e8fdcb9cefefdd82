//! The engine core shared by the public [`super::Image`] handle and its metadata writer thread.
//!
//! Data path (any number of threads): a request is split per cluster; each cluster operation
//! takes that cluster's reader/writer exclusion in its stripe, snapshots or publishes the entry
//! under the stripe lock for a few instructions, and does its I/O and (de)compression holding no
//! lock shared with other clusters. Placement never touches a region that a durable or in-flight
//! commit refers to, nor the current version (I1, trap 1).
//!
//! Metadata writer (one thread per image, see `commit`): snapshot dirty entries (they become
//! "in flight"), fdatasync data, write the journal record (or a checkpoint when the journal is
//! full), fdatasync, complete the flushes whose snapshot this was, then punch what the commit
//! freed and return the slots.

mod writeback;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::alloc::Allocator;
use super::codec::Codecs;
use super::format::{self, alg, DiskEntry, Layout, Superblock, BLOCK, BLOCK_USIZE};
use super::recovery::{self, Loaded, RecoveryMode};
use super::storage::Storage;
use super::table::{locate, lock, unit_mask, Entry, Stripe, Table};
use super::{Geometry, ImageError, LockPolicy, OpenOptions, Result, Stats, MAX_CLUSTER_SIZE};

/// Lifecycle states.
pub const RUNNING: u8 = 0;
/// I/O refused (quiescing, quiesced, closing).
pub const QUIESCED: u8 = 1;

const OP_SHARDS: usize = 16;
/// Freed regions punched between two looks at the commit triggers.
const RECLAIM_BATCH: usize = 32;
/// How long freed space (stale slots, clusters' stale units) waits for reuse before the writer
/// punches it, at least (two commit intervals when that is longer). Long enough that a cluster
/// rewritten every few seconds (a guest rewriting a file, sequential passes over a small disk)
/// finds its freed units unpunched: each punch costs a synchronous discard under the file's
/// inode lock on a `discard` mount (~90 µs here, blocking every data write meanwhile), and the
/// next version then writes into a hole.
const STALE_GRACE: Duration = Duration::from_secs(10);
/// Most freed, unpunched regions (queued stale units plus stale free slots) kept waiting for
/// reuse; beyond it the oldest are punched at once, whatever their age. Bounds the host space
/// they hold (at most this many slots' worth) and the punching a close must do before it parks
/// the writer (~1.5 s at ~90 µs per punch on a `discard` mount; a quiesce leaves them listed).
const STALE_BACKLOG_MAX: usize = 16384;
/// Checkpoints of a table this large (in 4 KiB chunks: 1 MiB, 65,280 clusters) or larger are
/// written ahead of need; a smaller one costs a commit a few milliseconds at most.
const AHEAD_MIN_CHUNKS: u64 = 256;
/// A checkpoint written ahead is finished by the next commit once at most this many chunks are
/// left to write (256 KiB: well under a millisecond of writing).
const AHEAD_FINISH_MAX_CHUNKS: u64 = 64;
/// Most slots whose unreferenced space an open after a quiesce hands to the writer's deferred
/// reclaim (`adopt_unreferenced`); a quiesce leaves at most about `STALE_BACKLOG_MAX` of them.
/// Beyond it the open punches the rest itself, like after a crash.
const ADOPT_MAX: usize = 4 * STALE_BACKLOG_MAX;

/// Per-thread request counters, each on its own cache lines.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct OpShard {
    active: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    checksum_errors: AtomicU64,
}

static NEXT_THREAD_SHARD: AtomicU64 = AtomicU64::new(0);
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);
static ZEROS: [u8; MAX_CLUSTER_SIZE as usize] = [0; MAX_CLUSTER_SIZE as usize];

thread_local! {
    static THREAD_SHARD: usize = (NEXT_THREAD_SHARD.fetch_add(1, Ordering::Relaxed) as usize) % OP_SHARDS;
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// Set on the metadata writer thread: a placement that finds no free slot fails instead of
    /// waiting for a commit (that thread is the one that would make it).
    static NO_SPACE_WAIT: Cell<bool> = const { Cell::new(false) };
}

/// Identity of a cached decompressed cluster: image generation, cluster, its entry, and its
/// stripe's change counter when the entry was read (the entry alone is not unique, see
/// [`super::table::Stripe::changes`]).
type CacheKey = (u64, u32, Entry, u64);

/// Decompressed clusters kept per thread (for partial writes and partial reads).
const CACHE_SLOTS: usize = 4;

#[derive(Default)]
struct CacheSlot {
    key: Option<CacheKey>,
    data: Vec<u8>,
    stamp: u64,
}

/// Per-thread buffers and codec contexts: no allocation per request once warmed up.
#[derive(Default)]
struct Scratch {
    codecs: Codecs,
    comp: Vec<u8>,
    stored: Vec<u8>,
    merge: Vec<u8>,
    owned: Vec<u32>,
    cache: Vec<CacheSlot>,
    clock: u64,
}

impl Scratch {
    fn cache_find(&mut self, key: &CacheKey) -> Option<usize> {
        self.clock += 1;
        let now = self.clock;
        let k = self
            .cache
            .iter()
            .position(|s| s.key.as_ref() == Some(key))?;
        self.cache[k].stamp = now;
        Some(k)
    }

    /// A cache slot to fill (the least recently used), with its key cleared.
    fn cache_victim(&mut self, cluster: usize) -> usize {
        if self.cache.len() < CACHE_SLOTS {
            self.cache.push(CacheSlot::default());
        }
        let k = self
            .cache
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.stamp)
            .map(|(k, _)| k)
            .unwrap_or(0);
        let slot = &mut self.cache[k];
        slot.key = None;
        slot.data.resize(cluster, 0);
        k
    }
}

/// The checksum of a stored payload kept in its table entry: crc32c (CRC-32/ISCSI), the same
/// function as `crc32c::crc32c`, computed with `crc-fast`, whose AVX-512/VPCLMULQDQ folding
/// (with runtime detection and fallbacks) checks a 64 KiB payload in ~0.6 µs on this machine's
/// CPU against ~3.5 µs for the crc32c crate's SSE4.2 loop. Every read of a 64 KiB raw cluster
/// verifies the whole payload (I4), even for a 4 KiB request, so this is on the hot read path;
/// every stored version computes one, and `check` verifies every payload with it.
pub(crate) fn payload_checksum(bytes: &[u8]) -> u32 {
    // CRC-32 results occupy the low 32 bits of the u64 crc-fast returns for every width.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Gives the allocator's free memory back to the kernel; called when the image goes idle or
/// parks. The write-back buffer's pages (up to `--write-buffer` in all) are freed once their
/// cluster is stored, but glibc keeps freed chunks below its mmap threshold in its arenas:
/// without this an idle backend stays at its busiest resident size (measured with the
/// side-by-side bench, 64 KiB clusters: 51 MiB idle after 4 KiB random writes, 13 MiB with it).
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions: it takes each arena's lock itself and only
    // returns whole free pages of the allocator's own free lists to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // Compare in u64 words where aligned; the compiler vectorises the fold.
        let n = b.len() / 8 * 8;
        (&b[..0], &b[..n], &b[n..])
    };
    pre.is_empty()
        && mid.chunks_exact(8).fold(0u64, |acc, w| {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            acc | u64::from_ne_bytes(a)
        }) == 0
        && post.iter().all(|&x| x == 0)
}

/// Calls `f(first unit, unit count)` for every run of set bits in `mask`.
fn for_each_run(mask: u32, mut f: impl FnMut(u32, u32)) {
    let mut m = mask;
    while m != 0 {
        let start = m.trailing_zeros();
        let len = (m >> start).trailing_ones();
        f(start, len);
        m &= !unit_mask(start, len);
    }
}

/// Where in a slot of `per_slot` units a new version of `units` units goes, given the units
/// its cluster holds there (`live`) and its stale units (`stale`); `None` when it does not fit.
/// Against an edge of the slot when possible: the next version must fit beside this one, and an
/// edge leaves it the largest run (`per_slot - units`), so a cluster ping-pongs between the two
/// ends of its home slot instead of drifting into the middle and out. Among the fitting
/// positions (edges, else any), the one that overwrites the most stale units (the lowest on a
/// tie): every stale unit overwritten is one the writer need not punch and one block the host
/// need not allocate again.
fn best_gap(live: u32, stale: u32, units: u32, per_slot: u32) -> Option<u32> {
    let last = per_slot.checked_sub(units)?;
    let fits = |u: u32| live & unit_mask(u, units) == 0;
    let covered = |u: u32| (stale & unit_mask(u, units)).count_ones();
    let pick = |cands: &mut dyn Iterator<Item = u32>| {
        let mut best: Option<(u32, u32)> = None;
        for u in cands.filter(|&u| fits(u)) {
            let c = covered(u);
            if best.is_none_or(|(_, b)| c > b) {
                best = Some((u, c));
            }
        }
        best.map(|(u, _)| u)
    };
    pick(&mut [0, last].into_iter()).or_else(|| pick(&mut (0..=last)))
}

/// What releasing a region did (see `Core::dispose`).
enum Disposed {
    /// The cluster's last region in its slot: the slot went back to the allocator.
    SlotFreed,
    /// The region became the cluster's stale units in this slot (to queue for the writer).
    Stale(u32),
    /// The region was not (or no longer) pinned as releasing.
    Nothing,
}

/// Writer-thread control block (taken by flushes and by the writer, never per read/write).
#[derive(Debug, Default)]
pub struct Ctl {
    /// Snapshots begun.
    pub begun: u64,
    /// Highest snapshot whose commit is durable.
    pub durable: u64,
    /// A flush waits.
    pub flush_waiting: bool,
    /// Free-slot or journal pressure.
    pub pressure: bool,
    /// The next commit must write a checkpoint.
    pub checkpoint: bool,
    /// The writer must exit.
    pub stop: bool,
    /// With `stop`: exit without punching the freed space still waiting for reuse (a quiesce:
    /// the pause must not wait for it). It stays listed in memory for a resume of this process,
    /// and the clean-close marker tells any other opener to reclaim it.
    pub keep_freed: bool,
    /// The writer failed: no further commit is attempted.
    pub failed: Option<String>,
}

/// State only the writer (or a quiesced lifecycle call) touches.
#[derive(Debug, Default)]
pub struct Meta {
    /// Last durable commit sequence number.
    pub last_seq: u64,
    /// Where the next journal record goes.
    pub journal_head: u64,
    /// Checkpoint area holding the newest checkpoint.
    pub active_area: usize,
    /// Checkpoint header seqs as last seen or written.
    pub area_seqs: [Option<u64>; 2],
    /// Metadata loaded at least once.
    pub loaded: bool,
    /// The last journal record is a clean-close marker (written by `mark_clean`, a closing
    /// checkpoint, or found at load): `mark_open` must follow it before the next write.
    pub clean_marked: bool,
    /// That marker carries [`format::RECORD_SPACE_UNRECLAIMED`].
    pub marked_unreclaimed: bool,
    /// That marker is the writer's idle marker ([`Core::mark_idle_if_quiet`]), written without
    /// a flush: the next record takes its block instead of following it, so that no record can
    /// reach the disk after a marker that did not (recovery would find a valid record after a
    /// damaged one and take it for lost commits).
    pub idle_marked: bool,
    /// That marker carries [`format::RECORD_LOSS_UNREPORTED`].
    pub marked_loss: bool,
    /// The last journal record was written without a flush (the idle marker, or the record that
    /// replaced it): it must reach the disk before any record in a later block is written.
    /// (A commit flushes the data, and with it that record, before it writes its own.)
    pub journal_unflushed: bool,
    /// The checkpoint being written ahead of need, if any (see [`Core::checkpoint_ahead_step`]).
    pub ahead: Option<recovery::CheckpointAhead>,
    /// Writing one ahead failed in this journal cycle: the next checkpoint is written in one go
    /// (and reports what fails there), not started again and again.
    ahead_failed: bool,
    records: Vec<(u32, DiskEntry)>,
    buf: Vec<u8>,
}

impl Meta {
    /// The journal now ends with an empty record carrying `flags`, flushed or not.
    fn ends_with_empty_record(&mut self, flags: u32, flushed: bool) {
        self.clean_marked = flags & format::RECORD_CLEAN_CLOSE != 0;
        self.marked_unreclaimed = flags & format::RECORD_SPACE_UNRECLAIMED != 0;
        self.marked_loss = flags & format::RECORD_LOSS_UNREPORTED != 0;
        self.idle_marked = false;
        self.journal_unflushed = !flushed;
    }
}

/// Which part of a cluster a write replaces.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// The whole cluster.
    Full(&'a [u8]),
    /// The whole cluster becomes zeros.
    Zero,
    /// Bytes at an offset inside the cluster.
    Partial(usize, &'a [u8]),
}

/// The engine core.
pub struct Core {
    pub storage: Arc<dyn Storage>,
    pub sb: Superblock,
    pub layout: Layout,
    pub geometry: Geometry,
    pub read_only: bool,
    pub break_order: bool,
    pub commit_interval: Duration,
    pub lock_policy: LockPolicy,
    pub table: Table,
    pub alloc: Allocator,
    pub state: AtomicU8,
    shards: Box<[OpShard]>,
    pub ctl: Mutex<Ctl>,
    pub writer_cv: Condvar,
    pub done_cv: Condvar,
    space: Mutex<()>,
    space_cv: Condvar,
    pub meta: Mutex<Meta>,
    failed: AtomicBool,
    pressure: AtomicBool,
    dirty_count: AtomicU64,
    pub commits: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Checkpoints written ahead of need (a subset of `checkpoints`).
    pub checkpoints_ahead: AtomicU64,
    /// Smallest table (in checkpoint chunks) whose checkpoints are written ahead of need; 0:
    /// always, whatever the table holds (tests).
    pub ahead_min_chunks: u64,
    /// A checkpoint written ahead is finished by the next commit once at most this many chunks
    /// are left to write ([`AHEAD_FINISH_MAX_CHUNKS`]; 0 in tests, so that small tables go
    /// through the writing of changed chunks again too).
    pub ahead_finish_max: u64,
    generation: AtomicU64,
    low_water: u64,
    dirty_limit: u64,
    corruption_logs: AtomicU64,
    pending_frees: Mutex<Vec<(u32, Entry)>>,
    pending_count: std::sync::atomic::AtomicUsize,
    /// Origin of the millisecond clock that dates stale slots.
    started: Instant,
    /// Stale slots and stale units not reused for this long are punched by the writer.
    stale_grace: Duration,
    /// Clusters' stale units to punch once their grace period is over: (cluster, slot, date),
    /// oldest first. An item whose date no longer matches the cluster's entry is outdated.
    stale_queue: Mutex<VecDeque<(u32, u32, u64)>>,
    /// Clusters' stale-unit entries (one per cluster and slot) right now.
    stale_entries: AtomicUsize,
    /// Most clusters the write-back buffer holds (0: no buffering).
    wb_limit: usize,
    /// Clusters in the write-back buffer.
    wb_entries: std::sync::atomic::AtomicUsize,
    /// A loss found at load (see `Image::recovered_after_unclean_shutdown`) that no successful
    /// FLUSH has followed yet: the guest may not know. Every clean-close marker (quiesce, close,
    /// idle) records it, so a backend restarted before the guest's next FLUSH still reports it.
    pub loss_unreported: AtomicBool,
    /// Raised by the writer while it decides to end the journal with an idle marker
    /// ([`Core::mark_idle_if_quiet`]); a write, WRITE_ZEROES or DISCARD that completes while it
    /// is raised reopens the journal before it returns.
    idle_marking: AtomicBool,
    /// Serialises [`Core::mark_idle_if_quiet`] (the writer after a timer commit, a FLUSH that
    /// reported a loss): the flag protocol assumes one marker at a time (a second one lowering
    /// the flag between the first one's raise and its last look would let a mutation complete
    /// unseen).
    idle_marker_turn: Mutex<()>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("geometry", &self.geometry)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Holds one cluster's reader or writer exclusion.
struct ClusterGuard<'a> {
    core: &'a Core,
    cluster: u32,
    writer: bool,
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let (s, _) = locate(self.cluster);
        let cell = &self.core.table.cells[s];
        let mut st = lock(&cell.stripe);
        let mut notify = false;
        let mut remove = false;
        if let Some(b) = st.busy.get_mut(&self.cluster) {
            if self.writer {
                b.writer = false;
            } else {
                b.readers = b.readers.saturating_sub(1);
            }
            notify = b.waiters > 0;
            remove = !b.writer && b.readers == 0 && b.waiters == 0;
        }
        if remove {
            st.busy.remove(&self.cluster);
        }
        drop(st);
        if notify {
            cell.cv.notify_all();
        }
    }
}

/// Keeps an operation counted as active (quiesce waits for it).
pub struct OpGuard<'a> {
    shard: &'a OpShard,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        self.shard.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn shard_index() -> usize {
    THREAD_SHARD.with(|s| *s)
}

impl Core {
    /// A core for `sb` with nothing loaded yet, run as `opts` say.
    pub fn new(storage: Arc<dyn Storage>, sb: Superblock, opts: &OpenOptions) -> Core {
        let read_only = opts.read_only;
        let write_buffer_bytes = opts.write_buffer_bytes;
        let commit_interval = opts.commit_interval.max(Duration::from_millis(1));
        let stale_grace = opts.test_stale_grace;
        let layout = sb.layout.clone();
        let wb_limit = if read_only {
            0
        } else {
            (write_buffer_bytes / u64::from(layout.cluster_size)) as usize
        };
        let geometry = Geometry {
            size: layout.size,
            cluster_size: layout.cluster_size,
            compression: sb.compression,
            uuid: uuid::Uuid::from_bytes(sb.uuid).hyphenated().to_string(),
            format_version: format::FORMAT_VERSION,
        };
        // Half the spare pool: the commit this asks for runs while the other half is used.
        let low_water = (layout.spare_slots / 2).max(8);
        // Keep one commit's record well inside the journal.
        let dirty_limit = ((layout.journal_size / 4) / format::JR_ENTRY_LEN as u64).max(256);
        Core {
            table: Table::new(&layout),
            alloc: Allocator::new(layout.slot_count()),
            storage,
            sb,
            layout,
            geometry,
            read_only,
            break_order: opts.test_break_commit_order,
            commit_interval,
            lock_policy: opts.lock,
            state: AtomicU8::new(QUIESCED),
            shards: (0..OP_SHARDS).map(|_| OpShard::default()).collect(),
            ctl: Mutex::new(Ctl::default()),
            writer_cv: Condvar::new(),
            done_cv: Condvar::new(),
            space: Mutex::new(()),
            space_cv: Condvar::new(),
            meta: Mutex::new(Meta::default()),
            failed: AtomicBool::new(false),
            pressure: AtomicBool::new(false),
            dirty_count: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoints_ahead: AtomicU64::new(0),
            ahead_min_chunks: opts
                .test_checkpoint_ahead_min_chunks
                .unwrap_or(AHEAD_MIN_CHUNKS),
            ahead_finish_max: match opts.test_checkpoint_ahead_min_chunks {
                Some(0) => 0,
                _ => AHEAD_FINISH_MAX_CHUNKS,
            },
            generation: AtomicU64::new(0),
            low_water,
            dirty_limit,
            corruption_logs: AtomicU64::new(0),
            pending_frees: Mutex::new(Vec::new()),
            pending_count: std::sync::atomic::AtomicUsize::new(0),
            started: Instant::now(),
            stale_grace: stale_grace.unwrap_or_else(|| (commit_interval * 2).max(STALE_GRACE)),
            stale_queue: Mutex::new(VecDeque::new()),
            stale_entries: AtomicUsize::new(0),
            wb_limit,
            wb_entries: std::sync::atomic::AtomicUsize::new(0),
            loss_unreported: AtomicBool::new(false),
            idle_marking: AtomicBool::new(false),
            idle_marker_turn: Mutex::new(()),
        }
    }

    fn io(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError {
        move |source| ImageError::Io { op, offset, source }
    }

    /// Installs a loaded table (writer stopped, no I/O running).
    pub fn install(&self, loaded: Loaded) -> Result<bool> {
        let clean = loaded.clean;
        self.buffer_drop_all();
        // What this process still listed as freed but unpunched (a quiesce parks without
        // punching) described the table being replaced: another process may have reused that
        // space since, so none of it may be punched now (I1). Whatever the new table does not
        // refer to is found again on the disk when its marker says so (`adopt_unreferenced`).
        lock(&self.stale_queue).clear();
        self.stale_entries.store(0, Ordering::Relaxed);
        {
            let mut pending = lock(&self.pending_frees);
            pending.clear();
            self.pending_count.store(0, Ordering::Release);
        }
        self.table.replace_with(loaded.table);
        recovery::rebuild_allocator(&self.table, &self.alloc)
            .map_err(ImageError::CorruptMetadata)?;
        let mut meta = lock(&self.meta);
        meta.last_seq = loaded.last_seq;
        meta.journal_head = loaded.journal_head;
        // Another process may have written since: nothing written ahead for the old state holds.
        meta.ahead = None;
        meta.ahead_failed = false;
        meta.active_area = loaded.base_area;
        meta.area_seqs = loaded.area_seqs;
        meta.loaded = true;
        meta.clean_marked = clean;
        meta.marked_unreclaimed = loaded.space_unreclaimed;
        meta.marked_loss = loaded.loss_unreported;
        meta.idle_marked = false;
        // A killed predecessor's last record (its idle marker, or the record that replaced it)
        // may be in the page cache only: flush before writing a record after it.
        meta.journal_unflushed = true;
        self.generation.store(
            NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.dirty_count.store(0, Ordering::Relaxed);
        // A writer failure is never cleared here (nor anywhere): see `fail`.
        let mut ctl = lock(&self.ctl);
        ctl.stop = false;
        ctl.keep_freed = false;
        ctl.flush_waiting = false;
        ctl.pressure = false;
        ctl.checkpoint = false;
        Ok(clean)
    }

    /// Loads the metadata from storage.
    pub fn load(&self) -> Result<Loaded> {
        if !self.read_only {
            // A previous process may have died after a failed fdatasync (or this one may have
            // seen one): the page cache can then hold metadata the disk never got. What a
            // writer builds on must come from the disk.
            let l = &self.layout;
            let ranges = [
                (l.checkpoint_offsets[0], l.checkpoint_area_size),
                (l.checkpoint_offsets[1], l.checkpoint_area_size),
                (l.journal_offset, l.journal_size),
            ];
            for (off, len) in ranges {
                if let Err(e) = self.storage.drop_cached(off, len) {
                    log::debug!("dropping cached metadata at byte {off}: {e}");
                }
            }
        }
        // Read-only opens are strict too: serving a table that is known to miss commits would
        // return stale data as if it were current. Only `check` loads leniently (to report).
        let loaded = if self.read_only {
            // Another process may be writing: see `load_settled`.
            recovery::load_settled(self.storage.as_ref(), &self.sb, RecoveryMode::Strict)?
        } else {
            recovery::load(self.storage.as_ref(), &self.sb, RecoveryMode::Strict)?
        };
        for p in &loaded.problems {
            log::warn!("{p}");
        }
        if loaded.records_replayed > 0 {
            log::debug!(
                "recovery replayed {} journal records up to commit {}",
                loaded.records_replayed,
                loaded.last_seq
            );
        }
        Ok(loaded)
    }

    /// True when the on-disk metadata no longer matches what this process last loaded or wrote
    /// (another process committed while we were quiesced).
    pub fn disk_changed(&self) -> bool {
        let meta = lock(&self.meta);
        if !meta.loaded {
            return true;
        }
        for area in 0..2 {
            let seq = recovery::read_checkpoint_header(self.storage.as_ref(), &self.sb, area)
                .ok()
                .map(|h| h.seq);
            if seq != meta.area_seqs[area] {
                return true;
            }
        }
        if meta.journal_head + BLOCK <= self.layout.journal_size {
            let mut b = vec![0u8; BLOCK_USIZE];
            let off = self.layout.journal_offset + meta.journal_head;
            if self.storage.read_at(off, &mut b).is_err() {
                return true;
            }
            if let Ok(h) = format::decode_record_header(
                &b,
                &self.sb.uuid,
                self.layout.journal_size - meta.journal_head,
            ) {
                if h.seq > meta.last_seq {
                    return true;
                }
            }
        }
        false
    }

    // ----- request admission -------------------------------------------------------------

    /// Admits a request (fails when quiesced).
    pub fn enter(&self) -> Result<OpGuard<'_>> {
        let shard = &self.shards[shard_index()];
        shard.active.fetch_add(1, Ordering::SeqCst);
        if self.state.load(Ordering::SeqCst) != RUNNING {
            shard.active.fetch_sub(1, Ordering::SeqCst);
            return Err(ImageError::Quiesced);
        }
        Ok(OpGuard { shard })
    }

    /// Waits until no admitted request is running (after the state left RUNNING).
    pub fn drain(&self) {
        let mut spins = 0u32;
        loop {
            let active: u64 = self
                .shards
                .iter()
                .map(|s| s.active.load(Ordering::SeqCst))
                .sum();
            if active == 0 {
                return;
            }
            spins += 1;
            if spins < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len);
        if !offset.is_multiple_of(super::SECTOR_SIZE) || !len.is_multiple_of(super::SECTOR_SIZE) {
            return Err(ImageError::InvalidRequest(format!(
                "offset {offset} or length {len} is not a multiple of 512"
            )));
        }
        if end.is_none_or(|e| e > self.layout.size) {
            return Err(ImageError::InvalidRequest(format!(
                "range {offset}+{len} is beyond the disk size {}",
                self.layout.size
            )));
        }
        Ok(())
    }

    fn shard(&self) -> &OpShard {
        &self.shards[shard_index()]
    }

    // ----- cluster exclusion ------------------------------------------------------------

    fn lock_cluster(&self, c: u32, writer: bool) -> (ClusterGuard<'_>, Entry, u64) {
        let (s, i) = locate(c);
        let cell = &self.table.cells[s];
        let mut st = lock(&cell.stripe);
        loop {
            let b = st.busy.entry(c).or_default();
            // Writers first: a reader does not enter while a writer waits. (No thread holds a
            // cluster while it waits for another one's read, so this cannot deadlock.)
            let free = if writer {
                !b.writer && b.readers == 0
            } else {
                !b.writer && b.writers_waiting == 0
            };
            if free {
                if writer {
                    b.writer = true;
                } else {
                    b.readers += 1;
                }
                break;
            }
            b.waiters += 1;
            if writer {
                b.writers_waiting += 1;
            }
            st = cell
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(b) = st.busy.get_mut(&c) {
                b.waiters -= 1;
                if writer {
                    b.writers_waiting -= 1;
                }
            }
        }
        let e = st.get(i);
        (
            ClusterGuard {
                core: self,
                cluster: c,
                writer,
            },
            e,
            st.changes,
        )
    }

    // ----- reads ------------------------------------------------------------------------

    /// Reads and verifies a stored payload into `stored`, then decodes it into `out` (a raw
    /// payload is read and verified in `out` directly).
    fn load_payload(
        &self,
        c: u32,
        e: &Entry,
        codecs: &mut Codecs,
        stored: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<()> {
        let len = e.units() as usize * BLOCK_USIZE;
        let off = self.layout.region_offset(e.slot, e.unit());
        if e.alg() == alg::RAW && len == out.len() {
            // A raw payload is the cluster itself: read it where it goes and verify it there
            // (no copy through `stored`).
            self.storage
                .read_at(off, out)
                .map_err(Self::io("read data", off))?;
            return self.verify(c, e, out);
        }
        stored.resize(len.max(stored.len()), 0);
        let buf = &mut stored[..len];
        self.storage
            .read_at(off, buf)
            .map_err(Self::io("read data", off))?;
        self.verify(c, e, buf)?;
        codecs.decompress(e.alg(), buf, out).map_err(|reason| {
            self.shard().checksum_errors.fetch_add(1, Ordering::Relaxed);
            self.log_corruption(c, &format!("payload does not decode: {reason}"));
            ImageError::CorruptPayload {
                cluster: u64::from(c),
                reason,
            }
        })
    }

    /// Corrupt payloads are logged at error level a few times per open, then at debug: a guest
    /// re-reading a bad cluster must not flood the log (each read still fails and is counted).
    fn log_corruption(&self, c: u32, what: &str) {
        if self.corruption_logs.fetch_add(1, Ordering::Relaxed) < 16 {
            log::error!("cluster {c}: {what}");
        } else {
            log::debug!("cluster {c}: {what}");
        }
    }

    fn verify(&self, c: u32, e: &Entry, buf: &[u8]) -> Result<()> {
        let got = payload_checksum(buf);
        if got != e.crc {
            self.shard().checksum_errors.fetch_add(1, Ordering::Relaxed);
            let reason = format!(
                "checksum mismatch in slot {} (stored {:#010x}, computed {got:#010x})",
                e.slot, e.crc
            );
            self.log_corruption(c, &reason);
            return Err(ImageError::CorruptPayload {
                cluster: u64::from(c),
                reason,
            });
        }
        Ok(())
    }

    fn read_cluster(&self, c: u32, at: usize, out: &mut [u8]) -> Result<()> {
        let cs = self.layout.cluster_size as usize;
        let (_guard, e, changes) = self.lock_cluster(c, false);
        // Writes still in the write-back buffer override the stored version.
        if self.wb_entries.load(Ordering::Acquire) > 0 && self.read_buffered(c, &e, at, out)? {
            return Ok(());
        }
        if e.is_zero() {
            out.fill(0);
            return Ok(());
        }
        let generation = self.generation.load(Ordering::Relaxed);
        with_scratch(|sc| {
            let Scratch { codecs, stored, .. } = sc;
            if at == 0 && out.len() == cs {
                return self.load_payload(c, &e, codecs, stored, out);
            }
            let key = (generation, c, e, changes);
            let k = match sc.cache_find(&key) {
                Some(k) => k,
                None => {
                    let k = sc.cache_victim(cs);
                    let mut data = std::mem::take(&mut sc.cache[k].data);
                    let r = self.load_payload(c, &e, &mut sc.codecs, &mut sc.stored, &mut data);
                    sc.cache[k].data = data;
                    r?;
                    sc.cache[k].key = Some(key);
                    k
                }
            };
            out.copy_from_slice(&sc.cache[k].data[at..at + out.len()]);
            Ok(())
        })
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _op = self.enter()?;
        self.shard().reads.fetch_add(1, Ordering::Relaxed);
        let cs = u64::from(self.layout.cluster_size);
        let mut pos = 0usize;
        while pos < buf.len() {
            let abs = offset + pos as u64;
            let c = (abs / cs) as u32;
            let at = (abs % cs) as usize;
            let n = ((cs as usize) - at).min(buf.len() - pos);
            self.read_cluster(c, at, &mut buf[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    // ----- writes -----------------------------------------------------------------------

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if self.failed.load(Ordering::Relaxed) {
            let msg = lock(&self.ctl).failed.clone().unwrap_or_default();
            return Err(ImageError::WriterFailed(msg));
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.mutate(offset, data.len() as u64, || {
            self.write_clusters(offset, data)
        })
    }

    /// A guest write or zeroing of `len` bytes at `offset`, done by `store`: checked, counted
    /// as a running request while it stores (what [`Core::mark_idle_if_quiet`] looks for), and
    /// followed by the reopening of a journal the writer ended with an idle marker meanwhile.
    fn mutate(&self, offset: u64, len: u64, store: impl FnOnce() -> Result<()>) -> Result<()> {
        self.writable()?;
        self.check_range(offset, len)?;
        let _op = self.enter()?;
        self.shard().writes.fetch_add(1, Ordering::Relaxed);
        let stored = store();
        let reopened = self.reopen_after_idle_marker();
        stored.and(reopened)
    }

    fn write_clusters(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = u64::from(self.layout.cluster_size);
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let c = (abs / cs) as u32;
            let at = (abs % cs) as usize;
            let n = ((cs as usize) - at).min(data.len() - pos);
            let change = if n == cs as usize {
                Change::Full(&data[pos..pos + n])
            } else {
                Change::Partial(at, &data[pos..pos + n])
            };
            self.write_cluster(c, change)?;
            pos += n;
        }
        Ok(())
    }

    /// Zeroes a range: whole clusters become zero entries, partial ones are merged.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.mutate(offset, len, || self.zero_clusters(offset, len))
    }

    fn zero_clusters(&self, offset: u64, len: u64) -> Result<()> {
        let cs = u64::from(self.layout.cluster_size);
        let mut pos = 0u64;
        while pos < len {
            let abs = offset + pos;
            let c = (abs / cs) as u32;
            let at = (abs % cs) as usize;
            let n = (cs - at as u64).min(len - pos);
            // A range covering the logical end of the last (short) cluster zeroes it whole.
            let whole = at == 0 && (n == cs || abs + n == self.layout.size);
            let change = if whole {
                Change::Zero
            } else {
                Change::Partial(at, &ZEROS[..n as usize])
            };
            self.write_cluster(c, change)?;
            pos += n;
        }
        Ok(())
    }

    fn write_cluster(&self, c: u32, change: Change<'_>) -> Result<()> {
        let (_guard, cur, changes) = self.lock_cluster(c, true);
        if self.wb_limit > 0 {
            if let Change::Partial(at, d) = change {
                if self.buffer_write(c, cur, changes, at, d)? {
                    return Ok(());
                }
            }
        }
        self.write_locked(c, cur, changes, change)?;
        // A whole-cluster write or zeroing supersedes the buffered writes, but only once its own
        // version is published: until then the buffer entry is what a FLUSH running meanwhile
        // must store (it waits for this cluster while the entry exists), or it would commit
        // neither the buffered completed writes nor this unfinished one.
        if self.wb_limit > 0 {
            self.buffer_discard(c);
        }
        Ok(())
    }

    /// Stores a new version of cluster `c` (whose writer exclusion the caller holds; `cur` and
    /// `changes` as `lock_cluster` returned them).
    fn write_locked(&self, c: u32, cur: Entry, changes: u64, change: Change<'_>) -> Result<()> {
        let cs = self.layout.cluster_size as usize;
        let generation = self.generation.load(Ordering::Relaxed);
        with_scratch(|sc| {
            // 1. The new content of the whole cluster.
            let mut merged = false;
            let content: Option<&[u8]> = match change {
                Change::Zero => None,
                Change::Full(d) => (!is_zero(d)).then_some(d),
                Change::Partial(at, d) => {
                    sc.merge.resize(cs, 0);
                    if cur.is_zero() {
                        sc.merge.fill(0);
                    } else if let Some(k) = sc.cache_find(&(generation, c, cur, changes)) {
                        let (merge, cache) = (&mut sc.merge, &sc.cache);
                        merge.copy_from_slice(&cache[k].data);
                    } else {
                        let mut merge = std::mem::take(&mut sc.merge);
                        let r =
                            self.load_payload(c, &cur, &mut sc.codecs, &mut sc.stored, &mut merge);
                        sc.merge = merge;
                        r?;
                    }
                    sc.merge[at..at + d.len()].copy_from_slice(d);
                    merged = true;
                    (!is_zero(&sc.merge)).then_some(&sc.merge[..])
                }
            };
            let Some(content) = content else {
                if cur.is_zero() {
                    return Ok(());
                }
                return self.publish(c, Entry::ZERO).map(|_| ());
            };
            // 2. Compress (raw when it saves no unit).
            let (code, units, payload): (u8, u32, &[u8]) =
                match sc
                    .codecs
                    .compress(self.sb.compression, content, &mut sc.comp)
                {
                    Some((code, units)) => (
                        code,
                        u32::from(units),
                        &sc.comp[..units as usize * BLOCK_USIZE],
                    ),
                    None => (alg::RAW, self.layout.units_per_slot(), content),
                };
            let crc = payload_checksum(payload);
            // 3. Place it where nothing committed or current lives (reserved as `writing`),
            // and write it.
            let new = self.place(c, units, code, crc, &mut sc.owned)?;
            let off = self.layout.region_offset(new.slot, new.unit());
            if let Err(source) = self.storage.write_at(off, payload) {
                self.abandon_region(c, &new);
                // The caller reports the returned error (rate-limited: a full host disk fails
                // every write).
                log::debug!("write of cluster {c} at byte {off} failed: {source}");
                return Err(ImageError::Io {
                    op: "write data",
                    offset: off,
                    source,
                });
            }
            // 4. Publish; remember the merged content for the next partial write.
            let changes = self.publish(c, new)?;
            if merged {
                let k = sc.cache_victim(cs);
                std::mem::swap(&mut sc.cache[k].data, &mut sc.merge);
                sc.cache[k].key = Some((generation, c, new, changes));
            }
            Ok(())
        })
    }

    /// Chooses a free region of `units` units for cluster `c`'s new version (`code`, `crc`):
    /// beside its committed version in its home slot (ping-pong in place), else in another slot
    /// it holds, else in a free slot; inside a slot, where it overwrites the most stale units.
    /// Reserves it as the cluster's `writing` region in the same critical section, so that no
    /// release running meanwhile (a commit freeing the cluster's last other region in that slot)
    /// can hand the slot to another cluster. Old bytes of a claimed stale slot that the new
    /// version leaves become the cluster's stale units. Waits for a commit when no slot is free.
    fn place(&self, c: u32, units: u32, code: u8, crc: u32, owned: &mut Vec<u32>) -> Result<Entry> {
        let (s, i) = locate(c);
        let per_slot = self.layout.units_per_slot();
        let home = c;
        loop {
            {
                let mut st = lock(&self.table.cells[s].stripe);
                st.owned_slots(c, i, owned);
                // (slot, first unit, old bytes of a slot claimed from the allocator)
                let mut chosen: Option<(u32, u32, u32)> = None;
                if owned.contains(&home) {
                    let (live, stale) = (st.live_mask(c, i, home), st.stale_mask(c, home));
                    chosen = best_gap(live, stale, units, per_slot).map(|u| (home, u, 0));
                } else if let Some(stale) = self.alloc.claim_slot(home) {
                    let u = best_gap(0, stale, units, per_slot).unwrap_or(0);
                    chosen = Some((home, u, stale));
                }
                if chosen.is_none() {
                    chosen = owned.iter().filter(|&&x| x != home).find_map(|&slot| {
                        let (live, stale) = (st.live_mask(c, i, slot), st.stale_mask(c, slot));
                        best_gap(live, stale, units, per_slot).map(|u| (slot, u, 0))
                    });
                }
                if chosen.is_none() {
                    if let Some((slot, stale)) = self.alloc.claim_any(u64::from(c), units) {
                        // Ask for a commit early enough that it completes before the free
                        // slots run out, but not again while the last one's snapshot still
                        // holds them (a storm of tiny commits).
                        if self.alloc.free_slots() < self.low_water
                            && self.dirty_count.load(Ordering::Relaxed) >= self.low_water / 2
                        {
                            self.signal_pressure(false);
                        }
                        let u = best_gap(0, stale, units, per_slot).unwrap_or(0);
                        chosen = Some((slot, u, stale));
                    }
                }
                if let Some((slot, unit, claimed_stale)) = chosen {
                    let new = Entry::stored(slot, unit, units, code, crc);
                    if st.cover_stale(c, slot, new.mask()) {
                        self.stale_entry_gone();
                    }
                    let leftover = claimed_stale & !new.mask();
                    let now = self.now_ms();
                    let queue = leftover != 0 && st.add_stale(c, i, slot, leftover, now);
                    if queue {
                        self.stale_entries.fetch_add(1, Ordering::Relaxed);
                    }
                    st.pins_mut(c, i).writing = Some(new);
                    drop(st);
                    if queue {
                        self.queue_stale(c, slot, now);
                    }
                    return Ok(new);
                }
            }
            if NO_SPACE_WAIT.with(Cell::get) {
                return Err(ImageError::Io {
                    op: "place cluster (no free slot before the next commit)",
                    offset: 0,
                    source: std::io::ErrorKind::WouldBlock.into(),
                });
            }
            self.wait_for_space()?;
        }
    }

    /// A write into `e` failed: its bytes (possibly part-written) are garbage nobody refers to.
    fn abandon_region(&self, c: u32, e: &Entry) {
        {
            let (s, i) = locate(c);
            let mut st = lock(&self.table.cells[s].stripe);
            let p = st.pins_mut(c, i);
            p.writing = None;
            p.releasing.push(*e);
        }
        self.dispose(c, *e);
    }

    /// `old`, a region of cluster `c` listed in its `releasing` pins, is referenced by nothing
    /// any more (the commit that replaced it is durable, or it was never committed). Nothing is
    /// punched here: when it was the cluster's last live region in its slot, the slot returns
    /// to the allocator as *stale* (with the cluster's stale units there), and the next version
    /// written there overwrites allocated blocks; else its units become the cluster's stale
    /// units, which its next version may overwrite, and the writer punches what is left of
    /// them after the grace period.
    fn dispose(&self, c: u32, old: Entry) {
        let (s, i) = locate(c);
        let now = self.now_ms();
        let outcome = {
            let mut st = lock(&self.table.cells[s].stripe);
            self.dispose_locked(&mut st, c, i, old, now)
        };
        match outcome {
            Disposed::SlotFreed => self.notify_space(),
            Disposed::Stale(slot) => self.queue_stale(c, slot, now),
            Disposed::Nothing => {}
        }
    }

    /// [`Core::dispose`] under the stripe lock of `c` (local index `i`). The caller notifies
    /// space waiters or queues the stale units as the result says.
    fn dispose_locked(&self, st: &mut Stripe, c: u32, i: usize, old: Entry, now: u64) -> Disposed {
        let Some(p) = st.pins.get_mut(&c) else {
            return Disposed::Nothing;
        };
        match p.releasing.iter().position(|r| *r == old) {
            Some(k) => {
                p.releasing.swap_remove(k);
            }
            // Not listed: already handled.
            None => return Disposed::Nothing,
        }
        if st.live_mask(c, i, old.slot) == 0 {
            let stale = st.take_stale(c, old.slot);
            if stale != 0 {
                self.stale_entry_gone();
            }
            let mask = old.mask() | stale;
            self.alloc.release_stale(old.slot, mask, now);
            st.tidy(c, i);
            return Disposed::SlotFreed;
        }
        if st.add_stale(c, i, old.slot, old.mask(), now) {
            self.stale_entries.fetch_add(1, Ordering::Relaxed);
            Disposed::Stale(old.slot)
        } else {
            // Added to stale units already queued (re-dated).
            Disposed::Nothing
        }
    }

    /// Queues the (new) stale units of `c` in `slot` dated `since` for the writer's grace-period
    /// punch. One item per (cluster, slot) entry: an entry re-dated since is re-queued by the
    /// writer when it reaches the item.
    fn queue_stale(&self, c: u32, slot: u32, since: u64) {
        lock(&self.stale_queue).push_back((c, slot, since));
    }

    /// Freed regions waiting for reuse: clusters' stale-unit entries and stale free slots.
    pub(super) fn stale_backlog(&self) -> usize {
        self.stale_entries.load(Ordering::Relaxed) + self.alloc.stale_slots() as usize
    }

    /// A cluster's stale-unit entry was overwritten, taken or went with its slot.
    fn stale_entry_gone(&self) {
        let _ = self
            .stale_entries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// True when a cluster's stale units have waited `grace` or longer.
    fn has_aged_stale_units(&self, grace: Duration) -> bool {
        let before = self.now_ms().saturating_sub(grace.as_millis() as u64);
        lock(&self.stale_queue)
            .front()
            .is_some_and(|&(_, _, since)| since <= before)
    }

    /// Punches the stale units of up to `max` (cluster, slot) pairs dated at least `grace` ago
    /// (all of them with `Duration::ZERO`): they are pinned as `releasing` (so no placement
    /// uses them meanwhile), punched, and released like any freed region. Returns how many
    /// pairs were punched.
    pub fn punch_stale_units(&self, grace: Duration, max: usize) -> usize {
        let moved = self.stale_units_to_pending(grace, max);
        if moved > 0 {
            self.reclaim_some(usize::MAX);
        }
        moved
    }

    /// The first half of [`Core::punch_stale_units`]: pins the aged stale units as
    /// `releasing` and queues them in `pending_frees`, without punching.
    fn stale_units_to_pending(&self, grace: Duration, max: usize) -> usize {
        let before = self.now_ms().saturating_sub(grace.as_millis() as u64);
        let mut moved = 0;
        let mut batch: Vec<(u32, Entry)> = Vec::new();
        let mut requeue: Vec<(u32, u32, u64)> = Vec::new();
        while moved < max {
            let item = {
                let mut q = lock(&self.stale_queue);
                match q.front() {
                    Some(&(c, slot, since)) if since <= before => {
                        q.pop_front();
                        (c, slot)
                    }
                    _ => break,
                }
            };
            let (c, slot) = item;
            let (s, i) = locate(c);
            let mut st = lock(&self.table.cells[s].stripe);
            match st.stale_since(c, slot) {
                // Overwritten, or gone with its slot.
                None => continue,
                // Re-dated since it was queued: back in the queue with its new date.
                Some(since) if since > before => {
                    requeue.push((c, slot, since));
                    continue;
                }
                Some(_) => {}
            }
            let mask = st.take_stale(c, slot);
            if mask != 0 {
                self.stale_entry_gone();
            }
            let p = st.pins_mut(c, i);
            for_each_run(mask, |u, n| {
                let e = Entry::stored(slot, u, n, alg::RAW, 0);
                p.releasing.push(e);
                batch.push((c, e));
            });
            moved += 1;
        }
        if !requeue.is_empty() {
            lock(&self.stale_queue).extend(requeue);
        }
        if !batch.is_empty() {
            let mut pending = lock(&self.pending_frees);
            pending.extend(batch);
            self.pending_count.store(pending.len(), Ordering::Release);
        }
        moved
    }

    /// Before the writer parks for a close (no request running): punches every freed region,
    /// stale unit and stale slot now, with adjacent ranges merged into one punch (after a burst
    /// of rewrites they are thousands, and each punch can be a synchronous device discard), and
    /// returns their slots to the allocator clean. A closed image then stores only what its
    /// table refers to.
    fn release_all_freed(&self) {
        self.stale_units_to_pending(Duration::ZERO, usize::MAX);
        let batch: Vec<(u32, Entry)> = {
            let mut pending = lock(&self.pending_frees);
            self.pending_count.store(0, Ordering::Release);
            std::mem::take(&mut *pending)
        };
        let mut slots = Vec::new();
        self.alloc
            .take_stale_older(u64::MAX, usize::MAX, &mut slots);
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(batch.len() + slots.len());
        for (_, e) in &batch {
            let off = self.layout.region_offset(e.slot, e.unit());
            ranges.push((off, u64::from(e.units()) * BLOCK));
        }
        for &(slot, mask) in &slots {
            for_each_run(mask, |u, n| {
                ranges.push((self.layout.region_offset(slot, u), u64::from(n) * BLOCK));
            });
        }
        ranges.sort_unstable();
        let mut k = 0;
        while k < ranges.len() {
            let (start, mut end) = (ranges[k].0, ranges[k].0 + ranges[k].1);
            k += 1;
            while k < ranges.len() && ranges[k].0 <= end {
                end = end.max(ranges[k].0 + ranges[k].1);
                k += 1;
            }
            if let Err(err) = self.storage.punch_hole(start, end - start) {
                log::warn!("punching freed space at {start} failed (stays allocated): {err}");
            }
        }
        let now = self.now_ms();
        for (c, e) in &batch {
            let (s, i) = locate(*c);
            if let Some(stale) = lock(&self.table.cells[s].stripe).release_done(*c, i, e) {
                if stale != 0 {
                    self.stale_entry_gone();
                }
                // Nothing is stale any more (moved above): returns the slot clean.
                self.alloc.release_stale(e.slot, stale, now);
            }
        }
        for (slot, _) in slots {
            self.alloc.release(slot);
        }
        self.notify_space();
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Punches up to `max` stale slots that were freed at least `grace` ago (all of them with
    /// `Duration::ZERO`) and returns them to the allocator clean. Returns how many.
    pub fn punch_stale(&self, grace: Duration, max: usize) -> usize {
        let before = self.now_ms().saturating_sub(grace.as_millis() as u64);
        let mut slots = Vec::new();
        self.alloc.take_stale_older(before, max, &mut slots);
        for &(slot, mask) in &slots {
            for_each_run(mask, |u, n| {
                let off = self.layout.region_offset(slot, u);
                let len = u64::from(n) * BLOCK;
                if let Err(err) = self.storage.punch_hole(off, len) {
                    log::warn!(
                        "punching {len} bytes at {off} failed (space stays allocated): {err}"
                    );
                }
            });
            self.alloc.release(slot);
        }
        slots.len()
    }

    /// Makes `new` the cluster's current entry; returns its stripe's change counter after the
    /// change.
    fn publish(&self, c: u32, new: Entry) -> Result<u64> {
        let (s, i) = locate(c);
        let changes;
        let release = {
            let mut st = lock(&self.table.cells[s].stripe);
            let old = st.get(i);
            let p = st.pins_mut(c, i);
            p.writing = None;
            let newly_dirty = !p.dirty;
            p.dirty = true;
            let unreferenced = !old.is_zero() && old != p.durable && Some(old) != p.inflight;
            if unreferenced {
                p.releasing.push(old);
            }
            st.set(i, new);
            changes = st.changes;
            if newly_dirty {
                st.dirty.push(c);
            }
            st.tidy(c, i);
            if newly_dirty {
                let n = self.dirty_count.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= self.dirty_limit {
                    self.signal_pressure(false);
                }
            }
            unreferenced.then_some(old)
        };
        // The replaced version was never committed: nothing durable or in flight refers to it,
        // and this thread still holds the cluster, so its units are released right away (no
        // punch on the write path: a whole slot becomes stale, a part of one is queued).
        if let Some(old) = release {
            self.dispose(c, old);
        }
        Ok(changes)
    }

    fn notify_space(&self) {
        let _g = lock(&self.space);
        self.space_cv.notify_all();
    }

    fn wait_for_space(&self) -> Result<()> {
        self.signal_pressure(true);
        let g = lock(&self.space);
        // Releases bump the free count before they notify under this lock: checking it here
        // cannot miss a wake-up.
        if self.alloc.free_slots() > 0 {
            return self.writable();
        }
        let _ = self
            .space_cv
            .wait_timeout(g, Duration::from_millis(20))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.writable()
    }

    fn signal_pressure(&self, force: bool) {
        if !self.pressure.swap(true, Ordering::AcqRel) || force {
            let mut ctl = lock(&self.ctl);
            ctl.pressure = true;
            self.writer_cv.notify_one();
        }
    }

    // ----- flush and commit -------------------------------------------------------------

    /// Asks the writer for a commit whose snapshot starts after this call (trap 2) and waits
    /// until it is durable. `checkpoint`: that commit writes a checkpoint.
    pub fn sync(&self, checkpoint: bool) -> Result<()> {
        let mut ctl = lock(&self.ctl);
        if let Some(f) = &ctl.failed {
            return Err(ImageError::WriterFailed(f.clone()));
        }
        let target = ctl.begun + 1;
        ctl.flush_waiting = true;
        ctl.checkpoint |= checkpoint;
        self.writer_cv.notify_one();
        while ctl.durable < target {
            if let Some(f) = &ctl.failed {
                return Err(ImageError::WriterFailed(f.clone()));
            }
            ctl = self
                .done_cv
                .wait(ctl)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        Ok(())
    }

    /// I2 flush.
    pub fn flush(&self) -> Result<()> {
        let _op = self.enter()?;
        self.shard().flushes.fetch_add(1, Ordering::Relaxed);
        if self.read_only {
            return Ok(());
        }
        // Writes completed before this flush and still buffered go into its commit.
        self.write_back_all()?;
        self.sync(false)
    }

    fn mark_durable(&self, ticket: u64) {
        let mut ctl = lock(&self.ctl);
        ctl.durable = ctl.durable.max(ticket);
        self.done_cv.notify_all();
    }

    /// Records a writer failure: no later commit claims durability, for the rest of this
    /// process. A failed fdatasync leaves the page cache out of step with the disk (Linux marks
    /// the unwritten pages clean and reports the error once), so neither retrying the commit nor
    /// reloading metadata through the same cache can be trusted; like PostgreSQL after a failed
    /// fsync, only a new process, which reloads from the disk, writes again.
    pub fn fail(&self, msg: String) {
        log::error!(
            "metadata commit failed, the image accepts no more writes until the process \
             restarts: {msg}"
        );
        let mut ctl = lock(&self.ctl);
        ctl.failed = Some(msg);
        self.failed.store(true, Ordering::Relaxed);
        self.done_cv.notify_all();
        drop(ctl);
        self.notify_space();
    }

    /// One group commit (writer thread only). `ticket` is this snapshot's number.
    pub fn commit(&self, ticket: u64, force_checkpoint: bool) -> Result<()> {
        let mut meta = lock(&self.meta);
        let mut records = std::mem::take(&mut meta.records);
        records.clear();
        for cell in self.table.cells.iter() {
            let n = lock(&cell.stripe).snapshot_dirty(&mut records);
            if n > 0 {
                let _ = self
                    .dirty_count
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                        Some(d.saturating_sub(n as u64))
                    });
            }
        }
        // Nothing changed, or a checkpoint was asked for but nothing was committed since the
        // last one (the journal holds only its marker): no I/O at all.
        let nothing_since_checkpoint = meta.journal_head <= BLOCK && meta.loaded;
        if records.is_empty() && (!force_checkpoint || nothing_since_checkpoint) {
            meta.records = records;
            drop(meta);
            self.mark_durable(ticket);
            return Ok(());
        }
        let st = self.storage.as_ref();
        let seq = meta.last_seq + 1;
        if !self.break_order {
            st.flush().map_err(Self::io("flush data", 0))?;
            meta.journal_unflushed = false;
        }
        let bytes = format::record_blocks(records.len()) * BLOCK;
        let journal_full = meta.journal_head + bytes > self.layout.journal_size;
        if let Some(ahead) = meta.ahead.as_mut() {
            for (c, _) in &records {
                ahead.changed(*c);
            }
        }
        // A checkpoint written ahead is finished by the first commit after its last batch, or
        // by the commit that finds the journal full (then with whatever is left to write).
        let finish_ahead = !force_checkpoint
            && meta.ahead.as_ref().is_some_and(|a| {
                journal_full || a.remaining(&self.layout) <= self.ahead_finish_max
            });
        let checkpoint = force_checkpoint || journal_full;
        let mut buf = std::mem::take(&mut meta.buf);
        if finish_ahead {
            self.finish_checkpoint_ahead(&mut meta, &mut buf, seq)?;
        } else if checkpoint {
            // Never "clean" here, not even for the checkpoint `close` asks for: only `mark_clean`
            // says so, once everything is stored and committed, in one record that also carries
            // a pending lost-write notice. A close whose buffered writes could not be stored, or
            // a kill between this checkpoint and that marker, must look like a crash.
            self.checkpoint_and_marker(&mut meta, &mut buf, seq, 0)?;
        } else {
            format::encode_record(&mut buf, seq, &self.sb.uuid, &records);
            let off = self.layout.journal_offset + meta.journal_head;
            st.write_at(off, &buf)
                .map_err(Self::io("write journal", off))?;
            st.flush().map_err(Self::io("flush journal", off))?;
            meta.last_seq = seq;
            meta.journal_head += bytes;
            meta.clean_marked = false;
            meta.idle_marked = false;
            if meta.ahead.is_none() && meta.journal_head > self.layout.journal_size / 2 {
                self.start_checkpoint_ahead(&mut meta);
            }
        }
        meta.buf = buf;
        if self.break_order {
            st.flush().map_err(Self::io("flush data", 0))?;
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        // Durable: the snapshotted entries are now the committed ones, and what they replaced
        // is released (I1: only now) in the same critical section, so that the cluster's next
        // version, which may be placed the moment the stripe lock is dropped, can overwrite it:
        // a whole slot returns to the allocator stale, part of a slot becomes the cluster's
        // stale units. Nothing is punched here (a punch can cost a synchronous device discard):
        // the writer punches what nobody reused after the grace period, between commits.
        let now = self.now_ms();
        let mut frees: Vec<(u32, Entry)> = Vec::new();
        let mut stale: Vec<(u32, u32)> = Vec::new();
        let mut slot_freed = false;
        for (c, _) in &records {
            let (s, i) = locate(*c);
            let mut st = lock(&self.table.cells[s].stripe);
            frees.clear();
            st.commit_done(*c, i, &mut frees);
            for &(fc, old) in &frees {
                match self.dispose_locked(&mut st, fc, i, old, now) {
                    Disposed::SlotFreed => slot_freed = true,
                    Disposed::Stale(slot) => stale.push((fc, slot)),
                    Disposed::Nothing => {}
                }
            }
        }
        meta.records = records;
        drop(meta);
        if !stale.is_empty() {
            let mut q = lock(&self.stale_queue);
            q.extend(stale.into_iter().map(|(c, slot)| (c, slot, now)));
        }
        if slot_freed {
            self.notify_space();
        }
        self.mark_durable(ticket);
        Ok(())
    }

    /// True when freed regions wait to be punched.
    pub fn has_pending_frees(&self) -> bool {
        self.pending_count.load(Ordering::Acquire) > 0
    }

    /// Punches up to `max` freed regions (merging adjacent ones) and returns their slots to the
    /// allocator as soon as each range is done.
    pub fn reclaim_some(&self, max: usize) {
        let mut batch = {
            let mut pending = lock(&self.pending_frees);
            let n = pending.len().min(max);
            let batch: Vec<(u32, Entry)> = pending.drain(..n).collect();
            self.pending_count.store(pending.len(), Ordering::Release);
            batch
        };
        batch.sort_by_key(|(_, e)| (e.slot, e.unit()));
        let st = self.storage.as_ref();
        let mut k = 0;
        while k < batch.len() {
            let start = self
                .layout
                .region_offset(batch[k].1.slot, batch[k].1.unit());
            let mut end = start + u64::from(batch[k].1.units()) * BLOCK;
            let mut j = k + 1;
            while j < batch.len() {
                let e = &batch[j].1;
                let o = self.layout.region_offset(e.slot, e.unit());
                if o != end {
                    break;
                }
                end = o + u64::from(e.units()) * BLOCK;
                j += 1;
            }
            if let Err(err) = st.punch_hole(start, end - start) {
                log::warn!("punching freed space at {start} failed: {err}");
            }
            let mut released = false;
            for (c, e) in &batch[k..j] {
                let (s, i) = locate(*c);
                if let Some(stale) = lock(&self.table.cells[s].stripe).release_done(*c, i, e) {
                    if stale != 0 {
                        self.stale_entry_gone();
                    }
                    // Stale units the cluster had left in the slot go with it.
                    self.alloc.release_stale(e.slot, stale, self.now_ms());
                    released = true;
                }
            }
            if released {
                self.notify_space();
            }
            k = j;
        }
    }

    /// Writes a checkpoint of the committed view as commit `seq` into the inactive area, then
    /// restarts the journal with a marker record `seq + 1`: a later recovery that has to fall
    /// back to the older checkpoint sees the marker and knows this checkpoint was lost.
    fn checkpoint_and_marker(
        &self,
        meta: &mut Meta,
        buf: &mut Vec<u8>,
        seq: u64,
        flags: u32,
    ) -> Result<()> {
        let st = self.storage.as_ref();
        let area = 1 - meta.active_area;
        // Written over by this one (same area), and no longer needed.
        meta.ahead = None;
        recovery::write_checkpoint(st, &self.sb, &self.table, seq, area, true)?;
        self.complete_checkpoint(meta, buf, seq, area, flags)
    }

    /// Makes the checkpoint just written into `area` as commit `seq` durable, then restarts the
    /// journal with a marker record `seq + 1` carrying `flags`.
    fn complete_checkpoint(
        &self,
        meta: &mut Meta,
        buf: &mut Vec<u8>,
        seq: u64,
        area: usize,
        flags: u32,
    ) -> Result<()> {
        let st = self.storage.as_ref();
        st.flush().map_err(Self::io("flush checkpoint", 0))?;
        meta.ahead_failed = false;
        self.write_empty_record(buf, seq + 1, self.layout.journal_offset, flags, true)?;
        meta.last_seq = seq + 1;
        meta.journal_head = BLOCK;
        meta.active_area = area;
        meta.area_seqs[area] = Some(seq);
        meta.ends_with_empty_record(flags, true);
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Starts writing a checkpoint ahead of need (the journal is half full), when the table is
    /// large enough for one written in a single commit to keep FLUSHes waiting, and full enough
    /// for a dense checkpoint (every chunk written, see [`recovery::CheckpointAhead`]) not to
    /// cost much more than the sparse one.
    fn start_checkpoint_ahead(&self, meta: &mut Meta) {
        let chunks = self.layout.chunk_count();
        if chunks < self.ahead_min_chunks || meta.ahead_failed {
            return;
        }
        if self.ahead_min_chunks > 0 {
            let stored: u64 = self
                .table
                .cells
                .iter()
                .map(|cell| {
                    let st = lock(&cell.stripe);
                    st.compressed + st.raw
                })
                .sum();
            if stored * 4 < self.layout.cluster_count {
                return;
            }
        }
        // Beyond every record the rest of the journal can hold (each takes a block at least).
        let seq = meta.last_seq + self.layout.journal_size / BLOCK + 2;
        meta.ahead = Some(recovery::CheckpointAhead::new(
            &self.layout,
            seq,
            1 - meta.active_area,
        ));
    }

    /// True when a checkpoint written ahead has chunks to write (the writer does it between
    /// commits, a batch at a time).
    pub fn checkpoint_ahead_pending(&self) -> bool {
        lock(&self.meta)
            .ahead
            .as_ref()
            .is_some_and(|a| a.remaining(&self.layout) > self.ahead_finish_max)
    }

    /// Writes the next batch of the checkpoint written ahead. A failure abandons it (the commit
    /// that finds the journal full then writes one in one go, and reports what fails there).
    pub fn checkpoint_ahead_step(&self) {
        let mut meta = lock(&self.meta);
        let Some(ahead) = meta.ahead.as_mut() else {
            return;
        };
        if let Err(e) = ahead.step(self.storage.as_ref(), &self.sb, &self.table) {
            log::warn!("writing a checkpoint ahead failed, left for the next full journal: {e}");
            meta.ahead = None;
            meta.ahead_failed = true;
        }
    }

    /// Inside a commit: writes what is left of the checkpoint written ahead (this commit's
    /// changes included: they are marked, and the committed view holds them), makes the chunks
    /// durable, writes its header and completes it as commit `ahead.seq`. When its chunks cannot
    /// all be written (a dense checkpoint needs more host space than a sparse one, and the
    /// checkpoint areas are not reserved), the commit writes a sparse one in one go as commit
    /// `seq` instead: a failed commit would be final for the image.
    fn finish_checkpoint_ahead(&self, meta: &mut Meta, buf: &mut Vec<u8>, seq: u64) -> Result<()> {
        let Some(mut ahead) = meta.ahead.take() else {
            return Ok(());
        };
        let st = self.storage.as_ref();
        if let Err(e) = ahead.write_remaining(st, &self.sb, &self.table) {
            log::warn!("writing a checkpoint ahead failed, writing it in one go instead: {e}");
            meta.ahead_failed = true;
            return self.checkpoint_and_marker(meta, buf, seq, 0);
        }
        st.flush().map_err(Self::io("flush checkpoint chunks", 0))?;
        ahead.write_header(st, &self.sb)?;
        self.checkpoints_ahead.fetch_add(1, Ordering::Relaxed);
        self.complete_checkpoint(meta, buf, ahead.seq, ahead.area, 0)
    }

    /// Read-write open of a cleanly closed image: append an empty record so that the journal no
    /// longer ends with the clean-close marker before any data is written (a crash from here on
    /// makes the next open look for leaked space).
    pub fn mark_open(&self) -> Result<()> {
        let mut meta = lock(&self.meta);
        self.append_marker(&mut meta, 0, true)
    }

    /// True when the journal ends with a clean-close marker (see `mark_open`).
    pub fn clean_marked(&self) -> bool {
        lock(&self.meta).clean_marked
    }

    /// Ends the journal with a clean-close marker once everything is committed (writer parked,
    /// no request running): quiesce and close, so that the next opener (a migration destination,
    /// a restarted backend) knows nothing was lost. `loss_unreported`: see
    /// [`format::RECORD_LOSS_UNREPORTED`]; `space_unreclaimed`: see
    /// [`format::RECORD_SPACE_UNRECLAIMED`]. Nothing to write when the journal already ends so.
    pub fn mark_clean(&self, loss_unreported: bool, space_unreclaimed: bool) -> Result<()> {
        {
            let meta = lock(&self.meta);
            if !loss_unreported
                && !meta.marked_loss
                && meta.clean_marked
                && !meta.idle_marked
                && meta.marked_unreclaimed == space_unreclaimed
            {
                return Ok(());
            }
        }
        let mut flags = format::RECORD_CLEAN_CLOSE;
        if loss_unreported {
            flags |= format::RECORD_LOSS_UNREPORTED;
        }
        if space_unreclaimed {
            flags |= format::RECORD_SPACE_UNRECLAIMED;
        }
        let mut meta = lock(&self.meta);
        self.append_marker(&mut meta, flags, true)
    }

    /// Replaces the idle marker that ends the journal (same block, same sequence number) with
    /// an empty record carrying `flags`. A torn replacement leaves an invalid block where the
    /// journal ends: the next opener takes it for a crash (no commit is lost).
    fn replace_idle_marker(&self, meta: &mut Meta, flags: u32, durable: bool) -> Result<()> {
        let mut buf = std::mem::take(&mut meta.buf);
        let off = self.layout.journal_offset + meta.journal_head - BLOCK;
        let r = self.write_empty_record(&mut buf, meta.last_seq, off, flags, durable);
        meta.buf = buf;
        r?;
        meta.ends_with_empty_record(flags, durable);
        Ok(())
    }

    /// Writes an empty journal record `seq` carrying `flags` at `off` (flushed when `durable`).
    fn write_empty_record(
        &self,
        buf: &mut Vec<u8>,
        seq: u64,
        off: u64,
        flags: u32,
        durable: bool,
    ) -> Result<()> {
        format::encode_record_flags(buf, seq, &self.sb.uuid, &[], flags);
        let st = self.storage.as_ref();
        st.write_at(off, buf)
            .map_err(Self::io("write journal", off))?;
        if durable {
            st.flush().map_err(Self::io("flush journal", off))?;
        }
        Ok(())
    }

    /// Appends an empty record with `flags` (a checkpoint first when the journal is full), and
    /// makes it durable when `durable` (otherwise it reaches the page cache: enough for the next
    /// process after a kill, and the next commit's flush makes it durable with its own record).
    fn append_marker(&self, meta: &mut Meta, flags: u32, durable: bool) -> Result<()> {
        if meta.idle_marked {
            return self.replace_idle_marker(meta, flags, durable);
        }
        if meta.journal_unflushed {
            self.storage
                .flush()
                .map_err(Self::io("flush journal", self.layout.journal_offset))?;
            meta.journal_unflushed = false;
        }
        let mut buf = std::mem::take(&mut meta.buf);
        let seq = meta.last_seq + 1;
        let r = if meta.journal_head + BLOCK > self.layout.journal_size {
            self.checkpoint_and_marker(meta, &mut buf, seq, flags)
        } else {
            let off = self.layout.journal_offset + meta.journal_head;
            self.write_empty_record(&mut buf, seq, off, flags, durable)
                .map(|()| {
                    meta.last_seq = seq;
                    meta.journal_head += BLOCK;
                    meta.ends_with_empty_record(flags, durable);
                })
        };
        meta.buf = buf;
        r
    }

    /// Writer thread, after a timer commit that found nothing to commit (and a FLUSH that
    /// reported a loss): when nothing the guest completed is left uncommitted and no request
    /// runs, ends the journal with a clean-close marker (once per idle spell; pwritten, not
    /// flushed). A backend killed from here on loses nothing, and the next one tells the guest
    /// nothing: its next
    /// FLUSH succeeds instead of failing for writes that are not lost (an ext4 guest aborts its
    /// journal on a failed FLUSH). The marker says the space may hold unreferenced regions
    /// ([`format::RECORD_SPACE_UNRECLAIMED`]): freed space may still wait for its punch, and
    /// writes after it leave some if a power cut takes the record that reopens the journal.
    ///
    /// Against a request completing meanwhile (Dekker-style, all `SeqCst`): the writer raises
    /// `idle_marking`, then looks at the requests running, the write-back buffer and the dirty
    /// entries; a completing mutation publishes its entries, then reads the flag (before it
    /// leaves `active`). Either the writer sees that mutation (running, buffered or dirty), or
    /// the mutation sees the flag and reopens the journal under the `meta` lock, after the
    /// marker or making the writer give up ([`Core::reopen_after_idle_marker`]).
    ///
    /// Returns whether it wrote a marker now.
    pub fn mark_idle_if_quiet(&self) -> bool {
        let _turn = lock(&self.idle_marker_turn);
        if self.read_only
            || self.failed.load(Ordering::SeqCst)
            || self.marker_current(&lock(&self.meta))
        {
            return false;
        }
        self.idle_marking.store(true, Ordering::SeqCst);
        let running = self
            .shards
            .iter()
            .any(|s| s.active.load(Ordering::SeqCst) > 0);
        let quiet = !running
            && self.wb_entries.load(Ordering::SeqCst) == 0
            && self
                .table
                .cells
                .iter()
                .all(|cell| lock(&cell.stripe).dirty.is_empty());
        if !quiet {
            // Only when no marker ends the journal: a stale one (replaced for its loss bit) must
            // keep the flag up, or the next write would not reopen the journal after it. (Only
            // this function, under `idle_marker_turn`, sets `clean_marked` while running.)
            if !lock(&self.meta).clean_marked {
                self.idle_marking.store(false, Ordering::SeqCst);
            }
            return false;
        }
        let mut meta = lock(&self.meta);
        // Lowered by a mutation that completed since the flag went up.
        if !self.idle_marking.load(Ordering::SeqCst) || self.marker_current(&meta) {
            return false;
        }
        let mut flags = format::RECORD_CLEAN_CLOSE | format::RECORD_SPACE_UNRECLAIMED;
        if self.loss_unreported.load(Ordering::SeqCst) {
            flags |= format::RECORD_LOSS_UNREPORTED;
        }
        // Not flushed: a kill keeps the page cache, and after a power cut the guest is gone too;
        // a marker that did not reach the disk only makes the next opener more careful.
        match self.append_marker(&mut meta, flags, false) {
            Ok(()) => {
                meta.idle_marked = true;
                log::debug!("idle: journal ends with a clean-close marker");
                true
            }
            Err(e) => {
                // Nothing is lost by not having the marker; a journal that cannot be written
                // fails the next commit, which reports it. (A stale marker still there keeps
                // the flag up, as above.)
                if !meta.clean_marked {
                    self.idle_marking.store(false, Ordering::SeqCst);
                }
                log::warn!("writing the idle marker failed: {e}");
                false
            }
        }
    }

    /// The journal ends with a clean-close marker whose loss bit is still true (a FLUSH that
    /// succeeded since clears `loss_unreported`; a marker still saying "loss" must be replaced).
    fn marker_current(&self, meta: &Meta) -> bool {
        meta.clean_marked && meta.marked_loss == self.loss_unreported.load(Ordering::SeqCst)
    }

    /// After a FLUSH that reported the loss: an idle marker still carrying it is replaced now
    /// (a kill before the next timer commit would report the loss again).
    pub fn remark_if_loss_reported(&self) {
        let stale = {
            let meta = lock(&self.meta);
            meta.clean_marked && meta.marked_loss
        };
        if stale {
            self.mark_idle_if_quiet();
        }
    }

    /// End of every write, WRITE_ZEROES and DISCARD (while its request still counts as running):
    /// when the writer has ended, or is ending, the journal with an idle marker, replaces it with
    /// an empty record without flags before the request completes, so that a backend killed
    /// later does not take the image for cleanly closed and the next one tells the guest about
    /// the writes it lost. The
    /// flag goes down only after that record is written: a mutation that finds it down knows the
    /// journal is open.
    fn reopen_after_idle_marker(&self) -> Result<()> {
        if !self.idle_marking.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut meta = lock(&self.meta);
        if meta.clean_marked {
            self.append_marker(&mut meta, 0, false)?;
        }
        self.idle_marking.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// After an unclean shutdown: punch space that writes which never committed left behind.
    pub fn reclaim_leaks(&self) {
        let ranges =
            match recovery::unreferenced_ranges(self.storage.as_ref(), &self.layout, &self.table) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    log::warn!("could not look for space left by uncommitted writes: {e}");
                    return;
                }
            };
        let mut total = 0;
        for (off, len) in ranges {
            match self.storage.punch_hole(off, len) {
                Ok(()) => total += len,
                Err(e) => log::warn!("punching {len} bytes at {off} failed: {e}"),
            }
        }
        if total > 0 {
            log::info!("released {total} bytes left by writes that never committed");
        }
    }

    /// True when the storage can list its allocated ranges, so that an opener can find space no
    /// entry refers to ([`Core::adopt_unreferenced`]); false for a block device.
    pub fn can_find_unreferenced_space(&self) -> bool {
        matches!(self.storage.allocated_ranges(0, 0), Ok(Some(_)))
    }

    /// True when freed space still waits to be punched (writer parked): regions pinned as
    /// releasing, clusters' stale units, stale free slots. Exact (it looks at the lists, not at
    /// counters): a quiesce that answers false writes a marker promising that the image stores
    /// only what its table refers to.
    pub fn holds_unreferenced_space(&self) -> bool {
        if self.has_pending_frees() || self.alloc.stale_slots() > 0 {
            return true;
        }
        self.table.cells.iter().any(|cell| {
            lock(&cell.stripe)
                .pins
                .values()
                .any(|p| !p.stale.is_empty() || !p.releasing.is_empty())
        })
    }

    /// After a load whose clean-close marker says a quiesce left freed space unpunched
    /// ([`format::RECORD_SPACE_UNRECLAIMED`]), with the writer not started and no request
    /// running: finds the allocated host space no entry refers to and hands it to the writer's
    /// usual deferred reclaim instead of punching it here (the open would wait for it, and on a
    /// migration destination that is downtime). A unit in a slot the table does not use makes
    /// the slot a stale free slot; one beside a cluster's entry in its slot becomes that
    /// cluster's stale units. Both may be overwritten by the next version placed there and are
    /// punched after the grace period otherwise (all of them at the next close), under the same
    /// rules as space freed while running, so nothing a later write reuses is ever punched.
    /// Returns the bytes handed over.
    pub fn adopt_unreferenced(&self) -> u64 {
        let ranges =
            match recovery::unreferenced_ranges(self.storage.as_ref(), &self.layout, &self.table) {
                Ok(Some(r)) => r,
                Ok(None) => return 0,
                Err(e) => {
                    log::warn!("could not look for space a quiesce left unreclaimed: {e}");
                    return 0;
                }
            };
        let l = &self.layout;
        let cs = u64::from(l.cluster_size);
        let slot_count = l.slot_count();
        // (slot, units) in slot order (the ranges are sorted and merged).
        let mut slots: Vec<(u32, u32)> = Vec::new();
        // Punched at once instead: bytes past the last slot (none in practice: the data area
        // is a whole number of slots), and everything beyond `ADOPT_MAX` slots (RAM stays
        // bounded whatever the file holds, e.g. an image copied without holes).
        let mut direct: Vec<(u64, u64)> = Vec::new();
        for (off, len) in ranges {
            let mut pos = off;
            while pos < off + len {
                let rel = pos - l.data_offset;
                let slot = rel / cs;
                let full =
                    slots.len() >= ADOPT_MAX && slots.last().map(|&(s, _)| s) != Some(slot as u32);
                if slot >= slot_count || full {
                    direct.push((pos, off + len - pos));
                    break;
                }
                let unit = ((rel % cs) / BLOCK) as u32;
                let slot = slot as u32;
                match slots.last_mut() {
                    Some((s, m)) if *s == slot => *m |= 1 << unit,
                    _ => slots.push((slot, 1 << unit)),
                }
                pos += BLOCK;
            }
        }
        for (off, len) in direct {
            if let Err(e) = self.storage.punch_hole(off, len) {
                log::warn!("punching {len} bytes at {off} failed: {e}");
            }
        }
        if slots.is_empty() {
            return 0;
        }
        // Owners of the slots that also hold a cluster's entry (one cluster per slot: the
        // allocator was rebuilt from this table and refused shared slots).
        let mut owners: std::collections::HashMap<u32, u32> = slots
            .iter()
            .filter(|&&(slot, _)| !self.alloc.is_free(slot))
            .map(|&(slot, _)| (slot, u32::MAX))
            .collect();
        if !owners.is_empty() {
            self.table.for_each_stored(|c, e| {
                if let Some(o) = owners.get_mut(&e.slot) {
                    *o = c;
                }
            });
        }
        let now = self.now_ms();
        let mut bytes = 0u64;
        let mut refused = 0u64;
        let mut queued: Vec<(u32, u32, u64)> = Vec::new();
        for (slot, mask) in slots {
            let adopted = match owners.get(&slot) {
                None if self.alloc.mark_stale(slot, mask, now) => mask,
                None => 0,
                Some(&c) if c != u32::MAX => {
                    let (s, i) = locate(c);
                    let mut st = lock(&self.table.cells[s].stripe);
                    // Never a unit the cluster's entry occupies (the ranges say so already;
                    // re-checked because the punch trusts the stale units blindly).
                    let mask = mask & !st.live_mask(c, i, slot);
                    if mask != 0 && st.add_stale(c, i, slot, mask, now) {
                        self.stale_entries.fetch_add(1, Ordering::Relaxed);
                        queued.push((c, slot, now));
                    }
                    mask
                }
                Some(_) => 0,
            };
            if adopted == 0 {
                refused += 1;
            }
            bytes += u64::from(adopted.count_ones()) * BLOCK;
        }
        if refused > 0 {
            // Cannot happen with a table the allocator was just rebuilt from; left in place
            // (a later crash recovery or `check --repair` punches it), never guessed at.
            log::warn!("unreferenced space in {refused} slots left in place: slots not free");
        }
        lock(&self.stale_queue).extend(queued);
        if bytes > 0 {
            log::info!(
                "{bytes} bytes that the last quiesce left unreclaimed will be punched in the \
                 background unless reused first"
            );
        }
        bytes
    }

    /// The metadata writer's loop.
    pub fn writer_main(core: Arc<Core>) {
        NO_SPACE_WAIT.with(|f| f.set(true));
        let mut last = Instant::now();
        // Since when the write-back buffer holds something (roughly: reset while it is empty).
        let mut buffered_since = Instant::now();
        loop {
            let (ticket, checkpoint, timer) = {
                let mut ctl = lock(&core.ctl);
                loop {
                    if ctl.stop {
                        let keep = ctl.keep_freed;
                        drop(ctl);
                        // A checkpoint half written ahead is dropped: the next writer may run
                        // after another process changed the image.
                        lock(&core.meta).ahead = None;
                        // A close punches everything freed by durable commits, so that a closed
                        // image stores nothing its table does not refer to. A quiesce leaves it
                        // listed (pinned as releasing, stale units, stale slots): the resumed
                        // writer punches it after its grace period, and a reload after another
                        // process wrote forgets it (`install`); the marker tells other openers.
                        if !keep {
                            core.release_all_freed();
                        }
                        return;
                    }
                    let healthy = ctl.failed.is_none();
                    if healthy && (ctl.flush_waiting || ctl.pressure || ctl.checkpoint) {
                        break;
                    }
                    let elapsed = last.elapsed();
                    if core.wb_entries.load(Ordering::Acquire) == 0 {
                        buffered_since = Instant::now();
                    }
                    // Buffered writes older than a commit interval are stored and committed
                    // like a timer commit, even when pressure commits keep `last` recent.
                    let buffer_due = buffered_since.elapsed() >= core.commit_interval;
                    if healthy && (elapsed >= core.commit_interval || buffer_due) {
                        if buffer_due {
                            drop(ctl);
                            core.write_back_idle();
                            buffered_since = Instant::now();
                            ctl = lock(&core.ctl);
                        }
                        break;
                    }
                    if core.has_pending_frees() {
                        drop(ctl);
                        core.reclaim_some(RECLAIM_BATCH);
                        ctl = lock(&core.ctl);
                        continue;
                    }
                    // Over the backlog bound, the oldest go whatever their age.
                    let grace = if core.stale_backlog() > STALE_BACKLOG_MAX {
                        Duration::ZERO
                    } else {
                        core.stale_grace
                    };
                    if core.has_aged_stale_units(grace) {
                        drop(ctl);
                        let n = core.punch_stale_units(grace, RECLAIM_BATCH);
                        ctl = lock(&core.ctl);
                        if n > 0 {
                            continue;
                        }
                    }
                    if core.alloc.stale_slots() > 0 {
                        drop(ctl);
                        let n = core.punch_stale(grace, RECLAIM_BATCH);
                        ctl = lock(&core.ctl);
                        if n > 0 {
                            continue;
                        }
                    }
                    if healthy && core.checkpoint_ahead_pending() {
                        drop(ctl);
                        core.checkpoint_ahead_step();
                        ctl = lock(&core.ctl);
                        continue;
                    }
                    // The steps above drop the lock: a FLUSH (or a stop) that came meanwhile
                    // notified nobody, and the wait below would sleep through it (up to the
                    // commit interval).
                    if ctl.stop
                        || (healthy && (ctl.flush_waiting || ctl.pressure || ctl.checkpoint))
                    {
                        continue;
                    }
                    let wait = if healthy {
                        // Wake for the timer commit, and in time to punch stale slots whose
                        // grace period ends.
                        (core.commit_interval - elapsed).min(core.stale_grace)
                    } else {
                        Duration::from_secs(3600)
                    };
                    ctl = core
                        .writer_cv
                        .wait_timeout(ctl, wait)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
                // A timer commit: nobody waits for it.
                let timer = !(ctl.flush_waiting || ctl.pressure || ctl.checkpoint);
                ctl.begun += 1;
                ctl.flush_waiting = false;
                ctl.pressure = false;
                core.pressure.store(false, Ordering::Release);
                (ctl.begun, std::mem::take(&mut ctl.checkpoint), timer)
            };
            let commits = core.commits.load(Ordering::Relaxed);
            match core.commit(ticket, checkpoint) {
                // After a timer commit that found nothing to commit: a whole commit interval
                // without a change. Not after a FLUSH's commit (a guest that fsyncs often would
                // pay for a marker and a record per FLUSH), nor after every timer commit (a
                // guest writing about once a commit interval would spend two journal blocks per
                // interval, and checkpoint twice as often).
                Ok(()) if timer && core.commits.load(Ordering::Relaxed) == commits => {
                    if core.mark_idle_if_quiet() {
                        // Idle from now on: what the busy spell allocated goes back.
                        release_free_memory();
                    }
                }
                Ok(()) => {}
                Err(e) => core.fail(e.to_string()),
            }
            last = Instant::now();
        }
    }

    // ----- statistics -------------------------------------------------------------------

    /// Live statistics.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            logical_bytes: self.layout.size,
            ..Stats::default()
        };
        let mut units = 0u64;
        let mut ram = self.alloc.ram_bytes();
        for cell in self.table.cells.iter() {
            let st = lock(&cell.stripe);
            s.clusters_compressed += st.compressed;
            s.clusters_raw += st.raw;
            units += st.stored_units;
            ram += st.ram_bytes();
            s.uncommitted_writes += st.uncommitted();
        }
        s.clusters_zero = self.layout.cluster_count - s.clusters_compressed - s.clusters_raw;
        s.allocated_logical_bytes =
            (s.clusters_compressed + s.clusters_raw) * u64::from(self.layout.cluster_size);
        s.stored_bytes = units * BLOCK;
        for sh in self.shards.iter() {
            s.reads += sh.reads.load(Ordering::Relaxed);
            s.writes += sh.writes.load(Ordering::Relaxed);
            s.flushes += sh.flushes.load(Ordering::Relaxed);
            s.checksum_errors += sh.checksum_errors.load(Ordering::Relaxed);
        }
        s.commits = self.commits.load(Ordering::Relaxed);
        s.checkpoints = self.checkpoints.load(Ordering::Relaxed);
        s.checkpoints_ahead = self.checkpoints_ahead.load(Ordering::Relaxed);
        s.table_ram_bytes = ram;
        s.quiesced = self.state.load(Ordering::SeqCst) != RUNNING;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_found_first_fit_and_never_overlap() {
        assert_eq!(best_gap(0, 0, 16, 16), Some(0));
        assert_eq!(best_gap(0x00ff, 0, 8, 16), Some(8));
        assert_eq!(best_gap(0xff00, 0, 8, 16), Some(0));
        assert_eq!(best_gap(0x0ff0, 0, 8, 16), None);
        assert_eq!(best_gap(0, 0, 17, 16), None);
        // An edge of the slot first (the next version then has the most room beside this one),
        // the one overwriting more stale units when both fit.
        assert_eq!(best_gap(0x000f, 0x0ff0, 4, 16), Some(12));
        assert_eq!(best_gap(0x0003, 0xf000, 4, 16), Some(12));
        assert_eq!(best_gap(0, 0xff00, 8, 16), Some(8));
        assert_eq!(best_gap(0, 0x00ff, 8, 16), Some(0));
        assert_eq!(best_gap(0x00f0, 0x0f0c, 6, 16), Some(10));
        // No edge free: the position overwriting the most stale units, never a live one.
        assert_eq!(best_gap(0x8001, 0x0ff0, 4, 16), Some(4));
        assert_eq!(best_gap(0x8001, 0x0060, 4, 16), Some(3));
        assert_eq!(best_gap(0x8001, 0, 4, 16), Some(1));
        assert_eq!(best_gap(0xfff0, 0xf000_0000, 4, 32), Some(28));
    }

    #[test]
    fn runs_of_units_are_found_in_order() {
        let mut runs = Vec::new();
        for_each_run(0b1110_0110, |u, n| runs.push((u, n)));
        assert_eq!(runs, vec![(1, 2), (5, 3)]);
        runs.clear();
        for_each_run(u32::MAX, |u, n| runs.push((u, n)));
        assert_eq!(runs, vec![(0, 32)]);
        runs.clear();
        for_each_run(0, |u, n| runs.push((u, n)));
        assert!(runs.is_empty());
    }

    #[test]
    fn payload_checksum_is_crc32c_for_every_length_and_alignment() {
        // Stored entries hold crc32c values (written by earlier versions and by `check`): the
        // fast implementation must agree byte for byte, including the SIMD paths' tails.
        let data: Vec<u8> = (0..70_100u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (0..300).chain([4095, 4096, 4097, 32768, 65535, 65536, 65537, 69_999]) {
            for start in [0, 1, 3, 8, 63] {
                let bytes = &data[start..start + len];
                assert_eq!(
                    payload_checksum(bytes),
                    crc32c::crc32c(bytes),
                    "length {len} at offset {start}"
                );
            }
        }
        assert_eq!(
            payload_checksum(b"123456789"),
            0xe306_9283,
            "CRC-32C check value"
        );
    }

    #[test]
    fn zero_detection_sees_a_single_set_byte_anywhere() {
        let mut b = vec![0u8; 65536];
        assert!(is_zero(&b));
        for at in [0, 7, 8, 4095, 65535] {
            b[at] = 1;
            assert!(!is_zero(&b), "{at}");
            b[at] = 0;
        }
    }
}
