//! A backend killed with I/O in flight and restarted, the frontend reconnecting as
//! cloud-hypervisor does (proto review finding P3). cloud-hypervisor restarts each ring at the
//! guest's *used* index only when VIRTIO_F_IN_ORDER (or inflight tracking) was negotiated, and
//! at its *available* index otherwise, which skips every request the dead backend had not
//! completed: the guest then waits for them forever. The backend offers IN_ORDER (each queue
//! completes in the order requests were made available), so every request must complete.
mod frontend;
mod support;

use std::time::{Duration, Instant};

use frontend::*;
use support::*;

const DISK: u64 = 32 << 20;
/// Large, barely compressible writes: the backend is busy with them when it is killed.
const WRITE_LEN: usize = 512 << 10;
const SECTORS_PER_WRITE: u64 = WRITE_LEN as u64 / SECTOR;
/// Made available (and kicked) before the kill; some complete, the rest are in flight.
const BEFORE_KILL: u64 = 30;
/// Made available while the backend is dead (the guest does not know): none can have completed.
const WHILE_DEAD: u64 = 10;

/// Incompressible bytes (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Makes a write of the shared data buffer `data_gpa` to `sector` available (one header, the
/// data, one status); `kick` says whether the driver notifies. Returns (head, status address).
fn make_write_available(dev: &mut Device, data_gpa: u64, sector: u64, kick: bool) -> (u16, u64) {
    let hdr = dev.gm.alloc(16);
    dev.gm.write(hdr, &blk_header(VIRTIO_BLK_T_OUT, sector));
    let status = dev.gm.alloc(1);
    dev.gm.write(status, &[0xFF]);
    let head = dev.place_chain(
        0,
        &[
            Desc::ro(hdr, 16),
            Desc::ro(data_gpa, WRITE_LEN as u32),
            Desc::wo(status, 1),
        ],
    );
    dev.publish(0, head);
    if kick {
        dev.kick(0);
    }
    (head, status)
}

#[test]
fn a_cloud_hypervisor_reconnect_after_a_sigkill_completes_every_request() {
    restart_with_writes_in_flight(
        DRIVER_FEATURES | VIRTIO_F_IN_ORDER,
        false,
        RingBase::CloudHypervisor,
        Outage::Kill,
    );
}

/// Most guests do not accept VIRTIO_F_IN_ORDER (Linux before 6.19): cloud-hypervisor then
/// restarts each ring at the guest's *available* index and counts on the inflight buffer
/// (INFLIGHT_SHMFD) for the requests the dead backend had taken: the restarted backend must
/// execute those again, and go on with the ones never taken.
#[test]
fn a_cloud_hypervisor_reconnect_without_in_order_resubmits_the_requests_in_flight() {
    restart_with_writes_in_flight(
        DRIVER_FEATURES,
        true,
        RingBase::CloudHypervisor,
        Outage::Kill,
    );
}

/// QEMU restarts a ring at the guest's used index after its backend went away; with an inflight
/// buffer the requests in flight are found there too: each must still complete once.
#[test]
fn a_reconnect_at_the_used_index_with_an_inflight_buffer_completes_each_request_once() {
    restart_with_writes_in_flight(DRIVER_FEATURES, true, RingBase::UsedIndex, Outage::Kill);
}

/// The frontend leaves (its connection closes) while the backend executes a write, and comes
/// back to the same backend process with its inflight buffer, as cloud-hypervisor does: the
/// write the backend left uncompleted when it saw the frontend go is recorded in flight, and
/// executed again; every write completes once and is on the disk.
#[test]
fn a_frontend_that_left_mid_request_and_reconnects_gets_every_request_completed_once() {
    restart_with_writes_in_flight(
        DRIVER_FEATURES,
        true,
        RingBase::CloudHypervisor,
        Outage::Disconnect,
    );
}

/// How the backend goes away with writes in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    /// SIGKILL, then a new process.
    Kill,
    /// The frontend closes its connection; the same process serves its next one.
    Disconnect,
}

