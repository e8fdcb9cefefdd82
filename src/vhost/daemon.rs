//! The listener loop: one process serves one frontend connection after another on the same
//! listening socket, each with a fresh per-connection backend pointing at the long-lived disk.
//! A disconnect quiesces the disk; a stop request (SIGTERM) ends the current connection and the
//! loop.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::backend::{ConnectionBackend, MAX_QUEUES};
use super::device::{lock, Device, SharedDisk};
use super::filter::{FilteredConnection, Rules};

/// Errors of the daemon's set-up and listener loop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another process listens on the socket path.
    #[error("socket {0} is in use by a running process")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding or probing the socket path failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// The inherited file descriptor is not a listening unix socket.
    #[error("--fd {fd}: {reason}")]
    BadFd {
        /// The descriptor number.
        fd: RawFd,
        /// What is wrong with it.
        reason: String,
    },
    /// The queue configuration is out of range.
    #[error("{0}")]
    InvalidConfig(String),
    /// Waiting for or accepting a connection failed.
    #[error("listener failed: {0}")]
    Listener(#[source] io::Error),
    /// The vhost-user daemon could not be set up for a connection.
    #[error("cannot serve a connection: {0}")]
    Connection(String),
}

/// Where the listening socket comes from.
#[derive(Clone, Debug)]
pub enum SocketSource {
    /// Bind a new socket at this path (a stale socket file is replaced; a live one is refused).
    Path(PathBuf),
    /// A listening unix socket inherited as this file descriptor (libvirt, systemd).
    Fd(RawFd),
}

/// Static settings of the vhost-user device.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Number of queues offered (one worker thread each), 1..=64.
    pub num_queues: usize,
    /// Largest queue size accepted from the frontend (a power of two, at most 32768).
    pub queue_size: usize,
    /// How long a queue's worker polls its ring at most after a batch before it sleeps until
    /// the driver's next notification (adaptive, see `ConnectionBackend::with_polling`); zero
    /// turns polling off.
    pub poll_max: Duration,
    /// Whether a worker that was kept off its core while it polled stops polling for a while
    /// (see `PollWindow`). On: the right choice when workers share cores with vCPUs or other
    /// work, where spinning costs the guest; `serve` always turns it on. Off: for tests that
    /// assert what polling does on a loaded machine, and for an embedder whose workers have
    /// cores of their own (pinned to isolated CPUs).
    pub poll_backoff: bool,
}

impl DaemonConfig {
    /// The default polling window, like QEMU's iothread `poll-max-ns` (32 µs there) but long
    /// enough to cover a QD1 client's round trip (completion notification → wake-up of the
    /// client's thread → its next request) in a VM whose idle vCPUs halt: measured 35-75 µs on
    /// the nested 2-vCPU benchmark machine, where a 32 µs window never caught it. The window
    /// adapts (see `PollWindow`): a guest whose requests come further apart costs little.
    pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(128);
}

/// Binds the socket, refusing to steal it from a live listener.
pub fn bind_listener(source: &SocketSource) -> Result<Listener, DaemonError> {
    match source {
        SocketSource::Path(path) => bind_path(path),
        SocketSource::Fd(fd) => inherit_fd(*fd),
    }
}

fn bind_path(path: &Path) -> Result<Listener, DaemonError> {
    let bind_error = |source| DaemonError::Bind {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(DaemonError::SocketInUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // Left behind by a process that died: nobody listens there any more.
                tracing::warn!("removing stale socket {}", path.display());
                fs::remove_file(path).map_err(bind_error)?;
            }
            Err(e) => return Err(bind_error(e)),
        },
        Ok(_) => return Err(DaemonError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    Listener::new(path, false).map_err(|e| match e {
        VhostUserError::SocketError(source) => bind_error(source),
        other => bind_error(io::Error::other(other.to_string())),
    })
}

fn inherit_fd(fd: RawFd) -> Result<Listener, DaemonError> {
    let bad = |reason: String| DaemonError::BadFd { fd, reason };
    if fd < 0 {
        return Err(bad("not a file descriptor".into()));
    }
    // SAFETY: F_GETFD only queries the descriptor's flags; an invalid number yields EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(format!("not open ({})", io::Error::last_os_error())));
    }
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `accepting` and `len` are valid for writes of the sizes given; the kernel checks
    // the descriptor (ENOTSOCK for a non-socket).
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(bad(format!(
            "not a socket ({})",
            io::Error::last_os_error()
        )));
    }
    if accepting == 0 {
        return Err(bad("socket is not listening".into()));
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this process to own
    // (the --fd convention); nothing else in the process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = UnixListener::from(owned);
    if let Err(e) = listener.local_addr() {
        return Err(bad(format!("not a unix socket ({e})")));
    }
    Ok(Listener::from(listener))
}

