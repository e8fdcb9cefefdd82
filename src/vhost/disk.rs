//! The production [`Device`]: the virtio-blk request layer on the image engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

use crate::blk::config::{check_config_write, WRITEBACK_OFFSET};
use crate::blk::{BlkConfig, BlkDevice, BlkError, SplitRing, Submitted};
use crate::image::{Image, ImageError, LockPolicy, Stats};

use super::device::{lock, Chain, Device, GuestMemory};

/// An image served as a virtio-blk device.
#[derive(Debug)]
pub struct BlkDisk {
    blk: BlkDevice,
    lock: LockPolicy,
    /// The cache mode the driver chose (VIRTIO_BLK_F_CONFIG_WCE): true for write-back (the
    /// default: completed writes are durable at the next FLUSH), false for write-through (each
    /// write, discard and write-zeroes is durable when it completes). Kept for the process's
    /// lifetime, so a frontend reconnecting finds the mode its guest set.
    write_back: AtomicBool,
    /// The driver set the cache mode in this process (a configuration write of `writeback`).
    mode_set_by_driver: AtomicBool,
    /// A guest that ran before this process started (rings restored mid-session: QEMU
    /// reconnecting to a restarted backend, or a migration destination) may have chosen
    /// write-through, and QEMU does not send that choice again. Until the driver shows that it
    /// uses the write cache (its first FLUSH) or sets the mode, every write is made durable
    /// before it completes: a write-through guest never flushes, so nothing else would protect
    /// its writes from the next kill.
    /// (Set only while no FLUSH has been seen, so any FLUSH request ends it.)
    write_through_until_flush: AtomicBool,
    /// The lost-write notice was taken by this process (see [`Device::lost_writes_reported`]).
    lost_writes_reported: Mutex<bool>,
}

impl BlkDisk {
    /// Serves `image` (opened `start_quiesced`, with the lock policy `lock`) with `config`.
    pub fn new(image: Image, config: BlkConfig, lock: LockPolicy) -> Result<Self, BlkError> {
        Ok(Self {
            blk: BlkDevice::new(Arc::new(image), config)?,
            lock,
            write_back: AtomicBool::new(true),
            mode_set_by_driver: AtomicBool::new(false),
            write_through_until_flush: AtomicBool::new(false),
            lost_writes_reported: Mutex::new(false),
        })
    }

    /// The virtio-blk device.
    pub fn blk(&self) -> &BlkDevice {
        &self.blk
    }
}

impl BlkDisk {
    /// Executes one request through `execute`, given the features to serve it with: the
    /// write-back / write-through choice of the cache mode applied.
    fn serve_request(&self, acked_features: u64, execute: impl FnOnce(u64) -> u32) -> u32 {
        // Write-through: served as for a driver without VIRTIO_BLK_F_FLUSH, each change is
        // flushed before it completes (FLUSH requests themselves are still served).
        let provisional = self.write_through_until_flush.load(Ordering::Acquire);
        let acked_features = if self.write_back.load(Ordering::Acquire) && !provisional {
            acked_features
        } else {
            acked_features & !(1 << VIRTIO_BLK_F_FLUSH)
        };
        let used = execute(acked_features);
        if provisional
            && self.blk.flush_requests() > 0
            && self.write_through_until_flush.swap(false, Ordering::AcqRel)
        {
            tracing::info!(
                "the guest flushes its disk: it uses the write cache; writes complete before \
                 they are durable again (write-back)"
            );
        }
        used
    }
}

impl Device for BlkDisk {
    fn features(&self) -> u64 {
        self.blk.features()
    }

    fn config_space(&self) -> Vec<u8> {
        let mut space = self.blk.config_space();
        if !self.blk.is_read_only() && !self.write_back.load(Ordering::Acquire) {
            if let Some(writeback) = space.get_mut(WRITEBACK_OFFSET) {
                *writeback = 0;
            }
        }
        space
    }

