//! `insitu-blk serve`: the vhost-user-blk daemon.
//!
//! The command line follows QEMU's "vhost-user backend program conventions"
//! (docs/interop/vhost-user.rst): `--socket-path PATH` or `--fd N`, `--print-capabilities`, and
//! for the block type `--blk-file PATH` and `--read-only`. The rest are ours.
//!
//! Life of the process: open the image quiesced (superblock only, no lock), listen at once, serve
//! one frontend connection after another; the device resumes (takes the writer lock) when the
//! frontend starts a ring and quiesces when it stops them or disconnects. SIGTERM, SIGINT,
//! SIGHUP and SIGQUIT end the current connection, commit, checkpoint and close the image, and
//! exit 0. SIGUSR1 logs live statistics (so does `--stats-interval`).

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use insitu_blk::blk::BlkConfig;
use insitu_blk::image::{
    CreateOptions, Image, ImageError, LockPolicy, OpenOptions, DEFAULT_COMMIT_INTERVAL,
    DEFAULT_WRITE_BUFFER_BYTES,
};
use insitu_blk::vhost::{
    bind_listener, BlkDisk, Daemon, DaemonConfig, Device, SharedDisk, SocketSource, StatsReporter,
    MAX_QUEUES,
};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use super::size::ByteSize;
use super::validate_disk_size;

/// What `--print-capabilities` prints (vhost-user.rst, "Backend program conventions").
pub const CAPABILITIES: &str = r#"{"type": "block", "features": ["read-only", "blk-file"]}"#;

/// Largest `--queue-size`: QEMU's vhost-user-blk accepts at most 1024.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// A second SIGTERM/SIGINT within this time of the first is taken as the same request delivered
/// twice, not as an operator insisting on an immediate exit.
const DUPLICATE_SIGNAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// How long `--wait-lock` waits when given no duration.
pub const DEFAULT_WAIT_LOCK: &str = "60s";

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Exactly one of --socket-path and --fd is required (except with --print-capabilities). \
DURATION is a number with a unit: 500ms, 1s, 2m (a plain number means seconds). \
SIZE accepts K/M/G/T suffixes (binary).
The image's writer lock is taken when the frontend starts the device and released when it \
stops it (VM pause, migration) or disconnects; SIGUSR1 logs live statistics.")]
pub struct ServeArgs {
    /// Listen on a new unix socket at PATH (a stale socket file is replaced; one a live process
    /// listens on is refused).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Serve on an inherited, already listening unix socket (file descriptor N).
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,

    /// Print the backend's capabilities as JSON (for libvirt) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// The insitu-blk image to serve.
    #[arg(long, value_name = "IMAGE")]
    pub blk_file: Option<PathBuf>,

    /// Serve the image read-only (no writer lock, nothing is ever written).
    #[arg(long)]
    pub read_only: bool,

    /// Number of virtqueues offered, one worker thread each (QEMU gives a VM one per vCPU by
    /// default and refuses to start when the backend offers fewer).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub num_queues: u16,

    /// Largest virtqueue size accepted (a power of two, at most 1024). The frontend picks each
    /// ring's size (QEMU's `queue-size`, default 128; libvirt's `queue_size`); a larger one fails
    /// the device's start.
    #[arg(long, value_name = "N", default_value_t = MAX_QUEUE_SIZE)]
    pub queue_size: u16,

    /// Disk serial reported to the guest (GET_ID, at most 20 printable ASCII characters).
    /// Default: the beginning of the image's UUID.
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,

    /// Interval of the metadata writer's timer commit.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub commit_interval: Option<Duration>,

    /// Create the image with default settings and this virtual size if it does not exist (it
    /// appears only once complete: a backend killed while creating it leaves nothing behind).
    #[arg(long, value_name = "SIZE")]
    pub create_size: Option<ByteSize>,

