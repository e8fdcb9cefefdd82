//! `insitu-blk create IMAGE --size SIZE [--cluster-size 64K] [--compression ALGO]`.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use insitu_blk::image::{Compression, CreateOptions, Image, ImageError};

use super::size::ByteSize;
use super::{parse_compression, print_out, validate_cluster_size, validate_disk_size};

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
SIZE accepts a plain number of bytes or a K/M/G/T suffix (binary: 20G = 20 GiB; \
case-insensitive, optionally followed by iB or B).
IMAGE must not exist yet (an existing file is never overwritten), or be a block device, \
which is formatted.")]
pub struct CreateArgs {
    /// Path of the new image file (or a block device to format).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// Virtual disk size the VM sees (a multiple of 512 bytes).
    #[arg(long, short = 's', value_name = "SIZE")]
    pub size: ByteSize,

    /// Cluster size, the unit of compression: 16K, 32K, 64K or 128K.
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    pub cluster_size: ByteSize,

    /// Compression of new writes: lz4, snappy, zstd (level 3), zstd:LEVEL (-7..=22, not 0) or none.
    #[arg(long, short = 'c', value_name = "ALGO", default_value = "lz4",
          value_parser = parse_compression)]
    pub compression: Compression,
}

/// A validated `create` request.
#[derive(Debug)]
pub struct CreateConfig {
    /// Where the image goes.
    pub image: PathBuf,
    /// Geometry and algorithm of the new image.
    pub options: CreateOptions,
}

impl TryFrom<CreateArgs> for CreateConfig {
    type Error = anyhow::Error;

    fn try_from(args: CreateArgs) -> anyhow::Result<Self> {
        let size = validate_disk_size("--size", args.size)?;
        let cluster_size = validate_cluster_size(args.cluster_size)?;
        Ok(CreateConfig {
            image: args.image,
            options: CreateOptions {
                size,
                cluster_size,
                compression: args.compression,
            },
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

/// Creates the image. A half-created file is removed again if the engine fails.
pub fn run(config: CreateConfig) -> anyhow::Result<()> {
    let CreateConfig { image, options } = config;
    let block_device = ensure_new_or_block_device(&image)?;
    print_out(&format!(
        "Formatting '{}', fmt=insitu size={} cluster_size={} compression={}\n",
        image.display(),
        options.size,
        options.cluster_size,
        options.compression
    ));
    if let Err(err) = Image::create(&image, &options) {
        let raced = matches!(&err, ImageError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::AlreadyExists);
        if !block_device && !raced {
            // We checked that nothing was there, so whatever is there now is ours.
            let _ = fs::remove_file(&image);
        }
        return Err(err).with_context(|| format!("cannot create '{}'", image.display()));
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
                vec!["create", "a.img", "--size", "1G", "--cluster-size", "4K"],
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
