//! A minimal vhost-user-blk frontend for tests: the `vhost` crate's `Frontend` on the real socket,
//! memfd-backed guest memory shared with the backend through SET_MEM_TABLE, split virtqueues laid
//! out by hand in that memory, and helpers to place arbitrary (hostile) descriptor chains and wait
//! for their used entries with a timeout.
//!
//! Guest memory (GPA):
//! ```text
//! region A  [0, 8 MiB)        rings (64 KiB per queue) in the first MiB, data buffers after
//! hole      [8 MiB, 9 MiB)    not mapped: descriptors pointing here must be rejected
//! region B  [9 MiB, 10 MiB)   more data buffers (for chains spanning both regions)
//! ```
//! The memfd holds a canary page before, between and after the two regions (never shared with the
//! backend: it must never change). Every byte of guest memory is filled with a canary value and
//! mirrored in a shadow copy; `check_untouched` fails when a byte changed that the device was not
//! allowed to write (a device-writable descriptor or a used ring).
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

pub const SECTOR: u64 = 512;
pub const PAGE: u64 = 4096;

pub const REGION_A_GPA: u64 = 0;
pub const REGION_A_SIZE: u64 = 8 << 20;
pub const HOLE_GPA: u64 = REGION_A_GPA + REGION_A_SIZE;
pub const REGION_B_GPA: u64 = 9 << 20;
pub const REGION_B_SIZE: u64 = 1 << 20;
/// memfd offsets of the two regions; the pages around them are canaries.
const REGION_A_FILE_OFFSET: u64 = PAGE;
const REGION_B_FILE_OFFSET: u64 = REGION_A_FILE_OFFSET + REGION_A_SIZE + PAGE;
const MEMFD_SIZE: u64 = REGION_B_FILE_OFFSET + REGION_B_SIZE + PAGE;
const CANARY_PAGES: [u64; 3] = [0, REGION_A_FILE_OFFSET + REGION_A_SIZE, MEMFD_SIZE - PAGE];

const RING_AREA_SIZE: u64 = 0x10000;
pub const MAX_TEST_QUEUES: u16 = 16;
const DATA_START: u64 = RING_AREA_SIZE * MAX_TEST_QUEUES as u64;
const DATA_END: u64 = REGION_A_GPA + REGION_A_SIZE;
/// Bytes of untouched canary between two allocated buffers.
const GUARD: u64 = 64;
const CANARY: u8 = 0xC5;

/// How long a request may take before the test fails (debug builds on a loaded 2-core CI).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

// virtio ring and block constants (virtio 1.2, 2.7 and 5.2).
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_SCSI_CMD: u32 = 2;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_GET_LIFETIME: u32 = 10;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_T_SECURE_ERASE: u32 = 14;
pub const VIRTIO_BLK_T_BARRIER: u32 = 0x8000_0000;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
pub const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
pub const VIRTIO_BLK_F_SECURE_ERASE: u64 = 1 << 16;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;

/// The features a well-behaved driver of these tests accepts when offered (as Linux does,
/// EVENT_IDX included: the driver leaves used_event at 0 and polls the used ring).
pub const DRIVER_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VHOST_USER_F_PROTOCOL_FEATURES
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_BLK_F_SIZE_MAX
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_RO
    | VIRTIO_BLK_F_BLK_SIZE
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_TOPOLOGY
    | VIRTIO_BLK_F_CONFIG_WCE
    | VIRTIO_BLK_F_MQ
    | VIRTIO_BLK_F_DISCARD
    | VIRTIO_BLK_F_WRITE_ZEROES;

/// `struct virtio_blk_config` fields the tests use.
#[derive(Clone, Debug, Default)]
pub struct BlkConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

impl BlkConfig {
    pub const LEN: usize = 60;

    fn parse(raw: &[u8]) -> BlkConfig {
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap());
        BlkConfig {
            capacity: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            num_queues: u16::from_le_bytes(raw[34..36].try_into().unwrap()),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
        }
    }
}

/// One split-ring descriptor as the guest writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn ro(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    pub fn wo(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        }
    }

    /// The descriptor as the device reads it from a table.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// The 16-byte virtio-blk request header.
pub fn blk_header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub fn dwz_segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// Guest memory: the memfd, its mapping in this process, and the shadow copy.
pub struct GuestMem {
    memfd: File,
    pub mem: GuestMemoryMmap,
    shadow_a: Vec<u8>,
    shadow_b: Vec<u8>,
    /// Ranges the device may write until the next `check_untouched` (device-writable buffers).
    allowed: Vec<(u64, u64)>,
    /// Ranges the device always may write (used rings).
    always_allowed: Vec<(u64, u64)>,
    next_alloc: u64,
}

