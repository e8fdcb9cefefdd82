//! Random workloads against the real engine on a [`SimStorage`], crash points taken while they run,
//! and the check of every crash point: `check_on`, recovery (`open_on`), the I2/I3 oracle, and
//! (for some) a second crash right after recovery to show recovery is idempotent.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use insitu_blk::image::{check_on, Compression, CreateOptions, Image, OpenOptions, Storage};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use super::model::{Model, Verdict};
use super::sim::{CrashMode, CrashSnapshot, DiscardContent, Pages, PendingOp, SimStorage};

/// Data written by a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Mostly repeated bytes: compresses far below half a cluster (in-place ping-pong).
    Compressible,
    /// One third random per 4 KiB: compresses to roughly 40 %.
    Mixed,
    /// Random bytes: stored raw.
    Incompressible,
    /// Zeros written through the normal write path.
    Zeros,
    /// `n` sixteenths of every 4 KiB block random, the rest compressible (n in 1..=7): the
    /// cluster compresses to about n/16 of its size, so consecutive versions of a different n
    /// ping-pong in the home slot without covering each other's units exactly.
    Part(u8),
}

/// A request of the workload.
#[derive(Clone, Debug)]
pub enum Op {
    /// `Image::write`.
    Write {
        offset: u64,
        len: u64,
        pattern: Pattern,
    },
    /// `Image::write_zeroes`.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    /// `Image::discard`.
    Discard { offset: u64, len: u64 },
    /// `Image::flush`.
    Flush,
    /// `Image::read`, compared with the model (no crash involved).
    Read { offset: u64, len: u64 },
    /// `Image::quiesce` then `Image::resume` (I7: quiesce commits everything accepted before it,
    /// so for the oracle it is a FLUSH). Single-writer workloads only: other writers would see
    /// `Quiesced` errors.
    QuiesceResume,
}

/// The shape of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Mixed sizes and alignments, hot clusters, discards, zeroes, flushes, verified reads. With
    /// several threads each owns a contiguous range of clusters.
    Mixed,
    /// Incompressible whole-cluster overwrites with rare flushes: slots run out (free-slot
    /// pressure commits).
    Pressure,
    /// Several threads racing on the SAME few clusters with whole-cluster writes/discards.
    SharedClusters,
    /// Small writes each followed by a flush: one commit per request, so the journal fills and
    /// checkpoints are written (and crashed) during the workload.
    Journal,
    /// Small sequential writes (512 B..8 KiB) that fill clusters piece by piece, sometimes
    /// stepping back to rewrite, reads of what was just written, flushes every ~16 requests:
    /// the engine's write-back buffer holds partial clusters, completes some, and FLUSH/timer
    /// commits store the rest. Crashes fall before, during and after those stores.
    SmallSequential,
    /// A few clusters rewritten whole over and over with data compressing to less than half a
    /// cluster (varying sizes), frequent flushes, some incompressible versions, discards and
    /// partial writes: each version lands in the half of its home slot that the previous
    /// commit freed (unpunched, stale), leftovers are punched after the engine's grace period
    /// (short in the tests using it). Crashes fall between a commit, the deferred punch and the
    /// next version's write over the freed units.
    PingPong,
}

/// Everything that defines one run.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Seed of everything random in the run.
    pub seed: u64,
    /// Number of clusters of the disk.
    pub clusters: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Compression of the image.
    pub compression: Compression,
    /// Workload shape.
    pub profile: Profile,
    /// Writer threads.
    pub threads: usize,
    /// Requests per thread and round.
    pub ops_per_thread: usize,
    /// Timer commit interval of the engine.
    pub commit_interval: Duration,
    /// Crash points sampled per round.
    pub crash_points: usize,
    /// Crashes drawn per crash point (different surviving subsets).
    pub crashes_per_point: usize,
    /// Rounds: after a round, one crash is recovered and the workload continues on it.
    pub rounds: usize,
    /// Open with `test_break_commit_order` (the oracle must catch it).
    pub break_commit_order: bool,
    /// Stop at the first violation.
    pub stop_at_first: bool,
    /// Inject one EIO per round at a random storage operation (single writer only): the request
    /// that sees an error ends the round, and the crash states must still pass the oracle.
    pub inject_fault: bool,
    /// Negative test: the storage's flush lies (returns success, makes nothing durable).
    pub lying_flush: bool,
    /// Simulate a block device whose discarded ranges do not read as zeros.
    pub block_device: Option<DiscardContent>,
    /// RAM of the engine's write-back buffer: the default, none (every write stored at once),
    /// or two clusters (mostly full: partial writes fall back to storing at once).
    pub write_buffer_bytes: u64,
    /// `OpenOptions::test_stale_grace`: how long freed space waits for reuse before the engine
    /// punches it (`None`: the engine's default).
    pub stale_grace: Option<Duration>,
    /// Checkpoints are written ahead of need, between commits, whatever the table's size
    /// (`OpenOptions::test_checkpoint_ahead_min_chunks` = 0); otherwise the engine's default,
    /// under which these small tables are checkpointed in one commit.
    pub checkpoint_ahead: bool,
}

