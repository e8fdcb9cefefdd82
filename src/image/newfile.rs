//! A new regular file that appears at its final path complete, or not at all.
//!
//! `create` and `convert` used to build an image under its final name: a process killed half way
//! (or a power cut) left a file there that was not an image, or a truncated one that looked
//! valid. [`NewFile`] builds the file where nobody can open it by name and *publishes* it at the
//! end: data made durable, then linked at the final path without ever replacing an existing file,
//! then the directory made durable.
//!
//! Where the file is built:
//! - preferably an unnamed file (`O_TMPFILE` in the final directory): a killed process leaves
//!   nothing behind at all, the kernel frees the inode; it is linked in with `linkat` (through
//!   `/proc/self/fd`), which fails with `EEXIST` instead of replacing;
//! - on filesystems without `O_TMPFILE` (NFS, some FUSE) or without `/proc`, a hidden temporary
//!   `.NAME.insitu-tmp.PID` in the same directory, created with `O_EXCL`, moved into place with
//!   `renameat2(RENAME_NOREPLACE)` (or `link` + `unlink` where that is unsupported), and removed
//!   again when dropped unpublished. Its creator holds an open-file-description lock on it for
//!   its whole life, so a later [`NewFile::create`] for the same name can tell a temporary left
//!   by a killed process (lock free) from one still being built, and removes only the former.

use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Marks the hidden temporaries: `.NAME` + this + the creator's pid.
const TEMP_INFIX: &str = ".insitu-tmp.";
/// Where this process's open files have names.
const PROC_FDS: &str = "/proc/self/fd";

/// Where the file being built lives until it is published.
#[derive(Debug)]
enum Staging {
    /// `O_TMPFILE`: no name at all.
    Unnamed,
    /// A hidden temporary in the final directory, removed on drop unless published.
    Named(PathBuf),
}

/// A regular file under construction; see the module documentation.
#[derive(Debug)]
pub struct NewFile {
    file: File,
    final_path: PathBuf,
    directory: PathBuf,
    staging: Staging,
    published: bool,
}

impl NewFile {
    /// Starts a new file that will appear at `final_path`. Fails with `AlreadyExists` when
    /// something (even a dangling symlink) is there already.
    pub fn create(final_path: &Path) -> io::Result<NewFile> {
        if fs::symlink_metadata(final_path).is_ok() {
            return Err(already_exists(final_path));
        }
        let name = final_path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{}' does not name a file", final_path.display()),
            )
        })?;
        let directory = match final_path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Linking an unnamed file in without privileges goes through /proc/self/fd.
        if !Path::new(PROC_FDS).is_dir() {
            return Self::create_named(final_path, &directory, name.as_bytes());
        }
        let unnamed = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o666)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(&directory);
        match unnamed {
            Ok(file) => {
                return Ok(NewFile {
                    file,
                    final_path: final_path.to_path_buf(),
                    directory,
                    staging: Staging::Unnamed,
                    published: false,
                })
            }
            // The filesystem (or an old kernel) has no O_TMPFILE: use a hidden named file.
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) => {}
            Err(err) => return Err(err),
        }
        Self::create_named(final_path, &directory, name.as_bytes())
    }

    /// The fallback: a hidden temporary next to the final path.
    fn create_named(final_path: &Path, directory: &Path, name: &[u8]) -> io::Result<NewFile> {
        let mut prefix = Vec::from(&b"."[..]);
        prefix.extend_from_slice(name);
        prefix.extend_from_slice(TEMP_INFIX.as_bytes());
        remove_stale_temporaries(directory, &prefix);
        let mut temp_name = prefix;
        temp_name.extend_from_slice(std::process::id().to_string().as_bytes());
        let temp = directory.join(OsString::from_vec(temp_name));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o666)
            .custom_flags(libc::O_CLOEXEC)
            .open(&temp)?;
        let new = NewFile {
            file,
            final_path: final_path.to_path_buf(),
            directory: directory.to_path_buf(),
            staging: Staging::Named(temp),
            published: false,
        };
        // Held until the process exits: tells other creators this temporary is alive. (A lock
        // of the other kind than the image writer lock, `flock`, so the two never interfere.)
        if !try_lock_whole_file(&new.file)? {
            return Err(io::Error::other(
                "a fresh temporary file is locked by someone else",
            ));
        }
        Ok(new)
    }

    /// The file being built (clone it with `try_clone` to hand it to a storage).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The hidden temporary's path, when the filesystem needed one (`None` for an unnamed file).
    pub fn temporary_path(&self) -> Option<&Path> {
        match &self.staging {
            Staging::Unnamed => None,
            Staging::Named(path) => Some(path),
        }
    }

    /// Makes the data durable, links the file at its final path (failing with `AlreadyExists`
    /// rather than replacing anything that appeared there meanwhile) and makes the directory
    /// entry durable. On any error nothing is left at the final path. Every handle to the file other than [`NewFile::file`] should be closed
    /// first, so that nothing writes to it after it became visible.
    pub fn publish(mut self) -> io::Result<()> {
        self.file.sync_all()?;
        match &self.staging {
            Staging::Unnamed => link_unnamed(&self.file, &self.final_path)?,
            Staging::Named(temp) => rename_no_replace(temp, &self.final_path)?,
        }
        self.published = true;
        let synced = File::open(&self.directory).and_then(|dir| dir.sync_all());
        if synced.is_err() {
            // Not known to be durable: take it back, so that an error means "nothing there".
            let _ = fs::remove_file(&self.final_path);
        }
        synced
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if let (false, Staging::Named(temp)) = (self.published, &self.staging) {
            let _ = fs::remove_file(temp);
        }
    }
}

