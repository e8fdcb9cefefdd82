//! Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking", protocol feature
//! INFLIGHT_SHMFD): a buffer the backend creates (GET_INFLIGHT_FD), the frontend keeps and
//! hands back to every backend it connects to (SET_INFLIGHT_FD), in which each queue records
//! the requests it took from its ring and has not completed. A backend started after a crash
//! finds there the requests the dead one had taken: it executes them again, in the order they
//! were taken, before it takes new ones.
//!
//! Why it matters here: cloud-hypervisor restarts a ring after a backend restart at the guest's
//! *available* index unless VIRTIO_F_IN_ORDER was negotiated (most guest kernels do not accept
//! it) and leaves the requests it skipped to the inflight buffer. Without tracking, the guest
//! waits for them forever.
//!
//! # Layout (split virtqueues; little-endian, the spec's structures)
//! The buffer holds `num_queues` queue regions, each [`queue_region_size`] bytes (rounded up to
//! [`REGION_ALIGNMENT`] so two queues' workers never write the same cache line):
//!
//! | offset | field | |
//! |---|---|---|
//! | 0 | `features: u64` | 0 |
//! | 8 | `version: u16` | 1; 0 = never used (a fresh buffer) |
//! | 10 | `desc_num: u16` | the queue size of the buffer |
//! | 12 | `last_batch_head: u16` | head of the list of the last completions |
//! | 14 | `used_idx: u16` | the used ring's index after the last completion fully recorded |
//! | 16 + 16·i | `desc[i]` | `inflight: u8` at +0, padding, `next: u16` at +6, `counter: u64` at +8 |
//!
//! # Algorithm (the spec's, for one request at a time per queue)
//! Taking head `i` from the ring: `desc[i].counter` ← the queue's counter (then incremented),
//! `desc[i].inflight` ← 1, before the request is executed. Completing it: `desc[i].next` ←
//! `last_batch_head`, `last_batch_head` ← `i`, then the used ring entry and index are written,
//! then `desc[i].inflight` ← 0 and `used_idx` ← the used ring's index. A crash between the used
//! index and the clearing leaves `used_idx` behind the ring's: the next backend clears the
//! entries of that last batch ([`QueueInflight::start`]).
//!
//! # Hostile frontends (I5)
//! The sizes a frontend asks for are bounded by the queues and queue size served; a buffer
//! handed back is mapped only if it is a regular file sealed against shrinking (the backend's
//! own buffers are: see [`create_buffer`]) and the whole range fits in it, so no later access
//! can fault (SIGBUS). Every value read from the buffer is untrusted: indexes are checked
//! against the ring, walks are bounded by the queue size.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

/// Bytes of the `VhostUserInflight` payload of GET/SET_INFLIGHT_FD (`mmap_size: u64`,
/// `mmap_offset: u64`, `num_queues: u16`, `queue_size: u16`, padding to 8 bytes).
pub(crate) const DESCRIPTION_SIZE: usize = 24;
/// Each queue region starts at a multiple of this (a cache line).
pub(crate) const REGION_ALIGNMENT: usize = 64;
/// Bytes of a queue region's header.
const REGION_HEADER_SIZE: usize = 16;
/// Bytes of one `DescStateSplit`.
const DESC_STATE_SIZE: usize = 16;
/// The layout version written and understood.
const VERSION: u16 = 1;

const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
const DESC_INFLIGHT_AT: usize = 0;
const DESC_NEXT_AT: usize = 6;
const DESC_COUNTER_AT: usize = 8;

