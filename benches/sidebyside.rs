//! Side-by-side benchmark: insitu-blk against qemu-storage-daemon, same machine, same run.
//!
//! ```text
//! sudo images/build-rootfs.sh                 # once: .cache/rootfs.img (Debian root filesystem)
//! cargo bench --bench sidebyside              # defaults: modes none,lz4; 3 reps; 4 s + 1 s ramp
//! cargo bench --bench sidebyside -- --reps 5 --runtime 8 --modes lz4 --workloads randread-qd1
//! ```
//!
//! Both servers export a 1 GiB disk holding the same Debian root filesystem, on the same host
//! filesystem: qemu-storage-daemon a sparse raw copy (`driver=file,cache.direct=off`),
//! insitu-blk an image written from it through the engine (per mode `--compression none` or
//! lz4, each with the cluster size `insitu-blk create` gives it: 16 KiB uncompressed, 64 KiB
//! compressed; `--cluster-size` overrides). Each session starts from a fresh copy of the pristine image,
//! starts one server with 2 queues, runs every workload with the same in-process blkio load
//! generator (`benches/common/loadgen.rs`), and stops the server. Sessions alternate between
//! the servers (qsd first in even repetitions, insitu-blk first in odd ones). The tables show
//! medians over the repetitions; ratios are ours/qsd from the same invocation.

#[path = "common/loadgen.rs"]
mod loadgen;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use insitu_blk::image::{default_cluster_size, Compression, CreateOptions, Image, OpenOptions};
use loadgen::{DataSource, LoadReport, LoadSpec, Pattern};

const DISK_SIZE: u64 = 1 << 30;
const CLUSTER: usize = 64 * 1024;

#[derive(Parser, Debug)]
#[command(about = "insitu-blk vs qemu-storage-daemon, side by side")]
struct Args {
    /// Root filesystem image (default: <repo>/.cache/rootfs.img from images/build-rootfs.sh).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Scratch directory for the disks (default: <repo>/.cache/sidebyside; same filesystem).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Repetitions per server and mode.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Measured seconds per workload.
    #[arg(long, default_value_t = 4.0)]
    runtime: f64,
    /// Warm-up seconds per workload (not counted).
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// insitu-blk compression modes to compare, comma separated (none, lz4, snappy, zstd:N).
    #[arg(long, default_value = "none,lz4")]
    modes: String,
    /// Workloads to run, comma separated, or "all".
    #[arg(long, default_value = "all")]
    workloads: String,
    /// Disk content: "packed" (the root filesystem's non-zero 64 KiB clusters back to back,
    /// repeated to fill the disk: every request touches real data) or "rootfs" (the image as is,
    /// ~55 % of it zero clusters that both servers serve without touching data).
    #[arg(long, default_value = "packed")]
    fill: String,
    /// Servers to run, comma separated: qsd, insitu (tables need both).
    #[arg(long, default_value = "qsd,insitu")]
    servers: String,
    /// Skip the codec-limit measurement.
    #[arg(long)]
    no_codec: bool,
    /// Cluster size of every insitu-blk image in bytes (default: what `insitu-blk create` picks
    /// for the mode: 16384 for none, 65536 for compressed modes).
    #[arg(long, value_name = "BYTES")]
    cluster_size: Option<u32>,
    /// Extra argument for `insitu-blk serve` (repeatable), e.g. `--serve-arg=--poll-max-us=0`.
    #[arg(long = "serve-arg", value_name = "ARG", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// The `insitu-blk` binary to serve with (default: the one this bench was built with), e.g.
    /// a saved copy of an earlier build for an A/B between builds.
    #[arg(long, value_name = "PATH")]
    server_binary: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One row of the workload table.
struct Workload {
    name: &'static str,
    queues: usize,
    iodepth: usize,
    block_size: usize,
    pattern: Pattern,
    read_pct: u32,
    flush_every: u64,
    /// Pause of the client after each completion before its next request (0: none).
    think_ms: u64,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4k-randread-qd1",
        queues: 1,
        iodepth: 1,
        block_size: 4096,
        pattern: Pattern::Random,
        read_pct: 100,
        flush_every: 0,
        think_ms: 0,
    },
    Workload {
        name: "4k-randread-qd32x2",
        queues: 2,
        iodepth: 32,
        block_size: 4096,
        pattern: Pattern::Random,
        read_pct: 100,
        flush_every: 0,
        think_ms: 0,
    },
    Workload {
        name: "64k-seqread-qd8x2",
        queues: 2,
        iodepth: 8,
        block_size: 65536,
        pattern: Pattern::Sequential,
        read_pct: 100,
        flush_every: 0,
        think_ms: 0,
    },
    Workload {
        name: "4k-randwrite-qd32x2",
        queues: 2,
        iodepth: 32,
        block_size: 4096,
        pattern: Pattern::Random,
        read_pct: 0,
        flush_every: 0,
        think_ms: 0,
    },
    Workload {
        name: "64k-seqwrite-qd8x2",
        queues: 2,
        iodepth: 8,
        block_size: 65536,
        pattern: Pattern::Sequential,
        read_pct: 0,
        flush_every: 0,
        think_ms: 0,
    },
    Workload {
        name: "4k-seqwrite-qd1-flush32",
        queues: 1,
        iodepth: 1,
        block_size: 4096,
        pattern: Pattern::Sequential,
        read_pct: 0,
        flush_every: 32,
        think_ms: 0,
    },
    // A connected guest that is almost idle (two reads a second): what a server costs the host
    // between bursts (its timers, polling, commits), in CPU seconds and resident memory.
    Workload {
        name: "idle-qd1-think500ms",
        queues: 1,
        iodepth: 1,
        block_size: 4096,
        pattern: Pattern::Random,
        read_pct: 100,
        flush_every: 0,
        think_ms: 500,
    },
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Server {
    Qsd,
    Ours,
}

impl Server {
    fn label(self) -> &'static str {
        match self {
            Server::Qsd => "qsd",
            Server::Ours => "insitu",
        }
    }
}

