//! A local directory in and out of a repository: import (walk, chunk, build trees) and restore.
//!
//! Within a directory, entries that are not directories are stored first, in name order, then
//! the sub-directories; restore visits in the same order, so the first name of a hard-linked
//! file is always restored before its other names.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::archive::{self, FileContent, SmallFiles, StreamRange};
use crate::blob_reader::BlobReader;
use crate::chunker::Chunker;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::magic;
use crate::repofile::pack::BlobKind;
use crate::repofile::snapshot::SnapshotStats;
use crate::repofile::tree::{ChunkRef, Node, NodeKind, Tree, Xattr};
use crate::repository::Repository;
use crate::writer::Writer;

/// Store a local directory; returns the root tree id and counts.
pub fn import_dir(w: &mut Writer<'_>, root: &Path) -> Result<(Id, SnapshotStats)> {
    let repo = w.repo();
    let mut imp = Importer {
        large: repo.chunker(false)?,
        small: SmallFiles::new(repo.chunker(false)?),
        threshold: repo.config().small_file_threshold as u64,
        links: HashMap::new(),
        names: Names::load(),
        stats: SnapshotStats::default(),
    };
    let meta = fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!("{} is not a directory", root.display())));
    }
    let id = imp.dir(w, root, Path::new(""))?;
    Ok((id, imp.stats))
}

struct Importer {
    large: Chunker,
    small: SmallFiles,
    threshold: u64,
    /// (device, inode) → first path and its content, for hard links.
    links: HashMap<(u64, u64), (PathBuf, Option<FileContent>)>,
    names: Names,
    stats: SnapshotStats,
}

enum Pending {
    Done,
    Small(StreamRange, [u8; 32]),
    Link((u64, u64)),
}

impl Importer {
    fn dir(&mut self, w: &mut Writer<'_>, path: &Path, rel: &Path) -> Result<Id> {
        let mut entries: Vec<_> = fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(path, e))?;
        entries.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut nodes = Vec::new();
        let mut pending = Vec::new();
        let mut subdirs = Vec::new();
        for name in entries {
            let p = path.join(&name);
            let meta = match fs::symlink_metadata(&p) {
                Ok(m) => m,
                // Vanished since the listing: not part of this snapshot.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&p, e)),
            };
            if meta.is_dir() {
                subdirs.push((name, meta));
                continue;
            }
            let mut node = self.node(&p, &name, &meta);
            let state = self.leaf(w, &p, &rel.join(&name), &meta, &mut node)?;
            nodes.push(node);
            pending.push(state);
        }
        self.small.flush(w)?;
        for (node, state) in nodes.iter_mut().zip(pending) {
            match state {
                Pending::Done => {}
                Pending::Small(range, hash) => {
                    node.content = self.small.resolve(range);
                    node.blake3 = hash.to_vec();
                    if let Some((_, slot @ None)) = self.links.get_mut(&(node.device, node.inode)) {
                        *slot = Some(FileContent { chunks: node.content.clone(), size: node.size, blake3: hash });
                    }
                }
                Pending::Link(key) => {
                    if let Some((_, Some(c))) = self.links.get(&key) {
                        node.content = c.chunks.clone();
                        node.blake3 = c.blake3.to_vec();
                        node.size = c.size;
                    }
                }
            }
        }
        self.small.clear();
        for (name, meta) in subdirs {
            let p = path.join(&name);
            let mut node = self.node(&p, &name, &meta);
            node.kind = NodeKind::Dir as i32;
            node.subtree = self.dir(w, &p, &rel.join(&name))?.0.to_vec();
            self.stats.dirs += 1;
            nodes.push(node);
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let tree = Tree { version: magic::METADATA_VERSION, nodes };
        w.add(BlobKind::Tree, tree.encode_to_vec())
    }

