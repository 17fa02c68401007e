//! SQLite: each database copied through the online backup API in one step (one read
//! transaction, so the copy is one instant of the database even with a writer in WAL mode; a
//! plain copy of the file and its `-wal` could mix two instants), made self-contained
//! (`journal_mode = DELETE`), then checked with `PRAGMA integrity_check` and counted exactly.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use magpie_proto::v1::{CheckResult, DumpInfo, TableRows};
use rusqlite::backup::StepResult;
use rusqlite::{Connection, OpenFlags};

use super::process::Limits;
use super::{Readiness, RestoreRun, Run, check, now_ns, row_check, sql_checks, stage_file};

pub fn dump(pattern: &str, run: &Run<'_>, limits: &Limits<'_>, warnings: &mut Vec<String>) -> Result<Vec<DumpInfo>> {
    let mut files = Vec::new();
    for p in glob::glob(pattern).with_context(|| format!("path {pattern:?}"))?.filter_map(|p| p.ok()) {
        // A symlink (the file or a directory on its way) could point anywhere on the server:
        // whoever can write next to a database must not make the agent read another file.
        let plain =
            std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) && std::fs::canonicalize(&p).is_ok_and(|c| c == p);
        if plain {
            files.push(p);
        } else if std::fs::symlink_metadata(&p).is_ok_and(|m| !m.is_dir()) {
            warnings.push(format!("{} skipped: it is a symlink or lies below one", p.display()));
        }
    }
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
    let source = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )?;
    // One step copies the whole database and cannot be stopped half-way: check the room first.
    let size: i64 =
        source.query_row("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()", [], |r| {
            r.get(0)
        })?;
    let room = limits.spool.max_bytes.saturating_sub(limits.spool.usage());
    if size as u64 > room {
        bail!(
            "{} bytes do not fit in the spool ({} of spool.max_bytes left in {}): raise it or free space",
            size,
            room,
            limits.spool.dir.display()
        );
    }
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
    let verdict = integrity(dst)?;
    if verdict != "ok" {
        bail!("the copy fails integrity_check: {verdict}");
    }
    let names: Vec<String> = copy
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut tables = Vec::new();
    for name in names {
        let rows = count_rows(&copy, &name)?;
        tables.push(TableRows { name, rows });
    }
    Ok(tables)
}

/// Where a dump of `d` goes back: its original file (which must match the source's pattern: a
/// snapshot cannot name any other file), or the same path below `restore_root`.
fn target(pattern: &str, d: &DumpInfo, restore_root: Option<&Path>) -> Result<std::path::PathBuf> {
    let original = Path::new(&d.database);
    let plain = original.is_absolute()
        && original.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)));
    // `*` stays within one path component, as it does when the dumps are taken.
    let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
    if !plain || !glob::Pattern::new(pattern)?.matches_path_with(original, options) {
        bail!("refused: {} is not a database of this source (path = {pattern:?})", d.database);
    }
    let target = match restore_root {
        Some(root) => root.join(original.strip_prefix("/").expect("absolute")),
        None => original.to_path_buf(),
    };
    // No symlink on the way: what exists of the target's directory is its own canonical path.
    if let Some(existing) = target.parent().and_then(|p| p.ancestors().find(|a| a.exists()))
        && std::fs::canonicalize(existing).ok().as_deref() != Some(existing)
    {
        bail!("refused: {} lies below a symlink", target.display());
    }
    Ok(target)
}

pub fn readiness(pattern: &str, dumps: &[DumpInfo], restore_root: Option<&Path>, r: &mut Readiness) -> Result<()> {
    for d in dumps {
        let t = target(pattern, d, restore_root)?;
        if t.exists() {
            r.overwrites.push(format!("{} (replaced whole; its -wal and -shm removed)", t.display()));
        }
        r.targets.push(t.display().to_string());
    }
    Ok(())
}

/// Each database checked as a new file next to its target, then renamed over it (after its
/// old `-wal` and `-shm` are removed: SQLite would otherwise replay the old log into it).
pub fn restore(pattern: &str, run: &RestoreRun<'_>, extra: &[String]) -> Result<Vec<CheckResult>> {
    let mut checks = Vec::new();
    for d in run.dumps {
        let dst = target(pattern, d, run.restore_root)?;
        (run.progress)(format!("restoring {}", dst.display()));
        // The new file next to the old, checked there; only then do the old one's log files go
        // and the new one take its name, so a failure leaves the old database whole.
        let staged = stage_file(&run.dir.join(&d.path), &dst)?;
        let placed = (|| -> Result<()> {
            let verdict = integrity(&staged)?;
            if verdict != "ok" {
                bail!("the restored copy of {} fails integrity_check: {verdict}", d.database);
            }
            for suffix in ["-wal", "-shm", "-journal"] {
                let mut side = dst.clone().into_os_string();
                side.push(suffix);
                match std::fs::remove_file(&side) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("cannot remove {}", Path::new(&side).display()));
                    }
                    _ => {}
                }
            }
            std::fs::rename(&staged, &dst).with_context(|| format!("cannot put the database at {}", dst.display()))
        })();
        if placed.is_err() {
            let _ = std::fs::remove_file(&staged);
        }
        placed?;
        let db = Connection::open_with_flags(&dst, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let what = dst.display().to_string();
        let placed = integrity(&dst)?;
        checks.push(check(&format!("integrity of {what}"), placed == "ok", &placed));
        checks.push(row_check(&what, &d.tables, d.rows_exact, |table| Ok(count_rows(&db, table)?)));
        checks.extend(sql_checks(&what, extra, |sql| {
            let v: rusqlite::types::Value = db.query_row(sql, [], |r| r.get(0))?;
            Ok(match v {
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Text(t) => t,
                other => format!("{other:?}"),
            })
        }));
    }
    Ok(checks)
}

/// The rows of one table.
fn count_rows(db: &Connection, table: &str) -> rusqlite::Result<u64> {
    let n: i64 = db.query_row(&format!("SELECT count(*) FROM \"{}\"", table.replace('"', "\"\"")), [], |r| r.get(0))?;
    Ok(n as u64)
}

fn integrity(p: &Path) -> Result<String> {
    let db = Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let verdict: Vec<String> =
        db.prepare("PRAGMA integrity_check")?.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    Ok(verdict.join("; "))
}
