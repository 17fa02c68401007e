//! Opening, creating and reading a repository.

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;

use crate::backend::{Backend, BackendError, PutOutcome};
use crate::chunker::{Chunker, ChunkerParams};
use crate::crypto::{KdfParams, Keys};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Location, MasterIndex};
use crate::magic::{self, Domain};
use crate::repofile::config::{self, RepoConfig};
use crate::repofile::dictionary::Dictionaries;
use crate::repofile::index::IndexFile;
use crate::repofile::pack::{self, BlobKind};
use crate::repofile::snapshot::Snapshot;
use crate::repofile::tree::Tree;
use crate::repofile::{self as rf, key};

/// A decoded index file with its storage id.
pub type IndexFileEntry = (Id, IndexFile);

/// Parameters fixed at `init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// `None` makes an unencrypted repository (never the default of the CLI).
    pub passphrase: Option<Vec<u8>>,
    /// Argon2id costs for the first key.
    pub kdf: KdfParams,
    /// zstd level, 1..=22.
    pub compression_level: i32,
    /// Target pack size in bytes.
    pub pack_size: u32,
    /// Chunk sizes for files.
    pub chunker_files: ChunkerParams,
    /// Chunk sizes for dumps.
    pub chunker_dumps: ChunkerParams,
    /// Files below this size share chunks.
    pub small_file_threshold: u32,
}

impl InitOptions {
    /// Defaults for an encrypted repository.
    pub fn encrypted(passphrase: impl Into<Vec<u8>>) -> InitOptions {
        InitOptions {
            passphrase: Some(passphrase.into()),
            kdf: KdfParams::default(),
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            pack_size: DEFAULT_PACK_SIZE,
            chunker_files: ChunkerParams::FILES,
            chunker_dumps: ChunkerParams::DUMPS,
            small_file_threshold: DEFAULT_SMALL_FILE_THRESHOLD,
        }
    }
}

/// zstd level for new repositories (see FORMAT.md, "Compression", for the measurement).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;
/// Target pack size: 16 MiB keeps a 50 TB repository at a few million objects, and the writer's
/// packs in flight (one filling, one per worker being written) under 50 MiB of memory.
pub const DEFAULT_PACK_SIZE: u32 = 16 * 1024 * 1024;
/// Files below 16 KiB share chunks with their neighbours (see ARCHITECTURE.md, "Small files").
pub const DEFAULT_SMALL_FILE_THRESHOLD: u32 = 16 * 1024;

/// An open repository.
#[derive(Debug)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    keys: Keys,
    config: RepoConfig,
    index: MasterIndex,
    /// Index files read by the last [`Repository::load_index`] (not superseded).
    index_files: Vec<Id>,
    /// Shared with [`Repository::session`] handles.
    dictionaries: Arc<Dictionaries>,
}

impl Repository {
    /// Create a repository in an empty backend.
    pub fn init(backend: Arc<dyn Backend>, opts: &InitOptions) -> Result<Repository> {
        if backend.list(rf::CONFIG_NAME)?.iter().any(|o| o.name == rf::CONFIG_NAME) {
            return Err(Error::AlreadyInitialised { location: backend.location() });
        }
        opts.chunker_files.validate()?;
        opts.chunker_dumps.validate()?;
        if !(1..=22).contains(&opts.compression_level) {
            return Err(Error::Invalid(format!("compression level {} is not in 1..=22", opts.compression_level)));
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&opts.pack_size) {
            return Err(Error::Invalid("pack size must be between 1 MiB and 1 GiB".into()));
        }
        let keys = Keys::generate(opts.passphrase.is_some());
        let cfg = RepoConfig {
            version: magic::REPO_VERSION,
            id: Id::random().0.to_vec(),
            created_unix: chrono::Utc::now().timestamp(),
            chunker_files: Some(opts.chunker_files.into()),
            chunker_dumps: Some(opts.chunker_dumps.into()),
            compression_level: opts.compression_level,
            pack_size: opts.pack_size,
            small_file_threshold: opts.small_file_threshold,
            plain_master_secret: if keys.encrypted() { Vec::new() } else { keys.master().to_vec() },
        };
        if let Some(pass) = &opts.passphrase {
            let kf = key::wrap(&keys, pass, opts.kdf, &hostname())?;
            put_named(&*backend, rf::KEY_DIR, &kf.encode_to_vec())?;
        }
        // The config goes last: a repository exists once its config does.
        if backend.put_if_absent(rf::CONFIG_NAME, &config::encode(&cfg, &keys))? == PutOutcome::AlreadyExists {
            return Err(Error::AlreadyInitialised { location: backend.location() });
        }
        Ok(Repository::new(backend, keys, cfg))
    }

