//! Formatting a new image, and `check`: validate all metadata through the same loader `open`
//! uses, verify every payload, find leaked host space; `repair` writes a fresh checkpoint of the
//! recovered table, rewrites bad superblock copies and punches leaks.

use std::sync::Arc;

use super::alloc::Allocator;
use super::codec::Codecs;
use super::engine::payload_checksum;
use super::format::{self, Layout, Superblock, BLOCK, BLOCK_USIZE, SB_OFFSETS};
use super::recovery::{self, RecoveryMode};
use super::storage::Storage;
use super::table::{lock, Table};
use super::{take_lock, CheckReport, Compression, Geometry, ImageError, LockPolicy, Result, Stats};

fn io(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    move |source| ImageError::Io { op, offset, source }
}

/// Writes an empty image: both superblock copies zeroed (durably), checkpoint 0 (no chunks), a
/// journal starting with marker record 1, an invalid second checkpoint area, then both superblock
/// copies last. Interrupted at any point, the storage holds no valid superblock.
pub fn format_storage(st: &dyn Storage, layout: Layout, compression: Compression) -> Result<()> {
    if st.is_block_device() {
        let cap = st.len().map_err(io("size of device", 0))?;
        if cap < layout.total_len {
            return Err(ImageError::InvalidOption(format!(
                "the device holds {cap} bytes, the image needs {}",
                layout.total_len
            )));
        }
    }
    st.set_len(layout.total_len)
        .map_err(io("set image length", layout.total_len))?;
    let sb = Superblock {
        layout,
        compression,
        uuid: *uuid::Uuid::new_v4().as_bytes(),
    };
    let l = &sb.layout;
    let zero = vec![0u8; BLOCK_USIZE];
    for off in SB_OFFSETS {
        st.write_at(off, &zero)
            .map_err(io("write superblock", off))?;
    }
    // Durable before anything else is written: if the device held an image, a crash from here on
    // must not leave its old superblocks pointing at half-written new metadata.
    st.flush().map_err(io("flush", 0))?;
    st.write_at(l.checkpoint_offsets[1], &zero)
        .map_err(io("write checkpoint header", l.checkpoint_offsets[1]))?;
    let empty = Table::new(l);
    recovery::write_checkpoint(st, &sb, &empty, 0, 0, false)?;
    let mut rec = Vec::new();
    // Nothing can have leaked from a fresh image: its marker says "clean".
    format::encode_record_flags(&mut rec, 1, &sb.uuid, &[], format::RECORD_CLEAN_CLOSE);
    st.write_at(l.journal_offset, &rec)
        .map_err(io("write journal", l.journal_offset))?;
    if st.is_block_device() {
        // Thin-provisioned devices: release whatever an earlier user left in the data area.
        let _ = st.punch_hole(l.data_offset, l.total_len - l.data_offset);
    }
    st.flush().map_err(io("flush", 0))?;
    let block = sb.encode();
    for off in SB_OFFSETS {
        st.write_at(off, &block)
            .map_err(io("write superblock", off))?;
    }
    st.flush().map_err(io("flush", 0))?;
    Ok(())
}

/// Geometry for reports.
pub fn geometry_of(sb: &Superblock) -> Geometry {
    Geometry {
        size: sb.layout.size,
        cluster_size: sb.layout.cluster_size,
        compression: sb.compression,
        uuid: uuid::Uuid::from_bytes(sb.uuid).hyphenated().to_string(),
        format_version: format::FORMAT_VERSION,
    }
}

fn table_stats(table: &Table, layout: &Layout) -> Stats {
    let mut s = Stats {
        logical_bytes: layout.size,
        ..Stats::default()
    };
    let mut units = 0;
    for cell in table.cells.iter() {
        let st = lock(&cell.stripe);
        s.clusters_compressed += st.compressed;
        s.clusters_raw += st.raw;
        units += st.stored_units;
        s.table_ram_bytes += st.ram_bytes();
    }
    s.clusters_zero = layout.cluster_count - s.clusters_compressed - s.clusters_raw;
    s.allocated_logical_bytes =
        (s.clusters_compressed + s.clusters_raw) * u64::from(layout.cluster_size);
    s.stored_bytes = units * BLOCK;
    s.quiesced = true;
    s
}

