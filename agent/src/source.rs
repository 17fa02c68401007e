//! Reading a path source, confined to its roots.
//!
//! Listing never follows a symlink (it records it), and reading opens every file with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to its root, so no path the collector
//! sends, and no symlink planted on the server, can make the agent read outside a declared root.
//! Excluded paths are refused on read as they are skipped on listing.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use magpie_proto::v1::{Entry, EntryKind, Xattr};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Statx, StatxFlags};

use crate::config::Source;

/// The snapshot-relative form of an absolute root: "/var/www" → "var/www".
pub fn root_rel(root: &Path) -> &[u8] {
    let b = root.as_os_str().as_bytes();
    b.strip_prefix(b"/").unwrap_or(b)
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(rel.len() + 1 + name.len());
    p.extend_from_slice(rel);
    if !rel.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn excluded(src: &Source, rel: &[u8]) -> bool {
    !src.exclude.is_empty() && src.exclude.is_match(Path::new(std::ffi::OsStr::from_bytes(rel)))
}

/// Excluded itself or below an excluded directory (listing skips the whole subtree).
fn excluded_or_below(src: &Source, rel: &[u8]) -> bool {
    (0..rel.len()).filter(|&i| rel[i] == b'/').any(|i| excluded(src, &rel[..i])) || excluded(src, rel)
}

/// Metadata of one entry as the protocol carries it. `path` reaches the entry itself (its final
/// component is not followed) to read its extended attributes (files and directories only);
/// `link_target` is the target of a symlink.
fn entry(rel: Vec<u8>, m: &Statx, path: &Path, link_target: Vec<u8>) -> Entry {
    let kind = match FileType::from_raw_mode(m.stx_mode.into()) {
        FileType::RegularFile => EntryKind::File,
        FileType::Directory => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        FileType::CharacterDevice => EntryKind::CharDevice,
        FileType::BlockDevice => EntryKind::BlockDevice,
        FileType::Fifo => EntryKind::Fifo,
        _ => EntryKind::Socket,
    };
    let with_xattrs = matches!(kind, EntryKind::File | EntryKind::Dir);
    let mut xattrs: Vec<Xattr> = with_xattrs
        .then(|| xattr::list(path).ok())
        .flatten()
        .into_iter()
        .flatten()
        .filter_map(|n| Some(Xattr { value: xattr::get(path, &n).ok()??, name: n.as_bytes().to_vec() }))
        .collect();
    xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    let time = |t: rustix::fs::StatxTimestamp| nanos(t.tv_sec, t.tv_nsec.into());
    Entry {
        path: rel,
        kind: kind as i32,
        mode: u32::from(m.stx_mode) & 0o7777,
        uid: m.stx_uid,
        gid: m.stx_gid,
        mtime_ns: time(m.stx_mtime),
        ctime_ns: time(m.stx_ctime),
        size: if kind == EntryKind::File { m.stx_size } else { 0 },
        inode: m.stx_ino,
        device: device_of(m),
        nlink: m.stx_nlink,
        link_target,
        rdev: rustix::fs::makedev(m.stx_rdev_major, m.stx_rdev_minor),
        xattrs,
        ..Default::default()
    }
}

fn device_of(m: &Statx) -> u64 {
    rustix::fs::makedev(m.stx_dev_major, m.stx_dev_minor)
}

/// `statx` of `name` in `dir` (or of `dir` itself for an empty name), never following a final
/// symlink and never triggering an automount (`stat` adds that flag itself; `statx` does not, and
/// mounting every autofs point of `/home` or `/net` while listing would be the agent's doing).
fn statx_at(dir: impl std::os::fd::AsFd, name: &[u8]) -> io::Result<Statx> {
    let flags = AtFlags::NO_AUTOMOUNT | if name.is_empty() { AtFlags::EMPTY_PATH } else { AtFlags::SYMLINK_NOFOLLOW };
    Ok(rustix::fs::statx(dir, std::ffi::OsStr::from_bytes(name), flags, StatxFlags::BASIC_STATS)?)
}

fn error_entry(rel: Vec<u8>, e: &io::Error) -> Entry {
    Entry { path: rel, error: e.to_string(), ..Default::default() }
}

/// Every entry of a source. `emit` returns false to stop (the collector went away).
///
/// The walk goes from a handle on each root opened through no symlink, directory handle to directory handle
/// (`openat` with `O_NOFOLLOW`, `statx` relative to the directory's handle): a path component swapped for a
/// symlink while we walk cannot lead the listing outside the root.
pub fn list(src: &Source, emit: &mut dyn FnMut(Entry) -> bool) {
    let mut emitted_parents: HashSet<Vec<u8>> = HashSet::new();
    for root in &src.roots {
        // The root's parents appear as directories so that each root keeps its own path; they are
        // metadata only.
        let rel_root = root.rel.clone();
        let mut prefix = PathBuf::from("/");
        let comps: Vec<&[u8]> = if rel_root.is_empty() { Vec::new() } else { rel_root.split(|&b| b == b'/').collect() };
        for i in 0..comps.len() {
            prefix.push(std::ffi::OsStr::from_bytes(comps[i]));
            let rel = comps[..=i].join(&b'/');
            if !emitted_parents.insert(rel.clone()) {
                continue;
            }
            // The last component is the root itself, which need not be where its name says (a
            // Docker volume is listed under its name, its files come from its mountpoint).
            let at = if i + 1 == comps.len() { &root.path } else { &prefix };
            let e = match statx_at(rustix::fs::CWD, at.as_os_str().as_bytes()) {
                Ok(m) => entry(rel, &m, at, Vec::new()),
                Err(err) => error_entry(rel, &err),
            };
            if !emit(e) {
                return;
            }
        }
        let root_handle = match root.open() {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                if !emit(error_entry(rel_root, &e)) {
                    return;
                }
                continue;
            }
        };
        let root_dev = statx_at(&*root_handle, b"").map(|m| device_of(&m)).unwrap_or(0);
        if !walk(src, root_handle, rel_root, root_dev, emit) {
            return;
        }
    }
}

