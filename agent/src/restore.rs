//! Writing a restore, confined to one base directory.
//!
//! Every path from the collector is checked (relative, no `.`, `..` or empty component) and its
//! parent is reached from the base handle with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`,
//! so neither a crafted name nor a symlink planted on the server can move a write outside the
//! base. A file is written to a temporary name in its directory, checked against its BLAKE3,
//! given its metadata, then renamed over the old one: a failed restore leaves the old file.
//! Directories get their metadata last (their mtime changes as their entries are written).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use magpie_proto::v1::{Entry, EntryKind};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

/// Counts of a restore.
#[derive(Debug, Default, Clone)]
pub struct Written {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub warnings: Vec<String>,
}

/// A plain relative path: '/'-separated components, none empty, `.` or `..`, no NUL.
pub fn check_path(rel: &[u8]) -> io::Result<&OsStr> {
    if rel.is_empty() || rel.split(|&b| b == b'/').any(|c| c.is_empty() || c == b"." || c == b".." || c.contains(&0)) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refused: {:?} is not a plain relative path", String::from_utf8_lossy(rel)),
        ));
    }
    Ok(OsStr::from_bytes(rel))
}

fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (b".", rel),
    }
}

pub struct Writer {
    base: OwnedFd,
    base_path: PathBuf,
    owners: bool,
    /// Files written by this restore: the only valid hard-link targets.
    restored: HashSet<Vec<u8>>,
    /// Directories to give their metadata at the end.
    dirs: Vec<Entry>,
    file: Option<OpenFile>,
    pub written: Written,
}

struct OpenFile {
    entry: Entry,
    blake3: Vec<u8>,
    parent: OwnedFd,
    tmp: Vec<u8>,
    f: File,
    hasher: blake3::Hasher,
    left: u64,
}

impl Writer {
    /// A writer below `base` (created, 0700, when missing).
    pub fn new(base: &Path) -> io::Result<Writer> {
        std::fs::create_dir_all(base)?;
        let fd = rustix::fs::open(base, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Writer {
            base: fd,
            base_path: base.to_path_buf(),
            owners: rustix::process::geteuid().is_root(),
            restored: HashSet::new(),
            dirs: Vec::new(),
            file: None,
            written: Written::default(),
        })
    }

    /// A directory below the base, through no symlink.
    fn open_dir(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        if rel == b"." {
            return Ok(rustix::fs::openat(
                &self.base,
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?);
        }
        check_path(rel)?;
        rustix::fs::openat2(
            &self.base,
            OsStr::from_bytes(rel),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| io::Error::other(format!("{}: {e} (a symlinked parent is refused)", self.show(rel))))
    }

    fn show(&self, rel: &[u8]) -> String {
        self.base_path.join(OsStr::from_bytes(rel)).display().to_string()
    }

    /// Make `rel` and its missing parents as plain directories (no metadata of their own).
    pub fn ensure_dir(&mut self, rel: &[u8]) -> io::Result<()> {
        check_path(rel)?;
        let mut at = 0;
        while at <= rel.len() {
            let end = rel[at..].iter().position(|&b| b == b'/').map_or(rel.len(), |i| at + i);
            let (parent, name) = split(&rel[..end]);
            let dir = self.open_dir(parent)?;
            match rustix::fs::mkdirat(&dir, OsStr::from_bytes(name), Mode::from_raw_mode(0o755)) {
                Ok(()) => self.written.dirs += 1,
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io::Error::other(format!("{}: {e}", self.show(&rel[..end])))),
            }
            at = end + 1;
        }
        Ok(())
    }

    /// Restore one entry; a file's content follows through `data`.
    pub fn entry(&mut self, e: Entry, blake3: Vec<u8>, hardlink_to: &[u8]) -> io::Result<()> {
        if self.file.is_some() {
            return Err(io::Error::other("a new entry came before the last file's content was complete"));
        }
        check_path(&e.path)?;
        let kind = EntryKind::try_from(e.kind).unwrap_or(EntryKind::Unknown);
        match kind {
            EntryKind::Dir => {
                self.ensure_dir(&e.path)?;
                self.dirs.push(e);
                Ok(())
            }
            EntryKind::File if !hardlink_to.is_empty() => self.hardlink(&e, hardlink_to),
            EntryKind::File => self.begin_file(e, blake3),
            EntryKind::Symlink => self.symlink(&e),
            _ => {
                self.written
                    .warnings
                    .push(format!("{}: {kind:?} not restored (metadata only)", String::from_utf8_lossy(&e.path)));
                Ok(())
            }
        }
    }

