//! Commands over a whole repository. Each returns a report; none prints.

pub mod check;
pub mod compact;
pub mod prune;
pub mod repair;

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::repofile::tree::NodeKind;
use crate::repository::Repository;

/// Every blob (trees and data) referenced by the given snapshot roots, and their bases.
pub(crate) fn referenced_blobs(repo: &Repository, roots: &[Id]) -> Result<HashSet<Id>> {
    let mut used = HashSet::new();
    let mut stack: Vec<Id> = roots.to_vec();
    while let Some(tree_id) = stack.pop() {
        if !used.insert(tree_id) {
            continue;
        }
        for node in repo.read_tree(&tree_id)?.nodes {
            for c in &node.content {
                used.insert(
                    Id::from_slice(&c.id)
                        .ok_or_else(|| Error::corrupt(format!("tree {tree_id}"), "chunk id is not 32 bytes"))?,
                );
            }
            if node.node_kind() == NodeKind::Dir {
                stack.push(
                    Id::from_slice(&node.subtree)
                        .ok_or_else(|| Error::corrupt(format!("tree {tree_id}"), "directory without a tree"))?,
                );
            }
        }
    }
    // A blob compressed against a base keeps it alive (bases are data blobs without bases).
    let bases: Vec<Id> = used.iter().filter_map(|id| repo.index().get(id)?.entry.base).collect();
    used.extend(bases);
    Ok(used)
}

/// Root trees of all snapshots.
pub(crate) fn snapshot_roots(repo: &Repository) -> Result<Vec<Id>> {
    repo.snapshots()?
        .into_iter()
        .map(|(id, s)| Id::from_slice(&s.tree).ok_or_else(|| Error::corrupt(format!("snapshot {id}"), "no root tree")))
        .collect()
}

/// Copies sealed blobs into new packs as they are (no re-encryption), for compact and repair.
pub(crate) struct Repacker<'a> {
    repo: &'a Repository,
    current: crate::repofile::pack::PackBuilder,
    /// Packs written so far.
    pub written: Vec<(Id, Vec<crate::repofile::pack::PackEntry>)>,
}

impl<'a> Repacker<'a> {
    pub fn new(repo: &'a Repository) -> Self {
        Repacker { repo, current: Default::default(), written: Vec::new() }
    }

    pub fn add(&mut self, e: &crate::repofile::pack::PackEntry, sealed: &[u8]) -> Result<()> {
        self.current.add(e.kind, e.id, sealed, e.raw_len, e.base);
        if self.current.len() >= self.repo.config().pack_size as usize {
            self.flush()?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        let b = std::mem::take(&mut self.current);
        if b.is_empty() {
            return Ok(());
        }
        let (id, entries) = b.store(self.repo.keys(), &**self.repo.backend())?;
        self.written.push((id, entries));
        Ok(())
    }
}

/// Write an index file that replaces every index file in `supersedes`.
pub(crate) fn write_index(repo: &Repository, file: &crate::repofile::index::IndexFile) -> Result<Id> {
    repo.write_object(crate::repofile::INDEX_DIR, crate::magic::Domain::Index, &file.encode())
}
