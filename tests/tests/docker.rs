//! Docker volumes as sources, against a real Docker engine (Debian's docker.io) started here with
//! its own socket and data root: a copy in `pause` mode is one instant of a volume being written,
//! `stop` mode stops and starts every container sharing a volume (also when the pull dies half
//! way, and when the agent dies holding them; a second agent process leaves a live hold alone),
//! and a removed volume comes back from a restore with its labels and content.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use magpie_tests::servers::{BUSYBOX_IMAGE, Dockerd};
use magpie_tests::{Agent, Collector, Pki, tree_state, workspace_bin};

struct Setup {
    tmp: tempfile::TempDir,
    docker: Dockerd,
    pki: Pki,
    agent: Agent,
    collector: Collector,
}

impl Setup {
    /// An engine, and an agent serving `sources` (`SOCKET` stands for the engine's socket).
    fn new(top: &str, sources: &str) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let docker = Dockerd::start(&tmp.path().join("d"));
        let pki = Pki::new(&tmp.path().join("pki"));
        let agent_dir = tmp.path().join("agent");
        fs::create_dir_all(&agent_dir).unwrap();
        let sources = sources.replace("SOCKET", &docker.socket().display().to_string());
        let config = format!("{sources}\n[spool]\ndir = {:?}\n", tmp.path().join("spool"));
        let agent = Agent::start_full(
            &agent_dir,
            &pki,
            &[pki.fingerprint("collector")],
            top,
            &config,
            magpie_tests::free_port(),
        );
        let collector = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
        Setup { tmp, docker, pki, agent, collector }
    }

    /// A container running `script` with `volume` at /data.
    fn container(&self, name: &str, volume: &str, script: &str) {
        self.docker.run(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "--stop-timeout",
            "2",
            "-v",
            &format!("{volume}:/data"),
            BUSYBOX_IMAGE,
            "sh",
            "-c",
            script,
        ]);
    }

    fn pull_in_background(&self, source: &str) -> std::process::Child {
        Command::new(workspace_bin("collector"))
            .arg("--config")
            .arg(&self.collector.config)
            .args(["pull", "--json", "--source", source])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn restore_to(&self, out: &Path) -> PathBuf {
        let o = self.collector.run(&["restore", "latest", "--target-dir", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        out.join("main")
    }

    fn latest(&self) -> repo_format::Snapshot {
        let repo = self.collector.repo();
        repo.load_snapshot(&repo.find_snapshot("latest").unwrap()).unwrap()
    }
}

/// A container that sleeps and leaves promptly when stopped.
const IDLE: &str = "trap 'exit 0' TERM; while :; do sleep 0.2; done";

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn number(p: &Path) -> u64 {
    let text = fs::read_to_string(p).unwrap();
    text.trim().parse().unwrap_or_else(|_| panic!("{}: {text:?}", p.display()))
}

#[test]
fn pause_mode_copies_one_instant_of_a_volume_being_written_and_resumes_the_writer() {
    let s = Setup::new(
        "",
        "[[source]]\nname = \"pds\"\nkind = \"docker-volume\"\nvolume = \"pds\"\nconsistency = \"pause\"\ndocker_socket = \"SOCKET\"\n",
    );
    s.docker.run(&["volume", "create", "--label", "app=pds", "pds"]);
    // Between `a` and `z` in the listing, enough data that reading them apart takes a while.
    let mount = s.docker.mountpoint("pds");
    fs::write(mount.join("m-bulk"), magpie_tests::noise(64 << 20, 3)).unwrap();
    // The writer renames each new value into place, `a` first: at any one instant a is z or z+1.
    s.container(
        "writer",
        "pds",
        "i=0; while :; do i=$((i+1)); echo $i > /data/.a; mv /data/.a /data/a; echo $i > /data/.z; mv /data/.z /data/z; done",
    );
    wait_until("the writer has written", Duration::from_secs(10), || mount.join("z").exists());

    let summary = s.collector.pull();
    assert!(summary["warnings"].as_array().unwrap().is_empty(), "{summary}");
    let held = summary["held"].as_array().expect("held containers in the summary");
    assert!(held.iter().any(|h| h.as_str().unwrap().starts_with("writer paused")), "{summary}");

    let out = s.restore_to(&s.tmp.path().join("out"));
    let (a, z) = (number(&out.join("pds/pds/a")), number(&out.join("pds/pds/z")));
    assert!(a == z || a == z + 1, "the copy is not one instant: a = {a}, z = {z}");
    assert_eq!(fs::read(out.join("pds/pds/m-bulk")).unwrap(), fs::read(mount.join("m-bulk")).unwrap());

    // Running again, and writing.
    assert_eq!(s.docker.state("writer"), "running");
    let mut before = None;
    wait_until("a value to read", Duration::from_secs(5), || {
        before = fs::read_to_string(mount.join("a")).ok().and_then(|t| t.trim().parse::<u64>().ok());
        before.is_some()
    });
    let before = before.unwrap();
    wait_until("the writer moves on", Duration::from_secs(10), || {
        fs::read_to_string(mount.join("a")).ok().and_then(|t| t.trim().parse::<u64>().ok()).is_some_and(|n| n > before)
    });

    let snap = s.latest();
    assert_eq!(snap.source_kind, "docker-volume");
    let v = &snap.volumes[0];
    assert_eq!((v.name.as_str(), v.driver.as_str(), v.mode.as_str()), ("pds", "local", "pause"));
    assert_eq!(v.labels.get("app").map(String::as_str), Some("pds"));
    assert_eq!(v.containers, vec!["writer".to_string()]);
    assert_eq!(v.held.len(), 1);
    assert!(v.held[0].held_ms > 0 && v.held[0].action == "pause", "{:?}", v.held);
    assert!(s.agent.log().contains("container writer unpaused after"), "{}", s.agent.log());
}

#[test]
fn stop_mode_stops_both_containers_of_a_shared_volume_and_starts_them_also_when_the_pull_dies() {
    let s = Setup::new(
        "",
        "[[source]]\nname = \"shared\"\nkind = \"docker-volume\"\nvolume = \"shared\"\nconsistency = \"stop\"\ndocker_socket = \"SOCKET\"\n",
    );
    s.docker.run(&["volume", "create", "shared"]);
    let mount = s.docker.mountpoint("shared");
    fs::write(mount.join("bulk"), magpie_tests::noise(160 << 20, 5)).unwrap();
    s.container("one", "shared", IDLE);
    s.container("two", "shared", IDLE);
    let both = |state: &str| s.docker.state("one") == state && s.docker.state("two") == state;

    // A pull that completes: both stopped while it runs, both running after.
    let mut pull = s.pull_in_background("shared");
    let mut seen_stopped = false;
    while pull.try_wait().unwrap().is_none() {
        seen_stopped |= both("exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = pull.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(seen_stopped, "the containers were not both stopped during the pull");
    assert!(both("running"), "after the pull: one {}, two {}", s.docker.state("one"), s.docker.state("two"));
    let held = &s.latest().volumes[0].held;
    let names: Vec<&str> = held.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{held:?}");
    assert!(held.iter().all(|h| h.action == "stop" && h.held_ms > 0), "{held:?}");
    // Started again in the order they were stopped.
    let started = |c: &str| s.docker.run(&["inspect", "-f", "{{.State.StartedAt}}", c]);
    assert!(started(names[0]) <= started(names[1]), "{} then {}", started(names[0]), started(names[1]));

    // A pull killed half way (new content, so that it has something to copy): both come back
    // all the same.
    fs::write(mount.join("bulk"), magpie_tests::noise(160 << 20, 6)).unwrap();
    let mut pull = s.pull_in_background("shared");
    wait_until("both containers are stopped", Duration::from_secs(30), || both("exited"));
    pull.kill().unwrap();
    pull.wait().unwrap();
    wait_until("both containers run again", Duration::from_secs(30), || both("running"));
    assert_eq!(s.collector.repo().snapshots().unwrap().len(), 1, "nothing committed by the killed pull");
}

#[test]
fn an_agent_killed_while_holding_containers_resumes_them_when_it_starts_again() {
    let mut s = Setup::new(
        "",
        "[[source]]\nname = \"app\"\nkind = \"docker-volume\"\nvolume = \"app-*\"\nconsistency = \"pause\"\ndocker_socket = \"SOCKET\"\n",
    );
    s.docker.run(&["volume", "create", "app-data"]);
    fs::write(s.docker.mountpoint("app-data").join("bulk"), magpie_tests::noise(160 << 20, 9)).unwrap();
    s.container("app", "app-data", IDLE);
    let mut pull = s.pull_in_background("app");
    wait_until("the container is paused", Duration::from_secs(30), || s.docker.state("app") == "paused");
    // A second agent process on the same spool (as a second SSH connection starts one) leaves a
    // live hold alone.
    let second_dir = s.tmp.path().join("agent2");
    fs::create_dir_all(&second_dir).unwrap();
    let second_port = magpie_tests::free_port();
    let config = fs::read_to_string(s.tmp.path().join("agent/agent.toml")).unwrap();
    let config = config.replace(&format!("127.0.0.1:{}", s.agent.port), &format!("127.0.0.1:{second_port}"));
    fs::write(second_dir.join("agent.toml"), config).unwrap();
    let second = Agent::restart(&second_dir, second_port);
    assert!(second.log().contains("another agent process is holding containers"), "{}", second.log());
    assert_eq!(s.docker.state("app"), "paused", "the second agent resumed the first one's hold");
    drop(second);
    s.agent.kill();
    let _ = pull.wait();
    assert_eq!(s.docker.state("app"), "paused", "nothing else resumes it");
    let port = s.agent.port;
    s.agent = Agent::restart(&s.tmp.path().join("agent"), port);
    wait_until("the restarted agent unpauses it", Duration::from_secs(20), || s.docker.state("app") == "running");
    assert!(s.agent.log().contains("held (pause) by an agent that stopped before resuming it"), "{}", s.agent.log());
    // And the next pull works.
    s.collector.pull();
    assert_eq!(s.docker.state("app"), "running");
}

#[test]
fn a_removed_volume_is_recreated_by_restore_with_its_labels_and_content() {
    let s = Setup::new(
        "allow_restore = true",
        "[[source]]\nname = \"blobs\"\nkind = \"docker-volume\"\nvolume = [\"blobs\"]\nconsistency = \"stop\"\ndocker_socket = \"SOCKET\"\n\
         [[source]]\nname = \"ghost\"\nkind = \"docker-volume\"\nvolume = \"nope\"\nconsistency = \"live\"\ndocker_socket = \"SOCKET\"\n\
         [[source]]\nname = \"nodocker\"\nkind = \"docker-volume\"\nvolume = \"blobs\"\nconsistency = \"live\"\ndocker_socket = \"/nonexistent/docker.sock\"\n",
    );
    s.docker.run(&["volume", "create", "--label", "app=pds", "--label", "tier=blobs", "blobs"]);
    let mount = s.docker.mountpoint("blobs");
    fs::create_dir_all(mount.join("sub/deeper")).unwrap();
    fs::write(mount.join("sub/deeper/blob.bin"), magpie_tests::noise(3 << 20, 1)).unwrap();
    fs::write(mount.join("notes.txt"), "kept\n").unwrap();
    std::os::unix::fs::symlink("notes.txt", mount.join("link")).unwrap();
    s.container("user", "blobs", IDLE);
    let o = s.collector.run(&["pull", "--json", "--source", "blobs"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(summary[0]["warnings"].as_array().unwrap().is_empty(), "{summary}");
    let before = tree_state(&mount);

    // Clear errors, naming the volume or the socket.
    for (source, expected) in
        [("ghost", "docker volume nope: no such volume"), ("nodocker", "docker socket /nonexistent/docker.sock")]
    {
        let o = s.collector.run(&["pull", "--source", source]);
        let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(!o.status.success() && out.contains(expected), "{source}: {out}");
    }

    s.docker.run(&["rm", "-f", "user"]);
    s.docker.run(&["volume", "rm", "blobs"]);
    let o = s.collector.run(&["restore", "--source", "blobs", "--to-agent", "--json"]);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let labels = s.docker.run(&["volume", "inspect", "-f", "{{json .Labels}}", "blobs"]);
    let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels, serde_json::json!({"app": "pds", "tier": "blobs"}));
    let after = tree_state(&s.docker.mountpoint("blobs"));
    for (k, v) in &before {
        assert_eq!(after.get(k), Some(v), "{}", String::from_utf8_lossy(k));
    }
    assert_eq!(after.len(), before.len());

    // Restored again over a volume in use: its container is stopped for the restore, then runs.
    s.container("user2", "blobs", IDLE);
    fs::write(s.docker.mountpoint("blobs").join("notes.txt"), "changed\n").unwrap();
    let o = s.collector.run(&["restore", "--source", "blobs", "--to-agent", "--json"]);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("stopped during the restore, then started: user2"), "{report}");
    assert_eq!(fs::read_to_string(s.docker.mountpoint("blobs").join("notes.txt")).unwrap(), "kept\n");
    assert_eq!(s.docker.state("user2"), "running");

    // A restore writes only volumes its source declares: with `blobs` no longer declared, the
    // snapshot's volume is refused before anything is stopped or written.
    let mut s = s;
    s.agent.kill();
    let config = format!(
        "[[source]]\nname = \"blobs\"\nkind = \"docker-volume\"\nvolume = \"other\"\nconsistency = \"stop\"\ndocker_socket = {:?}\n[spool]\ndir = {:?}\n",
        s.docker.socket(),
        s.tmp.path().join("spool")
    );
    let port = s.agent.port;
    s.agent = Agent::start_full(
        &s.tmp.path().join("agent"),
        &s.pki,
        &[s.pki.fingerprint("collector")],
        "allow_restore = true",
        &config,
        port,
    );
    let o = s.collector.run(&["restore", "--source", "blobs", "--to-agent"]);
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success() && out.contains("docker volume blobs is not one this source declares"), "{out}");
    assert_eq!(s.docker.state("user2"), "running");
}

#[test]
fn a_restore_of_some_paths_touches_only_their_volumes() {
    let s = Setup::new(
        "allow_restore = true",
        "[[source]]\nname = \"multi\"\nkind = \"docker-volume\"\nvolume = \"multi-*\"\nconsistency = \"stop\"\ndocker_socket = \"SOCKET\"\n",
    );
    for v in ["multi-a", "multi-b"] {
        s.docker.run(&["volume", "create", v]);
        fs::write(s.docker.mountpoint(v).join("f.txt"), format!("{v} as backed up\n")).unwrap();
    }
    s.container("ca", "multi-a", IDLE);
    s.container("cb", "multi-b", IDLE);
    s.collector.pull();
    for v in ["multi-a", "multi-b"] {
        fs::write(s.docker.mountpoint(v).join("f.txt"), "changed\n").unwrap();
    }
    let started = |c: &str| s.docker.run(&["inspect", "-f", "{{.State.StartedAt}}", c]);
    let cb_started = started("cb");
    let o = s.collector.run(&["restore", "--to-agent", "--path", "multi-a/**"]);
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}");
    assert!(out.contains("stopped during the restore, then started: ca"), "{out}");
    assert_eq!(fs::read_to_string(s.docker.mountpoint("multi-a").join("f.txt")).unwrap(), "multi-a as backed up\n");
    assert_eq!(fs::read_to_string(s.docker.mountpoint("multi-b").join("f.txt")).unwrap(), "changed\n");
    assert_eq!(started("cb"), cb_started, "the container of a volume not restored was stopped");
    assert_eq!((s.docker.state("ca").as_str(), s.docker.state("cb").as_str()), ("running", "running"));
}