/// Walker threads: on a cold cache a listing waits on the disk for every inode, and a few
/// requests in flight instead of one shorten that wait.
const WALKERS: usize = 4;

/// Work for a walker.
enum WalkJob {
    /// A directory to read: its parent's handle, its name there, its path in the snapshot.
    Dir(Arc<OwnedFd>, Vec<u8>, Vec<u8>),
    /// A share of a large directory's names to look up: its handle, its path in the snapshot.
    Names(Arc<OwnedFd>, Vec<u8>, Vec<Vec<u8>>),
}

/// Work to do, and how many jobs are being done (the walk is over when both are none).
struct WalkState {
    todo: Vec<WalkJob>,
    reading: usize,
}

/// Names of one directory looked up by one walker, and handed over at once: on a cold cache
/// every lookup may wait on the disk, and a directory of thousands of files looked up by one
/// thread kept the others idle (the last 0.45 s of the bench corpus's 0.9 s listing).
const NAMES_PER_JOB: usize = 256;

/// A job being done. Counted in [`WalkState::reading`] until its walker is done with it or
/// unwinds, so a panicking walker ends the walk (and the panic surfaces) instead of leaving the
/// others waiting for it forever.
struct Reading<'a> {
    state: &'a Mutex<WalkState>,
    changed: &'a Condvar,
    subdirs: Vec<WalkJob>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.todo.extend(self.subdirs.drain(..).rev());
        st.reading -= 1;
        drop(st);
        self.changed.notify_all();
    }
}

/// List everything below a root with [`WALKERS`] threads, handing the entries to `emit` on the
/// calling thread. Returns false when `emit` asked to stop.
fn walk(
    src: &Source,
    root: Arc<OwnedFd>,
    rel_root: Vec<u8>,
    root_dev: u64,
    emit: &mut dyn FnMut(Entry) -> bool,
) -> bool {
    let state = Mutex::new(WalkState { todo: vec![WalkJob::Dir(root, b".".to_vec(), rel_root)], reading: 0 });
    let changed = Condvar::new();
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Entry>>(WALKERS * 2);
    std::thread::scope(|s| {
        for _ in 0..WALKERS {
            let tx = tx.clone();
            let (state, changed, stop) = (&state, &changed, &stop);
            s.spawn(move || {
                while let Some(job) = next_job(state, changed, stop) {
                    let mut reading = Reading { state, changed, subdirs: Vec::new() };
                    let subdirs = match job {
                        WalkJob::Dir(parent, name, rel) => {
                            read_dir(src, &parent, &name, rel, root_dev, &tx, &|shares| {
                                state.lock().expect("walk state").todo.extend(shares);
                                changed.notify_all();
                            })
                        }
                        WalkJob::Names(dir, rel, names) => look_up(src, &dir, &rel, names, root_dev, &tx),
                    };
                    match subdirs {
                        Some(subdirs) => reading.subdirs = subdirs,
                        None => return,
                    }
                }
            });
        }
        drop(tx);
        let whole = rx.iter().flatten().all(emit);
        if !whole {
            stop.store(true, Ordering::Relaxed);
            changed.notify_all();
        }
        // Dropping the receiver ends any walker waiting to hand over entries.
        drop(rx);
        whole
    })
}

