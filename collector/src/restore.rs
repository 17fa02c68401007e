//! `collector restore`: bring sources back in dependency order.
//!
//! For every selected source, the newest snapshot at or before `--at` (or one named snapshot);
//! sources grouped by restore role, groups run in `--order`; a group finishes and passes its
//! checks before the next begins, and a failure stops the run with an account of what was and
//! was not restored. Before anything is written, the plan is printed and every target checked
//! (free space, permissions, database servers, non-empty databases); `--dry-run` stops there.
//! Targets: the agents' restore endpoints (`--to-agent`) or a directory on this host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use globset::{Glob, GlobSet, GlobSetBuilder};
use magpie_proto::v1::agent_client::AgentClient;
use magpie_proto::v1::{
    Entry, EntryKind, RestoreCheckRequest, RestoreEntry, RestoreFinish, RestoreMessage, RestoreStart, Xattr,
    restore_event, restore_message,
};
use repo_format::fs::ContentReader;
use repo_format::repofile::tree::{Node, NodeKind};
use repo_format::{DumpInfo, Id, Repository, Snapshot};
use serde::Serialize;
use tonic::transport::Channel;

use crate::config::CollectorConfig;

/// Bytes of file content per message to the agent.
const PIECE: usize = 1 << 20;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_agent", "target_dir"])))]
pub struct RestoreArgs {
    /// A snapshot id (a unique prefix), or `latest`. Default: for every selected source, its
    /// newest snapshot at or before --at.
    pub snapshot: Option<String>,
    /// Restore the state as of this time ("2026-11-20 18:00", RFC 3339, or a date).
    #[arg(long, conflicts_with = "snapshot")]
    pub at: Option<String>,
    /// Only sources of this agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// Only these sources (repeatable).
    #[arg(long = "source")]
    pub sources: Vec<String>,
    /// The order of the restore roles; roles not named are not restored.
    #[arg(long, default_value = "db,blobs,data,config")]
    pub order: String,
    /// Restore onto the agents, through their restore endpoints.
    #[arg(long)]
    pub to_agent: bool,
    /// Restore onto this host: files into DIR/AGENT/SOURCE/…, dumps as files with a README.
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
    /// Only entries matching these globs (paths as in the snapshot, e.g. "srv/www/**").
    #[arg(long = "path")]
    pub paths: Vec<String>,
    /// Print the plan and the readiness checks, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Databases: replace what a non-empty target database holds.
    #[arg(long)]
    pub clean: bool,
    /// Databases: load into a non-empty target database as it is.
    #[arg(long)]
    pub force: bool,
    /// Machine-readable plan and report.
    #[arg(long)]
    pub json: bool,
}

