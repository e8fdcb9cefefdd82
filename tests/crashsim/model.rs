//! Oracle bookkeeping (design.md §5, invariants I2 and I3), independent of the engine.
//!
//! Every request gets two stamps from one shared clock: `start` (taken before the engine is called)
//! and `end` (taken after it returned). A crash point carries the clock value `T` read under the
//! storage lock, so: a request with `end < T` had completed at the crash; one with `start < T` may
//! have reached the storage; one with `start >= T` had not started.
//!
//! For each cluster the model keeps every version the workload produced (the whole cluster content
//! after the request). After a crash, cluster `c` must read as exactly one *allowed* version:
//! - the flushed one(s): let `G` be the `start` of the latest FLUSH that completed before `T`
//!   (I2: it covers every write that completed before it was submitted). A version ending before
//!   `G` is required unless a later version of the same cluster both started after it ended and
//!   ended before `G` (then that one supersedes it). Before any flush, the initial content counts
//!   as flushed (it is durable: the image was created, or recovered, before the clock started).
//! - any version whose request ended at or after `G` and started before `T`.
//!
//! Whole-cluster equality is I3 (never a mix of versions, never garbage); per 4 KiB block this
//! implies the §5 oracle (each block equals its flushed value or one written after it).

use std::fmt::Write as _;
use std::sync::Arc;

/// One version of one cluster.
#[derive(Clone, Debug)]
pub struct Version {
    /// Clock before the request that produced it was issued (0 for the initial content).
    pub start: u64,
    /// Clock after that request returned (0 for the initial content).
    pub end: u64,
    /// Index of the request in the history (`usize::MAX` for the initial content).
    pub op: usize,
    /// Whole cluster content.
    pub data: Arc<[u8]>,
}

impl Version {
    fn label(&self) -> String {
        if self.op == usize::MAX {
            "initial".into()
        } else {
            format!("op#{}", self.op)
        }
    }
}

/// A request as it happened, for failure reports.
#[derive(Clone, Debug)]
pub struct OpRecord {
    /// Issuing thread.
    pub thread: usize,
    /// Clock before the call.
    pub start: u64,
    /// Clock after the call returned.
    pub end: u64,
    /// What it was.
    pub desc: String,
}

/// The oracle's knowledge of one workload round.
#[derive(Clone, Debug)]
pub struct Model {
    /// Cluster size in bytes.
    pub cluster_size: usize,
    /// Versions per cluster, in the order they were recorded.
    pub clusters: Vec<Vec<Version>>,
    /// (start, end) of every completed flush.
    pub flushes: Vec<(u64, u64)>,
    /// Every request, in the order recorded.
    pub history: Vec<OpRecord>,
}

/// Result of comparing one cluster with its allowed versions.
#[derive(Debug)]
pub enum Verdict {
    /// It equals this allowed version.
    Matches(usize),
    /// It matches no allowed version: explanation.
    Violation(String),
}

impl Model {
    /// A model whose initial content per cluster is `initial` (e.g. zeros for a new image, or the
    /// contents read back after recovery).
    pub fn new(cluster_size: usize, initial: Vec<Arc<[u8]>>) -> Self {
        let clusters = initial
            .into_iter()
            .map(|data| {
                assert_eq!(data.len(), cluster_size);
                vec![Version {
                    start: 0,
                    end: 0,
                    op: usize::MAX,
                    data,
                }]
            })
            .collect();
        Model {
            cluster_size,
            clusters,
            flushes: Vec::new(),
            history: Vec::new(),
        }
    }

    /// A model of a fresh (all-zero) disk of `clusters` clusters.
    pub fn zeroed(cluster_size: usize, clusters: usize) -> Self {
        let zero: Arc<[u8]> = Arc::from(vec![0u8; cluster_size]);
        Self::new(cluster_size, vec![zero; clusters])
    }

    /// The newest recorded version of a cluster (for single-owner clusters: the current content).
    pub fn latest(&self, cluster: usize) -> &Arc<[u8]> {
        &self.clusters[cluster].last().expect("initial version").data
    }

    /// Records a completed request; returns its index.
    pub fn record_op(&mut self, thread: usize, start: u64, end: u64, desc: String) -> usize {
        self.history.push(OpRecord {
            thread,
            start,
            end,
            desc,
        });
        self.history.len() - 1
    }

