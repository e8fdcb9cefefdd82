//! criterion micro-benchmarks of the image engine's hot paths, on the real engine over a real
//! temporary file:
//!
//! - `write_cluster`: compress + place one whole 64 KiB cluster (a fresh cluster each time);
//! - `read_cluster`: read + verify + decompress one whole cluster;
//! - `partial_write_4k`: a 4 KiB write into a stored compressed cluster (read-modify-write; the
//!   write-back buffer is off so that every write pays it);
//! - `seq_write_4k_buffered`: sequential 4 KiB writes through the write-back buffer (default
//!   size), a flush after every 32 (the side-by-side's journal-like workload, without vhost);
//! - `commit`: `flush()` after N clusters were written (data fdatasync + journal record + fdatasync).
//!
//! ```text
//! cargo bench --bench engine                  # all (about 2 minutes)
//! cargo bench --bench engine -- read_cluster  # a criterion filter
//! ```
//!
//! Cluster contents are real data: the non-zero 64 KiB clusters of `.cache/rootfs.img`
//! (`images/build-rootfs.sh`); without it, a deterministic text-like generator (lz4 ratio ~2).

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use insitu_blk::image::{Compression, CreateOptions, Image, OpenOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const CLUSTER: usize = 64 * 1024;
/// Distinct clusters the benches cycle through (64 MiB of data): larger than any cache of
/// decompressed clusters the engine may keep.
const WORKING_SET: usize = 1024;
const DISK: u64 = 4 << 30;

/// Real cluster contents, WORKING_SET of them.
fn sample_clusters() -> Vec<Vec<u8>> {
    let rootfs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/rootfs.img");
    if let Ok(data) = std::fs::read(&rootfs) {
        let clusters: Vec<Vec<u8>> = data
            .chunks_exact(CLUSTER)
            .filter(|c| c.iter().any(|&b| b != 0))
            .map(<[u8]>::to_vec)
            .collect();
        if !clusters.is_empty() {
            return (0..WORKING_SET)
                .map(|i| clusters[i * 7 % clusters.len()].clone())
                .collect();
        }
    }
    eprintln!(
        "engine bench: {} not found, using generated text-like data",
        rootfs.display()
    );
    let words: Vec<String> = (0..4096)
        .map(|i| format!("w{:x}", i * 2654435761u64 % 99991))
        .collect();
    let mut rng = SmallRng::seed_from_u64(7);
    (0..WORKING_SET)
        .map(|_| {
            let mut c = Vec::with_capacity(CLUSTER);
            while c.len() < CLUSTER {
                c.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
                c.push(b' ');
            }
            c.truncate(CLUSTER);
            c
        })
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    image: Image,
}

fn fixture(compression: Compression) -> Fixture {
    fixture_with(compression, OpenOptions::default())
}

fn fixture_with(compression: Compression, opts: OpenOptions) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.img");
    Image::create(
        &path,
        &CreateOptions {
            size: DISK,
            cluster_size: CLUSTER as u32,
            compression,
        },
    )
    .expect("create image");
    let image = Image::open(&path, &opts).expect("open image");
    Fixture { _dir: dir, image }
}

fn fill(image: &Image, clusters: &[Vec<u8>]) {
    for (i, c) in clusters.iter().enumerate() {
        image.write((i * CLUSTER) as u64, c).expect("fill write");
    }
    image.flush().expect("fill flush");
}

const MODES: [Compression; 3] = [
    Compression::None,
    Compression::Lz4,
    Compression::Zstd { level: 1 },
];

fn write_cluster(c: &mut Criterion, clusters: &[Vec<u8>]) {
    let mut group = c.benchmark_group("write_cluster");
    group.throughput(Throughput::Bytes(CLUSTER as u64));
    for mode in MODES {
        let f = fixture(mode);
        let mut i = 0usize;
        group.bench_function(BenchmarkId::from_parameter(mode), |b| {
            b.iter(|| {
                // Walk the disk so every write places a new version of a different cluster; the
                // timer commit (1 s) runs in the background as in production.
                let cluster = i % (DISK as usize / CLUSTER);
                f.image
                    .write((cluster * CLUSTER) as u64, &clusters[i % clusters.len()])
                    .expect("write");
                i += 1;
            })
        });
        f.image.close().expect("close");
    }
    group.finish();
}

