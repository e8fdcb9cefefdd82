//! Corrupt and foreign image files (design.md I4, hostile-guest.md last paragraph; issue #2 item 6).
//!
//! Every scenario runs on a real file (`Image::open`/`check` on a tempfile) and on `MemStorage`
//! (`open_on`/`check_on`). Metadata is located the way the format documents it (docs/FORMAT.md):
//! superblock copies in blocks 0 and 1, checkpoint headers and journal records by their magic on
//! 4 KiB boundaries, payloads by searching for the bytes that were written (stored raw). Expected:
//! - a flipped payload bit: that cluster's read fails with `CorruptPayload`, is counted in
//!   `Stats::checksum_errors`, every other cluster reads fine, `check` reports it;
//! - one bad superblock copy: opens from the other; both bad: refuses with a clear message;
//! - a flipped bit in the table (checkpoint) or the journal: never silently wrong data. Either the
//!   image refuses to open read-write with `CorruptMetadata` while `check` explains, or (when an
//!   older valid copy covers everything) it opens and every cluster reads what was written;
//! - truncated images, raw disks and qcow2 files: `NotAnImage` / `CorruptMetadata`, never a panic.

mod crashsim;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crashsim::workload::{fill, Pattern};
use insitu_blk::image::{
    check, check_on, format, CheckReport, Compression, CreateOptions, Image, ImageError,
    MemStorage, OpenOptions, Result as ImageResult, Storage,
};

const BLOCK: usize = 4096;
const CLUSTER: u32 = 16 * 1024;
const CLUSTERS: u64 = 24;

#[derive(Clone, Copy, Debug)]
enum Backend {
    File,
    Mem,
}

const BACKENDS: [Backend; 2] = [Backend::File, Backend::Mem];

/// What was written: (cluster, content).
type Written = Vec<(u64, Vec<u8>)>;

/// Creates an image on `backend`, runs `work` on it, then either closes it (`close`) or flushes
/// and takes its bytes while it is still open (a crash right after a FLUSH: the journal holds
/// commits that no checkpoint has yet). Returns the image bytes.
fn build(
    backend: Backend,
    compression: Compression,
    close: bool,
    work: &dyn Fn(&Image),
) -> Vec<u8> {
    let mut opts = CreateOptions::new(CLUSTERS * u64::from(CLUSTER));
    opts.cluster_size = CLUSTER;
    opts.compression = compression;
    match backend {
        Backend::File => {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("img.insitu");
            Image::create(&path, &opts).expect("create");
            let image = Image::open(&path, &OpenOptions::default()).expect("open");
            work(&image);
            if close {
                image.close().expect("close");
                std::fs::read(&path).expect("read image file")
            } else {
                image.flush().expect("flush");
                let bytes = std::fs::read(&path).expect("read image file");
                drop(image);
                bytes
            }
        }
        Backend::Mem => {
            let storage = Arc::new(MemStorage::new());
            Image::create_on(storage.clone(), &opts).expect("create_on");
            let image = Image::open_on(storage.clone(), &OpenOptions::default()).expect("open_on");
            work(&image);
            if close {
                image.close().expect("close");
                storage.snapshot()
            } else {
                image.flush().expect("flush");
                let bytes = storage.snapshot();
                drop(image);
                bytes
            }
        }
    }
}

/// An image file or memory holding `bytes`, opened and checked through the backend's own API.
struct Corrupted {
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
    path: Option<PathBuf>,
    bytes: Vec<u8>,
}

impl Corrupted {
    fn new(backend: Backend, bytes: Vec<u8>) -> Self {
        match backend {
            Backend::File => {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("corrupt.img");
                std::fs::write(&path, &bytes).expect("write image file");
                Corrupted {
                    backend,
                    _dir: Some(dir),
                    path: Some(path),
                    bytes,
                }
            }
            Backend::Mem => Corrupted {
                backend,
                _dir: None,
                path: None,
                bytes,
            },
        }
    }

    fn from_file(path: &Path) -> Self {
        let bytes = std::fs::read(path).expect("read file");
        Corrupted {
            backend: Backend::File,
            _dir: None,
            path: Some(path.to_path_buf()),
            bytes,
        }
    }

    fn open(&self, read_only: bool) -> ImageResult<Image> {
        let opts = OpenOptions {
            read_only,
            ..OpenOptions::default()
        };
        match self.backend {
            Backend::File => Image::open(self.path.as_ref().expect("file"), &opts),
            Backend::Mem => {
                let storage: Arc<dyn Storage> =
                    Arc::new(MemStorage::from_bytes(self.bytes.clone()));
                Image::open_on(storage, &opts)
            }
        }
    }

