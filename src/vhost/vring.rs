//! The ring type served: the crate's `VringMutex` (each ring behind its own mutex, taken only by
//! its worker and the control thread) plus what the crate does not do: refuse invalid sizes
//! (below), signal a new call fd once ([`Vring::set_call`]) and watch a new kick fd given to a
//! started ring ([`Vring::set_kick`]).
//!
//! SET_VRING_NUM with a size that is not a power of two passes vhost-user-backend 0.24's range
//! check, and virtio-queue's `set_size` then only logs and keeps the previous size: frontend and
//! backend would disagree on the ring layout. The daemon's control filter (`filter.rs`) makes the
//! crate refuse such a message; should one still reach a ring (a backend served without the
//! filter), this wrapper remembers the refused size, refuses the ring's SET_VRING_ADDR, and keeps
//! the ring from being served until a valid size is set.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vhost_user_backend::{VringMutex, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as QueueError, QueueT};

use super::device::GuestMemoryHandle;

/// No refused size pending (sizes are u16, so this value is never a size).
const SIZE_OK: u32 = u32::MAX;

/// A ring: `VringMutex` plus the refusal of invalid sizes.
#[derive(Clone)]
pub struct Vring {
    inner: VringMutex<GuestMemoryHandle>,
    refused_size: Arc<AtomicU32>,
}

impl Vring {
    /// The size the frontend set last if it was refused (not a power of two).
    pub fn refused_size(&self) -> Option<u16> {
        u16::try_from(self.refused_size.load(Ordering::Acquire)).ok()
    }
}

impl<'a> VringStateGuard<'a, GuestMemoryHandle> for Vring {
    type G = <VringMutex<GuestMemoryHandle> as VringStateGuard<'a, GuestMemoryHandle>>::G;
}

impl<'a> VringStateMutGuard<'a, GuestMemoryHandle> for Vring {
    type G = <VringMutex<GuestMemoryHandle> as VringStateMutGuard<'a, GuestMemoryHandle>>::G;
}

impl VringT<GuestMemoryHandle> for Vring {
    fn new(mem: GuestMemoryHandle, max_queue_size: u16) -> Result<Self, QueueError> {
        Ok(Self {
            inner: VringMutex::new(mem, max_queue_size)?,
            refused_size: Arc::new(AtomicU32::new(SIZE_OK)),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, GuestMemoryHandle>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, GuestMemoryHandle>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), QueueError> {
        if let Some(size) = self.refused_size() {
            tracing::warn!("refusing ring addresses: the ring's size {size} is not a power of two");
            return Err(QueueError::InvalidSize);
        }
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        // The crate has already checked 0 < num <= the maximum.
        if num.is_power_of_two() {
            self.refused_size.store(SIZE_OK, Ordering::Release);
            self.inner.set_queue_size(num);
        } else {
            tracing::warn!("frontend set a ring size of {num}, not a power of two: ring refused");
            self.refused_size.store(u32::from(num), Ordering::Release);
        }
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    /// SET_VRING_KICK. vhost-user-backend 0.24 watches a ring's kick fd only from the moment the
    /// ring starts (its `set_vring_kick` registers the fd with the worker's epoll only when the
    /// ring is not started yet), so a new kick fd given to a started ring would replace the
    /// watched one (closing it drops it from the epoll set) and never be watched itself: the
    /// ring would be deaf to the driver until stopped. vhost-user.rst puts no "stopped rings
    /// only" condition on the message. Marking the ring not started before installing the fd
    /// makes the crate, which checks that right after this call, start it again with the new
    /// fd: it registers the fd (if the ring is enabled) and runs the worker once, so requests
    /// kicked on the old fd meanwhile are served too. The worker, seeing the ring not started
    /// for that instant, ends its current pass after the request in progress.
    fn set_kick(&self, file: Option<File>) {
        if file.is_some() && self.inner.get_ref().get_queue().ready() {
            tracing::debug!("new kick fd for a started ring: restarting the ring with it");
            self.inner.set_queue_ready(false);
        }
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    /// SET_VRING_CALL. A new call fd is signalled once at once: the worker may have completed
    /// requests while the ring had no call fd (a frontend that starts a ring with
    /// SET_VRING_KICK before SET_VRING_CALL: vhost-user.rst mandates no order), and those
    /// notifications went nowhere; the driver would wait for them forever. A spurious used
    /// buffer notification is harmless (virtio 1.2 2.7.7.1: the driver MUST handle spurious
    /// notifications); libvhost-user signals a new call fd for the same reason.
    fn set_call(&self, file: Option<File>) {
        let installed = file.is_some();
        self.inner.set_call(file);
        if installed {
            if let Err(e) = self.inner.signal_used_queue() {
                tracing::warn!("cannot signal the ring's new call fd: {e}");
            }
        }
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}
