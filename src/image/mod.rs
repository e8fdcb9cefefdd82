//! The image engine: a compressed, in-place, crash-consistent block store.
//!
//! Nothing here knows about virtio, vhost-user or guest memory. Callers see a byte-addressed disk
//! (`read`/`write`/`flush`/`discard`/`write_zeroes` at 512-byte-aligned offsets) that is safe to use
//! from many threads at once (`&self` everywhere); the engine's own metadata writer thread makes
//! writes durable in group commits (see `docs/ARCHITECTURE.md` and `docs/FORMAT.md`).
//!
//! Module map: `format` (on-disk layouts), `codec` (compression with output bounds), `table`
//! (striped cluster table), `alloc` (sharded free-slot allocator), `recovery` (load and replay,
//! shared with `check`), `engine` (data path and metadata writer), `check` (verification and
//! repair), `storage` (the only door to bytes).

mod alloc;
mod check;
mod codec;
mod engine;
pub mod format;
mod newfile;
mod recovery;
pub mod storage;
mod table;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use newfile::NewFile;
pub use storage::{FileStorage, MemStorage, Storage};

/// Logical sector size: every offset and length handed to the engine is a multiple of this.
pub const SECTOR_SIZE: u64 = 512;
/// Smallest and largest cluster sizes the format allows.
pub const MIN_CLUSTER_SIZE: u32 = 4 * 1024;
/// Smallest cluster size of an image that compresses its writes: a smaller cluster could not save
/// a single 4 KiB storage unit (and 8 KiB clusters would only at 2:1), so every cluster would be
/// stored raw. 4 and 8 KiB clusters are for uncompressed images, where they spare 4 KiB writes
/// the copy of the rest of their cluster (docs/PERFORMANCE.md, session 5).
pub const MIN_COMPRESSED_CLUSTER_SIZE: u32 = 16 * 1024;
/// See [`MIN_CLUSTER_SIZE`].
pub const MAX_CLUSTER_SIZE: u32 = 128 * 1024;
/// Cluster size used when none is given, for an image that compresses its writes.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;
/// Cluster size used when none is given, for an image created with [`Compression::None`].
///
/// A cluster is the unit of copy-on-write and of checksumming, so a 4 KiB guest write copies a
/// whole cluster and a 4 KiB read reads and checks one. Large clusters pay for that with a better
/// compression ratio; uncompressed clusters gain nothing from size, so they stay small. Measured
/// (docs/PERFORMANCE.md, session 4): 16 KiB instead of 64 KiB doubles 4 KiB random write and
/// random read throughput. The price is a 4× larger table: 10 bytes of RAM per 16 KiB
/// (640 KiB per GiB of disk).
pub const DEFAULT_UNCOMPRESSED_CLUSTER_SIZE: u32 = 16 * 1024;

/// The cluster size a new image gets when the user names none: small for uncompressed images,
/// where size buys nothing, [`DEFAULT_CLUSTER_SIZE`] for compressing ones.
pub fn default_cluster_size(compression: Compression) -> u32 {
    match compression {
        Compression::None => DEFAULT_UNCOMPRESSED_CLUSTER_SIZE,
        _ => DEFAULT_CLUSTER_SIZE,
    }
}
/// Interval of the metadata writer's timer commit when none is given (like dm-thin).
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// RAM for partial-cluster writes held back to be merged ([`OpenOptions::write_buffer_bytes`]).
pub const DEFAULT_WRITE_BUFFER_BYTES: u64 = 32 << 20;

/// Compression algorithm of an image (the default for new writes) or of one stored cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Store clusters uncompressed (all-zero clusters still store nothing).
    None,
    /// LZ4 block format (`lz4_flex`). The default.
    #[default]
    Lz4,
    /// Snappy raw format (`snap`).
    Snappy,
    /// Zstandard at a level (1..=22; negative levels are the fast modes).
    Zstd {
        /// Compression level.
        level: i32,
    },
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Snappy => f.write_str("snappy"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;

    /// Parses `none`, `lz4`, `snappy`, `zstd` (level 3) or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "snappy" => Ok(Compression::Snappy),
            "zstd" => Ok(Compression::Zstd { level: 3 }),
            other => {
                let Some(level) = other.strip_prefix("zstd:") else {
                    return Err(format!(
                        "unknown compression '{other}' (expected lz4, snappy, zstd[:LEVEL] or none)"
                    ));
                };
                let level: i32 = level
                    .parse()
                    .map_err(|_| format!("zstd level '{level}' is not a number"))?;
                if !(-7..=22).contains(&level) || level == 0 {
                    return Err(format!(
                        "zstd level {level} is out of range (-7..=22, not 0)"
                    ));
                }
                Ok(Compression::Zstd { level })
            }
        }
    }
}

