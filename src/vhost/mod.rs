//! vhost-user glue: the `VhostUserBackend` implementation (one worker thread per queue), the
//! listener loop serving one connection after another, quiesce/resume and lock hand-over, the
//! dirty-page log for live migration, and statistics reporting.
//! The only module that uses the vhost and vhost-user-backend crates.
//!
//! Threads: the listener loop (`Daemon::serve`), per connection the crate's control thread
//! (vhost-user messages) and one worker per queue. Lifecycle and locking: see [`SharedDisk`].

mod backend;
mod daemon;
mod device;
mod disk;
mod stats;

pub use backend::{ConnectionBackend, Vring, MAX_QUEUES};
pub use daemon::{bind_listener, Daemon, DaemonConfig, DaemonError, SocketSource, StopHandle};
pub use device::{Chain, Device, GuestMemory, GuestMemoryHandle, SharedDisk};
pub use disk::BlkDisk;
pub use stats::StatsReporter;

#[cfg(test)]
mod tests;
