//! Dump content is compressed with a dictionary trained on a session's first dump chunks: it reads
//! back byte for byte, stores markedly less than the same chunks compressed alone, is used again
//! by the next session, survives compact, and a lost dictionary is reported by check. A changed
//! chunk stored against the chunk it replaces (its base) reads back, keeps its base through prune
//! and compact, and a lost base is reported.

mod common;

use common::Place;
use prost::Message;
use repo_format::archive::{ChunkedContent, FileContent, Origin};
use repo_format::ops::{check, compact, repair};
use repo_format::repofile::DICT_DIR;
use repo_format::repofile::pack::{self, BlobCompressor};
use repo_format::repofile::tree::{ChunkRef, Node, NodeKind, Tree};
use repo_format::{BlobKind, Id, Repository, Snapshot, WriteStats, Writer};

on_every_backend!(dump_chunks_share_a_trained_dictionary);

/// A table dump's rows: ids, user names and text drawn from a fixed vocabulary, as in a forum's
/// posts table.
fn dump(bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let vocabulary: Vec<String> = (0..1500)
        .map(|_| {
            let len = 2 + next() % 9;
            (0..len).map(|_| (b'a' + (next() % 26) as u8) as char).collect()
        })
        .collect();
    for _ in 0..seed {
        next();
    }
    let mut out = b"COPY public.posts (id, author, body) FROM stdin;\n".to_vec();
    let mut row = 0;
    while out.len() < bytes {
        row += 1;
        let words: Vec<&str> = (0..10 + next() % 70).map(|_| vocabulary[(next() % 1500) as usize].as_str()).collect();
        out.extend_from_slice(format!("{row}\tuser{}\t{}\n", next() % 5000, words.join(" ")).as_bytes());
    }
    out
}

/// Store `data` as dump content (with the dictionary `reuse`, if given) or, with `as_dump` false,
/// with the same chunker but as ordinary file content.
fn store(repo: &mut Repository, data: &[u8], as_dump: bool, reuse: Option<Id>) -> (FileContent, WriteStats) {
    let mut w = Writer::new(repo, 2);
    if let Some(d) = reuse {
        w.use_dictionary(&d).unwrap();
    }
    let chunker = repo.chunker(true).unwrap();
    let mut c = if as_dump { ChunkedContent::dump(chunker) } else { ChunkedContent::new(chunker) };
    for piece in data.chunks(1 << 20) {
        c.push(&mut w, piece).unwrap();
    }
    let content = c.finish(&mut w).unwrap();
    let (index, stats) = w.finish().unwrap();
    if let Some((id, f)) = index {
        repo.add_index(id, &f);
    }
    (content, stats)
}

/// Commit `content` as the one file of a snapshot of the dump source, with its dictionary.
fn commit(repo: &mut Repository, content: &FileContent, stats: &WriteStats, day: i64) {
    let node = Node {
        name: b"app.sql".to_vec(),
        kind: NodeKind::File as i32,
        size: content.size,
        content: content.chunks.clone(),
        ..Default::default()
    };
    let mut w = Writer::new(repo, 1);
    let root = w.add(BlobKind::Tree, Tree { version: 1, nodes: vec![node] }.encode_to_vec()).unwrap();
    if let (Some((id, f)), _) = w.finish().unwrap() {
        repo.add_index(id, &f);
    }
    let snap = Snapshot {
        version: 1,
        time_ns: day * 86_400_000_000_000,
        agent: "a".into(),
        source: "db".into(),
        tree: root.0.to_vec(),
        dictionary: stats.dictionary.map(|d| d.0.to_vec()).unwrap_or_default(),
        ..Default::default()
    };
    repo.save_snapshot(&snap).unwrap();
}

fn read_back(repo: &Repository, chunks: &[ChunkRef]) -> repo_format::Result<Vec<u8>> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&repo.read_blob(&Id::from_slice(&c.id).unwrap())?);
    }
    Ok(out)
}

fn dictionaries(place: &Place) -> Vec<String> {
    place.backend.list(DICT_DIR).unwrap().into_iter().map(|o| o.name).collect()
}

