//! Shared harness of magpie's end-to-end tests: deterministic datasets, repositories set up for
//! tests, and the paths of the real binaries under test.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use repo_format::backend::LocalBackend;
use repo_format::chunker::ChunkerParams;
use repo_format::crypto::KdfParams;
use repo_format::{Id, InitOptions, Repository, Snapshot, Writer};

/// Passphrase of test repositories.
pub const PASS: &[u8] = b"end-to-end test passphrase";

/// Small chunks and packs so small data spans many of both; a cheap KDF.
pub fn test_options() -> InitOptions {
    let mut o = InitOptions::encrypted(PASS);
    o.kdf = KdfParams { memory_kib: 256, iterations: 1, parallelism: 1 };
    o.chunker_files = ChunkerParams { min: 4 * 1024, avg: 16 * 1024, max: 64 * 1024 };
    o.pack_size = 1024 * 1024;
    o.small_file_threshold = 4 * 1024;
    o
}

/// Open a test repository with its index loaded.
pub fn open(dir: &Path) -> repo_format::Result<Repository> {
    let mut r = Repository::open(Arc::new(LocalBackend::new(dir)), Some(PASS))?;
    r.load_index()?;
    Ok(r)
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

/// Compressible, text-like bytes.
pub fn text(n: usize, seed: u64) -> Vec<u8> {
    let words = ["backup", "restore", "magpie", "collector", "agent", "snapshot", "the", "of", "and"];
    let mut out = Vec::with_capacity(n + 16);
    let mut x = seed | 1;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        out.push(if x.is_multiple_of(7) { b'\n' } else { b' ' });
    }
    out.truncate(n);
    out
}

/// (Re)create the dataset of `seed` in `dir`: a constant part, shared by every seed, and a part
/// that changes with the seed (garbage once its snapshots are pruned).
pub fn make_dataset(dir: &Path, seed: u64) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("common")).expect("dataset dir");
    for i in 0..20 {
        fs::write(dir.join("common").join(format!("{i}.txt")), text(2000 + i * 300, i as u64)).expect("write");
    }
    fs::write(dir.join("big-constant"), noise(1 << 20, 7)).expect("write");
    fs::write(dir.join("rotating"), noise(512 * 1024, 1000 + seed)).expect("write");
    fs::write(dir.join(format!("small-{}", seed % 5)), text(900, seed)).expect("write");
}

/// Store `dir` as a snapshot tagged with `seed`.
pub fn backup(repo: &mut Repository, dir: &Path, seed: u64) -> repo_format::Result<Id> {
    let mut w = Writer::new(repo, 2);
    let (tree, stats) = repo_format::fs::import_dir(&mut w, dir)?;
    let (index, _) = w.finish()?;
    if let Some((id, f)) = index {
        repo.add_index(id, &f);
    }
    let snap = Snapshot {
        version: 1,
        time_ns: chrono_now_ns(),
        agent: "torture".into(),
        source: "data".into(),
        source_kind: "path".into(),
        role: "data".into(),
        tags: vec![format!("seed={seed}")],
        tree: tree.0.to_vec(),
        stats: Some(stats),
        ..Default::default()
    };
    repo.save_snapshot(&snap)
}

fn chrono_now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Every regular file below `dir` with its content, by relative path.
pub fn read_tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).expect("prefix").to_path_buf(), fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// Path of a workspace binary built alongside the running test (`cargo test --workspace`
/// builds every member's binaries into the same target folder).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} is not built: run the tests with `cargo test --workspace`", p.display());
    p
}
