//! On-disk layout of format v1: superblock, table entries, checkpoint areas, journal records.
//!
//! Every structure is little-endian, encoded and decoded by hand from byte slices (no unsafe, no
//! casts of disk bytes into structs). The decoders validate everything and never size an
//! allocation by a number read from disk beyond what the geometry allows: the layout of an image
//! is *derived* from (logical size, cluster size) and the superblock must agree with it.
//! `docs/FORMAT.md` documents the same bytes for humans.

use super::Compression;

/// Size of a metadata block and of the storage unit of payloads.
pub const BLOCK: u64 = 4096;
/// [`BLOCK`] as usize.
pub const BLOCK_USIZE: usize = 4096;
/// Current format version.
pub const FORMAT_VERSION: u32 = 1;
/// Superblock magic.
pub const SB_MAGIC: &[u8; 8] = b"INSITUBK";
/// Checkpoint header magic.
pub const CP_MAGIC: &[u8; 8] = b"INSITUCP";
/// Journal record magic.
pub const JR_MAGIC: &[u8; 8] = b"INSITUJR";
/// Byte offsets of the two superblock copies.
pub const SB_OFFSETS: [u64; 2] = [0, BLOCK];
/// Encoded size of one table entry in checkpoints and journal records.
pub const DISK_ENTRY_LEN: usize = 16;
/// Table entries per checkpoint chunk (a chunk is one 4 KiB block with a 16-byte header).
pub const ENTRIES_PER_CHUNK: u64 = 255;
/// Bytes of a journal record header.
pub const JR_HEADER_LEN: usize = 48;
/// Bytes per entry in a journal record (cluster index + entry).
pub const JR_ENTRY_LEN: usize = 4 + DISK_ENTRY_LEN;
/// Smallest and largest journal sizes.
const MIN_JOURNAL: u64 = 1 << 20;
const MAX_JOURNAL: u64 = 64 << 20;

/// Algorithm codes stored per cluster.
pub mod alg {
    /// The cluster reads as zeros and stores nothing.
    pub const ZERO: u8 = 0;
    /// Stored raw (uncompressed), filling its whole slot.
    pub const RAW: u8 = 1;
    /// LZ4 block.
    pub const LZ4: u8 = 2;
    /// Snappy raw.
    pub const SNAPPY: u8 = 3;
    /// Zstandard frame.
    pub const ZSTD: u8 = 4;
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? / a * a)
}

/// Where everything lives, derived from (size, cluster size) alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Logical size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Number of clusters (`ceil(size / cluster_size)`).
    pub cluster_count: u64,
    /// Spare slots beyond the home slots.
    pub spare_slots: u64,
    /// Offsets of the two checkpoint areas.
    pub checkpoint_offsets: [u64; 2],
    /// Bytes of each checkpoint area.
    pub checkpoint_area_size: u64,
    /// Offset of the journal ring.
    pub journal_offset: u64,
    /// Bytes of the journal ring.
    pub journal_size: u64,
    /// Offset of slot 0.
    pub data_offset: u64,
    /// Length of the whole image in bytes.
    pub total_len: u64,
}

impl Layout {
    /// Derives the layout. Fails with a sentence when the geometry is not allowed.
    pub fn new(size: u64, cluster_size: u32) -> Result<Layout, String> {
        if !cluster_size.is_power_of_two()
            || !(super::MIN_CLUSTER_SIZE..=super::MAX_CLUSTER_SIZE).contains(&cluster_size)
        {
            return Err(format!(
                "cluster size {cluster_size} is not a power of two between 4 KiB and 128 KiB"
            ));
        }
        if size == 0 || !size.is_multiple_of(super::SECTOR_SIZE) {
            return Err(format!(
                "size {size} is not a positive multiple of 512 bytes"
            ));
        }
        let cs = u64::from(cluster_size);
        let cluster_count = size.div_ceil(cs);
        let spare_slots = (cluster_count / 16).max(64);
        let slot_count = cluster_count + spare_slots;
        if slot_count >= u64::from(u32::MAX) {
            return Err(format!(
                "size {size} needs {cluster_count} clusters: too many for {cluster_size}-byte clusters"
            ));
        }
        let chunks = cluster_count.div_ceil(ENTRIES_PER_CHUNK);
        let checkpoint_area_size = BLOCK + chunks * BLOCK;
        let journal_size = align_up(
            (checkpoint_area_size / 2).clamp(MIN_JOURNAL, MAX_JOURNAL),
            BLOCK,
        )
        .ok_or("journal size overflows")?;
        let cp0 = 2 * BLOCK;
        let cp1 = cp0 + checkpoint_area_size;
        let journal_offset = cp1 + checkpoint_area_size;
        let data_offset = align_up(journal_offset + journal_size, cs).ok_or("size overflows")?;
        let total_len = slot_count
            .checked_mul(cs)
            .and_then(|d| d.checked_add(data_offset))
            .filter(|&t| t <= i64::MAX as u64)
            .ok_or_else(|| format!("size {size} is too large"))?;
        Ok(Layout {
            size,
            cluster_size,
            cluster_count,
            spare_slots,
            checkpoint_offsets: [cp0, cp1],
            checkpoint_area_size,
            journal_offset,
            journal_size,
            data_offset,
            total_len,
        })
    }

