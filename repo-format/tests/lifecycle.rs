//! Prune then compact: the right snapshots go, their data is freed, the rest is intact.
//! Each test runs on a local folder and on S3-compatible storage.

mod common;

use std::fs;

use chrono::{Duration, TimeZone, Utc};
use common::Place;
use repo_format::backend::Backend;
use repo_format::ops::{check, compact, prune};
use repo_format::retention::Policy;

on_every_backend!(
    prune_and_compact_free_space_and_keep_the_rest_intact,
    compact_removes_packs_left_by_an_interrupted_writer
);

fn prune_and_compact_free_space_and_keep_the_rest_intact(place: Place) {
    let tmp = tempfile::tempdir().unwrap();
    let mut repo = common::init(&place.backend);
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("constant"), common::noise(1 << 20, 1)).unwrap();
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 3, 0, 0).unwrap();
    let mut expected = Vec::new();
    for day in 0..10 {
        // Each day a new 1 MiB file replaces the last: old days become garbage when pruned.
        fs::write(src.join("daily"), common::noise(1 << 20, 100 + day)).unwrap();
        let (id, _) = common::backup_at(&mut repo, &src, "s", start + Duration::days(day as i64));
        expected.push((id, common::snapshot_dir(&src)));
    }
    let policy = Policy { last: 3, ..Default::default() };
    let now = start + Duration::days(11);
    let plan = prune::plan(&repo, &policy, now, &Utc).unwrap();
    assert_eq!(plan.iter().filter(|d| d.keep.is_none()).count(), 7);
    // A plan changes nothing by itself (dry run).
    assert_eq!(repo.snapshot_ids().unwrap().len(), 10);
    assert_eq!(prune::apply(&repo, &plan).unwrap(), 7);
    let before = repo.stored_bytes().unwrap();
    let r = compact::compact(&mut repo, compact::CompactOptions::default()).unwrap();
    let after = repo.stored_bytes().unwrap();
    assert!(r.bytes_freed > 6 << 20, "{r:?}");
    assert!(before - after > 6 << 20, "repository shrank by {} bytes only", before - after);
    let mut repo = common::reopen(place.backend.clone());
    let c = check::check(&mut repo, check::CheckOptions { verify_data: true, ..Default::default() }).unwrap();
    assert!(c.is_clean() && c.notes.is_empty(), "{:?} {:?}", c.problems, c.notes);
    for (id, content) in &expected[7..] {
        let out = tmp.path().join(format!("out-{}", id.short()));
        common::restore(&repo, id, &out);
        assert_eq!(&common::snapshot_dir(&out), content);
    }
}

fn compact_removes_packs_left_by_an_interrupted_writer(place: Place) {
    let tmp = tempfile::tempdir().unwrap();
    let mut repo = common::init(&place.backend);
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), common::noise(300_000, 1)).unwrap();
    let (snap, _) = common::backup(&mut repo, &src, "s");
    // A pack that made it to storage without its index (the writer died before finish).
    let mut pb = repo_format::repofile::pack::PackBuilder::new();
    let data = common::noise(1000, 2);
    let sealed = repo_format::repofile::pack::encode_blob(repo.keys(), repo_format::BlobKind::Data, &data, None, None);
    pb.add(repo_format::BlobKind::Data, repo.keys().blob_id(repo_format::BlobKind::Data, &data), &sealed, 1000, None);
    let (id, _) = pb.store(repo.keys(), &**repo.backend()).unwrap();
    let c = check::check(&mut repo, Default::default()).unwrap();
    assert!(c.is_clean(), "an unindexed pack is not damage");
    assert!(c.notes.iter().any(|n| n.contains(&id.to_hex())));
    let r = compact::compact(&mut repo, Default::default()).unwrap();
    assert_eq!(r.packs_deleted, 1);
    let c = check::check(&mut repo, check::CheckOptions { verify_data: true, ..Default::default() }).unwrap();
    assert!(c.is_clean() && c.notes.is_empty(), "{:?}", c.notes);
    common::restore(&repo, &snap, &tmp.path().join("out"));
    assert_eq!(common::snapshot_dir(&src), common::snapshot_dir(&tmp.path().join("out")));
}

/// A writer killed mid-pack leaves its temporary file behind (listings skip it, so nothing else
/// would ever free it); compact, under its exclusive lock, removes it and the others, except
/// in locks/, where a process asking for a lock may be writing right then.
#[test]
fn compact_removes_temporaries_left_by_interrupted_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let (backend, mut repo) = common::local_repo(&dir);
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), common::noise(300_000, 1)).unwrap();
    let (snap, _) = common::backup(&mut repo, &src, "s");
    // As a SIGKILL would leave it: a pack staged halfway, and a snapshot's temporary.
    let mut staged = backend.stage("data/").unwrap().expect("a local repository stages packs");
    std::io::Write::write_all(&mut staged, &common::noise(100_000, 2)).unwrap();
    std::mem::forget(staged);
    fs::write(dir.join("snapshots/.tmp-0123456789abcdef"), b"half a snapshot").unwrap();
    // A lock being taken right now: the lock protocol's, left alone.
    fs::create_dir_all(dir.join("locks")).unwrap();
    fs::write(dir.join("locks/.tmp-fedcba9876543210"), b"a lock on its way").unwrap();
    assert_eq!(temporaries_under(&dir), 3);

    let r = compact::compact(&mut repo, Default::default()).unwrap();
    assert_eq!(r.leftovers_removed, 2, "{r:?}");
    assert!(r.bytes_freed >= 100_000, "{r:?}");
    assert_eq!(temporaries_under(&dir), 1);
    assert!(dir.join("locks/.tmp-fedcba9876543210").exists());
    let c = check::check(&mut repo, check::CheckOptions { verify_data: true, ..Default::default() }).unwrap();
    assert!(c.is_clean() && c.notes.is_empty(), "{:?} {:?}", c.problems, c.notes);
    common::restore(&repo, &snap, &tmp.path().join("out"));
    assert_eq!(common::snapshot_dir(&src), common::snapshot_dir(&tmp.path().join("out")));
}

/// How many of the local backend's temporary files are under `dir`.
fn temporaries_under(dir: &std::path::Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .map(Result::unwrap)
        .map(|e| match e.file_type().unwrap().is_dir() {
            true => temporaries_under(&e.path()),
            false => e.file_name().to_string_lossy().starts_with(".tmp-") as usize,
        })
        .sum()
}
