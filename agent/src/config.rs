//! `agent.toml`: where to listen, which collectors may connect, which sources to serve.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address to listen on, e.g. "0.0.0.0:7443".
    pub listen: SocketAddr,
    /// Name reported in the handshake (default: the host name).
    pub name: Option<String>,
    pub tls: TlsConfig,
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The agent's certificate (PEM), issued by `collector certs issue agent`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signs collector certificates.
    pub client_ca: PathBuf,
    /// Collectors allowed in: "sha256:<fingerprint>" or "san:<name>". A certificate must be
    /// from the CA *and* match one of these.
    pub allowed_collectors: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    /// Only "path" in this version.
    pub kind: String,
    /// Absolute directories; each appears in the snapshot under its own path.
    pub roots: Vec<PathBuf>,
    /// Globs matched against paths relative to the snapshot root (e.g. "var/www/**/cache").
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Do not descend into other file systems below a root.
    #[serde(default)]
    pub one_file_system: bool,
    /// Restore role: db, blobs, data or config.
    #[serde(default = "default_role")]
    pub role: String,
    /// Category label, e.g. user-source-data.
    #[serde(default)]
    pub category: String,
}

fn default_role() -> String {
    "data".into()
}

/// A source ready to serve.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub kind: String,
    pub role: String,
    pub category: String,
    /// Canonical absolute roots.
    pub roots: Vec<PathBuf>,
    /// The roots, opened once at start (O_PATH): reads resolve beneath these handles, so a
    /// path component swapped for a symlink later cannot move a root.
    pub root_dirs: Vec<std::os::fd::OwnedFd>,
    pub exclude: GlobSet,
    pub one_file_system: bool,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read agent config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("agent config {} is invalid", path.display()))
    }

    /// Check everything that can be checked before serving; returns the sources.
    pub fn validate(&self) -> Result<Vec<Source>> {
        for (what, p) in
            [("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key), ("tls.client_ca", &self.tls.client_ca)]
        {
            if !p.is_file() {
                bail!("{what} = {}: no such file", p.display());
            }
        }
        if self.tls.allowed_collectors.is_empty() {
            bail!(
                "tls.allowed_collectors is empty: pin at least one collector (\"sha256:…\" from `collector certs fingerprint`, or \"san:NAME\")"
            );
        }
        for pin in &self.tls.allowed_collectors {
            let ok = match pin.split_once(':') {
                Some(("sha256", hex)) => hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                Some(("san", name)) => !name.is_empty(),
                _ => false,
            };
            if !ok {
                bail!(
                    "tls.allowed_collectors: {pin:?} must be \"sha256:\" and 64 hex digits (`collector certs fingerprint`) or \"san:NAME\""
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut out = Vec::new();
        for s in &self.sources {
            if !names.insert(&s.name) {
                bail!("source {:?} is declared twice", s.name);
            }
            if s.kind != "path" {
                bail!("source {:?}: kind {:?} is not supported by this agent (only \"path\")", s.name, s.kind);
            }
            if !["db", "blobs", "data", "config"].contains(&s.role.as_str()) {
                bail!("source {:?}: role {:?} must be db, blobs, data or config", s.name, s.role);
            }
            if s.roots.is_empty() {
                bail!("source {:?} has no roots", s.name);
            }
            let mut roots = Vec::new();
            for r in &s.roots {
                if !r.is_absolute() {
                    bail!("source {:?}: root {} must be an absolute path", s.name, r.display());
                }
                let c = std::fs::canonicalize(r)
                    .with_context(|| format!("source {:?}: root {} is not accessible", s.name, r.display()))?;
                if !c.is_dir() {
                    bail!("source {:?}: root {} is not a directory", s.name, r.display());
                }
                roots.push(c);
            }
            for (i, a) in roots.iter().enumerate() {
                if let Some(b) = roots.iter().skip(i + 1).find(|b| a.starts_with(b) || b.starts_with(a)) {
                    bail!("source {:?}: roots {} and {} overlap; keep the outer one", s.name, a.display(), b.display());
                }
            }
            let root_dirs = roots
                .iter()
                .map(|r| {
                    rustix::fs::open(
                        r,
                        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
                        rustix::fs::Mode::empty(),
                    )
                    .with_context(|| format!("source {:?}: cannot open root {}", s.name, r.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut gs = GlobSetBuilder::new();
            for g in &s.exclude {
                gs.add(Glob::new(g).with_context(|| format!("source {:?}: bad exclude glob {g:?}", s.name))?);
            }
            out.push(Source {
                name: s.name.clone(),
                kind: s.kind.clone(),
                role: s.role.clone(),
                category: s.category.clone(),
                roots,
                root_dirs,
                exclude: gs.build()?,
                one_file_system: s.one_file_system,
            });
        }
        Ok(out)
    }
}