fn dump_chunks_share_a_trained_dictionary(place: Place) {
    let day1 = dump(8 << 20, 1);
    let mut repo = common::init(&place.backend);
    let (content, stats) = store(&mut repo, &day1, true, None);
    let dictionary = stats.dictionary.expect("8 MB of dump content trains a dictionary");
    assert_eq!(dictionaries(&place), vec![format!("{DICT_DIR}{dictionary}")]);
    assert_eq!(read_back(&repo, &content.chunks).unwrap(), day1);
    commit(&mut repo, &content, &stats, 1);

    // The same chunks compressed one by one, in a repository of their own.
    let alone = Place::local();
    let mut other = common::init(&alone.backend);
    let (_, without) = store(&mut other, &day1, false, None);
    assert_eq!(without.dictionary, None);
    assert!(
        stats.stored_bytes * 100 < without.stored_bytes * 85,
        "with the dictionary {} bytes, without {}: the dictionary should save at least 15%",
        stats.stored_bytes,
        without.stored_bytes
    );

    // The next day: some rows changed; the session is given the dictionary and trains none.
    let mut day2 = day1.clone();
    let edit = b"an edited row";
    for i in (100_000..day2.len()).step_by(250_000) {
        day2[i..i + edit.len()].copy_from_slice(edit);
    }
    let (content2, stats2) = store(&mut repo, &day2, true, Some(dictionary));
    assert_eq!(stats2.dictionary, Some(dictionary));
    assert_eq!(dictionaries(&place).len(), 1);
    commit(&mut repo, &content2, &stats2, 2);
    let fresh = common::reopen(place.backend.clone());
    assert_eq!(read_back(&fresh, &content2.chunks).unwrap(), day2, "a new handle finds the dictionary in storage");

    // Compact rewrites packs; the dictionary stays and the blobs still open.
    let mut repo = common::reopen(place.backend.clone());
    let first = repo.snapshots().unwrap()[0].0;
    repo.delete_snapshot(&first).unwrap();
    let compacted = compact::compact(&mut repo, compact::CompactOptions { max_garbage: 0.0 });
    assert!(compacted.unwrap().packs_deleted > 0);
    assert_eq!(read_back(&repo, &content2.chunks).unwrap(), day2);
    let verify = check::CheckOptions { verify_data: true, ..Default::default() };
    let report = check::check(&mut repo, verify).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);

    // A lost dictionary: every blob compressed with it is reported, naming the dictionary.
    place.backend.delete(&format!("{DICT_DIR}{dictionary}")).unwrap();
    let mut repo = common::reopen(place.backend.clone());
    let err = read_back(&repo, &content2.chunks).unwrap_err().to_string();
    assert!(err.contains("dicts/"), "{err}");
    let report = check::check(&mut repo, verify).unwrap();
    assert!(report.problems.len() >= content2.chunks.len() / 2, "{} problems", report.problems.len());
    assert!(report.problems.iter().all(|p| p.message.contains("dictionary")), "{:?}", report.problems[0]);
    let without = check::check(&mut repo, Default::default()).unwrap();
    assert!(without.problems.iter().any(|p| p.message.contains("needs dictionary")), "{:?}", without.problems);
}

#[test]
fn a_small_dump_gets_no_dictionary() {
    let place = Place::local();
    let mut repo = common::init(&place.backend);
    let small = dump(300_000, 2);
    let (content, stats) = store(&mut repo, &small, true, None);
    assert_eq!(stats.dictionary, None);
    assert!(dictionaries(&place).is_empty());
    assert_eq!(read_back(&repo, &content.chunks).unwrap(), small);
}

#[test]
fn a_damaged_dictionary_is_reported_by_check() {
    let place = Place::local();
    let mut repo = common::init(&place.backend);
    let (_, stats) = store(&mut repo, &dump(3 << 20, 3), true, None);
    let name = format!("{DICT_DIR}{}", stats.dictionary.unwrap());
    common::flip(&*place.backend, &name, 100);
    let report = check::check(&mut common::reopen(place.backend.clone()), Default::default()).unwrap();
    assert!(report.problems.iter().any(|p| p.object == name), "{:?}", report.problems);
}

#[test]
fn a_dictionary_zstd_cannot_load_is_an_error_not_a_panic() {
    let place = Place::local();
    let repo = common::init(&place.backend);
    // zstd's dictionary magic and an id, then tables that are not tables.
    let mut bad = vec![0x37, 0xA4, 0x30, 0xEC, 1, 0, 0, 0];
    bad.extend(std::iter::repeat_n(0xFF, 300));
    let err = repo.dictionaries().store(bad).unwrap_err();
    assert!(matches!(err, repo_format::Error::Corrupt { .. }), "{err}");
    let stored = rf_id(&dictionaries(&place)[0]);
    let err = common::reopen(place.backend.clone()).dictionaries().load(&stored).unwrap_err();
    assert!(err.to_string().contains("zstd cannot load it"), "{err}");
}

fn rf_id(name: &str) -> Id {
    repo_format::repofile::id_of_name(name).unwrap()
}

