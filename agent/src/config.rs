//! `agent.toml`: where to listen, which collectors may connect, which sources to serve.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address to listen on, e.g. "0.0.0.0:7443" (not needed to serve over SSH with --stdio).
    pub listen: Option<SocketAddr>,
    /// Name reported in the handshake (default: the host name).
    pub name: Option<String>,
    /// Mutual TLS (not needed to serve over SSH with --stdio, where SSH authenticates).
    pub tls: Option<TlsConfig>,
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Accept restores from the collector (off by default: a compromised backup host must not
    /// be able to write to this server unless the operator chose so).
    #[serde(default)]
    pub allow_restore: bool,
}

/// Where dumps wait to be pulled.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// A directory only the agent can read (made 0700 when missing).
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    /// The most all dumps in flight may occupy together: "20G", "500M" or a number of bytes.
    #[serde(default = "default_spool_max")]
    pub max_bytes: ByteSize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig { dir: default_spool_dir(), max_bytes: default_spool_max() }
    }
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from("/var/lib/magpie-agent/spool")
}

fn default_spool_max() -> ByteSize {
    ByteSize(100 << 30)
}

/// A size in bytes, written as a number or with a K, M, G or T suffix (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s).map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!("{s:?} is not a size (e.g. \"20G\", \"500M\" or a number of bytes)"))
            }),
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
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

/// One `[[source]]`: the fields of every kind side by side; `validate` refuses a field that
/// does not belong to the source's kind, so a misplaced setting is never silently ignored.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    /// path, postgres, mariadb, sqlite, redis or command.
    pub kind: String,
    /// Restore role: db, blobs, data or config (default: data for paths, db for dumps).
    pub role: Option<String>,
    /// Category label, e.g. user-source-data.
    #[serde(default)]
    pub category: String,

    // kind = "path"
    /// Absolute directories; each appears in the snapshot under its own path.
    pub roots: Option<Vec<PathBuf>>,
    /// Globs matched against paths relative to the snapshot root (e.g. "var/www/**/cache").
    pub exclude: Option<Vec<String>>,
    /// Do not descend into other file systems below a root.
    pub one_file_system: Option<bool>,

    // Database servers (postgres, mariadb, redis)
    /// Host name, or for PostgreSQL a socket directory.
    pub host: Option<String>,
    pub port: Option<u16>,
    /// MariaDB: the server's socket file.
    pub socket: Option<PathBuf>,
    pub user: Option<String>,
    /// A file whose first line is the password (never put the password itself here).
    pub password_file: Option<PathBuf>,
    /// postgres, mariadb: "*" (every user database, found at each dump) or a list of names.
    pub databases: Option<Databases>,
    /// postgres: the cluster's roles and tablespaces (`pg_dumpall --globals-only`); default true.
    pub globals: Option<bool>,
    /// postgres: the directory of pg_dump, pg_dumpall and psql (default: from PATH).
    pub bin_dir: Option<PathBuf>,
    /// postgres, mariadb: "exact" (count every table) or "estimate" (the server's statistics).
    pub row_counts: Option<String>,

    // kind = "sqlite"
    /// A database file, or a glob giving one dump per match ("/pds/actors/*/store.sqlite").
    pub path: Option<String>,

    // kind = "command"
    /// The program and its arguments; its standard output is the dump.
    pub command: Option<Vec<String>>,
    /// Name of the dump file in the snapshot (default: SOURCE.dump).
    pub filename: Option<String>,

    // Restores
    /// Write restored files (or SQLite databases) below this directory instead of their
    /// original places.
    pub restore_root: Option<PathBuf>,
    /// postgres, mariadb, sqlite: SQL run in each restored database after the built-in checks;
    /// each must answer true (or 1).
    pub check: Option<Vec<String>>,
    /// redis: where the server reads its RDB at start (a restore places the file there between
    /// the `before` and `after` hooks, which stop and start the server).
    pub rdb_path: Option<PathBuf>,
    /// command: a command that loads the dump from its standard input.
    pub restore_command: Option<Vec<String>>,

    // kind = "docker-volume"
    /// A volume name, a list of them, or globs over volume names ("pds-*").
    pub volume: Option<Names>,
    /// live (copy as is), pause (pause the containers that mount the volume during the copy) or
    /// stop (stop them, copy, start them again).
    pub consistency: Option<String>,
    /// The Docker Engine's socket (default /var/run/docker.sock).
    pub docker_socket: Option<PathBuf>,

    // Every dump kind
    /// Run before the dump (e.g. stop a service for a cold copy).
    pub before: Option<Vec<String>>,
    /// Run after the dump, also when it failed.
    pub after: Option<Vec<String>>,
    /// Limit for each hook, seconds (default 300).
    pub hook_timeout_secs: Option<u64>,
    /// Limit for the whole dump, seconds (default 21600).
    pub timeout_secs: Option<u64>,
}

