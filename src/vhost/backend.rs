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
//! SET_VRING_ENABLE 0 alone (all cloud-hypervisor sends on pause) reaches no hook of the crate's;
//! the daemon's control filter (`filter.rs`) calls [`ControlHooks::vring_enable`] before the crate
//! handles it: the ring takes no new request and its request in progress completes before the
//! reply. The daemon's pause detector (`daemon.rs`) sees every started ring disabled within
//! 200 ms and quiesces the engine (commit, park, release the lock); re-enabling a ring resumes it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserVirtioFeatures, VHOST_USER_CONFIG_OFFSET,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_IN_ORDER;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::{lock, Chain, Device, GuestMemoryHandle, SharedDisk};
use super::filter::ControlHooks;
use super::inflight::{
    self, InflightBuffer, InflightDescription, InflightError, InflightLimits, QueueInflight,
};
use super::vring::Vring;
use crate::blk::{SplitRing, Submitted};

/// Most requests a worker executes per event before it lets its event loop run again (it
/// re-arms its own kick so the rest is not lost). Keeps exit events and ring stops responsive
/// while a guest keeps its queue full.
const MAX_REQUESTS_PER_EVENT: usize = 128;

/// Completions added to the used ring before the guest is notified while more requests are
/// being executed (it is always notified when the ring runs empty, and before a request that
/// may take long, see [`Device::completes_quickly`]): one wake-up of the driver per few
/// completions instead of one each under load.
const NOTIFY_BATCH: usize = 8;
/// Longest a completion waits for its notification while a run of quick requests (reads) goes
/// on, checked at each completion: with the notification before every request that is not
/// quick, a completion waits at most this long or one read's execution. Shorter bounds cost
/// throughput on this 2-core machine: a worker preempted in the middle of a batch then notifies
/// more often, and each wake-up of the driver preempts it again (measured: 100 µs halved the
/// IOPS at 4K QD32×2 under load; 1-2 ms were within noise of no bound).
const NOTIFY_DELAY_MAX: Duration = Duration::from_millis(1);

/// Looks at the available index between two reads of the clock while polling.
const POLL_LOOKS_PER_CLOCK_READ: u32 = 16;
/// A polling window that shrank below `max / POLL_MIN_FRACTION` stops polling.
const POLL_MIN_FRACTION: u32 = 16;
/// A window that grows from nothing starts at `max / POLL_START_FRACTION`.
const POLL_START_FRACTION: u32 = 4;
/// After a poll during which the worker was kept off its core for longer than
/// [`POLL_OFF_CPU_MAX`], it does not poll for this long (on an oversubscribed machine polling
/// costs throughput: 64K sequential reads QD8×2 at load 7 ran at 53k IOPS polling with a 50 ms
/// back-off, 68k with 1 s, 79k without polling).
const POLL_CONTENDED_BACKOFF: Duration = Duration::from_secs(1);
/// The first back-off after a quiet period: an isolated preemption (a kernel thread, a burst of
/// another process) on an otherwise idle machine costs 50 ms of polling, not a second
/// (measured on the quiet machine: one 1 s back-off per 3.5 s QD1 run sent 20 % of the requests
/// through the sleeping path). Each further contended poll within [`POLL_BACKOFF_MEMORY`]
/// doubles it, up to [`POLL_CONTENDED_BACKOFF`], so a busy machine reaches the full second
/// within a few events.
const POLL_FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// How long a contended poll keeps the next back-off doubled.
const POLL_BACKOFF_MEMORY: Duration = Duration::from_secs(3);
/// Longest time a poll may spend off its core (runnable while another thread runs) before the
/// core counts as contended. A thread that takes the core when the worker yields to submit a
/// request (the client at QD1) needs a few µs; a competing CPU-bound thread gets a scheduler
/// slice of milliseconds.
const POLL_OFF_CPU_MAX: Duration = Duration::from_micros(100);

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
    /// Bit `q` set while queue `q` is started (a worker saw it started and enabled); changed only
    /// under that queue's gate, read under all gates.
    started_queues: AtomicU64,
    /// Bit `q` set once queue `q`'s start was checked for a restored ring index (cleared when
    /// the frontend stops the ring).
    notice_checked: AtomicU64,
    /// A SET_VRING_BASE on this connection restored some ring at a non-zero index: the guest
    /// ran before (a reconnect or a resume), whichever ring's worker starts first.
    ring_restored_nonzero: AtomicBool,
    /// Bit `q` set from the frontend's SET_VRING_ENABLE 0 of queue `q` (seen by the control
    /// filter before the crate handles it) until its SET_VRING_ENABLE 1: the worker takes no new
    /// request from the ring.
    disabling: AtomicU64,
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
    /// Longest polling window after a batch (zero: no polling).
    poll_max: Duration,
    /// Each queue's polling window (locked by its worker only).
    poll: Vec<Mutex<PollWindow>>,
    /// Set when the connection ends: workers stop polling at once (their exit event is only
    /// seen once they are back in their event loop), start no new batch, and a resume waiting
    /// for the writer lock gives up (the crate does not stop the rings on a disconnect, so they
    /// still look started).
    connection_ended: AtomicBool,
    /// Set when the daemon ends the connection itself (a stop, a message the crate refused):
    /// workers take no new request, so the requests in progress can be waited for and completed
    /// before the frontend sees the connection end ([`ConnectionBackend::drain`]).
    draining: AtomicBool,
    /// The inflight buffer the frontend handed over (SET_INFLIGHT_FD), if any.
    inflight: Mutex<Option<Arc<InflightBuffer>>>,
    /// Set from the first SET_INFLIGHT_FD on: until then no worker takes its tracking lock.
    inflight_set: AtomicBool,
    /// Bit `q` set once queue `q`'s start looked at the inflight buffer (cleared when the
    /// frontend stops the ring or hands over a buffer).
    inflight_checked: AtomicU64,
    /// Bit `q` set once queue `q`'s start initialised a fresh region of the inflight buffer (see
    /// [`Self::claim_fresh_inflight_region`]; cleared with `inflight_checked`).
    inflight_claimed: AtomicU64,
    /// Each queue's inflight tracking (locked by its worker only).
    tracking: Vec<Mutex<QueueTracking>>,
    /// Per queue: the available index at its first start after lost writes were reported
    /// ([`NO_RESTART_MARK`] otherwise). The requests before it were made available before this
    /// backend served the ring, and a FLUSH among them fails (see [`Submitted`]).
    made_available_before_restart: Vec<AtomicU32>,
}

/// [`ConnectionBackend::made_available_before_restart`]: nothing was lost.
const NO_RESTART_MARK: u32 = u32::MAX;

