//! Executing a parsed request on the image engine.
//!
//! Policies (virtio 1.2, 5.2.6):
//! - Data move in chunks of at most [`CHUNK_BYTES`], cut at multiples of [`CHUNK_BYTES`] on the
//!   disk so a chunk never splits a cluster: memory per queue is bounded whatever the guest sends,
//!   and a write compresses a private copy of the guest's bytes (the guest may rewrite its buffer
//!   meanwhile). A failed request may have been applied in part, as on a real disk.
//! - FLUSH ignores its `sector` field and any data buffers (the spec reserves both; QEMU ignores
//!   them too) and returns once every completed write is durable.
//! - Without VIRTIO_BLK_F_FLUSH negotiated the driver assumes a write-through disk, so every
//!   write, discard and write-zeroes is followed by a flush before it completes.
//! - A read-only device fails OUT, DISCARD and WRITE_ZEROES with IOERR before touching anything.
//! - DISCARD / WRITE_ZEROES: every segment is validated before the first one executes (no partial
//!   effect of an invalid request): unknown flags, or UNMAP on DISCARD, give UNSUPP; an empty
//!   payload, a payload not a multiple of 16, too many segments, a segment of 0 sectors or over
//!   the limit, or a range outside the disk give IOERR. Overlapping and adjacent ranges are
//!   merged first, so each byte is zeroed once whatever the guest repeats.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::GuestMemory;

use super::request::{self, checked_byte_range, data_len, DataCursor, RequestBuffers};
use super::{BlkDevice, RequestError, Submitted};
use crate::image::SECTOR_SIZE;

/// Status byte of a successful request.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Largest piece of a read or write handed to the engine at once (a multiple of every cluster
/// size the format allows), and so the largest private copy per queue (256 KiB: 4 MiB for 16
/// queues).
pub const CHUNK_BYTES: u64 = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Zeroing {
    Discard,
    WriteZeroes,
}