/// A backend killed while its ring waited for the image (the writer lock: a migration
/// destination with `--wait-lock`, or a slow first resume), before it took any request, with
/// requests made available meanwhile; cloud-hypervisor keeps the inflight buffer and reconnects
/// at the guest's *available* index. The queue's region must already say "nothing taken from
/// the used index on", or the restarted backend would skip those requests for good (review of
/// the inflight work, finding 1).
#[test]
fn a_backend_killed_while_waiting_for_the_lock_leaves_nothing_to_skip() {
    let work = Workdir::new();
    let mut holder = Backend::start(
        &work,
        ServeOptions {
            size: DISK,
            num_queues: 1,
            socket_name: Some("holder.sock".into()),
            ..ServeOptions::default()
        },
    );
    let one_queue = ConnectOptions {
        queues: 1,
        ..ConnectOptions::default()
    };
    let mut holder_dev = Device::connect(&holder.socket(), &one_queue)
        .unwrap_or_else(|e| panic!("connect to the lock holder: {e}"));
    assert_eq!(
        holder_dev.write(0, 0, &pattern(1, 4096)).expect("write"),
        VIRTIO_BLK_S_OK
    );
    let mut backend = Backend::start(
        &work,
        ServeOptions {
            size: DISK,
            num_queues: 1,
            socket_name: Some("waiting.sock".into()),
            wait_lock: Some("60s".into()),
            ..ServeOptions::default()
        },
    );
    let copts = ConnectOptions {
        queues: 1,
        queue_size: 128,
        driver_features: DRIVER_FEATURES,
        inflight: true,
        ..ConnectOptions::default()
    };
    let mut dev = Device::connect(&backend.socket(), &copts)
        .unwrap_or_else(|e| panic!("connect to the waiting backend: {e}"));
    let data = noise(0xC0FFEE, WRITE_LEN);
    let data_gpa = dev.gm.alloc(WRITE_LEN as u64);
    dev.gm.write(data_gpa, &data);
    let sector_of = |k: u64| 1024 + k * SECTORS_PER_WRITE;
    let requests: Vec<(u16, u64)> = (0..5)
        .map(|k| make_write_available(&mut dev, data_gpa, sector_of(k), true))
        .collect();
    // The ring is started and its worker waits for the lock: no request can complete.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        dev.used_idx_after(0, Duration::ZERO),
        0,
        "a request completed without the writer lock"
    );
    backend.kill9();
    drop(holder_dev);
    holder.kill9();
    backend.restart();
    dev.reconnect_like_cloud_hypervisor(&backend.socket())
        .unwrap_or_else(|e| panic!("reconnect: {e}"));
    for (k, (head, status_gpa)) in requests.iter().enumerate() {
        let len = dev
            .wait_head(0, *head, REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("write {k}, made available while the lock was held: {e}"));
        assert_eq!(len, 1, "write {k}: used length");
        assert_eq!(dev.gm.read(*status_gpa, 1)[0], VIRTIO_BLK_S_OK, "write {k}");
    }
    let unclaimed = dev.take_unclaimed(0);
    assert!(
        unclaimed.is_empty(),
        "unexpected used entries: {unclaimed:?}"
    );
    for k in 0..requests.len() as u64 {
        let (status, got) = dev.read(0, sector_of(k), WRITE_LEN).expect("read back");
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(got == data, "write {k} not on the disk");
    }
    backend.assert_healthy("after the reconnect");
}

/// Sends SIGSTOP to the backend and returns once every one of its threads is stopped.
fn stop_every_thread(backend: &Backend) {
    let pid = backend.pid().expect("backend runs");
    backend.signal(libc::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads");
        let all_stopped = tasks.filter_map(Result::ok).all(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat
                .rfind(')')
                .and_then(|at| stat[at + 1..].trim_start().chars().next());
            matches!(state, Some('T' | 't') | None)
        });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "the backend does not stop");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// What the engine logs (at debug level) when it ends the journal with the idle marker.
