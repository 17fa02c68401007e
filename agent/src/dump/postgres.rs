//! PostgreSQL: `pg_dumpall --globals-only`, then `pg_dump -Fc -Z0` per database into a file
//! (uncompressed so the repository's dedup and zstd work; a file so `pg_restore -j` works).
//!
//! Row counts are taken in the very snapshot the dump reads: a psql session opens a repeatable
//! read transaction and exports its snapshot, pg_dump runs with `--snapshot`, and the same
//! session counts the tables afterwards. Under write load the counts still match the dump.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use magpie_proto::v1::{CheckResult, DumpInfo, TableRows};

use super::process::{self, Limits, Output};
use super::{
    Conn, DbPlan, Readiness, RestoreRun, Run, db_plan, file_name, now_ns, plan_note, row_check, sql_checks,
    tool_version, unhex, version_token,
};

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
/// Where cluster-wide questions go: every cluster has it, and a database being restored may
/// not exist yet.
const MAINTENANCE_DB: &str = "postgres";

impl Postgres {
    fn program(&self, name: &str) -> PathBuf {
        self.bin_dir.as_ref().map(|d| d.join(name)).unwrap_or_else(|| name.into())
    }

    /// A client tool with the connection settings in its environment.
    fn tool(&self, name: &str, pgpass: &Option<PathBuf>) -> Command {
        let mut cmd = Command::new(self.program(name));
        for v in ["PGPASSWORD", "PGDATABASE", "PGSERVICE", "PGOPTIONS"] {
            cmd.env_remove(v);
        }
        cmd.env("PGCONNECT_TIMEOUT", "10").env("PGAPPNAME", "magpie-agent");
        // Never prompt for a password (a missing one is an error, not a wait on a terminal).
        cmd.arg("-w");
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
        let pgpass = self.pgpass(run.etc)?;
        let maintenance_db = MAINTENANCE_DB;
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
        let tool = tool_version(Command::new(self.program("pg_dump")), limits)?;
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
                    .arg("SELECT encode(convert_to(datname, 'UTF8'), 'hex') FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname");
                let out = process::run(&format!("listing the databases of {server}"), q, Output::Capture, limits)?;
                String::from_utf8_lossy(&out).lines().filter(|l| !l.is_empty()).map(unhex).collect::<Result<_>>()?
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
    fn pgpass(&self, etc: &Path) -> Result<Option<PathBuf>> {
        let Some(pw) = self.conn.password()? else { return Ok(None) };
        let escaped = pw.replace('\\', "\\\\").replace(':', "\\:");
        let p = etc.join("pgpass");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&p)?;
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
        // Names travel hex-encoded: a newline or '|' in a name must not break the answer.
        let listed = session.query(
            "SELECT encode(convert_to(n.nspname, 'UTF8'), 'hex') || '|' || encode(convert_to(c.relname, 'UTF8'), 'hex') \
             || '|' || greatest(c.reltuples, 0)::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' ORDER BY 1;",
            limits,
        )?;
        let mut tables = Vec::new();
        let mut idents = Vec::new();
        for line in &listed {
            let parts: Vec<&str> = line.split('|').collect();
            let [schema, name, estimate] = parts.as_slice() else { bail!("unexpected psql output {line:?}") };
            let (schema, name) = (unhex(schema)?, unhex(name)?);
            idents.push(format!("{}.{}", ident(&schema), ident(&name)));
            tables
                .push(TableRows { name: format!("{schema}.{name}"), rows: estimate.parse().context("row estimate")? });
        }
        if self.exact {
            for (b, batch) in idents.chunks(200).enumerate() {
                let q: Vec<String> = batch
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("SELECT {}, count(*) FROM {t}", b * 200 + i))
                    .collect();
                for line in session.query(&format!("{};", q.join(" UNION ALL ")), limits)? {
                    let (i, n) = line.split_once('|').ok_or_else(|| anyhow!("unexpected psql output {line:?}"))?;
                    let i: usize = i.parse().context("table index")?;
                    tables.get_mut(i).ok_or_else(|| anyhow!("psql answered for table {i}"))?.rows =
                        n.parse().context("row count")?;
                }
            }
        }
        Ok(tables)
    }
}

/// A string literal no name can break out of, whatever standard_conforming_strings says.
fn literal(s: &str) -> String {
    format!("convert_from(decode('{}', 'hex'), 'UTF8')", hex::encode(s))
}

/// A quoted identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Tables in the user's schemas, for "is this database empty".
const USER_TABLES: &str = "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

impl Postgres {
    fn psql(&self, pgpass: &Option<PathBuf>, db: &str, sql: &str, limits: &Limits<'_>) -> Result<String> {
        let mut q = self.tool("psql", pgpass);
        q.args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", &conninfo(db), "-c", sql]);
        let out = process::run(&format!("psql on database {db}"), q, Output::Capture, limits)?;
        Ok(String::from_utf8_lossy(&out).trim().to_string())
    }

