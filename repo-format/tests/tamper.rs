//! A flipped byte in any object is detected by `check` and by a read, naming the object.
//! Each test runs on a local folder and on S3-compatible storage (where the damage is a bucket
//! owner's replacement of an object).

mod common;

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use common::{Place, flip};
use repo_format::backend::Backend;
use repo_format::ops::check::{self, CheckOptions};
use repo_format::{BlobKind, Error, Repository};

on_every_backend!(
    clean_fixture_checks_clean,
    flipped_byte_in_a_data_blob,
    flipped_byte_in_a_pack_header_is_found_without_verify_data,
    flipped_byte_in_a_tree_blob,
    flipped_byte_in_an_index_file,
    flipped_byte_in_a_snapshot,
    flipped_byte_in_config_or_key,
    wrong_passphrase_is_one_clear_line,
    repair_salvages_intact_blobs_and_names_what_is_lost,
);

struct Fixture {
    tmp: tempfile::TempDir,
    backend: Arc<dyn Backend>,
    snap: repo_format::Id,
}

fn fixture(place: &Place) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("big"), common::noise(2 << 20, 5)).unwrap();
    for i in 0..20 {
        fs::write(src.join("d").join(format!("{i}.txt")), common::text(700, i)).unwrap();
    }
    let mut repo = common::init(&place.backend);
    let (snap, _) = common::backup(&mut repo, &src, "t");
    Fixture { tmp, backend: place.backend.clone(), snap }
}

fn check(f: &Fixture, verify: bool) -> check::CheckReport {
    let mut repo = Repository::open(f.backend.clone(), Some(common::PASS)).unwrap();
    check::check(&mut repo, CheckOptions { verify_data: verify, ..Default::default() }).unwrap()
}

/// Restore must fail (never silently produce wrong bytes).
fn restore_fails(f: &Fixture) -> Error {
    let mut repo = match Repository::open(f.backend.clone(), Some(common::PASS)) {
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
    let out: PathBuf = f.tmp.path().join("out");
    match repo_format::fs::restore(&repo, &repo_format::Id::from_slice(&snap.tree).unwrap(), &out) {
        Ok(_) => panic!("restore of a damaged repository succeeded"),
        Err(e) => e,
    }
}

fn clean_fixture_checks_clean(place: Place) {
    let f = fixture(&place);
    let r = check(&f, true);
    assert!(r.is_clean(), "{:?}", r.problems);
    assert!(r.verified > 10);
}

fn flipped_byte_in_a_data_blob(place: Place) {
    let f = fixture(&place);
    let repo = common::reopen(f.backend.clone());
    let loc = repo.index().iter().find(|l| l.entry.kind == BlobKind::Data && l.entry.stored_len > 10_000).unwrap();
    flip(&*f.backend, &repo_format::repofile::pack_name(&loc.pack), loc.entry.offset as u64 + 100);
    let r = check(&f, true);
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

fn flipped_byte_in_a_pack_header_is_found_without_verify_data(place: Place) {
    let f = fixture(&place);
    let repo = common::reopen(f.backend.clone());
    let pack = repo.index().packs()[0];
    let name = repo_format::repofile::pack_name(&pack);
    let len = f.backend.list(&name).unwrap()[0].size;
    flip(&*f.backend, &name, len - 20);
    let r = check(&f, false);
    assert!(
        r.problems.iter().any(|p| p.object.contains(&pack.to_hex()) && p.message.contains("header")),
        "{:?}",
        r.problems
    );
}

fn flipped_byte_in_a_tree_blob(place: Place) {
    let f = fixture(&place);
    let repo = common::reopen(f.backend.clone());
    let loc = repo.index().iter().find(|l| l.entry.kind == BlobKind::Tree).unwrap();
    flip(&*f.backend, &repo_format::repofile::pack_name(&loc.pack), loc.entry.offset as u64 + 30);
    let r = check(&f, false);
    assert!(r.problems.iter().any(|p| p.message.contains(&loc.entry.id.to_hex())), "tree named: {:?}", r.problems);
    assert!(matches!(restore_fails(&f), Error::Corrupt { .. }));
}

fn flipped_byte_in_an_index_file(place: Place) {
    let f = fixture(&place);
    let idx = common::first_object(&*f.backend, "index/").name;
    flip(&*f.backend, &idx, 50);
    let r = check(&f, false);
    let name = idx.rsplit('/').next().unwrap();
    assert!(r.problems.iter().any(|p| p.object.contains(name)), "{:?}", r.problems);
    assert!(matches!(restore_fails(&f), Error::Corrupt { .. }));
}

fn flipped_byte_in_a_snapshot(place: Place) {
    let f = fixture(&place);
    let snap = common::first_object(&*f.backend, "snapshots/").name;
    flip(&*f.backend, &snap, 40);
    let r = check(&f, false);
    let name = snap.rsplit('/').next().unwrap();
    assert!(r.problems.iter().any(|p| p.object.contains(name)), "{:?}", r.problems);
    assert!(matches!(restore_fails(&f), Error::Corrupt { .. }));
}

fn flipped_byte_in_config_or_key(place: Place) {
    let f = fixture(&place);
    flip(&*f.backend, "config", 20);
    let e = Repository::open(f.backend.clone(), Some(common::PASS)).unwrap_err();
    assert!(e.to_string().contains("config"), "{e}");
    // Flipped back, the repository opens; then a damaged key file keeps it shut.
    flip(&*f.backend, "config", 20);
    Repository::open(f.backend.clone(), Some(common::PASS)).unwrap();
    let key = common::first_object(&*f.backend, "keys/");
    flip(&*f.backend, &key.name, key.size - 30);
    assert!(Repository::open(f.backend.clone(), Some(common::PASS)).is_err());
}

fn wrong_passphrase_is_one_clear_line(place: Place) {
    let f = fixture(&place);
    let e = Repository::open(f.backend.clone(), Some(b"not it")).unwrap_err();
    assert!(matches!(e, Error::WrongPassphrase { .. }));
    let msg = e.to_string();
    assert!(msg.starts_with("wrong passphrase") && !msg.contains('\n'), "{msg}");
}

fn repair_salvages_intact_blobs_and_names_what_is_lost(place: Place) {
    let f = fixture(&place);
    let repo = common::reopen(f.backend.clone());
    let loc = repo.index().iter().find(|l| l.entry.kind == BlobKind::Data && l.entry.stored_len > 10_000).unwrap();
    flip(&*f.backend, &repo_format::repofile::pack_name(&loc.pack), loc.entry.offset as u64 + 100);
    let mut repo = Repository::open(f.backend.clone(), Some(common::PASS)).unwrap();
    let r = repo_format::ops::repair::repair(&mut repo, true).unwrap();
    assert_eq!(r.damaged_blobs, vec![loc.entry.id]);
    assert_eq!(r.damaged_snapshots.len(), 1);
    assert_eq!(r.damaged_snapshots[0].1, vec!["/big".to_string()]);
    // Everything else is still there: the small files restore.
    let after = check(&f, true);
    assert!(after.problems.iter().all(|p| p.object.contains("/big")), "{:?}", after.problems);
}
