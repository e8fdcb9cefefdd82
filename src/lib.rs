//! insitu-blk: a vhost-user virtio-blk backend that stores guest data compressed, in place,
//! crash-consistently.
//!
//! Layers (who may import whom): `image` imports nothing of `blk`, `vhost`, `cli`, vm-memory or
//! the virtio crates; `blk` uses `image`'s public API plus virtio-queue/vm-memory; `vhost` is the
//! only user of vhost/vhost-user-backend. The command line (`src/cli`, anyhow allowed) belongs to
//! the binary, not the library.

pub mod blk;
pub mod image;
pub mod vhost;