/// Parameters of a new image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Logical disk size in bytes (rounded up to a multiple of the cluster size is NOT done:
    /// must be a multiple of 512; the last cluster may be partial).
    pub size: u64,
    /// Cluster size in bytes: a power of two in [`MIN_CLUSTER_SIZE`]..=[`MAX_CLUSTER_SIZE`].
    pub cluster_size: u32,
    /// Algorithm for new writes.
    pub compression: Compression,
}

impl CreateOptions {
    /// Defaults (64 KiB clusters, lz4) for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::with_compression(size, Compression::default())
    }

    /// A disk of `size` bytes compressed with `compression`, with that algorithm's default
    /// cluster size ([`default_cluster_size`]).
    pub fn with_compression(size: u64, compression: Compression) -> Self {
        Self {
            size,
            cluster_size: default_cluster_size(compression),
            compression,
        }
    }
}

/// What to do when another process holds the image's writer lock (I8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockPolicy {
    /// Fail at once with [`ImageError::Locked`].
    Fail,
    /// Retry until the lock is free, up to this long, then fail with [`ImageError::Locked`].
    Wait(Duration),
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open read-only: no writer thread, nothing is ever written (not even recovery).
    pub read_only: bool,
    /// With `read_only`: hold a shared lock while running (taken per `lock`), so no writer can
    /// open the image under a read-only server and change what it serves (`serve --read-only`).
    /// One-shot readers (`info`, `check`, `convert`) leave it off and read the last committed
    /// state of an image in use.
    pub shared_lock: bool,
    /// Interval of the timer commit.
    pub commit_interval: Duration,
    /// What to do when the writer lock is taken.
    pub lock: LockPolicy,
    /// Open in the quiesced state: read and validate the superblock only (geometry is available),
    /// take no lock and load no table. [`Image::resume`] later takes the lock and loads the
    /// metadata. This is how `serve` starts: it must answer GET_CONFIG before the device runs.
    pub start_quiesced: bool,
    /// RAM (bytes) of the write-back buffer: writes smaller than a cluster are merged there, per
    /// cluster, and stored (compressed once) when the cluster is complete, at the next FLUSH,
    /// timer commit or quiesce. 0 stores every write at once (read-modify-write per write). When
    /// the buffer is full, further partial writes are stored at once (bounded RAM).
    pub write_buffer_bytes: u64,
    /// TEST ONLY: write the commit record *before* making the data durable (breaks I2/I3).
    /// Exists so the crash simulator can show that its oracle catches a broken commit order.
    #[doc(hidden)]
    pub test_break_commit_order: bool,
    /// TEST ONLY: the smallest table (in checkpoint chunks of 255 clusters) whose checkpoints
    /// are written ahead of need, between commits; `Some(0)`: every table's, however empty, so
    /// that small test images exercise it (default: 256 chunks, tables at least a quarter full).
    #[doc(hidden)]
    pub test_checkpoint_ahead_min_chunks: Option<u64>,
    /// TEST ONLY: how long freed, unreferenced space may wait for reuse before the metadata
    /// writer punches it (default: two commit intervals, at least 200 ms). Lets the crash
    /// simulator reach the deferred punches within a short workload.
    #[doc(hidden)]
    pub test_stale_grace: Option<Duration>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            shared_lock: false,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            lock: LockPolicy::Fail,
            start_quiesced: false,
            write_buffer_bytes: DEFAULT_WRITE_BUFFER_BYTES,
            test_break_commit_order: false,
            test_checkpoint_ahead_min_chunks: None,
            test_stale_grace: None,
        }
    }
}

