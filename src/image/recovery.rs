//! Loading an image: superblock (two copies), newest valid checkpoint, journal replay, free space.
//!
//! One mechanism serves `open` (strict: metadata problems refuse the open), read-only opens and
//! `check` (lenient: problems are collected and reported). Loading writes nothing, so it is
//! idempotent: running it twice on the same bytes gives the same table.

use super::alloc::Allocator;
use super::format::{
    self, CheckpointHeader, DiskEntry, Layout, Superblock, BLOCK, BLOCK_USIZE, DISK_ENTRY_LEN,
    ENTRIES_PER_CHUNK, SB_OFFSETS,
};
use super::storage::Storage;
use super::table::{locate, lock, Entry, Table, STRIPES};
use super::ImageError;
use std::ops::ControlFlow;

/// What strictness a load uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Any sign of lost metadata fails the load (every open).
    Strict,
    /// Load what is valid and report the rest (`check`).
    Lenient,
}

/// Result of reading the two superblock copies.
#[derive(Debug)]
pub struct SuperblockRead {
    /// The superblock in use.
    pub sb: Superblock,
    /// Problems of each copy (`None` = valid).
    pub copy_errors: [Option<String>; 2],
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    move |source| ImageError::Io { op, offset, source }
}

/// Reads and validates the superblock, falling back to the second copy.
pub fn read_superblock(st: &dyn Storage) -> Result<SuperblockRead, ImageError> {
    let len = st.len().map_err(io_err("size of image", 0))?;
    let mut errors: [Option<String>; 2] = [None, None];
    let mut found: Option<Superblock> = None;
    let mut any_magic = false;
    for (k, &off) in SB_OFFSETS.iter().enumerate() {
        if off + BLOCK > len {
            errors[k] = Some("missing (file too short)".into());
            continue;
        }
        let mut b = vec![0u8; BLOCK_USIZE];
        if let Err(e) = st.read_at(off, &mut b) {
            errors[k] = Some(format!("unreadable: {e}"));
            continue;
        }
        any_magic |= Superblock::has_magic(&b);
        match Superblock::decode(&b) {
            Ok(sb) => {
                if found.is_none() {
                    found = Some(sb);
                } else if found.as_ref() != Some(&sb) {
                    errors[k] = Some("valid but differs from copy 0".into());
                }
            }
            Err(e) => errors[k] = Some(e),
        }
    }
    let Some(sb) = found else {
        if !any_magic {
            return Err(ImageError::NotAnImage(
                "no insitu-blk superblock (magic INSITUBK not found)".into(),
            ));
        }
        return Err(ImageError::CorruptMetadata(format!(
            "both superblock copies are invalid: copy 0: {}; copy 1: {}",
            errors[0].as_deref().unwrap_or("?"),
            errors[1].as_deref().unwrap_or("?")
        )));
    };
    if len < sb.layout.total_len {
        return Err(ImageError::CorruptMetadata(format!(
            "image is truncated: {len} bytes, its geometry needs {}",
            sb.layout.total_len
        )));
    }
    if let Some(e) = &errors[0] {
        log::warn!("superblock copy 0 is invalid ({e}); using copy 1");
    }
    Ok(SuperblockRead {
        sb,
        copy_errors: errors,
    })
}

/// A loaded table plus where the journal continues.
#[derive(Debug)]
pub struct Loaded {
    /// The recovered table.
    pub table: Table,
    /// Last commit sequence number applied.
    pub last_seq: u64,
    /// Byte offset inside the journal where the next record goes.
    pub journal_head: u64,
    /// Checkpoint area the table was based on.
    pub base_area: usize,
    /// Sequence numbers of the valid checkpoint headers (for change detection on resume).
    pub area_seqs: [Option<u64>; 2],
    /// Journal records replayed.
    pub records_replayed: u64,
    /// The journal ends with a clean-close marker: no space is left over from uncommitted writes.
    pub clean: bool,
    /// That marker says a loss of unflushed writes (an earlier unclean shutdown) was not yet
    /// reported to the guest ([`format::RECORD_LOSS_UNREPORTED`]).
    pub loss_unreported: bool,
    /// That marker says the image may hold space no entry refers to (a quiesce left freed
    /// regions unpunched, [`format::RECORD_SPACE_UNRECLAIMED`]).
    pub space_unreclaimed: bool,
    /// Harmless findings (e.g. a torn inactive checkpoint).
    pub warnings: Vec<String>,
    /// Problems tolerated in lenient mode.
    pub problems: Vec<String>,
}