/// One source to restore and where it goes.
#[derive(Debug, Serialize)]
pub struct PlanItem {
    pub group: String,
    pub agent: String,
    pub source: String,
    pub kind: String,
    pub snapshot: String,
    pub time: String,
    pub age: String,
    pub bytes: u64,
    pub targets: Vec<String>,
    pub overwrites: Vec<String>,
    pub problems: Vec<String>,
    #[serde(skip)]
    id: Id,
    #[serde(skip)]
    snap: Snapshot,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ItemReport {
    pub agent: String,
    pub source: String,
    pub snapshot: String,
    pub files: u64,
    pub bytes: u64,
    pub checks: Vec<Check>,
    pub warnings: Vec<String>,
    pub error: Option<String>,
    /// Seconds since the epoch.
    pub started: f64,
    pub finished: f64,
}

#[derive(Debug, Serialize)]
pub struct GroupReport {
    pub role: String,
    pub ok: bool,
    pub sources: Vec<ItemReport>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub ready: bool,
    pub plan: Vec<PlanItem>,
    /// Selected sources whose role is not in --order.
    pub skipped: Vec<String>,
    pub groups: Vec<GroupReport>,
    /// "agent/source" of every source the run did not restore (after a failure).
    pub not_restored: Vec<String>,
    pub ok: bool,
}

pub fn run(mut repo: Repository, cfg: Option<&CollectorConfig>, a: &RestoreArgs) -> Result<u8> {
    use crate::exit;
    let _lock = repo_format::locking::lock(&repo, false, "collector restore", Duration::ZERO)?;
    repo.load_index()?;
    let order: Vec<String> = a.order.split(',').map(|r| r.trim().to_string()).filter(|r| !r.is_empty()).collect();
    if let Some(bad) = order.iter().find(|r| !["db", "blobs", "data", "config"].contains(&r.as_str())) {
        return Err(
            crate::commands::UsageError(format!("--order: {bad:?} is not a role (db, blobs, data, config)")).into()
        );
    }
    let filter = path_filter(&a.paths)?;
    let (mut plan, skipped) = select(&repo, a, &order)?;
    for item in &mut plan {
        narrow_volumes(&repo, item, &filter)?;
    }
    if plan.is_empty() {
        return Err(crate::commands::UsageError(format!(
            "nothing to restore: the selected snapshots' roles ({}) are not in --order {}",
            skipped.join(", "),
            a.order
        ))
        .into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut clients: BTreeMap<String, Result<AgentClient<Channel>, String>> = BTreeMap::new();
    if a.to_agent {
        let cfg = cfg.ok_or_else(|| {
            crate::commands::UsageError("--to-agent needs the collector configuration (--config FILE)".into())
        })?;
        // All at once, as pull does.
        let names: std::collections::BTreeSet<String> = plan.iter().map(|p| p.agent.clone()).collect();
        let answers = rt.block_on(futures_util::future::join_all(names.iter().map(|agent| async move {
            match cfg.agents.iter().find(|x| &x.name == agent) {
                None => Err(format!("agent {agent} is not in the collector configuration")),
                Some(entry) => crate::pull::handshake(entry, cfg).await.map(|(c, ..)| c).map_err(|e| format!("{e:#}")),
            }
        })));
        clients.extend(names.into_iter().zip(answers));
    }
    for item in &mut plan {
        ready(&rt, item, a, &filter, &clients);
    }
    let mut report = Report { dry_run: a.dry_run, skipped, ..Default::default() };
    report.ready = plan.iter().all(|p| p.problems.is_empty());
    report.plan = plan;
    if !a.json {
        print_plan(&report);
    }
    if !report.ready || a.dry_run {
        report.ok = report.ready;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else if !report.ready {
            eprintln!("not ready: nothing was restored (the problems are listed above)");
        }
        return Ok(if report.ready { exit::OK } else { exit::ERROR });
    }

    let plan = std::mem::take(&mut report.plan);
    let (mut failed, mut corrupt) = (false, false);
    for role in &order {
        let items: Vec<&PlanItem> = plan.iter().filter(|p| &p.group == role).collect();
        if items.is_empty() {
            continue;
        }
        if failed {
            report.not_restored.extend(items.iter().map(|p| format!("{}/{}", p.agent, p.source)));
            continue;
        }
        if !a.json {
            println!("== group {role}");
        }
        let mut group = GroupReport { role: role.clone(), ok: true, sources: Vec::new() };
        for item in items {
            if failed {
                report.not_restored.push(format!("{}/{}", item.agent, item.source));
                continue;
            }
            let mut r = ItemReport {
                agent: item.agent.clone(),
                source: item.source.clone(),
                snapshot: item.id.to_hex(),
                started: now_secs(),
                ..Default::default()
            };
            let result = match (&a.target_dir, clients.get(&item.agent)) {
                (Some(dir), _) => to_dir(&repo, item, dir, &filter, &mut r),
                (None, Some(Ok(client))) => to_agent(&rt, &repo, item, client.clone(), a, &filter, &mut r),
                (None, _) => Err(anyhow!("agent {} is not reachable", item.agent)),
            };
            r.finished = now_secs();
            if let Err(e) = result {
                corrupt |= e.chain().any(|c| matches!(c.downcast_ref(), Some(repo_format::Error::Corrupt { .. })));
                r.error = Some(format!("{e:#}"));
            }
            let ok = r.error.is_none() && r.checks.iter().all(|c| c.ok);
            if !a.json {
                print_item(&r, ok);
            }
            if !ok {
                group.ok = false;
                failed = true;
            }
            group.sources.push(r);
        }
        report.groups.push(group);
    }
    report.ok = !failed;
    report.plan = plan;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let done: Vec<String> = report
            .groups
            .iter()
            .flat_map(|g| g.sources.iter().filter(|s| s.error.is_none()).map(|s| format!("{}/{}", s.agent, s.source)))
            .collect();
        println!("restored: {}", if done.is_empty() { "nothing".into() } else { done.join(", ") });
        if !report.not_restored.is_empty() {
            println!("not restored: {}", report.not_restored.join(", "));
        }
    }
    Ok(if corrupt {
        // The repository itself is damaged: say so, as every other command does.
        exit::CORRUPT
    } else if failed {
        exit::SOURCES_FAILED
    } else {
        exit::OK
    })
}

fn now_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// With --path, a docker-volume snapshot's restore touches only the volumes holding a matching
/// path: the others are neither created nor have their containers stopped.
fn narrow_volumes(repo: &Repository, item: &mut PlanItem, filter: &Option<GlobSet>) -> Result<()> {
    if filter.is_none() || item.snap.volumes.is_empty() {
        return Ok(());
    }
    let root = Id::from_slice(&item.snap.tree).context("snapshot has no root tree")?;
    let mut touched = std::collections::HashSet::new();
    repo_format::fs::walk(repo, &root, &mut |path, _| {
        if matches(filter, path) {
            touched.insert(path.split(|&b| b == b'/').next().unwrap_or_default().to_vec());
        }
        Ok(())
    })?;
    item.snap.volumes.retain(|v| touched.contains(v.name.as_bytes()));
    Ok(())
}

fn path_filter(globs: &[String]) -> Result<Option<GlobSet>> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).map_err(|e| crate::commands::UsageError(format!("--path {g:?}: {e}")))?);
    }
    Ok(Some(b.build()?))
}

