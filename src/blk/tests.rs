//! Hostile-guest tests of the virtio-blk layer (`../shared/hostile-guest.md`, cases 1-18 at the
//! chain level), with chains built by a mock driver in real guest memory (`MockSplitQueue` over a
//! `GuestMemoryMmap` with a dirty bitmap) and executed on the real engine on a temporary file.
//!
//! Every hostile case asserts the status (or used length 0 when no status can be written), that
//! no guest byte outside the chain's writable buffers changed, that the disk is unchanged where it
//! must be, and that a good request served afterwards on the same device succeeds.

use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::request::{self, GuestBuffer, Header, RequestBuffers, Unanswerable};
use super::{BlkConfig, BlkDevice, RequestError, SplitRing};
use crate::image::{CreateOptions, Image, OpenOptions};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const QUEUE_SIZE: u16 = 16;
/// Two adjacent regions (to build buffers straddling them) and a third after a hole.
const REGION_A: (u64, usize) = (0, 0x20_0000);
const REGION_B: (u64, usize) = (0x20_0000, 0x20_0000);
const REGION_C: (u64, usize) = (0x80_0000, 0x1_0000);
/// Where indirect tables go.
const INDIRECT: u64 = 0x4000;
/// Request headers.
const HDR: u64 = 0x1_0000;
/// Headers of the helper requests (reads and writes around a hostile request).
const HDR2: u64 = 0x1_0800;
/// Status bytes.
const STATUS: u64 = 0x1_1000;
/// Data buffers.
const DATA: u64 = 0x2_0000;
/// A second data area (e.g. the good request after a bad one).
const DATA2: u64 = 0x10_0000;

const R: u32 = 0;
const W: u32 = VRING_DESC_F_WRITE;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// The split ring written by the mock driver (descriptor table, available and used rings).
const QUEUE_AREA: (u64, u64) = (0, 0x1000);
/// Value the status byte holds before a request, to see whether it was written.
const UNTOUCHED: u8 = 0xAA;

fn new_memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION_A.0), REGION_A.1),
        (GuestAddress(REGION_B.0), REGION_B.1),
        (GuestAddress(REGION_C.0), REGION_C.1),
    ])
    .expect("guest memory")
}

/// A raw descriptor; NEXT and `next` are filled in by [`linked`] or given explicitly.
fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
}

fn desc_next(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        (flags | VRING_DESC_F_NEXT) as u16,
        next,
    ))
}

/// Chains `descs` in table order (index i -> i + 1).
fn linked(descs: &[RawDescriptor]) -> Vec<RawDescriptor> {
    let last = descs.len() - 1;
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = SplitDescriptor::from(*d);
            if i == last {
                desc(d.addr().0, d.len(), u32::from(d.flags()))
            } else {
                desc_next(d.addr().0, d.len(), u32::from(d.flags()), i as u16 + 1)
            }
        })
        .collect()
}

/// Writes `table` into the descriptor table and returns the chain whose head is `head`, as a
/// device would pop it from the available ring.
fn pop_chain<'m>(mem: &'m Mem, table: &[RawDescriptor], head: u16) -> DescriptorChain<&'m Mem> {
    let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
    for (i, d) in table.iter().enumerate() {
        vq.desc_table().store(i as u16, *d).expect("descriptor");
    }
    vq.avail()
        .ring()
        .ref_at(0)
        .expect("avail slot")
        .store(head.to_le());
    vq.avail().idx().store(1u16.to_le());
    let mut queue: Queue = vq.create_queue().expect("queue");
    let chain = queue
        .iter(mem)
        .expect("avail ring")
        .next()
        .expect("a chain");
    chain
}

fn header_bytes(request_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn put_header(mem: &Mem, addr: u64, request_type: u32, sector: u64) {
    mem.write_slice(&header_bytes(request_type, sector), GuestAddress(addr))
        .expect("header");
}

fn zeroing_segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) ^ (i / 4096) as u8)
        .collect()
}

fn snapshot(mem: &Mem) -> Vec<Vec<u8>> {
    [REGION_A, REGION_B, REGION_C]
        .iter()
        .map(|&(start, len)| {
            let mut bytes = vec![0u8; len];
            mem.read_slice(&mut bytes, GuestAddress(start))
                .expect("snapshot");
            bytes
        })
        .collect()
}

/// Asserts that guest memory equals `before` outside the byte ranges `allowed`.
fn assert_unchanged_except(mem: &Mem, before: &[Vec<u8>], allowed: &[(u64, u64)]) {
    let after = snapshot(mem);
    for (region, &(start, _)) in [REGION_A, REGION_B, REGION_C].iter().enumerate() {
        for (i, (old, new)) in before[region].iter().zip(&after[region]).enumerate() {
            if old == new {
                continue;
            }
            let addr = start + i as u64;
            assert!(
                allowed.iter().any(|&(a, len)| addr >= a && addr < a + len),
                "guest byte {addr:#x} changed from {old:#x} to {new:#x} outside the allowed buffers"
            );
        }
    }
}

fn status_at(mem: &Mem, addr: u64) -> u8 {
    mem.read_obj::<u8>(GuestAddress(addr)).expect("status")
}

// ---------------------------------------------------------------------------------------------
// Parser level: no engine needed.
// ---------------------------------------------------------------------------------------------

/// What the parser makes of a chain.
#[derive(Debug)]
enum Parsed {
    Unanswerable(Unanswerable),
    Rejected(u64, RequestError),
    Request(u64, Header, Vec<GuestBuffer>),
}

/// The descriptor table of the chains `pop_chain` builds.
const RING: SplitRing = SplitRing {
    desc_table: GuestAddress(0),
    size: QUEUE_SIZE,
};

/// Parses with both walkers: returns the strict walker's result (`walk_chain`) after checking
/// that virtio-queue's iterator path (`collect_chain`) comes to the same kind of verdict and,
/// for answerable chains, the same request.
fn parse(mem: &Mem, table: &[RawDescriptor], head: u16) -> Parsed {
    let mut chain = pop_chain(mem, table, head);
    let mut bufs = RequestBuffers::default();
    let strict = finish_parse(
        mem,
        request::walk_chain(mem, RING, head, QUEUE_SIZE, &mut bufs),
        &mut bufs,
    );
    let mut bufs = RequestBuffers::default();
    let iterated = finish_parse(
        mem,
        request::collect_chain(&mut chain, QUEUE_SIZE, &mut bufs),
        &mut bufs,
    );
    match (&strict, &iterated) {
        (Parsed::Unanswerable(_), Parsed::Unanswerable(_)) => {}
        (Parsed::Rejected(a, _), Parsed::Rejected(b, _)) => assert_eq!(a, b),
        (Parsed::Request(a, h, d), Parsed::Request(b, h2, d2)) => {
            assert_eq!((a, h, d), (b, h2, d2));
        }
        _ => panic!("walkers disagree: strict {strict:?}, iterator {iterated:?}"),
    }
    strict
}

fn finish_parse(
    mem: &Mem,
    status: Result<request::StatusByte, Unanswerable>,
    bufs: &mut RequestBuffers,
) -> Parsed {
    let status = match status {
        Ok(s) => s.addr.0,
        Err(e) => return Parsed::Unanswerable(e),
    };
    match request::parse_request(mem, bufs) {
        Ok(header) => Parsed::Request(status, header, bufs.data.clone()),
        Err(e) => Parsed::Rejected(status, e),
    }
}

