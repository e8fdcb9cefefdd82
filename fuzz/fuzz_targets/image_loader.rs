//! Fuzzes the image loader: arbitrary bytes as an image (or a valid image with arbitrary patches)
//! through `Image::open_on` read-only and read-write, reads, a write/flush/read-back, and
//! `check_on`. Nothing may panic, hang or allocate by a length read from the file
//! (design.md I4, hostile-guest.md: hostile image files).
//!
//! Input format: first byte selects the mode.
//! - even: the rest of the input is the whole image;
//! - odd: the rest is a list of patches `[u32 LE offset][u8 len][len bytes]` applied to a small
//!   valid image (superblocks, checkpoint, journal records, compressed payloads), optionally
//!   truncated: this is what reaches the decoders behind the checksums.
#![no_main]

use std::sync::{Arc, OnceLock};

use insitu_blk::image::{check_on, Compression, CreateOptions, Image, MemStorage, OpenOptions};
use libfuzzer_sys::fuzz_target;

const CLUSTER: u32 = 16 * 1024;
const CLUSTERS: u64 = 8;
/// Most clusters read from an image that opened (its declared size could be large).
const MAX_READ_CLUSTERS: u64 = 16;

/// A valid image with a checkpoint, journal records after it, and stored payloads.
fn template() -> &'static [u8] {
    static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let storage = Arc::new(MemStorage::new());
        let mut opts = CreateOptions::new(CLUSTERS * u64::from(CLUSTER));
        opts.cluster_size = CLUSTER;
        opts.compression = Compression::Lz4;
        Image::create_on(storage.clone(), &opts).expect("create template");
        let image = Image::open_on(storage.clone(), &OpenOptions::default()).expect("open");
        let text: Vec<u8> = (0..CLUSTER)
            .map(|i| b"insitu-blk fuzz "[i as usize % 16])
            .collect();
        let noise: Vec<u8> = (0..CLUSTER)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        image.write(0, &text).expect("write");
        image.write(u64::from(CLUSTER) * 3, &noise).expect("write");
        image.close().expect("close");
        let image = Image::open_on(storage.clone(), &OpenOptions::default()).expect("reopen");
        image
            .write(u64::from(CLUSTER) * 5 + 512, &text[..4096])
            .expect("write");
        image.flush().expect("flush");
        image.write(u64::from(CLUSTER), &noise).expect("write");
        image.flush().expect("flush");
        let bytes = storage.snapshot();
        drop(image);
        bytes
    })
}

fn build_input(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    if mode % 2 == 0 {
        return rest.to_vec();
    }
    let mut image = template().to_vec();
    let mut rest = rest;
    while rest.len() >= 5 {
        let offset = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let len = usize::from(rest[4]);
        rest = &rest[5..];
        let patch = &rest[..len.min(rest.len())];
        rest = &rest[patch.len()..];
        let start = offset % image.len();
        let end = (start + patch.len()).min(image.len());
        image[start..end].copy_from_slice(&patch[..end - start]);
    }
    if mode & 0x80 != 0 {
        // Truncate to a point chosen by the mode byte.
        let keep = image.len() * usize::from(mode & 0x7e) / 0x7e;
        image.truncate(keep);
    }
    image
}

/// Opens `bytes` and uses the image; returns whether the open succeeded.
fn exercise(bytes: &[u8], read_only: bool) -> bool {
    let storage = Arc::new(MemStorage::from_bytes(bytes.to_vec()));
    let opts = OpenOptions {
        read_only,
        ..OpenOptions::default()
    };
    let Ok(image) = Image::open_on(storage, &opts) else {
        return false;
    };
    let cluster = u64::from(image.geometry().cluster_size);
    let clusters = image.size().div_ceil(cluster).min(MAX_READ_CLUSTERS);
    let mut buf = vec![0u8; cluster as usize];
    for c in 0..clusters {
        let len = cluster.min(image.size() - c * cluster) as usize;
        let _ = image.read(c * cluster, &mut buf[..len]);
    }
    let _ = image.stats();
    if !read_only {
        // An image that opened read-write must store and return data faithfully.
        let len = cluster.min(image.size()) as usize;
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        if image.write(0, &pattern).is_ok() && image.flush().is_ok() {
            let mut back = vec![0u8; len];
            if image.read(0, &mut back).is_ok() {
                assert_eq!(
                    back, pattern,
                    "an opened image returned other data than written"
                );
            }
        }
        let _ = image.close();
    }
    true
}

fuzz_target!(|data: &[u8]| {
    let bytes = build_input(data);
    // A read-write open is stricter than a read-only one: skip it when read-only already failed.
    if exercise(&bytes, true) {
        exercise(&bytes, false);
    }
    let _ = check_on(Arc::new(MemStorage::from_bytes(bytes)), false);
});