    /// When another process holds the image's writer lock as the device starts (a migration
    /// source that has not stopped yet), wait for it up to DURATION (default 60s) instead of
    /// failing the guest's requests.
    #[arg(long, value_name = "DURATION", num_args = 0..=1,
          default_missing_value = DEFAULT_WAIT_LOCK, value_parser = parse_duration)]
    pub wait_lock: Option<Duration>,

    /// Log live statistics (IOPS, compression ratio, stored bytes, commits, checksum errors)
    /// at this interval.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stats_interval: Option<Duration>,

    /// After serving a batch of requests, each queue's worker keeps looking for the next request
    /// for up to N microseconds before it sleeps until the guest notifies it (adaptive: shorter
    /// while the guest is idle). Lower latency for a busy guest, at the price of some CPU;
    /// 0 turns polling off.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_POLL_MAX_US)]
    pub poll_max_us: u64,

    /// RAM for small writes held back and merged per cluster until the cluster is complete, the
    /// next FLUSH or the timer commit (default 32M per image; 0 stores each write at once).
    /// Like a disk's write cache: a FLUSH makes them durable.
    #[arg(long, value_name = "SIZE")]
    pub write_buffer: Option<ByteSize>,
}

/// Largest `--write-buffer`: beyond this it only delays the timer commit's work.
const MAX_WRITE_BUFFER: u64 = 4 << 30;

/// Default `--poll-max-us`.
pub const DEFAULT_POLL_MAX_US: u64 = DaemonConfig::DEFAULT_POLL_MAX.as_micros() as u64;
/// Largest `--poll-max-us` (a worker never spins longer than this before it sleeps).
pub const MAX_POLL_MAX_US: u64 = 10_000;

/// A validated `serve` request.
#[derive(Debug)]
pub struct ServeConfig {
    /// Where to listen.
    pub socket: SocketSource,
    /// The image.
    pub image: PathBuf,
    /// Serve read-only.
    pub read_only: bool,
    /// Queues offered.
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// GET_ID serial (empty: derived from the image UUID).
    pub serial: String,
    /// Timer commit interval.
    pub commit_interval: Duration,
    /// Create the image with this size if missing.
    pub create_size: Option<u64>,
    /// What to do when the writer lock is taken.
    pub lock: LockPolicy,
    /// Periodic statistics.
    pub stats_interval: Option<Duration>,
    /// Longest polling window of a queue's worker after a batch (zero: no polling).
    pub poll_max: Duration,
    /// Bytes of the image's write-back buffer of partial-cluster writes.
    pub write_buffer: u64,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(args: ServeArgs) -> anyhow::Result<Self> {
        let socket = match (args.socket_path, args.fd) {
            (Some(path), None) => SocketSource::Path(path),
            (None, Some(fd)) => SocketSource::Fd(fd),
            (Some(_), Some(_)) => bail!("--socket-path and --fd are mutually exclusive"),
            (None, None) => bail!("one of --socket-path PATH or --fd N is required"),
        };
        let Some(image) = args.blk_file else {
            bail!("--blk-file IMAGE is required");
        };
        if args.num_queues == 0 || usize::from(args.num_queues) > MAX_QUEUES {
            bail!(
                "--num-queues {} is out of range (1..={MAX_QUEUES})",
                args.num_queues
            );
        }
        if args.queue_size < 2
            || !args.queue_size.is_power_of_two()
            || args.queue_size > MAX_QUEUE_SIZE
        {
            bail!(
                "--queue-size {} must be a power of two from 2 to {MAX_QUEUE_SIZE}",
                args.queue_size
            );
        }
        let serial = args.serial.unwrap_or_default();
        if serial.len() > 20 || !serial.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            bail!(
                "--serial '{}' must be at most 20 printable ASCII characters",
                serial.escape_default()
            );
        }
        let commit_interval = args.commit_interval.unwrap_or(DEFAULT_COMMIT_INTERVAL);
        if commit_interval.is_zero() {
            bail!("--commit-interval must not be 0");
        }
        if args.stats_interval.is_some_and(|d| d.is_zero()) {
            bail!("--stats-interval must not be 0");
        }
        if args.poll_max_us > MAX_POLL_MAX_US {
            bail!(
                "--poll-max-us {} is out of range (0..={MAX_POLL_MAX_US})",
                args.poll_max_us
            );
        }
        let write_buffer = args
            .write_buffer
            .map_or(DEFAULT_WRITE_BUFFER_BYTES, |size| size.0);
        if write_buffer > MAX_WRITE_BUFFER {
            bail!("--write-buffer {write_buffer} is larger than {MAX_WRITE_BUFFER} bytes");
        }
        let create_size = args
            .create_size
            .map(|size| validate_disk_size("--create-size", size))
            .transpose()?;
        Ok(ServeConfig {
            socket,
            image,
            read_only: args.read_only,
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            serial,
            commit_interval,
            create_size,
            lock: args.wait_lock.map_or(LockPolicy::Fail, LockPolicy::Wait),
            stats_interval: args.stats_interval,
            poll_max: Duration::from_micros(args.poll_max_us),
            write_buffer,
        })
    }
}

