//! `insitu-blk convert SRC DST [-f FMT] [-O FMT] [--cluster-size] [--compression] [--compare]`.
//!
//! Copies a virtual disk between formats: raw -> insitu, insitu -> raw (and insitu -> insitu to
//! recompress, raw -> raw to sparsify). The output is sparse: all-zero blocks are never written
//! (on a block device raw output they are written, since the device may hold old data). Chunks of
//! [`CHUNK_SIZE`] are copied by a few threads at once; the engine is safe for concurrent callers.

use std::fs;
use std::io::IsTerminal;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use insitu_blk::image::format::{BLOCK, SB_OFFSETS};
use insitu_blk::image::{
    default_cluster_size, open_block_device_exclusively, Compression, CreateOptions, FileStorage,
    Image, ImageError, NewFile, OpenOptions, Storage, DEFAULT_CLUSTER_SIZE,
    MIN_COMPRESSED_CLUSTER_SIZE, SECTOR_SIZE,
};
use signal_hook::consts::{SIGINT, SIGTERM};

use super::create::{ensure_device_may_be_overwritten, ensure_new_or_block_device};
use super::size::ByteSize;
use super::validate_cluster_size;
use super::{ensure_input_exists, note, parse_compression, print_out};

/// Bytes copied per step of a worker: several clusters of any allowed size (a multiple of the
/// largest, so chunks never share a cluster and workers never read-modify-write the same one).
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Zero detection granularity of raw output: the usual filesystem block.
const RAW_ZERO_BLOCK: usize = 4096;
/// Worker threads used unless `--threads` says otherwise (at most this many, at most the CPUs).
const MAX_DEFAULT_THREADS: usize = 4;

/// Image formats `convert` reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An insitu-blk image.
    Insitu,
    /// Plain bytes (a raw disk image or a block device).
    Raw,
}

/// Arguments of `convert`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
SRC's format is detected (an insitu-blk image, otherwise raw) unless -f is given. DST's format \
defaults to insitu when SRC is raw and to raw when SRC is an insitu image. DST must not exist \
(an existing file is never overwritten) unless it is a block device. A file DST appears only \
once the whole disk is written and durable (an interrupted or killed convert leaves nothing at \
DST). A block device DST is written in place; one that already holds an insitu-blk image, a \
filesystem, a partition table or any other data in its first 64 KiB is refused unless --force \
is given, and one in use (mounted, held by LVM/RAID/device-mapper, or its writer lock held by \
serve) even then. Its first MiB (raw) or superblocks (insitu) are written last, so an interrupted \
convert leaves neither a valid-looking image nor a partial filesystem's signature. All-zero \
blocks are not written, so a file DST is sparse. A raw SRC whose size is not a multiple of 512 bytes is \
zero-padded to the next multiple. A progress bar is shown when stderr is a terminal.")]
pub struct ConvertArgs {
    /// Source disk: a raw image, an insitu-blk image or a block device.
    #[arg(value_name = "SRC")]
    pub src: PathBuf,

    /// Destination: a new file, or a block device.
    #[arg(value_name = "DST")]
    pub dst: PathBuf,

    /// Format of SRC (default: detected).
    #[arg(short = 'f', long = "source-format", value_name = "FMT", value_enum)]
    pub source_format: Option<Format>,

    /// Format of DST (default: insitu for a raw SRC, raw for an insitu SRC).
    #[arg(short = 'O', long = "output-format", value_name = "FMT", value_enum)]
    pub output_format: Option<Format>,

    /// Cluster size of an insitu DST (default: SRC's when it is an insitu image, else 64K, or
    /// 16K with -c none; 4K and 8K only with -c none).
    #[arg(long, value_name = "SIZE")]
    pub cluster_size: Option<ByteSize>,

    /// Compression of an insitu DST: lz4, snappy, zstd, zstd:LEVEL or none (default: SRC's when it
    /// is an insitu image, else lz4).
    #[arg(long, short = 'c', value_name = "ALGO", value_parser = parse_compression)]
    pub compression: Option<Compression>,

    /// After converting, read both disks again and fail at the first differing byte.
    #[arg(long)]
    pub compare: bool,

    /// Worker threads copying chunks in parallel (default: the CPUs, at most 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,

    /// Overwrite a block device DST even though it already holds an image or other data (files
    /// are never overwritten).
    #[arg(long)]
    pub force: bool,
}