fn buf(addr: u64, len: u32, writable: bool) -> GuestBuffer {
    GuestBuffer {
        addr: GuestAddress(addr),
        len,
        writable,
    }
}

#[test]
fn header_split_across_descriptors_and_status_sharing_data_are_accepted() {
    let mem = new_memory();
    let h = header_bytes(VIRTIO_BLK_T_IN, 8);
    mem.write_slice(&h[..5], GuestAddress(HDR)).unwrap();
    mem.write_slice(&h[5..], GuestAddress(HDR + 0x100)).unwrap();
    let table = linked(&[
        desc(HDR, 5, R),
        desc(HDR + 0x100, 11, R),
        desc(DATA, 4096 + 1, W),
    ]);
    match parse(&mem, &table, 0) {
        Parsed::Request(status, header, data) => {
            assert_eq!(status, DATA + 4096);
            assert_eq!(header.request_type, VIRTIO_BLK_T_IN);
            assert_eq!(header.sector, 8);
            assert_eq!(data, vec![buf(DATA, 4096, true)]);
        }
        other => panic!("expected a request, got {other:?}"),
    }
}

#[test]
fn header_and_data_in_one_descriptor_are_split_at_16_bytes() {
    let mem = new_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let table = linked(&[desc(HDR, 16 + 1024, R), desc(STATUS, 1, W)]);
    match parse(&mem, &table, 0) {
        Parsed::Request(status, header, data) => {
            assert_eq!(status, STATUS);
            assert_eq!(header.request_type, VIRTIO_BLK_T_OUT);
            assert_eq!(data, vec![buf(HDR + 16, 1024, false)]);
        }
        other => panic!("expected a request, got {other:?}"),
    }
}

#[test]
fn chains_without_a_usable_status_byte_are_unanswerable() {
    let mem = new_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("head-only chain", vec![desc(HDR, 16, R)]),
        (
            "status descriptor read-only",
            linked(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, R)]),
        ),
        (
            "status descriptor of length 0",
            linked(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 0, W)]),
        ),
        (
            "status outside guest memory",
            linked(&[desc(HDR, 16, R), desc(0x4000_0000, 1, W)]),
        ),
        (
            "status address overflowing",
            linked(&[desc(HDR, 16, R), desc(u64::MAX, 2, W)]),
        ),
    ];
    for (name, table) in cases {
        match parse(&mem, &table, 0) {
            Parsed::Unanswerable(Unanswerable::NoStatus) => {}
            other => panic!("{name}: expected NoStatus, got {other:?}"),
        }
    }
}

#[test]
fn broken_links_and_cycles_are_cut_after_queue_size_hops_and_rejected() {
    let mem = new_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // next >= queue size.
    let table = vec![desc_next(HDR, 16, R, QUEUE_SIZE), desc(STATUS, 1, W)];
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Unanswerable(Unanswerable::Truncated)
    ));
    // A cycle 0 -> 1 -> 0.
    let table = vec![desc_next(HDR, 16, R, 1), desc_next(STATUS, 1, W, 0)];
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Unanswerable(Unanswerable::Truncated)
    ));
    // A chain over the whole table that loops back on itself at the end.
    let mut table: Vec<_> = (0..QUEUE_SIZE)
        .map(|i| desc_next(DATA + u64::from(i) * 512, 512, W, (i + 1) % QUEUE_SIZE))
        .collect();
    table[0] = desc_next(HDR, 16, R, 1);
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Unanswerable(Unanswerable::Truncated)
    ));
    // Head index out of range cannot even be popped by a device: the queue's iterator gives a
    // chain that yields nothing.
    let table = vec![desc(HDR, 16, R)];
    assert!(matches!(
        parse(&mem, &table, QUEUE_SIZE + 3),
        Parsed::Unanswerable(Unanswerable::Empty)
    ));
}

#[test]
fn chains_over_4_gib_are_rejected() {
    let mem = new_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let table = linked(&[
        desc(HDR, 16, R),
        desc(DATA, u32::MAX, R),
        desc(DATA, u32::MAX, R),
        desc(STATUS, 1, W),
    ]);
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Unanswerable(Unanswerable::TooLong)
    ));
}

fn write_indirect(mem: &Mem, addr: u64, entries: &[RawDescriptor]) {
    for (i, d) in entries.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(addr + 16 * i as u64))
            .expect("indirect entry");
    }
}

#[test]
fn indirect_tables_are_followed_once_and_bad_ones_rejected() {
    let mem = new_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let entries = linked(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)]);
    write_indirect(&mem, INDIRECT, &entries);

    // A good indirect chain.
    let table = vec![desc(INDIRECT, 48, VRING_DESC_F_INDIRECT)];
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Request(STATUS, _, _)
    ));

    let bad_tables: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("length 0", vec![desc(INDIRECT, 0, VRING_DESC_F_INDIRECT)]),
        (
            "length not a multiple of 16",
            vec![desc(INDIRECT, 40, VRING_DESC_F_INDIRECT)],
        ),
        (
            "table outside guest memory",
            vec![desc(0x4000_0000, 48, VRING_DESC_F_INDIRECT)],
        ),
    ];
    for (name, table) in bad_tables {
        assert!(
            matches!(parse(&mem, &table, 0), Parsed::Unanswerable(_)),
            "{name}"
        );
    }

    // An indirect table reached after a direct descriptor (even a good table): only the head
    // may point to a table.
    let table = vec![
        desc_next(HDR, 16, R, 1),
        desc(INDIRECT + 16, 32, VRING_DESC_F_INDIRECT),
    ];
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Unanswerable(Unanswerable::BadIndirectTable)
    ));

    // INDIRECT together with NEXT: refused by the strict walker; virtio-queue's iterator ignores
    // the NEXT and serves the table.
    let table = vec![
        desc_next(INDIRECT, 48, VRING_DESC_F_INDIRECT, 1),
        desc(STATUS, 1, W),
    ];
    let mut chain = pop_chain(&mem, &table, 0);
    let mut bufs = RequestBuffers::default();
    assert_eq!(
        request::walk_chain(&mem, RING, 0, QUEUE_SIZE, &mut bufs),
        Err(Unanswerable::IndirectWithNext)
    );
    assert!(request::collect_chain(&mut chain, QUEUE_SIZE, &mut bufs).is_ok());

    // Nested indirect.
    let nested = [
        desc_next(HDR, 16, R, 1),
        desc(INDIRECT, 48, VRING_DESC_F_INDIRECT),
    ];
    write_indirect(&mem, INDIRECT + 0x400, &nested);
    let table = vec![desc(INDIRECT + 0x400, 32, VRING_DESC_F_INDIRECT)];
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Unanswerable(Unanswerable::BadIndirectTable)
    ));
    // Nested at the head of the table.
    write_indirect(
        &mem,
        INDIRECT + 0x600,
        &[desc(INDIRECT, 48, VRING_DESC_F_INDIRECT)],
    );
    let table = vec![desc(INDIRECT + 0x600, 16, VRING_DESC_F_INDIRECT)];
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Unanswerable(Unanswerable::BadIndirectTable)
    ));

    // More entries than the queue size.
    let mut long: Vec<_> = vec![desc(HDR, 16, R)];
    long.extend((0..QUEUE_SIZE).map(|i| desc(DATA + u64::from(i) * 512, 512, W)));
    long.push(desc(STATUS, 1, W));
    write_indirect(&mem, INDIRECT + 0x800, &linked(&long));
    let table = vec![desc(
        INDIRECT + 0x800,
        16 * long.len() as u32,
        VRING_DESC_F_INDIRECT,
    )];
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Unanswerable(Unanswerable::TooManyDescriptors(QUEUE_SIZE))
    ));
}

