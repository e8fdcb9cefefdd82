//! A randomized kill campaign against the real `insitu-blk serve` process.
//!
//! Each case creates an image (compression none/lz4/zstd, a random cluster size and disk size;
//! sometimes through `serve --create-size`, which uses the defaults), then runs rounds of:
//!
//! 1. start `serve` (1-4 queues offered) and connect the test frontend (`tests/frontend`): either
//!    as a new guest (rings at 0, half of the time with an inflight buffer, INFLIGHT_SHMFD), or
//!    reconnecting the running guest to the restarted backend with the same guest memory and
//!    rings restored at the used index: as cloud-hypervisor does with VIRTIO_F_IN_ORDER and no
//!    inflight buffer, or as QEMU does with its inflight buffer; either way the requests the dead
//!    process had not completed must be served, each exactly once;
//! 2. wait for every replayed request, read the whole disk and check it against the oracle
//!    (below), then FLUSH and check the lost-write notice (docs/ARCHITECTURE.md, I2: a backend
//!    that restarts after an unclean death and sees rings restored mid-session fails the guest's
//!    next FLUSH once with IOERR; a planned stop (SIGTERM) or a new guest gets none);
//! 3. a random workload on 1-4 queues at once, up to 40 requests in flight per queue (one test
//!    thread drives them; the backend serves each queue on its own worker thread): writes of
//!    512 B to 1 MiB at random sector-aligned
//!    offsets, many of them inside a few hot clusters so that requests overlap the same clusters
//!    and blocks while in flight; WRITE_ZEROES, DISCARD, reads, FLUSHes; sometimes the traffic
//!    goes on slowly across the backend's 1 s timer commit;
//! 4. at a random moment, with requests in flight: SIGKILL, SIGTERM (must exit 0), or SIGSTOP,
//!    more requests, then SIGKILL;
//! 5. `insitu-blk check` on the image as the process left it (must exit 0); sometimes the
//!    restarted process is killed again at once, while it recovers and serves what the guest
//!    replays (then back to 5).
//!
//! The oracle keeps, per 512-byte sector, the value it had at the last verified point (which a
//! FLUSH then made durable) and every request after that which touched it, with the moments it
//! was made available and seen completed (a global sequence). After a restart a sector may hold
//! the value of any request that touched it, unless a later request that completed before the
//! last successful FLUSH was made available (I2) superseded it (a FLUSH the restarted process
//! completed does not vouch for writes the killed process completed: the notice covers them).
//! After SIGTERM every completed request must be there (I7). Each written sector carries its
//! request id and sector number, so a misplaced, torn or stale sector is recognised. Atomicity
//! (I3): when one sector of a write's part inside one cluster shows that write, no other sector
//! of that part may show a value that was superseded before the write was made available, and
//! where two writes overlap inside one cluster the overlap never shows both. Every read must
//! succeed (a crash never causes an I/O error), and the device writes no guest memory it was
//! not given.
//!
//! What the process kill does not cover: power loss (the page cache survives a killed process;
//! tests/crash_consistency.rs simulates lost and torn device writes).
//!
//! Environment:
//! - `INSITU_KILL_ITERS=N`: N cases (default 12; each case has 2-4 kills).
//! - `INSITU_KILL_SEED=S`: replay case S alone (the seed is printed with every failure; the
//!   timing of the kill relative to the backend's progress is not reproducible, the workload is).
//! - `INSITU_KILL_BASE=B`: the first case's seed (default fixed).
//! - `INSITU_KILL_SECS=T`: stop starting new cases after T seconds (for long campaigns).
//! - `INSITU_KILL_SCALE=K`: K times more requests per round (default 1).
//! - `INSITU_KILL_CORRUPT=1`: flip bits of the image between a kill and the restart, and
//!   `INSITU_KILL_SABOTAGE=1`: the oracle wrongly takes every completed write for flushed. The
//!   campaign must fail under either (it shows that its checks bite); the oracle's own tests
//!   below show the same for lost flushed data and torn writes on made-up disk states.
mod frontend;
mod support;

use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use frontend::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use support::*;

/// Queues the campaign uses at most (the frontend lays out 16).
const MAX_QUEUES: u16 = 4;
/// Ring size of every queue.
const QUEUE_SIZE: u16 = 128;
/// Guest memory layout (region A of `tests/frontend`; its rings occupy the first MiB). This
/// campaign allocates its own buffers: the frontend's allocator wraps around, which would reuse
/// the buffers of requests still in flight.
const HEADER_AREA: u64 = 1 << 20;
/// Per (queue, head descriptor): request header (16 B), status byte, discard/write-zeroes segments.
const HEADER_SLOT: u64 = 512;
const STATUS_OFFSET: u64 = 16;
const SEGMENTS_OFFSET: u64 = 32;
const DATA_AREA: u64 = HEADER_AREA + MAX_QUEUES as u64 * QUEUE_SIZE as u64 * HEADER_SLOT;
const DATA_PAGES: usize = ((REGION_A_SIZE - DATA_AREA) / PAGE) as usize;
/// Chains in flight per queue at most (3 descriptors each, so a ring of 128 never runs out).
const MAX_IN_FLIGHT_PER_QUEUE: usize = 40;
/// Largest write and read (the device's size_max is 1 MiB).
const MAX_REQUEST: u64 = 1 << 20;
/// How long the campaign waits for any progress before it fails (debug build, loaded CI).
const WAIT: Duration = Duration::from_secs(60);
/// Marks the sector number in a written sector's tag.
const SECTOR_TAG: u64 = 0x4B11_1C0D_E000_0000;

// -----------------------------------------------------------------------------------------------
// Sector contents.

/// What a sector holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Value {
    Zero,
    /// The data of the write with this id (its content is a function of id and sector).
    Data(u64),
    /// Anything else: no write of this campaign produced these bytes here.
    Garbage,
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Zero => write!(f, "zeros"),
            Value::Data(id) => write!(f, "write #{id}"),
            Value::Garbage => write!(f, "garbage"),
        }
    }
}

/// The 512 bytes write `id` puts into `sector`: a tag (id, sector) and a body that is partly
/// compressible (three ids in four) or not at all, so both the compressed and the raw path run.
fn sector_data(id: u64, sector: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), SECTOR as usize);
    out[0..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&(sector ^ SECTOR_TAG).to_le_bytes());
    let mut state =
        (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sector.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)) | 1;
    let incompressible = id.is_multiple_of(4);
    for (k, chunk) in out[16..].chunks_mut(8).enumerate() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if incompressible || k % 4 == 0 {
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        } else {
            chunk.fill(id as u8 ^ 0x5A);
        }
    }
}

fn write_data(id: u64, first_sector: u64, sectors: u64) -> Vec<u8> {
    let mut data = vec![0u8; (sectors * SECTOR) as usize];
    for (k, chunk) in data.chunks_mut(SECTOR as usize).enumerate() {
        sector_data(id, first_sector + k as u64, chunk);
    }
    data
}

/// Identifies what `bytes` (one sector read from `sector`) is.
fn classify(sector: u64, bytes: &[u8]) -> Value {
    if bytes.iter().all(|&b| b == 0) {
        return Value::Zero;
    }
    let id = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
    let tag = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    if id == 0 || tag != sector ^ SECTOR_TAG {
        return Value::Garbage;
    }
    let mut expected = [0u8; SECTOR as usize];
    sector_data(id, sector, &mut expected);
    if expected[..] == *bytes {
        Value::Data(id)
    } else {
        Value::Garbage
    }
}

// -----------------------------------------------------------------------------------------------
// The oracle.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Write,
    WriteZeroes,
    Discard,
    Flush,
}

#[derive(Clone, Debug)]
struct Op {
    kind: Kind,
    /// Data id of a write (unique within a case).
    id: u64,
    /// (first sector, sectors) ranges; several for DISCARD/WRITE_ZEROES with several segments.
    ranges: Vec<(u64, u64)>,
    queue: u16,
    submitted: u64,
    completed: Option<u64>,
    status: Option<u8>,
}

impl Op {
    fn value(&self) -> Value {
        match self.kind {
            Kind::Write => Value::Data(self.id),
            _ => Value::Zero,
        }
    }

