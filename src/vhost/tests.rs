//! Tests of the vhost-user layer over a real socket: the vhost crate's `Frontend` plays the
//! frontend, guest memory is a memfd shared with the backend, and a fake device records what it
//! was asked (the virtio-blk logic and the engine have their own tests; the end-to-end tests with
//! the real binary live in tests/).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::blk::SplitRing;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::image::{ImageError, Stats};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const MEM_SIZE: usize = 4 << 20;
const QUEUE_LEN: u16 = 256;
const CONFIG: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

/// Records every call; checks that no quiesce happens while a request executes.
#[derive(Default)]
struct FakeDevice {
    events: Mutex<Vec<&'static str>>,
    in_flight: AtomicUsize,
    quiesced: AtomicBool,
    processed: AtomicUsize,
    processed_while_quiesced: AtomicUsize,
    quiesce_during_request: AtomicUsize,
    threads: Mutex<Vec<(usize, thread::ThreadId)>>,
    delay: Mutex<Duration>,
    resume_delay: Mutex<Duration>,
    fail_resume: AtomicBool,
    /// Requests after this many processed ones say they may take long and, while `hold_slow`
    /// is set, block until it is cleared (None: every request is quick).
    slow_after: Mutex<Option<usize>>,
    hold_slow: AtomicBool,
    /// Another process holds the image's writer lock: a resume waits for it (up to 20 s, as
    /// `--wait-lock` does) and fails while it is held.
    lock_held: AtomicBool,
    /// Waits for the writer lock started.
    lock_waits: AtomicUsize,
    /// Requests that start after this many processed ones block in the device until it is set
    /// back to `None` ([`FakeDevice::release`]); the backend still takes them for quick ones.
    /// Lets a test act while a request is in progress instead of racing it with sleeps.
    hold_after: Mutex<Option<usize>>,
    /// Requests blocked by `hold_after` now.
    held: AtomicUsize,
    /// While set, the k-th wait for the writer lock (counted by `lock_waits`) blocks until
    /// `lock_waits_released` reaches k, or its worker no longer wants to wait.
    hold_lock_waits: AtomicBool,
    lock_waits_released: AtomicUsize,
}

impl FakeDevice {
    fn new() -> Self {
        let device = Self::default();
        device.quiesced.store(true, Ordering::SeqCst);
        device
    }

    /// What every request does: the status byte (the last writable buffer) says whether the
    /// device was quiesced; the tag (a readable buffer's first u64) and the thread are recorded.
    fn record(&self, mem: &GuestMemory, descriptors: &[(GuestAddress, bool)]) -> u32 {
        let mut status_addr = None;
        let mut queue_tag = 0usize;
        for &(addr, writable) in descriptors {
            if writable {
                status_addr = Some(addr);
            } else {
                queue_tag = mem.read_obj::<u64>(addr).unwrap_or(0) as usize;
            }
        }
        let quiesced = self.quiesced.load(Ordering::SeqCst);
        if quiesced {
            self.processed_while_quiesced.fetch_add(1, Ordering::SeqCst);
        }
        let status: u8 = if quiesced { 1 } else { 0 };
        if let Some(addr) = status_addr {
            mem.write_obj(status, addr).unwrap();
        }
        self.threads
            .lock()
            .unwrap()
            .push((queue_tag, thread::current().id()));
        self.processed.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        1
    }

    fn events(&self) -> Vec<&'static str> {
        self.events.lock().unwrap().clone()
    }

    /// True while a request starting now must wait in the device (see `hold_after`).
    fn holding(&self) -> bool {
        matches!(*self.hold_after.lock().unwrap(),
            Some(after) if self.processed.load(Ordering::SeqCst) >= after)
    }

    /// Lets the requests held by `hold_after` go on, and holds no more.
    fn release(&self) {
        *self.hold_after.lock().unwrap() = None;
    }
}

impl Device for FakeDevice {
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn config_space(&self) -> Vec<u8> {
        CONFIG.to_vec()
    }

    fn completes_quickly(&self, _chain: &Chain) -> bool {
        match *self.slow_after.lock().unwrap() {
            Some(quick) => self.processed.load(Ordering::SeqCst) < quick,
            None => true,
        }
    }

    fn process_chain(
        &self,
        chain: Chain,
        _ring: SplitRing,
        _acked_features: u64,
        _submitted: crate::blk::Submitted,
    ) -> u32 {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap();
        thread::sleep(delay);
        if self.holding() {
            self.held.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.holding() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        if !self.completes_quickly(&chain) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.hold_slow.load(Ordering::SeqCst) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
        }
        let mem = chain.memory().clone();
        let descriptors: Vec<(GuestAddress, bool)> = chain
            .map(|desc| (desc.addr(), desc.is_write_only()))
            .collect();
        self.record(&mem, &descriptors)
    }

    fn process_head(
        &self,
        mem: &GuestMemory,
        head: u16,
        ring: SplitRing,
        _acked_features: u64,
        _submitted: crate::blk::Submitted,
    ) -> u32 {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        // Direct descriptors only (what these tests build).
        let mut descriptors = Vec::new();
        let mut index = head;
        for _ in 0..ring.size {
            let at = ring.desc_table.unchecked_add(u64::from(index) * 16);
            let addr: u64 = mem.read_obj(at).unwrap();
            let flags: u16 = mem.read_obj(at.unchecked_add(12)).unwrap();
            let next: u16 = mem.read_obj(at.unchecked_add(14)).unwrap();
            descriptors.push((GuestAddress(addr), flags & VIRTQ_DESC_F_WRITE != 0));
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            index = next;
        }
        self.record(mem, &descriptors)
    }

    fn quiesce(&self) -> Result<(), ImageError> {
        if self.in_flight.load(Ordering::SeqCst) != 0 {
            self.quiesce_during_request.fetch_add(1, Ordering::SeqCst);
        }
        self.quiesced.store(true, Ordering::SeqCst);
        self.events.lock().unwrap().push("quiesce");
        Ok(())
    }

    fn wait_until_lockable(&self, keep_waiting: &dyn Fn() -> bool) {
        let ticket = self.lock_waits.fetch_add(1, Ordering::SeqCst) + 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.hold_lock_waits.load(Ordering::SeqCst)
            && self.lock_waits_released.load(Ordering::SeqCst) < ticket
            && keep_waiting()
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(1));
        }
        while self.lock_held.load(Ordering::SeqCst) && keep_waiting() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn resume(&self) -> Result<(), ImageError> {
        let delay = *self.resume_delay.lock().unwrap();
        thread::sleep(delay);
        if self.fail_resume.load(Ordering::SeqCst) || self.lock_held.load(Ordering::SeqCst) {
            self.events.lock().unwrap().push("resume-failed");
            return Err(ImageError::Locked);
        }
        self.quiesced.store(false, Ordering::SeqCst);
        self.events.lock().unwrap().push("resume");
        Ok(())
    }

    fn close(self) -> Result<(), ImageError> {
        Ok(())
    }

    fn stats(&self) -> Stats {
        Stats {
            reads: self.processed.load(Ordering::SeqCst) as u64,
            ..Stats::default()
        }
    }
}

/// When [`TestFrontend::submit_with`] kicks.
#[derive(Clone, Copy)]
enum Kick {
    Always,
    Never,
    /// Only when the device's avail_event asks for it, as a driver with EVENT_IDX does.
    EventIdx,
}

/// A running daemon on a temporary socket.
struct Served {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    disk: Arc<SharedDisk<FakeDevice>>,
    stop: StopHandle,
    thread: Option<thread::JoinHandle<Result<(), DaemonError>>>,
}

impl Served {
    /// A daemon configured as `serve` configures it (default polling, with back-off).
    fn start(num_queues: usize) -> Self {
        Self::start_configured(num_queues, DaemonConfig::DEFAULT_POLL_MAX, true)
    }

    /// A daemon whose workers poll for up to `poll_max` after every batch, whatever the load:
    /// the back-off would stop polling whenever the test machine is busy (cargo runs tests in
    /// parallel), and these tests assert what polling does. The back-off has its own tests.
    fn start_polling(num_queues: usize, poll_max: Duration) -> Self {
        Self::start_configured(num_queues, poll_max, false)
    }

    fn start_configured(num_queues: usize, poll_max: Duration, poll_backoff: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost.sock");
        let listener = bind_listener(&SocketSource::Path(socket.clone())).unwrap();
        let mut daemon = Daemon::new(
            FakeDevice::new(),
            listener,
            DaemonConfig {
                num_queues,
                queue_size: 256,
                poll_max,
                poll_backoff,
            },
        )
        .unwrap();
        let disk = daemon.disk();
        let stop = daemon.stop_handle();
        let thread = Some(thread::spawn(move || daemon.serve()));
        Self {
            _dir: dir,
            socket,
            disk,
            stop,
            thread,
        }
    }

    /// A daemon with `num_queues` queues and a frontend connected to it (memory shared, no
    /// ring started).
    fn with_frontend(num_queues: usize) -> (Self, TestFrontend) {
        let served = Self::start(num_queues);
        let fe = TestFrontend::connect(&served.socket, num_queues);
        (served, fe)
    }

    fn device(&self) -> &FakeDevice {
        self.disk.device()
    }

