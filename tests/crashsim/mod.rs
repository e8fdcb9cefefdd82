//! Crash simulator shared by the crash-consistency and corruption tests (not a test by itself).
//!
//! - [`sim`]: a `Storage` with a durable layer and a volatile write cache; crashes keep a random
//!   subset of the unflushed operations, some torn at 512 B or 4 KiB.
//! - [`model`]: the oracle's bookkeeping (design.md §5, I2/I3), independent of the engine.
//! - [`workload`]: random workloads against the real engine, crash points, recovery and checks.
#![allow(dead_code)]

pub mod model;
pub mod sim;
pub mod workload;