fn read_cluster(c: &mut Criterion, clusters: &[Vec<u8>]) {
    let mut group = c.benchmark_group("read_cluster");
    group.throughput(Throughput::Bytes(CLUSTER as u64));
    for mode in MODES {
        let f = fixture(mode);
        fill(&f.image, clusters);
        let mut buf = vec![0u8; CLUSTER];
        let mut i = 0usize;
        group.bench_function(BenchmarkId::from_parameter(mode), |b| {
            b.iter(|| {
                let cluster = i % clusters.len();
                f.image
                    .read((cluster * CLUSTER) as u64, &mut buf)
                    .expect("read");
                i += 1;
            })
        });
        f.image.close().expect("close");
    }
    group.finish();
}

fn partial_write(c: &mut Criterion, clusters: &[Vec<u8>]) {
    let mut group = c.benchmark_group("partial_write_4k");
    group.throughput(Throughput::Bytes(4096));
    for mode in MODES {
        let f = fixture_with(
            mode,
            OpenOptions {
                write_buffer_bytes: 0,
                ..OpenOptions::default()
            },
        );
        fill(&f.image, clusters);
        let mut rng = SmallRng::seed_from_u64(1);
        group.bench_function(BenchmarkId::from_parameter(mode), |b| {
            b.iter(|| {
                let cluster = rng.gen_range(0..clusters.len());
                let block = rng.gen_range(0..CLUSTER / 4096);
                let source = &clusters[(cluster + 1) % clusters.len()];
                f.image
                    .write(
                        (cluster * CLUSTER + block * 4096) as u64,
                        &source[block * 4096..(block + 1) * 4096],
                    )
                    .expect("partial write");
            })
        });
        f.image.close().expect("close");
    }
    group.finish();
}

fn seq_write_buffered(c: &mut Criterion, clusters: &[Vec<u8>]) {
    let mut group = c.benchmark_group("seq_write_4k_buffered");
    group.throughput(Throughput::Bytes(4096));
    for mode in MODES {
        let f = fixture(mode);
        fill(&f.image, clusters);
        let blocks = clusters.len() * CLUSTER / 4096;
        let mut next = 0usize;
        group.bench_function(BenchmarkId::from_parameter(mode), |b| {
            b.iter(|| {
                let block = next % blocks;
                next += 1;
                let source = &clusters[(block * 4096 / CLUSTER + 1) % clusters.len()];
                let at = block * 4096 % CLUSTER;
                f.image
                    .write((block * 4096) as u64, &source[at..at + 4096])
                    .expect("sequential write");
                if next.is_multiple_of(32) {
                    f.image.flush().expect("flush");
                }
            })
        });
        f.image.close().expect("close");
    }
    group.finish();
}

fn commit(c: &mut Criterion, clusters: &[Vec<u8>]) {
    let mut group = c.benchmark_group("commit");
    group.sample_size(10);
    for n in [1usize, 64, 1024] {
        // Only the timed flush commits (no timer commit racing the setup).
        let f = fixture_with(
            Compression::Lz4,
            OpenOptions {
                commit_interval: Duration::from_secs(3600),
                ..OpenOptions::default()
            },
        );
        let mut round = 0usize;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_batched(
                || {
                    // N dirty clusters (not timed), different ones each round.
                    for k in 0..n {
                        let cluster = (round * n + k) % (DISK as usize / CLUSTER);
                        f.image
                            .write((cluster * CLUSTER) as u64, &clusters[k % clusters.len()])
                            .expect("write");
                    }
                    round += 1;
                },
                |()| f.image.flush().expect("flush"),
                BatchSize::PerIteration,
            )
        });
        f.image.close().expect("close");
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let clusters = sample_clusters();
    write_cluster(c, &clusters);
    read_cluster(c, &clusters);
    partial_write(c, &clusters);
    seq_write_buffered(c, &clusters);
    commit(c, &clusters);
}

criterion_group! {
    name = engine;
    // Short runs: the machine is shared.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = benches
}
criterion_main!(engine);