    /// None: no such database; else its number of tables.
    fn db_tables(&self, pgpass: &Option<PathBuf>, db: &str, limits: &Limits<'_>) -> Result<Option<u64>> {
        let exists = self.psql(
            pgpass,
            MAINTENANCE_DB,
            &format!("SELECT count(*) FROM pg_database WHERE datname = {}", literal(db)),
            limits,
        )?;
        if exists == "0" {
            return Ok(None);
        }
        Ok(Some(self.psql(pgpass, db, USER_TABLES, limits)?.parse().context("table count")?))
    }

    pub fn readiness(
        &self,
        dumps: &[DumpInfo],
        clean: bool,
        force: bool,
        etc: &Path,
        limits: &Limits<'_>,
        r: &mut Readiness,
    ) -> Result<()> {
        let pgpass = self.pgpass(etc)?;
        let server = format!("PostgreSQL at {}", self.conn.describe(5432));
        let num: u32 = self
            .psql(&pgpass, MAINTENANCE_DB, "SHOW server_version_num", limits)
            .with_context(|| format!("connecting to {server}"))?
            .parse()
            .context("server version")?;
        for d in dumps {
            let dumped: Option<u32> = d.server_version.split(['.', ' ']).next().and_then(|m| m.parse().ok());
            if let Some(m) = dumped
                && m > num / 10000
            {
                r.problems.push(format!(
                    "{server} is version {}, older than the dump of {} ({})",
                    num / 10000,
                    d.path,
                    d.server_version
                ));
            }
            if d.kind != "postgres" {
                continue;
            }
            r.targets.push(format!("database {} on {server}", d.database));
            let tables = self.db_tables(&pgpass, &d.database, limits)?;
            plan_note(r, db_plan(&d.database, tables, clean, force));
        }
        Ok(())
    }

    /// Globals first, then each database: created when missing, refused when not empty unless
    /// --clean or --force, loaded with `pg_restore -j`, then checked.
    pub fn restore(
        &self,
        run: &RestoreRun<'_>,
        limits: &Limits<'_>,
        extra: &[String],
        warnings: &mut Vec<String>,
    ) -> Result<Vec<CheckResult>> {
        let pgpass = self.pgpass(run.etc)?;
        let mut checks = Vec::new();
        if let Some(g) = run.dumps.iter().find(|d| d.kind == "postgres-globals") {
            (run.progress)("restoring roles and tablespaces".into());
            // Roles that exist already (postgres itself) make errors that are not failures.
            let mut cmd = self.tool("psql", &pgpass);
            cmd.args(["-Xq", "-d", &conninfo(MAINTENANCE_DB), "-f"]).arg(run.dir.join(&g.path));
            let (failed, stderr) = process::run_lenient("psql -f globals.sql", cmd, limits)?;
            if let Some(f) = failed {
                bail!("{f}");
            }
            let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR:")).collect();
            if !errors.is_empty() {
                warnings.push(format!(
                    "globals.sql: {} statements failed (a role that exists already is expected): {}",
                    errors.len(),
                    errors.iter().take(3).copied().collect::<Vec<_>>().join(" | ")
                ));
            }
        }
        for d in run.dumps.iter().filter(|d| d.kind == "postgres") {
            let db = &d.database;
            (run.progress)(format!("restoring database {db}"));
            let quoted = ident(db);
            let (plan, _) = db_plan(db, self.db_tables(&pgpass, db, limits)?, run.clean, run.force)?;
            if plan == DbPlan::Create {
                self.psql(&pgpass, MAINTENANCE_DB, &format!("CREATE DATABASE {quoted}"), limits)?;
            }
            let clean = plan == DbPlan::Clean;
            let mut cmd = self.tool("pg_restore", &pgpass);
            cmd.args(["-j", "2", "-d", &conninfo(db)]);
            if clean {
                cmd.args(["--clean", "--if-exists"]);
            }
            let forced = run.force && !clean;
            if !forced {
                cmd.arg("--exit-on-error");
            }
            cmd.arg(run.dir.join(&d.path));
            let (failed, _) = process::run_lenient(&format!("pg_restore of database {db}"), cmd, limits)?;
            match failed {
                // Loading into objects that exist fails object by object; the rest is loaded.
                Some(f) if forced => warnings.push(format!("{f} (--force: loaded into what was there)")),
                Some(f) => bail!("{f}"),
                None => {}
            }
            checks.push(row_check(&format!("database {db}"), &d.tables, d.rows_exact, |table| {
                let (schema, name) = table.split_once('.').unwrap_or(("public", table));
                self.psql(&pgpass, db, &format!("SELECT count(*) FROM {}.{}", ident(schema), ident(name)), limits)?
                    .parse()
                    .context("row count")
            }));
            checks.extend(sql_checks(&format!("database {db}"), extra, |sql| self.psql(&pgpass, db, sql, limits)));
        }
        Ok(checks)
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