fn matches(filter: &Option<GlobSet>, path: &[u8]) -> bool {
    filter
        .as_ref()
        .is_none_or(|f| f.is_match(Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path))))
}

/// Parse --at: RFC 3339, "YYYY-MM-DD HH:MM[:SS]" or "YYYY-MM-DD" in local time.
fn parse_at(s: &str) -> Result<i64> {
    use chrono::TimeZone;
    let bad = || crate::commands::UsageError(format!("--at {s:?}: give \"YYYY-MM-DD HH:MM\", a date, or RFC 3339"));
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return t.timestamp_nanos_opt().ok_or_else(|| bad().into());
    }
    let naive = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M"))
        .or_else(|_| {
            chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").map(|d| d.and_hms_opt(23, 59, 59).expect("valid time"))
        })
        .map_err(|_| bad())?;
    let local = chrono::Local.from_local_datetime(&naive).earliest().ok_or_else(bad)?;
    local.timestamp_nanos_opt().ok_or_else(|| bad().into())
}

/// The snapshots to restore, as plan items in role order; and the selected sources --order leaves out.
fn select(repo: &Repository, a: &RestoreArgs, order: &[String]) -> Result<(Vec<PlanItem>, Vec<String>)> {
    let chosen: Vec<(Id, Snapshot)> = match a.snapshot.as_deref() {
        Some(s) if s != "latest" => {
            let id = repo.find_snapshot(s)?;
            vec![(id, repo.load_snapshot(&id)?)]
        }
        _ => {
            let at = match &a.at {
                Some(t) => parse_at(t)?,
                None => i64::MAX,
            };
            let selected = repo.snapshots()?.into_iter().filter(|(_, s)| {
                s.time_ns <= at
                    && a.agent.as_ref().is_none_or(|x| x == &s.agent)
                    && (a.sources.is_empty() || a.sources.contains(&s.source))
            });
            repo_format::newest_per_group(selected).into_values().collect()
        }
    };
    if chosen.is_empty() {
        bail!("no snapshot matches (agent {:?}, sources {:?}, at {:?})", a.agent, a.sources, a.at);
    }
    let now = chrono::Utc::now();
    let mut plan = Vec::new();
    let mut skipped = Vec::new();
    for (id, snap) in chosen {
        let role = if snap.role.is_empty() { "data".to_string() } else { snap.role.clone() };
        if !order.contains(&role) {
            skipped.push(format!("{}/{} (role {role})", snap.agent, snap.source));
            continue;
        }
        let age = now.signed_duration_since(snap.time());
        plan.push(PlanItem {
            group: role,
            agent: snap.agent.clone(),
            source: snap.source.clone(),
            kind: snap.source_kind.clone(),
            snapshot: id.short(),
            time: snap.time().to_rfc3339(),
            age: human_age(age),
            bytes: snap.stats.as_ref().map_or(0, |s| s.bytes),
            targets: Vec::new(),
            overwrites: Vec::new(),
            problems: Vec::new(),
            id,
            snap,
        });
    }
    plan.sort_by_key(|p| (order.iter().position(|r| r == &p.group), p.agent.clone(), p.source.clone()));
    Ok((plan, skipped))
}