/// The next job, counted as being done; None once the walk is over or stopped.
fn next_job(state: &Mutex<WalkState>, changed: &Condvar, stop: &AtomicBool) -> Option<WalkJob> {
    let mut st = state.lock().expect("walk state");
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        // Last in, first out: the walk stays depth first, so few directories hold open handles.
        if let Some(job) = st.todo.pop() {
            st.reading += 1;
            return Some(job);
        }
        if st.reading == 0 {
            return None;
        }
        st = changed.wait(st).expect("walk state");
    }
}

/// Read one directory and look up its names, all but the first [`NAMES_PER_JOB`] of a large one
/// handed to `share` for other walkers (last names first: the walk takes the last job pushed
/// first). Returns its sub-directories to read (in name order), or None when the receiver went
/// away.
fn read_dir(
    src: &Source,
    parent: &OwnedFd,
    name: &[u8],
    rel: Vec<u8>,
    root_dev: u64,
    tx: &SyncSender<Vec<Entry>>,
    share: &dyn Fn(Vec<WalkJob>),
) -> Option<Vec<WalkJob>> {
    let listing = open_dir(parent, name).and_then(|d| Ok((read_names(&d)?, Arc::new(d))));
    let (mut names, dir) = match listing {
        Ok(x) => x,
        Err(e) => return tx.send(vec![error_entry(rel, &e)]).ok().map(|()| Vec::new()),
    };
    names.sort();
    if names.len() > NAMES_PER_JOB {
        let mut rest = names.split_off(NAMES_PER_JOB);
        let mut shares = Vec::new();
        while !rest.is_empty() {
            let last = rest.split_off(rest.len().saturating_sub(NAMES_PER_JOB));
            shares.push(WalkJob::Names(dir.clone(), rel.clone(), last));
        }
        share(shares);
    }
    look_up(src, &dir, &rel, names, root_dev, tx)
}

/// Look up `names` in the directory `dir` (at `rel` in the snapshot), handing their entries to
/// `tx` together. Returns the sub-directories among them to read (in name order), or None when
/// the receiver went away.
fn look_up(
    src: &Source,
    dir: &Arc<OwnedFd>,
    rel: &[u8],
    names: Vec<Vec<u8>>,
    root_dev: u64,
    tx: &SyncSender<Vec<Entry>>,
) -> Option<Vec<WalkJob>> {
    let (mut entries, mut subdirs) = (Vec::new(), Vec::new());
    for name in names {
        let child_rel = join(rel, &name);
        if excluded(src, &child_rel) {
            continue;
        }
        let m = match statx_at(&**dir, &name) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                entries.push(error_entry(child_rel, &e));
                continue;
            }
        };
        let kind = FileType::from_raw_mode(m.stx_mode.into());
        let link = if kind == FileType::Symlink {
            rustix::fs::readlinkat(&**dir, std::ffi::OsStr::from_bytes(&name), Vec::new())
                .map(|t| t.into_bytes())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let descend = kind == FileType::Directory && !(src.one_file_system && device_of(&m) != root_dev);
        entries.push(entry(child_rel.clone(), &m, &proc_path(dir, &name), link));
        if descend {
            subdirs.push(WalkJob::Dir(dir.clone(), name, child_rel));
        }
    }
    if !entries.is_empty() {
        tx.send(entries).ok()?;
    }
    Some(subdirs)
}

