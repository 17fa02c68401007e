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
    /// Where `collector run` keeps what `status` reports (last pulls, checks, verification).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// What `collector run` prunes to, for every (agent, source) without its own.
    #[serde(default)]
    pub retention: Option<Retention>,
    #[serde(default)]
    pub run: RunConfig,
    /// Where `collector run` reports failures and warnings.
    pub mail: Option<MailConfig>,
    /// For `repository = "s3://bucket/prefix"`.
    pub s3: Option<S3Settings>,
}

/// An S3-compatible repository's server and credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// For S3-compatible servers, e.g. "https://s3.example.org" or "http://127.0.0.1:9000".
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style requests (most S3-compatible servers); false for virtual-hosted buckets.
    #[serde(default = "yes")]
    pub path_style: bool,
    /// A file with the lines `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…`; without it,
    /// those variables from the environment.
    pub credentials_file: Option<PathBuf>,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings { endpoint: None, region: default_region(), path_style: true, credentials_file: None }
    }
}

fn default_region() -> String {
    "us-east-1".into()
}

impl S3Settings {
    pub fn config(&self, bucket: String, prefix: String) -> Result<repo_format::backend::S3Config> {
        let mut vars: std::collections::HashMap<String, String> = std::env::vars().collect();
        if let Some(f) = &self.credentials_file {
            let text = std::fs::read_to_string(f).with_context(|| format!("s3.credentials_file {}", f.display()))?;
            for line in text.lines() {
                if let Some((k, v)) = line.split_once('=') {
                    vars.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
                }
            }
        }
        let get = |k: &str| {
            vars.get(k)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{k} is not set: give it in s3.credentials_file or the environment"))
        };
        Ok(repo_format::backend::S3Config {
            bucket,
            prefix,
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            access_key_id: get("AWS_ACCESS_KEY_ID")?,
            secret_access_key: get("AWS_SECRET_ACCESS_KEY")?,
        })
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/magpie")
}

/// Retention rules (as `collector prune --keep-*`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep everything newer than this ("2d", "12H").
    pub keep_within: Option<String>,
    #[serde(default)]
    pub keep_last: i32,
    #[serde(default)]
    pub keep_hourly: i32,
    #[serde(default)]
    pub keep_daily: i32,
    #[serde(default)]
    pub keep_weekly: i32,
    #[serde(default)]
    pub keep_monthly: i32,
    #[serde(default)]
    pub keep_yearly: i32,
}

impl Retention {
    /// The rules as a policy; the caller decides what an empty one means.
    pub fn rules(&self) -> Result<repo_format::retention::Policy> {
        let within_secs = self
            .keep_within
            .as_deref()
            .map(repo_format::retention::parse_within)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        Ok(repo_format::retention::Policy {
            within_secs,
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
        })
    }

    /// The rules of a `[retention]` table, which must keep something.
    pub fn policy(&self) -> Result<repo_format::retention::Policy> {
        let p = self.rules().context("retention.keep_within")?;
        if p.is_empty() {
            bail!("retention has no keep_* rule: it would remove every snapshot");
        }
        Ok(p)
    }
}

/// What `collector run` does besides pulling.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// A source whose last good snapshot is older than this is a failure ("36H", "2d").
    #[serde(default = "default_max_age")]
    pub max_age: String,
    /// Repack a pack when more than this percentage of it is garbage.
    #[serde(default = "default_garbage")]
    pub compact_garbage_percent: f64,
    /// Every pack is read and verified again within this many days (a slice per run).
    #[serde(default = "default_verify_days")]
    pub verify_days: u32,
    /// A Prometheus textfile written after every run (for node_exporter).
    pub metrics_file: Option<PathBuf>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            max_age: default_max_age(),
            compact_garbage_percent: default_garbage(),
            verify_days: default_verify_days(),
            metrics_file: None,
        }
    }
}

fn default_max_age() -> String {
    "36H".into()
}

fn default_garbage() -> f64 {
    10.0
}

fn default_verify_days() -> u32 {
    30
}

/// Mail after a run: SMTP (STARTTLS, implicit TLS, or plain on a trusted network) or sendmail.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailConfig {
    pub from: String,
    pub to: Vec<String>,
    /// "host:port" of the SMTP server; without it, `sendmail` is used.
    pub smtp: Option<String>,
    /// starttls (default), tls (implicit, port 465) or none (only on a trusted network).
    #[serde(default = "default_security")]
    pub security: String,
    pub user: Option<String>,
    /// A file whose first line is the SMTP password.
    pub password_file: Option<PathBuf>,
    /// The sendmail program (default /usr/sbin/sendmail).
    pub sendmail: Option<PathBuf>,
    /// Also mail when everything went well.
    #[serde(default)]
    pub on_success: bool,
}