/// Reads a checkpoint header (None when the area holds no valid header).
pub fn read_checkpoint_header(
    st: &dyn Storage,
    sb: &Superblock,
    area: usize,
) -> Result<CheckpointHeader, String> {
    let mut b = vec![0u8; BLOCK_USIZE];
    st.read_at(sb.layout.checkpoint_offsets[area], &mut b)
        .map_err(|e| format!("unreadable: {e}"))?;
    let h = CheckpointHeader::decode(&b, &sb.layout, &sb.uuid)?;
    if h.seq > MAX_SEQ {
        return Err(format!(
            "commit number {} is beyond any reachable one ({MAX_SEQ})",
            h.seq
        ));
    }
    Ok(h)
}

/// No image commits 2^62 times (a commit a microsecond for 146,000 years): a larger checkpoint
/// sequence number is damage, and refusing it keeps every `seq + n` below overflow.
pub const MAX_SEQ: u64 = 1 << 62;

fn load_checkpoint(
    st: &dyn Storage,
    sb: &Superblock,
    area: usize,
    h: &CheckpointHeader,
) -> Result<Table, String> {
    let layout = &sb.layout;
    let mut table = Table::new(layout);
    let base = layout.checkpoint_offsets[area] + BLOCK;
    let max_chunks = layout.chunk_count();
    const BATCH: u64 = 256;
    let mut buf = vec![0u8; (BATCH * BLOCK) as usize];
    let mut next_min: u64 = 0;
    let mut done = 0u64;
    while done < h.chunk_count {
        let n = (h.chunk_count - done).min(BATCH);
        let bytes = &mut buf[..(n * BLOCK) as usize];
        st.read_at(base + done * BLOCK, bytes)
            .map_err(|e| format!("chunk {done} unreadable: {e}"))?;
        for k in 0..n as usize {
            let chunk = &bytes[k * BLOCK_USIZE..(k + 1) * BLOCK_USIZE];
            let index = u64::from(
                format::open_chunk(chunk, h.seq)
                    .map_err(|e| format!("chunk {}: {e}", done + k as u64))?,
            );
            if index < next_min || index >= max_chunks {
                return Err(format!(
                    "chunk {} has index {index} out of order or range",
                    done + k as u64
                ));
            }
            next_min = index + 1;
            for j in 0..ENTRIES_PER_CHUNK {
                let c = index * ENTRIES_PER_CHUNK + j;
                let at = 16 + j as usize * DISK_ENTRY_LEN;
                let raw = &chunk[at..at + DISK_ENTRY_LEN];
                if c >= layout.cluster_count {
                    if raw.iter().any(|&b| b != 0) {
                        return Err(format!("entry beyond the last cluster in chunk {index}"));
                    }
                    continue;
                }
                let d = DiskEntry::decode(raw, layout).map_err(|e| format!("cluster {c}: {e}"))?;
                if d.alg != format::alg::ZERO {
                    table.load_set(c as u32, Entry::from_disk(&d));
                }
            }
        }
        done += n;
    }
    Ok(table)
}

struct Replay {
    last_flags: u32,
    last_seq: u64,
    head: u64,
    records: u64,
    lost: Option<String>,
}

fn replay(
    st: &dyn Storage,
    sb: &Superblock,
    table: &mut Table,
    base_seq: u64,
) -> Result<Replay, ImageError> {
    let layout = &sb.layout;
    let mut pos = 0u64;
    let mut expected = base_seq + 1;
    let mut records = 0u64;
    let mut lost = None;
    let mut last_flags = 0;
    let mut rec = Vec::new();
    while pos + BLOCK <= layout.journal_size {
        let mut first = vec![0u8; BLOCK_USIZE];
        st.read_at(layout.journal_offset + pos, &mut first)
            .map_err(io_err("read journal", layout.journal_offset + pos))?;
        let Ok(h) = format::decode_record_header(&first, &sb.uuid, layout.journal_size - pos)
        else {
            break;
        };
        if h.seq < expected {
            break;
        }
        let len = u64::from(h.block_count) * BLOCK;
        rec.clear();
        rec.resize(len as usize, 0);
        rec[..BLOCK_USIZE].copy_from_slice(&first);
        if len > BLOCK {
            st.read_at(layout.journal_offset + pos + BLOCK, &mut rec[BLOCK_USIZE..])
                .map_err(io_err("read journal", layout.journal_offset + pos))?;
        }
        let Ok(entries) = format::decode_record_entries(&rec, &h, layout) else {
            break;
        };
        if h.seq > expected {
            lost = Some(format!(
                "the journal continues at commit {} but the checkpoint in use ends at commit {}: \
                 a newer checkpoint was lost",
                h.seq,
                expected - 1
            ));
            break;
        }
        for (c, d) in entries {
            table.load_set(c, Entry::from_disk(&d));
        }
        pos += len;
        expected += 1;
        records += 1;
        last_flags = h.flags;
    }
    if lost.is_none() {
        lost = later_valid_record(st, sb, pos + BLOCK, expected)?;
    }
    Ok(Replay {
        last_flags,
        last_seq: expected - 1,
        head: pos,
        records,
        lost,
    })
}