/// A validated `convert` request.
#[derive(Debug)]
pub struct ConvertConfig {
    /// Source path.
    pub src: PathBuf,
    /// Destination path.
    pub dst: PathBuf,
    /// Forced source format.
    pub source_format: Option<Format>,
    /// Requested destination format.
    pub output_format: Option<Format>,
    /// Cluster size for an insitu DST.
    pub cluster_size: Option<u32>,
    /// Compression for an insitu DST.
    pub compression: Option<Compression>,
    /// Compare after converting.
    pub compare: bool,
    /// Worker threads.
    pub threads: usize,
    /// Overwrite a block device that holds data.
    pub force: bool,
}

impl TryFrom<ConvertArgs> for ConvertConfig {
    type Error = anyhow::Error;

    fn try_from(args: ConvertArgs) -> anyhow::Result<Self> {
        let cluster_size = args.cluster_size.map(validate_cluster_size).transpose()?;
        let insitu_options_given = cluster_size.is_some() || args.compression.is_some();
        let output_is_raw = args.output_format == Some(Format::Raw)
            || (args.output_format.is_none() && args.source_format == Some(Format::Insitu));
        if insitu_options_given && output_is_raw {
            bail!("--cluster-size and --compression only apply to insitu output (-O insitu)");
        }
        let threads = match args.threads {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_DEFAULT_THREADS),
        };
        Ok(ConvertConfig {
            src: args.src,
            dst: args.dst,
            source_format: args.source_format,
            output_format: args.output_format,
            cluster_size,
            compression: args.compression,
            compare: args.compare,
            threads,
            force: args.force,
        })
    }
}

/// A disk being read: random access in bytes, thread-safe.
#[derive(Debug)]
enum Source {
    Raw {
        storage: FileStorage,
        /// Bytes really in the file or device.
        data_len: u64,
        /// `data_len` rounded up to a whole sector; the tail reads as zeros.
        len: u64,
    },
    Insitu(Image),
}

impl Source {
    fn format(&self) -> Format {
        match self {
            Source::Raw { .. } => Format::Raw,
            Source::Insitu(_) => Format::Insitu,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Source::Raw { len, .. } => *len,
            Source::Insitu(image) => image.size(),
        }
    }

    /// Reads `buf.len()` bytes at `offset` (inside [`Source::len`]). When a large read fails, the
    /// error names the first failing cluster-sized block, not just the start of the chunk.
    fn read(&self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        let Err(err) = self.read_once(offset, buf) else {
            return Ok(());
        };
        let step = match self {
            Source::Raw { .. } => DEFAULT_CLUSTER_SIZE as usize,
            Source::Insitu(image) => image.geometry().cluster_size.max(512) as usize,
        };
        if buf.len() > step {
            for (index, piece) in buf.chunks_mut(step).enumerate() {
                self.read_once(offset + (index * step) as u64, piece)?;
            }
        }
        Err(err)
    }

    fn read_once(&self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        match self {
            Source::Raw {
                storage, data_len, ..
            } => {
                let available = data_len.saturating_sub(offset).min(buf.len() as u64) as usize;
                let (data, padding) = buf.split_at_mut(available);
                storage
                    .read_at(offset, data)
                    .with_context(|| format!("read at byte {offset}"))?;
                padding.fill(0);
                Ok(())
            }
            Source::Insitu(image) => image
                .read(offset, buf)
                .with_context(|| format!("read at byte {offset}")),
        }
    }

    fn open_raw(path: &Path) -> anyhow::Result<Source> {
        let storage = FileStorage::open(path, true)?;
        let data_len = storage.len()?;
        let len = data_len.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        Ok(Source::Raw {
            storage,
            data_len,
            len,
        })
    }

    fn open_insitu(path: &Path) -> Result<Source, ImageError> {
        let options = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        Image::open(path, &options).map(Source::Insitu)
    }