    /// No request was executed while the device was quiesced.
    fn assert_nothing_processed_while_quiesced(&self) {
        let count = self
            .device()
            .processed_while_quiesced
            .load(Ordering::SeqCst);
        assert_eq!(count, 0, "requests executed while the device was quiesced");
    }

    fn stop(mut self) {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap().unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.stop();
            // After a failed assertion the daemon may be the thing that hangs: do not wait.
            if !thread::panicking() {
                let _ = thread.join();
            }
        }
    }
}

fn memfd(size: usize) -> File {
    // SAFETY: the name is a valid C string; the returned descriptor is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

/// Guest addresses of a split virtqueue's parts.
struct RingAddresses {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

/// A frontend with memfd guest memory and split virtqueues.
struct TestFrontend {
    frontend: Frontend,
    mem: GuestMemoryMmap<()>,
    _memfd: File,
    queues: Vec<Option<(RingAddresses, EventFd, EventFd)>>,
    submitted: Vec<u16>,
}

const QUEUE_AREA: u64 = 0x1_0000;
const BUFFER_AREA: u64 = 0x20_0000;

impl TestFrontend {
    fn connect(socket: &Path, num_queues: usize) -> Self {
        Self::connect_without(socket, num_queues, 0)
    }

    /// Connects, accepting every offered feature except those in `refused`.
    fn connect_without(socket: &Path, num_queues: usize, refused: u64) -> Self {
        let mut frontend = Frontend::connect(socket, num_queues as u64).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap() & !refused;
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(protocol).unwrap();

        let file = memfd(MEM_SIZE);
        let region =
            MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), MEM_SIZE).unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM_SIZE as u64,
                userspace_addr: 0x7000_0000,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            }])
            .unwrap();
        Self {
            frontend,
            mem,
            _memfd: file,
            queues: (0..num_queues).map(|_| None).collect(),
            submitted: vec![0; num_queues],
        }
    }

    /// Lays out queue `q`'s split ring in guest memory (zeroed) and sends SET_VRING_NUM,
    /// SET_VRING_ADDR and SET_VRING_BASE 0: everything but the eventfds and the enable.
    fn set_up_ring(&mut self, q: usize) -> RingAddresses {
        let start = GuestAddress(QUEUE_AREA * (q as u64 + 1));
        // Split virtqueue layout (virtio 1.2, 2.7): descriptor table, then the available ring
        // (flags, idx, ring[len], used_event), then the used ring 4-byte aligned.
        let len = u64::from(QUEUE_LEN);
        let desc = start;
        let avail = GuestAddress(desc.0 + 16 * len);
        let used = GuestAddress((avail.0 + 6 + 2 * len + 3) & !3);
        let end = used.0 + 6 + 8 * len;
        assert!(end <= start.0 + QUEUE_AREA);
        self.mem
            .write_slice(&vec![0u8; (end - start.0) as usize], start)
            .unwrap();
        let vq = RingAddresses { desc, avail, used };
        let to_user = |a: GuestAddress| 0x7000_0000 + a.0;
        self.frontend.set_vring_num(q, QUEUE_LEN).unwrap();
        self.frontend
            .set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QUEUE_LEN,
                    queue_size: QUEUE_LEN,
                    flags: 0,
                    desc_table_addr: to_user(vq.desc),
                    used_ring_addr: to_user(vq.used),
                    avail_ring_addr: to_user(vq.avail),
                    log_addr: None,
                },
            )
            .unwrap();
        self.frontend.set_vring_base(q, 0).unwrap();
        self.submitted[q] = 0;
        vq
    }

    fn start_queue(&mut self, q: usize) {
        let vq = self.set_up_ring(q);
        let call = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        self.frontend.set_vring_call(q, &call).unwrap();
        self.frontend.set_vring_kick(q, &kick).unwrap();
        self.frontend.set_vring_enable(q, true).unwrap();
        self.queues[q] = Some((vq, kick, call));
        self.consume_start_notification(q);
    }

    /// The backend signals a new call fd once (a spurious notification for the driver, which
    /// finds nothing new in the used ring): consumed here, once the backend has handled the
    /// messages sent so far (a request with a reply is answered after them), so that tests
    /// counting notifications count only those of completions.
    fn consume_start_notification(&self, q: usize) {
        self.frontend.get_features().unwrap();
        let (_, _, call) = self.queues[q].as_ref().unwrap();
        let _ = call.read();
    }

    /// Adds one request (a readable tag naming the queue, a writable status byte) and kicks.
    fn submit(&mut self, q: usize) -> GuestAddress {
        self.submit_with(q, Kick::Always)
    }

    /// Adds one request and kicks as `kick` says.
    fn submit_with(&mut self, q: usize, kick_mode: Kick) -> GuestAddress {
        let n = self.submitted[q];
        let (rings, kick, _) = self.queues[q].as_ref().unwrap();
        let slot = n % (QUEUE_LEN / 2);
        let buffer = GuestAddress(BUFFER_AREA + (q as u64 * 0x1000) + u64::from(slot) * 16);
        self.mem.write_obj(q as u64, buffer).unwrap();
        let status = GuestAddress(buffer.0 + 8);
        self.mem.write_obj(0xffu8, status).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(
                buffer.0,
                8,
                VIRTQ_DESC_F_NEXT,
                slot * 2 + 1,
            )),
            RawDescriptor::from(SplitDescriptor::new(status.0, 1, VIRTQ_DESC_F_WRITE, 0)),
        ];
        for (i, desc) in descs.iter().enumerate() {
            let at = GuestAddress(rings.desc.0 + 16 * u64::from(slot * 2 + i as u16));
            self.mem.write_obj(*desc, at).unwrap();
        }
        let avail_idx = u16::from_le(self.mem.read_obj(GuestAddress(rings.avail.0 + 2)).unwrap());
        let entry = GuestAddress(rings.avail.0 + 4 + 2 * u64::from(avail_idx % QUEUE_LEN));
        self.mem.write_obj(u16::to_le(slot * 2), entry).unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(
                u16::to_le(avail_idx.wrapping_add(1)),
                GuestAddress(rings.avail.0 + 2),
            )
            .unwrap();
        self.submitted[q] = n + 1;
        let new_idx = avail_idx.wrapping_add(1);
        let wanted = match kick_mode {
            Kick::Always => true,
            Kick::Never => false,
            Kick::EventIdx => {
                // virtio 1.2, 2.7.10: kick when the new index passes the device's avail_event
                // (vring_need_event), read after the index was published.
                std::sync::atomic::fence(Ordering::SeqCst);
                let at = GuestAddress(rings.used.0 + 4 + 8 * u64::from(QUEUE_LEN));
                let avail_event = u16::from_le(self.mem.read_obj(at).unwrap());
                new_idx.wrapping_sub(avail_event).wrapping_sub(1) < new_idx.wrapping_sub(avail_idx)
            }
        };
        if wanted {
            kick.write(1).unwrap();
        }
        status
    }

    /// Makes `count` one-descriptor requests (just a status byte) available at once, then kicks
    /// once. Returns their status addresses.
    fn submit_burst(&mut self, q: usize, count: u16) -> Vec<GuestAddress> {
        assert!(count <= QUEUE_LEN);
        let (rings, kick, _) = self.queues[q].as_ref().unwrap();
        let base = BUFFER_AREA + 0x10_0000 + q as u64 * 0x1000;
        let avail_idx = u16::from_le(self.mem.read_obj(GuestAddress(rings.avail.0 + 2)).unwrap());
        let mut statuses = Vec::new();
        for i in 0..count {
            let status = GuestAddress(base + u64::from(i));
            self.mem.write_obj(0xffu8, status).unwrap();
            let desc =
                RawDescriptor::from(SplitDescriptor::new(status.0, 1, VIRTQ_DESC_F_WRITE, 0));
            self.mem
                .write_obj(desc, GuestAddress(rings.desc.0 + 16 * u64::from(i)))
                .unwrap();
            let slot = avail_idx.wrapping_add(i) % QUEUE_LEN;
            self.mem
                .write_obj(
                    u16::to_le(i),
                    GuestAddress(rings.avail.0 + 4 + 2 * u64::from(slot)),
                )
                .unwrap();
            statuses.push(status);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(
                u16::to_le(avail_idx.wrapping_add(count)),
                GuestAddress(rings.avail.0 + 2),
            )
            .unwrap();
        self.submitted[q] = self.submitted[q].wrapping_add(count);
        kick.write(1).unwrap();
        statuses
    }

    /// Sets the driver's available index (a hostile driver may set anything) and kicks.
    fn set_avail_idx(&self, q: usize, idx: u16) {
        let (rings, kick, _) = self.queues[q].as_ref().unwrap();
        self.mem
            .write_obj(u16::to_le(idx), GuestAddress(rings.avail.0 + 2))
            .unwrap();
        kick.write(1).unwrap();
    }

    /// GET_VRING_BASE of ring `q`, answered within 5 s (a stop never waits for a polling
    /// worker or a broken ring); returns the frontend and the ring's base.
    fn stop_ring_promptly(self, q: usize) -> (Self, u32) {
        within(
            Duration::from_secs(5),
            &format!("GET_VRING_BASE of ring {q}"),
            move || {
                let base = self.frontend.get_vring_base(q).unwrap();
                (self, base)
            },
        )
    }

    /// True when queue `q`'s call eventfd is signalled within `timeout_ms` (then consumed).
    fn call_ready(&self, q: usize, timeout_ms: i32) -> bool {
        let (_, _, call) = self.queues[q].as_ref().unwrap();
        let mut pollfd = libc::pollfd {
            fd: call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pollfd` is a valid, live pollfd array of length 1 for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) } == 1;
        if ready {
            let _ = call.read();
        }
        ready
    }

    fn used_idx(&self, q: usize) -> u16 {
        let (rings, _, _) = self.queues[q].as_ref().unwrap();
        u16::from_le(self.mem.read_obj(GuestAddress(rings.used.0 + 2)).unwrap())
    }

    fn wait_used(&self, q: usize, expected: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx(q) != expected {
            assert!(
                Instant::now() < deadline,
                "queue {q}: used index {} never reached {expected}",
                self.used_idx(q)
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn status(&self, addr: GuestAddress) -> u8 {
        self.mem.read_obj(addr).unwrap()
    }
}

/// Waits up to `limit` for `condition`; returns whether it came true.
fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
    true
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn config_is_answered_while_quiesced_without_resuming() {
    let (served, mut fe) = Served::with_frontend(2);
    let (_, config) = fe
        .frontend
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap();
    assert_eq!(config, CONFIG);
    // A frontend asking for a larger struct gets our bytes followed by zeros.
    let (_, config) = fe
        .frontend
        .get_config(4, 12, VhostUserConfigFlags::WRITABLE, &[0; 12])
        .unwrap();
    assert_eq!(config, [5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
    // cloud-hypervisor counts from VHOST_USER_CONFIG_OFFSET (0x100).
    let (_, config) = fe
        .frontend
        .get_config(0x100, 12, VhostUserConfigFlags::WRITABLE, &[0; 12])
        .unwrap();
    assert_eq!(config, [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]);
    let (_, config) = fe
        .frontend
        .get_config(0x104, 4, VhostUserConfigFlags::WRITABLE, &[0; 4])
        .unwrap();
    assert_eq!(config, [5, 6, 7, 8]);
    assert!(served.device().events().is_empty());
    assert!(!served.disk.is_running());
    served.stop();
}

#[test]
fn offers_the_protocol_features_frontends_need() {
    let served = Served::start(1);
    let mut frontend = Frontend::connect(&served.socket, 1).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES");
    assert_ne!(features & (1 << 26), 0, "LOG_ALL");
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    for needed in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        VhostUserProtocolFeatures::LOG_SHMFD,
    ] {
        assert!(protocol.contains(needed), "{needed:?} missing");
    }
    frontend.set_protocol_features(protocol).unwrap();
    assert_eq!(frontend.get_queue_num().unwrap(), 1);
    served.stop();
}

#[test]
fn starting_a_ring_resumes_and_requests_complete() {
    let (served, mut fe) = Served::with_frontend(2);
    fe.start_queue(0);
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    let statuses: Vec<_> = (0..3).map(|_| fe.submit(0)).collect();
    fe.wait_used(0, 3);
    for status in statuses {
        assert_eq!(fe.status(status), 0);
    }
    served.assert_nothing_processed_while_quiesced();
    served.stop();
}

#[test]
fn get_vring_base_drains_and_quiesces_before_the_reply() {
    let (served, mut fe) = Served::with_frontend(2);
    fe.start_queue(0);
    fe.start_queue(1);
    fe.submit(0);
    fe.wait_used(0, 1);
    *served.device().delay.lock().unwrap() = Duration::from_millis(300);
    fe.submit(0);
    fe.submit(1);
    wait_for("requests in flight", || {
        served.device().in_flight.load(Ordering::SeqCst) == 2
    });
    // Stopping one ring waits for the requests in progress but keeps the device running: the
    // other ring is still started.
    assert_eq!(fe.frontend.get_vring_base(0).unwrap(), 2);
    assert_eq!(served.device().in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(fe.used_idx(0), 2);
    assert_eq!(served.device().events(), ["resume"]);
    // Stopping the last one quiesces before the reply.
    assert_eq!(fe.frontend.get_vring_base(1).unwrap(), 1);
    assert_eq!(served.device().events(), ["resume", "quiesce"]);
    assert_eq!(
        served
            .device()
            .quiesce_during_request
            .load(Ordering::SeqCst),
        0
    );
    assert_eq!(served.device().processed.load(Ordering::SeqCst), 3);
    assert!(!served.disk.is_running());
    // Rings restarting resume the device.
    *served.device().delay.lock().unwrap() = Duration::ZERO;
    fe.start_queue(0);
    let status = fe.submit(0);
    fe.wait_used(0, 1);
    assert_eq!(fe.status(status), 0);
    assert_eq!(served.device().events(), ["resume", "quiesce", "resume"]);
    served.stop();
}

/// Reviewer F4: GET_VRING_BASE of one ring waits for every queue's request in progress (the
/// gates), but not for the rest of another queue's batch: a busy worker gives its gate back after
/// its current request. Without that, stopping ring 0 here waits for all 20 slow requests of
/// queue 1.
#[test]
fn get_vring_base_waits_for_one_request_of_a_busy_queue_not_its_batch() {
    let (served, mut fe) = Served::with_frontend(2);
    fe.start_queue(0);
    fe.start_queue(1);
    // 60 requests of 100 ms: waiting for the batch takes 6 s; waiting for one request leaves
    // seconds of margin for a loaded machine.
    *served.device().delay.lock().unwrap() = Duration::from_millis(100);
    let statuses = fe.submit_burst(1, 60);
    wait_for("queue 1 busy", || {
        served.device().in_flight.load(Ordering::SeqCst) == 1
    });
    assert_eq!(fe.frontend.get_vring_base(0).unwrap(), 0);
    let done = fe.used_idx(1);
    assert!(
        done < 30,
        "GET_VRING_BASE of ring 0 waited for {done} requests of queue 1"
    );
    // The yielded batch goes on (quickly now): every request completes, none twice.
    *served.device().delay.lock().unwrap() = Duration::ZERO;
    fe.wait_used(1, 60);
    for status in statuses {
        assert_eq!(fe.status(status), 0);
    }
    assert_eq!(served.device().processed.load(Ordering::SeqCst), 60);
    served.stop();
}

/// GET_VRING_BASE on a ring that was never started (a frontend stopping every ring it knows,
/// as cloud-hypervisor does at reset, or QEMU with more queues than the guest set up) answers
/// with the ring's base and neither resumes nor quiesces the device; the started rings go on.
#[test]
fn get_vring_base_of_a_never_started_ring_leaves_the_device_alone() {
    let (served, mut fe) = Served::with_frontend(3);
    assert_eq!(fe.frontend.get_vring_base(1).unwrap(), 0);
    fe.frontend.set_vring_base(2, 7).unwrap();
    assert_eq!(fe.frontend.get_vring_base(2).unwrap(), 7);
    assert!(served.device().events().is_empty());
    assert!(!served.disk.is_running());
    fe.start_queue(0);
    fe.submit(0);
    fe.wait_used(0, 1);
    assert_eq!(fe.frontend.get_vring_base(1).unwrap(), 0);
    assert_eq!(served.device().events(), ["resume"]);
    assert!(served.disk.is_running());
    let status = fe.submit(0);
    fe.wait_used(0, 2);
    assert_eq!(fe.status(status), 0);
    assert_eq!(fe.frontend.get_vring_base(0).unwrap(), 2);
    assert_eq!(served.device().events(), ["resume", "quiesce"]);
    served.stop();
}

/// A ring stopped while the worker of another started ring still waits for the device's
/// resume must not quiesce the device under that ring (its requests would fail with I/O errors:
/// seen as a flaky hostile case 19 before every started ring was counted from its first event).
/// The fake device holds each worker's wait for the writer lock (a resume's first step) until
/// the test lets it go: ring 0's worker resumes the device while ring 1's still waits, and ring
/// 0 is stopped exactly then.
#[test]
fn stopping_one_ring_while_another_waits_for_the_resume_keeps_the_device_running() {
    let (served, mut fe) = Served::with_frontend(2);
    let device = served.device();
    device.hold_lock_waits.store(true, Ordering::SeqCst);
    fe.start_queue(0);
    wait_for("ring 0's worker to start resuming", || {
        device.lock_waits.load(Ordering::SeqCst) == 1
    });
    fe.start_queue(1);
    wait_for("ring 1's worker to start resuming", || {
        device.lock_waits.load(Ordering::SeqCst) == 2
    });
    // Ring 0's worker resumes the device; ring 1's goes on waiting.
    device.lock_waits_released.store(1, Ordering::SeqCst);
    wait_for("ring 0's worker to resume the device", || {
        device.events() == ["resume"]
    });
    assert_eq!(fe.frontend.get_vring_base(0).unwrap(), 0);
    assert_eq!(
        device.events(),
        ["resume"],
        "the device was quiesced while ring 1 was started"
    );
    assert_eq!(
        device.lock_waits.load(Ordering::SeqCst),
        2,
        "test bug: ring 1's worker did not wait for the resume"
    );
    // Ring 1's worker goes on and serves its ring with the device resumed once.
    device.lock_waits_released.store(2, Ordering::SeqCst);
    let status = fe.submit(1);
    fe.wait_used(1, 1);
    assert_eq!(fe.status(status), 0, "request on the started ring");
    assert_eq!(device.events(), ["resume"]);
    served.assert_nothing_processed_while_quiesced();
    served.stop();
}

/// cloud-hypervisor pauses a VM by SET_VRING_ENABLE 0 alone and may then snapshot guest memory:
/// once that message is acknowledged, no request of the ring is in progress and none completes
/// any more (before, the worker finished its whole batch after the reply); enabling the ring
/// again serves the rest.
#[test]
fn set_vring_enable_0_waits_for_the_request_in_progress_and_stops_the_ring() {
    let (served, mut fe) = Served::with_frontend(1);
    fe.start_queue(0);
    // 60 requests of 50 ms: seconds of margin for the message to arrive before the burst ends
    // on a loaded machine.
    *served.device().delay.lock().unwrap() = Duration::from_millis(50);
    let statuses = fe.submit_burst(0, 60);
    wait_for("a request in progress", || {
        served.device().in_flight.load(Ordering::SeqCst) == 1
    });
    fe.frontend
        .set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    fe.frontend.set_vring_enable(0, false).unwrap();
    let at_reply = fe.used_idx(0);
    assert_eq!(
        served.device().in_flight.load(Ordering::SeqCst),
        0,
        "a request still in progress after the reply"
    );
    // Quick requests from now on: a worker that went on with its batch after the reply would
    // complete the rest well within the wait below.
    *served.device().delay.lock().unwrap() = Duration::ZERO;
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        fe.used_idx(0),
        at_reply,
        "requests completed after SET_VRING_ENABLE 0 was answered"
    );
    assert!(at_reply < 60, "the whole burst was served before the reply");
    fe.frontend.set_vring_enable(0, true).unwrap();
    fe.wait_used(0, 60);
    for status in statuses {
        assert_eq!(fe.status(status), 0);
    }
    served.assert_nothing_processed_while_quiesced();
    served.stop();
}

/// SET_FEATURES while the rings run (QEMU switches VHOST_F_LOG_ALL on at the start of a live
/// migration and off when it is cancelled): the rings keep running, with their state.
#[test]
fn set_features_while_running_keeps_the_rings_running() {
    let (served, mut fe) = Served::with_frontend(1);
    fe.start_queue(0);
    let status = fe.submit(0);
    fe.wait_used(0, 1);
    assert_eq!(fe.status(status), 0);
    let offered = fe.frontend.get_features().unwrap();
    const LOG_ALL: u64 = 1 << 26;
    for (k, features) in [offered, offered & !LOG_ALL, offered]
        .into_iter()
        .enumerate()
    {
        fe.frontend.set_features(features).unwrap();
        let status = fe.submit(0);
        fe.wait_used(0, k as u16 + 2);
        assert_eq!(fe.status(status), 0, "after SET_FEATURES {features:#x}");
    }
    assert_eq!(served.device().events(), ["resume"]);
    served.assert_nothing_processed_while_quiesced();
    served.stop();
}

#[test]
fn each_queue_is_served_by_its_own_thread() {
    let (served, mut fe) = Served::with_frontend(4);
    for q in 0..4 {
        fe.start_queue(q);
    }
    for round in 1..=3u16 {
        for q in 0..4 {
            fe.submit(q);
        }
        for q in 0..4 {
            fe.wait_used(q, round);
        }
    }
    let threads = served.device().threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 12);
    for q in 0..4 {
        let ids: Vec<_> = threads
            .iter()
            .filter(|(t, _)| *t == q)
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(ids.len(), 3);
        assert!(
            ids.iter().all(|id| *id == ids[0]),
            "queue {q} moved threads"
        );
        for (other, id) in &threads {
            if *other != q {
                assert_ne!(*id, ids[0], "queues {q} and {other} share a thread");
            }
        }
    }
    served.stop();
}

#[test]
fn disconnect_quiesces_and_the_next_connection_finds_the_disk() {
    let served = Served::start(1);
    for connection in 1..=3 {
        let mut fe = TestFrontend::connect(&served.socket, 1);
        fe.start_queue(0);
        let status = fe.submit(0);
        fe.wait_used(0, 1);
        assert_eq!(fe.status(status), 0);
        drop(fe);
        wait_for("quiesce after disconnect", || {
            served.device().events().len() == connection * 2
        });
        assert!(!served.disk.is_running());
    }
    assert_eq!(
        served.device().events(),
        ["resume", "quiesce", "resume", "quiesce", "resume", "quiesce"]
    );
    served.stop();
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Set in the child process that [`reconnecting_does_not_leak_file_descriptors`] measures in.
const FD_LEAK_CHILD: &str = "INSITU_BLK_FD_LEAK_TEST_CHILD";

#[test]
fn reconnecting_does_not_leak_file_descriptors() {
    // The process's fd count means something only while no other test opens or closes fds
    // (cargo runs the tests in parallel threads of one process): the test runs itself alone in
    // a child process, and measures there without any slack.
    if std::env::var_os(FD_LEAK_CHILD).is_none() {
        let name = format!(
            "{}::reconnecting_does_not_leak_file_descriptors",
            module_path!().split_once("::").unwrap().1
        );
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name.as_str(), "--exact", "--test-threads=1", "--nocapture"])
            .env(FD_LEAK_CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "the measurement in a child process failed:\n{stdout}\n{stderr}"
        );
        return;
    }
    let served = Served::start(8);
    let connect_and_serve = || {
        let mut fe = TestFrontend::connect(&served.socket, 8);
        fe.start_queue(0);
        fe.submit(0);
        fe.wait_used(0, 1);
        fe
    };
    // Counted while a connection is served: the daemon serves one connection at a time, so the
    // one before is over by then (its workers joined, its fds closed), and the count compares
    // like with like.
    let count_while_served = || {
        let fe = connect_and_serve();
        let count = open_fds();
        drop(fe);
        count
    };
    // Warm up (lazily created process-wide fds), then measure.
    drop(connect_and_serve());
    let before = count_while_served();
    for _ in 0..10 {
        drop(connect_and_serve());
    }
    let after = count_while_served();
    // A leak of the 8 exit eventfds per connection would cost 80 here; any leak shows.
    assert!(
        after <= before,
        "fds grew from {before} to {after} over 10 connections"
    );
    eprintln!("open fds: {before} before, {after} after 10 connections");
    served.stop();
}

#[test]
fn a_failed_resume_fails_requests_and_is_retried_later() {
    let served = Served::start(1);
    served.device().fail_resume.store(true, Ordering::SeqCst);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    let status = fe.submit(0);
    fe.wait_used(0, 1);
    assert_eq!(
        fe.status(status),
        1,
        "request must fail while the device cannot resume"
    );
    served.device().fail_resume.store(false, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(1100));
    let status = fe.submit(0);
    fe.wait_used(0, 2);
    assert_eq!(fe.status(status), 0);
    assert_eq!(served.device().events(), ["resume-failed", "resume"]);
    served.stop();
}

#[test]
fn stop_ends_an_active_connection_and_the_loop() {
    let (served, mut fe) = Served::with_frontend(1);
    fe.start_queue(0);
    fe.submit(0);
    fe.wait_used(0, 1);
    let disk = Arc::clone(&served.disk);
    served.stop();
    // The connection's end quiesced the device.
    assert_eq!(disk.device().events(), ["resume", "quiesce"]);
    assert!(disk.shut_down("test").is_ok());
}

#[test]
fn socket_path_rules() {
    let dir = tempfile::tempdir().unwrap();
    // A live listener is not stolen.
    let live = dir.path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    assert!(matches!(
        bind_listener(&SocketSource::Path(live.clone())),
        Err(DaemonError::SocketInUse(_))
    ));
    // A stale socket file is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let listener = bind_listener(&SocketSource::Path(stale.clone())).unwrap();
    assert!(std::os::unix::net::UnixStream::connect(&stale).is_ok());
    drop(listener);
    // A regular file is never removed.
    let file = dir.path().join("file");
    std::fs::write(&file, b"data").unwrap();
    assert!(matches!(
        bind_listener(&SocketSource::Path(file.clone())),
        Err(DaemonError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    // --fd must be an open, listening unix socket.
    assert!(matches!(
        bind_listener(&SocketSource::Fd(987_654)),
        Err(DaemonError::BadFd { .. })
    ));
    let regular = File::open(&file).unwrap();
    assert!(matches!(
        bind_listener(&SocketSource::Fd(regular.as_raw_fd())),
        Err(DaemonError::BadFd { .. })
    ));
}

#[test]
fn guest_memory_the_backend_writes_is_marked_in_the_dirty_log() {
    use vhost::VhostUserDirtyLogRegion;
    const PAGE: u64 = 4096;
    let (served, mut fe) = Served::with_frontend(1);
    fe.start_queue(0);
    let log_size = (MEM_SIZE as u64 / PAGE).div_ceil(8);
    let log = memfd(log_size as usize);
    fe.frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log_size,
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .unwrap();
    let status = fe.submit(0);
    fe.wait_used(0, 1);
    let region = MmapRegion::<()>::from_file(FileOffset::new(log, 0), log_size as usize).unwrap();
    let bitmap =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    let dirty = |addr: u64| {
        let page = addr / PAGE;
        let byte: u8 = bitmap.read_obj(GuestAddress(page / 8)).unwrap();
        byte & (1 << (page % 8)) != 0
    };
    let (rings, _, _) = fe.queues[0].as_ref().unwrap();
    assert!(dirty(status.0), "the status byte's page is not logged");
    assert!(dirty(rings.used.0), "the used ring's page is not logged");
    // Pages the backend only read stay clean.
    assert!(
        !dirty(rings.desc.0 + 2 * PAGE),
        "an untouched page is logged"
    );
    assert!(!dirty(BUFFER_AREA + 0x10_0000));
    served.stop();
}

#[test]
fn a_full_ring_is_served_in_bounded_batches_from_a_single_kick() {
    let (served, mut fe) = Served::with_frontend(1);
    fe.start_queue(0);
    // The ring-start event has been handled once the device resumed: from here on, the burst's
    // single kick is the only event.
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    // More requests than one event may execute (128): the worker must re-arm itself for the rest.
    let statuses = fe.submit_burst(0, QUEUE_LEN);
    fe.wait_used(0, QUEUE_LEN);
    for status in statuses {
        assert_eq!(fe.status(status), 0);
    }
    assert_eq!(
        served.device().processed.load(Ordering::SeqCst),
        usize::from(QUEUE_LEN)
    );
    served.stop();
}

/// Runs `f` on a thread and fails the test if it does not return within `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

#[test]
fn a_broken_available_index_neither_spins_nor_blocks_a_stop() {
    let (served, mut fe) = Served::with_frontend(2);
    fe.start_queue(0);
    fe.start_queue(1);
    wait_for("resume", || served.device().events() == ["resume"]);
    // More than a queue size ahead of the device: an invalid ring. Queue 0 must give up on it
    // (not spin), the other queue keeps working, and stopping both is answered.
    fe.set_avail_idx(0, QUEUE_LEN + 7);
    let status = fe.submit(1);
    fe.wait_used(1, 1);
    assert_eq!(fe.status(status), 0);
    thread::sleep(Duration::from_millis(100));
    let (fe, _) = fe.stop_ring_promptly(0);
    fe.stop_ring_promptly(1);
    assert_eq!(served.device().events(), ["resume", "quiesce"]);
    served.stop();
}

#[test]
fn stopping_rings_under_load_always_answers_and_drains() {
    let (served, mut fe) = Served::with_frontend(2);
    *served.device().delay.lock().unwrap() = Duration::from_millis(20);
    for round in 0..5 {
        fe.start_queue(0);
        fe.start_queue(1);
        // Requests queued behind the one executing: the stop must drain what was popped and
        // leave the rest in the ring for the next start, without hanging.
        fe.submit_burst(0, 8);
        fe.submit_burst(1, 8);
        thread::sleep(Duration::from_millis(10));
        let (tx, rx) = std::sync::mpsc::channel();
        let frontend = std::mem::replace(
            &mut fe.frontend,
            Frontend::from_stream(std::os::unix::net::UnixStream::pair().unwrap().0, 2),
        );
        thread::spawn(move || {
            let bases = (
                frontend.get_vring_base(0).unwrap(),
                frontend.get_vring_base(1).unwrap(),
            );
            let _ = tx.send((frontend, bases));
        });
        let (frontend, (base0, base1)) = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("round {round}: GET_VRING_BASE not answered"));
        fe.frontend = frontend;
        // Every request the backend took (next avail) was completed (used) before the reply.
        assert_eq!(u32::from(fe.used_idx(0)), base0, "round {round}");
        assert_eq!(u32::from(fe.used_idx(1)), base1, "round {round}");
        assert_eq!(served.device().in_flight.load(Ordering::SeqCst), 0);
        assert!(!served.disk.is_running(), "round {round}: not quiesced");
    }
    assert_eq!(
        served
            .device()
            .quiesce_during_request
            .load(Ordering::SeqCst),
        0
    );
    served.stop();
}

#[test]
fn disabling_every_ring_quiesces_and_enabling_one_resumes() {
    let (served, mut fe) = Served::with_frontend(2);
    fe.start_queue(0);
    fe.start_queue(1);
    fe.submit(0);
    fe.submit(1);
    fe.wait_used(0, 1);
    fe.wait_used(1, 1);
    assert_eq!(served.device().events(), ["resume"]);
    // One ring disabled: the other still runs, nothing happens.
    fe.frontend.set_vring_enable(0, false).unwrap();
    thread::sleep(Duration::from_millis(600));
    assert_eq!(served.device().events(), ["resume"]);
    // Every ring disabled (cloud-hypervisor's pause): quiesced without any GET_VRING_BASE.
    fe.frontend.set_vring_enable(1, false).unwrap();
    wait_for("quiesce on pause", || {
        served.device().events() == ["resume", "quiesce"]
    });
    assert!(!served.disk.is_running());
    // A request queued while paused is served once the ring is enabled again.
    let status = fe.submit(1);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(fe.used_idx(1), 1, "served while disabled");
    fe.frontend.set_vring_enable(1, true).unwrap();
    fe.wait_used(1, 2);
    assert_eq!(fe.status(status), 0);
    assert_eq!(served.device().events(), ["resume", "quiesce", "resume"]);
    served.assert_nothing_processed_while_quiesced();
    served.stop();
}

#[test]
fn a_ring_size_that_is_not_a_power_of_two_is_never_served() {
    let (served, mut fe) = Served::with_frontend(1);
    let rings = |len: u64| VringConfigData {
        queue_max_size: len as u16,
        queue_size: len as u16,
        flags: 0,
        desc_table_addr: 0x7000_0000 + QUEUE_AREA,
        avail_ring_addr: 0x7000_0000 + QUEUE_AREA + 16 * len,
        used_ring_addr: 0x7000_0000 + QUEUE_AREA + 0x8000,
        log_addr: None,
    };
    fe.frontend
        .set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    // The size is refused by that message (the daemon's control filter; an error ack), and the
    // crate ends the connection, so no ring set-up can follow.
    assert!(
        fe.frontend.set_vring_num(0, 100).is_err(),
        "SET_VRING_NUM 100 acknowledged"
    );
    assert!(fe.frontend.set_vring_addr(0, &rings(100)).is_err());
    assert!(
        served.device().events().is_empty(),
        "the refused ring was started"
    );
    // The crate ends a connection whose request it refused; the next one works.
    drop(fe);
    fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    let status = fe.submit(0);
    fe.wait_used(0, 1);
    assert_eq!(fe.status(status), 0);
    // A bad size sent to a running ring is refused too, so the ring keeps the size the frontend
    // was told was accepted: a request the guest adds meanwhile is either served with that
    // layout (correctly) or not at all (the crate ends the connection after a refusal). Wait
    // for the error ack: nothing orders a message on the socket before a kick on the eventfd.
    fe.frontend
        .set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    assert!(
        fe.frontend.set_vring_num(0, 100).is_err(),
        "SET_VRING_NUM 100 on a running ring acknowledged"
    );
    let status = fe.submit(0);
    // Judged once the connection is over: the daemon hangs up after the requests in progress
    // have completed (the drain), and takes none after, so the ring holds its final state (a
    // worker caught between the status byte and the used entry would otherwise look like a
    // request executed and never completed).
    wait_for_hangup(&fe);
    match fe.used_idx(0) {
        1 => assert_eq!(fe.status(status), 0xff, "status written, no used entry"),
        2 => assert_eq!(fe.status(status), 0, "served with the accepted layout"),
        other => panic!("used index {other} after one more request"),
    }
    served.stop();
}

#[test]
fn a_request_added_without_a_kick_while_the_worker_polls_is_served() {
    // A window far longer than the test: the worker is still polling when the request comes.
    let served = Served::start_polling(1, Duration::from_secs(30));
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    let first = fe.submit(0);
    fe.wait_used(0, 1);
    assert_eq!(fe.status(first), 0);
    let quiet = fe.submit_with(0, Kick::Never);
    fe.wait_used(0, 2);
    assert_eq!(fe.status(quiet), 0);
    // Stopping the ring ends the poll at once (a quiesce never waits for a polling worker).
    let (fe, base) = fe.stop_ring_promptly(0);
    assert_eq!(base, 2);
    assert_eq!(served.device().events(), ["resume", "quiesce"]);
    drop(fe);
    served.stop();
}

#[test]
fn a_stopped_ring_is_not_served_by_a_worker_that_was_polling_it() {
    let served = Served::start_polling(2, Duration::from_secs(30));
    let mut fe = TestFrontend::connect(&served.socket, 2);
    fe.start_queue(0);
    fe.start_queue(1);
    fe.submit(0);
    fe.submit(1);
    fe.wait_used(0, 1);
    fe.wait_used(1, 1);
    // Both workers poll now. Stopping one ring must neither wait for the other's poll nor
    // let its own worker take a request made available after the stop.
    let (mut fe, base) = fe.stop_ring_promptly(0);
    assert_eq!(base, 1);
    let late = fe.submit_with(0, Kick::Never);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(fe.used_idx(0), 1, "a stopped ring was served");
    assert_eq!(fe.status(late), 0xff);
    assert_eq!(served.device().processed.load(Ordering::SeqCst), 2);
    // Ring 1 still polls and serves unkicked requests.
    let status = fe.submit_with(1, Kick::Never);
    fe.wait_used(1, 2);
    assert_eq!(fe.status(status), 0);
    let (fe, base) = fe.stop_ring_promptly(1);
    assert_eq!(base, 2);
    assert_eq!(served.device().events(), ["resume", "quiesce"]);
    drop(fe);
    served.stop();
}

/// Submits requests, each as soon as the previous one completed or after a short pause, with
/// a driver that kicks only when the device's avail_event asks for it. A request added between
/// the worker's last look at the ring and its re-enabling of notifications must still be seen
/// (the re-check after re-enabling) or kicked for; otherwise it is stranded.
fn serve_without_strandings(poll_max: Duration) {
    let served = Served::start_polling(1, poll_max);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    let pauses_us = [0u64, 0, 0, 10, 30, 45, 50, 55, 70, 100, 200, 1000];
    let mut done = 0u16;
    for round in 0..400usize {
        let pause = pauses_us[(round * 7) % pauses_us.len()];
        if pause > 0 {
            thread::sleep(Duration::from_micros(pause));
        }
        let status = fe.submit_with(0, Kick::EventIdx);
        if round % 5 == 0 {
            // Sometimes a second one right behind the first.
            fe.submit_with(0, Kick::EventIdx);
            done = done.wrapping_add(1);
        }
        done = done.wrapping_add(1);
        // Spin (no 2 ms sleeps): the next request comes while the worker is still finishing
        // this one (notifying, polling, going to sleep).
        let deadline = Instant::now() + Duration::from_secs(10);
        while fe.used_idx(0) != done {
            assert!(Instant::now() < deadline, "round {round}: request stranded");
            std::hint::spin_loop();
        }
        assert_eq!(fe.status(status), 0, "round {round}");
    }
    served.stop();
}

#[test]
fn no_request_is_stranded_when_polling_ends_and_the_worker_sleeps() {
    serve_without_strandings(Duration::from_micros(50));
}

#[test]
fn no_request_is_stranded_without_polling() {
    serve_without_strandings(Duration::ZERO);
}

#[test]
fn polling_off_still_serves_with_event_idx_kicks() {
    let served = Served::start_polling(1, Duration::ZERO);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    for n in 1..=50u16 {
        fe.submit_with(0, Kick::EventIdx);
        fe.wait_used(0, n);
    }
    served.stop();
}

#[test]
fn a_disconnect_ends_a_long_poll_and_the_next_connection_is_served() {
    let served = Served::start_polling(1, Duration::from_secs(30));
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    fe.submit(0);
    fe.wait_used(0, 1);
    // The worker polls (30 s window) when the frontend goes away without stopping the ring.
    drop(fe);
    let socket = served.socket.clone();
    let fe = within(
        Duration::from_secs(5),
        "serving the next connection",
        move || {
            let mut fe = TestFrontend::connect(&socket, 1);
            fe.start_queue(0);
            let status = fe.submit(0);
            fe.wait_used(0, 1);
            assert_eq!(fe.status(status), 0);
            fe
        },
    );
    drop(fe);
    served.stop();
}

#[test]
fn a_completion_is_not_held_back_by_a_batch_of_slow_requests() {
    let served = Served::start(1);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    // Eight requests of 20 ms each: notifying once per 8 completions (or when the ring drains)
    // would tell the driver about the first one only 140 ms after it completed. The driver's
    // used_event is 0, so the first notification is the one it asked for. The eighth request
    // is held in the device (a quick one still, as far as the backend knows) until the driver
    // was notified: a backend that waits for 8 completions never notifies, however slow or
    // loaded the machine.
    *served.device().delay.lock().unwrap() = Duration::from_millis(20);
    *served.device().hold_after.lock().unwrap() = Some(7);
    fe.submit_burst(0, 8);
    let notified = fe.call_ready(0, 10_000);
    let used = fe.used_idx(0);
    served.device().release();
    assert!(
        notified,
        "no notification within 10 s (used index {used}, the eighth request held)"
    );
    assert!(
        (1..8).contains(&used),
        "first notification only after {used} completions"
    );
    fe.wait_used(0, 8);
    served.stop();
}

#[test]
fn completions_held_for_batching_are_signalled_before_a_slow_request_runs() {
    // A read completes, then a request that may take long (a FLUSH's commit, a write waiting
    // for space) runs: the driver must hear of the read before that one ends, not after.
    let served = Served::start(1);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    *served.device().slow_after.lock().unwrap() = Some(1);
    served.device().hold_slow.store(true, Ordering::SeqCst);
    // Both available at once, one kick: the first completes, the second blocks in the device.
    fe.submit_burst(0, 2);
    assert!(
        fe.call_ready(0, 10_000),
        "the first completion was not signalled while the slow request ran"
    );
    assert_eq!(
        fe.used_idx(0),
        1,
        "signalled with the first completion only"
    );
    wait_for("the slow request to run", || {
        served.device().in_flight.load(Ordering::SeqCst) == 1
    });
    assert_eq!(fe.used_idx(0), 1, "the slow request completed while held");
    served.device().hold_slow.store(false, Ordering::SeqCst);
    fe.wait_used(0, 2);
    served.stop();
}

/// Reviewer R25: without EVENT_IDX the driver's VRING_AVAIL_F_NO_INTERRUPT (avail->flags bit 0)
/// says it does not want used-buffer notifications (a polling driver); virtio 1.2 2.7.7.2: the
/// device SHOULD NOT send one then. With the flag clear, every batch is notified.
#[test]
fn no_interrupt_flag_without_event_idx_suppresses_notifications() {
    let served = Served::start(1);
    let mut fe = TestFrontend::connect_without(&served.socket, 1, VIRTIO_RING_F_EVENT_IDX);
    fe.start_queue(0);
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    let avail = fe.queues[0].as_ref().unwrap().0.avail;
    // The driver polls: no interrupt wanted.
    fe.mem.write_obj(1u16.to_le(), avail).unwrap();
    fe.submit_burst(0, 4);
    fe.wait_used(0, 4);
    assert!(
        !fe.call_ready(0, 200),
        "notified although the driver set VRING_AVAIL_F_NO_INTERRUPT"
    );
    // Interrupts wanted again.
    fe.mem.write_obj(0u16.to_le(), avail).unwrap();
    fe.submit_burst(0, 4);
    fe.wait_used(0, 8);
    assert!(
        fe.call_ready(0, 10_000),
        "not notified with VRING_AVAIL_F_NO_INTERRUPT clear"
    );
    served.stop();
}

/// VIRTIO_F_IN_ORDER (bit 35) and VIRTIO_F_RING_PACKED (bit 34).
const VIRTIO_F_IN_ORDER: u64 = 1 << 35;
const VIRTIO_F_RING_PACKED: u64 = 1 << 34;

impl TestFrontend {
    /// Makes one single-descriptor request (a status byte) available per entry of `heads`, in
    /// that order, then kicks once. Returns the status addresses by head.
    fn submit_heads(&mut self, q: usize, heads: &[u16]) -> Vec<GuestAddress> {
        let (rings, kick, _) = self.queues[q].as_ref().unwrap();
        let base = BUFFER_AREA + 0x10_0000 + q as u64 * 0x1000;
        let avail_idx = u16::from_le(self.mem.read_obj(GuestAddress(rings.avail.0 + 2)).unwrap());
        let mut statuses = Vec::new();
        for (i, &head) in heads.iter().enumerate() {
            let status = GuestAddress(base + u64::from(head));
            self.mem.write_obj(0xffu8, status).unwrap();
            let desc =
                RawDescriptor::from(SplitDescriptor::new(status.0, 1, VIRTQ_DESC_F_WRITE, 0));
            self.mem
                .write_obj(desc, GuestAddress(rings.desc.0 + 16 * u64::from(head)))
                .unwrap();
            let slot = avail_idx.wrapping_add(i as u16) % QUEUE_LEN;
            self.mem
                .write_obj(
                    u16::to_le(head),
                    GuestAddress(rings.avail.0 + 4 + 2 * u64::from(slot)),
                )
                .unwrap();
            statuses.push(status);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(
                u16::to_le(avail_idx.wrapping_add(heads.len() as u16)),
                GuestAddress(rings.avail.0 + 2),
            )
            .unwrap();
        self.submitted[q] = self.submitted[q].wrapping_add(heads.len() as u16);
        kick.write(1).unwrap();
        statuses
    }

    /// The ids of the used ring's entries `from..from + count`, in ring order.
    fn used_ids(&self, q: usize, from: u16, count: u16) -> Vec<u32> {
        let (rings, _, _) = self.queues[q].as_ref().unwrap();
        (0..count)
            .map(|i| {
                let slot = from.wrapping_add(i) % QUEUE_LEN;
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(rings.used.0 + 4 + 8 * u64::from(slot)))
                    .unwrap();
                u32::from_le(id)
            })
            .collect()
    }
}

/// Proto P3: the backend offers VIRTIO_F_IN_ORDER (cloud-hypervisor restarts a ring at the used
/// index only with it) and no packed ring, and a driver that negotiated it sees each queue's
/// buffers used in exactly the order it made them available, with two queues busy at once and
/// heads made available in an order unrelated to their numbers.
#[test]
fn in_order_is_offered_and_each_queue_uses_buffers_in_the_order_made_available() {
    let served = Served::start(2);
    let mut fe = TestFrontend::connect(&served.socket, 2);
    let offered = fe.frontend.get_features().unwrap();
    assert_ne!(
        offered & VIRTIO_F_IN_ORDER,
        0,
        "VIRTIO_F_IN_ORDER not offered"
    );
    assert_eq!(offered & VIRTIO_F_RING_PACKED, 0, "packed rings offered");
    // The harness accepts every offered feature: IN_ORDER is negotiated.
    fe.start_queue(0);
    fe.start_queue(1);
    let count = QUEUE_LEN / 2;
    let mut used = [0u16; 2];
    for round in 0..4u16 {
        // A different permutation of the heads per queue and round.
        let orders: Vec<Vec<u16>> = (0..2u16)
            .map(|q| {
                (0..count)
                    .map(|i| (i * 37 + round * 11 + q * 5) % count)
                    .collect()
            })
            .collect();
        for (q, order) in orders.iter().enumerate() {
            assert_eq!(
                order
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len(),
                usize::from(count),
                "test bug: not a permutation"
            );
            fe.submit_heads(q, order);
        }
        for (q, order) in orders.iter().enumerate() {
            used[q] = used[q].wrapping_add(count);
            fe.wait_used(q, used[q]);
            let ids = fe.used_ids(q, used[q].wrapping_sub(count), count);
            let expected: Vec<u32> = order.iter().map(|&h| u32::from(h)).collect();
            assert_eq!(ids, expected, "queue {q}, round {round}: used out of order");
        }
    }
    served.stop();
}

/// Proto P1: a ring started (enabled, then its kick fd) before the frontend gives its call fd,
/// with a request already available: the worker completes the request at once, while there is
/// nowhere to signal. The call fd given afterwards must be signalled, or the driver never hears
/// of that completion.
#[test]
fn a_completion_made_before_the_call_fd_arrives_is_signalled_on_it() {
    let (served, mut fe) = Served::with_frontend(2);
    // The device already runs (another ring started), so the new ring's request is served the
    // moment the ring starts.
    fe.start_queue(1);
    fe.submit(1);
    fe.wait_used(1, 1);
    let vq = fe.set_up_ring(0);
    let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
    fe.queues[0] = Some((vq, kick.try_clone().unwrap(), call.try_clone().unwrap()));
    let status = fe.submit_with(0, Kick::Never);
    fe.frontend.set_vring_enable(0, true).unwrap();
    fe.frontend.set_vring_kick(0, &kick).unwrap();
    fe.wait_used(0, 1);
    assert_eq!(fe.status(status), 0);
    assert!(
        !fe.call_ready(0, 0),
        "test bug: call fd signalled before it was given"
    );
    fe.frontend.set_vring_call(0, &call).unwrap();
    assert!(
        fe.call_ready(0, 5_000),
        "the completion was never signalled on the call fd given after it"
    );
    served.stop();
}

/// Proto P4: SET_VRING_KICK with a new eventfd for a started, enabled ring. The new fd must be
/// watched (the old one is closed by the backend): requests kicked on it are served. Polling is
/// off, so only a kick can wake the worker.
#[test]
fn a_new_kick_fd_for_a_started_ring_is_watched() {
    let served = Served::start_polling(1, Duration::ZERO);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    fe.submit(0);
    fe.wait_used(0, 1);
    let new_kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
    fe.frontend.set_vring_kick(0, &new_kick).unwrap();
    // Handled once this answer comes.
    fe.frontend.get_features().unwrap();
    fe.queues[0].as_mut().unwrap().1 = new_kick;
    // Let the worker go back to sleep after the ring's restart.
    thread::sleep(Duration::from_millis(50));
    for n in 2..=4 {
        let status = fe.submit(0);
        fe.wait_used(0, n);
        assert_eq!(fe.status(status), 0);
        thread::sleep(Duration::from_millis(20));
    }
    // The ring still stops and drains normally.
    let (fe, base) = fe.stop_ring_promptly(0);
    assert_eq!(base, 4);
    drop(fe);
    served.stop();
}

/// Proto P2: SET_VRING_KICK with the invalid-FD flag (bit 8, "poll the ring instead") is
/// refused at once (error ack, then the connection ends, as for every message the crate
/// refuses) rather than acknowledged for a ring that would never start; the daemon serves the
/// next connection.
#[test]
fn a_kick_without_an_fd_is_refused_at_once() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let served = Served::start(1);
    let stream = UnixStream::connect(&served.socket).unwrap();
    let mut frontend = Frontend::from_stream(stream.try_clone().unwrap(), 1);
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    const SET_VRING_KICK: u32 = 12;
    const VERSION_1: u32 = 0x1;
    const REPLY: u32 = 0x4;
    const NEED_REPLY: u32 = 0x8;
    const NO_FD: u64 = 0x100;
    let mut message = Vec::new();
    message.extend_from_slice(&SET_VRING_KICK.to_le_bytes());
    message.extend_from_slice(&(VERSION_1 | NEED_REPLY).to_le_bytes());
    message.extend_from_slice(&8u32.to_le_bytes());
    message.extend_from_slice(&NO_FD.to_le_bytes());
    (&stream).write_all(&message).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reply = [0u8; 20];
    (&stream).read_exact(&mut reply).unwrap();
    let word = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().unwrap());
    assert_eq!(word(0), SET_VRING_KICK);
    assert_ne!(word(4) & REPLY, 0);
    let ack = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    assert_ne!(ack, 0, "a kick without an fd was acknowledged as success");
    // The connection ends; the daemon serves the next one.
    let mut rest = [0u8; 1];
    assert!(matches!((&stream).read(&mut rest), Ok(0) | Err(_)));
    drop(frontend);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    let status = fe.submit(0);
    fe.wait_used(0, 1);
    assert_eq!(fe.status(status), 0);
    served.stop();
}