    fn check(&self) -> ImageResult<CheckReport> {
        match self.backend {
            Backend::File => check(self.path.as_ref().expect("file"), false),
            Backend::Mem => {
                let storage: Arc<dyn Storage> =
                    Arc::new(MemStorage::from_bytes(self.bytes.clone()));
                check_on(storage, false)
            }
        }
    }
}

fn flip_bit(bytes: &mut [u8], offset: usize, bit: u8) {
    bytes[offset] ^= 1 << (bit % 8);
}

/// Offsets of 4 KiB blocks starting with `magic`.
fn blocks_with_magic(bytes: &[u8], magic: &[u8]) -> Vec<usize> {
    (0..bytes.len() / BLOCK)
        .map(|b| b * BLOCK)
        .filter(|&off| bytes[off..].starts_with(magic))
        .collect()
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes distinct incompressible content (stored raw, findable) to clusters 0, 5 and 11.
fn write_three(image: &Image) -> Written {
    let mut written = Vec::new();
    for (i, c) in [0u64, 5, 11].into_iter().enumerate() {
        let data = fill(
            Pattern::Incompressible,
            1000 + i as u64,
            c * u64::from(CLUSTER),
            CLUSTER as usize,
        );
        image.write(c * u64::from(CLUSTER), &data).expect("write");
        written.push((c, data));
    }
    written
}

fn expected_contents() -> Written {
    [0u64, 5, 11]
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            (
                c,
                fill(
                    Pattern::Incompressible,
                    1000 + i as u64,
                    c * u64::from(CLUSTER),
                    CLUSTER as usize,
                ),
            )
        })
        .collect()
}

/// Reads every cluster; returns the clusters whose content differs from `written` (unwritten
/// clusters must read as zeros) or whose read failed.
fn wrong_clusters(image: &Image, written: &Written) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut buf = vec![0u8; CLUSTER as usize];
    for c in 0..CLUSTERS {
        let expected = written
            .iter()
            .find(|(wc, _)| *wc == c)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| vec![0u8; CLUSTER as usize]);
        match image.read(c * u64::from(CLUSTER), &mut buf) {
            Ok(()) if buf == expected => {}
            Ok(()) => wrong.push(format!("cluster {c}: wrong data")),
            Err(e) => wrong.push(format!("cluster {c}: {e}")),
        }
    }
    wrong
}

fn is_metadata_refusal(err: &ImageError) -> bool {
    matches!(
        err,
        ImageError::CorruptMetadata(_) | ImageError::NotAnImage(_)
    )
}

// ---------------------------------------------------------------------------------------------

#[test]
fn flipped_payload_bit_fails_that_cluster_only_and_is_counted() {
    for backend in BACKENDS {
        for compression in [Compression::None, Compression::Lz4] {
            let mut bytes = build(backend, compression, true, &|image| {
                write_three(image);
            });
            // Cluster 5's content is incompressible, so it is stored raw: find it.
            let written = expected_contents();
            let needle = &written[1].1[..64];
            let at = (0..bytes.len() / BLOCK)
                .map(|b| b * BLOCK)
                .find(|&off| bytes[off..].starts_with(needle))
                .unwrap_or_else(|| panic!("{backend:?}: cluster 5's payload not found"));
            flip_bit(&mut bytes, at + 1234, 3);
            let img = Corrupted::new(backend, bytes);
            let report = img.check().expect("check runs on a payload-corrupt image");
            assert!(
                report.corruptions.iter().any(|c| c.contains("cluster 5")),
                "{backend:?}: check does not name cluster 5: {:?}",
                report.corruptions
            );
            // Read-only first: the read-write pass heals the cluster (on the file itself).
            for read_only in [true, false] {
                let image = img
                    .open(read_only)
                    .unwrap_or_else(|e| panic!("{backend:?}: open with a bad payload: {e}"));
                let mut buf = vec![0u8; CLUSTER as usize];
                let err = image
                    .read(5 * u64::from(CLUSTER), &mut buf)
                    .expect_err("reading a corrupt payload must fail");
                assert!(
                    matches!(err, ImageError::CorruptPayload { cluster: 5, .. }),
                    "{backend:?}: wrong error for a corrupt payload: {err:?}"
                );
                // A sub-cluster read of the same cluster fails too; other clusters are fine.
                assert!(image
                    .read(5 * u64::from(CLUSTER) + 512, &mut buf[..512])
                    .is_err());
                assert!(image.stats().checksum_errors >= 2, "{:?}", image.stats());
                let wrong = wrong_clusters(&image, &written);
                assert_eq!(wrong.len(), 1, "{backend:?}: {wrong:?}");
                assert!(wrong[0].starts_with("cluster 5:"), "{wrong:?}");
                if !read_only {
                    // Rewriting the whole cluster heals it.
                    image
                        .write(5 * u64::from(CLUSTER), &written[1].1)
                        .expect("rewrite");
                    assert!(wrong_clusters(&image, &written).is_empty());
                }
            }
        }
    }
}