    /// Opens SRC, detecting its format unless `forced`.
    fn open(path: &Path, forced: Option<Format>) -> anyhow::Result<Source> {
        match forced {
            Some(Format::Raw) => Source::open_raw(path),
            Some(Format::Insitu) => Ok(Source::open_insitu(path)?),
            None => {
                // A missing or unreadable file fails here, plainly, before any format guessing.
                let raw = Source::open_raw(path)?;
                match Source::open_insitu(path) {
                    Ok(image) => Ok(image),
                    Err(ImageError::NotAnImage(_)) => Ok(raw),
                    // Too short to hold a superblock: certainly not an image.
                    Err(ImageError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::UnexpectedEof =>
                    {
                        Ok(raw)
                    }
                    Err(err @ ImageError::CorruptMetadata(_)) => Err(anyhow!(err).context(
                        "it is an insitu-blk image with corrupt metadata ('insitu-blk check' \
                         explains; -f raw would copy its bytes as they are)",
                    )),
                    Err(err) => Err(err.into()),
                }
            }
        }
    }
}

/// A disk being written.
#[derive(Debug)]
enum Sink {
    Raw {
        storage: FileStorage,
        /// A block device may hold old data: zeros must be written, not skipped.
        write_zeros: bool,
    },
    Insitu(Image),
}

impl Sink {
    /// Granularity of zero skipping: a cluster for an image (a zero cluster stores nothing), a
    /// filesystem block for a raw file.
    fn zero_block(&self) -> usize {
        match self {
            Sink::Raw { .. } => RAW_ZERO_BLOCK,
            Sink::Insitu(image) => image.geometry().cluster_size as usize,
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        match self {
            Sink::Raw { storage, .. } => storage
                .write_at(offset, data)
                .with_context(|| format!("write at byte {offset}")),
            Sink::Insitu(image) => image
                .write(offset, data)
                .with_context(|| format!("write at byte {offset}")),
        }
    }

    /// Writes a chunk, skipping all-zero blocks unless the sink must see them.
    fn write_chunk(&self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        if let Sink::Raw {
            write_zeros: true, ..
        } = self
        {
            return self.write(offset, data);
        }
        for (start, end) in nonzero_runs(data, self.zero_block()) {
            self.write(offset + start as u64, &data[start..end])?;
        }
        Ok(())
    }

    /// Makes everything written so far durable.
    fn flush(&self) -> anyhow::Result<()> {
        match self {
            Sink::Raw { storage, .. } => storage.flush().context("flush"),
            Sink::Insitu(image) => image.flush().context("flush"),
        }
    }

    /// Makes everything durable and releases the image.
    fn finish(self) -> anyhow::Result<()> {
        match self {
            Sink::Raw { storage, .. } => storage.flush().context("flush"),
            Sink::Insitu(image) => {
                image.flush().context("flush")?;
                image.close().context("close")
            }
        }
    }
}

/// `[start, end)` byte ranges of `data` made of consecutive blocks (of `block` bytes, the last one
/// possibly shorter) that are not all zero.
fn nonzero_runs(data: &[u8], block: usize) -> Vec<(usize, usize)> {
    let block = block.max(1);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (index, piece) in data.chunks(block).enumerate() {
        if is_zero(piece) {
            continue;
        }
        let start = index * block;
        let end = start + piece.len();
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Whether every byte is zero. OR-folding fixed-size words lets the compiler vectorise it.
fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let folded = words.by_ref().fold(0u128, |acc, word| {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(word);
        acc | u128::from_ne_bytes(bytes)
    });
    folded == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// Runs `work(offset, len, buf)` on every chunk of `[0, total)` from `threads` threads, chunks
/// handed out in increasing order. Stops at the first error, which it returns, or when `stop` is
/// set (by SIGINT/SIGTERM).
fn for_each_chunk<F>(
    total: u64,
    threads: usize,
    progress: &ProgressBar,
    stop: &AtomicBool,
    work: F,
) -> anyhow::Result<()>
where
    F: Fn(u64, &mut [u8]) -> anyhow::Result<()> + Sync,
{
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut buf = vec![0u8; CHUNK_SIZE as usize];
                while !failed.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    let offset = next.fetch_add(CHUNK_SIZE, Ordering::Relaxed);
                    if offset >= total {
                        break;
                    }
                    let len = (total - offset).min(CHUNK_SIZE) as usize;
                    if let Err(err) = work(offset, &mut buf[..len]) {
                        failed.store(true, Ordering::Relaxed);
                        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(err);
                        break;
                    }
                    progress.inc(len as u64);
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(err) => Err(err),
        None if stop.load(Ordering::Relaxed) => bail!("interrupted by a signal"),
        None => Ok(()),
    }
}

fn progress_bar(total: u64, message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}

/// Identity of an existing file or device, to refuse converting a disk onto itself: the device
/// number for block devices (two nodes may name one device), else the inode.
#[derive(Debug, PartialEq, Eq)]
enum Identity {
    Device(u64),
    Inode(u64, u64),
}

fn identity(path: &Path) -> Option<Identity> {
    let meta = fs::metadata(path).ok()?;
    Some(if meta.file_type().is_block_device() {
        Identity::Device(meta.rdev())
    } else {
        Identity::Inode(meta.dev(), meta.ino())
    })
}

/// Where the converted disk goes and how it becomes visible once complete.
#[derive(Debug)]
enum Destination {
    /// A new file, linked at DST only after the data is written, durable and closed.
    File(NewFile),
    /// A block device holding raw output, written in place; its first chunk is written last.
    RawDevice,
    /// A block device holding an insitu image, written in place; its superblocks are held back
    /// in memory and written last.
    ImageDevice(Arc<HeldSuperblocks>),
}

impl Destination {
    /// Whether chunk 0 must be written after all the others (see [`Destination::RawDevice`]).
    fn first_chunk_last(&self) -> bool {
        matches!(self, Destination::RawDevice)
    }

    /// Makes the finished, closed output visible at DST.
    fn complete(self) -> anyhow::Result<()> {
        match self {
            Destination::File(new) => new.publish().context("cannot put the output in place"),
            Destination::RawDevice => Ok(()),
            Destination::ImageDevice(held) => held.write_through().context("write superblocks"),
        }
    }
}

/// A block device whose superblock copies (its first bytes, up to the end of the last copy) are
/// kept in memory instead of on the device until [`HeldSuperblocks::write_through`]. While a
/// convert fills an image on the device, the device holds no superblock: a killed convert never
/// leaves something that opens (and checks clean) as a complete image.
#[derive(Debug)]
struct HeldSuperblocks {
    device: FileStorage,
    held: Mutex<Vec<u8>>,
}

impl HeldSuperblocks {
    /// Bytes `[0, HELD_LEN)` are held: both superblock copies (docs/FORMAT.md §2).
    const HELD_LEN: u64 = SB_OFFSETS[1] + BLOCK;

    /// Zeroes the device's superblocks (durably, before anything else changes: an old image on
    /// it must not stay valid over half-written new metadata) and starts holding them.
    fn new(device: FileStorage) -> anyhow::Result<HeldSuperblocks> {
        let zeros = vec![0u8; Self::HELD_LEN as usize];
        device
            .write_at(0, &zeros)
            .and_then(|()| device.flush())
            .context("clear old superblocks")?;
        Ok(HeldSuperblocks {
            device,
            held: Mutex::new(zeros),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the held superblocks to the device, durably.
    fn write_through(&self) -> std::io::Result<()> {
        let held = self.held().clone();
        self.device.write_at(0, &held)?;
        self.device.flush()
    }

    /// Splits `[offset, offset + len)` at [`Self::HELD_LEN`]: the length of the held part.
    fn held_part(offset: u64, len: usize) -> usize {
        Self::HELD_LEN.saturating_sub(offset).min(len as u64) as usize
    }
}

impl Storage for HeldSuperblocks {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let (held, rest) = buf.split_at_mut(Self::held_part(offset, buf.len()));
        if !held.is_empty() {
            let start = offset as usize;
            held.copy_from_slice(&self.held()[start..start + held.len()]);
        }
        if rest.is_empty() {
            return Ok(());
        }
        self.device.read_at(offset.max(Self::HELD_LEN), rest)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let (held, rest) = data.split_at(Self::held_part(offset, data.len()));
        if !held.is_empty() {
            let start = offset as usize;
            self.held()[start..start + held.len()].copy_from_slice(held);
        }
        if rest.is_empty() {
            return Ok(());
        }
        self.device.write_at(offset.max(Self::HELD_LEN), rest)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.device.flush()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let end = offset.saturating_add(len);
        let start = offset.max(Self::HELD_LEN);
        if start >= end {
            return Ok(());
        }
        self.device.punch_hole(start, end - start)
    }

    fn len(&self) -> std::io::Result<u64> {
        self.device.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.device.set_len(len)
    }

    fn allocated_bytes(&self) -> std::io::Result<Option<u64>> {
        self.device.allocated_bytes()
    }

    fn try_lock_exclusive(&self) -> std::io::Result<bool> {
        self.device.try_lock_exclusive()
    }

    fn try_lock_shared(&self) -> std::io::Result<bool> {
        self.device.try_lock_shared()
    }

    fn unlock(&self) -> std::io::Result<()> {
        self.device.unlock()
    }

    fn is_block_device(&self) -> bool {
        self.device.is_block_device()
    }

    fn allocated_ranges(&self, offset: u64, len: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        self.device.allocated_ranges(offset, len)
    }

    fn preallocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.device.preallocate(offset, len)
    }

    fn drop_cached(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.device.drop_cached(offset, len)
    }
}

/// Opens DST for writing `format`, a disk of `len` bytes: a new file out of sight, or the block
/// device in place.
fn create_sink(
    config: &ConvertConfig,
    format: Format,
    source: &Source,
    len: u64,
    dst_is_block_device: bool,
) -> anyhow::Result<(Sink, Destination)> {
    let dst = &config.dst;
    let (new_file, storage) = if dst_is_block_device {
        let device = open_block_device_exclusively(dst)?;
        // Before the first byte is written: a device served right now (or being converted or
        // formatted by another process) is left alone, --force or not.
        if !device.try_lock_exclusive()? {
            bail!("the device is in use (another process holds its writer lock)");
        }
        (None, device)
    } else {
        let new = NewFile::create(dst)?;
        let storage = FileStorage::from_file(new.file().try_clone()?)?;
        (Some(new), storage)
    };
    match format {
        Format::Raw => {
            let destination = match new_file {
                Some(new) => {
                    // Holes from the start: only non-zero data is written afterwards.
                    storage.set_len(len)?;
                    Destination::File(new)
                }
                None => {
                    let capacity = storage.len()?;
                    if capacity < len {
                        bail!("block device holds {capacity} bytes, the disk needs {len}");
                    }
                    if capacity > len {
                        note(&format!(
                            "'{}' holds {capacity} bytes; bytes past {len} are left as they are",
                            dst.display()
                        ));
                    }
                    // Cleared now and written last: a partial copy carries no partition table
                    // or filesystem signature, and a retry finds an empty start.
                    let first = vec![0u8; len.min(CHUNK_SIZE) as usize];
                    storage
                        .write_at(0, &first)
                        .and_then(|()| storage.flush())
                        .context("clear the first chunk")?;
                    Destination::RawDevice
                }
            };
            let write_zeros = dst_is_block_device;
            Ok((
                Sink::Raw {
                    storage,
                    write_zeros,
                },
                destination,
            ))
        }
        Format::Insitu => {
            // An insitu source passes on its geometry unless told otherwise; a raw source gets
            // the defaults `create` would choose for the same algorithm.
            let (inherited_cluster, inherited_compression) = match source {
                Source::Insitu(image) => {
                    let g = image.geometry();
                    (Some(g.cluster_size), g.compression)
                }
                Source::Raw { .. } => (None, Compression::default()),
            };
            let compression = config.compression.unwrap_or(inherited_compression);
            let options = CreateOptions {
                size: len,
                cluster_size: config
                    .cluster_size
                    // A 4 or 8 KiB uncompressed source recompressed keeps no cluster size a
                    // codec cannot use: the codec's default instead.
                    .or(inherited_cluster.filter(|&c| {
                        compression == Compression::None || c >= MIN_COMPRESSED_CLUSTER_SIZE
                    }))
                    .unwrap_or_else(|| default_cluster_size(compression)),
                compression,
            };
            let (storage, destination): (Arc<dyn Storage>, Destination) = match new_file {
                Some(new) => (Arc::new(storage), Destination::File(new)),
                None => {
                    let held = Arc::new(HeldSuperblocks::new(storage)?);
                    (held.clone(), Destination::ImageDevice(held))
                }
            };
            Image::create_on(Arc::clone(&storage), &options)?;
            let image = Image::open_on(storage, &OpenOptions::default())?;
            Ok((Sink::Insitu(image), destination))
        }
    }
}

/// Converts, then compares if asked. Until the copy is complete nothing appears at a file DST;
/// a DST that fails the comparison is removed again.
pub fn run(config: ConvertConfig) -> anyhow::Result<()> {
    let src_name = config.src.display().to_string();
    let dst_name = config.dst.display().to_string();

    ensure_input_exists(&config.src)?;
    let source = Source::open(&config.src, config.source_format)
        .with_context(|| format!("cannot open '{src_name}'"))?;
    let len = source.len();
    if len == 0 {
        bail!("'{src_name}' is empty; there is nothing to convert");
    }
    let output_format = config.output_format.unwrap_or(match source.format() {
        Format::Raw => Format::Insitu,
        Format::Insitu => Format::Raw,
    });
    if output_format == Format::Raw
        && (config.cluster_size.is_some() || config.compression.is_some())
    {
        bail!("--cluster-size and --compression only apply to insitu output (-O insitu)");
    }
    if identity(&config.dst).is_some() && identity(&config.dst) == identity(&config.src) {
        bail!("'{src_name}' and '{dst_name}' are the same file");
    }
    let dst_is_block_device = ensure_new_or_block_device(&config.dst)?;
    if dst_is_block_device {
        ensure_device_may_be_overwritten(&config.dst, config.force)?;
    }
    if let Source::Raw { data_len, len, .. } = &source {
        if data_len != len {
            note(&format!(
                "'{src_name}' is {data_len} bytes, not a multiple of {SECTOR_SIZE}; the disk is \
                 rounded up to {len} bytes (zero-padded)"
            ));
        }
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // The first signal asks the copy to stop (and the partial output to be dropped); a second
        // one ends the process at once, as if no handler were installed.
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&interrupted))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&interrupted)))
            .context("cannot install signal handlers")?;
    }
    convert(
        &config,
        &source,
        output_format,
        len,
        dst_is_block_device,
        &interrupted,
    )?;
    if config.compare {
        if let Err(err) = compare(&config, &source, output_format, len, &interrupted) {
            if !dst_is_block_device {
                // We created it (it did not exist before): a copy known to differ is worse than
                // none.
                let _ = fs::remove_file(&config.dst);
            }
            return Err(err);
        }
        print_out("Images are identical.\n");
    }
    Ok(())
}

