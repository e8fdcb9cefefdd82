//! A vhost-user-blk load generator on libblkio's Rust crate (`blkio`, driver
//! `virtio-blk-vhost-user`): an independent client, so it measures any vhost-user-blk server the
//! same way (insitu-blk, qemu-storage-daemon, ...).
//!
//! One client thread per virtqueue keeps `iodepth` requests in flight on its queue. Requests are
//! reads or writes of `block_size` bytes at random or sequential offsets, with an optional flush
//! after every N writes. Write payloads come from a file (real data) or are random bytes.
//! Reports IOPS, MB/s, average and p99 latency (exact, from every completion).
//!
//! Shared by the `loadgen` example (command line) and the `sidebyside` bench (in process).

#![allow(dead_code)] // each including target uses a different subset

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// Where write payloads come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// Random bytes (incompressible), generated once per request slot.
    Random,
    /// The bytes of a file at the same offset (modulo the file size): writing a disk with the
    /// image it was filled from keeps its content.
    FileSameOffset(PathBuf),
    /// The file's non-zero `block_size` chunks, cycled through in order: every write carries real,
    /// non-zero data (what a compressor sees when a guest writes files).
    FileNonZero(PathBuf),
    /// Pre-built payloads, `block_size` each, back to back, cycled through in order (lets a
    /// driver that runs many loads read its data file once; see [`nonzero_blocks`]).
    Blocks(Arc<Vec<u8>>),
}

/// The non-zero `block_size` chunks of `data`, back to back.
pub fn nonzero_blocks(data: &[u8], block_size: usize) -> Vec<u8> {
    let mut pool = Vec::new();
    for chunk in data.chunks_exact(block_size) {
        if chunk.iter().any(|&b| b != 0) {
            pool.extend_from_slice(chunk);
        }
    }
    pool
}

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random block-aligned offsets.
    Random,
    /// Each queue walks its own contiguous slice of the range, wrapping around.
    Sequential,
}

/// One load description.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// vhost-user socket of the server.
    pub socket: PathBuf,
    /// Number of virtqueues (one client thread each).
    pub queues: usize,
    /// Requests in flight per queue.
    pub iodepth: usize,
    /// Request size in bytes (a multiple of 512).
    pub block_size: usize,
    /// Random or sequential offsets.
    pub pattern: Pattern,
    /// Percentage of requests that are reads (0 = all writes, 100 = all reads).
    pub read_pct: u32,
    /// Issue a flush after every N writes on each queue (0 = never).
    pub flush_every: u64,
    /// Where write data comes from.
    pub data: DataSource,
    /// Stop after this long (when `ops` is 0) ...
    pub runtime: Duration,
    /// ... or after this many reads+writes in total (when non-zero).
    pub ops: u64,
    /// Completions during this first period are not counted.
    pub ramp: Duration,
    /// Byte range of the disk to use: start ...
    pub range_start: u64,
    /// ... and length (0 = to the end of the disk).
    pub range_len: u64,
    /// Flush once at the end (not counted), so the server's data is durable when we return.
    pub final_flush: bool,
    /// Seed of the offset generator (each queue adds its index).
    pub seed: u64,
    /// Time the queue's thread sleeps after a completion before it submits the next request
    /// (zero: at once), like an application that does something with each result.
    pub think: Duration,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            socket: PathBuf::new(),
            queues: 1,
            iodepth: 1,
            block_size: 4096,
            pattern: Pattern::Random,
            read_pct: 100,
            flush_every: 0,
            data: DataSource::Random,
            runtime: Duration::from_secs(5),
            ops: 0,
            ramp: Duration::ZERO,
            range_start: 0,
            range_len: 0,
            final_flush: false,
            seed: 0x5eed,
            think: Duration::ZERO,
        }
    }
}