#[test]
fn one_bad_superblock_copy_opens_from_the_other() {
    for backend in BACKENDS {
        for copy in 0..2usize {
            let bytes = build(backend, Compression::Lz4, true, &|image| {
                write_three(image);
            });
            let mut bad = bytes.clone();
            // Geometry field (logical size): the magic stays, the checksum fails.
            flip_bit(&mut bad, copy * BLOCK + 25, 1);
            let img = Corrupted::new(backend, bad);
            let image = img.open(false).unwrap_or_else(|e| {
                panic!("{backend:?}: superblock copy {copy} bad, other good, open failed: {e}")
            });
            assert!(wrong_clusters(&image, &expected_contents()).is_empty());
            drop(image);
            let report = img.check().expect("check");
            assert!(
                !report.corruptions.is_empty(),
                "{backend:?}: check is silent about bad superblock copy {copy}"
            );
        }
    }
}

#[test]
fn both_superblock_copies_bad_refuses_with_a_clear_message() {
    for backend in BACKENDS {
        let mut bytes = build(backend, Compression::Lz4, true, &|image| {
            write_three(image);
        });
        flip_bit(&mut bytes, 33, 0);
        flip_bit(&mut bytes, BLOCK + 4000, 7);
        let img = Corrupted::new(backend, bytes);
        for read_only in [false, true] {
            let err = img
                .open(read_only)
                .expect_err("opened with both superblocks bad");
            assert!(
                matches!(err, ImageError::CorruptMetadata(_)),
                "{backend:?}: {err:?}"
            );
            assert!(
                err.to_string().to_lowercase().contains("superblock"),
                "{backend:?}: message does not say what is wrong: {err}"
            );
        }
        match img.check() {
            Ok(report) => assert!(!report.corruptions.is_empty()),
            Err(e) => assert!(is_metadata_refusal(&e), "{e:?}"),
        }
    }
}

/// Either refuses read-write (CorruptMetadata, check explains) or opens with every cluster right;
/// a read-only open that works must not return wrong data either. `Err` describes a violation.
fn refuses_or_is_exact(img: &Corrupted, what: &str) -> Result<&'static str, String> {
    let written = expected_contents();
    let backend = img.backend;
    // Read-only access (serve --read-only, convert) either refuses or returns exact data:
    // falling back to older metadata without the newer commits is silently wrong data.
    let read_only_wrong = match img.open(true) {
        Ok(image) => {
            let wrong: Vec<String> = wrong_clusters(&image, &written)
                .into_iter()
                .filter(|w| w.ends_with("wrong data"))
                .collect();
            (!wrong.is_empty()).then(|| {
                format!("{backend:?}: {what}: read-only open returns wrong data: {wrong:?}")
            })
        }
        Err(_) => None,
    };
    let outcome = match img.open(false) {
        Err(err) => {
            if !matches!(err, ImageError::CorruptMetadata(_)) {
                return Err(format!(
                    "{backend:?}: {what}: open refused with the wrong kind of error: {err:?}"
                ));
            }
            match img.check() {
                Ok(report) if !report.corruptions.is_empty() => {}
                Ok(_) => {
                    return Err(format!(
                        "{backend:?}: {what}: open refused ({err}) but check reports nothing"
                    ))
                }
                Err(e) => return Err(format!("{backend:?}: {what}: check failed: {e}")),
            }
            "refused read-write"
        }
        Ok(image) => {
            let wrong = wrong_clusters(&image, &written);
            if !wrong.is_empty() {
                return Err(format!(
                    "{backend:?}: {what}: opened read-write but the data is not what was \
                     written and flushed (silently wrong or lost): {wrong:?}"
                ));
            }
            "recovered exactly"
        }
    };
    match read_only_wrong {
        Some(msg) => Err(msg),
        None => Ok(outcome),
    }
}

