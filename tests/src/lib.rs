//! Shared harness of magpie's end-to-end tests: deterministic datasets, repositories set up for
//! tests, and the paths of the real binaries under test.

pub mod servers;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use repo_format::backend::{Backend, LocalBackend, S3Backend, S3Config};
use repo_format::chunker::ChunkerParams;
use repo_format::crypto::KdfParams;
use repo_format::{Id, InitOptions, Repository, Snapshot, Writer};

/// Passphrase of test repositories.
pub const PASS: &[u8] = b"end-to-end test passphrase";

/// Small chunks and packs so small data spans many of both; a cheap KDF.
pub fn test_options() -> InitOptions {
    let mut o = InitOptions::encrypted(PASS);
    o.kdf = KdfParams { memory_kib: 256, iterations: 1, parallelism: 1 };
    o.chunker_files = ChunkerParams { min: 4 * 1024, avg: 16 * 1024, max: 64 * 1024 };
    o.pack_size = 1024 * 1024;
    o.small_file_threshold = 4 * 1024;
    o
}

/// Open a test repository with its index loaded.
pub fn open(dir: &Path) -> repo_format::Result<Repository> {
    open_on(Arc::new(LocalBackend::new(dir)))
}

/// Open the test repository on `backend`, index loaded.
pub fn open_on(backend: Arc<dyn Backend>) -> repo_format::Result<Repository> {
    let mut r = Repository::open(backend, Some(PASS))?;
    r.load_index()?;
    Ok(r)
}

/// A test repository's place named on a command line: a folder, or `s3://bucket/prefix` on the
/// S3-compatible server at `endpoint` (the test servers' fixed credentials).
pub fn backend_at(location: &str, endpoint: Option<&str>) -> Arc<dyn Backend> {
    match S3Config::from_url(location) {
        Some((bucket, prefix)) => Arc::new(
            S3Backend::new(S3Config {
                bucket,
                prefix,
                endpoint: Some(endpoint.expect("an s3:// repository needs the server's endpoint").to_string()),
                region: "us-east-1".into(),
                path_style: true,
                access_key_id: "testing".into(),
                secret_access_key: "testing".into(),
            })
            .expect("S3 backend"),
        ),
        None => Arc::new(LocalBackend::new(location)),
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut next = xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..n).map(|_| next() as u8).collect()
}

/// A xorshift64 generator from a non-zero `state`: repeatable data without a dependency.
pub fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Compressible, text-like bytes.
pub fn text(n: usize, seed: u64) -> Vec<u8> {
    let words = ["backup", "restore", "magpie", "collector", "agent", "snapshot", "the", "of", "and"];
    let mut out = Vec::with_capacity(n + 16);
    let mut next = xorshift(seed | 1);
    while out.len() < n {
        let x = next();
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        out.push(if x.is_multiple_of(7) { b'\n' } else { b' ' });
    }
    out.truncate(n);
    out
}

/// (Re)create the dataset of `seed` in `dir`: a constant part, shared by every seed, and a part
/// that changes with the seed (garbage once its snapshots are pruned).
pub fn make_dataset(dir: &Path, seed: u64) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("common")).expect("dataset dir");
    for i in 0..20 {
        fs::write(dir.join("common").join(format!("{i}.txt")), text(2000 + i * 300, i as u64)).expect("write");
    }
    fs::write(dir.join("big-constant"), noise(1 << 20, 7)).expect("write");
    fs::write(dir.join("rotating"), noise(512 * 1024, 1000 + seed)).expect("write");
    fs::write(dir.join(format!("small-{}", seed % 5)), text(900, seed)).expect("write");
}

/// Store `dir` as a snapshot tagged with `seed`.
pub fn backup(repo: &mut Repository, dir: &Path, seed: u64) -> repo_format::Result<Id> {
    let mut w = Writer::new(repo, 2);
    let (tree, stats) = repo_format::fs::import_dir(&mut w, dir)?;
    let (index, _) = w.finish()?;
    if let Some((id, f)) = index {
        repo.add_index(id, &f);
    }
    let snap = Snapshot {
        version: 1,
        time_ns: chrono_now_ns(),
        agent: "torture".into(),
        source: "data".into(),
        source_kind: "path".into(),
        role: "data".into(),
        tags: vec![format!("seed={seed}")],
        tree: tree.0.to_vec(),
        stats: Some(stats),
        ..Default::default()
    };
    repo.save_snapshot(&snap)
}

