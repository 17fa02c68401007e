//! `collector run`: the timer's job. Pull every source, prune each group to its retention,
//! compact, check the structure and verify a slice of the packs (every pack within
//! `run.verify_days` runs), flag sources whose last good snapshot is too old, then record the
//! state, write the metrics and mail the report. One failing source does not stop the others;
//! a repository problem is reported, never hidden.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use repo_format::ops::{check, compact, prune};
use repo_format::{Repository, locking};
use serde::Serialize;

use crate::config::CollectorConfig;
use crate::exit;
use crate::state::{RunRecord, State, now_unix};

/// How long `run` waits for another process's lock before giving up on prune and compact.
const LOCK_WAIT: Duration = Duration::from_secs(600);

/// One source's result.
#[derive(Debug, Default, Serialize)]
pub struct SourceOutcome {
    pub agent: String,
    pub source: String,
    /// ok, warnings, failed or stale.
    pub status: String,
    pub error: Option<String>,
    pub warnings: Vec<String>,
    /// The snapshot this run committed.
    pub snapshot: Option<String>,
    pub bytes_added: u64,
    pub duration_secs: f64,
    /// The newest snapshot of the source and when it was taken.
    pub last_good: Option<String>,
    pub last_good_time: Option<String>,
    pub last_good_age_hours: Option<f64>,
}

/// What a run did.
#[derive(Debug, Default, Serialize)]
pub struct RunOutcome {
    pub host: String,
    pub started: String,
    pub duration_secs: f64,
    pub sources: Vec<SourceOutcome>,
    /// Repository trouble: prune, compact or check failing, damage found.
    pub repository: Vec<String>,
    pub snapshots_pruned: usize,
    pub bytes_freed: u64,
    pub check_clean: bool,
    /// The packs verified this run: slice i of n.
    pub verified_slice: Option<(u32, u32)>,
    pub blobs_verified: usize,
    pub repository_bytes: u64,
    /// Why the mail could not be sent.
    pub mail_error: Option<String>,
    /// ok, warnings or failed.
    pub outcome: String,
    pub exit_code: u8,
}

impl RunOutcome {
    pub fn failed_sources(&self) -> impl Iterator<Item = &SourceOutcome> {
        self.sources.iter().filter(|s| s.status == "failed" || s.status == "stale")
    }
}

pub fn run(cfg: &CollectorConfig, mut repo: Repository, json: bool) -> Result<u8> {
    let started = Instant::now();
    let start = chrono::Utc::now();
    let mut state = State::load(&cfg.state_dir)?;
    let mut out =
        RunOutcome { host: repo_format::repository::hostname(), started: start.to_rfc3339(), ..Default::default() };

    // 1. Pull, every source of every agent (max_parallel at a time).
    let summaries = crate::pull::pull(cfg, crate::pull::Target::Open(&repo), &crate::pull::Selection::default())?;
    for s in summaries {
        let key = if s.source.is_empty() { s.agent.clone() } else { format!("{}/{}", s.agent, s.source) };
        let st = state.sources.entry(key).or_default();
        st.last_duration_secs = s.duration_secs;
        st.last_bytes_added = s.bytes_added;
        let status = match (&s.error, s.warnings.is_empty()) {
            (Some(e), _) => {
                st.last_failure = Some(now_unix());
                st.last_error = Some(e.clone());
                "failed"
            }
            (None, clean) => {
                st.last_success = Some(now_unix());
                st.last_snapshot = s.snapshot.clone();
                if clean { "ok" } else { "warnings" }
            }
        };
        out.sources.push(SourceOutcome {
            agent: s.agent,
            source: s.source,
            status: status.into(),
            error: s.error,
            warnings: s.warnings,
            snapshot: s.snapshot,
            bytes_added: s.bytes_added,
            duration_secs: s.duration_secs,
            ..Default::default()
        });
    }

    // 2.–4. Prune, compact, check: each under its lock, each failure reported.
    if let Err(e) = prune_groups(cfg, &repo, &mut out) {
        out.repository.push(format!("prune: {e:#}"));
    }
    if let Err(e) = compact_repo(cfg, &mut repo, &mut out) {
        out.repository.push(format!("compact: {e:#}"));
    }
    if let Err(e) = check_repo(cfg, &mut repo, &mut state, &mut out) {
        out.repository.push(format!("check: {e:#}"));
    }

    // 5. Staleness: every group of a configured agent, pulled this run or not.
    if let Err(e) = staleness(cfg, &repo, &mut out) {
        out.repository.push(format!("reading snapshots: {e:#}"));
    }
    out.repository_bytes = repo.stored_bytes().unwrap_or(0);

    // 6. The verdict, the record, the metrics, the mail.
    let damaged = !out.check_clean;
    let failed = out.failed_sources().count() > 0;
    let warned = out.sources.iter().any(|s| s.status == "warnings");
    out.outcome = if failed || !out.repository.is_empty() {
        "failed"
    } else if warned {
        "warnings"
    } else {
        "ok"
    }
    .into();
    out.exit_code = if damaged {
        exit::DAMAGE
    } else if !out.repository.is_empty() {
        exit::ERROR
    } else if failed {
        exit::SOURCES_FAILED
    } else if warned {
        exit::WARNINGS
    } else {
        exit::OK
    };
    out.duration_secs = started.elapsed().as_secs_f64();
    if let Some(m) = &cfg.mail
        && (out.outcome != "ok" || m.on_success)
        && let Err(e) = crate::notify::send(m, &out)
    {
        tracing::error!("the report could not be mailed: {e:#}");
        out.mail_error = Some(format!("{e:#}"));
        // Damage keeps its own code; anything else gives way: nobody was told.
        if out.exit_code != exit::DAMAGE {
            out.exit_code = exit::MAIL_FAILED;
        }
    }
    state.last_run = Some(RunRecord {
        start: start.timestamp(),
        end: now_unix(),
        outcome: out.outcome.clone(),
        exit_code: out.exit_code,
    });
    let mut problems = Vec::new();
    if let Err(e) = state.save(&cfg.state_dir) {
        problems.push(format!("{e:#}"));
    }
    if let Some(path) = &cfg.run.metrics_file
        && let Err(e) = crate::metrics::write(path, &out, &state)
    {
        problems.push(format!("{e:#}"));
    }
    for p in &problems {
        tracing::error!("{p}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", crate::notify::body(&out));
        for p in &problems {
            println!("error: {p}");
        }
    }
    Ok(if !problems.is_empty() && out.exit_code == exit::OK { exit::ERROR } else { out.exit_code })
}