#[test]
fn bad_buffer_addresses_are_rejected_without_access() {
    let mem = new_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(&str, RawDescriptor)> = vec![
        ("outside every region", desc(0x4000_0000, 512, W)),
        ("in the hole between regions", desc(0x70_0000, 512, W)),
        (
            "from a region's end into the hole after it",
            desc(REGION_B.0 + REGION_B.1 as u64 - 256, 512, W),
        ),
        (
            "across two adjacent regions into the hole",
            desc(REGION_B.0 - 256, REGION_B.1 as u32 + 512, W),
        ),
        ("running off the end of a region", desc(0x80_FF00, 512, W)),
        ("addr + len overflowing u64", desc(u64::MAX - 100, 512, W)),
    ];
    for (name, bad) in cases {
        let table = linked(&[desc(HDR, 16, R), bad, desc(STATUS, 1, W)]);
        match parse(&mem, &table, 0) {
            Parsed::Rejected(STATUS, RequestError::BadAddress { .. }) => {}
            other => panic!("{name}: expected BadAddress, got {other:?}"),
        }
    }
}

#[test]
fn a_buffer_across_adjacent_regions_is_one_valid_buffer() {
    // Regions A and B are contiguous in guest-physical space (as two memory backends of one
    // guest are): a descriptor across their boundary is ordinary guest memory.
    let mem = new_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let table = linked(&[
        desc(HDR, 16, R),
        desc(REGION_B.0 - 256, 512, W),
        desc(STATUS, 1, W),
    ]);
    match parse(&mem, &table, 0) {
        Parsed::Request(STATUS, header, data) => {
            assert_eq!(header.request_type, VIRTIO_BLK_T_IN);
            assert_eq!(data, vec![buf(REGION_B.0 - 256, 512, true)]);
        }
        other => panic!("expected a request, got {other:?}"),
    }
    // The same for the status byte's descriptor and a header split by the boundary.
    put_header(&mem, REGION_B.0 - 8, VIRTIO_BLK_T_OUT, 3);
    let table = linked(&[
        desc(REGION_B.0 - 8, 16, R),
        desc(DATA, 512, R),
        desc(REGION_B.0 - 1, 2, W),
    ]);
    match parse(&mem, &table, 0) {
        Parsed::Request(status, header, _) => {
            assert_eq!(status, REGION_B.0);
            assert_eq!((header.request_type, header.sector), (VIRTIO_BLK_T_OUT, 3));
        }
        other => panic!("expected a request, got {other:?}"),
    }
}

