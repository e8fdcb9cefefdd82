//! Engine tests on the real engine over `MemStorage` and `FileStorage`.

use std::sync::Arc;
use std::time::Duration;

use super::format::{self, alg, Layout, BLOCK};
use super::*;

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Data that lz4 compresses about 2:1 or better, different for every seed.
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut r = rng(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let word = r();
        let run = 4 + (word % 12) as usize;
        let b = (word >> 8) as u8;
        for _ in 0..run {
            v.push(b);
        }
    }
    v.truncate(len);
    v
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut r = rng(seed);
    (0..len).map(|_| r() as u8).collect()
}

fn mem_image(size: u64, cluster: u32, compression: Compression) -> Arc<MemStorage> {
    let st = Arc::new(MemStorage::new());
    let opts = CreateOptions {
        size,
        cluster_size: cluster,
        compression,
    };
    Image::create_on(st.clone(), &opts).expect("create");
    st
}

fn open_mem(st: &Arc<MemStorage>) -> Image {
    Image::open_on(st.clone(), &OpenOptions::default()).expect("open")
}

/// Options whose timer never commits during a test: what a test leaves uncommitted stays so,
/// however long a loaded machine stalls it (a timer commit, or the idle marker after an empty
/// one, would change what the journal holds).
fn without_timer_commits() -> OpenOptions {
    OpenOptions {
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    }
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read(0, &mut buf).expect("read");
    buf
}

/// A model disk next to the image: every write goes to both.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn write(&mut self, img: &Image, off: u64, data: &[u8]) {
        img.write(off, data).expect("write");
        self.bytes[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    fn zero(&mut self, img: &Image, off: u64, len: u64, discard: bool) {
        if discard {
            img.discard(off, len).expect("discard");
        } else {
            img.write_zeroes(off, len, false).expect("write_zeroes");
        }
        self.bytes[off as usize..(off + len) as usize].fill(0);
    }

    fn assert_same(&self, img: &Image) {
        let got = read_all(img);
        if let Some(at) = (0..got.len()).find(|&i| got[i] != self.bytes[i]) {
            panic!(
                "first difference at byte {at} (cluster {}): image {} model {}",
                at / img.geometry().cluster_size as usize,
                got[at],
                self.bytes[at]
            );
        }
    }
}

#[test]
fn writes_at_odd_alignments_read_back_and_survive_reopen() {
    for (cluster, compression) in [
        (16384u32, Compression::Lz4),
        (65536, Compression::None),
        (131072, Compression::Snappy),
        (65536, Compression::Zstd { level: 3 }),
    ] {
        // 3 MiB + 1.5 KiB: the last cluster is short.
        let size = 3 * 1024 * 1024 + 1536;
        let st = mem_image(size, cluster, compression);
        let img = open_mem(&st);
        let mut model = Model {
            bytes: vec![0; size as usize],
        };
        let mut r = rng(u64::from(cluster));
        for k in 0..120u64 {
            let sectors = size / 512;
            let start = r() % sectors;
            let len = (1 + r() % 300).min(sectors - start);
            let data = if k % 3 == 0 {
                random((len * 512) as usize, k)
            } else {
                compressible((len * 512) as usize, k)
            };
            model.write(&img, start * 512, &data);
            if k % 17 == 0 {
                img.flush().expect("flush");
            }
            if k % 29 == 0 {
                let zs = r() % sectors;
                let zl = (1 + r() % 400).min(sectors - zs);
                model.zero(&img, zs * 512, zl * 512, k % 2 == 0);
            }
        }
        model.assert_same(&img);
        img.close().expect("close");
        let img = open_mem(&st);
        model.assert_same(&img);
        let report = check_on(st.clone(), false).expect("check");
        assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
        assert_eq!(report.leaked_bytes, 0, "{compression} {cluster}");
        img.close().expect("close");
    }
}

#[test]
fn requests_outside_the_disk_or_unaligned_are_refused_alone() {
    let st = mem_image(1 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        img.read((1 << 20) - 512, &mut buf),
        Err(ImageError::InvalidRequest(_))
    ));
    assert!(matches!(
        img.write(100, &buf[..512]),
        Err(ImageError::InvalidRequest(_))
    ));
    assert!(matches!(
        img.read(u64::MAX - 511, &mut buf[..512]),
        Err(ImageError::InvalidRequest(_))
    ));
    assert!(matches!(
        img.discard(0, (1 << 20) + 512),
        Err(ImageError::InvalidRequest(_))
    ));
    img.write(0, &buf).expect("a good request still works");
}

#[test]
fn a_compressible_cluster_rewritten_stays_compressed_in_its_home_slot() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    let cluster = 5u64;
    let mut stored_after_first = 0;
    for round in 0..20u64 {
        let data = compressible(65536, round);
        img.write(cluster * 65536, &data).expect("write");
        img.flush().expect("flush");
        // Wait until the writer released the previous version (it does so after completing
        // the flush); a write racing with that release may land in a spare, which is correct
        // but not what this test is about. Quiesce waits for every release.
        img.quiesce().expect("quiesce");
        img.resume().expect("resume");
        let e = img.core.table.current(cluster as u32);
        assert_eq!(e.slot, cluster as u32, "round {round}: left its home slot");
        assert_ne!(e.alg(), alg::RAW);
        assert!(e.units() <= 8, "round {round}: {} units", e.units());
        let s = img.stats();
        assert_eq!(s.clusters_compressed, 1);
        assert_eq!(s.clusters_raw, 0);
        if round == 0 {
            stored_after_first = s.stored_bytes;
        }
        assert!(s.stored_bytes <= stored_after_first + 4 * BLOCK);
        let mut back = vec![0u8; 65536];
        img.read(cluster * 65536, &mut back).expect("read");
        assert_eq!(back, data);
    }
    assert!(img.stats().commits >= 20);
}

#[test]
fn an_unclean_shutdown_leaves_no_leak_after_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    Image::create(&path, &CreateOptions::new(8 << 20)).expect("create");
    let img = Image::open(&path, &without_timer_commits()).expect("open");
    img.write(0, &compressible(65536, 1)).expect("write");
    img.flush().expect("flush");
    // Never committed: its space is referenced by nothing after the "crash".
    img.write(65536, &random(4 * 65536, 2)).expect("write");
    {
        // Stop the writer without committing (killed process).
        img.abandon();
    }
    // Not closed cleanly: the leftovers are reported as uncommitted writes, not as leaks.
    let report = check(&path, false).expect("check");
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
    assert!(report.uncommitted_bytes >= 4 * 65536, "{report:?}");
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("not closed cleanly")));
    let img = Image::open(&path, &OpenOptions::default()).expect("reopen");
    let mut back = vec![0u8; 65536];
    img.read(0, &mut back).expect("read");
    assert_eq!(back, compressible(65536, 1));
    img.close().expect("close");
    let report = check(&path, false).expect("check");
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
    assert!(report.corruptions.is_empty());
}

#[test]
fn a_damaged_journal_record_with_valid_ones_after_it_refuses_read_write() {
    let st = mem_image(1 << 20, 16384, Compression::Lz4);
    let img = Image::open_on(st.clone(), &without_timer_commits()).expect("open");
    for c in [0u64, 5, 11] {
        img.write(c * 16384, &compressible(16384, c))
            .expect("write");
        img.flush().expect("flush");
    }
    img.abandon();
    let layout = Layout::new(1 << 20, 16384).expect("layout");
    // Records: marker (block 0), open (block 1) then one per flush: cluster 5's is block 3.
    let off = layout.journal_offset + 3 * BLOCK + 54;
    let mut b = [0u8; 1];
    st.read_at(off, &mut b).expect("read");
    st.write_at(off, &[b[0] ^ 1]).expect("flip");
    let err = Image::open_on(st.clone(), &OpenOptions::default()).expect_err("refused");
    assert!(
        matches!(&err, ImageError::CorruptMetadata(m) if m.contains("follows a damaged")),
        "{err}"
    );
    let report = check_on(st.clone(), false).expect("check");
    assert!(!report.corruptions.is_empty());
}

#[test]
fn all_zero_clusters_store_nothing() {
    let st = mem_image(2 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    img.write(0, &vec![0u8; 1 << 20]).expect("write zeros");
    img.write(1 << 20, &compressible(65536, 1)).expect("write");
    img.write(1 << 20, &vec![0u8; 65536])
        .expect("overwrite with zeros");
    img.flush().expect("flush");
    let s = img.stats();
    assert_eq!(s.stored_bytes, 0);
    assert_eq!(s.clusters_zero, 32);
    assert_eq!(s.allocated_logical_bytes, 0);
    assert!(read_all(&img).iter().all(|&b| b == 0));
}

#[test]
fn discarded_space_is_punched_out_of_the_host_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    let mut opts = CreateOptions::new(16 << 20);
    opts.compression = Compression::Lz4;
    Image::create(&path, &opts).expect("create");
    let open = OpenOptions {
        test_stale_grace: Some(Duration::from_millis(10)),
        ..OpenOptions::default()
    };
    let img = Image::open(&path, &open).expect("open");
    let data = random(8 << 20, 3);
    img.write(0, &data).expect("write");
    img.flush().expect("flush");
    let st = FileStorage::open(&path, true).expect("stat handle");
    let full = st.allocated_bytes().expect("stat").expect("file");
    assert!(full >= 8 << 20, "{full}");
    img.discard(0, 8 << 20).expect("discard");
    img.flush().expect("flush");
    // The writer punches what a commit freed after its grace period, between commits (a
    // quiesce leaves it for later).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let after = st.allocated_bytes().expect("stat").expect("file");
        if after < full - (7 << 20) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "space not released: {full} -> {after}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(img.stats().stored_bytes, 0);
    // Partial-cluster rewrites release the replaced version's units too.
    img.write(0, &random(65536, 4)).expect("write");
    img.write(0, &compressible(4096, 5)).expect("partial");
    img.flush().expect("flush");
    img.close().expect("close");
    let report = check(&path, false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0);
}

#[test]
fn flushed_writes_survive_a_drop_without_close_and_an_abandoned_writer() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    let a = compressible(1 << 20, 10);
    img.write(0, &a).expect("write");
    img.flush().expect("flush");
    drop(img);
    let img = open_mem(&st);
    let mut back = vec![0u8; 1 << 20];
    img.read(0, &mut back).expect("read");
    assert_eq!(back, a);
    // Killed-process model: flushed data survives, the rest may or may not.
    let b = compressible(1 << 20, 11);
    img.write(1 << 20, &b).expect("write");
    img.flush().expect("flush");
    img.write(2 << 20, &compressible(1 << 20, 12))
        .expect("write");
    img.abandon();
    let img = open_mem(&st);
    img.read(1 << 20, &mut back).expect("read");
    assert_eq!(back, b);
    img.read(0, &mut back).expect("read");
    assert_eq!(back, a);
    let report = check_on(st.clone(), false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
}

