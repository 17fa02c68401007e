//! Two writers commit side by side; an exclusive operation refuses, or waits, while one writes.
//! Each test runs on a local folder and on S3-compatible storage.

mod common;

use std::fs;
use std::time::Duration;

use common::Place;
use repo_format::{Error, locking};

on_every_backend!(
    two_writers_both_commit,
    exclusive_lock_refuses_while_a_writer_holds_its_lock_then_waits,
    lock_of_a_dead_process_is_stale_and_cleared,
);

fn two_writers_both_commit(place: Place) {
    let tmp = tempfile::tempdir().unwrap();
    common::init(&place.backend);
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let backend = place.backend.clone();
            let src = tmp.path().join(format!("src{i}"));
            fs::create_dir_all(&src).unwrap();
            fs::write(src.join("shared"), common::noise(1 << 20, 99)).unwrap();
            fs::write(src.join("own"), common::noise(1 << 20, i)).unwrap();
            std::thread::spawn(move || {
                let mut repo = common::reopen(backend);
                let _lock = locking::lock(&repo, false, "test writer", Duration::ZERO).unwrap();
                let (id, _) = common::backup(&mut repo, &src, &format!("s{i}"));
                (id, src)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut repo = common::reopen(place.backend.clone());
    assert_eq!(repo.snapshot_ids().unwrap().len(), 2);
    for (i, (id, src)) in results.iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        common::restore(&repo, id, &out);
        assert_eq!(common::snapshot_dir(src), common::snapshot_dir(&out));
    }
    let r = repo_format::ops::check::check(&mut repo, Default::default()).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert!(place.backend.list("locks/").unwrap().is_empty(), "locks are removed when released");
}

fn exclusive_lock_refuses_while_a_writer_holds_its_lock_then_waits(place: Place) {
    let repo = common::init(&place.backend);
    let writer = locking::lock(&repo, false, "collector pull", Duration::ZERO).unwrap();
    let e = locking::lock(&repo, true, "collector prune", Duration::ZERO).unwrap_err();
    let Error::Locked { holder, advice } = &e else { panic!("{e}") };
    assert!(holder.contains("collector pull") && holder.contains(&std::process::id().to_string()), "{holder}");
    assert!(advice.contains("collector unlock"));
    assert!(!e.to_string().contains('\n'));
    // A second writer is fine.
    drop(locking::lock(&repo, false, "another pull", Duration::ZERO).unwrap());
    // With a wait, prune gets the lock once the writer is done.
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        drop(writer);
    });
    let ex = locking::lock(&repo, true, "collector prune", Duration::from_secs(10)).unwrap();
    release.join().unwrap();
    // And while prune holds it, a writer is refused.
    assert!(matches!(locking::lock(&repo, false, "collector pull", Duration::ZERO), Err(Error::Locked { .. })));
    drop(ex);
}

fn lock_of_a_dead_process_is_stale_and_cleared(place: Place) {
    let repo = common::init(&place.backend);
    let backend = &*place.backend;
    // A lock whose holder died before it could release it.
    let lock = locking::lock(&repo, true, "doomed", Duration::ZERO).unwrap();
    let name = common::first_object(backend, "locks/").name;
    let bytes = backend.get(&name, None).unwrap();
    std::mem::forget(lock);
    backend.delete(&name).unwrap();
    // The same lock, as if held by a pid that no longer runs.
    let keys = repo.keys();
    let plain = keys.open(repo_format::magic::Domain::Lock, &bytes).unwrap();
    let mut l: repo_format::repofile::lock::LockFile = prost::Message::decode(plain.as_slice()).unwrap();
    l.pid = 4_000_000; // above pid_max: no such process
    let sealed = keys.seal(repo_format::magic::Domain::Lock, &prost::Message::encode_to_vec(&l));
    backend.put_if_absent(&format!("locks/{}", repo_format::Id::of_stored(&sealed).to_hex()), &sealed).unwrap();
    let locks = locking::list_locks(backend, repo.keys()).unwrap();
    assert!(locks[0].stale);
    // A new exclusive lock is granted and the stale one removed.
    let g = locking::lock(&repo, true, "prune", Duration::ZERO).unwrap();
    assert_eq!(locking::list_locks(backend, repo.keys()).unwrap().len(), 1);
    drop(g);
}
