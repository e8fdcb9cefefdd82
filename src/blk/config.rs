//! What the device offers: virtio feature bits, request limits and the bytes of
//! `struct virtio_blk_config`.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::BlkError;
use crate::image::SECTOR_SIZE;

/// Largest queue size a device accepts (the split-ring maximum).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Default largest data segment (`size_max`): 1 MiB. The data path copies through a bounded
/// bounce buffer, so a large segment costs no extra memory.
pub const DEFAULT_SIZE_MAX: u32 = 1024 * 1024;
/// Default largest discard / write-zeroes range per segment, in sectors: 1 GiB, a whole number of
/// clusters for every cluster size the format allows.
pub const DEFAULT_MAX_ZEROING_SECTORS: u32 = (1024 * 1024 * 1024 / SECTOR_SIZE) as u32;
/// Default largest number of discard / write-zeroes segments per request. It bounds the work of
/// one request (a queue's worker is busy with it, and a VM pause waits for it): at most 16 GiB,
/// about 0.03 s of table updates at 64 KiB clusters on the reference machine (see
/// `examples/zeroing_cost.rs`), where 256 segments allowed 256 GiB (0.5 s, seconds under load).
/// Linux caps a whole discard request at `max_discard_sectors` anyway (1 GiB here) and only
/// loses merging of more than 16 scattered ranges into one request; QEMU offers 1 segment.
pub const DEFAULT_MAX_ZEROING_SEGMENTS: u32 = 16;
/// Offset of the `writeback` byte in `struct virtio_blk_config`: the cache mode the driver can
/// set with VIRTIO_BLK_F_CONFIG_WCE (1 write-back, 0 write-through).
pub const WRITEBACK_OFFSET: usize = 32;
/// Size of `struct virtio_blk_config` in virtio 1.2 (up to and including the zoned fields).
pub const CONFIG_SPACE_SIZE: usize = 96;
/// Length of the GET_ID string.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// log2(physical block / logical block): 4 KiB physical blocks of 512-byte sectors. Guests then
/// align their I/O to 4 KiB, the unit the engine stores payloads in.
pub const PHYSICAL_BLOCK_EXP: u8 = 3;
/// Smallest I/O that avoids a read-modify-write on the host, in sectors (4 KiB).
pub const MIN_IO_SECTORS: u16 = 8;

/// The ring size `seg_max` is sized for by default. The frontend, not the backend, chooses each
/// ring's size (SET_VRING_NUM, after the guest has read the configuration), and a driver must not
/// build a chain longer than its ring (virtio 1.2, 2.7.5.3.1): a request of `seg_max` segments
/// plus its header and status descriptors has to fit the smallest ring in common use, QEMU's
/// default of 128 for vhost-user-blk (qemu-storage-daemon reports 126 for the same reason).
pub const SEG_MAX_RING: u16 = 128;

/// Settings of one virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Number of request queues offered (VIRTIO_BLK_F_MQ), one worker each. At least 1.
    pub num_queues: u16,
    /// Largest queue size the backend accepts (a power of two, 2..=32768). It also bounds the
    /// length of a descriptor chain, indirect tables included.
    pub queue_size: u16,
    /// Serve the disk read-only (VIRTIO_BLK_F_RO): writes, discards and write-zeroes fail.
    pub read_only: bool,
    /// GET_ID string: at most 20 printable ASCII bytes. Empty: the first 20 characters of the
    /// image UUID, so the guest's `/dev/disk/by-id` name follows the image.
    pub serial: String,
    /// Largest number of data segments in a request (`seg_max`), at most `queue_size - 2`
    /// (a header and a status descriptor must fit too).
    pub seg_max: u32,
    /// Largest data segment in bytes (`size_max`), at least 4096. A read or write carries at
    /// most `seg_max * size_max` bytes.
    pub size_max: u32,
    /// Largest discard range per segment, in sectors.
    pub max_discard_sectors: u32,
    /// Largest number of segments in a discard request.
    pub max_discard_segments: u32,
    /// Largest write-zeroes range per segment, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Largest number of segments in a write-zeroes request.
    pub max_write_zeroes_segments: u32,
}