/// Proto P8: a frontend that disconnects while its device waits for the writer lock (a
/// migration destination whose QEMU gives up while the source still runs). The worker must stop
/// waiting at once: the next connection is served promptly, and the gone guest's queued request
/// is never executed (neither with an I/O error after the wait, nor on the disk once the lock
/// comes free).
#[test]
fn a_disconnect_ends_the_wait_for_the_writer_lock() {
    let served = Served::start(1);
    served.device().lock_held.store(true, Ordering::SeqCst);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    fe.submit(0);
    wait_for("the resume to wait for the lock", || {
        served.device().lock_waits.load(Ordering::SeqCst) == 1
    });
    drop(fe);
    // The next frontend is answered while the lock is still held elsewhere.
    let socket = served.socket.clone();
    let fe = within(
        Duration::from_secs(5),
        "the next connection's set-up",
        move || TestFrontend::connect(&socket, 1),
    );
    assert_eq!(
        served.device().processed.load(Ordering::SeqCst),
        0,
        "the gone frontend's request was executed"
    );
    assert!(
        served.device().events().is_empty(),
        "resumed for a gone frontend"
    );
    // The lock comes free: the new frontend's device resumes and serves it.
    served.device().lock_held.store(false, Ordering::SeqCst);
    let mut fe = fe;
    fe.start_queue(0);
    let status = fe.submit(0);
    fe.wait_used(0, 1);
    assert_eq!(fe.status(status), 0);
    assert_eq!(served.device().processed.load(Ordering::SeqCst), 1);
    served.stop();
}

