//! The write pipeline: blob ids are computed and deduplicated on the caller's thread; worker
//! threads compress, seal and append to a shared pack; full packs are written by the worker that
//! filled them; [`Writer::finish`] writes the last pack, then one index file naming them all.
//!
//! Dump blobs ([`Writer::add_dump`]) are compressed with a dictionary: the one given, or one
//! trained on the session's first [`TRAIN_BYTES`] of them, which wait until then; or, when the
//! caller knows which stored chunk a new one replaces ([`Writer::add_dump_against`]), against
//! that chunk.
//!
//! Blobs go to the workers in batches of about 256 KiB: a dump's small chunks sent one by one
//! cost a worker wake-up each.
//!
//! Memory is bounded by the queue (`2 × threads` batches of at most 256 KiB and one maximum
//! chunk each), the batch each worker is sealing, the dump blobs waiting for a dictionary and,
//! where the backend cannot stage packs (S3, memory), at most `threads + 1` packs in flight,
//! whatever the size of the input. On a local disk a pack is written to its temporary file as
//! blobs are added and holds no memory (a 2 GB pull peaked at 113 MB instead of 135 MB, with a
//! third fewer page faults; tests/bench).

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::backend::Backend;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::magic::Domain;
use crate::repofile::dictionary::{self, Dictionary, TRAIN_BYTES};
use crate::repofile::index::IndexFile;
use crate::repofile::pack::{self, BlobCompressor, BlobKind, PackBuilder, PackEntry};
use crate::repofile::{self as rf};
use crate::repository::{Repository, put_named};

/// What a write session added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// New blobs.
    pub blobs: u64,
    /// Their plaintext bytes.
    pub raw_bytes: u64,
    /// Their stored bytes.
    pub stored_bytes: u64,
    /// Packs written.
    pub packs: u64,
    /// The dictionary dump blobs were compressed with (storage id), if any.
    pub dictionary: Option<Id>,
}

/// Bytes of blobs sent to the workers together. Sent one by one, the 73k chunks of a 600 MB dump
/// woke a worker 73k times: 5% of the collector's CPU went to scheduling on a day-1 bench pull.
const BATCH_BYTES: usize = 256 << 10;

struct Job {
    kind: BlobKind,
    id: Id,
    data: Vec<u8>,
    dictionary: Option<Arc<Dictionary>>,
    /// A stored data blob without a base, and its plaintext, to compress against.
    base: Option<(Id, Arc<Vec<u8>>)>,
}

/// How this session compresses dump blobs.
enum DumpCompression {
    /// No dictionary yet: dump blobs wait here until there are enough of them to train one.
    Training { pending: Vec<Job>, bytes: usize },
    /// With this dictionary, or without one.
    Decided(Option<Arc<Dictionary>>),
}

#[derive(Default)]
struct Shared {
    packer: Mutex<PackBuilder>,
    written: Mutex<Vec<(Id, Vec<PackEntry>)>>,
    stats: Mutex<WriteStats>,
    error: Mutex<Option<Error>>,
}

struct Ctx {
    backend: Arc<dyn Backend>,
    keys: Keys,
    pack_size: usize,
    shared: Arc<Shared>,
}

impl Ctx {
    fn write_pack(&self, builder: PackBuilder) -> Result<()> {
        let (id, entries) = builder.store(&self.keys, &*self.backend)?;
        self.shared.stats.lock().expect("stats").packs += 1;
        self.shared.written.lock().expect("written").push((id, entries));
        Ok(())
    }

    /// An empty pack: staged in storage where the backend can, else in memory with room for the
    /// target plus one maximum blob, so that its buffer never doubles.
    fn next_pack(&self) -> Result<PackBuilder> {
        PackBuilder::staged_or_with_capacity(&*self.backend, self.pack_size + (4 << 20))
    }

    fn fail(&self, e: Error) {
        let mut slot = self.shared.error.lock().expect("error slot");
        if slot.is_none() {
            *slot = Some(e);
        }
    }
}

/// A write session on a repository.
pub struct Writer<'r> {
    repo: &'r Repository,
    ctx: Arc<Ctx>,
    tx: Option<SyncSender<Vec<Job>>>,
    /// Blobs not yet sent, and their bytes.
    batch: Vec<Job>,
    batch_bytes: usize,
    workers: Vec<JoinHandle<()>>,
    seen: HashSet<Id>,
    failed: bool,
    dumps: DumpCompression,
}

