//! MariaDB: `mariadb-dump --single-transaction --quick --routines --events` per database.
//!
//! `--single-transaction` makes InnoDB tables consistent; it cannot do that for other engines,
//! so those are named in a warning. Connection settings and the password go to the tools in an
//! option file (`--defaults-extra-file`) in the session's private directory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow};
use magpie_proto::v1::{DumpInfo, TableRows};

use super::process::{self, Limits, Output};
use super::{Conn, Run, file_name, now_ns, tool_version};

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
            None => sql("SHOW DATABASES", "listing the databases")?
                .into_iter()
                .filter_map(|r| r.into_iter().next())
                .filter(|d| !SYSTEM.contains(&d.as_str()) && !d.starts_with('-'))
                .collect(),
        };
        let mut dumps = Vec::new();
        for db in &databases {
            (run.progress)(format!("dumping database {db}"));
            let start = now_ns();
            let in_db = format!("table_schema = '{}' AND table_type = 'BASE TABLE'", literal(db));
            let others = sql(
                &format!(
                    "SELECT table_name, engine FROM information_schema.tables WHERE {in_db} AND engine <> 'InnoDB' ORDER BY 1"
                ),
                "finding non-InnoDB tables",
            )?;
            if !others.is_empty() {
                let list: Vec<String> = others.iter().map(|r| r.join(" ")).collect();
                warnings.push(format!(
                    "database {db}: tables not on InnoDB cannot be dumped consistently under writes: {}",
                    list.join(", ")
                ));
            }
            let names = sql(
                &format!("SELECT table_name FROM information_schema.tables WHERE {in_db} ORDER BY 1"),
                "listing tables",
            )?;
            let mut tables = Vec::new();
            if self.exact {
                for batch in names.chunks(200) {
                    let q: Vec<String> = batch
                        .iter()
                        .map(|r| {
                            format!("SELECT '{}', COUNT(*) FROM `{}`.`{}`", literal(&r[0]), ident(db), ident(&r[0]))
                        })
                        .collect();
                    tables.extend(rows(sql(&q.join(" UNION ALL "), "counting rows")?)?);
                }
            } else {
                tables = rows(sql(
                    &format!(
                        "SELECT table_name, COALESCE(table_rows, 0) FROM information_schema.tables WHERE {in_db} ORDER BY 1"
                    ),
                    "reading table statistics",
                )?)?;
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

    /// A `[client]` option file with the connection settings and the password (0600).
    fn option_file(&self, etc: &Path) -> Result<PathBuf> {
        let p = etc.join("my.cnf");
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p)?;
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
    cmd.arg(format!("--defaults-extra-file={}", options.display())).env_remove("MYSQL_PWD").env_remove("MYSQL_HOST");
    cmd
}

fn rows(lines: Vec<Vec<String>>) -> Result<Vec<TableRows>> {
    lines
        .into_iter()
        .map(|r| match r.as_slice() {
            [name, n] => Ok(TableRows { name: name.clone(), rows: n.parse().context("row count")? }),
            _ => Err(anyhow!("unexpected answer {r:?}")),
        })
        .collect()
}

/// A string literal's content (backslashes and quotes escaped).
fn literal(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

/// An identifier's content between backticks.
fn ident(s: &str) -> String {
    s.replace('`', "``")
}