/// One queue's inflight tracking: its region of the buffer, and the requests an earlier backend
/// took and never completed, to execute before any new one.
#[derive(Debug, Default)]
struct QueueTracking {
    tracker: Option<QueueInflight>,
    resubmit: VecDeque<u16>,
}

impl<D: Device> ConnectionBackend<D> {
    /// A backend for a new connection. `mem` must be the handle given to the `VhostUserDaemon`
    /// (the crate swaps the memory inside it on SET_MEM_TABLE; the workers read it lock-free).
    pub fn new(disk: Arc<SharedDisk<D>>, mem: GuestMemoryHandle, queue_size: usize) -> Self {
        Self {
            rings: (0..disk.num_queues()).map(|_| OnceLock::new()).collect(),
            tracking: (0..disk.num_queues())
                .map(|_| Mutex::new(QueueTracking::default()))
                .collect(),
            made_available_before_restart: (0..disk.num_queues())
                .map(|_| AtomicU32::new(NO_RESTART_MARK))
                .collect(),
            disk,
            mem,
            queue_size,
            acked_features: AtomicU64::new(0),
            started_queues: AtomicU64::new(0),
            notice_checked: AtomicU64::new(0),
            ring_restored_nonzero: AtomicBool::new(false),
            disabling: AtomicU64::new(0),
            ring_fault_logged: AtomicU64::new(0),
            exit_fds: Mutex::new(Vec::new()),
            poll_max: Duration::ZERO,
            poll: Vec::new(),
            connection_ended: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            inflight: Mutex::new(None),
            inflight_set: AtomicBool::new(false),
            inflight_checked: AtomicU64::new(0),
            inflight_claimed: AtomicU64::new(0),
        }
    }

    /// Polls each ring for up to `max` after a batch before sleeping (zero: never polls);
    /// `backoff`: stop polling for a while after a poll that was kept off its core.
    pub fn with_polling(mut self, max: Duration, backoff: bool) -> Self {
        self.poll_max = max;
        self.poll = (0..self.disk.num_queues())
            .map(|_| Mutex::new(PollWindow::new(max, backoff)))
            .collect();
        self
    }

    /// Tells the workers that the connection is over: they stop polling, take no new request,
    /// add nothing more to a used ring, and stop waiting for the writer lock. Call it before the
    /// workers are stopped and joined.
    pub fn end_connection(&self) {
        self.connection_ended.store(true, Ordering::Release);
    }

    /// True once the frontend has left (or [`ConnectionBackend::end_connection`] was called).
    pub fn connection_ended(&self) -> bool {
        self.connection_ended.load(Ordering::Acquire)
    }

