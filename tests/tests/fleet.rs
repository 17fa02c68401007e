//! One collector, many agents: twenty agent processes with their own certificates, pulled
//! concurrently; one killed in the middle of its pull fails alone.

use std::fs;
use std::time::{Duration, Instant};

use magpie_tests::{Agent, Collector, Pki, workspace_bin};

const AGENTS: usize = 20;
const VICTIM: usize = 7;

#[test]
fn twenty_agents_pulled_concurrently_and_a_killed_one_fails_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let pin = pki.fingerprint("collector");
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let name = format!("agent{i:02}");
        pki.certs(&["issue", "agent", &name, "--san", "127.0.0.1"]);
        let dir = tmp.path().join(&name);
        let data = dir.join("data");
        fs::create_dir_all(&data).unwrap();
        for f in 0..5 {
            fs::write(data.join(format!("{f}.txt")), magpie_tests::text(50_000, (i * 10 + f) as u64)).unwrap();
        }
        let mut sources = format!("[[source]]\nname = \"files\"\nkind = \"path\"\nroots = [{data:?}]\n");
        if i == VICTIM {
            // A dump that takes its time: the agent is killed while it runs.
            sources += "[[source]]\nname = \"slow\"\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"sleep 30; echo never\"]\n";
        }
        sources += &format!("[spool]\ndir = {:?}\n", dir.join("spool"));
        let port = magpie_tests::free_port();
        Agent::configure(&dir, &pki, &name, std::slice::from_ref(&pin), "[tls]", &sources, port);
        agents.push(Agent::restart(&dir, port));
    }
    let c = Collector::new(&tmp.path().join("collector"), &pki, agents[0].port, "collector", true);
    // Agent 0 is the one Collector::new wrote; the others follow, pulled eight at a time.
    let mut config = fs::read_to_string(&c.config).unwrap().replace("name = \"main\"", "name = \"agent00\"");
    config = format!("max_parallel = 8\n{config}");
    for (i, a) in agents.iter().enumerate().skip(1) {
        config += &format!(
            "[[agent]]\nname = \"agent{i:02}\"\nendpoint = \"https://127.0.0.1:{}\"\ncompress = true\nconnect_timeout_secs = 5\n",
            a.port
        );
    }
    fs::write(&c.config, config).unwrap();

    let collector = std::process::Command::new(workspace_bin("collector"))
        .arg("--config")
        .arg(&c.config)
        .args(["pull", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill the victim once its slow dump is under way.
    let spool = tmp.path().join(format!("agent{VICTIM:02}/spool"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the victim's dump never started: {}", agents[VICTIM].log());
        std::thread::sleep(Duration::from_millis(20));
    }
    agents[VICTIM].kill();
    let out = collector.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = v.as_array().unwrap();
    assert_eq!(results.len(), AGENTS + 1, "every source of every agent reported");
    for r in results {
        let (agent, source) = (r["agent"].as_str().unwrap(), r["source"].as_str().unwrap());
        if agent == format!("agent{VICTIM:02}") {
            // Its path source may have been pulled before the kill; its dump cannot have been.
            if source == "slow" {
                assert!(r["error"].is_string() && r["snapshot"].is_null(), "{r}");
            }
        } else {
            assert!(r["error"].is_null() && r["snapshot"].is_string(), "{agent}/{source} must not suffer: {r}");
        }
    }
    let snaps = c.repo().snapshots().unwrap();
    let healthy = snaps.iter().filter(|(_, x)| x.agent != format!("agent{VICTIM:02}")).count();
    assert_eq!(healthy, AGENTS - 1, "one snapshot per healthy agent");
    assert!(snaps.iter().all(|(_, x)| x.source == "files"), "nothing of the killed dump committed");
}
