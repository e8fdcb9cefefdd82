//! Process helpers for the integration tests that talk to a real vhost-user-blk backend process:
//! start `insitu-blk serve` (or, only to validate the test harness while our daemon is missing,
//! qemu-storage-daemon) on a temporary image and socket, wait for the socket, kill it, and print
//! its log when a test fails.
//!
//! The backend under test is ours unless `INSITU_TEST_BACKEND=qsd` is set.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a backend may take to create its socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Which vhost-user-blk backend the tests drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// `insitu-blk serve`: the product, the default.
    Ours,
    /// qemu-storage-daemon over a raw file: only to validate the harness itself.
    Qsd,
}

impl BackendKind {
    pub fn from_env() -> Self {
        match std::env::var("INSITU_TEST_BACKEND").as_deref() {
            Ok("qsd") => BackendKind::Qsd,
            _ => BackendKind::Ours,
        }
    }
}

/// Options of one backend start.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Logical size of the disk (the image is created with it when missing).
    pub size: u64,
    pub num_queues: u16,
    /// Largest queue size the backend accepts (passed as `--queue-size` to ours).
    pub max_queue_size: u16,
    pub read_only: bool,
    pub serial: Option<String>,
    /// Socket file name in the work directory (default `vhost.sock`): two backends on one image.
    pub socket_name: Option<String>,
    /// `--wait-lock DUR` (ours only).
    pub wait_lock: Option<String>,
    /// `--commit-interval DUR` (ours only). A test that needs writes to stay uncommitted until
    /// it kills the backend sets a long one: a loaded machine may stall it past the default
    /// 1 s, and the timer commit (or the idle marker after an empty one) would then have made
    /// them durable.
    pub commit_interval: Option<String>,
    /// `--log-level FILTER` (ours only), for a test that waits for a debug message.
    pub log_level: Option<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            size: 8 << 20,
            num_queues: 4,
            max_queue_size: 128,
            read_only: false,
            serial: None,
            socket_name: None,
            wait_lock: None,
            commit_interval: None,
            log_level: None,
        }
    }
}

/// A temporary directory shared by the successive backend processes of one test.
pub struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Arc<Workdir> {
        let dir = tempfile::Builder::new()
            .prefix("insitu-vhosttest-")
            .tempdir()
            .expect("create temporary directory");
        Arc::new(Workdir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn image(&self) -> PathBuf {
        self.path().join("disk.img")
    }

    pub fn socket(&self) -> PathBuf {
        self.path().join("vhost.sock")
    }
}

/// The path of our binary.
pub fn insitu_blk_bin() -> &'static str {
    env!("CARGO_BIN_EXE_insitu-blk")
}

/// One running backend process. Killed (SIGKILL) on drop; its log is printed when the test is
/// failing (the drop happens during the panic's unwinding).
pub struct Backend {
    pub kind: BackendKind,
    pub opts: ServeOptions,
    pub work: Arc<Workdir>,
    child: Option<Child>,
    log_path: PathBuf,
    /// Logs of the earlier processes of this test (restarts), printed on failure too.
    earlier_logs: Vec<String>,
}

impl Backend {
    /// Starts a backend on `work`'s image and socket and waits until its socket exists.
    pub fn start(work: &Arc<Workdir>, opts: ServeOptions) -> Backend {
        Self::start_kind(BackendKind::from_env(), work, opts)
    }

    pub fn start_kind(kind: BackendKind, work: &Arc<Workdir>, opts: ServeOptions) -> Backend {
        let mut backend = Backend {
            kind,
            opts,
            work: Arc::clone(work),
            child: None,
            log_path: PathBuf::new(),
            earlier_logs: Vec::new(),
        };
        backend.spawn();
        backend
    }

