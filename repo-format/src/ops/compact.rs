//! `compact`: remove blobs no snapshot references.
//!
//! Order of writes, so that a crash at any point loses nothing: (1) repack the live blobs of
//! packs with too much garbage into new packs; (2) write one index file covering every kept and
//! new pack, superseding all existing index files; (3) delete the old index files; (4) delete
//! packs that are garbage, repacked, or were never indexed. Until (2) the new packs are merely
//! unindexed; after it the old packs merely unreferenced. Runs under an exclusive lock, so no
//! writer's unindexed pack is mistaken for garbage, and what interrupted writes left (a pack
//! half-staged when its writer was killed) can go too.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Location;
use crate::repofile::index::IndexFile;
use crate::repofile::pack::{self, PackEntry};
use crate::repofile::{self as rf};
use crate::repository::Repository;

use super::{Repacker, referenced_blobs, snapshot_roots, write_index};

/// Tuning.
#[derive(Clone, Copy, Debug)]
pub struct CompactOptions {
    /// Repack a pack when more than this fraction of its bytes is garbage (0.0..=1.0).
    pub max_garbage: f64,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions { max_garbage: 0.10 }
    }
}

/// What compact did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Packs deleted (garbage, repacked or unindexed).
    pub packs_deleted: usize,
    /// Packs whose live blobs were copied.
    pub packs_repacked: usize,
    /// New packs written.
    pub packs_written: usize,
    /// Blob entries dropped from the index.
    pub blobs_removed: usize,
    /// Stored bytes freed (net), leftovers included.
    pub bytes_freed: u64,
    /// Leftovers of interrupted writes removed (temporary files of the local backend).
    pub leftovers_removed: usize,
}

/// Compact the repository (take an exclusive lock first).
pub fn compact(repo: &mut Repository, opts: CompactOptions) -> Result<CompactReport> {
    repo.load_index()?;
    let used = referenced_blobs(repo, &snapshot_roots(repo)?)?;
    if let Some(missing) = used.iter().find(|id| !repo.index().contains(id)) {
        return Err(Error::corrupt(
            format!("blob {missing}"),
            "is referenced by a snapshot but not in the index; run `collector check` before compacting",
        ));
    }
    let stored: std::collections::HashMap<Id, u64> = repo
        .backend()
        .list(rf::DATA_DIR)?
        .into_iter()
        .filter_map(|o| rf::id_of_name(&o.name).map(|id| (id, o.size)))
        .collect();

    // Group index entries by pack.
    let mut by_pack: std::collections::BTreeMap<Id, Vec<PackEntry>> = Default::default();
    for loc in repo.index().iter() {
        by_pack.entry(loc.pack).or_default().push(loc.entry);
    }
    let mut report = CompactReport::default();
    // Not in locks/: a process asking for a lock meanwhile writes its lock file there first.
    for folder in [rf::DATA_DIR, rf::INDEX_DIR, rf::SNAPSHOT_DIR, rf::DICT_DIR] {
        let (count, bytes) = repo.backend().remove_leftovers(folder)?;
        report.leftovers_removed += count;
        report.bytes_freed += bytes;
    }
    let mut keep: Vec<(Id, Vec<PackEntry>)> = Vec::new();
    let mut repack: Vec<(Id, Vec<PackEntry>)> = Vec::new();
    let mut delete: Vec<Id> = Vec::new();
    let mut kept_ids: HashSet<Id> = HashSet::new();
    for (pack, entries) in by_pack {
        let total: u64 = entries.iter().map(|e| e.stored_len as u64).sum();
        let live: u64 = entries.iter().filter(|e| used.contains(&e.id)).map(|e| e.stored_len as u64).sum();
        if live == 0 {
            report.blobs_removed += entries.len();
            delete.push(pack);
        } else if (total - live) as f64 > opts.max_garbage * total as f64 {
            repack.push((pack, entries));
        } else {
            kept_ids.extend(entries.iter().map(|e| e.id));
            keep.push((pack, entries));
        }
    }

    let mut repacker = Repacker::new(repo);
    for (pack, entries) in &repack {
        let name = rf::pack_name(pack);
        let bytes = repo.backend().get(&name, None)?;
        for e in entries {
            if !used.contains(&e.id) || !kept_ids.insert(e.id) {
                report.blobs_removed += 1;
                continue;
            }
            let sealed =
                pack::blob_bytes(&bytes, e).ok_or_else(|| Error::corrupt(&name, "shorter than its index says"))?;
            // Never carry damage into a new pack unnoticed.
            repo.decode_blob(&Location { pack: *pack, entry: *e }, sealed, pack::Check::Id)?;
            repacker.add(e, sealed)?;
        }
        delete.push(*pack);
        report.packs_repacked += 1;
    }
    repacker.flush()?;
    report.packs_written = repacker.written.len();

    let indexed: HashSet<Id> = repo.index().packs().iter().copied().collect();
    let written_ids: HashSet<Id> = repacker.written.iter().map(|(id, _)| *id).collect();
    delete.extend(stored.keys().copied().filter(|id| !indexed.contains(id) && !written_ids.contains(id)));
    if delete.is_empty() && repack.is_empty() {
        return Ok(report);
    }

    let old_index = crate::repository::ids_in(&**repo.backend(), rf::INDEX_DIR)?;
    let written: u64 = repacker.written.iter().flat_map(|(_, e)| e).map(|e| e.stored_len as u64).sum();
    let file = IndexFile { supersedes: old_index.clone(), packs: keep.into_iter().chain(repacker.written).collect() };
    let new_index = write_index(repo, &file)?;
    for id in old_index.iter().filter(|id| **id != new_index) {
        repo.backend().delete(&format!("{}{id}", rf::INDEX_DIR))?;
    }
    let mut freed = 0u64;
    for pack in &delete {
        freed += stored.get(pack).copied().unwrap_or(0);
        repo.backend().delete(&rf::pack_name(pack))?;
    }
    report.packs_deleted = delete.len();
    report.bytes_freed += freed.saturating_sub(written);
    repo.load_index()?;
    Ok(report)
}
