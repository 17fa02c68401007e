//! `collector restore` end to end: the disaster drill (a main server's PostgreSQL database,
//! SQLite stores, blobs and data destroyed, then restored through the agent in dependency
//! order), point-in-time selection, refusals, and a failure half-way.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use magpie_tests::servers::Postgres;
use magpie_tests::{Agent, Collector, Pki, tree_state};

const PG_PASSWORD: &str = "drill-Pg-Pw-1";

/// The "main server": its database, stores, blobs and data, and an agent serving them.
struct Main {
    tmp: tempfile::TempDir,
    pg: Postgres,
    agent: Agent,
    collector: Collector,
}

impl Main {
    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn start(allow_restore: bool) -> Main {
        let tmp = tempfile::tempdir().unwrap();
        let pg = Postgres::start(&tmp.path().join("pg"), PG_PASSWORD);
        pg.sql("postgres", "CREATE DATABASE app");
        pg.sql(
            "app",
            "CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL); \
             CREATE TABLE posts (id serial PRIMARY KEY, user_id int REFERENCES users, body text); \
             INSERT INTO users SELECT i, 'user ' || i FROM generate_series(1, 300) i; \
             INSERT INTO posts (user_id, body) SELECT 1 + i % 300, repeat('post ', i % 50) FROM generate_series(1, 2000) i;",
        );
        fs::write(tmp.path().join("pg.pass"), format!("{PG_PASSWORD}\n")).unwrap();
        let srv = tmp.path().join("srv");
        for who in ["alice", "bob"] {
            fs::create_dir_all(srv.join("actors").join(who)).unwrap();
            let db = rusqlite::Connection::open(srv.join("actors").join(who).join("store.sqlite")).unwrap();
            db.execute_batch(&format!(
                "PRAGMA journal_mode = WAL; CREATE TABLE records (k TEXT PRIMARY KEY, v TEXT); \
                 INSERT INTO records VALUES ('owner', '{who}'), ('n', '1');"
            ))
            .unwrap();
        }
        fs::create_dir_all(srv.join("blobs/ab")).unwrap();
        for i in 0..20 {
            fs::write(srv.join(format!("blobs/ab/blob-{i}")), magpie_tests::noise(50_000 + i * 10, i as u64)).unwrap();
        }
        fs::create_dir_all(srv.join("data/conf")).unwrap();
        fs::write(srv.join("data/conf/app.toml"), "version = 1\n").unwrap();
        fs::write(srv.join("data/notes.txt"), magpie_tests::text(100_000, 3)).unwrap();
        std::os::unix::fs::symlink("conf/app.toml", srv.join("data/current")).unwrap();
        fs::set_permissions(srv.join("data/conf/app.toml"), std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();

        let pki = Pki::new(&tmp.path().join("pki"));
        let agent_dir = tmp.path().join("agent");
        fs::create_dir_all(&agent_dir).unwrap();
        let sources = format!(
            "[[source]]\nname = \"pg\"\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\npassword_file = {:?}\ndatabases = [\"app\"]\ncheck = [\"SELECT count(*) > 0 FROM users\"]\n\
             [[source]]\nname = \"stores\"\nkind = \"sqlite\"\npath = \"{}/actors/*/store.sqlite\"\n\
             [[source]]\nname = \"blobs\"\nkind = \"path\"\nroots = [{:?}]\nrole = \"blobs\"\n\
             [[source]]\nname = \"data\"\nkind = \"path\"\nroots = [{:?}]\nrole = \"data\"\n\
             [spool]\ndir = {:?}\n",
            pg.port,
            tmp.path().join("pg.pass"),
            srv.display(),
            srv.join("blobs"),
            srv.join("data"),
            tmp.path().join("spool"),
        );
        let top = if allow_restore { "allow_restore = true" } else { "" };
        let agent = Agent::start_full(
            &agent_dir,
            &pki,
            &[pki.fingerprint("collector")],
            top,
            &sources,
            magpie_tests::free_port(),
        );
        let collector = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
        Main { tmp, pg, agent, collector }
    }

    fn pull_all(&self) {
        let out = self.collector.run(&["pull", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(out.status.success(), "pull: {v}\n{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(v.as_array().map(Vec::len), Some(4), "{v}");
    }

    /// `restore ARGS --json`: exit status and report.
    fn restore(&self, args: &[&str]) -> (i32, serde_json::Value, String) {
        let out = self.collector.run(&[&["restore", "--json"], args].concat());
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let v = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code().unwrap_or(-1), v, format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
    }

    /// What the database, the stores, the blobs and the data hold.
    fn state(&self) -> (String, Vec<String>, magpie_tests::EntryStates, magpie_tests::EntryStates) {
        let db = self.pg.sql("app", "SELECT id, name FROM users ORDER BY id")
            + &self.pg.sql("app", "SELECT id, user_id, md5(body) FROM posts ORDER BY id");
        let stores = ["alice", "bob"]
            .iter()
            .map(|w| {
                let c = rusqlite::Connection::open(self.path(&format!("srv/actors/{w}/store.sqlite"))).unwrap();
                let mut q = c.prepare("SELECT k || '=' || v FROM records ORDER BY k").unwrap();
                q.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect::<Vec<_>>().join(",")
            })
            .collect();
        (db, stores, tree_state(&self.path("srv/blobs")), tree_state(&self.path("srv/data")))
    }

    /// Everything on the main server gone: the database dropped, the directories removed.
    fn destroy(&self) {
        self.pg.sql("postgres", "DROP DATABASE app");
        for d in ["srv/actors", "srv/blobs", "srv/data"] {
            fs::remove_dir_all(self.path(d)).unwrap();
        }
    }
}

#[test]
fn disaster_drill_restores_db_then_blobs_then_data_onto_the_agent() {
    let main = Main::start(true);
    main.pull_all();
    std::thread::sleep(Duration::from_millis(1100));
    let between = chrono::Utc::now().to_rfc3339();
    let old_data = tree_state(&main.path("srv/data"));
    std::thread::sleep(Duration::from_millis(1100));

    // Day two: every source changes.
    main.pg.sql("app", "INSERT INTO users SELECT i, 'late user ' || i FROM generate_series(301, 350) i; UPDATE posts SET body = 'edited' WHERE id % 10 = 0");
    let alice = rusqlite::Connection::open(main.path("srv/actors/alice/store.sqlite")).unwrap();
    alice
        .execute_batch("UPDATE records SET v = '2' WHERE k = 'n'; INSERT INTO records VALUES ('bio', 'hello');")
        .unwrap();
    drop(alice);
    fs::write(main.path("srv/blobs/ab/blob-new"), magpie_tests::noise(70_000, 99)).unwrap();
    fs::remove_file(main.path("srv/blobs/ab/blob-3")).unwrap();
    fs::write(main.path("srv/data/conf/app.toml"), "version = 2\n").unwrap();
    main.pull_all();
    let before = main.state();

    // While the database still holds data, a restore is refused in the plan.
    let (code, plan, all) = main.restore(&["--to-agent", "--dry-run", "--order", "db,blobs,data"]);
    assert_ne!(code, 0, "{all}");
    assert!(all.contains("database app is not empty") && all.contains("--clean"), "{all}");
    assert_eq!(plan["ready"], false);

    main.destroy();
    // The plan first: a dry run writes nothing and names every target.
    let (code, plan, all) = main.restore(&["--to-agent", "--dry-run", "--order", "db,blobs,data"]);
    assert_eq!(code, 0, "{all}");
    assert_eq!(plan["ready"], true, "{all}");
    let groups: Vec<&str> = plan["plan"].as_array().unwrap().iter().map(|p| p["group"].as_str().unwrap()).collect();
    assert_eq!(groups, ["db", "db", "blobs", "data"], "{all}");
    assert!(!main.path("srv/data").exists(), "a dry run writes nothing");
    let (code, report, all) = main.restore(&["--to-agent", "--order", "db,blobs,data"]);
    assert_eq!(code, 0, "{all}");
    assert_eq!(report["ok"], true, "{all}");
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.iter().map(|g| g["role"].as_str().unwrap()).collect::<Vec<_>>(), ["db", "blobs", "data"]);
    // Each group finished before the next began.
    let span = |g: &serde_json::Value, f: &str| {
        g["sources"].as_array().unwrap().iter().map(|s| s[f].as_f64().unwrap()).collect::<Vec<f64>>()
    };
    for w in groups.windows(2) {
        let last_end = span(&w[0], "finished").into_iter().fold(f64::MIN, f64::max);
        let next_start = span(&w[1], "started").into_iter().fold(f64::MAX, f64::min);
        assert!(last_end <= next_start, "groups overlapped: {all}");
    }
    // Every check ran and passed: row counts, the configured SQL check, SQLite integrity, file hashes.
    let checks: Vec<String> = groups
        .iter()
        .flat_map(|g| g["sources"].as_array().unwrap().iter())
        .flat_map(|s| s["checks"].as_array().unwrap().iter())
        .map(|c| format!("{} {}", c["ok"], c["name"]))
        .collect();
    for want in ["row counts of database app", "SELECT count(*) > 0 FROM users", "integrity of", "file hashes"] {
        assert!(checks.iter().any(|c| c.contains(want) && c.starts_with("true")), "{want}: {checks:?}");
    }
    assert_eq!(main.state(), before, "the main server is back as it was at the second pull");

    // Point in time: the data as it was before the second pull, into a directory.
    let out = main.path("at");
    let (code, _, all) = main.restore(&["--source", "data", "--at", &between, "--target-dir", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{all}");
    let restored = out.join("main/data").join(main.path("srv/data").strip_prefix("/").unwrap());
    assert_eq!(tree_state(&restored), old_data);
}

#[test]
fn refusals_and_a_failure_half_way_say_what_was_restored() {
    let mut main = Main::start(false);
    main.pull_all();

    // Restores are off on this agent: refused in the plan, nothing written.
    let (code, report, all) = main.restore(&["--to-agent"]);
    assert_ne!(code, 0, "{all}");
    assert_eq!(report["ready"], false);
    assert!(all.contains("allow_restore = true"), "{all}");

    // Same stack, restores allowed; the blobs root is now a file, so the blobs group fails.
    let port = main.agent.port;
    main.agent.kill();
    let agent_dir = main.path("agent");
    let config = fs::read_to_string(agent_dir.join("agent.toml")).unwrap();
    fs::write(agent_dir.join("agent.toml"), config.replacen("[tls]", "allow_restore = true\n[tls]", 1)).unwrap();
    let _agent = Agent::restart(&agent_dir, port);
    main.destroy();
    fs::write(main.path("srv/blobs"), b"not a directory").unwrap();
    let (code, report, all) = main.restore(&["--to-agent", "--order", "db,blobs,data"]);
    assert_eq!(code, 4, "{all}");
    assert_eq!(report["ok"], false);
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups[0]["role"], "db");
    assert_eq!(groups[0]["ok"], true, "{all}");
    assert_eq!(groups[1]["role"], "blobs");
    assert!(groups[1]["sources"][0]["error"].as_str().unwrap().contains("blobs"), "{all}");
    assert_eq!(report["not_restored"], serde_json::json!(["main/data"]), "{all}");
    // The db group's work stays: the database is back.
    assert_eq!(main.pg.sql("app", "SELECT count(*) FROM users").trim(), "300");
    assert!(!main.path("srv/data").exists(), "the data group must not have run");
}

#[test]
fn a_crafted_entry_cannot_escape_the_target() {
    use prost::Message;
    use repo_format::repofile::tree::{ChunkRef, Node, NodeKind, Tree};
    let main = Main::start(true);
    main.pull_all();
    // A snapshot of `data` whose tree holds, inside the data root, an entry named
    // "../../etc/passwd": followed, it would land beside the root, in the test's directory.
    let data_root = main.path("srv/data");
    let mut repo = main.collector.repo();
    let mut w = repo_format::Writer::new(&repo, 1);
    let blob = w.add(repo_format::BlobKind::Data, b"owned\n".to_vec()).unwrap();
    let evil = Node {
        name: b"../../etc/passwd".to_vec(),
        kind: NodeKind::File as i32,
        mode: 0o644,
        size: 6,
        content: vec![ChunkRef { id: blob.0.to_vec(), offset: 0, length: 6 }],
        blake3: blake3::hash(b"owned\n").as_bytes().to_vec(),
        ..Default::default()
    };
    let mut tree = w.add(repo_format::BlobKind::Tree, Tree { version: 1, nodes: vec![evil] }.encode_to_vec()).unwrap();
    let comps: Vec<_> = data_root.strip_prefix("/").unwrap().iter().collect();
    for name in comps.iter().rev() {
        let dir = Node {
            name: name.as_encoded_bytes().to_vec(),
            kind: NodeKind::Dir as i32,
            mode: 0o755,
            subtree: tree.0.to_vec(),
            ..Default::default()
        };
        tree = w.add(repo_format::BlobKind::Tree, Tree { version: 1, nodes: vec![dir] }.encode_to_vec()).unwrap();
    }
    let (idx, _) = w.finish().unwrap();
    let (id, f) = idx.unwrap();
    repo.add_index(id, &f);
    let snap = repo_format::Snapshot {
        version: 1,
        time_ns: chrono::Utc::now().timestamp_nanos_opt().unwrap(),
        agent: "main".into(),
        source: "data".into(),
        source_kind: "path".into(),
        role: "data".into(),
        tree: tree.0.to_vec(),
        ..Default::default()
    };
    repo.save_snapshot(&snap).unwrap();

    let escaped = data_root.parent().unwrap().parent().unwrap().join("etc/passwd");
    let (code, _, all) = main.restore(&["--to-agent", "--source", "data"]);
    assert_ne!(code, 0, "{all}");
    assert!(all.contains("not a plain relative path"), "{all}");
    assert!(!escaped.exists(), "the restore wrote outside its target");
    let out = main.path("out");
    let (code, _, all) = main.restore(&["--source", "data", "--target-dir", out.to_str().unwrap()]);
    assert_ne!(code, 0, "{all}");
    assert!(!escaped.exists() && !out.join("main/etc/passwd").exists(), "the restore wrote outside its target");
}

#[test]
fn mariadb_and_redis_are_restored_onto_the_agent() {
    use magpie_tests::servers::{Mariadb, Redis};
    let tmp = tempfile::tempdir().unwrap();
    let db = Mariadb::start(&tmp.path().join("mariadb"));
    db.sql(
        "CREATE DATABASE shop; CREATE TABLE shop.items (id INT PRIMARY KEY, name VARCHAR(50)); \
         INSERT INTO shop.items VALUES (1, 'tea'), (2, 'cups'), (3, 'saucers'); \
         CREATE USER 'magpie'@'127.0.0.1' IDENTIFIED BY 'maria-Pw-9'; GRANT ALL ON *.* TO 'magpie'@'127.0.0.1';",
    );
    let before = db.sql("SELECT * FROM shop.items ORDER BY id");
    let redis_dir = tmp.path().join("redis");
    let redis = Redis::start_with(&redis_dir, "redis-Pw-3", &["--dbfilename", "dump.rdb"]);
    for i in 0..100 {
        redis.cli(&["SET", &format!("k{i}"), &format!("v{i}")]);
    }
    for (f, pw) in [("maria.pass", "maria-Pw-9"), ("redis.pass", "redis-Pw-3")] {
        fs::write(tmp.path().join(f), format!("{pw}\n")).unwrap();
    }
    // The hooks stop the Redis server for the restore and start it again on the placed RDB.
    let port = redis.port.to_string();
    let stop = format!(
        "[\"redis-cli\", \"-p\", \"{port}\", \"--no-auth-warning\", \"-a\", \"redis-Pw-3\", \"shutdown\", \"nosave\"]"
    );
    let start = format!(
        "[\"redis-server\", \"--port\", \"{port}\", \"--bind\", \"127.0.0.1\", \"--requirepass\", \"redis-Pw-3\", \"--dir\", {dir:?}, \"--dbfilename\", \"dump.rdb\", \"--save\", \"\", \"--appendonly\", \"no\", \"--daemonize\", \"yes\"]",
        dir = redis_dir.display().to_string()
    );
    let sources = format!(
        "[[source]]\nname = \"maria\"\nkind = \"mariadb\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"magpie\"\npassword_file = {:?}\ndatabases = [\"shop\"]\ncheck = [\"SELECT COUNT(*) = 3 FROM items\"]\n\
         [[source]]\nname = \"cache\"\nkind = \"redis\"\nport = {port}\npassword_file = {:?}\nrdb_path = {:?}\n",
        db.port,
        tmp.path().join("maria.pass"),
        tmp.path().join("redis.pass"),
        redis_dir.join("dump.rdb"),
    );
    let pki = Pki::new(&tmp.path().join("pki"));
    let agent_dir = tmp.path().join("agent");
    fs::create_dir_all(&agent_dir).unwrap();
    let spool = format!("[spool]\ndir = {:?}\n", tmp.path().join("spool"));
    // Hooks only around restores here: a dump of a running Redis needs none.
    let agent = Agent::start_full(
        &agent_dir,
        &pki,
        &[pki.fingerprint("collector")],
        "allow_restore = true",
        &format!("{sources}{spool}"),
        magpie_tests::free_port(),
    );
    let c = Collector::new(&tmp.path().join("collector"), &pki, agent.port, "collector", false);
    let out = c.run(&["pull", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let agent_port = agent.port;
    drop(agent);
    let with_hooks = format!("{}before = {stop}\nafter = {start}\n{spool}", sources);
    let _agent = Agent::start_full(
        &agent_dir,
        &pki,
        &[pki.fingerprint("collector")],
        "allow_restore = true",
        &with_hooks,
        agent_port,
    );

    db.sql("DROP DATABASE shop");
    redis.cli(&["FLUSHALL"]);
    let out = c.run(&["restore", "--to-agent", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let all = format!("{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
    assert_eq!(db.sql("SELECT * FROM shop.items ORDER BY id"), before);
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "100", "{all}");
    assert_eq!(redis.cli(&["GET", "k42"]).trim(), "v42");
    let checks = report["groups"][0]["sources"].to_string();
    for want in ["row counts of database shop", "SELECT COUNT(*) = 3 FROM items", "keys per database"] {
        assert!(checks.contains(want), "{want}: {checks}");
    }
    // The Redis the after hook started is not the harness's child: stop it here.
    redis.cli(&["SHUTDOWN", "NOSAVE"]);
}

#[test]
fn a_path_filter_restores_only_what_it_names_and_a_damaged_repository_fails_the_restore() {
    let main = Main::start(true);
    main.pull_all();
    let (notes, conf) = (main.path("srv/data/notes.txt"), main.path("srv/data/conf/app.toml"));
    let notes_before = fs::read(&notes).unwrap();
    fs::remove_file(&notes).unwrap();
    fs::write(&conf, "version = 99\n").unwrap();
    let (code, _, all) = main.restore(&["--to-agent", "--source", "data", "--path", "**/notes.txt"]);
    assert_eq!(code, 0, "{all}");
    assert_eq!(fs::read(&notes).unwrap(), notes_before);
    assert_eq!(fs::read_to_string(&conf).unwrap(), "version = 99\n", "only the named path is restored");

    // Every pack damaged: the restore fails as a damaged repository (13), and does not hang.
    for e in fs::read_dir(main.collector.dir.join("repo/data")).unwrap().flatten() {
        for pack in fs::read_dir(e.path()).unwrap().flatten() {
            let mut b = fs::read(pack.path()).unwrap();
            let mid = b.len() / 2;
            b[mid] ^= 0xff;
            fs::write(pack.path(), b).unwrap();
        }
    }
    let (code, _, all) = main.restore(&["--to-agent", "--source", "blobs"]);
    assert_eq!(code, 13, "{all}");
}
