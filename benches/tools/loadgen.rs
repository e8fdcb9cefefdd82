//! Command-line front end of the vhost-user-blk load generator (see `benches/common/loadgen.rs`).
//!
//! ```text
//! cargo run --release --example loadgen -- --socket /tmp/blk.sock --rw randread --bs 4k \
//!     --iodepth 32 --queues 2 --runtime 10
//! ```

#[path = "../common/loadgen.rs"]
mod loadgen;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use loadgen::{DataSource, LoadSpec, Pattern};

#[derive(Parser, Debug)]
#[command(about = "vhost-user-blk load generator (libblkio client)")]
struct Args {
    /// vhost-user socket of the server.
    #[arg(long)]
    socket: PathBuf,
    /// Access pattern and direction, fio style: read, write, rw (sequential), randread,
    /// randwrite, randrw (random).
    #[arg(long, default_value = "randread")]
    rw: String,
    /// Percentage of reads for rw/randrw.
    #[arg(long, default_value_t = 50)]
    rwmixread: u32,
    /// Request size (bytes, or with K/M suffix).
    #[arg(long, default_value = "4K")]
    bs: String,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Virtqueues, one client thread each.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Flush after every N writes on each queue (0 = never).
    #[arg(long, default_value_t = 0)]
    flush_every: u64,
    /// Write data: "random", "FILE" (the file's bytes at the same offset) or "nonzero:FILE" (the
    /// file's non-zero blocks in turn).
    #[arg(long, default_value = "random")]
    data: String,
    /// Seconds to run (ignored when --ops is given).
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Stop after this many reads+writes in total.
    #[arg(long, default_value_t = 0)]
    ops: u64,
    /// Seconds of warm-up that are not counted.
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// First byte of the range used.
    #[arg(long, default_value = "0")]
    offset: String,
    /// Length of the range used (0 = to the end of the disk).
    #[arg(long, default_value = "0")]
    size: String,
    /// Flush once at the end (not counted).
    #[arg(long)]
    final_flush: bool,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Microseconds each queue's thread sleeps after a completion before its next request
    /// (an application's think time; latency is still measured from submit to completion).
    #[arg(long, default_value_t = 0)]
    think_us: u64,
    /// Print one JSON object instead of key=value text.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size '{s}'"))
}

fn spec_from(args: &Args) -> Result<LoadSpec, String> {
    let (pattern, read_pct) = match args.rw.as_str() {
        "read" => (Pattern::Sequential, 100),
        "write" => (Pattern::Sequential, 0),
        "rw" => (Pattern::Sequential, args.rwmixread.min(100)),
        "randread" => (Pattern::Random, 100),
        "randwrite" => (Pattern::Random, 0),
        "randrw" => (Pattern::Random, args.rwmixread.min(100)),
        other => return Err(format!("unknown --rw '{other}'")),
    };
    let data = match args.data.as_str() {
        "random" => DataSource::Random,
        other => match other.strip_prefix("nonzero:") {
            Some(path) => DataSource::FileNonZero(path.into()),
            None => DataSource::FileSameOffset(other.into()),
        },
    };
    let block_size = parse_size(&args.bs)? as usize;
    Ok(LoadSpec {
        socket: args.socket.clone(),
        queues: args.queues,
        iodepth: args.iodepth,
        block_size,
        pattern,
        read_pct,
        flush_every: args.flush_every,
        data,
        runtime: Duration::from_secs_f64(args.runtime.max(0.0)),
        ops: args.ops,
        ramp: Duration::from_secs_f64(args.ramp.max(0.0)),
        range_start: parse_size(&args.offset)?,
        range_len: parse_size(&args.size)?,
        final_flush: args.final_flush,
        seed: args.seed,
        think: Duration::from_micros(args.think_us),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let spec = match spec_from(&args) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    match loadgen::run(&spec) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "iops": report.iops(),
                        "mbps": report.mbps(),
                        "avg_lat_us": report.avg_lat_us,
                        "p99_lat_us": report.p99_lat_us,
                        "reads": report.reads,
                        "writes": report.writes,
                        "flushes": report.flushes,
                        "avg_flush_lat_us": report.avg_flush_lat_us,
                        "errors": report.errors,
                        "first_error": report.first_error,
                        "elapsed_s": report.elapsed.as_secs_f64(),
                        "capacity": report.capacity,
                    })
                );
            } else {
                println!("{report}");
            }
            if report.errors > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}