    /// Total number of slots (home + spare).
    pub fn slot_count(&self) -> u64 {
        self.cluster_count + self.spare_slots
    }

    /// 4 KiB units per slot.
    pub fn units_per_slot(&self) -> u32 {
        self.cluster_size / BLOCK as u32
    }

    /// Byte offset of a slot.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.data_offset + u64::from(slot) * u64::from(self.cluster_size)
    }

    /// Byte offset of a region (slot, first unit).
    pub fn region_offset(&self, slot: u32, unit: u32) -> u64 {
        self.slot_offset(slot) + u64::from(unit) * BLOCK
    }

    /// Number of checkpoint chunks for a full table.
    pub fn chunk_count(&self) -> u64 {
        self.cluster_count.div_ceil(ENTRIES_PER_CHUNK)
    }
}

/// The immutable description of an image, stored twice (blocks 0 and 1).
///
/// Byte layout (4096 bytes, little-endian):
/// ```text
///   0  [8]  magic "INSITUBK"
///   8  u32  format version (1)
///  12  u32  incompatible feature flags (0)
///  16  u32  compatible feature flags (0)
///  20  u32  reserved (0)
///  24  u64  logical size in bytes
///  32  u32  cluster size in bytes
///  36  u8   default algorithm code (1 none, 2 lz4, 3 snappy, 4 zstd)
///  37  i8   zstd level (0 unless zstd)
///  38  [2]  reserved (0)
///  40  [16] uuid
///  56  u64  cluster count          \
///  64  u64  spare slots             |
///  72  u64  checkpoint area 0 off   |  derived from size and cluster size;
///  80  u64  checkpoint area 1 off   |  must match the derivation exactly
///  88  u64  checkpoint area size    |
///  96  u64  journal offset          |
/// 104  u64  journal size            |
/// 112  u64  data offset             |
/// 120  u64  total image length     /
/// 128  ...  zero
/// 4092 u32  crc32c of bytes 0..4092
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Derived layout.
    pub layout: Layout,
    /// Default algorithm for new writes.
    pub compression: Compression,
    /// Image identity; also stamped in checkpoints and journal records.
    pub uuid: [u8; 16],
}

/// Encodes a [`Compression`] as (code, level).
pub fn compression_code(c: Compression) -> (u8, i8) {
    match c {
        Compression::None => (alg::RAW, 0),
        Compression::Lz4 => (alg::LZ4, 0),
        Compression::Snappy => (alg::SNAPPY, 0),
        Compression::Zstd { level } => (alg::ZSTD, level.clamp(-128, 127) as i8),
    }
}

impl Superblock {
    /// Encodes into one block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_USIZE];
        let l = &self.layout;
        b[0..8].copy_from_slice(SB_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u64(&mut b, 24, l.size);
        put_u32(&mut b, 32, l.cluster_size);
        let (code, level) = compression_code(self.compression);
        b[36] = code;
        b[37] = level as u8;
        b[40..56].copy_from_slice(&self.uuid);
        put_u64(&mut b, 56, l.cluster_count);
        put_u64(&mut b, 64, l.spare_slots);
        put_u64(&mut b, 72, l.checkpoint_offsets[0]);
        put_u64(&mut b, 80, l.checkpoint_offsets[1]);
        put_u64(&mut b, 88, l.checkpoint_area_size);
        put_u64(&mut b, 96, l.journal_offset);
        put_u64(&mut b, 104, l.journal_size);
        put_u64(&mut b, 112, l.data_offset);
        put_u64(&mut b, 120, l.total_len);
        let crc = crc32c::crc32c(&b[..BLOCK_USIZE - 4]);
        put_u32(&mut b, BLOCK_USIZE - 4, crc);
        b
    }

