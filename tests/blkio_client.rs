//! The real `insitu-blk serve` process driven by an independent vhost-user-blk client: the
//! `blkio` crate (libblkio's Rust API, driver "virtio-blk-vhost-user"). Issue #5 item 7:
//! multi-queue round trips, read-only mode, reconnect, SIGKILL after a completed flush,
//! SIGKILL with writes in flight (then `insitu-blk check` and a full read-back).
//!
//! The backend is `insitu-blk serve` unless INSITU_TEST_BACKEND=qsd (harness validation only;
//! `check` runs only against ours).
mod support;

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use support::*;

const DISK: u64 = 8 << 20;
const CLUSTER: u64 = 64 << 10;
const TIMEOUT: Duration = Duration::from_secs(20);
/// Size of the client's shared buffer region.
const REGION: usize = 8 << 20;

struct Client {
    /// Owns the connection: dropping it disconnects.
    _blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    capacity: u64,
}

impl Client {
    fn connect(
        socket: &std::path::Path,
        num_queues: i32,
        read_only: bool,
    ) -> Result<Client, String> {
        let e = |what: &'static str| {
            move |err: blkio::Error| format!("{what}: {err} ({:?})", err.errno())
        };
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
        blkio
            .set_str("path", socket.to_str().expect("utf-8 socket path"))
            .map_err(e("set path"))?;
        blkio
            .set_bool("read-only", read_only)
            .map_err(e("set read-only"))?;
        blkio.connect().map_err(e("connect"))?;
        blkio
            .set_i32("num-queues", num_queues)
            .map_err(e("set num-queues"))?;
        blkio
            .set_i32("queue-size", i32::from(opts().max_queue_size))
            .map_err(e("set queue-size"))?;
        let capacity = blkio.get_u64("capacity").map_err(e("capacity"))?;
        let started = blkio.start().map_err(e("start"))?;
        let region = blkio
            .alloc_mem_region(REGION)
            .map_err(e("alloc_mem_region"))?;
        blkio.map_mem_region(&region).map_err(e("map_mem_region"))?;
        Ok(Client {
            _blkio: blkio,
            queues: started.queues,
            region,
            capacity,
        })
    }

    fn buf(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset + len <= REGION,
            "test bug: buffer outside the region"
        );
        (self.region.addr + offset) as *mut u8
    }

    fn fill(&self, offset: usize, data: &[u8]) {
        let p = self.buf(offset, data.len());
        // SAFETY: `p..p+len` lies inside the mapped region (checked by `buf`), which this client
        // owns; no request is in flight on these bytes while the test writes them.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    fn get(&self, offset: usize, len: usize) -> Vec<u8> {
        let p = self.buf(offset, len);
        let mut v = vec![0u8; len];
        // SAFETY: as in `fill`; the request that filled these bytes has completed.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }

    /// Waits for `n` completions on queue `q`; returns (user_data, ret) pairs.
    fn wait(&mut self, q: usize, n: usize) -> Result<Vec<(usize, i32)>, String> {
        let deadline = Instant::now() + TIMEOUT;
        let mut out = Vec::new();
        while out.len() < n {
            let mut comps: Vec<MaybeUninit<Completion>> =
                (0..n - out.len()).map(|_| MaybeUninit::uninit()).collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "queue {q}: {} of {n} completions within {TIMEOUT:?}",
                    out.len()
                ));
            }
            let mut timeout = left.min(Duration::from_millis(500));
            let got = self.queues[q]
                .do_io(&mut comps, 1, Some(&mut timeout), None)
                .or_else(|err| {
                    if err.errno() == blkio::Errno::TIME {
                        Ok(0)
                    } else {
                        Err(format!("do_io: {err}"))
                    }
                })?;
            for c in comps.iter().take(got) {
                // SAFETY: do_io initialised the first `got` completions.
                let c = unsafe { c.assume_init_read() };
                out.push((c.user_data, c.ret));
            }
        }
        Ok(out)
    }

    /// Pushes queued requests to the device without waiting.
    fn submit(&mut self, q: usize) {
        let mut none: [MaybeUninit<Completion>; 0] = [];
        let mut timeout = Duration::ZERO;
        let _ = self.queues[q].do_io(&mut none, 0, Some(&mut timeout), None);
    }

    /// Queues a write of `data` (copied to `buf_off` of the shared buffer) on queue `q` without
    /// submitting it; its completion carries `user_data`.
    fn queue_write(
        &mut self,
        q: usize,
        offset: u64,
        data: &[u8],
        buf_off: usize,
        user_data: usize,
    ) {
        self.fill(buf_off, data);
        let p = self.buf(buf_off, data.len());
        self.queues[q].write(offset, p, data.len(), user_data, ReqFlags::empty());
    }

    fn write(&mut self, q: usize, offset: u64, data: &[u8], buf_off: usize) -> i32 {
        self.queue_write(q, offset, data, buf_off, 1);
        self.wait_one(q)
    }

    fn read(&mut self, q: usize, offset: u64, len: usize, buf_off: usize) -> (i32, Vec<u8>) {
        self.fill(buf_off, &vec![0xEE; len]);
        let p = self.buf(buf_off, len);
        self.queues[q].read(offset, p, len, 2, ReqFlags::empty());
        let ret = self.wait_one(q);
        (ret, self.get(buf_off, len))
    }

    fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(3, ReqFlags::empty());
        self.wait_one(q)
    }

    fn wait_one(&mut self, q: usize) -> i32 {
        let done = self.wait(q, 1).unwrap_or_else(|e| panic!("{e}"));
        done[0].1
    }

    /// Reads `[0, len)` and compares it with `model`.
    fn verify(&mut self, q: usize, model: &[u8]) -> Result<(), String> {
        const CHUNK: usize = 1 << 20;
        for pos in (0..model.len()).step_by(CHUNK) {
            let n = CHUNK.min(model.len() - pos);
            let (ret, data) = self.read(q, pos as u64, n, 0);
            if ret != 0 {
                return Err(format!("read at {pos}: ret {ret}"));
            }
            if data != model[pos..pos + n] {
                let i = (0..n).find(|&i| data[i] != model[pos + i]).unwrap();
                return Err(format!("data differs at byte {}", pos + i));
            }
        }
        Ok(())
    }
}