impl<'r> Writer<'r> {
    /// Start a session with `threads` compression workers (0: one per core).
    pub fn new(repo: &'r Repository, threads: usize) -> Writer<'r> {
        let threads =
            if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { threads };
        let ctx = Arc::new(Ctx {
            backend: repo.backend().clone(),
            keys: repo.keys().clone(),
            pack_size: repo.config().pack_size as usize,
            shared: Arc::new(Shared::default()),
        });
        // Should staging fail here, the first pack is built in memory; storing a pack reports
        // any error the storage keeps giving.
        if let Ok(first) = ctx.next_pack() {
            *ctx.shared.packer.lock().expect("packer") = first;
        }
        let (tx, rx) = sync_channel::<Vec<Job>>(threads * 2);
        let rx = Arc::new(Mutex::new(rx));
        let level = repo.config().compression_level;
        let workers = (0..threads)
            .map(|_| {
                let ctx = ctx.clone();
                let rx = rx.clone();
                std::thread::spawn(move || worker(&ctx, &rx, level))
            })
            .collect();
        let dumps = DumpCompression::Training { pending: Vec::new(), bytes: 0 };
        Writer {
            repo,
            ctx,
            tx: Some(tx),
            batch: Vec::new(),
            batch_bytes: 0,
            workers,
            seen: HashSet::new(),
            failed: false,
            dumps,
        }
    }

    /// The repository written to.
    pub fn repo(&self) -> &'r Repository {
        self.repo
    }

    /// Store a blob unless the repository (or this session) has it; returns its id.
    pub fn add(&mut self, kind: BlobKind, data: Vec<u8>) -> Result<Id> {
        let (id, new) = self.id_of(kind, &data);
        if new {
            self.send(Job { kind, id, data, dictionary: None, base: None })?;
        }
        Ok(id)
    }

    /// Store a data blob of database dump content, like [`Writer::add`] but compressed with the
    /// session's dump dictionary.
    pub fn add_dump(&mut self, data: Vec<u8>) -> Result<Id> {
        self.add_dump_job(data, None)
    }

    /// [`Writer::add_dump`] for a chunk that likely replaces the stored data blob `base`, whose
    /// plaintext is `base_plain`: compressed against it when that pays (see
    /// [`pack::encode_blob_against`]). A base that cannot be one (not stored, not data, or
    /// compressed against a base itself: bases are one level deep) is ignored.
    pub fn add_dump_against(&mut self, data: Vec<u8>, base: Id, base_plain: Arc<Vec<u8>>) -> Result<Id> {
        let usable = self.repo.unusable_base(&base).is_none()
            // zstd would parse such a base as a dictionary of its own format, not as content.
            && !base_plain.starts_with(&zstd::zstd_safe::MAGIC_DICTIONARY.to_le_bytes());
        self.add_dump_job(data, usable.then_some((base, base_plain)))
    }

    fn add_dump_job(&mut self, data: Vec<u8>, base: Option<(Id, Arc<Vec<u8>>)>) -> Result<Id> {
        let (id, new) = self.id_of(BlobKind::Data, &data);
        if !new {
            return Ok(id);
        }
        match &mut self.dumps {
            DumpCompression::Decided(d) => {
                let dictionary = d.clone();
                self.send(Job { kind: BlobKind::Data, id, data, dictionary, base })?;
            }
            DumpCompression::Training { pending, bytes } => {
                *bytes += data.len();
                let enough = *bytes >= TRAIN_BYTES;
                pending.push(Job { kind: BlobKind::Data, id, data, dictionary: None, base });
                if enough {
                    self.decide_dictionary()?;
                }
            }
        }
        Ok(id)
    }

    /// Compress dump blobs with the stored dictionary `id` (the one the source's previous
    /// snapshot used) instead of training one. Call it before the first [`Writer::add_dump`].
    pub fn use_dictionary(&mut self, id: &Id) -> Result<()> {
        let d = self.repo.dictionaries().load(id)?;
        self.dumps = DumpCompression::Decided(Some(d));
        Ok(())
    }

    /// A blob's id, and whether this session must store it (neither the repository nor the
    /// session has it yet).
    fn id_of(&mut self, kind: BlobKind, data: &[u8]) -> (Id, bool) {
        let id = self.repo.keys().blob_id(kind, data);
        (id, !self.repo.index().contains(&id) && self.seen.insert(id))
    }

    fn send(&mut self, job: Job) -> Result<()> {
        self.check_error()?;
        self.batch_bytes += job.data.len();
        self.batch.push(job);
        if self.batch_bytes >= BATCH_BYTES { self.send_batch() } else { Ok(()) }
    }

