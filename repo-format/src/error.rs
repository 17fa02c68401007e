//! The crate's public error type.
//!
//! Policy: every variant names the object it concerns (a storage path, a blob id, a snapshot id) so
//! that the one line an operator sees says what is wrong and where. Variants are grouped by what an
//! operator can do about them; the CLI maps them to exit codes. Lower layers (backends) have their
//! own small error types that convert into this one at the repository boundary.

use crate::backend::BackendError;
use crate::id::Id;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while using a repository.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The storage backend failed (I/O, permissions, missing object).
    #[error(transparent)]
    Backend(#[from] BackendError),

    /// No key file could be opened with the passphrase given.
    #[error("wrong passphrase: no key in {location} opens with it (check --passphrase-file or MAGPIE_PASSPHRASE)")]
    WrongPassphrase {
        /// Where the repository is.
        location: String,
    },

    /// The repository has no `config` object: it was never initialised.
    #[error("no repository at {location}: run `collector init` first")]
    NoRepository {
        /// Where the repository was looked for.
        location: String,
    },

    /// `init` found an existing repository.
    #[error("a repository already exists at {location}")]
    AlreadyInitialised {
        /// Where the repository is.
        location: String,
    },

    /// The repository was written by a newer format version.
    #[error("{object}: format version {found} is newer than this program supports ({supported}); upgrade magpie")]
    UnsupportedVersion {
        /// The object carrying the version.
        object: String,
        /// The version found.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },

    /// An object failed authentication, decoding or its content hash.
    #[error("{object} is corrupt: {reason}")]
    Corrupt {
        /// The damaged object (storage path or blob id).
        object: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A blob id is not in any index.
    #[error("blob {0} is not in the index (run `collector check`)")]
    BlobMissing(Id),

    /// A snapshot reference did not resolve.
    #[error("no snapshot matches {0:?}")]
    SnapshotNotFound(String),

    /// A snapshot id prefix matched more than one snapshot.
    #[error("snapshot prefix {0:?} is ambiguous: give more hex digits")]
    AmbiguousSnapshot(String),

    /// A lock is held by another process.
    #[error("repository is locked by {holder}; {advice}")]
    Locked {
        /// Who holds the lock.
        holder: String,
        /// What to do about it.
        advice: String,
    },

    /// Invalid parameters (chunker sizes, compression level, paths).
    #[error("invalid argument: {0}")]
    Invalid(String),

    /// Local file system access while importing or restoring a directory.
    #[error("{path}: {err}")]
    Io {
        /// The local path.
        path: String,
        /// The underlying error (shown in the message, not repeated as a source).
        err: std::io::Error,
    },
}

impl Error {
    pub(crate) fn corrupt(object: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        Error::Corrupt { object: object.to_string(), reason: reason.to_string() }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, err: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), err }
    }
}