/// One name or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Names {
    One(String),
    Many(Vec<String>),
}

/// `databases = "*"` or `databases = ["a", "b"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Databases {
    All(String),
    Named(Vec<String>),
}

/// A source ready to serve.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub kind: String,
    pub role: String,
    pub category: String,
    pub roots: Vec<Root>,
    pub exclude: GlobSet,
    pub one_file_system: bool,
    /// For a dump source: how to take its dumps (its files are then served from a spool).
    pub dump: Option<crate::dump::DumpSpec>,
    /// For a docker-volume source: which volumes, and how they are held still.
    pub volume: Option<crate::volume::VolumeSpec>,
    /// Where restores write instead of the original places.
    pub restore_root: Option<PathBuf>,
}

/// One root of a source.
#[derive(Debug)]
pub struct Root {
    /// Absolute and free of symlinks (canonical at start).
    pub path: PathBuf,
    /// Where it appears in the listing: its path without the leading '/' for a path source
    /// ("var/www"), empty for a dump spool (its files at the top).
    pub rel: Vec<u8>,
}

impl Root {
    /// A handle on the root, opened through no symlink: a path component swapped for a symlink
    /// cannot move a root, and a root deleted and made again is the new one.
    pub fn open(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use rustix::fs::{CWD, Mode, OFlags, ResolveFlags};
        rustix::fs::openat2(
            CWD,
            &self.path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| std::io::Error::new(std::io::Error::from(e).kind(), format!("root {}: {e}", self.path.display())))
    }
}

impl Source {
    /// A directory served as the top of a listing (a dump session's spool).
    pub fn spool(name: &str, dir: &Path) -> Result<Source> {
        Ok(Source {
            name: name.to_string(),
            kind: "spool".into(),
            role: String::new(),
            category: String::new(),
            roots: vec![Root { path: dir.to_path_buf(), rel: Vec::new() }],
            exclude: GlobSet::empty(),
            one_file_system: true,
            dump: None,
            volume: None,
            restore_root: None,
        })
    }

    /// A session over Docker volumes: each volume's mountpoint at the top, under its name.
    pub fn volumes(name: &str, volumes: &[crate::volume::Resolved]) -> Source {
        Source {
            name: name.to_string(),
            kind: "docker-volume".into(),
            role: String::new(),
            category: String::new(),
            roots: volumes
                .iter()
                .map(|v| Root { path: v.mountpoint.clone(), rel: v.volume.name.as_bytes().to_vec() })
                .collect(),
            exclude: GlobSet::empty(),
            one_file_system: true,
            dump: None,
            volume: None,
            restore_root: None,
        }
    }

    /// Read through a session (Dump first): dump sources and docker volumes.
    pub fn needs_session(&self) -> bool {
        self.dump.is_some() || self.volume.is_some()
    }
}

fn restore_root(s: &SourceConfig) -> Result<Option<PathBuf>> {
    match &s.restore_root {
        Some(r) if !r.is_absolute() => bail!("source {:?}: restore_root {} must be absolute", s.name, r.display()),
        r => Ok(r.clone()),
    }
}

/// Absolute with no `.` or `..` component.
fn normal(p: &Path) -> bool {
    p.is_absolute()
        && p.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)))
}

/// Which optional settings each kind takes.
const PATH_FIELDS: &[&str] = &["roots", "exclude", "one_file_system", "restore_root"];
const HOOK_FIELDS: &[&str] = &["before", "after", "hook_timeout_secs", "timeout_secs"];
const SERVER_FIELDS: &[&str] = &["host", "port", "user", "password_file"];

