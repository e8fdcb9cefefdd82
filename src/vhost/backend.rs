//! The `VhostUserBackend` implementation for one frontend connection.
//!
//! One worker thread per queue (`queues_per_thread` gives every queue its own thread), the
//! `&self` flavour of the trait (the `Mut` flavour wraps the backend in one lock that every queue
//! would take). Per-queue state lives in [`SharedDisk`]'s gates; the connection-wide state here is
//! only atomics written by the control thread.
//!
//! Ring lifecycle (vhost-user.rst "Ring states"): a ring is *started* when the frontend gives it a
//! kick fd (SET_VRING_KICK), *enabled* by SET_VRING_ENABLE 1 (or at once when PROTOCOL_FEATURES is
//! not negotiated), and *stopped* by GET_VRING_BASE. The crate registers a ring's kick fd with its
//! worker only while the ring is started and enabled, and calls `handle_event` for the ring once
//! at that moment even without a kick. That call is where the device resumes: the first ring
//! that starts takes the image's writer lock ([`SharedDisk::ensure_running`]). `stop_vring`
//! (GET_VRING_BASE, before the reply) waits for the ring's requests in progress and, once no
//! ring is started any more, quiesces the engine.
//!
//! SET_VRING_ENABLE 0 alone (all cloud-hypervisor sends on pause) reaches no backend hook: the
//! crate unregisters the ring's kick fd, so no new request is taken and the requests in progress
//! complete. The daemon's pause detector (`daemon.rs`) sees every started ring disabled within
//! 200 ms and quiesces the engine (commit, park, release the lock); re-enabling a ring resumes it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserVirtioFeatures, VHOST_USER_CONFIG_OFFSET,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::{lock, Chain, Device, GuestMemoryHandle, SharedDisk};
use super::vring::Vring;
use crate::blk::SplitRing;

/// Most requests a worker executes per event before it lets its event loop run again (it
/// re-arms its own kick so the rest is not lost). Keeps exit events and ring stops responsive
/// while a guest keeps its queue full.
const MAX_REQUESTS_PER_EVENT: usize = 128;

/// Most configuration space bytes a frontend may ask for (the vhost-user message limit).
const MAX_CONFIG_SIZE: u32 = 256;

/// Largest number of queues: the crate maps queues to worker threads with 64-bit masks.
pub const MAX_QUEUES: usize = 64;

/// Backend state of one frontend connection. A fresh one is built for each connection (reusing
/// one across connections leaves stale exit eventfds behind); it points at the long-lived disk.
pub struct ConnectionBackend<D: Device> {
    disk: Arc<SharedDisk<D>>,
    mem: GuestMemoryHandle,
    queue_size: usize,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    /// Bit `q` set while queue `q` is started (a worker saw it started and enabled); changed only
    /// under that queue's gate, read under all gates.
    started_queues: AtomicU64,
    /// Bit `q` set once queue `q`'s start was checked for a restored ring index (cleared when
    /// the frontend stops the ring).
    notice_checked: AtomicU64,
    /// Each queue's ring, recorded by its worker at the first event, so the pause detector
    /// ([`ConnectionBackend::every_started_ring_disabled`]) can look at its enabled state.
    rings: Vec<OnceLock<Vring>>,
    /// Bit `q` set once queue `q` logged a fault of the frontend's ring set-up at warn level;
    /// later ones go to debug, so a hostile guest cannot flood the log.
    ring_fault_logged: AtomicU64,
    /// Raw fds of the exit eventfd consumers handed to the crate's worker event loops, which
    /// never close them (vhost-user-backend 0.24 `VringEpollHandler::new` keeps only the raw fd
    /// in its epoll set). Closed by [`ConnectionBackend::close_exit_fds`] once the workers are
    /// gone, so a daemon serving many connections does not run out of fds.
    exit_fds: Mutex<Vec<RawFd>>,
}