#[test]
fn headers_not_in_16_readable_bytes_are_rejected() {
    let mem = new_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        (
            "header in a writable descriptor",
            linked(&[desc(HDR, 16, W), desc(STATUS, 1, W)]),
        ),
        (
            "header of 12 bytes",
            linked(&[desc(HDR, 12, R), desc(STATUS, 1, W)]),
        ),
        (
            "header completed by a writable descriptor",
            linked(&[desc(HDR, 8, R), desc(DATA, 512, W), desc(STATUS, 1, W)]),
        ),
    ];
    for (name, table) in cases {
        match parse(&mem, &table, 0) {
            Parsed::Rejected(STATUS, RequestError::ShortHeader) => {}
            other => panic!("{name}: expected ShortHeader, got {other:?}"),
        }
    }
    // Readable after writable breaks the layout rule.
    let table = linked(&[
        desc(HDR, 16, R),
        desc(DATA, 512, W),
        desc(DATA2, 512, R),
        desc(STATUS, 1, W),
    ]);
    assert!(matches!(
        parse(&mem, &table, 0),
        Parsed::Rejected(STATUS, RequestError::MalformedChain(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Device level: the real engine on a temporary file.
// ---------------------------------------------------------------------------------------------

const DISK_SIZE: u64 = 8 * 1024 * 1024;
const CLUSTER: u32 = 16 * 1024;
const CAPACITY: u64 = DISK_SIZE / 512;
/// Where the good request after a hostile one writes (away from what the tests check).
const GOOD_SECTOR: u64 = CAPACITY / 2;

struct Fixture {
    mem: Mem,
    dev: BlkDevice,
    acked: u64,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self::with(BlkConfig::new(2, QUEUE_SIZE), false)
    }

    fn with(cfg: BlkConfig, open_read_only: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let opts = CreateOptions {
            cluster_size: CLUSTER,
            ..CreateOptions::new(DISK_SIZE)
        };
        Image::create(&path, &opts).expect("create image");
        let image = Image::open(
            &path,
            &OpenOptions {
                read_only: open_read_only,
                ..OpenOptions::default()
            },
        )
        .expect("open image");
        let dev = BlkDevice::new(Arc::new(image), cfg).expect("device");
        let acked = dev.features();
        Self {
            mem: new_memory(),
            dev,
            acked,
            _dir: dir,
        }
    }

    /// Serves the chain `table` (head 0) with the status byte preset to UNTOUCHED.
    fn run(&self, table: &[RawDescriptor]) -> u32 {
        self.run_after(table, || ())
    }

    /// Like [`Fixture::run`], calling `before` once the chain is in guest memory, just before
    /// the device serves it.
    fn run_after(&self, table: &[RawDescriptor], before: impl FnOnce()) -> u32 {
        self.mem
            .write_obj(UNTOUCHED, GuestAddress(STATUS))
            .expect("status");
        let chain = pop_chain(&self.mem, table, 0);
        before();
        self.dev.process_ring_chain(chain, RING, self.acked)
    }

    /// A simple three-descriptor request: header, optional data, status. Returns (status, len).
    fn simple(&self, request_type: u32, sector: u64, data: Option<(u64, u32, u32)>) -> (u8, u32) {
        put_header(&self.mem, HDR2, request_type, sector);
        let mut descs = vec![desc(HDR2, 16, R)];
        if let Some((addr, len, flags)) = data {
            descs.push(desc(addr, len, flags));
        }
        descs.push(desc(STATUS, 1, W));
        let used = self.run(&linked(&descs));
        (status_at(&self.mem, STATUS), used)
    }

    fn write_disk(&self, sector: u64, bytes: &[u8]) -> u8 {
        self.mem.write_slice(bytes, GuestAddress(DATA2)).unwrap();
        let (status, used) = self.simple(
            VIRTIO_BLK_T_OUT,
            sector,
            Some((DATA2, bytes.len() as u32, R)),
        );
        if status == OK {
            assert_eq!(used, 1);
        }
        status
    }

    fn read_disk(&self, sector: u64, len: u32) -> Vec<u8> {
        let (status, used) = self.simple(VIRTIO_BLK_T_IN, sector, Some((DATA2, len, W)));
        assert_eq!(status, OK, "read of sector {sector}");
        assert_eq!(used, len + 1);
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(DATA2)).unwrap();
        out
    }

    fn read_disk_in_pieces(&self, sector: u64, len: u32) -> Vec<u8> {
        (0..len / 4096)
            .flat_map(|i| self.read_disk(sector + u64::from(i) * 8, 4096))
            .collect()
    }

    /// A good write and read-back after a hostile request: the device still serves.
    fn assert_still_serves(&self) {
        let bytes = pattern(0x5A, 8192);
        assert_eq!(self.write_disk(GOOD_SECTOR, &bytes), OK);
        assert!(
            self.read_disk(GOOD_SECTOR, 8192) == bytes,
            "good request after a hostile one"
        );
    }

    /// Runs a hostile chain; asserts the status (None: nothing written, used length 0), that no
    /// guest byte but the status byte changed, that the disk content is unchanged, and that the
    /// device serves a good request afterwards.
    fn hostile(&self, name: &str, table: &[RawDescriptor], expected: Option<u8>) {
        let disk_before = self.read_disk_in_pieces(0, 64 * 1024);
        let mut before = Vec::new();
        let used = self.run_after(table, || before = snapshot(&self.mem));
        match expected {
            Some(status) => {
                assert_eq!(used, 1, "{name}: used length");
                assert_eq!(status_at(&self.mem, STATUS), status, "{name}: status");
                assert_unchanged_except(&self.mem, &before, &[(STATUS, 1)]);
            }
            None => {
                assert_eq!(used, 0, "{name}: used length");
                assert_eq!(status_at(&self.mem, STATUS), UNTOUCHED, "{name}: status");
                assert_unchanged_except(&self.mem, &before, &[]);
            }
        }
        assert!(
            self.read_disk_in_pieces(0, 64 * 1024) == disk_before,
            "{name}: disk changed"
        );
        self.assert_still_serves();
    }
}

#[test]
fn write_then_read_round_trips_through_the_engine() {
    let fx = Fixture::new();
    let bytes = pattern(1, 3 * CLUSTER as usize + 1024);
    assert_eq!(fx.write_disk(7, &bytes), OK);
    assert_eq!(fx.read_disk(7, bytes.len() as u32), bytes);
    // Unwritten space reads as zeros.
    assert!(fx.read_disk(4096, 4096).iter().all(|&b| b == 0));
    // Up to the last sector.
    let tail = pattern(2, 4096);
    assert_eq!(fx.write_disk(CAPACITY - 8, &tail), OK);
    assert_eq!(fx.read_disk(CAPACITY - 8, 4096), tail);
}

#[test]
fn scattered_data_and_status_sharing_a_data_descriptor_round_trip() {
    let fx = Fixture::new();
    let bytes = pattern(3, 3 * 4096);
    // Write from three scattered readable buffers (one of them also holding the header).
    // Header and first data block together, clear of the status byte.
    let hdr = DATA + 0x8000;
    put_header(&fx.mem, hdr, VIRTIO_BLK_T_OUT, 100);
    fx.mem
        .write_slice(&bytes[..4096], GuestAddress(hdr + 16))
        .unwrap();
    fx.mem
        .write_slice(&bytes[4096..4096 + 512], GuestAddress(DATA))
        .unwrap();
    fx.mem
        .write_slice(&bytes[4096 + 512..], GuestAddress(REGION_B.0 + 0x1000))
        .unwrap();
    let table = linked(&[
        desc(hdr, 16 + 4096, R),
        desc(DATA, 512, R),
        desc(REGION_B.0 + 0x1000, 2 * 4096 - 512, R),
        desc(STATUS, 1, W),
    ]);
    assert_eq!(fx.run(&table), 1);
    assert_eq!(status_at(&fx.mem, STATUS), OK);

    // Read with a split header and the status byte at the end of the last data descriptor.
    let h = header_bytes(VIRTIO_BLK_T_IN, 100);
    fx.mem.write_slice(&h[..3], GuestAddress(HDR)).unwrap();
    fx.mem.write_slice(&h[3..], GuestAddress(HDR + 64)).unwrap();
    let status_addr = DATA2 + 2 * 4096;
    fx.mem
        .write_obj(UNTOUCHED, GuestAddress(status_addr))
        .unwrap();
    let before = snapshot(&fx.mem);
    let table = linked(&[
        desc(HDR, 3, R),
        desc(HDR + 64, 13, R),
        desc(DATA, 4096, W),
        desc(DATA2, 2 * 4096 + 1, W),
    ]);
    let chain = pop_chain(&fx.mem, &table, 0);
    assert_eq!(
        fx.dev.process_ring_chain(chain, RING, fx.acked),
        3 * 4096 + 1
    );
    assert_eq!(status_at(&fx.mem, status_addr), OK);
    let mut got = vec![0u8; 3 * 4096];
    fx.mem
        .read_slice(&mut got[..4096], GuestAddress(DATA))
        .unwrap();
    fx.mem
        .read_slice(&mut got[4096..], GuestAddress(DATA2))
        .unwrap();
    let first_difference = got.iter().zip(&bytes).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "data read back differ");
    assert_unchanged_except(
        &fx.mem,
        &before,
        &[(DATA, 4096), (DATA2, 2 * 4096 + 1), QUEUE_AREA],
    );
}

#[test]
fn data_across_adjacent_regions_round_trips() {
    // A 64 KiB write whose one data descriptor spans the boundary of regions A and B, read back
    // into a buffer spanning it at another offset: every byte crosses intact, both ways.
    let fx = Fixture::new();
    let len: u32 = 64 * 1024;
    let bytes = pattern(21, len as usize);
    let sector = 64;
    let source = REGION_B.0 - 32 * 1024;
    fx.mem.write_slice(&bytes, GuestAddress(source)).unwrap();
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_OUT, sector);
    let table = linked(&[desc(HDR, 16, R), desc(source, len, R), desc(STATUS, 1, W)]);
    assert_eq!(fx.run(&table), 1);
    assert_eq!(status_at(&fx.mem, STATUS), OK, "write across the boundary");

    let target = REGION_B.0 - 4096 - 512;
    fx.mem
        .write_slice(&vec![0u8; len as usize], GuestAddress(target))
        .unwrap();
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_IN, sector);
    let table = linked(&[desc(HDR, 16, R), desc(target, len, W), desc(STATUS, 1, W)]);
    let mut before = Vec::new();
    let used = fx.run_after(&table, || before = snapshot(&fx.mem));
    assert_eq!(used, len + 1);
    assert_eq!(status_at(&fx.mem, STATUS), OK, "read across the boundary");
    let mut got = vec![0u8; len as usize];
    fx.mem.read_slice(&mut got, GuestAddress(target)).unwrap();
    assert!(got == bytes, "data read back across the boundary differ");
    // Nothing outside the buffer and the status byte was written.
    assert_unchanged_except(&fx.mem, &before, &[(target, u64::from(len)), (STATUS, 1)]);
    // The disk holds exactly the range written.
    assert_eq!(fx.read_disk(sector, len), bytes);
    assert!(fx.read_disk(sector - 1, 512).iter().all(|&x| x == 0));
}