fn start(opts: ServeOptions) -> Backend {
    let work = Workdir::new();
    Backend::start(&work, opts)
}

fn opts() -> ServeOptions {
    ServeOptions {
        size: DISK,
        num_queues: 4,
        max_queue_size: 128,
        ..ServeOptions::default()
    }
}

/// Connects a blkio client; if the backend does not answer within TIMEOUT (libblkio blocks on
/// the socket), the backend is killed so that the client's call fails instead of hanging the test.
fn try_connect(backend: &Backend, nq: i32, ro: bool) -> Result<Client, String> {
    let pid = backend.pid();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(TIMEOUT) {
            if let Some(pid) = pid {
                // SAFETY: kill(2) on our child, which the test thread (blocked in connect) has
                // not reaped, so the pid is still its own.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            return true;
        }
        false
    });
    let result = Client::connect(&backend.socket(), nq, ro);
    drop(done);
    if guard.join().unwrap_or(false) {
        return Err(format!(
            "the backend did not let the blkio client connect within {TIMEOUT:?} (killed it): {:?}",
            result.err()
        ));
    }
    result
}

fn connect(backend: &Backend, nq: i32, ro: bool) -> Client {
    try_connect(backend, nq, ro).unwrap_or_else(|e| panic!("blkio client: {e}"))
}