/// Visits, in journal order, every valid record that starts at or after journal byte `from`
/// and whose sequence number is at least `min_seq`, with its byte position and its changes.
/// Blocks that do not start a valid record are skipped one by one (a damaged record's remains,
/// stale bytes of earlier cycles); a valid record is skipped as a whole. Reads in batches: the
/// scan runs at every open after replay stops.
fn scan_valid_records(
    st: &dyn Storage,
    sb: &Superblock,
    from: u64,
    min_seq: u64,
    mut visit: impl FnMut(u64, u64, Vec<(u32, DiskEntry)>) -> ControlFlow<()>,
) -> Result<(), ImageError> {
    let layout = &sb.layout;
    const BATCH: u64 = 256;
    let mut batch = vec![0u8; (BATCH * BLOCK) as usize];
    // Journal bytes [batch_start, batch_end) are in `batch`.
    let (mut batch_start, mut batch_end) = (0u64, 0u64);
    let mut rec = Vec::new();
    let mut pos = from;
    while pos + BLOCK <= layout.journal_size {
        if pos < batch_start || pos + BLOCK > batch_end {
            let n = ((layout.journal_size - pos) / BLOCK).min(BATCH);
            let bytes = &mut batch[..(n * BLOCK) as usize];
            st.read_at(layout.journal_offset + pos, bytes)
                .map_err(io_err("read journal", layout.journal_offset + pos))?;
            (batch_start, batch_end) = (pos, pos + n * BLOCK);
        }
        let in_batch = (pos - batch_start) as usize;
        let first = &batch[in_batch..in_batch + BLOCK_USIZE];
        let Ok(h) = format::decode_record_header(first, &sb.uuid, layout.journal_size - pos) else {
            pos += BLOCK;
            continue;
        };
        let len = u64::from(h.block_count) * BLOCK;
        rec.clear();
        rec.resize(len as usize, 0);
        st.read_at(layout.journal_offset + pos, &mut rec)
            .map_err(io_err("read journal", layout.journal_offset + pos))?;
        let Ok(entries) = format::decode_record_entries(&rec, &h, layout) else {
            pos += BLOCK;
            continue;
        };
        if h.seq >= min_seq && visit(pos, h.seq, entries).is_break() {
            break;
        }
        pos += len;
    }
    Ok(())
}

/// Looks past the point where replay stopped for a valid record of this journal cycle (seq >=
/// `expected`). A crash cannot produce one: every record is durable before the next is written,
/// and records of earlier cycles carry smaller sequence numbers. Finding one means a record in
/// the middle was damaged after it became durable, and the commits after it would be silently
/// lost.
fn later_valid_record(
    st: &dyn Storage,
    sb: &Superblock,
    from: u64,
    expected: u64,
) -> Result<Option<String>, ImageError> {
    let mut found = None;
    scan_valid_records(st, sb, from, expected, |at, seq, _| {
        found = Some(format!(
            "journal record for commit {seq} at journal offset {at} follows a damaged record \
             (replay stopped before commit {expected}): committed data would be lost"
        ));
        ControlFlow::Break(())
    })?;
    Ok(found)
}

/// A journal record's sequence number and its (cluster, entry) changes.
type SeqRecord = (u64, Vec<(u32, DiskEntry)>);

