//! A crash-simulating [`Storage`]: a durable layer plus a volatile write cache.
//!
//! Model (the contract documented on `insitu_blk::image::Storage`):
//! - `write_at`, `punch_hole` and `set_len` change what reads see at once, but are only *pending*:
//!   they sit in an ordered list of unflushed operations.
//! - `flush` makes every completed pending operation durable (the list is emptied).
//! - A crash keeps the durable layer plus any subset of the pending operations (applied in their
//!   original order), and a kept write may be *torn*: only some of its 512-byte sectors or 4 KiB
//!   blocks land.
//!
//! Content is held in copy-on-write 4 KiB pages (`Arc`), so a snapshot of the durable layer is a
//! vector of pointers and one run can keep hundreds of crash points cheaply. Unwritten and punched
//! pages are `None` and read as zeros (the file semantics the engine is written for).

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use insitu_blk::image::Storage;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Page size of the copy-on-write layer; also the coarse tearing granularity.
pub const PAGE: usize = 4096;
/// Fine tearing granularity (a disk sector).
pub const SECTOR: usize = 512;

/// Largest storage the simulator holds (guards the test process against a runaway length).
pub const MAX_LEN: u64 = 1 << 32;

type Page = Arc<[u8; PAGE]>;

/// Sparse, copy-on-write byte array with a length (a file's content).
#[derive(Clone, Default)]
pub struct Pages {
    len: u64,
    pages: Vec<Option<Page>>,
}

impl fmt::Debug for Pages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Pages {{ len: {}, allocated pages: {} }}",
            self.len,
            self.pages.iter().filter(|p| p.is_some()).count()
        )
    }
}

fn page_count(len: u64) -> usize {
    len.div_ceil(PAGE as u64) as usize
}

impl Pages {
    /// Builds pages holding `bytes` (all-zero pages are left unallocated).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut pages = Pages::default();
        pages.set_len(bytes.len() as u64);
        for (i, chunk) in bytes.chunks(PAGE).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                pages.write((i * PAGE) as u64, chunk);
            }
        }
        pages
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Bytes held in allocated pages (what a sparse file would store).
    pub fn allocated_bytes(&self) -> u64 {
        self.pages.iter().filter(|p| p.is_some()).count() as u64 * PAGE as u64
    }

    /// Allocated ranges (whole pages, clipped) inside `[offset, offset + len)`, in order.
    pub fn allocated_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.len);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = (pos / PAGE as u64) as usize;
            let stop = ((index as u64 + 1) * PAGE as u64).min(end);
            if self.pages[index].is_some() {
                match out.last_mut() {
                    Some((o, l)) if *o + *l == pos => *l += stop - pos,
                    _ => out.push((pos, stop - pos)),
                }
            }
            pos = stop;
        }
        out
    }

    /// The whole content as one vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len as usize];
        self.read(0, &mut out).expect("in range");
        out
    }

    /// Reads `buf.len()` bytes at `offset`; `UnexpectedEof` past the end.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} past the end ({})",
                    buf.len(),
                    self.len
                ),
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = (pos / PAGE as u64) as usize;
            let within = (pos % PAGE as u64) as usize;
            let n = (PAGE - within).min(buf.len() - done);
            match &self.pages[index] {
                Some(page) => buf[done..done + n].copy_from_slice(&page[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, growing the length when it ends past it (as a file does).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        if end > self.len {
            self.set_len(end);
        }
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let index = (pos / PAGE as u64) as usize;
            let within = (pos % PAGE as u64) as usize;
            let n = (PAGE - within).min(data.len() - done);
            let page = self.pages[index].get_or_insert_with(|| Arc::new([0u8; PAGE]));
            Arc::make_mut(page)[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    /// Zeros a range (clipped to the length); whole pages are released.
    pub fn punch(&mut self, offset: u64, len: u64) {
        let start = offset.min(self.len);
        let end = offset.saturating_add(len).min(self.len);
        let mut pos = start;
        while pos < end {
            let index = (pos / PAGE as u64) as usize;
            let within = (pos % PAGE as u64) as usize;
            let n = ((PAGE - within) as u64).min(end - pos) as usize;
            if n == PAGE {
                self.pages[index] = None;
            } else if let Some(page) = &mut self.pages[index] {
                Arc::make_mut(page)[within..within + n].fill(0);
            }
            pos += n as u64;
        }
    }

    /// Truncates or extends (with zeros).
    pub fn set_len(&mut self, len: u64) {
        if len < self.len {
            // Zero the tail of the last kept page so a later extension reads zeros there.
            let within = (len % PAGE as u64) as usize;
            if within != 0 {
                if let Some(Some(page)) = self.pages.get_mut((len / PAGE as u64) as usize) {
                    Arc::make_mut(page)[within..].fill(0);
                }
            }
        }
        self.pages.resize(page_count(len), None);
        self.len = len;
    }
}

/// One unflushed operation in the volatile cache.
#[derive(Clone)]
pub enum PendingOp {
    /// `write_at(offset, data)`.
    Write { offset: u64, data: Arc<[u8]> },
    /// `punch_hole(offset, len)`.
    Punch { offset: u64, len: u64 },
    /// `set_len(len)`.
    SetLen { len: u64 },
}

impl fmt::Debug for PendingOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PendingOp::Write { offset, data } => {
                write!(f, "write {}@{offset:#x}", data.len())
            }
            PendingOp::Punch { offset, len } => write!(f, "punch {len}@{offset:#x}"),
            PendingOp::SetLen { len } => write!(f, "set_len {len}"),
        }
    }
}