    fn temp_name(name: &[u8]) -> Vec<u8> {
        let mut r = [0u8; 6];
        let _ = getrandom::fill(&mut r);
        let mut t = b".magpie-restore-".to_vec();
        t.extend_from_slice(hex::encode(r).as_bytes());
        t.push(b'-');
        t.extend_from_slice(&name[..name.len().min(100)]);
        t
    }

    /// Whether this restore wrote the file `rel`.
    pub fn wrote(&self, rel: &[u8]) -> bool {
        self.restored.contains(rel)
    }

    /// The directory that holds `rel`, made (without metadata of its own) when missing: a
    /// restore of some paths only (`--path`) sends no entries for their directories.
    fn parent_of(&mut self, rel: &[u8]) -> io::Result<OwnedFd> {
        let (parent_rel, _) = split(rel);
        match self.open_dir(parent_rel) {
            Ok(fd) => Ok(fd),
            Err(_) if parent_rel != b"." && !self.base_path.join(OsStr::from_bytes(parent_rel)).exists() => {
                self.ensure_dir(parent_rel)?;
                self.open_dir(parent_rel)
            }
            Err(e) => Err(e),
        }
    }

    fn begin_file(&mut self, entry: Entry, blake3: Vec<u8>) -> io::Result<()> {
        let (_, name) = split(&entry.path);
        let parent = self.parent_of(&entry.path)?;
        let tmp = Self::temp_name(name);
        let fd = rustix::fs::openat(
            &parent,
            OsStr::from_bytes(&tmp),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io::Error::other(format!("{}: {e}", self.show(&entry.path))))?;
        let left = entry.size;
        self.file =
            Some(OpenFile { entry, blake3, parent, tmp, f: File::from(fd), hasher: blake3::Hasher::new(), left });
        if left == 0 {
            return self.end_file();
        }
        Ok(())
    }

    /// Content of the file being written.
    pub fn data(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(of) = self.file.as_mut() else {
            return Err(io::Error::other("file content came without a file entry"));
        };
        if data.len() as u64 > of.left {
            return Err(io::Error::other(format!(
                "more content than the size of {}",
                String::from_utf8_lossy(&of.entry.path)
            )));
        }
        of.f.write_all(data)?;
        of.hasher.update(data);
        of.left -= data.len() as u64;
        if of.left == 0 {
            return self.end_file();
        }
        Ok(())
    }

    fn end_file(&mut self) -> io::Result<()> {
        let of = self.file.take().expect("a file in progress");
        let result = (|| {
            if !of.blake3.is_empty() && of.hasher.finalize().as_bytes() != of.blake3.as_slice() {
                return Err(io::Error::other(format!(
                    "{}: content does not match its BLAKE3 from the snapshot",
                    self.show(&of.entry.path)
                )));
            }
            of.f.sync_data()?;
            self.apply_fd(&of.f, &of.entry)?;
            let (_, name) = split(&of.entry.path);
            rustix::fs::renameat(&of.parent, OsStr::from_bytes(&of.tmp), &of.parent, OsStr::from_bytes(name))
                .map_err(|e| io::Error::other(format!("{}: {e}", self.show(&of.entry.path))))
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&of.parent, OsStr::from_bytes(&of.tmp), AtFlags::empty());
            return result;
        }
        self.restored.insert(of.entry.path.clone());
        self.written.files += 1;
        self.written.bytes += of.entry.size;
        Ok(())
    }

