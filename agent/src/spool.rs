//! The spool: where dumps wait, on the agent, until the collector has pulled them.
//!
//! Each Dump call gets its own directory `magpie-dump-<random>` below the configured spool
//! directory, removed when the call ends however it ends (the `SessionDir` guard), and at start
//! for any left by an agent that died. All sessions together stay under `max_bytes`: the dump
//! runner measures the whole spool while a dump grows and stops the dump that crosses it.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

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
            if e.file_name().to_string_lossy().starts_with(PREFIX) {
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
        Ok(SessionDir { id, path })
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

/// One session's directory; removed on drop.
#[derive(Debug)]
pub struct SessionDir {
    pub id: String,
    pub path: PathBuf,
}

impl Drop for SessionDir {
    fn drop(&mut self) {
        remove(&self.path);
    }
}