#[test]
fn recovery_is_idempotent() {
    let st = mem_image(4 << 20, 16384, Compression::Lz4);
    let img = open_mem(&st);
    for k in 0..40u64 {
        img.write((k % 13) * 16384 + 4096, &compressible(8192, k))
            .expect("write");
        img.flush().expect("flush");
    }
    let want = read_all(&img);
    img.abandon();
    let before = st.snapshot();
    let sb = recovery::read_superblock(st.as_ref()).expect("sb").sb;
    let a = recovery::load(st.as_ref(), &sb, recovery::RecoveryMode::Strict).expect("load");
    let b = recovery::load(st.as_ref(), &sb, recovery::RecoveryMode::Strict).expect("load");
    assert_eq!(a.last_seq, b.last_seq);
    assert!(a.records_replayed >= 40);
    for c in 0..sb.layout.cluster_count as u32 {
        assert_eq!(a.table.current(c), b.table.current(c));
    }
    assert_eq!(st.snapshot(), before, "loading wrote to the image");
    let img = Image::open_on(
        st.clone(),
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .expect("open ro");
    assert_eq!(read_all(&img), want);
    drop(img);
    assert_eq!(st.snapshot(), before, "a read-only open wrote to the image");
}

#[test]
fn a_full_journal_turns_into_checkpoints_and_everything_reloads() {
    // 1 MiB journal; every commit of 60 clusters needs one 4 KiB record... write many.
    let st = mem_image(64 << 20, 16384, Compression::Lz4);
    let img = open_mem(&st);
    let mut model = Model {
        bytes: vec![0; 64 << 20],
    };
    let mut r = rng(99);
    for k in 0..400u64 {
        for _ in 0..8 {
            let c = r() % 4096;
            model.write(&img, c * 16384, &compressible(16384, k * 100 + c));
        }
        img.flush().expect("flush");
    }
    // Big commits: 2000 clusters per record.
    for k in 0..4u64 {
        model.write(&img, k * (32 << 20) / 4, &compressible(8 << 20, 7000 + k));
        img.flush().expect("flush");
    }
    let s = img.stats();
    assert!(s.checkpoints >= 1, "{s:?}");
    model.assert_same(&img);
    img.abandon();
    let img = open_mem(&st);
    model.assert_same(&img);
    img.close().expect("close");
}

#[test]
fn quiesce_refuses_io_and_resume_sees_what_another_process_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    Image::create(&path, &CreateOptions::new(8 << 20)).expect("create");
    let a = Image::open(&path, &OpenOptions::default()).expect("open");
    a.write(0, &compressible(65536, 1)).expect("write");
    a.quiesce().expect("quiesce");
    a.quiesce().expect("quiesce is idempotent");
    assert!(a.stats().quiesced);
    let mut buf = vec![0u8; 4096];
    assert!(matches!(a.read(0, &mut buf), Err(ImageError::Quiesced)));
    assert!(matches!(a.write(0, &buf), Err(ImageError::Quiesced)));
    assert!(matches!(a.flush(), Err(ImageError::Quiesced)));
    // The lock is free: a migration destination opens, sees the write, writes more.
    let b = Image::open(&path, &OpenOptions::default()).expect("second opener while quiesced");
    let mut back = vec![0u8; 65536];
    b.read(0, &mut back).expect("read");
    assert_eq!(back, compressible(65536, 1));
    b.write(65536, &compressible(65536, 2)).expect("write");
    b.write(0, &compressible(4096, 3)).expect("write");
    // The source cannot come back while the destination holds the lock.
    assert!(matches!(a.resume(), Err(ImageError::Locked)));
    b.quiesce().expect("quiesce b");
    a.resume().expect("resume");
    a.resume().expect("resume is idempotent");
    a.read(65536, &mut back).expect("read");
    assert_eq!(back, compressible(65536, 2), "resume did not reload");
    let mut head = vec![0u8; 4096];
    a.read(0, &mut head).expect("read");
    assert_eq!(head, compressible(4096, 3));
    a.write(2 * 65536, &compressible(65536, 4))
        .expect("write after resume");
    a.close().expect("close");
    drop(b);
    let c = Image::open(&path, &OpenOptions::default()).expect("reopen");
    c.read(2 * 65536, &mut back).expect("read");
    assert_eq!(back, compressible(65536, 4));
}

#[test]
fn a_second_read_write_opener_is_refused_and_a_waiting_one_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    Image::create(&path, &CreateOptions::new(1 << 20)).expect("create");
    let first = Image::open(&path, &OpenOptions::default()).expect("open");
    let err = Image::open(&path, &OpenOptions::default()).expect_err("second opener");
    assert!(matches!(err, ImageError::Locked), "{err}");
    let waiting = OpenOptions {
        lock: LockPolicy::Wait(Duration::from_millis(150)),
        ..OpenOptions::default()
    };
    let t = std::time::Instant::now();
    assert!(matches!(
        Image::open(&path, &waiting),
        Err(ImageError::Locked)
    ));
    assert!(t.elapsed() >= Duration::from_millis(150));
    // Read-only and start-quiesced opens need no lock (info, migration destination).
    let ro = Image::open(
        &path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .expect("read-only open of an image in use");
    assert!(matches!(ro.write(0, &[0; 512]), Err(ImageError::ReadOnly)));
    let dest = Image::open(
        &path,
        &OpenOptions {
            start_quiesced: true,
            lock: LockPolicy::Wait(Duration::from_secs(5)),
            ..OpenOptions::default()
        },
    )
    .expect("start quiesced");
    assert_eq!(dest.size(), 1 << 20);
    assert!(dest.stats().quiesced);
    // A waiting resume gets the lock as soon as the first opener lets go.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        first.close().expect("close");
    });
    dest.resume().expect("resume waits for the lock");
    releaser.join().expect("join");
    dest.write(0, &[7u8; 4096]).expect("write");
    dest.close().expect("close");
}

