//! `collector pull` against a real `agent serve` over mutual TLS on 127.0.0.1.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use magpie_tests::{Agent, Collector, Pki};

fn source_toml(root: &Path) -> String {
    format!("[[source]]\nname = \"files\"\nkind = \"path\"\nroots = [{root:?}]\nrole = \"data\"\n")
}

fn state(root: &Path) -> BTreeMap<Vec<u8>, magpie_tests::EntryState> {
    magpie_tests::tree_state(root)
}

/// The user.magpie extended attribute (empty when absent).
fn xattr_of(p: &Path) -> Vec<u8> {
    xattr::get(p, "user.magpie").ok().flatten().unwrap_or_default()
}

fn restore(c: &Collector, out: &Path) {
    let o = c.run(&["restore", "latest", "--target-dir", out.to_str().unwrap()]);
    assert!(o.status.success(), "restore: {}", String::from_utf8_lossy(&o.stderr));
}

/// Restore the latest snapshot into `out` and compare it with `src`, entry by entry.
fn assert_restores_identical(c: &Collector, src: &Path, out: &Path) {
    restore(c, out);
    assert_eq!(state(src), state(&inside(out, src)));
}

/// Where a source root lands inside a restore target.
fn inside(target: &Path, root: &Path) -> PathBuf {
    target.join("main").join("files").join(root.strip_prefix("/").unwrap())
}

fn setup(name: &str) -> (tempfile::TempDir, Pki, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join(name);
    fs::create_dir_all(&src).unwrap();
    (tmp, pki, src)
}