    /// Open a repository; the passphrase is needed unless it is unencrypted.
    pub fn open(backend: Arc<dyn Backend>, passphrase: Option<&[u8]>) -> Result<Repository> {
        let raw = match backend.get(rf::CONFIG_NAME, None) {
            Ok(b) => b,
            Err(BackendError::NotFound(_)) => {
                return Err(Error::NoRepository { location: backend.location() });
            }
            Err(e) => return Err(e.into()),
        };
        let head = config::parse_head(&raw)?;
        let keys = if head.cipher == magic::CIPHER_NONE {
            let cfg = RepoConfig::decode(head.payload).map_err(|e| Error::corrupt("config", e))?;
            let master: [u8; 32] = cfg
                .plain_master_secret
                .as_slice()
                .try_into()
                .map_err(|_| Error::corrupt("config", "unencrypted repository without its 32-byte secret"))?;
            Keys::from_master(zeroize::Zeroizing::new(master), false)
        } else {
            let pass = passphrase.ok_or_else(|| Error::Invalid(
                "this repository is encrypted: give a passphrase (--passphrase-file, MAGPIE_PASSPHRASE or the systemd credential magpie-passphrase)".into(),
            ))?;
            Self::unlock_keys(&*backend, pass)?
        };
        let config = config::decode_payload(head.payload, &keys)?;
        if config.version > magic::REPO_VERSION {
            return Err(Error::UnsupportedVersion {
                object: "config".into(),
                found: config.version,
                supported: magic::REPO_VERSION,
            });
        }
        Ok(Repository::new(backend, keys, config))
    }

    fn new(backend: Arc<dyn Backend>, keys: Keys, config: RepoConfig) -> Repository {
        let dictionaries = Arc::new(Dictionaries::new(backend.clone(), keys.clone(), config.compression_level));
        Repository { backend, keys, config, index: MasterIndex::new(), index_files: Vec::new(), dictionaries }
    }

    fn unlock_keys(backend: &dyn Backend, pass: &[u8]) -> Result<Keys> {
        let mut names = backend.list(rf::KEY_DIR)?;
        names.sort_by(|a, b| a.name.cmp(&b.name));
        let mut unreadable = None;
        for o in &names {
            // A damaged or newer key file must not hide a good one: try them all.
            match backend.get(&o.name, None).map_err(Error::from).and_then(|b| key::unwrap(&o.name, &b, pass)) {
                Ok(Some(k)) => return Ok(k),
                Ok(None) => {}
                Err(e) => unreadable = Some(e),
            }
        }
        match unreadable {
            Some(e) if names.len() == 1 => Err(e),
            _ => Err(Error::WrongPassphrase { location: backend.location() }),
        }
    }

    /// Another handle on the same repository, with the same keys and an empty index: for a
    /// concurrent write session, without deriving the key again.
    pub fn session(&self) -> Repository {
        Repository {
            backend: self.backend.clone(),
            keys: self.keys.clone(),
            config: self.config.clone(),
            index: MasterIndex::new(),
            index_files: Vec::new(),
            dictionaries: self.dictionaries.clone(),
        }
    }

    /// The storage backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The fixed parameters.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The resident index (load it first).
    pub fn index(&self) -> &MasterIndex {
        &self.index
    }