    /// Before the daemon closes a connection the frontend has not closed (a stop, SIGTERM, a
    /// message the crate refused): workers take no new request, and this returns once the
    /// requests in progress have completed (each queue's worker gives its gate back after its
    /// request in progress). The frontend sees every completion before it sees the connection
    /// end; a frontend that then restarts a ring at its used index (QEMU's reconnect) resubmits
    /// exactly the requests never taken, and none is returned twice.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.disk.wait_for_requests_in_progress();
    }

    /// False once the connection ends or is being drained: no new request may be taken.
    fn taking_requests(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && !self.connection_ended.load(Ordering::Acquire)
    }

    /// Each queue's polling counters (empty when polling is off).
    pub fn poll_stats(&self) -> Vec<PollStats> {
        self.poll.iter().map(|poll| lock(poll).stats).collect()
    }

    /// Logs each queue's polling counters at debug level (a queue that never polled is left out).
    pub fn log_poll_stats(&self) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        for (queue, stats) in self.poll_stats().iter().enumerate() {
            if stats.polls == 0 && stats.skipped_contended == 0 {
                continue;
            }
            let mean_gap_us = if stats.wakes > 0 {
                stats.gaps.as_secs_f64() * 1e6 / stats.wakes as f64
            } else {
                0.0
            };
            tracing::debug!(
                "queue {queue} polling: {} polls, {} found a request, {:.1} ms polled ({:.1} ms \
                 off the core), {} back-offs, {} batches not polled while backed off, {} sleeps, \
                 {} wake-ups (mean gap {mean_gap_us:.1} µs, {} short)",
                stats.polls,
                stats.found,
                stats.polled.as_secs_f64() * 1e3,
                stats.off_cpu.as_secs_f64() * 1e3,
                stats.backoffs,
                stats.skipped_contended,
                stats.sleeps,
                stats.wakes,
                stats.short_gaps,
            );
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
                Some(vring) => self.disabling(q) || !vring.get_ref().is_enabled(),
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

    /// True once the frontend asked to disable queue `queue` (before the crate marks the ring).
    fn disabling(&self, queue: usize) -> bool {
        queue < MAX_QUEUES && self.disabling.load(Ordering::Acquire) & (1 << queue) != 0
    }

    /// [`Self::ring_is_live`], no disable of the queue pending, and the connection still open.
    /// A worker serves the queue and resumes the device (possibly waiting for the writer lock
    /// held by a migration source) only while this holds: a frontend that went away while its
    /// device waited for the lock must not have its queued requests executed later, nor keep
    /// the daemon from serving the next connection for the length of the wait.
    fn queue_is_live(&self, queue: usize, vring: &Vring) -> bool {
        !self.disabling(queue) && self.taking_requests() && Self::ring_is_live(vring)
    }

    /// Serves queue `queue` after an event on its ring: executes what is available, then polls
    /// the ring for a while (see [`PollWindow`]) before it re-enables the driver's notifications
    /// and returns to the event loop.
    ///
    /// Polling holds no gate and no ring lock between looks, so a quiesce or a GET_VRING_BASE
    /// never waits for it; every look checks that the ring is still started and enabled and
    /// the connection still open.
    fn serve_queue(&self, queue: usize, vring: &Vring) -> io::Result<()> {
        let bit = 1u64 << (queue % MAX_QUEUES);
        // Set once a resume failed or was no longer wanted: the requests then fail with an I/O
        // error from the engine (see SharedDisk::ensure_running) instead of waiting.
        let mut resume_given_up = false;
        let mut budget = Budget::new();
        let poll = self.poll_state(queue);
        if let Some(poll) = poll {
            lock(poll).woken();
        }
        loop {
            let Some(gate) = self.disk.gate(queue) else {
                return Ok(());
            };
            if !self.queue_is_live(queue, vring) {
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
            if queue < MAX_QUEUES
                && self.inflight_set.load(Ordering::Acquire)
                && self.inflight_claimed.fetch_or(bit, Ordering::AcqRel) & bit == 0
            {
                self.claim_fresh_inflight_region(queue, vring);
            }
            if !self.disk.is_running() && !resume_given_up {
                // Never wait for the lifecycle lock while holding a gate (see SharedDisk). If a
                // quiesce comes between the resume and the gate, the loop resumes again.
                drop(gate);
                resume_given_up = !self
                    .disk
                    .ensure_running(&format!("queue {queue} started"), || {
                        self.queue_is_live(queue, vring)
                    });
                continue;
            }
            // A ring restored at a non-zero index belongs to a guest that ran before this device
            // start (QEMU reconnecting after a backend restart): any queue may be the one the
            // guest used, so each one's first start after a resume asks. The guest's next FLUSH
            // may come on a queue it never used (restored at 0) and that queue's worker may start
            // before the used one's: what any SET_VRING_BASE said counts too (QEMU restores
            // every ring before it enables any).
            if queue < MAX_QUEUES
                && self.notice_checked.fetch_or(bit, Ordering::AcqRel) & bit == 0
                && (vring.get_ref().get_queue().next_avail() != 0
                    || self.ring_restored_nonzero.load(Ordering::Acquire))
            {
                self.disk.device().ring_restored_mid_session();
                self.note_requests_made_available_before_the_restart(queue, vring);
            }
            if queue < MAX_QUEUES
                && self.inflight_set.load(Ordering::Acquire)
                && self.inflight_checked.fetch_or(bit, Ordering::AcqRel) & bit == 0
            {
                self.start_inflight_tracking(queue, vring);
            }
            let outcome = self.process_available(queue, vring, &mut budget);
            drop(gate);
            match outcome {
                Batch::Stopped => return Ok(()),
                Batch::Bounded => {
                    rearm_kick(vring);
                    return Ok(());
                }
                Batch::Drained => {}
            }
            if let Some(poll) = poll {
                let window = lock(poll).window();
                if !window.is_zero() && !budget.exhausted() {
                    let cpu_before = thread_cpu_time();
                    let started = Instant::now();
                    let found = self.poll_ring(queue, vring, window);
                    let polled = started.elapsed();
                    let off_cpu = match (cpu_before, thread_cpu_time()) {
                        (Some(before), Some(after)) => {
                            Some(polled.saturating_sub(after.saturating_sub(before)))
                        }
                        _ => None,
                    };
                    lock(poll).polled(found, polled, off_cpu);
                    match found {
                        Polled::Work => {
                            budget.expect_more = true;
                            continue;
                        }
                        Polled::Stopped => return Ok(()),
                        Polled::Idle => {}
                    }
                }
            }
            // Going to sleep: let the driver notify us again, then look once more, since it may
            // have added requests after our last look and before it could see notifications on
            // (virtio 1.2, 2.7.10).
            if let Some(poll) = poll {
                lock(poll).sleeping();
            }
            match self.enable_notifications(queue, vring) {
                Ok(true) => {
                    // The driver's request came just after the poll ended: a gap as short as
                    // that grows the window.
                    if let Some(poll) = poll {
                        lock(poll).woken();
                    }
                    budget.expect_more = true;
                    continue;
                }
                Ok(false) => return Ok(()),
                Err(()) => return Ok(()),
            }
        }
    }

    /// This queue's polling state, when polling is on.
    fn poll_state(&self, queue: usize) -> Option<&Mutex<PollWindow>> {
        if self.poll_max.is_zero() {
            return None;
        }
        self.poll.get(queue)
    }

    /// Re-enables the driver's notifications if the ring is still live; returns whether requests
    /// became available meanwhile. `Err` when the ring is stopped or broken.
    fn enable_notifications(&self, queue: usize, vring: &Vring) -> Result<bool, ()> {
        let mut state = vring.get_mut();
        if vring.refused_size().is_some()
            || !state.get_queue().ready()
            || !state.is_enabled()
            || self.disabling(queue)
            || !self.taking_requests()
        {
            return Err(());
        }
        state.enable_notification().map_err(|e| {
            self.ring_fault(queue, format_args!("cannot enable notifications: {e}"));
        })
    }

    /// Looks at the ring's available index until the driver adds a request, the ring stops, or
    /// `window` has passed. Notifications stay off meanwhile (the driver does not kick).
    fn poll_ring(&self, queue: usize, vring: &Vring, window: Duration) -> Polled {
        let mem = self.mem.memory();
        let started = Instant::now();
        loop {
            for _ in 0..POLL_LOOKS_PER_CLOCK_READ {
                {
                    let state = vring.get_ref();
                    let ring = state.get_queue();
                    if vring.refused_size().is_some()
                        || !ring.ready()
                        || !state.is_enabled()
                        || self.disabling(queue)
                        || !self.taking_requests()
                    {
                        return Polled::Stopped;
                    }
                    match ring.avail_idx(&*mem, Ordering::Acquire) {
                        Ok(idx) if idx.0 != ring.next_avail() => return Polled::Work,
                        Ok(_) => {}
                        Err(e) => {
                            drop(state);
                            self.ring_fault(
                                queue,
                                format_args!("cannot read the available index: {e}"),
                            );
                            return Polled::Stopped;
                        }
                    }
                }
                std::hint::spin_loop();
            }
            if started.elapsed() >= window {
                return Polled::Idle;
            }
            // Two cores shared with the guest's vCPUs: let a runnable thread on this core (maybe
            // the one about to submit) run rather than spin against it.
            std::thread::yield_now();
        }
    }

    /// Executes the requests available on the ring, within `budget`. The driver's notifications
    /// are off when it returns [`Batch::Drained`] or [`Batch::Bounded`]; the guest has been
    /// notified of every completion it wants to hear about in every case.
    fn process_available(&self, queue: usize, vring: &Vring, budget: &mut Budget) -> Batch {
        let acked = self.acked_features.load(Ordering::Acquire);
        let mut unsignalled = 0usize;
        let mut oldest_unsignalled = Instant::now();
        // Only this queue's worker takes it: uncontended, once per batch, and only once the
        // frontend handed over an inflight buffer.
        let mut tracking = if self.inflight_set.load(Ordering::Acquire) {
            self.tracking.get(queue).map(lock)
        } else {
            None
        };
        let outcome = 'batch: {
            if let Err(e) = vring.disable_notification() {
                self.ring_fault(queue, format_args!("cannot disable notifications: {e}"));
                break 'batch Batch::Stopped;
            }
            let mut popped_any = false;
            loop {
                if budget.executed >= MAX_REQUESTS_PER_EVENT {
                    break 'batch Batch::Bounded;
                }
                if !self.taking_requests() {
                    // The connection ends: the rest of the ring is the frontend's to resubmit.
                    break 'batch Batch::Stopped;
                }
                // Requests an earlier backend took and never completed come first.
                let resubmitted = tracking.as_mut().and_then(|t| t.resubmit.pop_front());
                let (work, ring) = match resubmitted {
                    Some(head) => (Work::Resubmitted(head), ring_layout(vring)),
                    None => match self.pop_chain(queue, vring) {
                        Pop::Chain(chain, ring, position) => (Work::Chain(chain, position), ring),
                        Pop::Empty => break,
                        // Stopped by the frontend, or a broken ring: nothing to do until it is
                        // set up again (the frontend kicks after a restart).
                        Pop::Stop => break 'batch Batch::Stopped,
                    },
                };
                popped_any = true;
                budget.executed += 1;
                let quick = match &work {
                    Work::Chain(chain, _) => self.disk.device().completes_quickly(chain),
                    Work::Resubmitted(_) => false,
                };
                if unsignalled > 0 && !quick {
                    // This request may take long (a write waiting for space, a FLUSH's commit):
                    // the completions held back for batching must not wait for it.
                    self.notify_guest(queue, vring);
                    unsignalled = 0;
                }
                let (head, used_len) = match work {
                    Work::Chain(chain, position) => {
                        let head = chain.head_index();
                        // Recorded before anything of it is done (a resubmitted one already is).
                        self.track(queue, &mut tracking, |t| t.taken(head));
                        let submitted = self.submitted(queue, Some(position));
                        (
                            head,
                            self.disk
                                .device()
                                .process_chain(chain, ring, acked, submitted),
                        )
                    }
                    Work::Resubmitted(head) => {
                        let mem = self.mem.memory();
                        let submitted = self.submitted(queue, None);
                        (
                            head,
                            self.disk
                                .device()
                                .process_head(&mem, head, ring, acked, submitted),
                        )
                    }
                };
                if self.connection_ended.load(Ordering::Acquire) {
                    // The frontend left while the request executed and may already have read
                    // the used index to restart the ring from (QEMU does at once): completing
                    // it now would return it a second time once it is resubmitted.
                    tracing::debug!(
                        "queue {queue}: request {head} executed after the frontend left: not \
                         completed (the frontend resubmits it)"
                    );
                    break 'batch Batch::Stopped;
                }
                self.track(queue, &mut tracking, |t| t.completing(head));
                if let Err(e) = vring.add_used(head, used_len) {
                    // The used ring is unreachable (bad address from the frontend): nothing more
                    // can be completed on this ring until the frontend sets it up again.
                    self.ring_fault(queue, format_args!("cannot complete request {head}: {e}"));
                    break 'batch Batch::Stopped;
                }
                if tracking.is_some() {
                    let used_idx = vring.get_ref().get_queue().next_used();
                    self.track(queue, &mut tracking, |t| t.completed(head, used_idx));
                }
                let done = Instant::now();
                if unsignalled == 0 {
                    oldest_unsignalled = done;
                }
                unsignalled += 1;
                if unsignalled >= NOTIFY_BATCH
                    || done.duration_since(oldest_unsignalled) >= NOTIFY_DELAY_MAX
                {
                    self.notify_guest(queue, vring);
                    unsignalled = 0;
                }
                if self.disk.gates_wanted() || self.disabling(queue) {
                    // A quiesce waits for this queue's gate, or the frontend disables the ring:
                    // the rest waits for the next turn.
                    break 'batch Batch::Bounded;
                }
            }
            if budget.expect_more && !popped_any {
                self.ring_fault(
                    queue,
                    format_args!("the available index is ahead but no request can be read"),
                );
                break 'batch Batch::Stopped;
            }
            Batch::Drained
        };
        budget.expect_more = false;
        if unsignalled > 0 {
            self.notify_guest(queue, vring);
        }
        outcome
    }

    /// Records a step of a request in the queue's inflight region (a no-op without one). A
    /// failure (not expected: the region was mapped whole) ends the queue's tracking and marks
    /// the region unused.
    fn track(
        &self,
        queue: usize,
        tracking: &mut Option<MutexGuard<'_, QueueTracking>>,
        step: impl FnOnce(&mut QueueInflight) -> Result<(), InflightError>,
    ) {
        let Some(state) = tracking.as_mut() else {
            return;
        };
        let Some(tracker) = state.tracker.as_mut() else {
            return;
        };
        if let Err(e) = step(tracker) {
            tracker.abandon();
            state.tracker = None;
            self.ring_fault(queue, format_args!("inflight tracking stopped: {e}"));
        }
    }

    /// The ring starts with an inflight buffer handed over: the queue's region is set up, or,
    /// when it records requests taken by an earlier backend (killed, or disconnected with a
    /// request in progress) and never completed, those are queued for execution before any new
    /// one and the ring goes on after them: from its used index plus their number, whatever
    /// SET_VRING_BASE said (cloud-hypervisor sends the available index, which skips the
    /// requests made available and not yet taken; QEMU the used index, which would take the
    /// ones in flight a second time). Every request taken is either used or in flight, and a
    /// queue takes and completes its requests in order, so that is where the next one is.
    /// After the device reported lost writes at this ring's start: notes the ring's available
    /// index, so that the requests made available before it count as [`Submitted::BeforeRestart`].
    fn note_requests_made_available_before_the_restart(&self, queue: usize, vring: &Vring) {
        if !self.disk.device().lost_writes_reported() {
            return;
        }
        let Some(mark) = self.made_available_before_restart.get(queue) else {
            return;
        };
        let mem = self.mem.memory();
        // Unreadable: the pop fails on it too and reports it.
        if let Ok(avail) = vring
            .get_ref()
            .get_queue()
            .avail_idx(&*mem, Ordering::Acquire)
        {
            mark.store(u32::from(avail.0), Ordering::Release);
        }
    }

    /// When the request at available-ring `position` (`None`: resubmitted from the inflight
    /// buffer, i.e. taken by an earlier backend) was made available, relative to the restart.
    fn submitted(&self, queue: usize, position: Option<u16>) -> Submitted {
        let mark = self
            .made_available_before_restart
            .get(queue)
            .map_or(NO_RESTART_MARK, |m| m.load(Ordering::Acquire));
        let Ok(end) = u16::try_from(mark) else {
            return Submitted::Now;
        };
        let before = match position {
            None => true,
            // Positions wrap at 2^16; a ring holds at most 2^15 requests.
            Some(p) => {
                let distance = end.wrapping_sub(p);
                if distance == 0 || distance > 1 << 15 {
                    // Requests are taken in order: this is the first one made available after
                    // the restart, and so is every later one. The mark goes, or 32,768 requests
                    // on the positions would wrap into looking "before" again.
                    if let Some(m) = self.made_available_before_restart.get(queue) {
                        m.store(NO_RESTART_MARK, Ordering::Release);
                    }
                    false
                } else {
                    true
                }
            }
        };
        if before {
            Submitted::BeforeRestart
        } else {
            Submitted::Now
        }
    }

    /// A fresh region (the frontend's new buffer) starts recording at the ring's used index the
    /// moment the ring starts, before the worker may wait for the image: see
    /// `QueueInflight::initialise_if_fresh`. A region in use is left alone here: its requests
    /// are executed again only once the image runs ([`Self::start_inflight_tracking`]), so that
    /// a GET_VRING_BASE meanwhile never reports a request taken that was not executed.
    fn claim_fresh_inflight_region(&self, queue: usize, vring: &Vring) {
        let Some(buffer) = lock(&self.inflight).clone() else {
            return;
        };
        let Some(mut region) = buffer.queue(queue) else {
            return;
        };
        let mem = self.mem.memory();
        let used_idx = match vring
            .get_ref()
            .get_queue()
            .used_idx(&*mem, Ordering::Acquire)
        {
            Ok(idx) => idx.0,
            // The worker's ring start reports it (start_inflight_tracking).
            Err(_) => return,
        };
        if let Err(e) = region.initialise_if_fresh(used_idx) {
            tracing::warn!("queue {queue}: inflight buffer not usable: {e}");
        }
    }

    fn start_inflight_tracking(&self, queue: usize, vring: &Vring) {
        let Some(slot) = self.tracking.get(queue) else {
            return;
        };
        let mut tracking = lock(slot);
        tracking.tracker = None;
        tracking.resubmit.clear();
        let Some(buffer) = lock(&self.inflight).clone() else {
            return;
        };
        let Some(mut tracker) = buffer.queue(queue) else {
            tracing::debug!("queue {queue}: not in the inflight buffer: not tracked");
            return;
        };
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let ring = state.get_queue_mut();
        let used_idx = match ring.used_idx(&*mem, Ordering::Acquire) {
            Ok(idx) => idx.0,
            Err(e) => {
                drop(state);
                self.ring_fault(queue, format_args!("cannot read the used index: {e}"));
                return;
            }
        };
        let recovery = match tracker.start(used_idx, ring.size()) {
            Ok(recovery) => recovery,
            Err(e) => {
                drop(state);
                tracing::warn!("queue {queue}: inflight buffer not usable, not tracked: {e}");
                return;
            }
        };
        if let Some(next_avail) = recovery.next_avail {
            let base = ring.next_avail();
            ring.set_next_avail(next_avail);
            ring.set_next_used(used_idx);
            if base != next_avail || !recovery.resubmit.is_empty() {
                tracing::info!(
                    "queue {queue}: {} requests taken by the previous backend and not \
                     completed are executed again; the ring goes on at {next_avail} (used \
                     index {used_idx}, the frontend said {base})",
                    recovery.resubmit.len()
                );
            }
        }
        drop(state);
        if recovery.discarded > 0 {
            tracing::warn!(
                "queue {queue}: {} inflight entries named descriptors outside the ring: ignored",
                recovery.discarded
            );
        }
        tracking.resubmit = recovery.resubmit.into();
        tracking.tracker = Some(tracker);
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
        let position = queue_state.next_avail();
        match queue_state.iter(mem) {
            Ok(mut available) => match available.next() {
                Some(chain) => Pop::Chain(chain, ring, position),
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
        if self.acked_features.load(Ordering::Acquire) & (1 << VIRTIO_RING_F_EVENT_IDX) == 0
            && self.driver_wants_no_interrupt(vring)
        {
            return;
        }
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

impl<D: Device> ConnectionBackend<D> {
    /// What a frontend may ask of an inflight buffer: the queues and ring size served.
    fn inflight_limits(&self) -> InflightLimits {
        InflightLimits {
            max_queues: self.disk.num_queues().min(MAX_QUEUES),
            max_queue_size: self.queue_size,
        }
    }

    /// Without EVENT_IDX, virtio-queue asks for a notification after every batch; the driver's
    /// VRING_AVAIL_F_NO_INTERRUPT (avail->flags bit 0) says it does not want one (a polling
    /// driver), and the device SHOULD NOT send it then (virtio 1.2, 2.7.7.2). The used index
    /// was published before this read (the fence orders the two, as for used_event).
    fn driver_wants_no_interrupt(&self, vring: &Vring) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        let avail = GuestAddress(vring.get_ref().get_queue().avail_ring());
        let mem = self.mem.memory();
        matches!(mem.read_obj::<u16>(avail),
            Ok(flags) if u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT != 0)
    }
}

impl<D: Device> ControlHooks for ConnectionBackend<D> {
    /// SET_VRING_ENABLE 0: no new request is taken from the ring, and the one in progress
    /// completes before the crate (and so the frontend) sees the message: a frontend that
    /// pauses by disabling the rings (cloud-hypervisor) can rely on guest memory not changing
    /// after the reply. SET_VRING_ENABLE 1 lifts that (the crate then calls the worker).
    fn vring_enable(&self, index: u32, enable: bool) {
        let queue = index as usize;
        if queue >= self.rings.len() || queue >= MAX_QUEUES {
            return; // the crate refuses the message
        }
        let bit = 1u64 << queue;
        if enable {
            self.disabling.fetch_and(!bit, Ordering::AcqRel);
        } else {
            self.disabling.fetch_or(bit, Ordering::AcqRel);
            // The worker gives its gate back after the request in progress.
            drop(self.disk.gate(queue));
        }
    }

    fn vring_base_set(&self, base: u32) {
        if base != 0 {
            self.ring_restored_nonzero.store(true, Ordering::Release);
        }
    }

    fn frontend_gone(&self) {
        self.connection_ended.store(true, Ordering::Release);
    }

    fn get_inflight_fd(
        &self,
        request: &InflightDescription,
    ) -> Result<(InflightDescription, std::fs::File), InflightError> {
        let (reply, file) = inflight::create_buffer(request, self.inflight_limits())?;
        tracing::debug!(
            "inflight buffer of {} bytes created for {} queues of {}",
            reply.mmap_size,
            reply.num_queues,
            reply.queue_size
        );
        Ok((reply, file))
    }

    /// The buffer is used from each ring's next start on (where the requests it records are
    /// executed again).
    fn set_inflight_fd(
        &self,
        description: &InflightDescription,
        file: std::fs::File,
    ) -> Result<(), InflightError> {
        let buffer = InflightBuffer::map(description, file, self.inflight_limits())?;
        tracing::info!(
            "inflight tracking on: {} queues of {}",
            description.num_queues,
            description.queue_size
        );
        *lock(&self.inflight) = Some(Arc::new(buffer));
        self.inflight_checked.store(0, Ordering::Release);
        self.inflight_claimed.store(0, Ordering::Release);
        self.inflight_set.store(true, Ordering::Release);
        Ok(())
    }

    /// SET_FEATURES without PROTOCOL_FEATURES enables every ring (the crate does so as it
    /// handles the message): the disables asked for earlier on this connection are void, or a
    /// frontend that disabled a ring, sent RESET_OWNER and set the connection up again without
    /// PROTOCOL_FEATURES would never have that ring served.
    fn features_set(&self, features: u64) {
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            self.disabling.store(0, Ordering::Release);
        }
    }
}

/// How a [`ConnectionBackend::process_available`] pass ended.
enum Batch {
    /// The ring is empty (notifications still off).
    Drained,
    /// [`MAX_REQUESTS_PER_EVENT`] reached with more work possibly pending.
    Bounded,
    /// The ring is stopped or broken.
    Stopped,
}

/// What polling the ring found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Polled {
    /// The driver made requests available.
    Work,
    /// Nothing within the window.
    Idle,
    /// The ring was stopped, disabled or is broken.
    Stopped,
}

/// What one event of a queue may still do before it yields to its event loop.
struct Budget {
    executed: usize,
    /// Set when the driver's available index said more requests were there: a pass that then
    /// reads none means the ring is broken (unreadable entries), not a race.
    expect_more: bool,
}

impl Budget {
    fn new() -> Self {
        Self {
            executed: 0,
            expect_more: false,
        }
    }

    fn exhausted(&self) -> bool {
        self.executed >= MAX_REQUESTS_PER_EVENT
    }
}

/// The adaptive polling window of one queue, after the idea of QEMU's `poll-max-ns`: after a
/// batch the worker keeps looking at the available ring for up to `window` before it sleeps,
/// which saves the wake-up of the worker (tens of µs for a halted vCPU in a VM) when the driver
/// sends its next request soon.
///
/// The window follows the driver's *gap*: the time from the end of a batch to the driver's next
/// request, known only once the worker was woken for it (polled time + slept time). A gap the
/// maximum window would have covered grows the window (doubling, so a steady driver is caught
/// by the next poll or the one after); a longer gap (an idle or slow guest) shrinks it (halving,
/// nothing below `max / POLL_MIN_FRACTION`), so a guest that does not keep the queue busy costs
/// little CPU. As in QEMU's `poll-grow`/`poll-shrink` the gap is compared with the maximum; ours
/// allows up to twice the maximum while the window is small, because the measured gap includes
/// the worker's own wake-up. Shrinking only on a long gap, not after every poll that found nothing, matters at
/// QD1: there the gap is the client's whole round trip (completion notification → wake-up of the
/// client's thread → next submit), which an eagerly shrinking window never covers.
///
/// Polling pays only while the core is the worker's alone: on an oversubscribed machine a
/// spinning worker is the one the scheduler makes wait, while a sleeping one is woken promptly
/// (measured on this 2-core machine at load 7: QD1 reads 47 µs sleeping vs 68 µs polling). So a
/// poll during which the worker was kept off its core for longer than [`POLL_OFF_CPU_MAX`]
/// (runnable, but another thread ran: wall time minus the thread's CPU time) stops polling for
/// 50 ms, doubling up to [`POLL_CONTENDED_BACKOFF`] while it recurs. A short yield to a thread that had work (often the client itself,
/// submitting its next request) does not count: counting every involuntary context switch made a
/// quiet machine, where the client shares the worker's core, look contended.
#[derive(Debug)]
struct PollWindow {
    max: Duration,
    window: Duration,
    /// Whether a contended poll stops polling for a while.
    backoff: bool,
    /// How long the last poll that found nothing ran (taken when the worker goes to sleep).
    last_idle_poll: Duration,
    /// When the worker last went to sleep, and how long it had polled before.
    slept: Option<(Instant, Duration)>,
    /// No polling before this instant (the core was contended).
    contended_until: Option<Instant>,
    /// The last contended poll and the back-off it started.
    last_backoff: Option<(Instant, Duration)>,
    stats: PollStats,
}

/// Counters of one queue's polling since the connection started (logged at debug level when
/// it ends, see [`ConnectionBackend::log_poll_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Polls started.
    pub polls: u64,
    /// Polls that found a request.
    pub found: u64,
    /// Time spent polling (wall clock).
    pub polled: Duration,
    /// Time the worker was off its core during polls (wall clock minus its CPU time).
    pub off_cpu: Duration,
    /// Polls after which polling stopped for a while (core contended).
    pub backoffs: u64,
    /// Batches after which the worker did not poll because of a back-off in force.
    pub skipped_contended: u64,
    /// Times the worker went to sleep (notifications on).
    pub sleeps: u64,
    /// Wake-ups after a sleep, and the driver's gaps they measured (polled + slept).
    pub wakes: u64,
    /// Sum of the gaps of `wakes`.
    pub gaps: Duration,
    /// Wake-ups whose gap the maximum window would have covered (the window grew).
    pub short_gaps: u64,
}

