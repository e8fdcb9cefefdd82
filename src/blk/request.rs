//! Turning a descriptor chain into a validated request.
//!
//! The guest owns the descriptors and the buffers and may change them at any time, so every
//! descriptor is fetched exactly once into [`RequestBuffers`] and everything is validated on that
//! private snapshot. Two walkers fill it:
//!
//! - [`walk_chain`] (used by [`super::BlkDevice::process_ring_chain`]) reads the descriptor table
//!   itself, knowing where the ring is: it enforces every rule of virtio 1.2 2.7.5.3 on indirect
//!   descriptors (only at the head, never with NEXT, never nested, a non-empty table of whole
//!   descriptors no longer than the queue), stops a cycle after as many hops as the table has
//!   entries, and bounds the chain to 2^32 bytes.
//! - [`collect_chain`] (used by [`super::BlkDevice::process_chain`]) follows virtio-queue's
//!   `DescriptorChain` iterator, which bounds the walk (queue-size hops, one level of indirection,
//!   a table a multiple of 16 bytes, 2^32 bytes in total) but ends a broken chain silently: a chain
//!   whose last yielded descriptor still has NEXT set was cut short, and is rejected here. That
//!   iterator hides the descriptor that points to an indirect table, so INDIRECT together with NEXT
//!   (whose NEXT it ignores) cannot be refused on this path.
//!
//! Then, on the snapshot:
//! - every byte of every buffer must be guest memory (no u64 overflow, no byte in a hole or past
//!   the end; a buffer may span regions that are contiguous in guest-physical space);
//! - the status byte is the last byte of the last descriptor, which must be device-writable;
//!   without it no answer is possible and the chain is returned with used length 0;
//! - the 16-byte header is gathered from the leading device-readable bytes (it may be split); the
//!   data are the bytes between the header and the status byte (the status may share a descriptor
//!   with data); no device-readable descriptor may follow a device-writable one.
//!
//! Nothing here touches the image.

use std::ops::Deref;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Permissions,
};