const IDLE_MARKER_LOGGED: &str = "idle: journal ends with a clean-close marker";

/// One queue, and debug logs from the engine (a test waits for the idle marker's message).
fn one_queue_serve_options() -> ServeOptions {
    ServeOptions {
        size: DISK,
        num_queues: 1,
        log_level: Some("insitu_blk::image=debug,info".into()),
        ..ServeOptions::default()
    }
}

/// A backend serving one queue of a `DISK`-sized image, and a frontend connected to it with a
/// 128-entry ring, `driver_features` and (when `inflight`) an inflight buffer.
fn one_queue_backend(
    work: &std::sync::Arc<Workdir>,
    driver_features: u64,
    inflight: bool,
) -> (Backend, Device) {
    let backend = Backend::start(work, one_queue_serve_options());
    let copts = ConnectOptions {
        queues: 1,
        queue_size: 128,
        driver_features,
        inflight,
        ..ConnectOptions::default()
    };
    let dev = Device::connect(&backend.socket(), &copts)
        .unwrap_or_else(|e| panic!("connect to the backend: {e}"));
    (backend, dev)
}

/// Kills the backend while it executes a queue of large writes, makes more available while it
/// is dead, restarts it and reconnects as `rule` says: every write must complete exactly once,
/// with status OK, and be on the disk (those the killed backend completed without a FLUSH
/// excepted), and the flushed ones from before too.
fn restart_with_writes_in_flight(
    driver_features: u64,
    inflight: bool,
    rule: RingBase,
    outage: Outage,
) {
    let work = Workdir::new();
    let (mut backend, mut dev) = one_queue_backend(&work, driver_features, inflight);
    assert_eq!(
        dev.inflight.is_some(),
        inflight,
        "inflight buffer wanted: {inflight}; protocol features {:?}",
        dev.protocol_features
    );
    // Completed and flushed I/O first: the ring's indexes are past 0 when the backend dies.
    for k in 0..3u64 {
        let status = dev.write(0, k * 8, &pattern(k, 4096)).expect("write");
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }
    assert_eq!(dev.flush(0).expect("flush"), VIRTIO_BLK_S_OK);

    let data = noise(0x5EED, WRITE_LEN);
    let data_gpa = dev.gm.alloc(WRITE_LEN as u64);
    dev.gm.write(data_gpa, &data);
    let sector_of = |k: u64| 1024 + k * SECTORS_PER_WRITE;
    // Counted from before the first write is made available: the backend may complete some
    // of them before this thread looks again (a count started later took writes the killed
    // backend completed, without a FLUSH, for ones the restarted backend must have stored).
    let used_idx = |dev: &mut Device| dev.used_idx_after(0, Duration::ZERO);
    let start = used_idx(&mut dev);
    let mut requests = Vec::new();
    for k in 0..BEFORE_KILL {
        requests.push(make_write_available(&mut dev, data_gpa, sector_of(k), true));
    }
    // Kill the backend once it has completed a few of them, and (with an inflight buffer)
    // while it executes one: the process is stopped (every thread), looked at, and killed or
    // let go on. Stopped, its buffer and rings are what a kill leaves.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        assert!(
            Instant::now() < deadline,
            "the backend was never seen executing a write after completing two"
        );
        stop_every_thread(&backend);
        let completed = used_idx(&mut dev).wrapping_sub(start);
        let executing = match &dev.inflight {
            Some((info, file)) => inflight_heads(info, file, 0).len() == 1,
            None => true,
        };
        if completed >= 2 && executing {
            break;
        }
        backend.signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_micros(200));
    }
    if outage == Outage::Disconnect {
        // The backend sees the end once it runs again, after or during the write in progress.
        dev.disconnect();
        backend.signal(libc::SIGCONT);
        let requests_before = requests.len();
        for k in BEFORE_KILL..BEFORE_KILL + WHILE_DEAD {
            requests.push(make_write_available(&mut dev, data_gpa, sector_of(k), true));
        }
        assert_eq!(requests.len(), requests_before + WHILE_DEAD as usize);
        let reconnected = match rule {
            RingBase::CloudHypervisor => dev.reconnect_like_cloud_hypervisor(&backend.socket()),
            RingBase::UsedIndex => dev.reconnect_at_used_index(&backend.socket()),
        };
        reconnected.unwrap_or_else(|e| panic!("reconnect: {e}"));
        for (k, (head, status_gpa)) in requests.iter().enumerate() {
            let len = dev
                .wait_head(0, *head, REQUEST_TIMEOUT)
                .unwrap_or_else(|e| panic!("write {k} of {}: {e}", requests.len()));
            assert_eq!(len, 1, "write {k}: used length");
            assert_eq!(dev.gm.read(*status_gpa, 1)[0], VIRTIO_BLK_S_OK, "write {k}");
        }
        let unclaimed = dev.take_unclaimed(0);
        assert!(
            unclaimed.is_empty(),
            "unexpected used entries: {unclaimed:?}"
        );
        // The same process committed everything at the disconnect: every write is on disk.
        for k in 0..BEFORE_KILL + WHILE_DEAD {
            let (status, got) = dev.read(0, sector_of(k), WRITE_LEN).expect("read back");
            assert_eq!(status, VIRTIO_BLK_S_OK);
            assert!(got == data, "write {k} not on the disk");
        }
        if let Some((info, file)) = &dev.inflight {
            let left = inflight_heads(info, file, 0);
            assert!(left.is_empty(), "still recorded in flight: {left:?}");
        }
        backend.assert_healthy("after the reconnect");
        return;
    }
    backend.kill9();
    let completed_before_kill = used_idx(&mut dev).wrapping_sub(start);
    if let Some((info, file)) = &dev.inflight {
        // The oldest write not completed is the one recorded in flight: the restarted backend
        // must execute it again.
        let mut in_flight = inflight_heads(info, file, 0);
        let mut expected = vec![requests[usize::from(completed_before_kill)].0];
        if inflight_used_idx(info, file, 0) != used_idx(&mut dev) {
            // Stopped between a completion and its clear (the spec's "last batch", which the
            // next start resolves): the last completed head is still flagged too.
            expected.push(requests[usize::from(completed_before_kill) - 1].0);
        }
        in_flight.sort_unstable();
        expected.sort_unstable();
        assert_eq!(in_flight, expected, "heads in flight at the kill");
    }
    // The guest keeps submitting: its kicks go to an eventfd nobody reads now.
    for k in BEFORE_KILL..BEFORE_KILL + WHILE_DEAD {
        requests.push(make_write_available(&mut dev, data_gpa, sector_of(k), true));
    }

    backend.restart();
    let reconnected = match rule {
        RingBase::CloudHypervisor => dev.reconnect_like_cloud_hypervisor(&backend.socket()),
        RingBase::UsedIndex => dev.reconnect_at_used_index(&backend.socket()),
    };
    reconnected.unwrap_or_else(|e| panic!("reconnect: {e}"));
    let in_order = dev.acked_features & VIRTIO_F_IN_ORDER != 0;
    eprintln!("{completed_before_kill} of {BEFORE_KILL} writes completed before the kill");
    for (k, (head, status_gpa)) in requests.iter().enumerate() {
        let len = dev
            .wait_head(0, *head, REQUEST_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "write {k} of {}: {e} ({completed_before_kill} had completed before the kill; \
                 IN_ORDER negotiated: {in_order}, inflight buffer: {inflight}, {rule:?})",
                    requests.len()
                )
            });
        assert_eq!(len, 1, "write {k}: used length");
        assert_eq!(
            dev.gm.read(*status_gpa, 1)[0],
            VIRTIO_BLK_S_OK,
            "write {k}: status"
        );
    }
    // No request completed twice, nothing unknown in the used ring.
    let unclaimed = dev.take_unclaimed(0);
    assert!(
        unclaimed.is_empty(),
        "unexpected used entries: {unclaimed:?}"
    );
    assert!(
        in_order || inflight,
        "completed without IN_ORDER or an inflight buffer"
    );
    // Every write served by the restarted backend is on the disk, and the flushed ones from
    // before. (Those the killed backend completed without a later FLUSH may be lost, which the
    // guest's next FLUSH reports: see docs/ARCHITECTURE.md; in order, they are the first ones.)
    for k in u64::from(completed_before_kill)..BEFORE_KILL + WHILE_DEAD {
        let (status, got) = dev
            .read(0, sector_of(k), WRITE_LEN)
            .expect("read back a write");
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(got == data, "write {k} not on the disk");
    }
    for k in 0..3u64 {
        let (status, got) = dev.read(0, k * 8, 4096).expect("read back");
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(got == pattern(k, 4096), "early write {k} lost");
    }
    if let Some((info, file)) = &dev.inflight {
        let left = inflight_heads(info, file, 0);
        assert!(
            left.is_empty(),
            "still recorded in flight after completing: {left:?}"
        );
    }
    backend.assert_healthy("after the reconnect");
}