    fn node(&self, p: &Path, name: &OsStr, m: &fs::Metadata) -> Node {
        let mut xattrs: Vec<Xattr> = xattr::list(p)
            .into_iter()
            .flatten()
            .filter_map(|n| {
                let value = xattr::get(p, &n).ok()??;
                Some(Xattr { name: n.as_bytes().to_vec(), value })
            })
            .collect();
        xattrs.sort_by(|a, b| a.name.cmp(&b.name));
        Node {
            name: name.as_bytes().to_vec(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            user: self.names.user(m.uid()),
            group: self.names.group(m.gid()),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            inode: m.ino(),
            device: m.dev(),
            nlink: m.nlink() as u32,
            xattrs,
            ..Default::default()
        }
    }

    fn leaf(&mut self, w: &mut Writer<'_>, p: &Path, rel: &Path, m: &fs::Metadata, node: &mut Node) -> Result<Pending> {
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        if ft.is_symlink() {
            node.kind = NodeKind::Symlink as i32;
            node.link_target = fs::read_link(p).map_err(|e| Error::io(p, e))?.as_os_str().as_bytes().to_vec();
            self.stats.others += 1;
            return Ok(Pending::Done);
        }
        if !ft.is_file() {
            node.kind = if ft.is_char_device() {
                NodeKind::CharDevice
            } else if ft.is_block_device() {
                NodeKind::BlockDevice
            } else if ft.is_fifo() {
                NodeKind::Fifo
            } else {
                NodeKind::Socket
            } as i32;
            node.rdev = m.rdev();
            self.stats.others += 1;
            return Ok(Pending::Done);
        }
        self.stats.files += 1;
        node.kind = NodeKind::File as i32;
        let key = (m.dev(), m.ino());
        if m.nlink() > 1
            && let Some((first, content)) = self.links.get(&key)
        {
            node.kind = NodeKind::Hardlink as i32;
            node.link_target = first.as_os_str().as_bytes().to_vec();
            if let Some(c) = content {
                node.content = c.chunks.clone();
                node.blake3 = c.blake3.to_vec();
                node.size = c.size;
            }
            self.stats.bytes += node.size;
            return Ok(if content.is_some() { Pending::Done } else { Pending::Link(key) });
        }
        let mut f = File::open(p).map_err(|e| Error::io(p, e))?;
        let state = if m.len() < self.threshold {
            // Read at most one byte past the threshold: a file that grew is stored whole.
            let mut data = Vec::with_capacity(m.len() as usize);
            (&mut f).take(self.threshold + 1).read_to_end(&mut data).map_err(|e| Error::io(p, e))?;
            if (data.len() as u64) <= self.threshold {
                node.size = data.len() as u64;
                let hash = *blake3::hash(&data).as_bytes();
                Pending::Small(self.small.push(w, &data)?, hash)
            } else {
                let c = archive::store_stream(w, &self.large, data.as_slice().chain(f), p)?;
                self.set_content(node, &c);
                Pending::Done
            }
        } else {
            let c = archive::store_stream(w, &self.large, f, p)?;
            self.set_content(node, &c);
            Pending::Done
        };
        self.stats.bytes += node.size;
        if m.nlink() > 1 {
            let content = matches!(state, Pending::Done).then(|| FileContent {
                chunks: node.content.clone(),
                size: node.size,
                blake3: node.blake3.as_slice().try_into().unwrap_or_default(),
            });
            self.links.insert(key, (rel.to_path_buf(), content));
        }
        Ok(state)
    }

    fn set_content(&self, node: &mut Node, c: &FileContent) {
        node.content = c.chunks.clone();
        node.size = c.size;
        node.blake3 = c.blake3.to_vec();
    }
}

/// uid/gid → name from the local passwd and group files (no NSS: names are informational).
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn load() -> Names {
        let parse = |path: &str| -> HashMap<u32, String> {
            fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((id, name.to_string()))
                })
                .collect()
        };
        Names { users: parse("/etc/passwd"), groups: parse("/etc/group") }
    }
    fn user(&self, uid: u32) -> String {
        self.users.get(&uid).cloned().unwrap_or_default()
    }
    fn group(&self, gid: u32) -> String {
        self.groups.get(&gid).cloned().unwrap_or_default()
    }
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Files written (hard links included).
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Entries that were not restored (devices, fifos, sockets), with the reason.
    pub skipped: Vec<String>,
}

/// Restore the tree `root` into `target` (created if missing). Every name is checked so nothing
/// escapes `target`; every file is checked against its BLAKE3 before it takes its final name.
pub fn restore(repo: &Repository, root: &Id, target: &Path) -> Result<RestoreStats> {
    restore_matching(repo, root, target, &|_| true)
}

/// The same for the entries `filter` accepts (by path relative to the root).
pub fn restore_matching(
    repo: &Repository,
    root: &Id,
    target: &Path,
    filter: &dyn Fn(&[u8]) -> bool,
) -> Result<RestoreStats> {
    fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;
    let mut r = Restorer {
        repo,
        target: target.to_path_buf(),
        cache: ContentReader::default(),
        filter,
        stats: RestoreStats::default(),
        owners: is_root(),
        restored: Default::default(),
    };
    r.dir(root, target)?;
    Ok(r.stats)
}

