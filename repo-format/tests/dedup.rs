//! Deduplication: unchanged data is stored once; an insertion re-stores only nearby chunks.
//! Each test runs on a local folder and on S3-compatible storage.

mod common;

use std::fs;

use common::Place;

on_every_backend!(same_data_twice_adds_only_metadata, insertion_restores_only_chunks_around_it);

fn same_data_twice_adds_only_metadata(place: Place) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("big"), common::noise(3 << 20, 1)).unwrap();
    for i in 0..50 {
        fs::write(src.join("sub").join(format!("f{i}")), common::text(1000 + i * 10, i as u64)).unwrap();
    }
    let mut repo = common::init(&place.backend);
    let (_, first) = common::backup(&mut repo, &src, "s");
    assert!(first.blobs_added > 10);
    let size_after_first = repo.stored_bytes().unwrap();
    let (_, second) = common::backup(&mut repo, &src, "s");
    assert_eq!(second.blobs_added, 0, "an unchanged tree re-uses every data and tree blob");
    let grown = repo.stored_bytes().unwrap() - size_after_first;
    assert!(grown < 2048, "the second snapshot added {grown} bytes; only a snapshot object was expected");
}

fn insertion_restores_only_chunks_around_it(place: Place) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut data = common::noise(8 << 20, 2);
    fs::write(src.join("big"), &data).unwrap();
    let mut repo = common::init(&place.backend);
    let (_, first) = common::backup(&mut repo, &src, "s");
    data.splice(4_000_000..4_000_000, b"a few inserted bytes".iter().copied());
    fs::write(src.join("big"), &data).unwrap();
    let (snap, second) = common::backup(&mut repo, &src, "s");
    // Chunks average 16 KiB, max 64 KiB: at most a few data chunks plus one tree.
    assert!(second.blobs_added <= 4, "{} blobs added", second.blobs_added);
    assert!(second.bytes_added < 3 * 64 * 1024, "{} bytes added", second.bytes_added);
    assert!(first.bytes_added > 8_000_000);
    let out = tmp.path().join("out");
    common::restore(&repo, &snap, &out);
    assert_eq!(fs::read(out.join("big")).unwrap(), data);
}