#[test]
fn multi_queue_write_read_flush_discard_write_zeroes_round_trips() {
    let mut backend = start(opts());
    let mut c = connect(&backend, 4, false);
    assert_eq!(c.capacity, DISK, "capacity");
    let mut model = vec![0u8; DISK as usize];
    // Writes in flight on all four queues at once: each queue writes its own 64 KiB clusters.
    let per_queue = 8;
    for q in 0..4usize {
        for k in 0..per_queue {
            let idx = q * per_queue + k;
            let off = idx as u64 * CLUSTER;
            let data = pattern(idx as u64, CLUSTER as usize);
            c.queue_write(q, off, &data, idx * CLUSTER as usize, idx);
            model[off as usize..(off + CLUSTER) as usize].copy_from_slice(&data);
        }
        c.submit(q);
    }
    for q in 0..4 {
        for (user, ret) in c.wait(q, per_queue).unwrap() {
            assert_eq!(ret, 0, "write {user} on queue {q}");
        }
    }
    // Sub-cluster and unaligned-to-cluster writes (4 KiB at odd places, crossing a cluster edge).
    for (k, off) in [
        (0u64, 3 * 4096u64),
        (1, CLUSTER - 4096),
        (2, 5 * CLUSTER + 512 * 3),
    ] {
        let data = pattern(100 + k, 8192);
        assert_eq!(
            c.write((k % 4) as usize, off, &data, 0),
            0,
            "write at {off}"
        );
        model[off as usize..off as usize + 8192].copy_from_slice(&data);
    }
    // Scatter-gather: writev of three uneven iovecs (several data descriptors per request), then
    // readv into four others.
    {
        let data = pattern(150, 3 * 4096);
        let off = 12 * CLUSTER + 4096;
        let cuts = [(0usize, 512usize), (512, 4096 * 2 - 512), (4096 * 2, 4096)];
        let mut iov = Vec::new();
        for (k, &(from, len)) in cuts.iter().enumerate() {
            let buf_off = (1 << 20) + k * 8192;
            c.fill(buf_off, &data[from..from + len]);
            iov.push(blkio::iovec {
                iov_base: c.buf(buf_off, len).cast(),
                iov_len: len,
            });
        }
        c.queues[1].writev(off, iov.as_ptr(), iov.len() as u32, 11, ReqFlags::empty());
        assert_eq!(c.wait_one(1), 0, "writev");
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        let rcuts = [
            (0usize, 1024usize),
            (1024, 1024),
            (2048, 4096),
            (6144, 6144),
        ];
        let mut riov = Vec::new();
        for (k, &(_, len)) in rcuts.iter().enumerate() {
            let buf_off = (2 << 20) + k * 8192;
            c.fill(buf_off, &vec![0xEE; len]);
            riov.push(blkio::iovec {
                iov_base: c.buf(buf_off, len).cast(),
                iov_len: len,
            });
        }
        c.queues[2].readv(off, riov.as_ptr(), riov.len() as u32, 12, ReqFlags::empty());
        assert_eq!(c.wait_one(2), 0, "readv");
        let mut back = Vec::new();
        for (k, &(_, len)) in rcuts.iter().enumerate() {
            back.extend(c.get((2 << 20) + k * 8192, len));
        }
        assert!(back == data, "readv returned other data than writev wrote");
    }
    assert_eq!(c.flush(1), 0, "flush");
    // Read back through every queue (each a different part).
    for q in 0..4 {
        let (ret, data) = c.read(q, q as u64 * (1 << 20), 1 << 20, 0);
        assert_eq!(ret, 0, "read on queue {q}");
        let o = q * (1 << 20);
        assert!(data == model[o..o + (1 << 20)], "data read on queue {q}");
    }
    // WRITE_ZEROES: whole clusters with and without unmap, and a partial range.
    for (off, len, flags) in [
        (2 * CLUSTER, CLUSTER, ReqFlags::empty()),
        (3 * CLUSTER, 2 * CLUSTER, ReqFlags::NO_UNMAP),
        (8 * CLUSTER + 4096, 8192, ReqFlags::empty()),
    ] {
        c.queues[2].write_zeroes(off, len, 9, flags);
        assert_eq!(c.wait_one(2), 0, "write_zeroes at {off}+{len} {flags:?}");
        model[off as usize..(off + len) as usize].fill(0);
    }
    // DISCARD of whole clusters: zero entries in our engine (design: "DISCARD of whole clusters
    // turns them into zero entries"); qsd on a raw file may keep the data.
    let (doff, dlen) = (10 * CLUSTER, 3 * CLUSTER);
    c.queues[3].discard(doff, dlen, 10, ReqFlags::empty());
    assert_eq!(c.wait_one(3), 0, "discard");
    if backend.kind == BackendKind::Ours {
        model[doff as usize..(doff + dlen) as usize].fill(0);
    } else {
        let (ret, cur) = c.read(3, doff, dlen as usize, 0);
        assert_eq!(ret, 0);
        model[doff as usize..(doff + dlen) as usize].copy_from_slice(&cur);
    }
    assert_eq!(c.flush(0), 0, "flush");
    c.verify(0, &model).unwrap();
    c.verify(3, &model).unwrap();
    backend.assert_healthy("after the round trips");
    // A clean shutdown keeps everything.
    drop(c);
    let st = backend.terminate(Duration::from_secs(20));
    assert!(st.success(), "SIGTERM: exit status {st}");
    if backend.kind == BackendKind::Ours {
        let image = backend.image();
        let (st, out) = run_insitu_blk(&["check", image.to_str().unwrap()], TIMEOUT);
        assert!(
            st.success(),
            "`insitu-blk check` after a clean shutdown: {st}\n{out}"
        );
    }
    backend.restart();
    let mut c = connect(&backend, 2, false);
    c.verify(1, &model).unwrap();
}

