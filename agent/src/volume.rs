//! Docker volumes as sources: named volumes resolved through the engine to their mountpoints and
//! pulled like a path source, with the containers that mount them held still while the
//! collector copies (`pause` or `stop`), and resumed on every way out.
//!
//! Before a container is paused or stopped it is written to the hold record (a JSON file in the
//! spool directory, fsynced); it leaves the record once resumed. A hold keeps an exclusive
//! `flock` on `held-containers.lock` from before its first pause to after its last resume, so
//! whoever gets that lock knows every entry in the record is a left-over of an agent that died:
//! the agent resumes them at start (unless another agent process, such as a second SSH
//! connection's, holds the lock now) and again before each new hold.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use magpie_proto::v1::{ContainerHold, VolumeInfo};
use serde::{Deserialize, Serialize};

use crate::docker::{Container, Docker, Volume};

/// How a copy keeps a volume still.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Copy as is, containers running.
    Live,
    /// Pause every running container that mounts a volume (frozen, memory kept) during the copy.
    Pause,
    /// Stop them, copy, start them again in the order they were stopped.
    Stop,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "live" => Some(Mode::Live),
            "pause" => Some(Mode::Pause),
            "stop" => Some(Mode::Stop),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::Pause => "pause",
            Mode::Stop => "stop",
        }
    }
}

/// A `kind = "docker-volume"` source.
#[derive(Debug)]
pub struct VolumeSpec {
    pub docker: Docker,
    /// Volume names, or globs over them.
    pub patterns: Vec<String>,
    pub mode: Mode,
}

/// One volume to copy, with its mountpoint checked and the containers that mount it.
#[derive(Debug)]
pub struct Resolved {
    pub volume: Volume,
    pub mountpoint: PathBuf,
    pub containers: Vec<Container>,
}

fn is_glob(p: &str) -> bool {
    p.contains(['*', '?', '['])
}

impl VolumeSpec {
    /// The volumes the patterns name now, each with its containers.
    pub fn resolve(&self) -> Result<Vec<Resolved>> {
        let mut names: Vec<String> = Vec::new();
        let mut all: Option<Vec<Volume>> = None;
        for p in &self.patterns {
            if is_glob(p) {
                let pattern = glob::Pattern::new(p).with_context(|| format!("volume pattern {p:?}"))?;
                let list = match &all {
                    Some(l) => l,
                    None => all.insert(self.docker.volumes()?),
                };
                let before = names.len();
                names.extend(list.iter().filter(|v| pattern.matches(&v.name)).map(|v| v.name.clone()));
                if names.len() == before {
                    bail!("no docker volume matches {p:?} (docker volume ls)");
                }
            } else {
                names.push(p.clone());
            }
        }
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                let volume = self
                    .docker
                    .volume(&name)?
                    .with_context(|| format!("docker volume {name}: no such volume (docker volume ls)"))?;
                let mountpoint = local_mountpoint(&volume)?;
                if !volume.options.is_empty() {
                    // Docker mounts such a volume on its mountpoint only while a container uses
                    // it: stopped (or unused), the copy would read the empty folder beneath.
                    if self.mode == Mode::Stop {
                        bail!(
                            "docker volume {name}: it has driver options and is unmounted when its containers stop; use consistency = \"pause\""
                        );
                    }
                    if !is_mount_point(&mountpoint) {
                        bail!("docker volume {name}: it has driver options and no container has it mounted now; start one, then pull");
                    }
                }
                let containers = self.docker.containers_using(&name)?;
                Ok(Resolved { volume, mountpoint, containers })
            })
            .collect()
    }

    /// Whether `name` is one of the volumes this source declares (restores write only those).
    pub fn declares(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p == name || (is_glob(p) && glob::Pattern::new(p).is_ok_and(|g| g.matches(name))))
    }
}

/// A directory on another device than its parent: something is mounted on it.
fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}

/// The volume's data on this host's file system, or why it is not there.
pub fn local_mountpoint(v: &Volume) -> Result<PathBuf> {
    let off_host = || {
        format!(
            "docker volume {}: driver {:?} keeps its data off this host (no local mountpoint); back it up with the driver's own tools",
            v.name, v.driver
        )
    };
    if v.mountpoint.is_empty() {
        bail!(off_host());
    }
    let p = PathBuf::from(&v.mountpoint);
    match std::fs::canonicalize(&p) {
        Ok(c) if c.is_dir() => Ok(c),
        _ if v.driver != "local" => bail!(off_host()),
        Ok(_) => bail!("docker volume {}: mountpoint {} is not a directory", v.name, p.display()),
        Err(e) => bail!("docker volume {}: mountpoint {}: {e}", v.name, p.display()),
    }
}