impl Spec {
    /// A spec with everything random but the seed-independent knobs given by the caller.
    pub fn random(seed: u64, profile: Profile, threads: usize) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_c0de);
        let compression = match rng.gen_range(0..6) {
            0 => Compression::Snappy,
            1 => Compression::Zstd { level: 1 },
            2 => Compression::None,
            _ => Compression::Lz4,
        };
        let cluster_size = [16 * 1024, 16 * 1024, 32 * 1024, 64 * 1024][rng.gen_range(0..4)];
        let commit_interval = [
            Duration::from_millis(1),
            Duration::from_millis(5),
            Duration::from_secs(1),
        ][rng.gen_range(0..3)];
        Spec {
            seed,
            clusters: rng.gen_range(32..=64),
            cluster_size,
            compression,
            profile,
            threads,
            ops_per_thread: 40,
            commit_interval,
            crash_points: 25,
            crashes_per_point: 2,
            rounds: rng.gen_range(2..=3),
            break_commit_order: false,
            stop_at_first: true,
            inject_fault: false,
            lying_flush: false,
            block_device: None,
            // From the seed, not the rng: older seeds keep drawing the same runs.
            write_buffer_bytes: match seed % 3 {
                0 => insitu_blk::image::DEFAULT_WRITE_BUFFER_BYTES,
                1 => 0,
                _ => 2 * u64::from(cluster_size),
            },
            stale_grace: None,
            // From the seed too: half the runs write their checkpoints ahead.
            checkpoint_ahead: (seed / 3) % 2 == 1,
        }
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Crash states checked (each: check_on + recovery + oracle).
    pub crash_points: u64,
    /// Crash states whose recovery was crashed and recovered again.
    pub double_crashes: u64,
    /// Violations (each a full report).
    pub violations: Vec<String>,
    /// Crash points that had unflushed storage operations to choose from.
    pub points_with_pending: u64,
    /// Crash states with at least one torn write or punch.
    pub torn: u64,
    /// Crash points with an unflushed checkpoint header write (a crash inside a checkpoint).
    pub points_in_checkpoint: u64,
    /// Clusters recovered to a version written after the last completed flush.
    pub clusters_unflushed_survived: u64,
    /// Clusters recovered to an older allowed version than the newest one (unflushed loss).
    pub clusters_unflushed_lost: u64,
    /// Crash states repaired with `check_on(repair)` before recovery (then re-checked).
    pub repaired: u64,
    /// Leaked bytes `check` found after crashes (allowed: uncommitted data and punches lost).
    pub leaked_bytes: u64,
    /// Engine commits and checkpoints during the workloads (Stats at the end of each round).
    pub commits: u64,
    /// See `commits`.
    pub checkpoints: u64,
    /// Of those, written ahead of need.
    pub checkpoints_ahead: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Injected storage faults that fired.
    pub faults_injected: u64,
    /// Requests that failed because of an injected fault (allowed; their effect may or may not
    /// survive).
    pub requests_failed_by_fault: u64,
    /// Hole punches the engine issued during the workloads (not during recovery or checks).
    pub punches: u64,
}

impl Outcome {
    /// Adds another run's numbers to this one (violations are moved).
    pub fn absorb(&mut self, other: Outcome) {
        self.crash_points += other.crash_points;
        self.double_crashes += other.double_crashes;
        self.violations.extend(other.violations);
        self.points_with_pending += other.points_with_pending;
        self.torn += other.torn;
        self.points_in_checkpoint += other.points_in_checkpoint;
        self.clusters_unflushed_survived += other.clusters_unflushed_survived;
        self.clusters_unflushed_lost += other.clusters_unflushed_lost;
        self.repaired += other.repaired;
        self.leaked_bytes += other.leaked_bytes;
        self.commits += other.commits;
        self.punches += other.punches;
        self.checkpoints += other.checkpoints;
        self.checkpoints_ahead += other.checkpoints_ahead;
        self.elapsed += other.elapsed;
        self.faults_injected += other.faults_injected;
        self.requests_failed_by_fault += other.requests_failed_by_fault;
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} crash points ({} re-crashed after recovery, {} repaired first, {} with unflushed \
             operations, {} with torn ones, {} inside a checkpoint); clusters recovered with unflushed data {} / without \
             {}; {} leaked bytes found; engine: {} commits, {} checkpoints ({} ahead), {} punches; {} faults \
             injected, {} requests failed by them; {} violations; {:.1?}",
            self.crash_points,
            self.double_crashes,
            self.repaired,
            self.points_with_pending,
            self.torn,
            self.points_in_checkpoint,
            self.clusters_unflushed_survived,
            self.clusters_unflushed_lost,
            self.leaked_bytes,
            self.commits,
            self.checkpoints,
            self.checkpoints_ahead,
            self.punches,
            self.faults_injected,
            self.requests_failed_by_fault,
            self.violations.len(),
            self.elapsed
        )
    }
}

/// Deterministic content for a write request: distinct per request (`tag`) and per sector, so
/// every version of a cluster is distinguishable.
pub fn fill(pattern: Pattern, tag: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    if pattern == Pattern::Zeros {
        return out;
    }
    let mut rng = SmallRng::seed_from_u64(tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ offset);
    match pattern {
        Pattern::Incompressible => rng.fill_bytes(&mut out),
        Pattern::Compressible | Pattern::Mixed | Pattern::Part(_) => {
            for (i, sector) in out.chunks_mut(512).enumerate() {
                let sector_no = offset / 512 + i as u64;
                sector.fill((tag as u8) ^ 0x5A);
                sector[..8].copy_from_slice(&tag.to_le_bytes());
                sector[8..16].copy_from_slice(&sector_no.to_le_bytes());
            }
            if pattern == Pattern::Mixed {
                for block in out.chunks_mut(4096) {
                    let third = block.len() / 3;
                    rng.fill_bytes(&mut block[..third]);
                }
            }
            if let Pattern::Part(n) = pattern {
                for block in out.chunks_mut(4096) {
                    let part = block.len() * usize::from(n) / 16;
                    rng.fill_bytes(&mut block[..part]);
                }
            }
        }
        Pattern::Zeros => unreachable!(),
    }
    out
}