/// Every valid record of the journal at or after byte `from` with a sequence number of at least
/// `expected`, in sequence order.
fn valid_records_from(
    st: &dyn Storage,
    sb: &Superblock,
    from: u64,
    expected: u64,
) -> Result<Vec<SeqRecord>, ImageError> {
    let mut found = Vec::new();
    scan_valid_records(st, sb, from, expected, |_, seq, entries| {
        found.push((seq, entries));
        ControlFlow::Continue(())
    })?;
    found.sort_by_key(|(seq, _)| *seq);
    Ok(found)
}

/// The largest sequence number of any valid record in the journal (0 when none): a repair
/// numbers its checkpoint above it, so no stale record can ever continue the new sequence.
pub fn max_journal_seq(st: &dyn Storage, sb: &Superblock) -> Result<u64, ImageError> {
    Ok(valid_records_from(st, sb, 0, 0)?
        .last()
        .map_or(0, |(seq, _)| *seq))
}

/// What [`salvage_after_damage`] did, as sentences for the repair report.
pub struct Salvage {
    /// Sentences for the report.
    pub notes: Vec<String>,
    /// Commits no record is left of (inclusive ranges of sequence numbers), as a sentence each.
    pub lost: Vec<String>,
}

/// The sequence numbers in `expected..=last` that `found` (sorted) lacks, as inclusive ranges.
fn missing_seqs(expected: u64, found: &[u64]) -> Vec<(u64, u64)> {
    let mut gaps = Vec::new();
    let mut next = expected;
    for &seq in found {
        if seq > next {
            gaps.push((next, seq - 1));
        }
        next = next.max(seq + 1);
    }
    gaps
}

/// `check --repair` of a journal with a damaged record in the middle (replay stopped at byte
/// `damaged_at`, expecting commit `expected`): applies the valid records that follow it, in
/// sequence order, instead of dropping the commits they describe (their payloads are intact;
/// only the damaged record's own changes are gone). A cluster whose last known version shares a
/// slot with a newer version of another cluster lost its data when that slot was reused: it
/// becomes a zero cluster, and the report names it.
pub fn salvage_after_damage(
    st: &dyn Storage,
    sb: &Superblock,
    table: &mut Table,
    damaged_at: u64,
    expected: u64,
) -> Result<Salvage, ImageError> {
    let records = valid_records_from(st, sb, damaged_at, expected)?;
    let mut notes = Vec::new();
    if records.is_empty() {
        return Ok(Salvage {
            notes,
            lost: Vec::new(),
        });
    }
    let seqs: Vec<u64> = records.iter().map(|(seq, _)| *seq).collect();
    let lost = missing_seqs(expected, &seqs)
        .into_iter()
        .map(|(a, b)| {
            let which = if a == b {
                format!("commit {a} is")
            } else {
                format!("commits {a} to {b} are")
            };
            format!(
                "{which} lost (no valid journal record or checkpoint is left of them): the \
                 clusters they changed read an older version or zeros"
            )
        })
        .collect();
    // Newest writer of each cluster: the record's seq (older state: 0).
    let mut newest: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for (seq, entries) in &records {
        for (c, d) in entries {
            table.load_set(*c, Entry::from_disk(d));
            newest.insert(*c, *seq);
        }
    }
    notes.push(format!(
        "applied {} journal records past the damaged one (commits {} to {})",
        records.len(),
        records[0].0,
        records[records.len() - 1].0
    ));
    // Slot owners: keep the most recently written cluster of each slot.
    let mut owner: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    let mut zeroed = Vec::new();
    for c in 0..table.cluster_count as u32 {
        let e = table.current(c);
        if e.is_zero() {
            continue;
        }
        let seq_of = |x: u32| newest.get(&x).copied().unwrap_or(0);
        match owner.get(&e.slot).copied() {
            None => {
                owner.insert(e.slot, c);
            }
            Some(other) => {
                let (keep, lose) = if seq_of(c) > seq_of(other) {
                    (c, other)
                } else {
                    (other, c)
                };
                owner.insert(e.slot, keep);
                zeroed.push(lose);
            }
        }
    }
    for &c in &zeroed {
        table.load_set(c, Entry::ZERO);
    }
    if !zeroed.is_empty() {
        let shown: Vec<String> = zeroed.iter().take(16).map(u32::to_string).collect();
        notes.push(format!(
            "{} clusters lost their data with the damaged record (their space was reused by later \
             commits) and now read as zeros: {}{}",
            zeroed.len(),
            shown.join(", "),
            if zeroed.len() > 16 { ", ..." } else { "" }
        ));
    }
    Ok(Salvage { notes, lost })
}