fn default_security() -> String {
    "starttls".into()
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
    /// Compress file content on the wire; read through [`AgentEntry::compress`].
    pub compress: Option<bool>,
    /// Seconds to wait for the connection and the agent's answer to the handshake.
    #[serde(default = "default_timeout")]
    pub connect_timeout_secs: u64,
    /// This agent's retention, instead of the top-level one.
    pub retention: Option<Retention>,
    /// This agent's staleness limit, instead of `run.max_age`.
    pub max_age: Option<String>,
    /// ssh:// endpoints: the private key (default: ssh's own choice).
    pub ssh_identity: Option<PathBuf>,
    /// ssh:// endpoints: the known_hosts file holding the agent's host key (default: ssh's).
    pub ssh_known_hosts: Option<PathBuf>,
    /// ssh:// endpoints: the command to run (the authorized_keys entry may fix it anyway).
    pub ssh_command: Option<String>,
}

fn yes() -> bool {
    true
}

impl AgentEntry {
    /// Whether file content travels compressed: as configured, else on unless the endpoint is
    /// this host. Over loopback there is no link to spare, and the agent's compressing and the
    /// collector's decompressing take CPU from the same machine (on 2 cores, 4 of a 2 GB pull's
    /// 33 CPU-seconds; see tests/bench).
    pub fn compress(&self) -> bool {
        self.compress.unwrap_or_else(|| !self.is_on_this_host())
    }

    /// Whether the endpoint's host is `localhost` or a loopback address.
    fn is_on_this_host(&self) -> bool {
        let Ok(uri) = self.endpoint.parse::<tonic::codegen::http::Uri>() else {
            return false;
        };
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
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
        let where_ = |key: &str| format!("{}: {key}", path.display());
        if let Some(r) = &cfg.retention {
            r.policy().with_context(|| where_("[retention]"))?;
        }
        for a in &cfg.agents {
            if let Some(r) = &a.retention {
                r.policy().with_context(|| where_(&format!("agent {:?} retention", a.name)))?;
            }
        }
        for (key, v) in std::iter::once(("run.max_age", &cfg.run.max_age))
            .chain(cfg.agents.iter().filter_map(|a| Some(("agent max_age", a.max_age.as_ref()?))))
        {
            repo_format::retention::parse_within(v)
                .map_err(|e| anyhow::anyhow!("{}: {e} (e.g. \"36H\" or \"2d\")", where_(key)))?;
        }
        if cfg.run.verify_days == 0 {
            bail!("{}: must be at least 1", where_("run.verify_days"));
        }
        if let Some(m) = &cfg.mail {
            if !["starttls", "tls", "none"].contains(&m.security.as_str()) {
                bail!("{}: {:?} must be starttls, tls or none", where_("mail.security"), m.security);
            }
            if m.to.is_empty() {
                bail!("{}: give at least one address", where_("mail.to"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for a in &cfg.agents {
            if !names.insert(&a.name) {
                bail!("{}: agent {:?} is declared twice", path.display(), a.name);
            }
            if !a.endpoint.starts_with("https://") && !a.endpoint.starts_with("ssh://") {
                bail!(
                    "{}: agent {:?}: endpoint {:?} must start with https:// (mutual TLS) or ssh:// (SSH)",
                    path.display(),
                    a.name,
                    a.endpoint
                );
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(endpoint: &str, compress: Option<bool>) -> AgentEntry {
        let toml = format!("name = \"a\"\nendpoint = {endpoint:?}\n");
        let mut a: AgentEntry = toml::from_str(&toml).unwrap();
        a.compress = compress;
        a
    }

    #[test]
    fn the_wire_is_compressed_by_default_unless_the_agent_is_on_this_host() {
        for remote in [
            "https://backup.example.org:7443",
            "https://10.0.0.5:7443",
            "ssh://magpie@db1",
            "https://[2001:db8::1]:7443",
        ] {
            assert!(agent(remote, None).compress(), "{remote}");
        }
        for local in [
            "https://127.0.0.1:7443",
            "https://127.8.0.1:7443",
            "https://[::1]:7443",
            "https://LocalHost:7443/",
            "ssh://magpie@localhost:22",
        ] {
            assert!(!agent(local, None).compress(), "{local}");
        }
        assert!(agent("https://127.0.0.1:7443", Some(true)).compress());
        assert!(!agent("https://backup.example.org:7443", Some(false)).compress());
    }
}
