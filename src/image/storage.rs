//! The engine's only door to bytes: a small storage trait, a real implementation for files and
//! block devices, and an in-memory one for tests.
//!
//! The engine never calls `std::fs` directly; everything goes through [`Storage`]. That is what lets
//! the crash simulator (tests) sit under the real engine and decide which unflushed writes survive.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

/// Byte-addressed storage with an explicit durability barrier.
///
/// Contract (what the crash simulator models):
/// - `write_at` and `punch_hole` are *volatile* until a later `flush` returns `Ok`; a crash may keep
///   any subset of them, and a write may be torn (only some of its 512-byte sectors land).
/// - `flush` makes every write and punch that completed before it was called durable.
/// - After `punch_hole`, the range reads as zeros on files; on block devices its content is
///   unspecified. The engine never relies on punched bytes.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`. Fails with `UnexpectedEof` past the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Durability barrier (fdatasync on files and block devices).
    fn flush(&self) -> io::Result<()>;
    /// Releases the space of a range (PUNCH_HOLE|KEEP_SIZE on files, BLKDISCARD on block devices).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty (length 0).
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Grows or shrinks a file. Block devices cannot change size: `len` must not exceed capacity.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Bytes the host really stores for this image (st_blocks × 512), when known.
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// Takes the exclusive writer lock (I8) without blocking. `Ok(false)` when another holder has it.
    fn try_lock_exclusive(&self) -> io::Result<bool>;
    /// Takes a shared lock without blocking (a read-only server: no writer may open the image
    /// meanwhile; other readers may). `Ok(false)` when a writer holds the exclusive lock.
    /// Released by [`Storage::unlock`]. Storages without locks grant it.
    fn try_lock_shared(&self) -> io::Result<bool> {
        Ok(true)
    }
    /// Releases the lock taken by [`Storage::try_lock_exclusive`] or
    /// [`Storage::try_lock_shared`].
    fn unlock(&self) -> io::Result<()>;
    /// True for block devices (no holes: discarded ranges are not guaranteed to read as zeros).
    fn is_block_device(&self) -> bool {
        false
    }
    /// Ranges `(offset, len)` inside `[offset, offset + len)` that hold allocated host space, in
    /// increasing order, or `None` when the storage cannot tell (then `check` reports no leaks).
    fn allocated_ranges(&self, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        let _ = (offset, len);
        Ok(None)
    }
    /// Allocates host space for a range now (fallocate), so writes into it cannot fail with
    /// ENOSPC later. Storages that cannot run out of space do nothing.
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Drops cached copies of a range so the next read comes from the device. After a failed
    /// fdatasync, Linux marks the pages that did not reach the disk clean and keeps them: a
    /// later reader would see data the disk does not hold. A read-write load calls this on the
    /// metadata areas before trusting them. A hint: storages without a cache do nothing.
    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Starts writing a range back to the device without waiting for it, so that a later
    /// `flush` has less left to write (a checkpoint written ahead of need, a batch at a time).
    /// A hint: storages without a cache do nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
}

/// `BLKGETSIZE64 = _IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKDISCARD = _IO(0x12, 119)`.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    block_device: bool,
}

impl FileStorage {
    /// Opens an existing file or block device. Anything else (a FIFO, whose open would block
    /// until a writer comes, a socket, a character device such as `/dev/zero`) is refused with
    /// `InvalidInput` before it is opened.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let kind = std::fs::metadata(path)?.file_type();
        let what = if kind.is_fifo() {
            Some("a FIFO")
        } else if kind.is_socket() {
            Some("a socket")
        } else if kind.is_char_device() {
            Some("a character device")
        } else if kind.is_dir() {
            Some("a directory")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is {what}, not a regular file or a block device",
                    path.display()
                ),
            ));
        }
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file)
    }

    /// Creates a new regular file (fails if it exists), or opens a block device for writing.
    pub fn create(path: &Path) -> io::Result<Self> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_block_device() => Self::open(path, false),
            _ => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)?;
                Self::from_file(file)
            }
        }
    }

    /// Wraps an already opened file.
    pub fn from_file(file: File) -> io::Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(Self { file, block_device })
    }
}

impl FileStorage {
    /// `flock(kind | LOCK_NB)`: `Ok(false)` when a conflicting lock is held.
    fn try_flock(&self, kind: libc::c_int) -> io::Result<bool> {
        // SAFETY: flock takes the fd and flags by value.
        let ret = unsafe { libc::flock(self.file.as_raw_fd(), kind | libc::LOCK_NB) };
        if ret == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(false);
        }
        Err(err)
    }
}

