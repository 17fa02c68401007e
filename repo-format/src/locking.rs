//! Repository locks.
//!
//! | held \ wanted | shared (backup, check, restore) | exclusive (prune, compact, repair) |
//! |---|---|---|
//! | shared    | both proceed: writers only add objects | refused (or waits with `--lock-wait`) |
//! | exclusive | refused | refused |
//!
//! Taking a lock: write our lock object, then list all locks; on a conflict with a live lock,
//! remove ours and refuse. Two contenders that race both see each other and both back off, which
//! is safe; neither can miss the other, because each writes before it lists. Only create, list
//! and delete are used, so the protocol holds on object storage without rename.
//!
//! A lock is *stale* when its holder ran on this host and that process is gone (pid and start
//! time no longer match), or when it was not refreshed for [`STALE_AFTER`] seconds. Stale locks
//! of dead processes on this host are removed on sight; others are ignored in conflict checks
//! and reported, with `collector unlock` to remove them.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use prost::Message;

use crate::backend::Backend;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::magic::{self, Domain};
use crate::repofile::LOCK_DIR;
use crate::repofile::lock::LockFile;
use crate::repository::{Repository, hostname, put_named};

/// A lock not refreshed for this long (seconds) is stale.
pub const STALE_AFTER: i64 = 30 * 60;
/// Live locks are refreshed this often.
const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);

/// A lock found in the repository.
#[derive(Clone, Debug)]
pub struct LockInfo {
    /// Storage name.
    pub name: String,
    /// Content, when readable.
    pub lock: Option<LockFile>,
    /// Whether it is stale.
    pub stale: bool,
}

impl LockInfo {
    /// One line naming the holder.
    pub fn describe(&self) -> String {
        match &self.lock {
            None => format!("an unreadable lock {}", self.name),
            Some(l) => format!(
                "{} lock of `{}` (pid {} on {}, since {})",
                if l.exclusive { "an exclusive" } else { "a shared" },
                l.command,
                l.pid,
                l.host,
                chrono::DateTime::from_timestamp(l.created_unix, 0).map(|t| t.to_rfc3339()).unwrap_or_default()
            ),
        }
    }
}

/// Start time of a process in clock ticks since boot, from `/proc/PID/stat`.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// The kernel boot id, which changes at every boot.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The pid namespace of this process: pids only mean the same process within one.
fn pid_namespace() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|l| l.to_str()?.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok())
        .unwrap_or(0)
}

/// Stale: a process of this very kernel and pid namespace that is gone, or a lock nobody
/// refreshed for [`STALE_AFTER`]. A holder we cannot see for sure (another machine with the same
/// host name, another pid namespace, `/proc` hidden) is judged by age only.
fn is_stale(l: &LockFile, now: i64, me: &LockFile) -> bool {
    let same_process_space = l.host == me.host
        && !l.boot_id.is_empty()
        && l.boot_id == me.boot_id
        && l.pid_namespace != 0
        && l.pid_namespace == me.pid_namespace
        && l.process_start != 0
        && me.process_start != 0;
    if same_process_space && process_start(l.pid) != Some(l.process_start) {
        return true;
    }
    now - l.refreshed_unix > STALE_AFTER
}

/// Every lock in the repository.
pub fn list_locks(backend: &dyn Backend, keys: &Keys) -> Result<Vec<LockInfo>> {
    let now = chrono::Utc::now().timestamp();
    let me = new_lock(false, "");
    let mut out = Vec::new();
    for o in backend.list(LOCK_DIR)? {
        let lock = match backend.get(&o.name, None) {
            Ok(b) => keys.open(Domain::Lock, &b).and_then(|p| LockFile::decode(p.as_slice()).ok()),
            // Removed since the listing.
            Err(crate::backend::BackendError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let stale = lock.as_ref().is_some_and(|l| is_stale(l, now, &me));
        out.push(LockInfo { name: o.name, lock, stale });
    }
    Ok(out)
}

/// Remove stale locks (or all, with `all`); returns what was removed.
pub fn unlock(repo: &Repository, all: bool) -> Result<Vec<LockInfo>> {
    let mut removed = Vec::new();
    for l in list_locks(&**repo.backend(), repo.keys())? {
        if all || l.stale {
            repo.backend().delete(&l.name)?;
            removed.push(l);
        }
    }
    Ok(removed)
}

struct Held {
    name: Mutex<String>,
    lost: std::sync::atomic::AtomicBool,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// A lock held until dropped; refreshed in the background.
pub struct LockGuard {
    backend: Arc<dyn Backend>,
    held: Arc<Held>,
    refresher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockGuard({})", self.held.name.lock().map(|n| n.clone()).unwrap_or_default())
    }
}

impl LockGuard {
    /// Fails if a refresh failed: others may then take the lock as stale, so a commit or a
    /// deletion must not go ahead under it.
    pub fn ensure_held(&self) -> Result<()> {
        if self.held.lost.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Locked {
                holder: "nobody: our own lock could not be refreshed".into(),
                advice: "check the repository's storage and run the command again".into(),
            });
        }
        Ok(())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        *self.held.stop.lock().expect("lock state") = true;
        self.held.wake.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let name = self.held.name.lock().expect("lock state").clone();
        if let Err(e) = self.backend.delete(&name) {
            tracing::warn!("could not remove lock {name}: {e}");
        }
    }
}