fn human_age(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..3600 => format!("{} min", s / 60),
        3600..172_800 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86400),
    }
}

/// Fill in where an item goes and what stands in its way.
fn ready(
    rt: &tokio::runtime::Runtime,
    item: &mut PlanItem,
    a: &RestoreArgs,
    filter: &Option<GlobSet>,
    clients: &BTreeMap<String, Result<AgentClient<Channel>, String>>,
) {
    if let Some(dir) = &a.target_dir {
        let Some(dest) = dest_dir(dir, item) else {
            return item.problems.push(format!(
                "agent {:?} / source {:?}: not plain names, refused as directory names",
                item.agent, item.source
            ));
        };
        if dest.read_dir().is_ok_and(|mut d| d.next().is_some()) {
            item.overwrites.push(format!("{}: files of the snapshot replace theirs", dest.display()));
        }
        let existing = dest.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/")).to_path_buf();
        if rustix::fs::access(&existing, rustix::fs::Access::WRITE_OK).is_err() {
            item.problems.push(format!("{} is not writable", existing.display()));
        }
        match rustix::fs::statvfs(&existing) {
            Ok(st) if st.f_bavail.saturating_mul(st.f_frsize) < item.bytes => item.problems.push(format!(
                "{} bytes to write, {} free at {}",
                item.bytes,
                st.f_bavail.saturating_mul(st.f_frsize),
                existing.display()
            )),
            _ => {}
        }
        item.targets.push(dest.display().to_string());
        return;
    }
    let client = match clients.get(&item.agent) {
        Some(Ok(c)) => c.clone(),
        Some(Err(e)) => return item.problems.push(e.clone()),
        None => return item.problems.push(format!("agent {} is not configured", item.agent)),
    };
    let request = RestoreCheckRequest {
        source: item.source.clone(),
        dumps: item.snap.dumps.iter().filter(|d| matches(filter, d.path.as_bytes())).map(wire_dump).collect(),
        bytes: item.bytes,
        clean: a.clean,
        force: a.force,
        volumes: item.snap.volumes.iter().map(wire_volume).collect(),
    };
    match rt.block_on(async move { client.clone().restore_check(request).await }) {
        Ok(r) => {
            let r = r.into_inner();
            item.targets = r.targets.into_iter().map(|t| format!("{}:{t}", item.agent)).collect();
            item.overwrites = r.overwrites;
            item.problems = r.problems;
        }
        Err(s) => item.problems.push(format!("agent {}: {}", item.agent, s.message())),
    }
}

/// A snapshot's volume as the agent's restore takes it (made again when missing).
fn wire_volume(v: &repo_format::repofile::snapshot::VolumeInfo) -> magpie_proto::v1::VolumeInfo {
    magpie_proto::v1::VolumeInfo {
        name: v.name.clone(),
        driver: v.driver.clone(),
        labels: v.labels.clone().into_iter().collect(),
        containers: v.containers.clone(),
        mode: v.mode.clone(),
        held: Vec::new(),
    }
}

fn wire_dump(d: &DumpInfo) -> magpie_proto::v1::DumpInfo {
    magpie_proto::v1::DumpInfo {
        path: d.path.clone(),
        kind: d.kind.clone(),
        format: d.format.clone(),
        database: d.database.clone(),
        server_version: d.server_version.clone(),
        tool_version: d.tool_version.clone(),
        tables: d.tables.iter().map(|t| magpie_proto::v1::TableRows { name: t.name.clone(), rows: t.rows }).collect(),
        rows_exact: d.rows_exact,
        size: d.size,
        blake3: d.blake3.clone(),
        start_ns: d.start_ns,
        end_ns: d.end_ns,
    }
}