use super::RequestError;
use crate::image::SECTOR_SIZE;

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_SIZE: usize = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes`.
pub const ZEROING_SEGMENT_SIZE: usize = 16;

/// One guest buffer: an address range validated to be guest memory (it may span contiguous
/// regions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuffer {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// One discard / write-zeroes range as the guest sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroingSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (bit 0: UNMAP).
    pub flags: u32,
}

/// Per-queue scratch space reused by every request of that queue, so that the data path does
/// not allocate per request. Its size is bounded by the device limits, never by a guest length.
#[derive(Debug, Default)]
pub struct RequestBuffers {
    /// The chain's descriptors, fetched once.
    pub(super) descriptors: Vec<GuestBuffer>,
    /// The data part of the current request.
    pub(super) data: Vec<GuestBuffer>,
    /// Private copy of guest data (at most one chunk).
    pub(super) bounce: Vec<u8>,
    /// Discard / write-zeroes segments of the current request.
    pub(super) zeroing: Vec<ZeroingSegment>,
}

/// Where the answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusByte {
    /// Guest address of the status byte.
    pub addr: GuestAddress,
}

/// Why a chain cannot be answered at all (no status byte can be written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unanswerable {
    /// The chain yielded no descriptor (bad head, bad indirect table at the head).
    #[error("descriptor chain is empty or unreadable")]
    Empty,
    /// The walk ended on a descriptor that still had NEXT set (cycle, `next` out of range,
    /// unreadable descriptor, bad indirect table, chain over 4 GiB).
    #[error("descriptor chain is cut short (cycle, bad next index or bad indirect table)")]
    Truncated,
    /// More descriptors than the queue size.
    #[error("descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(u16),
    /// Buffers of more than 2^32 - 1 bytes in total (virtio 1.2 2.7.5.2).
    #[error("descriptor chain is longer than 4 GiB")]
    TooLong,
    /// A descriptor with both INDIRECT and NEXT (virtio 1.2 2.7.5.3.1).
    #[error("indirect descriptor has NEXT set")]
    IndirectWithNext,
    /// An indirect table that is empty, not a whole number of descriptors, nested in another,
    /// or reached after direct descriptors.
    #[error("invalid indirect descriptor table")]
    BadIndirectTable,
    /// The last descriptor is device-readable, empty, or outside guest memory.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    /// An indirect descriptor while VIRTIO_RING_F_INDIRECT_DESC was not negotiated (virtio 1.2
    /// 2.7.5.3.1: the driver MUST NOT set INDIRECT then); its table is not followed.
    #[error("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC negotiated")]
    IndirectNotNegotiated,
}

/// The parsed request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `type` field.
    pub request_type: u32,
    /// `sector` field.
    pub sector: u64,
}

/// Walks `chain` once, copying its descriptors into `bufs.descriptors`, and locates the status
/// byte. `max_descriptors` bounds the chain (indirect tables included).
pub fn collect_chain<M>(
    chain: &mut virtio_queue::DescriptorChain<M>,
    max_descriptors: u16,
    bufs: &mut RequestBuffers,
) -> Result<StatusByte, Unanswerable>
where
    M: Deref,
    M::Target: GuestMemory,
{
    bufs.descriptors.clear();
    let mut last_had_next = false;
    for desc in chain.by_ref() {
        if bufs.descriptors.len() >= usize::from(max_descriptors) {
            return Err(Unanswerable::TooManyDescriptors(max_descriptors));
        }
        last_had_next = desc.has_next();
        bufs.descriptors.push(GuestBuffer {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
    }
    if last_had_next {
        return Err(Unanswerable::Truncated);
    }
    locate_status(chain.memory(), &bufs.descriptors)
}

/// Where a split virtqueue's descriptor table is, which virtio-queue's `DescriptorChain` keeps
/// private. From the queue: `GuestAddress(queue.desc_table())` and `queue.size()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitRing {
    /// Guest address of the descriptor table.
    pub desc_table: GuestAddress,
    /// Queue size (entries of the descriptor table).
    pub size: u16,
}

/// One descriptor as read from guest memory.
#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Reads descriptor `index` of the table at `table` (little-endian `struct virtq_desc`).
fn read_descriptor<G: GuestMemory + ?Sized>(
    mem: &G,
    table: GuestAddress,
    index: u16,
) -> Option<RawDesc> {
    let at = table.checked_add(u64::from(index) * 16)?;
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, at).ok()?;
    let (addr, rest) = raw.split_at(8);
    Some(RawDesc {
        addr: u64::from_le_bytes(addr.try_into().ok()?),
        len: u32::from_le_bytes(rest[0..4].try_into().ok()?),
        flags: u16::from_le_bytes(rest[4..6].try_into().ok()?),
        next: u16::from_le_bytes(rest[6..8].try_into().ok()?),
    })
}

/// Walks the chain starting at descriptor `head` of `ring`, reading every descriptor once into
/// `bufs.descriptors`, and locates the status byte. `max_descriptors` bounds the chain and any
/// indirect table. Indirect tables are followed (VIRTIO_RING_F_INDIRECT_DESC negotiated); see
/// [`walk_chain_with`].
pub fn walk_chain<G: GuestMemory + ?Sized>(
    mem: &G,
    ring: SplitRing,
    head: u16,
    max_descriptors: u16,
    bufs: &mut RequestBuffers,
) -> Result<StatusByte, Unanswerable> {
    walk_chain_with(mem, ring, head, max_descriptors, true, bufs)
}