/// Take a lock, retrying for up to `wait` while another holder conflicts.
pub fn lock(repo: &Repository, exclusive: bool, command: &str, wait: Duration) -> Result<LockGuard> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match try_lock(repo, exclusive, command) {
            Err(Error::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn new_lock(exclusive: bool, command: &str) -> LockFile {
    let pid = std::process::id();
    let now = chrono::Utc::now().timestamp();
    LockFile {
        version: magic::METADATA_VERSION,
        exclusive,
        host: hostname(),
        pid,
        process_start: process_start(pid).unwrap_or(0),
        command: command.into(),
        created_unix: now,
        refreshed_unix: now,
        nonce: Id::random().0[..16].to_vec(),
        boot_id: boot_id(),
        pid_namespace: pid_namespace(),
    }
}

fn write_lock(backend: &dyn Backend, keys: &Keys, l: &LockFile) -> Result<String> {
    let id: Id = put_named(backend, LOCK_DIR, &keys.seal(Domain::Lock, &l.encode_to_vec()))?;
    Ok(format!("{LOCK_DIR}{id}"))
}

fn try_lock(repo: &Repository, exclusive: bool, command: &str) -> Result<LockGuard> {
    let backend = repo.backend().clone();
    let keys = repo.keys().clone();
    let mine = new_lock(exclusive, command);
    let name = write_lock(&*backend, &keys, &mine)?;
    let conflict = (|| -> Result<Option<LockInfo>> {
        for other in list_locks(&*backend, &keys)? {
            if other.name == name {
                continue;
            }
            if other.stale {
                let ours = other.lock.as_ref().is_some_and(|l| {
                    l.host == mine.host && l.boot_id == mine.boot_id && l.pid_namespace == mine.pid_namespace
                });
                if ours {
                    tracing::info!("removing stale lock of a process that is gone: {}", other.describe());
                    backend.delete(&other.name)?;
                }
                continue;
            }
            let theirs_exclusive = other.lock.as_ref().is_none_or(|l| l.exclusive);
            if exclusive || theirs_exclusive {
                return Ok(Some(other));
            }
        }
        Ok(None)
    })();
    match conflict {
        Ok(None) => {}
        Ok(Some(other)) => {
            backend.delete(&name)?;
            return Err(Error::Locked {
                holder: other.describe(),
                advice: "wait for it to finish; if that process is gone, run `collector unlock`".into(),
            });
        }
        Err(e) => {
            let _ = backend.delete(&name);
            return Err(e);
        }
    }
    let held = Arc::new(Held {
        name: Mutex::new(name),
        lost: Default::default(),
        stop: Mutex::new(false),
        wake: Condvar::new(),
    });
    let refresher = {
        let (backend, held, keys) = (backend.clone(), held.clone(), keys.clone());
        std::thread::spawn(move || refresh_loop(&*backend, &keys, &held, mine))
    };
    Ok(LockGuard { backend, held, refresher: Some(refresher) })
}

fn refresh_loop(backend: &dyn Backend, keys: &Keys, held: &Held, mut lock: LockFile) {
    let mut stop = held.stop.lock().expect("lock state");
    loop {
        let deadline = std::time::Instant::now() + REFRESH_EVERY;
        while !*stop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            stop = held.wake.wait_timeout(stop, left).expect("lock state").0;
        }
        if *stop {
            return;
        }
        lock.refreshed_unix = chrono::Utc::now().timestamp();
        match write_lock(backend, keys, &lock) {
            Ok(new) => {
                let old = std::mem::replace(&mut *held.name.lock().expect("lock state"), new);
                if let Err(e) = backend.delete(&old) {
                    tracing::warn!("could not remove old lock {old}: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("could not refresh the repository lock: {e}");
                held.lost.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
}