#[test]
fn read_only_backend_offers_ro_and_serves_reads() {
    let mut backend = start(opts());
    let mut model = vec![0u8; DISK as usize];
    {
        let mut c = connect(&backend, 1, false);
        let data = pattern(7, 1 << 20);
        assert_eq!(c.write(0, 0, &data, 0), 0);
        model[..1 << 20].copy_from_slice(&data);
        assert_eq!(c.flush(0), 0);
    }
    let st = backend.terminate(Duration::from_secs(20));
    assert!(st.success(), "SIGTERM: exit status {st}");
    backend.restart_with(ServeOptions {
        read_only: true,
        ..opts()
    });
    // A read-write client is refused because the device offers VIRTIO_BLK_F_RO.
    match try_connect(&backend, 1, false) {
        Ok(_) => panic!("a read-only backend let a read-write client start (no VIRTIO_BLK_F_RO?)"),
        Err(e) => assert!(e.contains("start"), "unexpected failure: {e}"),
    }
    backend.assert_healthy("after refusing a read-write client");
    let mut c = connect(&backend, 2, true);
    c.verify(1, &model).unwrap();
    // libblkio refuses writes on its side for a read-only device; the backend's own refusal of
    // OUT/DISCARD/WRITE_ZEROES on a read-only device is tested in hostile_guest case 16.
    assert_ne!(
        c.write(0, 0, &pattern(8, 4096), 0),
        0,
        "write accepted on a read-only device"
    );
    c.verify(0, &model).unwrap();
    backend.assert_healthy("read-only");
}

#[test]
fn reconnect_sees_the_data() {
    let mut backend = start(opts());
    let mut model = vec![0u8; DISK as usize];
    for round in 0..3u64 {
        let mut c = connect(&backend, 2, false);
        c.verify((round % 2) as usize, &model)
            .unwrap_or_else(|e| panic!("round {round}: after reconnect: {e}"));
        let off = round * 3 * CLUSTER + 4096;
        let data = pattern(200 + round, 3 * CLUSTER as usize);
        // Not flushed: a reconnect is no crash, the data must be there.
        assert_eq!(c.write(0, off, &data, 0), 0);
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        drop(c);
        backend.assert_healthy("after a disconnect");
    }
    let mut c = connect(&backend, 1, false);
    c.verify(0, &model).unwrap();
}