/// [`walk_chain`], refusing any indirect descriptor unless `indirect_negotiated` (the driver
/// accepted VIRTIO_RING_F_INDIRECT_DESC).
pub fn walk_chain_with<G: GuestMemory + ?Sized>(
    mem: &G,
    ring: SplitRing,
    head: u16,
    max_descriptors: u16,
    indirect_negotiated: bool,
    bufs: &mut RequestBuffers,
) -> Result<StatusByte, Unanswerable> {
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    bufs.descriptors.clear();
    if head >= ring.size {
        return Err(Unanswerable::Empty);
    }
    let mut table = ring.desc_table;
    let mut table_entries = ring.size;
    let mut index = head;
    let mut in_indirect_table = false;
    // Descriptors visited in the current table: more than it has entries means a cycle.
    let mut hops = 0u32;
    let mut total_len = 0u64;
    loop {
        hops += 1;
        if hops > u32::from(table_entries) {
            return Err(Unanswerable::Truncated);
        }
        let Some(desc) = read_descriptor(mem, table, index) else {
            return Err(if bufs.descriptors.is_empty() && !in_indirect_table {
                Unanswerable::Empty
            } else {
                Unanswerable::Truncated
            });
        };
        if desc.flags & INDIRECT != 0 {
            if !indirect_negotiated {
                return Err(Unanswerable::IndirectNotNegotiated);
            }
            if desc.flags & NEXT != 0 {
                return Err(Unanswerable::IndirectWithNext);
            }
            if in_indirect_table
                || !bufs.descriptors.is_empty()
                || desc.len == 0
                || desc.len % 16 != 0
            {
                return Err(Unanswerable::BadIndirectTable);
            }
            let entries = desc.len / 16;
            if entries > u32::from(max_descriptors) {
                return Err(Unanswerable::TooManyDescriptors(max_descriptors));
            }
            table = GuestAddress(desc.addr);
            // entries <= max_descriptors, a u16.
            table_entries = entries as u16;
            index = 0;
            in_indirect_table = true;
            hops = 0;
            continue;
        }
        if bufs.descriptors.len() >= usize::from(max_descriptors) {
            return Err(Unanswerable::TooManyDescriptors(max_descriptors));
        }
        total_len += u64::from(desc.len);
        if total_len > u64::from(u32::MAX) {
            return Err(Unanswerable::TooLong);
        }
        bufs.descriptors.push(GuestBuffer {
            addr: GuestAddress(desc.addr),
            len: desc.len,
            writable: desc.flags & WRITE != 0,
        });
        if desc.flags & NEXT == 0 {
            break;
        }
        if desc.next >= table_entries {
            return Err(Unanswerable::Truncated);
        }
        index = desc.next;
    }
    locate_status(mem, &bufs.descriptors)
}

/// The status byte: the last byte of the last descriptor, which must be device-writable and in
/// guest memory.
fn locate_status<G: GuestMemory + ?Sized>(
    mem: &G,
    descriptors: &[GuestBuffer],
) -> Result<StatusByte, Unanswerable> {
    let Some(last) = descriptors.last().copied() else {
        return Err(Unanswerable::Empty);
    };
    if !last.writable || last.len == 0 || !buffer_in_memory(mem, &last) {
        return Err(Unanswerable::NoStatus);
    }
    // `buffer_in_memory` checked that addr + len - 1 does not overflow.
    Ok(StatusByte {
        addr: last.addr.unchecked_add(u64::from(last.len) - 1),
    })
}

/// True when `buf` is empty or every byte of it is guest memory: no u64 overflow, no byte in a
/// hole between regions or past the last one (the hostile-guest rules reject these).
///
/// A buffer may span several regions when they are contiguous in guest-physical space: a
/// descriptor is a range of guest-physical memory (virtio 1.2 2.7.5), and how the frontend
/// splits that memory into vhost-user regions (QEMU: one per memory backend, e.g. per NUMA node
/// or hot-plugged DIMM) is invisible to the guest, whose block layer merges physically
/// contiguous pages into one segment. Every copy to and from guest memory goes through
/// vm-memory's `read_slice`/`write_slice`, which cross region boundaries.
pub fn buffer_in_memory<G: GuestMemory + ?Sized>(mem: &G, buf: &GuestBuffer) -> bool {
    if buf.len == 0 {
        return true;
    }
    let Some(last) = buf.addr.checked_add(u64::from(buf.len) - 1) else {
        return false;
    };
    match mem.physical_memory() {
        Some(physical) => {
            // Each step moves to the region that starts right after the previous one ends, so
            // the walk visits each region at most once.
            let mut from = buf.addr;
            loop {
                let Some(region) = physical.find_region(from) else {
                    return false;
                };
                let end = region.last_addr();
                if end >= last {
                    return true;
                }
                match end.checked_add(1) {
                    Some(next) => from = next,
                    None => return false,
                }
            }
        }
        None => {
            let access = if buf.writable {
                Permissions::ReadWrite
            } else {
                Permissions::Read
            };
            mem.check_range(buf.addr, buf.len as usize, access)
        }
    }
}

