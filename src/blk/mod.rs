//! virtio-blk request logic: parse descriptor chains from guest memory, execute them on the image
//! engine, write the status. Knows virtio-queue and vm-memory; knows nothing of vhost-user sockets.
//!
//! - [`config`]: feature bits, limits, `struct virtio_blk_config`.
//! - [`request`]: descriptor chain → validated request (every hostile-guest check at chain level).
//! - [`exec`]: request → engine calls → `VIRTIO_BLK_S_*`.
//!
//! One [`BlkDevice`] is shared (`Arc`) by all queue threads; it holds no lock. Each queue thread
//! keeps its own [`RequestBuffers`] (or lets [`BlkDevice::process_ring_chain`] keep one per
//! thread), so the data path shares nothing mutable between queues.
//!
//! Used lengths: a request answered with a status returns the data bytes written into the chain
//! plus the status byte (a read: data + 1; GET_ID: bytes of the id written + 1; everything else,
//! and every failure: 1). A chain without a usable status byte is returned with 0 and nothing
//! written.
//!
//! Guest data are only read and written through vm-memory's `Bytes` API (dirty-page logging for
//! live migration sees every byte the device writes), and always through a private copy: a guest
//! changing its buffer while the request is served cannot make the engine compress one version
//! and checksum another.

pub mod config;
pub mod exec;
pub mod request;

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use vm_memory::{Bytes, GuestMemory};

pub use config::BlkConfig;
pub use request::{RequestBuffers, SplitRing};

use crate::image::{Image, ImageError, SECTOR_SIZE};

/// True when the chain's request completes without waiting for anything but reads of the image
/// (a read, or GET_ID), judged from the request header's type alone. A worker that batches the
/// guest's completion notifications may hold earlier completions back across such a request;
/// any other request (a write may wait for free space or a commit, a FLUSH is a commit, a
/// DISCARD punches) must not keep them from the guest. A chain whose header cannot be read
/// counts as not quick (it fails fast anyway, but the caller only loses a batched notification).
pub fn is_quick_request<M>(chain: &virtio_queue::DescriptorChain<M>) -> bool
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let Some(header) = chain.clone().next() else {
        return false;
    };
    if header.is_write_only() || header.len() < 4 {
        return false;
    }
    match chain.memory().read_obj::<u32>(header.addr()) {
        Ok(request_type) => matches!(
            u32::from_le(request_type),
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN
                | virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID
        ),
        Err(_) => false,
    }
}

/// When a request was made available, relative to the start of this backend's service of its
/// ring after a previous backend died with writes it had completed and not committed
/// ([`BlkDevice::report_lost_writes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Submitted {
    /// While this backend serves the ring (or no loss was reported): the usual rules.
    #[default]
    Now,
    /// Before: a FLUSH fails, since writes completed before it was made available may be gone
    /// (I2). Every such FLUSH fails, not only the first: each waits for its own writes (two
    /// fsyncs in flight at the kill, found by the kill campaign).
    BeforeRestart,
}

/// Errors creating a device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// A setting is out of range.
    #[error("invalid virtio-blk setting: {0}")]
    InvalidConfig(String),
    /// The image's size is not a whole number of sectors.
    #[error("image size {0} is not a multiple of 512")]
    UnalignedImage(u64),
}

