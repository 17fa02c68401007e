//! The write pipeline: blob ids are computed and deduplicated on the caller's thread; worker
//! threads compress, seal and append to a shared pack; full packs are written by the worker that
//! filled them; [`Writer::finish`] writes the last pack, then one index file naming them all.
//!
//! Memory is bounded by the queue (`2 × threads` blobs of at most one maximum chunk each) and at
//! most `threads + 1` packs in flight, whatever the size of the input.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::backend::Backend;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::magic::Domain;
use crate::repofile::index::IndexFile;
use crate::repofile::pack::{self, BlobKind, PackBuilder, PackEntry};
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
}

struct Job {
    kind: BlobKind,
    id: Id,
    data: Vec<u8>,
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
        let (bytes, id, entries) = builder.finish(&self.keys);
        self.backend.put_if_absent(&rf::pack_name(&id), &bytes)?;
        self.shared.stats.lock().expect("stats").packs += 1;
        self.shared.written.lock().expect("written").push((id, entries));
        Ok(())
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
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    seen: HashSet<Id>,
    failed: bool,
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
        let (tx, rx) = sync_channel::<Job>(threads * 2);
        let rx = Arc::new(Mutex::new(rx));
        let level = repo.config().compression_level;
        let workers = (0..threads)
            .map(|_| {
                let ctx = ctx.clone();
                let rx = rx.clone();
                std::thread::spawn(move || worker(&ctx, &rx, level))
            })
            .collect();
        Writer { repo, ctx, tx: Some(tx), workers, seen: HashSet::new(), failed: false }
    }

    /// The repository written to.
    pub fn repo(&self) -> &'r Repository {
        self.repo
    }

    /// Store a blob unless the repository (or this session) has it; returns its id.
    pub fn add(&mut self, kind: BlobKind, data: Vec<u8>) -> Result<Id> {
        let id = self.repo.keys().blob_id(kind, &data);
        if self.repo.index().contains(&id) || !self.seen.insert(id) {
            return Ok(id);
        }
        self.check_error()?;
        let tx = self.tx.as_ref().expect("writer used after finish");
        if tx.send(Job { kind, id, data }).is_err() {
            self.check_error()?;
            return Err(Error::Invalid("write workers stopped".into()));
        }
        Ok(id)
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
        let stats = *self.ctx.shared.stats.lock().expect("stats");
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

fn worker(ctx: &Ctx, rx: &Mutex<Receiver<Job>>, level: i32) {
    let mut compressor = match zstd::bulk::Compressor::new(level) {
        Ok(c) => c,
        Err(e) => return ctx.fail(Error::Invalid(format!("zstd level {level}: {e}"))),
    };
    loop {
        let job = match rx.lock().expect("job queue").recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let sealed = pack::encode_blob(&ctx.keys, job.kind, &job.data, Some(&mut compressor));
        let full = {
            let mut p = ctx.shared.packer.lock().expect("packer");
            p.add(job.kind, job.id, &sealed, job.data.len() as u32);
            let mut s = ctx.shared.stats.lock().expect("stats");
            s.blobs += 1;
            s.raw_bytes += job.data.len() as u64;
            s.stored_bytes += sealed.len() as u64;
            // Room for the target plus one maximum blob, so the buffer never doubles.
            (p.len() >= ctx.pack_size)
                .then(|| std::mem::replace(&mut *p, PackBuilder::with_capacity(ctx.pack_size + (4 << 20))))
        };
        if let Some(builder) = full
            && let Err(e) = ctx.write_pack(builder)
        {
            return ctx.fail(e);
        }
    }
}