/// `check` on a storage.
pub fn check_storage(st: Arc<dyn Storage>, repair: bool) -> Result<CheckReport> {
    let st = st.as_ref();
    let mut report = CheckReport::default();
    let sbr = match recovery::read_superblock(st) {
        Ok(s) => s,
        Err(ImageError::CorruptMetadata(m)) => {
            report.corruptions.push(m);
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let sb = sbr.sb;
    let layout = &sb.layout;
    report.geometry = Some(geometry_of(&sb));
    for (k, e) in sbr.copy_errors.iter().enumerate() {
        if let Some(e) = e {
            report
                .corruptions
                .push(format!("superblock copy {k} is invalid: {e}"));
        }
    }
    if repair {
        take_lock(st, LockPolicy::Fail)?;
    }
    let r = check_loaded(st, &sb, repair, &sbr.copy_errors, &mut report);
    if repair {
        let _ = st.unlock();
    }
    r?;
    log::debug!(
        "check of {} clusters: {} corruptions, {} leaked bytes",
        layout.cluster_count,
        report.corruptions.len(),
        report.leaked_bytes
    );
    Ok(report)
}

fn check_loaded(
    st: &dyn Storage,
    sb: &Superblock,
    repair: bool,
    copy_errors: &[Option<String>; 2],
    report: &mut CheckReport,
) -> Result<()> {
    let layout = &sb.layout;
    let mut loaded = match recovery::load_settled(st, sb, RecoveryMode::Lenient) {
        Ok(l) => l,
        Err(ImageError::CorruptMetadata(m)) => {
            report.corruptions.push(m);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    report.warnings.extend(loaded.warnings.iter().cloned());
    let metadata_lost = !loaded.problems.is_empty();
    report.corruptions.extend(loaded.problems.iter().cloned());
    if repair && metadata_lost {
        // Keep the commits recorded after the damage rather than dropping them (and punching
        // their payloads as leaks).
        let salvage = recovery::salvage_after_damage(
            st,
            sb,
            &mut loaded.table,
            loaded.journal_head,
            loaded.last_seq + 1,
        )?;
        report.repairs.extend(salvage.notes);
        report.unrecovered.extend(salvage.lost);
    }
    let table = &loaded.table;
    let alloc = Allocator::new(layout.slot_count());
    let mut slots_ok = true;
    if let Err(e) = recovery::rebuild_allocator(table, &alloc) {
        report.corruptions.push(e);
        slots_ok = false;
    }

    // Every payload: checksum first, then decode to exactly one cluster.
    let cs = layout.cluster_size as usize;
    let mut codecs = Codecs::default();
    let mut stored = vec![0u8; cs];
    let mut out = vec![0u8; cs];
    let mut suspects: Vec<(u32, String)> = Vec::new();
    for c in 0..layout.cluster_count as u32 {
        if table.current(c).is_zero() {
            continue;
        }
        report.clusters_checked += 1;
        if let Err(problem) =
            verify_payload(st, layout, table, c, &mut codecs, &mut stored, &mut out)
        {
            suspects.push((c, problem));
        }
    }
    if !repair && !suspects.is_empty() {
        // Without the writer lock, a running writer may have committed a new version of a
        // cluster and released the old one after the table above was read: such a cluster is
        // not corrupt. Re-read the metadata and verify each suspect's then-current version; a
        // cluster is reported only when its version still fails after a few passes. (A corrupt
        // image costs these few reloads; each reads only the suspects again.)
        for pass in 0..3u32 {
            std::thread::sleep(std::time::Duration::from_millis(20 << pass));
            let Ok(fresh) = recovery::load_settled(st, sb, RecoveryMode::Lenient) else {
                break;
            };
            suspects.retain_mut(|(c, problem)| {
                if fresh.table.current(*c).is_zero() {
                    return false;
                }
                match verify_payload(
                    st,
                    layout,
                    &fresh.table,
                    *c,
                    &mut codecs,
                    &mut stored,
                    &mut out,
                ) {
                    Ok(()) => false,
                    Err(p) => {
                        *problem = p;
                        true
                    }
                }
            });
            if suspects.is_empty() {
                break;
            }
        }
    }
    report
        .corruptions
        .extend(suspects.into_iter().map(|(_, problem)| problem));

    // Leaks: allocated host space in the data area that no entry refers to.
    let leaks = match recovery::unreferenced_ranges(st, layout, table)? {
        Some(leaks) => {
            let bytes: u64 = leaks.iter().map(|(_, l)| l).sum();
            if loaded.clean && loaded.space_unreclaimed {
                // A quiesce (VM pause, migration hand-over) leaves freed space unpunched on
                // purpose and says so in its marker: expected, not a leak.
                report.uncommitted_bytes = bytes;
                if bytes > 0 {
                    report.warnings.push(format!(
                        "the image was quiesced without reclaiming freed space: {bytes} bytes are \
                         referenced by nothing (old versions that were waiting for reuse); the \
                         next read-write open reclaims them"
                    ));
                }
            } else if loaded.clean {
                report.leaked_bytes = bytes;
            } else {
                // After a crash, payloads of writes that never committed are expected to hold
                // space; the next read-write open punches them.
                report.uncommitted_bytes = bytes;
                if bytes > 0 {
                    report.warnings.push(format!(
                        "the image was not closed cleanly: {bytes} bytes are referenced by \
                         nothing (old versions that were waiting for release, and writes that \
                         never committed); the next read-write open reclaims them"
                    ));
                }
            }
            leaks
        }
        None => {
            report
                .warnings
                .push("the storage cannot list allocated ranges: leaks were not measured".into());
            // With --repair, punch everything unreferenced: cheap on holes, and the only way
            // to be sure.
            let used = recovery::used_units(layout, table);
            let mut leaks: Vec<(u64, u64)> = Vec::new();
            let mut pos = layout.data_offset;
            while repair && pos < layout.total_len {
                if !recovery::unit_used(layout, &used, pos) {
                    match leaks.last_mut() {
                        Some((lo, ll)) if *lo + *ll == pos => *ll += BLOCK,
                        _ => leaks.push((pos, BLOCK)),
                    }
                }
                pos += BLOCK;
            }
            leaks
        }
    };
    report.stats = Some(table_stats(table, layout));

    if !repair {
        return Ok(());
    }
    if !slots_ok {
        report.repairs.push(
            "nothing repaired: two clusters share a slot, the table cannot be trusted".into(),
        );
        return Ok(());
    }
    // Numbered above every record still in the journal, so none of them (the damaged cycle's
    // records included) can ever be replayed after the new checkpoint.
    let seq = loaded.last_seq.max(recovery::max_journal_seq(st, sb)?) + 1;
    let area = 1 - loaded.base_area;
    recovery::write_checkpoint(st, sb, table, seq, area, false)?;
    st.flush().map_err(io("flush checkpoint", 0))?;
    // The repaired image is consistent and its leaks are punched below: a clean marker, so the
    // next open does not take it for a crashed one. But writes may have been lost before the
    // repair (a killed backend's completed, unflushed writes; commits the repair could not
    // recover): the marker then keeps the lost-write notice for a guest still running on the
    // image (its next FLUSH fails once), as a crash would have.
    let loss = !loaded.clean || loaded.loss_unreported || !report.unrecovered.is_empty();
    let mut flags = format::RECORD_CLEAN_CLOSE;
    if loss {
        flags |= format::RECORD_LOSS_UNREPORTED;
    }
    let mut rec = Vec::new();
    format::encode_record_flags(&mut rec, seq + 1, &sb.uuid, &[], flags);
    st.write_at(layout.journal_offset, &rec)
        .map_err(io("write journal", layout.journal_offset))?;
    st.flush().map_err(io("flush journal", 0))?;
    report.repairs.push(format!(
        "wrote checkpoint {seq} of the recovered table to area {area}{}",
        if metadata_lost {
            " (the damaged commits' own changes are gone)"
        } else {
            ""
        }
    ));
    if loss {
        report.repairs.push(
            "kept the lost-write notice: a guest still running on this image is told once (its \
             next FLUSH fails) that writes it saw complete may be gone"
                .into(),
        );
    }
    let block = sb.encode();
    for (k, e) in copy_errors.iter().enumerate() {
        if e.is_some() {
            st.write_at(SB_OFFSETS[k], &block)
                .map_err(io("write superblock", SB_OFFSETS[k]))?;
            report.repairs.push(format!("rewrote superblock copy {k}"));
        }
    }
    st.flush().map_err(io("flush", 0))?;
    if !report.unrecovered.is_empty() {
        let bytes: u64 = leaks.iter().map(|(_, l)| l).sum();
        if bytes > 0 {
            report.repairs.push(format!(
                "left {bytes} bytes of unreferenced space in place: they may hold the only copy \
                 of the lost commits' data (a later `check --repair` releases them)"
            ));
        }
        return Ok(());
    }
    let mut punched = 0u64;
    for (o, l) in &leaks {
        st.punch_hole(*o, *l)
            .map_err(io("punch leaked space", *o))?;
        punched += l;
    }
    if punched > 0 {
        st.flush().map_err(io("flush", 0))?;
        report
            .repairs
            .push(format!("released {punched} bytes of unreferenced space"));
    }
    Ok(())
}

/// Reads cluster `c`'s current payload per `table`, verifies its checksum and that it decodes to
/// exactly one cluster; the problem as a sentence otherwise.
fn verify_payload(
    st: &dyn Storage,
    layout: &Layout,
    table: &Table,
    c: u32,
    codecs: &mut Codecs,
    stored: &mut [u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    let e = table.current(c);
    let len = e.units() as usize * BLOCK_USIZE;
    let off = layout.region_offset(e.slot, e.unit());
    let Some(buf) = stored.get_mut(..len) else {
        return Err(format!(
            "cluster {c}: entry claims {len} bytes, more than a cluster"
        ));
    };
    if let Err(err) = st.read_at(off, buf) {
        return Err(format!(
            "cluster {c}: payload at byte {off} unreadable: {err}"
        ));
    }
    let got = payload_checksum(buf);
    if got != e.crc {
        return Err(format!(
            "cluster {c}: payload checksum mismatch in slot {} (stored {:#010x}, computed {got:#010x})",
            e.slot, e.crc
        ));
    }
    codecs
        .decompress(e.alg(), buf, out)
        .map_err(|err| format!("cluster {c}: payload does not decode: {err}"))
}