    fn spawn(&mut self) {
        let image = self.work.image();
        let socket = self.socket();
        let _ = fs::remove_file(&socket);
        let n = self.earlier_logs.len() + usize::from(self.child.is_some());
        self.log_path = self.work.path().join(format!("backend-{n}.log"));
        let log = File::create(&self.log_path).expect("create backend log");
        let mut cmd = match self.kind {
            BackendKind::Ours => {
                let mut cmd = Command::new(insitu_blk_bin());
                cmd.arg("serve")
                    .arg("--socket-path")
                    .arg(&socket)
                    .arg("--blk-file")
                    .arg(&image)
                    .arg("--num-queues")
                    .arg(self.opts.num_queues.to_string())
                    .arg("--queue-size")
                    .arg(self.opts.max_queue_size.to_string());
                if !image.exists() {
                    cmd.arg("--create-size").arg(self.opts.size.to_string());
                }
                if self.opts.read_only {
                    cmd.arg("--read-only");
                }
                if let Some(serial) = &self.opts.serial {
                    cmd.arg("--serial").arg(serial);
                }
                if let Some(wait) = &self.opts.wait_lock {
                    cmd.arg("--wait-lock").arg(wait);
                }
                if let Some(interval) = &self.opts.commit_interval {
                    cmd.arg("--commit-interval").arg(interval);
                }
                if let Some(filter) = &self.opts.log_level {
                    cmd.arg("--log-level").arg(filter);
                }
                cmd
            }
            BackendKind::Qsd => {
                if !image.exists() {
                    let f = File::create(&image).expect("create raw image");
                    f.set_len(self.opts.size).expect("size raw image");
                }
                let mut cmd = Command::new("qemu-storage-daemon");
                cmd.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f,filename={},read-only={}",
                    image.display(),
                    if self.opts.read_only { "on" } else { "off" }
                ));
                let export = format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={}",
                    socket.display(),
                    if self.opts.read_only { "off" } else { "on" },
                    self.opts.num_queues
                );
                cmd.arg("--export").arg(export);
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("spawn backend");
        self.child = Some(child);
        self.wait_for_socket();
    }

    fn wait_for_socket(&mut self) {
        let socket = self.socket();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if is_listening(&socket) {
                return;
            }
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "backend exited with {status} before creating its socket\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "backend did not create {} within {:?}",
                    socket.display(),
                    START_TIMEOUT
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn socket(&self) -> PathBuf {
        match &self.opts.socket_name {
            Some(name) => self.work.path().join(name),
            None => self.work.socket(),
        }
    }

    pub fn image(&self) -> PathBuf {
        self.work.image()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The exit status if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait on backend"))
    }

    /// The current process's log (stdout and stderr).
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Waits until the current process's log holds `needle` `count` times or more; panics after
    /// `timeout` (a condition that must eventually hold: the timeout only bounds a hang).
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.log().matches(needle).count() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "the backend did not log {needle:?} ({count}x) within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts that the process is still running and has not panicked.
    pub fn assert_healthy(&mut self, context: &str) {
        if let Some(status) = self.try_exit_status() {
            panic!("{context}: backend exited with {status}");
        }
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "{context}: backend log shows a panic"
        );
    }

    /// The process's peak resident memory (VmHWM) in bytes, if it runs.
    pub fn peak_rss(&self) -> Option<u64> {
        self.status_bytes("VmHWM:")
    }

    /// The process's resident anonymous memory (RssAnon: its heap and stacks, not the guest
    /// memory it maps) in bytes, if it runs.
    pub fn anon_rss(&self) -> Option<u64> {
        self.status_bytes("RssAnon:")
    }

    /// A memory field of the process's `/proc/PID/status` (given in kB there), in bytes.
    fn status_bytes(&self, field: &str) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(Duration::from_millis((utime + stime) * 1000 / hz))
    }

    /// Open file descriptors and memfd-backed mappings of the process (for leak checks).
    pub fn fds_and_guest_mappings(&self) -> Option<(usize, usize)> {
        let pid = self.pid()?;
        let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let guest = maps.lines().filter(|l| l.contains("memfd:")).count();
        Some((fds, guest))
    }

    /// Sends `signal` to the process (if it runs).
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet (it is
            // reaped only by `wait_exit`/drop), so the pid cannot have been reused.
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its status, or None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let status = self.wait_exit(Duration::from_secs(10));
        assert!(status.is_some(), "backend did not die from SIGKILL");
    }

    /// SIGTERM, then expects a clean exit (status 0) within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => {
                self.signal(libc::SIGKILL);
                panic!("backend did not exit within {timeout:?} of SIGTERM");
            }
        }
    }

    /// Starts a new process on the same image and socket (the previous one must have exited).
    pub fn restart(&mut self) {
        if let Some(status) = self.try_exit_status() {
            let _ = status;
        } else {
            panic!("restart while the backend still runs");
        }
        self.earlier_logs.push(self.log());
        self.spawn();
    }

    /// Restarts with other options (e.g. read-only).
    pub fn restart_with(&mut self, opts: ServeOptions) {
        self.opts = opts;
        self.restart();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for (i, log) in self.earlier_logs.iter().enumerate() {
                eprintln!("===== backend log (earlier process {i}) =====\n{log}");
            }
            eprintln!(
                "===== backend log ({:?}, {}) =====\n{}\n===== end of backend log =====",
                self.kind,
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// True when a unix socket bound at `path` is listening (its file may exist before `listen`, and
/// a client connecting in between is refused): /proc/net/unix marks listening sockets with the
/// __SO_ACCEPTCON flag (0x10000).
fn is_listening(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return path.exists();
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// Makes the child die when the test thread that spawned it dies (a killed or timed-out test run
/// leaves no backend behind).
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `insitu-blk` with `args` (with a timeout) and returns (exit status, stdout+stderr).
pub fn run_insitu_blk(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let work = tempfile::tempdir().expect("tempdir");
    let out_path = work.path().join("out");
    let out = File::create(&out_path).expect("create output file");
    let mut cmd = Command::new(insitu_blk_bin());
    die_with_parent(&mut cmd);
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn insitu-blk");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("insitu-blk {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut text = String::new();
    let _ = OpenOptions::new()
        .read(true)
        .open(&out_path)
        .and_then(|mut f| f.read_to_string(&mut text));
    (status, text)
}

/// Deterministic test data: `len` bytes derived from `seed` (a cheap xorshift stream), one
/// random word in four and the seed's byte elsewhere, so that it is unique per seed and still
/// compressible (the engine's compressed path is exercised, not only its raw fallback).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    let mut word = 0u64;
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if word.is_multiple_of(4) {
            out.extend_from_slice(&state.to_le_bytes());
        } else {
            out.extend_from_slice(&[seed as u8 ^ 0x5A; 8]);
        }
        word += 1;
    }
    out.truncate(len);
    out
}