/// Marks every stored cluster's slot used. Fails naming a slot two clusters claim.
pub fn rebuild_allocator(table: &Table, alloc: &Allocator) -> Result<(), String> {
    alloc.reset();
    for (s, cell) in table.cells.iter().enumerate() {
        let stripe = lock(&cell.stripe);
        let mut i = 0usize;
        loop {
            let c = (i * STRIPES + s) as u64;
            if c >= table.cluster_count {
                break;
            }
            let e = stripe.get(i);
            if !e.is_zero() && !alloc.mark_used(e.slot) {
                return Err(format!(
                    "slot {} is claimed by cluster {c} and by another cluster",
                    e.slot
                ));
            }
            i += 1;
        }
    }
    Ok(())
}

/// [`load`] for a reader that does not hold the writer lock (`info`, read-only opens, `check`):
/// a writer running meanwhile can make one pass read a half-written journal record followed by
/// a complete one, or checkpoint headers from before and a journal from after a checkpoint. The
/// writer's durable state is consistent at every moment, so such a pass is retried a few times;
/// only a problem that persists is reported. (An image that is really damaged costs these few
/// retries, well under a second.)
pub fn load_settled(
    st: &dyn Storage,
    sb: &Superblock,
    mode: RecoveryMode,
) -> Result<Loaded, ImageError> {
    const RETRIES: u32 = 5;
    let mut attempt = 0;
    loop {
        let r = load(st, sb, mode);
        let unsettled = match &r {
            Err(ImageError::CorruptMetadata(_)) => true,
            Ok(l) => !l.problems.is_empty(),
            Err(_) => false,
        };
        if !unsettled || attempt == RETRIES {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_millis(10 << attempt));
        attempt += 1;
    }
}

/// Loads the table: newest valid checkpoint, then the journal records that follow it.
pub fn load(st: &dyn Storage, sb: &Superblock, mode: RecoveryMode) -> Result<Loaded, ImageError> {
    let headers = [
        read_checkpoint_header(st, sb, 0),
        read_checkpoint_header(st, sb, 1),
    ];
    let area_seqs = [
        headers[0].as_ref().ok().map(|h| h.seq),
        headers[1].as_ref().ok().map(|h| h.seq),
    ];
    let mut order: Vec<usize> = (0..2).filter(|&k| headers[k].is_ok()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(area_seqs[k]));
    let mut warnings = Vec::new();
    let mut problems = Vec::new();
    for (k, h) in headers.iter().enumerate() {
        if let Err(e) = h {
            warnings.push(format!("checkpoint area {k}: {e}"));
        }
    }
    let mut chosen = None;
    for &k in &order {
        let Ok(h) = &headers[k] else { continue };
        match load_checkpoint(st, sb, k, h) {
            Ok(t) => {
                chosen = Some((k, h.seq, t));
                break;
            }
            Err(e) => {
                let msg = format!("checkpoint area {k} (commit {}) is invalid: {e}", h.seq);
                log::warn!("{msg}; falling back to the other area");
                warnings.push(msg);
            }
        }
    }
    let Some((area, seq, mut table)) = chosen else {
        return Err(ImageError::CorruptMetadata(format!(
            "no valid checkpoint: {}",
            warnings.join("; ")
        )));
    };
    let r = replay(st, sb, &mut table, seq)?;
    if let Some(lost) = r.lost {
        if mode == RecoveryMode::Strict {
            return Err(ImageError::CorruptMetadata(if warnings.is_empty() {
                lost
            } else {
                format!("{lost} ({})", warnings.join("; "))
            }));
        }
        problems.push(lost);
    }
    Ok(Loaded {
        table,
        last_seq: r.last_seq,
        journal_head: r.head,
        base_area: area,
        area_seqs,
        records_replayed: r.records,
        clean: r.records > 0 && r.last_flags & format::RECORD_CLEAN_CLOSE != 0,
        loss_unreported: r.records > 0
            && r.last_flags & format::RECORD_CLEAN_CLOSE != 0
            && r.last_flags & format::RECORD_LOSS_UNREPORTED != 0,
        space_unreclaimed: r.records > 0
            && r.last_flags & format::RECORD_CLEAN_CLOSE != 0
            && r.last_flags & format::RECORD_SPACE_UNRECLAIMED != 0,
        warnings,
        problems,
    })
}