/// Generates requests inside clusters `[lo, hi)`.
pub struct Generator {
    rng: SmallRng,
    cluster_size: u64,
    lo: u64,
    hi: u64,
    hot: Vec<u64>,
    profile: Profile,
    flush_next: bool,
    /// Next byte of a sequential walk (`Profile::SmallSequential`).
    cursor: u64,
    /// Whether `Op::QuiesceResume` may be generated.
    pub allow_quiesce: bool,
}

impl Generator {
    /// A generator for clusters `[lo, hi)`.
    pub fn new(seed: u64, cluster_size: u64, lo: u64, hi: u64, profile: Profile) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let hot = (0..3).map(|_| rng.gen_range(lo..hi)).collect();
        Generator {
            rng,
            cluster_size,
            lo,
            hi,
            hot,
            profile,
            flush_next: false,
            cursor: lo * cluster_size,
            allow_quiesce: false,
        }
    }

    fn pattern(&mut self) -> Pattern {
        match self.rng.gen_range(0..10) {
            0..=3 => Pattern::Compressible,
            4..=5 => Pattern::Mixed,
            6..=8 => Pattern::Incompressible,
            _ => Pattern::Zeros,
        }
    }

    /// A 512-aligned range starting in cluster `c`, not beyond cluster `hi`.
    fn range_in(&mut self, c: u64) -> (u64, u64) {
        let cs = self.cluster_size;
        let end_limit = self.hi * cs;
        let (offset, len) = match self.rng.gen_range(0..10) {
            // Whole clusters, aligned (1..=3).
            0..=2 => (c * cs, cs * self.rng.gen_range(1..=3)),
            // One 4 KiB-aligned run of blocks inside the cluster.
            3..=4 => {
                let blocks = cs / 4096;
                let first = self.rng.gen_range(0..blocks);
                let n = self.rng.gen_range(1..=blocks - first);
                (c * cs + first * 4096, n * 4096)
            }
            // Sub-cluster, 512-aligned, may straddle into the next cluster.
            5..=7 => {
                let sectors = cs / 512;
                let first = self.rng.gen_range(0..sectors);
                let n = self.rng.gen_range(1..=sectors);
                (c * cs + first * 512, n * 512)
            }
            // Multi-cluster, unaligned both ends.
            _ => {
                let first = self.rng.gen_range(0..cs / 512);
                let n = self.rng.gen_range(cs / 512..=3 * cs / 512);
                (c * cs + first * 512, n * 512)
            }
        };
        let len = len.min(end_limit - offset);
        (offset, len)
    }

    fn cluster(&mut self) -> u64 {
        if self.rng.gen_bool(0.7) {
            self.hot[self.rng.gen_range(0..self.hot.len())]
        } else {
            self.rng.gen_range(self.lo..self.hi)
        }
    }

    /// The next request.
    pub fn next(&mut self) -> Op {
        let cs = self.cluster_size;
        match self.profile {
            Profile::Mixed => {
                let c = self.cluster();
                match self.rng.gen_range(0..100) {
                    0..=1 if self.allow_quiesce => Op::QuiesceResume,
                    0..=7 => Op::Flush,
                    8..=15 => {
                        let (offset, len) = self.range_in(c);
                        Op::Read { offset, len }
                    }
                    16..=21 => {
                        let (offset, len) = self.range_in(c);
                        Op::Discard { offset, len }
                    }
                    22..=28 => {
                        let (offset, len) = self.range_in(c);
                        Op::WriteZeroes {
                            offset,
                            len,
                            unmap: self.rng.gen_bool(0.5),
                        }
                    }
                    _ => {
                        let (offset, len) = self.range_in(c);
                        let pattern = self.pattern();
                        Op::Write {
                            offset,
                            len,
                            pattern,
                        }
                    }
                }
            }
            Profile::Pressure => match self.rng.gen_range(0..100) {
                0 => Op::Flush,
                1..=4 => Op::Read {
                    offset: self.rng.gen_range(self.lo..self.hi) * cs,
                    len: cs,
                },
                _ => Op::Write {
                    offset: self.rng.gen_range(self.lo..self.hi) * cs,
                    len: cs,
                    pattern: if self.rng.gen_bool(0.85) {
                        Pattern::Incompressible
                    } else {
                        Pattern::Mixed
                    },
                },
            },
            Profile::Journal => {
                self.flush_next = !self.flush_next;
                if !self.flush_next {
                    return Op::Flush;
                }
                let c = self.cluster();
                let sectors = self.rng.gen_range(1..=8);
                let first = self.rng.gen_range(0..=cs / 512 - sectors);
                let offset = c * cs + first * 512;
                match self.rng.gen_range(0..10) {
                    0 => Op::Discard {
                        offset,
                        len: sectors * 512,
                    },
                    _ => Op::Write {
                        offset,
                        len: sectors * 512,
                        pattern: Pattern::Compressible,
                    },
                }
            }
            Profile::SmallSequential => {
                let (lo, hi) = (self.lo * cs, self.hi * cs);
                match self.rng.gen_range(0..100) {
                    0..=1 if self.allow_quiesce => Op::QuiesceResume,
                    0..=5 => Op::Flush,
                    6..=15 => {
                        // What was just written (often still buffered), across a cluster edge
                        // at times.
                        let len = 512 * self.rng.gen_range(1..=32u64);
                        let offset = self.cursor.saturating_sub(len / 2).max(lo) / 512 * 512;
                        let len = len.min(hi - offset);
                        Op::Read { offset, len }
                    }
                    16..=19 => {
                        // Step back: rewrite part of a buffered or stored cluster.
                        self.cursor = self.cursor.saturating_sub(cs / 2).max(lo) / 512 * 512;
                        Op::Flush
                    }
                    20..=22 => {
                        let len = (512 * self.rng.gen_range(1..=8u64)).min(hi - self.cursor);
                        let offset = self.cursor;
                        self.cursor += len;
                        if self.cursor >= hi {
                            self.cursor = lo;
                        }
                        Op::WriteZeroes {
                            offset,
                            len,
                            unmap: self.rng.gen_bool(0.5),
                        }
                    }
                    _ => {
                        let len = if self.rng.gen_bool(0.7) {
                            4096
                        } else {
                            512 * self.rng.gen_range(1..=16u64)
                        };
                        let len = len.min(hi - self.cursor);
                        let offset = self.cursor;
                        self.cursor += len;
                        if self.cursor >= hi {
                            self.cursor = lo;
                        }
                        let pattern = self.pattern();
                        Op::Write {
                            offset,
                            len,
                            pattern,
                        }
                    }
                }
            }
            Profile::PingPong => {
                let c = self.rng.gen_range(self.lo..self.hi);
                let offset = c * cs;
                match self.rng.gen_range(0..100) {
                    0..=1 if self.allow_quiesce => Op::QuiesceResume,
                    0..=17 => Op::Flush,
                    18..=23 => Op::Read { offset, len: cs },
                    24..=26 => Op::Discard { offset, len: cs },
                    27..=30 => Op::Write {
                        offset,
                        len: cs,
                        pattern: Pattern::Incompressible,
                    },
                    31..=37 => {
                        // A read-modify-write (or a buffered partial write) of the cluster.
                        let blocks = cs / 4096;
                        let first = self.rng.gen_range(0..blocks);
                        let n = self.rng.gen_range(1..=blocks - first);
                        Op::Write {
                            offset: offset + first * 4096,
                            len: n * 4096,
                            pattern: Pattern::Part(self.rng.gen_range(1..=7)),
                        }
                    }
                    _ => Op::Write {
                        offset,
                        len: cs,
                        pattern: Pattern::Part(self.rng.gen_range(1..=7)),
                    },
                }
            }
            Profile::SharedClusters => {
                let offset = self.rng.gen_range(self.lo..self.hi) * cs;
                match self.rng.gen_range(0..100) {
                    0..=9 => Op::Flush,
                    10..=17 => Op::Discard { offset, len: cs },
                    18..=22 => Op::WriteZeroes {
                        offset,
                        len: cs,
                        unmap: self.rng.gen_bool(0.5),
                    },
                    _ => {
                        let pattern = self.pattern();
                        Op::Write {
                            offset,
                            len: cs,
                            pattern,
                        }
                    }
                }
            }
        }
    }
}