/// Store `data` as dump content with the dictionary `reuse`, saying that each byte was copied
/// from the chunk of `previous` at the same offset (as an rsync delta of in-place edits would).
fn store_against(repo: &mut Repository, data: &[u8], previous: &FileContent, reuse: Id) -> (FileContent, WriteStats) {
    let mut w = Writer::new(repo, 2);
    w.use_dictionary(&reuse).unwrap();
    let mut c = ChunkedContent::dump(repo.chunker(true).unwrap());
    let mut origins = Vec::new();
    let mut at = 0;
    for chunk in &previous.chunks {
        let blob = Id::from_slice(&chunk.id).unwrap();
        let base = Some((blob, std::sync::Arc::new(repo.read_blob(&blob).unwrap())));
        origins.push(Origin { at, len: chunk.length as u64, blob, from: 0, whole: false, base });
        at += chunk.length as u64;
    }
    c.push_from(&mut w, data, origins).unwrap();
    let content = c.finish(&mut w).unwrap();
    let (index, stats) = w.finish().unwrap();
    if let Some((id, f)) = index {
        repo.add_index(id, &f);
    }
    (content, stats)
}

#[test]
fn changed_dump_chunks_are_stored_against_the_chunks_they_replace() {
    let place = Place::local();
    let mut repo = common::init(&place.backend);
    let day1 = dump(6 << 20, 4);
    let (content1, stats1) = store(&mut repo, &day1, true, None);
    let dictionary = stats1.dictionary.unwrap();
    commit(&mut repo, &content1, &stats1, 1);
    let mut day2 = day1.clone();
    let edit = b"an edited row";
    for i in (50_000..day2.len()).step_by(20_000) {
        day2[i..i + edit.len()].copy_from_slice(edit);
    }

    let (content2, stats2) = store_against(&mut repo, &day2, &content1, dictionary);
    // Each new chunk compressed with the dictionary alone, as before bases.
    let d = repo.dictionaries().load(&dictionary).unwrap();
    let mut compressor = BlobCompressor::new(repo.config().compression_level).unwrap();
    let new: Vec<&ChunkRef> = content2.chunks.iter().filter(|c| !content1.chunks.contains(c)).collect();
    let alone: usize = new
        .iter()
        .map(|c| {
            let raw = repo.read_blob(&Id::from_slice(&c.id).unwrap()).unwrap();
            pack::encode_blob(repo.keys(), BlobKind::Data, &raw, Some(&mut compressor), Some(&d)).len()
        })
        .sum();
    assert_eq!(stats2.blobs, new.len() as u64);
    assert!(
        stats2.stored_bytes * 5 < alone as u64,
        "against their bases {} bytes, with the dictionary alone {alone}: bases should save four fifths",
        stats2.stored_bytes,
    );
    let based: Vec<(Id, Id)> = repo.index().iter().filter_map(|l| Some((l.entry.id, l.entry.base?))).collect();
    assert!(based.len() as u64 * 10 >= stats2.blobs * 9, "{} of {} blobs have a base", based.len(), stats2.blobs);
    assert_eq!(read_back(&common::reopen(place.backend.clone()), &content2.chunks).unwrap(), day2);
    commit(&mut repo, &content2, &stats2, 2);

    // Day 1 pruned: its chunks that are bases stay, the others go; everything still verifies.
    let mut repo = common::reopen(place.backend.clone());
    let first = repo.snapshots().unwrap()[0].0;
    repo.delete_snapshot(&first).unwrap();
    let compacted = compact::compact(&mut repo, compact::CompactOptions { max_garbage: 0.0 }).unwrap();
    assert!(compacted.blobs_removed > 0, "day 1's unchanged-and-unused chunks are removed");
    assert!(based.iter().all(|(_, base)| repo.index().contains(base)), "every base is kept");
    assert_eq!(read_back(&repo, &content2.chunks).unwrap(), day2);
    let verify = check::CheckOptions { verify_data: true, ..Default::default() };
    let report = check::check(&mut repo, verify).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);

    // The packs holding the bases lost, and the index rebuilt from what is left: check names
    // the blobs that cannot be read for want of their base, and reading says so.
    let base_packs: std::collections::HashSet<Id> = based.iter().map(|(_, b)| repo.locate(b).unwrap().pack).collect();
    let own_packs: std::collections::HashSet<Id> = based.iter().map(|(id, _)| repo.locate(id).unwrap().pack).collect();
    assert!(base_packs.is_disjoint(&own_packs), "day 2's blobs were written in packs of their own");
    for p in &base_packs {
        place.backend.delete(&repo_format::repofile::pack_name(p)).unwrap();
    }
    let mut repo = common::reopen(place.backend.clone());
    repair::repair(&mut repo, false).unwrap();
    let report = check::check(&mut repo, Default::default()).unwrap();
    let (lost, _) = based[0];
    assert!(
        report.problems.iter().any(|p| p.object == format!("blob {lost}") && p.message.contains("is missing")),
        "{:?}",
        report.problems
    );
    let err = repo.read_blob(&lost).unwrap_err().to_string();
    assert!(err.contains("its base") && err.contains("is missing"), "{err}");
}