/// Fixed properties of an image, from its superblock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Geometry {
    /// Logical size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Algorithm for new writes.
    pub compression: Compression,
    /// Image UUID (hyphenated).
    pub uuid: String,
    /// On-disk format version.
    pub format_version: u32,
}

/// Live statistics of an open image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Logical size of the disk in bytes.
    pub logical_bytes: u64,
    /// Bytes of guest data that are not known zero (non-zero clusters × cluster size).
    pub allocated_logical_bytes: u64,
    /// Payload bytes stored (4 KiB units in use, committed or pending).
    pub stored_bytes: u64,
    /// Clusters that read as zeros and store nothing.
    pub clusters_zero: u64,
    /// Clusters stored compressed.
    pub clusters_compressed: u64,
    /// Clusters stored raw (compression saved no 4 KiB unit).
    pub clusters_raw: u64,
    /// Payload checksum mismatches seen by reads since open.
    pub checksum_errors: u64,
    /// Metadata commits since open.
    pub commits: u64,
    /// Checkpoints written since open.
    pub checkpoints: u64,
    /// Of those, checkpoints written ahead of need, between commits (R16).
    pub checkpoints_ahead: u64,
    /// Read requests served since open.
    pub reads: u64,
    /// Write requests (including write-zeroes/discard) served since open.
    pub writes: u64,
    /// Flush requests served since open.
    pub flushes: u64,
    /// Bytes of RAM held by the cluster table.
    pub table_ram_bytes: u64,
    /// True while the engine is quiesced (writer parked, nothing uncommitted).
    pub quiesced: bool,
    /// Number of writes accepted but not yet in a durable commit.
    pub uncommitted_writes: u64,
}

impl Stats {
    /// Compression ratio: allocated logical bytes / stored bytes (1.0 when nothing is stored).
    pub fn ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            return 1.0;
        }
        self.allocated_logical_bytes as f64 / self.stored_bytes as f64
    }
}

/// Result of `check`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// Metadata or payload problems: each a sentence naming what and where.
    pub corruptions: Vec<String>,
    /// Space that is allocated on the host but referenced by nothing (harmless, reclaimable),
    /// on an image that was closed cleanly.
    pub leaked_bytes: u64,
    /// Space referenced by nothing on an image that was not closed cleanly (crash, kill): old
    /// versions freed by durable commits that were still waiting for release (reuse or punch),
    /// and payloads of writes that never committed; or on an image whose last writer quiesced it
    /// without punching such old versions ([`format::RECORD_SPACE_UNRECLAIMED`]). Expected, and
    /// reclaimed by the next read-write open (or `--repair`).
    pub uncommitted_bytes: u64,
    /// What `--repair` changed, if it ran.
    pub repairs: Vec<String>,
    /// What `--repair` could not recover although the repaired image is consistent: commits
    /// whose records are gone (damaged, or overwritten by the journal's next cycle), so the
    /// clusters they changed read an older version or zeros. Unreferenced space is then left
    /// in place: it may hold the only copy of their data.
    pub unrecovered: Vec<String>,
    /// Harmless findings (a torn inactive checkpoint left by a crash, an unused superblock copy
    /// that is invalid but recoverable, ...).
    pub warnings: Vec<String>,
    /// Clusters whose payload was read and verified.
    pub clusters_checked: u64,
    /// Geometry, when the superblock could be read.
    pub geometry: Option<Geometry>,
    /// Statistics of the recovered state, when it could be loaded.
    pub stats: Option<Stats>,
}