/// A backend killed while idle lost nothing: it had committed every completed write and ended
/// its journal with the idle marker (at the first timer commit that finds nothing), so the
/// restarted backend owes the guest no lost-write notice. The guest's next FLUSH succeeds (an
/// ext4 guest would abort its journal on a failed one) and every write is there, although
/// the guest never sent a FLUSH for them. A kill right after writes, before any idle spell,
/// still fails the next FLUSH once.
#[test]
fn a_backend_killed_while_idle_owes_no_notice_and_a_busy_one_does() {
    let work = Workdir::new();
    let (mut backend, mut dev) =
        one_queue_backend(&work, DRIVER_FEATURES | VIRTIO_F_IN_ORDER, false);
    let write_all = |dev: &mut Device, seed: u64| {
        for k in 0..8u64 {
            let status = dev
                .write(0, k * 64, &pattern(seed + k, 16384))
                .expect("write");
            assert_eq!(status, VIRTIO_BLK_S_OK);
        }
    };
    let read_all = |dev: &mut Device, seed: u64, what: &str| {
        for k in 0..8u64 {
            let (status, got) = dev.read(0, k * 64, 16384).expect("read");
            assert_eq!(status, VIRTIO_BLK_S_OK);
            assert!(got == pattern(seed + k, 16384), "{what}: write {k} lost");
        }
    };
    write_all(&mut dev, 100);
    // Idle over two timer commits (1 s apart): the first commits the writes, the second finds
    // nothing and ends the journal with the idle marker. Only a marker logged after the last
    // write counts (a stalled test may have let one through between two writes).
    let markers = backend.log().matches(IDLE_MARKER_LOGGED).count();
    backend.wait_for_log(IDLE_MARKER_LOGGED, markers + 1, Duration::from_secs(60));
    backend.kill9();
    // The busy half must kill before any timer commit, however long a loaded machine stalls
    // the test: the restarted backend's timer never fires.
    backend.restart_with(ServeOptions {
        commit_interval: Some("1h".into()),
        ..one_queue_serve_options()
    });
    dev.reconnect_like_cloud_hypervisor(&backend.socket())
        .unwrap_or_else(|e| panic!("reconnect: {e}"));
    assert_eq!(
        dev.flush(0).expect("flush"),
        VIRTIO_BLK_S_OK,
        "the guest was told about a loss after the kill of an idle backend"
    );
    read_all(&mut dev, 100, "after the kill of an idle backend");

    // Busy: killed right after its writes completed, none committed.
    write_all(&mut dev, 200);
    backend.kill9();
    backend.restart();
    dev.reconnect_like_cloud_hypervisor(&backend.socket())
        .unwrap_or_else(|e| panic!("reconnect: {e}"));
    assert_eq!(
        dev.flush(0).expect("flush"),
        VIRTIO_BLK_S_IOERR,
        "writes completed without a FLUSH may be lost: the next FLUSH must say so"
    );
    assert_eq!(dev.flush(0).expect("flush"), VIRTIO_BLK_S_OK, "told once");
    backend.assert_healthy("after the reconnects");
}