/// Proto P8, SIGTERM variant: stopping the daemon (what SIGTERM does) while a connected
/// frontend's device waits for the writer lock ends at once (vhost-user.rst: a backend ends as
/// quickly as possible on SIGTERM), without executing the queued request.
#[test]
fn stopping_the_daemon_ends_the_wait_for_the_writer_lock() {
    let served = Served::start(1);
    served.device().lock_held.store(true, Ordering::SeqCst);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    fe.submit(0);
    wait_for("the resume to wait for the lock", || {
        served.device().lock_waits.load(Ordering::SeqCst) == 1
    });
    let disk = Arc::clone(&served.disk);
    within(Duration::from_secs(5), "the daemon's stop", move || {
        served.stop();
    });
    assert_eq!(disk.device().processed.load(Ordering::SeqCst), 0);
    drop(fe);
}

/// Proto P6: a ring disabled (SET_VRING_ENABLE 0) and stopped, then RESET_OWNER and the same
/// connection set up again without PROTOCOL_FEATURES: SET_FEATURES enables every ring then
/// (vhost-user.rst "Ring states"), so the ring is served again without any SET_VRING_ENABLE.
#[test]
fn a_reset_owner_then_a_set_up_without_protocol_features_serves_a_ring_disabled_before() {
    const PROTOCOL_FEATURES: u64 = 1 << 30;
    let (served, mut fe) = Served::with_frontend(1);
    fe.start_queue(0);
    fe.submit(0);
    fe.wait_used(0, 1);
    fe.frontend.set_vring_enable(0, false).unwrap();
    let (mut fe, _) = fe.stop_ring_promptly(0);
    fe.frontend.reset_owner().unwrap();
    fe.frontend.set_owner().unwrap();
    let features = fe.frontend.get_features().unwrap() & !PROTOCOL_FEATURES;
    fe.frontend.set_features(features).unwrap();
    fe.frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: 0x7000_0000,
            mmap_offset: 0,
            mmap_handle: fe._memfd.as_raw_fd(),
        }])
        .unwrap();
    let vq = fe.set_up_ring(0);
    let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
    fe.frontend.set_vring_call(0, &call).unwrap();
    fe.frontend.set_vring_kick(0, &kick).unwrap();
    fe.queues[0] = Some((vq, kick, call));
    let status = fe.submit(0);
    fe.wait_used(0, 1);
    assert_eq!(fe.status(status), 0);
    served.stop();
}

