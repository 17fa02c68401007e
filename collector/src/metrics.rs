//! The Prometheus textfile written after every run, for node_exporter's textfile collector
//! (batch-job conventions: timestamps of the last success, durations, bytes added), written to
//! a temporary file and renamed so the collector never reads half a file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::run::RunOutcome;
use crate::state::State;

/// A label value, escaped as the text format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(out: &RunOutcome, state: &State) -> String {
    let mut m = String::new();
    let mut family = |name: &str, help: &str, kind: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(m, "# HELP {name} {help}");
        let _ = writeln!(m, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(m, "{name}{labels} {v}");
        }
    };
    let end = state.last_run.as_ref().map_or(0, |r| r.end) as f64;
    family("magpie_run_timestamp_seconds", "End of the last collector run.", "gauge", vec![(String::new(), end)]);
    family(
        "magpie_run_duration_seconds",
        "Duration of the last collector run.",
        "gauge",
        vec![(String::new(), out.duration_secs)],
    );
    family(
        "magpie_run_exit_code",
        "Exit code of the last collector run (0 ok; see the README).",
        "gauge",
        vec![(String::new(), out.exit_code as f64)],
    );
    family(
        "magpie_repository_size_bytes",
        "Stored bytes of the repository.",
        "gauge",
        vec![(String::new(), out.repository_bytes as f64)],
    );
    family(
        "magpie_repository_check_clean",
        "1 when the last structural check found no damage.",
        "gauge",
        vec![(String::new(), if out.check_clean { 1.0 } else { 0.0 })],
    );
    let per_source = |f: &dyn Fn(&crate::run::SourceOutcome) -> Option<f64>| -> Vec<(String, f64)> {
        out.sources
            .iter()
            .filter_map(|s| Some((format!("{{agent=\"{}\",source=\"{}\"}}", label(&s.agent), label(&s.source)), f(s)?)))
            .collect()
    };
    family(
        "magpie_source_up",
        "1 when the source's last pull succeeded and it is not stale.",
        "gauge",
        per_source(&|s| Some(if matches!(s.status.as_str(), "ok" | "warnings") { 1.0 } else { 0.0 })),
    );
    family(
        "magpie_last_success_timestamp_seconds",
        "When the source's newest snapshot was taken.",
        "gauge",
        per_source(&|s| {
            let t = chrono::DateTime::parse_from_rfc3339(s.last_good_time.as_deref()?).ok()?;
            Some(t.timestamp() as f64)
        }),
    );
    family(
        "magpie_source_duration_seconds",
        "Duration of the source's pull in the last run.",
        "gauge",
        per_source(&|s| s.snapshot.as_ref().map(|_| s.duration_secs)),
    );
    family(
        "magpie_source_bytes_added",
        "Plaintext bytes the source's pull added to the repository in the last run.",
        "gauge",
        per_source(&|s| s.snapshot.as_ref().map(|_| s.bytes_added as f64)),
    );
    m
}

pub fn write(path: &Path, out: &RunOutcome, state: &State) -> Result<()> {
    crate::state::write_atomic(path, render(out, state).as_bytes())
}
