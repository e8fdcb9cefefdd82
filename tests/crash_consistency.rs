//! Crash consistency of the image engine (design.md I1-I3, §5; issue #2 item 5).
//!
//! The real engine runs random workloads on the crash-simulating storage (tests/crashsim); crash
//! points are sampled while the workload and the engine's metadata writer run. Each crash state is
//! checked with `check_on`, recovered with `open_on`, and every cluster is compared with the
//! versions the oracle allows; some are crashed again right after recovery and must recover to
//! the same contents; some are repaired with `check_on(repair)` first. One recovered crash per
//! round continues with more writes and crashes; each round's image is also closed cleanly and
//! crashed during and after the close. Crash points are a uniform sample of the storage operations
//! plus every step after (a sample of) journal records and checkpoint headers.
//!
//! Variants: single writer, 3 writers on their own clusters, 3 writers racing on the same
//! clusters, free-slot pressure, journal wrap + checkpoints, every codec x cluster size, injected
//! EIO, a block device whose discards do not read as zeros, crash during create, a commit held in
//! flight while its cluster is rewritten (both group-commit traps), a write racing the commit that
//! writes a checkpoint (ahead or in one go: only committed entries go in). The oracle is shown to
//! bite on the engine's `test_break_commit_order` and on a storage whose flush lies.
//!
//! A default run checks about 26,000 crash points (each test prints its numbers with
//! `--nocapture`). Failures print the seed, the crash (what survived, what was torn), the
//! violation per 4 KiB block, and the request history with clock stamps.
//!
//! Environment:
//! - `INSITU_CRASH_ITERS=N` multiplies the number of seeds of every engine test (default 1).
//! - `INSITU_CRASH_SEED=S` runs only seed S in each engine test (replay a reported failure with
//!   `INSITU_CRASH_SEED=S cargo test --test crash_consistency TESTNAME`).
//! - `INSITU_CRASH_BASE=B` changes the first seed (default: fixed, so CI runs are reproducible).

mod crashsim;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use crashsim::model::{Model, Verdict};
use crashsim::sim::{CrashMode, Pages, PendingOp, SimStorage, PAGE, SECTOR};
use crashsim::workload::{self, Profile, Spec};
use insitu_blk::image::{Compression, Storage};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// The simulator itself.

fn read(pages: &Pages, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    pages.read(offset, &mut buf).expect("read");
    buf
}

#[test]
fn flushed_writes_survive_every_crash() {
    let sim = SimStorage::new();
    sim.write_at(0, &[0xAA; 8192]).unwrap();
    sim.flush().unwrap();
    sim.write_at(4096, &[0xBB; 4096]).unwrap();
    let mut rng = SmallRng::seed_from_u64(1);
    for _ in 0..200 {
        let mode = CrashMode::random(&mut rng);
        let (pages, desc) = sim.snapshot(&AtomicU64::new(0)).materialize(mode, &mut rng);
        assert_eq!(read(&pages, 0, 4096), vec![0xAA; 4096], "{desc}");
        let second = read(&pages, 4096, 4096);
        for sector in second.chunks(SECTOR) {
            assert!(
                sector.iter().all(|&b| b == 0xAA) || sector.iter().all(|&b| b == 0xBB),
                "a sector is neither old nor new: {desc}"
            );
        }
    }
}

#[test]
fn unflushed_writes_may_vanish_or_survive() {
    let sim = SimStorage::new();
    sim.set_len(16384).unwrap();
    sim.flush().unwrap();
    sim.write_at(0, &[7; 4096]).unwrap();
    let mut rng = SmallRng::seed_from_u64(2);
    let (none, _) = sim.crash(CrashMode::KeepNone, &mut rng);
    let mut buf = vec![1u8; 4096];
    none.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0; 4096], "KeepNone kept an unflushed write");
    let (all, _) = sim.crash(CrashMode::KeepAll, &mut rng);
    all.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, vec![7; 4096], "KeepAll lost an unflushed write");
    // Random crashes see both outcomes.
    let (mut vanished, mut survived) = (0, 0);
    for _ in 0..200 {
        let mode = CrashMode::Random { p: 0.5, tear: 0.0 };
        let (s, _) = sim.crash(mode, &mut rng);
        s.read_at(0, &mut buf).unwrap();
        if buf[0] == 7 {
            survived += 1;
        } else {
            vanished += 1;
        }
    }
    assert!(vanished > 20 && survived > 20, "{vanished} / {survived}");
    // The live storage still reads what was written; reads see pending writes.
    sim.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, vec![7; 4096]);
}

#[test]
fn torn_writes_land_whole_sectors_and_both_granularities_occur() {
    let sim = SimStorage::new();
    sim.set_len(65536).unwrap();
    sim.flush().unwrap();
    // Each sector of the write carries its own byte value; the write starts mid-page.
    let data: Vec<u8> = (0..96).flat_map(|i| vec![i as u8 + 1; SECTOR]).collect();
    let offset = 4 * SECTOR as u64;
    sim.write_at(offset, &data).unwrap();
    let mut rng = SmallRng::seed_from_u64(3);
    let (mut torn_sector_level, mut torn_page_level, mut partial) = (0, 0, 0);
    for _ in 0..400 {
        let mode = CrashMode::Random { p: 1.0, tear: 1.0 };
        let (pages, desc) = sim.snapshot(&AtomicU64::new(0)).materialize(mode, &mut rng);
        let got = read(&pages, offset, data.len());
        let mut landed = Vec::new();
        for (i, sector) in got.chunks(SECTOR).enumerate() {
            let new = sector.iter().all(|&b| b == i as u8 + 1);
            let old = sector.iter().all(|&b| b == 0);
            assert!(new || old, "sector {i} is itself torn: {desc}");
            landed.push(new);
        }
        let n = landed.iter().filter(|&&x| x).count();
        if n > 0 && n < landed.len() {
            partial += 1;
            // Page-aligned groups (absolute 4 KiB) either all landed or none, for 4 KiB tears.
            let page_consistent = (0..landed.len()).all(|i| {
                let page = (offset as usize + i * SECTOR) / PAGE;
                (0..landed.len())
                    .filter(|&j| (offset as usize + j * SECTOR) / PAGE == page)
                    .all(|j| landed[j] == landed[i])
            });
            if desc.contains("TORN at 512") {
                torn_sector_level += 1;
            } else {
                assert!(desc.contains("TORN at 4096"), "{desc}");
                assert!(page_consistent, "a 4 KiB tear split a page: {desc}");
                torn_page_level += 1;
            }
        }
    }
    assert!(partial > 100, "torn writes were rarely partial: {partial}");
    assert!(torn_sector_level > 20 && torn_page_level > 20);
}

#[test]
fn punches_are_volatile_until_flushed_and_read_as_zeros() {
    let sim = SimStorage::new();
    sim.write_at(0, &[9; 3 * PAGE]).unwrap();
    sim.flush().unwrap();
    sim.punch_hole(PAGE as u64, PAGE as u64).unwrap();
    let mut buf = vec![1u8; PAGE];
    sim.read_at(PAGE as u64, &mut buf).unwrap();
    assert_eq!(buf, vec![0; PAGE]);
    assert_eq!(sim.allocated_bytes().unwrap(), Some(2 * PAGE as u64));
    let mut rng = SmallRng::seed_from_u64(4);
    let (lost, _) = sim.crash(CrashMode::KeepNone, &mut rng);
    lost.read_at(PAGE as u64, &mut buf).unwrap();
    assert_eq!(buf, vec![9; PAGE], "an unflushed punch became durable");
    sim.flush().unwrap();
    let (kept, _) = sim.crash(CrashMode::KeepNone, &mut rng);
    kept.read_at(PAGE as u64, &mut buf).unwrap();
    assert_eq!(buf, vec![0; PAGE], "a flushed punch was lost");
}