/// Chunks written per batch (1 MiB).
const CHUNK_BATCH: u64 = 256;
/// Chunks a checkpoint written ahead writes per step between commits (256 KiB: a FLUSH arriving
/// meanwhile waits well under a millisecond for it).
const AHEAD_BATCH: u64 = 64;

/// How the chunks of one checkpoint are made.
struct ChunkSealer<'a> {
    table: &'a Table,
    layout: &'a Layout,
    /// The checkpoint's seq, sealed into every chunk.
    seq: u64,
    /// Each cluster's committed entry (else its current one).
    committed: bool,
    /// All-zero chunks are left out.
    sparse: bool,
}

impl ChunkSealer<'_> {
    /// The entries of chunks `first_chunk .. first_chunk + n_chunks`, sealed into `buf` (one
    /// block each, in index order). Returns how many chunks `buf` holds.
    fn seal(
        &self,
        first_chunk: u64,
        n_chunks: u64,
        entries: &mut [Entry],
        buf: &mut [u8],
    ) -> usize {
        let (table, layout, seq, committed, sparse) = (
            self.table,
            self.layout,
            self.seq,
            self.committed,
            self.sparse,
        );
        let first = first_chunk * ENTRIES_PER_CHUNK;
        let last = ((first_chunk + n_chunks) * ENTRIES_PER_CHUNK).min(layout.cluster_count);
        entries.fill(Entry::ZERO);
        for (s, cell) in table.cells.iter().enumerate() {
            let stripe = lock(&cell.stripe);
            let s = s as u64;
            let mut c = first + (s + STRIPES as u64 - first % STRIPES as u64) % STRIPES as u64;
            while c < last {
                let (_, i) = locate(c as u32);
                entries[(c - first) as usize] = if committed {
                    stripe.committed_view(c as u32, i)
                } else {
                    stripe.get(i)
                };
                c += STRIPES as u64;
            }
        }
        let mut p = 0usize;
        for k in 0..n_chunks as usize {
            let es = &entries[k * ENTRIES_PER_CHUNK as usize..(k + 1) * ENTRIES_PER_CHUNK as usize];
            if sparse && es.iter().all(|e| e.is_zero()) {
                continue;
            }
            let chunk = &mut buf[p * BLOCK_USIZE..(p + 1) * BLOCK_USIZE];
            chunk.fill(0);
            for (j, e) in es.iter().enumerate() {
                let at = 16 + j * DISK_ENTRY_LEN;
                e.to_disk().encode(&mut chunk[at..at + DISK_ENTRY_LEN]);
            }
            format::seal_chunk(chunk, seq, (first_chunk + k as u64) as u32);
            p += 1;
        }
        p
    }
}

fn write_checkpoint_header(
    st: &dyn Storage,
    sb: &Superblock,
    area: usize,
    seq: u64,
    chunk_count: u64,
) -> Result<(), ImageError> {
    let base = sb.layout.checkpoint_offsets[area];
    let header = CheckpointHeader { seq, chunk_count }.encode(&sb.layout, &sb.uuid);
    st.write_at(base, &header)
        .map_err(io_err("write checkpoint header", base))
}

/// Writes a checkpoint of `view` (the committed entry of each cluster) into `area`: chunks that
/// hold a non-zero entry, then the header. Does not flush.
pub fn write_checkpoint(
    st: &dyn Storage,
    sb: &Superblock,
    table: &Table,
    seq: u64,
    area: usize,
    committed: bool,
) -> Result<(), ImageError> {
    let layout: &Layout = &sb.layout;
    let base = layout.checkpoint_offsets[area];
    let total_chunks = layout.chunk_count();
    let mut entries = vec![Entry::ZERO; (CHUNK_BATCH * ENTRIES_PER_CHUNK) as usize];
    let mut buf = vec![0u8; (CHUNK_BATCH * BLOCK) as usize];
    let mut written = 0u64;
    let mut first_chunk = 0u64;
    while first_chunk < total_chunks {
        let n_chunks = (total_chunks - first_chunk).min(CHUNK_BATCH);
        let sealer = ChunkSealer {
            table,
            layout,
            seq,
            committed,
            sparse: true,
        };
        let p = sealer.seal(first_chunk, n_chunks, &mut entries, &mut buf);
        if p > 0 {
            let off = base + BLOCK + written * BLOCK;
            st.write_at(off, &buf[..p * BLOCK_USIZE])
                .map_err(io_err("write checkpoint", off))?;
            written += p as u64;
        }
        first_chunk += n_chunks;
    }
    write_checkpoint_header(st, sb, area, seq, written)
}