impl<D: Device> ConnectionBackend<D> {
    /// A backend for a new connection. `mem` must be the handle given to the `VhostUserDaemon`
    /// (the crate swaps the memory inside it on SET_MEM_TABLE; the workers read it lock-free).
    pub fn new(disk: Arc<SharedDisk<D>>, mem: GuestMemoryHandle, queue_size: usize) -> Self {
        Self {
            rings: (0..disk.num_queues()).map(|_| OnceLock::new()).collect(),
            disk,
            mem,
            queue_size,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            started_queues: AtomicU64::new(0),
            notice_checked: AtomicU64::new(0),
            ring_fault_logged: AtomicU64::new(0),
            exit_fds: Mutex::new(Vec::new()),
        }
    }

    /// Closes the exit eventfd consumers the crate leaked (see `exit_fds`).
    ///
    /// Call only after the `VhostUserDaemon` built with this backend was dropped (its drop joins
    /// the worker threads, whose epoll sets held these fds).
    pub fn close_exit_fds(&self) {
        for fd in lock(&self.exit_fds).drain(..) {
            // SAFETY: `fd` is the eventfd consumer created by `exit_event` below and turned into
            // a raw fd by the crate, which registered it with a worker's epoll and never closes
            // it. The caller guarantees the workers and their epoll instances are gone, so no
            // one else uses or owns this fd; wrapping it takes ownership and closes it once.
            drop(unsafe { std::fs::File::from_raw_fd(fd) });
        }
    }

