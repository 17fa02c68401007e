//! A repository in a local directory.
//!
//! Every write goes: temporary file in the target's folder → fsync → `link(2)` to the final name
//! (which fails if the name exists, giving create-only semantics without a check-then-act race) →
//! unlink the temporary → fsync the folder. A crash leaves either no object or the whole object,
//! plus at worst a `.tmp-*` file that listings ignore and `compact` removes. A staged object (a
//! pack, named by its content) is written to its temporary in the parent folder, as it comes, then
//! goes the same way.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Backend, BackendError, ObjectInfo, PutOutcome, Staged};
use crate::magic::TEMP_PREFIX;

/// A repository rooted at a local directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    /// Use `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> LocalBackend {
        let root = root.into();
        // Absolute, so that the walk up for fsyncs never reaches an empty parent.
        LocalBackend { root: std::path::absolute(&root).unwrap_or(root) }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn sync_dir(dir: &Path) -> std::io::Result<()> {
        File::open(dir)?.sync_all()
    }

    /// Give the durable temporary `tmp` the name `name` (create-only) in `dir`, the existing
    /// folder of `path`, then remove it.
    fn link_into_place(tmp: &Path, name: &str, path: &Path, dir: &Path) -> Result<PutOutcome, BackendError> {
        let outcome = match fs::hard_link(tmp, path) {
            Ok(()) => PutOutcome::Created,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => PutOutcome::AlreadyExists,
            Err(e) => {
                let _ = fs::remove_file(tmp);
                return Err(BackendError::io(name, e));
            }
        };
        fs::remove_file(tmp).map_err(|e| BackendError::io(name, e))?;
        Self::sync_dir(dir).map_err(|e| BackendError::io(name, e))?;
        Ok(outcome)
    }

    fn create_dirs(&self, dir: &Path) -> std::io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        // Make the new folders themselves durable, up to the root's parent.
        let mut d = dir;
        while let Some(parent) = d.parent() {
            Self::sync_dir(parent)?;
            if d == self.root || !d.starts_with(&self.root) {
                break;
            }
            d = parent;
        }
        Ok(())
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, name: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
        let path = self.path(name);
        let mut f = File::open(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => BackendError::NotFound(name.to_string()),
            _ => BackendError::io(name, e),
        })?;
        let mut buf = Vec::new();
        match range {
            None => {
                f.read_to_end(&mut buf).map_err(|e| BackendError::io(name, e))?;
            }
            Some(r) => {
                // One pread of the exact size: a restore or a delta reads thousands of small blobs.
                let len = usize::try_from(r.end.saturating_sub(r.start))
                    .map_err(|_| BackendError::io(name, std::io::Error::other("range too large")))?;
                buf.resize(len, 0);
                f.read_exact_at(&mut buf, r.start).map_err(|e| {
                    let e = match e.kind() {
                        ErrorKind::UnexpectedEof => std::io::Error::new(
                            ErrorKind::UnexpectedEof,
                            format!("object is shorter than the range {}..{}", r.start, r.end),
                        ),
                        _ => e,
                    };
                    BackendError::io(name, e)
                })?;
            }
        }
        Ok(buf)
    }

    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        let path = self.path(name);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.create_dirs(&dir).map_err(|e| BackendError::io(name, e))?;
        if path.exists() {
            // The writer that linked it may have died before its folder fsync: make it durable.
            Self::sync_dir(&dir).map_err(|e| BackendError::io(name, e))?;
            return Ok(PutOutcome::AlreadyExists);
        }
        let tmp = temporary_in(&dir);
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(BackendError::io(name, e));
        }
        Self::link_into_place(&tmp, name, &path, &dir)
    }

    fn remove_leftovers(&self, folder: &str) -> Result<(usize, u64), BackendError> {
        let (mut count, mut bytes) = (0, 0);
        let mut stack = vec![self.path(folder)];
        while let Some(dir) = stack.pop() {
            let what = || dir.display().to_string();
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(BackendError::io(what(), e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| BackendError::io(what(), e))?;
                let kind = entry.file_type().map_err(|e| BackendError::io(what(), e))?;
                if kind.is_dir() {
                    stack.push(entry.path());
                } else if entry.file_name().as_encoded_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                    let len = entry.metadata().map_or(0, |m| m.len());
                    match fs::remove_file(entry.path()) {
                        Ok(()) => (count, bytes) = (count + 1, bytes + len),
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(BackendError::io(entry.path().display().to_string(), e)),
                    }
                }
            }
        }
        Ok((count, bytes))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        // Walk the folder part of the prefix; filter the rest by name.
        let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let mut out = Vec::new();
        let mut stack = vec![dir_part.to_string()];
        while let Some(rel) = stack.pop() {
            let dir = self.path(&rel);
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(BackendError::io(rel, e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| BackendError::io(rel.clone(), e))?;
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if file_name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let name = if rel.is_empty() { file_name } else { format!("{rel}/{file_name}") };
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Removed since the folder was read (a lock released, say).
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(BackendError::io(name, e)),
                };
                if meta.is_dir() {
                    if prefix.starts_with(&format!("{name}/")) || name.starts_with(prefix) {
                        stack.push(name);
                    }
                } else if name.starts_with(prefix) {
                    out.push(ObjectInfo { name, size: meta.len() });
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    Self::sync_dir(dir).map_err(|e| BackendError::io(name, e))?;
                }
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io(name, e)),
        }
    }

    fn stage(&self, folder: &str) -> Result<Option<Box<dyn Staged>>, BackendError> {
        let dir = self.path(folder);
        self.create_dirs(&dir).map_err(|e| BackendError::io(folder, e))?;
        let tmp = temporary_in(&dir);
        let file =
            OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| BackendError::io(folder, e))?;
        Ok(Some(Box::new(LocalStaged { backend: self.clone(), file, tmp, committed: false })))
    }
}