/// A checkpoint written ahead of need, a few chunks at a time between commits, so that a full
/// journal does not make a commit write the whole table while FLUSHes wait (known limit R16).
///
/// It is *dense*: every chunk is written, at the position of its index, so that any chunk can be
/// written again after a commit changed it (a sparse checkpoint's positions shift when a chunk
/// turns zero or non-zero). Its chunks carry a seq reserved beyond every record the journal can
/// take meanwhile; the commit that finishes it takes that seq (sequence numbers only have to
/// grow: recovery follows the journal from the checkpoint's seq on). Until its header is written,
/// the area's old header names an older seq than its new chunks, so a crash meanwhile leaves
/// that area invalid and recovery uses the other one, exactly as during a checkpoint written in
/// one go.
#[derive(Debug)]
pub struct CheckpointAhead {
    /// The seq the checkpoint will carry.
    pub seq: u64,
    /// The area it is written into (the one not holding the newest checkpoint).
    pub area: usize,
    /// Chunks `0 .. next` were written once.
    next: u64,
    /// Chunks written, then changed by a commit: to write again.
    dirty: Vec<u64>,
    dirty_count: u64,
}

impl CheckpointAhead {
    pub fn new(layout: &Layout, seq: u64, area: usize) -> Self {
        let chunks = layout.chunk_count();
        Self {
            seq,
            area,
            next: 0,
            dirty: vec![0; chunks.div_ceil(64) as usize],
            dirty_count: 0,
        }
    }

    /// A commit changed cluster `c`: its chunk is written again if it was written already.
    pub fn changed(&mut self, c: u32) {
        let chunk = u64::from(c) / ENTRIES_PER_CHUNK;
        if chunk >= self.next {
            return;
        }
        if let Some(word) = self.dirty.get_mut((chunk / 64) as usize) {
            let bit = 1u64 << (chunk % 64);
            if *word & bit == 0 {
                *word |= bit;
                self.dirty_count += 1;
            }
        }
    }

    /// Chunks still to write (never written, or written and changed since).
    pub fn remaining(&self, layout: &Layout) -> u64 {
        layout.chunk_count() - self.next + self.dirty_count
    }

    /// Writes the next batch: chunks never written first, then changed ones. Does not flush.
    /// Returns the chunks written.
    pub fn step(
        &mut self,
        st: &dyn Storage,
        sb: &Superblock,
        table: &Table,
    ) -> Result<u64, ImageError> {
        let layout = &sb.layout;
        let total = layout.chunk_count();
        if self.next < total {
            let n = (total - self.next).min(AHEAD_BATCH);
            self.write_run(st, sb, table, self.next, n)?;
            self.next += n;
            return Ok(n);
        }
        let mut written = 0;
        while written < AHEAD_BATCH && self.dirty_count > 0 {
            let Some((start, len)) = self.take_dirty_run(AHEAD_BATCH - written) else {
                break;
            };
            self.write_run(st, sb, table, start, len)?;
            written += len;
        }
        Ok(written)
    }

    /// Writes every chunk still to write. The caller makes them durable *before* it writes the
    /// header ([`Self::write_header`]): a chunk written again carries the same seq as its earlier
    /// version, so a header that reached the disk without it would validate a stale chunk (a
    /// checkpoint written in one go needs no such flush: the chunks it replaces carry another
    /// seq, and a torn one is refused).
    pub fn write_remaining(
        &mut self,
        st: &dyn Storage,
        sb: &Superblock,
        table: &Table,
    ) -> Result<(), ImageError> {
        while self.remaining(&sb.layout) > 0 {
            self.step(st, sb, table)?;
        }
        Ok(())
    }

    /// Writes the header naming every chunk (see [`Self::write_remaining`]). Does not flush.
    pub fn write_header(&self, st: &dyn Storage, sb: &Superblock) -> Result<(), ImageError> {
        write_checkpoint_header(st, sb, self.area, self.seq, sb.layout.chunk_count())
    }

