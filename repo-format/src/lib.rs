//! magpie's repository: a content-defined-chunked, compressed, encrypted, deduplicated store.
//!
//! It knows nothing of agents or networks. `FORMAT.md` beside this crate specifies every byte.
//!
//! ```
//! use std::sync::Arc;
//! use repo_format::{backend::MemoryBackend, crypto::KdfParams, Repository, InitOptions, Writer};
//! let mut opts = InitOptions::encrypted("correct horse");
//! opts.kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 }; // fast for the example
//! let backend = Arc::new(MemoryBackend::new());
//! let mut repo = Repository::init(backend.clone(), &opts).unwrap();
//! let mut w = Writer::new(&repo, 2);
//! let id = w.add(repo_format::BlobKind::Data, b"hello".to_vec()).unwrap();
//! let (index, _stats) = w.finish().unwrap();
//! let (index_id, file) = index.unwrap();
//! repo.add_index(index_id, &file);
//! assert_eq!(repo.read_blob(&id).unwrap(), b"hello");
//! let reopened = Repository::open(backend, Some(b"correct horse")).unwrap();
//! assert_eq!(reopened.config().compression_level, 3);
//! ```
//!
//! # Locking
//!
//! | operation | lock | safe alongside |
//! |---|---|---|
//! | backup (write session + snapshot) | shared | other backups, check, restore: writers only add objects, never modify or delete |
//! | check (without repair), list, ls, restore | none or shared | everything but compact and repair may make a read fail (retry) |
//! | prune (delete snapshot objects) | exclusive | nothing |
//! | compact, check --repair | exclusive | nothing: they delete packs and index files |
//!
//! See [`locking`] for the protocol and stale-lock rules.

pub mod archive;
pub mod backend;
pub mod blob_reader;
pub mod chunker;
pub mod crypto;
pub mod error;
pub mod fs;
pub mod id;
pub mod index;
pub mod locking;
pub mod magic;
pub mod ops;
pub mod repofile;
pub mod repository;
pub mod retention;
pub mod writer;

pub use error::{Error, Result};
pub use id::Id;
pub use repofile::pack::BlobKind;
pub use repofile::snapshot::{DumpInfo, Snapshot, SnapshotStats, TableRows, newest_per_group};
pub use repository::{InitOptions, Repository};
pub use writer::{WriteStats, Writer};
