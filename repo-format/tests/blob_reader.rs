//! Reading a file back fetches the blobs it stored together in few requests: a request is an
//! open, a read and a close on a disk, or a round trip to S3.

mod common;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use repo_format::archive::ChunkedContent;
use repo_format::backend::{Backend, BackendError, MemoryBackend, ObjectInfo, PutOutcome};
use repo_format::blob_reader::READ_AHEAD;
use repo_format::fs::ContentReader;
use repo_format::repofile::tree::{Node, NodeKind};
use repo_format::{Repository, Writer};

/// A memory backend that counts the ranged reads of packs, and when `short` is set answers
/// them with half the bytes asked for, as an S3 server does for a range past a truncated object.
#[derive(Debug, Default)]
struct Counting {
    inner: MemoryBackend,
    pack_reads: AtomicUsize,
    short: AtomicBool,
}

impl Backend for Counting {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn get(&self, name: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
        let pack_range = name.starts_with("data/") && range.is_some();
        if pack_range {
            self.pack_reads.fetch_add(1, Ordering::Relaxed);
        }
        let mut got = self.inner.get(name, range)?;
        if pack_range && self.short.load(Ordering::Relaxed) {
            got.truncate(got.len() / 2);
        }
        Ok(got)
    }
    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        self.inner.put_if_absent(name, data)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.inner.list(prefix)
    }
    fn delete(&self, name: &str) -> Result<(), BackendError> {
        self.inner.delete(name)
    }
}

/// Text that compresses about threefold, in lines that differ.
fn text(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 100);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    while out.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(format!("row {x:x}\tuser{}\tsome words of the row {}\n", x % 5000, x % 977).as_bytes());
    }
    out.truncate(bytes);
    out
}

/// Store 6 MiB of text as one file with `workers` compression workers: the repository, the
/// file's node, its bytes and the write statistics.
fn store_text(backend: Arc<Counting>, workers: usize) -> (Repository, Node, Vec<u8>, repo_format::WriteStats) {
    let mut repo = Repository::init(backend.clone(), &common::test_options()).unwrap();
    let data = text(6 << 20);
    let mut w = Writer::new(&repo, workers);
    let mut content = ChunkedContent::new(repo.chunker(false).unwrap());
    content.push(&mut w, &data).unwrap();
    let content = content.finish(&mut w).unwrap();
    let (index, stats) = w.finish().unwrap();
    let (id, file) = index.unwrap();
    repo.add_index(id, &file);
    let node = Node {
        name: b"big.txt".to_vec(),
        kind: NodeKind::File as i32,
        size: content.size,
        content: content.chunks.clone(),
        blake3: content.blake3.to_vec(),
        ..Default::default()
    };
    (repo, node, data, stats)
}

/// Store 6 MiB of text as one file with `workers` compression workers and read it back:
/// (pack reads, chunks, packs, stored bytes).
fn read_back_counted(workers: usize) -> (usize, usize, u64, u64) {
    let backend = Arc::new(Counting::default());
    let (repo, node, data, stats) = store_text(backend.clone(), workers);
    let before = backend.pack_reads.load(Ordering::Relaxed);
    let mut back = Vec::new();
    ContentReader::default()
        .read(&repo, &node, &"big.txt", &mut |piece| {
            back.extend_from_slice(piece);
            Ok(())
        })
        .unwrap();
    let reads = backend.pack_reads.load(Ordering::Relaxed) - before;
    assert!(back == data, "the file reads back byte for byte");
    (reads, node.content.len(), stats.packs, stats.stored_bytes)
}

#[test]
fn a_file_stored_in_one_backup_reads_back_in_a_few_requests() {
    // One worker stores the chunks in order: each read takes a run of them from one pack, as
    // long as the run stays within READ_AHEAD, so a read covers all but at most one stored blob
    // (64 KiB of the test's largest chunk, plus its seal) of READ_AHEAD.
    let (reads, chunks, packs, stored) = read_back_counted(1);
    let bound = packs as usize + stored.div_ceil(READ_AHEAD - (65 << 10)) as usize;
    assert!(reads <= bound, "{reads} reads for {chunks} chunks in {packs} packs ({stored} stored bytes)");
    // Two workers append their batches in the order they finish them; the reads still take
    // whole neighbourhoods of a pack.
    let (reads, chunks, packs, stored) = read_back_counted(2);
    assert!(reads * 10 < chunks, "{reads} reads for {chunks} chunks in {packs} packs ({stored} stored bytes)");
}

/// A pack that comes back shorter than the blobs in it is reported as damage, not a crash.
#[test]
fn a_pack_read_back_short_is_an_error() {
    let backend = Arc::new(Counting::default());
    let (repo, node, _, _) = store_text(backend.clone(), 1);
    backend.short.store(true, Ordering::Relaxed);
    let err = ContentReader::default().read(&repo, &node, &"big.txt", &mut |_| Ok(())).unwrap_err();
    assert!(err.to_string().contains("shorter than blob"), "{err}");
}