fn is_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A name from a snapshot is one path component: no separator, no `.` or `..`, no NUL.
pub fn check_name(name: &[u8]) -> Result<&OsStr> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(Error::corrupt(
            format!("entry {:?}", String::from_utf8_lossy(name)),
            "is not a plain file name; refusing to restore it (it could escape the target)",
        ));
    }
    Ok(OsStr::from_bytes(name))
}

/// Reads the content of file nodes (see [`BlobReader`] for what it keeps and reads ahead).
#[derive(Default)]
pub struct ContentReader {
    blobs: BlobReader,
}

impl ContentReader {
    /// Hand the content of `node` to `sink`, piece by piece, and check it against the node's
    /// BLAKE3 at the end; `what` names the file in that error.
    pub fn read(
        &mut self,
        repo: &Repository,
        node: &Node,
        what: &dyn std::fmt::Display,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut hasher = blake3::Hasher::new();
        for (i, c) in node.content.iter().enumerate() {
            let data = self.chunk(repo, c, &node.content[i + 1..])?;
            hasher.update(data);
            sink(data)?;
        }
        if !node.blake3.is_empty() && hasher.finalize().as_bytes() != node.blake3.as_slice() {
            return Err(Error::corrupt(what, "content does not match the BLAKE3 recorded at backup"));
        }
        Ok(())
    }

    /// The bytes one chunk reference names; `upcoming` are the references read next.
    fn chunk(&mut self, repo: &Repository, c: &ChunkRef, upcoming: &[ChunkRef]) -> Result<&[u8]> {
        let id = Id::from_slice(&c.id).ok_or_else(|| Error::corrupt("tree", "chunk reference without a 32-byte id"))?;
        let blob = self.blobs.get(repo, &id, upcoming.iter().filter_map(|u| Id::from_slice(&u.id)))?;
        let (s, e) = (c.offset as usize, c.offset as usize + c.length as usize);
        blob.get(s..e).ok_or_else(|| {
            Error::corrupt(format!("blob {id}"), format!("range {s}..{e} is past its end ({})", blob.len()))
        })
    }
}

struct Restorer<'a> {
    repo: &'a Repository,
    target: PathBuf,
    cache: ContentReader,
    stats: RestoreStats,
    /// Which entries to restore (relative paths); directories are always made.
    filter: &'a dyn Fn(&[u8]) -> bool,
    owners: bool,
    /// Files this restore wrote, relative to the target: the only valid hard-link targets.
    restored: std::collections::HashSet<PathBuf>,
}