impl GuestMem {
    pub fn new() -> GuestMem {
        // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd is checked and
        // then owned by exactly one File.
        let fd = unsafe { libc::memfd_create(c"insitu-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(MEMFD_SIZE).expect("size memfd");
        let mem = GuestMemoryMmap::from_ranges_with_files([
            (
                GuestAddress(REGION_A_GPA),
                REGION_A_SIZE as usize,
                Some(FileOffset::new(
                    memfd.try_clone().expect("dup memfd"),
                    REGION_A_FILE_OFFSET,
                )),
            ),
            (
                GuestAddress(REGION_B_GPA),
                REGION_B_SIZE as usize,
                Some(FileOffset::new(
                    memfd.try_clone().expect("dup memfd"),
                    REGION_B_FILE_OFFSET,
                )),
            ),
        ])
        .expect("map guest memory");
        let canary_file = vec![CANARY; MEMFD_SIZE as usize];
        memfd.write_all_at(&canary_file, 0).expect("fill memfd");
        GuestMem {
            memfd,
            mem,
            shadow_a: vec![CANARY; REGION_A_SIZE as usize],
            shadow_b: vec![CANARY; REGION_B_SIZE as usize],
            allowed: Vec::new(),
            always_allowed: Vec::new(),
            next_alloc: DATA_START,
        }
    }

    /// The regions as SET_MEM_TABLE describes them.
    pub fn region_infos(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("region info"))
            .collect()
    }

    /// The host (frontend user-space) address of a guest address: vring addresses travel as
    /// frontend virtual addresses in vhost-user.
    pub fn host_addr(&self, gpa: u64) -> u64 {
        let region = self
            .mem
            .find_region(GuestAddress(gpa))
            .expect("test bug: host_addr outside guest memory");
        region.as_ptr() as u64 + (gpa - region.start_addr().0)
    }

    fn shadow_mut(&mut self, gpa: u64, len: usize) -> &mut [u8] {
        if gpa + len as u64 <= REGION_A_GPA + REGION_A_SIZE {
            let o = (gpa - REGION_A_GPA) as usize;
            &mut self.shadow_a[o..o + len]
        } else if gpa >= REGION_B_GPA && gpa + len as u64 <= REGION_B_GPA + REGION_B_SIZE {
            let o = (gpa - REGION_B_GPA) as usize;
            &mut self.shadow_b[o..o + len]
        } else {
            panic!("test bug: write of {len} bytes at {gpa:#x} outside one guest region")
        }
    }

    /// Writes guest memory as the driver (the shadow follows).
    pub fn write(&mut self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("test bug: write outside guest memory");
        self.shadow_mut(gpa, data.len()).copy_from_slice(data);
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(gpa))
            .expect("test bug: read outside guest memory");
        buf
    }

    /// Allocates a buffer in region A's data area, `GUARD` canary bytes apart from the others.
    /// Wraps around when the area is used up (callers never keep more than a few MiB in flight).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = len.max(1);
        assert!(
            len <= DATA_END - DATA_START - GUARD,
            "test bug: buffer too big"
        );
        let mut start = (self.next_alloc + GUARD).next_multiple_of(16);
        if start + len + GUARD > DATA_END {
            start = DATA_START + GUARD;
        }
        self.next_alloc = start + len;
        start
    }

    /// A buffer in region B.
    pub fn alloc_in_b(&self, offset: u64) -> u64 {
        REGION_B_GPA + offset
    }

    /// Lets the device write `[gpa, gpa+len)` (a device-writable descriptor) until the next check.
    pub fn allow(&mut self, gpa: u64, len: u64) {
        self.allowed.push((gpa, gpa.saturating_add(len)));
    }

    /// Withdraws the device's right to write the buffer at `gpa` (for requests that must be
    /// rejected before any access, even to their device-writable buffers).
    pub fn revoke(&mut self, gpa: u64) {
        self.allowed.retain(|r| r.0 != gpa);
    }

    /// Compares guest memory with the shadow: any changed byte outside the allowed ranges is a
    /// device write it had no right to make. Also checks the canary pages of the memfd that lie
    /// outside guest memory. Then takes the allowed ranges' new contents into the shadow.
    pub fn check_untouched(&mut self) -> Result<(), String> {
        let mut ranges: Vec<(u64, u64)> = self
            .allowed
            .iter()
            .chain(self.always_allowed.iter())
            .copied()
            .collect();
        ranges.sort_unstable();
        for (base, size, is_a) in [
            (REGION_A_GPA, REGION_A_SIZE, true),
            (REGION_B_GPA, REGION_B_SIZE, false),
        ] {
            let now = self.read(base, size as usize);
            let shadow = if is_a {
                &mut self.shadow_a
            } else {
                &mut self.shadow_b
            };
            let mut cursor = 0usize;
            let mut diffs = Vec::new();
            let mut compare = |from: usize, to: usize, shadow: &[u8]| {
                if from < to && now[from..to] != shadow[from..to] {
                    let first = (from..to).find(|&i| now[i] != shadow[i]).unwrap();
                    diffs.push(first);
                }
            };
            for &(s, e) in &ranges {
                let s = s.clamp(base, base + size) - base;
                let e = e.clamp(base, base + size) - base;
                if e <= s {
                    continue;
                }
                compare(cursor, s as usize, shadow);
                cursor = cursor.max(e as usize);
            }
            compare(cursor, size as usize, shadow);
            if let Some(first) = diffs.first() {
                let gpa = base + *first as u64;
                return Err(format!(
                    "device wrote guest memory it was not allowed to: first changed byte at GPA {gpa:#x} ({:#04x} -> {:#04x})",
                    shadow[*first], now[*first]
                ));
            }
            shadow.copy_from_slice(&now);
        }
        for page in CANARY_PAGES {
            let mut buf = vec![0u8; PAGE as usize];
            self.memfd
                .read_exact_at(&mut buf, page)
                .expect("read memfd");
            if buf.iter().any(|&b| b != CANARY) {
                return Err(format!(
                    "memfd page at offset {page:#x}, outside every guest region, changed"
                ));
            }
        }
        self.allowed.clear();
        Ok(())
    }
}