#[test]
fn a_flipped_payload_bit_fails_that_read_only_and_is_counted() {
    let st = mem_image(2 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    img.write(0, &compressible(65536, 1)).expect("write");
    img.write(65536, &compressible(65536, 2)).expect("write");
    img.write(2 * 65536, &random(65536, 3)).expect("write raw");
    img.close().expect("close");
    let sb = recovery::read_superblock(st.as_ref()).expect("sb").sb;
    let e1 = {
        let l = recovery::load(st.as_ref(), &sb, recovery::RecoveryMode::Strict).expect("load");
        (l.table.current(1), l.table.current(2))
    };
    for e in [e1.0, e1.1] {
        let off = sb.layout.region_offset(e.slot, e.unit()) + 100;
        let mut b = [0u8; 1];
        st.read_at(off, &mut b).expect("read");
        b[0] ^= 0x04;
        st.write_at(off, &b).expect("write");
    }
    let img = open_mem(&st);
    let mut buf = vec![0u8; 65536];
    img.read(0, &mut buf).expect("cluster 0 is fine");
    assert_eq!(buf, compressible(65536, 1));
    let err = img
        .read(65536 + 4096, &mut buf[..4096])
        .expect_err("corrupt");
    assert!(
        matches!(err, ImageError::CorruptPayload { cluster: 1, .. }),
        "{err}"
    );
    let err = img.read(2 * 65536, &mut buf).expect_err("corrupt raw");
    assert!(matches!(err, ImageError::CorruptPayload { cluster: 2, .. }));
    // A partial write into a corrupt cluster fails too (it would merge garbage).
    assert!(img.write(65536, &[1u8; 512]).is_err());
    assert_eq!(img.stats().checksum_errors, 3);
    // A full overwrite repairs the cluster.
    img.write(65536, &compressible(65536, 9))
        .expect("full overwrite");
    img.read(65536, &mut buf).expect("read");
    assert_eq!(buf, compressible(65536, 9));
    img.close().expect("close");
    let report = check_on(st.clone(), false).expect("check");
    assert_eq!(report.corruptions.len(), 1, "{:?}", report.corruptions);
    assert!(report.corruptions[0].contains("cluster 2"));
}

#[test]
fn a_corrupt_superblock_copy_falls_back_to_the_other_and_repair_rewrites_it() {
    let st = mem_image(1 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    img.write(0, &compressible(65536, 1)).expect("write");
    img.close().expect("close");
    st.write_at(200, &[0xff; 8]).expect("corrupt copy 0");
    let img = open_mem(&st);
    let mut buf = vec![0u8; 65536];
    img.read(0, &mut buf).expect("read");
    assert_eq!(buf, compressible(65536, 1));
    img.close().expect("close");
    let report = check_on(st.clone(), false).expect("check");
    assert!(report
        .corruptions
        .iter()
        .any(|c| c.contains("superblock copy 0")));
    let report = check_on(st.clone(), true).expect("repair");
    assert!(report
        .repairs
        .iter()
        .any(|r| r.contains("superblock copy 0")));
    let report = check_on(st.clone(), false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    // Both copies bad: refused, naming both.
    st.write_at(200, &[0xff; 8]).expect("corrupt");
    st.write_at(4096 + 200, &[0xff; 8]).expect("corrupt");
    let err = Image::open_on(st.clone(), &OpenOptions::default()).expect_err("refused");
    assert!(
        matches!(&err, ImageError::CorruptMetadata(m) if m.contains("copy 0") && m.contains("copy 1")),
        "{err}"
    );
}

#[test]
fn a_torn_checkpoint_falls_back_to_the_older_one_without_loss() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    img.write(0, &compressible(1 << 20, 1)).expect("write");
    img.close().expect("close (checkpoint into area 1)");
    let sb = recovery::read_superblock(st.as_ref()).expect("sb").sb;
    let l = recovery::load(st.as_ref(), &sb, recovery::RecoveryMode::Strict).expect("load");
    assert_eq!(l.base_area, 1);
    // Tear the newest checkpoint's first chunk: the older checkpoint (area 0) plus the journal
    // records still give the same state, because the journal restarts only after a checkpoint
    // is durable.
    let ck = sb.layout.checkpoint_offsets[1] + BLOCK + 300;
    st.write_at(ck, &[0x55; 16]).expect("tear");
    // The marker record at the journal start names commit (checkpoint + 1): falling back to
    // area 0 must detect that a newer checkpoint was lost.
    let err = Image::open_on(st.clone(), &OpenOptions::default()).expect_err("lost checkpoint");
    assert!(
        matches!(&err, ImageError::CorruptMetadata(m) if m.contains("newer checkpoint was lost")),
        "{err}"
    );
    // Read-only opens still come up (lenient), and check explains.
    let report = check_on(st.clone(), false).expect("check");
    assert!(!report.corruptions.is_empty());
}

#[test]
fn a_checkpoint_torn_before_it_became_durable_costs_nothing() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    let data = compressible(1 << 20, 1);
    img.write(0, &data).expect("write");
    img.flush().expect("flush");
    img.abandon();
    // Simulate a crash in the middle of writing a checkpoint into the inactive area 1: its
    // header landed, a chunk did not.
    let sb = recovery::read_superblock(st.as_ref()).expect("sb").sb;
    let h = format::CheckpointHeader {
        seq: 50,
        chunk_count: 1,
    }
    .encode(&sb.layout, &sb.uuid);
    st.write_at(sb.layout.checkpoint_offsets[1], &h)
        .expect("header");
    let img = open_mem(&st);
    let mut back = vec![0u8; 1 << 20];
    img.read(0, &mut back).expect("read");
    assert_eq!(back, data);
    img.close().expect("close");
    let report = check_on(st.clone(), false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
}

#[test]
fn concurrent_writers_on_shared_and_separate_clusters_keep_every_cluster_whole() {
    let st = mem_image(8 << 20, 16384, Compression::Lz4);
    let img = Arc::new(open_mem(&st));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                let mut r = rng(t + 1);
                for k in 0..300u64 {
                    // Own region: clusters t*64 .. t*64+64; shared: clusters 400..404.
                    let c = if k % 4 == 0 {
                        400 + r() % 4
                    } else {
                        t * 64 + r() % 64
                    };
                    // Every write is a whole cluster filled with one tag, so a torn or mixed
                    // cluster is visible.
                    let tag = (t * 1000 + k) as u32;
                    let mut data = vec![0u8; 16384];
                    for w in data.chunks_exact_mut(4) {
                        w.copy_from_slice(&tag.to_le_bytes());
                    }
                    img.write(c * 16384, &data).expect("write");
                    if k % 50 == 0 {
                        img.flush().expect("flush");
                    }
                    let mut back = vec![0u8; 16384];
                    img.read(c * 16384, &mut back).expect("read");
                    let first = &back[..4];
                    assert!(
                        back.chunks_exact(4).all(|w| w == first),
                        "mixed cluster {c}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    img.flush().expect("flush");
    let all = read_all(&img);
    for c in all.chunks_exact(16384) {
        let first = &c[..4];
        assert!(c.chunks_exact(4).all(|w| w == first));
    }
    drop(img);
    let report = check_on(st.clone(), false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0);
}

#[test]
fn concurrent_partial_writes_to_one_cluster_are_all_kept() {
    let st = mem_image(1 << 20, 65536, Compression::Lz4);
    let img = Arc::new(open_mem(&st));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                for k in 0..4u64 {
                    let sector = t * 4 + k;
                    img.write(sector * 4096, &[(sector + 1) as u8; 4096])
                        .expect("write");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let mut back = vec![0u8; 65536];
    img.read(0, &mut back).expect("read");
    for s in 0..16usize {
        assert!(back[s * 4096..(s + 1) * 4096]
            .iter()
            .all(|&b| b == s as u8 + 1));
    }
}

#[test]
fn running_out_of_spare_slots_forces_commits_instead_of_failing() {
    // 64 clusters of incompressible data and only 64 spare slots: rewriting all of them several
    // times without a flush needs the writer to commit on free-slot pressure.
    let st = mem_image(64 * 16384, 16384, Compression::Lz4);
    let img = Image::open_on(
        st.clone(),
        &OpenOptions {
            commit_interval: Duration::from_secs(3600),
            ..OpenOptions::default()
        },
    )
    .expect("open");
    let mut model = Model {
        bytes: vec![0; 64 * 16384],
    };
    for round in 0..6u64 {
        for c in 0..64u64 {
            model.write(&img, c * 16384, &random(16384, round * 64 + c));
        }
        if round == 0 {
            // Every home slot now holds a durable version that rewrites must not touch.
            img.flush().expect("flush");
        }
    }
    assert!(img.stats().commits >= 2, "{:?}", img.stats());
    model.assert_same(&img);
    img.close().expect("close");
}

#[test]
fn hostile_images_are_refused_with_an_error_never_a_panic() {
    // Raw bytes, a qcow2 header, an empty file, a truncated image.
    let qcow2 = {
        let mut v = vec![0u8; 1 << 16];
        v[..4].copy_from_slice(b"QFI\xfb");
        v
    };
    for bytes in [vec![], vec![0u8; 100], random(1 << 16, 1), qcow2] {
        let st = Arc::new(MemStorage::from_bytes(bytes));
        let err = Image::open_on(st.clone(), &OpenOptions::default()).expect_err("refused");
        assert!(matches!(err, ImageError::NotAnImage(_)), "{err}");
        assert!(check_on(st, false).is_err());
    }
    let st = mem_image(1 << 20, 16384, Compression::Lz4);
    let img = open_mem(&st);
    img.write(0, &compressible(1 << 19, 1)).expect("write");
    img.flush().expect("flush");
    img.write(0, &compressible(1 << 18, 2)).expect("write");
    drop(img);
    let full = st.snapshot();
    let truncated = Arc::new(MemStorage::from_bytes(full[..full.len() / 2].to_vec()));
    let err = Image::open_on(truncated, &OpenOptions::default()).expect_err("truncated");
    assert!(
        matches!(&err, ImageError::CorruptMetadata(m) if m.contains("truncated")),
        "{err}"
    );
    // Random damage anywhere in the metadata: open may fail, but never panics, and what it
    // returns reads without panicking.
    let layout = Layout::new(1 << 20, 16384).expect("layout");
    let mut r = rng(5);
    for _ in 0..100 {
        let mut bytes = full.clone();
        for _ in 0..4 {
            let at = (r() % layout.data_offset) as usize;
            bytes[at] = r() as u8;
        }
        let st = Arc::new(MemStorage::from_bytes(bytes));
        if let Ok(img) = Image::open_on(
            st.clone(),
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        ) {
            let mut buf = vec![0u8; 1 << 19];
            let _ = img.read(0, &mut buf);
        }
        let _ = check_on(st, false);
    }
}

#[test]
fn check_finds_leaked_space_and_repair_punches_it() {
    let st = mem_image(2 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    img.write(0, &compressible(65536, 1)).expect("write");
    img.close().expect("close");
    let layout = Layout::new(2 << 20, 65536).expect("layout");
    // Garbage in a free slot, as a crash between a data write and its commit leaves behind.
    st.write_at(layout.slot_offset(7), &[0xaa; 8192])
        .expect("leak");
    let report = check_on(st.clone(), false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 8192);
    let report = check_on(st.clone(), true).expect("repair");
    assert!(!report.repairs.is_empty());
    let report = check_on(st.clone(), false).expect("check");
    assert_eq!(report.leaked_bytes, 0);
    let img = open_mem(&st);
    let mut buf = vec![0u8; 65536];
    img.read(0, &mut buf).expect("read");
    assert_eq!(buf, compressible(65536, 1));
}

#[test]
fn flush_after_the_commit_order_switch_still_round_trips() {
    // The switch only changes the order of durability barriers; without a crash the data is
    // the same. The crash simulator shows what it breaks.
    let st = mem_image(1 << 20, 65536, Compression::Lz4);
    let img = Image::open_on(
        st.clone(),
        &OpenOptions {
            test_break_commit_order: true,
            ..OpenOptions::default()
        },
    )
    .expect("open");
    img.write(0, &compressible(65536, 1)).expect("write");
    img.flush().expect("flush");
    drop(img);
    let img = open_mem(&st);
    let mut buf = vec![0u8; 65536];
    img.read(0, &mut buf).expect("read");
    assert_eq!(buf, compressible(65536, 1));
}

#[test]
fn table_ram_stays_within_twelve_bytes_per_cluster() {
    // 64 GiB sparse disk at 64 KiB: 1 Mi clusters.
    let layout = Layout::new(64 << 30, 65536).expect("layout");
    let table = table::Table::new(&layout);
    let mut ram = 0;
    for cell in table.cells.iter() {
        ram += table::lock(&cell.stripe).ram_bytes();
    }
    let per_cluster = ram as f64 / layout.cluster_count as f64;
    assert!(per_cluster <= 12.0, "{per_cluster} bytes per cluster");
}

#[test]
fn stats_describe_the_stored_data() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let img = open_mem(&st);
    img.write(0, &compressible(2 * 65536, 1)).expect("write");
    img.write(2 * 65536, &random(65536, 2)).expect("write");
    let s = img.stats();
    assert_eq!(s.clusters_compressed, 2);
    assert_eq!(s.clusters_raw, 1);
    assert_eq!(s.clusters_zero, 64 - 3);
    assert_eq!(s.allocated_logical_bytes, 3 * 65536);
    assert!(s.stored_bytes < 3 * 65536 && s.stored_bytes > 65536);
    assert!(s.ratio() > 1.0);
    assert_eq!(s.writes, 2);
    assert!(s.uncommitted_writes >= 3);
    img.flush().expect("flush");
    let s = img.stats();
    assert_eq!(s.uncommitted_writes, 0);
    assert_eq!(s.flushes, 1);
    assert!(s.commits >= 1);
}

/// A storage with a volatile write cache: writes and punches are pending until `flush`; a crash
/// keeps a random subset of the pending ones, some torn at 512 bytes.
#[derive(Debug)]
struct CrashStorage {
    inner: std::sync::Mutex<CrashState>,
}

#[derive(Debug)]
struct CrashState {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    locked: bool,
    /// Crash images taken at every flush, before it took effect (crash points inside commits).
    captures: Vec<Vec<u8>>,
    seed: u64,
}

impl CrashStorage {
    fn new(bytes: Vec<u8>) -> Self {
        CrashStorage {
            inner: std::sync::Mutex::new(CrashState {
                durable: bytes.clone(),
                current: bytes,
                pending: Vec::new(),
                locked: false,
                captures: Vec::new(),
                seed: 1,
            }),
        }
    }

    /// The bytes a crash right now could leave behind.
    fn crash(&self, seed: u64) -> Vec<u8> {
        Self::crash_of(&self.inner.lock().expect("lock"), seed)
    }

    fn take_captures(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.inner.lock().expect("lock").captures)
    }

    fn crash_of(s: &CrashState, seed: u64) -> Vec<u8> {
        let mut r = rng(seed);
        let mut img = s.durable.clone();
        for (off, data) in &s.pending {
            match r() % 4 {
                0 => {}
                1 => {
                    // torn: only some 512-byte sectors land
                    for (k, sector) in data.chunks(512).enumerate() {
                        if r().is_multiple_of(2) {
                            let at = *off as usize + k * 512;
                            img[at..at + sector.len()].copy_from_slice(sector);
                        }
                    }
                }
                _ => img[*off as usize..*off as usize + data.len()].copy_from_slice(data),
            }
        }
        img
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let s = self.inner.lock().expect("lock");
        let end = offset as usize + buf.len();
        if end > s.current.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&s.current[offset as usize..end]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut s = self.inner.lock().expect("lock");
        let end = offset as usize + data.len();
        s.current[offset as usize..end].copy_from_slice(data);
        s.pending.push((offset, data.to_vec()));
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut s = self.inner.lock().expect("lock");
        s.seed += 1;
        let capture = Self::crash_of(&s, s.seed);
        s.captures.push(capture);
        s.durable = s.current.clone();
        s.pending.clear();
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_at(offset, &vec![0u8; len as usize])
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.inner.lock().expect("lock").current.len() as u64)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut s = self.inner.lock().expect("lock");
        s.current.resize(len as usize, 0);
        s.durable.resize(len as usize, 0);
        Ok(())
    }
    fn try_lock_exclusive(&self) -> std::io::Result<bool> {
        let mut s = self.inner.lock().expect("lock");
        Ok(!std::mem::replace(&mut s.locked, true))
    }
    fn unlock(&self) -> std::io::Result<()> {
        self.inner.lock().expect("lock").locked = false;
        Ok(())
    }
}

/// Runs a random workload, crashing (on a copy) after every step; returns the number of crash
/// points whose recovered image broke I2/I3.
fn crash_points(break_order: bool, seed: u64, steps: u64) -> u64 {
    crash_points_with_stats(break_order, seed, steps).0
}

/// [`crash_points`], also returning the image's statistics at the end.
fn crash_points_with_stats(break_order: bool, seed: u64, steps: u64) -> (u64, Stats) {
    const CS: usize = 16384;
    const CLUSTERS: usize = 12;
    let size = (CS * CLUSTERS) as u64;
    let mem = Arc::new(MemStorage::new());
    Image::create_on(
        mem.clone(),
        &CreateOptions {
            size,
            cluster_size: CS as u32,
            compression: Compression::Lz4,
        },
    )
    .expect("create");
    let st = Arc::new(CrashStorage::new(mem.snapshot()));
    let img = Image::open_on(
        st.clone(),
        &OpenOptions {
            commit_interval: Duration::from_secs(3600),
            test_break_commit_order: break_order,
            ..OpenOptions::default()
        },
    )
    .expect("open");
    // Acceptable contents per cluster: the version at the last completed flush plus every
    // version written after it.
    let mut current: Vec<Vec<u8>> = vec![vec![0u8; CS]; CLUSTERS];
    let mut acceptable: Vec<Vec<Vec<u8>>> = vec![vec![vec![0u8; CS]]; CLUSTERS];
    let mut r = rng(seed);
    let mut failures = 0;
    let mut flushed: Option<Vec<Vec<Vec<u8>>>> = None;
    for step in 0..steps {
        let c = (r() % CLUSTERS as u64) as usize;
        match r() % 10 {
            0..=3 => {
                let at = (r() % 4) as usize * 4096;
                let data = compressible(4096, step * 31 + seed);
                img.write((c * CS + at) as u64, &data).expect("write");
                current[c][at..at + 4096].copy_from_slice(&data);
                acceptable[c].push(current[c].clone());
            }
            4..=6 => {
                let data = if r().is_multiple_of(3) {
                    random(CS, step + seed)
                } else {
                    compressible(CS, step + seed * 7)
                };
                img.write((c * CS) as u64, &data).expect("write");
                current[c] = data;
                acceptable[c].push(current[c].clone());
            }
            7 => {
                img.discard((c * CS) as u64, CS as u64).expect("discard");
                current[c] = vec![0u8; CS];
                acceptable[c].push(current[c].clone());
            }
            _ => {
                img.flush().expect("flush");
                // Crash points inside this flush are judged by the old sets.
                flushed = Some(current.iter().map(|v| vec![v.clone()]).collect());
            }
        }
        // Crash now, and at every flush barrier the step passed (the image keeps running: we
        // crash copies).
        let mut images = st.take_captures();
        images.push(st.crash(seed * 1000 + step));
        for image in images {
            if !recovers_acceptably(image, &acceptable) {
                failures += 1;
            }
        }
        if let Some(done) = flushed.take() {
            acceptable = done;
        }
    }
    let stats = img.stats();
    img.abandon();
    (failures, stats)
}

fn recovers_acceptably(image: Vec<u8>, acceptable: &[Vec<Vec<u8>>]) -> bool {
    let cs = acceptable[0][0].len();
    let crashed = Arc::new(MemStorage::from_bytes(image));
    let Ok(back) = Image::open_on(crashed, &OpenOptions::default()) else {
        return false;
    };
    let mut buf = vec![0u8; cs];
    let ok = (0..acceptable.len())
        .all(|k| back.read((k * cs) as u64, &mut buf).is_ok() && acceptable[k].contains(&buf));
    back.abandon();
    ok
}

#[test]
fn crash_at_every_step_recovers_a_flushed_and_untorn_state() {
    // INSITU_ENGINE_CRASH_SEEDS=N runs N seeds (default 4).
    let seeds: u64 = std::env::var("INSITU_ENGINE_CRASH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for seed in 1..=seeds {
        assert_eq!(crash_points(false, seed, 200), 0, "seed {seed}");
    }
}

#[test]
fn crashes_around_journal_wraps_and_checkpoints_recover_too() {
    // Enough commits to fill the 1 MiB journal: checkpoints and restarts are crossed.
    let (failures, stats) = crash_points_with_stats(false, 77, 2200);
    assert_eq!(failures, 0);
    assert!(stats.checkpoints >= 1, "{stats:?}");
}

#[test]
fn the_crash_oracle_catches_a_broken_commit_order() {
    let failures: u64 = (1..=3).map(|seed| crash_points(true, seed, 150)).sum();
    assert!(failures > 0, "breaking the commit order went unnoticed");
}

#[test]
fn an_image_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Image>();
    shareable::<Arc<Image>>();
}

#[test]
fn buffered_partial_writes_read_back_merge_into_one_version_and_follow_flush() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let opts = OpenOptions {
        // Only FLUSH, quiesce and completed clusters store buffered writes here.
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    };
    let img = Image::open_on(st.clone(), &opts).expect("open");
    let base = compressible(4 << 20, 1);
    img.write(0, &base).expect("write");
    img.flush().expect("flush");
    let stored = img.stats().stored_bytes;
    let mut expect = base.clone();
    // Sequential 4 KiB writes: cluster 1 complete (stored at once), cluster 2 half written.
    for k in 0..24u64 {
        let d = random(4096, 100 + k);
        let at = 65536 + k * 4096;
        img.write(at, &d).expect("write");
        expect[at as usize..at as usize + 4096].copy_from_slice(&d);
    }
    // Scattered sectors into a stored cluster and into a never-written region's neighbour.
    for (at, seed) in [
        (3 * 65536 + 512, 7u64),
        (3 * 65536 + 40960, 8),
        (50 * 65536, 9),
    ] {
        let d = compressible(1024, seed);
        img.write(at, &d).expect("write");
        expect[at as usize..at as usize + 1024].copy_from_slice(&d);
    }
    // Reads see every buffered write: whole clusters, pieces fully inside buffered sectors,
    // pieces mixing buffered and stored bytes, across cluster edges.
    assert_eq!(read_all(&img), expect);
    for (at, len) in [
        (2 * 65536, 4096),
        (2 * 65536 + 30000 / 512 * 512, 8192),
        (3 * 65536, 2048),
    ] {
        let mut buf = vec![0u8; len];
        img.read(at, &mut buf).expect("read");
        assert_eq!(buf, &expect[at as usize..at as usize + len], "{at}");
    }
    // A crash now (killed process) loses what is only buffered, whole clusters at a time:
    // cluster 2 and 3 read as their flushed versions, never a mix.
    img.abandon();
    let img = Image::open_on(st.clone(), &opts).expect("reopen");
    let back = read_all(&img);
    for c in [2usize, 3] {
        let r = c * 65536..(c + 1) * 65536;
        assert_eq!(back[r.clone()], base[r], "cluster {c}");
    }
    // Again, then FLUSH: everything survives.
    let mut expect = back.clone();
    for k in 0..5u64 {
        let at = 2 * 65536 + k * 8192;
        let d = random(4096, 200 + k);
        img.write(at, &d).expect("write");
        expect[at as usize..at as usize + 4096].copy_from_slice(&d);
    }
    img.flush().expect("flush");
    img.abandon();
    let img = Image::open_on(st.clone(), &opts).expect("reopen");
    assert_eq!(read_all(&img), expect);
    // A whole-cluster write replaces what is buffered for that cluster.
    img.write(5 * 65536 + 4096, &random(4096, 300))
        .expect("write");
    let full = compressible(65536, 301);
    img.write(5 * 65536, &full).expect("write");
    img.close().expect("close");
    let img = Image::open_on(st.clone(), &opts).expect("reopen");
    let mut buf = vec![0u8; 65536];
    img.read(5 * 65536, &mut buf).expect("read");
    assert_eq!(buf, full);
    assert!(img.stats().stored_bytes >= stored / 2);
    img.close().expect("close");
    let report = check_on(st.clone(), false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0);
}

#[test]
fn a_full_write_back_buffer_stores_further_partial_writes_at_once() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        write_buffer_bytes: 2 * 65536,
        ..OpenOptions::default()
    };
    let img = Image::open_on(st.clone(), &opts).expect("open");
    let mut expect = vec![0u8; 4 << 20];
    for c in 0..10u64 {
        let at = c * 65536 + 4096;
        let d = random(4096, c);
        img.write(at, &d).expect("write");
        expect[at as usize..at as usize + 4096].copy_from_slice(&d);
    }
    // Two clusters are buffered; the other eight were stored at once (published, not yet
    // committed).
    assert_eq!(img.stats().uncommitted_writes, 8);
    assert_eq!(read_all(&img), expect);
    img.flush().expect("flush");
    assert_eq!(img.stats().uncommitted_writes, 0);
    img.abandon();
    let img = Image::open_on(st.clone(), &opts).expect("reopen");
    assert_eq!(read_all(&img), expect);
    img.close().expect("close");
}