fn describe(op: &Op, tag: u64) -> String {
    match op {
        Op::Write {
            offset,
            len,
            pattern,
        } => format!("write {len}@{offset:#x} {pattern:?} tag {tag}"),
        Op::WriteZeroes { offset, len, unmap } => {
            format!("write_zeroes {len}@{offset:#x} unmap={unmap}")
        }
        Op::Discard { offset, len } => format!("discard {len}@{offset:#x}"),
        Op::Flush => "flush".into(),
        Op::QuiesceResume => "quiesce + resume".into(),
        Op::Read { offset, len } => format!("read {len}@{offset:#x}"),
    }
}

/// Shared state of one round.
struct Round<'a> {
    image: &'a Image,
    sim: &'a SimStorage,
    failed_by_fault: &'a AtomicU64,
    clock: &'a AtomicU64,
    model: &'a Mutex<Model>,
    cluster_size: u64,
    errors: &'a Mutex<Vec<String>>,
}

impl Round<'_> {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An error after an injected fault fired is expected: it ends this thread's requests.
    fn fault_fired(&self) -> bool {
        self.sim.injected_faults() > 0
    }

    fn fail(&self, msg: String) {
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(msg);
    }

    /// Runs one request and records it. `owned`: this thread is the only writer of the clusters
    /// it touches (reads can be checked, partial writes merge into the model's latest version).
    fn run(&self, thread: usize, op: &Op, tag: u64, owned: bool) -> bool {
        let cs = self.cluster_size;
        let desc = describe(op, tag);
        let (offset, len, data) = match op {
            Op::Flush | Op::QuiesceResume => {
                let start = self.tick();
                let res = if matches!(op, Op::Flush) {
                    self.image.flush()
                } else {
                    self.image.quiesce().and_then(|()| self.image.resume())
                };
                let end = self.tick();
                let mut model = self.model();
                model.record_op(thread, start, end, desc.clone());
                if let Err(e) = res {
                    drop(model);
                    if self.fault_fired() {
                        self.failed_by_fault.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.fail(format!("{desc} failed: {e}"));
                    }
                    return false;
                }
                model.record_flush(start, end);
                return true;
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; *len as usize];
                if let Err(e) = self.image.read(*offset, &mut buf) {
                    if self.fault_fired() {
                        // Reads need no storage writes; still, stop here (conservative).
                        self.fail(format!("thread {thread}: {desc} failed after a fault: {e}"));
                    } else {
                        self.fail(format!("thread {thread}: {desc} failed: {e}"));
                    }
                    return false;
                }
                if owned {
                    let model = self.model();
                    for (i, chunk) in buf.chunks(512).enumerate() {
                        let pos = offset + i as u64 * 512;
                        let (c, within) = ((pos / cs) as usize, (pos % cs) as usize);
                        if chunk != &model.latest(c)[within..within + 512] {
                            let msg = format!(
                                "thread {thread}: {desc} (no crash) returned wrong data at byte \
                                 {pos:#x} (cluster {c})"
                            );
                            drop(model);
                            self.fail(msg);
                            return false;
                        }
                    }
                }
                return true;
            }
            Op::Write {
                offset,
                len,
                pattern,
            } => (*offset, *len, fill(*pattern, tag, *offset, *len as usize)),
            Op::WriteZeroes { offset, len, .. } | Op::Discard { offset, len } => {
                (*offset, *len, vec![0u8; *len as usize])
            }
        };
        let start = self.tick();
        let res = match op {
            Op::Write { .. } => self.image.write(offset, &data),
            Op::WriteZeroes { unmap, .. } => self.image.write_zeroes(offset, len, *unmap),
            Op::Discard { .. } => self.image.discard(offset, len),
            Op::Flush | Op::Read { .. } | Op::QuiesceResume => unreachable!(),
        };
        let end = self.tick();
        let mut model = self.model();
        let failed = match res {
            Ok(()) => None,
            Err(e) if self.fault_fired() => {
                // The request failed because of the injected fault: what it wrote may or may
                // not survive, so its versions are recorded (allowed, never required: they
                // end after any flush that could guarantee them) and this thread stops.
                self.failed_by_fault.fetch_add(1, Ordering::Relaxed);
                Some(e)
            }
            Err(e) => {
                model.record_op(thread, start, end, desc.clone());
                drop(model);
                self.fail(format!("thread {thread}: {desc} failed: {e}"));
                return false;
            }
        };
        let desc = match &failed {
            Some(e) => format!("{desc} -> FAILED after the injected fault: {e}"),
            None => desc,
        };
        let index = model.record_op(thread, start, end, desc);
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        for c in first..=last {
            let mut content = model.latest(c as usize).to_vec();
            let lo = offset.max(c * cs);
            let hi = (offset + len).min((c + 1) * cs);
            content[(lo - c * cs) as usize..(hi - c * cs) as usize]
                .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
            model.record_version(c as usize, index, Arc::from(content));
        }
        failed.is_none()
    }
}