#[test]
fn set_len_and_reads_past_the_end() {
    let sim = SimStorage::new();
    sim.write_at(100, &[5; 10]).unwrap();
    assert_eq!(sim.len().unwrap(), 110);
    let mut buf = [0u8; 16];
    assert!(sim.read_at(100, &mut buf).is_err(), "read past the end");
    sim.set_len(104).unwrap();
    sim.set_len(8192).unwrap();
    sim.read_at(100, &mut buf).unwrap();
    assert_eq!(&buf[..4], &[5; 4]);
    assert_eq!(&buf[4..], &[0; 12], "truncated bytes came back");
    assert!(sim.set_len(u64::MAX).is_err());
    assert!(sim.write_at(u64::MAX - 4, &[1; 8]).is_err());
    // Unflushed length changes are volatile too.
    let mut rng = SmallRng::seed_from_u64(5);
    let (crashed, _) = sim.crash(CrashMode::KeepNone, &mut rng);
    assert_eq!(crashed.len().unwrap(), 0);
}

#[test]
fn snapshots_are_independent_of_later_writes() {
    let sim = SimStorage::new();
    sim.write_at(0, &[1; PAGE]).unwrap();
    sim.flush().unwrap();
    let snap = sim.snapshot(&AtomicU64::new(0));
    sim.write_at(0, &[2; PAGE]).unwrap();
    sim.flush().unwrap();
    let mut rng = SmallRng::seed_from_u64(6);
    let (pages, _) = snap.materialize(CrashMode::KeepAll, &mut rng);
    assert_eq!(read(&pages, 0, PAGE), vec![1; PAGE]);
    assert_eq!(read(&sim.durable(), 0, PAGE), vec![2; PAGE]);
}