    /// True when the block starts with the superblock magic (used to tell "not an image" from
    /// "a corrupt image").
    pub fn has_magic(b: &[u8]) -> bool {
        b.len() >= 8 && &b[0..8] == SB_MAGIC
    }

    /// Decodes and validates one block.
    pub fn decode(b: &[u8]) -> Result<Superblock, String> {
        if b.len() != BLOCK_USIZE {
            return Err("superblock is truncated".into());
        }
        if !Self::has_magic(b) {
            return Err("bad magic".into());
        }
        let stored = le_u32(b, BLOCK_USIZE - 4);
        if crc32c::crc32c(&b[..BLOCK_USIZE - 4]) != stored {
            return Err("checksum mismatch".into());
        }
        let version = le_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version} is not supported (this build reads version {FORMAT_VERSION})"
            ));
        }
        let incompat = le_u32(b, 12);
        if incompat != 0 {
            return Err(format!("unknown incompatible features {incompat:#x}"));
        }
        let size = le_u64(b, 24);
        let cluster_size = le_u32(b, 32);
        let layout = Layout::new(size, cluster_size)?;
        let compression = match (b[36], b[37] as i8) {
            (alg::RAW, 0) => Compression::None,
            (alg::LZ4, 0) => Compression::Lz4,
            (alg::SNAPPY, 0) => Compression::Snappy,
            (alg::ZSTD, level) if (-7..=22).contains(&level) && level != 0 => Compression::Zstd {
                level: i32::from(level),
            },
            (code, level) => return Err(format!("unknown algorithm {code} (level {level})")),
        };
        let fields = [
            (56, layout.cluster_count, "cluster count"),
            (64, layout.spare_slots, "spare slot count"),
            (72, layout.checkpoint_offsets[0], "checkpoint 0 offset"),
            (80, layout.checkpoint_offsets[1], "checkpoint 1 offset"),
            (88, layout.checkpoint_area_size, "checkpoint area size"),
            (96, layout.journal_offset, "journal offset"),
            (104, layout.journal_size, "journal size"),
            (112, layout.data_offset, "data offset"),
            (120, layout.total_len, "image length"),
        ];
        for (at, want, what) in fields {
            let got = le_u64(b, at);
            if got != want {
                return Err(format!(
                    "{what} {got} does not match the geometry (expected {want})"
                ));
            }
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[40..56]);
        Ok(Superblock {
            layout,
            compression,
            uuid,
        })
    }
}

/// One table entry as stored: where a cluster's payload is and how to check and decode it.
///
/// Byte layout (16 bytes): `u32 slot, u32 crc32c of the stored units, u8 first unit,
/// u8 unit count, u8 algorithm, u8 reserved (0), u32 reserved (0)`. A zero cluster is 16 zero bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DiskEntry {
    /// Slot index.
    pub slot: u32,
    /// crc32c of the stored units.
    pub crc: u32,
    /// First 4 KiB unit inside the slot.
    pub unit: u8,
    /// Number of 4 KiB units.
    pub units: u8,
    /// Algorithm code ([`alg`]).
    pub alg: u8,
}

impl DiskEntry {
    /// Encodes into 16 bytes.
    pub fn encode(&self, out: &mut [u8]) {
        put_u32(out, 0, self.slot);
        put_u32(out, 4, self.crc);
        out[8] = self.unit;
        out[9] = self.units;
        out[10] = self.alg;
        out[11] = 0;
        put_u32(out, 12, 0);
    }