/// The engine options of a run.
fn open_options(spec: &Spec) -> OpenOptions {
    OpenOptions {
        commit_interval: spec.commit_interval,
        test_break_commit_order: spec.break_commit_order,
        write_buffer_bytes: spec.write_buffer_bytes,
        test_stale_grace: spec.stale_grace,
        test_checkpoint_ahead_min_chunks: spec.checkpoint_ahead.then_some(0),
        ..OpenOptions::default()
    }
}

/// Runs one round of the workload on `image`; returns the model and the crash points taken.
fn run_round(
    spec: &Spec,
    round: usize,
    image: &Image,
    sim: &SimStorage,
    initial: Vec<Arc<[u8]>>,
) -> (Model, Vec<CrashSnapshot>, Vec<String>, u64) {
    let cs = spec.cluster_size as u64;
    let clock = Arc::new(AtomicU64::new(1));
    let model = Mutex::new(Model::new(cs as usize, initial));
    let errors = Mutex::new(Vec::new());
    let failed_by_fault = AtomicU64::new(0);
    let round_seed = spec.seed.wrapping_add(round as u64 * 0x1000_0000_0001);
    if spec.inject_fault {
        let mut rng = SmallRng::seed_from_u64(round_seed ^ 0xFA17);
        sim.fail_after(rng.gen_range(1..120));
    }
    sim.start_capture(clock.clone(), spec.crash_points, round_seed ^ 0xC4A5);
    // Commits and checkpoints are the moments that matter and are a small share of the storage
    // operations: crash at every step after (some of) their records are written. The magics are
    // the journal record's and checkpoint header's, as documented in docs/FORMAT.md.
    sim.focus_capture(&[
        (b"INSITUJR", (spec.crash_points / 8).max(2)),
        (b"INSITUCP", 4),
    ]);
    let ctx = Round {
        image,
        sim,
        failed_by_fault: &failed_by_fault,
        clock: &clock,
        model: &model,
        cluster_size: cs,
        errors: &errors,
    };
    std::thread::scope(|scope| {
        for thread in 0..spec.threads {
            let ctx = &ctx;
            scope.spawn(move || {
                let (lo, hi, owned) = match spec.profile {
                    Profile::SharedClusters => (0, 3.min(spec.clusters), false),
                    _ => {
                        let n = spec.clusters / spec.threads as u64;
                        (thread as u64 * n, (thread as u64 + 1) * n, true)
                    }
                };
                let mut gen = Generator::new(
                    round_seed ^ (thread as u64 + 1).wrapping_mul(0xABCD_EF01),
                    cs,
                    lo,
                    hi,
                    spec.profile,
                );
                gen.allow_quiesce = spec.threads == 1;
                if spec.profile == Profile::Pressure && round == 0 {
                    // Fill every cluster first so later overwrites find no free home space.
                    for c in lo..hi {
                        let op = Op::Write {
                            offset: c * cs,
                            len: cs,
                            pattern: Pattern::Incompressible,
                        };
                        if !ctx.run(thread, &op, round_seed ^ c, owned) {
                            return;
                        }
                    }
                }
                for i in 0..spec.ops_per_thread {
                    let op = gen.next();
                    let tag = round_seed ^ ((thread as u64) << 48) ^ (i as u64 + 1);
                    if !ctx.run(thread, &op, tag, owned) {
                        return;
                    }
                }
            });
        }
    });
    let snaps = sim.take_captured();
    // Disarm a fault that did not fire (so recovery checks never see it).
    sim.fail_after(u64::MAX);
    let model = model.into_inner().unwrap_or_else(PoisonError::into_inner);
    let errors = errors.into_inner().unwrap_or_else(PoisonError::into_inner);
    (model, snaps, errors, failed_by_fault.into_inner())
}

