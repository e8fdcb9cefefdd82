//! `insitu-blk create IMAGE --size SIZE [--cluster-size 64K] [--compression ALGO] [--force]`.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use insitu_blk::image::format::{Superblock, BLOCK, CP_MAGIC, SB_OFFSETS};
use insitu_blk::image::{
    default_cluster_size, open_block_device_exclusively, Compression, CreateOptions, Image, Storage,
};
use signal_hook::consts::{SIGINT, SIGTERM};

use super::size::ByteSize;
use super::{note, parse_compression, print_out, validate_cluster_size, validate_disk_size};

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
SIZE accepts a plain number of bytes or a K/M/G/T suffix (binary: 20G = 20 GiB; \
case-insensitive, optionally followed by iB or B).
IMAGE must not exist yet: an existing file is never overwritten. The new file appears at IMAGE \
only once it is a complete image (a killed create leaves nothing there). IMAGE may also be a \
block device, which is formatted in place; one that already holds an insitu-blk image, a \
filesystem, a partition table or any other data in its first 64 KiB is refused unless \
--force is given (the remains of an interrupted create or convert need no --force); a device \
in use (mounted, held by LVM/RAID/device-mapper, or its writer lock held by serve) is refused \
even then.")]
pub struct CreateArgs {
    /// Path of the new image file (or a block device to format).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// Virtual disk size the VM sees (a multiple of 512 bytes).
    #[arg(long, short = 's', value_name = "SIZE")]
    pub size: ByteSize,

    /// Cluster size, the unit of compression and copy-on-write: 16K, 32K, 64K or 128K, and 4K
    /// or 8K for an uncompressed image (no copy for a 4 KiB write; 4x or 2x the table RAM of 16K)
    /// [default: 64K; 16K with --compression none].
    #[arg(long, value_name = "SIZE")]
    pub cluster_size: Option<ByteSize>,

    /// Compression of new writes: lz4, snappy, zstd (level 3), zstd:LEVEL (-7..=22, not 0) or none.
    #[arg(long, short = 'c', value_name = "ALGO", default_value = "lz4",
          value_parser = parse_compression)]
    pub compression: Compression,

    /// Format a block device even though it already holds an image or other data (files are
    /// never overwritten).
    #[arg(long)]
    pub force: bool,
}

/// A validated `create` request.
#[derive(Debug)]
pub struct CreateConfig {
    /// Where the image goes.
    pub image: PathBuf,
    /// Geometry and algorithm of the new image.
    pub options: CreateOptions,
    /// Overwrite a block device that holds data.
    pub force: bool,
}

impl TryFrom<CreateArgs> for CreateConfig {
    type Error = anyhow::Error;

    fn try_from(args: CreateArgs) -> anyhow::Result<Self> {
        let size = validate_disk_size("--size", args.size)?;
        let cluster_size = match args.cluster_size {
            Some(given) => validate_cluster_size(given)?,
            None => default_cluster_size(args.compression),
        };
        Ok(CreateConfig {
            image: args.image,
            options: CreateOptions {
                size,
                cluster_size,
                compression: args.compression,
            },
            force: args.force,
        })
    }
}

/// Refuses to go near an existing file; a block device is fine (it is what it is for).
/// Returns whether the path is a block device.
pub fn ensure_new_or_block_device(path: &Path) -> anyhow::Result<bool> {
    match fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => return Ok(true),
        Ok(_) => bail!(
            "'{}' already exists; refusing to overwrite it (remove it first)",
            path.display()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("cannot inspect '{}'", path.display()))
        }
    }
    // A dangling symlink: creating through it would surprise the user.
    if fs::symlink_metadata(path).is_ok() {
        bail!(
            "'{}' is a dangling symbolic link; refusing to create an image through it",
            path.display()
        );
    }
    Ok(false)
}

/// Bytes of a block device looked at before it is overwritten: the first 64 KiB (where
/// partition tables, LVM labels and most filesystem superblocks live) plus btrfs's superblock.
const PROBE_LEN: u64 = 64 * 1024 + 4096;

/// What a block device's first bytes hold, as far as overwriting it is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum DeviceContent {
    /// Nothing: all zeros.
    Empty,
    /// The remains of an insitu-blk create or convert that was interrupted before it wrote the
    /// superblocks (no superblock, the first checkpoint in place): nothing anyone can use.
    InterruptedFormat,
    /// Something worth keeping, described for the error message.
    InUse(String),
}