    /// The compression dictionaries.
    pub fn dictionaries(&self) -> &Dictionaries {
        &self.dictionaries
    }

    /// Index files behind the resident index.
    pub fn index_files(&self) -> &[Id] {
        &self.index_files
    }

    /// A chunker for files or dumps.
    pub fn chunker(&self, dumps: bool) -> Result<Chunker> {
        let p = if dumps { self.config.dumps_params() } else { self.config.files_params() };
        Chunker::new(p, self.keys.chunker_seed())
    }

    /// Read, verify and open a content-addressed object (`dir` + storage id).
    pub fn read_object(&self, name: &str, domain: Domain) -> Result<Vec<u8>> {
        read_named(&*self.backend, &self.keys, name, domain)
    }

    /// Seal and store an object under `dir/<storage id>`.
    pub fn write_object(&self, dir: &str, domain: Domain, plain: &[u8]) -> Result<Id> {
        put_named(&*self.backend, dir, &self.keys.seal(domain, plain))
    }

    /// Load every index file not superseded by another.
    pub fn load_index(&mut self) -> Result<()> {
        let (files, bad) = self.read_index_files()?;
        if let Some(e) = bad.into_iter().next() {
            return Err(match e {
                Error::Corrupt { object, reason } => Error::Corrupt {
                    object,
                    reason: format!("{reason}; run `collector check --repair` to rebuild the index from the packs"),
                },
                e => e,
            });
        }
        self.install_index(&files);
        Ok(())
    }

    /// Make the resident index from decoded index files, skipping superseded ones.
    pub fn install_index(&mut self, files: &[IndexFileEntry]) {
        let superseded: HashSet<Id> = files.iter().flat_map(|(_, f)| f.supersedes.iter().copied()).collect();
        let mut index = MasterIndex::new();
        let mut names = Vec::new();
        for (id, f) in files.iter().filter(|(id, _)| !superseded.contains(id)) {
            index.add_file(f);
            names.push(*id);
        }
        index.finalize();
        self.index = index;
        self.index_files = names;
    }