#[test]
fn capture_samples_crash_points_from_concurrent_writers() {
    let sim = Arc::new(SimStorage::new());
    let clock = Arc::new(AtomicU64::new(1));
    sim.start_capture(clock.clone(), 50, 7);
    std::thread::scope(|scope| {
        for t in 0..4u8 {
            let sim = sim.clone();
            let clock = clock.clone();
            scope.spawn(move || {
                for i in 0..250u64 {
                    let off = (u64::from(t) * 250 + i) * SECTOR as u64;
                    sim.write_at(off, &[t + 1; SECTOR]).unwrap();
                    if i % 50 == 49 {
                        sim.flush().unwrap();
                    }
                    clock.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let snaps = sim.take_captured();
    assert_eq!(snaps.len(), 50);
    assert!(snaps
        .windows(2)
        .all(|w| w[0].storage_ops < w[1].storage_ops));
    // Spread over the run, not only its beginning (reservoir sampling).
    assert!(
        snaps.last().unwrap().storage_ops > 600,
        "{:?}",
        snaps.last()
    );
    // Every write made durable by a flush is in every later crash.
    let mut rng = SmallRng::seed_from_u64(8);
    for snap in &snaps {
        let (pages, _) = snap.materialize(CrashMode::KeepNone, &mut rng);
        let durable = snap.durable.to_bytes();
        assert_eq!(pages.to_bytes(), durable);
    }
    // All 1000 writes were issued; the live content has all of them.
    let all = sim.current().to_bytes();
    for t in 0..4u8 {
        for i in 0..250usize {
            let off = (usize::from(t) * 250 + i) * SECTOR;
            assert_eq!(all[off], t + 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The oracle's bookkeeping.

fn data(byte: u8) -> Arc<[u8]> {
    Arc::from(vec![byte; 8192])
}

/// Model of one 8 KiB cluster with this history (stamps from a shared clock):
/// op0 write A [1,2]; op1 flush [3,4]; op2 write B [5,6]; op3 write C [7,8].
fn linear_model() -> Model {
    let mut m = Model::new(8192, vec![data(0)]);
    let a = m.record_op(0, 1, 2, "write A".into());
    m.record_version(0, a, data(0xA));
    m.record_op(0, 3, 4, "flush".into());
    m.record_flush(3, 4);
    let b = m.record_op(0, 5, 6, "write B".into());
    m.record_version(0, b, data(0xB));
    let c = m.record_op(0, 7, 8, "write C".into());
    m.record_version(0, c, data(0xC));
    m
}

fn matches(m: &Model, t: u64, byte: u8) -> bool {
    matches!(m.judge(0, t, &[byte; 8192]), Verdict::Matches(_))
}

#[test]
fn oracle_allows_flushed_or_later_versions_only() {
    let m = linear_model();
    // Before the flush completed: the initial content or A.
    assert!(matches(&m, 2, 0) && matches(&m, 2, 0xA) && !matches(&m, 2, 0xB));
    assert!(matches(&m, 4, 0), "flush not yet completed at clock 4");
    // After the flush: A is required, B/C only once their requests started.
    assert!(!matches(&m, 5, 0), "lost a flushed write");
    assert!(matches(&m, 5, 0xA) && !matches(&m, 5, 0xB));
    assert!(matches(&m, 6, 0xB) && !matches(&m, 6, 0xC));
    assert!(matches(&m, 9, 0xA) && matches(&m, 9, 0xB) && matches(&m, 9, 0xC));
    assert!(!matches(&m, 9, 0xD), "garbage accepted");
}

#[test]
fn oracle_rejects_a_mix_of_versions_and_names_the_blocks() {
    let m = linear_model();
    let mut mix = vec![0xA; 8192];
    mix[4096..].fill(0xB);
    match m.judge(0, 9, &mix) {
        Verdict::Matches(i) => panic!("a mixed cluster matched version {i}"),
        Verdict::Violation(text) => {
            assert!(text.contains("block 0: op#0"), "{text}");
            assert!(text.contains("block 1: op#2"), "{text}");
        }
    }
}

#[test]
fn oracle_lets_either_of_two_overlapping_writes_win() {
    // Two threads write the same cluster at overlapping times, then a flush: either may be last.
    let mut m = Model::new(8192, vec![data(0)]);
    let a = m.record_op(0, 1, 4, "write A".into());
    m.record_version(0, a, data(0xA));
    let b = m.record_op(1, 2, 3, "write B".into());
    m.record_version(0, b, data(0xB));
    m.record_op(0, 5, 6, "flush".into());
    m.record_flush(5, 6);
    assert!(matches(&m, 7, 0xA) && matches(&m, 7, 0xB) && !matches(&m, 7, 0));
    // A write that started after both ended supersedes them once a flush covers it.
    let c = m.record_op(1, 7, 8, "write C".into());
    m.record_version(0, c, data(0xC));
    m.record_op(0, 9, 10, "flush".into());
    m.record_flush(9, 10);
    assert!(matches(&m, 11, 0xC) && !matches(&m, 11, 0xA) && !matches(&m, 11, 0xB));
}

#[test]
fn write_patterns_compress_as_intended_and_differ_per_request() {
    use workload::{fill, Pattern};
    let len = 64 * 1024;
    let ratio = |p| {
        let d = fill(p, 42, 0, len);
        lz4_flex::block::compress(&d).len() as f64 / len as f64
    };
    assert!(ratio(Pattern::Compressible) < 0.25);
    let mixed = ratio(Pattern::Mixed);
    assert!(mixed > 0.25 && mixed < 0.5, "{mixed}");
    assert!(ratio(Pattern::Incompressible) > 0.99);
    assert_ne!(
        fill(Pattern::Compressible, 1, 0, 4096),
        fill(Pattern::Compressible, 2, 0, 4096)
    );
    assert_ne!(
        fill(Pattern::Mixed, 1, 0, 4096),
        fill(Pattern::Mixed, 1, 4096, 4096)
    );
}

#[test]
fn generator_covers_every_kind_size_and_alignment_within_its_range() {
    use workload::{Generator, Op};
    let cs = 16 * 1024u64;
    let (lo, hi) = (8, 24);
    let mut gen = Generator::new(11, cs, lo, hi, Profile::Mixed);
    let (mut flushes, mut reads, mut discards, mut zeroes, mut writes) = (0, 0, 0, 0, 0);
    let (mut sub_cluster, mut whole, mut multi, mut unaligned, mut hot_hits) = (0, 0, 0, 0, 0);
    let mut per_cluster = vec![0u32; hi as usize];
    for _ in 0..5000 {
        let op = gen.next();
        let (offset, len) = match op {
            Op::Flush | Op::QuiesceResume => {
                flushes += 1;
                continue;
            }
            Op::Read { offset, len } => {
                reads += 1;
                (offset, len)
            }
            Op::Discard { offset, len } => {
                discards += 1;
                (offset, len)
            }
            Op::WriteZeroes { offset, len, .. } => {
                zeroes += 1;
                (offset, len)
            }
            Op::Write { offset, len, .. } => {
                writes += 1;
                (offset, len)
            }
        };
        assert!(len > 0 && offset % 512 == 0 && len % 512 == 0, "{op:?}");
        assert!(
            offset >= lo * cs && offset + len <= hi * cs,
            "{op:?} outside its clusters"
        );
        per_cluster[(offset / cs) as usize] += 1;
        if len < cs {
            sub_cluster += 1;
        }
        if offset % cs == 0 && len % cs == 0 {
            whole += 1;
        }
        if (offset + len - 1) / cs > offset / cs {
            multi += 1;
        }
        if offset % 4096 != 0 {
            unaligned += 1;
        }
    }
    for (c, &n) in per_cluster.iter().enumerate() {
        if n > 600 {
            hot_hits += 1;
        }
        assert!(c >= lo as usize || n == 0);
    }
    for (what, n) in [
        ("flush", flushes),
        ("read", reads),
        ("discard", discards),
        ("write_zeroes", zeroes),
        ("write", writes),
        ("sub-cluster", sub_cluster),
        ("whole-cluster", whole),
        ("multi-cluster", multi),
        ("not 4K-aligned", unaligned),
    ] {
        assert!(n > 150, "too few {what} requests: {n}");
    }
    assert!(hot_hits >= 2, "no hot clusters: {per_cluster:?}");
}

// ---------------------------------------------------------------------------------------------
// The real engine under crashes.

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// Seeds for a test: the replay seed alone, or `count × INSITU_CRASH_ITERS` seeds.
fn seeds(test_salt: u64, count: u64) -> Vec<u64> {
    if let Some(seed) = env_u64("INSITU_CRASH_SEED") {
        return vec![seed];
    }
    let iters = env_u64("INSITU_CRASH_ITERS").unwrap_or(1).max(1);
    let base = env_u64("INSITU_CRASH_BASE").unwrap_or(0x1A51_7000);
    (0..count * iters)
        .map(|i| base + test_salt * 1_000_000 + i)
        .collect()
}

/// Runs every seed; panics with the first violation's full report. Returns the summed outcome,
/// after checking that the run exercised what it is meant to (so a run that silently stopped
/// crashing anything interesting fails).
fn run_seeds(name: &str, seeds: &[u64], make: impl Fn(u64) -> Spec) -> workload::Outcome {
    let started = Instant::now();
    let mut total = workload::Outcome::default();
    for &seed in seeds {
        let spec = make(seed);
        let outcome = workload::run(&spec);
        if let Some(first) = outcome.violations.first() {
            panic!(
                "{name}: seed {seed} failed after {} crash points ({} violations):\n{first}",
                outcome.crash_points,
                outcome.violations.len()
            );
        }
        total.absorb(outcome);
    }
    total.elapsed = started.elapsed();
    eprintln!("{name}: {} seeds: {total}", seeds.len());
    total
}

/// A default run (not a replay) must reach its crash-point budget and cover both outcomes of an
/// unflushed write (survived / lost), torn writes, and commits during the workload.
fn expect_coverage(name: &str, got: &workload::Outcome, seeds: usize, per_seed: u64) {
    if env_u64("INSITU_CRASH_SEED").is_some() {
        return;
    }
    assert!(
        got.crash_points >= seeds as u64 * per_seed,
        "{name}: only {} crash points for {seeds} seeds",
        got.crash_points
    );
    assert!(
        got.points_with_pending * 4 > got.crash_points,
        "{name}: {got}"
    );
    assert!(got.torn > 0, "{name}: no torn writes: {got}");
    assert!(got.clusters_unflushed_survived > 0, "{name}: {got}");
    assert!(got.clusters_unflushed_lost > 0, "{name}: {got}");
    assert!(got.double_crashes > 0 && got.repaired > 0, "{name}: {got}");
    assert!(got.commits > seeds as u64, "{name}: {got}");
}

#[test]
fn crash_mixed_workload_single_writer() {
    let name = "crash_mixed_workload_single_writer";
    let seeds = seeds(1, 14);
    let total = run_seeds(name, &seeds, |seed| Spec::random(seed, Profile::Mixed, 1));
    expect_coverage(name, &total, seeds.len(), 80);
}

#[test]
fn crash_mixed_workload_concurrent_writers() {
    let name = "crash_mixed_workload_concurrent_writers";
    let seeds = seeds(2, 8);
    let total = run_seeds(name, &seeds, |seed| {
        let mut spec = Spec::random(seed, Profile::Mixed, 3);
        spec.clusters = 60;
        spec
    });
    expect_coverage(name, &total, seeds.len(), 80);
}

#[test]
fn crash_small_sequential_writes_through_the_write_back_buffer() {
    let name = "crash_small_sequential_writes_through_the_write_back_buffer";
    let seeds = seeds(11, 10);
    let total = run_seeds(name, &seeds, |seed| {
        let threads = if seed % 4 == 3 { 2 } else { 1 };
        let mut spec = Spec::random(seed, Profile::SmallSequential, threads);
        spec.ops_per_thread = 120;
        // Mostly the default buffer; every fourth seed a buffer of two clusters (full).
        spec.write_buffer_bytes = if seed % 4 == 1 {
            2 * u64::from(spec.cluster_size)
        } else {
            insitu_blk::image::DEFAULT_WRITE_BUFFER_BYTES
        };
        spec
    });
    expect_coverage(name, &total, seeds.len(), 80);
}

/// lz4 ping-pong with deferred punching: the half of a home slot that a commit frees stays
/// allocated (stale) for the cluster's next version to overwrite, and the engine punches what no
/// version covered after a grace period, here 0-3 ms so that punches happen during the workload.
/// Crash points fall between the commit that frees a half, the next version's write over it
/// (often torn), and the deferred punch of the rest.
#[test]
fn crash_while_freed_halves_of_ping_pong_slots_wait_for_reuse() {
    let name = "crash_while_freed_halves_of_ping_pong_slots_wait_for_reuse";
    let seeds = seeds(12, 8);
    let total = run_seeds(name, &seeds, |seed| {
        let threads = if seed % 3 == 2 { 2 } else { 1 };
        let mut spec = Spec::random(seed, Profile::PingPong, threads);
        spec.compression = if seed % 4 == 3 {
            Compression::Zstd { level: 1 }
        } else {
            Compression::Lz4
        };
        spec.clusters = 4 * threads as u64;
        spec.ops_per_thread = 120;
        spec.stale_grace = Some(std::time::Duration::from_millis(seed % 4));
        spec
    });
    expect_coverage(name, &total, seeds.len(), 80);
    if env_u64("INSITU_CRASH_SEED").is_none() {
        assert!(total.punches > 0, "{name}: no deferred punch ran: {total}");
    }
}

#[test]
fn crash_concurrent_writers_on_the_same_clusters() {
    let name = "crash_concurrent_writers_on_the_same_clusters";
    let seeds = seeds(3, 6);
    let total = run_seeds(name, &seeds, |seed| {
        Spec::random(seed, Profile::SharedClusters, 3)
    });
    expect_coverage(name, &total, seeds.len(), 80);
}

#[test]
fn crash_under_free_slot_pressure_with_small_clusters() {
    let name = "crash_under_free_slot_pressure_with_small_clusters";
    let seeds = seeds(4, 6);
    let total = run_seeds(name, &seeds, |seed| {
        // Odd seeds: 3 writers, so free slots run out while the pressure commit is running and
        // writers must wait for space.
        let threads = if seed % 2 == 1 { 3 } else { 1 };
        let mut spec = Spec::random(seed, Profile::Pressure, threads);
        // More clusters than spare slots (64), so unflushed out-of-place versions exhaust them.
        spec.cluster_size = 16 * 1024;
        spec.clusters = 96;
        spec.ops_per_thread = 200;
        spec.commit_interval = std::time::Duration::from_secs(5);
        spec
    });
    expect_coverage(name, &total, seeds.len(), 80);
}

#[test]
fn crash_every_codec_and_cluster_size() {
    let name = "crash_every_codec_and_cluster_size";
    let codecs = [
        Compression::Lz4,
        Compression::Snappy,
        Compression::Zstd { level: 3 },
        Compression::None,
    ];
    let sizes = [16 * 1024, 64 * 1024, 128 * 1024];
    let seeds = seeds(5, (codecs.len() * sizes.len()) as u64);
    let total = run_seeds(name, &seeds, |seed| {
        let mut spec = Spec::random(seed, Profile::Mixed, 1);
        let i = seed as usize;
        spec.compression = codecs[i % codecs.len()];
        spec.cluster_size = sizes[(i / codecs.len()) % sizes.len()];
        spec.clusters = 32;
        spec
    });
    expect_coverage(name, &total, seeds.len(), 80);
}

/// Uncompressed images with the 4 and 8 KiB clusters only they may have: one storage unit per
/// slot (no room beside a version in its home slot, every rewrite moves), sub-cluster writes of
/// 512 B, free-slot pressure and journal wraps.
#[test]
fn crash_uncompressed_images_with_4k_and_8k_clusters() {
    let name = "crash_uncompressed_images_with_4k_and_8k_clusters";
    let sizes = [4 * 1024, 8 * 1024];
    let profiles = [Profile::Mixed, Profile::Pressure, Profile::Journal];
    let seeds = seeds(14, (sizes.len() * profiles.len()) as u64);
    let total = run_seeds(name, &seeds, |seed| {
        let i = seed as usize;
        let profile = profiles[(i / sizes.len()) % profiles.len()];
        let mut spec = Spec::random(seed, profile, 1 + i % 3);
        spec.compression = Compression::None;
        spec.cluster_size = sizes[i % sizes.len()];
        spec.clusters = if i.is_multiple_of(2) { 32 } else { 200 };
        spec
    });
    expect_coverage(name, &total, seeds.len(), 80);
}

#[test]
fn crash_while_the_journal_wraps_and_checkpoints_are_written() {
    let name = "crash_while_the_journal_wraps_and_checkpoints_are_written";
    let seeds = seeds(6, 4);
    let total = run_seeds(name, &seeds, |seed| {
        // Every fourth seed (with checkpoints ahead) has two writers: a write may then complete
        // between a step and the commit that finishes the checkpoint.
        let threads = if seed % 4 == 1 { 2 } else { 1 };
        let mut spec = Spec::random(seed, Profile::Journal, threads);
        spec.cluster_size = 16 * 1024;
        spec.clusters = 32;
        spec.ops_per_thread = 1100;
        spec.crash_points = 300;
        spec.crashes_per_point = 1;
        spec.rounds = 1;
        // Every other seed writes its checkpoints ahead of need, between commits, over a table
        // of one chunk or (every fourth seed) of three, written again as commits change them.
        spec.checkpoint_ahead = seed % 2 == 1;
        if seed % 4 == 3 {
            spec.clusters = 700;
        }
        spec
    });
    expect_coverage(name, &total, seeds.len(), 300);
    if env_u64("INSITU_CRASH_SEED").is_none() {
        assert!(total.checkpoints >= seeds.len() as u64, "{name}: {total}");
        assert!(total.checkpoints_ahead > 0, "{name}: {total}");
        assert!(total.points_in_checkpoint > 0, "{name}: {total}");
    }
}

#[test]
fn crash_on_a_block_device_whose_discards_do_not_read_as_zeros() {
    use crashsim::sim::DiscardContent;
    let name = "crash_on_a_block_device_whose_discards_do_not_read_as_zeros";
    let seeds = seeds(8, 5);
    let total = run_seeds(name, &seeds, |seed| {
        let threads = 1 + (seed % 2) as usize * 2;
        let mut spec = Spec::random(seed, Profile::Mixed, threads);
        spec.clusters = 60;
        spec.block_device = Some(if seed % 4 < 2 {
            DiscardContent::Garbage
        } else {
            DiscardContent::OldData
        });
        spec
    });
    expect_coverage(name, &total, seeds.len(), 80);
}

#[test]
fn crash_after_injected_io_errors() {
    let name = "crash_after_injected_io_errors";
    let seeds = seeds(7, 6);
    let total = run_seeds(name, &seeds, |seed| {
        let mut spec = Spec::random(seed, Profile::Mixed, 1);
        spec.inject_fault = true;
        spec.ops_per_thread = 80;
        spec
    });
    expect_coverage(name, &total, seeds.len(), 40);
    if env_u64("INSITU_CRASH_SEED").is_none() {
        assert!(
            total.faults_injected >= seeds.len() as u64,
            "{name}: {total}"
        );
        assert!(total.requests_failed_by_fault > 0, "{name}: {total}");
    }
}

/// The oracle also bites on a broken device: a storage whose flush makes nothing durable must
/// be caught losing flushed writes.
#[test]
fn oracle_catches_a_storage_that_ignores_flush() {
    let mut checked = 0;
    for attempt in 0..20u64 {
        let seed = 0xF1_0000 + attempt;
        let mut spec = Spec::random(seed, Profile::Mixed, 1);
        spec.lying_flush = true;
        spec.rounds = 1;
        let outcome = workload::run(&spec);
        checked += outcome.crash_points;
        if let Some(first) = outcome.violations.first() {
            eprintln!(
                "oracle caught the lying flush after {checked} crash points (seed {seed}):\n{}",
                first.lines().take(8).collect::<Vec<_>>().join("\n")
            );
            return;
        }
    }
    panic!("no violation in {checked} crash points although flush made nothing durable");
}

/// Design §3, the two traps of group commit, provoked deterministically: a commit is held inside
/// its data flush (after it snapshotted the table) while the same cluster is rewritten, then crash
/// points are taken both while the commit is in flight and after it completed. A later write that
/// overwrote the version being committed (or the committed one it replaces) shows up as a torn or
/// corrupt cluster; a FLUSH that returned without covering the writes before it as a lost write.
#[test]
fn writes_during_an_in_flight_commit_never_touch_what_it_commits() {
    use crashsim::sim::CrashSnapshot;
    use insitu_blk::image::{CreateOptions, Image};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use workload::{fill, Pattern};

    let cs = 16 * 1024usize;
    let clusters = 8usize;
    let mut rng = SmallRng::seed_from_u64(0x7A95);
    let mut checked = 0;
    let mut overlapped = 0;
    for compression in [
        Compression::Lz4,
        Compression::None,
        Compression::Zstd { level: 1 },
    ] {
        for during in 1..=3u64 {
            let mut spec = Spec::random(0x7A95 + during, Profile::Mixed, 1);
            spec.cluster_size = cs as u32;
            spec.clusters = clusters as u64;
            spec.compression = compression;
            spec.commit_interval = Duration::from_secs(3600);
            let sim = Arc::new(SimStorage::new());
            let mut create = CreateOptions::new((cs * clusters) as u64);
            create.cluster_size = cs as u32;
            create.compression = compression;
            Image::create_on(sim.clone(), &create).expect("create");
            let image =
                Image::open_on(sim.clone(), &workload::spec_open_options(&spec)).expect("open");
            let clock = AtomicU64::new(1);
            let tick = || clock.fetch_add(1, Ordering::SeqCst);
            let model = std::sync::Mutex::new(Model::zeroed(cs, clusters));
            let c = 2u64;
            let write = |tag: u64| {
                // Compressible: fits half a slot, so in-place ping-pong is possible.
                let data = fill(Pattern::Compressible, tag, c * cs as u64, cs);
                let start = tick();
                image.write(c * cs as u64, &data).expect("write");
                let end = tick();
                let mut m = model.lock().unwrap();
                let op = m.record_op(0, start, end, format!("write cluster {c} tag {tag}"));
                m.record_version(c as usize, op, Arc::from(data));
            };
            let flush = || {
                let start = tick();
                image.flush().expect("flush");
                let end = tick();
                let mut m = model.lock().unwrap();
                m.record_op(0, start, end, "flush".into());
                m.record_flush(start, end);
            };
            write(1);
            flush();
            write(2);
            let gate = sim.arm_flush_gate();
            let mut snaps: Vec<CrashSnapshot> = Vec::new();
            std::thread::scope(|scope| {
                let flusher = scope.spawn(flush);
                assert!(
                    gate.wait_entered(Duration::from_secs(10)),
                    "the commit never reached its data flush"
                );
                // The commit has snapshotted version 2 and is held in its data flush.
                let writer = scope.spawn(|| {
                    for tag in 0..during {
                        write(10 + tag);
                    }
                });
                // Writes may legitimately wait for the commit; give them up to 2 s (a loaded
                // machine), then take a crash point with the commit still in flight.
                let waited = Instant::now();
                while !writer.is_finished() && waited.elapsed() < Duration::from_secs(2) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                snaps.push(sim.snapshot(&clock));
                // Trap 2: a FLUSH that arrives while an older commit runs must wait for a commit
                // that snapshots after it arrived (the crash point after it returns checks that
                // the writes above are durable).
                let writer_done = writer.is_finished();
                let flusher2 = writer_done.then(|| scope.spawn(flush));
                std::thread::sleep(Duration::from_millis(20));
                gate.release();
                writer.join().expect("writer");
                flusher.join().expect("flusher");
                if let Some(f) = flusher2 {
                    f.join().expect("second flusher");
                }
            });
            snaps.push(sim.snapshot(&clock));
            flush();
            snaps.push(sim.snapshot(&clock));
            let model = model.into_inner().unwrap();
            // Did the writes run while the commit was held (or wait for it)? Either is correct;
            // the first is the trap this test is about, so count it.
            let in_flight_writes = model.clusters[c as usize]
                .iter()
                .filter(|v| v.op != usize::MAX && v.end < snaps[0].clock && v.start > 7)
                .count();
            overlapped += in_flight_writes;
            for snap in &snaps {
                for draw in 0..12 {
                    let mode = match draw {
                        0 => CrashMode::KeepNone,
                        1 => CrashMode::KeepAll,
                        _ => CrashMode::random(&mut rng),
                    };
                    let (pages, desc) = snap.materialize(mode, &mut rng);
                    checked += 1;
                    if let Err(problem) = workload::verify_crash(&spec, pages, &model, snap.clock) {
                        panic!(
                            "{compression} with {during} write(s) during the commit: {desc}\n\
                             {problem}\nhistory:\n{}",
                            model.history_text(50)
                        );
                    }
                }
            }
            image.abandon();
        }
    }
    eprintln!(
        "in-flight commit: {checked} crash points checked; {overlapped} writes completed while a \
         commit was held"
    );
    assert!(overlapped > 0, "no write ever ran during a held commit");
}

/// A checkpoint holds each cluster's *committed* entry, never a newer one that a write published
/// while the commit writing the checkpoint ran (docs/FORMAT.md, "Checkpoints written ahead of
/// need"; docs/ARCHITECTURE.md, known limits). Made to happen deterministically: every commit is
/// held in its data flush (after its snapshot) while cluster B is rewritten, cycle after cycle,
/// until the held commit is the one that writes a checkpoint: the one that finishes a checkpoint
/// written ahead (it seals the chunks still to write after its snapshot), or, without
/// checkpoints ahead, the one that writes it in one go. B's version written meanwhile is not
/// committed by it; B is then rewritten three times without a FLUSH, so a later version reuses
/// the units that uncommitted version freed. A checkpoint naming it would recover B from units
/// holding another version's bytes (I3; `check` finds a corrupt payload). Crash points: every
/// storage operation of the cycle whose commit wrote the checkpoint, right after it, after the
/// rewrites, and after a final FLUSH; several crashes each (all, none, random pending writes).
#[test]
fn a_checkpoint_holds_the_committed_entries_not_a_write_racing_its_commit() {
    use insitu_blk::image::{CreateOptions, Image};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use workload::{fill, Pattern};

    let cs = 16 * 1024usize;
    // One checkpoint chunk (255 clusters); a 1 MiB journal: ~250 one-block commits to fill it.
    let clusters = 32usize;
    let (a, b) = (3u64, 17u64);
    let mut rng = SmallRng::seed_from_u64(0xC4EC);
    let mut checked = 0;
    for ahead in [true, false] {
        let started = Instant::now();
        let mut spec = Spec::random(0xC4EC, Profile::Journal, 1);
        spec.cluster_size = cs as u32;
        spec.clusters = clusters as u64;
        spec.compression = Compression::Lz4;
        // Only the FLUSHes below commit.
        spec.commit_interval = Duration::from_secs(3600);
        spec.write_buffer_bytes = 0;
        spec.stale_grace = None;
        // `test_checkpoint_ahead_min_chunks` = 0: written ahead from half a journal on, a step
        // after every commit, finished by the commit that finds the journal full. Otherwise
        // (this table is far below the default threshold) that commit writes it in one go.
        spec.checkpoint_ahead = ahead;
        let sim = Arc::new(SimStorage::new());
        let mut create = CreateOptions::new((cs * clusters) as u64);
        create.cluster_size = cs as u32;
        create.compression = spec.compression;
        Image::create_on(sim.clone(), &create).expect("create");
        let image = Image::open_on(sim.clone(), &workload::spec_open_options(&spec)).expect("open");
        let clock = Arc::new(AtomicU64::new(1));
        let tick = || clock.fetch_add(1, Ordering::SeqCst);
        let model = std::sync::Mutex::new(Model::zeroed(cs, clusters));
        let write = |c: u64, tag: u64| {
            // Compressible: one storage unit, so versions sit side by side in the home slot
            // and a new one overwrites the units an uncommitted one freed.
            let data = fill(Pattern::Compressible, tag, c * cs as u64, cs);
            let start = tick();
            image.write(c * cs as u64, &data).expect("write");
            let end = tick();
            let mut m = model.lock().unwrap();
            let op = m.record_op(0, start, end, format!("write cluster {c} tag {tag}"));
            m.record_version(c as usize, op, Arc::from(data));
        };
        let flush = || {
            let start = tick();
            image.flush().expect("flush");
            let end = tick();
            let mut m = model.lock().unwrap();
            m.record_op(0, start, end, "flush".into());
            m.record_flush(start, end);
        };
        // Every cluster stored (a checkpoint of zero entries would prove little).
        for c in 0..clusters as u64 {
            write(c, 1 + c);
        }
        flush();
        let before = image.stats();
        let mut snaps = Vec::new();
        let mut tag = 1000;
        let mut cycles = 0;
        let b_region = loop {
            cycles += 1;
            assert!(
                cycles <= 600,
                "ahead {ahead}: no checkpoint after {cycles} commits: {:?}",
                image.stats()
            );
            tag += 2;
            write(a, tag);
            sim.start_capture(clock.clone(), 64, tag);
            let gate = sim.arm_flush_gate();
            let (b_in_window, b_region) = std::thread::scope(|scope| {
                let flusher = scope.spawn(flush);
                assert!(
                    gate.wait_entered(Duration::from_secs(10)),
                    "the commit never reached its data flush"
                );
                // The commit has snapshotted A (and B's version of the previous cycle) and is
                // held in its data flush: B's next version is published after its snapshot.
                let writer = scope.spawn(|| write(b, tag + 1));
                let waited = Instant::now();
                while !writer.is_finished() && waited.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let done = writer.is_finished();
                // Where that version's payload went: the storage's last write (the metadata
                // writer is held), to see below that a later version overwrites it.
                let region = match sim.snapshot(&clock).pending.last() {
                    Some(PendingOp::Write { offset, data }) if done => {
                        Some(*offset..*offset + data.len() as u64)
                    }
                    _ => None,
                };
                gate.release();
                writer.join().expect("writer");
                flusher.join().expect("flusher");
                (done, region)
            });
            let cycle_snaps = sim.take_captured();
            let stats = image.stats();
            if stats.checkpoints > before.checkpoints {
                // The scenario's premise: the held commit wrote the checkpoint (ahead: finished
                // the one written ahead), with B's version published after its snapshot.
                assert_eq!(stats.checkpoints, before.checkpoints + 1, "{stats:?}");
                let written_ahead = stats.checkpoints_ahead - before.checkpoints_ahead;
                assert_eq!(written_ahead, u64::from(ahead), "ahead {ahead}: {stats:?}");
                assert!(
                    b_in_window,
                    "the write of cluster {b} did not complete while the commit was held"
                );
                snaps.extend(cycle_snaps);
                break b_region;
            }
        };
        snaps.push(sim.snapshot(&clock));
        // B's version from the held commit is current but not committed: rewritten, never
        // flushed. The first rewrite frees it (no commit names it); a later one is placed over
        // its units (the most stale ones beside B's committed version in its home slot).
        for k in 2..5 {
            write(b, tag + k);
        }
        let rewritten = sim.snapshot(&clock);
        // Premise: without that reuse, a checkpoint naming the uncommitted version would still
        // read back intact (an allowed version), and this test would catch nothing.
        let region = b_region.expect("the payload write of cluster B during the held commit");
        assert!(
            rewritten.pending.iter().any(|op| matches!(op,
                PendingOp::Write { offset, data }
                    if *offset < region.end && region.start < *offset + data.len() as u64)),
            "no rewrite of cluster {b} overwrote its version from the held commit at {region:?}: \
             {rewritten:?}"
        );
        snaps.push(rewritten);
        flush();
        snaps.push(sim.snapshot(&clock));
        let model = model.into_inner().unwrap();
        for snap in &snaps {
            for draw in 0..5 {
                let mode = match draw {
                    0 => CrashMode::KeepAll,
                    1 => CrashMode::KeepNone,
                    _ => CrashMode::random(&mut rng),
                };
                let (pages, desc) = snap.materialize(mode, &mut rng);
                checked += 1;
                if let Err(problem) = workload::verify_crash(&spec, pages, &model, snap.clock) {
                    panic!(
                        "checkpoint {}, written after {cycles} held commits: {desc}\n{problem}\n\
                         history:\n{}",
                        if ahead {
                            "written ahead"
                        } else {
                            "written in one go"
                        },
                        model.history_text(12)
                    );
                }
            }
        }
        image.abandon();
        eprintln!(
            "checkpoint {} by the commit held #{cycles}: {} crash points, {:.1} s",
            if ahead { "written ahead" } else { "in one go" },
            snaps.len(),
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!("checkpoint with a racing write: {checked} crashes checked");
}

/// A crash at any point of `create_on` leaves storage that either is refused clearly (not an
/// image / corrupt) or opens as an all-zero disk; once `create_on` has returned, the image is
/// durable (a crash right after it must open).
#[test]
fn crash_during_create_leaves_no_image_or_an_empty_one() {
    use insitu_blk::image::{check_on, CreateOptions, Image, ImageError, OpenOptions};
    let mut rng = SmallRng::seed_from_u64(0xC4EA);
    let mut checked = 0;
    let (mut refused, mut opened) = (0, 0);
    for (cluster_size, clusters) in [(16 * 1024u32, 40u64), (64 * 1024, 300)] {
        let sim = Arc::new(SimStorage::new());
        let clock = Arc::new(AtomicU64::new(1));
        sim.start_capture(clock.clone(), 10_000, 1);
        let mut opts = CreateOptions::new(clusters * u64::from(cluster_size));
        opts.cluster_size = cluster_size;
        Image::create_on(sim.clone(), &opts).expect("create");
        let mut snaps = sim.take_captured();
        assert!(!snaps.is_empty(), "create wrote nothing");
        snaps.push(sim.snapshot(&clock));
        let last = snaps.len() - 1;
        for (i, snap) in snaps.iter().enumerate() {
            for draw in 0..6 {
                let mode = if draw == 0 {
                    CrashMode::KeepNone
                } else {
                    CrashMode::random(&mut rng)
                };
                let (pages, desc) = snap.materialize(mode, &mut rng);
                checked += 1;
                let storage: Arc<dyn Storage> = Arc::new(SimStorage::from_pages(pages));
                let _ = check_on(storage.clone(), false);
                match Image::open_on(storage, &OpenOptions::default()) {
                    Ok(image) => {
                        opened += 1;
                        let mut buf = vec![1u8; cluster_size as usize];
                        for c in 0..clusters {
                            image
                                .read(c * u64::from(cluster_size), &mut buf)
                                .unwrap_or_else(|e| panic!("read after crash in create: {e}"));
                            assert!(buf.iter().all(|&b| b == 0), "garbage after create: {desc}");
                        }
                        image.abandon();
                    }
                    Err(ImageError::NotAnImage(_) | ImageError::CorruptMetadata(_)) => {
                        assert!(
                            i != last,
                            "create_on returned, but a crash right after it loses the image: \
                             {desc}"
                        );
                        refused += 1;
                    }
                    Err(other) => panic!("crash during create: unexpected error {other:?}: {desc}"),
                }
            }
        }
    }
    eprintln!(
        "crash during create: {checked} crash points, {opened} opened empty, {refused} refused"
    );
}

/// Space written by requests that never got committed (a crash before their commit) is
/// reclaimed by the next read-write open: after recovery and a clean close, `check` finds no
/// leaked space (issue #5 item 7: `check` clean after a kill). Leaks are allowed right after a
/// crash, not forever.
#[test]
fn recovery_reclaims_space_left_by_uncommitted_writes() {
    use insitu_blk::image::{check_on, CreateOptions, Image, OpenOptions};
    use std::time::Duration;
    use workload::{fill, Pattern};
    let cs = 16 * 1024u64;
    let sim = Arc::new(SimStorage::new());
    let mut create = CreateOptions::new(32 * cs);
    create.cluster_size = cs as u32;
    Image::create_on(sim.clone(), &create).expect("create");
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    };
    let image = Image::open_on(sim.clone(), &opts).expect("open");
    // Committed data in clusters 0..4, then uncommitted overwrites and new clusters.
    for c in 0..4 {
        image
            .write(
                c * cs,
                &fill(Pattern::Incompressible, c, c * cs, cs as usize),
            )
            .expect("write");
    }
    image.flush().expect("flush");
    for c in 2..10 {
        image
            .write(
                c * cs,
                &fill(Pattern::Incompressible, 100 + c, c * cs, cs as usize),
            )
            .expect("write");
    }
    // Power failure after the data reached the disk, before any commit record.
    let mut rng = SmallRng::seed_from_u64(9);
    let (crashed, _) = sim.crash(CrashMode::KeepAll, &mut rng);
    image.abandon();
    let crashed: Arc<dyn Storage> = Arc::new(crashed);
    let before = check_on(crashed.clone(), false).expect("check");
    assert!(before.corruptions.is_empty(), "{:?}", before.corruptions);
    assert!(
        before.uncommitted_bytes > 0,
        "the crash left no uncommitted data behind: the test checks nothing"
    );
    let recovered = Image::open_on(crashed.clone(), &opts).expect("recovery");
    recovered.close().expect("close");
    let after = check_on(crashed, false).expect("check");
    assert!(after.corruptions.is_empty(), "{:?}", after.corruptions);
    assert_eq!(
        after.leaked_bytes, 0,
        "{} leaked bytes right after the crash are still leaked after recovery and a clean close",
        before.leaked_bytes
    );
}

/// A quiesce leaves freed space unpunched (its marker says so: `RECORD_SPACE_UNRECLAIMED`) and
/// the next opener hands that space to its writer's deferred reclaim (R29). Crash points: right
/// after the quiesce (nothing lost, no unclean shutdown reported), and all through the next
/// opener's background reclaim while it writes new versions into that space and flushes. Every
/// crash state must read each cluster as its last flushed version or the one being written
/// (a punch over reused space would read zeros), and after recovery and a clean close nothing
/// is leaked.
#[test]
fn crashes_after_a_quiesce_that_left_freed_space_and_during_its_reclaim_lose_nothing() {
    let mut states = 0;
    for seed in seeds(13, 2) {
        states += quiesce_then_reclaim_crashes(seed);
    }
    eprintln!(
        "{states} crash states during and after a quiesce and during the reclaim that followed"
    );
}

/// One run of the test above; returns the crash states checked.
fn quiesce_then_reclaim_crashes(seed: u64) -> usize {
    use insitu_blk::image::{check_on, CreateOptions, Image, OpenOptions};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use workload::{fill, Pattern};
    let cs = 64 * 1024u64;
    let clusters = 16u64;
    let sim = Arc::new(SimStorage::new());
    let mut create = CreateOptions::new(clusters * cs);
    create.compression = Compression::Lz4;
    Image::create_on(sim.clone(), &create).expect("create");
    let keep = OpenOptions {
        test_stale_grace: Some(Duration::from_secs(3600)),
        ..OpenOptions::default()
    };
    let source = Image::open_on(sim.clone(), &keep).expect("open");
    for c in 0..clusters {
        source
            .write(
                c * cs,
                &fill(Pattern::Part(7), seed + c, c * cs, cs as usize),
            )
            .expect("write");
    }
    source.flush().expect("flush");
    let first: Vec<Vec<u8>> = (0..clusters)
        .map(|c| fill(Pattern::Part(7), seed + c, c * cs, cs as usize))
        .collect();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut states = 0;
    let read_all = |img: &Image| -> Vec<Vec<u8>> {
        (0..clusters)
            .map(|c| {
                let mut buf = vec![0u8; cs as usize];
                img.read(c * cs, &mut buf).expect("read");
                buf
            })
            .collect()
    };
    // Smaller versions beside the first ones (stale units), and discarded clusters (stale
    // slots); those after cluster 6 are accepted but unflushed: the quiesce commits them.
    // Crash points all through, the quiesce's own commit and marker included.
    let clock = Arc::new(AtomicU64::new(1));
    sim.start_capture(clock.clone(), 40, seed ^ 0x5AC0);
    let mut quiesced: Vec<Vec<u8>> = Vec::new();
    for c in 0..clusters {
        let data = if c < 10 {
            fill(Pattern::Compressible, seed + 100 + c, c * cs, cs as usize)
        } else {
            vec![0u8; cs as usize]
        };
        if c < 10 {
            source.write(c * cs, &data).expect("write");
        } else {
            source.discard(c * cs, cs).expect("discard");
        }
        if c == 6 {
            source.flush().expect("flush");
            clock.store(2, Ordering::SeqCst);
        }
        quiesced.push(data);
    }
    let punches = sim.punches();
    source.quiesce().expect("quiesce");
    clock.store(3, Ordering::SeqCst);
    assert_eq!(sim.punches(), punches, "the quiesce punched freed space");
    for snap in sim.take_captured() {
        let (pages, desc) = snap.materialize(CrashMode::random(&mut rng), &mut rng);
        let storage: Arc<dyn Storage> = Arc::new(SimStorage::from_pages(pages));
        let report = check_on(storage.clone(), false).expect("check");
        assert!(
            report.corruptions.is_empty(),
            "{desc}: {:?}",
            report.corruptions
        );
        let img = Image::open_on(storage, &keep).expect("recovery");
        let got = read_all(&img);
        for c in 0..clusters as usize {
            // Flushed by then: only the new version; else the old or the new one.
            let flushed = (c <= 6 && snap.clock >= 2) || snap.clock >= 3;
            assert!(
                got[c] == quiesced[c] || (!flushed && got[c] == first[c]),
                "seed {seed}: cluster {c} after a crash around the quiesce ({snap:?}, {desc})"
            );
        }
        img.abandon();
        states += 1;
    }
    let before = check_on(sim.clone(), false).expect("check");
    assert!(before.corruptions.is_empty(), "{:?}", before.corruptions);
    assert_eq!(before.leaked_bytes, 0, "{before:?}");
    assert!(
        before.uncommitted_bytes >= 10 * 4096,
        "the quiesce left no freed space: the test checks nothing ({before:?})"
    );

    for _ in 0..6 {
        let (crashed, desc) = sim.crash(CrashMode::random(&mut rng), &mut rng);
        let img = Image::open_on(Arc::new(crashed), &keep).expect("recovery");
        assert!(
            !img.recovered_after_unclean_shutdown(),
            "a crash after the quiesce looks unclean: {desc}"
        );
        assert!(
            read_all(&img) == quiesced,
            "a crash after the quiesce lost data: {desc}"
        );
        img.abandon();
        states += 1;
    }

    // The destination: reclaim with a short grace period, racing with new versions that are
    // placed over the adopted space, each flushed; crash points all along.
    let (dest_storage, _) = sim.crash(CrashMode::KeepNone, &mut rng);
    let dest_storage = Arc::new(dest_storage);
    clock.store(1, Ordering::SeqCst);
    dest_storage.start_capture(clock.clone(), 120, seed ^ 0x5ACF);
    let reclaim = OpenOptions {
        test_stale_grace: Some(Duration::from_millis(seed % 4)),
        ..OpenOptions::default()
    };
    let dest = Image::open_on(dest_storage.clone(), &reclaim).expect("destination");
    // Per cluster, its versions with the clock value from which each is flushed: a crash may
    // read the newest version flushed by then or any later one.
    let mut history: Vec<Vec<(u64, Vec<u8>)>> =
        quiesced.iter().map(|v| vec![(0, v.clone())]).collect();
    let mut unflushed: Vec<(usize, Vec<u8>)> = Vec::new();
    for round in 0..3u64 {
        for c in 0..clusters {
            let pattern =
                [Pattern::Part(6), Pattern::Mixed, Pattern::Part(3)][(round + c) as usize % 3];
            let data = fill(pattern, seed + 1000 + round * 100 + c, c * cs, cs as usize);
            dest.write(c * cs, &data).expect("write");
            unflushed.push((c as usize, data));
            if c % 4 == 3 {
                dest.flush().expect("flush");
                let now = clock.fetch_add(1, Ordering::SeqCst) + 1;
                for (k, d) in unflushed.drain(..) {
                    history[k].push((now, d));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let snaps = dest_storage.take_captured();
    assert!(
        dest_storage.punches() > 0,
        "the destination reclaimed nothing"
    );
    for snap in &snaps {
        let (pages, desc) = snap.materialize(CrashMode::random(&mut rng), &mut rng);
        let storage: Arc<dyn Storage> = Arc::new(SimStorage::from_pages(pages));
        let report = check_on(storage.clone(), false).expect("check");
        assert!(
            report.corruptions.is_empty(),
            "{desc}: {:?}",
            report.corruptions
        );
        let img = Image::open_on(storage, &keep).expect("recovery");
        let got = read_all(&img);
        for c in 0..clusters as usize {
            // The newest version flushed by the snapshot's clock, and every later one.
            let first = history[c]
                .iter()
                .rposition(|(t, _)| *t <= snap.clock)
                .unwrap_or(0);
            assert!(
                history[c][first..].iter().any(|(_, v)| *v == got[c]),
                "seed {seed}: cluster {c} reads no version it may read after a crash during \
                 the destination's reclaim ({snap:?}, {desc})"
            );
        }
        img.abandon();
        states += 1;
    }
    let newest: Vec<Vec<u8>> = history.iter().map(|h| h[h.len() - 1].1.clone()).collect();
    assert!(read_all(&dest) == newest);
    dest.close().expect("close");
    let after = check_on(dest_storage, false).expect("check");
    assert!(after.corruptions.is_empty(), "{:?}", after.corruptions);
    assert_eq!(after.leaked_bytes, 0, "{after:?}");
    assert_eq!(after.uncommitted_bytes, 0, "{after:?}");
    assert!(states >= 80, "seed {seed}: only {states} crash states");
    states
}

/// The oracle bites: with the commit record written before the data is durable (the test-only
/// switch), the simulator must find a violation within a bounded number of crash points.
#[test]
fn oracle_catches_a_broken_commit_order() {
    let mut checked = 0;
    let mut rng = SmallRng::seed_from_u64(0xB17E);
    for attempt in 0..40u64 {
        let seed = 0xB0_0000 + attempt;
        let mut spec = Spec::random(seed, Profile::Mixed, 1);
        spec.break_commit_order = true;
        spec.compression = [Compression::Lz4, Compression::None][rng.gen_range(0..2)];
        spec.rounds = 1;
        spec.crash_points = 40;
        let outcome = workload::run(&spec);
        checked += outcome.crash_points;
        if let Some(first) = outcome.violations.first() {
            eprintln!(
                "oracle caught the broken commit order after {checked} crash points (seed \
                 {seed}):\n{}",
                first.lines().take(12).collect::<Vec<_>>().join("\n")
            );
            return;
        }
    }
    panic!(
        "the crash oracle found no violation in {checked} crash points although the engine \
         wrote commit records before the data was durable: the oracle is toothless"
    );
}

/// fsyncgate (Linux writeback-error semantics, modelled by the simulator: a failed flush loses
/// what it covered for good while reads still see it). After any failed step of a commit the
/// engine must never again report a FLUSH as successful in this process, not even after a
/// quiesce and resume (which must not reload metadata through the cache that lied); and a crash
/// afterwards recovers to an image that opens, checks clean and holds every write flushed before
/// the failure.
#[test]
fn a_failed_commit_is_never_followed_by_a_successful_flush() {
    use insitu_blk::image::{check_on, CreateOptions, Image, OpenOptions};
    use std::time::Duration;

    let cs = 16 * 1024usize;
    let pattern = |byte: u8| vec![byte; cs];
    let mut rng = SmallRng::seed_from_u64(0xF5_6A7E);
    // A commit is: data flush, journal write, journal flush. Fail each in turn.
    for failing_op in 1..=3u64 {
        let sim = Arc::new(SimStorage::new());
        let mut create = CreateOptions::new((cs * 8) as u64);
        create.cluster_size = cs as u32;
        create.compression = Compression::None;
        Image::create_on(sim.clone(), &create).expect("create");
        let opts = OpenOptions {
            commit_interval: Duration::from_secs(3600),
            ..OpenOptions::default()
        };
        let image = Image::open_on(sim.clone(), &opts).expect("open");
        image.write(0, &pattern(0xA1)).expect("write A");
        image.flush().expect("flush A");
        image.write(cs as u64, &pattern(0xB2)).expect("write B");
        sim.fail_after(failing_op);
        assert!(
            image.flush().is_err(),
            "op {failing_op}: the failed commit must fail the FLUSH"
        );
        assert_eq!(
            sim.injected_faults(),
            1,
            "op {failing_op}: the fault fired inside the commit"
        );
        // A VM pause and resume (GET_VRING_BASE, then the rings restart).
        let _ = image.quiesce();
        image.resume().expect("resume");
        let c_written = image.write(2 * cs as u64, &pattern(0xC3)).is_ok();
        assert!(
            image.flush().is_err(),
            "op {failing_op}: a FLUSH after a failed commit claimed durability (wrote C: {c_written})"
        );
        for mode in [CrashMode::KeepNone, CrashMode::KeepAll] {
            let (crashed, desc) = sim.crash(mode, &mut rng);
            let crashed = Arc::new(crashed);
            let report = check_on(crashed.clone(), false).expect("check");
            assert!(
                report.corruptions.is_empty(),
                "op {failing_op}, {desc}: {:?}",
                report.corruptions
            );
            let reopened = Image::open_on(crashed, &opts)
                .unwrap_or_else(|e| panic!("op {failing_op}, {desc}: refuses to open: {e}"));
            let mut buf = vec![0u8; cs];
            reopened.read(0, &mut buf).expect("read A");
            assert!(
                buf == pattern(0xA1),
                "op {failing_op}, {desc}: flushed A lost"
            );
            for (k, byte) in [(1usize, 0xB2u8), (2, 0xC3)] {
                reopened.read((k * cs) as u64, &mut buf).expect("read");
                assert!(
                    buf == pattern(byte) || buf == vec![0u8; cs],
                    "op {failing_op}, {desc}: cluster {k} is neither its write nor zeros"
                );
            }
            reopened.abandon();
        }
        image.abandon();
    }
}