#[test]
fn large_requests_cross_chunk_boundaries_intact() {
    // 2.5 MiB at an odd sector: many engine chunks, descriptor boundaries nowhere near them, and
    // read back through a different split.
    let fx = Fixture::new();
    let len: u32 = 5 * 512 * 1024;
    let bytes = pattern(13, len as usize);
    let sector = 1001;
    let first = 1024 * 1024 - 4096 - 512;
    let second = 512 * 1024 + 1536;
    let third = len - first - second;
    let (a, b, c) = (0x10_1000, REGION_B.0, REGION_B.0 + 0x9_0000);
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_OUT, sector);
    fx.mem
        .write_slice(&bytes[..first as usize], GuestAddress(a))
        .unwrap();
    fx.mem
        .write_slice(
            &bytes[first as usize..(first + second) as usize],
            GuestAddress(b),
        )
        .unwrap();
    fx.mem
        .write_slice(&bytes[(first + second) as usize..], GuestAddress(c))
        .unwrap();
    let table = linked(&[
        desc(HDR, 16, R),
        desc(a, first, R),
        desc(b, second, R),
        desc(c, third, R),
        desc(STATUS, 1, W),
    ]);
    assert_eq!(fx.run(&table), 1);
    assert_eq!(status_at(&fx.mem, STATUS), OK);

    // Read back in two pieces split elsewhere, into zeroed buffers.
    let split = 1536 * 1024 + 512;
    fx.mem
        .write_slice(&vec![0u8; split as usize], GuestAddress(REGION_B.0))
        .unwrap();
    fx.mem
        .write_slice(&vec![0u8; (len - split) as usize], GuestAddress(0x2_1000))
        .unwrap();
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_IN, sector);
    let table = linked(&[
        desc(HDR, 16, R),
        desc(REGION_B.0, split, W),
        desc(0x2_1000, len - split, W),
        desc(STATUS, 1, W),
    ]);
    assert_eq!(fx.run(&table), len + 1);
    assert_eq!(status_at(&fx.mem, STATUS), OK);
    let mut got = vec![0u8; len as usize];
    fx.mem
        .read_slice(&mut got[..split as usize], GuestAddress(REGION_B.0))
        .unwrap();
    fx.mem
        .read_slice(&mut got[split as usize..], GuestAddress(0x2_1000))
        .unwrap();
    let first_difference = got.iter().zip(&bytes).position(|(x, y)| x != y);
    assert_eq!(first_difference, None, "data read back differ");
    // And the sectors around the range are untouched.
    assert!(fx.read_disk(sector - 1, 512).iter().all(|&x| x == 0));
    assert!(fx
        .read_disk(sector + u64::from(len / 512), 512)
        .iter()
        .all(|&x| x == 0));
}

#[test]
fn reads_mark_the_written_guest_pages_dirty() {
    let fx = Fixture::new();
    let region = fx.mem.find_region(GuestAddress(DATA2)).unwrap();
    let bitmap: &AtomicBitmap = region.bitmap();
    bitmap.reset();
    let _ = fx.read_disk(0, 3 * 4096);
    let offset = (DATA2 - REGION_A.0) as usize;
    for page in 0..3 {
        assert!(bitmap.is_addr_set(offset + page * 4096), "data page {page}");
    }
    assert!(bitmap.is_addr_set(STATUS as usize), "status page");
    assert!(
        !bitmap.is_addr_set(offset + 3 * 4096),
        "page after the data"
    );
}

#[test]
fn hostile_addresses_fail_alone() {
    let fx = Fixture::new();
    for (name, bad) in [
        ("outside every region", desc(0x4000_0000, 512, W)),
        (
            "from a region's end into a hole",
            desc(REGION_B.0 + REGION_B.1 as u64 - 256, 512, W),
        ),
        ("addr + len overflowing", desc(u64::MAX - 100, 512, W)),
    ] {
        put_header(&fx.mem, HDR, VIRTIO_BLK_T_IN, 0);
        let table = linked(&[desc(HDR, 16, R), bad, desc(STATUS, 1, W)]);
        fx.hostile(name, &table, Some(IOERR));
    }
    // Status byte outside memory: nothing can be answered.
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let table = linked(&[
        desc(HDR, 16, R),
        desc(DATA, 512, W),
        desc(0x4000_0000, 1, W),
    ]);
    fx.hostile("status outside memory", &table, None);
}

#[test]
fn hostile_chain_shapes_are_returned_unanswered() {
    let fx = Fixture::new();
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    fx.mem
        .write_slice(&pattern(9, 4096), GuestAddress(DATA))
        .unwrap();
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        (
            "next beyond the queue",
            vec![
                desc_next(HDR, 16, R, 1),
                desc_next(DATA, 4096, R, QUEUE_SIZE + 1),
                desc(STATUS, 1, W),
            ],
        ),
        (
            "cycle",
            vec![
                desc_next(HDR, 16, R, 1),
                desc_next(DATA, 4096, R, 2),
                desc_next(STATUS, 1, W, 0),
            ],
        ),
        ("head-only chain", vec![desc(HDR, 16, R)]),
        (
            "status read-only",
            linked(&[desc(HDR, 16, R), desc(DATA, 4096, R), desc(STATUS, 1, R)]),
        ),
        (
            "status of length 0",
            linked(&[desc(HDR, 16, R), desc(DATA, 4096, R), desc(STATUS, 0, W)]),
        ),
        (
            "indirect table of length 0",
            vec![desc(INDIRECT, 0, VRING_DESC_F_INDIRECT)],
        ),
        (
            "indirect table not a multiple of 16",
            vec![desc(INDIRECT, 33, VRING_DESC_F_INDIRECT)],
        ),
    ];
    for (name, table) in cases {
        fx.hostile(name, &table, None);
    }
    // An indirect table longer than the queue.
    let mut long = vec![desc(HDR, 16, R)];
    long.extend((0..QUEUE_SIZE).map(|i| desc(DATA + u64::from(i) * 512, 512, R)));
    long.push(desc(STATUS, 1, W));
    write_indirect(&fx.mem, INDIRECT, &linked(&long));
    let table = vec![desc(
        INDIRECT,
        16 * long.len() as u32,
        VRING_DESC_F_INDIRECT,
    )];
    fx.hostile("indirect table longer than the queue", &table, None);
    // Nested indirect.
    write_indirect(
        &fx.mem,
        INDIRECT + 0x400,
        &[
            desc_next(HDR, 16, R, 1),
            desc(INDIRECT, 48, VRING_DESC_F_INDIRECT),
        ],
    );
    let table = vec![desc(INDIRECT + 0x400, 32, VRING_DESC_F_INDIRECT)];
    fx.hostile("nested indirect table", &table, None);
}

#[test]
fn indirect_chains_are_served() {
    let fx = Fixture::new();
    let bytes = pattern(4, 4096);
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_OUT, 16);
    fx.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    write_indirect(
        &fx.mem,
        INDIRECT,
        &linked(&[desc(HDR, 16, R), desc(DATA, 4096, R), desc(STATUS, 1, W)]),
    );
    // A well-formed indirect chain, on both paths.
    let table = vec![desc(INDIRECT, 48, VRING_DESC_F_INDIRECT)];
    assert_eq!(fx.run(&table), 1);
    assert_eq!(status_at(&fx.mem, STATUS), OK);
    assert_eq!(fx.read_disk(16, 4096), bytes);
    fx.mem
        .write_slice(&pattern(14, 4096), GuestAddress(DATA))
        .unwrap();
    let chain = pop_chain(&fx.mem, &table, 0);
    assert_eq!(fx.dev.process_chain(chain, fx.acked), 1);
    assert_eq!(status_at(&fx.mem, STATUS), OK);
    assert_eq!(fx.read_disk(16, 4096), pattern(14, 4096));

    // INDIRECT together with NEXT: the strict path refuses it unanswered, nothing written.
    let table = vec![
        desc_next(INDIRECT, 48, VRING_DESC_F_INDIRECT, 1),
        desc(STATUS, 1, W),
    ];
    fx.hostile("INDIRECT with NEXT", &table, None);
    // virtio-queue's iterator (process_chain) ignores the NEXT and serves the table.
    fx.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    let chain = pop_chain(&fx.mem, &table, 0);
    assert_eq!(fx.dev.process_chain(chain, fx.acked), 1);
    assert_eq!(status_at(&fx.mem, STATUS), OK);
    assert_eq!(fx.read_disk(16, 4096), bytes);
}