/// One measurement: a workload on one server in one session.
#[derive(Clone, Debug)]
struct Sample {
    report: LoadReport,
    server_cpu_s: f64,
    client_cpu_s: f64,
    host_bytes: u64,
    /// Bytes the host's block device under the image wrote during the workload (its
    /// `/sys/dev/block/MAJ:MIN/stat`): the data and metadata a server made durable, or that the
    /// kernel wrote back for it. A server that leaves its writes in the page cache writes none.
    /// `None` when the kernel does not say.
    device_written: Option<u64>,
    /// The server's peak resident memory during the workload (`VmHWM`, reset before it through
    /// `/proc/PID/clear_refs`); `None` when the kernel does not say.
    peak_rss: Option<u64>,
    /// The server's resident memory when the workload ended (`VmRSS`).
    end_rss: Option<u64>,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidebyside: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| repo_root().join(".cache/rootfs.img"));
    if !image.exists() {
        bail!(
            "{} not found: build it first with `sudo images/build-rootfs.sh`",
            image.display()
        );
    }
    let workdir = args
        .workdir
        .clone()
        .unwrap_or_else(|| repo_root().join(".cache/sidebyside"));
    fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let rootfs = fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
    if rootfs.len() as u64 != DISK_SIZE {
        bail!(
            "{} is {} bytes, expected a {} byte image",
            image.display(),
            rootfs.len(),
            DISK_SIZE
        );
    }
    let disk = match args.fill.as_str() {
        "rootfs" => rootfs.clone(),
        "packed" => {
            let clusters = loadgen::nonzero_blocks(&rootfs, CLUSTER);
            clusters
                .iter()
                .copied()
                .cycle()
                .take(rootfs.len())
                .collect()
        }
        other => bail!("--fill takes packed or rootfs, not '{other}'"),
    };
    let modes: Vec<Compression> = args
        .modes
        .split(',')
        .map(|m| m.trim().parse().map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    // Always in the canonical order (reads first, on pristine data), whatever order was given.
    let workloads: Vec<&Workload> = if args.workloads == "all" {
        WORKLOADS.iter().collect()
    } else {
        let names: Vec<&str> = args.workloads.split(',').map(str::trim).collect();
        if let Some(unknown) = names
            .iter()
            .find(|n| !WORKLOADS.iter().any(|w| w.name == **n))
        {
            bail!("unknown workload '{unknown}'");
        }
        WORKLOADS
            .iter()
            .filter(|w| names.contains(&w.name))
            .collect()
    };
    let servers: Vec<Server> = args
        .servers
        .split(',')
        .map(|s| match s.trim() {
            "qsd" => Ok(Server::Qsd),
            "insitu" | "ours" => Ok(Server::Ours),
            other => bail!("unknown server '{other}' (qsd or insitu)"),
        })
        .collect::<Result<_>>()?;
    let server_binary = args
        .server_binary
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_insitu-blk")));
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        bail!("qemu-storage-daemon not found (apt-get install -t bookworm-backports qemu-system-x86 or qemu-storage-daemon)");
    }

    print_machine();
    let codec = if args.no_codec {
        None
    } else {
        Some(measure_codec(&rootfs))
    };

    // Pristine disks: a sparse raw copy for qsd, one engine image per mode for us.
    let pristine_raw = workdir.join("pristine-raw.img");
    write_sparse_raw(&disk, &pristine_raw)?;
    let mut pristine_ours = BTreeMap::new();
    for mode in modes.iter().filter(|_| servers.contains(&Server::Ours)) {
        let path = workdir.join(format!("pristine-insitu-{}.img", mode_tag(*mode)));
        let started = Instant::now();
        let cluster_size = cluster_size_for(args, *mode);
        write_engine_image(&disk, &path, *mode, cluster_size)?;
        eprintln!(
            "sidebyside: wrote {} ({} stored) in {:.1} s",
            path.display(),
            human(host_bytes(&path)?),
            started.elapsed().as_secs_f64()
        );
        pristine_ours.insert(mode_tag(*mode), path);
    }
    // Write payloads: the root filesystem's non-zero blocks, per request size.
    let pools: BTreeMap<usize, DataSource> = workloads
        .iter()
        .map(|w| w.block_size)
        .map(|bs| {
            (
                bs,
                DataSource::Blocks(std::sync::Arc::new(loadgen::nonzero_blocks(&rootfs, bs))),
            )
        })
        .collect();
    drop(rootfs);
    drop(disk);
    let mut samples: BTreeMap<(String, &'static str, Server), Vec<Sample>> = BTreeMap::new();
    let started = Instant::now();
    for mode in &modes {
        for rep in 0..args.reps {
            let order = if rep % 2 == 0 {
                [Server::Qsd, Server::Ours]
            } else {
                [Server::Ours, Server::Qsd]
            };
            for server in order.into_iter().filter(|s| servers.contains(s)) {
                let work = workdir.join(format!("work-{}.img", server.label()));
                let pristine = match server {
                    Server::Qsd => &pristine_raw,
                    Server::Ours => &pristine_ours[&mode_tag(*mode)],
                };
                copy_sparse(pristine, &work)?;
                let socket = workdir.join(format!("{}.sock", server.label()));
                let extra: &[String] = match server {
                    Server::Qsd => &[],
                    Server::Ours => &args.serve_args,
                };
                let mut child =
                    start_server(server, &server_binary, extra, &work, &socket, &workdir)?;
                let session =
                    run_session(args, &workloads, &socket, &work, child.id(), &pools, rep);
                stop_server(&mut child, server)?;
                let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
                let load1 = load.split_whitespace().next().unwrap_or("?");
                for (name, sample) in session? {
                    eprintln!(
                        "  [{} rep {} {:>6}] {:<24} {}  server_cpu_s={:.2} client_cpu_s={:.2} host={} device_written={} load1={load1}",
                        mode,
                        rep,
                        server.label(),
                        name,
                        sample.report,
                        sample.server_cpu_s,
                        sample.client_cpu_s,
                        human(sample.host_bytes),
                        sample.device_written.map_or("n/a".into(), human)
                    );
                    samples
                        .entry((mode_tag(*mode), name, server))
                        .or_default()
                        .push(sample);
                }
            }
        }
    }
    eprintln!(
        "sidebyside: measured in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let mut out = String::new();
    if !args.serve_args.is_empty() {
        let _ = writeln!(
            out,
            "\ninsitu-blk served with `{}`",
            args.serve_args.join(" ")
        );
    }
    if let Some(binary) = &args.server_binary {
        let _ = writeln!(out, "\ninsitu-blk binary: `{}`", binary.display());
    }
    if let Some(codec) = &codec {
        out.push_str(&codec.table());
    }
    for mode in &modes {
        out.push_str(&summary_table(
            *mode,
            cluster_size_for(args, *mode),
            &workloads,
            &samples,
            args.reps,
            &args.fill,
        ));
    }
    print!("{out}");
    let results = workdir.join("results.md");
    fs::write(&results, &out).with_context(|| format!("writing {}", results.display()))?;
    eprintln!("sidebyside: tables also in {}", results.display());
    Ok(())
}

fn mode_tag(mode: Compression) -> String {
    mode.to_string().replace(':', "")
}

fn print_machine() {
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    eprintln!(
        "sidebyside: {cpus} CPUs ({model}); load average {}; {qsd}",
        load.trim()
    );
}

/// Single-core lz4 speed on the root filesystem's non-zero 64 KiB clusters.
struct CodecLimit {
    clusters: usize,
    ratio: f64,
    compress_mbps: f64,
    decompress_mbps: f64,
}

impl CodecLimit {
    fn table(&self) -> String {
        // A 4 KiB write into a compressed 64 KiB cluster decompresses and recompresses the cluster.
        let rmw_us = CLUSTER as f64 / self.compress_mbps + CLUSTER as f64 / self.decompress_mbps;
        format!(
            "\n### Codec limit (lz4_flex, one core, {} non-zero 64 KiB clusters of the rootfs)\n\n\
             | lz4 ratio | compress MB/s | decompress MB/s | 64K seq write limit (2 cores) | 4K rand write RMW limit (2 cores) |\n\
             |---|---|---|---|---|\n\
             | {:.2} | {:.0} | {:.0} | {:.0} MB/s | {:.0} IOPS |\n",
            self.clusters,
            self.ratio,
            self.compress_mbps,
            self.decompress_mbps,
            2.0 * self.compress_mbps,
            2.0 * 1e6 / rmw_us,
        )
    }
}

fn measure_codec(rootfs: &[u8]) -> CodecLimit {
    let clusters: Vec<&[u8]> = rootfs
        .chunks_exact(CLUSTER)
        .filter(|c| c.iter().any(|&b| b != 0))
        .collect();
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(CLUSTER)];
    let mut compressed: Vec<Vec<u8>> = Vec::with_capacity(clusters.len());
    let mut stored = 0usize;
    for c in &clusters {
        let n = lz4_flex::block::compress_into(c, &mut out).unwrap_or(CLUSTER);
        compressed.push(out[..n].to_vec());
        // The engine stores payloads in 4 KiB units and keeps a cluster raw when that saves none.
        stored += n.div_ceil(4096).min(CLUSTER / 4096) * 4096;
    }
    let input = clusters.len() * CLUSTER;
    let time = |f: &mut dyn FnMut()| {
        let mut rounds = 0u32;
        let started = Instant::now();
        while rounds < 2 || started.elapsed() < Duration::from_millis(1500) {
            f();
            rounds += 1;
        }
        started.elapsed().as_secs_f64() / rounds as f64
    };
    let compress_s = time(&mut || {
        for c in &clusters {
            let n = lz4_flex::block::compress_into(c, &mut out).unwrap_or(0);
            std::hint::black_box(n);
        }
    });
    let mut plain = vec![0u8; CLUSTER];
    let decompress_s = time(&mut || {
        for c in &compressed {
            let n = lz4_flex::block::decompress_into(c, &mut plain).unwrap_or(0);
            std::hint::black_box(n);
        }
    });
    CodecLimit {
        clusters: clusters.len(),
        ratio: input as f64 / stored.max(1) as f64,
        compress_mbps: input as f64 / 1e6 / compress_s,
        decompress_mbps: input as f64 / 1e6 / decompress_s,
    }
}