/// A host disk that refuses writes: while `refused` holds a byte range and an errno, every write
/// that starts in the range fails with that errno (ENOSPC: the host filesystem filled up; EIO: a
/// failing device). Everything else passes through.
#[derive(Debug)]
struct FailingDisk {
    inner: Arc<dyn Storage>,
    refused: std::sync::Mutex<Option<(std::ops::Range<u64>, i32)>>,
    refused_writes: std::sync::atomic::AtomicU64,
    /// The image file, when `inner` is one: every refused write also checks whether another
    /// process could take the writer lock at that moment (counted in `unlocked_writes`).
    lock_probe: Option<std::path::PathBuf>,
    unlocked_writes: std::sync::atomic::AtomicU64,
}

impl FailingDisk {
    fn new(inner: Arc<MemStorage>) -> Arc<Self> {
        Self::with(inner, None)
    }

    fn with(inner: Arc<dyn Storage>, lock_probe: Option<std::path::PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            refused: std::sync::Mutex::new(None),
            refused_writes: 0.into(),
            lock_probe,
            unlocked_writes: 0.into(),
        })
    }

    fn refuse(&self, range: std::ops::Range<u64>, errno: i32) {
        *self.refused.lock().expect("lock") = Some((range, errno));
    }

    fn heal(&self) {
        *self.refused.lock().expect("lock") = None;
    }
}

impl Storage for FailingDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if let Some((range, errno)) = self.refused.lock().expect("lock").as_ref() {
            if range.contains(&offset) {
                self.refused_writes
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if let Some(path) = &self.lock_probe {
                    let other = FileStorage::open(path, false).expect("open the image again");
                    if other.try_lock_exclusive().expect("flock") {
                        self.unlocked_writes
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                return Err(std::io::Error::from_raw_os_error(*errno));
            }
        }
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn try_lock_exclusive(&self) -> std::io::Result<bool> {
        self.inner.try_lock_exclusive()
    }
    fn unlock(&self) -> std::io::Result<()> {
        self.inner.unlock()
    }
}

/// A 4 MiB lz4 image of 64 KiB clusters on a [`FailingDisk`] over memory, and open options with
/// no timer commit (only FLUSH, quiesce and close commit).
fn failing_mem_image() -> (u64, Layout, Arc<FailingDisk>, OpenOptions) {
    let size = 4u64 << 20;
    let layout = format::Layout::new(size, 65536).expect("layout");
    let disk = FailingDisk::new(mem_image(size, 65536, Compression::Lz4));
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    };
    (size, layout, disk, opts)
}

/// A FLUSH on a full host disk fails with the host's ENOSPC after one attempt (not one merge,
/// compression and write per buffered cluster), loses nothing, and once space is back the same
/// process stores every buffered write and the next FLUSH succeeds.
#[test]
fn a_flush_on_a_full_host_disk_fails_once_and_keeps_the_buffered_writes() {
    use std::sync::atomic::Ordering;
    let (size, layout, disk, opts) = failing_mem_image();
    let img = Image::open_on(disk.clone(), &opts).expect("open");
    let mut expect = vec![0u8; size as usize];
    for c in 0..12u64 {
        let at = c * 65536 + 8192;
        let d = random(4096, 100 + c);
        img.write(at, &d).expect("buffered write");
        expect[at as usize..at as usize + 4096].copy_from_slice(&d);
    }
    disk.refuse(layout.data_offset..u64::MAX, libc::ENOSPC);
    let err = img
        .flush()
        .expect_err("a FLUSH with no space for the data must fail");
    assert!(err.is_host_out_of_space(), "{err}");
    assert_eq!(
        disk.refused_writes.load(Ordering::SeqCst),
        1,
        "the FLUSH went on storing clusters after the host said it is full"
    );
    assert_eq!(read_all(&img), expect, "buffered writes lost or changed");
    disk.heal();
    img.flush().expect("FLUSH once the host has space again");
    img.close().expect("close");
    let img = Image::open_on(disk.clone(), &opts).expect("reopen");
    assert_eq!(read_all(&img), expect);
    img.close().expect("close");
}

/// R21: a close whose buffered writes cannot be stored (full host disk) loses them, so it must
/// not end the journal "closed cleanly": the next opener reports the loss (the guest's next FLUSH
/// fails) instead of serving an image that silently misses completed writes.
#[test]
fn a_close_that_cannot_store_its_buffered_writes_leaves_the_image_unclean() {
    let (_, layout, disk, opts) = failing_mem_image();
    let img = Image::open_on(disk.clone(), &opts).expect("open");
    img.write(0, &random(65536, 1))
        .expect("whole-cluster write");
    img.flush().expect("flush");
    img.write(65536 + 4096, &random(8192, 2))
        .expect("buffered partial write");
    disk.refuse(layout.data_offset..u64::MAX, libc::ENOSPC);
    img.close()
        .expect_err("close cannot store the buffered write");
    disk.heal();
    // The process exits (a failed close keeps the writer lock until then).
    disk.unlock().expect("unlock");
    let img = Image::open_on(disk.clone(), &opts).expect("reopen");
    assert!(
        img.recovered_after_unclean_shutdown(),
        "a close that lost completed writes left the image looking cleanly closed"
    );
    let mut first = vec![0u8; 65536];
    img.read(0, &mut first).expect("read");
    assert_eq!(first, random(65536, 1), "the flushed cluster must survive");
    img.close().expect("close");
}