#[test]
fn sigkill_after_a_completed_flush_loses_nothing() {
    let mut backend = start(opts());
    let mut model = vec![0u8; DISK as usize];
    let mut c = connect(&backend, 4, false);
    for q in 0..4usize {
        for k in 0..6usize {
            let idx = q * 6 + k;
            let off = (idx as u64 * CLUSTER * 5 / 4) & !4095;
            let data = pattern(300 + idx as u64, 48 << 10);
            c.queue_write(q, off, &data, idx * (48 << 10), idx);
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        c.submit(q);
    }
    for q in 0..4 {
        for (user, ret) in c.wait(q, 6).unwrap() {
            assert_eq!(ret, 0, "write {user}");
        }
    }
    c.queues[0].discard(20 * CLUSTER, 2 * CLUSTER, 50, ReqFlags::empty());
    assert_eq!(c.wait_one(0), 0);
    c.queues[1].write_zeroes(40 * CLUSTER + 8192, 8192, 51, ReqFlags::empty());
    assert_eq!(c.wait_one(1), 0);
    model[40 * CLUSTER as usize + 8192..40 * CLUSTER as usize + 16384].fill(0);
    if backend.kind == BackendKind::Ours {
        model[20 * CLUSTER as usize..22 * CLUSTER as usize].fill(0);
    } else {
        let (_, cur) = c.read(0, 20 * CLUSTER, 2 * CLUSTER as usize, 0);
        model[20 * CLUSTER as usize..22 * CLUSTER as usize].copy_from_slice(&cur);
    }
    assert_eq!(c.flush(2), 0, "flush");
    // A FUA write after the flush: durable when it completes, like a write followed by a flush.
    let fua = pattern(399, 64 << 10);
    c.fill(0, &fua);
    let p = c.buf(0, fua.len());
    c.queues[3].write(60 * CLUSTER, p, fua.len(), 52, ReqFlags::FUA);
    assert_eq!(c.wait_one(3), 0, "FUA write");
    model[60 * CLUSTER as usize..61 * CLUSTER as usize].copy_from_slice(&fua);
    backend.kill9();
    drop(c);
    backend.restart();
    let mut c = connect(&backend, 1, false);
    c.verify(0, &model)
        .unwrap_or_else(|e| panic!("after SIGKILL following a completed flush: {e}"));
}

#[test]
fn sigkill_with_writes_in_flight_leaves_whole_versions_and_no_corruption() {
    sigkill_mid_write(false);
}

/// Issue #5 item 7 literally: `check` of the image exactly as the SIGKILL left it exits 0 (leaked
/// space from the interrupted session counts as a finding too, exit 3).
#[test]
fn sigkill_with_writes_in_flight_leaves_a_clean_image() {
    sigkill_mid_write(true);
}

/// Three rounds of: writes in flight on four queues, SIGKILL, `check` of the image as left,
/// restart, every cluster reads back as one whole version written to it. Then a clean close and
/// a strict `check`. `strict_after_kill`: the check right after the kill must exit 0; otherwise it
/// must find no corruption (exit 0, or 3 for leaked space only).
fn sigkill_mid_write(strict_after_kill: bool) {
    let mut backend = start(opts());
    let clusters = (DISK / CLUSTER) as usize;
    // A flushed base: every cluster holds version 0.
    let base: Vec<Vec<u8>> = (0..clusters)
        .map(|i| pattern(10_000 + i as u64, CLUSTER as usize))
        .collect();
    {
        let mut c = connect(&backend, 1, false);
        for (i, data) in base.iter().enumerate() {
            assert_eq!(c.write(0, i as u64 * CLUSTER, data, 0), 0);
        }
        assert_eq!(c.flush(0), 0);
    }
    let mut current: Vec<Vec<Vec<u8>>> = base.iter().map(|b| vec![b.clone()]).collect();
    let mut check_failures = Vec::new();
    for round in 0..3u64 {
        let mut c = connect(&backend, 4, false);
        // Whole-cluster writes from four queues, none waited for, then SIGKILL at once.
        let per_queue = 24;
        for q in 0..4usize {
            for k in 0..per_queue {
                let cluster = (q * per_queue + k) * 7 % clusters;
                let data = pattern(
                    20_000 + round * 1000 + (q * per_queue + k) as u64,
                    CLUSTER as usize,
                );
                let buf_off = (q * per_queue + k) * CLUSTER as usize % REGION;
                c.queue_write(q, cluster as u64 * CLUSTER, &data, buf_off, k);
                current[cluster].push(data);
            }
            c.submit(q);
        }
        std::thread::sleep(Duration::from_millis(5 * round));
        backend.kill9();
        drop(c);
        if backend.kind == BackendKind::Ours {
            let image = backend.image();
            let (st, out) = run_insitu_blk(&["check", image.to_str().unwrap()], TIMEOUT);
            let acceptable = st.success() || (!strict_after_kill && st.code() == Some(3));
            if !acceptable {
                // Reported at the end, after the read-back of this and later rounds.
                check_failures.push(format!(
                    "round {round}: `insitu-blk check` after SIGKILL: {st}\n{out}"
                ));
            }
        }
        backend.restart();
        let mut c = connect(&backend, 2, false);
        // Every cluster reads without error and is one whole version the guest wrote.
        for (i, versions) in current.iter_mut().enumerate() {
            let (ret, got) = c.read(i % 2, i as u64 * CLUSTER, CLUSTER as usize, 0);
            assert_eq!(ret, 0, "round {round}: read of cluster {i} after SIGKILL");
            let pos = versions.iter().position(|v| *v == got);
            let pos = pos.unwrap_or_else(|| {
                panic!(
                    "round {round}: cluster {i} is not any version written to it (torn or garbage)"
                )
            });
            // The version found is the base of the next round.
            let found = versions.swap_remove(pos);
            *versions = vec![found];
        }
        backend.assert_healthy("after restart");
        drop(c);
    }
    // After a clean shutdown (recovery done by the restarted daemon), check is clean too.
    if backend.kind == BackendKind::Ours {
        let st = backend.terminate(Duration::from_secs(20));
        assert!(st.success(), "SIGTERM: exit status {st}");
        let image = backend.image();
        let (st, out) = run_insitu_blk(&["check", image.to_str().unwrap()], TIMEOUT);
        if !st.success() {
            check_failures.push(format!(
                "`insitu-blk check` after recovery and a clean shutdown: {st}\n{out}"
            ));
        }
    }
    assert!(check_failures.is_empty(), "{}", check_failures.join("\n"));
}

/// I8 and I7 through two processes on one image (what a migration does): while A's device runs,
/// B cannot write (it has no writer lock); once A's client is gone (A quiesces and releases the
/// lock), B takes over and sees everything A's client wrote.
#[test]
fn second_backend_on_the_same_image_waits_for_the_writer_lock() {
    let mut a = start(opts());
    if a.kind != BackendKind::Ours {
        return; // qsd has no writer lock protocol
    }
    let mut model = vec![0u8; DISK as usize];
    let mut ca = connect(&a, 2, false);
    let data = pattern(500, 4 * CLUSTER as usize);
    assert_eq!(ca.write(0, 0, &data, 0), 0);
    model[..data.len()].copy_from_slice(&data);
    // Not flushed: the hand-over must carry it anyway (A commits when it quiesces).
    let mut b = Backend::start(
        &a.work,
        ServeOptions {
            socket_name: Some("b.sock".into()),
            ..opts()
        },
    );
    let mut cb = connect(&b, 1, false);
    let other = pattern(501, 4096);
    let ret = cb.write(0, 8 * CLUSTER, &other, 0);
    assert_ne!(ret, 0, "B wrote to the image while A holds the writer lock");
    // A's client keeps working and sees nothing of B.
    let more = pattern(502, CLUSTER as usize);
    assert_eq!(ca.write(1, 4 * CLUSTER, &more, 0), 0);
    model[4 * CLUSTER as usize..5 * CLUSTER as usize].copy_from_slice(&more);
    ca.verify(1, &model).unwrap();
    // A's frontend goes away: A quiesces and releases the lock; B's requests start to succeed.
    drop(ca);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let ret = cb.write(0, 8 * CLUSTER, &other, 0);
        if ret == 0 {
            model[8 * CLUSTER as usize..8 * CLUSTER as usize + 4096].copy_from_slice(&other);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never got the writer lock after A's client left (last ret {ret})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    cb.verify(0, &model)
        .unwrap_or_else(|e| panic!("B after the hand-over: {e}"));
    a.assert_healthy("A after the hand-over");
    b.assert_healthy("B after the hand-over");
}

/// SIGHUP (the terminal or ssh session running `serve` closed; `kill -HUP`) must end the daemon like
/// SIGTERM: completed, unflushed writes committed, exit 0. Found by the evaluator (session 6): the
/// default action killed the process uncleanly, the writes were lost and the guest's next FLUSH
/// failed (an ext4 guest aborts its journal).
#[test]
fn sighup_ends_the_daemon_like_sigterm_and_keeps_completed_writes() {
    let mut backend = start(opts());
    let mut c = connect(&backend, 1, false);
    let mut written = Vec::new();
    for i in 0..8u64 {
        let data = pattern(43_000 + i, CLUSTER as usize);
        assert_eq!(c.write(0, i * CLUSTER, &data, 0), 0);
        written.push(data);
    }
    backend.signal(libc::SIGHUP);
    let st = backend.wait_exit(Duration::from_secs(20));
    drop(c);
    let st = st.unwrap_or_else(|| {
        backend.signal(libc::SIGKILL);
        panic!("backend did not exit within 20 s of SIGHUP")
    });
    assert!(st.success(), "SIGHUP: exit status {st} (SIGTERM exits 0)");
    backend.restart();
    let mut c = connect(&backend, 1, false);
    for (i, data) in written.iter().enumerate() {
        let (ret, got) = c.read(0, i as u64 * CLUSTER, CLUSTER as usize, 0);
        assert_eq!(ret, 0, "read of cluster {i} after SIGHUP");
        assert!(
            &got == data,
            "cluster {i}: a completed write was lost at SIGHUP"
        );
    }
}

/// SIGTERM with writes in flight (issue #5 item 5): the daemon commits, exits 0, and every write
/// that completed before the signal survives without a guest FLUSH; the image checks clean.
#[test]
fn sigterm_with_writes_in_flight_keeps_every_completed_write() {
    let mut backend = start(opts());
    let clusters = (DISK / CLUSTER) as usize;
    let mut versions: Vec<Vec<Vec<u8>>> = vec![vec![vec![0u8; CLUSTER as usize]]; clusters];
    let mut c = connect(&backend, 4, false);
    // Completed, never flushed: must survive a clean shutdown.
    for (i, v) in versions.iter_mut().enumerate().take(16) {
        let data = pattern(40_000 + i as u64, CLUSTER as usize);
        assert_eq!(c.write(i % 4, i as u64 * CLUSTER, &data, 0), 0);
        *v = vec![data];
    }
    // In flight when the signal comes: each cluster ends as the old or the new version.
    for q in 0..4usize {
        for k in 0..8usize {
            let cluster = 8 + q * 8 + k;
            let data = pattern(41_000 + cluster as u64, CLUSTER as usize);
            let buf_off = (q * 8 + k) * CLUSTER as usize;
            c.queue_write(q, cluster as u64 * CLUSTER, &data, buf_off, k);
            versions[cluster].push(data);
        }
        c.submit(q);
    }
    let st = backend.terminate(Duration::from_secs(20));
    drop(c);
    assert!(
        st.success(),
        "SIGTERM with writes in flight: exit status {st}"
    );
    if backend.kind == BackendKind::Ours {
        let image = backend.image();
        let (st, out) = run_insitu_blk(&["check", image.to_str().unwrap()], TIMEOUT);
        assert!(
            st.success(),
            "`insitu-blk check` after SIGTERM: {st}\n{out}"
        );
    }
    backend.restart();
    let mut c = connect(&backend, 1, false);
    for (i, v) in versions.iter().enumerate() {
        let (ret, got) = c.read(0, i as u64 * CLUSTER, CLUSTER as usize, 0);
        assert_eq!(ret, 0, "read of cluster {i} after SIGTERM");
        assert!(
            v.contains(&got),
            "cluster {i} after SIGTERM is not a version written to it{}",
            if i < 16 {
                " (a completed write was lost)"
            } else {
                ""
            }
        );
    }
}
