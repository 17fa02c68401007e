//! Test child for the crash-safety test: writes snapshots, prunes and compacts in a loop until
//! killed, announcing each step on stdout so the test knows what was committed.
//!
//! Usage: torture REPO WORKDIR FIRST_SEED, where REPO is a folder or `s3://bucket/prefix` on the
//! server named by `TORTURE_S3_ENDPOINT`.
//!
//! With `TORTURE_KILL_AT_DELETE=N` the child sends itself SIGKILL just before its N-th snapshot
//! deletion (counting from 0), so that kills land inside prune, whose window is too short for a
//! timer to hit often.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use repo_format::locking;
use repo_format::ops::{compact, prune};
use repo_format::retention::Policy;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The test reads these lines after killing us: each must be out before the next step.
    writeln!(out, "{line}").and_then(|_| out.flush()).expect("stdout");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let work = PathBuf::from(&args[2]);
    let mut seed: u64 = args[3].parse().expect("seed");
    let endpoint = std::env::var("TORTURE_S3_ENDPOINT").ok();
    let mut repo =
        magpie_tests::open_on(magpie_tests::backend_at(&args[1], endpoint.as_deref())).expect("open repository");
    let data = work.join("data");
    let kill_at: Option<usize> = std::env::var("TORTURE_KILL_AT_DELETE").ok().and_then(|v| v.parse().ok());
    let mut deletes = 0usize;
    loop {
        magpie_tests::make_dataset(&data, seed);
        say("phase backup");
        {
            let _l = locking::lock(&repo, false, "torture backup", Duration::from_secs(30)).expect("shared lock");
            let id = magpie_tests::backup(&mut repo, &data, seed).expect("backup");
            say(&format!("committed {id} {seed}"));
        }
        if seed % 3 == 2 {
            let _l = locking::lock(&repo, true, "torture prune", Duration::from_secs(30)).expect("exclusive lock");
            say("phase prune");
            let plan = prune::plan(&repo, &Policy { last: 2, ..Default::default() }, chrono::Utc::now(), &chrono::Utc)
                .expect("plan");
            for d in plan.iter().filter(|d| d.keep.is_none()) {
                if kill_at == Some(deletes) {
                    sigkill_self();
                }
                deletes += 1;
                say(&format!("forgetting {}", d.id));
                repo.delete_snapshot(&d.id).expect("delete snapshot");
            }
            say("phase compact");
            compact::compact(&mut repo, compact::CompactOptions { max_garbage: 0.05 }).expect("compact");
        }
        seed += 1;
    }
}

fn sigkill_self() -> ! {
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill").args(["-9", &pid]).status();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