#[test]
fn pull_round_trip_with_odd_names_links_modes_and_a_large_file() {
    let (tmp, pki, src) = setup("src");
    fs::create_dir_all(src.join("dir with spaces/deeper")).unwrap();
    fs::write(src.join("dir with spaces/deeper/text.txt"), magpie_tests::text(200_000, 1)).unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("new\nline"), b"newline in the name").unwrap();
    fs::write(src.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9t\xe9")), b"not utf-8").unwrap();
    fs::write(src.join("random.bin"), magpie_tests::noise(3 << 20, 2)).unwrap();
    // More names than the agent looks up in one job (256): the rest, and the directory among
    // them, are shared out to its other walkers.
    for i in 0..300 {
        fs::write(src.join("dir with spaces").join(format!("small-{i}")), magpie_tests::text(100 + i * 7, i as u64))
            .unwrap();
    }
    fs::create_dir_all(src.join("dir with spaces/zz-late/inner")).unwrap();
    fs::write(src.join("dir with spaces/zz-late/inner/file"), b"listed by another walker").unwrap();
    fs::write(src.join("secret"), b"mode 600").unwrap();
    xattr::set(src.join("secret"), "user.magpie", b"kept").unwrap();
    fs::create_dir_all(src.join("tagged-dir")).unwrap();
    xattr::set(src.join("tagged-dir"), "user.magpie", b"dir too").unwrap();
    assert_eq!(xattr_of(&src.join("secret")), b"kept");
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(src.join("tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(src.join("tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("random.bin", src.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", src.join("dangling")).unwrap();
    fs::hard_link(src.join("secret"), src.join("dir with spaces/hard")).unwrap();
    // A 1 GiB sparse file with a few written regions.
    let big = fs::File::create(src.join("sparse-1g")).unwrap();
    big.set_len(1 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    for off in [0u64, 300 << 20, (1 << 30) - 5] {
        big.write_all_at(b"magpie", off.min((1 << 30) - 6)).unwrap();
    }
    drop(big);
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 42);
    fs::File::open(src.join("random.bin")).unwrap().set_modified(t).unwrap();

    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", true);
    let s = c.pull();
    assert!(s["snapshot"].is_string(), "{s}");
    assert_eq!(s["files_failed"], 0, "{s}");
    assert_restores_identical(&c, &src, &tmp.path().join("out"));
    // The sparse gigabyte went over the wire compressed.
    assert!(s["wire_bytes"].as_u64().unwrap() < 100 << 20, "{s}");
}

#[test]
fn unchanged_files_are_not_transferred_and_a_change_moves_only_that_file() {
    let (tmp, pki, src) = setup("src");
    for i in 0..50 {
        fs::write(src.join(format!("f{i}")), magpie_tests::noise(10_000 + i, i as u64)).unwrap();
    }
    fs::write(src.join("big"), magpie_tests::noise(5 << 20, 99)).unwrap();
    magpie_tests::settle();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    let first = c.pull();
    assert_eq!(first["files_new"], 51, "{first}");
    let second = c.pull();
    assert_eq!(second["files_unchanged"], 51, "{second}");
    assert_eq!(second["bytes_read"], 0, "{second}");
    assert_eq!(second["wire_bytes"], 0, "{second}");
    // Only directory listings can be new: the root's parents (/tmp…) change under other tests.
    assert!(second["bytes_added"].as_u64().unwrap() < 4096, "{second}");
    fs::write(src.join("f7"), b"changed").unwrap();
    let third = c.pull();
    assert_eq!(third["files_changed"], 1, "{third}");
    assert_eq!(third["files_unchanged"], 50, "{third}");
    assert_eq!(third["bytes_read"], 7, "{third}");
    assert_restores_identical(&c, &src, &tmp.path().join("out"));
}

fn pull_fails(c: &Collector) -> String {
    let o = c.run(&["pull"]);
    assert_eq!(o.status.code(), Some(4), "{}", String::from_utf8_lossy(&o.stdout));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.contains("main") && text.contains("FAILED"), "{text}");
    assert_eq!(c.run(&["list", "--json"]).stdout, b"[]\n", "no snapshot");
    text
}

/// The agent without root's power to read any file (as it runs on a server, as its own user): a
/// file it may not read, a directory it may not list and a file deleted between the listing and
/// the read are each a warning naming it, and everything else is committed and restores.
#[test]
fn unreadable_unlistable_and_vanished_files_are_warnings_the_rest_is_committed() {
    let (tmp, pki, src) = setup("src");
    fs::write(src.join("a-first"), magpie_tests::noise(4 << 20, 1)).unwrap();
    // The agent's reader streams these 84 MiB before it opens z-vanishes, deleted as soon as
    // a-first is first opened (its read-ahead helper opens files only to ask for their first
    // bytes: the reader opens each again).
    for i in 0..40 {
        fs::write(src.join(format!("m-{i:02}")), magpie_tests::noise(2 << 20, 10 + i)).unwrap();
    }
    fs::write(src.join("secret"), b"root only").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::create_dir(src.join("locked-dir")).unwrap();
    fs::write(src.join("locked-dir/inside"), b"unlisted").unwrap();
    fs::set_permissions(src.join("locked-dir"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::write(src.join("z-vanishes"), b"deleted before it is read").unwrap();

    let agent = Agent::start_unprivileged(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    let deleter = delete_on_open(&src.join("a-first"), src.join("z-vanishes"));
    let s = c.pull();
    assert!(deleter.join().unwrap(), "a-first was never opened");
    assert!(s["snapshot"].is_string(), "{s}");
    assert_eq!(s["files_failed"], 2, "{s}");
    let warnings = s["warnings"].to_string();
    for name in ["secret: not stored", "z-vanishes: not stored", "locked-dir: "] {
        assert!(warnings.contains(name), "{name} in {warnings}");
    }
    assert!(warnings.to_lowercase().contains("permission denied"), "{warnings}");

    // What could be read is stored whole; the unreadable file is absent, the unlistable
    // directory is there, empty.
    let out = tmp.path().join("out");
    restore(&c, &out);
    let got = inside(&out, &src);
    for i in 0..40 {
        let name = format!("m-{i:02}");
        assert_eq!(fs::read(got.join(&name)).unwrap(), fs::read(src.join(&name)).unwrap(), "{name}");
    }
    assert_eq!(fs::read(got.join("a-first")).unwrap(), fs::read(src.join("a-first")).unwrap());
    assert!(!got.join("secret").exists() && !got.join("z-vanishes").exists());
    assert_eq!(fs::read_dir(got.join("locked-dir")).unwrap().count(), 0);
}

/// Delete `victim` as soon as `watched` is opened; the thread answers whether it was.
fn delete_on_open(watched: &Path, victim: PathBuf) -> std::thread::JoinHandle<bool> {
    use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
    let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).unwrap();
    inotify::add_watch(&fd, watched, WatchFlags::OPEN).unwrap();
    std::thread::spawn(move || {
        let mut buf = [std::mem::MaybeUninit::uninit(); 1024];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let mut events = inotify::Reader::new(&fd, &mut buf);
            while let Ok(e) = events.next() {
                if e.events().contains(ReadFlags::OPEN) {
                    fs::remove_file(&victim).unwrap();
                    return true;
                }
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        false
    })
}

/// Files below `dir`, at any depth (none if it does not exist).
fn count_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries.map(|e| e.unwrap().path()).map(|p| if p.is_dir() { count_files(&p) } else { 1 }).sum()
}

/// Something that accepts the connection on the agent's port but never speaks (a hung agent, a
/// proxy holding the port): the pull fails that agent with a line that says so, after the
/// agent's connect_timeout_secs (5 here), instead of waiting as long as the connection lives.
#[test]
fn an_agent_that_never_answers_fails_its_pull_instead_of_hanging() {
    let (tmp, pki, _src) = setup("src");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let c = Collector::new(&tmp.path().join("collector"), &pki, port, "collector", false);
    let o = c.run(&["pull"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(4), "{text}");
    assert!(text.contains("main: FAILED") && text.contains("no answer to the handshake within 5 s"), "{text}");
    assert_eq!(c.run(&["list", "--json"]).stdout, b"[]\n", "no snapshot");
    drop(silent);
}

/// The repository is opened while the agent answers and lists: a wrong passphrase still fails
/// the pull with its own error and exit code, and writes nothing.
#[test]
fn a_wrong_passphrase_fails_the_pull_and_writes_nothing() {
    let (tmp, pki, src) = setup("src");
    fs::write(src.join("file"), b"content").unwrap();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    let repo = tmp.path().join("collector/repo");
    let files = |dir: &str| count_files(&repo.join(dir));
    let (packs, indexes) = (files("data"), files("index"));
    fs::write(c.dir.join("pass"), "not the passphrase\n").unwrap();
    let o = c.run(&["pull"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(11), "{err}");
    assert!(err.contains("wrong passphrase"), "{err}");
    assert_eq!((files("data"), files("index"), files("snapshots")), (packs, indexes, 0));
    fs::write(c.dir.join("pass"), "pull test passphrase\n").unwrap();
    assert!(c.pull()["snapshot"].is_string());
}

#[test]
fn certificates_from_another_ca_unpinned_or_expired_are_refused() {
    let (tmp, pki, src) = setup("src");
    fs::write(src.join("f"), b"x").unwrap();
    pki.certs(&["issue", "collector", "intruder"]);
    pki.certs(&["issue", "collector", "old", "--valid-from", "2020-01-01", "--valid-until", "2021-01-01"]);
    let other = Pki::new(&tmp.path().join("other-pki"));
    // The other CA's collector certificate, copied next to ours.
    fs::copy(other.path("collector.pem"), pki.path("foreign.pem")).unwrap();
    fs::copy(other.path("collector-key.pem"), pki.path("foreign-key.pem")).unwrap();
    let pinned = [pki.fingerprint("collector"), pki.fingerprint("old"), pki.fingerprint("foreign")];
    let agent = Agent::start(tmp.path(), &pki, &pinned, &source_toml(&src));

    let foreign = Collector::new(&tmp.path().join("c-foreign"), &pki, agent.port, "foreign", false);
    pull_fails(&foreign);
    let unpinned = Collector::new(&tmp.path().join("c-unpinned"), &pki, agent.port, "intruder", false);
    let text = pull_fails(&unpinned);
    assert!(text.contains("allowed_collectors"), "the error says what to fix: {text}");
    let expired = Collector::new(&tmp.path().join("c-expired"), &pki, agent.port, "old", false);
    let text = pull_fails(&expired);
    assert!(text.to_lowercase().contains("expired"), "the error says the certificate expired: {text}");

    let log = agent.log();
    assert!(log.contains(&pki.fingerprint("intruder")) && log.contains("not in tls.allowed_collectors"), "{log}");
    assert!(log.contains(&pki.fingerprint("old")), "the expired certificate is logged: {log}");
    assert!(log.matches("refused collector certificate").count() >= 3, "{log}");
    // The pinned, valid collector gets in.
    let good = Collector::new(&tmp.path().join("c-good"), &pki, agent.port, "collector", false);
    good.pull();
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let (tmp, pki, src) = setup("src");
    fs::write(src.join("f"), b"x").unwrap();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(fs::read(pki.path("ca.pem")).unwrap()))
            .domain_name("localhost");
        let ch = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", agent.port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await?;
        let mut c = magpie_proto::v1::agent_client::AgentClient::new(ch);
        c.handshake(magpie_proto::v1::HandshakeRequest::default())
            .await
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    assert!(result.is_err(), "a client without a certificate got an answer");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(agent.log().contains("TLS handshake with 127.0.0.1"), "{}", agent.log());
}

/// A gRPC client with the pinned collector identity, speaking to the agent directly as a
/// compromised collector could.
async fn raw_client(pki: &Pki, port: u16) -> magpie_proto::v1::agent_client::AgentClient<tonic::transport::Channel> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(fs::read(pki.path("ca.pem")).unwrap()))
        .identity(tonic::transport::Identity::from_pem(
            fs::read(pki.path("collector.pem")).unwrap(),
            fs::read(pki.path("collector-key.pem")).unwrap(),
        ))
        .domain_name("localhost");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap();
    magpie_proto::v1::agent_client::AgentClient::new(endpoint.tls_config(tls).unwrap().connect().await.unwrap())
}

/// Ask the agent for paths directly.
fn read_raw(pki: &Pki, port: u16, paths: Vec<Vec<u8>>) -> Vec<magpie_proto::v1::FileFrame> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = raw_client(pki, port).await;
        let mut s = c
            .read_files(magpie_proto::v1::ReadFilesRequest { source: "files".into(), paths, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let mut buf = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            buf.extend_from_slice(&m.data);
        }
        let mut frames = Vec::new();
        let mut rest = buf.as_slice();
        while !rest.is_empty() {
            frames.push(<magpie_proto::v1::FileFrame as prost::Message>::decode_length_delimited(&mut rest).unwrap());
        }
        frames
    })
}

#[test]
fn symlinks_out_of_a_root_are_recorded_never_followed() {
    let (tmp, pki, src) = setup("src");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), b"must not be read").unwrap();
    std::os::unix::fs::symlink(&outside, src.join("escape-dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), src.join("escape-file")).unwrap();
    fs::write(src.join("ok"), b"fine").unwrap();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    let s = c.pull();
    assert_eq!(s["bytes_read"], 4, "only `ok` was read: {s}");
    let ls = String::from_utf8(c.run(&["ls", "latest", "-R"]).stdout).unwrap();
    assert!(ls.contains("escape-dir -> ") && ls.contains("escape-file -> "), "{ls}");
    assert!(!ls.contains("escape-dir/secret"), "{ls}");
    // Asked directly, the agent refuses every way out of the root.
    let rel = |p: &Path| p.strip_prefix("/").unwrap().as_os_str().as_bytes().to_vec();
    let mut escape = rel(&src);
    escape.extend_from_slice(b"/escape-dir/secret");
    let mut through_file = rel(&src);
    through_file.extend_from_slice(b"/escape-file");
    let mut dotdot = rel(&src);
    dotdot.extend_from_slice(b"/../outside/secret");
    let frames = read_raw(&pki, agent.port, vec![escape, through_file, dotdot, rel(&outside.join("secret"))]);
    assert_eq!(frames.len(), 4, "one (error) frame per path");
    for f in &frames {
        assert!(f.end && !f.error.is_empty() && f.data.is_empty(), "{f:?}");
    }
}

#[test]
fn agent_killed_mid_pull_fails_cleanly_and_the_next_pull_succeeds() {
    let (tmp, pki, src) = setup("src");
    for i in 0..4 {
        fs::write(src.join(format!("big{i}")), magpie_tests::noise(64 << 20, i)).unwrap();
    }
    let mut agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let port = agent.port;
    let c = Collector::new(&tmp.path().join("collector"), &pki, port, "collector", true);
    let child = std::process::Command::new(magpie_tests::workspace_bin("collector"))
        .arg("--config")
        .arg(&c.config)
        .arg("pull")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the agent once the pull is under way (its log shows the handshake).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !agent.log().contains("handshake from collector") {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    agent.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(c.run(&["list", "--json"]).stdout, b"[]\n", "nothing partial was committed");
    // Restart where the collector expects it; the next pull into the same repository succeeds.
    drop(agent);
    let _agent = Agent::start_on(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src), port);
    let s = c.pull();
    assert_eq!(s["files_new"], 4, "{s}");
    let o = c.run(&["check", "--verify-data"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_restores_identical(&c, &src, &tmp.path().join("out"));
}

#[test]
fn a_changed_mebibyte_in_a_large_file_travels_as_a_small_delta() {
    let (tmp, pki, src) = setup("src");
    let size = 256usize << 20;
    let mut data = magpie_tests::noise(size, 7);
    fs::write(src.join("disk.img"), &data).unwrap();
    // A file that will change wholesale: the delta does not pay and it travels whole.
    fs::write(src.join("rewritten"), magpie_tests::noise(2 << 20, 1)).unwrap();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", true);
    c.pull();
    let sig = |content: &[u8]| c.dir.join("cache").join(format!("{}-2048.sig", blake3::hash(content).to_hex()));
    // A new file that is not database content is not signed until it changes: the first delta
    // diffs against a signature built from the repository.
    assert!(!sig(&data).exists(), "a file that has not changed yet has no cached signature");
    let mid = size / 2;
    data[mid..mid + (1 << 20)].copy_from_slice(&magpie_tests::noise(1 << 20, 8));
    fs::write(src.join("disk.img"), &data).unwrap();
    fs::write(src.join("rewritten"), magpie_tests::noise(2 << 20, 2)).unwrap();
    // Older than the next pull's margin: only disk.img changes for it.
    magpie_tests::settle();
    let s = c.pull();
    assert_eq!(s["files_changed"], 2, "{s}");
    assert_eq!(s["files_delta"], 1, "{s}");
    let wire = s["wire_bytes"].as_u64().unwrap();
    let whole_rewritten = 2u64 << 20;
    assert!(
        wire - whole_rewritten.min(wire) < (size as u64) * 3 / 100,
        "{wire} bytes on the wire for a 1 MiB change: {s}"
    );
    // New: the rewritten file, the changed MiB and at most one chunk (≤ 4 MiB) on either side
    // of it; chunk boundaries depend on the repository's key, so this is the bound, not a mean.
    assert!(s["bytes_added"].as_u64().unwrap() <= 11 << 20, "only chunks around the change are new: {s}");
    // A file that changed is signed as it arrives, for the next delta.
    assert!(sig(&data).exists(), "signature of the new version is cached");
    assert_restores_identical(&c, &src, &tmp.path().join("out"));
    // The next change diffs against the cached signature and still verifies; the replaced
    // version's signature is removed.
    let before = data.clone();
    data[10..20].copy_from_slice(b"0123456789");
    fs::write(src.join("disk.img"), &data).unwrap();
    let s = c.pull();
    assert_eq!(s["files_delta"], 1, "{s}");
    assert!(sig(&data).exists() && !sig(&before).exists(), "only the newest version's signature is kept");
    assert_restores_identical(&c, &src, &tmp.path().join("out2"));
}

/// Rows of a table as `COPY` writes them: id, author, a body of words.
fn table_rows(n: usize, seed: u64) -> Vec<String> {
    const WORDS: [&str; 12] =
        ["the", "backup", "server", "pulls", "every", "night", "and", "keeps", "what", "changed", "only", "once"];
    let mut next = magpie_tests::xorshift(seed | 1);
    (0..n)
        .map(|i| {
            let words = 10 + next() % 50;
            let body: Vec<&str> = (0..words).map(|_| WORDS[(next() % 12) as usize]).collect();
            format!("{i}\tuser{}\t{}", next() % 5000, body.join(" "))
        })
        .collect()
}

/// A day's change as PostgreSQL makes it: every 500th row updated, moved to the end of the table.
fn update_rows(rows: &mut Vec<String>) {
    let mut moved = Vec::new();
    let mut i = 0;
    rows.retain(|r| {
        i += 1;
        let keep = i % 500 != 0;
        if !keep {
            moved.push(format!("{r} edited"));
        }
        keep
    });
    rows.extend(moved);
}

#[test]
fn a_database_dump_among_files_is_chunked_as_a_dump() {
    let (tmp, pki, src) = setup("src");
    let header = "--\n-- PostgreSQL database dump\n--\n\nCOPY public.posts (id, author, body) FROM stdin;\n";
    let write = |name: &str, head: &str, rows: &[String]| {
        fs::write(src.join(name), format!("{head}{}\n\\.\n", rows.join("\n"))).unwrap();
    };
    let (mut dump, mut plain) = (table_rows(80_000, 1), table_rows(80_000, 2));
    write("app.sql", header, &dump);
    // The same kind of rows without a dump's header: an ordinary file to the collector.
    write("rows.txt", "", &plain);
    magpie_tests::settle();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", true);
    c.pull();
    let size = fs::metadata(src.join("app.sql")).unwrap().len();
    // Database content changes every day: it is signed on its first pull, the plain rows are not.
    let signed = |name: &str| {
        let content = fs::read(src.join(name)).unwrap();
        let hash = blake3::hash(&content).to_hex();
        fs::read_dir(c.dir.join("cache"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(hash.as_str()))
    };
    assert!(signed("app.sql") && !signed("rows.txt"));
    // The dump's chunks were compressed with a dictionary trained on them, which its snapshot names.
    let dictionaries = || fs::read_dir(c.dir.join("repo/dicts")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(dictionaries(), 1);
    let named = || c.repo().snapshots().unwrap().last().unwrap().1.dictionary.clone();
    let first = named();
    assert_eq!(first.len(), 32);

    update_rows(&mut dump);
    write("app.sql", header, &dump);
    let s = c.pull();
    assert_eq!(s["files_delta"], 1, "{s}");
    // Its changed chunks are stored against the chunks they replace: a few hundred bytes each.
    let dump_stored = s["stored_added"].as_u64().unwrap();
    assert!(dump_stored < size / 20, "the dump's update stored {dump_stored} bytes for its {size}: {s}");
    // The next pull of the source used the same dictionary again.
    assert_eq!(dictionaries(), 1);
    assert_eq!(named(), first);

    // The premise: with the file chunker the same change re-stores nearly the whole file.
    update_rows(&mut plain);
    write("rows.txt", "", &plain);
    let s = c.pull();
    let added = s["bytes_added"].as_u64().unwrap();
    assert!(added > size * 4 / 5, "the plain file's update stored only {added} of about {size} bytes: {s}");
    let stored = s["stored_added"].as_u64().unwrap();
    assert!(stored > dump_stored * 10, "the plain file's update stored {stored} bytes, the dump's {dump_stored}: {s}");

    assert_restores_identical(&c, &src, &tmp.path().join("out"));

    // An off-site copy keeps the dump's chunks compressed with a dictionary: the target's own, one
    // for the source, named by every copied snapshot.
    let copy = tmp.path().join("copy");
    let to = copy.to_str().unwrap();
    let ok = |args: &[&str]| {
        let o = c.run(args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    ok(&["--repo", to, "init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]);
    ok(&["copy", "--to", to]);
    assert_eq!(fs::read_dir(copy.join("dicts")).unwrap().count(), 1);
    let target = repo_format::Repository::open(
        std::sync::Arc::new(repo_format::backend::LocalBackend::new(&copy)),
        Some(b"pull test passphrase"),
    )
    .unwrap();
    let named: Vec<Vec<u8>> = target.snapshots().unwrap().into_iter().map(|(_, s)| s.dictionary).collect();
    assert_eq!(named.len(), 3);
    assert!(named.iter().all(|d| d.len() == 32 && *d == named[0]), "{named:?}");
    let out = tmp.path().join("out-copy");
    ok(&["--repo", to, "restore", "latest", "--target-dir", out.to_str().unwrap()]);
    assert_eq!(state(&src), state(&inside(&out, &src)));
}

#[test]
fn excluded_subtrees_and_forged_signatures_are_refused() {
    let (tmp, pki, src) = setup("src");
    fs::create_dir_all(src.join("cache/deep")).unwrap();
    fs::write(src.join("cache/deep/secret"), b"excluded").unwrap();
    fs::write(src.join("kept"), b"kept").unwrap();
    let sources = format!("{}exclude = [\"**/cache\"]\n", source_toml(&src));
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &sources);
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    let s = c.pull();
    assert_eq!(s["bytes_read"], 4, "{s}");
    // A file below an excluded directory is refused even when asked for by name.
    let mut p = src.strip_prefix("/").unwrap().as_os_str().as_bytes().to_vec();
    p.extend_from_slice(b"/cache/deep/secret");
    let frames = read_raw(&pki, agent.port, vec![p.clone()]);
    assert!(frames[0].error.contains("excluded") && frames[0].data.is_empty(), "{:?}", frames[0]);
    // A signature with a zero block size would make the diff spin: refused up front.
    let mut forged = 0x7273_0136u32.to_be_bytes().to_vec();
    forged.extend_from_slice(&0u32.to_be_bytes());
    forged.extend_from_slice(&0u32.to_be_bytes());
    let mut kept = src.strip_prefix("/").unwrap().as_os_str().as_bytes().to_vec();
    kept.extend_from_slice(b"/kept");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let mut c = raw_client(&pki, agent.port).await;
        let req = magpie_proto::v1::DeltaRequest {
            source: "files".into(),
            path: kept,
            signature: forged,
            ..Default::default()
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), c.delta(req))
            .await
            .expect("answered at once")
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

#[test]
fn sources_are_pulled_side_by_side_each_into_its_own_snapshot() {
    let (tmp, pki, a) = setup("a");
    let b = tmp.path().join("b");
    fs::create_dir_all(&b).unwrap();
    fs::write(a.join("one"), magpie_tests::noise(3 << 20, 1)).unwrap();
    fs::write(b.join("two"), magpie_tests::noise(3 << 20, 2)).unwrap();
    let sources = format!(
        "[[source]]\nname = \"a\"\nkind = \"path\"\nroots = [{a:?}]\n[[source]]\nname = \"b\"\nkind = \"path\"\nroots = [{b:?}]\nrole = \"blobs\"\n"
    );
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &sources);
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", true);
    let o = c.run(&["pull", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v.as_array().unwrap().iter().map(|s| s["source"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(v.as_array().unwrap().iter().all(|s| s["snapshot"].is_string()), "{v}");
    let list: serde_json::Value = serde_json::from_slice(&c.run(&["list", "--json"]).stdout).unwrap();
    let roles: Vec<(&str, &str)> =
        list.as_array().unwrap().iter().map(|s| (s["source"].as_str().unwrap(), s["role"].as_str().unwrap())).collect();
    assert!(roles.contains(&("a", "data")) && roles.contains(&("b", "blobs")), "{roles:?}");
    let o = c.run(&["check", "--verify-data"]);
    assert!(
        o.status.success(),
        "two concurrent sessions leave a clean repository: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// Flip a byte in the middle of blob `id` where its pack lies in `c`'s repository: that blob no
/// longer authenticates, the rest of the pack still does.
fn damage_blob(c: &Collector, id: &repo_format::Id) {
    let loc = c.repo().locate(id).unwrap();
    let path = c.dir.join("repo").join(repo_format::repofile::pack_name(&loc.pack));
    let mut pack = fs::read(&path).unwrap();
    pack[(loc.entry.offset + loc.entry.stored_len / 2) as usize] ^= 0xff;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, pack).unwrap();
}

/// A damaged repository does not stop the backups of a source: when a changed file's previous
/// version cannot be read, it travels whole; when the previous snapshot's tree cannot be read,
/// every file does. Each pull says so in its warnings, and what it stored restores intact.
#[test]
fn a_damaged_previous_version_or_snapshot_means_reading_whole_not_failing() {
    let (tmp, pki, src) = setup("src");
    let mut data = magpie_tests::noise(3 << 20, 11);
    fs::write(src.join("big.img"), &data).unwrap();
    fs::write(src.join("notes.txt"), "kept\n").unwrap();
    magpie_tests::settle();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    c.pull();

    // big.img changes; its previous version's first chunk is damaged, and it has no cached
    // signature (a file that had not changed yet), so the delta would need that chunk.
    let repo = c.repo();
    let (_, snap) = repo.snapshots().unwrap().pop().unwrap();
    let mut first_chunk = None;
    repo_format::fs::walk(&repo, &repo_format::Id::from_slice(&snap.tree).unwrap(), &mut |p, n| {
        if p.ends_with(b"big.img") {
            first_chunk = repo_format::Id::from_slice(&n.content[0].id);
        }
        Ok(())
    })
    .unwrap();
    damage_blob(&c, &first_chunk.expect("big.img has content"));
    data[100..110].copy_from_slice(b"0123456789");
    fs::write(src.join("big.img"), &data).unwrap();
    let s = c.pull();
    assert!(s["error"].is_null(), "{s}");
    assert_eq!((s["files_changed"].as_u64(), s["files_delta"].as_u64()), (Some(1), Some(0)), "{s}");
    assert!(s["warnings"].to_string().contains("big.img: its previous version cannot be read"), "{s}");
    assert_restores_identical(&c, &src, &tmp.path().join("out"));

    // Now the newest snapshot's root tree is damaged: the next pull reuses nothing from it.
    let (_, snap) = c.repo().snapshots().unwrap().pop().unwrap();
    damage_blob(&c, &repo_format::Id::from_slice(&snap.tree).unwrap());
    fs::write(src.join("notes.txt"), "changed\n").unwrap();
    let s = c.pull();
    assert!(s["error"].is_null(), "{s}");
    assert_eq!((s["files_unchanged"].as_u64(), s["files_new"].as_u64()), (Some(0), Some(2)), "{s}");
    assert!(s["warnings"].to_string().contains("the previous snapshot cannot be read"), "{s}");
    assert_restores_identical(&c, &src, &tmp.path().join("out2"));
}

/// A repository that cannot take a write in the middle of a delta (here: a file size limit,
/// as a full disk would) fails the pull with the write's own error, not a vague one, commits
/// nothing, and the next pull succeeds.
#[test]
fn a_write_failing_during_a_delta_fails_the_pull_with_its_cause() {
    let (tmp, pki, src) = setup("src");
    let mut data = magpie_tests::noise(48 << 20, 21);
    fs::write(src.join("big.img"), &data).unwrap();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    c.pull();
    // More new content than a pack holds (16 MiB): a full pack is stored while windows arrive.
    data[12 << 20..32 << 20].copy_from_slice(&magpie_tests::noise(20 << 20, 22));
    fs::write(src.join("big.img"), &data).unwrap();
    // No file of more than 1 MiB: the new chunks' pack cannot be written. SIGXFSZ is ignored so
    // that the write fails with EFBIG instead of killing the process.
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 1024; exec \"$0\" --config \"$1\" pull --json")
        .arg(magpie_tests::workspace_bin("collector"))
        .arg(&c.config)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let error = v[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("File too large"), "the write's own error: {v}");
    assert_eq!(c.repo().snapshots().unwrap().len(), 1, "nothing committed");
    let s = c.pull();
    assert_eq!(s["files_delta"], 1, "{s}");
    assert_restores_identical(&c, &src, &tmp.path().join("out"));
}

/// Write to `path` (a byte at its start, in place) whenever a reader is reading it, from its
/// first read to its close, for the first `reads` reads: those see the file change under them.
fn spoil_reads(path: &Path, reads: usize) -> std::thread::JoinHandle<usize> {
    use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
    use std::os::unix::fs::FileExt;
    let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).unwrap();
    inotify::add_watch(&fd, path, WatchFlags::ACCESS | WatchFlags::CLOSE_NOWRITE).unwrap();
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    std::thread::spawn(move || {
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        let (mut spoiled, mut reading, mut writes) = (0, false, 0usize);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while spoiled < reads && std::time::Instant::now() < deadline {
            let mut events = inotify::Reader::new(&fd, &mut buf);
            while let Ok(e) = events.next() {
                if e.events().contains(ReadFlags::ACCESS) {
                    reading = true;
                }
                if e.events().contains(ReadFlags::CLOSE_NOWRITE) && reading {
                    (reading, spoiled) = (false, spoiled + 1);
                }
            }
            if reading {
                writes += 1;
                file.write_at(&[writes as u8], 0).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        writes
    })
}

/// A file written to while the agent reads it is read once more, and the second read is what
/// is stored; only a file that changes under both reads is stored as read, with a warning.
#[test]
fn a_file_written_while_it_is_read_is_read_again() {
    let (tmp, pki, src) = setup("src");
    let busy = src.join("busy.bin");
    fs::write(&busy, magpie_tests::noise(64 << 20, 31)).unwrap();
    fs::write(src.join("calm.txt"), "calm\n").unwrap();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);

    let spoiler = spoil_reads(&busy, 1);
    let s = c.pull();
    assert!(spoiler.join().unwrap() > 0, "the first read was written to");
    assert!(!s["warnings"].to_string().contains("busy.bin"), "{s}");
    assert!(s["bytes_read"].as_u64().unwrap() >= 2 * (64 << 20), "read twice: {s}");
    // The second, undisturbed read is what is stored.
    assert_restores_identical(&c, &src, &tmp.path().join("out"));

    // Changed since, and written to under its delta, its whole read and its read once more.
    fs::write(&busy, magpie_tests::noise(64 << 20, 32)).unwrap();
    let spoiler = spoil_reads(&busy, 3);
    let s = c.pull();
    spoiler.join().unwrap();
    assert_eq!(s["files_delta"], 0, "{s}");
    assert!(s["warnings"].to_string().contains("busy.bin: changed while it was read, twice"), "{s}");
}

/// A file last changed within 2 s of a pull's start may be written again after that pull read
/// it, in the same tick of its filesystem's clock and so with the same times: the next pull
/// reads it again instead of trusting its times. Older files are trusted.
#[test]
fn a_file_changed_just_before_a_pull_is_read_again_by_the_next() {
    let (tmp, pki, src) = setup("src");
    fs::write(src.join("settled.txt"), "old enough\n").unwrap();
    let agent = Agent::start(tmp.path(), &pki, &[pki.fingerprint("collector")], &source_toml(&src));
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    magpie_tests::settle();
    fs::write(src.join("fresh.txt"), "just written\n").unwrap();
    c.pull();
    magpie_tests::settle();
    let s = c.pull();
    assert_eq!((s["files_unchanged"].as_u64(), s["files_changed"].as_u64()), (Some(1), Some(1)), "{s}");
    assert_eq!(s["bytes_read"], "just written\n".len(), "only fresh.txt is read: {s}");
    // That pull started long after fresh.txt last changed: now both are trusted.
    let s = c.pull();
    assert_eq!((s["files_unchanged"].as_u64(), s["bytes_read"].as_u64()), (Some(2), Some(0)), "{s}");
}