/// A crash point: the durable layer and the pending operations at one instant, plus the value of
/// the workload's clock at that instant (so the oracle knows which requests had started/completed).
#[derive(Clone)]
pub struct CrashSnapshot {
    /// Workload clock read at the snapshot (under the storage lock).
    pub clock: u64,
    /// Number of storage operations that had been applied when the snapshot was taken.
    pub storage_ops: u64,
    /// What the last storage operation before the snapshot was.
    pub after: String,
    /// Durable content.
    pub durable: Pages,
    /// Unflushed operations, oldest first.
    pub pending: Vec<PendingOp>,
}

impl fmt::Debug for CrashSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "crash point at clock {} after storage op #{} ({}), {} pending ops",
            self.clock,
            self.storage_ops,
            self.after,
            self.pending.len()
        )
    }
}

/// How a crash treats the pending operations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CrashMode {
    /// Nothing unflushed survives.
    KeepNone,
    /// Everything unflushed survives, untorn (like a clean power-off after the cache drained).
    KeepAll,
    /// The oldest `n` survive (a FIFO cache); the last kept one may be torn.
    Prefix,
    /// Each survives with probability `p`; kept writes are torn with probability `tear`.
    Random { p: f64, tear: f64 },
}

impl CrashMode {
    /// A mode chosen at random with a spread that covers the extremes.
    pub fn random(rng: &mut SmallRng) -> Self {
        match rng.gen_range(0..10) {
            0 => CrashMode::KeepNone,
            1 => CrashMode::KeepAll,
            2 | 3 => CrashMode::Prefix,
            _ => CrashMode::Random {
                p: rng.gen_range(0.05..0.95),
                tear: [0.0, 0.1, 0.3, 0.6][rng.gen_range(0..4)],
            },
        }
    }
}

/// Applies `op` torn: only some `granule`-aligned pieces land (a random subset, or a prefix).
fn apply_torn(pages: &mut Pages, op: &PendingOp, rng: &mut SmallRng) -> String {
    match op {
        PendingOp::Write { offset, data } => {
            let granule = if rng.gen_bool(0.5) { SECTOR } else { PAGE } as u64;
            let end = offset + data.len() as u64;
            // Pieces are aligned to absolute offsets, like a device's atomic units.
            let mut pieces = Vec::new();
            let mut pos = *offset;
            while pos < end {
                let next = ((pos / granule) + 1) * granule;
                pieces.push((pos, next.min(end)));
                pos = next.min(end);
            }
            let prefix = rng.gen_bool(0.5);
            let cut = rng.gen_range(0..=pieces.len());
            let mut kept = 0;
            for (i, &(s, e)) in pieces.iter().enumerate() {
                let keep = if prefix { i < cut } else { rng.gen_bool(0.5) };
                if keep {
                    kept += 1;
                    let a = (s - offset) as usize;
                    let b = (e - offset) as usize;
                    pages.write(s, &data[a..b]);
                }
            }
            format!(
                "{op:?} TORN at {granule} B ({}): {kept}/{} pieces",
                if prefix { "prefix" } else { "random" },
                pieces.len()
            )
        }
        PendingOp::Punch { offset, len } => {
            let end = offset + len;
            let mut pos = *offset;
            let mut kept = 0;
            let mut total = 0;
            while pos < end {
                let next = (((pos / PAGE as u64) + 1) * PAGE as u64).min(end);
                total += 1;
                if rng.gen_bool(0.5) {
                    kept += 1;
                    pages.punch(pos, next - pos);
                }
                pos = next;
            }
            format!("{op:?} TORN: {kept}/{total} pages")
        }
        PendingOp::SetLen { len } => {
            pages.set_len(*len);
            format!("{op:?}")
        }
    }
}

