//! What the vhost-user layer needs from the device it serves, and the long-lived state around it
//! that outlives each frontend connection: the quiesce/resume lifecycle (I7, I8) and the per-queue
//! gates that let a quiesce wait for the requests in progress without a lock on the data path that
//! all queues share.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};

use crate::blk::{SplitRing, Submitted};
use crate::image::{ImageError, Stats};

/// Guest memory as the vhost-user layer maps it: every region carries a dirty-page bitmap that
/// the frontend's log (VHOST_USER_SET_LOG_BASE) plugs into during live migration, so every write
/// through vm-memory marks the pages it touched.
pub type GuestMemory = GuestMemoryMmap<BitmapMmapRegion>;
/// The swappable handle to [`GuestMemory`] shared with the vhost-user handler.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemory>;
/// A descriptor chain popped from a virtqueue, holding its snapshot of guest memory.
pub type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemory>>;

/// A virtio device the vhost-user layer can serve: in production the virtio-blk request logic on
/// top of the image engine ([`super::BlkDisk`]); tests use fakes that record what they were asked.
///
/// Every method is called from several threads at once (one worker per queue plus the control
/// thread), hence `&self` and `Sync`.
pub trait Device: Send + Sync + 'static {
    /// Virtio device feature bits offered to the driver (the vhost-user bits are added on top).
    fn features(&self) -> u64;

    /// The device configuration space (`struct virtio_blk_config`, little-endian).
    fn config_space(&self) -> Vec<u8>;

    /// The driver writes `data` at `offset` into the configuration space (SET_CONFIG). The error
    /// says why the write is refused. The default refuses every write.
    fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), String> {
        let _ = data;
        Err(format!(
            "write at offset {offset}: the configuration space is read-only"
        ))
    }

    /// Executes one request and returns the number of bytes written into the chain's
    /// device-writable buffers (the used length). `ring` is the layout of the queue the chain was
    /// popped from, so the device can walk the descriptor table itself and refuse what
    /// virtio-queue's iterator would silently accept (e.g. INDIRECT together with NEXT).
    /// Never panics on guest input: a bad request fails alone.
    /// `submitted`: whether the request was made available before this backend served the ring
    /// after lost writes were reported (a FLUSH among those fails).
    fn process_chain(
        &self,
        chain: Chain,
        ring: SplitRing,
        acked_features: u64,
        submitted: Submitted,
    ) -> u32;

    /// Executes the request at descriptor `head` of `ring` (one an earlier backend took from
    /// the available ring and never completed, found in the inflight buffer), as
    /// [`Device::process_chain`] would: the same checks of guest input, the same used length.
    fn process_head(
        &self,
        mem: &GuestMemory,
        head: u16,
        ring: SplitRing,
        acked_features: u64,
        submitted: Submitted,
    ) -> u32;

    /// True when executing `chain` cannot take long (it waits for no free space, commit or
    /// other queue). The worker batches the guest's completion notifications only across such
    /// requests: before any other one it notifies the guest of the completions it holds back,
    /// so a completed read is not hidden behind a slow write or FLUSH. The default says no.
    fn completes_quickly(&self, chain: &Chain) -> bool {
        let _ = chain;
        false
    }

    /// True when the device refuses writes (then resuming takes no writer lock).
    fn is_read_only(&self) -> bool {
        false
    }

    /// Commits everything accepted so far, parks the metadata writer and releases the writer
    /// lock. Idempotent.
    fn quiesce(&self) -> Result<(), ImageError>;

    /// Takes the writer lock, reloads the metadata if another process changed the image and
    /// restarts the writer. Idempotent.
    fn resume(&self) -> Result<(), ImageError>;

    /// The frontend started a ring at a non-zero index: the guest ran before this device start
    /// and may hold completed writes that a crashed earlier backend never committed.
    fn ring_restored_mid_session(&self) {}

    /// True from the ring start that reported lost writes to the guest (an earlier backend died
    /// with writes it had completed and not committed) until the device is quiesced: the
    /// requests made available before each ring's start then count as
    /// [`Submitted::BeforeRestart`].
    fn lost_writes_reported(&self) -> bool {
        false
    }

    /// Returns once the image's writer lock could be taken, the device's lock policy gives up,
    /// or `keep_waiting` says no. Called without any lifecycle lock held; `resume` then takes
    /// the lock for real. The default waits for nothing.
    fn wait_until_lockable(&self, keep_waiting: &dyn Fn() -> bool) {
        let _ = keep_waiting;
    }

    /// Live statistics of the image behind the device.
    fn stats(&self) -> Stats;

    /// Commits, checkpoints, stops the writer and releases the lock (at shutdown).
    fn close(self) -> Result<(), ImageError>
    where
        Self: Sized;
}