/// One split virtqueue laid out in region A.
pub struct Vq {
    pub index: u16,
    pub size: u16,
    pub desc_gpa: u64,
    pub avail_gpa: u64,
    pub used_gpa: u64,
    /// The driver's avail idx (next to publish).
    pub avail_idx: u16,
    /// The used idx seen so far.
    pub last_used: u16,
    next_desc: u16,
    pub kick: EventFd,
    pub call: EventFd,
    /// Used elements seen but not yet claimed by a waiter: head -> length.
    completed: HashMap<u16, u32>,
}

/// A used ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// A submitted standard request: where its status and data are.
#[derive(Clone, Debug)]
pub struct Pending {
    pub queue: u16,
    pub head: u16,
    pub status_gpa: u64,
    pub data_gpa: u64,
    pub data_len: u32,
}

/// How a test connection is set up.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Queues to set up and start (at most what the backend offers).
    pub queues: u16,
    pub queue_size: u16,
    /// Features the driver accepts (ANDed with the offered ones).
    pub driver_features: u64,
    /// The rings' indexes at the start (SET_VRING_BASE, and the avail and used indexes in guest
    /// memory): non-zero for a guest that ran before, e.g. on a migration destination.
    pub ring_base: u16,
    /// Per-queue overrides of `ring_base` (queue i uses `ring_bases[i]` when present).
    pub ring_bases: Vec<u16>,
    /// Set every ring up but enable none (with PROTOCOL_FEATURES): the test enables them with
    /// [`Device::enable_queues`], after all of them are set up, as QEMU's `vhost_dev_start` does.
    pub leave_disabled: bool,
    /// Negotiate INFLIGHT_SHMFD when offered and hand the backend an inflight buffer
    /// (GET_INFLIGHT_FD, then SET_INFLIGHT_FD), as cloud-hypervisor and QEMU do.
    pub inflight: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            queues: 2,
            queue_size: 128,
            driver_features: DRIVER_FEATURES,
            ring_base: 0,
            ring_bases: Vec::new(),
            leave_disabled: false,
            inflight: false,
        }
    }
}

/// Where a reconnecting frontend restarts each ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingBase {
    /// cloud-hypervisor's rule (see [`Device::reconnect_like_cloud_hypervisor`]).
    CloudHypervisor,
    /// The guest's used index (QEMU's).
    UsedIndex,
}

/// A connected and started vhost-user-blk device.
pub struct Device {
    pub fe: Frontend,
    /// The connection (a duplicate of the frontend's): shut down to disconnect.
    stream: UnixStream,
    pub gm: GuestMem,
    pub vqs: Vec<Vq>,
    pub offered_features: u64,
    pub acked_features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub config: BlkConfig,
    pub backend_queues: u64,
    /// The inflight buffer the backend gave (GET_INFLIGHT_FD), kept for every later connection
    /// (the frontend's copy: it outlives the backend).
    pub inflight: Option<(VhostUserInflight, File)>,
}

/// The result of `Device::negotiate`.
pub struct Negotiated {
    pub fe: Frontend,
    pub stream: UnixStream,
    pub offered: u64,
    pub acked: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub config: BlkConfig,
}

/// How long the backend may take to answer one vhost-user message (or a whole set-up).
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects to the backend's socket, retrying while it is not listening yet.
pub fn connect_socket(socket: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + MESSAGE_TIMEOUT;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("connect to {}: {e}", socket.display())),
        }
    }
}

/// Shuts the connection down if still armed after `timeout`: a backend that stops answering
/// makes the pending vhost-user call fail instead of hanging the test (the vhost crate retries
/// reads that time out, so socket timeouts alone would not end the wait).
pub struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl Watchdog {
    pub fn arm(stream: &UnixStream, timeout: Duration) -> Watchdog {
        let stream = stream.try_clone().expect("dup socket");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return true;
            }
            false
        });
        Watchdog {
            done: Some(tx),
            thread: Some(thread),
        }
    }

    /// Disarms; returns true if it had fired (the backend did not answer in time).
    pub fn disarm(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        drop(self.done.take());
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(false))
            .unwrap_or(false)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `f` (vhost-user calls on `stream`) under a watchdog.
pub fn guarded<T>(
    stream: &UnixStream,
    what: &str,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let watchdog = Watchdog::arm(stream, MESSAGE_TIMEOUT);
    let result = f();
    if watchdog.disarm() {
        return Err(format!(
            "{what}: the backend did not answer within {MESSAGE_TIMEOUT:?} (connection closed by the test): {:?}",
            result.err()
        ));
    }
    result
}

