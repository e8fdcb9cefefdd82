//! Footprint benchmark of the image engine (issue #2 item 8): host bytes stored for a real root
//! filesystem at each cluster size and algorithm next to `qemu-img convert -c` (qcow2 zlib and
//! zstd), cluster-table RAM per TiB, and open+recovery time of a 100 GiB image with a full journal.
//!
//! ```text
//! sudo images/build-rootfs.sh                 # once: .cache/rootfs.img
//! cargo bench --bench footprint               # all three tables (about a minute)
//! cargo bench --bench footprint -- --only sizes|ram|recovery
//! ```
//!
//! "Host bytes" are `st_blocks * 512` of the image file after `close`: payloads plus every piece
//! of metadata (superblocks, checkpoint areas, journal) that the host filesystem really stores.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use insitu_blk::image::{format, Compression, CreateOptions, Image, OpenOptions};

#[derive(Parser, Debug)]
#[command(about = "insitu-blk engine footprint: bytes stored, table RAM, recovery time")]
struct Args {
    /// Root filesystem image (default: <repo>/.cache/rootfs.img from images/build-rootfs.sh).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Scratch directory (default: <repo>/.cache/footprint).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Run one part only: sizes, ram or recovery.
    #[arg(long)]
    only: Option<String>,
    /// Table RAM for every cluster size, not only 64K and 128K.
    #[arg(long)]
    all_cluster_sizes: bool,
    /// Fraction of the journal to fill for the recovery table (1.0 = full; less for a quick try).
    #[arg(long, default_value_t = 1.0)]
    journal_fill: f64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const CLUSTER_SIZES: [u32; 4] = [16 << 10, 32 << 10, 64 << 10, 128 << 10];
const ALGORITHMS: [&str; 5] = ["lz4", "snappy", "zstd:1", "zstd:3", "none"];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("footprint: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let workdir = args
        .workdir
        .clone()
        .unwrap_or_else(|| repo_root().join(".cache/footprint"));
    fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let part = args.only.as_deref();
    if let Some(p) = part {
        if !["sizes", "ram", "recovery"].contains(&p) {
            bail!("--only takes sizes, ram or recovery, not '{p}'");
        }
    }
    let mut out = String::new();
    if part.is_none() || part == Some("sizes") {
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
        out.push_str(&sizes_table(&image, &workdir)?);
    }
    if part.is_none() || part == Some("ram") {
        out.push_str(&ram_table(&workdir, args.all_cluster_sizes)?);
    }
    if part.is_none() || part == Some("recovery") {
        out.push_str(&recovery_table(&workdir, args.journal_fill)?);
    }
    print!("{out}");
    let results = workdir.join("results.md");
    fs::write(&results, &out).with_context(|| format!("writing {}", results.display()))?;
    eprintln!("footprint: tables also in {}", results.display());
    Ok(())
}

fn host_bytes(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn qemu_img_compressed(src: &Path, dst: &Path, compression_type: &str) -> Result<u64> {
    let _ = fs::remove_file(dst);
    let output = Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2", "-o"])
        .arg(format!("compression_type={compression_type}"))
        .arg(src)
        .arg(dst)
        .output()
        .context("running qemu-img")?;
    if !output.status.success() {
        bail!(
            "qemu-img convert ({compression_type}) failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let bytes = host_bytes(dst)?;
    let _ = fs::remove_file(dst);
    Ok(bytes)
}

fn sizes_table(image: &Path, workdir: &Path) -> Result<String> {
    let data = fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let nonzero_4k = data
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;
    let qcow_zlib = qemu_img_compressed(image, &workdir.join("rootfs-zlib.qcow2"), "zlib")?;
    let qcow_zstd = qemu_img_compressed(image, &workdir.join("rootfs-zstd.qcow2"), "zstd")?;
    eprintln!(
        "footprint: qcow2 zlib {:.1} MiB, zstd {:.1} MiB",
        mib(qcow_zlib),
        mib(qcow_zstd)
    );

    let mut t = String::new();
    let _ = writeln!(
        t,
        "\n### Host bytes stored: {} ({:.0} MiB logical, {:.1} MiB in non-zero 4 KiB blocks)\n",
        image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        mib(data.len() as u64),
        mib(nonzero_4k * 4096)
    );
    t.push_str(
        "| cluster | algorithm | host MiB | payload MiB | ratio (non-zero / host) | × qcow2-zstd | × qcow2-zlib | write MB/s (1 thread) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let _ = writeln!(
        t,
        "| 64K | qcow2 zlib (`qemu-img convert -c`) | {:.1} | | {:.2} | {:.2} | 1.00 | |",
        mib(qcow_zlib),
        (nonzero_4k * 4096) as f64 / qcow_zlib as f64,
        qcow_zlib as f64 / qcow_zstd as f64
    );
    let _ = writeln!(
        t,
        "| 64K | qcow2 zstd (`qemu-img convert -c`) | {:.1} | | {:.2} | 1.00 | {:.2} | |",
        mib(qcow_zstd),
        (nonzero_4k * 4096) as f64 / qcow_zstd as f64,
        qcow_zstd as f64 / qcow_zlib as f64
    );
    let path = workdir.join("footprint.img");
    for cluster in CLUSTER_SIZES {
        for alg in ALGORITHMS {
            let compression: Compression = alg.parse().map_err(anyhow::Error::msg)?;
            let _ = fs::remove_file(&path);
            Image::create(
                &path,
                &CreateOptions {
                    size: data.len() as u64,
                    cluster_size: cluster,
                    compression,
                },
            )
            .with_context(|| format!("creating {}", path.display()))?;
            let started = Instant::now();
            let img = Image::open(&path, &OpenOptions::default())?;
            // Like `convert`: the whole disk in 1 MiB writes; the engine finds the zero clusters.
            for (i, chunk) in data.chunks(1 << 20).enumerate() {
                img.write((i as u64) << 20, chunk)?;
            }
            img.flush()?;
            let stats = img.stats();
            img.close()?;
            let secs = started.elapsed().as_secs_f64();
            let host = host_bytes(&path)?;
            eprintln!(
                "footprint: {}K {alg}: host {:.1} MiB, payload {:.1} MiB, {:.1} s",
                cluster >> 10,
                mib(host),
                mib(stats.stored_bytes),
                secs
            );
            let _ = writeln!(
                t,
                "| {}K | {alg} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} |",
                cluster >> 10,
                mib(host),
                mib(stats.stored_bytes),
                (nonzero_4k * 4096) as f64 / host as f64,
                host as f64 / qcow_zstd as f64,
                host as f64 / qcow_zlib as f64,
                data.len() as f64 / 1e6 / secs
            );
        }
    }
    let _ = fs::remove_file(&path);
    Ok(t)
}

fn ram_table(workdir: &Path, all: bool) -> Result<String> {
    const TIB: u64 = 1 << 40;
    let mut t = String::from(
        "\n### Cluster-table RAM of a 1 TiB image (Stats::table_ram_bytes after open)\n\n\
         | cluster | table RAM MiB per TiB | empty image host MiB | create s | open s |\n\
         |---|---:|---:|---:|---:|\n",
    );
    let path = workdir.join("ram-1t.img");
    for cluster in CLUSTER_SIZES {
        if !all && cluster < (64 << 10) {
            continue;
        }
        let _ = fs::remove_file(&path);
        let started = Instant::now();
        Image::create(
            &path,
            &CreateOptions {
                size: TIB,
                cluster_size: cluster,
                compression: Compression::Lz4,
            },
        )
        .with_context(|| format!("creating a 1 TiB image at {}", path.display()))?;
        let create_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let img = Image::open(&path, &OpenOptions::default())?;
        let open_s = started.elapsed().as_secs_f64();
        let ram = img.stats().table_ram_bytes;
        img.close()?;
        let host = host_bytes(&path)?;
        eprintln!(
            "footprint: 1 TiB at {}K: table {:.1} MiB",
            cluster >> 10,
            mib(ram)
        );
        let _ = writeln!(
            t,
            "| {}K | {:.1} | {:.1} | {:.2} | {:.2} |",
            cluster >> 10,
            mib(ram),
            mib(host),
            create_s,
            open_s
        );
    }
    let _ = fs::remove_file(&path);
    Ok(t)
}

/// Open+recovery time of a 100 GiB image (64 KiB clusters) whose journal is nearly full: the
/// commits are made by flushes, then the process "dies" (`Image::abandon`: no close, no
/// checkpoint), and the next open replays the whole journal.
fn recovery_table(workdir: &Path, fill: f64) -> Result<String> {
    const SIZE: u64 = 100 << 30;
    const CLUSTER: u32 = 64 << 10;
    const ENTRIES_PER_COMMIT: usize = 8192;
    let layout = format::Layout::new(SIZE, CLUSTER).map_err(anyhow::Error::msg)?;
    let record_bytes = format::record_blocks(ENTRIES_PER_COMMIT) * 4096;
    // The journal starts after a one-block marker record; stop one record short of a checkpoint.
    let full = ((layout.journal_size - 4096) / record_bytes).saturating_sub(1);
    let commits = ((full as f64 * fill.clamp(0.0, 1.0)) as u64).max(1);
    let path = workdir.join("recovery-100g.img");
    let _ = fs::remove_file(&path);
    Image::create(
        &path,
        &CreateOptions {
            size: SIZE,
            cluster_size: CLUSTER,
            compression: Compression::Lz4,
        },
    )?;
    let opts = OpenOptions {
        // Only our flushes commit.
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    };
    let started = Instant::now();
    let img = Image::open(&path, &opts)?;
    let clean_open_s = started.elapsed().as_secs_f64();
    // Each commit changes ENTRIES_PER_COMMIT clusters spread over the whole disk; the same
    // clusters are rewritten in later commits so the data stays small.
    let stride = layout.cluster_count / ENTRIES_PER_COMMIT as u64;
    // Whole-cluster writes (no read-modify-write), nearly all zeros: cheap to compress, not zero.
    let mut payload = vec![0u8; CLUSTER as usize];
    let fill_started = Instant::now();
    for commit in 0..commits {
        payload[..8].copy_from_slice(&commit.to_le_bytes());
        // Two writer threads, like a guest with two queues.
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..2u64)
                .map(|half| {
                    let (img, mut payload) = (&img, payload.clone());
                    scope.spawn(move || -> Result<()> {
                        for i in (half..ENTRIES_PER_COMMIT as u64).step_by(2) {
                            payload[8..16].copy_from_slice(&i.to_le_bytes());
                            img.write(i * stride * u64::from(CLUSTER), &payload)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
            }
            Ok(())
        })?;
        img.flush()?;
        if commit % 10 == 9 {
            eprintln!(
                "footprint: {} of {commits} commits ({:.0} s)",
                commit + 1,
                fill_started.elapsed().as_secs_f64()
            );
        }
    }
    let stats = img.stats();
    let fill_s = fill_started.elapsed().as_secs_f64();
    if stats.checkpoints != 0 {
        bail!(
            "the journal filled earlier than computed ({} checkpoints): update the bench",
            stats.checkpoints
        );
    }
    img.abandon();
    let journal_used = 4096 + commits * record_bytes;
    eprintln!(
        "footprint: 100 GiB: {commits} commits of {ENTRIES_PER_COMMIT} entries in {fill_s:.1} s; \
         journal {:.1}/{:.1} MiB",
        mib(journal_used),
        mib(layout.journal_size)
    );

    let started = Instant::now();
    let img = Image::open(&path, &opts)?;
    let recovery_s = started.elapsed().as_secs_f64();
    let after = img.stats();
    // The replay really happened: every cluster holds the payload of the last commit.
    let mut check = vec![0u8; CLUSTER as usize];
    for i in [
        0u64,
        ENTRIES_PER_COMMIT as u64 / 2,
        ENTRIES_PER_COMMIT as u64 - 1,
    ] {
        img.read(i * stride * u64::from(CLUSTER), &mut check)?;
        let commit = u64::from_le_bytes(check[..8].try_into()?);
        let index = u64::from_le_bytes(check[8..16].try_into()?);
        if commit != commits - 1 || index != i {
            bail!("after recovery cluster {i} holds commit {commit} index {index}, expected commit {}", commits - 1);
        }
    }
    img.close()?;
    let started = Instant::now();
    let img = Image::open(&path, &opts)?;
    let reopen_s = started.elapsed().as_secs_f64();
    img.close()?;
    let _ = fs::remove_file(&path);

    let mut t = String::from(
        "\n### Open + recovery of a 100 GiB image (64 KiB clusters) with a full journal\n\n\
         | journal used | records replayed | entries replayed | clusters after | open of fresh image s | open + recovery s | open after clean close s |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let _ = writeln!(
        t,
        "| {:.1} of {:.1} MiB | {} | {} | {} | {:.3} | {:.3} | {:.3} |",
        mib(journal_used),
        mib(layout.journal_size),
        commits,
        commits * ENTRIES_PER_COMMIT as u64,
        after.clusters_compressed + after.clusters_raw,
        clean_open_s,
        recovery_s,
        reopen_s
    );
    Ok(t)
}
