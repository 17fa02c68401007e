//! Arbitrary trees go in and come back byte-identical, with their metadata, from a local folder
//! and from S3-compatible storage.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::Place;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Item {
    File { size: usize, seed: u64, mode: u32, xattr: bool },
    Dir(Vec<(String, Item)>),
    Symlink(String),
    Hardlink(usize),
}

fn item() -> impl Strategy<Value = Item> {
    let leaf = prop_oneof![
        6 => (prop_oneof![0usize..10, 10usize..5000, 5000usize..300_000], any::<u64>(), prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o4755, 0o444]), any::<bool>())
            .prop_map(|(size, seed, mode, xattr)| Item::File { size, seed, mode, xattr }),
        1 => "[a-z./]{1,20}".prop_map(Item::Symlink),
        1 => (0usize..8).prop_map(Item::Hardlink),
    ];
    leaf.prop_recursive(3, 40, 8, |inner| {
        prop::collection::btree_map("[a-zA-Z0-9_ .-]{1,12}", inner, 0..8)
            .prop_map(|m| Item::Dir(m.into_iter().filter(|(n, _)| n != "." && n != "..").collect()))
    })
}

fn build(dir: &Path, entries: &[(String, Item)], files: &mut Vec<std::path::PathBuf>) {
    fs::create_dir_all(dir).unwrap();
    for (name, it) in entries {
        let p = dir.join(name);
        match it {
            Item::File { size, seed, mode, xattr } => {
                let data = if seed % 2 == 0 { common::text(*size, *seed) } else { common::noise(*size, *seed) };
                fs::write(&p, data).unwrap();
                if *xattr {
                    xattr::set(&p, "user.magpie", &seed.to_le_bytes()).unwrap();
                }
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
                files.push(p);
            }
            Item::Dir(sub) => build(&p, sub, files),
            Item::Symlink(target) => std::os::unix::fs::symlink(target, &p).unwrap(),
            Item::Hardlink(i) => {
                if let Some(first) = files.get(*i) {
                    fs::hard_link(first, &p).unwrap();
                }
            }
        }
    }
}

/// Build `tree`, back it up to `place`, reopen the repository and restore: the same tree.
fn round_trip(place: Place, tree: BTreeMap<String, Item>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let entries: Vec<_> = tree.into_iter().collect();
    let mut files = Vec::new();
    build(&src, &entries, &mut files);
    // Set a fixed, distinct mtime on everything, directories last.
    let mut all: Vec<_> = walk_paths(&src);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        if !fs::symlink_metadata(p).unwrap().file_type().is_symlink() {
            let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000 + i as u64, 123_456_789);
            fs::File::open(p).unwrap().set_modified(t).unwrap();
        }
    }
    let mut repo = common::init(&place.backend);
    let (snap, _) = common::backup(&mut repo, &src, "prop");
    let repo = common::reopen(place.backend.clone());
    let out = tmp.path().join("out");
    common::restore(&repo, &snap, &out);
    prop_assert_eq!(common::snapshot_dir(&src), common::snapshot_dir(&out));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_trees_round_trip_locally(tree in prop::collection::btree_map("[a-z0-9]{1,8}", item(), 0..10)) {
        round_trip(Place::local(), tree)?;
    }
}

proptest! {
    // Fewer cases: each one is a new repository on the S3 server.
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_trees_round_trip_on_s3(tree in prop::collection::btree_map("[a-z0-9]{1,8}", item(), 0..10)) {
        round_trip(Place::s3(), tree)?;
    }
}

on_every_backend!(unencrypted_repository_round_trips_too, file_content_equal_to_a_tree_encoding_is_not_confused);

fn walk_paths(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk_paths(&p));
        }
        out.push(p);
    }
    out
}

fn unencrypted_repository_round_trips_too(place: Place) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::write(src.join("a/b/big"), common::noise(700_000, 3)).unwrap();
    fs::write(src.join("a/small"), b"small").unwrap();
    let mut o = common::test_options();
    o.passphrase = None;
    let b = place.backend;
    let mut repo = repo_format::Repository::init(b.clone(), &o).unwrap();
    let (snap, _) = common::backup(&mut repo, &src, "plain");
    let mut repo = repo_format::Repository::open(b, None).unwrap();
    repo.load_index().unwrap();
    assert!(!repo.keys().encrypted());
    common::restore(&repo, &snap, &tmp.path().join("out"));
    assert_eq!(common::snapshot_dir(&src), common::snapshot_dir(&tmp.path().join("out")));
}

/// A file whose bytes equal a tree's encoding must not be taken for that tree (or vice versa):
/// blob ids are keyed per kind.
fn file_content_equal_to_a_tree_encoding_is_not_confused(place: Place) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("z-empty")).unwrap();
    // The tree of an empty directory encodes as 08 01 (version = 1): the root's only small
    // file holds exactly those bytes, so its data chunk has the same plaintext.
    fs::write(src.join("a"), [0x08, 0x01]).unwrap();
    let mut repo = common::init(&place.backend);
    let (snap, _) = common::backup(&mut repo, &src, "kinds");
    let mut repo = common::reopen(repo.backend().clone());
    common::restore(&repo, &snap, &tmp.path().join("out"));
    assert_eq!(fs::read(tmp.path().join("out/a")).unwrap(), [0x08, 0x01]);
    assert!(tmp.path().join("out/z-empty").is_dir());
    let r = repo_format::ops::check::check(&mut repo, Default::default()).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}