    /// Decodes and validates 16 bytes against the layout.
    pub fn decode(b: &[u8], layout: &Layout) -> Result<DiskEntry, String> {
        let e = DiskEntry {
            slot: le_u32(b, 0),
            crc: le_u32(b, 4),
            unit: b[8],
            units: b[9],
            alg: b[10],
        };
        if b[11] != 0 || le_u32(b, 12) != 0 {
            return Err("reserved bytes are not zero".into());
        }
        let upc = layout.units_per_slot();
        match e.alg {
            alg::ZERO => {
                if e != DiskEntry::default() {
                    return Err("zero entry has non-zero fields".into());
                }
            }
            alg::RAW => {
                if e.unit != 0 || u32::from(e.units) != upc {
                    return Err(format!(
                        "raw payload must fill its slot (units {}+{})",
                        e.unit, e.units
                    ));
                }
            }
            alg::LZ4 | alg::SNAPPY | alg::ZSTD => {
                if e.units == 0 || u32::from(e.unit) + u32::from(e.units) > upc {
                    return Err(format!(
                        "payload units {}+{} do not fit a {upc}-unit slot",
                        e.unit, e.units
                    ));
                }
            }
            other => return Err(format!("unknown algorithm code {other}")),
        }
        if e.alg != alg::ZERO && u64::from(e.slot) >= layout.slot_count() {
            return Err(format!(
                "slot {} is outside the {} slots",
                e.slot,
                layout.slot_count()
            ));
        }
        Ok(e)
    }
}

/// Checkpoint header (first block of a checkpoint area).
///
/// Byte layout (4096 bytes): `[8] magic "INSITUCP", u32 version, u32 reserved, u64 seq,
/// u64 cluster count, u64 chunk count, [16] uuid, zero..., u32 crc32c of bytes 0..4092 at 4092`.
/// `chunk count` chunks follow, each one block:
/// `u64 seq, u32 chunk index, u32 crc32c (of bytes 0..12 and 16..4096), 255 × 16-byte entries`.
/// Chunks are written only for runs of the table that hold a non-zero entry; their indexes strictly
/// increase; missing chunks are all-zero entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// Last commit sequence number the checkpoint contains.
    pub seq: u64,
    /// Number of chunks that follow.
    pub chunk_count: u64,
}

impl CheckpointHeader {
    /// Encodes into one block.
    pub fn encode(&self, layout: &Layout, uuid: &[u8; 16]) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_USIZE];
        b[0..8].copy_from_slice(CP_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u64(&mut b, 16, self.seq);
        put_u64(&mut b, 24, layout.cluster_count);
        put_u64(&mut b, 32, self.chunk_count);
        b[40..56].copy_from_slice(uuid);
        let crc = crc32c::crc32c(&b[..BLOCK_USIZE - 4]);
        put_u32(&mut b, BLOCK_USIZE - 4, crc);
        b
    }

    /// Decodes and validates one block.
    pub fn decode(b: &[u8], layout: &Layout, uuid: &[u8; 16]) -> Result<Self, String> {
        if b.len() != BLOCK_USIZE || &b[0..8] != CP_MAGIC {
            return Err("no checkpoint (bad magic)".into());
        }
        if crc32c::crc32c(&b[..BLOCK_USIZE - 4]) != le_u32(b, BLOCK_USIZE - 4) {
            return Err("header checksum mismatch".into());
        }
        if le_u32(b, 8) != FORMAT_VERSION {
            return Err("header version mismatch".into());
        }
        if &b[40..56] != uuid {
            return Err("header belongs to another image (uuid mismatch)".into());
        }
        if le_u64(b, 24) != layout.cluster_count {
            return Err("header cluster count mismatch".into());
        }
        let chunk_count = le_u64(b, 32);
        if chunk_count > layout.chunk_count() {
            return Err(format!(
                "header claims {chunk_count} chunks, at most {} fit",
                layout.chunk_count()
            ));
        }
        Ok(CheckpointHeader {
            seq: le_u64(b, 16),
            chunk_count,
        })
    }
}

/// crc32c of a checkpoint chunk (bytes 0..12 and 16..4096).
pub fn chunk_crc(b: &[u8]) -> u32 {
    let c = crc32c::crc32c(&b[..12]);
    crc32c::crc32c_append(c, &b[16..BLOCK_USIZE])
}

/// Fills the header of a chunk whose entries are already in `b[16..]`.
pub fn seal_chunk(b: &mut [u8], seq: u64, index: u32) {
    put_u64(b, 0, seq);
    put_u32(b, 8, index);
    let crc = chunk_crc(b);
    put_u32(b, 12, crc);
}

/// Validates a chunk's header; returns its index.
pub fn open_chunk(b: &[u8], seq: u64) -> Result<u32, String> {
    if le_u64(b, 0) != seq {
        return Err(format!(
            "chunk belongs to checkpoint {} not {seq} (torn write?)",
            le_u64(b, 0)
        ));
    }
    if chunk_crc(b) != le_u32(b, 12) {
        return Err("chunk checksum mismatch".into());
    }
    Ok(le_u32(b, 8))
}

