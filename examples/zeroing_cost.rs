//! How long one DISCARD / WRITE_ZEROES request can keep a queue busy (reviewer finding F4): the
//! worst requests the advertised limits allow, executed by the real virtio-blk layer on the real
//! engine, timed one by one. A queue's worker holds its gate for that long, and a GET_VRING_BASE
//! (VM pause, migration) waits for it.
//!
//! `cargo run --release --example zeroing_cost [DIR]` (DIR: where the images go, default the
//! system temp dir; needs about 80 MiB and a filesystem with sparse files and hole punching).

use std::sync::Arc;
use std::time::Instant;

use insitu_blk::blk::{BlkConfig, BlkDevice};
use insitu_blk::image::{CreateOptions, Image, OpenOptions};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GIB: u64 = 1 << 30;
const HDR: u64 = 0x1_0000;
const SEGMENTS: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const DATA: u64 = 0x10_0000;

fn features() -> u64 {
    (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES) | (1 << VIRTIO_BLK_F_FLUSH)
}

/// Executes one request made of a header, optional read-only payload and a status byte.
fn run(
    dev: &BlkDevice,
    mem: &GuestMemoryMmap,
    request_type: u32,
    sector: u64,
    payload: &[u8],
) -> u8 {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HDR)).unwrap();
    let payload_at = if request_type == VIRTIO_BLK_T_OUT {
        DATA
    } else {
        SEGMENTS
    };
    mem.write_slice(payload, GuestAddress(payload_at)).unwrap();
    mem.write_slice(&[0xAA], GuestAddress(STATUS)).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let table = [
        SplitDescriptor::new(HDR, 16, next, 1),
        SplitDescriptor::new(payload_at, payload.len() as u32, next, 2),
        SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    let vq = MockSplitQueue::new(mem, 16);
    for (i, d) in table.iter().enumerate() {
        vq.desc_table()
            .store(i as u16, RawDescriptor::from(*d))
            .unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
    vq.avail().idx().store(1u16.to_le());
    let mut queue: Queue = vq.create_queue().unwrap();
    let chain = queue.iter(mem).unwrap().next().unwrap();
    dev.process_chain(chain, features());
    mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
}

fn segments(ranges: &[(u64, u32)], flags: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for &(sector, sectors) in ranges {
        out.extend_from_slice(&sector.to_le_bytes());
        out.extend_from_slice(&sectors.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
    }
    out
}

/// Runs `f` three times; prints the fastest and slowest run (the machine is shared).
fn timed(what: &str, mut f: impl FnMut() -> u8) {
    let mut times = Vec::new();
    let mut status = 0;
    for _ in 0..3 {
        let start = Instant::now();
        status = f();
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{what:<62} min {:>7.3} s  max {:>7.3} s  (status {status})",
        times[0], times[2]
    );
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("zeroing-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    let size = 300 * GIB;
    Image::create(&path, &CreateOptions::new(size)).unwrap();
    let image = Arc::new(Image::open(&path, &OpenOptions::default()).unwrap());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    println!("300 GiB image, 64 KiB clusters, lz4");
    let defaults = BlkConfig::new(1, 256);
    let mut old_limits = defaults.clone();
    old_limits.max_discard_segments = 256;
    old_limits.max_write_zeroes_segments = 256;
    for (label, cfg) in [
        ("256-segment limit", old_limits),
        ("default limits", defaults),
    ] {
        let max_sectors = cfg.max_discard_sectors;
        let max_segments = u64::from(cfg.max_discard_segments);
        let per_segment = u64::from(max_sectors);
        println!(
            "{label}: {max_segments} segments x {} MiB",
            (per_segment * 512) >> 20
        );
        let dev = BlkDevice::new(Arc::clone(&image), cfg).unwrap();
        // Disjoint (and adjacent) segments over the disk, and one segment repeated.
        let disjoint: Vec<(u64, u32)> = (0..max_segments)
            .map(|i| (i * per_segment, max_sectors))
            .collect();
        let spaced: Vec<(u64, u32)> = (0..max_segments)
            .map(|i| (i * per_segment + i * 8, max_sectors))
            .collect();
        let same: Vec<(u64, u32)> = (0..max_segments).map(|_| (0, max_sectors)).collect();
        for (kind, name, flags) in [
            (VIRTIO_BLK_T_DISCARD, "DISCARD", 0),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                "WRITE_ZEROES+UNMAP",
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            ),
        ] {
            for (shape, ranges) in [
                ("adjacent", &disjoint),
                ("4 KiB apart", &spaced),
                ("all the same", &same),
            ] {
                timed(
                    &format!("  {name}: {max_segments} segments {shape}, unwritten"),
                    || run(&dev, &mem, kind, 0, &segments(ranges, flags)),
                );
            }
        }
    }
    let dev = BlkDevice::new(Arc::clone(&image), BlkConfig::new(1, 256)).unwrap();
    let max_sectors = dev.config().max_discard_sectors;
    let per_segment = u64::from(max_sectors);

    // One segment over written data: every cluster is freed (journal records, punches).
    let written = per_segment * 512;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let start = Instant::now();
    let mut pos = 0;
    while pos < written {
        assert_eq!(run(&dev, &mem, VIRTIO_BLK_T_OUT, pos / 512, &chunk), 0);
        pos += chunk.len() as u64;
    }
    assert_eq!(run(&dev, &mem, VIRTIO_BLK_T_FLUSH, 0, &[]), 0);
    println!(
        "(wrote and flushed {} MiB in {:.1} s)",
        written >> 20,
        start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let status = run(
        &dev,
        &mem,
        VIRTIO_BLK_T_DISCARD,
        0,
        &segments(&[(0, max_sectors)], 0),
    );
    println!(
        "DISCARD: 1 segment over {} MiB written                      {:>7.3} s  (status {status})",
        written >> 20,
        start.elapsed().as_secs_f64()
    );
    drop(dev);
    if let Ok(image) = Arc::try_unwrap(image) {
        image.close().unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
