//! The repository on S3-compatible object storage (moto's server, started here on 127.0.0.1):
//! create-only puts, a round trip through the real collector, damage found by check, two writers
//! at once, and prune refused while a writer holds its lock.

use std::fs;
use std::sync::Arc;

use magpie_tests::servers::S3Server;
use magpie_tests::{tree_state, workspace_bin};
use repo_format::backend::{Backend, PutOutcome, S3Backend, S3Config};

const PASS: &str = "s3 test passphrase";

struct Env {
    tmp: tempfile::TempDir,
    s3: S3Server,
    config: std::path::PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let s3 = S3Server::start(&tmp.path().join("s3"), "magpie");
        fs::write(tmp.path().join("pass"), format!("{PASS}\n")).unwrap();
        fs::write(tmp.path().join("s3.credentials"), "AWS_ACCESS_KEY_ID=testing\nAWS_SECRET_ACCESS_KEY=testing\n")
            .unwrap();
        let config = tmp.path().join("collector.toml");
        fs::write(
            &config,
            format!(
                "repository = \"s3://magpie/backups\"\npassphrase_file = {:?}\n[s3]\nendpoint = {:?}\ncredentials_file = {:?}\n[tls]\nca = \"/x\"\ncert = \"/x\"\nkey = \"/x\"\n",
                tmp.path().join("pass"),
                s3.endpoint(),
                tmp.path().join("s3.credentials")
            ),
        )
        .unwrap();
        Env { tmp, s3, config }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        magpie_tests::Collector { dir: self.tmp.path().to_path_buf(), config: self.config.clone() }.run(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn backend(&self) -> S3Backend {
        S3Backend::new(S3Config {
            bucket: "magpie".into(),
            prefix: "backups".into(),
            endpoint: Some(self.s3.endpoint()),
            region: "us-east-1".into(),
            path_style: true,
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
        })
        .unwrap()
    }

    fn source(&self, name: &str, seed: u64) -> std::path::PathBuf {
        let d = self.tmp.path().join(name);
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("text.txt"), magpie_tests::text(400_000, seed)).unwrap();
        fs::write(d.join("sub/noise.bin"), magpie_tests::noise(3 << 20, seed)).unwrap();
        d
    }
}

#[test]
fn puts_are_create_only() {
    let e = Env::new();
    let b = e.backend();
    assert_eq!(b.put_if_absent("x/one", b"first").unwrap(), PutOutcome::Created);
    assert_eq!(b.put_if_absent("x/one", b"second").unwrap(), PutOutcome::AlreadyExists);
    assert_eq!(b.get("x/one", None).unwrap(), b"first");
    assert_eq!(b.get("x/one", Some(1..3)).unwrap(), b"ir");
    assert_eq!(b.list("x/").unwrap().len(), 1);
    b.delete("x/one").unwrap();
    b.delete("x/one").unwrap();
    assert!(b.list("x/").unwrap().is_empty());

    // A large pack goes in parts (its ETag says how many), and not again once it is there.
    let pack = magpie_tests::noise(70 << 20, 7);
    let name = "data/ab/ab-large-pack";
    assert_eq!(b.put_if_absent(name, &pack).unwrap(), PutOutcome::Created);
    assert_eq!(b.put_if_absent(name, &pack).unwrap(), PutOutcome::AlreadyExists);
    assert!(b.get(name, None).unwrap() == pack);
    assert!(b.get(name, Some(9_000_000..9_000_100)).unwrap() == pack[9_000_000..9_000_100]);
    let head = std::process::Command::new("curl")
        .args(["-sfI", &e.s3.url(&format!("magpie/backups/{name}"))])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).to_lowercase();
    assert!(head.lines().any(|l| l.starts_with("etag:") && l.trim_end().ends_with("-5\"")), "{head}");
}

#[test]
fn round_trip_damage_two_writers_and_a_refused_prune_on_s3() {
    let e = Env::new();
    e.ok(&["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]);
    let src = e.source("www", 1);
    e.ok(&["import", src.to_str().unwrap(), "--source", "www", "--agent", "main"]);
    let out = e.tmp.path().join("out");
    e.ok(&["restore", "latest", "--target-dir", out.to_str().unwrap()]);
    assert_eq!(tree_state(&src), tree_state(&out.join("main/www")));
    assert!(e.ok(&["check", "--verify-data"]).contains("no damage"));

    // Two writers at once: both commit.
    let (a, b) = (e.source("a", 2), e.source("b", 3));
    let spawn = |dir: &std::path::Path, name: &str| {
        std::process::Command::new(workspace_bin("collector"))
            .arg("--config")
            .arg(&e.config)
            .args(["import", dir.to_str().unwrap(), "--source", name])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn(&a, "a"), spawn(&b, "b"));
    for c in [ca, cb] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let list = e.ok(&["list"]);
    assert!(list.contains("3 snapshots"), "{list}");

    // Prune while a writer holds its lock: refused, naming the holder.
    let mut repo = repo_format::Repository::open(Arc::new(e.backend()), Some(PASS.as_bytes())).unwrap();
    repo.load_index().unwrap();
    let lock = repo_format::locking::lock(&repo, false, "test writer", std::time::Duration::ZERO).unwrap();
    let o = e.run(&["prune", "--keep-last", "1"]);
    assert_eq!(o.status.code(), Some(12), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("test writer"), "{}", String::from_utf8_lossy(&o.stderr));
    drop(lock);
    e.ok(&["prune", "--keep-last", "1"]);

    // An off-site copy: a local repository's snapshots copied into the bucket, once.
    let local = e.tmp.path().join("local");
    let pass = e.tmp.path().join("pass");
    let on_local = |args: &[&str]| {
        let mut all = vec!["--repo", local.to_str().unwrap(), "--passphrase-file", pass.to_str().unwrap()];
        all.extend_from_slice(args);
        e.ok(&all)
    };
    on_local(&["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]);
    let docs = e.source("docs", 9);
    on_local(&["import", docs.to_str().unwrap(), "--source", "docs", "--agent", "laptop"]);
    let first = on_local(&["copy", "--to", "s3://magpie/backups", "--json"]);
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["copied"].as_array().unwrap().len(), 1, "{first}");
    let again: serde_json::Value =
        serde_json::from_str(&on_local(&["copy", "--to", "s3://magpie/backups", "--json"])).unwrap();
    assert_eq!((again["copied"].as_array().unwrap().len(), again["skipped"].as_u64()), (0, Some(1)), "{again}");
    let out = e.tmp.path().join("from-s3");
    e.ok(&["restore", "--source", "docs", "--target-dir", out.to_str().unwrap()]);
    assert_eq!(tree_state(&docs), tree_state(&out.join("laptop/docs")));
    assert!(e.ok(&["check", "--verify-data"]).contains("no damage"));

    // A pack changed in the bucket: check names it.
    let packs = e.backend().list("data/").unwrap();
    let victim = &packs[0];
    let mut bytes = e.backend().get(&victim.name, None).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    // Whoever holds the bucket's credentials can replace an object: delete, then write.
    e.backend().delete(&victim.name).unwrap();
    e.backend().put_if_absent(&victim.name, &bytes).unwrap();
    let o = e.run(&["check", "--verify-data"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    let name = victim.name.rsplit('/').next().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains(name), "{}", String::from_utf8_lossy(&o.stdout));
}
