//! Helpers shared by the repository's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use repo_format::backend::{Backend, LocalBackend};
use repo_format::chunker::ChunkerParams;
use repo_format::crypto::KdfParams;
use repo_format::{Id, InitOptions, Repository, Snapshot, Writer};

pub const PASS: &[u8] = b"test passphrase";

/// Small chunks and packs so that small test data spans many of both; a cheap KDF.
pub fn test_options() -> InitOptions {
    let mut o = InitOptions::encrypted(PASS);
    o.kdf = KdfParams { memory_kib: 256, iterations: 1, parallelism: 1 };
    o.chunker_files = ChunkerParams { min: 4 * 1024, avg: 16 * 1024, max: 64 * 1024 };
    o.pack_size = 1024 * 1024;
    o.small_file_threshold = 4 * 1024;
    o
}

pub fn local_repo(dir: &Path) -> (Arc<LocalBackend>, Repository) {
    let b = Arc::new(LocalBackend::new(dir));
    let r = Repository::init(b.clone(), &test_options()).unwrap();
    (b, r)
}

pub fn reopen(b: Arc<dyn Backend>) -> Repository {
    let mut r = Repository::open(b, Some(PASS)).unwrap();
    r.load_index().unwrap();
    r
}

/// Import `dir` as a snapshot of `source`; returns its id and the write stats.
pub fn backup(repo: &mut Repository, dir: &Path, source: &str) -> (Id, repo_format::SnapshotStats) {
    backup_at(repo, dir, source, chrono::Utc::now())
}

pub fn backup_at(
    repo: &mut Repository,
    dir: &Path,
    source: &str,
    time: chrono::DateTime<chrono::Utc>,
) -> (Id, repo_format::SnapshotStats) {
    let mut w = Writer::new(repo, 2);
    let (tree, mut stats) = repo_format::fs::import_dir(&mut w, dir).unwrap();
    let (index, ws) = w.finish().unwrap();
    stats.blobs_added = ws.blobs;
    stats.bytes_added = ws.raw_bytes;
    stats.stored_added = ws.stored_bytes;
    if let Some((id, f)) = index {
        repo.add_index(id, &f);
    }
    let snap = Snapshot {
        version: 1,
        time_ns: time.timestamp_nanos_opt().unwrap(),
        agent: "test-agent".into(),
        source: source.into(),
        source_kind: "path".into(),
        role: "data".into(),
        tree: tree.0.to_vec(),
        stats: Some(stats.clone()),
        ..Default::default()
    };
    (repo.save_snapshot(&snap).unwrap(), stats)
}

pub fn restore(repo: &Repository, snap: &Id, target: &Path) {
    let s = repo.load_snapshot(snap).unwrap();
    repo_format::fs::restore(repo, &Id::from_slice(&s.tree).unwrap(), target).unwrap();
}

/// Everything a user would compare after a restore, keyed by relative path.
#[derive(Debug, PartialEq)]
pub struct Entry {
    kind: &'static str,
    mode: u32,
    mtime_ns: Option<i64>,
    content: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// Index of the first path sharing this inode (hard links).
    link_group: Option<String>,
}

pub fn snapshot_dir(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>, inodes: &mut BTreeMap<(u64, u64), String>) {
    let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for p in names {
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let m = fs::symlink_metadata(&p).unwrap();
        let xattrs = if m.file_type().is_symlink() {
            BTreeMap::new()
        } else {
            xattr::list(&p)
                .unwrap()
                .filter(|n| n.to_string_lossy().starts_with("user."))
                .map(|n| (n.to_string_lossy().into_owned(), xattr::get(&p, &n).unwrap().unwrap()))
                .collect()
        };
        let (kind, content, mtime) = if m.file_type().is_symlink() {
            ("symlink", fs::read_link(&p).unwrap().to_string_lossy().as_bytes().to_vec(), None)
        } else if m.is_dir() {
            ("dir", Vec::new(), Some(m.mtime() * 1_000_000_000 + m.mtime_nsec()))
        } else {
            ("file", fs::read(&p).unwrap(), Some(m.mtime() * 1_000_000_000 + m.mtime_nsec()))
        };
        let link_group =
            (m.is_file() && m.nlink() > 1).then(|| inodes.entry((m.dev(), m.ino())).or_insert(rel.clone()).clone());
        out.insert(
            rel.clone(),
            Entry {
                kind,
                mode: if kind == "symlink" { 0 } else { m.mode() & 0o7777 },
                mtime_ns: mtime,
                content,
                xattrs,
                link_group,
            },
        );
        if m.is_dir() {
            walk(root, &p, out, inodes);
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Text-like, compressible bytes.
pub fn text(n: usize, seed: u64) -> Vec<u8> {
    let words =
        ["backup", "restore", "magpie", "collector", "agent", "snapshot", "chunk", "pack", "index", "the", "of", "and"];
    let mut out = Vec::with_capacity(n + 16);
    let mut x = seed | 1;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        out.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
    }
    out.truncate(n);
    out
}

/// Bytes of every file below `p`.
pub fn dir_size(p: &Path) -> u64 {
    fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() { dir_size(&e.path()) } else { m.len() }
        })
        .sum()
}
