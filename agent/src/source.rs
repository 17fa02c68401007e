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
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use magpie_proto::v1::{Entry, EntryKind, Xattr};
use rustix::fs::{Mode, OFlags, ResolveFlags};

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

/// Metadata of one entry as the protocol carries it. `xattr_path` is where its extended
/// attributes are read (followed), `link_target` the target of a symlink.
pub fn entry(rel: Vec<u8>, m: &fs::Metadata, xattr_path: Option<&Path>, link_target: Vec<u8>) -> Entry {
    let ft = m.file_type();
    let kind = if ft.is_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_char_device() {
        EntryKind::CharDevice
    } else if ft.is_block_device() {
        EntryKind::BlockDevice
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else {
        EntryKind::Socket
    };
    let mut xattrs: Vec<Xattr> = xattr_path
        .and_then(|p| xattr::list_deref(p).ok())
        .into_iter()
        .flatten()
        .filter_map(|n| Some(Xattr { value: xattr::get_deref(xattr_path?, &n).ok()??, name: n.as_bytes().to_vec() }))
        .collect();
    xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    Entry {
        path: rel,
        kind: kind as i32,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: nanos(m.mtime(), m.mtime_nsec()),
        ctime_ns: nanos(m.ctime(), m.ctime_nsec()),
        size: if ft.is_file() { m.len() } else { 0 },
        inode: m.ino(),
        device: m.dev(),
        nlink: m.nlink() as u32,
        link_target,
        rdev: m.rdev(),
        xattrs,
        ..Default::default()
    }
}

fn error_entry(rel: Vec<u8>, e: &io::Error) -> Entry {
    Entry { path: rel, error: e.to_string(), ..Default::default() }
}

/// Every entry of a source. `emit` returns false to stop (the collector went away).
///
/// The walk goes from a handle on each root opened through no symlink, directory handle to directory handle
/// (`openat` with `O_NOFOLLOW`, `fstat` of an `O_PATH` handle): a path component swapped for a
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
            let e = match fs::symlink_metadata(at) {
                Ok(m) => entry(rel, &m, Some(at), Vec::new()),
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
        let root_dev = stat_at(&root_handle, b".").map(|(m, _, _)| m.dev()).unwrap_or(0);
        // (parent handle, name, relative path) of directories still to read; the root is ".".
        let mut stack: Vec<(Arc<OwnedFd>, Vec<u8>, Vec<u8>)> = vec![(root_handle, b".".to_vec(), rel_root)];
        while let Some((parent, name, rel)) = stack.pop() {
            let listing = open_dir(&parent, &name).and_then(|d| Ok((read_names(&d)?, Arc::new(d))));
            let (mut names, dir) = match listing {
                Ok(x) => x,
                Err(e) => {
                    if !emit(error_entry(rel, &e)) {
                        return;
                    }
                    continue;
                }
            };
            names.sort();
            for name in names {
                let child_rel = join(&rel, &name);
                if excluded(src, &child_rel) {
                    continue;
                }
                let (m, xattr_path, _handle) = match stat_at(&dir, &name) {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        if !emit(error_entry(child_rel, &e)) {
                            return;
                        }
                        continue;
                    }
                };
                let link = if m.file_type().is_symlink() {
                    rustix::fs::readlinkat(&*dir, std::ffi::OsStr::from_bytes(&name), Vec::new())
                        .map(|t| t.into_bytes())
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                let descend = m.is_dir() && !(src.one_file_system && m.dev() != root_dev);
                if !emit(entry(child_rel.clone(), &m, xattr_path.as_deref(), link)) {
                    return;
                }
                if descend {
                    stack.push((dir.clone(), name, child_rel));
                }
            }
        }
    }
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

/// Metadata of `name` in `dir` (not following a symlink) through an `O_PATH` handle, and the
/// `/proc/self/fd` path that reaches that very inode for its extended attributes (files and
/// directories only; the returned handle must stay open while the path is used).
fn stat_at(dir: &OwnedFd, name: &[u8]) -> io::Result<(fs::Metadata, Option<PathBuf>, File)> {
    let fd = rustix::fs::openat(
        dir,
        std::ffi::OsStr::from_bytes(name),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let f = File::from(fd);
    let m = f.metadata()?;
    let xattr_path = (m.is_file() || m.is_dir()).then(|| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())));
    Ok((m, xattr_path, f))
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
pub fn read(f: File, piece: usize, sink: &mut dyn FnMut(&[u8]) -> bool) -> io::Result<ReadResult> {
    let before = f.metadata()?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; piece];
    // Read what the file held when opened: one that keeps growing must not stream forever
    // (growth shows as `changed`).
    let mut f = f.take(before.len());
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
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