/// Journal record header.
///
/// Byte layout: `[8] magic "INSITUJR", u64 seq, u32 entry count, u32 block count, [16] uuid,
/// u32 crc32c (of the whole record with this field zero), u32 flags`, then `entry count` ×
/// (`u32 cluster`, 16-byte entry), zero padding to `block count` blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Commit sequence number.
    pub seq: u64,
    /// Record flags ([`RECORD_CLEAN_CLOSE`]).
    pub flags: u32,
    /// Entries in the record.
    pub entry_count: u32,
    /// Record length in blocks.
    pub block_count: u32,
}

/// Blocks a record of `entries` entries occupies.
pub fn record_blocks(entries: usize) -> u64 {
    ((JR_HEADER_LEN + entries * JR_ENTRY_LEN) as u64).div_ceil(BLOCK)
}

/// Record flag: the marker record written by a clean close. An image whose journal ends with it
/// holds no space that no entry refers to; any other ending makes the next read-write open
/// look for (and punch) space left behind by writes that never committed.
pub const RECORD_CLEAN_CLOSE: u32 = 1;

/// Record flag, only beside [`RECORD_CLEAN_CLOSE`]: the process that closed (or quiesced) the
/// image had itself recovered it after an unclean shutdown and had not yet told the guest that
/// writes it completed without a FLUSH were lost. The next opener tells it instead.
pub const RECORD_LOSS_UNREPORTED: u32 = 2;

/// Record flag, only beside [`RECORD_CLEAN_CLOSE`]: the image is consistent (nothing was lost),
/// but it may hold allocated host space that no entry refers to: freed regions a quiesce left
/// unpunched, so that the pause or migration hand-over does not wait for hundreds of
/// milliseconds of hole punching. The next read-write opener hands that space to its writer
/// for reclaim (found with `SEEK_DATA`/`SEEK_HOLE`, like after a crash); `check` reports it as
/// expected, not as a leak. A marker without it (written by `close`, `create`, `check --repair`
/// or a quiesce that had nothing waiting) promises that the image stores only what its table
/// refers to.
pub const RECORD_SPACE_UNRECLAIMED: u32 = 4;

/// Encodes a record with no flags into `out` (cleared first).
pub fn encode_record(out: &mut Vec<u8>, seq: u64, uuid: &[u8; 16], entries: &[(u32, DiskEntry)]) {
    encode_record_flags(out, seq, uuid, entries, 0)
}

/// Encodes a record into `out` (cleared first).
pub fn encode_record_flags(
    out: &mut Vec<u8>,
    seq: u64,
    uuid: &[u8; 16],
    entries: &[(u32, DiskEntry)],
    flags: u32,
) {
    let blocks = record_blocks(entries.len());
    out.clear();
    out.resize((blocks * BLOCK) as usize, 0);
    out[0..8].copy_from_slice(JR_MAGIC);
    put_u64(out, 8, seq);
    put_u32(out, 16, entries.len() as u32);
    put_u32(out, 20, blocks as u32);
    out[24..40].copy_from_slice(uuid);
    put_u32(out, 44, flags);
    for (i, (cluster, e)) in entries.iter().enumerate() {
        let at = JR_HEADER_LEN + i * JR_ENTRY_LEN;
        put_u32(out, at, *cluster);
        e.encode(&mut out[at + 4..at + JR_ENTRY_LEN]);
    }
    let crc = crc32c::crc32c(out);
    put_u32(out, 40, crc);
}

/// Decodes the header from the first block of a record; validates what can be validated without
/// the rest (`space` = bytes left in the journal from this record's start).
pub fn decode_record_header(b: &[u8], uuid: &[u8; 16], space: u64) -> Result<RecordHeader, String> {
    if b.len() < BLOCK_USIZE || &b[0..8] != JR_MAGIC {
        return Err("no record (bad magic)".into());
    }
    if &b[24..40] != uuid {
        return Err("record belongs to another image".into());
    }
    let h = RecordHeader {
        seq: le_u64(b, 8),
        flags: le_u32(b, 44),
        entry_count: le_u32(b, 16),
        block_count: le_u32(b, 20),
    };
    if h.block_count == 0
        || u64::from(h.block_count) * BLOCK > space
        || record_blocks(h.entry_count as usize) != u64::from(h.block_count)
    {
        return Err("record length is inconsistent".into());
    }
    Ok(h)
}