impl PollWindow {
    fn new(max: Duration, backoff: bool) -> Self {
        Self {
            max,
            window: max,
            backoff,
            last_idle_poll: Duration::ZERO,
            slept: None,
            contended_until: None,
            last_backoff: None,
            stats: PollStats::default(),
        }
    }

    /// How long to poll after the batch that just ended (zero: do not poll).
    fn window(&mut self) -> Duration {
        self.window_at(Instant::now())
    }

    /// [`PollWindow::window`] at `now` (the tests pass their own instants).
    fn window_at(&mut self, now: Instant) -> Duration {
        if let Some(until) = self.contended_until {
            if now < until {
                self.stats.skipped_contended += 1;
                return Duration::ZERO;
            }
            self.contended_until = None;
            if self.window.is_zero() {
                self.window = self.max / POLL_START_FRACTION;
            }
        }
        self.window
    }

    /// A poll ended after `polled` (wall clock), of which the worker spent `off_cpu` (if known)
    /// runnable but off its core.
    fn polled(&mut self, found: Polled, polled: Duration, off_cpu: Option<Duration>) {
        self.polled_at(found, polled, off_cpu, Instant::now());
    }

    /// [`PollWindow::polled`], the poll having ended at `now`.
    fn polled_at(
        &mut self,
        found: Polled,
        polled: Duration,
        off_cpu: Option<Duration>,
        now: Instant,
    ) {
        self.stats.polls += 1;
        self.stats.polled += polled;
        if found == Polled::Work {
            self.stats.found += 1;
        } else {
            self.last_idle_poll = polled;
        }
        if let Some(off_cpu) = off_cpu {
            self.stats.off_cpu += off_cpu;
            if self.backoff && off_cpu > POLL_OFF_CPU_MAX {
                self.stats.backoffs += 1;
                let backoff = match self.last_backoff {
                    Some((at, previous)) if now.duration_since(at) < POLL_BACKOFF_MEMORY => {
                        (previous * 2).min(POLL_CONTENDED_BACKOFF)
                    }
                    _ => POLL_FIRST_BACKOFF,
                };
                self.last_backoff = Some((now, backoff));
                self.contended_until = Some(now + backoff);
            }
        }
    }

