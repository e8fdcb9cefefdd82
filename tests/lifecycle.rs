//! The image's life across processes, on real files: what a quiesce, a close, a kill and a
//! restart leave in the journal for the next opener (a migration destination, a restarted
//! backend), and when that opener must tell the guest that completed writes were lost.
//!
//! Each `Image` below stands for one backend process: `abandon` is its SIGKILL (nothing more is
//! committed), `close` its SIGTERM, `quiesce` a VM pause or the end of a migration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use insitu_blk::image::{CreateOptions, Image, OpenOptions};

const CLUSTER: usize = 64 * 1024;

fn new_image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.insitu");
    Image::create(&path, &CreateOptions::new(size)).expect("create");
    path
}

/// No timer commits: only what each test asks for is committed.
fn options() -> OpenOptions {
    OpenOptions {
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    }
}

fn open(path: &Path) -> Image {
    Image::open(path, &options()).expect("open")
}

fn read_cluster(image: &Image, cluster: u64) -> Vec<u8> {
    let mut buf = vec![0u8; CLUSTER];
    image
        .read(cluster * CLUSTER as u64, &mut buf)
        .expect("read");
    buf
}

/// A migration: the source quiesces (rings stopped), the destination opens the same image. It
/// must see every completed write and no sign of a loss: a lost-write notice here would fail
/// the migrated guest's first FLUSH.
#[test]
fn a_quiesced_image_opens_clean_with_every_completed_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = new_image(dir.path(), 16 << 20);
    let source = open(&path);
    source.write(0, &vec![0x5A; CLUSTER]).expect("write");
    source.flush().expect("flush");
    // Completed but never flushed by the guest: the quiesce commits it.
    source
        .write(CLUSTER as u64, &vec![0x6B; CLUSTER])
        .expect("write");
    source.quiesce().expect("quiesce");

    let destination = open(&path);
    assert!(
        !destination.recovered_after_unclean_shutdown(),
        "the destination takes a quiesced image for a crashed one"
    );
    assert!(!destination.take_unclean_shutdown_notice());
    assert_eq!(read_cluster(&destination, 0), vec![0x5A; CLUSTER]);
    assert_eq!(read_cluster(&destination, 1), vec![0x6B; CLUSTER]);
    destination.close().expect("close destination");
    source.close().expect("close source");
}

/// After its own quiesce and resume, a backend that is killed must leave an image that looks
/// crashed (the clean marker its quiesce wrote must not cover later writes).
#[test]
fn a_kill_after_resume_is_not_mistaken_for_a_clean_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = new_image(dir.path(), 16 << 20);
    let first = open(&path);
    first.write(0, &vec![1; CLUSTER]).expect("write");
    first.quiesce().expect("quiesce");
    first.resume().expect("resume");
    first
        .write(CLUSTER as u64, &vec![2; CLUSTER])
        .expect("write");
    first.abandon();

    let second = open(&path);
    assert!(
        second.recovered_after_unclean_shutdown(),
        "a killed backend's image opened as if it had been closed"
    );
    assert_eq!(read_cluster(&second, 0), vec![1; CLUSTER]);
    second.close().expect("close");
}

/// A SIGTERM right after the journal filled up and was checkpointed (nothing committed since)
/// is still a clean close.
#[test]
fn a_close_right_after_a_journal_full_checkpoint_is_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A small disk has a small journal: a few hundred flushed commits fill it.
    let path = new_image(dir.path(), 4 << 20);
    let image = open(&path);
    let clusters = (4 << 20) / CLUSTER as u64;
    let mut n = 0u64;
    while image.stats().checkpoints == 0 {
        image
            .write(
                (n % clusters) * CLUSTER as u64,
                &vec![(n % 251) as u8 + 1; CLUSTER],
            )
            .expect("write");
        image.flush().expect("flush");
        n += 1;
        assert!(n < 100_000, "the journal never filled");
    }
    image.close().expect("close");

    let reopened = open(&path);
    assert!(
        !reopened.recovered_after_unclean_shutdown(),
        "a clean close after {n} commits was taken for a crash"
    );
    reopened.close().expect("close");
}