/// Errors of the engine. `kind` tells callers (the virtio-blk layer) how to answer the guest.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Host I/O failed (EIO, ENOSPC, ...).
    #[error("{op} at byte {offset}: {source}")]
    Io {
        /// What the engine was doing.
        op: &'static str,
        /// Byte offset in the image file.
        offset: u64,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// A stored payload failed its checksum or did not decompress to a cluster.
    #[error("cluster {cluster}: stored data is corrupt ({reason})")]
    CorruptPayload {
        /// Cluster index.
        cluster: u64,
        /// What failed.
        reason: String,
    },
    /// Metadata failed validation; the image refuses to open read-write.
    #[error("image metadata is corrupt: {0}")]
    CorruptMetadata(String),
    /// Not an insitu-blk image (wrong magic), or an unsupported version.
    #[error("not an insitu-blk image: {0}")]
    NotAnImage(String),
    /// Request outside the disk, unaligned, or otherwise malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Write to an image opened read-only.
    #[error("image is open read-only")]
    ReadOnly,
    /// Another process holds the writer lock.
    #[error("image is locked by another process (in use?)")]
    Locked,
    /// The engine is quiesced; call `resume` first.
    #[error("image is quiesced")]
    Quiesced,
    /// Invalid option (bad cluster size, size, ...).
    #[error("{0}")]
    InvalidOption(String),
    /// The metadata writer failed earlier; the image no longer accepts writes.
    #[error("metadata writer failed: {0}")]
    WriterFailed(String),
}