impl Restorer<'_> {
    fn dir(&mut self, tree_id: &Id, path: &Path) -> Result<()> {
        let tree = self.repo.read_tree(tree_id)?;
        let (dirs, leaves): (Vec<&Node>, Vec<&Node>) = tree.nodes.iter().partition(|n| n.node_kind() == NodeKind::Dir);
        for node in leaves {
            let p = path.join(check_name(&node.name)?);
            let rel = p.strip_prefix(&self.target).unwrap_or(&p);
            if (self.filter)(rel.as_os_str().as_bytes()) {
                self.leaf(node, &p)?;
            }
        }
        for node in dirs {
            let p = path.join(check_name(&node.name)?);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Invalid(format!(
                        "{} exists and is not a directory; refusing to restore into it",
                        p.display()
                    )));
                }
                Err(_) => fs::create_dir(&p).map_err(|e| Error::io(&p, e))?,
            }
            self.stats.dirs += 1;
            let sub =
                Id::from_slice(&node.subtree).ok_or_else(|| Error::corrupt(p.display(), "directory without a tree"))?;
            self.dir(&sub, &p)?;
            self.metadata(node, &p)?;
        }
        Ok(())
    }

    fn leaf(&mut self, node: &Node, p: &Path) -> Result<()> {
        match node.node_kind() {
            NodeKind::File => self.file(node, p),
            NodeKind::Hardlink => {
                // Link only to a file this restore wrote: its parents are directories we made,
                // so the link cannot be steered outside the target by a symlink on the way.
                let first = Path::new(OsStr::from_bytes(&node.link_target));
                if self.restored.contains(first) {
                    let _ = fs::remove_file(p);
                    fs::hard_link(self.target.join(first), p).map_err(|e| Error::io(p, e))?;
                    self.stats.files += 1;
                    Ok(())
                } else {
                    // The first name was not restored: write the content itself.
                    self.file(node, p)
                }
            }
            NodeKind::Symlink => {
                let _ = fs::remove_file(p);
                std::os::unix::fs::symlink(OsStr::from_bytes(&node.link_target), p).map_err(|e| Error::io(p, e))?;
                if self.owners {
                    std::os::unix::fs::lchown(p, Some(node.uid), Some(node.gid)).map_err(|e| Error::io(p, e))?;
                }
                self.stats.symlinks += 1;
                Ok(())
            }
            other => {
                self.stats.skipped.push(format!("{}: {other:?} (metadata only)", p.display()));
                Ok(())
            }
        }
    }

    fn file(&mut self, node: &Node, p: &Path) -> Result<()> {
        let dir = p.parent().unwrap_or(&self.target);
        let mut suffix = [0u8; 6];
        crate::crypto::fill_random(&mut suffix);
        let tmp = dir.join(format!(".magpie-restore-{}", hex::encode(suffix)));
        let result = (|| {
            let mut f =
                fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| Error::io(&tmp, e))?;
            self.cache
                .read(self.repo, node, &p.display(), &mut |data| f.write_all(data).map_err(|e| Error::io(&tmp, e)))?;
            drop(f);
            self.metadata(node, &tmp)?;
            fs::rename(&tmp, p).map_err(|e| Error::io(p, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        if let Ok(rel) = p.strip_prefix(&self.target) {
            self.restored.insert(rel.to_path_buf());
        }
        self.stats.files += 1;
        self.stats.bytes += node.size;
        Ok(())
    }

    fn metadata(&self, node: &Node, p: &Path) -> Result<()> {
        // Times first, through a descriptor opened before the mode is set: a restrictive mode
        // (a 0o000 file, a 0o311 directory) must not stop a restore that does not run as root.
        let mtime = std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::from_nanos(node.mtime_ns.max(0) as u64))
            .unwrap_or(std::time::UNIX_EPOCH);
        File::open(p).and_then(|f| f.set_modified(mtime)).map_err(|e| Error::io(p, e))?;
        if self.owners {
            std::os::unix::fs::chown(p, Some(node.uid), Some(node.gid)).map_err(|e| Error::io(p, e))?;
        }
        for x in &node.xattrs {
            // Some file systems refuse some namespaces; the content matters more than the xattr.
            if let Err(e) = xattr::set(p, OsStr::from_bytes(&x.name), &x.value) {
                tracing::warn!(
                    "{}: extended attribute {:?} not restored: {e}",
                    p.display(),
                    String::from_utf8_lossy(&x.name)
                );
            }
        }
        // The mode last: chown clears set-uid bits, and a read-only mode would stop the rest.
        fs::set_permissions(p, fs::Permissions::from_mode(node.mode)).map_err(|e| Error::io(p, e))
    }
}

/// Find the node at `path` (components separated by `/`) under the tree `root`; the empty path
/// names the root directory itself.
pub fn lookup(repo: &Repository, root: &Id, path: &str) -> Result<Option<Node>> {
    let mut node = Node { kind: NodeKind::Dir as i32, subtree: root.0.to_vec(), ..Default::default() };
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        let Some(sub) = Id::from_slice(&node.subtree).filter(|_| node.node_kind() == NodeKind::Dir) else {
            return Ok(None);
        };
        let tree = repo.read_tree(&sub)?;
        match tree.nodes.into_iter().find(|n| n.name == comp.as_bytes()) {
            Some(n) => node = n,
            None => return Ok(None),
        }
    }
    Ok(Some(node))
}

/// Visit every node under the tree `root` depth-first, with its path relative to the root as
/// raw bytes (`/`-separated; names need not be UTF-8).
pub fn walk(repo: &Repository, root: &Id, visit: &mut dyn FnMut(&[u8], &Node) -> Result<()>) -> Result<()> {
    fn rec(repo: &Repository, id: &Id, prefix: &[u8], visit: &mut dyn FnMut(&[u8], &Node) -> Result<()>) -> Result<()> {
        for n in repo.read_tree(id)?.nodes {
            let mut path = prefix.to_vec();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&n.name);
            visit(&path, &n)?;
            if n.node_kind() == NodeKind::Dir
                && let Some(sub) = Id::from_slice(&n.subtree)
            {
                rec(repo, &sub, &path, visit)?;
            }
        }
        Ok(())
    }
    rec(repo, root, b"", visit)
}