/// Validates the collected descriptors, reads the header and fills `bufs.data` with the data
/// buffers (the bytes between the header and the status byte).
pub fn parse_request<G: GuestMemory + ?Sized>(
    mem: &G,
    bufs: &mut RequestBuffers,
) -> Result<Header, RequestError> {
    let RequestBuffers {
        descriptors, data, ..
    } = bufs;
    data.clear();
    let mut seen_writable = false;
    for desc in descriptors.iter() {
        if !buffer_in_memory(mem, desc) {
            return Err(RequestError::BadAddress {
                addr: desc.addr.raw_value(),
                len: desc.len,
            });
        }
        if desc.writable {
            seen_writable = true;
        } else if seen_writable {
            return Err(RequestError::MalformedChain(
                "a device-readable descriptor follows a device-writable one",
            ));
        }
    }

    // Gather the header from the leading readable bytes; the rest of the chain (minus the
    // status byte) is data.
    let mut header = [0u8; HEADER_SIZE];
    let mut header_filled = 0usize;
    let last_index = descriptors.len() - 1;
    for (index, desc) in descriptors.iter().enumerate() {
        // The status byte is the last byte of the last descriptor: not data.
        let usable = if index == last_index {
            desc.len - 1
        } else {
            desc.len
        };
        let mut skip = 0u32;
        if header_filled < HEADER_SIZE {
            if desc.writable {
                return Err(RequestError::ShortHeader);
            }
            let take = (HEADER_SIZE - header_filled).min(usable as usize);
            mem.read_slice(&mut header[header_filled..header_filled + take], desc.addr)
                .map_err(RequestError::GuestMemory)?;
            header_filled += take;
            // `take` <= 16.
            skip = take as u32;
        }
        if usable > skip {
            data.push(GuestBuffer {
                addr: desc.addr.unchecked_add(u64::from(skip)),
                len: usable - skip,
                writable: desc.writable,
            });
        }
    }
    if header_filled < HEADER_SIZE {
        return Err(RequestError::ShortHeader);
    }
    let (type_bytes, rest) = header.split_at(4);
    let sector_bytes = &rest[4..12];
    Ok(Header {
        request_type: u32::from_le_bytes(type_bytes.try_into().unwrap_or_default()),
        sector: u64::from_le_bytes(sector_bytes.try_into().unwrap_or_default()),
    })
}

/// Total length of the data buffers.
pub fn data_len(data: &[GuestBuffer]) -> u64 {
    data.iter().map(|b| u64::from(b.len)).sum()
}

/// Checks that a read or write of `len` bytes at `sector` lies inside a disk of
/// `capacity_sectors` and is a whole number of sectors; returns the byte offset.
pub fn checked_byte_range(
    sector: u64,
    len: u64,
    capacity_sectors: u64,
) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len));
    }
    let out_of_range = || RequestError::OutOfRange {
        sector,
        sectors: len / SECTOR_SIZE,
        capacity: capacity_sectors,
    };
    let end = sector
        .checked_add(len / SECTOR_SIZE)
        .ok_or_else(out_of_range)?;
    if end > capacity_sectors {
        return Err(out_of_range());
    }
    // Cannot fail once end <= capacity (a capacity comes from a byte size), but stays checked.
    sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)
}