/// How long a failed resume is not retried: requests arriving meanwhile fail at once (the engine
/// answers them with an I/O error) instead of each waiting for the writer lock again.
const RESUME_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Lifecycle state, changed only under [`SharedDisk::lifecycle`].
#[derive(Debug, Default)]
struct Lifecycle {
    /// The daemon is shutting down: never resume again.
    shutting_down: bool,
    /// When the last resume failed (to rate-limit retries).
    last_resume_failure: Option<Instant>,
}

/// The device plus the lifecycle state shared by the connections served one after another.
///
/// Locking protocol (why it is deadlock-free and needs no lock shared by all queues on the data
/// path):
/// - a worker processes a batch of requests of queue `q` holding only `gates[q]` (its own), and
///   only after seeing `running == true` under it;
/// - a quiesce takes `lifecycle`, then every gate in index order, so it waits for the requests in
///   progress and no new batch starts until the engine is quiesced and `running` is false; while
///   it waits, workers end their batch after the request in progress (`gates_wanted`), so the
///   wait is one request per queue, not a batch of up to 128;
/// - a resume takes `lifecycle` only (a worker never waits for it while holding its gate).
pub struct SharedDisk<D: Device> {
    device: D,
    num_queues: usize,
    gates: Vec<Mutex<()>>,
    /// Number of threads waiting to take every gate (quiesce, shutdown): workers then give their
    /// gate back after the request in progress instead of finishing their batch.
    gate_waiters: AtomicUsize,
    running: AtomicBool,
    lifecycle: Mutex<Lifecycle>,
}