/// What the snapshot records of a volume.
pub fn info(r: &Resolved, mode: Mode) -> VolumeInfo {
    VolumeInfo {
        name: r.volume.name.clone(),
        driver: r.volume.driver.clone(),
        labels: r.volume.labels.clone().into_iter().collect(),
        containers: r.containers.iter().map(Container::name).collect(),
        mode: mode.name().into(),
        held: Vec::new(),
    }
}

/// One held container in the record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Recorded {
    socket: PathBuf,
    id: String,
    name: String,
    /// "pause" or "stop": what was done, so the resume is unpause or start.
    action: String,
    since_unix_ms: u64,
}

/// The hold record: containers this agent paused or stopped and has not yet resumed. Read and
/// written only under the hold lock.
#[derive(Debug)]
pub struct HoldRecord {
    path: PathBuf,
    lock_path: PathBuf,
}

impl HoldRecord {
    pub fn new(spool_dir: &Path) -> HoldRecord {
        HoldRecord { path: spool_dir.join("held-containers.json"), lock_path: spool_dir.join("held-containers.lock") }
    }

    /// The hold lock, across every agent process on this spool; None when `wait` is false and
    /// another process holds it.
    fn exclusive(&self, wait: bool) -> Result<Option<OwnedFd>> {
        use rustix::fs::{FlockOperation, Mode, OFlags};
        let fd = rustix::fs::open(
            &self.lock_path,
            OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("hold lock {}", self.lock_path.display()))?;
        let op = if wait { FlockOperation::LockExclusive } else { FlockOperation::NonBlockingLockExclusive };
        match rustix::fs::flock(&fd, op) {
            Ok(()) => Ok(Some(fd)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("hold lock {}", self.lock_path.display())),
        }
    }

    fn read(&self) -> Result<Vec<Recorded>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("hold record {}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("hold record {}", self.path.display())),
        }
    }

    /// Replace the record durably (write a temporary file, fsync, rename); none when empty.
    fn write(&self, all: &[Recorded]) -> Result<()> {
        if all.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("hold record {}", self.path.display()))
                }
                _ => Ok(()),
            };
        }
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("hold record {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(all)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("hold record {}", self.path.display()))?;
        Ok(())
    }

    fn update(&self, f: impl FnOnce(&mut Vec<Recorded>)) -> Result<()> {
        let mut all = self.read()?;
        f(&mut all);
        self.write(&all)
    }

    /// At start: resume every container an agent that died held, then forget them.
    pub fn resume_left_over(&self) -> Result<()> {
        if !self.path.exists() {
            // Nothing recorded (the common case): no lock file made for agents without holds.
            return Ok(());
        }
        match self.exclusive(false)? {
            Some(_lock) => self.resume_recorded(),
            None => {
                tracing::info!("another agent process is holding containers now; it resumes its own");
                Ok(())
            }
        }
    }

    /// Resume what the record names; only under the hold lock, where every entry is a left-over.
    fn resume_recorded(&self) -> Result<()> {
        let left = self.read()?;
        let mut kept = Vec::new();
        for r in left {
            let docker = Docker::new(&r.socket);
            let resumed = docker.state(&r.id).and_then(|state| match (r.action.as_str(), state.as_deref()) {
                (_, None) => Ok("is gone"),
                ("pause", Some("paused")) => docker.act("unpause", &r.id, &r.name).map(|_| "unpaused"),
                ("stop", Some("exited" | "created")) => docker.act("start", &r.id, &r.name).map(|_| "started"),
                _ => Ok("was already running"),
            });
            match resumed {
                Ok(what) => tracing::warn!(
                    "container {} was held ({}) by an agent that stopped before resuming it: {what}",
                    r.name,
                    r.action
                ),
                Err(e) => {
                    tracing::error!("container {} held by an earlier run could not be resumed: {e:#}", r.name);
                    kept.push(r);
                }
            }
        }
        self.write(&kept)
    }
}

/// Containers held for one copy (or restore). Resumed by [`Hold::release`], or when dropped on
/// any other way out.
pub struct Hold<'a> {
    docker: &'a Docker,
    record: &'a HoldRecord,
    held: Vec<(Container, &'static str, Instant)>,
    released: bool,
    /// The hold lock, released (by being dropped) after the resume in `Drop`.
    _lock: Option<OwnedFd>,
}