/// A guest's burst of small writes fills the write-back buffer (a 4 KiB page of RAM per page
/// written); once the backend is idle (its idle marker written) it gives that memory back to
/// the kernel, so a fleet of idle VMs does not hold every backend at its busiest size.
#[test]
fn an_idle_backend_gives_back_the_memory_of_its_write_back_buffer() {
    let work = Workdir::new();
    // A commit interval longer than the burst takes on a loaded machine: the writer stores
    // buffered clusters older than one interval, and the rest of the burst would then reuse
    // their freed pages (the burst would never hold the whole buffer at once).
    let backend = Backend::start(
        &work,
        ServeOptions {
            commit_interval: Some("5s".into()),
            ..one_queue_serve_options()
        },
    );
    let mut dev = Device::connect(
        &backend.socket(),
        &ConnectOptions {
            queues: 1,
            queue_size: 128,
            driver_features: DRIVER_FEATURES,
            ..ConnectOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect to the backend: {e}"));
    assert_eq!(dev.flush(0).expect("flush"), VIRTIO_BLK_S_OK);
    let markers = backend.log().matches(IDLE_MARKER_LOGGED).count();
    let before = backend.anon_rss().expect("RssAnon of the backend");
    // 60 KiB (all but the last 4 KiB) of each of 400 clusters of 64 KiB: 25 MiB of buffered
    // clusters, their pages written.
    const CLUSTERS: u64 = 400;
    const LEN: usize = 60 << 10;
    for c in 0..CLUSTERS {
        let status = dev
            .write(0, c * (65536 / SECTOR), &pattern(700 + c, LEN))
            .expect("write");
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }
    let busy = backend.anon_rss().expect("RssAnon of the backend");
    assert!(
        busy >= before + (16 << 20),
        "the burst did not fill the buffer: {before} -> {busy} bytes (the test measures nothing)"
    );
    backend.wait_for_log(IDLE_MARKER_LOGGED, markers + 1, Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let idle = backend.anon_rss().expect("RssAnon of the backend");
        if idle <= before + (8 << 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle, yet still {idle} bytes resident (before the burst {before}, during it {busy})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in 0..CLUSTERS {
        let (status, got) = dev.read(0, c * (65536 / SECTOR), LEN).expect("read");
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(got == pattern(700 + c, LEN), "cluster {c} lost its write");
    }
}

/// A frontend that sends messages and reads no reply (hung, or hostile) must not keep SIGTERM
/// from ending the backend: the replies still queued for it are given up after a bounded wait,
/// and the backend closes the image and exits 0 (final review of session 4: it waited for as
/// long as the frontend stayed connected).
#[test]
fn sigterm_ends_the_backend_while_the_frontend_reads_no_reply() {
    use std::io::Write;
    let work = Workdir::new();
    let mut backend = Backend::start(&work, ServeOptions::default());
    let stream = connect_socket(&backend.socket()).expect("connect");
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("write timeout");
    // GET_FEATURES (request 1, header flags: version 1, no payload) until the replies fill every
    // buffer between the crate and this socket and our writes block too.
    let header: Vec<u8> = [1u32, 1, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        if (&stream).write_all(&header).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(
        sent > 1000,
        "only {sent} messages went out before the socket filled"
    );
    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit(Duration::from_secs(20));
    assert!(
        matches!(status, Some(s) if s.success()),
        "SIGTERM with a frontend that reads no reply: {status:?}\n{}",
        backend.log()
    );
    drop(stream);
}