/// Locks a mutex whose data cannot be left inconsistent by a panic (unit, or plain flags):
/// a poisoned lock is taken over rather than propagated.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<D: Device> SharedDisk<D> {
    /// Wraps `device`, served with `num_queues` queues. The device starts quiesced.
    pub fn new(device: D, num_queues: usize) -> Self {
        Self {
            device,
            num_queues,
            gates: (0..num_queues).map(|_| Mutex::new(())).collect(),
            gate_waiters: AtomicUsize::new(0),
            running: AtomicBool::new(false),
            lifecycle: Mutex::new(Lifecycle::default()),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Takes the device back (at shutdown, once no connection uses it).
    pub fn into_device(self) -> D {
        self.device
    }

    /// Number of queues offered.
    pub fn num_queues(&self) -> usize {
        self.num_queues
    }

    /// True while the engine is resumed (writer running, lock held).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Takes queue `q`'s gate: held by that queue's worker while it processes a batch. Call it
    /// holding no gate and not the lifecycle lock.
    pub(crate) fn gate(&self, q: usize) -> Option<MutexGuard<'_, ()>> {
        if self.gates_wanted() {
            // A quiesce waits for every gate, holding the lifecycle lock: let it go first. A
            // worker that gave its gate back and took it again at once (mutexes are not fair)
            // could otherwise keep it waiting request after request.
            drop(lock(&self.lifecycle));
        }
        self.gates.get(q).map(lock)
    }

    /// True while a quiesce or shutdown waits for the gates: a worker holding its gate should
    /// give it back after its request in progress (the wait is then bounded by one request per
    /// queue, not by a batch).
    pub(crate) fn gates_wanted(&self) -> bool {
        self.gate_waiters.load(Ordering::Acquire) != 0
    }

    /// Takes every gate in index order, announcing the wait to the workers meanwhile.
    fn all_gates(&self) -> Vec<MutexGuard<'_, ()>> {
        self.gate_waiters.fetch_add(1, Ordering::AcqRel);
        let gates = self.gates.iter().map(lock).collect();
        self.gate_waiters.fetch_sub(1, Ordering::AcqRel);
        gates
    }

    /// Returns once no queue's worker is in the middle of a batch: each gives its gate back
    /// after its request in progress while the gates are wanted.
    pub(crate) fn wait_for_requests_in_progress(&self) {
        drop(self.all_gates());
    }

    /// Resumes the engine unless it runs already. `still_wanted` is checked under the lifecycle
    /// lock: a ring that was stopped meanwhile must not resume the engine.
    ///
    /// Returns whether the engine runs afterwards. A failure is logged (and not retried for
    /// [`RESUME_RETRY_DELAY`]); the requests then fail with an I/O error from the engine.
    pub(crate) fn ensure_running(&self, reason: &str, still_wanted: impl Fn() -> bool) -> bool {
        if !self.running.load(Ordering::Acquire) {
            // Wait for another process's writer lock (`--wait-lock`) without holding the
            // lifecycle lock: a GET_VRING_BASE, a disconnect or SIGTERM meanwhile must not wait
            // behind it, and they end the wait.
            self.device
                .wait_until_lockable(&|| still_wanted() && !lock(&self.lifecycle).shutting_down);
        }
        let mut life = lock(&self.lifecycle);
        if self.running.load(Ordering::Acquire) {
            return true;
        }
        if life.shutting_down || !still_wanted() {
            return false;
        }
        if life
            .last_resume_failure
            .is_some_and(|at| at.elapsed() < RESUME_RETRY_DELAY)
        {
            return false;
        }
        let read_only = self.device.is_read_only();
        if read_only {
            tracing::info!("{reason}: loading the image's metadata (read-only)");
        } else {
            tracing::info!("{reason}: taking the image's writer lock and resuming");
        }
        match self.device.resume() {
            Ok(()) => {
                life.last_resume_failure = None;
                self.running.store(true, Ordering::Release);
                if read_only {
                    tracing::info!("device resumed (read-only: no writer lock, no writer)");
                } else {
                    tracing::info!("device resumed: writer lock taken, metadata writer running");
                }
                true
            }
            Err(e) => {
                life.last_resume_failure = Some(Instant::now());
                tracing::error!("cannot resume the device ({reason}): {e}; requests fail with I/O errors until it can");
                false
            }
        }
    }

    /// Quiesces the engine if it runs and `should_quiesce` (checked once every queue's batch in
    /// progress has finished and none can start) says so. Returns the engine's error if the
    /// commit failed (the engine then still counts as running: a later quiesce retries).
    pub(crate) fn quiesce_if(
        &self,
        reason: &str,
        should_quiesce: impl FnOnce() -> bool,
    ) -> Result<(), ImageError> {
        let _life = lock(&self.lifecycle);
        let _gates = self.all_gates();
        // Always evaluated: it also updates the caller's bookkeeping (e.g. the stopped ring).
        let wanted = should_quiesce();
        if !wanted || !self.running.load(Ordering::Acquire) {
            return Ok(());
        }
        self.quiesce_locked(reason)
    }

    fn quiesce_locked(&self, reason: &str) -> Result<(), ImageError> {
        match self.device.quiesce() {
            Ok(()) => {
                self.running.store(false, Ordering::Release);
                if self.device.is_read_only() {
                    tracing::info!("device quiesced ({reason}, read-only)");
                } else {
                    tracing::info!(
                        "device quiesced ({reason}): metadata committed, writer parked, \
                         writer lock released"
                    );
                }
                Ok(())
            }
            Err(e) => {
                // The engine is parked anyway (its writer failed and it keeps the writer lock, so
                // no other process takes over an image missing writes): the next ring start
                // resumes it, which reloads the metadata from disk.
                self.running.store(false, Ordering::Release);
                tracing::error!("cannot quiesce the device ({reason}): {e}");
                Err(e)
            }
        }
    }

    /// Quiesces for good: no resume happens afterwards. Used at shutdown.
    pub fn shut_down(&self, reason: &str) -> Result<(), ImageError> {
        let mut life = lock(&self.lifecycle);
        life.shutting_down = true;
        let _gates = self.all_gates();
        if !self.running.load(Ordering::Acquire) {
            return Ok(());
        }
        self.quiesce_locked(reason)
    }
}