/// Parses a duration: a number followed by `ms`, `s`, `m` or `h` (a plain number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (expected e.g. 500ms, 1s, 2m)"))?;
    let millis_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        other => {
            return Err(format!(
                "unknown duration unit '{other}' in '{text}' (expected ms, s, m or h)"
            ))
        }
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration '{text}' is too large"))
}

/// Runs the daemon until SIGTERM/SIGINT/SIGHUP/SIGQUIT.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.print_capabilities {
        println!("{CAPABILITIES}");
        return Ok(());
    }
    let config = ServeConfig::try_from(args)?;
    // Installed before anything else: a SIGTERM during start-up then leads to a clean shutdown
    // once serving begins, instead of killing the process in the middle of opening the image.
    // SIGHUP (the terminal or ssh session that started us went away) and SIGQUIT end the daemon
    // like SIGTERM: their default action would kill it without committing what the guest wrote.
    let signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1])
        .context("cannot install signal handlers")?;
    let image = open_image(&config)?;
    let geometry = image.geometry().clone();
    let mut blk_config = BlkConfig::new(config.num_queues, config.queue_size);
    blk_config.read_only = config.read_only;
    blk_config.serial = config.serial.clone();
    let device = BlkDisk::new(image, blk_config, config.lock)
        .with_context(|| format!("cannot serve image {}", config.image.display()))?;
    let listener = bind_listener(&config.socket)?;
    let describe_image = format!(
        "{} ({} bytes, {} KiB clusters, {}{})",
        config.image.display(),
        geometry.size,
        geometry.cluster_size / 1024,
        geometry.compression,
        if device.blk().is_read_only() {
            ", read-only"
        } else {
            ""
        },
    );
    serve_device(&config, device, describe_image, listener, signals)
}

/// Serves `device` on `listener` until SIGTERM/SIGINT, then shuts down cleanly.
fn serve_device<D: Device>(
    config: &ServeConfig,
    device: D,
    describe_image: String,
    listener: vhost::vhost_user::Listener,
    mut signals: Signals,
) -> anyhow::Result<()> {
    let mut daemon = Daemon::new(
        device,
        listener,
        DaemonConfig {
            num_queues: usize::from(config.num_queues),
            queue_size: usize::from(config.queue_size),
            poll_max: config.poll_max,
            poll_backoff: true,
        },
    )?;
    tracing::info!(
        "serving {describe_image} on {} with {} queues of up to {} entries",
        describe_socket(&config.socket),
        config.num_queues,
        config.queue_size,
    );

    let disk = daemon.disk();
    let stop = daemon.stop_handle();
    let signals_handle = signals.handle();
    let server = thread::Builder::new()
        .name("listener".into())
        .spawn(move || {
            let result = daemon.serve();
            // End the signal loop below if serving failed on its own.
            signals_handle.close();
            result
        })
        .context("cannot start the listener thread")?;

    let reporter = Arc::new(StatsReporter::new(
        config.image.display().to_string(),
        disk.device().stats(),
    ));
    let (stats_stop, stats_thread) = match config.stats_interval {
        Some(interval) => {
            let (tx, rx) = mpsc::channel::<()>();
            let reporter = Arc::clone(&reporter);
            let disk = Arc::clone(&disk);
            let handle = thread::Builder::new()
                .name("stats".into())
                .spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                        reporter.report(disk.device().stats());
                    }
                })
                .context("cannot start the statistics thread")?;
            (Some(tx), Some(handle))
        }
        None => (None, None),
    };

    let mut signalled = None;
    for signal in signals.forever() {
        if signal == SIGUSR1 {
            reporter.report(disk.device().stats());
        } else {
            signalled = Some(signal);
            break;
        }
    }
    if let Some(signal) = signalled {
        tracing::info!("signal {signal} received: shutting down");
        stop.stop();
        // A second SIGTERM/SIGINT (an impatient operator) ends the process at once. One that
        // arrives right after the first is the same request delivered twice (a wrapper such as
        // `timeout` or a process manager forwarding it to the whole group; Ctrl-C reaching both
        // a wrapper and us): it must not cost the clean shutdown.
        let first = std::time::Instant::now();
        let spawned = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal == SIGUSR1 {
                        continue;
                    }
                    if first.elapsed() < DUPLICATE_SIGNAL_WINDOW {
                        tracing::info!(
                            "signal {signal} received again right away: already shutting down"
                        );
                        continue;
                    }
                    tracing::warn!(
                        "signal {signal} received again: exiting without a clean shutdown"
                    );
                    std::process::exit(1);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot watch for a second signal: {e}");
        }
    }
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("the listener thread panicked"))?;
    drop(stats_stop);
    if let Some(handle) = stats_thread {
        let _ = handle.join();
    }
    let shutdown = shut_down(disk);
    served.context("serving failed")?;
    shutdown
}