impl BlkDevice {
    /// Parses and executes the request collected in `bufs`. Returns the number of data bytes
    /// written into the guest's buffers (the status byte not included).
    pub(super) fn execute<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        bufs: &mut RequestBuffers,
        acked_features: u64,
        submitted: Submitted,
    ) -> Result<u32, RequestError> {
        let header = request::parse_request(mem, bufs)?;
        let write_through = acked_features & (1 << VIRTIO_BLK_F_FLUSH) == 0;
        match header.request_type {
            VIRTIO_BLK_T_IN => self.read(mem, bufs, header.sector),
            VIRTIO_BLK_T_OUT => {
                self.write(mem, bufs, header.sector)?;
                self.flush_if(write_through)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.flush_requests.fetch_add(1, Ordering::AcqRel);
                // The notice goes to the first FLUSH either way; one made available before the
                // restart fails whether or not the notice went to another.
                let notice = self.lost_writes.swap(false, Ordering::SeqCst);
                if notice || submitted == Submitted::BeforeRestart {
                    return Err(RequestError::LostWrites);
                }
                self.flush_if(true)?;
                self.flushed_since_lost_writes.store(true, Ordering::SeqCst);
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, bufs),
            VIRTIO_BLK_T_DISCARD => {
                self.zero_ranges(mem, bufs, acked_features, Zeroing::Discard)?;
                self.flush_if(write_through)?;
                Ok(0)
            }
            VIRTIO_BLK_T_WRITE_ZEROES => {
                self.zero_ranges(mem, bufs, acked_features, Zeroing::WriteZeroes)?;
                self.flush_if(write_through)?;
                Ok(0)
            }
            other => Err(RequestError::UnsupportedType(other)),
        }
    }

    /// Checks the data length against the advertised limit.
    fn bounded_data_len(&self, bufs: &RequestBuffers) -> Result<u64, RequestError> {
        let len = data_len(&bufs.data);
        let max = self.cfg.max_request_bytes().min(u64::from(u32::MAX));
        if len > max {
            return Err(RequestError::TooLarge { len, max });
        }
        Ok(len)
    }

    fn read<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        bufs: &mut RequestBuffers,
        sector: u64,
    ) -> Result<u32, RequestError> {
        let len = self.bounded_data_len(bufs)?;
        if bufs.data.iter().any(|b| !b.writable) {
            return Err(RequestError::ReadIntoReadOnlyBuffer);
        }
        let offset = checked_byte_range(sector, len, self.capacity_sectors)?;
        let RequestBuffers { data, bounce, .. } = bufs;
        let mut cursor = DataCursor::default();
        for (pos, n) in chunks(offset, len) {
            let chunk = bounce_slice(bounce, n);
            self.image
                .read(pos, chunk)
                .map_err(|e| RequestError::engine("read", pos, e))?;
            cursor.write_from(mem, data, chunk)?;
        }
        // len <= u32::MAX (bounded_data_len).
        Ok(len as u32)
    }

    fn write<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        bufs: &mut RequestBuffers,
        sector: u64,
    ) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnlyDevice);
        }
        let len = self.bounded_data_len(bufs)?;
        let offset = checked_byte_range(sector, len, self.capacity_sectors)?;
        let RequestBuffers { data, bounce, .. } = bufs;
        let mut cursor = DataCursor::default();
        for (pos, n) in chunks(offset, len) {
            let chunk = bounce_slice(bounce, n);
            // The private copy: the engine never sees guest memory the guest can still change.
            cursor.read_into(mem, data, chunk)?;
            self.image
                .write(pos, chunk)
                .map_err(|e| RequestError::engine("write", pos, e))?;
        }
        Ok(())
    }

    fn flush_if(&self, wanted: bool) -> Result<(), RequestError> {
        // A read-only device has nothing to make durable.
        if !wanted || self.read_only {
            return Ok(());
        }
        self.image
            .flush()
            .map_err(|e| RequestError::engine("flush", 0, e))
    }

    fn get_id<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        bufs: &mut RequestBuffers,
    ) -> Result<u32, RequestError> {
        if bufs.data.iter().any(|b| !b.writable) {
            return Err(RequestError::ReadIntoReadOnlyBuffer);
        }
        // Never more than the guest's buffer, never more than 20 bytes.
        let n = data_len(&bufs.data).min(self.id.len() as u64) as usize;
        DataCursor::default().write_from(mem, &bufs.data, &self.id[..n])?;
        Ok(n as u32)
    }

    fn zero_ranges<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        bufs: &mut RequestBuffers,
        acked_features: u64,
        kind: Zeroing,
    ) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnlyDevice);
        }
        let (feature, name, max_segments, max_sectors, allowed_flags) = match kind {
            Zeroing::Discard => (
                VIRTIO_BLK_F_DISCARD,
                "VIRTIO_BLK_F_DISCARD",
                self.cfg.max_discard_segments,
                self.cfg.max_discard_sectors,
                0,
            ),
            Zeroing::WriteZeroes => (
                VIRTIO_BLK_F_WRITE_ZEROES,
                "VIRTIO_BLK_F_WRITE_ZEROES",
                self.cfg.max_write_zeroes_segments,
                self.cfg.max_write_zeroes_sectors,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            ),
        };
        if acked_features & (1 << feature) == 0 {
            return Err(RequestError::NotNegotiated(name));
        }
        request::read_zeroing_segments(mem, bufs, max_segments)?;
        let segments = &bufs.zeroing;
        // UNSUPP for flags is a MUST of the spec: check all flags before any range.
        if let Some(bad) = segments.iter().find(|s| s.flags & !allowed_flags != 0) {
            return Err(RequestError::UnsupportedFlags(bad.flags));
        }
        for segment in segments {
            if segment.num_sectors == 0 || segment.num_sectors > max_sectors {
                return Err(RequestError::BadSegmentLength {
                    sectors: segment.num_sectors,
                    max: max_sectors,
                });
            }
            checked_byte_range(
                segment.sector,
                u64::from(segment.num_sectors) * SECTOR_SIZE,
                self.capacity_sectors,
            )?;
        }
        // Validated above: every range lies on the disk.
        for range in merged_ranges(&mut bufs.zeroing) {
            let (offset, len) = (range.offset, range.len);
            match kind {
                Zeroing::Discard => self
                    .image
                    .discard(offset, len)
                    .map_err(|e| RequestError::engine("discard", offset, e))?,
                Zeroing::WriteZeroes => self
                    .image
                    .write_zeroes(offset, len, range.unmap)
                    .map_err(|e| RequestError::engine("write-zeroes", offset, e))?,
            }
        }
        Ok(())
    }
}