/// Waits until the frontend's end of the connection is hung up by the backend.
fn wait_for_hangup(fe: &TestFrontend) {
    let mut pollfd = libc::pollfd {
        fd: fe.frontend.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pollfd` is a valid, live pollfd array of length 1 for the duration of the call.
    let ready = unsafe { libc::poll(&mut pollfd, 1, 10_000) };
    assert_eq!(
        ready, 1,
        "the backend did not close the connection within 10 s"
    );
}

/// `fe` hung up while the fake device held one of its requests, with `at_close` completed:
/// once the backend has seen the hang-up, the held request is released and a next frontend is
/// served (one connection at a time, so by then the first one's workers are gone and whatever
/// they did is in its ring). Nothing may have completed after the hang-up, no head twice, and
/// no request been taken after it.
fn assert_nothing_completed_after_the_hang_up(served: &Served, fe: &TestFrontend, at_close: u16) {
    let seen = wait_until(Duration::from_secs(10), || {
        served.stop.last_connection_ended()
    });
    served.device().release();
    let mut next = TestFrontend::connect(&served.socket, 1);
    next.start_queue(0);
    let status = next.submit(0);
    next.wait_used(0, 1);
    assert_eq!(next.status(status), 0);
    assert_eq!(
        fe.used_idx(0),
        at_close,
        "completed after the frontend left"
    );
    assert!(
        seen,
        "the backend did not see the frontend's hang-up within 10 s"
    );
    assert_no_head_returned_twice(fe, at_close);
    // Those completed, the held one (executed, never completed) and the next frontend's.
    assert_eq!(
        served.device().processed.load(Ordering::SeqCst),
        usize::from(at_close) + 2,
        "a request was taken after the frontend left"
    );
}

/// The used ring's entries `0..count` name distinct heads.
fn assert_no_head_returned_twice(fe: &TestFrontend, count: u16) {
    let ids = fe.used_ids(0, 0, count);
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a head returned twice: {ids:?}");
}

/// Proto P10: a stop (SIGTERM: a planned restart) with requests in flight. The frontend must see
/// every completion before it sees the connection end, and nothing after: QEMU, on the close,
/// restarts each ring at the used index it reads then, so a request completed later would be
/// executed and returned a second time. The requests in progress complete; no new one is
/// taken.
#[test]
fn a_stop_completes_the_requests_in_progress_before_closing_and_nothing_after() {
    let served = Served::start_polling(1, Duration::ZERO);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    // 100 requests of 30 ms: seconds of margin for the stop to begin before the burst ends on a
    // loaded machine.
    *served.device().delay.lock().unwrap() = Duration::from_millis(30);
    fe.submit_burst(0, 100);
    wait_for("a first completion", || fe.used_idx(0) >= 1);
    let disk = Arc::clone(&served.disk);
    let stopper = thread::spawn(move || served.stop());
    wait_for_hangup(&fe);
    let at_close = fe.used_idx(0);
    stopper.join().unwrap();
    let at_end = fe.used_idx(0);
    assert_eq!(
        at_end, at_close,
        "requests completed after the connection closed"
    );
    assert!(
        at_close < 100,
        "test bug: everything completed before the stop"
    );
    assert_eq!(
        disk.device().processed.load(Ordering::SeqCst),
        usize::from(at_close),
        "a request was executed but not completed before the close"
    );
    assert_no_head_returned_twice(&fe, at_end);
}

/// Proto P10, the frontend's side: the frontend closes the connection with requests in flight.
/// The ring state is the frontend's from that moment: the request in progress is not completed
/// (the frontend resubmits it), and no other one is taken. The request in progress is held in
/// the device until the backend has seen the frontend leave, so the test neither depends on how
/// fast that is seen nor passes without a request in progress.
#[test]
fn after_the_frontend_closes_nothing_more_is_completed() {
    let served = Served::start_polling(1, Duration::ZERO);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    // The first request completes, the second is held in progress.
    *served.device().hold_after.lock().unwrap() = Some(1);
    fe.submit_burst(0, 8);
    wait_for("the second request in progress", || {
        served.device().held.load(Ordering::SeqCst) == 1
    });
    assert_eq!(fe.used_idx(0), 1);
    // SAFETY: shutdown(2) on the frontend's connected socket, owned by `fe` and open.
    let rc = unsafe { libc::shutdown(fe.frontend.as_raw_fd(), libc::SHUT_RDWR) };
    assert_eq!(rc, 0);
    let at_close = fe.used_idx(0);
    assert_nothing_completed_after_the_hang_up(&served, &fe, at_close);
    drop(fe);
    served.stop();
}

/// Final review of session 4 (low): a frontend sends a message the backend refuses, pipelines
/// another one behind it (which the filter can no longer pass on: the crate ended its side) and
/// hangs up while a request is still in progress. The hang-up must be seen: the request that
/// completes during the drain is not added to the used ring of a frontend that has left (QEMU
/// restarts each ring at the used index it read at the close, so it would run twice).
#[test]
fn a_hang_up_after_a_refused_and_a_pipelined_message_is_seen_during_the_drain() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use vhost::vhost_user::message::FrontendReq;

    let served = Served::start_polling(1, Duration::ZERO);
    let mut fe = TestFrontend::connect(&served.socket, 1);
    fe.start_queue(0);
    wait_for("resume at ring start", || {
        served.device().events() == ["resume"]
    });
    // The first request completes, the second is held in progress until the backend has seen
    // the frontend leave.
    *served.device().hold_after.lock().unwrap() = Some(1);
    fe.submit_burst(0, 4);
    wait_for("the second request in progress", || {
        served.device().held.load(Ordering::SeqCst) == 1
    });
    assert_eq!(fe.used_idx(0), 1);
    // SAFETY: a duplicate (close-on-exec, like every fd Rust opens: the fd leak test starts a
    // child process) of the frontend's connected socket, owned by `fe` and open; the new fd is
    // owned by `stream` alone.
    let fd = unsafe { libc::fcntl(fe.frontend.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor of a connected unix stream socket, owned by nobody else.
    let mut stream = unsafe { UnixStream::from_raw_fd(fd) };
    let message = |code: FrontendReq, payload: &[u8]| -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&(code as u32).to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    };
    // Ring 0, size 3: not a power of two, so the crate refuses it and ends its side.
    let refused: Vec<u8> = [0u32, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    stream
        .write_all(&message(FrontendReq::SET_VRING_NUM, &refused))
        .unwrap();
    // The daemon drains once the crate's side has ended (it waits for the held request's gate).
    wait_for("the drain after the crate ended its side", || {
        served.disk.gates_wanted()
    });
    stream
        .write_all(&message(FrontendReq::GET_FEATURES, &[]))
        .unwrap();
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    let at_close = fe.used_idx(0);
    assert_nothing_completed_after_the_hang_up(&served, &fe, at_close);
    drop(fe);
    served.stop();
}

/// Proto P9: a frontend that knows the backend's features from an earlier connection and
/// negotiates REPLY_ACK without sending GET_FEATURES on this one: its NEED_REPLY messages are
/// acknowledged (vhost-user.rst REPLY_ACK), it does not wait forever.
#[test]
fn reply_ack_works_without_get_features_on_the_connection() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use vhost::vhost_user::message::FrontendReq;

    let served = Served::start(1);
    let features = {
        let fe = TestFrontend::connect(&served.socket, 1);
        fe.frontend.get_features().unwrap()
    };
    let stream = UnixStream::connect(&served.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    const VERSION_1: u32 = 0x1;
    const NEED_REPLY: u32 = 0x8;
    let message = |code: FrontendReq, flags: u32, payload: Option<u64>| -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&(code as u32).to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(if payload.is_some() { 8u32 } else { 0 }).to_le_bytes());
        if let Some(value) = payload {
            m.extend_from_slice(&value.to_le_bytes());
        }
        m
    };
    let reply_ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
    for m in [
        message(FrontendReq::SET_OWNER, VERSION_1, None),
        message(
            FrontendReq::SET_PROTOCOL_FEATURES,
            VERSION_1,
            Some(reply_ack),
        ),
        message(
            FrontendReq::SET_FEATURES,
            VERSION_1 | NEED_REPLY,
            Some(features),
        ),
    ] {
        (&stream).write_all(&m).unwrap();
    }
    let mut reply = [0u8; 20];
    (&stream)
        .read_exact(&mut reply)
        .expect("no acknowledgement of a NEED_REPLY message");
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()),
        FrontendReq::SET_FEATURES as u32,
        "the frontend got a reply it did not ask for"
    );
    assert_eq!(u64::from_le_bytes(reply[12..20].try_into().unwrap()), 0);
    // A GET_FEATURES of the frontend's own is answered normally afterwards.
    (&stream)
        .write_all(&message(FrontendReq::GET_FEATURES, VERSION_1, None))
        .unwrap();
    (&stream).read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()),
        FrontendReq::GET_FEATURES as u32
    );
    assert_eq!(
        u64::from_le_bytes(reply[12..20].try_into().unwrap()),
        features
    );
    drop(stream);
    served.stop();
}
