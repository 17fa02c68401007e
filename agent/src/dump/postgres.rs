//! PostgreSQL: `pg_dumpall --globals-only`, then `pg_dump -Fc -Z0` per database into a file
//! (uncompressed so the repository's dedup and zstd work; a file so `pg_restore -j` works).
//!
//! Row counts are taken in the very snapshot the dump reads: a psql session opens a repeatable
//! read transaction and exports its snapshot, pg_dump runs with `--snapshot`, and the same
//! session counts the tables afterwards. Under write load the counts still match the dump.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use magpie_proto::v1::{DumpInfo, TableRows};

use super::process::{self, Limits, Output};
use super::{Conn, Run, file_name, now_ns, tool_version, version_token};

#[derive(Debug)]
pub struct Postgres {
    pub conn: Conn,
    /// None: every database that accepts connections and is not a template.
    pub databases: Option<Vec<String>>,
    pub globals: bool,
    pub bin_dir: Option<PathBuf>,
    pub exact: bool,
}

const END: &str = "__magpie_end__";

impl Postgres {
    fn tool(&self, name: &str, pgpass: &Option<PathBuf>) -> Command {
        let mut cmd = Command::new(self.bin_dir.as_ref().map(|d| d.join(name)).unwrap_or_else(|| name.into()));
        for v in ["PGPASSWORD", "PGDATABASE", "PGSERVICE", "PGOPTIONS"] {
            cmd.env_remove(v);
        }
        cmd.env("PGCONNECT_TIMEOUT", "10").env("PGAPPNAME", "magpie-agent");
        if let Some(h) = &self.conn.host {
            cmd.env("PGHOST", h);
        }
        if let Some(p) = self.conn.port {
            cmd.env("PGPORT", p.to_string());
        }
        if let Some(u) = &self.conn.user {
            cmd.env("PGUSER", u);
        }
        match pgpass {
            Some(p) => cmd.env("PGPASSFILE", p),
            // No password configured: nothing from the agent user's own ~/.pgpass either.
            None => cmd.env("PGPASSFILE", "/dev/null"),
        };
        cmd
    }

    pub fn dump(&self, run: &Run<'_>, limits: &Limits<'_>, warnings: &mut Vec<String>) -> Result<Vec<DumpInfo>> {
        let server = format!("PostgreSQL at {}", self.conn.describe(5432));
        let pgpass = self.pgpass(run)?;
        let maintenance_db = self.databases.as_ref().map(|d| d[0].as_str()).unwrap_or("postgres");
        let maintenance = conninfo(maintenance_db);

        // Versions first: a pg_dump older than the server cannot dump it correctly.
        let mut psql = self.tool("psql", &pgpass);
        psql.args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", &maintenance, "-c", "SHOW server_version_num", "-c"])
            .arg("SHOW server_version");
        let out = process::run(&format!("connecting to {server}"), psql, Output::Capture, limits)?;
        let out = String::from_utf8_lossy(&out);
        let mut lines = out.lines();
        let num: u32 =
            lines.next().and_then(|l| l.trim().parse().ok()).ok_or_else(|| anyhow!("{server}: no version"))?;
        let server_version = lines.next().unwrap_or_default().trim().to_string();
        let tool = tool_version(self.tool("pg_dump", &pgpass), limits)?;
        let tool_major: u32 = version_token(&tool)
            .and_then(|v| v.split('.').next()?.parse().ok())
            .ok_or_else(|| anyhow!("cannot read pg_dump's version from {tool:?}"))?;
        if tool_major < num / 10000 {
            bail!(
                "pg_dump {tool_major} is older than the server ({server_version}): install PostgreSQL {}'s client tools and point bin_dir at them",
                num / 10000
            );
        }

        let databases = match &self.databases {
            Some(d) => d.clone(),
            None => {
                let mut q = self.tool("psql", &pgpass);
                q.args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", &maintenance, "-c"])
                    .arg("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1");
                let out = process::run(&format!("listing the databases of {server}"), q, Output::Capture, limits)?;
                String::from_utf8_lossy(&out).lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
            }
        };

        let mut dumps = Vec::new();
        if self.globals {
            (run.progress)("dumping the cluster's roles and tablespaces".into());
            let start = now_ns();
            let mut cmd = self.tool("pg_dumpall", &pgpass);
            cmd.args(["--globals-only", "-l", maintenance_db]);
            process::run("pg_dumpall --globals-only", cmd, Output::File(&run.out.join("globals.sql")), limits)?;
            dumps.push(DumpInfo {
                path: "globals.sql".into(),
                kind: "postgres-globals".into(),
                format: "sql".into(),
                server_version: server_version.clone(),
                tool_version: tool.clone(),
                start_ns: start,
                end_ns: now_ns(),
                ..Default::default()
            });
        }
        for db in &databases {
            (run.progress)(format!("dumping database {db}"));
            let start = now_ns();
            let path = format!("{}.pgdump", file_name(db));
            let tables = self
                .dump_database(db, &run.out.join(&path), &pgpass, limits)
                .with_context(|| format!("database {db} of {server}"))?;
            if tables.is_empty() {
                warnings.push(format!("database {db} has no tables"));
            }
            dumps.push(DumpInfo {
                path,
                kind: "postgres".into(),
                format: "pg_dump custom".into(),
                database: db.clone(),
                server_version: server_version.clone(),
                tool_version: tool.clone(),
                tables,
                rows_exact: self.exact,
                start_ns: start,
                end_ns: now_ns(),
                ..Default::default()
            });
        }
        Ok(dumps)
    }