/// A byte range to zero, merged from one or more segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ZeroRange {
    offset: u64,
    len: u64,
    /// Every merged segment allowed deallocation (WRITE_ZEROES UNMAP).
    unmap: bool,
}

/// Sorts validated segments by start and merges overlapping and adjacent ones, so a request's
/// work is bounded by the disk it covers, not by how often the guest repeats a range (256
/// copies of one 1 GiB segment zero 1 GiB once). A merged range may deallocate only if every
/// segment in it allowed that.
fn merged_ranges(segments: &mut [request::ZeroingSegment]) -> Vec<ZeroRange> {
    segments.sort_unstable_by_key(|s| s.sector);
    let mut ranges: Vec<ZeroRange> = Vec::with_capacity(segments.len());
    for segment in segments.iter() {
        let offset = segment.sector * SECTOR_SIZE;
        let len = u64::from(segment.num_sectors) * SECTOR_SIZE;
        let unmap = segment.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        match ranges.last_mut() {
            Some(last) if offset <= last.offset + last.len => {
                last.len = last.len.max(offset + len - last.offset);
                last.unmap &= unmap;
            }
            _ => ranges.push(ZeroRange { offset, len, unmap }),
        }
    }
    ranges
}

/// Splits `[offset, offset + len)` at multiples of [`CHUNK_BYTES`]: `(position, length)` pairs.
fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let boundary = (pos / CHUNK_BYTES + 1).saturating_mul(CHUNK_BYTES);
        let chunk_end = boundary.min(end);
        let item = (pos, (chunk_end - pos) as usize);
        pos = chunk_end;
        Some(item)
    })
}

/// The first `n` (<= [`CHUNK_BYTES`]) bytes of the bounce buffer, grown once per queue.
fn bounce_slice(bounce: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if bounce.len() < n {
        bounce.resize(n, 0);
    }
    &mut bounce[..n]
}

#[cfg(test)]
mod tests {
    use super::*;
    use request::ZeroingSegment;

    fn seg(sector: u64, num_sectors: u32, flags: u32) -> ZeroingSegment {
        ZeroingSegment {
            sector,
            num_sectors,
            flags,
        }
    }

    #[test]
    fn zeroing_segments_are_merged_when_they_overlap_or_touch() {
        const U: u32 = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let range = |sector: u64, sectors: u64, unmap| ZeroRange {
            offset: sector * 512,
            len: sectors * 512,
            unmap,
        };
        // 256 copies of one segment: one range.
        let mut same: Vec<_> = (0..256).map(|_| seg(8, 2048, U)).collect();
        assert_eq!(merged_ranges(&mut same), vec![range(8, 2048, true)]);
        // Unsorted, overlapping, adjacent, contained and disjoint segments.
        let mut mixed = vec![
            seg(1000, 10, U),
            seg(0, 8, U),
            seg(8, 8, 0),
            seg(4, 2, U),
            seg(20, 5, U),
            seg(22, 1, U),
            seg(1005, 100, U),
        ];
        assert_eq!(
            merged_ranges(&mut mixed),
            vec![
                range(0, 16, false),
                range(20, 5, true),
                range(1000, 105, true)
            ]
        );
        let mut one = vec![seg(7, 1, 0)];
        assert_eq!(merged_ranges(&mut one), vec![range(7, 1, false)]);
    }

    #[test]
    fn chunks_never_cross_a_chunk_boundary() {
        let pieces: Vec<_> = chunks(CHUNK_BYTES - 512, CHUNK_BYTES + 1024).collect();
        assert_eq!(
            pieces,
            vec![
                (CHUNK_BYTES - 512, 512),
                (CHUNK_BYTES, CHUNK_BYTES as usize),
                (2 * CHUNK_BYTES, 512)
            ]
        );
        assert_eq!(chunks(4096, 0).count(), 0);
        assert_eq!(chunks(0, 4096).collect::<Vec<_>>(), vec![(0, 4096)]);
    }
}