/// Open a directory beneath `parent` for reading, never through a symlink.
fn open_dir(parent: &OwnedFd, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        parent,
        std::ffi::OsStr::from_bytes(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The names in a directory, without "." and "..".
fn read_names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let name = e?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            out.push(name);
        }
    }
    Ok(out)
}

/// `name` inside the open directory `dir`, as a path for the calls that take only paths (extended
/// attributes): the directory is reached through its handle, so a path component swapped for a
/// symlink cannot redirect it, and the l-variants used on it do not follow `name` itself.
fn proc_path(dir: &OwnedFd, name: &[u8]) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(std::ffi::OsStr::from_bytes(name));
    p
}

/// Open a file of a source for reading, confined to its root.
pub fn open(src: &Source, rel: &[u8]) -> io::Result<File> {
    let refuse = |why: &str| io::Error::new(io::ErrorKind::PermissionDenied, format!("refused: {why}"));
    if rel.split(|&b| b == b'/').any(|c| c.is_empty() || c == b"." || c == b".." || c.contains(&0)) {
        return Err(refuse("not a plain relative path"));
    }
    if excluded_or_below(src, rel) {
        return Err(refuse("excluded from the source"));
    }
    let (root, rest) = src
        .roots
        .iter()
        .find_map(|r| {
            let rest = if r.rel.is_empty() { rel } else { rel.strip_prefix(r.rel.as_slice())?.strip_prefix(b"/")? };
            Some((r, rest))
        })
        .ok_or_else(|| refuse("outside every root of the source"))?;
    let dir = root.open()?;
    let mut resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    if src.one_file_system {
        resolve |= ResolveFlags::NO_XDEV;
    }
    let at = |flags: OFlags| {
        rustix::fs::openat2(
            &dir,
            std::ffi::OsStr::from_bytes(rest),
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            resolve,
        )
    };
    // Look before opening for reading: opening a device can have effects of its own.
    let probe = File::from(at(OFlags::PATH)?);
    if !probe.metadata()?.is_file() {
        return Err(refuse("not a regular file"));
    }
    let f = File::from(at(OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK)?);
    if !f.metadata()?.is_file() {
        return Err(refuse("not a regular file"));
    }
    Ok(f)
}

/// Seconds and nanoseconds as nanoseconds since the epoch (saturating: a file dated past 2262
/// must not crash the agent).
fn nanos(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// Whether a file's size, mtime or ctime moved between two looks.
pub fn moved(before: &fs::Metadata, after: &fs::Metadata) -> bool {
    (before.len(), before.mtime(), before.mtime_nsec(), before.ctime(), before.ctime_nsec())
        != (after.len(), after.mtime(), after.mtime_nsec(), after.ctime(), after.ctime_nsec())
}

impl ReadResult {
    /// The outcome of a read: the hash of what was read and the file as it is now.
    pub fn new(before: &fs::Metadata, after: &fs::Metadata, hasher: blake3::Hasher) -> ReadResult {
        ReadResult {
            blake3: *hasher.finalize().as_bytes(),
            size: after.len(),
            mtime_ns: nanos(after.mtime(), after.mtime_nsec()),
            ctime_ns: nanos(after.ctime(), after.ctime_nsec()),
            changed: moved(before, after),
        }
    }
}

/// What reading one file produced.
pub struct ReadResult {
    pub blake3: [u8; 32],
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Size, mtime or ctime moved while reading.
    pub changed: bool,
}

/// Read a file in pieces of `piece` bytes, handing each to `sink` (false = stop).
pub fn read(f: File, buf: &mut [u8], sink: &mut dyn FnMut(&[u8]) -> bool) -> io::Result<ReadResult> {
    let before = f.metadata()?;
    let mut hasher = blake3::Hasher::new();
    // Read what the file held when opened: one that keeps growing must not stream forever
    // (growth shows as `changed`).
    let mut f = f.take(before.len());
    let mut ahead = crate::readahead::Sequential::new(before.len());
    let mut pos = 0u64;
    loop {
        ahead.advise(f.get_ref(), pos);
        let n = match f.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                pos += n as u64;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        if !sink(&buf[..n]) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "collector went away"));
        }
    }
    Ok(ReadResult::new(&before, &f.get_ref().metadata()?, hasher))
}