/// Measured result of one load.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Reads counted (after the ramp).
    pub reads: u64,
    /// Writes counted.
    pub writes: u64,
    /// Flushes counted.
    pub flushes: u64,
    /// Requests that completed with an error (any phase).
    pub errors: u64,
    /// First error message seen.
    pub first_error: Option<String>,
    /// Bytes read + written (counted requests).
    pub bytes: u64,
    /// Measured period.
    pub elapsed: Duration,
    /// Mean latency of counted reads and writes, microseconds.
    pub avg_lat_us: f64,
    /// 99th percentile latency of counted reads and writes, microseconds.
    pub p99_lat_us: f64,
    /// Mean flush latency, microseconds (0 when none).
    pub avg_flush_lat_us: f64,
    /// Disk capacity reported by the server.
    pub capacity: u64,
}

impl LoadReport {
    /// Reads + writes per second.
    pub fn iops(&self) -> f64 {
        (self.reads + self.writes) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Megabytes (10^6) per second of reads + writes.
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "iops={:.0} mbps={:.1} avg_lat_us={:.1} p99_lat_us={:.1} reads={} writes={} flushes={} \
             avg_flush_lat_us={:.1} errors={} elapsed_s={:.2}",
            self.iops(),
            self.mbps(),
            self.avg_lat_us,
            self.p99_lat_us,
            self.reads,
            self.writes,
            self.flushes,
            self.avg_flush_lat_us,
            self.errors,
            self.elapsed.as_secs_f64()
        )?;
        if let Some(e) = &self.first_error {
            write!(f, " first_error={e:?}")?;
        }
        Ok(())
    }
}

/// Errors of the load generator (setup problems; request errors are counted in the report).
#[derive(Debug)]
pub struct LoadError(pub String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoadError {}

fn err<T>(what: &str, e: impl fmt::Display) -> Result<T, LoadError> {
    Err(LoadError(format!("{what}: {e}")))
}

/// Write payloads prepared before the run.
enum Payload {
    /// Slot buffers are filled with random bytes once.
    Random,
    /// The whole file, indexed by disk offset modulo its length.
    SameOffset(Arc<Vec<u8>>),
    /// Non-zero blocks, each `block_size` long, back to back.
    Pool(Arc<Vec<u8>>),
}

fn read_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .or_else(|e| err(&format!("reading {}", path.display()), e))?;
    Ok(data)
}

fn prepare_payload(spec: &LoadSpec) -> Result<Payload, LoadError> {
    if spec.read_pct >= 100 {
        return Ok(Payload::Random);
    }
    Ok(match &spec.data {
        DataSource::Random => Payload::Random,
        DataSource::FileSameOffset(path) => {
            let data = read_file(path)?;
            if data.len() < spec.block_size {
                return err("data file", "shorter than one block");
            }
            Payload::SameOffset(Arc::new(data))
        }
        DataSource::FileNonZero(path) => {
            let pool = nonzero_blocks(&read_file(path)?, spec.block_size);
            if pool.is_empty() {
                return err("data file", "has no non-zero block");
            }
            Payload::Pool(Arc::new(pool))
        }
        DataSource::Blocks(pool) => {
            if pool.is_empty() || pool.len() % spec.block_size != 0 {
                return err("payload blocks", "not a whole number of blocks");
            }
            Payload::Pool(Arc::clone(pool))
        }
    })
}

/// Connects to the server and returns the started handle, its queues and the capacity.
fn connect(spec: &LoadSpec) -> Result<(Blkio, Vec<Blkioq>, u64), LoadError> {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").or_else(|e| err("blkio", e))?;
    let path = spec
        .socket
        .to_str()
        .ok_or_else(|| LoadError("socket path is not UTF-8".into()))?;
    blkio
        .set_str("path", path)
        .or_else(|e| err("set path", e))?;
    blkio
        .connect()
        .or_else(|e| err(&format!("connect to {path}"), e))?;
    let max_queues = blkio.get_i32("max-queues").unwrap_or(1);
    if spec.queues as i32 > max_queues {
        return err(
            "queues",
            format!("{} requested, server offers {max_queues}", spec.queues),
        );
    }
    blkio
        .set_i32("num-queues", spec.queues as i32)
        .or_else(|e| err("set num-queues", e))?;
    let queue_size = (spec.iodepth.next_power_of_two().max(64)) as i32;
    blkio
        .set_i32("queue-size", queue_size.min(1024))
        .or_else(|e| err("set queue-size", e))?;
    let capacity = blkio
        .get_u64("capacity")
        .or_else(|e| err("get capacity", e))?;
    let started = blkio.start().or_else(|e| err("start", e))?;
    Ok((blkio, started.queues, capacity))
}