/// Classifies the first bytes of a device (`probe`, at most [`PROBE_LEN`] of them).
pub fn classify_device_start(probe: &[u8]) -> DeviceContent {
    let at = |offset: usize, magic: &[u8]| probe.get(offset..offset + magic.len()) == Some(magic);
    let superblocks_end = (SB_OFFSETS[1] + BLOCK) as usize;
    if SB_OFFSETS.iter().any(|&offset| {
        probe
            .get(offset as usize..)
            .is_some_and(Superblock::has_magic)
    }) {
        return DeviceContent::InUse("an insitu-blk image".into());
    }
    let signatures: [(usize, &[u8], &str); 11] = [
        (0, b"XFSB", "an XFS filesystem"),
        (1080, &[0x53, 0xEF], "an ext2/ext3/ext4 filesystem"),
        (65600, b"_BHRfS_M", "a btrfs filesystem"),
        (0, b"LUKS\xba\xbe", "a LUKS volume"),
        (512, b"LABELONE", "an LVM physical volume"),
        (512, b"EFI PART", "a GPT partition table"),
        (4086, b"SWAPSPACE2", "a swap area"),
        (0, b"QFI\xfb", "a qcow2 image"),
        (3, b"NTFS    ", "an NTFS filesystem"),
        (0x52, b"FAT32   ", "a FAT filesystem"),
        (510, &[0x55, 0xAA], "a partition table or boot sector"),
    ];
    if let Some((_, _, what)) = signatures
        .iter()
        .find(|(offset, magic, _)| at(*offset, magic))
    {
        return DeviceContent::InUse((*what).into());
    }
    let Some(first) = probe.iter().position(|&b| b != 0) else {
        return DeviceContent::Empty;
    };
    // Our own format writes zeroed superblocks first and the first checkpoint (right after
    // them) before anything else; convert holds the superblocks back until the very end.
    if first >= superblocks_end && at(superblocks_end, CP_MAGIC) {
        return DeviceContent::InterruptedFormat;
    }
    DeviceContent::InUse(format!("data (a non-zero byte at offset {first})"))
}

/// Refuses to overwrite a block device that holds something, unless `force`.
pub fn ensure_device_may_be_overwritten(path: &Path, force: bool) -> anyhow::Result<()> {
    // Exclusively, as the write will: a mounted or otherwise claimed device is refused first,
    // whatever it holds (--force does not override that).
    let device = open_block_device_exclusively(path)
        .with_context(|| format!("cannot open '{}'", path.display()))?;
    let read = || -> std::io::Result<Vec<u8>> {
        let mut probe = vec![0u8; device.len()?.min(PROBE_LEN) as usize];
        device.read_at(0, &mut probe)?;
        Ok(probe)
    };
    let probe = read().with_context(|| format!("cannot read '{}'", path.display()))?;
    match classify_device_start(&probe) {
        DeviceContent::Empty => Ok(()),
        DeviceContent::InterruptedFormat => {
            note(&format!(
                "'{}' holds the remains of an interrupted insitu-blk create or convert; \
                 overwriting them",
                path.display()
            ));
            Ok(())
        }
        DeviceContent::InUse(what) if force => {
            note(&format!(
                "'{}' holds {what}; overwriting it (--force)",
                path.display()
            ));
            Ok(())
        }
        DeviceContent::InUse(what) => bail!(
            "'{}' already holds {what}; refusing to overwrite it (pass --force to overwrite)",
            path.display()
        ),
    }
}