/// R21, second path: a loss found at open and not yet reported to a guest (no successful FLUSH
/// since) must survive a close that fails after its checkpoint, before its clean-close marker
/// (here an EIO on the journal block after the checkpoint's marker; a kill there is the same).
#[test]
fn a_pending_loss_notice_survives_a_close_interrupted_after_its_checkpoint() {
    let (_, layout, disk, opts) = failing_mem_image();
    let img = Image::open_on(disk.clone(), &opts).expect("open");
    img.write(0, &random(65536, 3)).expect("write");
    img.abandon(); // killed: the write was never committed
    let img = Image::open_on(disk.clone(), &opts).expect("reopen after the kill");
    assert!(img.recovered_after_unclean_shutdown());
    // The close's checkpoint ends with its marker in the journal's first block; refuse the block
    // after it, where the clean-close marker goes.
    let journal = layout.journal_offset;
    disk.refuse(journal + BLOCK..journal + layout.journal_size, libc::EIO);
    img.close()
        .expect_err("the clean-close marker cannot be written");
    disk.heal();
    disk.unlock().expect("unlock");
    let img = Image::open_on(disk.clone(), &opts).expect("reopen");
    assert!(
        img.recovered_after_unclean_shutdown(),
        "the unreported loss was forgotten by a close that never wrote its clean-close marker"
    );
    img.close().expect("close");
}

/// Polls `cond` for up to 10 s.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A backend killed after a commit interval without writes lost nothing: the writer ended the
/// journal with an idle marker, so the next one reports no loss (the guest's next FLUSH must not
/// fail: an ext4 guest aborts its journal on a failed FLUSH). Written, WRITE_ZEROES and DISCARD
/// data all survive; no FLUSH was ever sent.
#[test]
fn a_backend_killed_after_an_idle_commit_interval_reports_no_loss() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let opts = OpenOptions {
        commit_interval: Duration::from_millis(20),
        ..OpenOptions::default()
    };
    let img = Image::open_on(st.clone(), &opts).expect("open");
    let mut model = Model {
        bytes: read_all(&img),
    };
    model.write(&img, 0, &random(65536 + 4096, 1));
    model.write(&img, 3 * 65536 + 512, &random(1024, 2));
    model.zero(&img, 4096, 8192, false);
    model.zero(&img, 2 * 65536, 65536, true);
    eventually("the idle marker", || img.core.clean_marked());
    img.abandon();
    let img = Image::open_on(st.clone(), &opts).expect("reopen after the kill");
    assert!(
        !img.recovered_after_unclean_shutdown(),
        "an idle backend's kill was taken for a loss"
    );
    model.assert_same(&img);
    img.close().expect("close");
}

/// The idle marker is not a clean close for writes after it: each of a write, a WRITE_ZEROES and
/// a DISCARD completed after the marker, never committed, must make the next backend report
/// the loss. The writer's timer is off; the marker is asked for directly.
#[test]
fn a_mutation_after_the_idle_marker_makes_a_kill_report_the_loss() {
    for kind in 0..3 {
        let st = mem_image(4 << 20, 65536, Compression::Lz4);
        let opts = OpenOptions {
            commit_interval: Duration::from_secs(3600),
            ..OpenOptions::default()
        };
        let img = Image::open_on(st.clone(), &opts).expect("open");
        img.write(0, &random(65536, 3)).expect("write");
        img.flush().expect("flush");
        img.core.mark_idle_if_quiet();
        assert!(
            img.core.clean_marked(),
            "idle, committed: the marker is written"
        );
        match kind {
            0 => img.write(65536, &random(4096, 4)).expect("write"),
            1 => img.write_zeroes(0, 4096, false).expect("write zeroes"),
            _ => img.discard(0, 65536).expect("discard"),
        }
        assert!(
            !img.core.clean_marked(),
            "kind {kind}: the journal was not reopened"
        );
        // Still dirty: the writer must not mark again.
        img.core.mark_idle_if_quiet();
        assert!(
            !img.core.clean_marked(),
            "kind {kind}: marked over an uncommitted change"
        );
        img.abandon();
        let img = Image::open_on(st.clone(), &opts).expect("reopen");
        assert!(
            img.recovered_after_unclean_shutdown(),
            "kind {kind}: a change completed after the idle marker was lost unreported"
        );
        img.close().expect("close");
    }
}

/// A loss this process found at open and has not reported (no FLUSH succeeded since) survives an
/// idle marker and a second kill: the idle marker carries it.
#[test]
fn the_idle_marker_carries_an_unreported_loss() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    };
    let img = Image::open_on(st.clone(), &opts).expect("open");
    img.write(0, &random(65536, 5)).expect("write");
    img.abandon();
    let img = Image::open_on(st.clone(), &opts).expect("reopen");
    assert!(img.recovered_after_unclean_shutdown());
    img.core.mark_idle_if_quiet();
    assert!(img.core.clean_marked());
    img.abandon();
    let img = Image::open_on(st.clone(), &opts).expect("reopen again");
    assert!(
        img.recovered_after_unclean_shutdown(),
        "the idle marker forgot a loss the guest was never told about"
    );
    img.flush()
        .expect("the guest is told: a FLUSH succeeds after the notice");
    img.core.mark_idle_if_quiet();
    img.abandon();
    let img = Image::open_on(st.clone(), &opts).expect("reopen a third time");
    assert!(!img.recovered_after_unclean_shutdown(), "reported twice");
    img.close().expect("close");
}

/// Writers racing the idle marker: after every completed write, the journal is open or the
/// write is committed. A thread commits and asks for the marker in a loop while two threads
/// write; after each write returns, the writing thread checks that a kill now would be
/// reported (journal open) unless a commit covered its write. Also: no FLUSH is missed by the
/// writer (it was, one run in three, before the writer re-checked for work before sleeping).
#[test]
fn writes_racing_the_idle_marker_always_leave_the_journal_open() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let st = mem_image(8 << 20, 65536, Compression::None);
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(30),
        ..OpenOptions::default()
    };
    let img = Arc::new(Image::open_on(st.clone(), &opts).expect("open"));
    let stop = Arc::new(AtomicBool::new(false));
    let marks = Arc::new(AtomicU64::new(0));
    let marker = {
        let (img, stop, marks) = (img.clone(), stop.clone(), marks.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let started = std::time::Instant::now();
                img.flush().expect("flush");
                // A FLUSH that came while the writer punched nothing once slept until the
                // timer commit (here 30 s; up to the commit interval in production).
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "a FLUSH waited {:?} for a writer that missed it",
                    started.elapsed()
                );
                img.core.mark_idle_if_quiet();
                if img.core.clean_marked() {
                    marks.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for i in 0..3000u64 {
                    // Quiet spells, so that the marker is written between writes.
                    if (i + t) % 4 == 0 {
                        std::thread::sleep(Duration::from_micros(100 + (i % 5) * 100));
                    }
                    let c = (t * 61 + i * 7) % 128;
                    let before = img.core.commits.load(Ordering::SeqCst);
                    // A discard of a cluster already zero changes nothing (the marker may
                    // follow it): only writes, which always store a version, are judged.
                    let discard = i % 3 == 0;
                    if discard {
                        img.discard(c * 65536, 65536).expect("discard");
                    } else {
                        img.write(c * 65536 + (i % 16) * 4096, &[i as u8 | 1; 4096])
                            .expect("write");
                    }
                    // Marked after this write returned is fine only if a commit (which
                    // covers it) ran since it started.
                    let marked = img.core.clean_marked();
                    let after = img.core.commits.load(Ordering::SeqCst);
                    assert!(
                        discard || !marked || after > before,
                        "thread {t} op {i}: journal ends with the idle marker over a \
                         completed, uncommitted change"
                    );
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, Ordering::SeqCst);
    marker.join().expect("marker thread");
    let marks = marks.load(Ordering::SeqCst);
    assert!(
        marks >= 10,
        "the marker went down {marks} times: the race was hardly exercised"
    );
    let Ok(img) = Arc::try_unwrap(img) else {
        panic!("the image is still shared");
    };
    img.close().expect("close");
}

/// R20: a quiesce that fails (full host disk) keeps the writer lock, and the close after it must
/// keep it too while it retries: no other process may take the image over while this one still
/// writes to it (I8). The image is a real file, so the lock is a real flock.
#[test]
fn a_close_after_a_failed_quiesce_never_lets_the_writer_lock_go_while_it_writes() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r20.img");
    let size = 4u64 << 20;
    Image::create(
        &path,
        &CreateOptions {
            size,
            cluster_size: 65536,
            compression: Compression::Lz4,
        },
    )
    .expect("create");
    let layout = format::Layout::new(size, 65536).expect("layout");
    let file: Arc<dyn Storage> = Arc::new(FileStorage::open(&path, false).expect("open file"));
    let disk = FailingDisk::with(file, Some(path.clone()));
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    };
    let img = Image::open_on(disk.clone(), &opts).expect("open");
    img.write(4096, &random(4096, 7)).expect("buffered write");
    disk.refuse(layout.data_offset..u64::MAX, libc::ENOSPC);
    img.quiesce()
        .expect_err("the quiesce cannot store the buffered write");
    assert!(
        !FileStorage::open(&path, false)
            .expect("open")
            .try_lock_exclusive()
            .expect("flock"),
        "a failed quiesce must keep the writer lock"
    );
    let before = disk.refused_writes.load(Ordering::SeqCst);
    img.close().expect_err("the close cannot store it either");
    assert!(
        disk.refused_writes.load(Ordering::SeqCst) > before,
        "the close did not try to store the buffered write again"
    );
    assert_eq!(
        disk.unlocked_writes.load(Ordering::SeqCst),
        0,
        "the close wrote to the image while another process could have taken its lock"
    );
}

/// A file storage that counts hole punches.
#[derive(Debug)]
struct CountingStorage {
    inner: FileStorage,
    punches: std::sync::atomic::AtomicU64,
    /// False: `allocated_ranges` answers "cannot tell", as a block device does.
    lists_ranges: bool,
}

impl CountingStorage {
    fn punches(&self) -> u64 {
        self.punches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Storage for CountingStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.punches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn allocated_bytes(&self) -> std::io::Result<Option<u64>> {
        self.inner.allocated_bytes()
    }
    fn try_lock_exclusive(&self) -> std::io::Result<bool> {
        self.inner.try_lock_exclusive()
    }
    fn try_lock_shared(&self) -> std::io::Result<bool> {
        self.inner.try_lock_shared()
    }
    fn unlock(&self) -> std::io::Result<()> {
        self.inner.unlock()
    }
    fn allocated_ranges(&self, offset: u64, len: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        if !self.lists_ranges {
            return Ok(None);
        }
        self.inner.allocated_ranges(offset, len)
    }
    fn preallocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.preallocate(offset, len)
    }
    fn drop_cached(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.drop_cached(offset, len)
    }
}

/// A 64 KiB cluster that lz4 stores in about `random_blocks + 1` units: that many 4 KiB blocks
/// of random bytes, then runs of one byte.
fn sized_cluster(random_blocks: usize, seed: u64) -> Vec<u8> {
    let mut v = random(random_blocks * 4096, seed);
    v.resize(65536, (seed as u8) | 1);
    v
}

fn counting_image(dir: &tempfile::TempDir, grace: Duration) -> (Image, Arc<CountingStorage>) {
    counting_image_listing(dir, grace, true)
}

