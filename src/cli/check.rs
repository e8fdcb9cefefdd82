//! `insitu-blk check IMAGE [--json] [--repair]`, with `qemu-img check` exit codes.

use std::path::{Path, PathBuf};

use insitu_blk::image::{self, CheckReport, ImageError};
use serde::Serialize;

use super::size::human_size;
use super::{one_line, print_err, print_out, PROG};

/// No problems found (after `--repair`: the image is now consistent).
pub const EXIT_CLEAN: u8 = 0;
/// The check could not be completed: the image cannot be opened or read, the command line is
/// wrong, `--repair` could not take the image's lock, ...
pub const EXIT_NOT_COMPLETED: u8 = 1;
/// Corruptions were found (metadata that fails validation, stored clusters that fail their
/// checksum or do not decompress).
pub const EXIT_CORRUPT: u8 = 2;
/// Only leaked space was found: harmless, `--repair` reclaims it.
pub const EXIT_LEAKS: u8 = 3;
/// The file is not an insitu-blk image, or its format version is not supported.
pub const EXIT_NOT_INSITU: u8 = 63;

/// Arguments of `check`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Exit codes (as qemu-img check):
  0   no problems found (with --repair: the image is now consistent)
  1   check not completed: the image cannot be opened or read, bad command line, or --repair
      could not take the image's lock (it is in use)
  2   corruptions found (metadata failing validation, stored clusters failing their checksum
      or not decompressing); with --repair also when the image is consistent again but committed
      data could not be recovered (lost journal records)
  3   only leaked space found (allocated on the host but used by nothing; harmless, --repair
      reclaims it)
  63  not an insitu-blk image, or an unsupported format version

Without --repair the image is only read (no lock taken, nothing written), so check also runs on \
an image in use; it then sees the last committed state, and space written since the last commit \
may show up as leaked (3). --repair needs the image's lock, so it fails with 1 while the image is \
in use by another process.")]
pub struct CheckArgs {
    /// The image to check.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// Write a fresh checkpoint of the recovered metadata and reclaim leaked space, then check
    /// again.
    #[arg(long, short = 'r')]
    pub repair: bool,
}

/// A validated `check` request.
#[derive(Debug)]
pub struct CheckConfig {
    /// The image.
    pub image: PathBuf,
    /// JSON output.
    pub json: bool,
    /// Repair.
    pub repair: bool,
}

impl From<CheckArgs> for CheckConfig {
    fn from(args: CheckArgs) -> Self {
        CheckConfig {
            image: args.image,
            json: args.json,
            repair: args.repair,
        }
    }
}

/// The verdict of a check, which decides the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Nothing wrong.
    Clean,
    /// Check not completed.
    Error,
    /// Corruptions found.
    Corrupt,
    /// Only leaks found.
    Leaks,
    /// Not an insitu-blk image.
    NotInsitu,
}

impl Verdict {
    /// The documented exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Clean => EXIT_CLEAN,
            Verdict::Error => EXIT_NOT_COMPLETED,
            Verdict::Corrupt => EXIT_CORRUPT,
            Verdict::Leaks => EXIT_LEAKS,
            Verdict::NotInsitu => EXIT_NOT_INSITU,
        }
    }

    /// Verdict of a completed check.
    pub fn of(report: &CheckReport) -> Verdict {
        if !report.corruptions.is_empty() {
            Verdict::Corrupt
        } else if report.leaked_bytes > 0 {
            Verdict::Leaks
        } else {
            Verdict::Clean
        }
    }
}

/// What `check --json` prints.
#[derive(Debug, Serialize)]
pub struct CheckOutput {
    /// The path as given.
    pub filename: String,
    /// Always "insitu".
    pub format: &'static str,
    /// clean, corrupt, leaks, error or not-insitu.
    pub result: Verdict,
    /// The process exit code.
    pub exit_code: u8,
    /// Why the check could not be completed (result "error" or "not-insitu").
    pub error: Option<String>,
    /// What the check found (before any repair).
    pub found: Option<Box<CheckReport>>,
    /// With --repair: what a second check found after the repair.
    pub after_repair: Option<Box<CheckReport>>,
}

/// How one engine call ended.
enum Outcome {
    Completed(Box<CheckReport>),
    Failed(Verdict, String),
}

fn run_engine_check(path: &Path, repair: bool) -> Outcome {
    match image::check(path, repair) {
        Ok(report) => Outcome::Completed(Box::new(report)),
        // The engine refuses metadata it cannot trust before it can build a report: that is a
        // finding about the image, not a failure of the check.
        Err(ImageError::CorruptMetadata(what)) => Outcome::Completed(Box::new(CheckReport {
            corruptions: vec![format!("image metadata is corrupt: {what}")],
            ..CheckReport::default()
        })),
        Err(err @ ImageError::NotAnImage(_)) => {
            Outcome::Failed(Verdict::NotInsitu, err.to_string())
        }
        Err(ImageError::Locked) => Outcome::Failed(
            Verdict::Error,
            "the image is locked by another process (in use?); --repair needs exclusive access \
             (check without --repair works while it is in use)"
                .into(),
        ),
        Err(err) => Outcome::Failed(Verdict::Error, err.to_string()),
    }
}

