//! Turning content into blobs: large files and dumps are chunked one by one; small files are
//! concatenated into one stream per directory so that they share chunks (and a compression
//! context), each file then pointing at byte ranges of those chunks.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::path::Path;
use std::sync::Arc;

use crate::chunker::Chunker;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::repofile::pack::BlobKind;
use crate::repofile::tree::ChunkRef;
use crate::writer::Writer;

/// Read size: large enough to keep the chunker fed with few system calls.
const READ_SIZE: usize = 1 << 20;

/// A file's content as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileContent {
    /// Byte ranges of data blobs, in order.
    pub chunks: Vec<ChunkRef>,
    /// Total length.
    pub size: u64,
    /// Unkeyed BLAKE3 of the content.
    pub blake3: [u8; 32],
}

/// A stretch of new content copied from a stored data blob, as an rsync delta's copy commands
/// say: the chunk cut around it is likely a changed version of that blob.
#[derive(Clone, Debug)]
pub struct Origin {
    /// Offset of the stretch in the new content.
    pub at: u64,
    /// Its length.
    pub len: u64,
    /// The blob it was copied from.
    pub blob: Id,
    /// Where in that blob's plaintext the stretch starts.
    pub from: u64,
    /// Whether the stretch is the whole blob: the new content then most likely holds it
    /// unchanged.
    pub whole: bool,
    /// The blob a changed version of this one is compressed against, and its plaintext: this
    /// blob, or its base if it has one (bases are one level deep, so a chunk changed day after
    /// day keeps the first version as base). `None` for a whole stretch: a duplicate needs no
    /// base, and holding every such blob until it is cut cost the collector 25 MiB on the
    /// bench's day 2.
    pub base: Option<(Id, Arc<Vec<u8>>)>,
}

/// Where a dump chunk's bytes come from, as the origins say.
enum ChunkOrigin {
    /// Exactly one stored blob, whole.
    Copy(Id),
    /// Mostly a stored blob, changed: the blob to compress it against, and its plaintext.
    Changed(Id, Arc<Vec<u8>>),
    /// Nothing known.
    New,
}

/// How much of a piece [`ChunkedContent::push`] buffers before cutting.
const PART: usize = 1 << 20;

/// Content arriving in pieces (from a file or the network), chunked as it comes: memory stays at
/// one maximum chunk plus 1 MiB, whatever the total length and the size of the pieces.
pub struct ChunkedContent {
    chunker: Chunker,
    /// Database dump content: stored with [`Writer::add_dump`].
    dump: bool,
    buf: Vec<u8>,
    hasher: blake3::Hasher,
    out: FileContent,
    /// Where the content not yet cut came from, in order (dumps only).
    origins: VecDeque<Origin>,
}

impl ChunkedContent {
    /// Start a new content with `chunker`'s sizes.
    pub fn new(chunker: Chunker) -> ChunkedContent {
        ChunkedContent {
            chunker,
            dump: false,
            buf: Vec::new(),
            hasher: blake3::Hasher::new(),
            out: FileContent::default(),
            origins: VecDeque::new(),
        }
    }

    /// Start a new database dump content: its chunks are compressed with the dump dictionary.
    pub fn dump(chunker: Chunker) -> ChunkedContent {
        ChunkedContent { dump: true, ..ChunkedContent::new(chunker) }
    }

    /// Whether this is database dump content.
    pub fn is_dump(&self) -> bool {
        self.dump
    }

    /// Add the next piece.
    pub fn push(&mut self, w: &mut Writer<'_>, piece: &[u8]) -> Result<()> {
        self.hasher.update(piece);
        // A large piece (a delta window) is cut a part at a time, so that the buffer holds at most
        // one maximum chunk and one part rather than growing to twice the piece.
        for part in piece.chunks(PART) {
            self.buf.extend_from_slice(part);
            self.cut(w, false)?;
        }
        Ok(())
    }

    /// [`ChunkedContent::push`] for a piece of which `origins` say where it was copied from: a
    /// dump's chunk mostly copied from one stored blob is compressed against it.
    pub fn push_from(&mut self, w: &mut Writer<'_>, piece: &[u8], origins: Vec<Origin>) -> Result<()> {
        if self.dump {
            self.origins.extend(origins);
        }
        self.push(w, piece)
    }