/// [`counting_image`] on storage that can (`lists_ranges`) or cannot list its allocated ranges.
fn counting_image_listing(
    dir: &tempfile::TempDir,
    grace: Duration,
    lists_ranges: bool,
) -> (Image, Arc<CountingStorage>) {
    let path = dir.path().join("img");
    let mut opts = CreateOptions::new(4 << 20);
    opts.compression = Compression::Lz4;
    Image::create(&path, &opts).expect("create");
    let st = Arc::new(CountingStorage {
        inner: FileStorage::open(&path, false).expect("open file"),
        punches: Default::default(),
        lists_ranges,
    });
    let open = OpenOptions {
        test_stale_grace: Some(grace),
        ..OpenOptions::default()
    };
    let img = Image::open_on(st.clone(), &open).expect("open");
    (img, st)
}

/// Bytes the host stores in cluster `c`'s home slot.
fn home_slot_allocated(img: &Image, st: &CountingStorage, c: u32) -> u64 {
    let l = &img.core.layout;
    let start = l.region_offset(c, 0);
    st.allocated_ranges(start, u64::from(l.cluster_size))
        .expect("ranges")
        .expect("file storage knows its ranges")
        .iter()
        .map(|&(_, len)| len)
        .sum()
}

#[test]
fn freed_halves_of_ping_pong_slots_are_overwritten_without_a_punch() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A grace period longer than the test: only reuse can make the freed halves go away.
    let (img, st) = counting_image(&dir, Duration::from_secs(3600));
    let clusters = 8u32;
    let mut expect = vec![0u8; 8 * 65536];
    for round in 0..12u64 {
        for c in 0..clusters {
            // 3 to 6 random blocks: 4 to 7 units, always beside the committed version.
            let data = sized_cluster(
                3 + ((round + u64::from(c)) % 4) as usize,
                round * 100 + u64::from(c),
            );
            img.write(u64::from(c) * 65536, &data).expect("write");
            expect[c as usize * 65536..(c as usize + 1) * 65536].copy_from_slice(&data);
        }
        img.flush().expect("flush");
        for c in 0..clusters {
            let e = img.core.table.current(c);
            assert_eq!(
                e.slot, c,
                "round {round}: cluster {c} left its home slot: {e:?}"
            );
            assert!(e.units() <= 8, "{e:?}");
        }
    }
    // Every commit freed the previous half of each home slot; none of it was punched: the next
    // versions overwrote it.
    assert_eq!(
        st.punches(),
        0,
        "freed halves were punched instead of reused"
    );
    // What waits for reuse: at most one freed half per cluster (in its home slot).
    let waiting = img.core.stale_backlog();
    assert!(
        waiting > 0 && waiting <= clusters as usize,
        "{waiting} regions wait"
    );
    let mut got = vec![0u8; expect.len()];
    img.read(0, &mut got).expect("read");
    assert!(got == expect, "data differs after ping-pong rounds");
    img.close().expect("close");
    // A clean close punches what no version covered: nothing is leaked.
    let report = check(&dir.path().join("img"), false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
    let img = Image::open(&dir.path().join("img"), &OpenOptions::default()).expect("reopen");
    let mut got = vec![0u8; expect.len()];
    img.read(0, &mut got).expect("read");
    assert!(got == expect, "data differs after reopen");
    img.close().expect("close");
}

