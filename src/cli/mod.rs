//! Command line: clap arguments, validated configs (`TryFrom<Args>`), one file per subcommand.
//!
//! Every failure ends as one line on stderr, `insitu-blk: error: ...`, and a non-zero exit code
//! (1, or the `check` codes documented in [`check`]). Nothing a user types or a file contains may
//! panic the program.

pub mod check;
pub mod convert;
pub mod create;
pub mod info;
pub mod serve;
pub mod size;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use insitu_blk::image::{Compression, MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE, SECTOR_SIZE};
use tracing_subscriber::EnvFilter;

use size::ByteSize;

/// Program name used as the prefix of error lines.
const PROG: &str = "insitu-blk";

/// Exit code of every failure that has no more specific code (bad command line included).
pub const EXIT_FAILURE: u8 = 1;

/// Compressed, crash-consistent disk images served to VMs over vhost-user-blk.
#[derive(Debug, Parser)]
#[command(name = "insitu-blk", version, propagate_version = true)]
pub struct Cli {
    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive list such as
    /// `insitu_blk::vhost=debug,info`. Overrides RUST_LOG. Default: info for serve, warn otherwise.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands, in the style of `qemu-img`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new, empty image.
    Create(create::CreateArgs),
    /// Show an image's geometry, space use and compression (works on an image in use).
    Info(info::InfoArgs),
    /// Verify an image's metadata and every stored cluster; optionally repair.
    Check(check::CheckArgs),
    /// Copy a disk: raw -> insitu, insitu -> raw (sparse output).
    Convert(convert::ConvertArgs),
    /// Serve an image to a VM as a vhost-user-blk backend.
    Serve(serve::ServeArgs),
}

impl Command {
    /// Log filter used when neither `--log-level` nor RUST_LOG says otherwise: the daemon reports
    /// its rare state changes (start, lock, quiesce), the one-shot tools stay quiet.
    fn default_log_filter(&self) -> &'static str {
        match self {
            Command::Serve(_) => "info",
            _ => "warn",
        }
    }
}

