//! What `collector run` remembers between runs, for `collector status` and the next run:
//! per source the last success and the last failure, the last check, and how far the rolling
//! verification has got. One JSON file in `state_dir`, replaced atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

const FILE: &str = "state.json";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SourceState {
    /// Unix seconds of the last pull that committed a snapshot.
    pub last_success: Option<i64>,
    pub last_snapshot: Option<String>,
    /// Unix seconds of the last failed pull, and why.
    pub last_failure: Option<i64>,
    pub last_error: Option<String>,
    pub last_duration_secs: f64,
    pub last_bytes_added: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub start: i64,
    pub end: i64,
    /// ok, warnings or failed.
    pub outcome: String,
    pub exit_code: u8,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct State {
    /// By "agent/source".
    #[serde(default)]
    pub sources: BTreeMap<String, SourceState>,
    pub last_run: Option<RunRecord>,
    /// Unix seconds of the last structural check, and whether it was clean.
    pub last_check: Option<i64>,
    pub last_check_clean: Option<bool>,
    /// Unix seconds each verification slice was last read in full (0: never).
    #[serde(default)]
    pub verify_slices: Vec<i64>,
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// The state in `dir`, or an empty one before the first run.
    pub fn load(dir: &Path) -> Result<State> {
        let p = State::path(dir);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is not a magpie state file (move it away to start afresh)", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// Write to a temporary file, then rename: a crash leaves the old state or the new one.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create state_dir {}", dir.display()))?;
        write_atomic(&State::path(dir), &serde_json::to_vec_pretty(self)?)
    }

    /// When the whole repository was last verified: the oldest slice's time, once every slice
    /// has been read.
    pub fn last_full_verification(&self) -> Option<i64> {
        let oldest = *self.verify_slices.iter().min()?;
        (oldest > 0).then_some(oldest)
    }
}

/// Replace `path` with `bytes` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}