impl BlkConfig {
    /// Defaults for `num_queues` queues of at most `queue_size` entries: `seg_max` fits a ring of
    /// [`SEG_MAX_RING`] entries, 1 MiB segments, 1 GiB and 16 discard/write-zeroes segments.
    pub fn new(num_queues: u16, queue_size: u16) -> Self {
        Self {
            num_queues,
            queue_size,
            read_only: false,
            serial: String::new(),
            seg_max: u32::from(queue_size.min(SEG_MAX_RING).saturating_sub(2)).max(1),
            size_max: DEFAULT_SIZE_MAX,
            max_discard_sectors: DEFAULT_MAX_ZEROING_SECTORS,
            max_discard_segments: DEFAULT_MAX_ZEROING_SEGMENTS,
            max_write_zeroes_sectors: DEFAULT_MAX_ZEROING_SECTORS,
            max_write_zeroes_segments: DEFAULT_MAX_ZEROING_SEGMENTS,
        }
    }

    /// Checks the settings; the error says which one is wrong and why.
    pub fn validate(&self) -> Result<(), BlkError> {
        let bad = |what: String| Err(BlkError::InvalidConfig(what));
        if self.num_queues == 0 {
            return bad("num_queues must be at least 1".into());
        }
        if self.queue_size < 2 || !self.queue_size.is_power_of_two() {
            return bad(format!(
                "queue_size {} must be a power of two between 2 and {MAX_QUEUE_SIZE}",
                self.queue_size
            ));
        }
        let max_segments = u32::from(self.queue_size).saturating_sub(2).max(1);
        if self.seg_max == 0 || self.seg_max > max_segments {
            return bad(format!(
                "seg_max {} must be between 1 and queue_size - 2 ({max_segments})",
                self.seg_max
            ));
        }
        if self.size_max < 4096 {
            return bad(format!("size_max {} must be at least 4096", self.size_max));
        }
        if self.max_discard_sectors == 0
            || self.max_discard_segments == 0
            || self.max_write_zeroes_sectors == 0
            || self.max_write_zeroes_segments == 0
        {
            return bad("discard and write-zeroes limits must be at least 1".into());
        }
        if self.serial.len() > ID_BYTES {
            return bad(format!(
                "serial '{}' is longer than {ID_BYTES} bytes",
                self.serial
            ));
        }
        if !self
            .serial
            .bytes()
            .all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return bad(format!(
                "serial '{}' must be printable ASCII",
                self.serial.escape_default()
            ));
        }
        Ok(())
    }

    /// Largest data length of a read or write request: `seg_max * size_max`.
    pub fn max_request_bytes(&self) -> u64 {
        u64::from(self.seg_max) * u64::from(self.size_max)
    }
}

/// virtio device features offered: VERSION_1, the ring features the queue crate implements
/// (EVENT_IDX, INDIRECT_DESC), and the block features. A read-only device offers RO and no
/// DISCARD / WRITE_ZEROES / CONFIG_WCE.
pub fn device_features(cfg: &BlkConfig) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | (1 << bit));
    if cfg.read_only {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        bits |= (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE);
    }
    bits
}

