//! `insitu-blk info IMAGE [--json]`: geometry, space use and compression of an image.
//!
//! The image is opened read-only: no lock is taken and nothing is written, so this works while a
//! daemon serves the image; it then reports the last committed state.

use std::path::{Path, PathBuf};

use anyhow::Context;
use insitu_blk::image::{FileStorage, Geometry, Image, ImageError, OpenOptions, Stats, Storage};
use serde::Serialize;

use super::size::human_size;
use super::{ensure_input_exists, print_out};

/// Arguments of `info`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The image is opened read-only without taking its lock, so info works on an image in use by \
`insitu-blk serve`; it then shows the last committed state.")]
pub struct InfoArgs {
    /// The image to describe.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A validated `info` request (nothing to validate beyond what clap did).
#[derive(Debug)]
pub struct InfoConfig {
    /// The image.
    pub image: PathBuf,
    /// JSON output.
    pub json: bool,
}

impl From<InfoArgs> for InfoConfig {
    fn from(args: InfoArgs) -> Self {
        InfoConfig {
            image: args.image,
            json: args.json,
        }
    }
}

/// Cluster counts by kind.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ClusterCounts {
    /// Clusters of the virtual disk (the last one may be partial).
    pub total: u64,
    /// Clusters that read as zeros and store nothing.
    pub zero: u64,
    /// Clusters stored compressed.
    pub compressed: u64,
    /// Clusters stored uncompressed.
    pub raw: u64,
}

/// What `info --json` prints. Field names are a stable interface for scripts.
#[derive(Debug, Serialize)]
pub struct InfoReport {
    /// The path as given.
    pub filename: String,
    /// Always "insitu".
    pub format: &'static str,
    /// On-disk format version.
    pub format_version: u32,
    /// Image UUID.
    pub uuid: String,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Algorithm of new writes, as accepted by `--compression` (`lz4`, `zstd:3`, ...).
    pub compression: String,
    /// Whether the image lives on a block device.
    pub block_device: bool,
    /// Length of the image file (or size of the block device) in bytes.
    pub host_length: u64,
    /// Bytes the host filesystem really allocates for the file (st_blocks × 512); null on a
    /// block device.
    pub host_allocated_bytes: Option<u64>,
    /// Bytes of guest data in clusters that are not known zero.
    pub allocated_logical_bytes: u64,
    /// Payload bytes the engine stores for them.
    pub stored_bytes: u64,
    /// allocated_logical_bytes / stored_bytes (1.0 when nothing is stored).
    pub compression_ratio: f64,
    /// Clusters by kind.
    pub clusters: ClusterCounts,
    /// RAM the cluster table takes while the image is open.
    pub table_ram_bytes: u64,
}

impl InfoReport {
    /// Builds the report from what the engine and the host say.
    pub fn new(
        filename: &Path,
        geometry: &Geometry,
        stats: &Stats,
        host: &FileStorage,
    ) -> anyhow::Result<Self> {
        let host_length = host.len().context("cannot read the image size")?;
        let host_allocated_bytes = host
            .allocated_bytes()
            .context("cannot read the image's allocated size")?;
        let cluster_size = u64::from(geometry.cluster_size.max(1));
        Ok(InfoReport {
            filename: filename.display().to_string(),
            format: "insitu",
            format_version: geometry.format_version,
            uuid: geometry.uuid.clone(),
            virtual_size: geometry.size,
            cluster_size: geometry.cluster_size,
            compression: geometry.compression.to_string(),
            block_device: host.is_block_device(),
            host_length,
            host_allocated_bytes,
            allocated_logical_bytes: stats.allocated_logical_bytes,
            stored_bytes: stats.stored_bytes,
            compression_ratio: stats.ratio(),
            clusters: ClusterCounts {
                total: geometry.size.div_ceil(cluster_size),
                zero: stats.clusters_zero,
                compressed: stats.clusters_compressed,
                raw: stats.clusters_raw,
            },
            table_ram_bytes: stats.table_ram_bytes,
        })
    }

