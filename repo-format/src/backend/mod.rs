//! Storage backends: where the repository's objects live.
//!
//! The contract is deliberately small so that it fits object storage (S3: no rename, no append)
//! as well as a local directory:
//!
//! | method | durability rule |
//! |---|---|
//! | [`Backend::put_if_absent`] | never overwrites; returns only once the object is durable; a reader sees the whole object or nothing |
//! | [`Backend::get`] | whole object or a byte range |
//! | [`Backend::list`] | names under a prefix (a folder such as `snapshots/`), with sizes |
//! | [`Backend::delete`] | removing a missing object is not an error |
//!
//! Object names are `/`-separated paths relative to the repository root, e.g. `data/ab/ab12…`.

mod local;
mod memory;
mod s3;

pub use local::LocalBackend;
pub use memory::MemoryBackend;
pub use s3::{S3Backend, S3Config};

use std::ops::Range;

/// An object name with its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Path relative to the repository root.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// What a create-only put found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was written.
    Created,
    /// An object of that name already existed and was left untouched.
    AlreadyExists,
}

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The object does not exist.
    #[error("{0}: no such object in the repository")]
    NotFound(String),
    /// An I/O error on one object.
    #[error("{path}: {err}")]
    Io {
        /// The object (or folder) concerned.
        path: String,
        /// The error (shown in the message, not repeated as a source).
        err: std::io::Error,
    },
}

impl BackendError {
    pub(crate) fn io(path: impl Into<String>, err: std::io::Error) -> Self {
        BackendError::Io { path: path.into(), err }
    }
}

/// An object written as it is produced and named once complete: a pack, whose name is the hash
/// of its bytes, so that a pack in flight need not be held in memory. Dropped without
/// [`Staged::commit`], it leaves at most what a crash would (a temporary that listings skip).
pub trait Staged: std::io::Write + Send {
    /// Make the bytes written durable and store them as `name`, create-only like
    /// [`Backend::put_if_absent`].
    fn commit(self: Box<Self>, name: &str) -> Result<PutOutcome, BackendError>;
}

/// A place to keep repository objects.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Human-readable location, for messages.
    fn location(&self) -> String;

    /// Read a whole object, or `range` of it.
    fn get(&self, name: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError>;

    /// Write an object unless one of that name exists. Durable on return.
    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<PutOutcome, BackendError>;

    /// Objects whose name starts with `prefix`, in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError>;

    /// Remove an object; a missing one is fine.
    fn delete(&self, name: &str) -> Result<(), BackendError>;

    /// Start an object to be stored under `folder` once complete, where the backend can write it
    /// as it comes (local files); `None`: the caller builds it in memory and puts it.
    fn stage(&self, _folder: &str) -> Result<Option<Box<dyn Staged>>, BackendError> {
        Ok(None)
    }

    /// Remove what interrupted writes left under `folder` (the local backend's temporaries,
    /// which listings skip and nothing else removes); returns how many and their bytes. Only
    /// where no one writes meanwhile: a writer at work has its own temporaries in the same places.
    fn remove_leftovers(&self, _folder: &str) -> Result<(usize, u64), BackendError> {
        Ok((0, 0))
    }
}