    /// Decode every index file. Unreadable ones are returned apart (for check and repair);
    /// `load_index` fails on the first.
    pub fn read_index_files(&self) -> Result<(Vec<IndexFileEntry>, Vec<Error>)> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let mut objs = self.backend.list(rf::INDEX_DIR)?;
        objs.sort_by(|a, b| a.name.cmp(&b.name));
        for o in objs {
            let Some(id) = rf::id_of_name(&o.name) else {
                continue;
            };
            match self.read_object(&o.name, Domain::Index).and_then(|p| IndexFile::decode(&o.name, &p)) {
                Ok(f) => ok.push((id, f)),
                Err(e) => bad.push(e),
            }
        }
        Ok((ok, bad))
    }

    /// Add a freshly written index file to the resident index.
    pub fn add_index(&mut self, id: Id, file: &IndexFile) {
        self.index.add_file(file);
        self.index.finalize();
        self.index_files.push(id);
    }

    /// Where a blob is.
    pub fn locate(&self, id: &Id) -> Result<Location> {
        self.index.get(id).ok_or(Error::BlobMissing(*id))
    }

    /// Read, open, decompress and verify one blob.
    pub fn read_blob(&self, id: &Id) -> Result<Vec<u8>> {
        self.read_blob_flagged(id).map(|(raw, _)| raw)
    }

    /// [`Repository::read_blob`], and whether the blob was compressed with a dictionary, as
    /// database dump content is (FORMAT.md §12): a copy into another repository keeps it so.
    pub fn read_dump_aware(&self, id: &Id) -> Result<(Vec<u8>, bool)> {
        self.read_blob_flagged(id)
            .map(|(raw, flag)| (raw, matches!(flag, magic::COMPRESSION_ZSTD_DICTIONARY | magic::COMPRESSION_ZSTD_BASE)))
    }

    fn read_blob_flagged(&self, id: &Id) -> Result<(Vec<u8>, u8)> {
        let loc = self.locate(id)?;
        let stored = self.read_pack_range(&loc.pack, loc.entry.range())?;
        self.decode_blob(&loc, &stored, pack::Check::Id)
    }

    /// Stored bytes of a pack: one blob's, or a run of blobs' (see [`crate::blob_reader`]).
    pub fn read_pack_range(&self, pack: &Id, range: std::ops::Range<u64>) -> Result<Vec<u8>> {
        Ok(self.backend.get(&rf::pack_name(pack), Some(range))?)
    }

    /// Open, decompress and check (as `check` says) the stored bytes of the blob at `loc`, reading
    /// its base first if it has one; with its compression flag.
    pub fn decode_blob(&self, loc: &Location, stored: &[u8], check: pack::Check) -> Result<(Vec<u8>, u8)> {
        let base = loc.entry.base.map(|b| self.read_base(&loc.entry.id, &b)).transpose()?;
        self.decode_blob_against(loc, stored, check, base.as_deref())
    }

    /// [`Repository::decode_blob`] with the plaintext of the blob's base, if it has one, at hand.
    pub fn decode_blob_against(
        &self,
        loc: &Location,
        stored: &[u8],
        check: pack::Check,
        base: Option<&[u8]>,
    ) -> Result<(Vec<u8>, u8)> {
        pack::decode_blob_flagged(&self.keys, &self.dictionaries, &loc.entry, stored, base, check).map_err(
            |e| match e {
                Error::Corrupt { object, reason } => {
                    Error::Corrupt { object: format!("{object} in pack {}", loc.pack), reason }
                }
                e => e,
            },
        )
    }

    /// Why `base` cannot be a blob's base, or `None` if it can: a base is an indexed data blob
    /// without a base of its own (bases are one level deep, so a blob is never more than two
    /// reads away).
    pub fn unusable_base(&self, base: &Id) -> Option<&'static str> {
        match self.index.get(base) {
            None => Some("is missing"),
            Some(loc) if loc.entry.kind != BlobKind::Data => Some("is not a data blob"),
            Some(loc) if loc.entry.base.is_some() => Some("has a base of its own (bases are one level deep)"),
            Some(_) => None,
        }
    }

    /// The plaintext of `base`, the base of blob `of`.
    pub fn read_base(&self, of: &Id, base: &Id) -> Result<Vec<u8>> {
        if let Some(why) = self.unusable_base(base) {
            return Err(Error::corrupt(format!("blob {of}"), format!("its base {base} {why}")));
        }
        self.read_blob(base)
    }

    /// Read and decode a tree blob.
    pub fn read_tree(&self, id: &Id) -> Result<Tree> {
        let loc = self.locate(id)?;
        if loc.entry.kind != BlobKind::Tree {
            return Err(Error::corrupt(format!("blob {id}"), "is not a tree"));
        }
        let raw = self.read_blob(id)?;
        let tree = Tree::decode(raw.as_slice()).map_err(|e| Error::corrupt(format!("tree {id}"), e))?;
        if tree.version > magic::METADATA_VERSION {
            return Err(Error::UnsupportedVersion {
                object: format!("tree {id}"),
                found: tree.version,
                supported: magic::METADATA_VERSION,
            });
        }
        Ok(tree)
    }

    /// Commit a snapshot: the last write of a backup.
    pub fn save_snapshot(&self, snap: &Snapshot) -> Result<Id> {
        self.write_object(rf::SNAPSHOT_DIR, Domain::Snapshot, &snap.to_bytes())
    }

    /// Read one snapshot.
    pub fn load_snapshot(&self, id: &Id) -> Result<Snapshot> {
        let name = format!("{}{id}", rf::SNAPSHOT_DIR);
        let plain = self.read_object(&name, Domain::Snapshot)?;
        let s = Snapshot::decode(plain.as_slice()).map_err(|e| Error::corrupt(&name, e))?;
        if s.version > magic::METADATA_VERSION {
            return Err(Error::UnsupportedVersion {
                object: name,
                found: s.version,
                supported: magic::METADATA_VERSION,
            });
        }
        Ok(s)
    }

    /// Ids of all snapshots.
    pub fn snapshot_ids(&self) -> Result<Vec<Id>> {
        ids_in(&*self.backend, rf::SNAPSHOT_DIR)
    }

    /// All snapshots, oldest first; fails on the first unreadable one.
    pub fn snapshots(&self) -> Result<Vec<(Id, Snapshot)>> {
        let mut out = self
            .snapshot_ids()?
            .into_iter()
            .map(|id| Ok((id, self.load_snapshot(&id)?)))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|(id, s)| (s.time_ns, *id));
        Ok(out)
    }

    /// Stored bytes of every object (packs, index files, snapshots, keys, dictionaries).
    pub fn stored_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for dir in [rf::DATA_DIR, rf::INDEX_DIR, rf::SNAPSHOT_DIR, rf::KEY_DIR, rf::DICT_DIR] {
            total += self.backend.list(dir)?.iter().map(|o| o.size).sum::<u64>();
        }
        Ok(total)
    }

    /// Resolve `latest`, a full id or a unique hex prefix.
    pub fn find_snapshot(&self, what: &str) -> Result<Id> {
        if what == "latest" {
            return self.snapshots()?.last().map(|(id, _)| *id).ok_or_else(|| Error::SnapshotNotFound(what.into()));
        }
        let want = what.to_ascii_lowercase();
        let matches: Vec<Id> = self.snapshot_ids()?.into_iter().filter(|id| id.to_hex().starts_with(&want)).collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::SnapshotNotFound(what.into())),
            _ => Err(Error::AmbiguousSnapshot(what.into())),
        }
    }

    /// Remove a snapshot object (its data stays until `compact`).
    pub fn delete_snapshot(&self, id: &Id) -> Result<()> {
        Ok(self.backend.delete(&format!("{}{id}", rf::SNAPSHOT_DIR))?)
    }

    /// Replace the passphrase: the new key file is written before the old ones are removed, so a
    /// crash in between leaves both passphrases working.
    pub fn change_passphrase(&self, new: &[u8], kdf: KdfParams) -> Result<()> {
        if !self.keys.encrypted() {
            return Err(Error::Invalid("this repository is not encrypted; it has no passphrase".into()));
        }
        let old: Vec<String> = self.backend.list(rf::KEY_DIR)?.into_iter().map(|o| o.name).collect();
        let kf = key::wrap(&self.keys, new, kdf, &hostname())?;
        let new_id = put_named(&*self.backend, rf::KEY_DIR, &kf.encode_to_vec())?;
        for name in old.iter().filter(|n| rf::id_of_name(n) != Some(new_id)) {
            self.backend.delete(name)?;
        }
        Ok(())
    }
}

