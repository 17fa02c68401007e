//! Two writers commit side by side; an exclusive operation refuses, or waits, while one writes.

mod common;

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use repo_format::backend::LocalBackend;
use repo_format::{Error, locking};

#[test]
fn two_writers_both_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    common::local_repo(&dir);
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let dir = dir.clone();
            let src = tmp.path().join(format!("src{i}"));
            fs::create_dir_all(&src).unwrap();
            fs::write(src.join("shared"), common::noise(1 << 20, 99)).unwrap();
            fs::write(src.join("own"), common::noise(1 << 20, i)).unwrap();
            std::thread::spawn(move || {
                let mut repo = common::reopen(Arc::new(LocalBackend::new(&dir)));
                let _lock = locking::lock(&repo, false, "test writer", Duration::ZERO).unwrap();
                let (id, _) = common::backup(&mut repo, &src, &format!("s{i}"));
                (id, src)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let repo = common::reopen(Arc::new(LocalBackend::new(&dir)));
    assert_eq!(repo.snapshot_ids().unwrap().len(), 2);
    for (i, (id, src)) in results.iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        common::restore(&repo, id, &out);
        assert_eq!(common::snapshot_dir(src), common::snapshot_dir(&out));
    }
    let mut repo = repo;
    let r = repo_format::ops::check::check(&mut repo, Default::default()).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert!(fs::read_dir(dir.join("locks")).unwrap().next().is_none(), "locks are removed when released");
}

#[test]
fn exclusive_lock_refuses_while_a_writer_holds_its_lock_then_waits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let (_b, repo) = common::local_repo(&dir);
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

#[test]
fn lock_of_a_dead_process_is_stale_and_cleared() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let (_b, repo) = common::local_repo(&dir);
    // A child takes a lock and is killed before it can release it.
    let lock = locking::lock(&repo, true, "doomed", Duration::ZERO).unwrap();
    let name = fs::read_dir(dir.join("locks")).unwrap().next().unwrap().unwrap().path();
    let bytes = fs::read(&name).unwrap();
    std::mem::forget(lock);
    // Rewrite it as if held by a pid that no longer runs: same content but pid of a reaped child.
    fs::remove_file(&name).unwrap();
    let child = std::process::Command::new("true").spawn().unwrap().wait().unwrap();
    assert!(child.success());
    let keys = repo.keys();
    let plain = keys.open(repo_format::magic::Domain::Lock, &bytes).unwrap();
    let mut l: repo_format::repofile::lock::LockFile = prost::Message::decode(plain.as_slice()).unwrap();
    l.pid = 4_000_000; // above pid_max: no such process
    let sealed = keys.seal(repo_format::magic::Domain::Lock, &prost::Message::encode_to_vec(&l));
    fs::write(dir.join("locks").join(repo_format::Id::of_stored(&sealed).to_hex()), &sealed).unwrap();
    let locks = locking::list_locks(&**repo.backend(), repo.keys()).unwrap();
    assert!(locks[0].stale);
    // A new exclusive lock is granted and the stale one removed.
    let g = locking::lock(&repo, true, "prune", Duration::ZERO).unwrap();
    assert_eq!(locking::list_locks(&**repo.backend(), repo.keys()).unwrap().len(), 1);
    drop(g);
}
