//! Crash safety: a child writing snapshots, pruning and compacting is killed with SIGKILL at
//! random points; after each kill the repository opens, checks clean with --verify-data (or is
//! made clean by --repair), and every snapshot committed before the kill restores exactly. On a
//! local folder and on S3-compatible storage (moto's server).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use magpie_tests::servers::S3Server;
use repo_format::Id;
use repo_format::Repository;
use repo_format::backend::Backend;
use repo_format::ops::{check, repair};

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) % n
}

#[test]
fn sigkill_at_random_points_never_damages_committed_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    torture(&tmp, repo_dir.to_str().unwrap(), None, 120, 5);
}

#[test]
fn sigkill_at_random_points_never_damages_committed_snapshots_on_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&tmp.path().join("s3"), "torture");
    // Fewer rounds: every step is a request to a Python server, and the other test runs beside.
    torture(&tmp, "s3://torture/repo", Some(&s3.endpoint()), 40, 3);
}

/// `kills` rounds against the repository at `location`; at least `min_per_phase` of them must
/// land in each of backup, prune and compact. Where chance left a phase short, more rounds (at most
/// half as many again) aim at it: the child is killed a few milliseconds after it announces that phase
/// (prune: it kills itself there, as one round in three does anyway).
fn torture(tmp: &tempfile::TempDir, location: &str, endpoint: Option<&str>, kills: usize, min_per_phase: usize) {
    let backend: Arc<dyn Backend> = magpie_tests::backend_at(location, endpoint);
    Repository::init(backend.clone(), &magpie_tests::test_options()).unwrap();
    let torture = env!("CARGO_BIN_EXE_torture");

    let mut committed: HashMap<Id, u64> = HashMap::new();
    let mut forgetting: HashSet<Id> = HashSet::new();
    let mut killed_in: BTreeMap<String, usize> = BTreeMap::new();
    let mut next_seed = 0u64;
    let mut repairs = 0;
    for round in 0.. {
        let short = PHASES.into_iter().find(|p| killed_in.get(*p).copied().unwrap_or(0) < min_per_phase);
        if round >= kills && short.is_none() {
            break;
        }
        assert!(round < kills + kills / 2, "too few kills during {short:?} after {round} rounds: {killed_in:?}");
        let aim = short.filter(|_| round >= kills);
        let work = tmp.path().join(format!("work{round}"));
        let mut cmd = Command::new(torture);
        cmd.arg(location).arg(&work).arg(next_seed.to_string()).stdout(Stdio::piped());
        if let Some(e) = endpoint {
            cmd.env("TORTURE_S3_ENDPOINT", e);
        }
        // One round in three kills itself inside prune (a window too short for the timer);
        // the others are killed by the timer wherever they are, or just after the phase aimed at.
        let self_kill = if aim.is_some() { aim == Some("prune") } else { round % 3 == 1 };
        let wait_ms = if self_kill {
            // Aimed: at the first delete, which every prune that deletes reaches.
            let at = if aim.is_some() { 0 } else { random_below(3) };
            cmd.env("TORTURE_KILL_AT_DELETE", at.to_string());
            3000
        } else if aim.is_some() {
            60_000
        } else {
            20 + random_below(600)
        };
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
        let mut lines = Vec::new();
        let mut deadline = std::time::Instant::now() + Duration::from_millis(wait_ms);
        while std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            for line in rx.try_iter() {
                if aim.is_some_and(|p| line == format!("phase {p}")) {
                    deadline = std::time::Instant::now() + Duration::from_millis(random_below(20));
                }
                lines.push(line);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        assert!(status.code().is_none(), "the child stopped by itself: {status}");
        // The child is gone, so its pipe ends and the reader with it.
        lines.extend(rx.iter());
        let mut phase = "startup".to_string();
        for line in lines {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["phase", p] => phase = p.to_string(),
                ["committed", id, seed] => {
                    let seed: u64 = seed.parse().unwrap();
                    committed.insert(id.parse().unwrap(), seed);
                    next_seed = next_seed.max(seed + 1);
                    phase = "after-commit".into();
                }
                ["forgetting", id] => {
                    forgetting.insert(id.parse().unwrap());
                }
                _ => panic!("unexpected line from the child: {line}"),
            }
        }
        *killed_in.entry(phase).or_default() += 1;
        let _ = std::fs::remove_dir_all(&work);

        // The repository opens and checks clean, or repair makes it clean.
        let mut repo = Repository::open(backend.clone(), Some(magpie_tests::PASS))
            .unwrap_or_else(|e| panic!("round {round}: repository does not open after a kill: {e}"));
        let report = check::check(&mut repo, check::CheckOptions { verify_data: true, ..Default::default() }).unwrap();
        if !report.is_clean() {
            repairs += 1;
            let r = repair::repair(&mut repo, true).unwrap();
            assert!(r.nothing_lost(), "round {round}: repair lost data: {r:?}");
            let again =
                check::check(&mut repo, check::CheckOptions { verify_data: true, ..Default::default() }).unwrap();
            assert!(again.is_clean(), "round {round}: not clean after repair: {:?}", again.problems);
        }

        // Every snapshot committed and not being forgotten is there and restores exactly.
        let repo = magpie_tests::open_on(backend.clone()).unwrap();
        let present: HashSet<Id> = repo.snapshot_ids().unwrap().into_iter().collect();
        for (id, seed) in &committed {
            if forgetting.contains(id) {
                continue;
            }
            assert!(present.contains(id), "round {round}: committed snapshot {id} (seed {seed}) is gone");
            let out = tmp.path().join("restore");
            let _ = std::fs::remove_dir_all(&out);
            let snap = repo.load_snapshot(id).unwrap();
            repo_format::fs::restore(&repo, &Id::from_slice(&snap.tree).unwrap(), &out).unwrap();
            let expected = tmp.path().join("expected");
            magpie_tests::make_dataset(&expected, *seed);
            assert_eq!(
                magpie_tests::read_tree(&out),
                magpie_tests::read_tree(&expected),
                "round {round}: snapshot {id} differs"
            );
        }
        committed.retain(|id, _| present.contains(id));
    }
    eprintln!("kills by phase: {killed_in:?}; rounds that needed repair: {repairs}; next seed {next_seed}");
}

/// The phases every torture run must kill in.
const PHASES: [&str; 3] = ["backup", "prune", "compact"];