impl ImageError {
    /// The host filesystem or device is out of space (ENOSPC, EDQUOT): retrying other writes
    /// now fails the same way.
    pub fn is_host_out_of_space(&self) -> bool {
        matches!(self, ImageError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

/// Result alias of the engine.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// An open image. `Send + Sync`; share it with `Arc`.
pub struct Image {
    core: Arc<engine::Core>,
    life: Mutex<Life>,
    /// [`OpenOptions::shared_lock`] (read-only images only).
    shared_lock: bool,
}

#[derive(Default)]
struct Life {
    writer: Option<JoinHandle<()>>,
    lock_held: bool,
    closed: bool,
    /// The last metadata load found no clean-close marker (the previous writer died, and writes
    /// it had completed but not committed are gone), or a marker saying such a loss was never
    /// reported to the guest.
    unclean_load: bool,
    /// [`Image::take_unclean_shutdown_notice`] answered `true` for this loss already.
    notice_given: bool,
    /// The journal's host space is allocated (once per process).
    journal_reserved: bool,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image").field("core", &self.core).finish()
    }
}

fn take_lock(storage: &dyn Storage, policy: LockPolicy) -> Result<()> {
    take_lock_of_kind(storage, policy, false)
}

/// Takes the exclusive writer lock, or with `shared` the readers' lock.
fn take_lock_of_kind(storage: &dyn Storage, policy: LockPolicy, shared: bool) -> Result<()> {
    let deadline = match policy {
        LockPolicy::Fail => None,
        LockPolicy::Wait(d) => Some(Instant::now() + d),
    };
    loop {
        let attempt = if shared {
            storage.try_lock_shared()
        } else {
            storage.try_lock_exclusive()
        };
        match attempt {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(source) => {
                return Err(ImageError::Io {
                    op: "lock image",
                    offset: 0,
                    source,
                })
            }
        }
        match deadline {
            Some(d) if Instant::now() < d => {
                let left = d.saturating_duration_since(Instant::now());
                std::thread::sleep(left.min(Duration::from_millis(50)));
            }
            _ => return Err(ImageError::Locked),
        }
    }
}

/// Opens a block device to overwrite it, with `O_EXCL`: the kernel refuses (`EBUSY`) while the
/// device is mounted or held by device-mapper, LVM, RAID or another exclusive opener, and keeps
/// them off it while it is open. That is a stronger guard than the advisory writer lock, which
/// only other insitu-blk processes honour.
pub fn open_block_device_exclusively(path: &Path) -> std::io::Result<FileStorage> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        .map_err(|err| {
            if err.raw_os_error() == Some(libc::EBUSY) {
                std::io::Error::new(
                    err.kind(),
                    "the device is in use by the system (mounted, or held by device-mapper, \
                     LVM, RAID or another exclusive user)",
                )
            } else {
                err
            }
        })?;
    FileStorage::from_file(file)
}

/// The geometry `opts` asks for, or why it is not allowed.
fn validate_create_options(opts: &CreateOptions) -> Result<format::Layout> {
    let layout =
        format::Layout::new(opts.size, opts.cluster_size).map_err(ImageError::InvalidOption)?;
    if opts.compression != Compression::None && opts.cluster_size < MIN_COMPRESSED_CLUSTER_SIZE {
        return Err(ImageError::InvalidOption(format!(
            "{} KiB clusters cannot be compressed (a cluster must save at least one 4 KiB unit): \
             a compressed image needs clusters of at least {} KiB; smaller ones are for \
             uncompressed images",
            opts.cluster_size / 1024,
            MIN_COMPRESSED_CLUSTER_SIZE / 1024
        )));
    }
    if let Compression::Zstd { level } = opts.compression {
        if !(-7..=22).contains(&level) || level == 0 {
            return Err(ImageError::InvalidOption(format!(
                "zstd level {level} is out of range (-7..=22, not 0)"
            )));
        }
    }
    Ok(layout)
}

impl Image {
    /// Creates a new image at `path`: a new regular file, or an existing block device.
    ///
    /// A file is built unnamed (or under a hidden temporary name) and appears at `path` only once
    /// it is a complete, durable image; an existing file is never replaced (`AlreadyExists`). So a
    /// process killed meanwhile leaves nothing at `path`. A block device is formatted in place,
    /// superblocks last: killed half way, it holds no valid superblock.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
        validate_create_options(opts)?;
        let io = |op: &'static str| {
            move |source| ImageError::Io {
                op,
                offset: 0,
                source,
            }
        };
        let is_block_device = std::fs::metadata(path)
            .map(|meta| std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()))
            .unwrap_or(false);
        if is_block_device {
            let storage = open_block_device_exclusively(path).map_err(io("open block device"))?;
            return Self::create_on(Arc::new(storage), opts);
        }
        let new = NewFile::create(path).map_err(io("create image"))?;
        let file = new.file().try_clone().map_err(io("create image"))?;
        let storage = FileStorage::from_file(file).map_err(io("create image"))?;
        Self::create_on(Arc::new(storage), opts)?;
        new.publish().map_err(io("publish image"))
    }

    /// Creates a new image on `storage` (overwrites whatever is there).
    pub fn create_on(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<()> {
        let layout = validate_create_options(opts)?;
        take_lock(storage.as_ref(), LockPolicy::Fail)?;
        let r = check::format_storage(storage.as_ref(), layout, opts.compression);
        let _ = storage.unlock();
        r
    }

    /// Opens the image at `path`, runs recovery (unless read-only or `start_quiesced`).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let storage = FileStorage::open(path, opts.read_only).map_err(|source| ImageError::Io {
            op: "open image",
            offset: 0,
            source,
        })?;
        Self::open_on(Arc::new(storage), opts)
    }

    /// Opens an image on `storage`.
    pub fn open_on(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        let sbr = recovery::read_superblock(storage.as_ref())?;
        let core = engine::Core::new(storage, sbr.sb, opts);
        let image = Image {
            core: Arc::new(core),
            life: Mutex::new(Life::default()),
            shared_lock: opts.read_only && opts.shared_lock,
        };
        if !opts.start_quiesced {
            image.resume()?;
        }
        Ok(image)
    }

    /// Geometry from the superblock.
    pub fn geometry(&self) -> &Geometry {
        &self.core.geometry
    }

    /// Logical size in bytes.
    pub fn size(&self) -> u64 {
        self.core.layout.size
    }

    /// True when opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.core.read_only
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512, inside the disk).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.core.read(offset, buf)
    }

    /// Writes `data` at `offset` (both multiples of 512, inside the disk). Returns when the data
    /// is in the engine (it survives a crash only after a later `flush` returns).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.core.write(offset, data)
    }

    /// Makes the range read as zeros. `unmap`: release the space (whole clusters become zero
    /// entries either way; the flag only matters for partial clusters).
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        // Partial clusters are rewritten without the zeroed bytes either way: a compressed
        // cluster stores no zeros explicitly, so `unmap` changes nothing here.
        let _ = unmap;
        self.core.zero_range(offset, len)
    }

    /// Discards a range: it reads as zeros afterwards and its space is released.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.core.zero_range(offset, len)
    }

    /// I2: returns once every write that completed before the call is durable.
    pub fn flush(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        self.core.flush()?;
        if self.core.loss_unreported.load(Ordering::Relaxed) {
            self.core.loss_unreported.store(false, Ordering::SeqCst);
            self.core.remark_if_loss_reported();
        }
        Ok(())
    }

    /// I7: commits everything accepted so far, parks the metadata writer and releases the writer
    /// lock. Returns when that is done. I/O while quiesced fails with [`ImageError::Quiesced`].
    /// Idempotent.
    ///
    /// Freed space still waiting for reuse is not punched here (each punch can be a synchronous
    /// device discard, and a VM's pause or migration downtime would wait for all of them): it
    /// stays listed for this process's `resume`, and the clean-close marker says so
    /// ([`format::RECORD_SPACE_UNRECLAIMED`]), so another opener reclaims it in the background.
    pub fn quiesce(&self) -> Result<()> {
        let mut life = table::lock(&self.life);
        self.park(&mut life, false, false)
    }

    /// Stops I/O, commits and parks the writer. `checkpoint`: the final commit writes one
    /// (close). `reclaim`: the writer punches every freed region before it parks, so the image
    /// stores only what its table refers to (close, drop); else they stay listed (quiesce).
    fn park(&self, life: &mut Life, checkpoint: bool, reclaim: bool) -> Result<()> {
        use std::sync::atomic::Ordering;
        let mut result = Ok(());
        if self.core.state.load(Ordering::SeqCst) == engine::RUNNING {
            self.core.state.store(engine::QUIESCED, Ordering::SeqCst);
            self.core.drain();
        }
        if let Some(writer) = life.writer.take() {
            // Buffered writes first: they were accepted, so the quiesce commits them (I7). When
            // some could not be stored, the rest is still committed, but no checkpoint and no
            // clean-close marker follow: the next opener must see a loss, as after a crash.
            let buffered = self.core.write_back_all();
            result = self.core.sync(checkpoint && buffered.is_ok());
            if let Err(e) = buffered {
                log::error!("storing buffered writes at quiesce failed: {e}");
                result = Err(e);
            }
            {
                let mut ctl = table::lock(&self.core.ctl);
                ctl.stop = true;
                // Only where the next opener can find unreferenced space again: a block device
                // (or a filesystem without SEEK_DATA) cannot list it, so a quiesce there still
                // discards it, or a thin volume would keep it allocated for good.
                ctl.keep_freed = !reclaim && self.core.can_find_unreferenced_space();
            }
            self.core.writer_cv.notify_all();
            if writer.join().is_err() {
                log::error!("metadata writer thread panicked");
            }
            // Everything is committed and nothing runs: say so in the journal, so the next
            // opener (a migration destination, a restarted backend) knows nothing was lost, and
            // whether it must look for unreferenced space (only when some is left: an idle
            // image's quiesce leaves none, and its next opener then scans nothing).
            if result.is_ok() {
                let unreclaimed = !reclaim && self.core.holds_unreferenced_space();
                result = self.core.mark_clean(
                    self.core.loss_unreported.load(Ordering::SeqCst),
                    unreclaimed,
                );
            }
        }
        // A failed final commit keeps the lock: handing the image to another process (a
        // migration destination) would hand over an image that misses completed writes (I7).
        if life.lock_held && result.is_ok() {
            if let Err(e) = self.core.storage.unlock() {
                log::warn!("releasing the writer lock failed: {e}");
            }
            life.lock_held = false;
            log::info!("image quiesced, lock released");
        }
        // A paused guest's backend (a quiesce: the only park that leaves freed space listed)
        // holds on to nothing it freed. On a thread of its own: the trim (milliseconds of
        // madvise after a burst) must not lengthen the pause or the migration hand-over that
        // waits for this quiesce. No thread, no trim: nothing is lost. A close or drop ends the
        // image (and usually the process): no trim.
        if !reclaim {
            let _ = std::thread::Builder::new()
                .name("insitu-trim".into())
                .spawn(engine::release_free_memory);
        }
        result
    }

    /// Re-takes the writer lock (per [`OpenOptions::lock`]), reloads the metadata if another
    /// process committed meanwhile (or loads it the first time after `start_quiesced`), and
    /// restarts the writer. Idempotent.
    pub fn resume(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let mut life = table::lock(&self.life);
        if life.closed {
            return Err(ImageError::Quiesced);
        }
        if self.core.state.load(Ordering::SeqCst) == engine::RUNNING {
            return Ok(());
        }
        let core = &self.core;
        if !core.read_only && !life.lock_held {
            take_lock(core.storage.as_ref(), core.lock_policy)?;
            life.lock_held = true;
            log::info!("writer lock taken");
        } else if self.shared_lock && !life.lock_held {
            take_lock_of_kind(core.storage.as_ref(), core.lock_policy, true)?;
            life.lock_held = true;
            log::info!("shared (read-only) lock taken");
        }
        // A failed writer stays failed (`Core::fail`): reloading through the page cache that
        // lied to it could resurrect commits the disk never got. Writes and flushes keep
        // failing; reads go on.
        let failed = table::lock(&core.ctl).failed.is_some();
        if !failed && core.disk_changed() {
            let loaded = core.load().and_then(|l| {
                let loss_unreported = l.loss_unreported;
                let space_unreclaimed = l.space_unreclaimed;
                let clean = core.install(l)?;
                if core.read_only {
                    return Ok(());
                }
                // A loss found here replaces whatever an earlier load found: the image has
                // been closed cleanly (and that loss recorded) since, or this is the first load.
                life.unclean_load = !clean || loss_unreported;
                life.notice_given = false;
                self.core
                    .loss_unreported
                    .store(life.unclean_load, Ordering::SeqCst);
                if !clean {
                    core.reclaim_leaks();
                } else if space_unreclaimed {
                    // Consistent, but a quiesce left freed space unpunched: the writer reclaims
                    // it in the background (or a new version overwrites it first).
                    core.adopt_unreferenced();
                }
                Ok(())
            });
            if let Err(e) = loaded {
                if life.lock_held {
                    let _ = core.storage.unlock();
                    life.lock_held = false;
                }
                return Err(e);
            }
        }
        if !core.read_only && !failed && !life.journal_reserved {
            // Commits must not fail for want of host space (a failed commit is final): the
            // journal gets its blocks now, and a full host filesystem is a clear error here.
            let l = &core.layout;
            if let Err(source) = core.storage.preallocate(l.journal_offset, l.journal_size) {
                if life.lock_held {
                    let _ = core.storage.unlock();
                    life.lock_held = false;
                }
                return Err(ImageError::Io {
                    op: "reserve space for the journal",
                    offset: l.journal_offset,
                    source,
                });
            }
            life.journal_reserved = true;
        }
        // The journal ends with a clean-close marker (found at load, or written by our own
        // quiesce): a crash from now on must not look clean, so end it otherwise before any
        // write is accepted.
        if !core.read_only && !failed && core.clean_marked() {
            if let Err(e) = core.mark_open() {
                if life.lock_held {
                    let _ = core.storage.unlock();
                    life.lock_held = false;
                }
                return Err(e);
            }
        }
        if !core.read_only {
            {
                let mut ctl = table::lock(&core.ctl);
                ctl.stop = false;
                ctl.keep_freed = false;
            }
            let worker = Arc::clone(core);
            let handle = std::thread::Builder::new()
                .name("insitu-commit".into())
                .spawn(move || engine::Core::writer_main(worker))
                .map_err(|source| ImageError::Io {
                    op: "start metadata writer",
                    offset: 0,
                    source,
                })?;
            life.writer = Some(handle);
        }
        core.state.store(engine::RUNNING, Ordering::SeqCst);
        log::info!("image running");
        Ok(())
    }

    /// True when the most recent metadata load (at open or at a `resume` that reloaded) found
    /// that the previous writer did not close the image: it crashed or was killed, and writes it
    /// had completed without a later FLUSH are lost. A frontend that outlived that writer (QEMU
    /// reconnecting to a restarted backend) must be told, or its next FLUSH would claim
    /// durability for writes that are gone (I2).
    pub fn recovered_after_unclean_shutdown(&self) -> bool {
        table::lock(&self.life).unclean_load
    }

    /// [`Image::recovered_after_unclean_shutdown`], answered `true` at most once per such load,
    /// so the loss is reported to the guest once. Always false on read-only images.
    /// The loss counts as reported once a FLUSH succeeds after it (the guest was told by a
    /// failed one, or it is a new guest that never had the lost writes); until then quiesce and
    /// close carry it into the clean-close marker for the next backend.
    pub fn take_unclean_shutdown_notice(&self) -> bool {
        use std::sync::atomic::Ordering;
        let mut life = table::lock(&self.life);
        let notice = self.core.loss_unreported.load(Ordering::SeqCst)
            && !life.notice_given
            && !self.core.read_only;
        if notice {
            life.notice_given = true;
        }
        notice
    }

    /// True when a `resume` could take the writer lock now: this image holds it already, or no
    /// other process does. A probe (taken and released at once), for callers that want to wait
    /// for the lock without blocking inside `resume`.
    pub fn writer_lock_available(&self) -> bool {
        let life = table::lock(&self.life);
        if life.lock_held || self.core.read_only {
            return true;
        }
        match self.core.storage.try_lock_exclusive() {
            Ok(true) => {
                let _ = self.core.storage.unlock();
                true
            }
            Ok(false) => false,
            // Let `resume` report the error.
            Err(_) => true,
        }
    }

    /// Live statistics.
    pub fn stats(&self) -> Stats {
        self.core.stats()
    }

    /// Commits, checkpoints, stops the writer and releases the lock.
    pub fn close(self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let parked = self.core.state.load(Ordering::SeqCst) != engine::RUNNING;
        let (no_writer, lock_held) = {
            let life = table::lock(&self.life);
            (life.writer.is_none(), life.lock_held)
        };
        if parked && !self.core.read_only && no_writer {
            // Quiesced before close (the daemon quiesces at shutdown): write the checkpoint and
            // the clean-close marker all the same, so the next open need not treat the image as
            // crashed. Only if the lock is ours or free: when another process took the image
            // over (migration), it is theirs, and everything of ours was committed by the
            // quiesce. A failed quiesce kept the lock: never probe it then (flock on our own
            // descriptor "succeeds", and the probe's unlock would drop the lock we hold).
            let ours_or_free = lock_held || {
                let free = self.core.storage.try_lock_exclusive().unwrap_or(false);
                if free {
                    let _ = self.core.storage.unlock();
                }
                free
            };
            if ours_or_free {
                if let Err(e) = self.resume() {
                    log::warn!("closing a quiesced image: cannot resume it to checkpoint: {e}");
                }
            }
        }
        let mut life = table::lock(&self.life);
        let r = self.park(&mut life, true, true);
        life.closed = true;
        r
    }

    /// TEST SUPPORT: stops the writer and releases the lock *without* committing what is not
    /// yet durable, like a killed process (the storage keeps whatever was written to it).
    #[doc(hidden)]
    pub fn abandon(self) {
        use std::sync::atomic::Ordering;
        let mut life = table::lock(&self.life);
        self.core.state.store(engine::QUIESCED, Ordering::SeqCst);
        self.core.drain();
        if let Some(writer) = life.writer.take() {
            table::lock(&self.core.ctl).stop = true;
            self.core.writer_cv.notify_all();
            let _ = writer.join();
        }
        if life.lock_held {
            let _ = self.core.storage.unlock();
            life.lock_held = false;
        }
        life.closed = true;
    }
}

impl Drop for Image {
    /// Dropping without `close` commits what was accepted (best effort) and releases the lock;
    /// it never writes a checkpoint, so the next open exercises journal recovery.
    fn drop(&mut self) {
        let mut life = table::lock(&self.life);
        if life.closed {
            return;
        }
        if let Err(e) = self.park(&mut life, false, true) {
            log::error!("final commit while dropping the image failed: {e}");
        }
        life.closed = true;
    }
}

/// Checks the image at `path`: validates all metadata, replays the journal (in memory), reads and
/// verifies every stored payload, and finds leaked space. `repair` (needs the writer lock) writes a
/// fresh checkpoint of the recovered table and punches leaked space.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let storage = FileStorage::open(path, !repair).map_err(|source| ImageError::Io {
        op: "open image",
        offset: 0,
        source,
    })?;
    check_on(Arc::new(storage), repair)
}

/// [`check`] on any storage.
pub fn check_on(storage: Arc<dyn Storage>, repair: bool) -> Result<CheckReport> {
    check::check_storage(storage, repair)
}

#[cfg(test)]
mod tests;