/// A crash state that passed: the recovered image and what each cluster read as.
struct Recovered {
    image: Image,
    storage: Arc<SimStorage>,
    contents: Vec<Arc<[u8]>>,
}

impl Recovered {
    /// Stops the image like a killed process: nothing more is committed (the storage is
    /// discarded or was already crashed from).
    fn abandon(self) {
        self.image.abandon();
    }
}

/// Checks one crash state: check_on, recovery, oracle per cluster. Returns the recovered image.
fn verify_state(
    spec: &Spec,
    storage: Arc<SimStorage>,
    model: &Model,
    t: u64,
    expect_exact: Option<&[Arc<[u8]>]>,
    repair: bool,
    outcome: &mut Outcome,
) -> Result<Recovered, String> {
    let cs = spec.cluster_size as usize;
    let dyn_storage: Arc<dyn Storage> = storage.clone();
    match check_on(dyn_storage.clone(), false) {
        Ok(report) if report.corruptions.is_empty() => outcome.leaked_bytes += report.leaked_bytes,
        Ok(report) => {
            return Err(format!(
                "check_on reports corruption after the crash: {:?}",
                report.corruptions
            ))
        }
        Err(e) => return Err(format!("check_on failed after the crash: {e}")),
    }
    if repair {
        // `check --repair` on a crashed image: afterwards nothing is leaked or corrupt, and the
        // oracle below still holds for what it left.
        outcome.repaired += 1;
        match check_on(dyn_storage.clone(), true) {
            Ok(report) if report.corruptions.is_empty() => {}
            Ok(report) => {
                return Err(format!(
                    "check_on(repair) reports corruption after the crash: {:?}",
                    report.corruptions
                ))
            }
            Err(e) => return Err(format!("check_on(repair) failed after the crash: {e}")),
        }
        match check_on(dyn_storage.clone(), false) {
            Ok(report) if report.corruptions.is_empty() && report.leaked_bytes == 0 => {}
            Ok(report) => {
                return Err(format!(
                    "check_on after check_on(repair): {} leaked bytes, corruptions {:?}",
                    report.leaked_bytes, report.corruptions
                ))
            }
            Err(e) => return Err(format!("check_on after check_on(repair) failed: {e}")),
        }
    }
    let image = Image::open_on(dyn_storage, &open_options(spec))
        .map_err(|e| format!("recovery (open_on) failed after the crash: {e}"))?;
    let mut contents = Vec::with_capacity(model.clusters.len());
    let mut problems = Vec::new();
    let mut buf = vec![0u8; cs];
    for c in 0..model.clusters.len() {
        if let Err(e) = image.read(c as u64 * cs as u64, &mut buf) {
            problems.push(format!(
                "read of cluster {c} failed after recovery (I3: no error caused by a crash): {e}"
            ));
            contents.push(Arc::from(vec![0u8; cs]));
            continue;
        }
        if let Some(expected) = expect_exact {
            if *expected[c] != *buf {
                problems.push(format!(
                    "cluster {c} changed between two recoveries of the same crash state \
                     (recovery is not idempotent)"
                ));
            }
        }
        match model.judge(c, t, &buf) {
            Verdict::Matches(i) => {
                let version = &model.clusters[c][i];
                if version.end >= model.guarantee(t) {
                    outcome.clusters_unflushed_survived += 1;
                }
                if model.allowed(c, t).last() != Some(&i) {
                    outcome.clusters_unflushed_lost += 1;
                }
            }
            Verdict::Violation(text) => problems.push(text),
        }
        contents.push(Arc::from(buf.as_slice()));
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    Ok(Recovered {
        image,
        storage,
        contents,
    })
}

fn report(spec: &Spec, round: usize, model: &Model, crash_desc: &str, problem: &str) -> String {
    format!(
        "CRASH ORACLE VIOLATION\n  replay: INSITU_CRASH_SEED={} (profile {:?}, {} threads; \
         thread timing may differ on replay)\n  spec: {spec:?}\n  round {round}, {crash_desc}\n\
         problem:\n{problem}\nrequest history of the round (clock stamps; flushes guarantee \
         writes that ended before they started):\n{}",
        spec.seed,
        spec.profile,
        spec.threads,
        model.history_text(400)
    )
}

/// Runs a whole spec: create, rounds of workload + crash checks, continuation on a recovered crash.
pub fn run(spec: &Spec) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let mut rng = SmallRng::seed_from_u64(spec.seed ^ 0xC1A5_4000);
    let cs = spec.cluster_size as usize;
    let mut create = CreateOptions::new(spec.clusters * spec.cluster_size as u64);
    create.cluster_size = spec.cluster_size;
    create.compression = spec.compression;
    let device = match spec.block_device {
        // A block device has a fixed size and arbitrary old content (never zeros to rely on).
        Some(_) => {
            let layout = insitu_blk::image::format::Layout::new(
                spec.clusters * spec.cluster_size as u64,
                spec.cluster_size,
            )
            .expect("layout");
            let len = (layout.total_len + (2 << 20)) as usize;
            Pages::from_bytes(&fill(Pattern::Incompressible, spec.seed, 0, len))
        }
        None => Pages::default(),
    };
    let sim = Arc::new(new_storage(spec, device));
    if let Err(e) = Image::create_on(sim.clone(), &create) {
        outcome
            .violations
            .push(format!("create_on failed: {e} (spec {spec:?})"));
        return outcome;
    }
    let image = match Image::open_on(sim.clone(), &open_options(spec)) {
        Ok(image) => image,
        Err(e) => {
            outcome.violations.push(format!(
                "open_on of a new image failed: {e} (spec {spec:?})"
            ));
            return outcome;
        }
    };
    if spec.lying_flush {
        sim.lie_about_flush(true);
    }
    let mut current = Recovered {
        image,
        storage: sim,
        contents: vec![Arc::from(vec![0u8; cs]); spec.clusters as usize],
    };
    for round in 0..spec.rounds {
        let faults_before = current.storage.injected_faults();
        let punches_before = current.storage.punches();
        let (model, snaps, errors, failed_by_fault) = run_round(
            spec,
            round,
            &current.image,
            &current.storage,
            current.contents.clone(),
        );
        outcome.faults_injected += current.storage.injected_faults() - faults_before;
        outcome.punches += current.storage.punches() - punches_before;
        outcome.requests_failed_by_fault += failed_by_fault;
        let stats = current.image.stats();
        outcome.commits += stats.commits;
        outcome.checkpoints += stats.checkpoints;
        outcome.checkpoints_ahead += stats.checkpoints_ahead;
        if !errors.is_empty() {
            outcome.violations.push(format!(
                "engine request failed during the workload (no crash involved), seed {}:\n{}\n\
                 history:\n{}",
                spec.seed,
                errors.join("\n"),
                model.history_text(400)
            ));
            return finish(outcome, started);
        }
        // A final crash point after the workload, with the writer possibly still committing.
        let mut snaps = snaps;
        let clock_end = model.history.iter().map(|r| r.end + 1).max().unwrap_or(1);
        snaps.push(current.storage.snapshot(&AtomicU64::new(clock_end)));
        let mut next: Option<Recovered> = None;
        let last = snaps.len() - 1;
        for (si, snap) in snaps.iter().enumerate() {
            // Focus points (the steps of a commit or checkpoint): draw more crashes from each.
            let draws = if snap.after.ends_with("(focus)") {
                spec.crashes_per_point * 2
            } else {
                spec.crashes_per_point
            };
            for k in 0..draws {
                let mode = CrashMode::random(&mut rng);
                let (pages, desc) = snap.materialize(mode, &mut rng);
                outcome.crash_points += 1;
                outcome.points_with_pending += u64::from(!snap.pending.is_empty());
                outcome.torn += u64::from(desc.contains("TORN"));
                outcome.points_in_checkpoint += u64::from(snap.pending.iter().any(|op| {
                    matches!(op, PendingOp::Write { data, .. } if data.starts_with(b"INSITUCP"))
                }));
                let storage = Arc::new(new_storage(spec, pages));
                let repair = rng.gen_ratio(1, 8);
                let verified = verify_state(
                    spec,
                    storage,
                    &model,
                    snap.clock,
                    None,
                    repair,
                    &mut outcome,
                );
                let recovered = match verified {
                    Ok(r) => r,
                    Err(problem) => {
                        outcome
                            .violations
                            .push(report(spec, round, &model, &desc, &problem));
                        if spec.stop_at_first {
                            return finish(outcome, started);
                        }
                        continue;
                    }
                };
                // Crash again right after recovery (its own writes may be cut short), recover
                // again: the same contents must come back (idempotent recovery).
                let recovered = if rng.gen_ratio(1, 4) {
                    let mode2 = CrashMode::random(&mut rng);
                    let (again, desc2) = recovered.storage.crash(mode2, &mut rng);
                    let again = new_storage(spec, again.durable());
                    let first = recovered.contents.clone();
                    recovered.abandon();
                    outcome.double_crashes += 1;
                    outcome.crash_points += 1;
                    let again = Arc::new(again);
                    let verified = verify_state(
                        spec,
                        again,
                        &model,
                        snap.clock,
                        Some(&first),
                        false,
                        &mut outcome,
                    );
                    match verified {
                        Ok(r) => r,
                        Err(problem) => {
                            let desc = format!(
                                "{desc}\n  then recovered, and crashed again right after \
                                 recovery: {desc2}"
                            );
                            outcome
                                .violations
                                .push(report(spec, round, &model, &desc, &problem));
                            if spec.stop_at_first {
                                return finish(outcome, started);
                            }
                            continue;
                        }
                    }
                } else {
                    recovered
                };
                if si == last && k + 1 == draws && next.is_none() {
                    next = Some(recovered);
                } else {
                    recovered.abandon();
                }
            }
        }
        let Some(recovered) = next else {
            break;
        };
        // Continue the workload on the recovered image. The image the workload ran on is first
        // closed cleanly (no crash): it must then check clean and reopen with the newest data.
        let old = std::mem::replace(&mut current, recovered);
        let faulted = current_faults(&old) > faults_before;
        if faulted {
            old.abandon();
        } else if let Err(problem) =
            clean_close_check(spec, &model, old, true, &mut rng, &mut outcome)
        {
            outcome.violations.push(format!(
                "CLEAN CLOSE VIOLATION (no crash involved)\n  replay: INSITU_CRASH_SEED={}\n  \
                 spec: {spec:?}\n  round {round}\nproblem:\n{problem}\nhistory:\n{}",
                spec.seed,
                model.history_text(400)
            ));
            return finish(outcome, started);
        }
    }
    current.abandon();
    finish(outcome, started)
}