/// State shared with [`StopHandle`]s.
struct Control {
    stopping: AtomicBool,
    wake: EventNotifier,
    /// The connection being served, to end it on stop.
    current: Mutex<Option<ShutdownHandle>>,
    /// Tests only: whether the backend of the connection served last has seen its end.
    #[cfg(test)]
    last_connection_ended: Mutex<Option<Box<dyn Fn() -> bool + Send>>>,
}

/// Asks a running [`Daemon::serve`] to end (from a signal handler thread).
#[derive(Clone)]
pub struct StopHandle {
    control: Arc<Control>,
}

impl StopHandle {
    /// Ends the current connection (if any) and makes `serve` return.
    pub fn stop(&self) {
        let current = lock(&self.control.current);
        self.control.stopping.store(true, Ordering::Release);
        if let Some(connection) = current.as_ref() {
            connection.shutdown();
        }
        if let Err(e) = self.control.wake.notify() {
            tracing::warn!("cannot wake the listener loop: {e}");
        }
    }

    /// Tests only: true once the backend of the connection served last has seen the connection
    /// end (or is gone); false before any connection.
    #[cfg(test)]
    pub(crate) fn last_connection_ended(&self) -> bool {
        lock(&self.control.last_connection_ended)
            .as_ref()
            .is_some_and(|ended| ended())
    }
}

/// How often a connection's pause detector looks at the rings' enabled state.
const PAUSE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

const LISTENER_EVENT: u64 = 0;
const WAKE_EVENT: u64 = 1;

/// Serves a device over vhost-user, one connection after another.
pub struct Daemon<D: Device> {
    disk: Arc<SharedDisk<D>>,
    listener: Listener,
    config: DaemonConfig,
    control: Arc<Control>,
    epoll: Epoll,
    _wake_consumer: EventConsumer,
}