/// Read, verify and open `name` (`dir/<storage id>`): its bytes must hash to its name.
pub(crate) fn read_named(backend: &dyn Backend, keys: &Keys, name: &str, domain: Domain) -> Result<Vec<u8>> {
    let bytes = backend.get(name, None)?;
    let want = rf::id_of_name(name).ok_or_else(|| Error::corrupt(name, "name is not a storage id"))?;
    if Id::of_stored(&bytes) != want {
        return Err(Error::corrupt(name, "content does not match its name (BLAKE3)"));
    }
    keys.open(domain, &bytes).ok_or_else(|| Error::corrupt(name, "authentication failed"))
}

/// Storage ids of the objects in `dir`, sorted.
pub(crate) fn ids_in(backend: &dyn Backend, dir: &str) -> Result<Vec<Id>> {
    let mut ids: Vec<Id> = backend.list(dir)?.iter().filter_map(|o| rf::id_of_name(&o.name)).collect();
    ids.sort();
    Ok(ids)
}

/// Store bytes under `dir/<storage id>`.
pub(crate) fn put_named(backend: &dyn Backend, dir: &str, bytes: &[u8]) -> Result<Id> {
    let id = Id::of_stored(bytes);
    backend.put_if_absent(&format!("{dir}{id}"), bytes)?;
    Ok(id)
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