/// When no superblock copy is usable: looks for a copy that is intact (magic and CRC-32C right,
/// docs/FORMAT.md §2) but of another format version or with incompatible feature bits. That image
/// is not corrupt, just of a format this build does not read (exit 63).
fn unsupported_format(path: &Path) -> Option<String> {
    use insitu_blk::image::format::{Superblock, BLOCK_USIZE, FORMAT_VERSION, SB_OFFSETS};
    use std::os::unix::fs::FileExt;

    let file = std::fs::File::open(path).ok()?;
    let mut block = vec![0u8; BLOCK_USIZE];
    SB_OFFSETS.iter().find_map(|&offset| {
        file.read_exact_at(&mut block, offset).ok()?;
        let (body, crc) = block.split_at(BLOCK_USIZE - 4);
        let stored_crc = u32::from_le_bytes(crc.try_into().ok()?);
        if !Superblock::has_magic(&block) || crc32c::crc32c(body) != stored_crc {
            return None;
        }
        let version = u32::from_le_bytes(block.get(8..12)?.try_into().ok()?);
        let incompatible = u32::from_le_bytes(block.get(12..16)?.try_into().ok()?);
        if version != FORMAT_VERSION {
            Some(format!(
                "insitu-blk format version {version} is not supported (this build reads version \
                 {FORMAT_VERSION})"
            ))
        } else if incompatible != 0 {
            Some(format!(
                "the image uses incompatible features {incompatible:#x} this build does not know"
            ))
        } else {
            None
        }
    })
}

/// Runs the check and returns the documented exit code. Never fails otherwise: every problem is
/// reported and mapped to a code.
pub fn run(config: CheckConfig) -> u8 {
    let path = &config.image;
    let mut output = CheckOutput {
        filename: path.display().to_string(),
        format: "insitu",
        result: Verdict::Error,
        exit_code: EXIT_NOT_COMPLETED,
        error: None,
        found: None,
        after_repair: None,
    };
    let mut text = String::new();

    let first = match std::fs::metadata(path) {
        Err(err) => Outcome::Failed(Verdict::Error, err.to_string()),
        Ok(meta) if meta.is_dir() => {
            Outcome::Failed(Verdict::Error, "it is a directory, not a disk image".into())
        }
        Ok(_) => run_engine_check(path, config.repair),
    };
    // No usable superblock may mean a newer format rather than damage.
    let first = match first {
        Outcome::Completed(found) if found.geometry.is_none() => match unsupported_format(path) {
            Some(reason) => Outcome::Failed(Verdict::NotInsitu, reason),
            None => Outcome::Completed(found),
        },
        other => other,
    };
    match first {
        Outcome::Failed(verdict, message) => {
            output.result = verdict;
            output.error = Some(one_line(&message));
        }
        Outcome::Completed(found) => {
            text.push_str(&describe_findings(&found));
            output.result = Verdict::of(&found);
            if config.repair && !found.repairs.is_empty() {
                text.push_str(&describe_repairs(&found));
                text.push_str("Double checking the repaired image now...\n");
                match run_engine_check(path, false) {
                    Outcome::Completed(after) => {
                        text.push_str(&describe_findings(&after));
                        output.result = Verdict::of(&after);
                        if !found.unrecovered.is_empty() {
                            // Consistent now, but committed data is gone: never report success.
                            text.push_str(
                                "The image is consistent again, but committed data was lost \
                                 (see above): treat the disk's content as damaged.\n",
                            );
                            output.result = Verdict::Corrupt;
                        }
                        output.after_repair = Some(after);
                    }
                    Outcome::Failed(verdict, message) => {
                        output.result = verdict;
                        output.error = Some(one_line(&format!(
                            "the repaired image cannot be checked: {message}"
                        )));
                    }
                }
            } else if config.repair && output.result != Verdict::Clean {
                text.push_str("Nothing could be repaired.\n");
            }
            output.found = Some(found);
        }
    }
    output.exit_code = output.result.exit_code();

    if config.json {
        match serde_json::to_string_pretty(&output) {
            Ok(json) => print_out(&format!("{json}\n")),
            Err(err) => {
                print_err(&format!("{PROG}: error: cannot encode JSON: {err}"));
                return EXIT_NOT_COMPLETED;
            }
        }
    } else {
        print_out(&text);
    }
    if let Some(error) = &output.error {
        print_err(&format!(
            "{PROG}: error: cannot check '{}': {error}",
            path.display()
        ));
    }
    output.exit_code
}