fn print_plan(r: &Report) {
    println!("restore plan{}:", if r.dry_run { " (dry run)" } else { "" });
    for p in &r.plan {
        println!(
            "  [{}] {}/{} ({}): snapshot {} of {} ({} ago), {} bytes → {}",
            p.group,
            p.agent,
            p.source,
            p.kind,
            p.snapshot,
            p.time,
            p.age,
            p.bytes,
            p.targets.join(", ")
        );
        for o in &p.overwrites {
            println!("      overwrites: {o}");
        }
        for x in &p.problems {
            println!("      NOT READY: {x}");
        }
    }
    for s in &r.skipped {
        println!("  skipped (role not in --order): {s}");
    }
}

fn print_item(r: &ItemReport, ok: bool) {
    let status = if ok { "ok" } else { "FAILED" };
    println!("  {}/{}: {status}: {} files, {} bytes", r.agent, r.source, r.files, r.bytes);
    if let Some(e) = &r.error {
        println!("      error: {e}");
    }
    for c in &r.checks {
        println!("      check {}: {} ({})", if c.ok { "ok" } else { "FAILED" }, c.name, c.detail);
    }
    for w in &r.warnings {
        println!("      warning: {w}");
    }
}

/// Restore onto this host: files into DIR/AGENT/SOURCE, dumps as files with a README saying
/// how to load them; every file checked against its BLAKE3, SQLite copies opened and checked.
/// DIR/AGENT/SOURCE, when both names are single plain components (they come from the snapshot).
fn dest_dir(dir: &Path, item: &PlanItem) -> Option<PathBuf> {
    let agent = repo_format::fs::check_name(item.agent.as_bytes()).ok()?;
    let source = repo_format::fs::check_name(item.source.as_bytes()).ok()?;
    Some(dir.join(agent).join(source))
}

fn to_dir(repo: &Repository, item: &PlanItem, dir: &Path, filter: &Option<GlobSet>, r: &mut ItemReport) -> Result<()> {
    let dest = dest_dir(dir, item).ok_or_else(|| anyhow!("agent or source name is not a plain name"))?;
    let root = Id::from_slice(&item.snap.tree).context("snapshot has no root tree")?;
    let stats = repo_format::fs::restore_matching(repo, &root, &dest, &|p| matches(filter, p))
        .with_context(|| format!("restoring into {}", dest.display()))?;
    r.files = stats.files;
    r.bytes = stats.bytes;
    r.warnings.extend(stats.skipped);
    r.checks.push(Check {
        name: "file hashes".into(),
        ok: true,
        detail: format!("{} files written, each matching its BLAKE3", stats.files),
    });
    if item.snap.dumps.is_empty() {
        return Ok(());
    }
    let mut readme = format!(
        "Dumps of source {} on agent {}, snapshot {} ({}). To load them:\n",
        item.source,
        item.agent,
        item.id.short(),
        item.time
    );
    for d in item.snap.dumps.iter().filter(|d| matches(filter, d.path.as_bytes())) {
        readme.push_str(&format!("{}: {}\n", d.path, how_to_load(d)));
        let file = dest.join(&d.path);
        let hash = blake3::Hasher::new().update_reader(std::fs::File::open(&file)?)?.finalize();
        r.checks.push(Check {
            name: format!("dump {}", d.path),
            ok: hash.as_bytes().as_slice() == d.blake3 && std::fs::metadata(&file)?.len() == d.size,
            detail: "size and BLAKE3 against the dump's metadata".into(),
        });
        if d.kind == "sqlite" {
            r.checks.extend(sqlite_checks(&file, d));
        }
    }
    std::fs::write(dest.join("README.txt"), readme)?;
    Ok(())
}

fn how_to_load(d: &DumpInfo) -> String {
    match d.kind.as_str() {
        "postgres-globals" => {
            "roles and tablespaces: psql -X -d postgres -f globals.sql (as a superuser, first)".into()
        }
        "postgres" => format!(
            "createdb '{0}' && pg_restore -j 4 -d '{0}' '{1}' (pg_dump custom format, PostgreSQL {2})",
            d.database, d.path, d.server_version
        ),
        "mariadb" => format!("mariadb < '{}' (creates database {} if missing)", d.path, d.database),
        "sqlite" => format!(
            "a complete SQLite database of {}: stop its service, remove its -wal and -shm, copy this file over it",
            d.database
        ),
        "redis" => "stop Redis, copy this file to its dir/dbfilename (CONFIG GET dir), start Redis".into(),
        _ => "the output of the source's dump command: feed it to the matching restore tool".into(),
    }
}

