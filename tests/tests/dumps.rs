//! Dump sources end to end: the real agent dumps real servers (started here from Debian's
//! packages on 127.0.0.1), the real collector pulls the dumps over mutual TLS, and what comes
//! back out of the repository is loaded into fresh servers and checked.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use magpie_tests::servers::{Mariadb, Postgres, Redis, sh};
use magpie_tests::{Agent, Collector, Pki};
use repo_format::Snapshot;

const PG_PASSWORD: &str = "pg-Secret-7731";

struct Setup {
    tmp: tempfile::TempDir,
    agent: Agent,
    collector: Collector,
}

impl Setup {
    /// An agent serving `sources` (with its spool in the test's directory) and a collector.
    fn new(tmp: tempfile::TempDir, sources: &str, spool_max: &str) -> Setup {
        let pki = Pki::new(&tmp.path().join("pki"));
        let agent_dir = tmp.path().join("agent");
        fs::create_dir_all(&agent_dir).unwrap();
        let config = format!("{sources}\n[spool]\ndir = {:?}\nmax_bytes = {spool_max:?}\n", tmp.path().join("spool"));
        let agent = Agent::start(&agent_dir, &pki, &[pki.fingerprint("collector")], &config);
        let collector = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
        Setup { tmp, agent, collector }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// `pull --json --source S ARGS`: the summary, or the whole output on failure.
    fn pull(&self, source: &str, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = self.collector.run(&[&["pull", "--json", "--source", source], args].concat());
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value =
            serde_json::from_str(&stdout).map_err(|_| format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))?;
        let s = v[0].clone();
        if out.status.success() && s["error"].is_null() { Ok(s) } else { Err(format!("exit {:?}: {s}", out.status)) }
    }

