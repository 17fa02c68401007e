//! `check --repair`: rebuild the index from the packs themselves and say exactly what is lost.
//!
//! Writes in the same safe order as compact: salvage packs first, then one new index superseding
//! all others, then deletions. Packs whose header cannot be read are left in place (compact
//! removes them) and their blobs counted as lost; with `verify_data`, a pack with damaged blobs
//! has its intact blobs copied to a new pack and is then removed.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::magic::Domain;
use crate::repofile::index::IndexFile;
use crate::repofile::pack::{self, PackEntry};
use crate::repofile::tree::NodeKind;
use crate::repofile::{self as rf};
use crate::repository::Repository;

use super::{Repacker, write_index};

/// What repair did and what cannot be saved.
#[derive(Clone, Debug, Default)]
pub struct RepairReport {
    /// Packs in the new index.
    pub packs_indexed: usize,
    /// Packs whose header could not be read: all their blobs are lost.
    pub unreadable_packs: Vec<String>,
    /// Blobs that failed verification and were dropped.
    pub damaged_blobs: Vec<Id>,
    /// Objects removed because they could not be read (snapshots, index files, damaged packs).
    pub removed: Vec<String>,
    /// Snapshots that still reference missing data, with the first affected paths.
    pub damaged_snapshots: Vec<(Id, Vec<String>)>,
}

impl RepairReport {
    /// Whether everything was saved.
    pub fn nothing_lost(&self) -> bool {
        self.unreadable_packs.is_empty() && self.damaged_blobs.is_empty() && self.damaged_snapshots.is_empty()
    }
}

/// Rebuild the index from packs (take an exclusive lock first).
pub fn repair(repo: &mut Repository, verify_data: bool) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let mut good: Vec<(Id, Vec<PackEntry>)> = Vec::new();
    let mut damaged_packs: Vec<Id> = Vec::new();
    let mut repacker = Repacker::new(repo);
    let mut objs = repo.backend().list(rf::DATA_DIR)?;
    objs.sort_by(|a, b| a.name.cmp(&b.name));
    for o in objs {
        let Some(id) = rf::id_of_name(&o.name) else {
            continue;
        };
        if !verify_data {
            match pack::read_header(&**repo.backend(), repo.keys(), &o.name, o.size) {
                Ok(h) => good.push((id, h)),
                Err(e @ Error::Corrupt { .. }) => report.unreadable_packs.push(format!("{}: {e}", o.name)),
                // I/O trouble or a newer format is not damage: stop rather than drop the pack.
                Err(e) => return Err(e),
            }
            continue;
        }
        let bytes = repo.backend().get(&o.name, None)?;
        // The index being rebuilt may not know a base yet: such a blob is kept unjudged.
        let read_base = |b: &Id| match repo.read_blob(b) {
            Ok(raw) => Ok(Some(raw)),
            Err(Error::BlobMissing(_)) => Ok(None),
            Err(e) => Err(e),
        };
        let v = match pack::verify_whole(repo.keys(), repo.dictionaries(), &id, &bytes, &read_base) {
            Ok(v) => v,
            Err(e @ Error::UnsupportedVersion { .. }) => return Err(e),
            Err(e) => {
                report.unreadable_packs.push(format!("{}: {e}", o.name));
                continue;
            }
        };
        // A blob unread for storage trouble (loading its dictionary, say) is not damage: stop
        // rather than drop it.
        if let Some(i) = v.damaged.iter().position(|(_, e)| !matches!(e, Error::Corrupt { .. })) {
            return Err(v.damaged.into_iter().nth(i).expect("just found").1);
        }
        if v.intact && v.damaged.is_empty() {
            good.push((id, v.entries));
        } else {
            report.damaged_blobs.extend(v.damaged.iter().map(|(e, _)| e.id));
            for e in v.entries.iter().filter(|e| !v.damaged.iter().any(|(d, _)| d == *e)) {
                repacker.add(e, pack::blob_bytes(&bytes, e).expect("entry within the pack"))?;
            }
            damaged_packs.push(id);
        }
    }
    repacker.flush()?;
    good.extend(repacker.written);
    report.packs_indexed = good.len();

    let old_index = crate::repository::ids_in(&**repo.backend(), rf::INDEX_DIR)?;
    let new_index = write_index(repo, &IndexFile { supersedes: old_index.clone(), packs: good })?;
    for id in old_index.iter().filter(|id| **id != new_index) {
        repo.backend().delete(&format!("{}{id}", rf::INDEX_DIR))?;
    }
    for id in damaged_packs {
        repo.backend().delete(&rf::pack_name(&id))?;
        report.removed.push(format!("{} (damaged; its intact blobs were kept)", rf::pack_name(&id)));
    }
    for id in repo.snapshot_ids()? {
        let name = format!("{}{id}", rf::SNAPSHOT_DIR);
        match repo.read_object(&name, Domain::Snapshot).and_then(|_| repo.load_snapshot(&id)) {
            Ok(_) => {}
            Err(e @ Error::Corrupt { .. }) => {
                repo.backend().delete(&name)?;
                report.removed.push(format!("{name} ({e})"));
            }
            Err(e) => return Err(e),
        }
    }
    repo.load_index()?;
    for (id, snap) in repo.snapshots()? {
        let mut paths = Vec::new();
        if let Some(root) = Id::from_slice(&snap.tree) {
            missing_paths(repo, root, &mut paths);
        }
        if !paths.is_empty() {
            report.damaged_snapshots.push((id, paths));
        }
    }
    Ok(report)
}

/// Paths under `root` whose data or tree is missing (at most 20).
fn missing_paths(repo: &Repository, root: Id, out: &mut Vec<String>) {
    let mut stack = vec![(root, String::from("/"))];
    let mut seen = HashSet::new();
    while let Some((tree_id, path)) = stack.pop() {
        if out.len() >= 20 || !seen.insert(tree_id) {
            continue;
        }
        let Ok(tree) = repo.read_tree(&tree_id) else {
            out.push(format!("{path} (directory listing lost)"));
            continue;
        };
        for n in tree.nodes {
            let p = format!("{path}{}", String::from_utf8_lossy(&n.name));
            if n.content.iter().any(|c| Id::from_slice(&c.id).is_none_or(|id| !repo.index().contains(&id))) {
                out.push(p.clone());
            }
            if n.node_kind() == NodeKind::Dir
                && let Some(sub) = Id::from_slice(&n.subtree)
            {
                stack.push((sub, format!("{p}/")));
            }
        }
    }
}