/// Runs one load and returns what it measured.
pub fn run(spec: &LoadSpec) -> Result<LoadReport, LoadError> {
    if spec.queues == 0 || spec.iodepth == 0 {
        return err("spec", "queues and iodepth must be at least 1");
    }
    if spec.block_size == 0 || !spec.block_size.is_multiple_of(512) {
        return err("spec", "block size must be a non-zero multiple of 512");
    }
    let payload = prepare_payload(spec)?;
    let (mut blkio, queues, capacity) = connect(spec)?;

    let range_len = if spec.range_len == 0 {
        capacity.saturating_sub(spec.range_start)
    } else {
        spec.range_len
    };
    if spec.range_start + range_len > capacity || range_len < spec.block_size as u64 {
        return err(
            "range",
            format!(
                "{}+{} does not fit a disk of {capacity} bytes",
                spec.range_start, range_len
            ),
        );
    }
    let blocks = range_len / spec.block_size as u64;
    let blocks_per_queue = blocks / spec.queues as u64;
    if blocks_per_queue == 0 {
        return err("range", "fewer blocks than queues");
    }

    // Request buffers must live in memory the server can map: one region per queue.
    let align = blkio.get_u64("mem-region-alignment").unwrap_or(4096) as usize;
    let region_len = (spec.iodepth * spec.block_size).div_ceil(align) * align;
    let mut regions: Vec<MemoryRegion> = Vec::new();
    for _ in 0..spec.queues {
        let region = blkio
            .alloc_mem_region(region_len)
            .or_else(|e| err("alloc_mem_region", e))?;
        blkio
            .map_mem_region(&region)
            .or_else(|e| err("map_mem_region", e))?;
        regions.push(region);
    }

    let payload = Arc::new(payload);
    let start = Instant::now();
    let ops_per_queue = if spec.ops == 0 {
        0
    } else {
        spec.ops.div_ceil(spec.queues as u64)
    };
    let results: Vec<Result<QueueResult, LoadError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = queues
            .into_iter()
            .zip(&regions)
            .enumerate()
            .map(|(index, (queue, region))| {
                let worker = QueueWorker {
                    spec,
                    payload: Arc::clone(&payload),
                    buffer_base: region.addr,
                    first_block: index as u64 * blocks_per_queue,
                    blocks: if spec.pattern == Pattern::Sequential {
                        blocks_per_queue
                    } else {
                        blocks
                    },
                    rng: SmallRng::seed_from_u64(spec.seed.wrapping_add(index as u64)),
                    start,
                    ops_limit: ops_per_queue,
                };
                scope.spawn(move || worker.run(queue))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(LoadError("client thread panicked".into())))
            })
            .collect()
    });

    let mut report = LoadReport {
        capacity,
        ..LoadReport::default()
    };
    let mut latencies: Vec<u32> = Vec::new();
    let mut lat_sum_ns: u128 = 0;
    let mut flush_lat_sum_ns: u128 = 0;
    let measured_from = start + spec.ramp;
    let mut measured_to = measured_from;
    for result in results {
        let q = result?;
        report.reads += q.reads;
        report.writes += q.writes;
        report.flushes += q.flushes;
        report.errors += q.errors;
        if report.first_error.is_none() {
            report.first_error = q.first_error;
        }
        report.bytes += (q.reads + q.writes) * spec.block_size as u64;
        lat_sum_ns += q.latencies_ns.iter().map(|&l| l as u128).sum::<u128>();
        flush_lat_sum_ns += q.flush_lat_sum_ns;
        latencies.extend_from_slice(&q.latencies_ns);
        if let Some(last) = q.last_completion {
            measured_to = measured_to.max(last);
        }
    }
    report.elapsed = measured_to.saturating_duration_since(measured_from);
    if !latencies.is_empty() {
        report.avg_lat_us = lat_sum_ns as f64 / latencies.len() as f64 / 1000.0;
        latencies.sort_unstable();
        let index = ((latencies.len() as f64) * 0.99).ceil() as usize;
        report.p99_lat_us = latencies[index.clamp(1, latencies.len()) - 1] as f64 / 1000.0;
    }
    if report.flushes > 0 {
        report.avg_flush_lat_us = flush_lat_sum_ns as f64 / report.flushes as f64 / 1000.0;
    }
    for region in &regions {
        blkio.unmap_mem_region(region);
    }
    Ok(report)
}