fn write_sparse_raw(data: &[u8], path: &Path) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(data.len() as u64)?;
    let mut offset = 0u64;
    for chunk in data.chunks(4096) {
        if chunk.iter().any(|&b| b != 0) {
            std::os::unix::fs::FileExt::write_all_at(&file, chunk, offset)?;
        }
        offset += chunk.len() as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// The cluster size of the mode's image: the user's choice, else `create`'s default.
fn cluster_size_for(args: &Args, mode: Compression) -> u32 {
    args.cluster_size
        .unwrap_or_else(|| default_cluster_size(mode))
}

fn write_engine_image(
    data: &[u8],
    path: &Path,
    compression: Compression,
    cluster_size: u32,
) -> Result<()> {
    let _ = fs::remove_file(path);
    let opts = CreateOptions {
        size: data.len() as u64,
        cluster_size,
        compression,
    };
    Image::create(path, &opts).with_context(|| format!("creating {}", path.display()))?;
    let image = Image::open(path, &OpenOptions::default())
        .with_context(|| format!("opening {}", path.display()))?;
    let cluster_size = cluster_size as usize;
    for (index, chunk) in data.chunks(cluster_size).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            image.write((index * cluster_size) as u64, chunk)?;
        }
    }
    image.flush()?;
    image.close()?;
    Ok(())
}