    /// Text in the style of `qemu-img info`.
    pub fn to_text(&self) -> String {
        let disk_size = match self.host_allocated_bytes {
            Some(bytes) => human_size(bytes),
            None => format!("{} (block device)", human_size(self.host_length)),
        };
        format!(
            "image: {filename}\n\
             file format: {format}\n\
             virtual size: {vsize_h} ({vsize} bytes)\n\
             disk size: {disk_size}\n\
             cluster_size: {cluster_size}\n\
             Format specific information:\n    \
                 format version: {version}\n    \
                 uuid: {uuid}\n    \
                 compression: {compression}\n    \
                 clusters: {total} ({zero} zero, {compressed} compressed, {raw} raw)\n    \
                 data: {alloc_h} allocated, {stored_h} stored (ratio {ratio:.2})\n    \
                 table RAM: {ram_h}\n",
            filename = self.filename,
            format = self.format,
            vsize_h = human_size(self.virtual_size),
            vsize = self.virtual_size,
            cluster_size = self.cluster_size,
            version = self.format_version,
            uuid = self.uuid,
            compression = self.compression,
            total = self.clusters.total,
            zero = self.clusters.zero,
            compressed = self.clusters.compressed,
            raw = self.clusters.raw,
            alloc_h = human_size(self.allocated_logical_bytes),
            stored_h = human_size(self.stored_bytes),
            ratio = self.compression_ratio,
            ram_h = human_size(self.table_ram_bytes),
        )
    }
}

/// Opens the image read-only and prints its description.
pub fn run(config: InfoConfig) -> anyhow::Result<()> {
    let path = &config.image;
    ensure_input_exists(path)?;
    let open = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let image = Image::open(path, &open).map_err(|err| {
        let hint = match err {
            ImageError::CorruptMetadata(_) => " ('insitu-blk check' explains what is wrong)",
            _ => "",
        };
        anyhow::Error::new(err).context(format!("cannot open '{}'{hint}", path.display()))
    })?;
    let host = FileStorage::open(path, true)
        .with_context(|| format!("cannot open '{}'", path.display()))?;
    let report = InfoReport::new(path, image.geometry(), &image.stats(), &host)
        .with_context(|| format!("'{}'", path.display()))?;
    drop(image);
    if config.json {
        let text = serde_json::to_string_pretty(&report).context("cannot encode JSON")?;
        print_out(&format!("{text}\n"));
    } else {
        print_out(&report.to_text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use insitu_blk::image::Compression;

    #[test]
    fn text_and_json_carry_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let host = FileStorage::open(&path, true).unwrap();
        let geometry = Geometry {
            size: (1 << 30) + 512,
            cluster_size: 65536,
            compression: Compression::Zstd { level: 5 },
            uuid: "u-u-i-d".into(),
            format_version: 1,
        };
        let stats = Stats {
            allocated_logical_bytes: 4 << 20,
            stored_bytes: 2 << 20,
            clusters_zero: 16322,
            clusters_compressed: 60,
            clusters_raw: 2,
            table_ram_bytes: 131072,
            ..Stats::default()
        };
        let report = InfoReport::new(&path, &geometry, &stats, &host).unwrap();
        assert_eq!(report.clusters.total, 16385, "partial last cluster counts");
        assert_eq!(report.host_length, 8192);
        assert!(report.host_allocated_bytes.is_some());
        let text = report.to_text();
        assert!(
            text.contains("virtual size: 1 GiB (1073742336 bytes)"),
            "{text}"
        );
        assert!(text.contains("compression: zstd:5"), "{text}");
        assert!(text.contains("ratio 2.00"), "{text}");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["compression"], "zstd:5");
        assert_eq!(json["clusters"]["compressed"], 60);
        assert_eq!(json["compression_ratio"], 2.0);
    }
}
