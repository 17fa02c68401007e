//! The spool: where dumps wait, on the agent, until the collector has pulled them.
//!
//! Each Dump call gets its own directory `magpie-dump-<random>` below the configured spool
//! directory, removed when the call ends however it ends (the `SessionDir` guard), and at start
//! for any left by an agent that died. A session holds a `flock` on its directory while it lives,
//! so the start of another agent process on the same spool (a second SSH connection's) leaves it
//! alone. All sessions together stay under `max_bytes`: the dump
//! runner measures the whole spool while a dump grows and stops the dump that crosses it.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::fs::{FlockOperation, Mode, OFlags};
use std::os::fd::OwnedFd;

const PREFIX: &str = "magpie-dump-";

#[derive(Debug)]
pub struct Spool {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

impl Spool {
    /// Create the spool directory (0700) when missing and remove sessions a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool> {
        if !dir.is_absolute() {
            bail!("spool.dir = {}: must be an absolute path", dir.display());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("spool.dir = {}: cannot create it", dir.display()))?;
        // Dumps hold whole databases, and the agent removes what it finds here: only a directory
        // of its own that nobody else can enter will do.
        let m = fs::symlink_metadata(dir).with_context(|| format!("spool.dir = {}", dir.display()))?;
        let me = rustix::process::geteuid().as_raw();
        if !m.is_dir() || m.uid() != me || m.mode() & 0o077 != 0 {
            bail!(
                "spool.dir = {}: must be a directory (not a symlink) owned by the agent's user (uid {me}) with mode 0700",
                dir.display()
            );
        }
        let spool = Spool { dir: dir.to_path_buf(), max_bytes };
        for e in fs::read_dir(dir).with_context(|| format!("spool.dir = {}: cannot read it", dir.display()))? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with(PREFIX) && !in_use(&e.path()) {
                tracing::info!("removing a dump spool left by an earlier run: {}", e.path().display());
                remove(&e.path());
            }
        }
        Ok(spool)
    }

    /// A new, empty session directory.
    pub fn session(&self) -> Result<SessionDir> {
        let id = session_id()?;
        let path = self.dir.join(format!("{PREFIX}{id}"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create a dump spool in {}", self.dir.display()))?;
        let lock = lock_dir(&path, FlockOperation::LockExclusive)
            .with_context(|| format!("cannot lock the dump spool {}", path.display()))?;
        Ok(SessionDir { id, path, _lock: lock })
    }

    /// Bytes the spool holds now (allocated blocks, so sparse files count as what they cost).
    pub fn usage(&self) -> u64 {
        du(&self.dir)
    }
}

fn du(p: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(p) else { return 0 };
    let own = m.blocks() * 512;
    if !m.is_dir() {
        return own;
    }
    own + fs::read_dir(p).into_iter().flatten().flatten().map(|e| du(&e.path())).sum::<u64>()
}

fn remove(p: &Path) {
    if let Err(e) = fs::remove_dir_all(p)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove dump spool {}: {e}", p.display());
    }
}

/// A new session's name: 12 random bytes in hex (dump spools and volume holds alike).
pub fn session_id() -> Result<String> {
    let mut raw = [0u8; 12];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness for a session name: {e}"))?;
    Ok(hex::encode(raw))
}

fn lock_dir(p: &Path, op: FlockOperation) -> rustix::io::Result<OwnedFd> {
    let fd =
        rustix::fs::open(p, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    rustix::fs::flock(&fd, op)?;
    Ok(fd)
}

/// Whether a live session (of this or another agent process) holds the directory's lock.
fn in_use(p: &Path) -> bool {
    matches!(lock_dir(p, FlockOperation::NonBlockingLockExclusive), Err(rustix::io::Errno::WOULDBLOCK))
}

/// One session's directory, locked while it lives; removed on drop.
#[derive(Debug)]
pub struct SessionDir {
    pub id: String,
    pub path: PathBuf,
    _lock: OwnedFd,
}

impl Drop for SessionDir {
    fn drop(&mut self) {
        remove(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_removes_left_over_sessions_but_not_live_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        let spool = Spool::open(&dir, u64::MAX).unwrap();
        let live = spool.session().unwrap();
        // A session whose agent died: its directory, with no lock on it.
        let dead = dir.join(format!("{PREFIX}dead"));
        fs::create_dir(&dead).unwrap();
        // Another agent process starting on the same spool (a second open takes its own lock).
        Spool::open(&dir, u64::MAX).unwrap();
        assert!(live.path.is_dir(), "a live session was removed");
        assert!(!dead.exists(), "a left-over session was kept");
        let path = live.path.clone();
        drop(live);
        assert!(!path.exists());
    }
}