/// Final quiesce and close: commit, checkpoint, release the lock.
fn shut_down<D: Device>(disk: Arc<SharedDisk<D>>) -> anyhow::Result<()> {
    disk.shut_down("shutting down")
        .context("cannot commit the image at shutdown")?;
    match Arc::try_unwrap(disk) {
        Ok(disk) => disk
            .into_device()
            .close()
            .context("cannot close the image")?,
        Err(_) => tracing::warn!(
            "the image is still referenced at shutdown: committed but not checkpointed"
        ),
    }
    tracing::info!("image closed; exiting");
    Ok(())
}

fn describe_socket(socket: &SocketSource) -> String {
    match socket {
        SocketSource::Path(path) => path.display().to_string(),
        SocketSource::Fd(fd) => format!("inherited socket fd {fd}"),
    }
}

/// Opens the image quiesced (superblock only, no lock), creating it first if asked.
fn open_image(config: &ServeConfig) -> anyhow::Result<Image> {
    let path = &config.image;
    let existed = match std::fs::metadata(path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match config.create_size {
            // The image appears at `path` only once complete: a backend killed while creating
            // it leaves nothing there, so the next start simply creates it again.
            Some(size) => match Image::create(path, &CreateOptions::new(size)) {
                Ok(()) => {
                    tracing::info!("created image {} ({size} bytes)", path.display());
                    false
                }
                // Another process created it meanwhile: open that one like any existing image.
                Err(ImageError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    true
                }
                Err(err) => {
                    return Err(err)
                        .with_context(|| format!("cannot create image {}", path.display()))
                }
            },
            None => bail!(
                "image {} does not exist (create it with `insitu-blk create` or pass --create-size)",
                path.display()
            ),
        },
        Err(e) => {
            return Err(e).with_context(|| format!("cannot access image {}", path.display()))
        }
    };
    // The device loads the metadata when the frontend starts it (a migration destination must
    // not load it before the source hands the image over). Validate it now, read-only and
    // without the lock (what `info` does), so that a corrupt image refuses to serve with a clear
    // error instead of listening and failing every guest request.
    let size = Image::open(
        path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .and_then(|image| {
        let size = image.size();
        image.close().map(|()| size)
    })
    .with_context(|| {
        format!(
            "cannot serve image {} (`insitu-blk check` explains what is wrong)",
            path.display()
        )
    })?;
    // --create-size only creates: an existing image keeps its size (say so, not silently).
    if let Some(wanted) = config
        .create_size
        .filter(|&wanted| existed && wanted != size)
    {
        tracing::warn!(
            "image {} exists with a size of {size} bytes; --create-size {wanted} is ignored \
             (it only creates a missing image)",
            path.display()
        );
    }
    let options = OpenOptions {
        read_only: config.read_only,
        // A read-only server keeps writers out while it serves (they could change data under
        // it); `info`/`check` never take this lock.
        shared_lock: config.read_only,
        commit_interval: config.commit_interval,
        lock: config.lock,
        write_buffer_bytes: config.write_buffer,
        start_quiesced: true,
        ..OpenOptions::default()
    };
    Image::open(path, &options).with_context(|| format!("cannot open image {}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<ServeConfig> {
        let wrapper =
            Wrapper::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))?;
        ServeConfig::try_from(wrapper.args)
    }

    #[test]
    fn defaults_follow_the_conventions() {
        let c = config(&["--socket-path", "/tmp/s", "--blk-file", "img"]).unwrap();
        assert!(
            matches!(c.socket, SocketSource::Path(ref p) if p == std::path::Path::new("/tmp/s"))
        );
        assert_eq!(c.num_queues, 16);
        assert_eq!(c.queue_size, 1024);
        assert_eq!(c.commit_interval, DEFAULT_COMMIT_INTERVAL);
        assert_eq!(c.lock, LockPolicy::Fail);
        assert!(!c.read_only);
        let c = config(&["--fd=3", "--blk-file=img", "--read-only"]).unwrap();
        assert!(matches!(c.socket, SocketSource::Fd(3)));
        assert!(c.read_only);
    }

    #[test]
    fn wait_lock_takes_an_optional_duration() {
        let c = config(&["--socket-path=s", "--blk-file=i", "--wait-lock"]).unwrap();
        assert_eq!(c.lock, LockPolicy::Wait(Duration::from_secs(60)));
        let c = config(&["--socket-path=s", "--wait-lock", "90s", "--blk-file=i"]).unwrap();
        assert_eq!(c.lock, LockPolicy::Wait(Duration::from_secs(90)));
        let c = config(&["--socket-path=s", "--blk-file=i", "--wait-lock=500ms"]).unwrap();
        assert_eq!(c.lock, LockPolicy::Wait(Duration::from_millis(500)));
    }

    #[test]
    fn bad_command_lines_are_rejected() {
        for bad in [
            &["--blk-file=i"][..],
            &["--socket-path=s"],
            &["--socket-path=s", "--fd=3", "--blk-file=i"],
            &["--socket-path=s", "--blk-file=i", "--num-queues=0"],
            &["--socket-path=s", "--blk-file=i", "--num-queues=65"],
            &["--socket-path=s", "--blk-file=i", "--queue-size=100"],
            &["--socket-path=s", "--blk-file=i", "--queue-size=2048"],
            &[
                "--socket-path=s",
                "--blk-file=i",
                "--serial=123456789012345678901",
            ],
            &["--socket-path=s", "--blk-file=i", "--commit-interval=0s"],
            &["--socket-path=s", "--blk-file=i", "--commit-interval=1x"],
            &["--socket-path=s", "--blk-file=i", "--create-size=1000"],
            &["--socket-path=s", "--blk-file=i", "--create-size=0"],
            &["--socket-path=s", "--blk-file=i", "--stats-interval=0"],
            &["--socket-path=s", "--blk-file=i", "--poll-max-us=10001"],
            &["--socket-path=s", "--blk-file=i", "--poll-max-us=-1"],
            &["--socket-path=s", "--blk-file=i", "--write-buffer=5G"],
            &["--socket-path=s", "--blk-file=i", "--write-buffer=lots"],
        ] {
            assert!(config(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn polling_defaults_to_128_us_and_0_turns_it_off() {
        let c = config(&["--socket-path=s", "--blk-file=i"]).unwrap();
        assert_eq!(c.poll_max, Duration::from_micros(128));
        let c = config(&["--socket-path=s", "--blk-file=i", "--poll-max-us=0"]).unwrap();
        assert!(c.poll_max.is_zero());
        let c = config(&["--socket-path=s", "--blk-file=i", "--poll-max-us", "10000"]).unwrap();
        assert_eq!(c.poll_max, Duration::from_millis(10));
    }

    #[test]
    fn write_buffer_defaults_to_32_mib_and_0_turns_it_off() {
        let c = config(&["--socket-path=s", "--blk-file=i"]).unwrap();
        assert_eq!(c.write_buffer, 32 << 20);
        let c = config(&["--socket-path=s", "--blk-file=i", "--write-buffer=0"]).unwrap();
        assert_eq!(c.write_buffer, 0);
        let c = config(&["--socket-path=s", "--blk-file=i", "--write-buffer=256M"]).unwrap();
        assert_eq!(c.write_buffer, 256 << 20);
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        let c = config(&["--socket-path=s", "--blk-file=i", "--create-size=20G"]).unwrap();
        assert_eq!(c.create_size, Some(20 << 30));
    }

    #[test]
    fn capabilities_are_the_documented_json() {
        let value: serde_json::Value = serde_json::from_str(CAPABILITIES).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"type": "block", "features": ["read-only", "blk-file"]})
        );
    }
}