    fn send_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.batch_bytes = 0;
        let tx = self.tx.as_ref().expect("writer used after finish");
        if tx.send(std::mem::take(&mut self.batch)).is_err() {
            self.check_error()?;
            return Err(Error::Invalid("write workers stopped".into()));
        }
        Ok(())
    }

    /// Train the dump dictionary on the waiting dump blobs (none when they are too few), store
    /// it before any blob compressed with it, then send them.
    fn decide_dictionary(&mut self) -> Result<()> {
        let pending = match &mut self.dumps {
            DumpCompression::Training { pending, .. } => std::mem::take(pending),
            DumpCompression::Decided(_) => return Ok(()),
        };
        let sizes: Vec<usize> = pending.iter().map(|j| j.data.len()).collect();
        let samples = pending.iter().map(|j| j.data.as_slice()).collect::<Vec<_>>().concat();
        let dictionary = match dictionary::train(&samples, &sizes) {
            Some(raw) => Some(self.repo.dictionaries().store(raw)?),
            None => None,
        };
        self.dumps = DumpCompression::Decided(dictionary.clone());
        for job in pending {
            self.send(Job { dictionary: dictionary.clone(), ..job })?;
        }
        Ok(())
    }

    /// The first worker error, once; afterwards every call fails, so that a session that lost
    /// a pack can never finish as if it had not.
    fn check_error(&mut self) -> Result<()> {
        if self.failed {
            return Err(Error::Invalid("an earlier write of this session failed".into()));
        }
        match self.ctx.shared.error.lock().expect("error slot").take() {
            Some(e) => {
                self.failed = true;
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Write the last pack and the index file; the blobs are then durable and indexed, and a
    /// snapshot referencing them may be committed. Returns the index file's id and content.
    pub fn finish(mut self) -> Result<(Option<(Id, IndexFile)>, WriteStats)> {
        self.decide_dictionary()?;
        self.send_batch()?;
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                self.ctx.fail(Error::Invalid("a write worker panicked".into()));
            }
        }
        self.check_error()?;
        let last = std::mem::take(&mut *self.ctx.shared.packer.lock().expect("packer"));
        if !last.is_empty() {
            self.ctx.write_pack(last)?;
        }
        let packs = std::mem::take(&mut *self.ctx.shared.written.lock().expect("written"));
        let mut stats = *self.ctx.shared.stats.lock().expect("stats");
        if let DumpCompression::Decided(Some(d)) = &self.dumps {
            stats.dictionary = Some(d.id());
        }
        if packs.is_empty() {
            return Ok((None, stats));
        }
        let file = IndexFile { supersedes: Vec::new(), packs };
        let id = put_named(&*self.ctx.backend, rf::INDEX_DIR, &self.ctx.keys.seal(Domain::Index, &file.encode()))?;
        Ok((Some((id, file)), stats))
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(ctx: &Ctx, rx: &Mutex<Receiver<Vec<Job>>>, level: i32) {
    let mut compressor = match BlobCompressor::new(level) {
        Ok(c) => c,
        Err(e) => return ctx.fail(e),
    };
    loop {
        let jobs = match rx.lock().expect("job queue").recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let sealed: Vec<(Vec<u8>, Option<Id>)> = jobs
            .iter()
            .map(|j| match &j.base {
                Some((base, plain)) => {
                    let dictionary = j.dictionary.as_deref();
                    let (sealed, used) =
                        pack::encode_blob_against(&ctx.keys, &j.data, &mut compressor, dictionary, plain);
                    (sealed, used.then_some(*base))
                }
                None => {
                    let dictionary = j.dictionary.as_deref();
                    (pack::encode_blob(&ctx.keys, j.kind, &j.data, Some(&mut compressor), dictionary), None)
                }
            })
            .collect();
        let full = {
            let mut p = ctx.shared.packer.lock().expect("packer");
            let mut s = ctx.shared.stats.lock().expect("stats");
            let mut full = Vec::new();
            for (job, (sealed, base)) in jobs.iter().zip(&sealed) {
                p.add(job.kind, job.id, sealed, job.data.len() as u32, *base);
                s.blobs += 1;
                s.raw_bytes += job.data.len() as u64;
                s.stored_bytes += sealed.len() as u64;
                if p.len() >= ctx.pack_size {
                    full.push(ctx.next_pack().map(|next| std::mem::replace(&mut *p, next)));
                }
            }
            full
        };
        for builder in full {
            if let Err(e) = builder.and_then(|b| ctx.write_pack(b)) {
                return ctx.fail(e);
            }
        }
    }
}
