//! The SSH transport: the collector starts `agent serve --stdio` through the system's ssh on a
//! real sshd (started here on a high port with its own host key), the authorized_keys entry
//! fixing the command; the same gRPC service runs over the channel.

use std::fs;
use std::time::{Duration, Instant};

use magpie_tests::servers::Sshd;
use magpie_tests::{Collector, Pki, tree_state, workspace_bin};

/// A stdio agent's configuration: sources only (SSH authenticates; no listen, no TLS).
fn agent_config(dir: &std::path::Path, root: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("agent.toml");
    fs::write(
        &cfg,
        format!(
            "name = \"main\"\n[[source]]\nname = \"files\"\nkind = \"path\"\nroots = [{root:?}]\n[spool]\ndir = {:?}\n",
            dir.join("spool")
        ),
    )
    .unwrap();
    cfg
}

fn stdio_agents_running(cfg: &std::path::Path) -> bool {
    fs::read_dir("/proc").unwrap().flatten().any(|p| {
        fs::read(p.path().join("cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("--stdio") && c.contains(&*cfg.to_string_lossy())
        })
    })
}

#[test]
fn pull_and_restore_over_ssh_and_an_unknown_host_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("a.txt"), magpie_tests::text(300_000, 4)).unwrap();
    fs::write(src.join("sub/b.bin"), magpie_tests::noise(2 << 20, 5)).unwrap();
    let agent_dir = tmp.path().join("agent");
    fs::create_dir_all(&agent_dir).unwrap();
    let cfg = agent_config(&agent_dir, &src);
    let forced = format!("{} serve --stdio --config {}", workspace_bin("agent").display(), cfg.display());
    let sshd = Sshd::start(&tmp.path().join("sshd"), &forced);

    // A collector whose only agent is reached over SSH (its TLS files are not used for it).
    let pki = Pki::new(&tmp.path().join("pki"));
    let c = Collector::new(&tmp.path().join("collector"), &pki, 1, "collector", true);
    let text = fs::read_to_string(&c.config).unwrap();
    let at = text.find("endpoint = ").unwrap();
    let end = at + text[at..].find('\n').unwrap();
    let ssh = format!(
        "endpoint = \"ssh://root@127.0.0.1:{}\"\nssh_identity = {:?}\nssh_known_hosts = {:?}",
        sshd.port, sshd.identity, sshd.known_hosts
    );
    fs::write(&c.config, format!("{}{ssh}{}", &text[..at], &text[end..])).unwrap();

    let s = c.pull();
    assert!(s["snapshot"].is_string(), "{s}");
    assert_eq!(s["files_new"], 2, "{s}");
    let out = tmp.path().join("out");
    let o = c.run(&["restore", "latest", "--target-dir", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(tree_state(&src), tree_state(&out.join("main/files").join(src.strip_prefix("/").unwrap())));
    // The collector ended the remote agent when it was done.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stdio_agents_running(&cfg) {
        assert!(Instant::now() < deadline, "the agent outlived the pull");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A host key that is not the one known: refused before anything is sent.
    let other = tmp.path().join("other_key");
    magpie_tests::servers::sh(
        std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&other),
    );
    let impostor = fs::read_to_string(other.with_extension("pub")).unwrap();
    let impostor: Vec<&str> = impostor.split_whitespace().take(2).collect();
    fs::write(&sshd.known_hosts, format!("[127.0.0.1]:{} {}\n", sshd.port, impostor.join(" "))).unwrap();
    let o = c.run(&["pull", "--json"]);
    assert_eq!(o.status.code(), Some(4), "{}", String::from_utf8_lossy(&o.stdout));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let err = v[0]["error"].as_str().unwrap();
    assert!(err.contains("agent main") && err.to_lowercase().contains("host key"), "{err}");
    assert_eq!(c.repo().snapshots().unwrap().len(), 1, "nothing committed");
}