    /// The first run of consecutive changed chunks (at most `max`), cleared from the set.
    fn take_dirty_run(&mut self, max: u64) -> Option<(u64, u64)> {
        let word = self.dirty.iter().position(|&w| w != 0)?;
        let start = word as u64 * 64 + u64::from(self.dirty[word].trailing_zeros());
        let mut len = 0;
        while len < max {
            let chunk = start + len;
            let Some(w) = self.dirty.get_mut((chunk / 64) as usize) else {
                break;
            };
            let bit = 1u64 << (chunk % 64);
            if *w & bit == 0 {
                break;
            }
            *w &= !bit;
            self.dirty_count -= 1;
            len += 1;
        }
        Some((start, len))
    }

    fn write_run(
        &self,
        st: &dyn Storage,
        sb: &Superblock,
        table: &Table,
        first_chunk: u64,
        n_chunks: u64,
    ) -> Result<(), ImageError> {
        let layout = &sb.layout;
        let mut entries = vec![Entry::ZERO; (n_chunks * ENTRIES_PER_CHUNK) as usize];
        let mut buf = vec![0u8; (n_chunks * BLOCK) as usize];
        let sealer = ChunkSealer {
            table,
            layout,
            seq: self.seq,
            // Never the current entries: a version published after the snapshot of the commit
            // that finishes this checkpoint is covered by no commit, and a rewrite frees and
            // reuses its units at once (docs/FORMAT.md, "Checkpoints written ahead of need").
            committed: true,
            sparse: false,
        };
        let p = sealer.seal(first_chunk, n_chunks, &mut entries, &mut buf);
        let off = layout.checkpoint_offsets[self.area] + BLOCK + first_chunk * BLOCK;
        st.write_at(off, &buf[..p * BLOCK_USIZE])
            .map_err(io_err("write checkpoint", off))?;
        // On its way to the disk now: the flush that finishes the checkpoint, inside a commit,
        // then finds little left to write. A hint: its failure only costs that commit time.
        let _ = st.start_writeback(off, (p * BLOCK_USIZE) as u64);
        Ok(())
    }
}

/// Ranges of the data area that hold allocated host space no entry of `table` refers to (4 KiB
/// granularity, merged), or `None` when the storage cannot list allocated ranges.
pub fn unreferenced_ranges(
    st: &dyn Storage,
    layout: &Layout,
    table: &Table,
) -> Result<Option<Vec<(u64, u64)>>, ImageError> {
    let data_len = layout.total_len - layout.data_offset;
    let Some(ranges) = st
        .allocated_ranges(layout.data_offset, data_len)
        .map_err(io_err("list allocated ranges", layout.data_offset))?
    else {
        return Ok(None);
    };
    let used = used_units(layout, table);
    let mut leaks: Vec<(u64, u64)> = Vec::new();
    for (o, l) in ranges {
        let mut pos = o.max(layout.data_offset) / BLOCK * BLOCK;
        while pos < o + l {
            if !unit_used(layout, &used, pos) {
                match leaks.last_mut() {
                    Some((lo, ll)) if *lo + *ll == pos => *ll += BLOCK,
                    _ => leaks.push((pos, BLOCK)),
                }
            }
            pos += BLOCK;
        }
    }
    Ok(Some(leaks))
}

/// Per slot, the mask of units the table's entries occupy.
pub fn used_units(layout: &Layout, table: &Table) -> Vec<u32> {
    let mut used = vec![0u32; layout.slot_count() as usize];
    table.for_each_stored(|_, e| {
        if let Some(m) = used.get_mut(e.slot as usize) {
            *m |= e.mask();
        }
    });
    used
}

/// Whether the unit at byte `off` (inside the data area) is occupied per `used`.
pub fn unit_used(layout: &Layout, used: &[u32], off: u64) -> bool {
    let rel = off - layout.data_offset;
    let slot = (rel / u64::from(layout.cluster_size)) as usize;
    let u = ((rel % u64::from(layout.cluster_size)) / BLOCK) as u32;
    used.get(slot).is_some_and(|m| m & (1 << u) != 0)
}

#[cfg(test)]
mod tests {
    use super::missing_seqs;

    #[test]
    fn missing_seqs_names_every_gap() {
        assert_eq!(missing_seqs(5, &[6, 7, 8]), vec![(5, 5)]);
        assert_eq!(
            missing_seqs(1, &[88, 89, 258, 259]),
            vec![(1, 87), (90, 257)]
        );
        assert_eq!(missing_seqs(3, &[3, 4]), Vec::<(u64, u64)>::new());
        assert_eq!(missing_seqs(3, &[]), Vec::<(u64, u64)>::new());
    }
}