#[test]
fn flipped_bit_in_the_checkpoint_is_detected() {
    let mut failures = Vec::new();
    for backend in BACKENDS {
        let bytes = build(backend, Compression::Lz4, true, &|image| {
            write_three(image);
        });
        let headers = blocks_with_magic(&bytes, b"INSITUCP");
        assert!(
            !headers.is_empty(),
            "{backend:?}: no checkpoint header found"
        );
        // The newest checkpoint (highest sequence number, u64 at byte 16).
        let newest = *headers
            .iter()
            .max_by_key(|&&off| le_u64(&bytes, off + 16))
            .expect("one");
        // In its header (the uuid field), and in its first table chunk (the block after the
        // header; entries from byte 16: cluster 0's entry).
        for (label, offset) in [
            ("checkpoint header", newest + 40),
            ("checkpoint table chunk", newest + BLOCK + 16 + 5),
        ] {
            let mut bad = bytes.clone();
            flip_bit(&mut bad, offset, 2);
            let img = Corrupted::new(backend, bad);
            match refuses_or_is_exact(&img, label) {
                Ok(outcome) => eprintln!("{backend:?}: {label}: {outcome}"),
                Err(msg) => failures.push(msg),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The three writes of [`expected_contents`], each flushed: one journal record per commit.
/// Returns the image bytes taken after the last flush, before any checkpoint (as a crash would
/// leave them), and the offsets of the journal records in commit order.
fn commit_each_write(backend: Backend) -> (Vec<u8>, Vec<usize>) {
    let bytes = build(backend, Compression::Lz4, false, &|image| {
        for (c, data) in expected_contents() {
            image.write(c * u64::from(CLUSTER), &data).expect("write");
            image.flush().expect("flush");
        }
    });
    let mut records = blocks_with_magic(&bytes, b"INSITUJR");
    records.sort_by_key(|&off| le_u64(&bytes, off + 8));
    (bytes, records)
}

#[test]
fn flipped_bit_in_a_journal_record_is_detected() {
    let mut failures = Vec::new();
    for backend in BACKENDS {
        let (bytes, records) = commit_each_write(backend);
        assert!(
            records.len() >= 3,
            "{backend:?}: expected a journal record per commit, found {}",
            records.len()
        );
        // The same copy uncorrupted recovers every flushed write.
        let good = Corrupted::new(backend, bytes.clone());
        let image = good.open(false).expect("recovery of an intact journal");
        assert!(wrong_clusters(&image, &expected_contents()).is_empty());
        drop(image);
        // A record in the middle of the journal (valid records follow it): its entry bytes
        // (after the 48-byte header).
        let middle = records[records.len() - 2];
        let mut bad = bytes;
        flip_bit(&mut bad, middle + 48 + 6, 4);
        let img = Corrupted::new(backend, bad);
        match refuses_or_is_exact(&img, "journal record in the middle") {
            Ok(outcome) => eprintln!("{backend:?}: journal record in the middle: {outcome}"),
            Err(msg) => failures.push(msg),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn truncated_images_are_refused_without_panic() {
    for backend in BACKENDS {
        let bytes = build(backend, Compression::Lz4, true, &|image| {
            write_three(image);
        });
        let total = bytes.len();
        for len in [
            0,
            100,
            BLOCK,
            BLOCK + 1,
            2 * BLOCK,
            total / 2,
            total - BLOCK,
        ] {
            let img = Corrupted::new(backend, bytes[..len].to_vec());
            for read_only in [false, true] {
                match img.open(read_only) {
                    Err(err) => assert!(
                        is_metadata_refusal(&err),
                        "{backend:?}: truncated to {len} of {total}: {err:?}"
                    ),
                    Ok(_) => panic!(
                        "{backend:?}: image truncated to {len} of {total} bytes opened \
                         (read_only={read_only})"
                    ),
                }
            }
            match img.check() {
                Ok(report) => assert!(!report.corruptions.is_empty(), "{len}"),
                Err(err) => assert!(is_metadata_refusal(&err), "{len}: {err:?}"),
            }
        }
    }
}

fn assert_not_an_image(img: &Corrupted, what: &str) {
    for read_only in [false, true] {
        match img.open(read_only) {
            Err(ImageError::NotAnImage(msg)) => assert!(!msg.is_empty()),
            Err(other) => panic!("{what}: expected NotAnImage, got {other:?}"),
            Ok(_) => panic!("{what}: opened as an insitu-blk image"),
        }
    }
    match img.check() {
        Err(ImageError::NotAnImage(_)) => {}
        Ok(report) => assert!(
            !report.corruptions.is_empty(),
            "{what}: check found nothing"
        ),
        Err(other) => panic!("{what}: check: expected NotAnImage, got {other:?}"),
    }
}

#[test]
fn raw_disk_images_are_not_images() {
    let mut mbr = vec![0u8; 1 << 20];
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    let random = fill(Pattern::Incompressible, 7, 0, 1 << 20);
    for (what, bytes) in [
        ("zeros", vec![0u8; 1 << 20]),
        ("raw disk with an MBR", mbr),
        ("random bytes", random),
    ] {
        for backend in BACKENDS {
            assert_not_an_image(&Corrupted::new(backend, bytes.clone()), what);
        }
    }
}

#[test]
fn qcow2_image_is_not_an_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .status()
        .expect("qemu-img is installed (see facts.md)");
    assert!(status.success());
    let file = Corrupted::from_file(&path);
    assert_not_an_image(&file, "qcow2 file");
    assert_not_an_image(
        &Corrupted::new(Backend::Mem, file.bytes.clone()),
        "qcow2 bytes",
    );
}

#[test]
fn superblock_magic_with_garbage_after_it_is_corrupt_not_a_panic() {
    // A block that starts like a superblock but is otherwise random, with a valid-looking
    // checksum nowhere: must be refused as corrupt metadata.
    let mut bytes = fill(Pattern::Incompressible, 9, 0, 1 << 20);
    bytes[..8].copy_from_slice(b"INSITUBK");
    bytes[BLOCK..BLOCK + 8].copy_from_slice(b"INSITUBK");
    for backend in BACKENDS {
        let img = Corrupted::new(backend, bytes.clone());
        let err = img.open(false).expect_err("opened garbage");
        assert!(is_metadata_refusal(&err), "{err:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile content behind valid checksums (hostile-guest.md, last paragraph): metadata and
// payloads crafted with the format's own codecs (insitu_blk::image::format), so every checksum
// matches and only the loader's and the decoders' validation stand in the way.

/// The newest checkpoint's first table chunk: (offset of the chunk, its sequence number).
fn newest_chunk(bytes: &[u8]) -> (usize, u64) {
    let header = *blocks_with_magic(bytes, b"INSITUCP")
        .iter()
        .max_by_key(|&&off| le_u64(bytes, off + 16))
        .expect("a checkpoint");
    let chunk = header + BLOCK;
    (chunk, le_u64(bytes, chunk))
}

/// Offset of cluster `c`'s 16-byte entry in chunk 0.
fn entry_at(chunk: usize, c: usize) -> usize {
    chunk + 16 + c * 16
}

fn layout() -> format::Layout {
    format::Layout::new(CLUSTERS * u64::from(CLUSTER), CLUSTER).expect("layout")
}

/// Replaces cluster 5's entry with `entry` (raw 16 bytes) and reseals the chunk.
fn with_entry(bytes: &[u8], entry: [u8; 16]) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    let (chunk, seq) = newest_chunk(&bytes);
    let at = entry_at(chunk, 5);
    bytes[at..at + 16].copy_from_slice(&entry);
    format::seal_chunk(&mut bytes[chunk..chunk + BLOCK], seq, 0);
    bytes
}

fn entry_bytes(e: format::DiskEntry) -> [u8; 16] {
    let mut out = [0u8; 16];
    e.encode(&mut out);
    out
}

/// Refused with CorruptMetadata (check explains), or opened with cluster 5 failing its reads
/// and every other cluster intact. Never cluster 5 silently returning some data.
fn refused_or_cluster_5_fails(img: &Corrupted, what: &str) -> Result<&'static str, String> {
    let backend = img.backend;
    let outcome = match img.open(false) {
        Err(ImageError::CorruptMetadata(_)) => {
            match img.check() {
                Ok(r) if !r.corruptions.is_empty() => {}
                other => {
                    return Err(format!(
                        "{backend:?}: {what}: refused, but check does not explain: {other:?}"
                    ))
                }
            }
            "refused read-write"
        }
        Err(other) => return Err(format!("{backend:?}: {what}: wrong error {other:?}")),
        Ok(image) => {
            let wrong = wrong_clusters(&image, &expected_contents());
            if wrong.len() != 1
                || !wrong[0].starts_with("cluster 5: ")
                || wrong[0].ends_with("wrong data")
            {
                return Err(format!(
                    "{backend:?}: {what}: opened; expected only cluster 5 to fail its read, got \
                     {wrong:?}"
                ));
            }
            "opened, cluster 5 fails its reads"
        }
    };
    Ok(outcome)
}

#[test]
fn table_entries_pointing_outside_or_into_other_clusters_are_refused() {
    let lay = layout();
    let slots = lay.slot_count() as u32;
    let mut failures = Vec::new();
    for backend in BACKENDS {
        let bytes = build(backend, Compression::None, true, &|image| {
            write_three(image);
        });
        let (chunk, _) = newest_chunk(&bytes);
        let decode = |c: usize| {
            let at = entry_at(chunk, c);
            format::DiskEntry::decode(&bytes[at..at + 16], &lay).expect("valid entry")
        };
        let five = decode(5);
        let zero = decode(0);
        assert_eq!(
            five.alg,
            format::alg::RAW,
            "incompressible data is stored raw"
        );
        let mut reserved = entry_bytes(five);
        reserved[11] = 1;
        let cases: Vec<(&str, [u8; 16])> = vec![
            (
                "slot just past the last slot",
                entry_bytes(format::DiskEntry {
                    slot: slots,
                    ..five
                }),
            ),
            (
                "slot u32::MAX",
                entry_bytes(format::DiskEntry {
                    slot: u32::MAX,
                    ..five
                }),
            ),
            (
                "units running past the end of the slot",
                entry_bytes(format::DiskEntry {
                    unit: 3,
                    units: 2,
                    alg: format::alg::LZ4,
                    ..five
                }),
            ),
            (
                "zero units",
                entry_bytes(format::DiskEntry {
                    unit: 0,
                    units: 0,
                    alg: format::alg::LZ4,
                    ..five
                }),
            ),
            (
                "unknown algorithm",
                entry_bytes(format::DiskEntry { alg: 9, ..five }),
            ),
            ("non-zero reserved byte", reserved),
            (
                "the same slot and units as cluster 0 (valid crc)",
                entry_bytes(zero),
            ),
        ];
        for (what, entry) in cases {
            let img = Corrupted::new(backend, with_entry(&bytes, entry));
            match refused_or_cluster_5_fails(&img, what) {
                Ok(outcome) => eprintln!("{backend:?}: {what}: {outcome}"),
                Err(msg) => failures.push(msg),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn payloads_that_decode_to_the_wrong_size_fail_their_cluster_only() {
    let lay = layout();
    let cluster = CLUSTER as usize;
    let short = vec![7u8; 1000];
    let long = vec![7u8; 2 * cluster];
    let lz4 = |d: &[u8]| lz4_flex::block::compress(d);
    let snappy = |d: &[u8]| snap::raw::Encoder::new().compress_vec(d).expect("snappy");
    let zstd = |d: &[u8]| zstd::bulk::compress(d, 1).expect("zstd");
    let cases: Vec<(&str, u8, Vec<u8>)> = vec![
        ("lz4 decoding to 1000 bytes", format::alg::LZ4, lz4(&short)),
        ("lz4 decoding to 2 clusters", format::alg::LZ4, lz4(&long)),
        (
            "snappy decoding to 1000 bytes",
            format::alg::SNAPPY,
            snappy(&short),
        ),
        (
            "snappy decoding to 2 clusters",
            format::alg::SNAPPY,
            snappy(&long),
        ),
        (
            "zstd decoding to 1000 bytes",
            format::alg::ZSTD,
            zstd(&short),
        ),
        (
            "zstd decoding to 2 clusters",
            format::alg::ZSTD,
            zstd(&long),
        ),
        ("lz4 garbage", format::alg::LZ4, vec![0xF0; 300]),
        (
            "zstd garbage",
            format::alg::ZSTD,
            vec![0x28, 0xB5, 0x2F, 0xFD, 0xFF, 0xFF, 0xFF],
        ),
    ];
    let mut failures = Vec::new();
    for backend in BACKENDS {
        let bytes = build(backend, Compression::None, true, &|image| {
            write_three(image);
        });
        let (chunk, _) = newest_chunk(&bytes);
        let at = entry_at(chunk, 5);
        let five = format::DiskEntry::decode(&bytes[at..at + 16], &lay).expect("entry");
        let region = lay.region_offset(five.slot, 0) as usize;
        for (what, code, body) in cases.iter().cloned() {
            // Stored form: u32 LE body length, body, zero padding to whole 4 KiB units.
            let mut stored = (body.len() as u32).to_le_bytes().to_vec();
            stored.extend_from_slice(&body);
            let units = stored.len().div_ceil(BLOCK).clamp(1, cluster / BLOCK);
            stored.resize(units * BLOCK, 0);
            let mut bad = bytes.clone();
            bad[region..region + stored.len()].copy_from_slice(&stored);
            let entry = format::DiskEntry {
                slot: five.slot,
                crc: crc32c::crc32c(&stored),
                unit: 0,
                units: units as u8,
                alg: code,
            };
            let bad = with_entry(&bad, entry_bytes(entry));
            let img = Corrupted::new(backend, bad);
            match refused_or_cluster_5_fails(&img, what) {
                Ok(outcome) => eprintln!("{backend:?}: {what}: {outcome}"),
                Err(msg) => failures.push(msg),
            }
        }
        // A length prefix larger than the stored units.
        let mut stored = vec![0u8; BLOCK];
        stored[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut bad = bytes.clone();
        bad[region..region + BLOCK].copy_from_slice(&stored);
        let entry = format::DiskEntry {
            slot: five.slot,
            crc: crc32c::crc32c(&stored),
            unit: 0,
            units: 1,
            alg: format::alg::LZ4,
        };
        let img = Corrupted::new(backend, with_entry(&bad, entry_bytes(entry)));
        if let Err(msg) = refused_or_cluster_5_fails(&img, "length prefix u32::MAX") {
            failures.push(msg);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `check --repair` of a journal whose middle record is damaged keeps what the records after it
/// committed (it used to write a checkpoint without them, punch their payloads as leaks, and
/// leave the old records where the next open found them again). The damaged record's own change
/// is gone: that cluster reads as it was before (zeros here), never as garbage. Afterwards the
/// image opens read-write, checks clean, and stays so across a close and a reopen.
#[test]
fn repair_of_a_damaged_journal_record_keeps_the_commits_after_it() {
    for backend in BACKENDS {
        let (bytes, records) = commit_each_write(backend);
        // The record of the second write (cluster 5); cluster 11's record follows it.
        let middle = records[records.len() - 2];
        let mut bad = bytes;
        flip_bit(&mut bad, middle + 48 + 6, 4);
        let storage = Arc::new(MemStorage::from_bytes(bad));
        let before = check_on(storage.clone(), false).expect("check");
        assert!(
            !before.corruptions.is_empty(),
            "{backend:?}: the damaged record went unnoticed"
        );
        let repaired = check_on(storage.clone(), true).expect("repair");
        eprintln!("{backend:?}: repairs: {:#?}", repaired.repairs);
        // The damaged record's commit is named as lost, and the space no entry refers to any
        // more (it may hold that commit's data) is left for a later repair.
        assert!(
            repaired.unrecovered.iter().any(|s| s.contains("commit ")),
            "{backend:?}: the repair does not say which commit it lost: {repaired:#?}"
        );
        let after = check_on(storage.clone(), false).expect("check after repair");
        assert!(
            after.corruptions.is_empty(),
            "{backend:?}: not consistent after repair: {after:#?}"
        );
        if after.leaked_bytes > 0 {
            let again = check_on(storage.clone(), true).expect("second repair");
            assert!(again.unrecovered.is_empty(), "{again:#?}");
            let after = check_on(storage.clone(), false).expect("check after the second repair");
            assert!(
                after.corruptions.is_empty() && after.leaked_bytes == 0,
                "{backend:?}: not clean after the second repair: {after:#?}"
            );
        }
        let mut expected = expected_contents();
        // Cluster 5's commit is the damaged one: it reads as before that commit (zeros).
        expected.retain(|(c, _)| *c != 5);
        let image = Image::open_on(storage.clone(), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{backend:?}: refuses to open after repair: {e}"));
        let wrong = wrong_clusters(&image, &expected);
        assert!(wrong.is_empty(), "{backend:?}: after repair: {wrong:?}");
        // The repair lost a commit: a guest still running on the image is told once.
        assert!(
            image.recovered_after_unclean_shutdown(),
            "{backend:?}: the repair dropped the lost-write notice"
        );
        image.flush().expect("flush");
        image.close().expect("close");
        let image = Image::open_on(storage.clone(), &OpenOptions::default()).expect("reopen");
        assert!(
            !image.recovered_after_unclean_shutdown(),
            "{backend:?}: a FLUSH and a clean close after the repair still report a loss"
        );
        assert!(wrong_clusters(&image, &expected).is_empty());
        image.close().expect("close");
        let last = check_on(storage, false).expect("final check");
        assert!(last.corruptions.is_empty(), "{backend:?}: {last:#?}");
    }
}

/// R19: `check --repair` of an image whose newest checkpoint is damaged, after the journal's next
/// cycle overwrote the oldest records of the cycle before it. Those commits are gone for good
/// (neither checkpoint nor journal holds them): the repair must say so (the CLI exits 2), and must
/// not punch the space their payloads still occupy (it used to report a clean image, and release
/// the only copy of a flushed cluster as "unreferenced").
#[test]
fn repair_after_a_lost_checkpoint_names_the_commits_it_cannot_recover_and_keeps_their_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cp.img");
    let size = 16u64 << 20;
    let cs = 65536usize;
    Image::create(
        &path,
        &CreateOptions {
            size,
            cluster_size: cs as u32,
            compression: Compression::None,
        },
    )
    .expect("create");
    let img = Image::open(&path, &OpenOptions::default()).expect("open");
    let early = fill(Pattern::Incompressible, 5, 0, cs);
    img.write(5 * cs as u64, &early).expect("write");
    img.flush().expect("flush");
    // Flushed commits until the journal has been checkpointed, then some that reuse its start.
    let mut k = 0u64;
    let mut after_checkpoint = 0;
    while after_checkpoint < 20 {
        img.write(
            7 * cs as u64,
            &fill(Pattern::Incompressible, 1000 + k, 0, cs),
        )
        .expect("write");
        img.flush().expect("flush");
        k += 1;
        if img.stats().checkpoints > 0 {
            after_checkpoint += 1;
        }
        assert!(k < 100_000, "the journal never filled");
    }
    img.abandon();
    let storage = insitu_blk::image::FileStorage::open(&path, false).expect("open file");
    let sb = format::Superblock::decode(&read_block(&storage, 0)).expect("superblock");
    let newest = (0..2)
        .filter_map(|area| {
            let at = sb.layout.checkpoint_offsets[area];
            format::CheckpointHeader::decode(&read_block(&storage, at), &sb.layout, &sb.uuid)
                .ok()
                .map(|h| (h.seq, at))
        })
        .max()
        .expect("a checkpoint");
    assert!(newest.0 > 0, "no checkpoint was written by the workload");
    let mut header = read_block(&storage, newest.1);
    header[BLOCK - 1] ^= 0x5a; // its checksum
    storage.write_at(newest.1, &header).expect("damage");
    storage.flush().expect("flush");
    drop(storage);
    let allocated_before = allocated(&path);

    let run = Command::new(env!("CARGO_BIN_EXE_insitu-blk"))
        .args(["check", "--repair"])
        .arg(&path)
        .output()
        .expect("run check --repair");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(
        run.status.code(),
        Some(2),
        "a repair that lost commits must not report success: {stdout}"
    );
    assert!(stdout.contains("could NOT recover"), "{stdout}");
    assert!(
        stdout.contains("commits 1 to") || stdout.contains("commit 1 "),
        "{stdout}"
    );
    assert!(
        allocated(&path) >= allocated_before,
        "the repair released space that may hold the lost commits' data"
    );
    // Consistent now: it opens, and the newest commits survived.
    let img = Image::open(&path, &OpenOptions::default()).expect("opens after repair");
    let mut got = vec![0u8; cs];
    img.read(7 * cs as u64, &mut got).expect("read");
    assert_eq!(got, fill(Pattern::Incompressible, 1000 + k - 1, 0, cs));
    img.close().expect("close");
    assert!(check(&path, false).expect("check").corruptions.is_empty());
}

fn read_block(storage: &dyn Storage, at: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    storage.read_at(at, &mut b).expect("read");
    b
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Reviewer R27: `check --repair` of an image left by a killed backend (completed, unflushed writes
/// lost) keeps the lost-write notice: the backend started after the repair tells a guest still
/// running on the image (its next FLUSH fails once) instead of declaring the lost writes durable.
/// Once told (a clean close after that open), the notice is gone.
#[test]
fn repair_of_a_crashed_image_keeps_the_lost_write_notice() {
    let storage = Arc::new(MemStorage::new());
    Image::create_on(
        storage.clone(),
        &CreateOptions {
            size: CLUSTERS * u64::from(CLUSTER),
            cluster_size: CLUSTER,
            compression: Compression::Lz4,
        },
    )
    .expect("create");
    let img = Image::open_on(storage.clone(), &OpenOptions::default()).expect("open");
    img.write(0, &fill(Pattern::Mixed, 1, 0, CLUSTER as usize))
        .expect("write");
    img.flush().expect("flush");
    img.write(
        u64::from(CLUSTER),
        &fill(Pattern::Mixed, 2, 0, CLUSTER as usize),
    )
    .expect("completed, never flushed");
    img.abandon(); // the backend is killed
    let repaired = check_on(storage.clone(), true).expect("repair");
    assert!(
        repaired
            .repairs
            .iter()
            .any(|r| r.contains("lost-write notice")),
        "{repaired:#?}"
    );
    let img = Image::open_on(storage.clone(), &OpenOptions::default()).expect("open");
    assert!(
        img.recovered_after_unclean_shutdown(),
        "the repair erased the lost-write notice of a crashed image"
    );
    // The notice is carried until a FLUSH succeeds (the guest was told, or is a new one).
    img.flush().expect("flush");
    img.close().expect("close");
    let img = Image::open_on(storage.clone(), &OpenOptions::default()).expect("reopen");
    assert!(!img.recovered_after_unclean_shutdown());
    img.close().expect("close");
}
