//! `collector status`: could I restore right now? Per source the last good pull and its age,
//! the last failure and why, the snapshot count and the dump tools against the servers they
//! dumped; for the repository its size, the free space on its disk against a full restore, the
//! last check and the last full verification, and when the timer's job last ran.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use repo_format::Repository;
use serde::Serialize;

use crate::state::State;

#[derive(Debug, Default, Serialize)]
pub struct SourceStatus {
    pub agent: String,
    pub source: String,
    pub role: String,
    pub snapshots: usize,
    pub last_good: Option<String>,
    pub last_good_age_hours: Option<f64>,
    pub last_failure: Option<String>,
    pub last_error: Option<String>,
    /// Bytes of the newest snapshot (what a full restore of the source writes).
    pub restore_bytes: u64,
    /// "pg_dump 15.4 / server 15.4" per dump of the newest snapshot; flagged when older.
    pub dump_tools: Vec<String>,
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Status {
    pub sources: Vec<SourceStatus>,
    pub repository_bytes: u64,
    pub free_bytes: Option<u64>,
    pub full_restore_bytes: u64,
    pub last_check: Option<String>,
    pub last_check_clean: Option<bool>,
    pub last_full_verification: Option<String>,
    pub last_run: Option<String>,
    pub last_run_outcome: Option<String>,
    pub problems: Vec<String>,
}

fn time(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).map(|t| t.with_timezone(&chrono::Local).to_rfc3339()).unwrap_or_default()
}

/// The major version in a version string ("pg_dump (PostgreSQL) 15.4" → 15).
fn major(v: &str) -> Option<u32> {
    v.split_whitespace().find(|t| t.starts_with(|c: char| c.is_ascii_digit()))?.split('.').next()?.parse().ok()
}

pub fn status(repo: &Repository, repo_dir: &Path, state_dir: &Path, json: bool) -> Result<u8> {
    let state = State::load(state_dir)?;
    let mut st = Status::default();
    let now = chrono::Utc::now();
    let mut groups: BTreeMap<(String, String), Vec<repo_format::Snapshot>> = BTreeMap::new();
    for (_, s) in repo.snapshots()? {
        groups.entry((s.agent.clone(), s.source.clone())).or_default().push(s);
    }
    for ((agent, source), snaps) in &groups {
        let newest = snaps.iter().max_by_key(|s| s.time_ns).expect("a group has a snapshot");
        let saved = state.sources.get(&format!("{agent}/{source}")).cloned().unwrap_or_default();
        let mut s = SourceStatus {
            agent: agent.clone(),
            source: source.clone(),
            role: newest.role.clone(),
            snapshots: snaps.len(),
            last_good: Some(newest.time().with_timezone(&chrono::Local).to_rfc3339()),
            last_good_age_hours: Some(now.signed_duration_since(newest.time()).num_seconds() as f64 / 3600.0),
            restore_bytes: newest.stats.as_ref().map_or(0, |x| x.bytes),
            ..Default::default()
        };
        // A failure of the whole agent (unreachable, refused) is each of its sources' failure.
        let agent_wide = state.sources.get(agent.as_str()).filter(|a| a.last_failure > saved.last_success);
        if let Some(failed) = agent_wide.or((saved.last_failure > saved.last_success).then_some(&saved)) {
            s.last_failure = failed.last_failure.map(time);
            s.last_error = failed.last_error.clone();
            s.problems.push("its last pull failed".into());
        }
        for d in &newest.dumps {
            let (tool, server) = (major(&d.tool_version), major(&d.server_version));
            s.dump_tools.push(format!("{}: {} / server {}", d.path, d.tool_version, d.server_version));
            if let (Some(t), Some(v)) = (tool, server)
                && d.kind.starts_with("postgres")
                && t < v
            {
                s.problems.push(format!("{}: the dump tool ({t}) is older than the server ({v})", d.path));
            }
        }
        st.full_restore_bytes += s.restore_bytes;
        st.sources.push(s);
    }
    // Pulls that never committed anything are sources too.
    for (key, saved) in &state.sources {
        let Some((agent, source)) = key.split_once('/') else { continue };
        if !groups.contains_key(&(agent.to_string(), source.to_string())) {
            st.sources.push(SourceStatus {
                agent: agent.into(),
                source: source.into(),
                last_failure: saved.last_failure.map(time),
                last_error: saved.last_error.clone(),
                problems: vec!["no snapshot yet".into()],
                ..Default::default()
            });
        }
    }
    st.repository_bytes = repo.stored_bytes()?;
    st.free_bytes = rustix::fs::statvfs(repo_dir).ok().map(|v| v.f_bavail.saturating_mul(v.f_frsize));
    if let Some(free) = st.free_bytes
        && free < st.full_restore_bytes
    {
        st.problems.push(format!(
            "{free} bytes free on the repository's disk, less than a full restore ({} bytes) into a directory there",
            st.full_restore_bytes
        ));
    }
    st.last_check = state.last_check.map(time);
    st.last_check_clean = state.last_check_clean;
    if state.last_check_clean == Some(false) {
        st.problems.push("the last check found damage: run `collector check --verify-data`".into());
    }
    st.last_full_verification = state.last_full_verification().map(time);
    if let Some(r) = &state.last_run {
        st.last_run = Some(time(r.end));
        st.last_run_outcome = Some(r.outcome.clone());
    } else {
        st.problems.push("`collector run` has not run yet (is the timer enabled?)".into());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print_status(&st);
    }
    let bad = !st.problems.is_empty() || st.sources.iter().any(|s| !s.problems.is_empty());
    Ok(if bad { crate::exit::SOURCES_FAILED } else { crate::exit::OK })
}

fn print_status(st: &Status) {
    for s in &st.sources {
        let mark = if s.problems.is_empty() { "ok  " } else { "WARN" };
        println!(
            "{mark} {}/{} [{}]: {} snapshots; last good {} ({})",
            s.agent,
            s.source,
            s.role,
            s.snapshots,
            s.last_good.as_deref().unwrap_or("never"),
            s.last_good_age_hours.map_or("-".into(), |h| format!("{h:.1} h ago"))
        );
        if let (Some(t), Some(e)) = (&s.last_failure, &s.last_error) {
            println!("     last failure {t}: {e}");
        }
        for d in &s.dump_tools {
            println!("     dump {d}");
        }
        for p in &s.problems {
            println!("     problem: {p}");
        }
    }
    println!(
        "repository: {} bytes stored; {} free on its disk; a full restore writes {} bytes",
        st.repository_bytes,
        st.free_bytes.map_or("?".into(), |f| f.to_string()),
        st.full_restore_bytes
    );
    println!(
        "last check: {} ({}); last full verification: {}; last run: {} ({})",
        st.last_check.as_deref().unwrap_or("never"),
        match st.last_check_clean {
            Some(true) => "clean",
            Some(false) => "DAMAGE",
            None => "-",
        },
        st.last_full_verification.as_deref().unwrap_or("not yet"),
        st.last_run.as_deref().unwrap_or("never"),
        st.last_run_outcome.as_deref().unwrap_or("-")
    );
    for p in &st.problems {
        println!("problem: {p}");
    }
}