    /// Logs a fault of the frontend's ring set-up (bad addresses, broken indexes): the first of
    /// each queue at warn, the rest at debug.
    fn ring_fault(&self, queue: usize, message: std::fmt::Arguments<'_>) {
        let bit = 1u64 << (queue % MAX_QUEUES);
        if self.ring_fault_logged.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            tracing::warn!("queue {queue}: {message} (further ring faults of this queue are logged at debug level)");
        } else {
            tracing::debug!("queue {queue}: {message}");
        }
    }

    /// True when at least one queue is started and the frontend has disabled every started one
    /// (SET_VRING_ENABLE 0 without GET_VRING_BASE: how cloud-hypervisor pauses a VM).
    pub fn every_started_ring_disabled(&self) -> bool {
        let started = self.started_queues.load(Ordering::Acquire);
        if started == 0 {
            return false;
        }
        (0..self.rings.len().min(MAX_QUEUES))
            .filter(|q| started & (1u64 << q) != 0)
            .all(|q| match self.rings[q].get() {
                Some(vring) => !vring.get_ref().is_enabled(),
                None => false,
            })
    }

    /// The disk served.
    pub fn disk(&self) -> &Arc<SharedDisk<D>> {
        &self.disk
    }

    /// True when ring `vring` is started and enabled (the frontend lets us process it).
    fn ring_is_live(vring: &Vring) -> bool {
        if vring.refused_size().is_some() {
            return false;
        }
        let state = vring.get_ref();
        state.get_queue().ready() && state.is_enabled()
    }

    /// Serves queue `queue` after an event on its ring.
    fn serve_queue(&self, queue: usize, vring: &Vring) -> io::Result<()> {
        let bit = 1u64 << (queue % MAX_QUEUES);
        // Set once a resume failed or was no longer wanted: the requests then fail with an I/O
        // error from the engine (see SharedDisk::ensure_running) instead of waiting.
        let mut resume_given_up = false;
        loop {
            let Some(gate) = self.disk.gate(queue) else {
                return Ok(());
            };
            if !Self::ring_is_live(vring) {
                return Ok(());
            }
            if queue < MAX_QUEUES {
                // Started from the moment its worker sees it live (under its gate, which a
                // quiesce holds while it counts the started rings): stopping another ring must
                // not quiesce the device while this one waits for the resume.
                self.started_queues.fetch_or(bit, Ordering::AcqRel);
                if let Some(slot) = self.rings.get(queue) {
                    slot.get_or_init(|| vring.clone());
                }
            }
            if !self.disk.is_running() && !resume_given_up {
                // Never wait for the lifecycle lock while holding a gate (see SharedDisk). If a
                // quiesce comes between the resume and the gate, the loop resumes again.
                drop(gate);
                resume_given_up = !self
                    .disk
                    .ensure_running(&format!("queue {queue} started"), || {
                        Self::ring_is_live(vring)
                    });
                continue;
            }
            // A ring restored at a non-zero index belongs to a guest that ran before this device
            // start (QEMU reconnecting after a backend restart): any queue may be the one the
            // guest used, so each one's first start after a resume asks.
            if queue < MAX_QUEUES
                && self.notice_checked.fetch_or(bit, Ordering::AcqRel) & bit == 0
                && vring.get_ref().get_queue().next_avail() != 0
            {
                self.disk.device().ring_restored_mid_session();
            }
            let more = self.process_available(queue, vring);
            drop(gate);
            if more {
                rearm_kick(vring);
            }
            return Ok(());
        }
    }

    /// Executes the requests available on the ring, at most [`MAX_REQUESTS_PER_EVENT`]. Returns
    /// true when it stopped at that bound with more work possibly pending.
    fn process_available(&self, queue: usize, vring: &Vring) -> bool {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let acked = self.acked_features.load(Ordering::Acquire);
        let mut executed = 0usize;
        // Set when the driver's available index said more requests were there: a pass that then
        // reads none means the ring is broken (unreadable entries), not a race.
        let mut expect_more = false;
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    self.ring_fault(queue, format_args!("cannot disable notifications: {e}"));
                    return false;
                }
            }
            let mut popped_any = false;
            loop {
                if executed >= MAX_REQUESTS_PER_EVENT {
                    return true;
                }
                let (chain, ring) = match self.pop_chain(queue, vring) {
                    Pop::Chain(chain, ring) => (chain, ring),
                    Pop::Empty => break,
                    // Stopped by the frontend, or a broken ring: nothing to do until it is set
                    // up again (notifications stay off; the frontend kicks after a restart).
                    Pop::Stop => return false,
                };
                popped_any = true;
                executed += 1;
                let head = chain.head_index();
                let used_len = self.disk.device().process_chain(chain, ring, acked);
                if let Err(e) = vring.add_used(head, used_len) {
                    // The used ring is unreachable (bad address from the frontend): nothing more
                    // can be completed on this ring until the frontend sets it up again.
                    self.ring_fault(queue, format_args!("cannot complete request {head}: {e}"));
                    return false;
                }
                self.notify_guest(queue, vring);
                if self.disk.gates_wanted() {
                    // A quiesce waits for this queue's gate: the rest waits for the next turn.
                    return true;
                }
            }
            if expect_more && !popped_any {
                self.ring_fault(
                    queue,
                    format_args!("the available index is ahead but no request can be read"),
                );
                return false;
            }
            if !event_idx {
                return false;
            }
            // Re-enable notifications; if the driver added requests meanwhile, go on.
            match vring.enable_notification() {
                Ok(true) => expect_more = true,
                Ok(false) => return false,
                Err(e) => {
                    self.ring_fault(queue, format_args!("cannot enable notifications: {e}"));
                    return false;
                }
            }
        }
    }

    /// Pops the next available chain.
    fn pop_chain(&self, queue: usize, vring: &Vring) -> Pop {
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let queue_state = state.get_queue_mut();
        let ring = SplitRing {
            desc_table: GuestAddress(queue_state.desc_table()),
            size: queue_state.size(),
        };
        match queue_state.iter(mem) {
            Ok(mut available) => match available.next() {
                Some(chain) => Pop::Chain(chain, ring),
                // Empty, or the entry could not be read (then `expect_more` catches it).
                None => Pop::Empty,
            },
            Err(virtio_queue::Error::QueueNotReady) => Pop::Stop,
            Err(e) => {
                // E.g. an available index more than the queue size ahead: the driver is broken
                // or hostile; leave the ring alone until it is set up again.
                self.ring_fault(queue, format_args!("invalid available ring: {e}"));
                Pop::Stop
            }
        }
    }

    fn notify_guest(&self, queue: usize, vring: &Vring) {
        match vring.needs_notification() {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = vring.signal_used_queue() {
                    self.ring_fault(queue, format_args!("cannot signal the used ring: {e}"));
                }
            }
            Err(e) => self.ring_fault(queue, format_args!("cannot read the used event index: {e}")),
        }
    }
}

/// What popping the available ring gave.
enum Pop {
    /// A request, and the layout of the ring it came from.
    Chain(Chain, SplitRing),
    /// No request available.
    Empty,
    /// The ring is stopped or broken: stop serving it for this event.
    Stop,
}

