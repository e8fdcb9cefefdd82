//! Fuzzes the virtio-blk request path (hostile-guest.md cases 1-16 at the chain level): an
//! arbitrary descriptor table, available-ring heads and guest memory content in a small guest
//! memory of three regions (two adjacent, one after a hole), served by `BlkDevice::process_chain`
//! on a real engine over an in-memory image. Nothing may panic or hang, nothing stored may fail
//! its checksum, and the read-only device's disk never changes.
//!
//! Input layout:
//! - byte 0: bit 0..=2 = FLUSH / DISCARD / WRITE_ZEROES acked, bit 3 = read-only device,
//!   bit 4 = serve through `process_chain` (virtio-queue's iterator) instead of
//!   `process_ring_chain` (the device's own walk of the descriptor table);
//! - byte 1: number of chains to pop (0..=7);
//! - 2 bytes per chain: head index (mod 32, so some are out of range);
//! - 16 descriptors of 16 bytes (addr u64, len u32, flags u16, next u16). An address with its top
//!   bit clear is folded into the guest-physical span (so most land in or near memory), a length
//!   with its top bit clear is folded below 16 KiB, `next` is taken mod 32;
//! - the rest: guest memory content from 0x1000 on (headers, data, indirect tables, segments).
#![no_main]

use std::sync::{Arc, OnceLock};

use insitu_blk::blk::{BlkConfig, BlkDevice, SplitRing};
use insitu_blk::image::{Compression, CreateOptions, Image, MemStorage, OpenOptions};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 16;
const CLUSTER: u32 = 16 * 1024;
const DISK_SIZE: u64 = 8 * CLUSTER as u64;
/// Two adjacent regions and one after a hole.
const REGIONS: [(u64, usize); 3] = [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x3_0000, 0x1000)];
/// Addresses are folded into [0, SPAN): a little more than the highest region.
const SPAN: u64 = 0x3_2000;
/// The mock driver's split ring lives below this address.
const CONTENT_START: u64 = 0x1000;

fn device(read_only: bool) -> &'static BlkDevice {
    static RW: OnceLock<BlkDevice> = OnceLock::new();
    static RO: OnceLock<BlkDevice> = OnceLock::new();
    let cell = if read_only { &RO } else { &RW };
    cell.get_or_init(|| {
        let storage = Arc::new(MemStorage::new());
        let mut opts = CreateOptions::new(DISK_SIZE);
        opts.cluster_size = CLUSTER;
        opts.compression = Compression::Lz4;
        Image::create_on(storage.clone(), &opts).expect("create image");
        let image = Image::open_on(
            storage,
            &OpenOptions {
                read_only,
                ..OpenOptions::default()
            },
        )
        .expect("open image");
        let mut cfg = BlkConfig::new(1, QUEUE_SIZE);
        cfg.read_only = read_only;
        // Small limits so the fuzzer reaches them.
        cfg.seg_max = 4;
        cfg.size_max = 8192;
        cfg.max_discard_segments = 4;
        cfg.max_write_zeroes_segments = 4;
        cfg.max_discard_sectors = 64;
        cfg.max_write_zeroes_sectors = 64;
        BlkDevice::new(Arc::new(image), cfg).expect("device")
    })
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Some(head)
}

fn descriptor(raw: &[u8]) -> RawDescriptor {
    let mut addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
    let mut len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
    let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
    let next = u16::from_le_bytes(raw[14..16].try_into().unwrap()) % 32;
    if addr >> 63 == 0 {
        addr %= SPAN;
    }
    if len >> 31 == 0 {
        len %= 0x4000;
    }
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Some(&[mode, chains]) = take(&mut data, 2).map(|b| <&[u8; 2]>::try_from(b).unwrap()) else {
        return;
    };
    let chains = usize::from(chains % 8);
    let Some(heads) = take(&mut data, 2 * chains) else {
        return;
    };
    let Some(table) = take(&mut data, 16 * usize::from(QUEUE_SIZE)) else {
        return;
    };

    let mem = GuestMemoryMmap::<()>::from_ranges(
        &REGIONS
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len))
            .collect::<Vec<_>>(),
    )
    .expect("guest memory");
    let content_len = data
        .len()
        .min((REGIONS[1].0 as usize + REGIONS[1].1) - CONTENT_START as usize);
    mem.write_slice(&data[..content_len], GuestAddress(CONTENT_START))
        .expect("content");

    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    for (i, raw) in table.chunks_exact(16).enumerate() {
        vq.desc_table()
            .store(i as u16, descriptor(raw))
            .expect("descriptor");
    }
    for (slot, head) in heads.chunks_exact(2).enumerate() {
        let head = u16::from_le_bytes([head[0], head[1]]) % 32;
        vq.avail().ring().ref_at(slot).expect("slot").store(head);
    }
    vq.avail().idx().store(chains as u16);

    let dev = device(mode & 8 != 0);
    let mut acked = dev.features()
        & !((1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES));
    for (bit, feature) in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .into_iter()
    .enumerate()
    {
        if mode & (1 << bit) != 0 {
            acked |= dev.features() & (1 << feature);
        }
    }

    let mut queue: Queue = vq.create_queue().expect("queue");
    let ring = SplitRing {
        desc_table: vq.desc_table_addr(),
        size: QUEUE_SIZE,
    };
    for chain in queue.iter(&mem).expect("avail ring") {
        if mode & 16 != 0 {
            dev.process_chain(chain, acked);
        } else {
            dev.process_ring_chain(chain, ring, acked);
        }
    }

    // Whatever the guest sent: what is stored verifies, and a read-only disk never changes.
    assert_eq!(dev.image().stats().checksum_errors, 0);
    if dev.is_read_only() {
        let mut disk = vec![0u8; DISK_SIZE as usize];
        dev.image()
            .read(0, &mut disk)
            .expect("read the read-only disk");
        assert!(disk.iter().all(|&b| b == 0), "a read-only disk changed");
    }
});