fn apply(pages: &mut Pages, op: &PendingOp) {
    match op {
        PendingOp::Write { offset, data } => pages.write(*offset, data),
        PendingOp::Punch { offset, len } => pages.punch(*offset, *len),
        PendingOp::SetLen { len } => pages.set_len(*len),
    }
}

impl CrashSnapshot {
    /// The content a crash at this point leaves, for one draw of `mode`, and a description of
    /// what survived.
    pub fn materialize(&self, mode: CrashMode, rng: &mut SmallRng) -> (Pages, String) {
        let mut pages = self.durable.clone();
        let mut desc = Vec::new();
        let n = self.pending.len();
        match mode {
            CrashMode::KeepNone => {}
            CrashMode::KeepAll => {
                for op in &self.pending {
                    apply(&mut pages, op);
                }
                if n > 0 {
                    desc.push(format!("all {n} kept"));
                }
            }
            CrashMode::Prefix => {
                let cut = rng.gen_range(0..=n);
                for (i, op) in self.pending[..cut].iter().enumerate() {
                    if i + 1 == cut && rng.gen_bool(0.5) {
                        desc.push(format!("#{i} {}", apply_torn(&mut pages, op, rng)));
                    } else {
                        apply(&mut pages, op);
                    }
                }
                desc.push(format!("prefix {cut}/{n} kept"));
            }
            CrashMode::Random { p, tear } => {
                for (i, op) in self.pending.iter().enumerate() {
                    if !rng.gen_bool(p) {
                        continue;
                    }
                    if rng.gen_bool(tear) {
                        desc.push(format!("#{i} {}", apply_torn(&mut pages, op, rng)));
                    } else {
                        apply(&mut pages, op);
                        desc.push(format!("#{i} {op:?}"));
                    }
                }
            }
        }
        let desc = format!(
            "{self:?}; mode {mode:?}; pending: [{}]; survived: [{}]",
            self.pending
                .iter()
                .map(|op| format!("{op:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            desc.join(", ")
        );
        (pages, desc)
    }
}

/// Reservoir of crash points taken automatically at storage operations.
struct Capture {
    clock: Arc<AtomicU64>,
    rng: SmallRng,
    capacity: usize,
    seen: u64,
    snapshots: Vec<CrashSnapshot>,
    /// Focus classes: a write starting with a class's magic opens a window of `FOCUS_WINDOW`
    /// operations that are all captured; each class keeps a uniform sample of its windows.
    focus: Vec<FocusClass>,
    /// The window being filled: (class, index into its windows), operations left.
    focus_active: Option<(usize, usize)>,
    focus_left: usize,
}

/// Windows of crash points after writes that start with `magic` (reservoir of `capacity`).
struct FocusClass {
    magic: Vec<u8>,
    capacity: usize,
    seen: u64,
    windows: Vec<Vec<CrashSnapshot>>,
}

/// Operations captured after a focus write (the write, its siblings, the flush, what follows).
const FOCUS_WINDOW: usize = 8;

struct SimState {
    durable: Pages,
    current: Pages,
    pending: Vec<PendingOp>,
    storage_ops: u64,
    flushes: u64,
    punches: u64,
    capture: Option<Capture>,
    /// Fault injection: the mutating operation this many operations from now fails with EIO
    /// (and is not applied).
    fail_countdown: Option<u64>,
    injected_faults: u64,
    /// Broken-device mode for showing the oracle bites: `flush` succeeds but makes nothing durable.
    lying_flush: bool,
    /// Block-device mode: discarded ranges do not read as zeros (see [`SimStorage::as_block_device`]).
    block_device: Option<DiscardContent>,
}

/// What a discarded range of a simulated block device reads as afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscardContent {
    /// The old data stays (many SSDs without deterministic TRIM).
    OldData,
    /// Garbage (worst case the block-device contract allows).
    Garbage,
}

/// A one-shot barrier inside `flush`: the next `flush` call (by whichever thread: the engine's
/// metadata writer) announces itself and blocks until the test releases it. Lets a test run
/// requests while a commit is provably in flight (design.md §3, "two traps in group commit").
#[derive(Default)]
pub struct FlushGate {
    state: Mutex<(bool, bool)>,
    cv: std::sync::Condvar,
}

impl FlushGate {
    fn enter_and_wait(&self) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.0 = true;
        self.cv.notify_all();
        while !st.1 {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Waits until a flush is blocked in the gate; false after `timeout`.
    pub fn wait_entered(&self, timeout: std::time::Duration) -> bool {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (st, _) = self
            .cv
            .wait_timeout_while(st, timeout, |st| !st.0)
            .unwrap_or_else(PoisonError::into_inner);
        st.0
    }

    /// Lets the blocked flush (and any later one) go on.
    pub fn release(&self) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.1 = true;
        self.cv.notify_all();
    }
}

/// The crash-simulating storage. Thread-safe; one lock (tests only).
pub struct SimStorage {
    state: Mutex<SimState>,
    locked: AtomicBool,
    flush_gate: Mutex<Option<Arc<FlushGate>>>,
}

impl fmt::Debug for SimStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        write!(
            f,
            "SimStorage {{ len: {}, pending: {}, storage ops: {} }}",
            state.current.len(),
            state.pending.len(),
            state.storage_ops
        )
    }
}