/// integrity_check and exact row counts of a restored SQLite copy.
fn sqlite_checks(file: &Path, d: &DumpInfo) -> Vec<Check> {
    let result = (|| -> rusqlite::Result<(String, Vec<String>)> {
        let db = rusqlite::Connection::open_with_flags(file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let verdict: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        let mut off = Vec::new();
        for t in &d.tables {
            let n: i64 =
                db.query_row(&format!("SELECT count(*) FROM \"{}\"", t.name.replace('"', "\"\"")), [], |r| r.get(0))?;
            if n as u64 != t.rows {
                off.push(format!("{}: {n} rows, {} at the dump", t.name, t.rows));
            }
        }
        Ok((verdict, off))
    })();
    match result {
        Ok((verdict, off)) => vec![
            Check { name: format!("integrity of {}", d.path), ok: verdict == "ok", detail: verdict },
            Check {
                name: format!("row counts of {}", d.path),
                ok: off.is_empty(),
                detail: if off.is_empty() { format!("{} tables match", d.tables.len()) } else { off.join("; ") },
            },
        ],
        Err(e) => vec![Check { name: format!("open {}", d.path), ok: false, detail: e.to_string() }],
    }
}

/// Restore onto the agent: stream the snapshot's entries to its restore endpoint.
fn to_agent(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    item: &PlanItem,
    mut client: AgentClient<Channel>,
    a: &RestoreArgs,
    filter: &Option<GlobSet>,
    r: &mut ItemReport,
) -> Result<()> {
    let root = Id::from_slice(&item.snap.tree).context("snapshot has no root tree")?;
    let (tx, rx) = tokio::sync::mpsc::channel::<RestoreMessage>(16);
    let start = RestoreStart {
        source: item.source.clone(),
        dumps: item.snap.dumps.iter().filter(|d| matches(filter, d.path.as_bytes())).map(wire_dump).collect(),
        clean: a.clean,
        force: a.force,
        volumes: item.snap.volumes.iter().map(wire_volume).collect(),
    };
    // The agent reads the start before it answers: it must be in the stream already.
    tx.try_send(RestoreMessage { msg: Some(restore_message::Msg::Start(start)) }).expect("an empty channel");
    let bar = crate::pull::progress_bar(&item.agent, &item.source, item.bytes);
    let started = Instant::now();
    std::thread::scope(|s| {
        // The producer owns the sender: when it stops, for whatever reason, the stream ends
        // and the agent stops waiting.
        let (root, bar_ref) = (&root, &bar);
        let producer = s.spawn(move || send_tree(repo, root, filter, &tx, bar_ref));
        let outcome = rt.block_on(async {
            let mut events = client
                .restore(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(|s| anyhow!("agent {}: {}", item.agent, s.message()))?
                .into_inner();
            while let Some(ev) = events.message().await.map_err(|s| anyhow!("agent {}: {}", item.agent, s.message()))? {
                match ev.event {
                    Some(restore_event::Event::Progress(line)) => {
                        bar.set_message(format!("{}/{}: {line}", item.agent, item.source))
                    }
                    Some(restore_event::Event::Result(res)) => return Ok(res),
                    None => {}
                }
            }
            bail!("agent {}: the restore of {} ended without a result", item.agent, item.source)
        });
        // A failed read of the repository explains a cut-off restore better than the agent can.
        let sent = producer.join().map_err(|_| anyhow!("the restore reader panicked"))?;
        bar.finish_and_clear();
        sent?;
        let res = outcome?;
        r.files = res.files;
        r.bytes = res.bytes;
        r.warnings = res.warnings;
        r.checks = res.checks.into_iter().map(|c| Check { name: c.name, ok: c.ok, detail: c.detail }).collect();
        tracing::info!("restored {}/{} in {:.1}s", item.agent, item.source, started.elapsed().as_secs_f64());
        Ok(())
    })
}

/// Every entry of a tree in restore order (a directory's files, then its sub-directories),
/// each file followed by its content; then the finish. Stops quietly when the agent hung up.
fn send_tree(
    repo: &Repository,
    root: &Id,
    filter: &Option<GlobSet>,
    tx: &tokio::sync::mpsc::Sender<RestoreMessage>,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let mut reader = ContentReader::default();
    let mut sent = std::collections::HashSet::new();
    // A hard link group's first name, and the path its content was sent under when a further
    // name came first: later members link to that one instead of splitting the group.
    let mut carried: std::collections::HashMap<Vec<u8>, Vec<u8>> = std::collections::HashMap::new();
    let send = |m: restore_message::Msg| tx.blocking_send(RestoreMessage { msg: Some(m) }).is_ok();
    // (tree, its path, its directory node: None for the root).
    let mut stack: Vec<(Id, Vec<u8>, Option<Node>)> = vec![(*root, Vec::new(), None)];
    while let Some((id, prefix, dir)) = stack.pop() {
        // With --path, only matching directories get their metadata; the agent makes the others.
        if let Some(node) = dir
            && matches(filter, &prefix)
            && !send(restore_message::Msg::Entry(RestoreEntry {
                entry: Some(entry(&prefix, &node)),
                ..Default::default()
            }))
        {
            return Ok(());
        }
        let tree = repo.read_tree(&id)?;
        let (dirs, leaves): (Vec<&Node>, Vec<&Node>) = tree.nodes.iter().partition(|n| n.node_kind() == NodeKind::Dir);
        for node in leaves {
            let path = join(&prefix, &node.name);
            if !matches(filter, &path) {
                continue;
            }
            let hardlink_to = match node.node_kind() {
                // A further name of a file already sent; else its own content travels.
                NodeKind::Hardlink if sent.contains(&node.link_target) => node.link_target.clone(),
                NodeKind::Hardlink => carried.get(&node.link_target).cloned().unwrap_or_default(),
                NodeKind::File => carried.get(&path).cloned().unwrap_or_default(),
                _ => Vec::new(),
            };
            if node.node_kind() == NodeKind::Hardlink && hardlink_to.is_empty() {
                carried.insert(node.link_target.clone(), path.clone());
            }
            let is_content = matches!(node.node_kind(), NodeKind::File | NodeKind::Hardlink) && hardlink_to.is_empty();
            let entry = RestoreEntry { entry: Some(entry(&path, node)), blake3: node.blake3.clone(), hardlink_to };
            if !send(restore_message::Msg::Entry(entry)) {
                return Ok(());
            }
            if is_content {
                let mut gone = false;
                reader.read(repo, node, &String::from_utf8_lossy(&path), &mut |data| {
                    for piece in data.chunks(PIECE) {
                        if !gone && !send(restore_message::Msg::Data(piece.to_vec())) {
                            gone = true;
                        }
                    }
                    bar.inc(data.len() as u64);
                    Ok(())
                })?;
                if gone {
                    return Ok(());
                }
                sent.insert(path);
            }
        }
        // Sub-directories in name order (the stack reverses it): each entry, then its content.
        for node in dirs.into_iter().rev() {
            let path = join(&prefix, &node.name);
            let sub = Id::from_slice(&node.subtree)
                .ok_or_else(|| anyhow!("{}: directory without a tree", String::from_utf8_lossy(&path)))?;
            stack.push((sub, path, Some(node.clone())));
        }
    }
    send(restore_message::Msg::Finish(RestoreFinish {}));
    Ok(())
}

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = prefix.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// A tree node as the protocol's entry.
fn entry(path: &[u8], n: &Node) -> Entry {
    let kind = match n.node_kind() {
        NodeKind::File | NodeKind::Hardlink => EntryKind::File,
        NodeKind::Dir => EntryKind::Dir,
        NodeKind::Symlink => EntryKind::Symlink,
        NodeKind::CharDevice => EntryKind::CharDevice,
        NodeKind::BlockDevice => EntryKind::BlockDevice,
        NodeKind::Fifo => EntryKind::Fifo,
        NodeKind::Socket => EntryKind::Socket,
        _ => EntryKind::Unknown,
    };
    Entry {
        path: path.to_vec(),
        kind: kind as i32,
        mode: n.mode,
        uid: n.uid,
        gid: n.gid,
        user: n.user.clone(),
        group: n.group.clone(),
        mtime_ns: n.mtime_ns,
        size: n.size,
        link_target: if n.node_kind() == NodeKind::Symlink { n.link_target.clone() } else { Vec::new() },
        xattrs: n.xattrs.iter().map(|x| Xattr { name: x.name.clone(), value: x.value.clone() }).collect(),
        ..Default::default()
    }
}