    /// The password as a pgpass file in the private `etc/` directory.
    fn pgpass(&self, run: &Run<'_>) -> Result<Option<PathBuf>> {
        let Some(pw) = self.conn.password()? else { return Ok(None) };
        let escaped = pw.replace('\\', "\\\\").replace(':', "\\:");
        let p = run.etc.join("pgpass");
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p)?;
        writeln!(f, "*:*:*:*:{escaped}")?;
        Ok(Some(p))
    }

    /// Dump one database in an exported snapshot and count its tables in the same snapshot.
    fn dump_database(
        &self,
        db: &str,
        file: &std::path::Path,
        pgpass: &Option<PathBuf>,
        limits: &Limits<'_>,
    ) -> Result<Vec<TableRows>> {
        let mut session = Psql::start(self.tool("psql", pgpass), db)?;
        let done = AtomicBool::new(false);
        let pid = session.child.id() as i32;
        std::thread::scope(|s| {
            // psql waits on the server: the same deadline and cancellation as the tools.
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    if Instant::now() >= limits.deadline || (limits.cancelled)() {
                        if let Some(p) = rustix::process::Pid::from_raw(pid) {
                            let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let result = (|| {
                let snapshot = session
                    .query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_export_snapshot();", limits)?;
                let snapshot = snapshot.first().ok_or_else(|| anyhow!("the server exported no snapshot"))?;
                let mut cmd = self.tool("pg_dump", pgpass);
                cmd.args(["-Fc", "-Z0", "--snapshot", snapshot, "-d", &conninfo(db)]);
                process::run("pg_dump", cmd, Output::File(file), limits)?;
                let tables = self.count(&mut session, limits)?;
                session.query("COMMIT;", limits)?;
                Ok(tables)
            })();
            done.store(true, Ordering::Relaxed);
            session.end();
            result
        })
    }

    /// Tables and their rows in the session's snapshot: `count(*)` each, or the planner's estimate.
    fn count(&self, session: &mut Psql, limits: &Limits<'_>) -> Result<Vec<TableRows>> {
        let tables = "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' ORDER BY 1";
        let rows = if self.exact {
            let queries =
                session.query(&format!("SELECT format('SELECT %L, count(*) FROM %I.%I', n.nspname || '.' || c.relname, n.nspname, c.relname) {tables};"), limits)?;
            let mut rows = Vec::new();
            for batch in queries.chunks(200) {
                rows.extend(session.query(&format!("{};", batch.join(" UNION ALL ")), limits)?);
            }
            rows
        } else {
            session.query(
                &format!("SELECT n.nspname || '.' || c.relname, greatest(c.reltuples, 0)::bigint {tables};"),
                limits,
            )?
        };
        rows.iter()
            .map(|line| {
                let (name, n) = line.rsplit_once('|').ok_or_else(|| anyhow!("unexpected psql output {line:?}"))?;
                Ok(TableRows { name: name.to_string(), rows: n.parse().context("row count")? })
            })
            .collect()
    }
}

/// A database name as a connection string: a name like "host=elsewhere" (database names come
/// from the server with `databases = "*"`) must not redirect the tools, and the password, elsewhere.
fn conninfo(db: &str) -> String {
    format!("dbname='{}'", db.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A psql process driven line by line: each query is followed by an `\echo` of a marker, so
/// its answer is every line before the marker.
struct Psql {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Psql {
    fn start(mut cmd: Command, db: &str) -> Result<Psql> {
        cmd.args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", &conninfo(db)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| anyhow!("cannot start psql: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut err = child.stderr.take().expect("piped");
        let stderr = Some(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        }));
        Ok(Psql { child, stdin, stdout, stderr })
    }

    fn query(&mut self, sql: &str, limits: &Limits<'_>) -> Result<Vec<String>> {
        let sent = writeln!(self.stdin, "{sql}\n\\echo {END}").and_then(|()| self.stdin.flush());
        let mut lines = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = if sent.is_ok() { self.stdout.read_line(&mut line).unwrap_or(0) } else { 0 };
            if n == 0 {
                // psql stopped: it said why on stderr.
                let _ = self.child.wait();
                let text = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
                let text = limits.redact(text.trim());
                bail!("psql: {}", if text.is_empty() { "stopped (timed out or cancelled)" } else { &text });
            }
            let l = line.trim_end_matches(['\n', '\r']);
            if l == END {
                return Ok(lines);
            }
            lines.push(l.to_string());
        }
    }

    fn end(mut self) {
        let _ = writeln!(self.stdin, "\\q");
        drop(self.stdin);
        let _ = self.child.wait();
    }
}