/// Encodes `struct virtio_blk_config` (virtio 1.2, 5.2.4), little-endian:
///
/// ```text
/// off size field
///   0  8   capacity (sectors)
///   8  4   size_max
///  12  4   seg_max
///  16  4   geometry {cylinders u16, heads u8, sectors u8}   (not offered: 0)
///  20  4   blk_size = 512
///  24  1   physical_block_exp = 3 (4 KiB)
///  25  1   alignment_offset = 0
///  26  2   min_io_size (sectors) = 8
///  28  4   opt_io_size (sectors) = cluster size / 512
///  32  1   writeback = 1 (write-back; the driver may set 0, write-through, with CONFIG_WCE)
///  33  1   unused
///  34  2   num_queues
///  36  4   max_discard_sectors
///  40  4   max_discard_seg
///  44  4   discard_sector_alignment (sectors) = cluster size / 512
///  48  4   max_write_zeroes_sectors
///  52  4   max_write_zeroes_seg
///  56  1   write_zeroes_may_unmap = 1
///  57  3   unused
///  60 36   secure erase and zoned fields (not offered: 0)
/// ```
pub fn config_space(cfg: &BlkConfig, capacity_sectors: u64, cluster_size: u32) -> Vec<u8> {
    let cluster_sectors = cluster_size / SECTOR_SIZE as u32;
    let mut space = vec![0u8; CONFIG_SPACE_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        space[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &capacity_sectors.to_le_bytes());
    put(8, &cfg.size_max.to_le_bytes());
    put(12, &cfg.seg_max.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    put(24, &[PHYSICAL_BLOCK_EXP, 0]);
    put(26, &MIN_IO_SECTORS.to_le_bytes());
    put(28, &cluster_sectors.to_le_bytes());
    put(34, &cfg.num_queues.to_le_bytes());
    if !cfg.read_only {
        put(36, &cfg.max_discard_sectors.to_le_bytes());
        put(40, &cfg.max_discard_segments.to_le_bytes());
        put(44, &cluster_sectors.to_le_bytes());
        put(48, &cfg.max_write_zeroes_sectors.to_le_bytes());
        put(52, &cfg.max_write_zeroes_segments.to_le_bytes());
        put(56, &[1]);
        put(WRITEBACK_OFFSET, &[1]);
    }
    space
}

/// Checks a driver's write of `data` at `offset` into the configuration space whose bytes are
/// now `current`: only the `writeback` byte is writable (0 or 1, virtio 1.2 5.2.4); bytes of
/// other fields may be rewritten with their current value (a frontend may pass on a wider
/// write) but not changed. Returns the new `writeback` value if the write covers it.
pub fn check_config_write(
    current: &[u8],
    offset: u32,
    data: &[u8],
) -> Result<Option<bool>, String> {
    let start = offset as usize;
    let end = start
        .checked_add(data.len())
        .filter(|&end| end <= current.len())
        .ok_or_else(|| {
            format!(
                "write of {} bytes at {offset} is outside the {}-byte configuration space",
                data.len(),
                current.len()
            )
        })?;
    let mut writeback = None;
    for (at, &value) in (start..end).zip(data) {
        if at == WRITEBACK_OFFSET {
            match value {
                0 => writeback = Some(false),
                1 => writeback = Some(true),
                other => return Err(format!("writeback value {other} (0 or 1 expected)")),
            }
        } else if current[at] != value {
            return Err(format!("byte {at} of the configuration space is read-only"));
        }
    }
    Ok(writeback)
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use virtio_bindings::virtio_blk::virtio_blk_config;

    use super::*;

    fn le32(space: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(space[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn only_the_writeback_byte_is_writable() {
        let cfg = BlkConfig::new(2, 256);
        let space = config_space(&cfg, 1 << 20, 65536);
        assert_eq!(space[WRITEBACK_OFFSET], 1, "write-back by default");
        let at = WRITEBACK_OFFSET as u32;
        assert_eq!(check_config_write(&space, at, &[0]), Ok(Some(false)));
        assert_eq!(check_config_write(&space, at, &[1]), Ok(Some(true)));
        assert!(check_config_write(&space, at, &[2]).is_err());
        // A wider write that leaves the other fields as they are.
        let wide = space[28..36].to_vec();
        let mut through = wide.clone();
        through[4] = 0;
        assert_eq!(check_config_write(&space, 28, &through), Ok(Some(false)));
        assert_eq!(check_config_write(&space, 0, &space[..8]), Ok(None));
        // Changing another field, or writing past the end, is refused.
        let mut changed = wide;
        changed[6] ^= 1;
        assert!(check_config_write(&space, 28, &changed).is_err());
        assert!(check_config_write(&space, 0, &[space[0] ^ 1]).is_err());
        assert!(check_config_write(&space, CONFIG_SPACE_SIZE as u32, &[0]).is_err());
        assert!(check_config_write(&space, u32::MAX, &[0, 0]).is_err());
    }

    #[test]
    fn config_layout_matches_the_virtio_bindings() {
        assert_eq!(CONFIG_SPACE_SIZE, size_of::<virtio_blk_config>());
        assert_eq!(offset_of!(virtio_blk_config, wce), WRITEBACK_OFFSET);
        assert_eq!(offset_of!(virtio_blk_config, size_max), 8);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, physical_block_exp), 24);
        assert_eq!(offset_of!(virtio_blk_config, min_io_size), 26);
        assert_eq!(offset_of!(virtio_blk_config, opt_io_size), 28);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, discard_sector_alignment), 44);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(virtio_blk_config, max_secure_erase_sectors), 60);
    }

    #[test]
    fn config_space_carries_geometry_and_limits() {
        let cfg = BlkConfig::new(4, 256);
        let space = config_space(&cfg, 2 * 1024 * 1024, 64 * 1024);
        assert_eq!(space.len(), 96);
        assert_eq!(&space[0..8], &(2u64 * 1024 * 1024).to_le_bytes());
        assert_eq!(le32(&space, 8), 1024 * 1024);
        // seg_max fits QEMU's default ring of 128, whatever the largest ring accepted.
        assert_eq!(le32(&space, 12), 126);
        assert_eq!(BlkConfig::new(1, 1024).seg_max, 126);
        assert_eq!(BlkConfig::new(1, 16).seg_max, 14);
        assert_eq!(le32(&space, 20), 512);
        assert_eq!(space[24], 3);
        assert_eq!(u16::from_le_bytes([space[26], space[27]]), 8);
        assert_eq!(le32(&space, 28), 128);
        assert_eq!(u16::from_le_bytes([space[34], space[35]]), 4);
        assert_eq!(le32(&space, 36), DEFAULT_MAX_ZEROING_SECTORS);
        assert_eq!(le32(&space, 40), DEFAULT_MAX_ZEROING_SEGMENTS);
        assert_eq!(le32(&space, 44), 128);
        assert_eq!(le32(&space, 48), DEFAULT_MAX_ZEROING_SECTORS);
        assert_eq!(le32(&space, 52), DEFAULT_MAX_ZEROING_SEGMENTS);
        assert_eq!(space[56], 1);
        assert!(space[57..].iter().all(|&b| b == 0));
    }

    #[test]
    fn read_only_device_offers_ro_and_no_discard() {
        let mut cfg = BlkConfig::new(1, 128);
        let rw = device_features(&cfg);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & (1 << VIRTIO_F_VERSION_1), 0);
        cfg.read_only = true;
        let ro = device_features(&cfg);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(le32(&config_space(&cfg, 8, 16384), 36), 0);
    }

    #[test]
    fn invalid_settings_are_refused_with_the_reason() {
        let ok = BlkConfig::new(2, 256);
        assert!(ok.validate().is_ok());
        let cases: Vec<(BlkConfig, &str)> = vec![
            (
                BlkConfig {
                    num_queues: 0,
                    ..ok.clone()
                },
                "num_queues",
            ),
            (
                BlkConfig {
                    queue_size: 100,
                    ..ok.clone()
                },
                "queue_size",
            ),
            (
                BlkConfig {
                    seg_max: 255,
                    ..ok.clone()
                },
                "seg_max",
            ),
            (
                BlkConfig {
                    size_max: 512,
                    ..ok.clone()
                },
                "size_max",
            ),
            (
                BlkConfig {
                    max_discard_segments: 0,
                    ..ok.clone()
                },
                "discard",
            ),
            (
                BlkConfig {
                    serial: "x".repeat(21),
                    ..ok.clone()
                },
                "longer",
            ),
            (
                BlkConfig {
                    serial: "a\nb".into(),
                    ..ok.clone()
                },
                "printable",
            ),
        ];
        for (cfg, needle) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }
}