    /// Never refuses: the crate would end the whole connection over a refused message, and the
    /// guest would lose its disk over a bad configuration write (virtio lets a device ignore a
    /// write to a field it does not let the driver change). A write it cannot apply is logged
    /// and ignored; the configuration space keeps its values.
    fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), String> {
        if self.blk.is_read_only() {
            tracing::warn!(
                "configuration write of {} bytes at {offset} ignored: the device is read-only",
                data.len()
            );
            return Ok(());
        }
        let write_back = match check_config_write(&self.config_space(), offset, data) {
            Ok(Some(write_back)) => write_back,
            Ok(None) => return Ok(()),
            Err(why) => {
                tracing::warn!("configuration write ignored: {why}");
                return Ok(());
            }
        };
        self.mode_set_by_driver.store(true, Ordering::Release);
        self.write_through_until_flush
            .store(false, Ordering::Release);
        if self.write_back.swap(write_back, Ordering::AcqRel) != write_back {
            if write_back {
                tracing::info!("the driver set the disk's cache to write-back");
            } else {
                tracing::info!(
                    "the driver set the disk's cache to write-through: every write is made \
                     durable before it completes"
                );
                // Writes completed before the switch become durable at once, as the driver
                // now assumes of every completed write. (Quiesced: everything completed is
                // committed already.) A failed flush is final for the image (every later
                // write fails), so the driver learns of it from its next write.
                match self.blk.image().flush() {
                    Ok(()) | Err(ImageError::Quiesced) => {}
                    Err(e) => tracing::error!(
                        "switching to write-through: the flush of earlier writes failed: {e}"
                    ),
                }
            }
        }
        Ok(())
    }

    fn process_chain(
        &self,
        chain: Chain,
        ring: SplitRing,
        acked_features: u64,
        submitted: Submitted,
    ) -> u32 {
        self.serve_request(acked_features, |acked| {
            self.blk
                .process_ring_chain_submitted(chain, ring, acked, submitted)
        })
    }

    fn process_head(
        &self,
        mem: &GuestMemory,
        head: u16,
        ring: SplitRing,
        acked_features: u64,
        submitted: Submitted,
    ) -> u32 {
        self.serve_request(acked_features, |acked| {
            self.blk
                .process_ring_head(mem, head, ring, acked, submitted)
        })
    }

    fn completes_quickly(&self, chain: &Chain) -> bool {
        crate::blk::is_quick_request(chain)
    }

    fn is_read_only(&self) -> bool {
        self.blk.is_read_only()
    }

    fn quiesce(&self) -> Result<(), ImageError> {
        self.blk.image().quiesce()
    }

    fn resume(&self) -> Result<(), ImageError> {
        if let LockPolicy::Wait(limit) = self.lock {
            if !self.blk.image().is_read_only() {
                tracing::info!(
                    "waiting up to {limit:?} for the image's writer lock if another process \
                     (e.g. a migration source) still holds it"
                );
            }
        }
        self.blk.image().resume()
    }

    fn ring_restored_mid_session(&self) {
        // Known here: the driver set the mode, or flushed (then it uses the write cache; this
        // process saw it, e.g. before a pause and resume).
        let mode_known =
            self.mode_set_by_driver.load(Ordering::Acquire) || self.blk.flush_requests() > 0;
        if !self.blk.is_read_only()
            && !mode_known
            && self.write_back.load(Ordering::Acquire)
            && !self.write_through_until_flush.swap(true, Ordering::AcqRel)
        {
            tracing::info!(
                "the guest ran before this backend started and its cache mode is not known \
                 here: every write is made durable before it completes until the guest's \
                 first FLUSH shows it uses the write cache"
            );
        }
        // Held from the notice's taking to `lost_writes_reported` set: a queue starting at the
        // same moment, whose own take finds the notice gone, must still see it reported.
        let mut reported = lock(&self.lost_writes_reported);
        if self.blk.image().take_unclean_shutdown_notice() {
            // The previous backend died with writes it had completed but not committed; the
            // guest still believes they are in the disk's cache. Its next FLUSH must fail
            // rather than declare them durable (I2); see docs/ARCHITECTURE.md.
            tracing::warn!(
                "the guest ran on a backend that did not shut down cleanly: writes it completed \
                 without a later flush are lost; failing the guest's next FLUSH to tell it"
            );
            self.blk.report_lost_writes();
            *reported = true;
        }
    }

    /// Until a FLUSH succeeds after the report (then the guest knows, and what it makes
    /// available later is covered by that FLUSH's success): a reconnection in between, before
    /// any FLUSH was served, still fails those it made available before.
    fn lost_writes_reported(&self) -> bool {
        *lock(&self.lost_writes_reported) && !self.blk.flushed_since_lost_writes()
    }

    fn wait_until_lockable(&self, keep_waiting: &dyn Fn() -> bool) {
        let LockPolicy::Wait(limit) = self.lock else {
            return;
        };
        let image = self.blk.image();
        if image.is_read_only() {
            return;
        }
        let deadline = std::time::Instant::now() + limit;
        let mut logged = false;
        while !image.writer_lock_available() {
            if !keep_waiting() || std::time::Instant::now() >= deadline {
                return;
            }
            if !logged {
                tracing::info!(
                    "waiting up to {limit:?} for the image's writer lock (held by another \
                     process, e.g. a migration source)"
                );
                logged = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn stats(&self) -> Stats {
        self.blk.image().stats()
    }

    fn close(self) -> Result<(), ImageError> {
        let image = Arc::clone(self.blk.image());
        drop(self.blk);
        match Arc::try_unwrap(image) {
            Ok(image) => image.close(),
            Err(image) => {
                // Someone still holds the image (cannot happen once every connection ended):
                // make everything durable at least.
                tracing::warn!("image still in use at close: committed, not checkpointed");
                image.quiesce()
            }
        }
    }
}