#[test]
fn freed_units_no_version_covers_are_punched_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (img, st) = counting_image(&dir, Duration::from_millis(20));
    // A large version, then a small one: after the second commit the large one's units are
    // freed, and the small next version (none comes here) would not cover them all.
    img.write(0, &sized_cluster(6, 1)).expect("write");
    img.flush().expect("flush");
    img.write(0, &sized_cluster(1, 2)).expect("write");
    img.flush().expect("flush");
    let small = img.core.table.current(0);
    assert_eq!(small.slot, 0);
    let wanted = u64::from(small.units()) * BLOCK;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while home_slot_allocated(&img, &st, 0) != wanted {
        assert!(
            std::time::Instant::now() < deadline,
            "the freed units were not punched while running: {} bytes allocated in the home \
             slot, {wanted} referenced, {} punches",
            home_slot_allocated(&img, &st, 0),
            st.punches()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(st.punches() > 0);
    assert_eq!(img.core.stale_backlog(), 0);
    let mut got = vec![0u8; 65536];
    img.read(0, &mut got).expect("read");
    assert!(got == sized_cluster(1, 2));
    img.close().expect("close");
    let report = check(&dir.path().join("img"), false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
}

/// Bytes the host stores in the image's data area.
fn data_allocated(layout: &Layout, st: &dyn Storage) -> u64 {
    st.allocated_ranges(layout.data_offset, layout.total_len - layout.data_offset)
        .expect("ranges")
        .expect("file storage knows its ranges")
        .iter()
        .map(|&(_, len)| len)
        .sum()
}

/// Clusters 0..8 ping-pong from a 7-unit to a 2-unit version (their home slots keep 7 freed
/// units beside the new version: stale units), clusters 8..12 are written and then discarded
/// (whole slots freed: stale slots). Three commits, so a grace period of a second or more is
/// not over before the caller looks. Returns what each cluster of 0..12 must read.
fn leave_freed_space(img: &Image) -> Vec<Vec<u8>> {
    let mut expect = Vec::new();
    for c in 0..12u64 {
        let data = sized_cluster(6, 1000 + c);
        img.write(c * 65536, &data).expect("write");
    }
    img.flush().expect("flush");
    for c in 0..8u64 {
        let data = sized_cluster(1, 2000 + c);
        img.write(c * 65536, &data).expect("write");
        expect.push(data);
    }
    img.discard(8 * 65536, 4 * 65536).expect("discard");
    expect.extend((8..12).map(|_| vec![0u8; 65536]));
    img.flush().expect("flush");
    expect
}

fn assert_reads(img: &Image, expect: &[Vec<u8>], what: &str) {
    for (c, want) in expect.iter().enumerate() {
        let mut got = vec![0u8; 65536];
        img.read(c as u64 * 65536, &mut got).expect("read");
        assert!(got == *want, "{what}: cluster {c} differs");
    }
}

fn open_counting(path: &std::path::Path, grace: Duration) -> (Image, Arc<CountingStorage>) {
    let st = Arc::new(CountingStorage {
        inner: FileStorage::open(path, false).expect("open file"),
        punches: Default::default(),
        lists_ranges: true,
    });
    let open = OpenOptions {
        test_stale_grace: Some(grace),
        ..OpenOptions::default()
    };
    let img = Image::open_on(st.clone(), &open).expect("open");
    (img, st)
}

/// On storage that cannot list its allocated ranges (a block device), the next opener could not
/// find what a quiesce left unpunched: the quiesce discards it as before, and its marker does not
/// promise a reclaim (final review of session 4: a thin volume would have kept that space
/// allocated for good).
#[test]
fn a_quiesce_on_storage_that_cannot_list_its_ranges_still_punches_the_freed_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    let (img, st) = counting_image_listing(&dir, Duration::from_secs(3600), false);
    let expect = leave_freed_space(&img);
    let punches = st.punches();
    img.quiesce().expect("quiesce");
    assert!(
        st.punches() > punches,
        "the quiesce left freed space that no later opener can find"
    );
    img.resume().expect("resume");
    assert_reads(&img, &expect, "after the quiesce");
    img.close().expect("close");
    let report = check(&path, false).expect("check");
    assert!(report.corruptions.is_empty(), "{report:?}");
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
}

#[test]
fn a_quiesce_punches_nothing_and_the_next_opener_reclaims_it_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    let (a, st_a) = counting_image(&dir, Duration::from_secs(3600));
    let layout = a.core.layout.clone();
    let expect = leave_freed_space(&a);
    let referenced = a.stats().stored_bytes;
    let before = data_allocated(&layout, st_a.as_ref());
    assert!(
        before >= referenced + 40 * BLOCK,
        "the workload left no freed space waiting: {before} allocated, {referenced} referenced"
    );
    let punches = st_a.punches();
    a.quiesce().expect("quiesce");
    assert_eq!(st_a.punches(), punches, "the quiesce punched freed space");
    assert_eq!(data_allocated(&layout, st_a.as_ref()), before);

    // Consistent and explained: expected unreferenced space, no leak, no corruption.
    let report = check(&path, false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
    assert_eq!(report.uncommitted_bytes, before - referenced, "{report:?}");
    assert!(
        report.warnings.iter().any(|w| w.contains("quiesced")),
        "{report:?}"
    );

    // Another process (a migration destination): nothing lost, nothing punched by the open
    // itself, then the writer reclaims it all after the grace period.
    // A grace long enough that a stalled test thread still checks and writes within it.
    let (b, st_b) = open_counting(&path, Duration::from_secs(4));
    assert!(!b.recovered_after_unclean_shutdown());
    assert_eq!(st_b.punches(), 0, "the open punched instead of its writer");
    assert_reads(&b, &expect, "destination");
    // A new version over cluster 0's stale units, and one into a discarded (stale) slot: the
    // reclaim that follows must not punch either.
    let mut expect = expect;
    expect[0] = sized_cluster(6, 3000);
    expect[9] = sized_cluster(5, 3001);
    b.write(0, &expect[0]).expect("write");
    b.write(9 * 65536, &expect[9]).expect("write");
    b.flush().expect("flush");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while data_allocated(&layout, st_b.as_ref()) != b.stats().stored_bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "the unreferenced space was not reclaimed: {} allocated, {} referenced, {} punches",
            data_allocated(&layout, st_b.as_ref()),
            b.stats().stored_bytes,
            st_b.punches()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(st_b.punches() > 0);
    assert_eq!(b.core.stale_backlog(), 0);
    assert_reads(&b, &expect, "destination after its reclaim");
    // All reclaimed: its own quiesce promises a table-exact image.
    b.quiesce().expect("quiesce destination");
    assert!(
        !lock_meta_unreclaimed(&b),
        "nothing waits, yet the flag is set"
    );
    b.close().expect("close");
    let report = check(&path, false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
    assert_eq!(report.uncommitted_bytes, 0, "{report:?}");

    // The source closes after the hand-over: it reloads what the destination committed and
    // forgets what it had listed as freed (the destination reused some of it).
    a.close().expect("close source");
    let c = Image::open(&path, &OpenOptions::default()).expect("reopen");
    assert_reads(&c, &expect, "after both closed");
    c.close().expect("close");
    let report = check(&path, false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
}

#[test]
fn a_resumed_image_punches_what_its_quiesce_left_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    // Long enough that a stalled test thread still quiesces within it.
    let grace = Duration::from_secs(4);
    let (img, st) = counting_image(&dir, grace);
    let layout = img.core.layout.clone();
    let expect = leave_freed_space(&img);
    let referenced = img.stats().stored_bytes;
    let before = data_allocated(&layout, st.as_ref());
    assert!(
        before > referenced,
        "nothing waits: {before} vs {referenced}"
    );
    img.quiesce().expect("quiesce");
    // Parked past the grace period: still nothing punched.
    std::thread::sleep(grace + Duration::from_millis(500));
    assert_eq!(st.punches(), 0, "punched while parked");
    assert_eq!(data_allocated(&layout, st.as_ref()), before);
    img.resume().expect("resume");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while data_allocated(&layout, st.as_ref()) != referenced {
        assert!(
            std::time::Instant::now() < deadline,
            "the resumed writer did not punch: {} allocated, {referenced} referenced",
            data_allocated(&layout, st.as_ref())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(st.punches() > 0);
    assert_reads(&img, &expect, "after resume");
    img.close().expect("close");
    let report = check(&path, false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
    assert_eq!(report.uncommitted_bytes, 0, "{report:?}");
}

#[test]
fn a_close_after_a_quiesce_punches_everything_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    let (img, st) = counting_image(&dir, Duration::from_secs(3600));
    let layout = img.core.layout.clone();
    let expect = leave_freed_space(&img);
    let referenced = img.stats().stored_bytes;
    img.quiesce().expect("quiesce");
    assert!(data_allocated(&layout, st.as_ref()) > referenced);
    img.close().expect("close");
    assert_eq!(
        data_allocated(&layout, st.as_ref()),
        referenced,
        "a close left unreferenced space"
    );
    // Its marker promises a table-exact image: anything unreferenced would now be a leak.
    let report = check(&path, false).expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
    assert_eq!(report.uncommitted_bytes, 0, "{report:?}");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let img = Image::open(&path, &OpenOptions::default()).expect("reopen");
    assert_reads(&img, &expect, "after close");
    img.close().expect("close");
}

#[test]
fn an_idle_quiesce_promises_a_table_exact_image() {
    // Nothing waits for reuse (everything was punched after its grace period): the marker
    // carries no "unreclaimed" flag, so `check` would call any unreferenced space a leak and
    // the next opener scans nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    let (img, st) = counting_image(&dir, Duration::from_millis(10));
    let layout = img.core.layout.clone();
    leave_freed_space(&img);
    let referenced = img.stats().stored_bytes;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while data_allocated(&layout, st.as_ref()) != referenced {
        assert!(std::time::Instant::now() < deadline, "never punched");
        std::thread::sleep(Duration::from_millis(10));
    }
    img.quiesce().expect("quiesce");
    assert!(!lock_meta_unreclaimed(&img), "an idle quiesce set the flag");
    let report = check(&path, false).expect("check");
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
    assert_eq!(report.uncommitted_bytes, 0, "{report:?}");
    assert!(
        !report.warnings.iter().any(|w| w.contains("quiesced")),
        "{:?}",
        report.warnings
    );
    drop(img);
}

/// Whether the last marker this image wrote carries [`format::RECORD_SPACE_UNRECLAIMED`].
fn lock_meta_unreclaimed(img: &Image) -> bool {
    table::lock(&img.core.meta).marked_unreclaimed
}

/// Measurement, not a test of behaviour (run in release: `cargo test --release --lib
/// quiesce_time -- --ignored --nocapture`): how long a quiesce takes after a few seconds of
/// 64 KiB lz4 rewrites of a 1 GiB image, with the freed space punched by the quiesce (the old
/// behaviour, still what `close` does) against left for later (R29), in alternating rounds.
#[test]
#[ignore]
fn quiesce_time_with_and_without_punching_the_freed_space() {
    let seconds: u64 = std::env::var("INSITU_QUIESCE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let rounds: u64 = 3;
    let dir = tempfile::tempdir_in(std::env::var("INSITU_BENCH_DIR").unwrap_or("/tmp".into()))
        .expect("tempdir");
    let path = dir.path().join("img");
    let gib: u64 = std::env::var("INSITU_QUIESCE_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let size = gib << 30;
    Image::create(&path, &CreateOptions::new(size)).expect("create");
    let img = Image::open(&path, &OpenOptions::default()).expect("open");
    let clusters = size / 65536;
    // A pool of versions compressing to 2..9 units.
    let pool: Vec<Vec<u8>> = (0..64)
        .map(|k| sized_cluster(1 + k % 8, k as u64))
        .collect();
    let mut next = rng(7);
    let mut fill = |img: &Image, secs: u64| -> u64 {
        let start = std::time::Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            let c = next() % clusters;
            img.write(c * 65536, &pool[(next() % 64) as usize])
                .expect("write");
            n += 1;
            if n.is_multiple_of(256) {
                img.flush().expect("flush");
            }
        }
        img.flush().expect("flush");
        n
    };
    fill(&img, seconds);
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    for round in 0..rounds {
        for punch in [true, false] {
            let writes = fill(&img, seconds);
            let backlog = img.core.stale_backlog();
            let t = std::time::Instant::now();
            {
                let mut life = table::lock(&img.life);
                img.park(&mut life, false, punch).expect("quiesce");
            }
            let took = t.elapsed();
            // A migration destination on the same file: its open (with the scan for the
            // unreferenced space when the marker says so), its own quiesce, and the source's
            // resume after it (a reload).
            let t = std::time::Instant::now();
            let dest = Image::open(&path, &OpenOptions::default()).expect("destination");
            let opened = t.elapsed();
            dest.quiesce().expect("quiesce destination");
            let t = std::time::Instant::now();
            img.resume().expect("resume");
            let resumed = t.elapsed();
            drop(dest);
            eprintln!(
                "round {round}: quiesce {} after {writes} writes, {backlog} freed regions \
                 waiting: {took:.3?}; destination open {opened:.3?}, source resume after it \
                 {resumed:.3?} (load {})",
                if punch {
                    "punching (old)"
                } else {
                    "without punching (R29)"
                },
                load().trim()
            );
        }
    }
    let t = std::time::Instant::now();
    img.close().expect("close");
    eprintln!("close (punches everything): {:.3?}", t.elapsed());
}

#[test]
fn repair_of_a_quiesced_image_punches_the_space_it_left_unreclaimed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    let (img, st) = counting_image(&dir, Duration::from_secs(3600));
    let layout = img.core.layout.clone();
    let expect = leave_freed_space(&img);
    let referenced = img.stats().stored_bytes;
    img.quiesce().expect("quiesce");
    drop(img);
    let report = check(&path, true).expect("repair");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert!(
        report.repairs.iter().any(|r| r.contains("released")),
        "{:?}",
        report.repairs
    );
    assert_eq!(data_allocated(&layout, st.as_ref()), referenced);
    let report = check(&path, false).expect("check");
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
    assert_eq!(report.uncommitted_bytes, 0, "{report:?}");
    assert!(
        !report.warnings.iter().any(|w| w.contains("quiesced")),
        "{report:?}"
    );
    let img = Image::open(&path, &OpenOptions::default()).expect("reopen");
    assert!(!img.recovered_after_unclean_shutdown());
    assert_reads(&img, &expect, "after repair");
    img.close().expect("close");
}

/// A measurement, not a check (`cargo test --release --lib checkpoint_stall -- --ignored
/// --nocapture`): how long a FLUSH waits when its commit is the one that writes a checkpoint
/// (a full journal does that inside the commit: known limit R16), against an ordinary commit,
/// for a disk whose every cluster is stored. `INSITU_CKPT_BENCH_GIB` (default 16) sets the disk
/// size; each 64 KiB cluster compresses to one 4 KiB unit, so the host needs 1/16 of it.
#[test]
#[ignore]
fn checkpoint_stall_of_a_fully_stored_table() {
    let gib: u64 = std::env::var("INSITU_CKPT_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let dir = tempfile::tempdir_in(std::env::var("INSITU_BENCH_DIR").unwrap_or("/tmp".into()))
        .expect("tempdir");
    let path = dir.path().join("img");
    let size = gib << 30;
    Image::create(&path, &CreateOptions::new(size)).expect("create");
    let img = Image::open(&path, &OpenOptions::default()).expect("open");
    let clusters = size / 65536;
    let data = sized_cluster(1, 3);
    let started = std::time::Instant::now();
    for c in 0..clusters {
        img.write(c * 65536, &data).expect("write");
    }
    img.flush().expect("flush");
    eprintln!(
        "{gib} GiB: {clusters} clusters stored in {:.1} s; table {} KiB",
        started.elapsed().as_secs_f64(),
        clusters * 10 / 1024
    );
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // A FLUSH after every write until the journal has wrapped a few times: the slowest FLUSHes
    // are the ones whose commit wrote a checkpoint, written ahead (the default) or in one go.
    drop(img);
    for ahead in [true, false] {
        let opts = OpenOptions {
            test_checkpoint_ahead_min_chunks: (!ahead).then_some(u64::MAX),
            ..OpenOptions::default()
        };
        let img = Image::open(&path, &opts).expect("open");
        let mut latencies = Vec::new();
        let started = std::time::Instant::now();
        let mut k = 0u64;
        while img.stats().checkpoints < 3 && started.elapsed() < Duration::from_secs(120) {
            img.write(((k * 7919) % clusters) * 65536, &data)
                .expect("write");
            let before = img.stats().checkpoints;
            let t = std::time::Instant::now();
            img.flush().expect("flush");
            let took = t.elapsed();
            if took > Duration::from_millis(10) {
                eprintln!(
                    "  slow FLUSH #{k}: {took:?}{}",
                    if img.stats().checkpoints != before {
                        " (its commit wrote a checkpoint)"
                    } else {
                        ""
                    }
                );
            }
            latencies.push(took);
            k += 1;
        }
        latencies.sort();
        let stats = img.stats();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        eprintln!(
            "checkpoints {}: {} FLUSHes, {} checkpoints ({} ahead); FLUSH median {:?}, p99.9 {:?}, \
             max {:?}; load {}",
            if ahead { "ahead" } else { "in one commit" },
            latencies.len(),
            stats.checkpoints,
            stats.checkpoints_ahead,
            at(0.5),
            at(0.999),
            latencies[latencies.len() - 1],
            load().trim()
        );
        img.close().expect("close");
    }
    let img = Image::open(&path, &OpenOptions::default()).expect("open");
    for round in 0..5 {
        // One changed entry, so both commits have a record to write.
        img.write(((round * 7919) % clusters) * 65536, &data)
            .expect("write");
        let t = std::time::Instant::now();
        img.core.sync(false).expect("commit");
        let ordinary = t.elapsed();
        img.write(((round * 104_729) % clusters) * 65536, &data)
            .expect("write");
        let t = std::time::Instant::now();
        img.core.sync(true).expect("checkpoint");
        let checkpoint = t.elapsed();
        eprintln!(
            "round {round}: commit {:.2} ms, commit with checkpoint {:.1} ms; load {}",
            ordinary.as_secs_f64() * 1e3,
            checkpoint.as_secs_f64() * 1e3,
            load().trim()
        );
    }
}

// ----- the idle marker: power cuts, reported losses, quiesce, a full journal ---------------

/// An idle marker written while a loss was unreported carries the LOSS_UNREPORTED bit. Once
/// the guest's FLUSH reported the loss, the marker must be rewritten without it (in review,
/// nothing did: the writer skipped while `clean_marked`, `mark_clean` when the space flag
/// matched), or a migration (quiesce) or kill before the next write reports the loss again.
#[test]
fn a_loss_reported_after_the_idle_marker_is_not_reported_again() {
    for kill in [false, true] {
        let st = mem_image(4 << 20, 65536, Compression::Lz4);
        let opts = OpenOptions {
            commit_interval: Duration::from_secs(3600),
            ..OpenOptions::default()
        };
        let img = Image::open_on(st.clone(), &opts).expect("open");
        img.write(0, &random(65536, 5)).expect("write");
        img.abandon();
        let img = Image::open_on(st.clone(), &opts).expect("reopen");
        assert!(img.take_unclean_shutdown_notice(), "the loss is reported");
        // The guest idles for a commit interval before its next FLUSH.
        img.core.mark_idle_if_quiet();
        assert!(img.core.clean_marked());
        // The guest's FLUSH succeeds: the loss counts as reported.
        img.flush().expect("flush");
        if kill {
            img.abandon();
        } else {
            img.quiesce().expect("quiesce (migration source)");
            img.abandon();
        }
        let img = Image::open_on(st.clone(), &opts).expect("destination / restarted backend");
        assert!(
            !img.recovered_after_unclean_shutdown(),
            "kill={kill}: a loss reported (FLUSH succeeded) is reported again"
        );
        img.close().expect("close");
    }
}

/// Storage whose next flush fails once (EIO): the write itself reached the "page cache".
#[derive(Debug)]
struct FlushFailsOnce {
    inner: Arc<MemStorage>,
    fail_next_flush: std::sync::atomic::AtomicBool,
}

impl Storage for FlushFailsOnce {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self
            .fail_next_flush
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.flush()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn try_lock_exclusive(&self) -> std::io::Result<bool> {
        self.inner.try_lock_exclusive()
    }
    fn unlock(&self) -> std::io::Result<()> {
        self.inner.unlock()
    }
}

/// A flush failing right after the idle marker's pwrite reached the page cache (when the
/// marker was flushed, at 4a651f1, `mark_idle_if_quiet` only warned, `clean_marked` stayed false
/// and the next write appended no reopening record): a kill must not leave a journal that ends
/// with the clean-close marker over a completed write.
#[test]
fn a_failed_idle_marker_flush_does_not_hide_a_later_loss() {
    let mem = mem_image(4 << 20, 65536, Compression::Lz4);
    let disk = Arc::new(FlushFailsOnce {
        inner: mem.clone(),
        fail_next_flush: false.into(),
    });
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    };
    let img = Image::open_on(disk.clone(), &opts).expect("open");
    img.write(0, &random(65536, 7)).expect("write");
    img.flush().expect("flush");
    disk.fail_next_flush
        .store(true, std::sync::atomic::Ordering::SeqCst);
    img.core.mark_idle_if_quiet();
    // The engine goes on (or it fails the write, which would be fine too).
    let written = img.write(65536, &random(4096, 8));
    img.abandon();
    let img = Image::open_on(mem.clone(), &opts).expect("reopen after the kill");
    if written.is_ok() {
        let mut b = vec![0u8; 4096];
        img.read(65536, &mut b).expect("read");
        let lost = b != random(4096, 8);
        assert!(
            !lost || img.recovered_after_unclean_shutdown(),
            "a completed write was lost and the next backend reports no loss"
        );
    }
    img.close().expect("close");
}

/// Finding A through a quiesce (migration source) that leaves freed space unpunched: its
/// `mark_clean` sees `clean_marked` and an equal space flag and skips, keeping the stale loss bit.
#[test]
fn a_migration_after_the_idle_marker_does_not_report_a_reported_loss_again() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        test_stale_grace: Some(Duration::from_secs(3600)),
        ..OpenOptions::default()
    };
    let img = Image::open_on(st.clone(), &opts).expect("open");
    img.write(0, &random(65536, 5)).expect("write");
    img.abandon();
    let img = Image::open_on(st.clone(), &opts).expect("reopen");
    assert!(img.take_unclean_shutdown_notice(), "the loss is reported");
    // Timer commits (not a FLUSH): freed space waiting for its punch.
    for i in 0..3u64 {
        img.write(65536, &random(65536, 10 + i)).expect("write");
        img.write(3 * 65536, &random(4096, 20 + i)).expect("write");
        img.core
            .flush()
            .expect("engine commit, not the guest FLUSH");
    }
    img.core.mark_idle_if_quiet();
    assert!(img.core.clean_marked());
    img.flush().expect("flush: the loss counts as reported");
    assert!(
        img.core.holds_unreferenced_space(),
        "premise: space left unpunched"
    );
    img.quiesce().expect("quiesce");
    img.abandon();
    let img = Image::open_on(st.clone(), &opts).expect("migration destination");
    assert!(
        !img.recovered_after_unclean_shutdown(),
        "a loss reported (FLUSH succeeded) is reported again after a clean migration"
    );
    img.close().expect("close");
}

/// The idle marker is not flushed, so a quiesce (VM pause, migration source) must not take it
/// for its own clean-close marker (at fba6398 `mark_clean` skipped when the space flag
/// matched): a power cut while paused would make the next opener take a clean quiesce for a
/// crash (lost-write notice, leak scan).
#[test]
fn a_quiesce_after_an_unflushed_idle_marker_leaves_a_durable_clean_close() {
    let mem = mem_image(4 << 20, 65536, Compression::Lz4);
    let crash = Arc::new(CrashStorage::new(mem.snapshot()));
    let st = Arc::new(SparseCrash(crash.clone()));
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        test_stale_grace: Some(Duration::from_secs(3600)),
        ..OpenOptions::default()
    };
    let img = Image::open_on(st.clone(), &opts).expect("open");
    for i in 0..3u64 {
        img.write(65536, &random(65536, 10 + i)).expect("write");
        img.flush().expect("flush");
    }
    img.core.mark_idle_if_quiet();
    assert!(img.core.clean_marked(), "premise: the idle marker");
    assert!(
        img.core.holds_unreferenced_space(),
        "premise: space left unpunched"
    );
    img.quiesce().expect("quiesce");
    // Power cut while paused: only what was flushed is there.
    let durable = crash.inner.lock().expect("lock").durable.clone();
    img.abandon();
    let after = Arc::new(MemStorage::from_bytes(durable));
    let img = Image::open_on(after, &opts).expect("open after the power cut");
    assert!(
        !img.recovered_after_unclean_shutdown(),
        "a completed quiesce is taken for an unclean shutdown after a power cut"
    );
    img.close().expect("close");
}

/// [`CrashStorage`] that can list allocated space like a sparse file (as `FileStorage` can).
#[derive(Debug)]
struct SparseCrash(Arc<CrashStorage>);

impl Storage for SparseCrash {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn try_lock_exclusive(&self) -> std::io::Result<bool> {
        self.0.try_lock_exclusive()
    }
    fn unlock(&self) -> std::io::Result<()> {
        self.0.unlock()
    }
    fn allocated_ranges(&self, offset: u64, len: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        let bytes = self.0.inner.lock().expect("lock").current.clone();
        MemStorage::from_bytes(bytes).allocated_ranges(offset, len)
    }
}

/// When the idle marker takes the journal's last block, the first write after it must not
/// write a whole checkpoint inside the guest's write, under the `meta` lock (an appended
/// reopening record went through `checkpoint_and_marker` before it replaced the marker in
/// place).
#[test]
fn the_first_write_after_an_idle_marker_in_the_last_block_writes_no_checkpoint() {
    let st = mem_image(4 << 20, 65536, Compression::Lz4);
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    };
    let img = Image::open_on(st.clone(), &opts).expect("open");
    let size = img.core.layout.journal_size;
    let mut i = 0u64;
    while img.core.meta.lock().expect("meta").journal_head + BLOCK < size {
        img.write((i % 8) * 65536, &random(65536, 40 + i))
            .expect("write");
        img.core.flush().expect("commit");
        i += 1;
    }
    assert_eq!(
        img.core.meta.lock().expect("meta").journal_head + BLOCK,
        size
    );
    img.core.mark_idle_if_quiet();
    assert!(
        img.core.clean_marked(),
        "premise: the marker took the last block"
    );
    let checkpoints = img
        .core
        .checkpoints
        .load(std::sync::atomic::Ordering::SeqCst);
    img.write(9 * 65536, &random(4096, 99)).expect("write");
    assert_eq!(
        img.core
            .checkpoints
            .load(std::sync::atomic::Ordering::SeqCst),
        checkpoints,
        "a guest write wrote a whole checkpoint to reopen the journal"
    );
    img.close().expect("close");
}