/// Why an inflight buffer is refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// A queue count of 0 or more than the backend serves.
    #[error("{asked} queues asked for; 1 to {served} are served")]
    QueueCount {
        /// Queues in the message.
        asked: u16,
        /// Queues the backend serves.
        served: usize,
    },
    /// A queue size that is not a power of two or larger than the largest one served.
    #[error("queue size {asked} is not a power of two, or is larger than the {max} served (--queue-size)")]
    QueueSize {
        /// Size in the message.
        asked: u16,
        /// Largest queue size served.
        max: usize,
    },
    /// SET_INFLIGHT_FD's size is not the one the backend gives for its queue count and size.
    #[error(
        "buffer of {asked} bytes for {num_queues} queues of {queue_size}: {expected} expected"
    )]
    BufferSize {
        /// Size in the message.
        asked: u64,
        /// Size of the layout.
        expected: usize,
        /// Queues in the message.
        num_queues: u16,
        /// Queue size in the message.
        queue_size: u16,
    },
    /// The fd is not a regular file, or the range does not fit in it.
    #[error("the buffer's file ({file}) does not hold {size} bytes at offset {offset}")]
    DoesNotFit {
        /// What the file is (size or kind).
        file: String,
        /// Size in the message.
        size: u64,
        /// Offset in the message.
        offset: u64,
    },
    /// The file may shrink under the mapping (a later access would kill the backend).
    #[error("the buffer's file is not sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
    /// The system refused to create, seal or map the buffer.
    #[error("{what}: {source}")]
    System {
        /// What was being done.
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The ring is larger than the buffer's queue size (its heads could not be recorded).
    #[error("ring of {ring_size} entries, buffer for {desc_num}")]
    RingTooLarge {
        /// The ring's size.
        ring_size: u16,
        /// Entries of the queue region.
        desc_num: u16,
    },
    /// A queue region with a layout version this backend does not know.
    #[error("queue region has layout version {0}, only {VERSION} is known")]
    UnknownVersion(u16),
    /// An access to the mapping failed (cannot happen for checked indexes).
    #[error("access to the inflight buffer failed: {0}")]
    Access(String),
}

/// What the queues served allow a frontend to ask for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InflightLimits {
    /// Queues served.
    pub max_queues: usize,
    /// Largest ring size served.
    pub max_queue_size: usize,
}