/// Copies a file keeping its holes (the copy stores what the original stores).
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let _ = fs::remove_file(to);
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("cp {} {} failed", from.display(), to.display());
    }
    // The copy's dirty pages are written back now, not during the workloads: a server that
    // syncs its file (every commit of ours does, qsd only at a FLUSH) would otherwise pay for
    // writing back the whole copy inside its measured window, and the other one not.
    File::open(to)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", to.display()))?;
    Ok(())
}

/// Sectors written so far by the block device holding `path` (the partition's own counters),
/// in bytes; `None` when the kernel does not say (e.g. a filesystem without a block device).
fn device_written_bytes(path: &Path) -> Option<u64> {
    let dev = fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let stat = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    // Field 7 (from 1) is "sectors written", in 512-byte units whatever the device's block size.
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

fn host_bytes(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

fn start_server(
    server: Server,
    binary: &Path,
    extra_args: &[String],
    image: &Path,
    socket: &Path,
    workdir: &Path,
) -> Result<Child> {
    let _ = fs::remove_file(socket);
    let log = File::create(workdir.join(format!("{}.log", server.label())))?;
    let mut command = match server {
        Server::Qsd => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f,filename={},cache.direct=off",
                    image.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},\
                     writable=on,num-queues=2",
                    socket.display()
                ));
            c
        }
        Server::Ours => {
            let mut c = Command::new(binary);
            c.arg("--log-level")
                .arg("warn")
                .arg("serve")
                .arg("--socket-path")
                .arg(socket)
                .arg("--blk-file")
                .arg(image)
                .arg("--num-queues")
                .arg("2")
                .args(extra_args);
            c
        }
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", server.label()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if UnixStream::connect(socket).is_ok() {
            // The probe connection counts as a client: give the server a moment to see it go.
            std::thread::sleep(Duration::from_millis(200));
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            let log = fs::read_to_string(workdir.join(format!("{}.log", server.label())))
                .unwrap_or_default();
            bail!(
                "{} exited with {status} before listening: {}",
                server.label(),
                log.trim()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "{} did not listen on {} in 30 s",
                server.label(),
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_server(child: &mut Child, server: Server) -> Result<()> {
    // SAFETY: sending a signal to a child we spawned and have not reaped (its pid is ours).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                eprintln!(
                    "sidebyside: warning: {} exited with {status}",
                    server.label()
                );
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not exit within 30 s of SIGTERM", server.label());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// utime + stime of a process (all its threads), in seconds.
fn process_cpu_seconds(pid: &str) -> Result<f64> {
    let mut stat = String::new();
    File::open(format!("/proc/{pid}/stat"))?.read_to_string(&mut stat)?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("no utime")?.parse()?;
    let ticks = ticks + fields.get(12).context("no stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Resets the peak resident set size the kernel reports for `pid` (`VmHWM`) to the current one;
/// false if the kernel refused (`/proc/PID/clear_refs` needs the process's owner, Linux 4.0+).
fn reset_peak_rss(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The peak resident set size of `pid` since the last reset, in bytes.
fn peak_rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmHWM:")
}

/// A memory field of `/proc/PID/status` (given in kB there), in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn run_session(
    args: &Args,
    workloads: &[&Workload],
    socket: &Path,
    image: &Path,
    pid: u32,
    pools: &BTreeMap<usize, DataSource>,
    rep: usize,
) -> Result<Vec<(&'static str, Sample)>> {
    let mut out = Vec::new();
    for w in workloads {
        let spec = LoadSpec {
            socket: socket.to_path_buf(),
            queues: w.queues,
            iodepth: w.iodepth,
            block_size: w.block_size,
            pattern: w.pattern,
            read_pct: w.read_pct,
            flush_every: w.flush_every,
            data: pools[&w.block_size].clone(),
            runtime: Duration::from_secs_f64(args.runtime),
            ops: 0,
            ramp: Duration::from_secs_f64(args.ramp),
            range_start: 0,
            range_len: 0,
            final_flush: w.read_pct < 100,
            seed: 0x5eed + rep as u64,
            think: Duration::from_millis(w.think_ms),
        };
        let peak_rss_reset = reset_peak_rss(pid);
        let server_before = process_cpu_seconds(&pid.to_string())?;
        let client_before = process_cpu_seconds("self")?;
        let device_before = device_written_bytes(image);
        let report = loadgen::run(&spec).with_context(|| format!("workload {}", w.name))?;
        let server_cpu_s = process_cpu_seconds(&pid.to_string())? - server_before;
        let peak_rss = if peak_rss_reset {
            peak_rss_bytes(pid)
        } else {
            None
        };
        let end_rss = status_bytes(pid, "VmRSS:");
        let client_cpu_s = process_cpu_seconds("self")? - client_before;
        let device_written = match (device_before, device_written_bytes(image)) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before)),
            _ => None,
        };
        if report.errors > 0 {
            bail!(
                "workload {}: {} requests failed (first: {})",
                w.name,
                report.errors,
                report.first_error.as_deref().unwrap_or("?")
            );
        }
        out.push((
            w.name,
            Sample {
                report,
                server_cpu_s,
                client_cpu_s,
                host_bytes: host_bytes(image)?,
                device_written,
                peak_rss,
                end_rss,
            },
        ));
    }
    Ok(out)
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn human(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn summary_table(
    mode: Compression,
    cluster_size: u32,
    workloads: &[&Workload],
    samples: &BTreeMap<(String, &'static str, Server), Vec<Sample>>,
    reps: usize,
    fill: &str,
) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\n### insitu-blk `--compression {mode}` ({} KiB clusters) vs qemu-storage-daemon (raw), \
         medians of {reps} runs each, disk fill `{fill}`\n",
        cluster_size / 1024
    );
    t.push_str(
        "| workload | IOPS qsd | IOPS ours | ratio | MB/s qsd | MB/s ours | avg µs qsd | avg µs ours | \
         lat ratio | p99 µs qsd | p99 µs ours | flush µs qsd | flush µs ours | CPU s qsd | CPU s ours | \
         host bytes qsd | host bytes ours | device writes qsd | device writes ours | \
         peak RSS qsd | peak RSS ours | RSS after qsd | RSS after ours |\n",
    );
    t.push_str(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for w in workloads {
        let get = |server: Server| samples.get(&(mode_tag(mode), w.name, server));
        let (Some(qsd), Some(ours)) = (get(Server::Qsd), get(Server::Ours)) else {
            continue;
        };
        let m = |s: &[Sample], f: &dyn Fn(&Sample) -> f64| median(s.iter().map(f).collect());
        let iops = |s: &Sample| s.report.iops();
        let mbps = |s: &Sample| s.report.mbps();
        let avg = |s: &Sample| s.report.avg_lat_us;
        let p99 = |s: &Sample| s.report.p99_lat_us;
        let cpu = |s: &Sample| s.server_cpu_s;
        let flush = |s: &Sample| s.report.avg_flush_lat_us;
        let bytes = |s: &Sample| s.host_bytes as f64;
        let device = |s: &Sample| s.device_written.map_or(f64::NAN, |b| b as f64);
        let rss = |s: &Sample| s.peak_rss.map_or(f64::NAN, |b| b as f64);
        let rss_after = |s: &Sample| s.end_rss.map_or(f64::NAN, |b| b as f64);
        let bytes_cell = |samples: &[Sample], f: &dyn Fn(&Sample) -> f64| {
            let v = m(samples, f);
            if v.is_nan() {
                "n/a".to_string()
            } else {
                human(v as u64)
            }
        };
        let _ = writeln!(
            t,
            "| {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
            w.name,
            m(qsd, &iops),
            m(ours, &iops),
            m(ours, &iops) / m(qsd, &iops),
            m(qsd, &mbps),
            m(ours, &mbps),
            m(qsd, &avg),
            m(ours, &avg),
            m(ours, &avg) / m(qsd, &avg),
            m(qsd, &p99),
            m(ours, &p99),
            if w.flush_every > 0 { format!("{:.0}", m(qsd, &flush)) } else { "-".into() },
            if w.flush_every > 0 { format!("{:.0}", m(ours, &flush)) } else { "-".into() },
            m(qsd, &cpu),
            m(ours, &cpu),
            human(m(qsd, &bytes) as u64),
            human(m(ours, &bytes) as u64),
            bytes_cell(qsd, &device),
            bytes_cell(ours, &device),
            bytes_cell(qsd, &rss),
            bytes_cell(ours, &rss),
            bytes_cell(qsd, &rss_after),
            bytes_cell(ours, &rss_after),
        );
    }
    t
}