/// Verifies a whole record's checksum and decodes its entries.
pub fn decode_record_entries(
    rec: &[u8],
    h: &RecordHeader,
    layout: &Layout,
) -> Result<Vec<(u32, DiskEntry)>, String> {
    let stored = le_u32(rec, 40);
    let mut c = crc32c::crc32c(&rec[..40]);
    c = crc32c::crc32c_append(c, &[0u8; 4]);
    c = crc32c::crc32c_append(c, &rec[44..]);
    if c != stored {
        return Err("record checksum mismatch".into());
    }
    let mut out = Vec::with_capacity(h.entry_count as usize);
    for i in 0..h.entry_count as usize {
        let at = JR_HEADER_LEN + i * JR_ENTRY_LEN;
        let cluster = le_u32(rec, at);
        if u64::from(cluster) >= layout.cluster_count {
            return Err(format!("record names cluster {cluster} beyond the disk"));
        }
        let e = DiskEntry::decode(&rec[at + 4..at + JR_ENTRY_LEN], layout)
            .map_err(|e| format!("record entry for cluster {cluster}: {e}"))?;
        out.push((cluster, e));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_a_one_gib_disk_is_derived_and_aligned() {
        let l = Layout::new(1 << 30, 65536).expect("layout");
        assert_eq!(l.cluster_count, 16384);
        assert_eq!(l.spare_slots, 1024);
        assert_eq!(l.data_offset % 65536, 0);
        assert!(l.journal_offset >= l.checkpoint_offsets[1] + l.checkpoint_area_size);
        assert_eq!(l.total_len, l.data_offset + (16384 + 1024) * 65536);
    }

    #[test]
    fn layout_rejects_bad_geometry() {
        assert!(Layout::new(0, 65536).is_err());
        assert!(Layout::new(1000, 65536).is_err());
        assert!(Layout::new(1 << 30, 65536 + 4096).is_err());
        assert!(Layout::new(1 << 30, 2048).is_err());
        assert!(Layout::new(u64::MAX - 511, 16384).is_err());
    }

    #[test]
    fn superblock_round_trips_and_rejects_a_flipped_bit() {
        let sb = Superblock {
            layout: Layout::new(10 << 20, 16384).expect("layout"),
            compression: Compression::Zstd { level: 5 },
            uuid: [7; 16],
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).expect("decode"), sb);
        b[30] ^= 1;
        assert!(Superblock::decode(&b).is_err());
    }

    #[test]
    fn superblock_with_a_lying_layout_field_is_rejected_even_with_a_good_crc() {
        let sb = Superblock {
            layout: Layout::new(10 << 20, 16384).expect("layout"),
            compression: Compression::Lz4,
            uuid: [7; 16],
        };
        let mut b = sb.encode();
        put_u64(&mut b, 104, 1 << 40);
        let crc = crc32c::crc32c(&b[..BLOCK_USIZE - 4]);
        put_u32(&mut b, BLOCK_USIZE - 4, crc);
        let err = Superblock::decode(&b).expect_err("must fail");
        assert!(err.contains("journal size"), "{err}");
    }

    #[test]
    fn journal_record_round_trips_and_detects_a_flipped_bit() {
        let layout = Layout::new(10 << 20, 65536).expect("layout");
        let e = DiskEntry {
            slot: 3,
            crc: 0xdead_beef,
            unit: 2,
            units: 5,
            alg: alg::LZ4,
        };
        let mut rec = Vec::new();
        encode_record(&mut rec, 9, &[1; 16], &[(4, e), (5, DiskEntry::default())]);
        let h = decode_record_header(&rec, &[1; 16], 1 << 20).expect("header");
        assert_eq!(h.seq, 9);
        let entries = decode_record_entries(&rec, &h, &layout).expect("entries");
        assert_eq!(entries, vec![(4, e), (5, DiskEntry::default())]);
        rec[JR_HEADER_LEN + 7] ^= 0x10;
        assert!(decode_record_entries(&rec, &h, &layout).is_err());
    }

    #[test]
    fn entry_pointing_outside_the_slots_is_rejected() {
        let layout = Layout::new(1 << 20, 65536).expect("layout");
        let mut b = [0u8; 16];
        DiskEntry {
            slot: 10_000,
            crc: 1,
            unit: 0,
            units: 1,
            alg: alg::LZ4,
        }
        .encode(&mut b);
        assert!(DiskEntry::decode(&b, &layout).is_err());
    }
}
