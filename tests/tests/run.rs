//! `collector run`, the timer's job, against a real agent and a real SMTP server (aiosmtpd):
//! the mail on failure, staleness, the exit codes, the metrics file and `collector status`.

use std::fs;
use std::path::Path;

use magpie_tests::servers::Smtp;
use magpie_tests::{Agent, Collector, Pki};

struct Stack {
    tmp: tempfile::TempDir,
    _agent: Agent,
    collector: Collector,
    smtp: Smtp,
}

/// An agent with a working path source and a dump source whose command fails; a collector
/// configured to mail through the test's SMTP server, keep state and write metrics.
fn stack(agent_sources: &[&str]) -> Stack {
    let tmp = tempfile::tempdir().unwrap();
    let files = tmp.path().join("files");
    fs::create_dir_all(&files).unwrap();
    fs::write(files.join("a.txt"), magpie_tests::text(20_000, 1)).unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let agent_dir = tmp.path().join("agent");
    fs::create_dir_all(&agent_dir).unwrap();
    let sources = format!(
        "[[source]]\nname = \"files\"\nkind = \"path\"\nroots = [{files:?}]\n\
         [[source]]\nname = \"broken\"\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"echo 'cannot reach the search cluster' >&2; exit 7\"]\n\
         [spool]\ndir = {:?}\n",
        tmp.path().join("spool")
    );
    let agent = Agent::start(&agent_dir, &pki, &[pki.fingerprint("collector")], &sources);
    let collector = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    let smtp = Smtp::start(&tmp.path().join("smtp"));
    let config = fs::read_to_string(&collector.config).unwrap();
    let list: Vec<String> = agent_sources.iter().map(|s| format!("{s:?}")).collect();
    fs::write(
        &collector.config,
        format!(
            "state_dir = {:?}\n{config}sources = [{}]\n\
             [retention]\nkeep_daily = 7\nkeep_weekly = 4\n\
             [run]\nmax_age = \"36H\"\nverify_days = 3\nmetrics_file = {:?}\n\
             [mail]\nfrom = \"magpie@backup.example.org\"\nto = [\"ops@example.org\"]\nsmtp = \"127.0.0.1:{}\"\nsecurity = \"none\"\n",
            tmp.path().join("state"),
            list.join(", "),
            tmp.path().join("magpie.prom"),
            smtp.port
        ),
    )
    .unwrap();
    Stack { tmp, _agent: agent, collector, smtp }
}

fn run(s: &Stack) -> (i32, serde_json::Value, String) {
    let out = s.collector.run(&["run", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v, format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// Parse the Prometheus text format: HELP and TYPE before a family's samples, names and label
/// names well formed, label values quoted, values numbers. Returns "name{labels}" → value.
fn parse_prometheus(text: &str) -> std::collections::BTreeMap<String, f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
    };
    let mut typed = std::collections::BTreeSet::new();
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name_ok(name), "bad metric name in {line:?}");
            if kw == "TYPE" {
                assert!(["gauge", "counter", "untyped"].contains(&parts.next().unwrap()), "{line:?}");
                typed.insert(name.to_string());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name) && typed.contains(name), "sample before its TYPE: {line:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).expect("braces");
            for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(name_ok(k) && v.starts_with('"'), "bad label in {line:?}");
            }
        }
        out.insert(series.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}")));
    }
    out
}