/// Creates the image. The engine builds a file out of sight and links it at IMAGE only when it
/// is complete, so neither a failure nor a kill leaves anything at IMAGE.
pub fn run(config: CreateConfig) -> anyhow::Result<()> {
    let CreateConfig {
        image,
        options,
        force,
    } = config;
    if ensure_new_or_block_device(&image)? {
        ensure_device_may_be_overwritten(&image, force)?;
    }
    // Creating takes well under a second, even for huge disks: a first SIGINT/SIGTERM lets it
    // finish (so a named temporary, on filesystems without O_TMPFILE, is published or removed
    // rather than left behind); a second one ends the process at once.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&interrupted))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&interrupted)))
            .context("cannot install signal handlers")?;
    }
    print_out(&format!(
        "Formatting '{}', fmt=insitu size={} cluster_size={} compression={}\n",
        image.display(),
        options.size,
        options.cluster_size,
        options.compression
    ));
    Image::create(&image, &options)
        .with_context(|| format!("cannot create '{}'", image.display()))?;
    if interrupted.load(Ordering::Relaxed) {
        note("interrupted, but the image was already complete: it is kept");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn config(args: &[&str]) -> anyhow::Result<CreateConfig> {
        let cli = Cli::try_parse_from(args).map_err(|e| anyhow::anyhow!("{e}"))?;
        match cli.command {
            Command::Create(args) => CreateConfig::try_from(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn defaults_are_64k_clusters_and_lz4() {
        let cfg = config(&["insitu-blk", "create", "a.img", "--size", "20G"]).unwrap();
        assert_eq!(cfg.image, PathBuf::from("a.img"));
        assert_eq!(cfg.options.size, 20 << 30);
        assert_eq!(cfg.options.cluster_size, 64 << 10);
        assert_eq!(cfg.options.compression, Compression::Lz4);
    }

    #[test]
    fn an_uncompressed_image_defaults_to_16k_clusters_unless_told_otherwise() {
        let cfg = config(&["insitu-blk", "create", "a.img", "-s", "1G", "-c", "none"]).unwrap();
        assert_eq!(cfg.options.compression, Compression::None);
        assert_eq!(cfg.options.cluster_size, 16 << 10);
        let cfg = config(&[
            "insitu-blk",
            "create",
            "a.img",
            "-s",
            "1G",
            "-c",
            "none",
            "--cluster-size",
            "64K",
        ])
        .unwrap();
        assert_eq!(cfg.options.cluster_size, 64 << 10);
        let cfg = config(&["insitu-blk", "create", "a.img", "-s", "1G", "-c", "zstd"]).unwrap();
        assert_eq!(cfg.options.cluster_size, 64 << 10);
    }

    #[test]
    fn all_options_parse() {
        let cfg = config(&[
            "insitu-blk",
            "create",
            "b.img",
            "-s",
            "1TiB",
            "--cluster-size",
            "128k",
            "--compression",
            "zstd:7",
        ])
        .unwrap();
        assert_eq!(cfg.options.size, 1 << 40);
        assert_eq!(cfg.options.cluster_size, 128 << 10);
        assert_eq!(cfg.options.compression, Compression::Zstd { level: 7 });
    }

    #[test]
    fn bad_values_are_rejected_with_the_flag_named() {
        for (args, needle) in [
            (vec!["create", "a.img"], "--size"),
            (vec!["create", "a.img", "--size", "0"], "must not be 0"),
            (vec!["create", "a.img", "--size", "1000"], "multiple of 512"),
            (vec!["create", "a.img", "--size", "lots"], "not a size"),
            (vec!["create", "a.img", "--size", "99999999T"], "too large"),
            (
                vec!["create", "a.img", "--size", "1G", "--cluster-size", "2K"],
                "power of two",
            ),
            (
                vec!["create", "a.img", "--size", "1G", "--compression", "gzip"],
                "unknown compression",
            ),
        ] {
            let mut full = vec!["insitu-blk"];
            full.extend(args.iter().copied());
            let err = config(&full).expect_err(&format!("{args:?}")).to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn device_contents_are_recognised_before_overwriting() {
        let probe_len = PROBE_LEN as usize;
        assert_eq!(
            classify_device_start(&vec![0u8; probe_len]),
            DeviceContent::Empty
        );
        assert_eq!(classify_device_start(&[]), DeviceContent::Empty);
        let in_use = |probe: &[u8]| match classify_device_start(probe) {
            DeviceContent::InUse(what) => what,
            other => panic!("{other:?}"),
        };
        for (offset, magic, needle) in [
            (0usize, &b"INSITUBK"[..], "insitu-blk"),
            (4096, b"INSITUBK", "insitu-blk"),
            (0, b"XFSB", "XFS"),
            (1080, &[0x53, 0xEF], "ext2/ext3/ext4"),
            (65600, b"_BHRfS_M", "btrfs"),
            (512, b"LABELONE", "LVM"),
            (512, b"EFI PART", "GPT"),
            (510, &[0x55, 0xAA], "partition table"),
            (4086, b"SWAPSPACE2", "swap"),
            (0, b"QFI\xfb", "qcow2"),
            (0, b"LUKS\xba\xbe", "LUKS"),
            (40000, b"x", "non-zero byte at offset 40000"),
        ] {
            let mut probe = vec![0u8; probe_len];
            probe[offset..offset + magic.len()].copy_from_slice(magic);
            let what = in_use(&probe);
            assert!(what.contains(needle), "{needle}: {what}");
        }
        // Zeroed superblocks, then the first checkpoint: an interrupted create or convert.
        let mut probe = vec![0u8; probe_len];
        probe[8192..8200].copy_from_slice(b"INSITUCP");
        probe[9000] = 7;
        assert_eq!(
            classify_device_start(&probe),
            DeviceContent::InterruptedFormat
        );
        // ... but not when anything sits before it.
        probe[100] = 1;
        assert!(in_use(&probe).contains("offset 100"));
    }

    #[test]
    fn existing_files_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken.img");
        fs::write(&path, b"precious").unwrap();
        let err = ensure_new_or_block_device(&path).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
        assert!(!ensure_new_or_block_device(&dir.path().join("new.img")).unwrap());
    }
}