fn chrono_now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Every regular file below `dir` with its content, by relative path.
pub fn read_tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).expect("prefix").to_path_buf(), fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// Path of a workspace binary built alongside the running test (`cargo test --workspace`
/// builds every member's binaries into the same target folder).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} is not built: run the tests with `cargo test --workspace`", p.display());
    p
}

/// A test PKI made by the real `collector certs` commands.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A CA in `dir` with an agent certificate `agent` (SANs localhost, 127.0.0.1) and a
    /// collector certificate `collector`.
    pub fn new(dir: &Path) -> Pki {
        let pki = Pki { dir: dir.to_path_buf() };
        pki.certs(&["init"]);
        pki.certs(&["issue", "agent", "agent", "--san", "localhost", "--san", "127.0.0.1"]);
        pki.certs(&["issue", "collector", "collector"]);
        pki
    }

    /// Run `collector certs ARGS --dir DIR`; panics on failure.
    pub fn certs(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(workspace_bin("collector"))
            .arg("certs")
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .expect("run collector certs");
        assert!(out.status.success(), "collector certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The fingerprint of NAME.pem.
    pub fn fingerprint(&self, name: &str) -> String {
        let out = std::process::Command::new(workspace_bin("collector"))
            .args(["certs", "fingerprint"])
            .arg(self.dir.join(format!("{name}.pem")))
            .output()
            .expect("fingerprint");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// Kind, mode, mtime, content hash (with the user.magpie xattr), link target, and the first path
/// sharing the inode.
pub type EntryState = (String, u32, i64, String, Vec<u8>, Option<Vec<u8>>);
pub type EntryStates = std::collections::BTreeMap<Vec<u8>, EntryState>;

/// What a user compares after a restore, by relative path.
pub fn tree_state(root: &Path) -> EntryStates {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let xattr_of = |p: &Path| xattr::get(p, "user.magpie").ok().flatten().unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    let mut inodes: std::collections::BTreeMap<u64, Vec<u8>> = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut names: Vec<PathBuf> = fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for p in names {
            let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
            let m = fs::symlink_metadata(&p).unwrap();
            let (kind, hash, link) = if m.file_type().is_symlink() {
                ("symlink", String::new(), fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec())
            } else if m.is_dir() {
                stack.push(p.clone());
                ("dir", String::from_utf8_lossy(&xattr_of(&p)).into_owned(), Vec::new())
            } else {
                let mut h = blake3::Hasher::new();
                h.update_reader(fs::File::open(&p).unwrap()).unwrap();
                h.update(&xattr_of(&p));
                ("file", h.finalize().to_hex().to_string(), Vec::new())
            };
            let group = (m.is_file() && m.nlink() > 1).then(|| inodes.entry(m.ino()).or_insert(rel.clone()).clone());
            let mtime = if kind == "symlink" { 0 } else { m.mtime() * 1_000_000_000 + m.mtime_nsec() };
            let mode = if kind == "symlink" { 0 } else { m.mode() & 0o7777 };
            out.insert(rel, (kind.to_string(), mode, mtime, hash, link, group));
        }
    }
    out
}

/// A running `agent serve`, killed on drop. Its log is kept for assertions.
pub struct Agent {
    child: std::process::Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Agent {
    /// Start an agent serving `roots` as source `files` to the pinned identities.
    pub fn start(work: &Path, pki: &Pki, pinned: &[String], sources_toml: &str) -> Agent {
        Agent::start_on(work, pki, pinned, sources_toml, free_port())
    }

    /// The same, on a given port (to restart an agent where the collector expects it).
    pub fn start_on(work: &Path, pki: &Pki, pinned: &[String], sources_toml: &str, port: u16) -> Agent {
        Agent::start_full(work, pki, pinned, "", sources_toml, port)
    }

    /// The same, with top-level settings (`allow_restore = true`) before the tables.
    pub fn start_full(work: &Path, pki: &Pki, pinned: &[String], top: &str, sources_toml: &str, port: u16) -> Agent {
        Agent::configure(work, pki, "agent", pinned, &format!("{top}\n[tls]"), sources_toml, port);
        Agent::restart(work, port)
    }

    /// Start an agent as [`Agent::start`] does, but without root's power to read any file
    /// (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped from its bounding, inheritable and
    /// ambient sets): file modes then bind it as they bind an agent running as its own user.
    pub fn start_unprivileged(work: &Path, pki: &Pki, pinned: &[String], sources_toml: &str) -> Agent {
        let port = free_port();
        Agent::configure(work, pki, "agent", pinned, "\n[tls]", sources_toml, port);
        let drop = "-dac_override,-dac_read_search";
        Agent::launch(
            work,
            port,
            &["setpriv", "--bounding-set", drop, "--inh-caps", drop, "--ambient-caps", drop, "--"],
        )
    }

    /// Write `work`/agent.toml for an agent on `port` with the certificate `cert` (NAME.pem of
    /// the PKI); `top_and_tls` ends with the `[tls]` header the TLS settings follow. Start it
    /// with [`Agent::restart`].
    pub fn configure(
        work: &Path,
        pki: &Pki,
        cert: &str,
        pinned: &[String],
        top_and_tls: &str,
        sources_toml: &str,
        port: u16,
    ) {
        let pins: Vec<String> = pinned.iter().map(|p| format!("{p:?}")).collect();
        fs::write(
            work.join("agent.toml"),
            format!(
                "listen = \"127.0.0.1:{port}\"\nname = \"main\"\n{top_and_tls}\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nallowed_collectors = [{}]\n{sources_toml}",
                pki.path(&format!("{cert}.pem")),
                pki.path(&format!("{cert}-key.pem")),
                pki.path("ca.pem"),
                pins.join(", ")
            ),
        )
        .expect("write agent.toml");
    }

    /// Start an agent on the configuration written in `work` (again, after a kill).
    pub fn restart(work: &Path, port: u16) -> Agent {
        Agent::launch(work, port, &[])
    }

    /// Run the agent (through `wrapper`, a command and its arguments, if any) and wait until it
    /// listens.
    fn launch(work: &Path, port: u16, wrapper: &[&str]) -> Agent {
        let log = work.join("agent.log");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = std::process::Command::new(program);
                c.args(args).arg(workspace_bin("agent"));
                c
            }
            None => std::process::Command::new(workspace_bin("agent")),
        };
        let child = command
            .args(["serve", "--config"])
            .arg(work.join("agent.toml"))
            .env("RUST_LOG", "info")
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start agent");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "agent did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Agent { child, port, log }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kill the agent now (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1 for a child to listen on.
///
/// Taken below the kernel's ephemeral range (32768 and up by default), not from `bind(0)`: a port
/// from that range can become the source port of any test's outgoing connection before the child
/// binds it, and the child's readiness check would then reach someone else. Ports are handed out
/// in turn from a random start, so tests of one process never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // std's hasher keys are random per process: a random start without a dependency.
    let start = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
    let _ = NEXT.compare_exchange(u32::MAX, (start % COUNT as u64) as u32, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + COUNT);
}

/// A collector setup: repository, passphrase and collector.toml pointing at one agent.
pub struct Collector {
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Collector {
    /// Initialise a repository in `dir` and write a configuration using `cert`/`key` of `pki`.
    pub fn new(dir: &Path, pki: &Pki, agent_port: u16, cert: &str, compress: bool) -> Collector {
        fs::create_dir_all(dir).expect("collector dir");
        fs::write(dir.join("pass"), "pull test passphrase\n").expect("pass");
        let config = dir.join("collector.toml");
        fs::write(
            &config,
            format!(
                "repository = {:?}\npassphrase_file = {:?}\ncache_dir = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[[agent]]\nname = \"main\"\nendpoint = \"https://127.0.0.1:{agent_port}\"\ncompress = {compress}\nconnect_timeout_secs = 5\n",
                dir.join("repo"),
                dir.join("pass"),
                dir.join("cache"),
                pki.path("ca.pem"),
                pki.path(&format!("{cert}.pem")),
                pki.path(&format!("{cert}-key.pem")),
            ),
        )
        .expect("collector.toml");
        let c = Collector { dir: dir.to_path_buf(), config };
        let out = c.run(&["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]);
        assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
        c
    }

    /// Run `collector --config … ARGS`.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(workspace_bin("collector"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("MAGPIE_PASSPHRASE")
            .env_remove("MAGPIE_REPOSITORY")
            .output()
            .expect("run collector")
    }

    /// `pull --json`, parsed; panics unless it succeeded.
    pub fn pull(&self) -> serde_json::Value {
        let out = self.run(&["pull", "--json"]);
        assert!(
            out.status.success(),
            "pull failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pull --json");
        v[0].clone()
    }

    /// Open the repository.
    pub fn repo(&self) -> Repository {
        let mut r = Repository::open(Arc::new(LocalBackend::new(self.dir.join("repo"))), Some(b"pull test passphrase"))
            .expect("open");
        r.load_index().expect("index");
        r
    }
}

/// Wait until the files written so far are older than the margin within which the collector
/// does not trust a file unchanged by its times (2 s before the previous pull): a file written
/// just before a pull is read again by the next one.
pub fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(2100));
}