/// Copies SRC to DST and makes DST visible; on failure or interruption a file DST never appears
/// (the unfinished file is dropped).
fn convert(
    config: &ConvertConfig,
    source: &Source,
    output_format: Format,
    len: u64,
    dst_is_block_device: bool,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let src_name = config.src.display().to_string();
    let dst_name = config.dst.display().to_string();

    let (sink, destination) = create_sink(config, output_format, source, len, dst_is_block_device)
        .with_context(|| format!("cannot create '{dst_name}'"))?;
    let deferred_first_chunk: Mutex<Option<Vec<u8>>> = Mutex::new(None);
    let first_chunk_last = destination.first_chunk_last();
    let progress = progress_bar(len, "converting");
    for_each_chunk(len, config.threads, &progress, stop, |offset, buf| {
        source
            .read(offset, buf)
            .with_context(|| format!("reading '{src_name}'"))?;
        if offset == 0 && first_chunk_last {
            *deferred_first_chunk
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(buf.to_vec());
            return Ok(());
        }
        sink.write_chunk(offset, buf)
            .with_context(|| format!("writing '{dst_name}'"))
    })?;
    if let Some(first) = deferred_first_chunk
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        sink.flush()
            .and_then(|()| sink.write_chunk(0, &first))
            .with_context(|| format!("writing '{dst_name}'"))?;
    }
    sink.finish()
        .with_context(|| format!("finishing '{dst_name}'"))?;
    destination
        .complete()
        .with_context(|| format!("finishing '{dst_name}'"))?;
    progress.finish_and_clear();
    Ok(())
}