fn err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

/// The protocol features the test frontend acks when offered.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Bytes of one queue's region of an inflight buffer for rings of `queue_size` (the backend's
/// layout: the spec's `QueueRegionSplit`, 16-byte header and 16 bytes per descriptor, rounded
/// up to 64 bytes).
pub fn inflight_region_size(queue_size: u16) -> u64 {
    (16 + 16 * u64::from(queue_size)).div_ceil(64) * 64
}

/// The heads queue `queue`'s region of the inflight buffer marks in flight.
/// The used index queue `queue`'s region of an inflight buffer last recorded (its header's
/// `used_idx`): behind the ring's when the backend stopped between a completion and its clear.
pub fn inflight_used_idx(info: &VhostUserInflight, file: &File, queue: u16) -> u16 {
    let region = inflight_region_size(info.queue_size);
    let mut raw = [0u8; 2];
    file.read_exact_at(&mut raw, info.mmap_offset + region * u64::from(queue) + 14)
        .expect("read the inflight buffer");
    u16::from_le_bytes(raw)
}

pub fn inflight_heads(info: &VhostUserInflight, file: &File, queue: u16) -> Vec<u16> {
    let region = inflight_region_size(info.queue_size);
    let mut raw = vec![0u8; region as usize];
    file.read_exact_at(&mut raw, info.mmap_offset + region * u64::from(queue))
        .expect("read the inflight buffer");
    (0..info.queue_size)
        .filter(|&head| raw[16 + 16 * usize::from(head)] != 0)
        .collect()
}

impl Device {
    /// Connects and negotiates, without mapping memory or starting queues (for tests of the
    /// frontend messages). `max_queues` is the frontend's local bound on queue indices: make it
    /// large to send out-of-range indices.
    pub fn negotiate(
        socket: &Path,
        driver_features: u64,
        max_queues: u64,
    ) -> Result<Negotiated, String> {
        Self::negotiate_wanting_inflight(socket, driver_features, max_queues, false)
    }

    /// [`Device::negotiate`], acking INFLIGHT_SHMFD too when `inflight` and offered.
    pub fn negotiate_wanting_inflight(
        socket: &Path,
        driver_features: u64,
        max_queues: u64,
        inflight: bool,
    ) -> Result<Negotiated, String> {
        let stream = connect_socket(socket)?;
        let (fe, offered, acked, pf, config) = guarded(&stream, "negotiation", || {
            Self::negotiate_on(&stream, driver_features, max_queues, inflight)
        })?;
        Ok(Negotiated {
            fe,
            stream,
            offered,
            acked,
            protocol_features: pf,
            config,
        })
    }

