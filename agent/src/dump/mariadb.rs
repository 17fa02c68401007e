//! MariaDB: `mariadb-dump --single-transaction --quick --routines --events` per database.
//!
//! `--single-transaction` makes InnoDB tables consistent; it cannot do that for other engines,
//! so those are named in a warning. Connection settings and the password go to the tools in an
//! option file (`--defaults-file`, so nothing else is read) in the session's private directory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use magpie_proto::v1::{CheckResult, DumpInfo, TableRows};

use super::process::{self, Limits, Output};
use super::{
    Conn, DbPlan, Readiness, RestoreRun, Run, db_plan, file_name, now_ns, plan_note, row_check, sql_checks,
    tool_version, unhex,
};

#[derive(Debug)]
pub struct Mariadb {
    pub conn: Conn,
    pub databases: Option<Vec<String>>,
    pub exact: bool,
}

/// Schemas of the server itself, left out of `databases = "*"`.
const SYSTEM: [&str; 4] = ["information_schema", "performance_schema", "sys", "mysql"];

impl Mariadb {
    pub fn dump(&self, run: &Run<'_>, limits: &Limits<'_>, warnings: &mut Vec<String>) -> Result<Vec<DumpInfo>> {
        let server = format!("MariaDB at {}", self.conn.describe(3306));
        let options = self.option_file(run.etc)?;
        let sql = |query: &str, what: &str| -> Result<Vec<Vec<String>>> {
            let mut cmd = client("mariadb", &options);
            cmd.args(["--batch", "--skip-column-names", "-e", query]);
            let out = process::run(&format!("{what} ({server})"), cmd, Output::Capture, limits)?;
            Ok(String::from_utf8_lossy(&out)
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| l.split('\t').map(str::to_string).collect())
                .collect())
        };
        let server_version = sql("SELECT VERSION()", "connecting")?
            .first()
            .and_then(|r| r.first().cloned())
            .ok_or_else(|| anyhow!("{server}: no version"))?;
        let tool = tool_version(client("mariadb-dump", &options), limits)?;
        let databases = match &self.databases {
            Some(d) => d.clone(),
            None => {
                let mut all = Vec::new();
                for r in
                    sql("SELECT HEX(schema_name) FROM information_schema.schemata ORDER BY 1", "listing the databases")?
                {
                    let d = unhex(&r[0])?;
                    if SYSTEM.contains(&d.as_str()) {
                        continue;
                    }
                    if d.starts_with('-') {
                        warnings.push(format!(
                            "database {d:?} skipped: a name starting with '-' cannot be given to mariadb-dump"
                        ));
                        continue;
                    }
                    all.push(d);
                }
                all
            }
        };
        let mut dumps = Vec::new();
        for db in &databases {
            (run.progress)(format!("dumping database {db}"));
            let start = now_ns();
            let in_db = format!("table_schema = {} AND table_type = 'BASE TABLE'", literal(db));
            let others = sql(
                &format!(
                    "SELECT HEX(table_name), engine FROM information_schema.tables WHERE {in_db} AND engine <> 'InnoDB' ORDER BY 1"
                ),
                "finding non-InnoDB tables",
            )?;
            if !others.is_empty() {
                let list = others
                    .iter()
                    .map(|r| Ok(format!("{} ({})", unhex(&r[0])?, r.get(1).map_or("", String::as_str))))
                    .collect::<Result<Vec<_>>>()?;
                warnings.push(format!(
                    "database {db}: tables not on InnoDB cannot be dumped consistently under writes: {}",
                    list.join(", ")
                ));
            }
            let listed = sql(
                &format!(
                    "SELECT HEX(table_name), COALESCE(table_rows, 0) FROM information_schema.tables WHERE {in_db} ORDER BY 1"
                ),
                "listing tables",
            )?;
            let mut tables = listed
                .iter()
                .map(|r| {
                    Ok(TableRows { name: unhex(&r[0])?, rows: r.get(1).and_then(|n| n.parse().ok()).unwrap_or(0) })
                })
                .collect::<Result<Vec<_>>>()?;
            if self.exact {
                for (b, batch) in tables.chunks_mut(200).enumerate() {
                    let q: Vec<String> = batch
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            format!("SELECT {}, COUNT(*) FROM `{}`.`{}`", b * 200 + i, ident(db), ident(&t.name))
                        })
                        .collect();
                    for r in sql(&q.join(" UNION ALL "), "counting rows")? {
                        let (i, n): (usize, u64) = match r.as_slice() {
                            [i, n] => (i.parse()?, n.parse()?),
                            _ => bail!("unexpected answer {r:?}"),
                        };
                        batch[i - b * 200].rows = n;
                    }
                }
            }
            let path = format!("{}.sql", file_name(db));
            let mut cmd = client("mariadb-dump", &options);
            cmd.args([
                "--single-transaction",
                "--quick",
                "--routines",
                "--events",
                "--triggers",
                "--hex-blob",
                "--databases",
                db,
            ]);
            process::run("mariadb-dump", cmd, Output::File(&run.out.join(&path)), limits)
                .with_context(|| format!("database {db} of {server}"))?;
            dumps.push(DumpInfo {
                path,
                kind: "mariadb".into(),
                format: "sql".into(),
                database: db.clone(),
                server_version: server_version.clone(),
                tool_version: tool.clone(),
                tables,
                // Counted in a transaction of their own just before the dump.
                rows_exact: false,
                start_ns: start,
                end_ns: now_ns(),
                ..Default::default()
            });
        }
        Ok(dumps)
    }

    /// One query's answer, tab-separated lines.
    fn query(&self, options: &Path, db: Option<&str>, sql: &str, limits: &Limits<'_>) -> Result<String> {
        let mut cmd = client("mariadb", options);
        cmd.args(["--batch", "--skip-column-names"]);
        if let Some(db) = db {
            cmd.arg(format!("--database={db}"));
        }
        cmd.args(["-e", sql]);
        let out = process::run(&format!("MariaDB at {}", self.conn.describe(3306)), cmd, Output::Capture, limits)?;
        Ok(String::from_utf8_lossy(&out).trim().to_string())
    }

    /// None: no such database; else its number of tables.
    fn db_tables(&self, options: &Path, db: &str, limits: &Limits<'_>) -> Result<Option<u64>> {
        let lit = literal(db);
        let n = self.query(
            options,
            None,
            &format!(
                "SELECT (SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = {lit}), \
                 (SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = {lit})"
            ),
            limits,
        )?;
        let (exists, tables) = n.split_once('\t').ok_or_else(|| anyhow!("unexpected answer {n:?}"))?;
        Ok((exists != "0").then(|| tables.parse().unwrap_or(0)))
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
        let options = self.option_file(etc)?;
        let server = format!("MariaDB at {}", self.conn.describe(3306));
        for d in dumps {
            r.targets.push(format!("database {} on {server}", d.database));
            let tables =
                self.db_tables(&options, &d.database, limits).with_context(|| format!("connecting to {server}"))?;
            plan_note(r, db_plan(&d.database, tables, clean, force));
        }
        Ok(())
    }

    /// Each dump through the client, into its database (dropped first with --clean), then checked.
    pub fn restore(&self, run: &RestoreRun<'_>, limits: &Limits<'_>, extra: &[String]) -> Result<Vec<CheckResult>> {
        let options = self.option_file(run.etc)?;
        let mut checks = Vec::new();
        for d in run.dumps {
            let db = &d.database;
            (run.progress)(format!("restoring database {db}"));
            // The dump creates its database when missing; --clean drops it first.
            if db_plan(db, self.db_tables(&options, db, limits)?, run.clean, run.force)?.0 == DbPlan::Clean {
                self.query(&options, None, &format!("DROP DATABASE `{}`", ident(db)), limits)?;
            }
            process::run_stdin(
                &format!("loading database {db}"),
                client("mariadb", &options),
                &run.dir.join(&d.path),
                limits,
            )?;
            checks.push(row_check(&format!("database {db}"), &d.tables, d.rows_exact, |table| {
                self.query(&options, None, &format!("SELECT COUNT(*) FROM `{}`.`{}`", ident(db), ident(table)), limits)?
                    .parse()
                    .context("row count")
            }));
            checks.extend(sql_checks(&format!("database {db}"), extra, |sql| {
                self.query(&options, Some(db), sql, limits)
            }));
        }
        Ok(checks)
    }

    /// A `[client]` option file with the connection settings and the password (0600).
    fn option_file(&self, etc: &Path) -> Result<PathBuf> {
        let p = etc.join("my.cnf");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&p)?;
        let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
        writeln!(f, "[client]")?;
        if let Some(h) = &self.conn.host {
            writeln!(f, "host={}", quote(h))?;
        }
        if let Some(port) = self.conn.port {
            writeln!(f, "port={port}")?;
        }
        if let Some(s) = &self.conn.socket {
            writeln!(f, "socket={}", quote(&s.to_string_lossy()))?;
        }
        if let Some(u) = &self.conn.user {
            writeln!(f, "user={}", quote(u))?;
        }
        if let Some(pw) = self.conn.password()? {
            writeln!(f, "password={}", quote(&pw))?;
        }
        Ok(p)
    }
}

/// A MariaDB client tool reading only our option file (it must be the first option).
fn client(program: &str, options: &Path) -> Command {
    let mut cmd = Command::new(program);
    // --defaults-file: this file only, not /etc/mysql or ~/.my.cnf (no credentials from elsewhere).
    cmd.arg(format!("--defaults-file={}", options.display())).env_remove("MYSQL_PWD").env_remove("MYSQL_HOST");
    cmd
}

/// A string as a literal that no name can break out of, whatever the server's sql_mode.
fn literal(s: &str) -> String {
    format!("CONVERT(X'{}' USING utf8mb4)", hex::encode(s))
}

/// An identifier's content between backticks.
fn ident(s: &str) -> String {
    s.replace('`', "``")
}