    /// The worker goes to sleep with notifications on.
    fn sleeping(&mut self) {
        self.sleeping_at(Instant::now());
    }

    /// [`PollWindow::sleeping`] at `now`.
    fn sleeping_at(&mut self, now: Instant) {
        self.stats.sleeps += 1;
        self.slept = Some((now, std::mem::take(&mut self.last_idle_poll)));
    }

    /// The worker was woken for the queue (or found requests right after re-enabling
    /// notifications): the driver's gap since the end of the last batch decides the window.
    fn woken(&mut self) {
        self.woken_at(Instant::now());
    }

    /// [`PollWindow::woken`] at `now`.
    fn woken_at(&mut self, now: Instant) {
        let Some((at, polled_before)) = self.slept.take() else {
            return;
        };
        // The gap measured here includes the worker's own wake-up (tens of µs for a halted vCPU
        // in a VM): after a short poll, a gap of up to twice the maximum may still be one the
        // maximum window covers; after a long poll that found nothing, it is not.
        let gap = now.saturating_duration_since(at) + polled_before;
        self.stats.wakes += 1;
        self.stats.gaps += gap;
        let coverable = gap <= self.max || (gap < self.max * 2 && self.window < self.max / 2);
        if coverable {
            self.stats.short_gaps += 1;
            self.window = if self.window.is_zero() {
                self.max / POLL_START_FRACTION
            } else {
                (self.window * 2).min(self.max)
            };
        } else {
            self.window /= 2;
            if self.window < self.max / POLL_MIN_FRACTION {
                self.window = Duration::ZERO;
            }
        }
    }
}