/// Why one request failed. [`RequestError::status`] is the only place that maps failures to
/// `VIRTIO_BLK_S_*`.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain's layout breaks the virtio rules.
    #[error("malformed descriptor chain: {0}")]
    MalformedChain(&'static str),
    /// A descriptor points outside guest memory (wholly or in part: a hole between regions, past
    /// the last one) or overflows.
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    BadAddress {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The header is not in the first 16 device-readable bytes.
    #[error("request header is not 16 device-readable bytes")]
    ShortHeader,
    /// Guest memory access failed (validated ranges make this unexpected).
    #[error("guest memory access failed")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// Data length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The range is outside the disk.
    #[error("sectors {sector}+{sectors} are outside the disk ({capacity} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// More data than `seg_max * size_max`.
    #[error("request carries {len} bytes, more than the {max} advertised")]
    TooLarge {
        /// Data length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// A read into device-readable buffers, or GET_ID into one.
    #[error("data buffer of a read is not device-writable")]
    ReadIntoReadOnlyBuffer,
    /// A write-type request on a read-only device.
    #[error("device is read-only")]
    ReadOnlyDevice,
    /// A FLUSH after the backend lost writes it had completed (it was restarted after a crash
    /// while the guest kept running): the guest must learn that its cache did not survive.
    #[error("writes completed before the backend restarted were lost")]
    LostWrites,
    /// Request type not implemented.
    #[error("unsupported request type {0:#x}")]
    UnsupportedType(u32),
    /// Request whose feature the driver did not negotiate.
    #[error("{0} was not negotiated")]
    NotNegotiated(&'static str),
    /// Discard / write-zeroes payload not a non-empty multiple of 16 bytes.
    #[error("discard/write-zeroes payload of {0} bytes is not a non-empty multiple of 16")]
    BadZeroingPayload(u64),
    /// More discard / write-zeroes segments than advertised.
    #[error("{count} discard/write-zeroes segments, more than the {max} advertised")]
    TooManySegments {
        /// Segments sent.
        count: u64,
        /// Limit.
        max: u32,
    },
    /// Unknown flags, or UNMAP on a discard.
    #[error("discard/write-zeroes segment flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    /// A segment of zero sectors or above the per-segment limit.
    #[error("discard/write-zeroes segment of {sectors} sectors (allowed 1..={max})")]
    BadSegmentLength {
        /// Sectors asked.
        sectors: u32,
        /// Limit.
        max: u32,
    },
    /// The engine failed.
    #[error("{op} at byte {offset} failed")]
    Engine {
        /// Engine operation.
        op: &'static str,
        /// Byte offset on the disk.
        offset: u64,
        /// Engine error.
        #[source]
        source: ImageError,
    },
}

impl RequestError {
    /// The status byte the guest gets for this failure.
    pub fn status(&self) -> u8 {
        let status = match self {
            RequestError::UnsupportedType(_)
            | RequestError::NotNegotiated(_)
            | RequestError::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP,
            RequestError::MalformedChain(_)
            | RequestError::BadAddress { .. }
            | RequestError::ShortHeader
            | RequestError::GuestMemory(_)
            | RequestError::UnalignedLength(_)
            | RequestError::OutOfRange { .. }
            | RequestError::TooLarge { .. }
            | RequestError::ReadIntoReadOnlyBuffer
            | RequestError::ReadOnlyDevice
            | RequestError::LostWrites
            | RequestError::BadZeroingPayload(_)
            | RequestError::TooManySegments { .. }
            | RequestError::BadSegmentLength { .. }
            | RequestError::Engine { .. } => VIRTIO_BLK_S_IOERR,
        };
        // Statuses are 0..=2.
        status as u8
    }

    /// Failures of the host side (not of the guest's request), logged at error level.
    pub fn is_host_failure(&self) -> bool {
        matches!(
            self,
            RequestError::Engine { .. } | RequestError::GuestMemory(_)
        )
    }

    pub(crate) fn engine(op: &'static str, offset: u64, source: ImageError) -> Self {
        RequestError::Engine { op, offset, source }
    }
}

/// A virtio-blk device on an image. `Send + Sync`; share it between queue threads with `Arc`.
#[derive(Debug)]
pub struct BlkDevice {
    image: Arc<Image>,
    cfg: BlkConfig,
    read_only: bool,
    capacity_sectors: u64,
    cluster_size: u32,
    id: [u8; config::ID_BYTES],
    /// Set by [`BlkDevice::report_lost_writes`]; the next FLUSH fails and clears it.
    lost_writes: AtomicBool,
    /// See [`BlkDevice::flushed_since_lost_writes`].
    flushed_since_lost_writes: AtomicBool,
    /// Requests failed by the host (I/O errors, corrupt payloads) so far: logged at error level
    /// a few times, then at debug with a periodic summary, so a guest re-reading a bad cluster
    /// or a full disk cannot flood the log.
    host_failures: AtomicU64,
    /// FLUSH requests the driver sent (served or failed).
    flush_requests: AtomicU64,
}

/// Host failures logged at error level before the log is rate-limited.
const HOST_FAILURES_LOGGED: u64 = 16;
/// After that, one summary line per this many failures.
const HOST_FAILURE_SUMMARY_EVERY: u64 = 1000;

thread_local! {
    /// Scratch of [`BlkDevice::process_chain`]: one per queue thread.
    static THREAD_BUFFERS: RefCell<RequestBuffers> = RefCell::new(RequestBuffers::default());
}

impl BlkDevice {
    /// A device serving `image` with the settings `cfg` (validated here). The device is
    /// read-only when `cfg.read_only` is set or the image was opened read-only.
    pub fn new(image: Arc<Image>, mut cfg: BlkConfig) -> Result<Self, BlkError> {
        cfg.validate()?;
        let size = image.size();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlkError::UnalignedImage(size));
        }
        let read_only = cfg.read_only || image.is_read_only();
        cfg.read_only = read_only;
        let geometry = image.geometry();
        let serial = if cfg.serial.is_empty() {
            geometry.uuid.as_str()
        } else {
            cfg.serial.as_str()
        };
        let mut id = [0u8; config::ID_BYTES];
        for (dst, src) in id.iter_mut().zip(serial.bytes()) {
            *dst = src;
        }
        Ok(Self {
            cluster_size: geometry.cluster_size,
            image,
            cfg,
            read_only,
            capacity_sectors: size / SECTOR_SIZE,
            id,
            lost_writes: AtomicBool::new(false),
            flushed_since_lost_writes: AtomicBool::new(true),
            host_failures: AtomicU64::new(0),
            flush_requests: AtomicU64::new(0),
        })
    }

    /// Tells the device that writes it completed earlier may be gone (the backend process was
    /// killed and restarted while the guest kept running). The next FLUSH then fails with IOERR,
    /// once, instead of claiming durability for them (I2); a guest filesystem reports the error
    /// to its fsync callers like any failed cache flush.
    pub fn report_lost_writes(&self) {
        self.flushed_since_lost_writes
            .store(false, Ordering::SeqCst);
        self.lost_writes.store(true, Ordering::SeqCst);
    }

    /// True once a FLUSH succeeded after the last [`BlkDevice::report_lost_writes`] (or when
    /// none was reported).
    pub fn flushed_since_lost_writes(&self) -> bool {
        self.flushed_since_lost_writes.load(Ordering::SeqCst)
    }

    /// FLUSH requests the driver has sent so far (a driver that sends them uses the disk's
    /// write cache).
    pub fn flush_requests(&self) -> u64 {
        self.flush_requests.load(Ordering::Acquire)
    }

    /// virtio device features offered (VERSION_1, EVENT_IDX and INDIRECT_DESC included).
    pub fn features(&self) -> u64 {
        config::device_features(&self.cfg)
    }

    /// `struct virtio_blk_config`, little-endian, 96 bytes.
    pub fn config_space(&self) -> Vec<u8> {
        config::config_space(&self.cfg, self.capacity_sectors, self.cluster_size)
    }

    /// The settings in effect (`read_only` includes an image opened read-only).
    pub fn config(&self) -> &BlkConfig {
        &self.cfg
    }

    /// The image served.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// Disk size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// True when writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Serves the request at the head of `chain`, read from the descriptor table of `ring`
    /// (the queue the chain was popped from), and writes its status. This is the strict path:
    /// the device walks the table itself, so it refuses every malformed indirect descriptor
    /// (INDIRECT with NEXT, nested, not at the head, empty, ragged, longer than the queue, or any
    /// indirect descriptor when the driver did not accept VIRTIO_RING_F_INDIRECT_DESC).
    ///
    /// Returns the used length for the used ring: the data bytes written into the chain plus the
    /// status byte, or 0 when the chain has no usable status byte (then nothing was written).
    /// `acked_features` are the features the driver accepted. Never panics on guest input. Uses
    /// a per-thread [`RequestBuffers`]; [`BlkDevice::process_ring_chain_with`] takes one
    /// explicitly.
    pub fn process_ring_chain<M>(
        &self,
        chain: virtio_queue::DescriptorChain<M>,
        ring: SplitRing,
        acked_features: u64,
    ) -> u32
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        self.process_ring_chain_submitted(chain, ring, acked_features, Submitted::Now)
    }

    /// [`BlkDevice::process_ring_chain`] for a request made available at the moment `submitted`
    /// says.
    pub fn process_ring_chain_submitted<M>(
        &self,
        chain: virtio_queue::DescriptorChain<M>,
        ring: SplitRing,
        acked_features: u64,
        submitted: Submitted,
    ) -> u32
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        with_thread_buffers(|bufs| {
            self.process_ring_chain_with(bufs, chain, ring, acked_features, submitted)
        })
    }

    /// [`BlkDevice::process_ring_chain`] with explicit per-queue scratch buffers.
    pub fn process_ring_chain_with<M>(
        &self,
        bufs: &mut RequestBuffers,
        chain: virtio_queue::DescriptorChain<M>,
        ring: SplitRing,
        acked_features: u64,
        submitted: Submitted,
    ) -> u32
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        self.walk_and_serve(chain.memory(), bufs, head, ring, acked_features, submitted)
    }

    /// [`BlkDevice::process_ring_chain`] for the chain at descriptor `head` of `ring`, without a
    /// virtio-queue `DescriptorChain`: how a request taken by an earlier backend and recorded in
    /// the inflight buffer is executed again (virtio-queue builds chains only from the available
    /// ring). The same strict walk of the descriptor table, so every check is the same.
    pub fn process_ring_head<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        head: u16,
        ring: SplitRing,
        acked_features: u64,
        submitted: Submitted,
    ) -> u32 {
        with_thread_buffers(|bufs| {
            self.walk_and_serve(mem, bufs, head, ring, acked_features, submitted)
        })
    }

    /// The strict walk of the descriptor table from `head`, then the request served.
    fn walk_and_serve<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        bufs: &mut RequestBuffers,
        head: u16,
        ring: SplitRing,
        acked_features: u64,
        submitted: Submitted,
    ) -> u32 {
        let indirect = acked_features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        let status = request::walk_chain_with(mem, ring, head, self.cfg.queue_size, indirect, bufs);
        self.serve(mem, bufs, head, status, acked_features, submitted)
    }

    /// Like [`BlkDevice::process_ring_chain`], following virtio-queue's own chain iterator
    /// instead of reading the descriptor table: every check is the same except that a descriptor
    /// with INDIRECT and NEXT is served (the iterator hides it and ignores its NEXT). Prefer
    /// `process_ring_chain`.
    pub fn process_chain<M>(
        &self,
        chain: virtio_queue::DescriptorChain<M>,
        acked_features: u64,
    ) -> u32
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        with_thread_buffers(|bufs| self.process_chain_with(bufs, chain, acked_features))
    }

    /// [`BlkDevice::process_chain`] with explicit per-queue scratch buffers.
    pub fn process_chain_with<M>(
        &self,
        bufs: &mut RequestBuffers,
        mut chain: virtio_queue::DescriptorChain<M>,
        acked_features: u64,
    ) -> u32
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let status = request::collect_chain(&mut chain, self.cfg.queue_size, bufs);
        self.serve(
            chain.memory(),
            bufs,
            head,
            status,
            acked_features,
            Submitted::Now,
        )
    }

    /// Executes the collected request and writes its status; returns the used length.
    fn serve<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        bufs: &mut RequestBuffers,
        head: u16,
        status_byte: Result<request::StatusByte, request::Unanswerable>,
        acked_features: u64,
        submitted: Submitted,
    ) -> u32 {
        let status_byte = match status_byte {
            Ok(status) => status,
            Err(reason) => {
                tracing::debug!(head, %reason, "descriptor chain returned unanswered");
                return 0;
            }
        };
        let (status, data_written) = match self.execute(mem, bufs, acked_features, submitted) {
            Ok(written) => (exec::STATUS_OK, written),
            Err(err) => {
                if err.is_host_failure() {
                    let n = self.host_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if n <= HOST_FAILURES_LOGGED {
                        tracing::error!(head, error = %err, source = ?std::error::Error::source(&err), "virtio-blk request failed");
                    } else if n.is_multiple_of(HOST_FAILURE_SUMMARY_EVERY) {
                        tracing::error!(
                            failures = n,
                            error = %err,
                            "virtio-blk requests keep failing (logged at debug level after the first {HOST_FAILURES_LOGGED})"
                        );
                    } else {
                        tracing::debug!(head, error = %err, "virtio-blk request failed");
                    }
                } else {
                    tracing::debug!(head, error = %err, "virtio-blk request rejected");
                }
                (err.status(), 0)
            }
        };
        if let Err(err) = mem.write_slice(&[status], status_byte.addr) {
            tracing::error!(head, %err, "cannot write the status byte");
            return 0;
        }
        data_written.saturating_add(1)
    }
}

/// Runs `serve` with this thread's [`RequestBuffers`] (one per queue thread), or with fresh ones
/// on re-entrance or during thread teardown rather than panic.
fn with_thread_buffers(serve: impl FnOnce(&mut RequestBuffers) -> u32) -> u32 {
    let mut serve = Some(serve);
    let served = THREAD_BUFFERS.try_with(|cell| {
        let mut bufs = cell.try_borrow_mut().ok()?;
        let serve = serve.take()?;
        Some(serve(&mut bufs))
    });
    if let Ok(Some(used)) = served {
        return used;
    }
    match serve {
        Some(serve) => serve(&mut RequestBuffers::default()),
        None => 0,
    }
}