    fn completed_or_never(&self) -> u64 {
        self.completed.unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}{} q{} {:?} made available at {} ",
            self.kind,
            if self.kind == Kind::Write {
                format!(" #{}", self.id)
            } else {
                String::new()
            },
            self.queue,
            self.ranges,
            self.submitted
        )?;
        match (self.completed, self.status) {
            (Some(c), Some(s)) => write!(f, "completed at {c} (status {s})"),
            _ => write!(f, "never completed"),
        }
    }
}

/// What the oracle records of a request: kind, write id, sector ranges.
type Record = (Kind, u64, Vec<(u64, u64)>);

#[derive(Clone)]
struct Oracle {
    sectors: u64,
    cluster_sectors: u64,
    /// Each sector's value at the last verified point, made durable by the FLUSH after it.
    base: Vec<Value>,
    /// Per sector: the ops after that point that changed it (indexes into `ops`).
    touching: Vec<Vec<u32>>,
    ops: Vec<Op>,
    /// The global order of events (made available, seen completed).
    seq: u64,
    /// Ops seen completed before this moment are durable (a successful FLUSH made available at
    /// this moment, or a clean stop).
    durable_before: u64,
    /// Set when the process died uncleanly: a FLUSH made available before this moment and
    /// completed by the restarted process vouches for nothing the dead one completed.
    unclean_restart_at: Option<u64>,
    /// INSITU_KILL_SABOTAGE: wrongly take every completed op for durable (as if each were
    /// followed by a FLUSH), so that a kill losing unflushed writes fails the campaign.
    sabotage: bool,
    /// The moments FLUSHes counted by `complete` (true) were made available.
    replayed_ok_flushes: Vec<u64>,
}