/// Reads the discard / write-zeroes segments from the (device-readable) data buffers into
/// `bufs.zeroing`, once. `max_segments` bounds the payload before anything is read.
pub fn read_zeroing_segments<G: GuestMemory + ?Sized>(
    mem: &G,
    bufs: &mut RequestBuffers,
    max_segments: u32,
) -> Result<(), RequestError> {
    let RequestBuffers { data, zeroing, .. } = bufs;
    zeroing.clear();
    let total = data_len(data);
    if total == 0 || !total.is_multiple_of(ZEROING_SEGMENT_SIZE as u64) {
        return Err(RequestError::BadZeroingPayload(total));
    }
    let count = total / ZEROING_SEGMENT_SIZE as u64;
    if count > u64::from(max_segments) {
        return Err(RequestError::TooManySegments {
            count,
            max: max_segments,
        });
    }
    if data.iter().any(|b| b.writable) {
        return Err(RequestError::MalformedChain(
            "discard/write-zeroes payload in a device-writable buffer",
        ));
    }
    // Segments may straddle descriptors: assemble them through a 16-byte window.
    let mut segment = [0u8; ZEROING_SEGMENT_SIZE];
    let mut filled = 0usize;
    for buf in data.iter() {
        let mut offset = 0u32;
        while offset < buf.len {
            let take = (ZEROING_SEGMENT_SIZE - filled).min((buf.len - offset) as usize);
            mem.read_slice(
                &mut segment[filled..filled + take],
                buf.addr.unchecked_add(u64::from(offset)),
            )
            .map_err(RequestError::GuestMemory)?;
            filled += take;
            offset += take as u32;
            if filled == ZEROING_SEGMENT_SIZE {
                zeroing.push(ZeroingSegment {
                    sector: u64::from_le_bytes(segment[0..8].try_into().unwrap_or_default()),
                    num_sectors: u32::from_le_bytes(segment[8..12].try_into().unwrap_or_default()),
                    flags: u32::from_le_bytes(segment[12..16].try_into().unwrap_or_default()),
                });
                filled = 0;
            }
        }
    }
    Ok(())
}

/// Walks the data buffers as one byte stream, for copying to and from a private buffer in
/// chunks.
#[derive(Debug, Default)]
pub struct DataCursor {
    index: usize,
    offset: u32,
}

impl DataCursor {
    /// Copies the next `dst.len()` bytes of guest data into `dst`.
    pub fn read_into<G: GuestMemory + ?Sized>(
        &mut self,
        mem: &G,
        data: &[GuestBuffer],
        dst: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut done = 0usize;
        while done < dst.len() {
            let (addr, take) = self.next_piece(data, dst.len() - done)?;
            mem.read_slice(&mut dst[done..done + take], addr)
                .map_err(RequestError::GuestMemory)?;
            done += take;
        }
        Ok(())
    }

    /// Copies `src` into the next `src.len()` bytes of guest data (through vm-memory, so the
    /// dirty-page log sees the write).
    pub fn write_from<G: GuestMemory + ?Sized>(
        &mut self,
        mem: &G,
        data: &[GuestBuffer],
        src: &[u8],
    ) -> Result<(), RequestError> {
        let mut done = 0usize;
        while done < src.len() {
            let (addr, take) = self.next_piece(data, src.len() - done)?;
            mem.write_slice(&src[done..done + take], addr)
                .map_err(RequestError::GuestMemory)?;
            done += take;
        }
        Ok(())
    }

    /// The next contiguous piece of at most `want` bytes; advances the cursor.
    fn next_piece(
        &mut self,
        data: &[GuestBuffer],
        want: usize,
    ) -> Result<(GuestAddress, usize), RequestError> {
        loop {
            let buf = data
                .get(self.index)
                .ok_or(RequestError::MalformedChain("data shorter than expected"))?;
            let left = buf.len - self.offset;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let take = want.min(left as usize);
            let addr = buf.addr.unchecked_add(u64::from(self.offset));
            // take <= left <= u32::MAX
            self.offset += take as u32;
            return Ok((addr, take));
        }
    }
}