impl Default for SimStorage {
    fn default() -> Self {
        Self::from_pages(Pages::default())
    }
}

impl SimStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage whose durable (and current) content is `pages`: what a machine sees after reboot.
    pub fn from_pages(pages: Pages) -> Self {
        SimStorage {
            state: Mutex::new(SimState {
                durable: pages.clone(),
                current: pages,
                pending: Vec::new(),
                storage_ops: 0,
                flushes: 0,
                punches: 0,
                capture: None,
                fail_countdown: None,
                injected_faults: 0,
                lying_flush: false,
                block_device: None,
            }),
            locked: AtomicBool::new(false),
            flush_gate: Mutex::new(None),
        }
    }

    /// Arms a [`FlushGate`] for the next `flush` call.
    pub fn arm_flush_gate(&self) -> Arc<FlushGate> {
        let gate = Arc::new(FlushGate::default());
        *self
            .flush_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(gate.clone());
        gate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Content as reads see it now (durable + pending).
    pub fn current(&self) -> Pages {
        self.lock().current.clone()
    }

    /// Durable content only.
    pub fn durable(&self) -> Pages {
        self.lock().durable.clone()
    }

    /// Number of unflushed operations.
    pub fn pending_len(&self) -> usize {
        self.lock().pending.len()
    }

    /// Number of `flush` calls served.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// Number of `punch_hole` calls served.
    pub fn punches(&self) -> u64 {
        self.lock().punches
    }

    /// Number of mutating storage operations (write, punch, set_len, flush) served.
    pub fn storage_ops(&self) -> u64 {
        self.lock().storage_ops
    }

    /// Makes the `n`-th mutating operation from now (write, punch, flush, set_len; 1 = the next)
    /// fail with EIO, once. A failed write, punch or set_len has no effect; a failed flush loses
    /// the writes it covered from the durable view for good (Linux's writeback-error semantics).
    pub fn fail_after(&self, n: u64) {
        self.lock().fail_countdown = Some(n.max(1));
    }

    /// Number of faults injected so far.
    pub fn injected_faults(&self) -> u64 {
        self.lock().injected_faults
    }

    /// A broken device for negative tests: `flush` returns success but makes nothing durable.
    pub fn lie_about_flush(&self, on: bool) {
        self.lock().lying_flush = on;
    }

    /// Behaves as a block device: `is_block_device()` is true, allocation is unknown, and
    /// `punch_hole` (BLKDISCARD) leaves the range reading as `content` instead of zeros. The
    /// engine must never rely on discarded bytes (storage.rs contract).
    pub fn as_block_device(&self, content: DiscardContent) {
        self.lock().block_device = Some(content);
    }

    /// Called with the lock held before a mutating operation: `Err` when a fault is due.
    fn inject(state: &mut SimState, what: &str) -> io::Result<()> {
        let Some(n) = state.fail_countdown.as_mut() else {
            return Ok(());
        };
        *n -= 1;
        if *n > 0 {
            return Ok(());
        }
        state.fail_countdown = None;
        state.injected_faults += 1;
        Err(io::Error::other(format!(
            "injected EIO on {what} (SimStorage fault injection)"
        )))
    }

    /// A crash point now, stamped with `clock`'s value.
    pub fn snapshot(&self, clock: &AtomicU64) -> CrashSnapshot {
        let state = self.lock();
        CrashSnapshot {
            clock: clock.load(Ordering::SeqCst),
            storage_ops: state.storage_ops,
            after: "workload step".into(),
            durable: state.durable.clone(),
            pending: state.pending.clone(),
        }
    }

    /// A crash now: a new storage holding the durable layer plus what `mode` keeps.
    pub fn crash(&self, mode: CrashMode, rng: &mut SmallRng) -> (SimStorage, String) {
        let snap = self.snapshot(&AtomicU64::new(0));
        let (pages, desc) = snap.materialize(mode, rng);
        (SimStorage::from_pages(pages), desc)
    }

    /// Starts taking crash points automatically after mutating storage operations: a uniform
    /// sample (reservoir) of `capacity` of them, each stamped with `clock`.
    pub fn start_capture(&self, clock: Arc<AtomicU64>, capacity: usize, seed: u64) {
        self.lock().capture = Some(Capture {
            clock,
            rng: SmallRng::seed_from_u64(seed),
            capacity,
            seen: 0,
            snapshots: Vec::new(),
            focus: Vec::new(),
            focus_active: None,
            focus_left: 0,
        });
    }

    /// While capturing: additionally take a crash point after *every* one of the few storage
    /// operations that follow a write starting with one of the magics (a window), keeping a
    /// uniform sample of `windows` windows per magic, so rare multi-step sequences (a commit
    /// record, a checkpoint) get crashed at each step wherever they happen in the run.
    pub fn focus_capture(&self, classes: &[(&[u8], usize)]) {
        if let Some(capture) = self.lock().capture.as_mut() {
            capture.focus = classes
                .iter()
                .map(|&(magic, capacity)| FocusClass {
                    magic: magic.to_vec(),
                    capacity,
                    seen: 0,
                    windows: Vec::new(),
                })
                .collect();
        }
    }

    /// Stops capturing and returns the crash points taken, in the order they happened.
    pub fn take_captured(&self) -> Vec<CrashSnapshot> {
        let mut snaps = self
            .lock()
            .capture
            .take()
            .map(|mut c| {
                for class in c.focus {
                    c.snapshots.extend(class.windows.into_iter().flatten());
                }
                c.snapshots
            })
            .unwrap_or_default();
        snaps.sort_by_key(|s| s.storage_ops);
        snaps
    }

    /// Called with the lock held after every mutating operation (`data`: what a write wrote).
    fn after_op(state: &mut SimState, data: Option<&[u8]>, what: impl Fn() -> String) {
        state.storage_ops += 1;
        let Some(capture) = state.capture.as_mut() else {
            return;
        };
        if let Some(data) = data {
            if let Some(ci) = capture
                .focus
                .iter()
                .position(|c| data.starts_with(&c.magic))
            {
                // A new window: reservoir-sample it among this class's windows.
                let class = &mut capture.focus[ci];
                class.seen += 1;
                capture.focus_active = if class.windows.len() < class.capacity {
                    class.windows.push(Vec::new());
                    Some((ci, class.windows.len() - 1))
                } else {
                    let j = capture.rng.gen_range(0..class.seen);
                    (j < class.capacity as u64).then(|| {
                        class.windows[j as usize].clear();
                        (ci, j as usize)
                    })
                };
                capture.focus_left = FOCUS_WINDOW;
            }
        }
        if capture.focus_left > 0 {
            capture.focus_left -= 1;
            if let Some((ci, wi)) = capture.focus_active {
                let snap = CrashSnapshot {
                    clock: capture.clock.load(Ordering::SeqCst),
                    storage_ops: state.storage_ops,
                    after: format!("{} (focus)", what()),
                    durable: state.durable.clone(),
                    pending: state.pending.clone(),
                };
                capture.focus[ci].windows[wi].push(snap);
            }
        }
        capture.seen += 1;
        let slot = if capture.snapshots.len() < capture.capacity {
            None
        } else {
            let j = capture.rng.gen_range(0..capture.seen);
            if j >= capture.capacity as u64 {
                return;
            }
            Some(j as usize)
        };
        let snap = CrashSnapshot {
            clock: capture.clock.load(Ordering::SeqCst),
            storage_ops: state.storage_ops,
            after: what(),
            durable: state.durable.clone(),
            pending: state.pending.clone(),
        };
        let capture = state.capture.as_mut().expect("checked above");
        match slot {
            None => capture.snapshots.push(snap),
            Some(j) => capture.snapshots[j] = snap,
        }
    }
}

