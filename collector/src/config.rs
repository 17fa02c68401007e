//! `collector.toml`: the repository, the collector's TLS identity, and the agents to pull.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Where `collector pull` looks by default.
pub const DEFAULT_PATH: &str = "/etc/magpie/collector.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Repository directory.
    pub repository: PathBuf,
    /// File whose first line is the repository passphrase (else MAGPIE_PASSPHRASE or the
    /// systemd credential).
    pub passphrase_file: Option<PathBuf>,
    pub tls: TlsConfig,
    /// Where signatures of stored versions are kept for the next delta (default: systemd's
    /// CacheDirectory, else ~/.cache/magpie).
    pub cache_dir: Option<PathBuf>,
    /// Sources pulled at the same time (each holds its own buffers: about 150 MB).
    #[serde(default = "default_parallel")]
    pub max_parallel: usize,
    /// A dump smaller than this share of the previous dump of the same file fails the pull
    /// (unless `pull --accept-small-dumps`): a truncated dump must not pass for a backup.
    #[serde(default = "default_dump_min_ratio")]
    pub dump_min_ratio: f64,
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentEntry>,
}

fn default_parallel() -> usize {
    2
}

fn default_dump_min_ratio() -> f64 {
    0.5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA that signed the agents' certificates.
    pub ca: PathBuf,
    /// The collector's certificate (`collector certs issue collector NAME`).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// Name used in snapshots, listings and messages.
    pub name: String,
    /// `https://HOST:PORT`.
    pub endpoint: String,
    /// Name to expect in the agent's certificate (default: the endpoint's host).
    pub tls_name: Option<String>,
    /// Sources to pull (default: every source the agent declares).
    #[serde(default)]
    pub sources: Vec<String>,
    /// Compress file content on the wire (default true; turn off over loopback).
    #[serde(default = "yes")]
    pub compress: bool,
    /// Seconds to wait for the connection.
    #[serde(default = "default_timeout")]
    pub connect_timeout_secs: u64,
}

fn yes() -> bool {
    true
}

fn default_timeout() -> u64 {
    20
}

impl CollectorConfig {
    pub fn load(path: &Path) -> Result<CollectorConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read collector config {}", path.display()))?;
        let cfg: CollectorConfig =
            toml::from_str(&text).with_context(|| format!("collector config {} is invalid", path.display()))?;
        let mut names = std::collections::HashSet::new();
        for a in &cfg.agents {
            if !names.insert(&a.name) {
                bail!("{}: agent {:?} is declared twice", path.display(), a.name);
            }
            if !a.endpoint.starts_with("https://") {
                bail!("{}: agent {:?}: endpoint {:?} must start with https://", path.display(), a.name, a.endpoint);
            }
        }
        Ok(cfg)
    }
}