fn allowed_fields(kind: &str) -> Option<Vec<&'static str>> {
    let mut f: Vec<&str> = match kind {
        "path" => return Some(PATH_FIELDS.to_vec()),
        "postgres" => [SERVER_FIELDS, &["databases", "globals", "bin_dir", "row_counts", "check"]].concat(),
        "mariadb" => [SERVER_FIELDS, &["socket", "databases", "row_counts", "check"]].concat(),
        "redis" => [SERVER_FIELDS, &["socket", "rdb_path"]].concat(),
        "sqlite" => vec!["path", "check", "restore_root"],
        "command" => vec!["command", "filename", "restore_command"],
        "docker-volume" => return Some(vec!["volume", "consistency", "docker_socket"]),
        _ => return None,
    };
    f.extend_from_slice(HOOK_FIELDS);
    Some(f)
}

impl SourceConfig {
    /// The optional settings this source gives.
    fn given(&self) -> Vec<&'static str> {
        let flags = [
            ("roots", self.roots.is_some()),
            ("exclude", self.exclude.is_some()),
            ("one_file_system", self.one_file_system.is_some()),
            ("host", self.host.is_some()),
            ("port", self.port.is_some()),
            ("socket", self.socket.is_some()),
            ("user", self.user.is_some()),
            ("password_file", self.password_file.is_some()),
            ("databases", self.databases.is_some()),
            ("globals", self.globals.is_some()),
            ("bin_dir", self.bin_dir.is_some()),
            ("row_counts", self.row_counts.is_some()),
            ("path", self.path.is_some()),
            ("command", self.command.is_some()),
            ("filename", self.filename.is_some()),
            ("before", self.before.is_some()),
            ("after", self.after.is_some()),
            ("hook_timeout_secs", self.hook_timeout_secs.is_some()),
            ("timeout_secs", self.timeout_secs.is_some()),
            ("restore_root", self.restore_root.is_some()),
            ("check", self.check.is_some()),
            ("rdb_path", self.rdb_path.is_some()),
            ("restore_command", self.restore_command.is_some()),
            ("volume", self.volume.is_some()),
            ("consistency", self.consistency.is_some()),
            ("docker_socket", self.docker_socket.is_some()),
        ];
        flags.into_iter().filter(|(_, on)| *on).map(|(n, _)| n).collect()
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read agent config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("agent config {} is invalid", path.display()))
    }

    /// Check everything that can be checked before serving; returns the sources.
    pub fn validate(&self) -> Result<Vec<Source>> {
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        self.validate_sources()
    }

    /// `listen` and `[tls]`, which serving over the network needs.
    pub fn network(&self) -> Result<(SocketAddr, &TlsConfig)> {
        match (self.listen, &self.tls) {
            (Some(l), Some(t)) => Ok((l, t)),
            _ => bail!("`listen` and `[tls]` are needed to serve over the network (over SSH: agent serve --stdio)"),
        }
    }
}