    #[allow(clippy::type_complexity)]
    fn negotiate_on(
        stream: &UnixStream,
        driver_features: u64,
        max_queues: u64,
        want_inflight: bool,
    ) -> Result<(Frontend, u64, u64, VhostUserProtocolFeatures, BlkConfig), String> {
        let mut fe =
            Frontend::from_stream(stream.try_clone().map_err(err("dup socket"))?, max_queues);
        fe.set_owner().map_err(err("SET_OWNER"))?;
        let offered = fe.get_features().map_err(err("GET_FEATURES"))?;
        if offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err("backend does not offer VHOST_USER_F_PROTOCOL_FEATURES".into());
        }
        let pf = fe
            .get_protocol_features()
            .map_err(err("GET_PROTOCOL_FEATURES"))?;
        let wanted = if want_inflight {
            wanted_protocol_features() | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            wanted_protocol_features()
        };
        let pf = pf & wanted;
        fe.set_protocol_features(pf)
            .map_err(err("SET_PROTOCOL_FEATURES"))?;
        if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message without a reply of its own is acknowledged, so that a rejected
            // message is seen where it was sent.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let acked = offered & driver_features;
        fe.set_features(acked).map_err(err("SET_FEATURES"))?;
        let config = if pf.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, raw) = fe
                .get_config(
                    0,
                    BlkConfig::LEN as u32,
                    VhostUserConfigFlags::empty(),
                    &[0u8; BlkConfig::LEN],
                )
                .map_err(err("GET_CONFIG"))?;
            BlkConfig::parse(&raw)
        } else {
            return Err("backend does not offer the CONFIG protocol feature".into());
        };
        Ok((fe, offered, acked, pf, config))
    }

    /// Connects, negotiates, shares guest memory and starts `opts.queues` queues.
    pub fn connect(socket: &Path, opts: &ConnectOptions) -> Result<Device, String> {
        let stream = connect_socket(socket)?;
        let guard = stream.try_clone().map_err(err("dup socket"))?;
        guarded(&guard, "connection set-up", || {
            Self::connect_on(stream, opts)
        })
    }

    fn connect_on(stream: UnixStream, opts: &ConnectOptions) -> Result<Device, String> {
        let (mut fe, offered, acked, pf, config) =
            Self::negotiate_on(&stream, opts.driver_features, 64, opts.inflight)?;
        let backend_queues = if pf.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(err("GET_QUEUE_NUM"))?
        } else {
            1
        };
        if u64::from(opts.queues) > backend_queues || opts.queues > MAX_TEST_QUEUES {
            return Err(format!(
                "test wants {} queues, backend offers {backend_queues}",
                opts.queues
            ));
        }
        let gm = GuestMem::new();
        fe.set_mem_table(&gm.region_infos())
            .map_err(err("SET_MEM_TABLE"))?;
        let inflight = if opts.inflight && pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            let request = VhostUserInflight {
                num_queues: opts.queues,
                queue_size: opts.queue_size,
                ..Default::default()
            };
            let (info, file) = fe
                .get_inflight_fd(&request)
                .map_err(err("GET_INFLIGHT_FD"))?;
            fe.set_inflight_fd(&info, file.as_raw_fd())
                .map_err(err("SET_INFLIGHT_FD"))?;
            Some((info, file))
        } else {
            None
        };
        let mut dev = Device {
            fe,
            stream,
            gm,
            vqs: Vec::new(),
            offered_features: offered,
            acked_features: acked,
            protocol_features: pf,
            config,
            backend_queues,
            inflight,
        };
        for i in 0..opts.queues {
            let base = opts
                .ring_bases
                .get(usize::from(i))
                .copied()
                .unwrap_or(opts.ring_base);
            dev.start_queue(i, opts.queue_size, base, !opts.leave_disabled)?;
        }
        Ok(dev)
    }

    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.gm.host_addr(gpa)
    }

    /// SET_VRING_ADDR's payload for `vq`: its whole size, its rings' host addresses.
    fn vring_config(&self, vq: &Vq) -> VringConfigData {
        VringConfigData {
            queue_max_size: vq.size,
            queue_size: vq.size,
            flags: 0,
            desc_table_addr: self.host_addr(vq.desc_gpa),
            used_ring_addr: self.host_addr(vq.used_gpa),
            avail_ring_addr: self.host_addr(vq.avail_gpa),
            log_addr: None,
        }
    }

    /// Enables every ring (SET_VRING_ENABLE 1), in queue order.
    pub fn enable_queues(&mut self) -> Result<(), String> {
        for q in 0..self.vqs.len() {
            self.fe
                .set_vring_enable(q, true)
                .map_err(err("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    fn start_queue(
        &mut self,
        index: u16,
        size: u16,
        ring_base: u16,
        enable: bool,
    ) -> Result<(), String> {
        let base = REGION_A_GPA + RING_AREA_SIZE * u64::from(index);
        let vq = Vq {
            index,
            size,
            desc_gpa: base,
            avail_gpa: base + 0x4000,
            used_gpa: base + 0x8000,
            avail_idx: ring_base,
            last_used: ring_base,
            next_desc: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            completed: HashMap::new(),
        };
        // Rings start zeroed, as a driver initialises them.
        self.gm
            .write(vq.avail_gpa, &vec![0u8; 6 + 2 * size as usize]);
        self.gm
            .write(vq.used_gpa, &vec![0u8; 6 + 8 * size as usize]);
        // A guest that ran before: every request it made was completed.
        self.gm.write(vq.avail_gpa + 2, &ring_base.to_le_bytes());
        self.gm.write(vq.used_gpa + 2, &ring_base.to_le_bytes());
        self.gm
            .always_allowed
            .push((vq.used_gpa, vq.used_gpa + 6 + 8 * size as u64));
        let i = index as usize;
        self.fe
            .set_vring_num(i, size)
            .map_err(err("SET_VRING_NUM"))?;
        self.fe
            .set_vring_base(i, ring_base)
            .map_err(err("SET_VRING_BASE"))?;
        let cfg = self.vring_config(&vq);
        self.fe
            .set_vring_addr(i, &cfg)
            .map_err(err("SET_VRING_ADDR"))?;
        self.fe
            .set_vring_call(i, &vq.call)
            .map_err(err("SET_VRING_CALL"))?;
        self.fe
            .set_vring_kick(i, &vq.kick)
            .map_err(err("SET_VRING_KICK"))?;
        if enable && self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            self.fe
                .set_vring_enable(i, true)
                .map_err(err("SET_VRING_ENABLE"))?;
        }
        self.vqs.push(vq);
        Ok(())
    }

    /// Closes the connection now (the backend sees the disconnect), even while other handles
    /// (this Device) stay alive.
    pub fn disconnect(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// GET_VRING_BASE on every started queue (what QEMU sends when the VM stops): the backend
    /// must drain and answer with the avail index it reached.
    pub fn stop_queues(&mut self) -> Result<Vec<u32>, String> {
        let mut bases = Vec::new();
        for q in 0..self.vqs.len() {
            bases.push(self.get_vring_base(q as u16)?);
        }
        Ok(bases)
    }

    /// Starts every queue again after [`Device::stop_queues`], as QEMU does on `cont`: the same
    /// rings and eventfds, the ring base at the driver's available index (every request was
    /// completed before the stop).
    pub fn restart_queues(&mut self) -> Result<(), String> {
        let stream = self.stream.try_clone().map_err(err("dup socket"))?;
        let cfgs: Vec<(usize, u16, u16, VringConfigData)> = self
            .vqs
            .iter()
            .map(|vq| {
                (
                    usize::from(vq.index),
                    vq.size,
                    vq.avail_idx,
                    self.vring_config(vq),
                )
            })
            .collect();
        let enable = self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        let (fe, vqs) = (&mut self.fe, &self.vqs);
        guarded(&stream, "restarting the queues", || {
            for ((i, size, base, cfg), vq) in cfgs.iter().zip(vqs) {
                fe.set_vring_num(*i, *size).map_err(err("SET_VRING_NUM"))?;
                fe.set_vring_base(*i, *base)
                    .map_err(err("SET_VRING_BASE"))?;
                fe.set_vring_addr(*i, cfg).map_err(err("SET_VRING_ADDR"))?;
                fe.set_vring_call(*i, &vq.call)
                    .map_err(err("SET_VRING_CALL"))?;
                fe.set_vring_kick(*i, &vq.kick)
                    .map_err(err("SET_VRING_KICK"))?;
                if enable {
                    fe.set_vring_enable(*i, true)
                        .map_err(err("SET_VRING_ENABLE"))?;
                }
            }
            Ok(())
        })
    }

    /// Connects again to a backend that was restarted (the old one was killed), as
    /// cloud-hypervisor does (vu_common_ctrl.rs `reinitialize_vhost_user`): the same guest
    /// memory, rings and eventfds, the features negotiated before; SET_MEM_TABLE, every
    /// SET_VRING_NUM, SET_INFLIGHT_FD with the buffer kept (when there is one), then per ring
    /// SET_VRING_ADDR, BASE, CALL, KICK, then ENABLE, and no kick. The base is the guest's *used*
    /// index when VIRTIO_F_IN_ORDER was negotiated and there is no inflight buffer (the requests
    /// after it are made available again), and its *available* index otherwise (the backend
    /// finds the requests it had taken in the inflight buffer).
    pub fn reconnect_like_cloud_hypervisor(&mut self, socket: &Path) -> Result<(), String> {
        self.reconnect(socket, RingBase::CloudHypervisor)
    }

    /// [`Device::reconnect_like_cloud_hypervisor`] with each ring's base at the guest's used
    /// index, as QEMU sets it after its backend disconnected (it restores the last available
    /// index from the used index).
    pub fn reconnect_at_used_index(&mut self, socket: &Path) -> Result<(), String> {
        self.reconnect(socket, RingBase::UsedIndex)
    }

    fn reconnect(&mut self, socket: &Path, rule: RingBase) -> Result<(), String> {
        let stream = connect_socket(socket)?;
        let guard = stream.try_clone().map_err(err("dup socket"))?;
        let (fe, _offered, acked, pf, _config) = guarded(&guard, "reconnection", || {
            Self::negotiate_on(&stream, self.acked_features, 64, self.inflight.is_some())
        })?;
        if acked != self.acked_features {
            return Err(format!(
                "the restarted backend accepts features {acked:#x}, the guest negotiated {:#x}",
                self.acked_features
            ));
        }
        self.fe = fe;
        self.stream = stream;
        self.protocol_features = pf;
        let in_order = acked & VIRTIO_F_IN_ORDER != 0;
        if self.inflight.is_some() && !pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            return Err("the restarted backend does not offer INFLIGHT_SHMFD".into());
        }
        let regions = self.gm.region_infos();
        let rings: Vec<(usize, u16, u16, VringConfigData)> = self
            .vqs
            .iter()
            .map(|vq| {
                let base = if rule == RingBase::UsedIndex || (in_order && self.inflight.is_none()) {
                    self.used_idx(vq.index)
                } else {
                    vq.avail_idx
                };
                (usize::from(vq.index), vq.size, base, self.vring_config(vq))
            })
            .collect();
        let (fe, vqs, inflight) = (&mut self.fe, &self.vqs, &self.inflight);
        guarded(&guard, "restarting the rings", || {
            fe.set_mem_table(&regions).map_err(err("SET_MEM_TABLE"))?;
            for (i, size, _, _) in &rings {
                fe.set_vring_num(*i, *size).map_err(err("SET_VRING_NUM"))?;
            }
            if let Some((info, file)) = inflight {
                fe.set_inflight_fd(info, file.as_raw_fd())
                    .map_err(err("SET_INFLIGHT_FD"))?;
            }
            for ((i, _, base, cfg), vq) in rings.iter().zip(vqs) {
                fe.set_vring_addr(*i, cfg).map_err(err("SET_VRING_ADDR"))?;
                fe.set_vring_base(*i, *base)
                    .map_err(err("SET_VRING_BASE"))?;
                fe.set_vring_call(*i, &vq.call)
                    .map_err(err("SET_VRING_CALL"))?;
                fe.set_vring_kick(*i, &vq.kick)
                    .map_err(err("SET_VRING_KICK"))?;
            }
            for (i, _, _, _) in &rings {
                fe.set_vring_enable(*i, true)
                    .map_err(err("SET_VRING_ENABLE"))?;
            }
            Ok(())
        })
    }

    /// GET_VRING_BASE on one queue, failing if the backend does not answer in time.
    pub fn get_vring_base(&mut self, q: u16) -> Result<u32, String> {
        let stream = self.stream.try_clone().map_err(err("dup socket"))?;
        let fe = &self.fe;
        guarded(&stream, &format!("GET_VRING_BASE of queue {q}"), || {
            fe.get_vring_base(usize::from(q))
                .map_err(err("GET_VRING_BASE"))
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.config.capacity
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity * SECTOR
    }

    pub fn read_only(&self) -> bool {
        self.acked_features & VIRTIO_BLK_F_RO != 0
    }

    // ----- raw ring access (for hostile chains) -----

    /// Reserves `n` consecutive descriptor indices (modulo the queue size).
    pub fn alloc_descs(&mut self, q: u16, n: u16) -> Vec<u16> {
        let vq = &mut self.vqs[q as usize];
        (0..n)
            .map(|_| {
                let i = vq.next_desc;
                vq.next_desc = (vq.next_desc + 1) % vq.size;
                i
            })
            .collect()
    }

    /// Writes descriptor `idx` of queue `q` exactly as given (no check: tests place hostile ones).
    /// A device-writable descriptor's buffer becomes a range the device may write.
    pub fn set_desc(&mut self, q: u16, idx: u16, d: Desc) {
        let gpa = self.vqs[q as usize].desc_gpa + 16 * u64::from(idx);
        self.gm.write(gpa, &d.bytes());
        if d.flags & VRING_DESC_F_WRITE != 0 && d.flags & VRING_DESC_F_INDIRECT == 0 {
            self.gm.allow(d.addr, u64::from(d.len));
        }
    }

    /// Writes an indirect descriptor table at `gpa`.
    pub fn write_indirect_table(&mut self, gpa: u64, table: &[Desc]) {
        for (i, d) in table.iter().enumerate() {
            self.gm.write(gpa + 16 * i as u64, &d.bytes());
            if d.flags & VRING_DESC_F_WRITE != 0 {
                self.gm.allow(d.addr, u64::from(d.len));
            }
        }
    }

    /// Places `chain` in consecutive descriptors linked with NEXT (the caller's NEXT flags and
    /// next fields are overwritten for all but the last); returns the head index.
    pub fn place_chain(&mut self, q: u16, chain: &[Desc]) -> u16 {
        let idx = self.alloc_descs(q, chain.len() as u16);
        for (k, d) in chain.iter().enumerate() {
            let mut d = *d;
            if k + 1 < chain.len() {
                d.flags |= VRING_DESC_F_NEXT;
                d.next = idx[k + 1];
            }
            self.set_desc(q, idx[k], d);
        }
        idx[0]
    }

    /// Puts `head` in the avail ring and publishes the new avail idx (no kick).
    pub fn publish(&mut self, q: u16, head: u16) {
        let (ring_gpa, idx, size) = {
            let vq = &self.vqs[q as usize];
            (vq.avail_gpa, vq.avail_idx, vq.size)
        };
        let slot = ring_gpa + 4 + 2 * u64::from(idx % size);
        self.gm.write(slot, &head.to_le_bytes());
        self.set_avail_idx(q, idx.wrapping_add(1));
    }

    /// Stores the avail idx (release: the ring entries are visible before it).
    pub fn set_avail_idx(&mut self, q: u16, idx: u16) {
        let gpa = self.vqs[q as usize].avail_gpa + 2;
        fence(Ordering::SeqCst);
        self.gm.write(gpa, &idx.to_le_bytes());
        fence(Ordering::SeqCst);
        self.vqs[q as usize].avail_idx = idx;
    }

    pub fn kick(&self, q: u16) {
        self.vqs[q as usize].kick.write(1).expect("kick eventfd");
    }

    fn used_idx(&self, q: u16) -> u16 {
        let gpa = self.vqs[q as usize].used_gpa + 2;
        let v = self
            .gm
            .mem
            .load::<u16>(GuestAddress(gpa), Ordering::Acquire)
            .expect("load used idx");
        u16::from_le(v)
    }

    /// Collects new used elements of queue `q` into its completed map; returns how many.
    fn poll_used(&mut self, q: u16) -> usize {
        let now = self.used_idx(q);
        fence(Ordering::SeqCst);
        let mut n = 0;
        while self.vqs[q as usize].last_used != now {
            let vq = &self.vqs[q as usize];
            let slot = vq.used_gpa + 4 + 8 * u64::from(vq.last_used % vq.size);
            let raw = self.gm.read(slot, 8);
            let id = u32::from_le_bytes(raw[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(raw[4..8].try_into().unwrap());
            let vq = &mut self.vqs[q as usize];
            // An id that is not a valid head is recorded as is (truncated ids would hide bugs).
            let head = u16::try_from(id).unwrap_or(u16::MAX);
            if vq.completed.insert(head, len).is_some() {
                // The same head returned twice without being resubmitted.
                vq.completed.insert(u16::MAX - 1, u32::MAX);
            }
            vq.last_used = vq.last_used.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Waits until `head` of queue `q` is used; returns the used length.
    pub fn wait_head(&mut self, q: u16, head: u16, timeout: Duration) -> Result<u32, String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_used(q);
            if let Some(len) = self.vqs[q as usize].completed.remove(&head) {
                return Ok(len);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "queue {q}: head {head} not returned to the used ring within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Used elements returned for heads nobody waited for (and duplicates), drained.
    pub fn take_unclaimed(&mut self, q: u16) -> HashMap<u16, u32> {
        self.poll_used(q);
        std::mem::take(&mut self.vqs[q as usize].completed)
    }

    /// Waits `dur` and returns whether the used idx of `q` moved (for "nothing may complete").
    pub fn used_idx_after(&mut self, q: u16, dur: Duration) -> u16 {
        std::thread::sleep(dur);
        self.used_idx(q)
    }

    // ----- standard requests -----

    /// Submits a well-formed request: header, data buffers, status. `data` is written for OUT
    /// (device-readable) or sized for IN (device-writable, when `device_writes`).
    pub fn submit(
        &mut self,
        q: u16,
        req_type: u32,
        sector: u64,
        data: &[u8],
        device_writes: bool,
    ) -> Pending {
        let hdr = self.gm.alloc(16);
        self.gm.write(hdr, &blk_header(req_type, sector));
        let status = self.gm.alloc(1);
        self.gm.write(status, &[0xFF]);
        let mut chain = vec![Desc::ro(hdr, 16)];
        let mut data_gpa = 0;
        if !data.is_empty() {
            data_gpa = self.gm.alloc(data.len() as u64);
            self.gm.write(data_gpa, data);
            chain.push(if device_writes {
                Desc::wo(data_gpa, data.len() as u32)
            } else {
                Desc::ro(data_gpa, data.len() as u32)
            });
        }
        chain.push(Desc::wo(status, 1));
        let head = self.place_chain(q, &chain);
        self.publish(q, head);
        self.kick(q);
        Pending {
            queue: q,
            head,
            status_gpa: status,
            data_gpa,
            data_len: data.len() as u32,
        }
    }

    /// Waits for a submitted request; returns (used length, status byte).
    pub fn complete(&mut self, p: &Pending) -> Result<(u32, u8), String> {
        let len = self.wait_head(p.queue, p.head, REQUEST_TIMEOUT)?;
        let status = self.gm.read(p.status_gpa, 1)[0];
        Ok((len, status))
    }

    /// Submits a request and waits for it; returns the status byte (0xFF: never written).
    pub fn do_request(
        &mut self,
        q: u16,
        req_type: u32,
        sector: u64,
        data: &[u8],
        device_writes: bool,
    ) -> Result<(u32, u8), String> {
        let p = self.submit(q, req_type, sector, data, device_writes);
        self.complete(&p)
    }

    pub fn write(&mut self, q: u16, sector: u64, data: &[u8]) -> Result<u8, String> {
        Ok(self.do_request(q, VIRTIO_BLK_T_OUT, sector, data, false)?.1)
    }

    pub fn read(&mut self, q: u16, sector: u64, len: usize) -> Result<(u8, Vec<u8>), String> {
        let p = self.submit(q, VIRTIO_BLK_T_IN, sector, &vec![0xEEu8; len], true);
        let (used_len, status) = self.complete(&p)?;
        if status == VIRTIO_BLK_S_OK && used_len as usize != len + 1 {
            return Err(format!(
                "read of {len} bytes: used length {used_len}, expected {}",
                len + 1
            ));
        }
        Ok((status, self.gm.read(p.data_gpa, len)))
    }

    pub fn flush(&mut self, q: u16) -> Result<u8, String> {
        Ok(self.do_request(q, VIRTIO_BLK_T_FLUSH, 0, &[], false)?.1)
    }

    /// DISCARD or WRITE_ZEROES with the given segments.
    pub fn dwz(
        &mut self,
        q: u16,
        req_type: u32,
        segments: &[(u64, u32, u32)],
    ) -> Result<u8, String> {
        let payload: Vec<u8> = segments
            .iter()
            .flat_map(|&(s, n, f)| dwz_segment(s, n, f))
            .collect();
        Ok(self.do_request(q, req_type, 0, &payload, false)?.1)
    }

    /// Reads `[offset, offset+len)` of the disk in chunks and compares it with `model`.
    pub fn verify(&mut self, q: u16, model: &[u8], offset: u64, len: u64) -> Result<(), String> {
        const CHUNK: u64 = 256 << 10;
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos) as usize;
            let (status, data) = self.read(q, pos / SECTOR, n)?;
            if status != VIRTIO_BLK_S_OK {
                return Err(format!("read at byte {pos}: status {status}"));
            }
            let want = &model[pos as usize..pos as usize + n];
            if data != want {
                let i = (0..n).find(|&i| data[i] != want[i]).unwrap();
                return Err(format!(
                    "disk differs from the model at byte {} ({:#04x}, expected {:#04x})",
                    pos + i as u64,
                    data[i],
                    want[i]
                ));
            }
            pos += n as u64;
        }
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.disconnect();
    }
}