impl Storage for SimStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.lock().current.read(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= MAX_LEN => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("SimStorage refuses a write ending past {MAX_LEN} bytes"),
                ))
            }
        }
        let mut state = self.lock();
        Self::inject(&mut state, "write")?;
        state.current.write(offset, data);
        let op = PendingOp::Write {
            offset,
            data: Arc::from(data),
        };
        state.pending.push(op);
        Self::after_op(&mut state, Some(data), || {
            format!("write {}@{offset:#x}", data.len())
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let gate = self
            .flush_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(gate) = gate {
            gate.enter_and_wait();
        }
        let mut state = self.lock();
        if let Err(e) = Self::inject(&mut state, "flush") {
            // Linux after a failed fdatasync: the pages it was writing are marked clean and
            // stay cached (reads still see the new data), but the disk may not have them and
            // no later flush writes them again. Model the worst case: none of them is durable,
            // ever, unless written again.
            state.pending.clear();
            return Err(e);
        }
        if !state.lying_flush {
            // Only what is pending reaches the disk (not `current` wholesale): writes lost by
            // an earlier failed flush stay lost.
            let SimState {
                durable, pending, ..
            } = &mut *state;
            for op in pending.drain(..) {
                apply(durable, &op);
            }
        }
        state.flushes += 1;
        Self::after_op(&mut state, None, || "flush".into());
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.lock();
        Self::inject(&mut state, "punch")?;
        state.punches += 1;
        match state.block_device {
            None => {
                state.current.punch(offset, len);
                state.pending.push(PendingOp::Punch { offset, len });
            }
            Some(DiscardContent::OldData) => {}
            Some(DiscardContent::Garbage) => {
                let end = offset.saturating_add(len).min(state.current.len());
                if end > offset {
                    let garbage: Arc<[u8]> = Arc::from(vec![0xA5u8; (end - offset) as usize]);
                    state.current.write(offset, &garbage);
                    state.pending.push(PendingOp::Write {
                        offset,
                        data: garbage,
                    });
                }
            }
        }
        Self::after_op(&mut state, None, || format!("punch {len}@{offset:#x}"));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Guard the test process against an absurd length (a bug, not a crash scenario).
        if len > MAX_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SimStorage refuses set_len({len}) above 4 GiB"),
            ));
        }
        let mut state = self.lock();
        Self::inject(&mut state, "set_len")?;
        if state.block_device.is_some() {
            // Block devices cannot change size (FileStorage: error above the capacity).
            if len > state.current.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "block device is smaller than the image needs",
                ));
            }
            return Ok(());
        }
        state.current.set_len(len);
        state.pending.push(PendingOp::SetLen { len });
        Self::after_op(&mut state, None, || format!("set_len {len}"));
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.lock().current.allocated_bytes()))
    }

    fn allocated_ranges(&self, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        let state = self.lock();
        if state.block_device.is_some() {
            return Ok(None);
        }
        Ok(Some(state.current.allocated_ranges(offset, len)))
    }

    fn is_block_device(&self) -> bool {
        self.lock().block_device.is_some()
    }

    fn try_lock_exclusive(&self) -> io::Result<bool> {
        Ok(!self.locked.swap(true, Ordering::AcqRel))
    }

    fn unlock(&self) -> io::Result<()> {
        self.locked.store(false, Ordering::Release);
        Ok(())
    }
}