/// Re-reads SRC and the freshly written DST (opened anew, so what is compared is what is on
/// disk) and fails at the first differing byte.
fn compare(
    config: &ConvertConfig,
    source: &Source,
    output_format: Format,
    len: u64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let dst_name = config.dst.display().to_string();
    let written = Source::open(&config.dst, Some(output_format))
        .with_context(|| format!("cannot reopen '{dst_name}' to compare"))?;
    if written.len() < len {
        bail!(
            "compare failed: '{dst_name}' is {} bytes, shorter than the {len} bytes of the source",
            written.len()
        );
    }
    let first_difference = AtomicU64::new(u64::MAX);
    let progress = progress_bar(len, "comparing");
    for_each_chunk(len, config.threads, &progress, stop, |offset, buf| {
        // Chunks after a known difference cannot lower it.
        if offset > first_difference.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut other = vec![0u8; buf.len()];
        source.read(offset, buf).context("re-reading the source")?;
        written
            .read(offset, &mut other)
            .with_context(|| format!("reading back '{dst_name}'"))?;
        if let Some(index) = buf.iter().zip(&other).position(|(a, b)| a != b) {
            first_difference.fetch_min(offset + index as u64, Ordering::Relaxed);
        }
        Ok(())
    })?;
    progress.finish_and_clear();
    match first_difference.into_inner() {
        u64::MAX => Ok(()),
        offset => bail!(
            "compare failed: '{}' and '{dst_name}' differ, first at byte offset {offset}",
            config.src.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn config(args: &[&str]) -> anyhow::Result<ConvertConfig> {
        let mut full = vec!["insitu-blk", "convert"];
        full.extend(args.iter().copied());
        let cli = Cli::try_parse_from(full).map_err(|e| anyhow!("{e}"))?;
        match cli.command {
            Command::Convert(args) => ConvertConfig::try_from(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn formats_and_options_parse() {
        let cfg = config(&[
            "a.raw",
            "b.img",
            "-O",
            "insitu",
            "--cluster-size",
            "16k",
            "-c",
            "zstd",
            "--compare",
            "--threads",
            "2",
        ])
        .unwrap();
        assert_eq!(cfg.output_format, Some(Format::Insitu));
        assert_eq!(cfg.cluster_size, Some(16 << 10));
        assert_eq!(cfg.compression, Some(Compression::Zstd { level: 3 }));
        assert!(cfg.compare);
        assert_eq!(cfg.threads, 2);
        let cfg = config(&["-f", "raw", "a", "b"]).unwrap();
        assert_eq!(cfg.source_format, Some(Format::Raw));
        assert_eq!(cfg.output_format, None);
        assert!(cfg.threads >= 1 && cfg.threads <= MAX_DEFAULT_THREADS);
    }

    #[test]
    fn image_options_with_raw_output_are_rejected() {
        let err = config(&["a", "b", "-O", "raw", "--compression", "lz4"]).unwrap_err();
        assert!(
            err.to_string().contains("only apply to insitu output"),
            "{err}"
        );
        let err = config(&["-f", "insitu", "a", "b", "--cluster-size", "64K"]).unwrap_err();
        assert!(
            err.to_string().contains("only apply to insitu output"),
            "{err}"
        );
        assert!(config(&["a", "b", "-O", "qcow2"]).is_err());
        assert!(config(&["a", "b", "--threads", "0"]).is_err());
        assert!(config(&["a", "b", "--cluster-size", "3K"]).is_err());
    }

    #[test]
    fn zero_runs_are_skipped_at_block_granularity() {
        let mut data = vec![0u8; 16 * 1024 + 512];
        assert!(nonzero_runs(&data, 4096).is_empty());
        data[5000] = 1; // block 1
        data[9000] = 1; // block 2, merges with block 1
        data[16 * 1024 + 100] = 1; // the short tail block
        assert_eq!(
            nonzero_runs(&data, 4096),
            vec![(4096, 12288), (16384, 16896)]
        );
        assert_eq!(nonzero_runs(&data, 65536), vec![(0, data.len())]);
    }

    /// The superblock hold on a plain file (the real device case runs in tests/cli.rs with
    /// INSITU_BLK_LOOP_TESTS=1): an image formatted, filled and closed through it has no
    /// superblock on the storage until `write_through`, then opens with everything written.
    #[test]
    fn held_superblocks_reach_the_storage_only_at_the_end() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held.img");
        let file = fs::File::create_new(&path).unwrap();
        file.write_all_at(&[0xAB; 16384], 0).unwrap();
        let storage = FileStorage::open(&path, false).unwrap();
        let held = Arc::new(HeldSuperblocks::new(storage).unwrap());
        let options = CreateOptions::new(4 << 20);
        Image::create_on(held.clone(), &options).unwrap();
        let image = Image::open_on(held.clone(), &OpenOptions::default()).unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        image.write(1 << 20, &data).unwrap();
        image.flush().unwrap();
        image.close().unwrap();

        let mut start = vec![0xFFu8; HeldSuperblocks::HELD_LEN as usize];
        file.read_exact_at(&mut start, 0).unwrap();
        assert!(is_zero(&start), "superblocks reached the storage early");
        let err = Image::open(&path, &OpenOptions::default()).unwrap_err();
        assert!(matches!(err, ImageError::NotAnImage(_)), "{err}");

        held.write_through().unwrap();
        let image = Image::open(&path, &OpenOptions::default()).unwrap();
        let mut back = vec![0u8; data.len()];
        image.read(1 << 20, &mut back).unwrap();
        assert!(back == data);
        image.close().unwrap();
        let report = insitu_blk::image::check(&path, false).unwrap();
        assert!(report.corruptions.is_empty(), "{report:?}");
        assert_eq!(report.leaked_bytes, 0, "{report:?}");
    }

    #[test]
    fn is_zero_sees_every_byte() {
        for len in [0usize, 1, 15, 16, 17, 4096, 4097] {
            let mut data = vec![0u8; len];
            assert!(is_zero(&data));
            for i in 0..len {
                data[i] = 0x80;
                assert!(!is_zero(&data), "len {len} byte {i}");
                data[i] = 0;
            }
        }
    }

    #[test]
    fn raw_source_pads_an_unaligned_tail_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.raw");
        fs::write(&path, vec![0xAAu8; 1000]).unwrap();
        let source = Source::open_raw(&path).unwrap();
        assert_eq!(source.len(), 1024);
        let mut buf = vec![0xFFu8; 1024];
        source.read(0, &mut buf).unwrap();
        assert!(buf[..1000].iter().all(|&b| b == 0xAA));
        assert!(buf[1000..].iter().all(|&b| b == 0));
    }

    fn raw_pair(a: &[u8], b: &[u8]) -> (tempfile::TempDir, ConvertConfig, Source) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.raw");
        let dst = dir.path().join("b.raw");
        fs::write(&src, a).unwrap();
        fs::write(&dst, b).unwrap();
        let cfg = config(&[
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--threads",
            "3",
        ])
        .unwrap();
        let source = Source::open_raw(&src).unwrap();
        (dir, cfg, source)
    }

    #[test]
    fn compare_reports_the_first_differing_offset_across_threads() {
        let len = 5 * CHUNK_SIZE as usize + 4096;
        let a: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let (_dir, cfg, source) = raw_pair(&a, &a);
        compare(
            &cfg,
            &source,
            Format::Raw,
            len as u64,
            &AtomicBool::new(false),
        )
        .unwrap();

        let mut b = a.clone();
        for offset in [
            4 * CHUNK_SIZE as usize + 3,
            CHUNK_SIZE as usize + 17,
            len - 1,
        ] {
            b[offset] ^= 1;
        }
        let (_dir, cfg, source) = raw_pair(&a, &b);
        let err = compare(
            &cfg,
            &source,
            Format::Raw,
            len as u64,
            &AtomicBool::new(false),
        )
        .unwrap_err();
        let expected = format!("first at byte offset {}", CHUNK_SIZE + 17);
        assert!(err.to_string().contains(&expected), "{err}");

        let (_dir, cfg, source) = raw_pair(&a, &a[..len - 512]);
        let err = compare(
            &cfg,
            &source,
            Format::Raw,
            len as u64,
            &AtomicBool::new(false),
        )
        .unwrap_err();
        assert!(err.to_string().contains("shorter"), "{err}");
    }

    #[test]
    fn chunks_cover_everything_once_and_the_first_error_stops_the_copy() {
        let total = 5 * CHUNK_SIZE + 4096;
        let seen = Mutex::new(Vec::new());
        for_each_chunk(
            total,
            3,
            &ProgressBar::hidden(),
            &AtomicBool::new(false),
            |offset, buf| {
                seen.lock().unwrap().push((offset, buf.len() as u64));
                Ok(())
            },
        )
        .unwrap();
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        let expected: Vec<(u64, u64)> = (0..6)
            .map(|i| (i * CHUNK_SIZE, if i == 5 { 4096 } else { CHUNK_SIZE }))
            .collect();
        assert_eq!(seen, expected);

        let err = for_each_chunk(
            total,
            2,
            &ProgressBar::hidden(),
            &AtomicBool::new(false),
            |offset, _| {
                if offset == 2 * CHUNK_SIZE {
                    bail!("disk on fire at {offset}");
                }
                Ok(())
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");

        let stop = AtomicBool::new(false);
        let done = AtomicU64::new(0);
        let err = for_each_chunk(total, 1, &ProgressBar::hidden(), &stop, |_, _| {
            if done.fetch_add(1, Ordering::Relaxed) == 1 {
                stop.store(true, Ordering::Relaxed);
            }
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
        assert_eq!(done.into_inner(), 2, "work went on after the stop request");
    }
}