#[test]
fn absurd_lengths_fail_without_allocating() {
    let cfg = BlkConfig {
        size_max: 4096,
        seg_max: 4,
        ..BlkConfig::new(1, QUEUE_SIZE)
    };
    let fx = Fixture::with(cfg, false);
    // 20 KiB > seg_max * size_max = 16 KiB.
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let table = linked(&[
        desc(HDR, 16, R),
        desc(DATA, 20 * 1024, W),
        desc(STATUS, 1, W),
    ]);
    fx.hostile("read beyond seg_max * size_max", &table, Some(IOERR));
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let table = linked(&[
        desc(HDR, 16, R),
        desc(DATA, 20 * 1024, R),
        desc(STATUS, 1, W),
    ]);
    fx.hostile("write beyond seg_max * size_max", &table, Some(IOERR));
    // A 4 GiB descriptor (not in memory, and beyond every limit).
    let table = linked(&[
        desc(HDR, 16, R),
        desc(DATA, u32::MAX - 64, R),
        desc(STATUS, 1, W),
    ]);
    fx.hostile("4 GiB descriptor", &table, Some(IOERR));
    // Over 2^32 bytes in total: virtio-queue stops the walk.
    let table = linked(&[
        desc(HDR, 16, R),
        desc(DATA, u32::MAX, R),
        desc(DATA, u32::MAX, R),
        desc(STATUS, 1, W),
    ]);
    fx.hostile("chain over 4 GiB", &table, None);
}

#[test]
fn hostile_headers_fail_alone() {
    let fx = Fixture::new();
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        (
            "header writable",
            linked(&[desc(HDR, 16, W), desc(STATUS, 1, W)]),
        ),
        (
            "header of 15 bytes",
            linked(&[desc(HDR, 15, R), desc(STATUS, 1, W)]),
        ),
        (
            "readable data after writable data",
            linked(&[
                desc(HDR, 16, R),
                desc(DATA, 512, W),
                desc(DATA2, 512, R),
                desc(STATUS, 1, W),
            ]),
        ),
    ];
    for (name, table) in cases {
        fx.hostile(name, &table, Some(IOERR));
    }
}

#[test]
fn buffer_directions_are_enforced_for_reads_only() {
    let fx = Fixture::new();
    let bytes = pattern(5, 4096);
    assert_eq!(fx.write_disk(0, &bytes), OK);
    // IN into a read-only data buffer: IOERR, the buffer is untouched.
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let table = linked(&[desc(HDR, 16, R), desc(DATA, 4096, R), desc(STATUS, 1, W)]);
    fx.hostile("read into a read-only buffer", &table, Some(IOERR));
    // GET_ID into a read-only buffer: IOERR.
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let table = linked(&[desc(HDR, 16, R), desc(DATA, 20, R), desc(STATUS, 1, W)]);
    fx.hostile("GET_ID into a read-only buffer", &table, Some(IOERR));
    // OUT from a writable data buffer: served (reading a writable buffer is allowed).
    let other = pattern(6, 4096);
    fx.mem.write_slice(&other, GuestAddress(DATA)).unwrap();
    let (status, used) = fx.simple(VIRTIO_BLK_T_OUT, 0, Some((DATA, 4096, W)));
    assert_eq!((status, used), (OK, 1));
    assert_eq!(fx.read_disk(0, 4096), other);
}

#[test]
fn unaligned_lengths_and_out_of_range_sectors_fail_alone() {
    let fx = Fixture::new();
    for (request_type, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
        for len in [1u32, 511, 513, 4095] {
            put_header(&fx.mem, HDR, request_type, 0);
            let table = linked(&[desc(HDR, 16, R), desc(DATA, len, flags), desc(STATUS, 1, W)]);
            fx.hostile(
                &format!("type {request_type} of {len} bytes"),
                &table,
                Some(IOERR),
            );
        }
        for sector in [
            CAPACITY,
            CAPACITY - 7,
            u64::MAX,
            u64::MAX / 512 + 1,
            u64::MAX - 7,
        ] {
            put_header(&fx.mem, HDR, request_type, sector);
            let table = linked(&[
                desc(HDR, 16, R),
                desc(DATA, 4096, flags),
                desc(STATUS, 1, W),
            ]);
            fx.hostile(
                &format!("type {request_type} at sector {sector}"),
                &table,
                Some(IOERR),
            );
        }
    }
}

#[test]
fn unknown_request_types_are_unsupported() {
    let fx = Fixture::new();
    for request_type in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_BARRIER | VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_BARRIER | VIRTIO_BLK_T_IN,
        10, // GET_LIFETIME, not offered
        VIRTIO_BLK_T_SECURE_ERASE,
        VIRTIO_BLK_T_ZONE_APPEND,
        0x99,
        u32::MAX,
    ] {
        put_header(&fx.mem, HDR, request_type, 0);
        let table = linked(&[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)]);
        fx.hostile(&format!("type {request_type:#x}"), &table, Some(UNSUPP));
    }
}

#[test]
fn flush_ignores_sector_and_data_buffers() {
    let fx = Fixture::new();
    let bytes = pattern(7, 4096);
    assert_eq!(fx.write_disk(8, &bytes), OK);
    for (name, data) in [
        ("plain", None),
        (
            "non-zero sector and a readable buffer",
            Some((DATA, 512, R)),
        ),
        ("a writable buffer", Some((DATA, 512, W))),
    ] {
        let before = snapshot(&fx.mem);
        let (status, used) = fx.simple(VIRTIO_BLK_T_FLUSH, 12345, data);
        assert_eq!((status, used), (OK, 1), "{name}");
        assert_unchanged_except(&fx.mem, &before, &[(STATUS, 1), (HDR2, 16), QUEUE_AREA]);
    }
    assert_eq!(fx.read_disk(8, 4096), bytes);
}