/// The payload of GET/SET_INFLIGHT_FD (`VhostUserInflight`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InflightDescription {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl InflightDescription {
    /// Parses a payload of exactly [`DESCRIPTION_SIZE`] bytes.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        if payload.len() != DESCRIPTION_SIZE {
            return None;
        }
        Some(Self {
            mmap_size: u64::from_le_bytes(payload[0..8].try_into().ok()?),
            mmap_offset: u64::from_le_bytes(payload[8..16].try_into().ok()?),
            num_queues: u16::from_le_bytes(payload[16..18].try_into().ok()?),
            queue_size: u16::from_le_bytes(payload[18..20].try_into().ok()?),
        })
    }

    /// The payload bytes.
    pub fn encode(&self) -> [u8; DESCRIPTION_SIZE] {
        let mut out = [0u8; DESCRIPTION_SIZE];
        out[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        out[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        out[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        out[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        out
    }

    /// The buffer size for this queue count and size, if both are within `limits`.
    fn buffer_size(&self, limits: InflightLimits) -> Result<usize, InflightError> {
        let num_queues = usize::from(self.num_queues);
        if num_queues == 0 || num_queues > limits.max_queues {
            return Err(InflightError::QueueCount {
                asked: self.num_queues,
                served: limits.max_queues,
            });
        }
        if !self.queue_size.is_power_of_two()
            || usize::from(self.queue_size) > limits.max_queue_size
        {
            return Err(InflightError::QueueSize {
                asked: self.queue_size,
                max: limits.max_queue_size,
            });
        }
        // At most 64 queues × (16 + 16 × 32768) bytes: no overflow.
        Ok(num_queues * queue_region_size(self.queue_size))
    }
}

/// Bytes of one queue's region for rings of `queue_size` entries, rounded up to
/// [`REGION_ALIGNMENT`].
pub(crate) fn queue_region_size(queue_size: u16) -> usize {
    let raw = REGION_HEADER_SIZE + DESC_STATE_SIZE * usize::from(queue_size);
    raw.div_ceil(REGION_ALIGNMENT) * REGION_ALIGNMENT
}

/// GET_INFLIGHT_FD: a zeroed buffer for `request.num_queues` queues of `request.queue_size`
/// (both bounded by `limits`), in a memfd sealed against shrinking and growing so that a mapping
/// of it can never fault. Returns the reply's description and the fd.
pub(crate) fn create_buffer(
    request: &InflightDescription,
    limits: InflightLimits,
) -> Result<(InflightDescription, File), InflightError> {
    let size = request.buffer_size(limits)?;
    // SAFETY: the name is a valid NUL-terminated C string; the result is checked below.
    let fd = unsafe {
        libc::memfd_create(
            c"insitu-blk-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(InflightError::System {
            what: "memfd_create",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else; the File takes ownership once.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)
        .map_err(|source| InflightError::System {
            what: "sizing the inflight buffer",
            source,
        })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own, with an int argument; the result is checked.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(InflightError::System {
            what: "sealing the inflight buffer",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok((
        InflightDescription {
            mmap_size: size as u64,
            mmap_offset: 0,
            num_queues: request.num_queues,
            queue_size: request.queue_size,
        },
        file,
    ))
}

/// A buffer handed over with SET_INFLIGHT_FD, mapped.
pub(crate) struct InflightBuffer {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightBuffer")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightBuffer {
    /// SET_INFLIGHT_FD: maps `file` as described, after checking that the description is one
    /// [`create_buffer`] gives for `limits` and that the range is in the file and stays there.
    pub fn map(
        description: &InflightDescription,
        file: File,
        limits: InflightLimits,
    ) -> Result<Self, InflightError> {
        let expected = description.buffer_size(limits)?;
        if description.mmap_size != expected as u64 {
            return Err(InflightError::BufferSize {
                asked: description.mmap_size,
                expected,
                num_queues: description.num_queues,
                queue_size: description.queue_size,
            });
        }
        let does_not_fit = |file: String| InflightError::DoesNotFit {
            file,
            size: description.mmap_size,
            offset: description.mmap_offset,
        };
        let kind = file.metadata().map_err(|source| InflightError::System {
            what: "looking at the inflight buffer's file",
            source,
        })?;
        if !kind.file_type().is_file() {
            return Err(does_not_fit("not a regular file".into()));
        }
        // The seal first, the size after: once the file cannot shrink, the size seen is a floor
        // for as long as the mapping lives. In the other order the frontend, which holds the
        // same file, could shrink it between the two looks and seal it then, and the first
        // access past its new end would kill the process (SIGBUS).
        // SAFETY: F_GET_SEALS on a descriptor we own, no argument; the result is checked.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let metadata = file.metadata().map_err(|source| InflightError::System {
            what: "looking at the inflight buffer's file",
            source,
        })?;
        let fits = description
            .mmap_offset
            .checked_add(description.mmap_size)
            .is_some_and(|end| end <= metadata.len());
        if !fits {
            return Err(does_not_fit(format!("{} bytes", metadata.len())));
        }
        let map =
            MmapRegion::<()>::from_file(FileOffset::new(file, description.mmap_offset), expected)
                .map_err(|e| InflightError::System {
                what: "mapping the inflight buffer",
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(Self {
            map,
            num_queues: description.num_queues,
            queue_size: description.queue_size,
        })
    }

    /// The tracker of queue `queue`, if the buffer has a region for it.
    pub fn queue(self: &Arc<Self>, queue: usize) -> Option<QueueInflight> {
        if queue >= usize::from(self.num_queues) {
            return None;
        }
        Some(QueueInflight {
            buffer: Arc::clone(self),
            base: queue * queue_region_size(self.queue_size),
            desc_num: self.queue_size,
            counter: 0,
            ring_size: 0,
        })
    }
}

/// What a ring start found in its queue region.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Heads the previous backend took and never completed, oldest first: to execute again
    /// before anything else.
    pub resubmit: Vec<u16>,
    /// Where the ring's next request is: the used index plus the requests to resubmit (every
    /// request taken is either completed or in `resubmit`). `None` for a fresh buffer (the
    /// frontend's SET_VRING_BASE stands).
    pub next_avail: Option<u16>,
    /// Entries that named a head outside the ring (cleared, not executed).
    pub discarded: usize,
}

/// One queue's region of an [`InflightBuffer`], used by that queue's worker only.
pub(crate) struct QueueInflight {
    buffer: Arc<InflightBuffer>,
    base: usize,
    desc_num: u16,
    counter: u64,
    /// The ring's size, set by [`QueueInflight::start`]: heads are below it.
    ring_size: u16,
}

impl std::fmt::Debug for QueueInflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueInflight")
            .field("base", &self.base)
            .field("desc_num", &self.desc_num)
            .field("counter", &self.counter)
            .finish()
    }
}

impl QueueInflight {
    fn store<T: vm_memory::AtomicAccess>(&self, at: usize, value: T) -> Result<(), InflightError> {
        self.buffer
            .map
            .as_volatile_slice()
            .store(value, self.base + at, Ordering::Release)
            .map_err(|e| InflightError::Access(e.to_string()))
    }

    fn load<T: vm_memory::AtomicAccess>(&self, at: usize) -> Result<T, InflightError> {
        self.buffer
            .map
            .as_volatile_slice()
            .load(self.base + at, Ordering::Acquire)
            .map_err(|e| InflightError::Access(e.to_string()))
    }

    fn desc_at(head: u16, field: usize) -> usize {
        REGION_HEADER_SIZE + usize::from(head) * DESC_STATE_SIZE + field
    }

    /// The ring (of `ring_size` entries, whose used index in guest memory is `used_idx`)
    /// starts: a fresh region is initialised; otherwise the last batch of completions a
    /// crash left half-recorded is cleared, and the heads still in flight are returned in the
    /// order they were taken, with the index the ring goes on from.
    pub fn start(&mut self, used_idx: u16, ring_size: u16) -> Result<Recovery, InflightError> {
        if ring_size > self.desc_num {
            return Err(InflightError::RingTooLarge {
                ring_size,
                desc_num: self.desc_num,
            });
        }
        self.ring_size = ring_size;
        if self.initialise_if_fresh(used_idx)? {
            return Ok(Recovery {
                resubmit: Vec::new(),
                next_avail: None,
                discarded: 0,
            });
        }
        let version: u16 = self.load(VERSION_AT)?;
        if version != VERSION {
            return Err(InflightError::UnknownVersion(version));
        }
        let recorded_used: u16 = self.load(USED_IDX_AT)?;
        if recorded_used != used_idx {
            // Completions published in the used ring whose entries were not cleared yet: the
            // list from last_batch_head, as long as the batch (bounded by the region).
            let batch = used_idx.wrapping_sub(recorded_used).min(self.desc_num);
            let mut head: u16 = self.load(LAST_BATCH_HEAD_AT)?;
            for _ in 0..batch {
                if head >= self.desc_num {
                    break;
                }
                self.store(Self::desc_at(head, DESC_INFLIGHT_AT), 0u8)?;
                head = self.load(Self::desc_at(head, DESC_NEXT_AT))?;
            }
            self.store(USED_IDX_AT, used_idx)?;
        }
        let mut inflight = Vec::new();
        let mut discarded = 0;
        for head in 0..self.desc_num {
            let flag: u8 = self.load(Self::desc_at(head, DESC_INFLIGHT_AT))?;
            if flag == 0 {
                continue;
            }
            if head >= ring_size {
                self.store(Self::desc_at(head, DESC_INFLIGHT_AT), 0u8)?;
                discarded += 1;
                continue;
            }
            let counter: u64 = self.load(Self::desc_at(head, DESC_COUNTER_AT))?;
            inflight.push((counter, head));
        }
        inflight.sort_unstable();
        self.counter = inflight
            .last()
            .map_or(0, |(counter, _)| counter.wrapping_add(1));
        // At most ring_size heads (each below it, each once): fits a u16.
        let count = u16::try_from(inflight.len()).unwrap_or(u16::MAX);
        Ok(Recovery {
            resubmit: inflight.into_iter().map(|(_, head)| head).collect(),
            next_avail: Some(used_idx.wrapping_add(count)),
            discarded,
        })
    }

    /// A region the frontend has just created (version 0: not in use yet) starts recording
    /// now, at the ring's current used index, with no request in flight; returns whether it was
    /// fresh. Called as soon as the ring starts, before the worker may wait for the image
    /// (writer lock, resume): a backend killed during that wait then leaves a region that says
    /// "nothing taken from `used_idx` on", so its successor continues there whatever index the
    /// frontend restores (cloud-hypervisor restores its available index, past requests nobody
    /// took). Every entry is cleared too: version 0 means "uninitialised", whatever `desc[]`
    /// holds (a recycled buffer, or one whose tracking was abandoned).
    pub fn initialise_if_fresh(&mut self, used_idx: u16) -> Result<bool, InflightError> {
        let version: u16 = self.load(VERSION_AT)?;
        if version != 0 {
            return Ok(false);
        }
        for head in 0..self.desc_num {
            self.store(Self::desc_at(head, DESC_INFLIGHT_AT), 0u8)?;
        }
        self.store(0, 0u64)?;
        self.store(DESC_NUM_AT, self.desc_num)?;
        self.store(LAST_BATCH_HEAD_AT, 0u16)?;
        self.store(USED_IDX_AT, used_idx)?;
        self.store(VERSION_AT, VERSION)?;
        self.counter = 0;
        Ok(true)
    }

    /// Head `head` was taken from the ring and is about to be executed. A head outside the ring
    /// (a broken driver's: its request fails) is not recorded.
    pub fn taken(&mut self, head: u16) -> Result<(), InflightError> {
        if head >= self.ring_size {
            return Ok(());
        }
        self.store(Self::desc_at(head, DESC_COUNTER_AT), self.counter)?;
        self.counter = self.counter.wrapping_add(1);
        self.store(Self::desc_at(head, DESC_INFLIGHT_AT), 1u8)
    }

    /// Head `head` is about to be added to the used ring (a batch of one).
    pub fn completing(&mut self, head: u16) -> Result<(), InflightError> {
        if head >= self.ring_size {
            return Ok(());
        }
        let last: u16 = self.load(LAST_BATCH_HEAD_AT)?;
        self.store(Self::desc_at(head, DESC_NEXT_AT), last)?;
        self.store(LAST_BATCH_HEAD_AT, head)
    }

    /// Head `head` was added to the used ring, whose index is now `used_idx`.
    pub fn completed(&mut self, head: u16, used_idx: u16) -> Result<(), InflightError> {
        if head < self.ring_size {
            self.store(Self::desc_at(head, DESC_INFLIGHT_AT), 0u8)?;
        }
        self.store(USED_IDX_AT, used_idx)
    }

    /// Tracking of this queue stops (an access failed): the region is marked unused, so that a
    /// later backend starts it afresh rather than executing what it may half record.
    pub fn abandon(&mut self) {
        let _ = self.store(VERSION_AT, 0u16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: InflightLimits = InflightLimits {
        max_queues: 4,
        max_queue_size: 256,
    };

    fn request(num_queues: u16, queue_size: u16) -> InflightDescription {
        InflightDescription {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        }
    }

    fn buffer(num_queues: u16, queue_size: u16) -> (InflightDescription, File) {
        create_buffer(&request(num_queues, queue_size), LIMITS).expect("create")
    }

    fn mapped(description: &InflightDescription, file: &File) -> Arc<InflightBuffer> {
        Arc::new(InflightBuffer::map(description, file.try_clone().unwrap(), LIMITS).expect("map"))
    }

    #[test]
    fn descriptions_round_trip_and_other_sizes_are_not_parsed() {
        let d = InflightDescription {
            mmap_size: 0x1234_5678_9abc,
            mmap_offset: 4096,
            num_queues: 3,
            queue_size: 128,
        };
        assert_eq!(InflightDescription::parse(&d.encode()), Some(d));
        assert_eq!(InflightDescription::parse(&[0u8; 20]), None);
        assert_eq!(InflightDescription::parse(&[0u8; 32]), None);
    }

    #[test]
    fn buffers_have_the_spec_layout_size_and_absurd_requests_are_refused() {
        // 16 + 16 × 128 = 2064, rounded up to 2112 (64-byte aligned regions).
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(1), 64);
        let (reply, file) = buffer(2, 128);
        assert_eq!(reply.mmap_size, 2 * 2112);
        assert_eq!(reply.mmap_offset, 0);
        assert_eq!((reply.num_queues, reply.queue_size), (2, 128));
        assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
        // Sealed: cannot shrink (a mapping of it never faults).
        assert!(file.set_len(10).is_err());
        for (q, size) in [
            (0, 128),
            (5, 128),
            (u16::MAX, 128),
            (1, 0),
            (1, 100),
            (1, 512),
        ] {
            assert!(
                create_buffer(&request(q, size), LIMITS).is_err(),
                "{q} queues of {size}"
            );
        }
    }

    #[test]
    fn set_refuses_what_does_not_fit_or_is_not_sealed() {
        let (reply, file) = buffer(2, 128);
        let refuse = |d: InflightDescription, f: &File| {
            InflightBuffer::map(&d, f.try_clone().unwrap(), LIMITS).expect_err("refused")
        };
        // Size not the layout's, queue count or size changed.
        assert!(matches!(
            refuse(
                InflightDescription {
                    mmap_size: reply.mmap_size + 64,
                    ..reply
                },
                &file
            ),
            InflightError::BufferSize { .. }
        ));
        assert!(matches!(
            refuse(
                InflightDescription {
                    num_queues: 9,
                    ..reply
                },
                &file
            ),
            InflightError::QueueCount { .. }
        ));
        assert!(matches!(
            refuse(
                InflightDescription {
                    num_queues: 1,
                    ..reply
                },
                &file
            ),
            InflightError::BufferSize { .. }
        ));
        // Past the end of the file, and an overflowing offset.
        assert!(matches!(
            refuse(
                InflightDescription {
                    mmap_offset: 4096,
                    ..reply
                },
                &file
            ),
            InflightError::DoesNotFit { .. }
        ));
        assert!(matches!(
            refuse(
                InflightDescription {
                    mmap_offset: u64::MAX - 10,
                    ..reply
                },
                &file
            ),
            InflightError::DoesNotFit { .. }
        ));
        // A file the frontend could shrink under the mapping.
        let unsealed = tempfile::tempfile().unwrap();
        unsealed.set_len(reply.mmap_size).unwrap();
        assert!(matches!(refuse(reply, &unsealed), InflightError::NotSealed));
        // Not a regular file.
        let (pipe_read, _pipe_write) = std::io::pipe().unwrap();
        let pipe = File::from(std::os::fd::OwnedFd::from(pipe_read));
        assert!(matches!(
            refuse(reply, &pipe),
            InflightError::DoesNotFit { .. }
        ));
        // The backend's own buffer, as given.
        assert!(InflightBuffer::map(&reply, file, LIMITS).is_ok());
    }

    #[test]
    fn a_fresh_region_is_initialised_and_leaves_the_frontends_base() {
        let (reply, file) = buffer(2, 128);
        let map = mapped(&reply, &file);
        let mut q1 = map.queue(1).unwrap();
        assert!(map.queue(2).is_none());
        let recovery = q1.start(7, 128).unwrap();
        assert_eq!(recovery.resubmit, Vec::<u16>::new());
        assert_eq!(recovery.next_avail, None);
        // Version 1, desc_num, used_idx written in queue 1's region only.
        let region = 2112;
        let mut raw = vec![0u8; 2 * 2112];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, 0).unwrap();
        assert!(raw[..region].iter().all(|&b| b == 0));
        assert_eq!(&raw[region + 8..region + 16], &[1, 0, 128, 0, 0, 0, 7, 0]);
        // A larger ring than the buffer's queue size cannot be tracked.
        let mut q0 = map.queue(0).unwrap();
        assert!(matches!(
            q0.start(0, 256),
            Err(InflightError::RingTooLarge { .. })
        ));
    }

    /// Version 0 means "not in use yet" whatever the entries say (a recycled buffer, or one
    /// whose tracking was abandoned): stale flags are cleared, never executed again. And a fresh
    /// region claimed at a ring's start (before the worker waits for the image) tells the next
    /// backend to go on at the used index, not at the frontend's base.
    #[test]
    fn a_fresh_region_forgets_stale_entries_and_once_claimed_sets_where_the_ring_goes_on() {
        let (reply, file) = buffer(1, 16);
        let map = mapped(&reply, &file);
        let mut q = map.queue(0).unwrap();
        q.start(0, 16).unwrap();
        for head in [4, 6] {
            q.taken(head).unwrap();
        }
        q.abandon();
        drop(q);
        let mut claimed = mapped(&reply, &file).queue(0).unwrap();
        assert!(claimed.initialise_if_fresh(5).unwrap());
        assert!(!claimed.initialise_if_fresh(9).unwrap(), "claimed twice");
        drop(claimed);
        let recovery = mapped(&reply, &file)
            .queue(0)
            .unwrap()
            .start(5, 16)
            .unwrap();
        assert_eq!(recovery.resubmit, Vec::<u16>::new());
        assert_eq!(recovery.next_avail, Some(5));
    }

    #[test]
    fn a_restarted_backend_finds_the_heads_taken_and_not_completed_in_their_order() {
        let (reply, file) = buffer(1, 16);
        let map = mapped(&reply, &file);
        let mut q = map.queue(0).unwrap();
        q.start(0, 16).unwrap();
        // Heads 3, 9, 5 taken in this order; 3 completed (used index 1); then a "crash".
        for head in [3, 9, 5] {
            q.taken(head).unwrap();
        }
        q.completing(3).unwrap();
        q.completed(3, 1).unwrap();
        drop(q);
        let mut again = mapped(&reply, &file).queue(0).unwrap();
        let recovery = again.start(1, 16).unwrap();
        assert_eq!(recovery.resubmit, vec![9, 5]);
        assert_eq!(recovery.next_avail, Some(3));
        // The counter goes on after the newest: a head taken now sorts after them.
        again.taken(2).unwrap();
        let recovery = mapped(&reply, &file)
            .queue(0)
            .unwrap()
            .start(1, 16)
            .unwrap();
        assert_eq!(recovery.resubmit, vec![9, 5, 2]);
    }

    #[test]
    fn a_crash_between_the_used_index_and_the_clearing_completes_the_request_once() {
        let (reply, file) = buffer(1, 16);
        let map = mapped(&reply, &file);
        let mut q = map.queue(0).unwrap();
        q.start(65535, 16).unwrap();
        q.taken(4).unwrap();
        q.completing(4).unwrap();
        // The used ring's index went to 0 (wrapping), then the backend died before clearing.
        drop(q);
        let mut again = mapped(&reply, &file).queue(0).unwrap();
        let recovery = again.start(0, 16).unwrap();
        assert_eq!(recovery.resubmit, Vec::<u16>::new(), "completed: not again");
        assert_eq!(recovery.next_avail, Some(0));
        // Died before the used index moved: the request is executed again.
        again.taken(6).unwrap();
        again.completing(6).unwrap();
        let recovery = mapped(&reply, &file)
            .queue(0)
            .unwrap()
            .start(0, 16)
            .unwrap();
        assert_eq!(recovery.resubmit, vec![6]);
        assert_eq!(recovery.next_avail, Some(1));
    }

    #[test]
    fn a_head_outside_the_ring_is_not_recorded_and_tracking_goes_on() {
        let (reply, file) = buffer(1, 16);
        let map = mapped(&reply, &file);
        let mut q = map.queue(0).unwrap();
        q.start(0, 8).unwrap();
        // A broken driver's head 12 (the ring has 8 entries): its request fails, completes.
        q.taken(12).unwrap();
        q.completing(12).unwrap();
        q.completed(12, 1).unwrap();
        // Then a good one is taken, and the backend dies.
        q.taken(3).unwrap();
        let recovery = mapped(&reply, &file).queue(0).unwrap().start(1, 8).unwrap();
        assert_eq!(recovery.resubmit, vec![3]);
        assert_eq!(recovery.next_avail, Some(2));
        assert_eq!(recovery.discarded, 0);
    }

    #[test]
    fn hostile_region_contents_cannot_name_heads_outside_the_ring() {
        let (reply, file) = buffer(1, 64);
        let map = mapped(&reply, &file);
        let mut q = map.queue(0).unwrap();
        q.start(0, 64).unwrap();
        // The frontend marks every entry in flight, with a last batch list that loops, and a
        // used index far from the ring's.
        let mut raw = vec![0u8; reply.mmap_size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, 0).unwrap();
        for head in 0..64usize {
            let at = 16 + 16 * head;
            raw[at] = 1;
            raw[at + 6..at + 8].copy_from_slice(&(head as u16).to_le_bytes());
            raw[at + 8..at + 16].copy_from_slice(&(u64::MAX - head as u64).to_le_bytes());
        }
        raw[12..14].copy_from_slice(&5u16.to_le_bytes());
        raw[14..16].copy_from_slice(&40000u16.to_le_bytes());
        std::os::unix::fs::FileExt::write_all_at(&file, &raw, 0).unwrap();
        // A ring of 32: heads 32.. are dropped, head 5 (the last batch) is cleared.
        let recovery = mapped(&reply, &file)
            .queue(0)
            .unwrap()
            .start(100, 32)
            .unwrap();
        assert_eq!(recovery.discarded, 32);
        assert_eq!(recovery.resubmit.len(), 31);
        assert!(!recovery.resubmit.contains(&5));
        assert_eq!(recovery.resubmit.first(), Some(&31), "oldest counter first");
        assert_eq!(recovery.next_avail, Some(131));
        // An unknown version is refused.
        raw[8] = 7;
        std::os::unix::fs::FileExt::write_all_at(&file, &raw, 0).unwrap();
        assert!(matches!(
            mapped(&reply, &file).queue(0).unwrap().start(0, 32),
            Err(InflightError::UnknownVersion(7))
        ));
    }
}