fn already_exists(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("'{}' already exists", path.display()),
    )
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Gives an `O_TMPFILE` file its name: `linkat` through `/proc/self/fd` (which, unlike
/// `AT_EMPTY_PATH`, needs no privilege).
fn link_unnamed(file: &File, target: &Path) -> io::Result<()> {
    let target_c = c_path(target)?;
    let proc_path = c_path(Path::new(&format!("{PROC_FDS}/{}", file.as_raw_fd())))?;
    // SAFETY: both paths are NUL-terminated strings that live across the call; both directory
    // fds are AT_FDCWD.
    let ret = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(map_exists(io::Error::last_os_error(), target))
    }
}

/// Moves `from` to `to` unless `to` exists.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    let (from_c, to_c) = (c_path(from)?, c_path(to)?);
    // SAFETY: both paths are NUL-terminated strings that live across the call.
    let ret = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        return Err(map_exists(err, to));
    }
    // No RENAME_NOREPLACE here (NFS, old kernels): link fails on an existing target, and the
    // temporary's name goes only once the final one is in place.
    fs::hard_link(from, to).map_err(|e| map_exists(e, to))?;
    // The file is in place; a second name left behind is only a stale temporary (the next
    // create for this name removes it, and with it only that name).
    let _ = fs::remove_file(from);
    Ok(())
}

fn map_exists(err: io::Error, path: &Path) -> io::Error {
    if err.kind() == io::ErrorKind::AlreadyExists {
        already_exists(path)
    } else {
        err
    }
}

/// Takes a non-blocking write lock on the whole file, owned by this open file description
/// (`F_OFD_SETLK`): `Ok(false)` when another description holds one.
fn try_lock_whole_file(file: &File) -> io::Result<bool> {
    // SAFETY: flock is a plain C struct; all-zero is a valid value of it.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = l_len = 0: the whole file, however it grows; l_pid must be 0 for OFD locks.
    // SAFETY: F_OFD_SETLK reads one `struct flock` through the pointer, which points at a live
    // local of that type for the duration of the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return Ok(false);
    }
    Err(err)
}

/// Removes the hidden temporaries for one final name that were left by killed processes: those
/// whose lock can be taken. Best effort: anything unexpected is left alone.
fn remove_stale_temporaries(directory: &Path, prefix: &[u8]) {
    let Ok(entries) = fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.as_bytes().strip_prefix(prefix) else {
            continue;
        };
        if pid.is_empty() || !pid.iter().all(u8::is_ascii_digit) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        else {
            continue;
        };
        let (Ok(opened), Ok(named)) = (file.metadata(), fs::symlink_metadata(&path)) else {
            continue;
        };
        // Still the same file under that name (not published or replaced meanwhile), and its
        // creator is gone (its lock died with it).
        if opened.is_file()
            && (opened.dev(), opened.ino()) == (named.dev(), named.ino())
            && try_lock_whole_file(&file).unwrap_or(false)
        {
            let _ = fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn contents(path: &Path) -> Vec<u8> {
        let mut data = Vec::new();
        File::open(path).unwrap().read_to_end(&mut data).unwrap();
        data
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_file_appears_only_when_published() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        let new = NewFile::create(&path).unwrap();
        new.file().write_all(b"complete").unwrap();
        assert!(!path.exists());
        new.publish().unwrap();
        assert_eq!(contents(&path), b"complete");
        assert_eq!(names(dir.path()), ["a.img"]);
    }

    #[test]
    fn an_unpublished_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        let new = NewFile::create(&path).unwrap();
        new.file().write_all(b"half").unwrap();
        drop(new);
        assert!(names(dir.path()).is_empty());
        let new = NewFile::create_named(&path, dir.path(), b"a.img").unwrap();
        assert!(new.temporary_path().unwrap().exists());
        drop(new);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn publishing_never_replaces_a_file_that_appeared_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        let unnamed = NewFile::create(&path).unwrap();
        let named = NewFile::create_named(&path, dir.path(), b"a.img").unwrap();
        fs::write(&path, b"precious").unwrap();
        for new in [unnamed, named] {
            new.file().write_all(b"mine").unwrap();
            let err = new.publish().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
            assert_eq!(contents(&path), b"precious");
        }
        assert_eq!(names(dir.path()), ["a.img"]);
        let err = NewFile::create(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn the_named_fallback_publishes_and_skips_live_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.img");
        // A temporary of a process that is gone: no lock on it.
        let stale = dir.path().join(".b.img.insitu-tmp.999999999");
        fs::write(&stale, b"left by a killed convert").unwrap();
        // A live one (another creator, here in this process through its own description).
        let live = NewFile::create_named(&dir.path().join("c.img"), dir.path(), b"c.img").unwrap();
        let live_path = live.temporary_path().unwrap().to_path_buf();
        // Live temporaries of the same name: the lock protects them.
        let other = dir.path().join(".b.img.insitu-tmp.1");
        fs::hard_link(&live_path, &other).unwrap();

        let new = NewFile::create_named(&path, dir.path(), b"b.img").unwrap();
        assert!(!stale.exists(), "the stale temporary was not removed");
        assert!(other.exists(), "a live temporary was removed");
        new.file().write_all(b"named").unwrap();
        new.publish().unwrap();
        assert_eq!(contents(&path), b"named");
        fs::remove_file(&other).unwrap();
        drop(live);
        assert_eq!(names(dir.path()), ["b.img"]);
    }
}
