//! `check`: is every byte the snapshots need present, consistent and (with `verify_data`) intact?

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::locking;
use crate::repofile::pack::{self, PackEntry};
use crate::repofile::tree::NodeKind;
use crate::repofile::{self as rf};
use crate::repository::Repository;

/// What to check.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckOptions {
    /// Read every pack and verify every blob (decrypt, decompress, re-hash).
    pub verify_data: bool,
    /// Read and verify only the packs of slice `i` of `n` (`verify_slice(id, n) == i`): a
    /// rolling verification, every pack once in `n` runs.
    pub verify_slice: Option<(u32, u32)>,
}

/// The slice of `n` a pack belongs to, from its id (ids are uniform, so slices are even).
pub fn verify_slice(pack: &Id, n: u32) -> u32 {
    u32::from_le_bytes(pack.0[..4].try_into().expect("4 bytes")) % n.max(1)
}

/// One piece of damage, naming the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The object: a storage name, a blob or a snapshot path.
    pub object: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// What `check` found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// Damage: the repository is not clean when this is not empty.
    pub problems: Vec<Problem>,
    /// Harmless findings (unindexed packs left by an interrupted run, stale locks).
    pub notes: Vec<String>,
    /// Snapshots checked.
    pub snapshots: usize,
    /// Packs checked.
    pub packs: usize,
    /// Blob entries in the index.
    pub blobs: usize,
    /// Blobs read and verified (with `verify_data`).
    pub verified: usize,
}

impl CheckReport {
    /// No damage found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, object: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { object: object.into(), message: message.into() });
    }
}

fn split_corrupt(e: Error) -> (String, String) {
    match e {
        Error::Corrupt { object, reason } => (object, reason),
        other => (String::new(), other.to_string()),
    }
}

/// Check the repository; reloads its index.
pub fn check(repo: &mut Repository, opts: CheckOptions) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    // Snapshots are listed before the index is read: a backup committing meanwhile wrote its
    // index file before its snapshot, so every listed snapshot's blobs are in what is read next.
    let snapshot_ids = repo.snapshot_ids()?;

    // Index files.
    let (files, bad) = repo.read_index_files()?;
    for e in bad {
        let (o, m) = split_corrupt(e);
        report.problem(o, m);
    }
    let superseded: HashSet<Id> = files.iter().flat_map(|(_, f)| f.supersedes.iter().copied()).collect();
    let mut indexed: HashMap<Id, Vec<PackEntry>> = HashMap::new();
    for (_, f) in files.iter().filter(|(id, _)| !superseded.contains(id)) {
        for (pack, entries) in &f.packs {
            indexed.entry(*pack).or_insert_with(|| entries.clone());
        }
    }
    repo.install_index(&files);
    report.blobs = repo.index().len();

    // Compression dictionaries: a damaged one makes every blob compressed with it unreadable.
    let dictionaries: HashSet<Id> = repo.dictionaries().list()?.into_iter().collect();
    for id in &dictionaries {
        if let Err(e) = repo.dictionaries().load(id) {
            let (o, m) = split_corrupt(e);
            report.problem(o, m);
        }
    }

    // Packs.
    let stored: HashMap<Id, u64> = repo
        .backend()
        .list(rf::DATA_DIR)?
        .into_iter()
        .filter_map(|o| rf::id_of_name(&o.name).map(|id| (id, o.size)))
        .collect();
    for pack in stored.keys().filter(|p| !indexed.contains_key(p)) {
        report.notes.push(format!(
            "pack {pack} is not in the index (left by an interrupted run; `collector compact` removes it)"
        ));
    }
    let mut to_check: Vec<(Id, u64, &Vec<PackEntry>)> = Vec::new();
    for (pack, entries) in &indexed {
        match stored.get(pack) {
            None => report.problem(rf::pack_name(pack), format!("pack is missing; {} blobs lost", entries.len())),
            Some(&size) => to_check.push((*pack, size, entries)),
        }
    }
    to_check.sort_by_key(|(id, _, _)| *id);
    report.packs = to_check.len();
    let (problems, verified) = check_packs(repo, &to_check, &|id| {
        opts.verify_data || opts.verify_slice.is_some_and(|(i, n)| verify_slice(id, n) == i)
    });
    report.problems.extend(problems);
    report.verified = verified;
    check_bases(repo, &indexed, &mut report);

    // Snapshots and the trees they reference.
    let mut seen_trees: HashSet<Id> = HashSet::new();
    for id in snapshot_ids {
        report.snapshots += 1;
        let snap = match repo.load_snapshot(&id) {
            Ok(s) => s,
            // Pruned since the listing.
            Err(Error::Backend(crate::backend::BackendError::NotFound(_))) => {
                report.snapshots -= 1;
                continue;
            }
            Err(e) => {
                let (o, m) = split_corrupt(e);
                report.problem(o, m);
                continue;
            }
        };
        let Some(root) = Id::from_slice(&snap.tree) else {
            report.problem(format!("snapshot {id}"), "has no root tree");
            continue;
        };
        if let Some(d) = Id::from_slice(&snap.dictionary).filter(|d| !dictionaries.contains(d)) {
            report
                .problem(format!("snapshot {id}"), format!("its dump content needs dictionary {d}, which is missing"));
        }
        check_tree(repo, &id, root, String::new(), &mut seen_trees, &mut report);
    }

    for l in locking::list_locks(&**repo.backend(), repo.keys())? {
        if l.stale {
            report.notes.push(format!("stale lock: {} (remove with `collector unlock`)", l.describe()));
        }
    }
    Ok(report)
}

