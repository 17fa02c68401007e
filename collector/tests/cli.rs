//! The `collector` binary: commands, messages and exit codes as an operator sees them.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("pass"), "operator passphrase\n").unwrap();
        Env { tmp }
    }

    fn path(&self, p: &str) -> std::path::PathBuf {
        self.tmp.path().join(p)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_collector"))
            .env_remove("MAGPIE_PASSPHRASE")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env("MAGPIE_REPOSITORY", self.path("repo"))
            .arg("--passphrase-file")
            .arg(self.path("pass"))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    fn init(&self) {
        self.ok(&["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]);
    }

    fn source(&self) -> std::path::PathBuf {
        let src = self.path("src");
        fs::create_dir_all(src.join("etc/nginx")).unwrap();
        fs::write(src.join("etc/nginx/nginx.conf"), "server { listen 80; }\n").unwrap();
        fs::write(src.join("blob.bin"), (0..600_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()).unwrap();
        std::os::unix::fs::symlink("etc/nginx/nginx.conf", src.join("link")).unwrap();
        src
    }
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn init_import_list_ls_restore_check() {
    let e = Env::new();
    e.init();
    let src = e.source();
    let out = e.ok(&["import", src.to_str().unwrap(), "--source", "www", "--agent", "main", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let list = e.ok(&["list"]);
    assert!(list.contains(&id[..8]) && list.contains("www") && list.contains("main"), "{list}");
    let ls = e.ok(&["ls", &id[..10], "etc/nginx"]);
    assert!(ls.contains("etc/nginx/nginx.conf"), "{ls}");
    let ls = e.ok(&["ls", "latest", "-R"]);
    assert!(ls.contains("link -> etc/nginx/nginx.conf"), "{ls}");
    let target = e.path("restored");
    e.ok(&["restore", "latest", "--target-dir", target.to_str().unwrap()]);
    // Into DIR/AGENT/SOURCE.
    let restored = target.join("main/www");
    assert_eq!(fs::read(restored.join("blob.bin")).unwrap(), fs::read(src.join("blob.bin")).unwrap());
    assert_eq!(fs::read_link(restored.join("link")).unwrap(), Path::new("etc/nginx/nginx.conf"));
    let check = e.ok(&["check", "--verify-data"]);
    assert!(check.contains("no damage"), "{check}");
    let j: serde_json::Value = serde_json::from_str(&e.ok(&["check", "--json"])).unwrap();
    assert_eq!(j["check"]["clean"], true);
}

#[test]
fn errors_are_one_line_with_distinct_exit_codes() {
    let e = Env::new();
    // No repository yet.
    let o = e.run(&["list"]);
    assert_eq!(code(&o), 10, "{}", stderr(&o));
    assert!(stderr(&o).contains("collector init"), "{}", stderr(&o));
    e.init();
    // Initialising twice is refused.
    assert_eq!(code(&e.run(&["init"])), 2);
    // Wrong passphrase.
    fs::write(e.path("pass"), "not the passphrase\n").unwrap();
    let o = e.run(&["list"]);
    assert_eq!(code(&o), 11);
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("wrong passphrase"));
    // Prune without a rule would remove everything: refused.
    fs::write(e.path("pass"), "operator passphrase\n").unwrap();
    let o = e.run(&["prune"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--keep-"), "{}", stderr(&o));
    // Unknown snapshot.
    assert_eq!(code(&e.run(&["ls", "deadbeef"])), 2);
}

#[test]
fn check_exit_code_names_the_damaged_pack() {
    let e = Env::new();
    e.init();
    let src = e.source();
    e.ok(&["import", src.to_str().unwrap(), "--source", "www"]);
    let pack = walk_files(&e.path("repo/data")).into_iter().next().unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    bytes[100] ^= 1;
    fs::write(&pack, bytes).unwrap();
    let o = e.run(&["check", "--verify-data"]);
    assert_eq!(code(&o), 1);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(pack.file_name().unwrap().to_str().unwrap()), "{out}");
    assert!(out.contains("DAMAGE"));
    // A restore of damaged data fails loudly instead of writing wrong bytes.
    let o = e.run(&["restore", "latest", "--target-dir", e.path("r").to_str().unwrap()]);
    assert_eq!(code(&o), 13, "{}", stderr(&o));
}

#[test]
fn prune_dry_run_lists_every_snapshot_with_its_rule() {
    let e = Env::new();
    e.init();
    let src = e.source();
    for _ in 0..3 {
        e.ok(&["import", src.to_str().unwrap(), "--source", "www"]);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let out = e.ok(&["prune", "--dry-run", "--keep-last", "2"]);
    assert_eq!(out.lines().filter(|l| l.ends_with("removed")).count(), 1, "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("keep (last #")).count(), 2, "{out}");
    assert_eq!(e.ok(&["list", "--json"]).matches("\"id\"").count(), 3, "dry run removed nothing");
    e.ok(&["prune", "--keep-last", "2"]);
    assert_eq!(e.ok(&["list", "--json"]).matches("\"id\"").count(), 2);
    let out = e.ok(&["compact"]);
    assert!(out.contains("compacted"), "{out}");
}

#[test]
fn passphrase_change_and_sources() {
    let e = Env::new();
    e.init();
    fs::write(e.path("new"), "a new passphrase\n").unwrap();
    e.ok(&[
        "key",
        "passwd",
        "--new-passphrase-file",
        e.path("new").to_str().unwrap(),
        "--kdf-memory-mib",
        "1",
        "--kdf-iterations",
        "1",
    ]);
    assert_eq!(code(&e.run(&["list"])), 11, "the old passphrase no longer opens");
    // The environment variable and the systemd credential are sources too.
    let run = |envs: &[(&str, &Path)], pass_env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_collector"));
        c.env_remove("MAGPIE_PASSPHRASE").env_remove("CREDENTIALS_DIRECTORY").env("MAGPIE_REPOSITORY", e.path("repo"));
        for (k, v) in envs {
            c.env(k, v);
        }
        if let Some(p) = pass_env {
            c.env("MAGPIE_PASSPHRASE", p);
        }
        c.arg("list").output().unwrap()
    };
    assert!(run(&[], Some("a new passphrase")).status.success());
    let creds = e.path("creds");
    fs::create_dir_all(&creds).unwrap();
    fs::write(creds.join("magpie-passphrase"), "a new passphrase").unwrap();
    assert!(run(&[("CREDENTIALS_DIRECTORY", &creds)], None).status.success());
    let o = run(&[], None);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("passphrase"));
}

#[test]
fn compact_refuses_while_a_writer_holds_its_lock() {
    let e = Env::new();
    e.init();
    // A lock held by a live process (this test) on this host.
    let repo = repo_format::Repository::open(
        std::sync::Arc::new(repo_format::backend::LocalBackend::new(e.path("repo"))),
        Some(b"operator passphrase"),
    )
    .unwrap();
    let guard = repo_format::locking::lock(&repo, false, "collector pull", std::time::Duration::ZERO).unwrap();
    let o = e.run(&["compact"]);
    assert_eq!(code(&o), 12, "{}", stderr(&o));
    assert!(stderr(&o).contains("collector pull") && stderr(&o).contains("collector unlock"), "{}", stderr(&o));
    drop(guard);
    e.ok(&["compact"]);
}

fn walk_files(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn check_config_accepts_the_example_and_names_a_bad_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/collector.toml");
    let o = Command::new(env!("CARGO_BIN_EXE_collector")).args(["--config", example, "check-config"]).output().unwrap();
    // The example's certificate files do not exist here: named, exit 2.
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("tls.ca = /etc/magpie/certs/ca.pem: no such file"), "{}", stderr(&o));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("c.toml");
    std::fs::write(
        &bad,
        "repository = \"/r\"\n[run]\nmax_age = \"36 hours\"\n[tls]\nca = \"/x\"\ncert = \"/x\"\nkey = \"/x\"\n",
    )
    .unwrap();
    let o =
        Command::new(env!("CARGO_BIN_EXE_collector")).arg("--config").arg(&bad).arg("check-config").output().unwrap();
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("run.max_age") && stderr(&o).contains("36H"), "{}", stderr(&o));
    let good = dir.path().join("g.toml");
    std::fs::write(&good, "repository = \"/r\"\n[tls]\nca = \"/x\"\ncert = \"/x\"\nkey = \"/x\"\n").unwrap();
    let o =
        Command::new(env!("CARGO_BIN_EXE_collector")).arg("--config").arg(&good).arg("check-config").output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}