impl TlsConfig {
    fn validate(&self) -> Result<()> {
        for (what, p) in [("tls.cert", &self.cert), ("tls.key", &self.key), ("tls.client_ca", &self.client_ca)] {
            if !p.is_file() {
                bail!("{what} = {}: no such file", p.display());
            }
        }
        if self.allowed_collectors.is_empty() {
            bail!(
                "tls.allowed_collectors is empty: pin at least one collector (\"sha256:…\" from `collector certs fingerprint`, or \"san:NAME\")"
            );
        }
        for pin in &self.allowed_collectors {
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
        Ok(())
    }
}

impl AgentConfig {
    fn validate_sources(&self) -> Result<Vec<Source>> {
        let mut names = std::collections::HashSet::new();
        let mut out = Vec::new();
        for s in &self.sources {
            if !names.insert(&s.name) {
                bail!("source {:?} is declared twice", s.name);
            }
            let Some(allowed) = allowed_fields(&s.kind) else {
                bail!(
                    "source {:?}: kind {:?} is unknown (path, postgres, mariadb, sqlite, redis, command or docker-volume)",
                    s.name,
                    s.kind
                );
            };
            if let Some(f) = s.given().into_iter().find(|f| !allowed.contains(f)) {
                bail!("source {:?}: `{f}` does not apply to kind {:?}", s.name, s.kind);
            }
            let role = s.role.clone().unwrap_or_else(|| {
                if matches!(s.kind.as_str(), "path" | "docker-volume") { "data" } else { "db" }.into()
            });
            if !["db", "blobs", "data", "config"].contains(&role.as_str()) {
                bail!("source {:?}: role {role:?} must be db, blobs, data or config", s.name);
            }
            if s.kind != "path" {
                // Read through a session: a database's dumps, or Docker volumes held still.
                let (dump, volume) = match s.kind.as_str() {
                    "docker-volume" => (None, Some(volume_spec(s)?)),
                    _ => (Some(crate::dump::DumpSpec::from_config(s)?), None),
                };
                out.push(Source {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                    role,
                    category: s.category.clone(),
                    roots: Vec::new(),
                    exclude: GlobSet::empty(),
                    one_file_system: true,
                    dump,
                    volume,
                    restore_root: restore_root(s)?,
                });
                continue;
            }
            let roots_given = s.roots.clone().unwrap_or_default();
            if roots_given.is_empty() {
                bail!("source {:?} has no roots", s.name);
            }
            let mut roots = Vec::new();
            for r in &roots_given {
                if !r.is_absolute() {
                    bail!("source {:?}: root {} must be an absolute path", s.name, r.display());
                }
                let c = match std::fs::canonicalize(r) {
                    Ok(c) if c.is_dir() => c,
                    Ok(_) => bail!("source {:?}: root {} is not a directory", s.name, r.display()),
                    // Gone (the server is being rebuilt): a restore can bring it back; pulls fail
                    // until then.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && normal(r) => {
                        tracing::warn!("source {:?}: root {} does not exist", s.name, r.display());
                        r.clone()
                    }
                    Err(e) => bail!("source {:?}: root {} is not accessible: {e}", s.name, r.display()),
                };
                roots.push(c);
            }
            for (i, a) in roots.iter().enumerate() {
                if let Some(b) = roots.iter().skip(i + 1).find(|b| a.starts_with(b) || b.starts_with(a)) {
                    bail!("source {:?}: roots {} and {} overlap; keep the outer one", s.name, a.display(), b.display());
                }
            }
            let mut gs = GlobSetBuilder::new();
            for g in s.exclude.iter().flatten() {
                gs.add(Glob::new(g).with_context(|| format!("source {:?}: bad exclude glob {g:?}", s.name))?);
            }
            out.push(Source {
                name: s.name.clone(),
                kind: s.kind.clone(),
                role,
                category: s.category.clone(),
                roots: roots
                    .into_iter()
                    .map(|path| Root { rel: crate::source::root_rel(&path).to_vec(), path })
                    .collect(),
                exclude: gs.build()?,
                one_file_system: s.one_file_system.unwrap_or(false),
                dump: None,
                volume: None,
                restore_root: restore_root(s)?,
            });
        }
        Ok(out)
    }
}

fn volume_spec(s: &SourceConfig) -> Result<crate::volume::VolumeSpec> {
    let patterns = match &s.volume {
        Some(Names::One(n)) => vec![n.clone()],
        Some(Names::Many(list)) => list.clone(),
        None => bail!("source {:?}: kind docker-volume needs `volume` (a name, a list, or a glob)", s.name),
    };
    if patterns.is_empty() {
        bail!("source {:?}: volume is an empty list", s.name);
    }
    for p in &patterns {
        // Docker's own rule for volume names, with glob characters allowed.
        let ok = !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "_.-*?[]".contains(c))
            && glob::Pattern::new(p).is_ok();
        if !ok {
            bail!("source {:?}: volume {p:?} is not a volume name or a glob over names", s.name);
        }
    }
    let mode = match s.consistency.as_deref() {
        Some(m) => crate::volume::Mode::parse(m).ok_or_else(|| {
            anyhow::anyhow!("source {:?}: consistency = {m:?} must be \"live\", \"pause\" or \"stop\"", s.name)
        })?,
        None => bail!(
            "source {:?}: kind docker-volume needs consistency = \"live\", \"pause\" or \"stop\" (what happens to the containers using the volume during the copy)",
            s.name
        ),
    };
    let socket = s.docker_socket.clone().unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"));
    if !socket.is_absolute() {
        bail!("source {:?}: docker_socket {} must be absolute", s.name, socket.display());
    }
    Ok(crate::volume::VolumeSpec { docker: crate::docker::Docker::new(&socket), patterns, mode })
}