impl Storage for FileStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(length)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "punch range too large",
            ));
        };
        if self.block_device {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKDISCARD reads a `[u64; 2]` (start, length) from the pointer, which points
            // at a live local array of exactly that type for the duration of the call.
            let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD, &range) };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
        // SAFETY: fallocate takes the fd by value and plain integers; no memory is shared.
        let ret = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                length,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            // Filesystems without hole support: zero the range instead so reads stay defined.
            if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return write_zeros(&self.file, offset, len);
            }
            return Err(err);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
            let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(size);
        }
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            if len > self.len()? {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "block device is smaller than the image needs",
                ));
            }
            return Ok(());
        }
        self.file.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        if self.block_device {
            return Ok(None);
        }
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }

    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device || len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range out of bounds",
            ));
        };
        // SAFETY: fallocate takes the fd, mode and range by value and touches no memory.
        let ret = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                off,
                length,
            )
        };
        if ret != 0 {
            let err = io::Error::last_os_error();
            // Filesystems without fallocate: nothing to reserve with, writes take their chance.
            if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return Ok(());
            }
            return Err(err);
        }
        Ok(())
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(length)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Ok(());
        };
        // SAFETY: sync_file_range takes the fd, range and flags by value and touches no memory.
        let ret = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                off,
                length,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Ok(());
        };
        // SAFETY: posix_fadvise takes the fd, range and advice by value and touches no memory.
        let ret = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                off,
                length,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        // posix_fadvise returns the error number instead of setting errno.
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        Ok(())
    }

    fn try_lock_exclusive(&self) -> io::Result<bool> {
        self.try_flock(libc::LOCK_EX)
    }

    fn try_lock_shared(&self) -> io::Result<bool> {
        self.try_flock(libc::LOCK_SH)
    }

    fn unlock(&self) -> io::Result<()> {
        // SAFETY: flock takes the fd and flags by value.
        let ret = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn allocated_ranges(&self, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        if self.block_device {
            return Ok(None);
        }
        let end = offset.saturating_add(len).min(self.len()?);
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let Ok(at) = i64::try_from(pos) else { break };
            // SAFETY: lseek takes the fd and plain integers; no memory is shared.
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after pos
                }
                if err.raw_os_error() == Some(libc::EINVAL) {
                    return Ok(None); // filesystem without SEEK_DATA
                }
                return Err(err);
            }
            let data = data as u64;
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io::Error::last_os_error());
            }
            let hole = (hole as u64).min(end);
            out.push((data, hole - data));
            pos = hole;
        }
        Ok(Some(out))
    }
}

fn write_zeros(file: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    let zeros = vec![0u8; 64 * 1024];
    while len > 0 {
        let n = len.min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Storage in a `Vec<u8>`: every write is immediately "durable". For unit tests and fuzzing.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: Mutex<Vec<u8>>,
    locked: AtomicBool,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Storage holding `bytes` (e.g. an image image read from a fuzzer input).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Mutex::new(bytes),
            locked: AtomicBool::new(false),
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn range(offset: u64, len: usize, total: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
    let end = start.checked_add(len).ok_or(io::ErrorKind::UnexpectedEof)?;
    if end > total {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(start..end)
}

impl Storage for MemStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let r = range(offset, buf.len(), bytes.len())?;
        buf.copy_from_slice(&bytes[r]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(data.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if end > bytes.len() {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let total = bytes.len() as u64;
        let start = offset.min(total) as usize;
        let end = offset.saturating_add(len).min(total) as usize;
        bytes[start..end].fill(0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self
            .bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .resize(len, 0);
        Ok(())
    }

    fn try_lock_exclusive(&self) -> io::Result<bool> {
        Ok(!self.locked.swap(true, Ordering::AcqRel))
    }

    /// Models a sparse file: every 4 KiB block that is not all zeros counts as allocated.
    fn allocated_ranges(&self, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        let bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let total = bytes.len() as u64;
        let end = offset.saturating_add(len).min(total);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset / 4096 * 4096;
        while pos < end {
            let stop = (pos + 4096).min(total);
            if bytes[pos as usize..stop as usize].iter().any(|&b| b != 0) {
                let start = pos.max(offset);
                let stop = stop.min(end);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == start => *l += stop - start,
                    _ => out.push((start, stop - start)),
                }
            }
            pos += 4096;
        }
        Ok(Some(out))
    }

    fn unlock(&self) -> io::Result<()> {
        self.locked.store(false, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_storage_punches_holes_that_read_as_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let storage = FileStorage::create(&path).expect("create");
        storage.set_len(1 << 20).expect("set_len");
        storage.write_at(0, &[0xAB; 1 << 20]).expect("write");
        storage.flush().expect("flush");
        let before = storage.allocated_bytes().expect("stat").expect("file");
        storage.punch_hole(64 * 1024, 512 * 1024).expect("punch");
        let after = storage.allocated_bytes().expect("stat").expect("file");
        assert!(
            after < before,
            "punch released nothing: {before} -> {after}"
        );
        let mut buf = vec![1u8; 4096];
        storage.read_at(64 * 1024, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        storage.read_at(0, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn second_exclusive_lock_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let first = FileStorage::create(&path).expect("create");
        let second = FileStorage::open(&path, false).expect("open");
        assert!(first.try_lock_exclusive().expect("lock"));
        assert!(!second.try_lock_exclusive().expect("lock"));
        first.unlock().expect("unlock");
        assert!(second.try_lock_exclusive().expect("lock"));
    }

    #[test]
    fn mem_storage_reads_past_the_end_fail() {
        let storage = MemStorage::from_bytes(vec![0; 100]);
        let mut buf = [0u8; 8];
        assert!(storage.read_at(96, &mut buf).is_err());
        assert!(storage.read_at(u64::MAX, &mut buf).is_err());
    }
}