impl<D: Device> Daemon<D> {
    /// Prepares to serve `device` on `listener`.
    pub fn new(device: D, listener: Listener, config: DaemonConfig) -> Result<Self, DaemonError> {
        if config.num_queues == 0 || config.num_queues > MAX_QUEUES {
            return Err(DaemonError::InvalidConfig(format!(
                "number of queues {} is out of range (1..={MAX_QUEUES})",
                config.num_queues
            )));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size > 32768 {
            return Err(DaemonError::InvalidConfig(format!(
                "queue size {} is not a power of two in 1..=32768",
                config.queue_size
            )));
        }
        let (wake_consumer, wake) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                .map_err(DaemonError::Listener)?;
        let epoll = Epoll::new().map_err(DaemonError::Listener)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_EVENT),
            )
            .map_err(DaemonError::Listener)?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake_consumer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, WAKE_EVENT),
            )
            .map_err(DaemonError::Listener)?;
        // Accepted only after epoll reported a pending connection; one that vanished meanwhile
        // must not block the loop (and SIGTERM with it).
        listener
            .set_nonblocking(true)
            .map_err(|e| DaemonError::Listener(io::Error::other(e.to_string())))?;
        let disk = Arc::new(SharedDisk::new(device, config.num_queues));
        Ok(Self {
            disk,
            listener,
            config,
            control: Arc::new(Control {
                stopping: AtomicBool::new(false),
                wake,
                current: Mutex::new(None),
                #[cfg(test)]
                last_connection_ended: Mutex::new(None),
            }),
            epoll,
            _wake_consumer: wake_consumer,
        })
    }

    /// The disk served (for statistics and the final shutdown).
    pub fn disk(&self) -> Arc<SharedDisk<D>> {
        Arc::clone(&self.disk)
    }

    /// A handle that makes [`Daemon::serve`] return.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            control: Arc::clone(&self.control),
        }
    }

    /// Serves connections until stopped. Each connection ends with the disk quiesced.
    pub fn serve(&mut self) -> Result<(), DaemonError> {
        let mut connection_number = 0u64;
        while self.wait_for_connection()? {
            connection_number += 1;
            self.serve_connection(connection_number)?;
            if let Err(e) = self.disk.quiesce_if("the frontend disconnected", || true) {
                tracing::error!("after connection {connection_number}: {e}");
            }
        }
        Ok(())
    }

    /// Blocks until a connection is pending (true) or a stop was requested (false).
    fn wait_for_connection(&self) -> Result<bool, DaemonError> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.control.stopping.load(Ordering::Acquire) {
                return Ok(false);
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DaemonError::Listener(e)),
            };
            if self.control.stopping.load(Ordering::Acquire) {
                return Ok(false);
            }
            if events[..n].iter().any(|e| e.data() == LISTENER_EVENT) {
                return Ok(true);
            }
        }
    }

    fn serve_connection(&mut self, number: u64) -> Result<(), DaemonError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(
            ConnectionBackend::new(Arc::clone(&self.disk), mem.clone(), self.config.queue_size)
                .with_polling(self.config.poll_max, self.config.poll_backoff),
        );
        #[cfg(test)]
        {
            let weak = Arc::downgrade(&backend);
            *lock(&self.control.last_connection_ended) = Some(Box::new(move || {
                weak.upgrade()
                    .is_none_or(|backend| backend.connection_ended())
            }));
        }
        let mut daemon = VhostUserDaemon::new("insitu-blk".to_string(), Arc::clone(&backend), mem)
            .map_err(|e| DaemonError::Connection(e.to_string()))?;
        // A connection is pending (epoll said so; the listener does not block). A connection
        // that cannot be set up is dropped; the daemon goes on listening.
        let frontend = match self.listener.accept() {
            Ok(Some(frontend)) => frontend,
            Ok(None) => {
                // The connection went away before it was accepted.
                drop(daemon);
                backend.close_exit_fds();
                return Ok(());
            }
            Err(e) => {
                drop(daemon);
                backend.close_exit_fds();
                tracing::warn!("cannot accept connection {number}: {e}");
                // If the connection is still pending (e.g. out of file descriptors), do not spin.
                std::thread::sleep(std::time::Duration::from_millis(100));
                return Ok(());
            }
        };
        let rules = Rules {
            max_queue_size: self.config.queue_size,
        };
        let filter =
            match FilteredConnection::establish(frontend, rules, backend.clone(), |listener| {
                daemon.start(listener)
            }) {
                Ok(filter) => filter,
                Err(e) => {
                    drop(daemon);
                    backend.close_exit_fds();
                    tracing::warn!("cannot set up connection {number}: {e}");
                    return Ok(());
                }
            };
        {
            let mut current = lock(&self.control.current);
            *current = daemon.shutdown_handle();
            if self.control.stopping.load(Ordering::Acquire) {
                daemon.request_shutdown();
            }
        }
        tracing::info!("frontend connected (connection {number})");
        let (pause_detector_stop, pause_detector) = spawn_pause_detector(Arc::clone(&backend));
        let result = daemon.wait();
        // The crate's side of the connection is over; shut its socket down (the crate may still
        // hold it open), so the filter sees the end of what the crate sent. Unless the frontend
        // is the one that left, it is still connected (the filter holds its socket): the
        // requests in progress complete and reach the used rings before it sees the end, and
        // no new one is taken.
        if let Some(crate_side) = lock(&self.control.current).take() {
            crate_side.shutdown();
        }
        if !backend.connection_ended() {
            backend.drain();
        }
        filter.close();
        backend.end_connection();
        drop(pause_detector_stop);
        if let Some(handle) = pause_detector {
            let _ = handle.join();
        }
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(VhostUserError::Disconnected)) => {
                tracing::info!("frontend disconnected (connection {number})")
            }
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::PartialMessage | VhostUserError::SocketBroken(_),
            )) => tracing::info!("frontend went away (connection {number})"),
            Err(e) => tracing::warn!("connection {number} ended: {e}"),
        }
        // Dropping the daemon stops and joins the worker threads (requests in progress finish).
        drop(daemon);
        backend.close_exit_fds();
        backend.log_poll_stats();
        Ok(())
    }
}

/// Starts the thread that quiesces the disk while the frontend keeps every started ring disabled
/// (SET_VRING_ENABLE 0 without GET_VRING_BASE: cloud-hypervisor's pause). The control filter
/// drains a ring when it is disabled, but the quiesce (a commit, possibly long) must not hold up
/// the frontend's message, so the rings' state is polled. Re-enabling a ring makes its worker
/// resume the disk. The thread ends when the returned sender is dropped.
fn spawn_pause_detector<D: Device>(
    backend: Arc<ConnectionBackend<D>>,
) -> (
    std::sync::mpsc::Sender<()>,
    Option<std::thread::JoinHandle<()>>,
) {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("pause-detector".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(PAUSE_CHECK_INTERVAL)
            {
                let disk = backend.disk();
                if disk.is_running() && backend.every_started_ring_disabled() {
                    // Checked again once no request is in progress (under every gate).
                    let _ = disk.quiesce_if("the frontend disabled every queue (paused)", || {
                        backend.every_started_ring_disabled()
                    });
                }
            }
        });
    match spawned {
        Ok(handle) => (stop, Some(handle)),
        Err(e) => {
            tracing::warn!("cannot start the pause detector (pauses keep the lock): {e}");
            (stop, None)
        }
    }
}