    /// What the origins say of the chunk `start..start + len`; the origins wholly before the
    /// chunk's end are dropped.
    fn origin_of(&mut self, start: u64, len: u64) -> ChunkOrigin {
        let end = start + len;
        if let Some(o) = self.origins.front().filter(|o| o.at == start && o.len == len && o.whole) {
            let blob = o.blob;
            self.origins.pop_front();
            return ChunkOrigin::Copy(blob);
        }
        let mut best: Option<(&Origin, u64)> = None;
        let mut run: Option<(&Origin, u64)> = None;
        for o in self.origins.iter().take_while(|o| o.at < end) {
            let overlap = (o.at + o.len).min(end).saturating_sub(o.at.max(start));
            run = match run {
                Some((r, n)) if r.blob == o.blob => Some((r, n + overlap)),
                _ => Some((o, overlap)),
            };
            if run.is_some_and(|(_, n)| best.is_none_or(|(_, b)| n > b)) {
                best = run;
            }
        }
        let found = best.filter(|(_, n)| n * 2 >= len).and_then(|(o, _)| o.base.clone());
        while self.origins.front().is_some_and(|o| o.at + o.len <= end) {
            self.origins.pop_front();
        }
        found.map_or(ChunkOrigin::New, |(blob, plain)| ChunkOrigin::Changed(blob, plain))
    }

    fn cut(&mut self, w: &mut Writer<'_>, at_end: bool) -> Result<()> {
        let mut pos = 0;
        while let Some(n) = self.chunker.next_cut(&self.buf[pos..], at_end) {
            let origin = if self.dump { self.origin_of(self.out.size, n as u64) } else { ChunkOrigin::New };
            let chunk = || self.buf[pos..pos + n].to_vec();
            let id = match origin {
                _ if !self.dump => w.add(BlobKind::Data, chunk())?,
                // The bytes are the stored blob's, so its id is theirs: the unchanged part of a
                // dump is not hashed again, nor looked up.
                ChunkOrigin::Copy(blob) => blob,
                ChunkOrigin::Changed(base, plain) => w.add_dump_against(chunk(), base, plain)?,
                ChunkOrigin::New => w.add_dump(chunk())?,
            };
            self.out.chunks.push(ChunkRef { id: id.0.to_vec(), offset: 0, length: n as u32 });
            self.out.size += n as u64;
            pos += n;
        }
        self.buf.drain(..pos);
        Ok(())
    }

    /// Store what is left and return the content.
    pub fn finish(mut self, w: &mut Writer<'_>) -> Result<FileContent> {
        self.cut(w, true)?;
        self.out.blake3 = *self.hasher.finalize().as_bytes();
        Ok(self.out)
    }
}

/// Chunk and store a stream of any length.
pub fn store_stream(w: &mut Writer<'_>, chunker: &Chunker, mut r: impl Read, what: &Path) -> Result<FileContent> {
    let mut content = ChunkedContent::new(chunker.clone());
    let mut buf = vec![0u8; READ_SIZE];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return content.finish(w),
            Ok(n) => content.push(w, &buf[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(what, e)),
        }
    }
}

/// The shared stream of small files of one directory.
pub struct SmallFiles {
    chunker: Chunker,
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    buf_start: u64,
    /// Chunks cut so far: (id, stream offset, length).
    cut: Vec<(Id, u64, u32)>,
}

/// A small file's place in the shared stream, resolved to chunk ranges after [`SmallFiles::flush`].
#[derive(Clone, Copy, Debug)]
pub struct StreamRange {
    start: u64,
    len: u64,
}

impl SmallFiles {
    /// A new, empty stream.
    pub fn new(chunker: Chunker) -> SmallFiles {
        SmallFiles { chunker, buf: Vec::new(), buf_start: 0, cut: Vec::new() }
    }

    /// Append one file's bytes.
    pub fn push(&mut self, w: &mut Writer<'_>, data: &[u8]) -> Result<StreamRange> {
        let range = StreamRange { start: self.buf_start + self.buf.len() as u64, len: data.len() as u64 };
        self.buf.extend_from_slice(data);
        self.cut_chunks(w, false)?;
        Ok(range)
    }

    fn cut_chunks(&mut self, w: &mut Writer<'_>, at_end: bool) -> Result<()> {
        let mut pos = 0;
        while let Some(n) = self.chunker.next_cut(&self.buf[pos..], at_end) {
            let id = w.add(BlobKind::Data, self.buf[pos..pos + n].to_vec())?;
            self.cut.push((id, self.buf_start + pos as u64, n as u32));
            pos += n;
        }
        self.buf.drain(..pos);
        self.buf_start += pos as u64;
        Ok(())
    }

    /// Cut the rest of the stream: every range pushed so far can now be resolved.
    pub fn flush(&mut self, w: &mut Writer<'_>) -> Result<()> {
        self.cut_chunks(w, true)
    }

