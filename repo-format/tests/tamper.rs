//! A flipped byte in any object is detected by `check` and by a read, naming the object.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use repo_format::backend::LocalBackend;
use repo_format::ops::check::{self, CheckOptions};
use repo_format::{BlobKind, Error, Repository};

struct Fixture {
    _tmp: tempfile::TempDir,
    repo: PathBuf,
    src: PathBuf,
    snap: repo_format::Id,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("big"), common::noise(2 << 20, 5)).unwrap();
    for i in 0..20 {
        fs::write(src.join("d").join(format!("{i}.txt")), common::text(700, i)).unwrap();
    }
    let dir = tmp.path().join("repo");
    let (_b, mut repo) = common::local_repo(&dir);
    let (snap, _) = common::backup(&mut repo, &src, "t");
    Fixture { repo: dir, src, snap, _tmp: tmp }
}

fn flip(path: &Path, offset: u64) {
    let mut b = fs::read(path).unwrap();
    b[offset as usize] ^= 0x40;
    fs::write(path, b).unwrap();
}

fn only_file(dir: &Path) -> PathBuf {
    let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v.remove(0)
}

fn check(dir: &Path, verify: bool) -> check::CheckReport {
    let mut repo = Repository::open(Arc::new(LocalBackend::new(dir)), Some(common::PASS)).unwrap();
    check::check(&mut repo, CheckOptions { verify_data: verify, ..Default::default() }).unwrap()
}

/// Restore must fail (never silently produce wrong bytes).
fn restore_fails(f: &Fixture) -> Error {
    let mut repo = match Repository::open(Arc::new(LocalBackend::new(&f.repo)), Some(common::PASS)) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if let Err(e) = repo.load_index() {
        return e;
    }
    let snap = match repo.load_snapshot(&f.snap) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let out = f.repo.parent().unwrap().join("out");
    match repo_format::fs::restore(&repo, &repo_format::Id::from_slice(&snap.tree).unwrap(), &out) {
        Ok(_) => panic!("restore of a damaged repository succeeded"),
        Err(e) => e,
    }
}

#[test]
fn clean_fixture_checks_clean() {
    let f = fixture();
    let r = check(&f.repo, true);
    assert!(r.is_clean(), "{:?}", r.problems);
    assert!(r.verified > 10);
    let _ = &f.src;
}

#[test]
fn flipped_byte_in_a_data_blob() {
    let f = fixture();
    let repo = common::reopen(Arc::new(LocalBackend::new(&f.repo)));
    let loc = repo.index().iter().find(|l| l.entry.kind == BlobKind::Data && l.entry.stored_len > 10_000).unwrap();
    let pack = f.repo.join(repo_format::repofile::pack_name(&loc.pack));
    flip(&pack, loc.entry.offset as u64 + 100);
    let r = check(&f.repo, true);
    assert!(!r.is_clean());
    let hex = loc.pack.to_hex();
    assert!(r.problems.iter().any(|p| p.object.contains(&hex)), "{:?}", r.problems);
    assert!(
        r.problems.iter().any(|p| p.message.contains(&loc.entry.id.to_hex())),
        "the damaged blob is named: {:?}",
        r.problems
    );
    assert!(matches!(restore_fails(&f), Error::Corrupt { .. }));
}

#[test]
fn flipped_byte_in_a_pack_header_is_found_without_verify_data() {
    let f = fixture();
    let repo = common::reopen(Arc::new(LocalBackend::new(&f.repo)));
    let pack = repo.index().packs()[0];
    let path = f.repo.join(repo_format::repofile::pack_name(&pack));
    let len = fs::metadata(&path).unwrap().len();
    flip(&path, len - 20);
    let r = check(&f.repo, false);
    assert!(
        r.problems.iter().any(|p| p.object.contains(&pack.to_hex()) && p.message.contains("header")),
        "{:?}",
        r.problems
    );
}

#[test]
fn flipped_byte_in_a_tree_blob() {
    let f = fixture();
    let repo = common::reopen(Arc::new(LocalBackend::new(&f.repo)));
    let loc = repo.index().iter().find(|l| l.entry.kind == BlobKind::Tree).unwrap();
    flip(&f.repo.join(repo_format::repofile::pack_name(&loc.pack)), loc.entry.offset as u64 + 30);
    let r = check(&f.repo, false);
    assert!(r.problems.iter().any(|p| p.message.contains(&loc.entry.id.to_hex())), "tree named: {:?}", r.problems);
    assert!(matches!(restore_fails(&f), Error::Corrupt { .. }));
}

#[test]
fn flipped_byte_in_an_index_file() {
    let f = fixture();
    let idx = only_file(&f.repo.join("index"));
    flip(&idx, 50);
    let r = check(&f.repo, false);
    let name = idx.file_name().unwrap().to_string_lossy().into_owned();
    assert!(r.problems.iter().any(|p| p.object.contains(&name)), "{:?}", r.problems);
    assert!(matches!(restore_fails(&f), Error::Corrupt { .. }));
}

#[test]
fn flipped_byte_in_a_snapshot() {
    let f = fixture();
    let snap = only_file(&f.repo.join("snapshots"));
    flip(&snap, 40);
    let r = check(&f.repo, false);
    let name = snap.file_name().unwrap().to_string_lossy().into_owned();
    assert!(r.problems.iter().any(|p| p.object.contains(&name)), "{:?}", r.problems);
    assert!(matches!(restore_fails(&f), Error::Corrupt { .. }));
}

#[test]
fn flipped_byte_in_config_or_key() {
    let f = fixture();
    flip(&f.repo.join("config"), 20);
    let e = Repository::open(Arc::new(LocalBackend::new(&f.repo)), Some(common::PASS)).unwrap_err();
    assert!(e.to_string().contains("config"), "{e}");
    let f = fixture();
    let key = only_file(&f.repo.join("keys"));
    let len = fs::metadata(&key).unwrap().len();
    flip(&key, len - 30);
    assert!(Repository::open(Arc::new(LocalBackend::new(&f.repo)), Some(common::PASS)).is_err());
}

#[test]
fn wrong_passphrase_is_one_clear_line() {
    let f = fixture();
    let e = Repository::open(Arc::new(LocalBackend::new(&f.repo)), Some(b"not it")).unwrap_err();
    assert!(matches!(e, Error::WrongPassphrase { .. }));
    let msg = e.to_string();
    assert!(msg.starts_with("wrong passphrase") && !msg.contains('\n'), "{msg}");
}

#[test]
fn repair_salvages_intact_blobs_and_names_what_is_lost() {
    let f = fixture();
    let repo = common::reopen(Arc::new(LocalBackend::new(&f.repo)));
    let loc = repo.index().iter().find(|l| l.entry.kind == BlobKind::Data && l.entry.stored_len > 10_000).unwrap();
    flip(&f.repo.join(repo_format::repofile::pack_name(&loc.pack)), loc.entry.offset as u64 + 100);
    let mut repo = Repository::open(Arc::new(LocalBackend::new(&f.repo)), Some(common::PASS)).unwrap();
    let r = repo_format::ops::repair::repair(&mut repo, true).unwrap();
    assert_eq!(r.damaged_blobs, vec![loc.entry.id]);
    assert_eq!(r.damaged_snapshots.len(), 1);
    assert_eq!(r.damaged_snapshots[0].1, vec!["/big".to_string()]);
    // Everything else is still there: the small files restore.
    let after = check(&f.repo, true);
    assert!(after.problems.iter().all(|p| p.object.contains("/big")), "{:?}", after.problems);
}