#[test]
fn get_id_never_writes_past_the_buffer_or_20_bytes() {
    let cfg = BlkConfig {
        serial: "insitu-serial-0123456".chars().take(20).collect(),
        ..BlkConfig::new(1, QUEUE_SIZE)
    };
    let fx = Fixture::with(cfg, false);
    let id = b"insitu-serial-012345";

    // Small buffer: only its 8 bytes are written.
    fx.mem.write_slice(&[0xEE; 64], GuestAddress(DATA)).unwrap();
    let before = snapshot(&fx.mem);
    let (status, used) = fx.simple(VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 8, W)));
    assert_eq!((status, used), (OK, 9));
    let mut got = [0u8; 9];
    fx.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..8], &id[..8]);
    assert_eq!(got[8], 0xEE);
    assert_unchanged_except(
        &fx.mem,
        &before,
        &[(DATA, 8), (STATUS, 1), (HDR2, 16), QUEUE_AREA],
    );

    // Scattered over three descriptors of 7 bytes: 20 bytes written, the 21st untouched.
    put_header(&fx.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    fx.mem.write_slice(&[0xEE; 64], GuestAddress(DATA)).unwrap();
    let before = snapshot(&fx.mem);
    let table = linked(&[
        desc(HDR, 16, R),
        desc(DATA, 7, W),
        desc(DATA + 16, 7, W),
        desc(DATA + 32, 7, W),
        desc(STATUS, 1, W),
    ]);
    assert_eq!(fx.run(&table), 21);
    assert_eq!(status_at(&fx.mem, STATUS), OK);
    let mut got = [0u8; 48];
    fx.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[0..7], &id[0..7]);
    assert_eq!(&got[16..23], &id[7..14]);
    assert_eq!(&got[32..38], &id[14..20]);
    assert_eq!(got[38], 0xEE);
    assert_unchanged_except(
        &fx.mem,
        &before,
        &[
            (DATA, 7),
            (DATA + 16, 7),
            (DATA + 32, 6),
            (STATUS, 1),
            QUEUE_AREA,
        ],
    );

    // A short serial is NUL-padded to 20 bytes.
    let fx = Fixture::with(
        BlkConfig {
            serial: "abc".into(),
            ..BlkConfig::new(1, QUEUE_SIZE)
        },
        false,
    );
    fx.mem.write_slice(&[0xEE; 32], GuestAddress(DATA)).unwrap();
    let (status, used) = fx.simple(VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 32, W)));
    assert_eq!((status, used), (OK, 21));
    let mut got = [0u8; 21];
    fx.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..3], b"abc");
    assert!(got[3..20].iter().all(|&b| b == 0));
    assert_eq!(got[20], 0xEE);
}

/// A DISCARD or WRITE_ZEROES request with `segments` at DATA.
fn zeroing_table(fx: &Fixture, request_type: u32, segments: &[[u8; 16]]) -> Vec<RawDescriptor> {
    put_header(&fx.mem, HDR, request_type, 0);
    let payload: Vec<u8> = segments.concat();
    fx.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    linked(&[
        desc(HDR, 16, R),
        desc(DATA, payload.len() as u32, R),
        desc(STATUS, 1, W),
    ])
}

#[test]
fn discard_and_write_zeroes_zero_their_ranges() {
    let fx = Fixture::new();
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    for (request_type, flags) in [
        (VIRTIO_BLK_T_DISCARD, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, unmap),
    ] {
        let bytes = pattern(8, 4 * CLUSTER as usize);
        assert_eq!(fx.write_disk(0, &bytes), OK);
        // Two segments, one partial-cluster, one whole cluster, overlapping each other.
        let table = zeroing_table(
            &fx,
            request_type,
            &[
                zeroing_segment(8, 16, flags),
                zeroing_segment(64, 32, flags),
                zeroing_segment(70, 4, flags),
            ],
        );
        assert_eq!(fx.run(&table), 1);
        assert_eq!(
            status_at(&fx.mem, STATUS),
            OK,
            "type {request_type} flags {flags}"
        );
        let mut expected = bytes.clone();
        expected[8 * 512..24 * 512].fill(0);
        expected[64 * 512..96 * 512].fill(0);
        assert_eq!(fx.read_disk(0, bytes.len() as u32), expected);
    }
}

#[test]
fn hostile_discard_and_write_zeroes_fail_without_partial_effect() {
    let fx = Fixture::new();
    let bytes = pattern(10, 64 * 1024);
    assert_eq!(fx.write_disk(0, &bytes), OK);
    let good = zeroing_segment(0, 8, 0);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let cases: Vec<(&str, Vec<[u8; 16]>, u8)> = vec![
            (
                "unknown flag",
                vec![good, zeroing_segment(16, 8, 2)],
                UNSUPP,
            ),
            ("zero sectors", vec![good, zeroing_segment(16, 0, 0)], IOERR),
            (
                "past the end",
                vec![good, zeroing_segment(CAPACITY - 4, 8, 0)],
                IOERR,
            ),
            (
                "sector u64::MAX",
                vec![good, zeroing_segment(u64::MAX, 1, 0)],
                IOERR,
            ),
            (
                "over the per-segment limit",
                vec![good, zeroing_segment(0, u32::MAX, 0)],
                IOERR,
            ),
        ];
        for (name, segments, status) in cases {
            let table = zeroing_table(&fx, request_type, &segments);
            fx.hostile(
                &format!("type {request_type}: {name}"),
                &table,
                Some(status),
            );
        }
        // Payload not a multiple of 16.
        let mut table = zeroing_table(&fx, request_type, &[good]);
        table[1] = desc_next(DATA, 15, R, 2);
        fx.hostile("payload of 15 bytes", &table, Some(IOERR));
        // Empty payload.
        let table = linked(&[desc(HDR, 16, R), desc(STATUS, 1, W)]);
        fx.hostile("empty payload", &table, Some(IOERR));
        // More segments than advertised.
        let many = vec![good; 257];
        let table = zeroing_table(&fx, request_type, &many);
        fx.hostile("257 segments", &table, Some(IOERR));
        // Payload in a writable buffer.
        let mut table = zeroing_table(&fx, request_type, &[good]);
        table[1] = desc_next(DATA, 16, W, 2);
        fx.hostile("payload writable", &table, Some(IOERR));
    }
    // UNMAP on DISCARD.
    let table = zeroing_table(&fx, VIRTIO_BLK_T_DISCARD, &[zeroing_segment(0, 8, unmap)]);
    fx.hostile("UNMAP on discard", &table, Some(UNSUPP));
    assert_eq!(fx.read_disk(0, bytes.len() as u32), bytes);
}

#[test]
fn discard_and_write_zeroes_need_their_feature() {
    let mut fx = Fixture::new();
    fx.acked &= !((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES));
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let table = zeroing_table(&fx, request_type, &[zeroing_segment(0, 8, 0)]);
        fx.hostile("feature not negotiated", &table, Some(UNSUPP));
    }
}

#[test]
fn writes_are_durable_without_negotiated_flush() {
    // Without VIRTIO_BLK_F_FLUSH the driver assumes write-through: the request must only complete
    // once durable. Visible here as: the data is in a reopened image without any FLUSH request.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    Image::create(&path, &CreateOptions::new(DISK_SIZE)).unwrap();
    let bytes = pattern(11, 8192);
    {
        let image = Arc::new(Image::open(&path, &OpenOptions::default()).unwrap());
        let dev = BlkDevice::new(image.clone(), BlkConfig::new(1, QUEUE_SIZE)).unwrap();
        let mem = new_memory();
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 32);
        mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        let table = linked(&[desc(HDR, 16, R), desc(DATA, 8192, R), desc(STATUS, 1, W)]);
        let acked = dev.features() & !(1 << VIRTIO_BLK_F_FLUSH);
        assert_eq!(
            dev.process_ring_chain(pop_chain(&mem, &table, 0), RING, acked),
            1
        );
        assert_eq!(status_at(&mem, STATUS), OK);
        assert_eq!(image.stats().uncommitted_writes, 0);
    }
    let image = Image::open(
        &path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let mut got = vec![0u8; 8192];
    image.read(32 * 512, &mut got).unwrap();
    assert_eq!(got, bytes);
}