/// A 4 MiB lz4 image on crash-simulating storage, one cluster written and flushed, the idle
/// marker written (unflushed); with its open options and the journal's byte range.
fn idle_marked_on_crash_storage() -> (Arc<CrashStorage>, Image, OpenOptions, std::ops::Range<u64>) {
    let mem = mem_image(4 << 20, 65536, Compression::Lz4);
    let crash = Arc::new(CrashStorage::new(mem.snapshot()));
    let opts = OpenOptions {
        commit_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    };
    let img = Image::open_on(crash.clone(), &opts).expect("open");
    img.write(0, &random(65536, 1)).expect("write");
    img.flush().expect("flush");
    img.core.mark_idle_if_quiet();
    assert!(img.core.clean_marked(), "premise: the idle marker");
    let layout = img.core.layout.clone();
    let journal = layout.journal_offset..layout.journal_offset + layout.journal_size;
    (crash, img, opts, journal)
}

/// The idle marker is pwritten without a flush. When the first write after it pwrote the
/// reopening record right behind it (fba6398), also without a flush, a power cut that kept the
/// second and not the first left a valid record after a damaged one, and the read-write open
/// refused the image ("committed data would be lost"; 9 tests of tests/crash_consistency.rs
/// failed the same way). The record now replaces the marker in place.
#[test]
fn a_power_cut_after_an_unflushed_idle_marker_and_its_reopening_record_opens() {
    let (crash, img, opts, journal) = idle_marked_on_crash_storage();
    img.write(65536, &random(65536, 2))
        .expect("write after the marker");
    let (mut bytes, records) = {
        let s = crash.inner.lock().expect("lock");
        let records: Vec<(u64, Vec<u8>)> = s
            .pending
            .iter()
            .filter(|(off, _)| journal.contains(off))
            .cloned()
            .collect();
        (s.durable.clone(), records)
    };
    img.abandon();
    // Whatever the engine left unflushed in the journal: the power cut keeps all but the first.
    assert!(
        records.len() >= 2,
        "premise: marker and reopening record unflushed: {records:?}"
    );
    for (off, data) in &records[1..] {
        bytes[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let after = Arc::new(MemStorage::from_bytes(bytes));
    let img = Image::open_on(after, &opts).expect("read-write open after the power cut");
    img.close().expect("close");
}

/// After a kill the predecessor's idle marker (or the record that replaced it) may exist only
/// in the page cache. The restarted backend's first record (`mark_open` after a clean load, or
/// its own idle marker after an unclean one) goes into the next block, so `install` must take
/// the journal for unflushed and flush first: otherwise a power cut that keeps that record and
/// not the predecessor's leaves a valid record after a damaged one, and the read-write open
/// refuses the image (it did, in review).
#[test]
fn a_power_cut_while_the_restarted_backend_reopens_an_idle_killed_image_opens() {
    let (crash, img, opts, journal) = idle_marked_on_crash_storage();
    // Killed while idle: the marker is in the page cache only.
    img.abandon();
    let (durable, marker_at) = {
        let s = crash.inner.lock().expect("lock");
        let at = s
            .pending
            .iter()
            .filter(|(off, _)| journal.contains(off))
            .map(|(off, _)| *off)
            .max()
            .expect("premise: the marker is unflushed");
        (s.durable.clone(), at)
    };
    let _ = durable;
    // The restarted backend opens it (clean: mark_open appends a record after the marker).
    // What the disk holds at the moment that record is written:
    let at = marker_at + BLOCK;
    let watch = Arc::new(SnapOnWrite {
        inner: crash.clone(),
        target: at,
        snap: std::sync::Mutex::new(None),
    });
    let img = Image::open_on(watch.clone(), &opts).expect("restart");
    let next = {
        let s = crash.inner.lock().expect("lock");
        s.current[at as usize..(at + BLOCK) as usize].to_vec()
    };
    img.abandon();
    // Power cut right after that write: the new record reached the disk, nothing unflushed
    // before it did.
    let mut bytes = watch
        .snap
        .lock()
        .expect("lock")
        .take()
        .expect("premise: a record was written after the marker");
    bytes[at as usize..(at + BLOCK) as usize].copy_from_slice(&next);
    let after = Arc::new(MemStorage::from_bytes(bytes));
    let img = Image::open_on(after, &opts).expect("read-write open after the power cut");
    img.close().expect("close");
}

/// Passes everything to a [`CrashStorage`]; at the first write at `target`, keeps a copy of
/// what is durable at that moment.
#[derive(Debug)]
struct SnapOnWrite {
    inner: Arc<CrashStorage>,
    target: u64,
    snap: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Storage for SnapOnWrite {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if offset == self.target {
            let mut snap = self.snap.lock().expect("lock");
            if snap.is_none() {
                *snap = Some(self.inner.inner.lock().expect("lock").durable.clone());
            }
        }
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn try_lock_exclusive(&self) -> std::io::Result<bool> {
        self.inner.try_lock_exclusive()
    }
    fn unlock(&self) -> std::io::Result<()> {
        self.inner.unlock()
    }
}