#[test]
fn a_failing_source_is_mailed_the_other_is_committed_and_metrics_and_status_tell() {
    let mut s = stack(&["files", "broken"]);
    let (code, report, all) = run(&s);
    assert_eq!(code, 4, "some sources failed: {all}");
    assert_eq!(report["outcome"], "failed");
    let sources = report["sources"].as_array().unwrap();
    let files = sources.iter().find(|x| x["source"] == "files").unwrap();
    assert_eq!(files["status"], "ok", "{all}");
    assert!(files["snapshot"].is_string());
    let broken = sources.iter().find(|x| x["source"] == "broken").unwrap();
    assert_eq!(broken["status"], "failed");
    assert_eq!(report["check_clean"], true);
    let repo = s.collector.repo();
    let snaps = repo.snapshots().unwrap();
    assert_eq!(snaps.iter().filter(|(_, x)| x.source == "files").count(), 1);
    assert_eq!(snaps.iter().filter(|(_, x)| x.source == "broken").count(), 0);

    // One mail, naming the failing source and its error.
    let mails = s.smtp.messages();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let mail = &mails[0];
    assert!(mail.contains("Subject: [magpie]") && mail.contains("FAILED (1 of 2 sources)"), "{mail}");
    assert!(mail.contains("main/broken: FAILED") && mail.contains("cannot reach the search cluster"), "{mail}");
    assert!(mail.contains("main/files: OK"), "{mail}");

    // The metrics parse and carry the series an alert needs.
    let m = parse_prometheus(&fs::read_to_string(s.tmp.path().join("magpie.prom")).unwrap());
    assert_eq!(m["magpie_source_up{agent=\"main\",source=\"files\"}"], 1.0, "{m:?}");
    assert_eq!(m["magpie_source_up{agent=\"main\",source=\"broken\"}"], 0.0, "{m:?}");
    assert_eq!(m["magpie_run_exit_code"], 4.0);
    assert!(m["magpie_last_success_timestamp_seconds{agent=\"main\",source=\"files\"}"] > 1.7e9);
    assert!(m["magpie_repository_size_bytes"] > 0.0);

    // status: the failure and why, the run that happened.
    let out = s.collector.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(4), "a failing source is a problem");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = st["sources"].as_array().unwrap().iter().find(|x| x["source"] == "broken").unwrap();
    assert!(b["last_error"].as_str().unwrap().contains("cannot reach the search cluster"), "{st}");
    assert_eq!(st["last_run_outcome"], "failed");
    assert!(st["last_check"].is_string());

    // The mail cannot go out: that is its own exit code, never swallowed.
    s.smtp.stop();
    let (code, report, all) = run(&s);
    assert_eq!(code, 6, "{all}");
    assert!(report["mail_error"].is_string());
}

#[test]
fn a_stale_source_is_a_failure_on_an_otherwise_clean_run() {
    let s = stack(&["files"]);
    let (code, _, all) = run(&s);
    assert_eq!(code, 0, "{all}");
    assert!(s.smtp.messages().is_empty(), "no mail when all is well");

    // A source that stopped being pulled: its last snapshot is three days old.
    let repo = s.collector.repo();
    let files = repo.snapshots().unwrap().into_iter().find(|(_, x)| x.source == "files").unwrap().1;
    let old = repo_format::Snapshot {
        source: "legacy".into(),
        time_ns: files.time_ns - 3 * 86_400 * 1_000_000_000,
        ..files.clone()
    };
    repo.save_snapshot(&old).unwrap();
    // Two earlier snapshots of `files` the same day, for retention to work on.
    for minutes in [1, 2] {
        let earlier = repo_format::Snapshot { time_ns: files.time_ns - minutes * 60 * 1_000_000_000, ..files.clone() };
        repo.save_snapshot(&earlier).unwrap();
    }
    let (code, report, all) = run(&s);
    assert_eq!(code, 4, "{all}");
    // Four snapshots of `files` today: the newest stays, and (as borg does, while keep_daily is
    // not filled) the oldest; the two between go.
    assert_eq!(report["snapshots_pruned"], 2, "{all}");
    let left = s.collector.repo().snapshots().unwrap();
    let mut kept: Vec<i64> = left.iter().filter(|(_, x)| x.source == "files").map(|(_, x)| x.time_ns).collect();
    kept.sort();
    assert_eq!(kept.len(), 2, "{all}");
    assert_eq!(kept[0], files.time_ns - 2 * 60 * 1_000_000_000, "the oldest stays");
    assert_eq!(left.iter().filter(|(_, x)| x.source == "legacy").count(), 1, "{all}");
    let legacy = report["sources"].as_array().unwrap().iter().find(|x| x["source"] == "legacy").unwrap().clone();
    assert_eq!(legacy["status"], "stale", "{all}");
    let mails = s.smtp.messages();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(mails[0].contains("main/legacy: STALE") && mails[0].contains("max_age"), "{}", mails[0]);
}

#[test]
fn the_systemd_units_verify() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let bin = magpie_tests::workspace_bin("collector");
    let bin_dir = bin.parent().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for e in fs::read_dir(&deploy).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".service") || name.ends_with(".timer") {
            // The units name the installed binaries; here they are the ones just built.
            let text =
                fs::read_to_string(e.path()).unwrap().replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
            fs::write(tmp.path().join(&name), text).unwrap();
            units.push(tmp.path().join(&name));
        }
    }
    assert_eq!(units.len(), 3, "agent service, collector service and timer");
    let out =
        std::process::Command::new("systemd-analyze").arg("verify").args(&units).output().expect("systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify: {text}");
}