/// A storage holding `pages`, of the kind the spec simulates.
fn new_storage(spec: &Spec, pages: Pages) -> SimStorage {
    let storage = SimStorage::from_pages(pages);
    if let Some(content) = spec.block_device {
        storage.as_block_device(content);
    }
    storage
}

fn current_faults(r: &Recovered) -> u64 {
    r.storage.injected_faults()
}

/// Closes the image the workload ran on, checks it (no corruption; no leaked space: space left
/// by a crash is reclaimed by the recovery that preceded the round) and reopens it: every cluster reads its newest version
/// (single-owner workloads) or one of its versions (racing writers).
fn clean_close_check(
    spec: &Spec,
    model: &Model,
    old: Recovered,
    expect_no_leaks: bool,
    rng: &mut SmallRng,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let cs = spec.cluster_size as usize;
    let storage = old.storage.clone();
    // Crash points during the close (its last commit and checkpoint) and right after it: close
    // is a FLUSH for the oracle once it has returned.
    let clock_start = model.history.iter().map(|r| r.end).max().unwrap_or(0) + 1;
    let clock = Arc::new(AtomicU64::new(clock_start));
    storage.start_capture(clock.clone(), 6, rng.gen());
    storage.focus_capture(&[(b"INSITUJR", 1), (b"INSITUCP", 1)]);
    let start = clock.fetch_add(1, Ordering::SeqCst);
    let closed = old.image.close();
    let end = clock.fetch_add(1, Ordering::SeqCst);
    let mut snaps = storage.take_captured();
    closed.map_err(|e| format!("close failed: {e}"))?;
    snaps.push(storage.snapshot(&clock));
    let mut model = model.clone();
    model.record_op(0, start, end, "close".into());
    model.record_flush(start, end);
    for snap in &snaps {
        let mode = CrashMode::random(rng);
        let (pages, desc) = snap.materialize(mode, rng);
        outcome.crash_points += 1;
        outcome.points_in_checkpoint += u64::from(snap.pending.iter().any(
            |op| matches!(op, PendingOp::Write { data, .. } if data.starts_with(b"INSITUCP")),
        ));
        let crashed = Arc::new(new_storage(spec, pages));
        verify_state(spec, crashed, &model, snap.clock, None, false, outcome)
            .map(Recovered::abandon)
            .map_err(|problem| format!("crash during/after close: {desc}\n{problem}"))?;
    }
    let dyn_storage: Arc<dyn Storage> = storage;
    let report =
        check_on(dyn_storage.clone(), false).map_err(|e| format!("check after close: {e}"))?;
    if !report.corruptions.is_empty() {
        return Err(format!(
            "check after a clean close reports corruption: {:?}",
            report.corruptions
        ));
    }
    if expect_no_leaks && report.leaked_bytes > 0 {
        return Err(format!(
            "check after a clean close (no crash ever) finds {} leaked bytes",
            report.leaked_bytes
        ));
    }
    let image = Image::open_on(dyn_storage, &open_options(spec))
        .map_err(|e| format!("reopen after a clean close: {e}"))?;
    let mut buf = vec![0u8; cs];
    let mut problems = Vec::new();
    for c in 0..model.clusters.len() {
        if let Err(e) = image.read(c as u64 * cs as u64, &mut buf) {
            problems.push(format!("cluster {c}: read after reopen failed: {e}"));
            continue;
        }
        let ok = if spec.profile == Profile::SharedClusters {
            model.clusters[c].iter().any(|v| *v.data == *buf)
        } else {
            **model.latest(c) == *buf
        };
        if !ok {
            problems.push(format!(
                "cluster {c}: after close and reopen it does not read its newest version"
            ));
        }
    }
    image.abandon();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn finish(mut outcome: Outcome, started: Instant) -> Outcome {
    outcome.elapsed = started.elapsed();
    outcome
}

/// Checks one crash state (check_on, recovery, oracle) outside a random run: for targeted tests
/// that drive the model themselves.
pub fn verify_crash(
    spec: &Spec,
    pages: super::sim::Pages,
    model: &Model,
    t: u64,
) -> Result<(), String> {
    let mut outcome = Outcome::default();
    let storage = Arc::new(new_storage(spec, pages.clone()));
    verify_state(spec, storage, model, t, None, false, &mut outcome).map(Recovered::abandon)?;
    let storage = Arc::new(new_storage(spec, pages));
    verify_state(spec, storage, model, t, None, true, &mut outcome).map(Recovered::abandon)
}

/// The engine options a spec opens with (for targeted tests).
pub fn spec_open_options(spec: &Spec) -> OpenOptions {
    open_options(spec)
}
