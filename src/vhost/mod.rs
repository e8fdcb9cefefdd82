//! vhost-user glue: the `VhostUserBackend` implementation (one worker thread per queue), the
//! listener loop serving one connection after another, quiesce/resume and lock hand-over, the
//! dirty-page log for live migration, and statistics reporting.
//! The only module that uses the vhost and vhost-user-backend crates.
//!
//! # Threads
//! The listener loop ([`Daemon::serve`]); per connection the crate's control thread (vhost-user
//! messages, reaching it through the control filter of `filter.rs`, which makes it refuse what it
//! would wrongly accept) and one worker per queue ([`ConnectionBackend`]). A worker pops a request,
//! executes it through [`Device::process_chain`] without holding its ring's lock and completes
//! it; the guest is notified (EVENT_IDX aware) after every 8 completions, at the latest 1 ms after
//! a completion, and whenever the ring runs empty, at most 128 requests per event before the
//! worker yields to its event loop. When the ring is empty the worker polls it for an adaptive
//! window (`serve --poll-max-us`, default 128 µs) with the driver's notifications off, then
//! re-enables them and looks once more before it sleeps.
//! No lock is shared by the queues on the data path: each worker holds only its own gate
//! ([`SharedDisk`]). A queue's requests complete strictly in the order the driver made them
//! available (one request at a time per queue), which is why VIRTIO_F_IN_ORDER is offered: with
//! it negotiated, cloud-hypervisor restarts a ring at the guest's used index after a backend
//! restart, so the requests the dead backend had not completed are served again. Guests without
//! IN_ORDER are served by inflight I/O tracking (INFLIGHT_SHMFD, `inflight.rs`): each worker
//! records the request it executes in a buffer the frontend keeps, and a restarted backend
//! executes the recorded ones again before it takes new ones.
//!
//! # Device lifecycle (I7, I8)
//! | frontend does | backend does |
//! |---|---|
//! | connects, GET_FEATURES, GET_CONFIG ... | answers from the superblock; the image is open *quiesced*: no lock, no table |
//! | starts a ring (SET_VRING_KICK + SET_VRING_ENABLE 1) | first started ring: `resume` (takes the writer lock, waiting up to `--wait-lock`; reloads metadata another process committed) |
//! | GET_VRING_BASE (QEMU `stop`, migration, `quit`) | waits for that ring's requests in progress (every queue's worker gives its gate back after its current request); when no started ring is left: `quiesce` (commit, park writer, mark the image clean, release lock) *before* the reply |
//! | starts rings again (QEMU `cont`) | `resume` again |
//! | SET_VRING_ENABLE 0 on every started ring, no GET_VRING_BASE (cloud-hypervisor pause) | before the crate answers (control filter): the ring takes no new request and its request in progress completes; the connection's pause detector, polling the rings' enabled state every 200 ms, then quiesces once every started ring is disabled |
//! | SET_VRING_ENABLE 1 again (cloud-hypervisor resume) | the ring's worker runs and resumes the engine |
//! | disconnects | workers take no new request and add nothing more to a used ring (the request in progress is left for the frontend to resubmit: QEMU restarts each ring at the used index it reads at the disconnect); `quiesce`; the next connection is accepted |
//! | (SIGTERM/SIGINT) | workers take no new request; the requests in progress complete; only then is the connection closed (the frontend sees every completion before the end, none after); quiesces, closes the image (commit + checkpoint), exit 0 |
//!
//! A failed resume (lock held elsewhere, corrupt metadata) is logged; the guest's requests then
//! fail with IOERR, and the resume is retried at most once a second while requests arrive.
//!
//! Migration hand-over: the destination daemon listens and answers GET_CONFIG at once; the source
//! quiesces (releasing the lock) when its QEMU stops the rings at the end of migration; the
//! destination's `resume`, started with `--wait-lock`, then takes the lock and loads the metadata
//! the source committed. The source's quiesce ended the journal with a clean-close marker, so the
//! destination does not take the hand-over for a crash (no lost-write notice to the guest). Dirty pages: guest memory is `GuestMemoryMmap<BitmapMmapRegion>`, so
//! every guest write through vm-memory (data, status, used ring) is marked in the frontend's log
//! (LOG_SHMFD + VHOST_F_LOG_ALL).

mod backend;
mod daemon;
mod device;
mod disk;
mod filter;
mod inflight;
mod stats;
mod vring;

pub use backend::{ConnectionBackend, PollStats, MAX_QUEUES};
pub use daemon::{bind_listener, Daemon, DaemonConfig, DaemonError, SocketSource, StopHandle};
pub use device::{Chain, Device, GuestMemory, GuestMemoryHandle, SharedDisk};
pub use disk::BlkDisk;
pub use stats::StatsReporter;
pub use vring::Vring;

#[cfg(test)]
mod tests;