/// A backend killed with completed, unflushed writes; its successor is stopped cleanly before
/// the guest's next FLUSH; the one after must still tell the guest. Once a FLUSH succeeded, the
/// loss is reported and later backends say nothing.
#[test]
fn an_unreported_loss_survives_clean_restarts_until_a_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = new_image(dir.path(), 16 << 20);
    let killed = open(&path);
    killed.write(0, &vec![7; CLUSTER]).expect("write");
    killed.abandon();

    let second = open(&path);
    assert!(second.recovered_after_unclean_shutdown());
    assert!(second.take_unclean_shutdown_notice());
    assert!(
        !second.take_unclean_shutdown_notice(),
        "the notice is given once per backend"
    );
    second
        .close()
        .expect("clean close before the guest flushed");

    let third = open(&path);
    assert!(
        third.take_unclean_shutdown_notice(),
        "a clean restart before the guest's next FLUSH swallowed the loss"
    );
    third.flush().expect("the guest's FLUSH");
    third.close().expect("close");

    let fourth = open(&path);
    assert!(!fourth.recovered_after_unclean_shutdown());
    assert!(!fourth.take_unclean_shutdown_notice());
    fourth.close().expect("close");
}

/// A read-only server holds a shared lock while it runs: a writer cannot open the image under
/// it (and change what it serves), other readers and `info`-style readers can; once the reader
/// is quiesced (VM paused) or closed, a writer can.
#[test]
fn a_running_read_only_server_keeps_writers_out() {
    use insitu_blk::image::ImageError;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = new_image(dir.path(), 16 << 20);
    let writer = open(&path);
    writer.write(0, &vec![3; CLUSTER]).expect("write");
    writer.close().expect("close");

    let serving = OpenOptions {
        read_only: true,
        shared_lock: true,
        ..options()
    };
    let reader = Image::open(&path, &serving).expect("read-only server");
    let second_reader = Image::open(&path, &serving).expect("a second read-only server");
    let one_shot = OpenOptions {
        read_only: true,
        ..options()
    };
    Image::open(&path, &one_shot)
        .expect("info-style reader")
        .close()
        .expect("close");
    match Image::open(&path, &options()) {
        Err(ImageError::Locked) => {}
        Ok(_) => panic!("a writer opened an image a read-only server is serving"),
        Err(e) => panic!("unexpected error: {e}"),
    }
    reader.quiesce().expect("pause the first reader");
    second_reader.close().expect("close the second reader");
    let writer = open(&path);
    writer.write(0, &vec![4; CLUSTER]).expect("write");
    writer.close().expect("close");
    // The paused reader resumes and sees the writer's data, not its stale table.
    reader.resume().expect("resume");
    assert_eq!(read_cluster(&reader, 0), vec![4; CLUSTER]);
    reader.close().expect("close");
}

/// A read-write open allocates the journal's host space, so a commit can never fail with ENOSPC
/// (a failed commit is final for the process): a full host filesystem shows at open instead.
#[test]
fn a_read_write_open_reserves_the_journal() {
    use insitu_blk::image::{format, FileStorage, Storage};

    let dir = tempfile::tempdir().expect("tempdir");
    let size = 64 << 20;
    let path = new_image(dir.path(), size);
    let layout = format::Layout::new(size, CLUSTER as u32).expect("layout");
    let allocated = |path: &Path| -> u64 {
        let storage = FileStorage::open(path, true).expect("open file");
        storage
            .allocated_ranges(layout.journal_offset, layout.journal_size)
            .expect("ranges")
            .expect("a file lists its ranges")
            .iter()
            .map(|(_, len)| len)
            .sum()
    };
    assert!(
        allocated(&path) < layout.journal_size,
        "a fresh image is sparse"
    );
    let image = open(&path);
    assert_eq!(
        allocated(&path),
        layout.journal_size,
        "the journal is not fully allocated after a read-write open"
    );
    image.close().expect("close");
}
