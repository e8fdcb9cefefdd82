//! Live statistics lines (SIGUSR1, `--stats-interval`).

use std::sync::Mutex;
use std::time::Instant;

use crate::image::Stats;

use super::device::lock;

/// Turns successive [`Stats`] samples into log lines with rates since the previous line.
#[derive(Debug)]
pub struct StatsReporter {
    name: String,
    previous: Mutex<(Instant, Stats)>,
}

impl StatsReporter {
    /// A reporter for the image called `name` (its path), starting from `initial`.
    pub fn new(name: String, initial: Stats) -> Self {
        Self {
            name,
            previous: Mutex::new((Instant::now(), initial)),
        }
    }

    /// Logs one line (info) about `now`, with request rates since the previous call.
    pub fn report(&self, now: Stats) {
        let line = self.line(now);
        tracing::info!("{line}");
    }

    /// Formats the line [`StatsReporter::report`] logs.
    pub fn line(&self, now: Stats) -> String {
        let mut previous = lock(&self.previous);
        let elapsed = previous.0.elapsed().as_secs_f64();
        let requests = |s: &Stats| s.reads + s.writes + s.flushes;
        let delta = requests(&now).saturating_sub(requests(&previous.1));
        let iops = if elapsed > 0.0 {
            delta as f64 / elapsed
        } else {
            0.0
        };
        let line = format!(
            "stats {}: {iops:.0} IOPS ({} reads, {} writes, {} flushes in total), ratio {:.2}, \
             stored {} of {} allocated bytes, {} commits, {} checkpoints, {} checksum errors, \
             {} uncommitted writes, {}",
            self.name,
            now.reads,
            now.writes,
            now.flushes,
            now.ratio(),
            now.stored_bytes,
            now.allocated_logical_bytes,
            now.commits,
            now.checkpoints,
            now.checksum_errors,
            now.uncommitted_writes,
            if now.quiesced { "quiesced" } else { "running" },
        );
        *previous = (Instant::now(), now);
        line
    }
}