#[derive(Default)]
struct QueueResult {
    reads: u64,
    writes: u64,
    flushes: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_ns: Vec<u32>,
    flush_lat_sum_ns: u128,
    last_completion: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Read,
    Write,
    Flush,
}

struct Slot {
    kind: OpKind,
    submitted: Instant,
}

struct QueueWorker<'a> {
    spec: &'a LoadSpec,
    payload: Arc<Payload>,
    buffer_base: usize,
    first_block: u64,
    blocks: u64,
    rng: SmallRng,
    start: Instant,
    ops_limit: u64,
}

impl QueueWorker<'_> {
    fn slot_buffer(&self, slot: usize) -> *mut u8 {
        (self.buffer_base + slot * self.spec.block_size) as *mut u8
    }

    fn run(mut self, mut queue: Blkioq) -> Result<QueueResult, LoadError> {
        let spec = self.spec;
        let bs = spec.block_size;
        let depth = spec.iodepth;
        if matches!(*self.payload, Payload::Random) {
            for slot in 0..depth {
                // SAFETY: the slot's buffer lies inside this queue's memory region (iodepth *
                // block_size bytes, mapped, owned by this thread) and nothing is in flight yet.
                let buf = unsafe { std::slice::from_raw_parts_mut(self.slot_buffer(slot), bs) };
                self.rng.fill_bytes(buf);
            }
        }

        let mut result = QueueResult {
            latencies_ns: Vec::with_capacity(1 << 16),
            ..QueueResult::default()
        };
        let deadline = self.start + spec.ramp + spec.runtime;
        let measure_from = self.start + spec.ramp;
        let mut slots: Vec<Option<Slot>> = (0..depth).map(|_| None).collect();
        let mut next_seq_block = 0u64;
        let mut writes_since_flush = 0u64;
        let mut issued = 0u64;
        let mut in_flight = 0usize;
        let mut stopping = false;
        let mut final_flush_pending = spec.final_flush;
        let mut completions: Vec<std::mem::MaybeUninit<Completion>> = (0..depth)
            .map(|_| std::mem::MaybeUninit::uninit())
            .collect();

        // Fills every free slot with a new request unless the run is over.
        macro_rules! submit {
            ($slot:expr) => {{
                let slot: usize = $slot;
                let kind = if spec.flush_every > 0 && writes_since_flush >= spec.flush_every {
                    writes_since_flush = 0;
                    OpKind::Flush
                } else if spec.read_pct >= 100
                    || (spec.read_pct > 0 && self.rng.gen_range(0..100) < spec.read_pct)
                {
                    OpKind::Read
                } else {
                    OpKind::Write
                };
                let block = match spec.pattern {
                    Pattern::Random => self.rng.gen_range(0..self.blocks),
                    Pattern::Sequential => {
                        let b = self.first_block + next_seq_block;
                        if kind != OpKind::Flush {
                            next_seq_block = (next_seq_block + 1) % self.blocks;
                        }
                        b
                    }
                };
                let offset = spec.range_start + block * bs as u64;
                let buf = self.slot_buffer(slot);
                match kind {
                    OpKind::Read => queue.read(offset, buf, bs, slot, ReqFlags::empty()),
                    OpKind::Write => {
                        writes_since_flush += 1;
                        self.fill_write(buf, offset);
                        queue.write(offset, buf, bs, slot, ReqFlags::empty())
                    }
                    OpKind::Flush => queue.flush(slot, ReqFlags::empty()),
                }
                if kind != OpKind::Flush {
                    issued += 1;
                }
                slots[slot] = Some(Slot {
                    kind,
                    submitted: Instant::now(),
                });
                in_flight += 1;
            }};
        }

        for slot in 0..depth {
            if self.ops_limit > 0 && issued >= self.ops_limit {
                break;
            }
            submit!(slot);
        }

        while in_flight > 0 {
            let n = queue
                .do_io(&mut completions, 1, None, None)
                .or_else(|e| err("do_io", e))?;
            let now = Instant::now();
            if !stopping && (now >= deadline && self.ops_limit == 0) {
                stopping = true;
            }
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_ref() };
                let slot = c.user_data;
                let Some(done) = slots.get_mut(slot).and_then(Option::take) else {
                    return err("completion", format!("unknown user_data {slot}"));
                };
                in_flight -= 1;
                if c.ret != 0 {
                    result.errors += 1;
                    if result.first_error.is_none() {
                        let msg = if c.error_msg.is_null() {
                            String::new()
                        } else {
                            // SAFETY: libblkio's error messages are static NUL-terminated strings.
                            unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                                .to_string_lossy()
                                .into_owned()
                        };
                        result.first_error = Some(format!("errno {}: {msg}", -c.ret));
                    }
                } else if done.submitted >= measure_from && (now <= deadline || self.ops_limit > 0)
                {
                    let lat = now.duration_since(done.submitted).as_nanos();
                    match done.kind {
                        OpKind::Read => result.reads += 1,
                        OpKind::Write => result.writes += 1,
                        OpKind::Flush => {
                            result.flushes += 1;
                            result.flush_lat_sum_ns += lat;
                        }
                    }
                    if done.kind != OpKind::Flush {
                        result.latencies_ns.push(lat.min(u32::MAX as u128) as u32);
                    }
                    result.last_completion = Some(now);
                }
                if self.ops_limit > 0 && issued >= self.ops_limit {
                    stopping = true;
                }
                if !stopping {
                    if !spec.think.is_zero() {
                        std::thread::sleep(spec.think);
                    }
                    submit!(slot);
                }
            }
            if in_flight == 0 && final_flush_pending {
                final_flush_pending = false;
                queue.flush(0, ReqFlags::empty());
                let n = queue
                    .do_io(&mut completions, 1, None, None)
                    .or_else(|e| err("do_io (final flush)", e))?;
                // SAFETY: do_io initialised the first n completions (n >= 1).
                let c = unsafe { completions[..n][0].assume_init_ref() };
                if c.ret != 0 {
                    result.errors += 1;
                    result
                        .first_error
                        .get_or_insert_with(|| format!("final flush: errno {}", -c.ret));
                }
            }
        }
        Ok(result)
    }

    fn fill_write(&mut self, buf: *mut u8, offset: u64) {
        let bs = self.spec.block_size;
        let source: &[u8] = match &*self.payload {
            Payload::Random => return,
            Payload::SameOffset(data) => {
                let start = (offset % data.len() as u64) as usize;
                if start + bs <= data.len() {
                    &data[start..start + bs]
                } else {
                    &data[data.len() - bs..]
                }
            }
            Payload::Pool(pool) => {
                let count = pool.len() / bs;
                let index = (offset / bs as u64 % count as u64) as usize;
                &pool[index * bs..(index + 1) * bs]
            }
        };
        // SAFETY: `buf` is this slot's block_size bytes inside the queue's mapped region; the slot
        // is free (its previous request completed), so the server is not reading it.
        unsafe { std::ptr::copy_nonoverlapping(source.as_ptr(), buf, bs) };
    }
}