    /// Records the version of `cluster` that request `op` produced.
    pub fn record_version(&mut self, cluster: usize, op: usize, data: Arc<[u8]>) {
        let rec = &self.history[op];
        let version = Version {
            start: rec.start,
            end: rec.end,
            op,
            data,
        };
        self.clusters[cluster].push(version);
    }

    /// Records a completed flush.
    pub fn record_flush(&mut self, start: u64, end: u64) {
        self.flushes.push((start, end));
    }

    /// Start of the latest flush completed before `t` (1 = "the initial state" when none).
    pub fn guarantee(&self, t: u64) -> u64 {
        self.flushes
            .iter()
            .filter(|&&(_, end)| end < t)
            .map(|&(start, _)| start)
            .max()
            .unwrap_or(1)
    }

    /// Indices (into `clusters[cluster]`) of the versions a crash at clock `t` may leave.
    pub fn allowed(&self, cluster: usize, t: u64) -> Vec<usize> {
        let g = self.guarantee(t);
        let versions = &self.clusters[cluster];
        // A version that ended before G is required unless superseded: some other version
        // started after it ended and also ended before G, i.e. its end is below the latest start
        // among the versions that ended before G.
        let latest_start_done = versions
            .iter()
            .filter(|w| w.end < g)
            .map(|w| w.start)
            .max()
            .unwrap_or(0);
        versions
            .iter()
            .enumerate()
            .filter(|(_, v)| {
                if v.end < g {
                    v.end >= latest_start_done
                } else {
                    v.start < t
                }
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Compares what a cluster reads as after a crash at clock `t` with the allowed versions.
    pub fn judge(&self, cluster: usize, t: u64, content: &[u8]) -> Verdict {
        let allowed = self.allowed(cluster, t);
        if let Some(&i) = allowed
            .iter()
            .find(|&&i| &*self.clusters[cluster][i].data == content)
        {
            return Verdict::Matches(i);
        }
        Verdict::Violation(self.explain(cluster, t, content, &allowed))
    }

    /// Per 4 KiB block: which versions (allowed or not) the read content matches.
    fn explain(&self, cluster: usize, t: u64, content: &[u8], allowed: &[usize]) -> String {
        let versions = &self.clusters[cluster];
        let mut out = String::new();
        let _ = writeln!(
            out,
            "cluster {cluster} matches none of its allowed versions at clock {t} (flush guarantee \
             from clock {}); allowed: [{}]; all versions: [{}]",
            self.guarantee(t),
            allowed
                .iter()
                .map(|&i| versions[i].label())
                .collect::<Vec<_>>()
                .join(", "),
            versions
                .iter()
                .map(|v| format!("{} (clock {}..{})", v.label(), v.start, v.end))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (b, block) in content.chunks(4096).enumerate() {
            let range = b * 4096..b * 4096 + block.len();
            let matching: Vec<String> = versions
                .iter()
                .enumerate()
                .filter(|(_, v)| &v.data[range.clone()] == block)
                .map(|(i, v)| {
                    let tag = if allowed.contains(&i) {
                        ""
                    } else {
                        " (NOT allowed)"
                    };
                    format!("{}{tag}", v.label())
                })
                .collect();
            let what = if matching.is_empty() {
                let zeros = block.iter().all(|&x| x == 0);
                format!(
                    "GARBAGE (matches no version{})",
                    if zeros { ", all zeros" } else { "" }
                )
            } else {
                matching.join(", ")
            };
            let _ = writeln!(out, "  block {b}: {what}");
        }
        out
    }

    /// The request history as text (the last `max` requests), for failure reports.
    pub fn history_text(&self, max: usize) -> String {
        let mut out = String::new();
        let skip = self.history.len().saturating_sub(max);
        if skip > 0 {
            let _ = writeln!(out, "  ... {skip} earlier requests omitted");
        }
        for (i, rec) in self.history.iter().enumerate().skip(skip) {
            let _ = writeln!(
                out,
                "  op#{i} [thread {} clock {}..{}] {}",
                rec.thread, rec.start, rec.end, rec.desc
            );
        }
        out
    }
}