    fn hardlink(&mut self, e: &Entry, first: &[u8]) -> io::Result<()> {
        if !self.restored.contains(first) {
            return Err(io::Error::other(format!(
                "{}: hard link to {} which this restore did not write",
                self.show(&e.path),
                String::from_utf8_lossy(first)
            )));
        }
        let (first_parent, first_name) = split(first);
        let (_, name) = split(&e.path);
        let (from, to) = (self.open_dir(first_parent)?, self.parent_of(&e.path)?);
        let tmp = Self::temp_name(name);
        rustix::fs::linkat(&from, OsStr::from_bytes(first_name), &to, OsStr::from_bytes(&tmp), AtFlags::empty())?;
        rustix::fs::renameat(&to, OsStr::from_bytes(&tmp), &to, OsStr::from_bytes(name)).inspect_err(|_| {
            let _ = rustix::fs::unlinkat(&to, OsStr::from_bytes(&tmp), AtFlags::empty());
        })?;
        self.written.files += 1;
        Ok(())
    }

    fn symlink(&mut self, e: &Entry) -> io::Result<()> {
        let (_, name) = split(&e.path);
        let parent = self.parent_of(&e.path)?;
        let tmp = Self::temp_name(name);
        rustix::fs::symlinkat(OsStr::from_bytes(&e.link_target), &parent, OsStr::from_bytes(&tmp))?;
        if self.owners {
            let _ = rustix::fs::chownat(
                &parent,
                OsStr::from_bytes(&tmp),
                Some(rustix::fs::Uid::from_raw(e.uid)),
                Some(rustix::fs::Gid::from_raw(e.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            );
        }
        rustix::fs::renameat(&parent, OsStr::from_bytes(&tmp), &parent, OsStr::from_bytes(name)).inspect_err(|_| {
            let _ = rustix::fs::unlinkat(&parent, OsStr::from_bytes(&tmp), AtFlags::empty());
        })?;
        self.written.symlinks += 1;
        Ok(())
    }

    /// Owner, xattrs, times and mode through a descriptor (mode last: chown clears set-uid).
    fn apply_fd(&self, f: &File, e: &Entry) -> io::Result<()> {
        if self.owners {
            rustix::fs::fchown(f, Some(rustix::fs::Uid::from_raw(e.uid)), Some(rustix::fs::Gid::from_raw(e.gid)))?;
        }
        for x in &e.xattrs {
            if let Err(err) =
                rustix::fs::fsetxattr(f, OsStr::from_bytes(&x.name), &x.value, rustix::fs::XattrFlags::empty())
            {
                tracing::warn!(
                    "{}: xattr {:?} not restored: {err}",
                    self.show(&e.path),
                    String::from_utf8_lossy(&x.name)
                );
            }
        }
        let t =
            Timespec { tv_sec: e.mtime_ns.div_euclid(1_000_000_000), tv_nsec: e.mtime_ns.rem_euclid(1_000_000_000) };
        rustix::fs::futimens(f, &Timestamps { last_access: t, last_modification: t })?;
        rustix::fs::fchmod(f, Mode::from_raw_mode(e.mode & 0o7777))?;
        Ok(())
    }

    /// Give the directories their metadata, deepest first; returns the counts.
    pub fn finish(mut self) -> io::Result<Written> {
        if let Some(of) = &self.file {
            return Err(io::Error::other(format!(
                "the restore ended in the middle of {}",
                String::from_utf8_lossy(&of.entry.path)
            )));
        }
        let dirs = std::mem::take(&mut self.dirs);
        for e in dirs.iter().rev() {
            let fd = rustix::fs::openat2(
                &self.base,
                OsStr::from_bytes(&e.path),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
            )?;
            self.apply_fd(&File::from(fd), e)?;
        }
        Ok(std::mem::take(&mut self.written))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(of) = self.file.take() {
            let _ = rustix::fs::unlinkat(&of.parent, OsStr::from_bytes(&of.tmp), AtFlags::empty());
        }
    }
}

/// The writers of one restore: one below a single base (path and dump sources), or one per
/// Docker volume, each entry routed by its first component (the volume's name).
pub struct Writers {
    /// (prefix, writer); an empty prefix takes every path.
    parts: Vec<(Vec<u8>, Writer)>,
    current: Option<usize>,
}

impl Writers {
    pub fn single(w: Writer) -> Writers {
        Writers { parts: vec![(Vec::new(), w)], current: None }
    }

    pub fn per_volume(parts: Vec<(String, Writer)>) -> Writers {
        Writers { parts: parts.into_iter().map(|(n, w)| (n.into_bytes(), w)).collect(), current: None }
    }

    /// The writer of `rel` and the path below it (empty: the volume itself).
    fn route<'p>(&self, rel: &'p [u8]) -> io::Result<(usize, &'p [u8])> {
        for (i, (prefix, _)) in self.parts.iter().enumerate() {
            if prefix.is_empty() {
                return Ok((i, rel));
            }
            if rel == prefix.as_slice() {
                return Ok((i, b""));
            }
            if rel.len() > prefix.len() && rel.starts_with(prefix) && rel[prefix.len()] == b'/' {
                return Ok((i, &rel[prefix.len() + 1..]));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refused: {:?} is in none of the restored volumes", String::from_utf8_lossy(rel)),
        ))
    }

    pub fn entry(&mut self, mut e: Entry, blake3: Vec<u8>, hardlink_to: &[u8]) -> io::Result<()> {
        let (i, below) = self.route(&e.path)?;
        if below.is_empty() {
            // A volume's own top directory: its mountpoint, which Docker owns.
            return Ok(());
        }
        let link = if hardlink_to.is_empty() {
            Vec::new()
        } else {
            let (j, target) = self.route(hardlink_to)?;
            if j != i {
                return Err(io::Error::other("a hard link across two volumes cannot be restored"));
            }
            target.to_vec()
        };
        e.path = below.to_vec();
        self.current = Some(i);
        self.parts[i].1.entry(e, blake3, &link)
    }

    pub fn ensure_dir(&mut self, rel: &[u8]) -> io::Result<()> {
        let (i, below) = self.route(rel)?;
        if below.is_empty() { Ok(()) } else { self.parts[i].1.ensure_dir(below) }
    }

    pub fn data(&mut self, data: &[u8]) -> io::Result<()> {
        match self.current {
            Some(i) => self.parts[i].1.data(data),
            None => Err(io::Error::other("file content came without a file entry")),
        }
    }

    pub fn wrote(&self, rel: &[u8]) -> bool {
        self.route(rel).is_ok_and(|(i, below)| self.parts[i].1.wrote(below))
    }

    pub fn finish(self) -> io::Result<Written> {
        let mut all = Written::default();
        for (_, w) in self.parts {
            let w = w.finish()?;
            all.files += w.files;
            all.dirs += w.dirs;
            all.symlinks += w.symlinks;
            all.bytes += w.bytes;
            all.warnings.extend(w.warnings);
        }
        Ok(all)
    }
}

/// Where an entry of a restore may go.
pub enum Place {
    /// Inside a root (or anywhere in a dump's spool): written.
    Write,
    /// A parent of a root: made when missing, its metadata left alone.
    Parent,
    /// Neither: refused.
    Outside,
}

pub fn place(src: &crate::config::Source, spooled: bool, rel: &[u8]) -> Place {
    if spooled {
        return Place::Write;
    }
    for root in &src.roots {
        let r = root.rel.as_slice();
        if r.is_empty() {
            // The root is "/" itself.
            return Place::Write;
        }
        let under = |a: &[u8], b: &[u8]| a.len() > b.len() && a.starts_with(b) && a[b.len()] == b'/';
        if rel == r || under(rel, r) {
            return Place::Write;
        }
        if under(r, rel) {
            return Place::Parent;
        }
    }
    Place::Outside
}

/// Free bytes on the file system that holds `p` (or its nearest existing parent).
fn free_bytes(p: &Path) -> Option<u64> {
    let existing = p.ancestors().find(|a| a.exists())?;
    let st = rustix::fs::statvfs(existing).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether a restore of a source could run now: targets, what it replaces, what stands in its way.
pub fn readiness(
    src: &crate::config::Source,
    spool: &crate::spool::Spool,
    req: &magpie_proto::v1::RestoreCheckRequest,
) -> magpie_proto::v1::RestoreCheckResponse {
    let mut out = magpie_proto::v1::RestoreCheckResponse::default();
    let need = req.bytes;
    if let Some(spec) = &src.volume {
        volume_readiness(spec, req, &mut out);
        return out;
    }
    let Some(spec) = &src.dump else {
        let mut free = u64::MAX;
        for root in &src.roots {
            let target = match &src.restore_root {
                Some(r) => r.join(OsStr::from_bytes(&root.rel)),
                None => root.path.clone(),
            };
            if target.exists() {
                out.overwrites
                    .push(format!("{}: files of the snapshot replace theirs; files not in it stay", target.display()));
            }
            free = free.min(free_bytes(&target).unwrap_or(0));
            if let Some(existing) = target.ancestors().find(|a| a.exists())
                && rustix::fs::access(existing, rustix::fs::Access::WRITE_OK).is_err()
            {
                out.problems.push(format!(
                    "{} is not writable by the agent (see deploy/systemd/magpie-agent-restore.conf)",
                    existing.display()
                ));
            }
            out.targets.push(target.display().to_string());
        }
        out.free_bytes = free;
        if need > free {
            out.problems.push(format!("the restore writes {need} bytes; {free} are free where it goes"));
        }
        return out;
    };
    // The dumps wait in the spool while they load.
    out.free_bytes = free_bytes(&spool.dir).unwrap_or(0);
    if need > out.free_bytes {
        out.problems.push(format!("the dumps take {need} bytes; {} are free in the spool", out.free_bytes));
    }
    match spool.session() {
        Ok(tmp) => {
            let r = spec.readiness(&req.dumps, req.clean, req.force, &tmp.path, src.restore_root.as_deref());
            out.targets.extend(r.targets);
            out.overwrites.extend(r.overwrites);
            out.problems.extend(r.problems);
        }
        Err(e) => out.problems.push(format!("{e:#}")),
    }
    out
}

/// A volume restore: Docker reachable, each volume there (or made with its recorded driver), the
/// containers that will be stopped, and room on the file system of the volumes.
fn volume_readiness(
    spec: &crate::volume::VolumeSpec,
    req: &magpie_proto::v1::RestoreCheckRequest,
    out: &mut magpie_proto::v1::RestoreCheckResponse,
) {
    if req.volumes.is_empty() {
        out.problems.push("the snapshot records no Docker volume to restore".into());
    }
    if let Some(v) = req.volumes.iter().find(|v| !spec.declares(&v.name)) {
        out.problems.push(format!("docker volume {} is not one this source declares (agent.toml `volume`)", v.name));
        return;
    }
    let mut free = u64::MAX;
    for v in &req.volumes {
        let existing = match spec.docker.volume(&v.name) {
            Ok(e) => e,
            Err(e) => {
                out.problems.push(format!("{e:#}"));
                return;
            }
        };
        let Some(existing) = existing else {
            out.targets.push(format!("docker volume {} (missing: created with driver {})", v.name, v.driver));
            continue;
        };
        match crate::volume::local_mountpoint(&existing) {
            Ok(m) => {
                out.targets.push(format!("docker volume {} ({})", v.name, m.display()));
                out.overwrites.push(format!(
                    "docker volume {}: files of the snapshot replace theirs; files not in it stay",
                    v.name
                ));
                free = free.min(free_bytes(&m).unwrap_or(0));
            }
            Err(e) => out.problems.push(format!("{e:#}")),
        }
        match spec.docker.containers_using(&v.name) {
            Ok(cs) => {
                let running: Vec<String> = cs.iter().filter(|c| c.state == "running").map(|c| c.name()).collect();
                if !running.is_empty() {
                    out.overwrites
                        .push(format!("containers stopped during the restore, then started: {}", running.join(", ")));
                }
            }
            Err(e) => out.problems.push(format!("{e:#}")),
        }
    }
    out.free_bytes = free;
    if free != u64::MAX && req.bytes > free {
        out.problems.push(format!("the restore writes {} bytes; {free} are free in the volumes", req.bytes));
    }
}