/// Prune every group of a configured agent to its retention (the agent's, else the top-level).
fn prune_groups(cfg: &CollectorConfig, repo: &Repository, out: &mut RunOutcome) -> Result<()> {
    let mut policies = BTreeMap::new();
    for a in &cfg.agents {
        if let Some(r) = a.retention.as_ref().or(cfg.retention.as_ref()) {
            policies.insert(a.name.clone(), r.policy()?);
        }
    }
    if policies.is_empty() {
        return Ok(());
    }
    let _lock = locking::lock(repo, true, "collector run (prune)", LOCK_WAIT)?;
    let plan = prune::plan_each(repo, &|agent, _| policies.get(agent).cloned(), chrono::Utc::now(), &chrono::Local)?;
    out.snapshots_pruned = prune::apply(repo, &plan)?;
    Ok(())
}

fn compact_repo(cfg: &CollectorConfig, repo: &mut Repository, out: &mut RunOutcome) -> Result<()> {
    let _lock = locking::lock(repo, true, "collector run (compact)", LOCK_WAIT)?;
    let r = compact::compact(repo, compact::CompactOptions { max_garbage: cfg.run.compact_garbage_percent / 100.0 })?;
    out.bytes_freed = r.bytes_freed;
    Ok(())
}

/// The structural check, and the slice of packs verified least recently.
fn check_repo(cfg: &CollectorConfig, repo: &mut Repository, state: &mut State, out: &mut RunOutcome) -> Result<()> {
    let n = cfg.run.verify_days;
    state.verify_slices.resize(n as usize, 0);
    let slice = (0..n).min_by_key(|&i| state.verify_slices[i as usize]).unwrap_or(0);
    let _lock = locking::lock(repo, false, "collector run (check)", LOCK_WAIT)?;
    let r = check::check(repo, check::CheckOptions { verify_data: false, verify_slice: Some((slice, n)) })?;
    out.check_clean = r.is_clean();
    out.verified_slice = Some((slice, n));
    out.blobs_verified = r.verified;
    state.last_check = Some(now_unix());
    state.last_check_clean = Some(r.is_clean());
    if r.is_clean() {
        state.verify_slices[slice as usize] = now_unix();
    }
    for p in r.problems.iter().take(20) {
        out.repository.push(format!("damage: {p}"));
    }
    Ok(())
}

/// The newest snapshot of every group of a configured agent; a group whose newest is older
/// than its max_age is stale (a failure), pulled this run or not.
fn staleness(cfg: &CollectorConfig, repo: &Repository, out: &mut RunOutcome) -> Result<()> {
    let now = chrono::Utc::now();
    for ((agent, source), (id, snap)) in repo_format::newest_per_group(repo.snapshots()?) {
        let Some(entry) = cfg.agents.iter().find(|a| a.name == agent) else { continue };
        let max_age = repo_format::retention::parse_within(entry.max_age.as_deref().unwrap_or(&cfg.run.max_age))
            .map_err(anyhow::Error::msg)?;
        let age = now.signed_duration_since(snap.time());
        let idx = match out.sources.iter().position(|s| s.agent == agent && s.source == source) {
            Some(i) => i,
            None => {
                out.sources.push(SourceOutcome {
                    agent: agent.clone(),
                    source: source.clone(),
                    status: "ok".into(),
                    ..Default::default()
                });
                out.sources.len() - 1
            }
        };
        let o = &mut out.sources[idx];
        o.last_good = Some(id.to_hex());
        o.last_good_time = Some(snap.time().to_rfc3339());
        o.last_good_age_hours = Some(age.num_seconds() as f64 / 3600.0);
        if age.num_seconds() > max_age && o.status != "failed" {
            o.status = "stale".into();
            o.error = Some(format!(
                "its last snapshot is {:.1} hours old, past max_age ({}); it has not been pulled since",
                age.num_seconds() as f64 / 3600.0,
                entry.max_age.as_deref().unwrap_or(&cfg.run.max_age)
            ));
        }
    }
    Ok(())
}