/// CPU time of the calling thread so far (`None` if unknown).
fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one `timespec` through the pointer, which points at a live,
    // writable `timespec` owned by this frame.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(now.tv_sec).ok()?,
        u32::try_from(now.tv_nsec).ok()?,
    ))
}

/// A request to execute: popped from the ring, or taken by an earlier backend and found in
/// the inflight buffer (known by its head).
enum Work {
    /// Taken from the available ring at this position.
    Chain(Chain, u16),
    /// Taken by an earlier backend (in the inflight buffer).
    Resubmitted(u16),
}

/// The layout of the ring's descriptor table.
fn ring_layout(vring: &Vring) -> SplitRing {
    let state = vring.get_ref();
    let queue = state.get_queue();
    SplitRing {
        desc_table: GuestAddress(queue.desc_table()),
        size: queue.size(),
    }
}

/// What popping the available ring gave.
enum Pop {
    /// A request, the layout of the ring it came from, and its position in the available ring
    /// (the ring's available index when it was taken).
    Chain(Chain, SplitRing, u16),
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

    /// The device's features plus what this layer guarantees itself: VIRTIO_F_IN_ORDER (virtio
    /// 1.2, 6: buffers are used in the order they were made available). Each queue has one
    /// worker, and it pops a chain, executes it to the end and adds it to the used ring before
    /// it pops the next one ([`ConnectionBackend::process_available`], the only caller of
    /// `add_used`); notification batching only delays the interrupt, never a used entry, and
    /// nothing is completed later or from another thread (no deferred completion, no
    /// completion by the control thread; a write-through or lost-write FLUSH completes in its
    /// turn like any request). Offering it matters beyond the guest's optimisations:
    /// cloud-hypervisor, reconnecting to a restarted backend without an inflight buffer, sets
    /// each ring's base to the guest's *used* index only when IN_ORDER was negotiated, and to
    /// the *available* index otherwise (guests without IN_ORDER are served by the inflight
    /// buffer: see `inflight.rs`). Only split rings are offered (VIRTIO_F_RING_PACKED is not),
    /// the layout virtio-queue serves.
    fn features(&self) -> u64 {
        self.disk.device().features()
            | (1u64 << VIRTIO_F_IN_ORDER)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Dirty-page logging for live migration: guest memory carries a BitmapMmapRegion.
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    /// INFLIGHT_SHMFD: GET/SET_INFLIGHT_FD are answered by the control filter through the
    /// `ControlHooks` below (the crate refuses them); see `inflight.rs`.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Each ring knows it (the crate sets it on the queue): turning the driver's
        // notifications off and on goes through virtio-queue, which uses EVENT_IDX's avail_event
        // or the used ring's NO_NOTIFY flag accordingly.
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
                    self.inflight_checked
                        .fetch_and(!(1u64 << queue), Ordering::AcqRel);
                    self.inflight_claimed
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

#[cfg(test)]
mod poll_window_tests {
    use super::*;

    /// The worker polled its whole window without finding anything, slept, and was woken
    /// `slept` later. `now` is the test's clock: it moves by the poll and the sleep only, so no
    /// assertion depends on how fast the test itself runs (cargo runs tests in parallel, on a
    /// loaded machine).
    fn gap(poll: &mut PollWindow, now: &mut Instant, slept: Duration) {
        let polled = poll.window_at(*now);
        *now += polled;
        poll.polled_at(Polled::Idle, polled, Some(Duration::ZERO), *now);
        poll.sleeping_at(*now);
        *now += slept;
        poll.woken_at(*now);
    }

    #[test]
    fn long_gaps_shrink_the_window_to_nothing_and_short_ones_grow_it_back() {
        let max = Duration::from_micros(64);
        let mut poll = PollWindow::new(max, true);
        let mut now = Instant::now();
        assert_eq!(poll.window_at(now), max);
        now += Duration::from_micros(10);
        poll.polled_at(
            Polled::Work,
            Duration::from_micros(10),
            Some(Duration::ZERO),
            now,
        );
        assert_eq!(
            poll.window_at(now),
            max,
            "a successful poll keeps the window"
        );
        // The guest goes quiet: each gap is far longer than any window.
        let mut windows = Vec::new();
        while !poll.window_at(now).is_zero() {
            gap(&mut poll, &mut now, Duration::from_millis(5));
            windows.push(poll.window_at(now).as_micros());
            assert!(windows.len() <= 8, "never stops polling: {windows:?}");
        }
        assert_eq!(windows, [32, 16, 8, 4, 0]);
        // The driver's next request came right after the worker went to sleep: poll again.
        gap(&mut poll, &mut now, Duration::from_micros(5));
        assert_eq!(poll.window_at(now), max / POLL_START_FRACTION);
        gap(&mut poll, &mut now, Duration::from_micros(5));
        assert_eq!(poll.window_at(now), max / 2);
        // Woken without having slept (a re-armed kick after a bounded batch): no change.
        poll.woken_at(now);
        assert_eq!(poll.window_at(now), max / 2);
        gap(&mut poll, &mut now, Duration::from_micros(5));
        assert_eq!(poll.window_at(now), max, "never above the maximum");
        // A poll of the whole maximum found nothing and the request came later: no window
        // covers that gap, shrink.
        gap(&mut poll, &mut now, Duration::from_micros(5));
        assert_eq!(poll.window_at(now), max / 2);
        let stats = poll.stats;
        assert_eq!(stats.polls, 10);
        assert_eq!(stats.found, 1);
        assert_eq!(stats.wakes, 9);
        assert_eq!(stats.short_gaps, 3);
        assert_eq!(stats.backoffs, 0);
    }

    #[test]
    fn a_steady_driver_slower_than_one_window_is_caught_by_the_grown_window() {
        // QD1: the client's round trip (notify, wake, submit) is longer than the window polled:
        // the poll finds nothing, the worker sleeps and is woken soon after. Polling must not
        // give up but grow until the window covers the round trip.
        let max = Duration::from_micros(200);
        let round_trip = Duration::from_micros(70);
        let mut poll = PollWindow::new(max, true);
        let mut now = Instant::now();
        poll.window = max / POLL_MIN_FRACTION;
        for _ in 0..4 {
            let window = poll.window_at(now);
            if window >= round_trip {
                break;
            }
            gap(&mut poll, &mut now, round_trip - window);
        }
        assert!(
            poll.window_at(now) >= round_trip,
            "window {:?}",
            poll.window_at(now)
        );
        // Once it covers the round trip, every poll finds the request and the window stays.
        now += round_trip;
        poll.polled_at(
            Polled::Work,
            round_trip,
            Some(Duration::from_micros(5)),
            now,
        );
        assert!(poll.window_at(now) >= round_trip);
    }

    #[test]
    fn a_driver_slower_than_the_maximum_does_not_keep_the_window_at_the_maximum() {
        // Every gap is 1.6 × the maximum: no window catches it, so the worker must not keep
        // spinning the full maximum after every request.
        let max = Duration::from_micros(100);
        let gap_length = Duration::from_micros(160);
        let mut poll = PollWindow::new(max, true);
        let mut now = Instant::now();
        let mut windows = Vec::new();
        for _ in 0..8 {
            let window = poll.window_at(now);
            gap(&mut poll, &mut now, gap_length.saturating_sub(window));
            windows.push(poll.window_at(now).as_micros());
        }
        assert!(
            windows[2..].iter().all(|&w| w <= 50),
            "window stays high: {windows:?}"
        );
    }

    #[test]
    fn only_a_long_time_off_the_core_backs_polling_off() {
        let max = Duration::from_micros(64);
        let mut poll = PollWindow::new(max, true);
        let mut now = Instant::now();
        let slice = Duration::from_millis(3);
        // The client took the core for a few µs while the worker yielded: keep polling.
        poll.polled_at(Polled::Work, max, Some(Duration::from_micros(8)), now);
        assert_eq!(poll.window_at(now), max);
        // Unknown CPU time: keep polling.
        poll.polled_at(Polled::Work, max, None, now);
        assert_eq!(poll.window_at(now), max);
        // A CPU-bound thread held the core for a scheduler slice: no polling for a while, even
        // for a prompt driver.
        now += slice;
        let first_at = now;
        poll.polled_at(Polled::Work, slice, Some(slice), now);
        assert!(poll.window_at(now).is_zero());
        gap(&mut poll, &mut now, Duration::from_micros(5));
        assert!(poll.window_at(now).is_zero(), "polls again while contended");
        assert_eq!(poll.stats.backoffs, 1);
        assert_eq!(poll.stats.skipped_contended, 3);
        // The first back-off is short; another contended poll soon after doubles it.
        assert_eq!(poll.contended_until, Some(first_at + POLL_FIRST_BACKOFF));
        now += Duration::from_millis(10);
        poll.polled_at(Polled::Work, slice, Some(slice), now);
        assert_eq!(poll.contended_until, Some(now + POLL_FIRST_BACKOFF * 2));
        for _ in 0..10 {
            now += Duration::from_millis(10);
            poll.polled_at(Polled::Work, slice, Some(slice), now);
        }
        assert_eq!(
            poll.contended_until,
            Some(now + POLL_CONTENDED_BACKOFF),
            "the back-off doubles up to its longest"
        );
        assert_eq!(poll.stats.backoffs, 12);
        // Not before the back-off is over; then polling resumes.
        assert!(poll
            .window_at(now + POLL_CONTENDED_BACKOFF - Duration::from_micros(1))
            .is_zero());
        now += POLL_CONTENDED_BACKOFF;
        assert!(!poll.window_at(now).is_zero());
        // Long after the last contention, the next back-off is short again.
        now += POLL_BACKOFF_MEMORY;
        poll.polled_at(Polled::Work, slice, Some(slice), now);
        assert_eq!(poll.contended_until, Some(now + POLL_FIRST_BACKOFF));
    }

    #[test]
    fn without_backoff_a_contended_poll_keeps_polling() {
        let max = Duration::from_micros(64);
        let mut poll = PollWindow::new(max, false);
        let now = Instant::now();
        poll.polled_at(
            Polled::Work,
            Duration::from_millis(3),
            Some(Duration::from_millis(3)),
            now,
        );
        assert_eq!(poll.window_at(now), max);
        assert_eq!(poll.stats.backoffs, 0);
        assert_eq!(
            poll.stats.off_cpu,
            Duration::from_millis(3),
            "still counted"
        );
    }
}