/// Human explanation of a report, in the spirit of `qemu-img check`.
pub fn describe_findings(report: &CheckReport) -> String {
    let mut out = String::new();
    for corruption in &report.corruptions {
        out.push_str(&format!("ERROR: {}\n", one_line(corruption)));
    }
    for warning in &report.warnings {
        out.push_str(&format!("Warning: {}\n", one_line(warning)));
    }
    if !report.corruptions.is_empty() {
        out.push_str(&format!(
            "\n{} corruption{} found in the image.\n\
             Data may be corrupted, or further writes to the image may corrupt it.\n\
             Reads of a damaged cluster fail with an I/O error; other clusters are unaffected.\n\
             'insitu-blk check --repair' rewrites damaged metadata from what is intact; damaged \
             cluster data cannot be repaired (the guest must rewrite it).\n",
            report.corruptions.len(),
            if report.corruptions.len() == 1 {
                " was"
            } else {
                "s were"
            },
        ));
    }
    if report.leaked_bytes > 0 {
        out.push_str(&format!(
            "\n{} ({} bytes) of leaked space found: allocated on the host but used by nothing.\n\
             This wastes disk space but does no harm to data; 'insitu-blk check --repair' \
             reclaims it.\n",
            human_size(report.leaked_bytes),
            report.leaked_bytes
        ));
    }
    if report.corruptions.is_empty() && report.leaked_bytes == 0 {
        out.push_str("No errors were found on the image.\n");
    }
    if let Some(stats) = &report.stats {
        let stored = stats.clusters_compressed + stats.clusters_raw;
        out.push_str(&format!(
            "{} stored clusters verified ({} compressed, {} raw), {} zero; \
             {} of data in {} on the host.\n",
            report.clusters_checked,
            stats.clusters_compressed,
            stats.clusters_raw,
            stats.clusters_zero,
            human_size(stats.allocated_logical_bytes),
            human_size(stats.stored_bytes),
        ));
        if report.clusters_checked < stored {
            out.push_str(&format!(
                "Only {} of {stored} stored clusters could be verified.\n",
                report.clusters_checked
            ));
        }
    } else if report.clusters_checked > 0 {
        out.push_str(&format!(
            "{} stored clusters verified.\n",
            report.clusters_checked
        ));
    }
    if let Some(geometry) = &report.geometry {
        out.push_str(&format!(
            "Image: {} virtual size, {} KiB clusters, {}, format version {}.\n",
            human_size(geometry.size),
            geometry.cluster_size / 1024,
            geometry.compression,
            geometry.format_version
        ));
    }
    out
}

fn describe_repairs(report: &CheckReport) -> String {
    let mut out = String::from("\nThe following repairs were made:\n");
    for repair in &report.repairs {
        out.push_str(&format!("    {}\n", one_line(repair)));
    }
    if !report.unrecovered.is_empty() {
        out.push_str("The repair could NOT recover:\n");
        for lost in &report.unrecovered {
            out.push_str(&format!("    {}\n", one_line(lost)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::{CommandFactory, Parser};

    #[test]
    fn verdicts_follow_qemu_img_check_codes() {
        let mut report = CheckReport::default();
        assert_eq!(Verdict::of(&report).exit_code(), 0);
        report.leaked_bytes = 4096;
        assert_eq!(Verdict::of(&report).exit_code(), 3);
        report
            .corruptions
            .push("table entry 7 points past the end".into());
        assert_eq!(
            Verdict::of(&report).exit_code(),
            2,
            "corruption wins over leaks"
        );
        assert_eq!(Verdict::Error.exit_code(), 1);
        assert_eq!(Verdict::NotInsitu.exit_code(), 63);
    }

    #[test]
    fn help_documents_every_exit_code() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("check")
            .expect("check subcommand")
            .render_long_help()
            .to_string();
        for needle in [
            "0   no problems",
            "1   check not completed",
            "2   corruptions",
            "3   only leaked",
            "63  not an insitu-blk",
        ] {
            assert!(help.contains(needle), "missing '{needle}' in:\n{help}");
        }
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from(["insitu-blk", "check", "-r", "--json", "x.img"]).unwrap();
        let Command::Check(args) = cli.command else {
            panic!("not check")
        };
        let cfg = CheckConfig::from(args);
        assert!(cfg.repair && cfg.json);
        assert_eq!(cfg.image, PathBuf::from("x.img"));
    }

    #[test]
    fn findings_are_explained() {
        let report = CheckReport {
            corruptions: vec!["cluster 12: payload checksum mismatch".into()],
            warnings: vec!["checkpoint area 1 is torn".into()],
            leaked_bytes: 8192,
            ..CheckReport::default()
        };
        let text = describe_findings(&report);
        assert!(
            text.contains("ERROR: cluster 12: payload checksum mismatch"),
            "{text}"
        );
        assert!(text.contains("1 corruption was found"), "{text}");
        assert!(
            text.contains("Warning: checkpoint area 1 is torn"),
            "{text}"
        );
        assert!(
            text.contains("8 KiB (8192 bytes) of leaked space"),
            "{text}"
        );
        assert!(!text.contains("No errors"), "{text}");
        assert!(describe_findings(&CheckReport::default()).contains("No errors were found"));
    }
}