/// The offset into `struct virtio_blk_config` of a GET_CONFIG / SET_CONFIG offset. Frontends
/// count differently: QEMU from the start of the structure (0), cloud-hypervisor's GET_CONFIG
/// from VHOST_USER_CONFIG_OFFSET (0x100, where virtio-mmio places the device configuration).
/// The structure is shorter than 0x100 bytes, so both are understood.
fn config_offset(offset: u32) -> u32 {
    if offset >= VHOST_USER_CONFIG_OFFSET {
        offset - VHOST_USER_CONFIG_OFFSET
    } else {
        offset
    }
}

/// Makes the worker's event loop see the ring's kick again, so the requests left after a bounded
/// batch are served on its next turn.
fn rearm_kick(vring: &Vring) {
    let consumer = match vring.get_ref().get_kick() {
        Some(kick) => kick.try_clone(),
        None => return,
    };
    let result = consumer.and_then(|consumer| {
        // SAFETY: `try_clone` duplicated the kick eventfd; the duplicate is owned by nobody but
        // us, so handing its ownership to an `EventNotifier` (same eventfd type) is sound.
        let notifier = unsafe { EventNotifier::from_raw_fd(consumer.into_raw_fd()) };
        notifier.notify()
    });
    if let Err(e) = result {
        tracing::warn!("cannot re-arm a queue's kick: {e}");
    }
}

impl<D: Device> VhostUserBackend for ConnectionBackend<D> {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.disk.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.disk.device().features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Dirty-page logging for live migration: guest memory carries a BitmapMmapRegion.
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    /// Answers from the superblock's geometry: works while the engine is quiesced and before the
    /// writer lock is taken. Bytes past the end of our config space read as zero (frontends
    /// ask for their own, possibly larger, `struct virtio_blk_config`); a request past the
    /// protocol's limit gets an empty answer, which the crate turns into an error reply.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let offset = config_offset(offset);
        let Some(end) = offset.checked_add(size) else {
            return Vec::new();
        };
        if end > MAX_CONFIG_SIZE {
            return Vec::new();
        }
        let config = self.disk.device().config_space();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < config.len() {
            let available = &config[start..config.len().min(end as usize)];
            out[..available.len()].copy_from_slice(available);
        }
        out
    }

    /// The driver's write into the configuration space (the cache mode, with CONFIG_WCE). A
    /// refused write makes the crate refuse the message and end the connection.
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.disk
            .device()
            .set_config(config_offset(offset), buf)
            .map_err(|reason| {
                tracing::warn!("frontend wrote the configuration space: refused: {reason}");
                io::Error::new(io::ErrorKind::PermissionDenied, reason)
            })
    }

    fn update_memory(&self, _mem: GuestMemoryHandle) -> io::Result<()> {
        // The crate swaps the memory inside the handle we share with it (see `new`).
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.disk.num_queues().min(MAX_QUEUES))
            .map(|q| 1u64 << q)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                lock(&self.exit_fds).push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                tracing::error!("cannot create a worker's exit eventfd: {e}");
                None
            }
        }
    }

    /// GET_VRING_BASE: the crate has already marked the ring not ready and unregistered its kick.
    /// Waiting for every queue's batch in progress (the gates) drains this ring; once no ring is
    /// started the engine is quiesced before the reply (I7), which also releases the writer lock
    /// for a migration destination.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = queue_index as usize;
        tracing::debug!("queue {queue} stopped by the frontend");
        self.disk
            .quiesce_if("the frontend stopped every queue", || {
                if queue < MAX_QUEUES {
                    self.started_queues
                        .fetch_and(!(1u64 << queue), Ordering::AcqRel);
                    self.notice_checked
                        .fetch_and(!(1u64 << queue), Ordering::AcqRel);
                }
                self.started_queues.load(Ordering::Acquire) == 0
            })
            .map_err(io::Error::other)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            tracing::warn!("queue {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            tracing::warn!("queue {thread_id}: event for unknown ring {device_event}");
            return Ok(());
        };
        // One queue per worker thread: the thread index is the queue index.
        self.serve_queue(thread_id, vring)
    }
}