/// A fresh temporary name in `dir`.
fn temporary_in(dir: &Path) -> PathBuf {
    let mut suffix = [0u8; 8];
    crate::crypto::fill_random(&mut suffix);
    dir.join(format!("{TEMP_PREFIX}{}", hex::encode(suffix)))
}

/// An object being written to its temporary file.
struct LocalStaged {
    backend: LocalBackend,
    file: File,
    tmp: PathBuf,
    committed: bool,
}

impl Write for LocalStaged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Staged for LocalStaged {
    fn commit(mut self: Box<Self>, name: &str) -> Result<PutOutcome, BackendError> {
        let path = self.backend.path(name);
        let dir = path.parent().unwrap_or(&self.backend.root).to_path_buf();
        let durable = self.file.sync_all().and_then(|()| self.backend.create_dirs(&dir));
        durable.map_err(|e| BackendError::io(name, e))?;
        // From here the temporary is link_into_place's to remove, on success or failure.
        self.committed = true;
        LocalBackend::link_into_place(&self.tmp, name, &path, &dir)
    }
}

impl Drop for LocalStaged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_only_list_range_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().join("repo"));
        assert_eq!(b.put_if_absent("data/ab/abc", b"hello").unwrap(), PutOutcome::Created);
        assert_eq!(b.put_if_absent("data/ab/abc", b"other").unwrap(), PutOutcome::AlreadyExists);
        assert_eq!(b.get("data/ab/abc", None).unwrap(), b"hello");
        assert_eq!(b.get("data/ab/abc", Some(1..3)).unwrap(), b"el");
        assert!(b.get("data/ab/abc", Some(3..9)).is_err());
        b.put_if_absent("snapshots/s1", b"x").unwrap();
        let mut names: Vec<_> = b.list("data/").unwrap().into_iter().map(|o| o.name).collect();
        names.sort();
        assert_eq!(names, ["data/ab/abc"]);
        assert_eq!(b.list("snapshots/").unwrap()[0].size, 1);
        assert!(matches!(b.get("nope", None), Err(BackendError::NotFound(_))));
        b.delete("data/ab/abc").unwrap();
        b.delete("data/ab/abc").unwrap();
        assert!(b.list("data/").unwrap().is_empty());
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path().join("repo/data/ab")).unwrap().count(), 0);
    }

    /// A staged object is stored whole under the name given at commit, create-only, and neither
    /// a commit nor an abandoned stage leaves its temporary behind.
    #[test]
    fn staged_objects_commit_create_only_and_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().join("repo"));
        let mut s = b.stage("data/").unwrap().expect("local storage stages");
        s.write_all(b"hello ").unwrap();
        s.write_all(b"world").unwrap();
        assert_eq!(s.commit("data/cd/cdef").unwrap(), PutOutcome::Created);
        assert_eq!(b.get("data/cd/cdef", None).unwrap(), b"hello world");
        let mut again = b.stage("data/").unwrap().unwrap();
        again.write_all(b"other").unwrap();
        assert_eq!(again.commit("data/cd/cdef").unwrap(), PutOutcome::AlreadyExists);
        assert_eq!(b.get("data/cd/cdef", None).unwrap(), b"hello world");
        let mut abandoned = b.stage("data/").unwrap().unwrap();
        abandoned.write_all(b"never stored").unwrap();
        drop(abandoned);
        let left = |d: &str| {
            fs::read_dir(dir.path().join(d)).unwrap().filter(|e| e.as_ref().unwrap().path().is_file()).count()
        };
        assert_eq!((left("repo/data"), left("repo/data/cd")), (0, 1));
    }
}
