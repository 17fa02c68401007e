//! SQLite: each database copied through the online backup API in one step (one read
//! transaction, so the copy is one instant of the database even with a writer in WAL mode; a
//! plain copy of the file and its `-wal` could mix two instants), made self-contained
//! (`journal_mode = DELETE`), then checked with `PRAGMA integrity_check` and counted exactly.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use magpie_proto::v1::{DumpInfo, TableRows};
use rusqlite::backup::StepResult;
use rusqlite::{Connection, OpenFlags};

use super::process::Limits;
use super::{Run, now_ns};

pub fn dump(pattern: &str, run: &Run<'_>, limits: &Limits<'_>) -> Result<Vec<DumpInfo>> {
    let mut files: Vec<_> = glob::glob(pattern)
        .with_context(|| format!("path {pattern:?}"))?
        .filter_map(|p| p.ok())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no SQLite database matches {pattern}");
    }
    let mut dumps = Vec::new();
    for src in files {
        if (limits.cancelled)() {
            bail!("stopped: the collector went away");
        }
        if std::time::Instant::now() >= limits.deadline {
            bail!("timed out; raise timeout_secs if it needs longer");
        }
        let rel = src.to_string_lossy().trim_start_matches('/').to_string();
        (run.progress)(format!("copying {}", src.display()));
        let start = now_ns();
        let dst = run.out.join(&rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tables = copy(&src, &dst, limits).with_context(|| format!("SQLite database {}", src.display()))?;
        if let Some(why) = super::process::spool_full(limits) {
            bail!("{why}");
        }
        dumps.push(DumpInfo {
            path: rel,
            kind: "sqlite".into(),
            format: "sqlite3".into(),
            database: src.to_string_lossy().into_owned(),
            server_version: format!("SQLite {}", rusqlite::version()),
            tool_version: format!("magpie-agent {} (online backup API)", env!("CARGO_PKG_VERSION")),
            tables,
            rows_exact: true,
            start_ns: start,
            end_ns: now_ns(),
            ..Default::default()
        });
    }
    Ok(dumps)
}

/// Copy `src` to `dst` and check the copy; returns its tables and their rows.
fn copy(src: &Path, dst: &Path, limits: &Limits<'_>) -> Result<Vec<TableRows>> {
    let source = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    // A writer holding its lock (rollback-journal mode) is waited for, not failed on.
    source.busy_timeout(Duration::from_secs(60))?;
    let mut copy = Connection::open(dst)?;
    {
        let backup = rusqlite::backup::Backup::new(&source, &mut copy)?;
        // All pages in one step: one read transaction, one instant. Busy or locked (a writer
        // in rollback-journal mode): wait and try again.
        loop {
            match backup.step(-1)? {
                StepResult::Done => break,
                StepResult::More | StepResult::Busy | StepResult::Locked => {
                    if std::time::Instant::now() >= limits.deadline || (limits.cancelled)() {
                        bail!("the database stayed locked until the dump's time ran out");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => bail!("unexpected result of a backup step"),
            }
        }
    }
    drop(source);
    copy.pragma_update(None, "journal_mode", "DELETE")?;
    let verdict: Vec<String> =
        copy.prepare("PRAGMA integrity_check")?.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    if verdict != ["ok"] {
        bail!("the copy fails integrity_check: {}", verdict.join("; "));
    }
    let names: Vec<String> = copy
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut tables = Vec::new();
    for name in names {
        let rows: i64 =
            copy.query_row(&format!("SELECT count(*) FROM \"{}\"", name.replace('"', "\"\"")), [], |r| r.get(0))?;
        tables.push(TableRows { name, rows: rows as u64 });
    }
    Ok(tables)
}
