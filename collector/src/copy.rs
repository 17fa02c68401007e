//! `collector copy`: copy snapshots into another repository (a local one to S3 for an off-site
//! copy, say). The two repositories have their own keys, so blob ids differ: every tree and
//! chunk is read from the source, decrypted, and added to the target under the target's id;
//! what the target already holds is not stored again; dump content is compressed with the
//! target's own dictionary (FORMAT.md §12). A snapshot is copied once: one with the
//! same agent, source and time in the target is skipped. Each snapshot is committed as a backup
//! is (packs, index, snapshot), so an interrupted copy leaves the target consistent.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use prost::Message;
use repo_format::repofile::tree::NodeKind;
use repo_format::{BlobKind, Id, Repository, Writer, locking};
use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct CopyReport {
    pub copied: Vec<String>,
    pub skipped: usize,
    pub blobs_added: u64,
    pub stored_added: u64,
}

/// Ids of the source's blobs as the target knows them.
#[derive(Default)]
struct Memo {
    trees: HashMap<Id, Id>,
    data: HashMap<Id, Id>,
}

pub fn copy(
    source: &mut Repository,
    target: &mut Repository,
    agent: Option<&str>,
    sources: &[String],
) -> Result<CopyReport> {
    let _src_lock = locking::lock(source, false, "collector copy (source)", Duration::ZERO)?;
    let target_lock = locking::lock(target, false, "collector copy (target)", Duration::ZERO)?;
    source.load_index()?;
    target.load_index()?;
    let existing = target.snapshots()?;
    let present: std::collections::HashSet<(String, String, i64)> =
        existing.iter().map(|(_, s)| (s.agent.clone(), s.source.clone(), s.time_ns)).collect();
    // Dump content stays compressed with a dictionary, the target's own: one per source, trained
    // on the first copy with dump content (or found in the target's newest snapshot of the
    // source) and used again for the next.
    let mut dictionaries: HashMap<(String, String), Id> =
        existing.into_iter().filter_map(|(_, s)| Some(((s.agent, s.source), Id::from_slice(&s.dictionary)?))).collect();
    let mut snaps = source.snapshots()?;
    snaps.sort_by_key(|(_, s)| s.time_ns);
    let mut report = CopyReport::default();
    let mut memo = Memo::default();
    for (id, snap) in snaps {
        if agent.is_some_and(|a| a != snap.agent) || (!sources.is_empty() && !sources.contains(&snap.source)) {
            continue;
        }
        if present.contains(&(snap.agent.clone(), snap.source.clone(), snap.time_ns)) {
            report.skipped += 1;
            continue;
        }
        let root = Id::from_slice(&snap.tree).context("snapshot has no root tree")?;
        let group = (snap.agent.clone(), snap.source.clone());
        let mut w = Writer::new(target, 0);
        // A target dictionary that cannot be read is replaced by a new one, as a pull does.
        if let Some(d) = dictionaries.get(&group)
            && w.use_dictionary(d).is_err()
        {
            dictionaries.remove(&group);
        }
        let new_root =
            copy_tree(source, &mut w, &root, &mut memo).with_context(|| format!("copying snapshot {}", id.short()))?;
        let (index, stats) = w.finish()?;
        if let Some((iid, f)) = index {
            target.add_index(iid, &f);
        }
        if let Some(d) = stats.dictionary {
            dictionaries.insert(group, d);
        }
        let copied = repo_format::Snapshot {
            tree: new_root.0.to_vec(),
            parent: Vec::new(),
            dictionary: stats.dictionary.map(|d| d.0.to_vec()).unwrap_or_default(),
            ..snap
        };
        target_lock.ensure_held()?;
        let new_id = target.save_snapshot(&copied)?;
        report.blobs_added += stats.blobs;
        report.stored_added += stats.stored_bytes;
        report.copied.push(format!("{} → {} ({}/{})", id.short(), new_id.short(), copied.agent, copied.source));
    }
    Ok(report)
}

fn copy_tree(src: &Repository, w: &mut Writer<'_>, id: &Id, memo: &mut Memo) -> Result<Id> {
    if let Some(done) = memo.trees.get(id) {
        return Ok(*done);
    }
    let mut tree = src.read_tree(id)?;
    for node in &mut tree.nodes {
        for c in &mut node.content {
            let old = Id::from_slice(&c.id).context("chunk reference without an id")?;
            let new = match memo.data.get(&old) {
                Some(n) => *n,
                None => {
                    let n = match src.read_dump_aware(&old)? {
                        (raw, true) => w.add_dump(raw)?,
                        (raw, false) => w.add(BlobKind::Data, raw)?,
                    };
                    memo.data.insert(old, n);
                    n
                }
            };
            c.id = new.0.to_vec();
        }
        if node.node_kind() == NodeKind::Dir
            && let Some(sub) = Id::from_slice(&node.subtree)
        {
            node.subtree = copy_tree(src, w, &sub, memo)?.0.to_vec();
        }
    }
    let new = w.add(BlobKind::Tree, tree.encode_to_vec())?;
    memo.trees.insert(*id, new);
    Ok(new)
}