/// Every base a blob names must be indexed, as a data blob without a base of its own: without it
/// the blob cannot be read.
fn check_bases(repo: &Repository, indexed: &HashMap<Id, Vec<PackEntry>>, report: &mut CheckReport) {
    for e in indexed.values().flatten() {
        if let Some((base, why)) = e.base.and_then(|b| Some((b, repo.unusable_base(&b)?))) {
            report.problem(format!("blob {}", e.id), format!("its base {base} {why}; the blob cannot be read"));
        }
    }
}

fn check_tree(repo: &Repository, snap: &Id, root: Id, path: String, seen: &mut HashSet<Id>, report: &mut CheckReport) {
    let mut stack = vec![(root, path)];
    while let Some((tree_id, path)) = stack.pop() {
        if !seen.insert(tree_id) {
            continue;
        }
        let tree = match repo.read_tree(&tree_id) {
            Ok(t) => t,
            Err(e) => {
                report.problem(format!("snapshot {} /{path}", snap.short()), format!("tree {tree_id}: {e}"));
                continue;
            }
        };
        for node in tree.nodes {
            let p = format!("{path}{}", String::from_utf8_lossy(&node.name));
            if let Err(e) = crate::fs::check_name(&node.name) {
                report.problem(format!("snapshot {} /{p}", snap.short()), e.to_string());
            }
            for c in &node.content {
                let ok = Id::from_slice(&c.id)
                    .and_then(|id| repo.index().get(&id))
                    .is_some_and(|loc| c.offset as u64 + c.length as u64 <= loc.entry.raw_len as u64);
                if !ok {
                    report.problem(
                        format!("snapshot {} /{p}", snap.short()),
                        format!("content blob {} is missing or shorter than the range used", hex::encode(&c.id)),
                    );
                }
            }
            if node.node_kind() == NodeKind::Dir {
                match Id::from_slice(&node.subtree) {
                    Some(sub) => stack.push((sub, format!("{p}/"))),
                    None => report.problem(format!("snapshot {} /{p}", snap.short()), "directory without a tree"),
                }
            }
        }
    }
}

/// Compare each pack with the index, in parallel; with `verify`, read and verify every blob.
fn check_packs(
    repo: &Repository,
    packs: &[(Id, u64, &Vec<PackEntry>)],
    verify: &(dyn Fn(&Id) -> bool + Sync),
) -> (Vec<Problem>, usize) {
    let next = AtomicUsize::new(0);
    let verified = AtomicUsize::new(0);
    let problems = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(id, size, entries)) = packs.get(i) else {
                        return;
                    };
                    let found = check_pack(repo, id, size, entries, verify(&id), &verified);
                    problems.lock().expect("problems").extend(found);
                }
            });
        }
    });
    let mut p = problems.into_inner().expect("problems");
    p.sort_by(|a, b| a.object.cmp(&b.object));
    (p, verified.into_inner())
}

fn check_pack(
    repo: &Repository,
    id: Id,
    size: u64,
    indexed: &[PackEntry],
    verify: bool,
    verified: &AtomicUsize,
) -> Vec<Problem> {
    let name = rf::pack_name(&id);
    let mut out = Vec::new();
    let mut problem = |m: String| out.push(Problem { object: name.clone(), message: m });
    let header = if verify {
        let bytes = match repo.backend().get(&name, None) {
            Ok(b) => b,
            Err(e) => {
                problem(e.to_string());
                return out;
            }
        };
        pack::verify_whole(repo.keys(), repo.dictionaries(), &id, &bytes, &|b| repo.read_blob(b).map(Some)).map(|v| {
            if !v.intact {
                problem("content does not match its name (BLAKE3)".into());
            }
            verified.fetch_add(v.entries.len() - v.damaged.len(), Ordering::Relaxed);
            for (_, err) in v.damaged {
                problem(err.to_string());
            }
            v.entries
        })
    } else {
        pack::read_header(&**repo.backend(), repo.keys(), &name, size)
    };
    match header {
        Err(e) => problem(split_corrupt(e).1),
        Ok(h) => {
            let mut a: Vec<_> = h.iter().map(|e| (e.id, e.offset, e.stored_len, e.raw_len, e.kind)).collect();
            let mut b: Vec<_> = indexed.iter().map(|e| (e.id, e.offset, e.stored_len, e.raw_len, e.kind)).collect();
            a.sort();
            b.sort();
            if a != b {
                problem(format!(
                    "header lists {} blobs, the index {}; they disagree (run `collector check --repair`)",
                    a.len(),
                    b.len()
                ));
            }
        }
    }
    out
}