    /// The chunk ranges holding `r` (after `flush`).
    pub fn resolve(&self, r: StreamRange) -> Vec<ChunkRef> {
        let end = r.start + r.len;
        let first = self.cut.partition_point(|&(_, s, l)| s + l as u64 <= r.start);
        let mut out = Vec::new();
        for &(id, s, l) in &self.cut[first..] {
            if s >= end {
                break;
            }
            let from = r.start.max(s);
            let to = end.min(s + l as u64);
            out.push(ChunkRef { id: id.0.to_vec(), offset: (from - s) as u32, length: (to - from) as u32 });
        }
        out
    }

    /// Forget resolved chunks (after a directory is done).
    pub fn clear(&mut self) {
        debug_assert!(self.buf.is_empty(), "clear before flush");
        self.cut.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::chunker::ChunkerParams;
    use crate::repository::{InitOptions, Repository};
    use std::sync::Arc;

    fn test_repo() -> Repository {
        let mut opts = InitOptions::encrypted("pw");
        opts.kdf = crate::crypto::KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        Repository::init(Arc::new(MemoryBackend::new()), &opts).unwrap()
    }

    /// However content arrives (a byte at a time, odd sizes, more than a part at once), it is cut
    /// where the chunker cuts the whole and stored byte for byte.
    #[test]
    fn content_is_cut_the_same_whatever_its_pieces() {
        let mut repo = test_repo();
        let chunker = Chunker::new(ChunkerParams { min: 1024, avg: 4096, max: 16384 }, 9).unwrap();
        let mut data = vec![0u8; 3 * PART + 12345];
        blake3::Hasher::new().update(b"content").finalize_xof().fill(&mut data);
        let mut expected = Vec::new();
        let mut pos = 0;
        while let Some(n) = chunker.next_cut(&data[pos..], true) {
            expected.push(n as u32);
            pos += n;
        }
        let mut w = Writer::new(&repo, 1);
        let mut stored = Vec::new();
        for sizes in [vec![data.len()], vec![1, 999, 16384, 65536, PART + 5, 7]] {
            let mut c = ChunkedContent::new(chunker.clone());
            let (mut at, mut i) = (0, 0);
            while at < data.len() {
                let n = sizes[i % sizes.len()].min(data.len() - at);
                c.push(&mut w, &data[at..at + n]).unwrap();
                (at, i) = (at + n, i + 1);
            }
            let content = c.finish(&mut w).unwrap();
            assert_eq!(content.chunks.iter().map(|c| c.length).collect::<Vec<_>>(), expected, "pieces {sizes:?}");
            assert_eq!(&content.blake3, blake3::hash(&data).as_bytes());
            stored.push(content);
        }
        let (idx, _) = w.finish().unwrap();
        let (id, f) = idx.unwrap();
        repo.add_index(id, &f);
        for content in stored {
            let mut got = Vec::new();
            for c in &content.chunks {
                got.extend_from_slice(&repo.read_blob(&Id::from_slice(&c.id).unwrap()).unwrap());
            }
            assert!(got == data, "content read back differs");
        }
    }

    #[test]
    fn small_files_share_chunks_and_resolve_exactly() {
        let repo = test_repo();
        let params = ChunkerParams { min: 1024, avg: 4096, max: 16384 };
        let mut w = Writer::new(&repo, 1);
        let mut sf = SmallFiles::new(Chunker::new(params, 5).unwrap());
        let files: Vec<Vec<u8>> = (0..200u32).map(|i| (0..(i * 37 % 3000)).map(|j| (i ^ j) as u8).collect()).collect();
        let ranges: Vec<_> = files.iter().map(|f| sf.push(&mut w, f).unwrap()).collect();
        sf.flush(&mut w).unwrap();
        let resolved: Vec<_> = ranges.iter().map(|r| sf.resolve(*r)).collect();
        let distinct: std::collections::HashSet<_> = resolved.iter().flatten().map(|c| c.id.clone()).collect();
        assert!(distinct.len() < files.len() / 4, "small files should share chunks");
        drop(sf);
        let (idx, _) = w.finish().unwrap();
        let mut repo = repo;
        let (id, f) = idx.unwrap();
        repo.add_index(id, &f);
        for (f, refs) in files.iter().zip(resolved) {
            let mut got = Vec::new();
            for c in refs {
                let blob = repo.read_blob(&Id::from_slice(&c.id).unwrap()).unwrap();
                got.extend_from_slice(&blob[c.offset as usize..(c.offset + c.length) as usize]);
            }
            assert_eq!(&got, f);
        }
    }
}