/// Parses the command line. Help and version requests are printed here and end the program with
/// success; a bad command line is reported as one line and ends it with [`EXIT_FAILURE`] (not
/// clap's usual 2, which `check` uses for "corruption found").
pub fn parse<I, T>(args: I) -> Result<Cli, ExitCode>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    Cli::try_parse_from(args).map_err(|err| {
        use clap::error::ErrorKind;
        match err.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                // Printing help to a closed stdout is not worth a panic or an error line.
                let _ = err.print();
                ExitCode::SUCCESS
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = err.print();
                ExitCode::from(EXIT_FAILURE)
            }
            _ => {
                print_err(&format!(
                    "{PROG}: error: {} (see --help)",
                    clap_error_line(&err)
                ));
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

/// The message of a clap error as one line: its first paragraph (the list of missing arguments
/// included), without the `error: ` prefix, the usage and the tips.
fn clap_error_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let paragraph = rendered
        .split("\n\n")
        .next()
        .unwrap_or("invalid command line");
    let line = paragraph
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let held_logs = match init_logging(cli.log_level.as_deref(), &cli.command) {
        Ok(held) => held,
        Err(err) => {
            report_error(&err);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = match cli.command {
        // `check` maps its outcome (and its own failures) to the qemu-img check exit codes.
        Command::Check(args) => Ok(check::run(args.into())),
        Command::Create(args) => create::CreateConfig::try_from(args)
            .and_then(create::run)
            .map(|()| 0),
        Command::Info(args) => info::run(args.into()).map(|()| 0),
        Command::Convert(args) => convert::ConvertConfig::try_from(args)
            .and_then(convert::run)
            .map(|()| 0),
        Command::Serve(args) => serve::run(args).map(|()| 0),
    };
    let code = result.unwrap_or_else(|err| {
        report_error(&err);
        EXIT_FAILURE
    });
    if let Some(held) = held_logs {
        if code == 0 {
            held.release();
        }
    }
    ExitCode::from(code)
}

/// Prints `insitu-blk: error: context: cause: cause` as one line.
pub fn report_error(err: &anyhow::Error) {
    print_err(&format!("{PROG}: error: {}", error_line(err)));
}

/// The error and its causes joined by `: `, leaving out a cause whose text the previous message
/// already contains (many error types print their source inline and also return it as source).
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = one_line(&cause.to_string());
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Writes `text` to stdout. A reader that went away (`insitu-blk info x | head -1`) is not an
/// error worth reporting; `println!` would panic on it.
pub fn print_out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// Writes one line to stderr, ignoring failures (there is nowhere left to report them).
pub fn print_err(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Prints an `insitu-blk: note: ...` line on stderr.
pub fn note(message: &str) {
    print_err(&format!("{PROG}: note: {message}"));
}

/// Joins a possibly multi-line message into one line.
pub fn one_line(text: &str) -> String {
    text.trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Log lines of a one-shot tool, held back until it ends: printed when the command succeeds
/// (a warning such as "superblock copy 0 is invalid; using copy 1" is worth knowing then), dropped
/// when it fails (its one error line already says what went wrong, and `check` explains
/// the rest). Bounded: a flood of lines cannot grow it without limit.
#[derive(Clone, Debug, Default)]
pub struct HeldLogs(Arc<Mutex<Vec<u8>>>);

/// Bytes of log lines [`HeldLogs`] keeps.
const HELD_LOGS_LIMIT: usize = 64 * 1024;

impl HeldLogs {
    /// Writes the held lines to stderr.
    fn release(&self) {
        let held = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        if !held.is_empty() {
            print_err(String::from_utf8_lossy(&held).trim_end());
        }
    }
}

impl std::io::Write for HeldLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let room = HELD_LOGS_LIMIT.saturating_sub(held.len());
        held.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the tracing subscriber. Precedence: `--log-level`, then RUST_LOG, then the
/// subcommand's default. `log` records from dependencies are forwarded too.
///
/// `serve`, and any command given an explicit filter, log straight to stderr. The one-shot tools
/// with the default filter hold their lines back (see [`HeldLogs`], returned here) and leave out
/// the engine's error events: every engine failure there fails the command, whose error line
/// says the same.
fn init_logging(flag: Option<&str>, command: &Command) -> anyhow::Result<Option<HeldLogs>> {
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let (filter, explicit) = match flag {
        Some(directives) => (
            EnvFilter::try_new(directives)
                .with_context(|| format!("invalid --log-level '{directives}'"))?,
            true,
        ),
        None => match std::env::var("RUST_LOG") {
            Ok(directives) if !directives.trim().is_empty() => (
                EnvFilter::try_new(&directives)
                    .with_context(|| format!("invalid RUST_LOG '{directives}'"))?,
                true,
            ),
            _ => (EnvFilter::new(command.default_log_filter()), false),
        },
    };
    let quiet_tool = !explicit && !matches!(command, Command::Serve(_));
    let held = quiet_tool.then(HeldLogs::default);
    let writer = match &held {
        Some(held) => {
            let held = held.clone();
            BoxMakeWriter::new(move || held.clone())
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter)
        .with_filter(filter_fn(move |meta| {
            !(quiet_tool
                && *meta.level() == tracing::Level::ERROR
                && meta.target().starts_with("insitu_blk::image"))
        }));
    // A subscriber installed earlier (only possible in tests) is kept; that is harmless.
    let _ = tracing_subscriber::registry().with(layer).try_init();
    Ok(held)
}

/// Fails plainly for a path that cannot be an image or a disk: missing, unreadable metadata, or a
/// directory (which would otherwise surface as "not an image" or a read error at byte 0).
pub fn ensure_input_exists(path: &std::path::Path) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    if meta.is_dir() {
        bail!("'{}' is a directory, not a disk image", path.display());
    }
    Ok(())
}

/// Parses a compression algorithm (`lz4`, `snappy`, `zstd`, `zstd:LEVEL`, `none`), any case.
pub fn parse_compression(text: &str) -> Result<Compression, String> {
    text.trim().to_ascii_lowercase().parse()
}

/// Validates a virtual disk size given as `flag`: not 0, a multiple of 512.
pub fn validate_disk_size(flag: &str, size: ByteSize) -> anyhow::Result<u64> {
    let bytes = size.0;
    if bytes == 0 {
        bail!("{flag} must not be 0");
    }
    if !bytes.is_multiple_of(SECTOR_SIZE) {
        bail!("{flag} {bytes} is not a multiple of {SECTOR_SIZE} bytes (the sector size)");
    }
    Ok(bytes)
}

/// Validates a cluster size: a power of two from 4 KiB to 128 KiB (whether the image's codec
/// allows a size below 16 KiB is the engine's check).
pub fn validate_cluster_size(size: ByteSize) -> anyhow::Result<u32> {
    let valid = u32::try_from(size.0)
        .ok()
        .filter(|&c| c.is_power_of_two() && (MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&c));
    match valid {
        Some(cluster_size) => Ok(cluster_size),
        None => bail!(
            "--cluster-size {} is not allowed: it must be a power of two from {}K to {}K \
             (4K or 8K for an uncompressed image; 16K, 32K, 64K or 128K)",
            size.0,
            MIN_CLUSTER_SIZE / 1024,
            MAX_CLUSTER_SIZE / 1024
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse_ok(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn parse_err(args: &[&str]) -> String {
        match Cli::try_parse_from(args) {
            Ok(cli) => panic!("{args:?} parsed: {cli:?}"),
            Err(e) => clap_error_line(&e),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_log_level_is_accepted_before_and_after_the_subcommand() {
        let cli = parse_ok(&["insitu-blk", "--log-level", "debug", "info", "a.img"]);
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        let cli = parse_ok(&["insitu-blk", "info", "a.img", "--log-level", "trace"]);
        assert_eq!(cli.log_level.as_deref(), Some("trace"));
    }

    #[test]
    fn serve_logs_at_info_and_tools_at_warn_by_default() {
        let cli = parse_ok(&["insitu-blk", "info", "a.img"]);
        assert_eq!(cli.command.default_log_filter(), "warn");
        let cli = parse_ok(&["insitu-blk", "serve"]);
        assert_eq!(cli.command.default_log_filter(), "info");
    }

    #[test]
    fn unknown_subcommand_and_flag_errors_are_one_line() {
        let line = parse_err(&["insitu-blk", "frobnicate"]);
        assert!(line.contains("frobnicate"), "{line}");
        let line = parse_err(&["insitu-blk", "info", "a.img", "--bogus"]);
        assert!(line.contains("--bogus"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn compression_names_are_case_insensitive() {
        assert_eq!(parse_compression("LZ4"), Ok(Compression::Lz4));
        assert_eq!(parse_compression("Snappy"), Ok(Compression::Snappy));
        assert_eq!(
            parse_compression("ZSTD:19"),
            Ok(Compression::Zstd { level: 19 })
        );
        assert_eq!(parse_compression("none"), Ok(Compression::None));
        assert!(parse_compression("gzip").is_err());
        assert!(parse_compression("zstd:99").is_err());
    }

    #[test]
    fn disk_sizes_must_be_nonzero_sector_multiples() {
        assert_eq!(validate_disk_size("--size", ByteSize(512)).ok(), Some(512));
        assert_eq!(
            validate_disk_size("--size", ByteSize(20 << 30)).ok(),
            Some(20 << 30)
        );
        let zero = validate_disk_size("--size", ByteSize(0)).unwrap_err();
        assert!(zero.to_string().contains("must not be 0"), "{zero}");
        let odd = validate_disk_size("--size", ByteSize(1000)).unwrap_err();
        assert!(odd.to_string().contains("multiple of 512"), "{odd}");
    }

    #[test]
    fn cluster_sizes_are_powers_of_two_between_4k_and_128k() {
        for ok in [4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10] {
            assert_eq!(validate_cluster_size(ByteSize(ok)).ok(), Some(ok as u32));
        }
        for bad in [
            0,
            512,
            2 << 10,
            12 << 10,
            48 << 10,
            256 << 10,
            1 << 40,
            u64::MAX,
        ] {
            let err = validate_cluster_size(ByteSize(bad))
                .unwrap_err()
                .to_string();
            assert!(err.contains("power of two"), "{bad}: {err}");
        }
    }

    #[test]
    fn error_lines_do_not_repeat_inline_sources() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let inline = anyhow::Error::new(io).context("open at byte 0: No such file");
        let err = inline.context("cannot open 'x'");
        assert_eq!(
            error_line(&err),
            "cannot open 'x': open at byte 0: No such file"
        );
    }

    #[test]
    fn missing_arguments_are_named_on_the_same_line() {
        let line = parse_err(&["insitu-blk", "info"]);
        assert!(line.contains("<IMAGE>"), "{line}");
    }

    #[test]
    fn held_logs_are_bounded() {
        use std::io::Write;
        let mut held = HeldLogs::default();
        for _ in 0..1000 {
            held.write_all(&[b'x'; 1000]).unwrap();
        }
        assert_eq!(held.0.lock().unwrap().len(), HELD_LOGS_LIMIT);
    }

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(one_line("a\n  b\nc\n"), "a; b; c");
        assert_eq!(one_line("single"), "single");
    }
}
