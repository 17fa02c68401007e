//! Helpers shared by the repository's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use repo_format::backend::{Backend, LocalBackend, S3Backend, S3Config};
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

/// A new repository on `backend`.
pub fn init(backend: &Arc<dyn Backend>) -> Repository {
    Repository::init(backend.clone(), &test_options()).unwrap()
}

/// Where a backend test's repository lives. Every such test runs once per place (see
/// [`on_every_backend`]), so the repository's rules are shown on object storage, not only on disk.
pub struct Place {
    pub backend: Arc<dyn Backend>,
    _dir: Option<tempfile::TempDir>,
}

impl Place {
    /// An empty folder on the local disk.
    pub fn local() -> Place {
        let dir = tempfile::tempdir().unwrap();
        Place { backend: Arc::new(LocalBackend::new(dir.path().join("repo"))), _dir: Some(dir) }
    }

    /// A fresh prefix in a bucket of this test binary's own S3-compatible server (moto).
    pub fn s3() -> Place {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let endpoint = moto::endpoint();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let b = S3Backend::new(S3Config {
            bucket: moto::BUCKET.into(),
            prefix: format!("repo{n}"),
            endpoint: Some(endpoint.to_string()),
            region: "us-east-1".into(),
            path_style: true,
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
        })
        .unwrap();
        Place { backend: Arc::new(b), _dir: None }
    }
}

/// Run each named `fn NAME(place: Place)` as two tests, `local::NAME` and `s3::NAME`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[test] fn $name() { super::$name($crate::common::Place::local()) })*
        }
        mod s3 {
            $(#[test] fn $name() { super::$name($crate::common::Place::s3()) })*
        }
    };
}

/// Flip one bit of a stored object, as damage on disk or a tampering bucket owner would.
pub fn flip(backend: &dyn Backend, name: &str, offset: u64) {
    let mut bytes = backend.get(name, None).unwrap();
    bytes[offset as usize] ^= 0x40;
    backend.delete(name).unwrap();
    backend.put_if_absent(name, &bytes).unwrap();
}

/// The first object (by name) under `prefix`.
pub fn first_object(backend: &dyn Backend, prefix: &str) -> repo_format::backend::ObjectInfo {
    let mut v = backend.list(prefix).unwrap();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v.remove(0)
}

/// One moto server per test binary, on a free port of 127.0.0.1, in memory. It ends with the test
/// binary: it watches its stdin, a pipe only this process holds.
mod moto {
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    pub const BUCKET: &str = "magpie-tests";

    pub fn endpoint() -> &'static str {
        static SERVER: OnceLock<(String, std::process::Child)> = OnceLock::new();
        &SERVER.get_or_init(start).0
    }

    // Never waited for: it outlives every test and ends with the binary (its stdin closes).
    #[allow(clippy::zombie_processes)]
    fn start() -> (String, std::process::Child) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let script = "import os, sys, threading\n\
            threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()\n\
            from moto.server import main\n\
            main(sys.argv[1:])\n";
        let mut child = Command::new("python3")
            .args(["-c", script, "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // It logs every request; nothing reads that here.
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto's server (python3 -m pip install 'moto[server]')");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        // moto takes unsigned requests: a plain PUT makes the bucket, once the server answers.
        let make_bucket = || {
            Command::new("curl")
                .args(["-sf", "-X", "PUT", &format!("{endpoint}/{BUCKET}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        while !make_bucket() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("moto's server exited ({status}); `python3 -m moto.server` shows why");
            }
            assert!(Instant::now() < deadline, "moto's server did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        (endpoint, child)
    }
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