#[test]
fn read_only_device_refuses_every_change() {
    for open_read_only in [false, true] {
        let cfg = BlkConfig {
            read_only: !open_read_only,
            ..BlkConfig::new(1, QUEUE_SIZE)
        };
        let fx = Fixture::with(cfg, open_read_only);
        assert!(fx.dev.is_read_only());
        let zeros = vec![0u8; 4096];
        assert_eq!(fx.write_disk(0, &pattern(12, 4096)), IOERR);
        assert_eq!(fx.read_disk(0, 4096), zeros);
        for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let table = zeroing_table(&fx, request_type, &[zeroing_segment(0, 8, 0)]);
            assert_eq!(fx.run(&table), 1);
            assert_eq!(status_at(&fx.mem, STATUS), IOERR);
        }
        // Reads, flushes and GET_ID still work.
        let (status, _) = fx.simple(VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(status, OK);
        let (status, used) = fx.simple(VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20, W)));
        assert_eq!((status, used), (OK, 21));
    }
}

#[test]
fn device_config_follows_the_image() {
    let fx = Fixture::new();
    let space = fx.dev.config_space();
    assert_eq!(
        u64::from_le_bytes(space[0..8].try_into().unwrap()),
        CAPACITY
    );
    let opt_io = u32::from_le_bytes(space[28..32].try_into().unwrap());
    assert_eq!(opt_io, CLUSTER / 512);
    let alignment = u32::from_le_bytes(space[44..48].try_into().unwrap());
    assert_eq!(alignment, CLUSTER / 512);
    // GET_ID defaults to the image UUID.
    let (status, _) = fx.simple(VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20, W)));
    assert_eq!(status, OK);
    let mut id = [0u8; 20];
    fx.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    let uuid = fx.dev.image().geometry().uuid.clone();
    assert_eq!(&id[..], &uuid.as_bytes()[..20]);
}

#[test]
fn concurrent_writers_to_one_cluster_leave_one_whole_version() {
    // Hostile case 17: several queues (threads) write whole clusters to the same place, some of
    // them from the same guest buffer. Each request is atomic per cluster: what is read back is
    // one of the versions, never a mix.
    let fx = Arc::new(Fixture::new());
    let versions: Vec<Vec<u8>> = (0..4).map(|i| pattern(20 + i, CLUSTER as usize)).collect();
    for (i, v) in versions.iter().enumerate() {
        fx.mem
            .write_slice(v, GuestAddress(DATA + i as u64 * 0x1_0000))
            .unwrap();
    }
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let fx = fx.clone();
            scope.spawn(move || {
                let hdr = HDR + 0x100 * thread;
                let status = STATUS + 0x10 * thread;
                // Threads 2 and 3 share thread 0's buffer.
                let data = DATA + (thread % 2) * 0x1_0000;
                for round in 0..20u64 {
                    put_header(&fx.mem, hdr, VIRTIO_BLK_T_OUT, 2 * u64::from(CLUSTER) / 512);
                    let table = [
                        desc_next(hdr, 16, R, 1),
                        desc_next(data, CLUSTER, R, 2),
                        desc(status, 1, W),
                    ];
                    // Each thread uses its own queue memory at a distinct address.
                    let vq = MockSplitQueue::create(
                        &fx.mem,
                        GuestAddress(0x8000 + 0x1000 * thread),
                        QUEUE_SIZE,
                    );
                    for (i, d) in table.iter().enumerate() {
                        vq.desc_table().store(i as u16, *d).unwrap();
                    }
                    vq.avail().ring().ref_at(0).unwrap().store(0);
                    vq.avail().idx().store(1);
                    let mut queue: Queue = vq.create_queue().unwrap();
                    let chain = queue.iter(&fx.mem).unwrap().next().unwrap();
                    let ring = SplitRing {
                        desc_table: vq.desc_table_addr(),
                        size: QUEUE_SIZE,
                    };
                    let used = if thread % 2 == 0 {
                        fx.dev.process_ring_chain(chain, ring, fx.acked)
                    } else {
                        fx.dev.process_chain(chain, fx.acked)
                    };
                    assert_eq!(used, 1, "round {round}");
                    assert_eq!(status_at(&fx.mem, status), OK);
                }
            });
        }
    });
    let got = fx.read_disk(2 * u64::from(CLUSTER) / 512, CLUSTER);
    assert!(
        versions[..2].contains(&got),
        "the cluster holds a mix of versions"
    );
}

#[test]
fn guest_rewriting_its_buffer_mid_write_cannot_corrupt_the_stored_cluster() {
    // Hostile case 18: the guest flips its data buffer while the write is served. The device
    // compresses a private copy, so what is stored reads back without a checksum error.
    let fx = Arc::new(Fixture::new());
    let len = 4 * CLUSTER;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut flip = 0u8;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                flip = flip.wrapping_add(1);
                let _ = fx
                    .mem
                    .write_slice(&pattern(flip, len as usize), GuestAddress(DATA));
            }
        });
        for _ in 0..10 {
            put_header(&fx.mem, HDR, VIRTIO_BLK_T_OUT, 0);
            let table = linked(&[desc(HDR, 16, R), desc(DATA, len, R), desc(STATUS, 1, W)]);
            assert_eq!(fx.run(&table), 1);
            assert_eq!(status_at(&fx.mem, STATUS), OK);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let _ = fx.read_disk(0, len);
    assert_eq!(fx.dev.image().stats().checksum_errors, 0);
}

#[test]
fn only_reads_and_get_id_count_as_quick_requests() {
    // The worker batches completion notifications only across quick requests: everything that
    // may wait (writes, FLUSH, DISCARD, WRITE_ZEROES) or cannot be read must count as slow.
    let mem = new_memory();
    let quick = |request_type: u32, header: RawDescriptor| {
        put_header(&mem, HDR, request_type, 0);
        let table = linked(&[header, desc(DATA, 4096, W), desc(STATUS, 1, W)]);
        super::is_quick_request(&pop_chain(&mem, &table, 0))
    };
    let header = desc(HDR, 16, R);
    assert!(quick(VIRTIO_BLK_T_IN, header));
    assert!(quick(VIRTIO_BLK_T_GET_ID, header));
    for slow in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0xdead,
    ] {
        assert!(!quick(slow, header), "request type {slow}");
    }
    // A header the device could not read as one: write-only, too short, outside guest memory.
    assert!(!quick(VIRTIO_BLK_T_IN, desc(HDR, 16, W)));
    assert!(!quick(VIRTIO_BLK_T_IN, desc(HDR, 2, R)));
    assert!(!quick(VIRTIO_BLK_T_IN, desc(0x60_0000, 16, R)));
    // Through an indirect table, as virtio-queue's iterator follows it.
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    write_indirect(
        &mem,
        INDIRECT,
        &linked(&[desc(HDR, 16, R), desc(DATA, 4096, W), desc(STATUS, 1, W)]),
    );
    let table = vec![desc(INDIRECT, 48, VRING_DESC_F_INDIRECT)];
    assert!(super::is_quick_request(&pop_chain(&mem, &table, 0)));
}