impl Oracle {
    fn new(sectors: u64, cluster_sectors: u64) -> Oracle {
        Oracle {
            sectors,
            cluster_sectors,
            base: vec![Value::Zero; sectors as usize],
            touching: vec![Vec::new(); sectors as usize],
            ops: Vec::new(),
            seq: 0,
            durable_before: 0,
            unclean_restart_at: None,
            sabotage: false,
            replayed_ok_flushes: Vec::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Records an op made available now; returns its index.
    fn submit(&mut self, kind: Kind, id: u64, ranges: Vec<(u64, u64)>, queue: u16) -> usize {
        let idx = self.ops.len();
        let submitted = self.tick();
        if kind != Kind::Flush {
            for &(first, n) in &ranges {
                for s in first..first + n {
                    let list = &mut self.touching[s as usize];
                    if list.last() != Some(&(idx as u32)) {
                        list.push(idx as u32);
                    }
                }
            }
        }
        self.ops.push(Op {
            kind,
            id,
            ranges,
            queue,
            submitted,
            completed: None,
            status: None,
        });
        idx
    }

    /// Records a completion. Returns true for a FLUSH that succeeded in a restarted process
    /// although the guest had made it available before the unclean death, after writes
    /// completed that no earlier FLUSH covered: from the guest's point of view it declares them
    /// durable, and they may be gone (the notice fails one FLUSH only; not asserted, counted).
    fn complete(&mut self, idx: usize, status: u8) -> bool {
        let at = self.tick();
        let op = &mut self.ops[idx];
        assert!(op.completed.is_none(), "op {idx} completed twice");
        op.completed = Some(at);
        op.status = Some(status);
        if op.kind != Kind::Flush || status != VIRTIO_BLK_S_OK {
            return false;
        }
        let submitted = op.submitted;
        match self.unclean_restart_at {
            Some(restart) if submitted < restart => {
                let over_unflushed = self.ops.iter().any(|w| {
                    w.kind != Kind::Flush
                        && w.status == Some(VIRTIO_BLK_S_OK)
                        && w.completed.is_some_and(|c| c < submitted)
                        && !self.is_durable(w)
                });
                if over_unflushed {
                    self.replayed_ok_flushes.push(submitted);
                }
                over_unflushed
            }
            _ => {
                self.durable_before = self.durable_before.max(submitted);
                false
            }
        }
    }

    /// A clean stop: everything seen completed so far is durable.
    fn all_completed_durable(&mut self) {
        self.durable_before = self.tick();
    }

    fn unclean_restart(&mut self) {
        self.unclean_restart_at = Some(self.tick());
    }

    fn is_durable(&self, op: &Op) -> bool {
        op.status == Some(VIRTIO_BLK_S_OK)
            && op
                .completed
                .is_some_and(|c| self.sabotage || c < self.durable_before)
    }

    /// Sectors whose value is none of the completed ops that touched them: completed writes the
    /// kill took away (allowed when no FLUSH covered them).
    fn rolled_back(&self, observed: &[Value]) -> u64 {
        (0..self.sectors as usize)
            .filter(|&s| {
                let mut completed = self.touching[s]
                    .iter()
                    .map(|&i| &self.ops[i as usize])
                    .filter(|op| op.status == Some(VIRTIO_BLK_S_OK))
                    .peekable();
                completed.peek().is_some() && !completed.any(|op| op.value() == observed[s])
            })
            .count() as u64
    }

    /// A completed write, WRITE_ZEROES or DISCARD whose effect is gone (the first sector that
    /// shows it), or None when nothing the guest saw completed was lost. Each sector must hold
    /// the value of an op the guest did not see succeed (in flight at the kill, replayed or
    /// failed: it may have landed any time), or of a completed one that no completed op made
    /// available after its completion superseded. A backend that reports no loss after a kill
    /// (it had committed everything: the idle marker) must pass this.
    fn completed_op_lost(&self, observed: &[Value]) -> Option<String> {
        (0..self.sectors).find_map(|s| {
            let ops: Vec<&Op> = self.touching[s as usize]
                .iter()
                .map(|&i| &self.ops[i as usize])
                .collect();
            let ok = |op: &Op| op.status == Some(VIRTIO_BLK_S_OK) && op.completed.is_some();
            if !ops.iter().any(|op| ok(op)) {
                return None;
            }
            let v = observed[s as usize];
            let current = ops.iter().any(|x| {
                x.value() == v
                    && (!ok(x)
                        || !ops
                            .iter()
                            .any(|y| ok(y) && y.submitted > x.completed_or_never()))
            });
            (!current).then(|| self.describe_sector(s, v))
        })
    }

    /// The latest moment a durable op touching `sector` was made available (0: none): every
    /// value that was superseded before it is gone for good.
    fn durable_horizon(&self, sector: u64) -> u64 {
        self.touching[sector as usize]
            .iter()
            .map(|&i| &self.ops[i as usize])
            .filter(|op| self.is_durable(op))
            .map(|op| op.submitted)
            .max()
            .unwrap_or(0)
    }

    /// Whether `value` may be what `sector` holds now.
    fn admissible(&self, sector: u64, value: Value) -> bool {
        if value == Value::Garbage {
            return false;
        }
        let horizon = self.durable_horizon(sector);
        // The base value was in place before every op of the window was made available.
        if horizon == 0 && self.base[sector as usize] == value {
            return true;
        }
        self.touching[sector as usize]
            .iter()
            .map(|&i| &self.ops[i as usize])
            .any(|op| op.value() == value && op.completed_or_never() >= horizon)
    }

    fn describe_sector(&self, sector: u64, observed: Value) -> String {
        let mut s = format!(
            "sector {sector} (byte {}, cluster {}) reads {observed}; value at the last verified \
             point: {}; durable horizon {}; FLUSHed/stopped before {}; requests since:",
            sector * SECTOR,
            sector / self.cluster_sectors,
            self.base[sector as usize],
            self.durable_horizon(sector),
            self.durable_before
        );
        for &i in &self.touching[sector as usize] {
            let op = &self.ops[i as usize];
            s.push_str(&format!(
                "\n    {op}{}",
                if self.is_durable(op) {
                    " [durable]"
                } else {
                    ""
                }
            ));
        }
        s
    }

    /// Checks a full read of the disk: every sector admissible (I2), every write's part in each
    /// cluster all or nothing (I3). Returns the number of sectors a window op touched.
    fn verify(&self, observed: &[Value]) -> Result<u64, String> {
        let mut errors = Vec::new();
        let mut bad = 0u64;
        for s in 0..self.sectors {
            let v = observed[s as usize];
            if !self.admissible(s, v) {
                bad += 1;
                if errors.len() < 4 {
                    errors.push(self.describe_sector(s, v));
                }
            }
        }
        if bad > 0 {
            return Err(format!(
                "{bad} sectors hold a value they may not hold (I2: lost after a FLUSH, or \
                 stale, misplaced or garbage); first ones:\n  {}",
                errors.join("\n  ")
            ));
        }
        for op in self.ops.iter().filter(|op| op.kind == Kind::Write) {
            self.check_atomic(op, observed)?;
        }
        self.check_no_interleaving(observed)?;
        Ok(self.touching.iter().filter(|t| !t.is_empty()).count() as u64)
    }

    /// I3 for one write: inside each cluster it touches, either none of its sectors landed, or
    /// every one of them shows it or a value that may have come after it.
    fn check_atomic(&self, op: &Op, observed: &[Value]) -> Result<(), String> {
        let me = Value::Data(op.id);
        for &(first, n) in &op.ranges {
            let mut start = first;
            while start < first + n {
                let cluster = start / self.cluster_sectors;
                let end = ((cluster + 1) * self.cluster_sectors).min(first + n);
                let part = start..end;
                if part.clone().any(|s| observed[s as usize] == me) {
                    for s in part.clone() {
                        let v = observed[s as usize];
                        if v == me {
                            continue;
                        }
                        // Explained if some other op with this value was not yet complete when
                        // this write was made available (it may have landed after it).
                        let explained = self.touching[s as usize]
                            .iter()
                            .map(|&i| &self.ops[i as usize])
                            .any(|other| {
                                other.value() == v && other.completed_or_never() > op.submitted
                            });
                        if !explained {
                            let landed: Vec<u64> = part
                                .clone()
                                .filter(|&t| observed[t as usize] == me)
                                .collect();
                            return Err(format!(
                                "torn write (I3): write #{} landed in cluster {cluster} at \
                                 sectors {}..={} (of {part:?}) but {}",
                                op.id,
                                landed.first().unwrap(),
                                landed.last().unwrap(),
                                self.describe_sector(s, v)
                            ));
                        }
                    }
                }
                start = end;
            }
        }
        Ok(())
    }

    /// I3 between two writes: where writes W and X overlap inside one cluster, the overlap shows
    /// one of them in full (whichever the cluster's version applied last) or later values; one
    /// sector of it showing W and another showing X is a mix of two versions.
    fn check_no_interleaving(&self, observed: &[Value]) -> Result<(), String> {
        let by_id: HashMap<u64, &Op> = self
            .ops
            .iter()
            .filter(|op| op.kind == Kind::Write)
            .map(|op| (op.id, op))
            .collect();
        let covers = |op: &Op, s: u64| op.ranges.iter().any(|&(f, n)| (f..f + n).contains(&s));
        let cs = self.cluster_sectors;
        let mut cluster = 0;
        while cluster * cs < self.sectors {
            let part = cluster * cs..((cluster + 1) * cs).min(self.sectors);
            cluster += 1;
            for s in part.clone() {
                let Value::Data(x) = observed[s as usize] else {
                    continue;
                };
                let Some(&x_op) = by_id.get(&x) else { continue };
                for &wi in &self.touching[s as usize] {
                    let w_op = &self.ops[wi as usize];
                    if w_op.kind != Kind::Write || w_op.id == x {
                        continue;
                    }
                    let w = Value::Data(w_op.id);
                    if let Some(s2) = part
                        .clone()
                        .find(|&s2| observed[s2 as usize] == w && covers(x_op, s2))
                    {
                        return Err(format!(
                            "two writes interleaved inside cluster {} (I3): where both wrote,                              sector {s} shows #{x} and sector {s2} shows #{}:\n  {x_op}\n  {w_op}",
                            cluster - 1,
                            w_op.id
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The disk was read as `observed` and a FLUSH then completed: that is the new base.
    fn reset(&mut self, observed: &[Value]) {
        self.base.copy_from_slice(observed);
        for t in &mut self.touching {
            t.clear();
        }
        self.ops.clear();
        self.seq = 0;
        self.durable_before = 0;
        self.unclean_restart_at = None;
        self.replayed_ok_flushes.clear();
    }

    /// Whether `observed` shows that a FLUSH counted by `complete` declared durable a write that
    /// is gone: the verification fails when those FLUSHes are taken at their word.
    fn replayed_flush_lost_data(&self, observed: &[Value]) -> Option<String> {
        let latest = *self.replayed_ok_flushes.iter().max()?;
        let mut strict = self.clone();
        strict.durable_before = strict.durable_before.max(latest);
        let lost = strict.verify(observed).err()?;
        let flushes: Vec<String> = self
            .ops
            .iter()
            .filter(|op| op.kind == Kind::Flush)
            .map(|op| format!("  {op}"))
            .collect();
        Some(format!(
            "{lost}\nFLUSHes since the last verified point (the process restarted at {:?}):\n{}",
            self.unclean_restart_at,
            flushes.join("\n")
        ))
    }
}

// -----------------------------------------------------------------------------------------------
// The driver: many requests in flight on several queues of the test frontend.

/// First-fit allocator of 4 KiB pages of the data area.
struct Pages {
    used: Vec<bool>,
}

impl Pages {
    fn new() -> Pages {
        Pages {
            used: vec![false; DATA_PAGES],
        }
    }

    fn alloc(&mut self, len: u64) -> Option<(usize, usize)> {
        let n = len.div_ceil(PAGE).max(1) as usize;
        let mut run = 0;
        for i in 0..self.used.len() {
            if self.used[i] {
                run = 0;
                continue;
            }
            run += 1;
            if run == n {
                let first = i + 1 - n;
                self.used[first..=i].fill(true);
                return Some((first, n));
            }
        }
        None
    }

    fn free(&mut self, (first, n): (usize, usize)) {
        self.used[first..first + n].fill(false);
    }

    fn gpa(first: usize) -> u64 {
        DATA_AREA + first as u64 * PAGE
    }
}

enum Request<'a> {
    Write {
        sector: u64,
        data: &'a [u8],
    },
    Read {
        sector: u64,
        len: u64,
    },
    Flush,
    Zeroing {
        req_type: u32,
        segments: &'a [(u64, u32, u32)],
    },
}

impl Request<'_> {
    fn descriptors(&self) -> u16 {
        match self {
            Request::Flush => 2,
            _ => 3,
        }
    }

    fn buffer_len(&self) -> u64 {
        match self {
            Request::Write { data, .. } => data.len() as u64,
            Request::Read { len, .. } => *len,
            _ => 0,
        }
    }
}

struct InFlight {
    op: Option<usize>,
    descriptors: Vec<u16>,
    pages: Option<(usize, usize)>,
    /// For reads: (first sector, length).
    read: Option<(u64, u64)>,
}

struct Done {
    queue: u16,
    op: Option<usize>,
    status: u8,
    used_len: u32,
    /// A read's first sector and data.
    read: Option<(u64, Vec<u8>)>,
}

/// Free resources for one request, taken before the oracle records it.
struct Reservation {
    queue: u16,
    descriptors: Vec<u16>,
    pages: Option<(usize, usize)>,
}

struct Driver {
    dev: Device,
    queues: u16,
    next_desc: Vec<u16>,
    desc_busy: Vec<Vec<bool>>,
    in_flight: Vec<HashMap<u16, InFlight>>,
    pages: Pages,
    in_order: bool,
}

impl Driver {
    /// `inflight`: hand the backend an inflight buffer (INFLIGHT_SHMFD) when it offers one.
    fn connect(socket: &Path, queues: u16, inflight: bool) -> Result<Driver, String> {
        let dev = Device::connect(
            socket,
            &ConnectOptions {
                queues,
                queue_size: QUEUE_SIZE,
                driver_features: DRIVER_FEATURES | VIRTIO_F_IN_ORDER,
                inflight,
                ..ConnectOptions::default()
            },
        )?;
        let in_order = dev.acked_features & VIRTIO_F_IN_ORDER != 0;
        Ok(Driver {
            dev,
            queues,
            next_desc: vec![0; usize::from(queues)],
            desc_busy: vec![vec![false; usize::from(QUEUE_SIZE)]; usize::from(queues)],
            in_flight: (0..queues).map(|_| HashMap::new()).collect(),
            pages: Pages::new(),
            in_order,
        })
    }

    fn in_flight(&self) -> usize {
        self.in_flight.iter().map(HashMap::len).sum()
    }

    /// Descriptors (in ring order, as VIRTIO_F_IN_ORDER asks of a driver) and buffer pages for
    /// `req` on queue `q`, or None while they are in use.
    fn reserve(&mut self, q: u16, req: &Request) -> Option<Reservation> {
        let qi = usize::from(q);
        if self.in_flight[qi].len() >= MAX_IN_FLIGHT_PER_QUEUE {
            return None;
        }
        let n = req.descriptors();
        let descriptors: Vec<u16> = (0..n)
            .map(|k| (self.next_desc[qi] + k) % QUEUE_SIZE)
            .collect();
        if descriptors
            .iter()
            .any(|&d| self.desc_busy[qi][usize::from(d)])
        {
            return None;
        }
        let len = req.buffer_len();
        let pages = if len > 0 {
            Some(self.pages.alloc(len)?)
        } else {
            None
        };
        for &d in &descriptors {
            self.desc_busy[qi][usize::from(d)] = true;
        }
        self.next_desc[qi] = (self.next_desc[qi] + n) % QUEUE_SIZE;
        Some(Reservation {
            queue: q,
            descriptors,
            pages,
        })
    }

    fn header_slot(q: u16, head: u16) -> u64 {
        HEADER_AREA + (u64::from(q) * u64::from(QUEUE_SIZE) + u64::from(head)) * HEADER_SLOT
    }

    /// Lays out `req` in the reserved descriptors and buffers, makes it available and kicks.
    fn submit(&mut self, r: Reservation, req: &Request, op: Option<usize>) {
        let q = r.queue;
        let head = r.descriptors[0];
        let slot = Self::header_slot(q, head);
        let (req_type, sector) = match req {
            Request::Write { sector, .. } => (VIRTIO_BLK_T_OUT, *sector),
            Request::Read { sector, .. } => (VIRTIO_BLK_T_IN, *sector),
            Request::Flush => (VIRTIO_BLK_T_FLUSH, 0),
            Request::Zeroing { req_type, .. } => (*req_type, 0),
        };
        self.dev.gm.write(slot, &blk_header(req_type, sector));
        self.dev.gm.write(slot + STATUS_OFFSET, &[0xFF]);
        let buf = r.pages.map(|(first, _)| Pages::gpa(first));
        let mut chain = vec![Desc::ro(slot, 16)];
        let mut read = None;
        match req {
            Request::Write { data, .. } => {
                let gpa = buf.expect("write buffer");
                self.dev.gm.write(gpa, data);
                chain.push(Desc::ro(gpa, data.len() as u32));
            }
            Request::Read { sector, len } => {
                chain.push(Desc::wo(buf.expect("read buffer"), *len as u32));
                read = Some((*sector, *len));
            }
            Request::Flush => {}
            Request::Zeroing { segments, .. } => {
                let payload: Vec<u8> = segments
                    .iter()
                    .flat_map(|&(s, n, f)| dwz_segment(s, n, f))
                    .collect();
                self.dev.gm.write(slot + SEGMENTS_OFFSET, &payload);
                chain.push(Desc::ro(slot + SEGMENTS_OFFSET, payload.len() as u32));
            }
        }
        chain.push(Desc::wo(slot + STATUS_OFFSET, 1));
        for (k, mut d) in chain.iter().copied().enumerate() {
            if k + 1 < chain.len() {
                d.flags |= VRING_DESC_F_NEXT;
                d.next = r.descriptors[k + 1];
            }
            self.dev.set_desc(q, r.descriptors[k], d);
        }
        self.in_flight[usize::from(q)].insert(
            head,
            InFlight {
                op,
                descriptors: r.descriptors,
                pages: r.pages,
                read,
            },
        );
        self.dev.publish(q, head);
        self.dev.kick(q);
    }

    /// Collects every completion seen in the used rings.
    fn poll(&mut self) -> Result<Vec<Done>, String> {
        let mut done = Vec::new();
        for q in 0..self.queues {
            let qi = usize::from(q);
            for (head, used_len) in self.dev.take_unclaimed(q) {
                if head == u16::MAX - 1 {
                    return Err(format!("queue {q}: a head was returned twice"));
                }
                let Some(f) = self.in_flight[qi].remove(&head) else {
                    return Err(format!(
                        "queue {q}: head {head} returned to the used ring but not in flight \
                         (completed twice?)"
                    ));
                };
                let slot = Self::header_slot(q, head);
                let status = self.dev.gm.read(slot + STATUS_OFFSET, 1)[0];
                let read = f.read.map(|(sector, len)| {
                    let gpa = Pages::gpa(f.pages.expect("read buffer").0);
                    (sector, self.dev.gm.read(gpa, len as usize))
                });
                for d in f.descriptors {
                    self.desc_busy[qi][usize::from(d)] = false;
                }
                if let Some(p) = f.pages {
                    self.pages.free(p);
                }
                done.push(Done {
                    queue: q,
                    op: f.op,
                    status,
                    used_len,
                    read,
                });
            }
        }
        Ok(done)
    }

    /// The used index of every queue (what cloud-hypervisor restores the rings at).
    fn used_indexes(&mut self) -> Vec<u16> {
        (0..self.queues)
            .map(|q| self.dev.used_idx_after(q, Duration::ZERO))
            .collect()
    }
}

// -----------------------------------------------------------------------------------------------
// One case.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Death {
    /// SIGKILL (with or without a SIGSTOP before it).
    Unclean,
    /// SIGTERM: exit 0 after committing.
    Clean,
}

#[derive(Debug)]
struct CaseConfig {
    /// None: `serve --create-size` (default compression and cluster size).
    create: Option<(&'static str, u64)>,
    size: u64,
    rounds: usize,
}

impl CaseConfig {
    fn random(rng: &mut SmallRng) -> CaseConfig {
        let create = if rng.gen_bool(0.25) {
            None
        } else {
            let compression = ["none", "lz4", "zstd"][rng.gen_range(0..3)];
            let sizes: &[u64] = if compression == "none" {
                &[4, 8, 16, 32, 64, 128]
            } else {
                &[16, 32, 64, 128]
            };
            Some((compression, sizes[rng.gen_range(0..sizes.len())] << 10))
        };
        CaseConfig {
            create,
            size: rng.gen_range(6..=16u64) << 20,
            rounds: rng.gen_range(2..=4),
        }
    }
}

#[derive(Default, Debug)]
struct Totals {
    cases: u64,
    kills: u64,
    stop_kills: u64,
    kills_while_recovering: u64,
    terms: u64,
    in_flight_at_signal: u64,
    signals_with_requests_in_flight: u64,
    requests: u64,
    bytes_written: u64,
    bytes_verified: u64,
    sectors_checked_against_window: u64,
    sectors_rolled_back: u64,
    replayed_after_restart: u64,
    notices: u64,
    notices_required: u64,
    /// Kills whose lost-write notice was not needed: nothing completed was lost.
    notices_waived_nothing_lost: u64,
    /// Signals sent after every request completed and the backend stayed idle for 3 s, over two
    /// timer commits (it had time to end its journal with the idle marker).
    idle_signals: u64,
    replayed_ok_flushes_over_unflushed_writes: u64,
    cloud_hypervisor_reconnects: u64,
    qemu_inflight_reconnects: u64,
    new_guest_connects: u64,
    checks: u64,
    backend_error_lines: u64,
    backend_errors: Vec<String>,
}

struct Case<'a> {
    seed: u64,
    rng: SmallRng,
    backend: Backend,
    oracle: Oracle,
    driver: Option<Driver>,
    next_id: u64,
    cluster: u64,
    size: u64,
    hot: Vec<u64>,
    scale: u64,
    corrupt: bool,
    totals: &'a mut Totals,
    round: usize,
    /// The lost-write notice (docs/ARCHITECTURE.md, I2). `loss_pending`: a process died uncleanly
    /// after completing a write, discard or write-zeroes that no FLUSH covered, and the guest has
    /// not been told yet (no FLUSH failed since). `unclean_since_flush`: a process died
    /// uncleanly since the last successful FLUSH (it may have lost nothing: one killed before
    /// it accepted a request leaves the image as clean as it found it).
    loss_pending: bool,
    unclean_since_flush: bool,
    /// For the current process: the guest must be told (`loss_pending` and a ring restored
    /// mid-session) / may be told (a FLUSH may fail once); the failed FLUSHes seen.
    notice_required: bool,
    notice_allowed: bool,
    /// The oracle's clock when the guest (re)connected to the current process: a request
    /// submitted before was made available before this process served the ring.
    connected_at: u64,
    notices_seen: u64,
    /// The oracle's sequence when the current process started.
    process_started: u64,
    /// The process is SIGSTOPped: requests are made available without waiting for room.
    backend_stopped: bool,
    /// While the disk is read for verification: the reads' (first sector, data).
    collected_reads: Option<Vec<(u64, Vec<u8>)>>,
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={value} is not a number")))
}

fn image_cluster_size(image: &Path) -> u64 {
    let (st, out) = run_insitu_blk(&["info", "--json", image.to_str().unwrap()], WAIT);
    assert!(st.success(), "insitu-blk info: {st}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("info --json output");
    v["cluster_size"]
        .as_u64()
        .or_else(|| v["geometry"]["cluster_size"].as_u64())
        .unwrap_or_else(|| panic!("no cluster_size in {out}"))
}

impl Case<'_> {
    fn ctx(&self) -> String {
        format!("seed {} round {}", self.seed, self.round)
    }

    fn driver(&mut self) -> &mut Driver {
        self.driver.as_mut().expect("connected")
    }

    /// Applies completions to the oracle and checks their statuses.
    fn absorb(&mut self, done: Vec<Done>) {
        let ctx = self.ctx();
        for d in done {
            if let Some((sector, data)) = &d.read {
                assert_eq!(
                    d.status,
                    VIRTIO_BLK_S_OK,
                    "{ctx}: read of {} bytes at sector {sector} on queue {} failed (I3: a crash \
                     never causes an I/O error)",
                    data.len(),
                    d.queue
                );
                assert_eq!(
                    d.used_len as usize,
                    data.len() + 1,
                    "{ctx}: used length of a read"
                );
            }
            if let (Some(read), Some(collected)) = (d.read, self.collected_reads.as_mut()) {
                collected.push(read);
            }
            let Some(idx) = d.op else { continue };
            if self.oracle.complete(idx, d.status) {
                self.totals.replayed_ok_flushes_over_unflushed_writes += 1;
            }
            let op = &self.oracle.ops[idx];
            if op.kind == Kind::Flush {
                // The notice fails the first FLUSH; every FLUSH made available before the
                // restart (it covers writes the dead process may have lost) fails too.
                let before_restart = op.submitted < self.connected_at;
                if d.status == VIRTIO_BLK_S_IOERR
                    && self.notice_allowed
                    && (self.notices_seen == 0 || before_restart)
                {
                    // The guest is told.
                    self.notices_seen += 1;
                    self.loss_pending = false;
                    self.totals.notices += 1;
                    continue;
                }
                assert_eq!(
                    d.status, VIRTIO_BLK_S_OK,
                    "{ctx}: FLUSH on queue {} failed (lost-write notice required: {}, allowed: \
                     {}, failed FLUSHes seen from this process: {})",
                    d.queue, self.notice_required, self.notice_allowed, self.notices_seen
                );
            } else {
                assert_eq!(d.status, VIRTIO_BLK_S_OK, "{ctx}: {op} failed");
            }
        }
    }

    fn poll(&mut self) {
        let done = self
            .driver()
            .poll()
            .unwrap_or_else(|e| panic!("seed {}: {e}", self.seed));
        self.absorb(done);
    }

    /// Polls until `ready` holds; fails after WAIT without progress or if the backend dies.
    fn wait_until(&mut self, what: &str, mut ready: impl FnMut(&mut Self) -> bool) {
        let mut last_progress = Instant::now();
        let mut last_in_flight = usize::MAX;
        loop {
            self.poll();
            if ready(self) {
                return;
            }
            let n = self.driver().in_flight();
            if n != last_in_flight {
                last_in_flight = n;
                last_progress = Instant::now();
            }
            if last_progress.elapsed() > WAIT {
                panic!(
                    "{}: no progress for {WAIT:?} while waiting for {what} ({n} requests in \
                     flight)",
                    self.ctx()
                );
            }
            if let Some(status) = self.backend.try_exit_status() {
                panic!("{}: the backend exited ({status}) while {what}", self.ctx());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Submits `req` on queue `q` (waiting for room), recording it in the oracle as `kind`.
    fn issue(&mut self, q: u16, req: Request, record: Option<Record>) {
        let mut reservation = None;
        if self.backend_stopped {
            // Nothing completes while the process is stopped: no room, no request.
            reservation = self.driver().reserve(q, &req);
            if reservation.is_none() {
                return;
            }
        } else {
            self.wait_until("room for a request", |c| {
                reservation = c.driver().reserve(q, &req);
                reservation.is_some()
            });
        }
        let op = record.map(|(kind, id, ranges)| self.oracle.submit(kind, id, ranges, q));
        self.totals.requests += 1;
        if let Request::Write { data, .. } = &req {
            self.totals.bytes_written += data.len() as u64;
        }
        self.driver()
            .submit(reservation.expect("reserved"), &req, op);
    }

    fn flush_and_wait(&mut self, q: u16) -> u8 {
        let start = self.oracle.ops.len();
        self.issue(q, Request::Flush, Some((Kind::Flush, 0, Vec::new())));
        self.wait_until("a FLUSH", |c| c.oracle.ops[start].completed.is_some());
        self.oracle.ops[start].status.expect("completed")
    }

    /// Reads the whole disk (1 MiB requests spread over the queues).
    fn read_disk(&mut self) -> Vec<Value> {
        let sectors = self.oracle.sectors;
        let mut observed = vec![Value::Garbage; sectors as usize];
        let mut seen = 0u64;
        let chunk = MAX_REQUEST / SECTOR;
        let queues = self.driver().queues;
        let mut next = 0u64;
        let mut k = 0u16;
        while seen < sectors {
            if next < sectors && self.driver().in_flight() < 2 * usize::from(queues) {
                let n = chunk.min(sectors - next);
                let req = Request::Read {
                    sector: next,
                    len: n * SECTOR,
                };
                let q = k % queues;
                if let Some(r) = self.driver().reserve(q, &req) {
                    self.driver().submit(r, &req, None);
                    self.totals.requests += 1;
                    next += n;
                    k += 1;
                    continue;
                }
            }
            self.collected_reads = Some(Vec::new());
            self.wait_until("reads of the disk", |c| {
                c.collected_reads.as_ref().is_some_and(|r| !r.is_empty())
            });
            for (first, data) in self.collected_reads.take().unwrap_or_default() {
                for (i, bytes) in data.chunks(SECTOR as usize).enumerate() {
                    let s = first + i as u64;
                    observed[s as usize] = classify(s, bytes);
                }
                seen += data.len() as u64 / SECTOR;
                self.totals.bytes_verified += data.len() as u64;
            }
        }
        observed
    }

    /// Connects (as a new guest, or reconnecting the running guest like cloud-hypervisor),
    /// completes what was replayed, verifies the disk, flushes and makes that the new base.
    fn connect_and_verify(&mut self, reconnect: bool, last_death: Option<Death>) {
        self.connect(reconnect);
        self.settle_and_verify(last_death);
    }

    /// Connects as a new guest, or reconnects the running guest (its rings restart; what the
    /// dead process left in flight is served again from now on).
    fn connect(&mut self, reconnect: bool) {
        let socket = self.backend.socket();
        self.connected_at = self.oracle.seq;
        self.notices_seen = 0;
        self.notice_required = false;
        self.notice_allowed = false;
        if reconnect {
            let with_inflight = self.driver().dev.inflight.is_some();
            if with_inflight {
                self.totals.qemu_inflight_reconnects += 1;
            } else {
                self.totals.cloud_hypervisor_reconnects += 1;
            }
            let bases = self.driver().used_indexes();
            // docs/ARCHITECTURE.md: a backend restarted after an unclean death fails the next
            // FLUSH of a guest whose rings it restores mid-session (a ring at a non-zero index;
            // one whose every ring is at 0 is not told: a documented limit). A new guest (rings
            // at 0) is never told.
            self.notice_required = self.loss_pending && bases.iter().any(|&b| b != 0);
            self.notice_allowed = self.unclean_since_flush || self.loss_pending;
            let replayed = self.driver().in_flight() as u64;
            self.totals.replayed_after_restart += replayed;
            let ctx = self.ctx();
            let dev = &mut self.driver().dev;
            let reconnected = if with_inflight {
                // As QEMU does: rings at the used index, the inflight buffer handed over again
                // (the restarted backend must complete what it marks exactly once).
                dev.reconnect_at_used_index(&socket)
            } else {
                // As cloud-hypervisor does with IN_ORDER and no inflight buffer: rings at the
                // used index.
                dev.reconnect_like_cloud_hypervisor(&socket)
            };
            reconnected.unwrap_or_else(|e| panic!("{ctx}: reconnect: {e}"));
        } else {
            self.totals.new_guest_connects += 1;
            // The old guest is gone with whatever it had in flight (the dead process cannot
            // complete it any more): those requests may or may not have landed.
            self.driver = None;
            let queues = self.rng.gen_range(1..=self.backend.opts.num_queues);
            let inflight = self.rng.gen_bool(0.5);
            let ctx = self.ctx();
            self.driver = Some(
                Driver::connect(&socket, queues, inflight)
                    .unwrap_or_else(|e| panic!("{ctx}: connect: {e}")),
            );
        }
    }

    /// Waits for every request the dead process left (served again after a reconnect: a head
    /// returned twice fails the poll), verifies the disk, flushes and makes that the new base.
    fn settle_and_verify(&mut self, last_death: Option<Death>) {
        self.wait_until("the requests replayed after the restart", |c| {
            c.driver().in_flight() == 0
        });
        let observed = self.read_disk();
        self.totals.sectors_rolled_back += self.oracle.rolled_back(&observed);
        if let Some(example) = self.oracle.replayed_flush_lost_data(&observed) {
            // I2: a FLUSH made available before the restart covers writes the dead process
            // completed; the restarted one must fail it, not declare them durable.
            panic!(
                "{}: a FLUSH made available before the kill succeeded after the restart, yet \
                 writes completed before it are gone: {example}",
                self.ctx()
            );
        }
        match self.oracle.verify(&observed) {
            Ok(n) => self.totals.sectors_checked_against_window += n,
            Err(e) => panic!("{}: after {last_death:?} restart: {e}", self.ctx()),
        }
        // The notice: failed once, then every FLUSH succeeds.
        let queues = self.driver().queues;
        let q = self.rng.gen_range(0..queues);
        let status = self.flush_and_wait(q);
        if status == VIRTIO_BLK_S_IOERR {
            // (absorb counted it)
            let q = self.rng.gen_range(0..queues);
            assert_eq!(
                self.flush_and_wait(q),
                VIRTIO_BLK_S_OK,
                "{}: the FLUSH after the lost-write notice failed",
                self.ctx()
            );
        }
        // A restarted backend that had nothing to lose (its predecessor committed every
        // completed request before it died: the idle marker) owes no notice; the data must
        // then show every completed request.
        let lost = self.oracle.completed_op_lost(&observed);
        if self.notice_required && lost.is_none() {
            self.totals.notices_waived_nothing_lost += 1;
        }
        if self.notice_required && lost.is_some() {
            self.totals.notices_required += 1;
            assert!(
                self.notices_seen >= 1,
                "{}: a killed process had completed writes no FLUSH covered, some are gone, and \
                 the guest was reconnected with its rings restored mid-session: its first FLUSH \
                 must fail once (lost-write notice, docs/ARCHITECTURE.md); {}",
                self.ctx(),
                lost.unwrap_or_default()
            );
        }
        // A FLUSH succeeded: nothing is pending any more.
        self.loss_pending = false;
        self.unclean_since_flush = false;
        // Guest memory outside the buffers the device may write is untouched.
        let ctx = self.ctx();
        self.driver()
            .dev
            .gm
            .check_untouched()
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        self.oracle.reset(&observed);
        self.process_started = 0;
    }

    /// Records how the current process ended (before its successor starts).
    fn died(&mut self, death: Death) {
        if death == Death::Unclean {
            let started = self.process_started;
            let oracle = &self.oracle;
            let exposed = oracle.ops.iter().any(|op| {
                op.kind != Kind::Flush
                    && op.status == Some(VIRTIO_BLK_S_OK)
                    && op.completed.is_some_and(|c| c > started)
                    && !oracle.is_durable(op)
            });
            self.loss_pending |= exposed;
            self.unclean_since_flush = true;
            self.oracle.unclean_restart();
        }
        self.process_started = self.oracle.seq;
    }

    fn random_range(&mut self, max_sectors: u64) -> (u64, u64) {
        let cs = self.cluster / SECTOR;
        let total = self.size / SECTOR;
        let rng = &mut self.rng;
        let len = match rng.gen_range(0..100) {
            0..35 => rng.gen_range(1..=8),
            35..60 => rng.gen_range(8..=cs.max(9)),
            60..80 => cs * rng.gen_range(1..=4u64),
            _ => rng.gen_range(1..=MAX_REQUEST / SECTOR),
        }
        .min(max_sectors);
        let whole = len.is_multiple_of(cs) && rng.gen_bool(0.7);
        let mut start = if rng.gen_bool(0.5) {
            let hot = self.hot[rng.gen_range(0..self.hot.len())];
            hot * cs + rng.gen_range(0..cs)
        } else {
            rng.gen_range(0..total)
        };
        if whole {
            start -= start % cs;
        }
        let start = start.min(total - len);
        (start, len)
    }

    /// One random request of the workload.
    fn random_request(&mut self) {
        let queues = self.driver().queues;
        let q = self.rng.gen_range(0..queues);
        match self.rng.gen_range(0..100) {
            0..68 => {
                let (sector, n) = self.random_range(MAX_REQUEST / SECTOR);
                let id = self.next_id;
                self.next_id += 1;
                let data = write_data(id, sector, n);
                self.issue(
                    q,
                    Request::Write {
                        sector,
                        data: &data,
                    },
                    Some((Kind::Write, id, vec![(sector, n)])),
                );
            }
            68..82 => {
                let discard = self.rng.gen_bool(0.5);
                let count = self.rng.gen_range(1..=3);
                let mut segments = Vec::new();
                let mut ranges = Vec::new();
                for _ in 0..count {
                    let (sector, n) = self.random_range(4 * self.cluster / SECTOR);
                    let flags = if !discard && self.rng.gen_bool(0.5) {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    } else {
                        0
                    };
                    segments.push((sector, n as u32, flags));
                    ranges.push((sector, n));
                }
                let (req_type, kind) = if discard {
                    (VIRTIO_BLK_T_DISCARD, Kind::Discard)
                } else {
                    (VIRTIO_BLK_T_WRITE_ZEROES, Kind::WriteZeroes)
                };
                self.issue(
                    q,
                    Request::Zeroing {
                        req_type,
                        segments: &segments,
                    },
                    Some((kind, 0, ranges)),
                );
            }
            82..92 => {
                let (sector, n) = self.random_range(MAX_REQUEST / SECTOR);
                self.issue(
                    q,
                    Request::Read {
                        sector,
                        len: n * SECTOR,
                    },
                    None,
                );
            }
            _ => self.issue(q, Request::Flush, Some((Kind::Flush, 0, Vec::new()))),
        }
        self.poll();
    }

    /// The workload, then a signal at a random moment. Returns how the process ended.
    fn workload_and_signal(&mut self) -> Death {
        let requests = self.rng.gen_range(20..=120) * self.scale;
        let signal_after = self.rng.gen_range(1..=requests);
        for _ in 0..signal_after {
            self.random_request();
        }
        // The moment of the signal: at once, after a short pause, once a few requests completed,
        // after the traffic went on slowly across a timer commit (1 s by default), so that
        // some kills hit a commit in progress, or once the backend stayed idle over two timer
        // commits (the first commits, the second finds nothing and ends the journal with the
        // idle marker: a kill then loses nothing).
        match self.rng.gen_range(0..10) {
            9 => {
                self.wait_until("every request completed", |c| c.driver().in_flight() == 0);
                std::thread::sleep(Duration::from_millis(3000));
                self.totals.idle_signals += 1;
            }
            0 | 4 => {}
            5 | 6 => {
                let until = Instant::now() + Duration::from_millis(self.rng.gen_range(700..1600));
                while Instant::now() < until {
                    self.random_request();
                    std::thread::sleep(Duration::from_millis(self.rng.gen_range(1..15)));
                }
            }
            1 | 7 => std::thread::sleep(Duration::from_micros(self.rng.gen_range(0..3000))),
            2 | 8 => {
                // Until a few requests complete.
                let target = self.driver().in_flight().saturating_sub(3);
                self.wait_until("some completions", |c| c.driver().in_flight() <= target);
            }
            _ => std::thread::sleep(Duration::from_millis(self.rng.gen_range(0..40))),
        }
        self.poll();
        let in_flight = self.driver().in_flight() as u64;
        self.totals.in_flight_at_signal += in_flight;
        if in_flight > 0 {
            self.totals.signals_with_requests_in_flight += 1;
        }
        let death = match self.rng.gen_range(0..100) {
            0..55 => {
                self.backend.kill9();
                self.totals.kills += 1;
                Death::Unclean
            }
            55..75 => {
                let status = self.backend.terminate(WAIT);
                assert!(
                    status.success(),
                    "{}: SIGTERM with {in_flight} requests in flight: exit status {status}",
                    self.ctx()
                );
                self.totals.terms += 1;
                Death::Clean
            }
            _ => {
                self.backend.signal(libc::SIGSTOP);
                self.backend_stopped = true;
                // Requests the stopped process will never see (its successor will, after a
                // cloud-hypervisor reconnect).
                for _ in 0..self.rng.gen_range(0..6) {
                    if self.driver().in_flight() >= 3 * MAX_IN_FLIGHT_PER_QUEUE {
                        break;
                    }
                    self.random_request();
                }
                std::thread::sleep(Duration::from_millis(self.rng.gen_range(0..5)));
                self.backend.kill9();
                self.backend_stopped = false;
                self.totals.kills += 1;
                self.totals.stop_kills += 1;
                Death::Unclean
            }
        };
        // Completions the process made before it died count (the guest saw them).
        self.poll();
        if death == Death::Clean {
            self.oracle.all_completed_durable();
        }
        self.scan_log();
        death
    }

    /// The process's log: no panic; error lines (a requested action failed) are counted and
    /// shown at the end (this campaign expects none: the lost-write notice is a warning).
    fn scan_log(&mut self) {
        let log = self.backend.log();
        assert!(
            !log.contains("panicked"),
            "{}: the backend panicked:\n{log}",
            self.ctx()
        );
        for line in log.lines().filter(|l| l.contains(" ERROR ")) {
            self.totals.backend_error_lines += 1;
            let message = line.split_once(" ERROR ").map_or(line, |(_, m)| m);
            let message: String = message.chars().take(160).collect();
            if self.totals.backend_errors.len() < 8
                && !self.totals.backend_errors.contains(&message)
            {
                self.totals.backend_errors.push(message);
            }
        }
    }

    /// `insitu-blk check` on the image as the process left it.
    fn check_image(&mut self, when: &str) {
        let image = self.backend.image();
        let (st, out) = run_insitu_blk(&["check", image.to_str().unwrap()], WAIT);
        self.totals.checks += 1;
        assert!(
            st.success(),
            "{}: `insitu-blk check` {when}: {st}\n{out}",
            self.ctx()
        );
    }

    /// Flips one bit in the first non-zero byte of every MiB of the image's second half (to
    /// show that the campaign catches a damaged image: a live payload among them fails its
    /// checksum on the next read, or `check` finds damaged metadata).
    fn corrupt_image(&mut self) {
        use std::os::unix::fs::FileExt;
        let image = self.backend.image();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .expect("open image");
        let len = file.metadata().expect("stat").len();
        let mut buf = vec![0u8; 1 << 20];
        let mut flipped = 0;
        let mut at = len / 2;
        while at < len {
            let n = file.read_at(&mut buf, at).expect("read image");
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                file.write_all_at(&[buf[i] ^ 0x01], at + i as u64)
                    .expect("write image");
                flipped += 1;
            }
            at += buf.len() as u64;
        }
        eprintln!("INSITU_KILL_CORRUPT: flipped a bit in {flipped} places of the image");
    }
}

fn run_case(seed: u64, scale: u64, corrupt: bool, sabotage: bool, totals: &mut Totals) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let cfg = CaseConfig::random(&mut rng);
    eprintln!("kill campaign: case seed {seed}: {cfg:?}");
    let work = Workdir::new();
    let image = work.image();
    if let Some((compression, cluster)) = cfg.create {
        let (st, out) = run_insitu_blk(
            &[
                "create",
                image.to_str().unwrap(),
                "--size",
                &cfg.size.to_string(),
                "--cluster-size",
                &cluster.to_string(),
                "--compression",
                compression,
            ],
            WAIT,
        );
        assert!(st.success(), "seed {seed}: insitu-blk create: {st}\n{out}");
    }
    let num_queues = rng.gen_range(1..=MAX_QUEUES);
    let backend = Backend::start(
        &work,
        ServeOptions {
            size: cfg.size,
            num_queues,
            max_queue_size: QUEUE_SIZE,
            ..ServeOptions::default()
        },
    );
    let cluster = image_cluster_size(&image);
    if let Some((_, c)) = cfg.create {
        assert_eq!(cluster, c, "seed {seed}: cluster size of the created image");
    }
    let sectors = cfg.size / SECTOR;
    let clusters = cfg.size / cluster;
    let hot = (0..4).map(|_| rng.gen_range(0..clusters)).collect();
    let mut oracle = Oracle::new(sectors, cluster / SECTOR);
    oracle.sabotage = sabotage;
    let mut case = Case {
        seed,
        rng,
        backend,
        oracle,
        driver: None,
        next_id: 1,
        cluster,
        size: cfg.size,
        hot,
        scale,
        corrupt,
        totals,
        round: 0,
        loss_pending: false,
        unclean_since_flush: false,
        notice_required: false,
        notice_allowed: false,
        connected_at: 0,
        notices_seen: 0,
        process_started: 0,
        backend_stopped: false,
        collected_reads: None,
    };
    case.totals.cases += 1;
    case.connect_and_verify(false, None);
    for round in 1..=cfg.rounds {
        let mut death = case.workload_and_signal();
        case.round = round;
        loop {
            case.check_image(&format!("after {death:?} death"));
            if case.corrupt {
                case.corrupt_image();
            }
            let reconnect = case.driver().in_order && case.rng.gen_bool(0.6);
            let min_queues = if reconnect { case.driver().queues } else { 1 };
            let num_queues = case.rng.gen_range(min_queues..=MAX_QUEUES);
            case.died(death);
            let opts = ServeOptions {
                num_queues,
                ..case.backend.opts.clone()
            };
            case.backend.restart_with(opts);
            case.connect(reconnect);
            if !case.rng.gen_bool(0.2) {
                break;
            }
            // Killed again while it recovers: loading and reclaiming after the previous crash,
            // serving the requests the guest replays, maybe failing its FLUSH for the notice.
            std::thread::sleep(Duration::from_micros(case.rng.gen_range(0..4000)));
            case.poll();
            case.backend.kill9();
            case.poll();
            case.scan_log();
            case.totals.kills += 1;
            case.totals.kills_while_recovering += 1;
            death = Death::Unclean;
        }
        case.settle_and_verify(Some(death));
        case.backend
            .assert_healthy(&format!("seed {seed} round {round}"));
    }
    // A clean end: everything is there after SIGTERM, and the image checks clean.
    case.driver = None;
    let status = case.backend.terminate(WAIT);
    assert!(status.success(), "seed {seed}: final SIGTERM: {status}");
    case.scan_log();
    case.check_image("after the final SIGTERM");
}

#[test]
fn random_kills_of_the_serving_process_keep_i2_and_i3() {
    if BackendKind::from_env() != BackendKind::Ours {
        return;
    }
    let scale = env_u64("INSITU_KILL_SCALE").unwrap_or(1).max(1);
    let corrupt = env_u64("INSITU_KILL_CORRUPT").unwrap_or(0) != 0;
    let sabotage = env_u64("INSITU_KILL_SABOTAGE").unwrap_or(0) != 0;
    let seeds: Vec<u64> = match env_u64("INSITU_KILL_SEED") {
        Some(seed) => vec![seed],
        None => {
            let base = env_u64("INSITU_KILL_BASE").unwrap_or(0x4B11_0000);
            let iters = env_u64("INSITU_KILL_ITERS").unwrap_or(12).max(1);
            (0..iters).map(|i| base + i).collect()
        }
    };
    let budget = env_u64("INSITU_KILL_SECS").map(Duration::from_secs);
    let started = Instant::now();
    let mut totals = Totals::default();
    for seed in seeds {
        if budget.is_some_and(|b| started.elapsed() > b) {
            break;
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            run_case(seed, scale, corrupt, sabotage, &mut totals)
        }));
        if let Err(panic) = result {
            eprintln!(
                "kill campaign FAILED at case seed {seed}; replay with \
                 INSITU_KILL_SEED={seed} cargo test --test kill_campaign (totals so far: \
                 {totals:?})"
            );
            resume_unwind(panic);
        }
    }
    eprintln!(
        "kill campaign: {:?} in {:.1} s",
        totals,
        started.elapsed().as_secs_f64()
    );
    // The campaign did what it is for.
    assert!(totals.cases > 0);
    assert!(
        totals.kills + totals.terms > 0 && totals.bytes_verified > 0,
        "nothing was killed or verified: {totals:?}"
    );
}

// -----------------------------------------------------------------------------------------------
// The oracle on made-up disk states: it accepts what a crash may leave and rejects the rest.

/// A 32-sector disk of 8-sector clusters.
fn small_oracle() -> Oracle {
    Oracle::new(32, 8)
}

fn record(o: &mut Oracle, kind: Kind, id: u64, range: (u64, u64)) -> usize {
    let ranges = if kind == Kind::Flush {
        Vec::new()
    } else {
        vec![range]
    };
    o.submit(kind, id, ranges, 0)
}

fn state(base: Value, parts: &[(u64, u64, Value)]) -> Vec<Value> {
    let mut v = vec![base; 32];
    for &(first, n, value) in parts {
        v[first as usize..(first + n) as usize].fill(value);
    }
    v
}

#[test]
fn oracle_rejects_a_flushed_write_that_is_gone_and_accepts_losing_an_unflushed_one() {
    let mut o = small_oracle();
    let w1 = record(&mut o, Kind::Write, 1, (0, 8));
    o.complete(w1, VIRTIO_BLK_S_OK);
    let f = record(&mut o, Kind::Flush, 0, (0, 0));
    let w2 = record(&mut o, Kind::Write, 2, (8, 8));
    o.complete(w2, VIRTIO_BLK_S_OK);
    o.complete(f, VIRTIO_BLK_S_OK);
    // w1 completed before the FLUSH was made available: it must be there; w2 need not be.
    assert!(o
        .verify(&state(Value::Zero, &[(0, 8, Value::Data(1))]))
        .is_ok());
    assert!(o
        .verify(&state(
            Value::Zero,
            &[(0, 8, Value::Data(1)), (8, 8, Value::Data(2))]
        ))
        .is_ok());
    let err = o.verify(&state(Value::Zero, &[])).unwrap_err();
    assert!(err.contains("8 sectors hold a value"), "{err}");
    // A FLUSH that failed (the lost-write notice) vouches for nothing.
    let mut o = small_oracle();
    let w1 = record(&mut o, Kind::Write, 1, (0, 8));
    o.complete(w1, VIRTIO_BLK_S_OK);
    let f = record(&mut o, Kind::Flush, 0, (0, 0));
    o.complete(f, VIRTIO_BLK_S_IOERR);
    assert!(o.verify(&state(Value::Zero, &[])).is_ok());
    // A clean stop makes everything completed durable, not what was still in flight.
    let mut o = small_oracle();
    let w1 = record(&mut o, Kind::Write, 1, (0, 8));
    o.complete(w1, VIRTIO_BLK_S_OK);
    record(&mut o, Kind::Write, 2, (8, 8));
    o.all_completed_durable();
    assert!(o
        .verify(&state(Value::Zero, &[(0, 8, Value::Data(1))]))
        .is_ok());
    assert!(o
        .verify(&state(Value::Zero, &[(8, 8, Value::Data(2))]))
        .is_err());
}

#[test]
fn oracle_rejects_stale_misplaced_and_garbage_sectors() {
    let mut o = small_oracle();
    let w1 = record(&mut o, Kind::Write, 1, (0, 8));
    o.complete(w1, VIRTIO_BLK_S_OK);
    let w2 = record(&mut o, Kind::Write, 2, (0, 8));
    o.complete(w2, VIRTIO_BLK_S_OK);
    let f = record(&mut o, Kind::Flush, 0, (0, 0));
    o.complete(f, VIRTIO_BLK_S_OK);
    // w1 was superseded by w2 before the FLUSH: only w2 may be there.
    assert!(o
        .verify(&state(Value::Zero, &[(0, 8, Value::Data(2))]))
        .is_ok());
    assert!(o
        .verify(&state(Value::Zero, &[(0, 8, Value::Data(1))]))
        .is_err());
    assert!(o
        .verify(&state(
            Value::Zero,
            &[(0, 8, Value::Data(2)), (9, 1, Value::Data(2))]
        ))
        .is_err());
    assert!(o
        .verify(&state(
            Value::Zero,
            &[(0, 8, Value::Data(2)), (3, 1, Value::Garbage)]
        ))
        .is_err());
    // The bytes are recognised: a sector of write 2 read back at another place is garbage.
    let mut bytes = [0u8; SECTOR as usize];
    sector_data(2, 5, &mut bytes);
    assert_eq!(classify(5, &bytes), Value::Data(2));
    assert_eq!(classify(6, &bytes), Value::Garbage);
    bytes[100] ^= 1;
    assert_eq!(classify(5, &bytes), Value::Garbage);
}

#[test]
fn oracle_rejects_torn_writes_and_accepts_whole_versions() {
    // w2 rewrites cluster 0 (sectors 0..8) over a flushed w1 and is in flight at the crash.
    let mut o = small_oracle();
    let w1 = record(&mut o, Kind::Write, 1, (0, 8));
    o.complete(w1, VIRTIO_BLK_S_OK);
    let f = record(&mut o, Kind::Flush, 0, (0, 0));
    o.complete(f, VIRTIO_BLK_S_OK);
    record(&mut o, Kind::Write, 2, (0, 12));
    assert!(o
        .verify(&state(Value::Zero, &[(0, 8, Value::Data(1))]))
        .is_ok());
    assert!(o
        .verify(&state(Value::Zero, &[(0, 12, Value::Data(2))]))
        .is_ok());
    // Per cluster: cluster 0 old and cluster 1 new is allowed (I3 is per cluster)...
    assert!(o
        .verify(&state(
            Value::Zero,
            &[(0, 8, Value::Data(1)), (8, 4, Value::Data(2))]
        ))
        .is_ok());
    // ... half of cluster 0 new and half old is not.
    let err = o
        .verify(&state(
            Value::Zero,
            &[(0, 4, Value::Data(2)), (4, 4, Value::Data(1))],
        ))
        .unwrap_err();
    assert!(err.contains("torn write"), "{err}");
    // Inside cluster 1, w2 half landed over zeros: torn too.
    let err = o
        .verify(&state(
            Value::Zero,
            &[(0, 8, Value::Data(1)), (8, 2, Value::Data(2))],
        ))
        .unwrap_err();
    assert!(err.contains("torn write"), "{err}");
}

#[test]
fn oracle_accepts_concurrent_writes_in_either_order_but_not_interleaved() {
    let mut o = small_oracle();
    // Both in flight together over sectors 2..6, then both completed.
    let a = record(&mut o, Kind::Write, 1, (0, 6));
    let b = record(&mut o, Kind::Write, 2, (2, 6));
    o.complete(a, VIRTIO_BLK_S_OK);
    o.complete(b, VIRTIO_BLK_S_OK);
    let f = record(&mut o, Kind::Flush, 0, (0, 0));
    o.complete(f, VIRTIO_BLK_S_OK);
    // a then b, b then a: both fine.
    assert!(o
        .verify(&state(
            Value::Zero,
            &[(0, 6, Value::Data(1)), (6, 2, Value::Data(2))]
        ))
        .is_ok());
    assert!(o
        .verify(&state(
            Value::Zero,
            &[(0, 2, Value::Data(1)), (2, 6, Value::Data(2))]
        ))
        .is_ok());
    // Where they overlap, half a and half b: two versions mixed in one cluster.
    let err = o
        .verify(&state(
            Value::Zero,
            &[(0, 4, Value::Data(1)), (4, 4, Value::Data(2))],
        ))
        .unwrap_err();
    assert!(err.contains("interleaved"), "{err}");
}