    /// Restore snapshot `id` into `out`; returns where its files are (`out/AGENT/SOURCE`).
    fn restore(&self, id: &str, out: &Path) -> PathBuf {
        let o = self.collector.run(&["restore", id, "--target-dir", out.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "restore: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let snap = self.snapshot(id);
        out.join(&snap.agent).join(&snap.source)
    }

    fn snapshot(&self, id: &str) -> Snapshot {
        let repo = self.collector.repo();
        repo.load_snapshot(&repo.find_snapshot(id).unwrap()).unwrap()
    }

    fn snapshot_count(&self) -> usize {
        self.collector.repo().snapshots().unwrap().len()
    }

    /// The agent removes a session's spool when its pull ends; give it a moment.
    fn assert_spool_empty(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<_> = fs::read_dir(self.path("spool")).unwrap().collect();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "spool not cleaned: {left:?}\n{}", self.agent.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn blake3_file(p: &Path) -> Vec<u8> {
    blake3::hash(&fs::read(p).unwrap()).as_bytes().to_vec()
}

#[test]
fn postgres_dump_under_pgbench_load_restores_consistent_with_exact_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&tmp.path().join("pg"), PG_PASSWORD);
    pg.sql("postgres", "CREATE DATABASE bench");
    sh(pg.tool("pgbench").args(["-i", "-s", "2", "-q", "bench"]).stderr(Stdio::null()));
    fs::write(tmp.path().join("pg.pass"), format!("{PG_PASSWORD}\n")).unwrap();
    fs::write(tmp.path().join("wrong.pass"), "not-the-Password-991\n").unwrap();
    // Client tools whose pg_dump is too old for the server.
    let old = tmp.path().join("old-bin");
    fs::create_dir_all(&old).unwrap();
    for tool in ["psql", "pg_dumpall"] {
        std::os::unix::fs::symlink(pg.bin.join(tool), old.join(tool)).unwrap();
    }
    fs::write(old.join("pg_dump"), "#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n").unwrap();
    fs::set_permissions(old.join("pg_dump"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sources = format!(
        "[[source]]\nname = \"pg\"\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\npassword_file = {good:?}\ndatabases = \"*\"\n\
         [[source]]\nname = \"pg-wrong\"\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\npassword_file = {bad:?}\ndatabases = [\"bench\"]\n\
         [[source]]\nname = \"pg-old\"\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\npassword_file = {good:?}\nbin_dir = {old:?}\n",
        port = pg.port,
        good = tmp.path().join("pg.pass"),
        bad = tmp.path().join("wrong.pass"),
    );
    let s = Setup::new(tmp, &sources, "10G");
    // Made after the configuration: `databases = "*"` finds it at dump time.
    pg.sql("postgres", "CREATE DATABASE late");
    pg.sql("late", "CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 123)");

    // Writes all through the dump.
    let history = || pg.sql("bench", "SELECT count(*) FROM pgbench_history").trim().parse::<u64>().unwrap();
    let mut load = pg
        .tool("pgbench")
        .args(["-n", "-c", "4", "-j", "2", "-T", "600", "bench"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while history() < 200 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = history();
    // Every command line on the machine, watched while the dump runs.
    let (watching, leaks) = (Arc::new(AtomicBool::new(true)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let watcher = {
        let (watching, leaks) = (watching.clone(), leaks.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                for p in fs::read_dir("/proc").unwrap().flatten() {
                    if let Ok(c) = fs::read(p.path().join("cmdline"))
                        && String::from_utf8_lossy(&c).contains(PG_PASSWORD)
                    {
                        leaks.lock().unwrap().push(String::from_utf8_lossy(&c).replace('\0', " "));
                    }
                }
            }
        })
    };
    let summary = s.pull("pg", &[]).expect("pull under load");
    watching.store(false, Ordering::Relaxed);
    watcher.join().unwrap();
    let after = history();
    let _ = load.kill();
    let _ = load.wait();
    assert!(after > before + 100, "the load must run during the pull ({before} → {after})");
    s.assert_spool_empty();

    let id = summary["snapshot"].as_str().unwrap().to_string();
    let out = s.restore(&id, &s.path("out"));
    let snap = s.snapshot(&id);
    let names: Vec<&str> = snap.dumps.iter().map(|d| d.path.as_str()).collect();
    for want in ["globals.sql", "bench.pgdump", "late.pgdump", "postgres.pgdump"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for d in &snap.dumps {
        assert_eq!(d.blake3, blake3_file(&out.join(&d.path)), "{} restored as dumped", d.path);
        assert!(d.server_version.starts_with(|c: char| c.is_ascii_digit()), "{d:?}");
        assert!(d.tool_version.contains("pg_dump") || d.kind == "postgres-globals", "{d:?}");
        assert!(d.end_ns >= d.start_ns && d.start_ns > 0);
    }
    assert!(fs::read_to_string(out.join("globals.sql")).unwrap().contains("ALTER ROLE postgres"));
    let readme = fs::read_to_string(out.join("README.txt")).unwrap();
    assert!(readme.contains("bench.pgdump: createdb 'bench' && pg_restore"), "{readme}");

    // Load the dump into a fresh database: pgbench's invariant holds and the rows are those
    // the metadata recorded.
    pg.sql("postgres", "CREATE DATABASE restored");
    sh(pg.tool("pg_restore").args(["-j", "2", "-d", "restored"]).arg(out.join("bench.pgdump")));
    let sums = pg.sql(
        "restored",
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), \
         (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(delta) FROM pgbench_history)",
    );
    let sums: Vec<&str> = sums.trim().split('|').collect();
    assert!(sums.iter().all(|x| *x == sums[0]), "pgbench invariant broken: {sums:?}");
    let bench = snap.dumps.iter().find(|d| d.path == "bench.pgdump").unwrap();
    assert!(bench.rows_exact);
    assert_eq!(bench.tables.len(), 4, "{:?}", bench.tables);
    for t in &bench.tables {
        let n: u64 = pg.sql("restored", &format!("SELECT count(*) FROM {}", t.name)).trim().parse().unwrap();
        assert_eq!(n, t.rows, "{}", t.name);
    }
    let history_rows = bench.tables.iter().find(|t| t.name == "public.pgbench_history").unwrap().rows;
    assert!(history_rows >= before && history_rows <= after, "{before} ≤ {history_rows} ≤ {after}");
    let late = snap.dumps.iter().find(|d| d.path == "late.pgdump").unwrap();
    assert_eq!(late.tables.iter().map(|t| (t.name.as_str(), t.rows)).collect::<Vec<_>>(), [("public.t", 123)]);

    // A pg_dump older than the server is refused before it runs.
    let err = s.pull("pg-old", &[]).unwrap_err();
    assert!(err.contains("pg_dump 9 is older than the server"), "{err}");

    // A wrong password: one line naming the source, no snapshot, no password anywhere.
    let count = s.snapshot_count();
    let err = s.pull("pg-wrong", &[]).unwrap_err();
    assert!(err.contains("pg-wrong") && err.contains("password authentication failed"), "{err}");
    assert_eq!(s.snapshot_count(), count);
    s.assert_spool_empty();
    let log = s.agent.log();
    let repo = s.collector.repo();
    let everything: String = repo.snapshots().unwrap().iter().map(|(_, snap)| format!("{snap:?}")).collect();
    for secret in [PG_PASSWORD, "not-the-Password-991"] {
        assert!(!err.contains(secret) && !log.contains(secret), "{secret} leaked");
        assert!(!everything.contains(secret), "{secret} in the repository's metadata");
    }
    assert!(leaks.lock().unwrap().is_empty(), "password in a command line: {:?}", leaks.lock().unwrap());
}

/// A WAL-mode database with an invariant the writer keeps: the balances always sum to 10 000
/// and `meta.entries` equals the rows of `entries`.
fn sqlite_writer(path: &Path, stop: Arc<AtomicBool>, commits: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    let db = rusqlite::Connection::open(path).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.execute_batch(
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
         CREATE TABLE entries (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL, note TEXT);
         CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
         INSERT INTO meta VALUES ('entries', 0);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)
         INSERT INTO accounts SELECT i, 100 FROM n;",
    )
    .unwrap();
    std::thread::spawn(move || {
        let mut db = db;
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let (from, to, amount) = ((i * 7) as i64 % 100 + 1, (i * 13) as i64 % 100 + 1, (i % 5) as i64 + 1);
            let tx = db.transaction().unwrap();
            tx.execute("UPDATE accounts SET balance = balance - ?1 WHERE id = ?2", (amount, from)).unwrap();
            tx.execute("UPDATE accounts SET balance = balance + ?1 WHERE id = ?2", (amount, to)).unwrap();
            tx.execute("INSERT INTO entries (amount, note) VALUES (?1, ?2)", (amount, "x".repeat(200))).unwrap();
            tx.execute("UPDATE meta SET v = v + 1 WHERE k = 'entries'", ()).unwrap();
            tx.commit().unwrap();
            commits.fetch_add(1, Ordering::Relaxed);
        }
    })
}

#[test]
fn sqlite_glob_copies_each_store_consistently_under_a_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let actors = tmp.path().join("actors");
    for a in ["alice", "bob"] {
        fs::create_dir_all(actors.join(a)).unwrap();
    }
    let quiet = rusqlite::Connection::open(actors.join("bob/store.sqlite")).unwrap();
    quiet.execute_batch("CREATE TABLE posts (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO posts (body) VALUES ('a'), ('b'), ('c');").unwrap();
    drop(quiet);
    // Someone who can write beside the stores plants a link to another database.
    let elsewhere = tmp.path().join("not-a-store.sqlite");
    rusqlite::Connection::open(&elsewhere).unwrap().execute_batch("CREATE TABLE secrets (x)").unwrap();
    fs::create_dir_all(actors.join("mallory")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, actors.join("mallory/store.sqlite")).unwrap();
    let (stop, commits) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = sqlite_writer(&actors.join("alice/store.sqlite"), stop.clone(), commits.clone());
    let sources =
        format!("[[source]]\nname = \"stores\"\nkind = \"sqlite\"\npath = \"{}/*/store.sqlite\"\n", actors.display());
    let s = Setup::new(tmp, &sources, "10G");
    while commits.load(Ordering::Relaxed) < 500 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = commits.load(Ordering::Relaxed);
    let summary = s.pull("stores", &[]).expect("pull");
    let during = commits.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(during > 0, "the writer must commit during the pull");
    s.assert_spool_empty();

    let id = summary["snapshot"].as_str().unwrap();
    let out = s.restore(id, &s.path("out"));
    let snap = s.snapshot(id);
    assert_eq!(snap.dumps.len(), 2, "{:?}", snap.dumps);
    assert!(summary["warnings"].to_string().contains("mallory/store.sqlite skipped"), "{summary}");
    for d in &snap.dumps {
        let file = out.join(&d.path);
        assert!(d.database.ends_with("/store.sqlite") && d.rows_exact, "{d:?}");
        assert_eq!(d.blake3, blake3_file(&file));
        // Header bytes 18 and 19 are 2 in WAL mode: the copy is a rollback-journal database,
        // whole in its one file.
        assert_eq!(&fs::read(&file).unwrap()[18..20], [1, 1], "the copy stands alone");
        let db = rusqlite::Connection::open(&file).unwrap();
        let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        for t in &d.tables {
            let n: i64 = db.query_row(&format!("SELECT count(*) FROM {}", t.name), [], |r| r.get(0)).unwrap();
            assert_eq!(n as u64, t.rows, "{} of {}", t.name, d.path);
        }
        if d.path.contains("alice") {
            let total: i64 = db.query_row("SELECT sum(balance) FROM accounts", [], |r| r.get(0)).unwrap();
            let (rows, counter): (i64, i64) = db
                .query_row("SELECT (SELECT count(*) FROM entries), (SELECT v FROM meta)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap();
            assert_eq!(total, 10_000);
            assert_eq!(rows, counter);
            assert!(rows as u64 >= before, "the copy is of an instant during the pull");
        } else {
            assert_eq!(d.tables.iter().map(|t| (t.name.as_str(), t.rows)).collect::<Vec<_>>(), [("posts", 3)]);
        }
    }
}

#[test]
fn mariadb_round_trip_and_a_warning_for_tables_that_are_not_innodb() {
    let tmp = tempfile::tempdir().unwrap();
    let db = Mariadb::start(&tmp.path().join("mariadb"));
    db.sql(
        "CREATE DATABASE shop; \
         CREATE TABLE shop.items (id INT PRIMARY KEY, name VARCHAR(100), price DECIMAL(10,2), data BLOB) ENGINE=InnoDB; \
         CREATE TABLE shop.legacy (id INT PRIMARY KEY) ENGINE=MyISAM; \
         INSERT INTO shop.legacy VALUES (1), (2); \
         CREATE USER 'magpie'@'127.0.0.1' IDENTIFIED BY 'maria-Pw-42'; \
         GRANT SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES, PROCESS ON *.* TO 'magpie'@'127.0.0.1';",
    );
    let values: Vec<String> = (0..500)
        .map(|i| format!("({i}, 'item \\'{i}\\' ünïcode', {}.{:02}, x'{:04x}00ff')", i * 3, i % 100, i))
        .collect();
    db.sql(&format!("INSERT INTO shop.items VALUES {}", values.join(", ")));
    let before = db.sql("SELECT * FROM shop.items ORDER BY id");
    fs::write(tmp.path().join("maria.pass"), "maria-Pw-42\n").unwrap();
    let sources = format!(
        "[[source]]\nname = \"maria\"\nkind = \"mariadb\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"magpie\"\npassword_file = {:?}\ndatabases = \"*\"\n",
        db.port,
        tmp.path().join("maria.pass")
    );
    let s = Setup::new(tmp, &sources, "10G");
    let summary = s.pull("maria", &[]).expect("pull");
    let warnings = summary["warnings"].to_string();
    assert!(warnings.contains("legacy") && warnings.contains("MyISAM"), "{summary}");
    let id = summary["snapshot"].as_str().unwrap();
    let snap = s.snapshot(id);
    assert_eq!(snap.dumps.iter().map(|d| d.path.as_str()).collect::<Vec<_>>(), ["shop.sql"]);
    let items = snap.dumps[0].tables.iter().find(|t| t.name == "items").unwrap();
    assert_eq!(items.rows, 500);

    let out = s.restore(id, &s.path("out"));
    db.sql("DROP DATABASE shop");
    let dump = fs::File::open(out.join("shop.sql")).unwrap();
    let load = db.client().stdin(dump).output().unwrap();
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    assert_eq!(db.sql("SELECT * FROM shop.items ORDER BY id"), before);
    assert_eq!(db.sql("SELECT count(*) FROM shop.legacy").trim(), "2");
    assert!(!s.agent.log().contains("maria-Pw-42"));
}

#[test]
fn redis_round_trip_through_the_rdb() {
    let tmp = tempfile::tempdir().unwrap();
    let redis = Redis::start(&tmp.path().join("redis"), "redis-Pw-5");
    for i in 0..1000 {
        redis.cli(&["SET", &format!("key:{i}"), &format!("value {i}")]);
    }
    redis.cli(&["HSET", "user:1", "name", "ada", "lang", "rust"]);
    redis.cli(&["RPUSH", "queue", "a", "b", "c"]);
    fs::write(tmp.path().join("redis.pass"), "redis-Pw-5\n").unwrap();
    let sources = format!(
        "[[source]]\nname = \"cache\"\nkind = \"redis\"\nport = {}\npassword_file = {:?}\n",
        redis.port,
        tmp.path().join("redis.pass")
    );
    let s = Setup::new(tmp, &sources, "10G");
    let summary = s.pull("cache", &[]).expect("pull");
    let id = summary["snapshot"].as_str().unwrap();
    let snap = s.snapshot(id);
    let d = &snap.dumps[0];
    assert_eq!((d.path.as_str(), d.format.as_str()), ("dump.rdb", "rdb"));
    assert_eq!(d.tables.iter().map(|t| (t.name.as_str(), t.rows)).collect::<Vec<_>>(), [("db0", 1002)]);
    assert!(d.server_version.starts_with(|c: char| c.is_ascii_digit()), "{d:?}");

    // A new server started on the restored RDB holds the same data.
    let out = s.restore(id, &s.path("out"));
    let copy = Redis::start_with(&out, "other", &["--dbfilename", "dump.rdb"]);
    assert_eq!(copy.cli(&["DBSIZE"]).trim(), "1002");
    assert_eq!(copy.cli(&["GET", "key:777"]).trim(), "value 777");
    assert_eq!(copy.cli(&["HGET", "user:1", "lang"]).trim(), "rust");
    assert_eq!(copy.cli(&["LRANGE", "queue", "0", "-1"]).split_whitespace().collect::<Vec<_>>(), ["a", "b", "c"]);
}

/// A command source whose output is `data`, failing with a message when `fail` exists, with
/// hooks that log to `hooks.log`.
fn command_source(dir: &Path, name: &str) -> String {
    let script = format!(
        "if [ -f {d}/fail ]; then echo 'boom: the disk is on fire' >&2; exit 3; fi; cat {d}/data",
        d = dir.display()
    );
    let hook = |word: &str| format!("[\"sh\", \"-c\", \"echo {word} >> {}/hooks.log\"]", dir.display());
    format!(
        "[[source]]\nname = \"{name}\"\nkind = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\nfilename = \"app.dump\"\nbefore = {}\nafter = {}\nhook_timeout_secs = 10\n",
        hook("before"),
        hook("after")
    )
}

#[test]
fn failing_truncated_and_oversized_dumps_fail_and_leave_the_previous_snapshot_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("app");
    fs::create_dir_all(&dir).unwrap();
    let data = magpie_tests::text(2 << 20, 5);
    fs::write(dir.join("data"), &data).unwrap();
    let sources = format!(
        "{}[[source]]\nname = \"huge\"\nkind = \"command\"\ncommand = [\"head\", \"-c\", \"9000000\", \"/dev/zero\"]\n\
         [[source]]\nname = \"slow\"\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"echo started; exec sleep 37.25\"]\nafter = [\"sh\", \"-c\", \"echo after-slow >> {}/hooks.log\"]\n\
         [[source]]\nname = \"stuck\"\nkind = \"command\"\ncommand = [\"echo\", \"x\"]\nbefore = [\"sleep\", \"30\"]\nhook_timeout_secs = 1\n\
         [[source]]\nname = \"nodb\"\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\n",
        command_source(&dir, "app"),
        dir.display(),
        magpie_tests::free_port()
    );
    let mut s = Setup::new(tmp, &sources, "8M");
    let hooks = || fs::read_to_string(dir.join("hooks.log")).unwrap_or_default();

    let first = s.pull("app", &[]).expect("first pull");
    assert_eq!(hooks(), "before\nafter\n");
    let first_id = first["snapshot"].as_str().unwrap().to_string();
    assert_eq!(s.snapshot(&first_id).dumps[0].size, data.len() as u64);
    let count = s.snapshot_count();

    // The command fails: its stderr and exit status in the error, the after hook still runs.
    fs::write(dir.join("fail"), b"").unwrap();
    let err = s.pull("app", &[]).unwrap_err();
    assert!(err.contains("boom: the disk is on fire") && err.contains("exit status: 3"), "{err}");
    assert_eq!(hooks(), "before\nafter\nbefore\nafter\n");
    fs::remove_file(dir.join("fail")).unwrap();
    s.assert_spool_empty();

    // A dump a tenth the size of the last one is refused unless accepted.
    fs::write(dir.join("data"), &data[..data.len() / 10]).unwrap();
    let err = s.pull("app", &[]).unwrap_err();
    assert!(err.contains("--accept-small-dumps") && err.contains("10%"), "{err}");
    assert_eq!(s.snapshot_count(), count);

    // A dump larger than the spool may hold.
    let err = s.pull("huge", &[]).unwrap_err();
    assert!(err.contains("spool.max_bytes"), "{err}");
    s.assert_spool_empty();

    // A hook that hangs, and a server that is not there: one line each, naming the source.
    let err = s.pull("stuck", &[]).unwrap_err();
    assert!(err.contains("stuck") && err.contains("before hook `sleep 30`: timed out"), "{err}");
    let err = s.pull("nodb", &[]).unwrap_err();
    assert!(err.contains("nodb") && err.contains("PostgreSQL at 127.0.0.1") && err.contains("refused"), "{err}");
    s.assert_spool_empty();

    // Nothing of that touched the first snapshot.
    assert_eq!(s.snapshot_count(), count);
    let out = s.restore(&first_id, &s.path("out"));
    assert_eq!(fs::read(out.join("app.dump")).unwrap(), data);
    let accepted = s.pull("app", &["--accept-small-dumps"]).expect("accepted");
    assert!(accepted["snapshot"].is_string());

    // A collector killed mid-dump: the agent stops the dump and removes its spool.
    let mut collector = Command::new(magpie_tests::workspace_bin("collector"))
        .arg("--config")
        .arg(&s.collector.config)
        .args(["pull", "--source", "slow"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = || {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .any(|p| fs::read(p.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("37.25")))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !running() {
        assert!(Instant::now() < deadline, "the slow dump never started: {}", s.agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    collector.kill().unwrap();
    collector.wait().unwrap();
    s.assert_spool_empty();
    let deadline = Instant::now() + Duration::from_secs(10);
    while running() {
        assert!(Instant::now() < deadline, "the dump command outlived its collector");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The after hook ran all the same (a service stopped for the dump is started again).
    assert!(hooks().contains("after-slow"), "{}", hooks());

    // An agent killed with a spool in place removes it when it starts again.
    let left = s.path("spool/magpie-dump-0123456789abcdef01234567");
    fs::create_dir_all(left.join("out")).unwrap();
    fs::write(left.join("out/app.dump"), b"half a dump").unwrap();
    s.agent.kill();
    let restarted = Agent::restart(&s.path("agent"), s.agent.port);
    s.assert_spool_empty();
    assert!(restarted.log().contains("removing a dump spool left by an earlier run"), "{}", restarted.log());
}

#[test]
fn a_large_dump_with_a_small_change_moves_a_small_fraction() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("app");
    fs::create_dir_all(&dir).unwrap();
    let mut data = magpie_tests::noise(64 << 20, 11);
    fs::write(dir.join("data"), &data).unwrap();
    let s = Setup::new(tmp, &command_source(&dir, "app"), "10G");
    let first = s.pull("app", &[]).expect("first pull");
    assert!(first["wire_bytes"].as_u64().unwrap() >= 64 << 20, "{first}");

    // About 1% changes: rows rewritten in the middle, a few inserted near the end.
    let mid = data.len() / 2;
    data[mid..mid + (512 << 10)].copy_from_slice(&magpie_tests::noise(512 << 10, 12));
    let at = data.len() - (1 << 20);
    data.splice(at..at, magpie_tests::noise(100 << 10, 13));
    fs::write(dir.join("data"), &data).unwrap();
    let second = s.pull("app", &[]).expect("second pull");
    let wire = second["wire_bytes"].as_u64().unwrap();
    assert_eq!(second["files_delta"], 1, "{second}");
    assert!(wire < data.len() as u64 / 20, "{wire} bytes on the wire for a 1% change: {second}");

    let out = s.restore(second["snapshot"].as_str().unwrap(), &s.path("out"));
    assert!(fs::read(out.join("app.dump")).unwrap() == data, "the rebuilt dump differs");
}

/// A dump whose rows change in place here and there, two days running: each changed chunk is
/// stored against the chunk it replaces (or that chunk's base), so a day adds a small part of
/// what it changed, and the dump restores and verifies.
#[test]
fn scattered_row_changes_are_stored_against_the_chunks_they_replace() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("app");
    fs::create_dir_all(&dir).unwrap();
    let mut data = b"-- PostgreSQL database dump\n".to_vec();
    data.extend(magpie_tests::text(16 << 20, 21));
    fs::write(dir.join("data"), &data).unwrap();
    let s = Setup::new(tmp, &command_source(&dir, "app"), "10G");
    let first = s.pull("app", &[]).expect("first pull");

    // A row rewritten in place every 40 KB: most chunks keep their bytes, the others change 12.
    let edits = (100_000..data.len() - 20).step_by(40_000);
    let edit_count = edits.len() as u64;
    for i in edits {
        data[i..i + 12].copy_from_slice(b"edited row 1");
    }
    fs::write(dir.join("data"), &data).unwrap();
    let second = s.pull("app", &[]).expect("second pull");
    assert_eq!(second["files_delta"], 1, "{second}");
    let added = second["stored_added"].as_u64().unwrap();
    let day1 = first["stored_added"].as_u64().unwrap();
    // Against its base, an edit costs a frame of a few dozen bytes and the blob's sealing; with
    // the dictionary alone, a fifth of each changed chunk (megabytes here).
    assert!(added < edit_count * 512, "{added} bytes stored for {edit_count} edits");
    assert!(added * 10 < day1, "day 2 stored {added} bytes, day 1 {day1}");

    // The next day the same rows change again: chunks whose old version has a base of its own
    // are stored against that base (bases are one level deep), as small.
    for i in (100_000..data.len() - 20).step_by(40_000) {
        data[i..i + 12].copy_from_slice(b"edited row 2");
    }
    fs::write(dir.join("data"), &data).unwrap();
    let third = s.pull("app", &[]).expect("third pull");
    let added = third["stored_added"].as_u64().unwrap();
    assert!(added < edit_count * 512, "day 3: {added} bytes stored for {edit_count} edits");

    let out = s.restore(third["snapshot"].as_str().unwrap(), &s.path("out"));
    assert!(fs::read(out.join("app.dump")).unwrap() == data, "the rebuilt dump differs");
    let check = s.collector.run(&["check", "--verify-data"]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
}