impl<'a> Hold<'a> {
    /// Hold every running container of `volumes` (each once) as `mode` says. On a failure,
    /// what was already held is resumed before the error returns.
    pub fn take(docker: &'a Docker, record: &'a HoldRecord, mode: Mode, volumes: &[Resolved]) -> Result<Hold<'a>> {
        let action = match mode {
            Mode::Live => return Ok(Hold { docker, record, held: Vec::new(), released: false, _lock: None }),
            Mode::Pause => "pause",
            Mode::Stop => "stop",
        };
        let lock = record.exclusive(true)?;
        // Under the lock nobody else holds anything: what the record names was left by an agent
        // that died (or a resume that failed); resume it before holding anew.
        record.resume_recorded()?;
        let mut hold = Hold { docker, record, held: Vec::new(), released: false, _lock: lock };
        let mut seen = std::collections::HashSet::new();
        for c in volumes.iter().flat_map(|v| &v.containers) {
            if c.state != "running" || !seen.insert(c.id.clone()) {
                continue;
            }
            if mode == Mode::Stop && docker.auto_remove(&c.id)? {
                bail!(
                    "container {} was started with --rm: Docker would delete it when stopped, so it could not be started again; use consistency = \"pause\"",
                    c.name()
                );
            }
            let since_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
            let entry = Recorded {
                socket: docker.socket.clone(),
                id: c.id.clone(),
                name: c.name(),
                action: action.into(),
                since_unix_ms,
            };
            // Recorded first: an agent that dies right after the call still knows to resume it.
            record.update(|all| all.push(entry))?;
            let started = Instant::now();
            if let Err(e) = docker.act(action, &c.id, &c.name()) {
                // A call that timed out or lost its connection may still have taken effect.
                let now = docker.state(&c.id).ok().flatten();
                let took = matches!((action, now.as_deref()), ("pause", Some("paused")) | ("stop", Some("exited")));
                if took {
                    hold.held.push((c.clone(), action, started));
                } else {
                    let _ = record.update(|all| all.retain(|r| r.id != c.id));
                }
                return Err(e); // `hold` drops here and resumes what it holds
            }
            tracing::info!("container {} {}", c.name(), if action == "stop" { "stopped" } else { "paused" });
            hold.held.push((c.clone(), action, started));
        }
        Ok(hold)
    }

    /// Resume the held containers in the order they were held; returns how long each was held
    /// and what could not be resumed.
    pub fn release(mut self) -> (Vec<ContainerHold>, Vec<String>) {
        self.resume()
    }

    fn resume(&mut self) -> (Vec<ContainerHold>, Vec<String>) {
        self.released = true;
        let mut holds = Vec::new();
        let mut warnings = Vec::new();
        for (c, action, since) in std::mem::take(&mut self.held) {
            let undo = if action == "pause" { "unpause" } else { "start" };
            let held_ms = since.elapsed().as_millis() as u64;
            match self.docker.act(undo, &c.id, &c.name()) {
                Ok(()) => {
                    let done = if undo == "start" { "started" } else { "unpaused" };
                    tracing::info!("container {} {done} after {:.1}s held", c.name(), held_ms as f64 / 1000.0);
                    if let Err(e) = self.record.update(|all| all.retain(|r| r.id != c.id)) {
                        warnings.push(format!("{e:#}"));
                    }
                }
                Err(e) => {
                    // Left in the record: the next start of the agent tries again.
                    tracing::error!("container {} could not be resumed: {e:#}", c.name());
                    warnings.push(format!("container {} could not be resumed ({undo}): {e:#}", c.name()));
                }
            }
            holds.push(ContainerHold { name: c.name(), action: action.into(), held_ms });
        }
        (holds, warnings)
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if !self.released {
            self.resume();
        }
    }
}

/// The volumes a restore writes: each recorded one, made with its recorded driver and labels
/// when missing. Returns the volumes with their containers, and notes of what was created.
pub fn prepare_restore(spec: &VolumeSpec, volumes: &[VolumeInfo]) -> Result<(Vec<Resolved>, Vec<String>)> {
    let docker = &spec.docker;
    let mut out = Vec::new();
    let mut notes = Vec::new();
    if let Some(v) = volumes.iter().find(|v| !spec.declares(&v.name)) {
        bail!("docker volume {} is not one this source declares (agent.toml `volume`); refused", v.name);
    }
    for v in volumes {
        let volume = match docker.volume(&v.name)? {
            Some(existing) => existing,
            None => {
                let labels: BTreeMap<String, String> = v.labels.clone().into_iter().collect();
                let made = docker.create_volume(&v.name, &v.driver, &labels)?;
                notes.push(format!("volume {} created (driver {}, {} labels)", v.name, v.driver, labels.len()));
                made
            }
        };
        let mountpoint = local_mountpoint(&volume)?;
        let containers = docker.containers_using(&v.name)?;
        out.push(Resolved { volume, mountpoint, containers });
    }
    Ok((out, notes))
}

/// How long a hold may last before the agent ends it by itself (a collector gone silent).
pub const MAX_HOLD: Duration = Duration::from_secs(6 * 3600);
