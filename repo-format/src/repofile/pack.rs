//! Packs: many sealed blobs followed by their sealed header, so that a pack describes itself and
//! the index can be rebuilt from packs alone.
//!
//! ```text
//! pack   = blob_1 || … || blob_n || sealed(header) || header_len (u32 LE, length of sealed(header))
//! header = version (u8: 1, or 2 when a blob has a base) || entry_1 || … || entry_n
//! entry  = kind (u8) || id (32) || stored_len (u32 LE) || raw_len (u32 LE)      (41 bytes)
//!          || base (32, all zero for none; version 2 only)                      (73 bytes)
//! blob   = sealed(compression (u8) || payload)
//!          (0 raw, 1 zstd, 2 zstd with a dictionary, 3 zstd against the base blob's plaintext)
//! ```
//! Offsets are implicit: blob i starts where blob i-1 ends, the first at 0.

use std::ops::Range;

use zstd::zstd_safe::{CParameter, DictAttachPref};

use crate::backend::{Backend, BackendError, Staged};
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::magic::{self, Domain};
use crate::repofile as rf;
use crate::repofile::dictionary::{Dictionaries, Dictionary};

/// What a blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlobKind {
    /// File or dump content.
    Data = 0,
    /// A serialized [`crate::repofile::tree::Tree`].
    Tree = 1,
}

impl BlobKind {
    fn domain(self) -> Domain {
        match self {
            BlobKind::Data => Domain::DataBlob,
            BlobKind::Tree => Domain::TreeBlob,
        }
    }

    pub(crate) fn from_u8(b: u8) -> Option<BlobKind> {
        match b {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }
}

/// One blob's place in a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// Data or tree.
    pub kind: BlobKind,
    /// Keyed BLAKE3 of the plaintext.
    pub id: Id,
    /// Offset of the sealed blob in the pack.
    pub offset: u32,
    /// Length of the sealed blob.
    pub stored_len: u32,
    /// Length of the plaintext.
    pub raw_len: u32,
    /// The data blob whose plaintext this one was compressed against: it must be kept, and read
    /// first, for as long as this blob is.
    pub base: Option<Id>,
}

impl PackEntry {
    /// Byte range of the blob in its pack.
    pub fn range(&self) -> Range<u64> {
        self.offset as u64..self.offset as u64 + self.stored_len as u64
    }
}

const ENTRY_LEN: usize = 41;
const ENTRY_LEN_BASES: usize = ENTRY_LEN + 32;

/// A base as pack-header and index entries store it: 32 bytes, all zero for none (no blob id is).
pub(crate) fn base_bytes(base: Option<Id>) -> [u8; 32] {
    base.map_or([0; 32], |b| b.0)
}

/// The base an entry's 32 base bytes name.
pub(crate) fn base_from(bytes: &[u8]) -> Option<Id> {
    Id::from_slice(bytes).filter(|b| b.0 != [0; 32])
}

/// Largest plaintext a blob may have (a tree of a directory with millions of entries fits).
pub const MAX_BLOB_SIZE: u32 = 512 * 1024 * 1024;

/// What a blob's zstd frame is compressed against.
#[derive(Clone, Copy)]
enum Reference<'a> {
    None,
    Dictionary(&'a Dictionary),
    /// Another blob's plaintext, as raw-content dictionary.
    Base(&'a [u8]),
}

/// A write worker's zstd contexts: for plain frames, frames with a dictionary, frames against a
/// base.
pub struct BlobCompressor {
    level: i32,
    plain: zstd::bulk::Compressor<'static>,
    /// Told to always reference the dictionary's prepared tables: by default zstd copies them
    /// (hundreds of KiB) into the context for every input over 16 KiB, which made compressing a dump's
    /// CDC chunks 9% slower (188 vs 205 MB/s on the bench dump) for the same output.
    with_dictionary: zstd::zstd_safe::CCtx<'static>,
    /// Used through zstd's one-shot dictionary call, which borrows the base for that call only
    /// (a referenced prefix would tie the context's lifetime to every base it ever sees).
    with_base: zstd::zstd_safe::CCtx<'static>,
}

impl BlobCompressor {
    /// Contexts for `level` (a dictionary brings its own level, the repository's).
    pub fn new(level: i32) -> Result<BlobCompressor> {
        let plain =
            zstd::bulk::Compressor::new(level).map_err(|e| Error::Invalid(format!("zstd level {level}: {e}")))?;
        let mut with_dictionary = zstd::zstd_safe::CCtx::create();
        with_dictionary
            .set_parameter(CParameter::ForceAttachDict(DictAttachPref::ForceAttach))
            .map_err(|code| Error::Invalid(format!("zstd: {}", zstd::zstd_safe::get_error_name(code))))?;
        Ok(BlobCompressor { level, plain, with_dictionary, with_base: zstd::zstd_safe::CCtx::create() })
    }

    /// Append the compression flag and the zstd frame of `raw` to `out`; `false`, with `out`
    /// unchanged, when zstd fails or saves less than 1/64 of the size (decompressing would then
    /// cost read-back time for nothing).
    fn compress_into(&mut self, raw: &[u8], reference: Reference<'_>, out: &mut Vec<u8>) -> bool {
        let start = out.len();
        out.reserve(1 + zstd::zstd_safe::compress_bound(raw.len()));
        out.push(match reference {
            Reference::None => magic::COMPRESSION_ZSTD,
            Reference::Dictionary(_) => magic::COMPRESSION_ZSTD_DICTIONARY,
            Reference::Base(_) => magic::COMPRESSION_ZSTD_BASE,
        });
        // The frame goes straight after the flag, into the spare capacity.
        let mut at = std::io::Cursor::new(&mut *out);
        at.set_position(start as u64 + 1);
        let written = match reference {
            Reference::None => self.plain.compress_to_buffer(raw, &mut at).ok(),
            Reference::Base(base) => self.with_base.compress_using_dict(&mut at, raw, base, self.level).ok(),
            Reference::Dictionary(d) => {
                // The frame takes the dictionary's level. The reference is dropped at once: the
                // context must not point at a dictionary it may outlive.
                let ctx = &mut self.with_dictionary;
                let written = ctx.ref_cdict(d.encoder()).ok().and_then(|_| ctx.compress2(&mut at, raw).ok());
                ctx.disable_dictionary().ok().and(written)
            }
        };
        let pays = written.is_some_and(|n| n + raw.len() / 64 < raw.len());
        if !pays {
            out.truncate(start);
        }
        pays
    }
}

/// Compress (when it pays, with `dictionary` if given) and seal one blob, written straight into
/// the buffer it is sealed in: a blob is allocated once, not once per step.
pub fn encode_blob(
    keys: &Keys,
    kind: BlobKind,
    raw: &[u8],
    compressor: Option<&mut BlobCompressor>,
    dictionary: Option<&Dictionary>,
) -> Vec<u8> {
    let reference = dictionary.map_or(Reference::None, Reference::Dictionary);
    seal_blob(keys, kind, raw, |buf| compressor.is_some_and(|c| c.compress_into(raw, reference, buf)))
}

/// [`encode_blob`] for a data blob that is likely a changed version of `base` (the plaintext of
/// a stored data blob without a base of its own): compressed against it when that saves at
/// least three quarters, else as `encode_blob` would. Returns whether the base was used; its id
/// must then go into the blob's entry ([`PackBuilder::add`]).
///
/// A changed chunk of a database dump compresses to a few hundred bytes against the chunk it
/// replaces, against a third of its size with the dump dictionary, and three to five times
/// faster (FORMAT.md §12).
pub fn encode_blob_against(
    keys: &Keys,
    raw: &[u8],
    compressor: &mut BlobCompressor,
    dictionary: Option<&Dictionary>,
    base: &[u8],
) -> (Vec<u8>, bool) {
    let mut used = false;
    let sealed = seal_blob(keys, BlobKind::Data, raw, |buf| {
        let start = buf.len();
        if compressor.compress_into(raw, Reference::Base(base), buf) {
            if (buf.len() - start) * 4 <= raw.len() {
                used = true;
                return true;
            }
            buf.truncate(start);
        }
        compressor.compress_into(raw, dictionary.map_or(Reference::None, Reference::Dictionary), buf)
    });
    (sealed, used)
}

/// Seal `raw` after `compress` appended its flag and frame to the buffer, or flagged as is when
/// `compress` returns `false`.
fn seal_blob(keys: &Keys, kind: BlobKind, raw: &[u8], compress: impl FnOnce(&mut Vec<u8>) -> bool) -> Vec<u8> {
    let room = keys.seal_room();
    let mut buf = Vec::with_capacity(room + 1 + zstd::zstd_safe::compress_bound(raw.len()) + crate::crypto::TAG_LEN);
    buf.resize(room, 0);
    if !compress(&mut buf) {
        buf.push(magic::COMPRESSION_NONE);
        buf.extend_from_slice(raw);
    }
    keys.seal_in_place(kind.domain(), &mut buf);
    buf
}

/// What decoding a blob checks beyond its authentication and length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Check {
    /// That the plaintext hashes to the blob's id (FORMAT.md §6): every reader whose result is
    /// not checked otherwise.
    #[default]
    Id,
    /// Nothing more, for a reader that checks its whole result itself: an rsync delta's rebuild
    /// is compared with the agent's BLAKE3 of the file, and hashing every old chunk first took
    /// a quarter of the collector's time applying a delta to a 600 MB dump (tests/bench).
    Caller,
}

/// Open, decompress and verify one blob against its id; `dictionaries` are the repository's,
/// `base` the plaintext of the blob's base if its entry names one.
pub fn decode_blob(
    keys: &Keys,
    dictionaries: &Dictionaries,
    entry: &PackEntry,
    stored: &[u8],
    base: Option<&[u8]>,
) -> Result<Vec<u8>> {
    decode_blob_flagged(keys, dictionaries, entry, stored, base, Check::Id).map(|(raw, _)| raw)
}

/// [`decode_blob`], checking as `check` says, with the blob's compression flag.
pub fn decode_blob_flagged(
    keys: &Keys,
    dictionaries: &Dictionaries,
    entry: &PackEntry,
    stored: &[u8],
    base: Option<&[u8]>,
    check: Check,
) -> Result<(Vec<u8>, u8)> {
    let what = || format!("blob {} ({:?})", entry.id, entry.kind);
    let plain =
        keys.open(entry.kind.domain(), stored).ok_or_else(|| Error::corrupt(what(), "authentication failed"))?;
    let (flag, payload) = plain.split_first().ok_or_else(|| Error::corrupt(what(), "empty blob"))?;
    if entry.raw_len > MAX_BLOB_SIZE {
        return Err(Error::corrupt(what(), format!("claims {} bytes, more than any blob may hold", entry.raw_len)));
    }
    let len = entry.raw_len as usize;
    let matches = |raw: &[u8]| raw.len() == len && keys.blob_id(entry.kind, raw) == entry.id;
    let zstd_error = |e: std::io::Error| Error::corrupt(what(), format!("zstd: {e}"));
    let raw = match *flag {
        magic::COMPRESSION_NONE => payload.to_vec(),
        magic::COMPRESSION_ZSTD => decompress(payload, len, None).map_err(zstd_error)?,
        magic::COMPRESSION_ZSTD_BASE => {
            let base = base.ok_or_else(|| match entry.base {
                Some(b) => Error::corrupt(what(), format!("compressed against blob {b}, which was not read")),
                None => Error::corrupt(what(), "compressed against a base blob its entry does not name"),
            })?;
            decompress_against(payload, len, base).map_err(zstd_error)?
        }
        magic::COMPRESSION_ZSTD_DICTIONARY => {
            let zstd_id = zstd::zstd_safe::get_dict_id_from_frame(payload)
                .ok_or_else(|| Error::corrupt(what(), "a dictionary frame that names no dictionary"))?;
            let candidates = dictionaries.with_zstd_id(zstd_id.get())?;
            if candidates.is_empty() {
                return Err(Error::corrupt(
                    what(),
                    format!("compressed with dictionary {zstd_id:08x}, which no object in dicts/ holds"),
                ));
            }
            // Several only when two dictionaries drew the same 32-bit id: the blob id decides.
            if let ([d], Check::Caller) = (candidates.as_slice(), check) {
                return Ok((decompress(payload, len, Some(d)).map_err(zstd_error)?, *flag));
            }
            let mut last = Ok(Vec::new());
            for d in candidates {
                match decompress(payload, len, Some(&d)) {
                    Ok(raw) if matches(&raw) => return Ok((raw, *flag)),
                    other => last = other,
                }
            }
            // None matched: the check below reports it (or zstd's own error).
            last.map_err(zstd_error)?
        }
        // Authenticated, so written by a newer magpie, not damaged: repair must not drop it.
        other => {
            return Err(Error::UnsupportedVersion {
                object: format!("{} (compression flag)", what()),
                found: other as u32,
                supported: magic::COMPRESSION_ZSTD_BASE as u32,
            });
        }
    };
    match check {
        Check::Id if !matches(&raw) => return Err(Error::corrupt(what(), "content does not match its id")),
        Check::Caller if raw.len() != len => {
            return Err(Error::corrupt(what(), format!("holds {} bytes, not the {len} recorded", raw.len())));
        }
        _ => {}
    }
    Ok((raw, *flag))
}

/// Decompress with this thread's zstd contexts: making one per blob cost more than decompressing
/// a small dump chunk (1% of a pull rebuilding a 600 MB dump from 8 KiB chunks).
fn decompress(payload: &[u8], capacity: usize, dictionary: Option<&Dictionary>) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static PLAIN: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
        static WITH_DICTIONARY: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    match dictionary {
        None => PLAIN.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_none() {
                *c = Some(zstd::bulk::Decompressor::new()?);
            }
            c.as_mut().expect("just set").decompress(payload, capacity)
        }),
        Some(d) => WITH_DICTIONARY.with(|c| {
            let mut c = c.borrow_mut();
            let ctx = c.get_or_insert_with(zstd::zstd_safe::DCtx::create);
            let mut out = Vec::with_capacity(capacity);
            ctx.decompress_using_ddict(&mut out, payload, d.decoder())
                .map_err(|code| std::io::Error::other(zstd::zstd_safe::get_error_name(code)))?;
            Ok(out)
        }),
    }
}

/// Decompress a frame compressed against `base` (a raw-content dictionary), with this thread's
/// context.
fn decompress_against(payload: &[u8], capacity: usize, base: &[u8]) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static AGAINST_BASE: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    AGAINST_BASE.with(|c| {
        let mut c = c.borrow_mut();
        let ctx = c.get_or_insert_with(zstd::zstd_safe::DCtx::create);
        let mut out = Vec::with_capacity(capacity);
        ctx.decompress_using_dict(&mut out, payload, base)
            .map_err(|code| std::io::Error::other(zstd::zstd_safe::get_error_name(code)))?;
        Ok(out)
    })
}

/// Builds one pack, in memory or, where the backend can take it as it comes, in storage.
#[derive(Default)]
pub struct PackBuilder {
    body: Body,
    /// Bytes of blobs so far.
    len: usize,
    entries: Vec<PackEntry>,
}

/// Where the bytes of a pack being built go.
enum Body {
    Memory(Vec<u8>),
    /// Written through and hashed as they come; the first write error is kept for `store`.
    Staged {
        sink: Box<dyn Staged>,
        hasher: Box<blake3::Hasher>,
        error: Option<std::io::Error>,
    },
}

impl Default for Body {
    fn default() -> Self {
        Body::Memory(Vec::new())
    }
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// An empty pack with room for `bytes` of blobs, so that filling it never reallocates (a
    /// doubling past the target size would briefly hold twice the pack in memory).
    pub fn with_capacity(bytes: usize) -> PackBuilder {
        PackBuilder { body: Body::Memory(Vec::with_capacity(bytes)), ..PackBuilder::default() }
    }

    /// An empty pack written to `backend` as blobs are added, when the backend can stage it
    /// (else one in memory with room for `bytes`): a pack in flight then costs no memory.
    pub fn staged_or_with_capacity(backend: &dyn Backend, bytes: usize) -> Result<PackBuilder> {
        Ok(match backend.stage(rf::DATA_DIR)? {
            Some(sink) => PackBuilder {
                body: Body::Staged { sink, hasher: Box::default(), error: None },
                ..PackBuilder::default()
            },
            None => PackBuilder::with_capacity(bytes),
        })
    }

    /// Bytes of blobs so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Append a sealed blob, compressed against the data blob `base` if given.
    pub fn add(&mut self, kind: BlobKind, id: Id, sealed: &[u8], raw_len: u32, base: Option<Id>) {
        let (offset, stored_len) = (self.len as u32, sealed.len() as u32);
        self.entries.push(PackEntry { kind, id, offset, stored_len, raw_len, base });
        self.append(sealed);
    }

    fn append(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
        match &mut self.body {
            Body::Memory(data) => data.extend_from_slice(bytes),
            Body::Staged { sink, hasher, error } => {
                hasher.update(bytes);
                if error.is_none()
                    && let Err(e) = sink.write_all(bytes)
                {
                    *error = Some(e);
                }
            }
        }
    }

    /// Seal the header, store the pack in `backend` under its storage id and return the id and
    /// the entries.
    pub fn store(mut self, keys: &Keys, backend: &dyn Backend) -> Result<(Id, Vec<PackEntry>)> {
        // Version 1 unless a blob has a base, so that packs without one stay readable by builds
        // that predate bases.
        let bases = self.entries.iter().any(|e| e.base.is_some());
        let mut header = Vec::with_capacity(1 + self.entries.len() * ENTRY_LEN_BASES);
        header.push(if bases { magic::PACK_HEADER_VERSION_BASES } else { magic::PACK_HEADER_VERSION });
        for e in &self.entries {
            header.push(e.kind as u8);
            header.extend_from_slice(&e.id.0);
            header.extend_from_slice(&e.stored_len.to_le_bytes());
            header.extend_from_slice(&e.raw_len.to_le_bytes());
            if bases {
                header.extend_from_slice(&base_bytes(e.base));
            }
        }
        let sealed = keys.seal(Domain::PackHeader, &header);
        self.append(&sealed);
        self.append(&(sealed.len() as u32).to_le_bytes());
        match self.body {
            Body::Memory(data) => {
                let id = Id::of_stored(&data);
                backend.put_if_absent(&rf::pack_name(&id), &data)?;
                Ok((id, self.entries))
            }
            Body::Staged { sink, hasher, error } => {
                let id = Id::of_stored_hasher(&hasher);
                let name = rf::pack_name(&id);
                if let Some(e) = error {
                    return Err(BackendError::Io { path: name, err: e }.into());
                }
                sink.commit(&name)?;
                Ok((id, self.entries))
            }
        }
    }
}

/// Read and decode the header of the pack `name` whose size is `size`.
pub fn read_header(backend: &dyn Backend, keys: &Keys, name: &str, size: u64) -> Result<Vec<PackEntry>> {
    if size < 4 {
        return Err(Error::corrupt(name, "too short to be a pack"));
    }
    let tail = backend.get(name, Some(size - 4..size))?;
    let hlen = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    if hlen + 4 > size {
        return Err(Error::corrupt(name, "header length points before the start of the pack"));
    }
    let sealed = backend.get(name, Some(size - 4 - hlen..size - 4))?;
    let header =
        keys.open(Domain::PackHeader, &sealed).ok_or_else(|| Error::corrupt(name, "header authentication failed"))?;
    parse_header(name, &header, size - 4 - hlen)
}

fn parse_header(name: &str, header: &[u8], blobs_end: u64) -> Result<Vec<PackEntry>> {
    if blobs_end > u32::MAX as u64 {
        return Err(Error::corrupt(name, "larger than a pack may be (4 GiB)"));
    }
    let (&version, body) = header.split_first().ok_or_else(|| Error::corrupt(name, "empty header"))?;
    let entry_len = match version {
        magic::PACK_HEADER_VERSION => ENTRY_LEN,
        magic::PACK_HEADER_VERSION_BASES => ENTRY_LEN_BASES,
        _ => {
            return Err(Error::UnsupportedVersion {
                object: name.into(),
                found: version as u32,
                supported: magic::PACK_HEADER_VERSION_BASES as u32,
            });
        }
    };
    if body.len() % entry_len != 0 {
        return Err(Error::corrupt(name, "header length is not a whole number of entries"));
    }
    let mut offset = 0u64;
    let mut out = Vec::with_capacity(body.len() / entry_len);
    for e in body.chunks_exact(entry_len) {
        let kind =
            BlobKind::from_u8(e[0]).ok_or_else(|| Error::corrupt(name, format!("unknown blob kind {}", e[0])))?;
        let stored_len = u32::from_le_bytes(e[33..37].try_into().expect("4 bytes"));
        let raw_len = u32::from_le_bytes(e[37..41].try_into().expect("4 bytes"));
        out.push(PackEntry {
            kind,
            id: Id::from_slice(&e[1..33]).expect("32 bytes"),
            offset: offset as u32,
            stored_len,
            raw_len,
            base: e.get(41..73).and_then(base_from),
        });
        offset += stored_len as u64;
    }
    if offset != blobs_end {
        return Err(Error::corrupt(name, format!("header describes {offset} bytes of blobs, pack holds {blobs_end}")));
    }
    Ok(out)
}

/// Decode the header of a pack held whole in memory.
pub fn header_from_bytes(keys: &Keys, name: &str, bytes: &[u8]) -> Result<Vec<PackEntry>> {
    let size = bytes.len();
    if size < 4 {
        return Err(Error::corrupt(name, "too short to be a pack"));
    }
    let hlen = u32::from_le_bytes(bytes[size - 4..].try_into().expect("4 bytes")) as usize;
    if hlen + 4 > size {
        return Err(Error::corrupt(name, "header length points before the start of the pack"));
    }
    let header = keys
        .open(Domain::PackHeader, &bytes[size - 4 - hlen..size - 4])
        .ok_or_else(|| Error::corrupt(name, "header authentication failed"))?;
    parse_header(name, &header, (size - 4 - hlen) as u64)
}

/// A pack read whole and verified blob by blob (check --verify-data, repair).
#[derive(Debug)]
pub struct VerifiedPack {
    /// The header's entries.
    pub entries: Vec<PackEntry>,
    /// Whether the bytes still hash to the pack's name.
    pub intact: bool,
    /// Blobs that do not open, decompress or match their id, with why.
    pub damaged: Vec<(PackEntry, Error)>,
}

/// The sealed bytes of one blob of a pack held whole (`None` past the end).
pub fn blob_bytes<'a>(pack: &'a [u8], e: &PackEntry) -> Option<&'a [u8]> {
    pack.get(e.range().start as usize..e.range().end as usize)
}

/// Decode the header of the pack `id` held whole in `bytes` and verify every blob, reading the
/// plaintext of the bases blobs name with `read_base` (`Ok(None)`: not at hand, as while repair
/// rebuilds the index; such a blob is left unjudged); an error means the header itself cannot
/// be read.
pub fn verify_whole(
    keys: &Keys,
    dictionaries: &Dictionaries,
    id: &Id,
    bytes: &[u8],
    read_base: &dyn Fn(&Id) -> Result<Option<Vec<u8>>>,
) -> Result<VerifiedPack> {
    let name = crate::repofile::pack_name(id);
    let entries = header_from_bytes(keys, &name, bytes)?;
    let damaged = entries
        .iter()
        .filter_map(|e| {
            // The header's offsets were checked against the pack's length.
            let blob = blob_bytes(bytes, e).expect("entry within the pack");
            let base = match e.base.map(|b| read_base(&b)).transpose() {
                Ok(Some(None)) => return None,
                Ok(base) => base.flatten(),
                Err(err) => return Some((*e, err)),
            };
            decode_blob(keys, dictionaries, e, blob, base.as_deref()).err().map(|err| (*e, err))
        })
        .collect();
    Ok(VerifiedPack { intact: Id::of_stored(bytes) == *id, entries, damaged })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{LocalBackend, MemoryBackend};

    /// A pack written through to local storage as it is built is the pack built in memory: the
    /// same blobs at the same offsets, a header that reads back to the same entries, and a name
    /// that is the hash of its bytes (the sealed headers differ only by their random nonces).
    #[test]
    fn a_staged_pack_is_the_pack_built_in_memory() {
        let keys = Keys::generate(true);
        let dir = tempfile::tempdir().unwrap();
        let local = LocalBackend::new(dir.path());
        let memory = MemoryBackend::new();
        let sealed: Vec<Vec<u8>> = (0..5u8)
            .map(|i| encode_blob(&keys, BlobKind::Data, &vec![i; 1000 * (i as usize + 1)], None, None))
            .collect();
        let build = |backend: &dyn Backend| {
            let mut pb = PackBuilder::staged_or_with_capacity(backend, 1 << 20).unwrap();
            for i in 0..5u8 {
                let data = vec![i; 1000 * (i as usize + 1)];
                // Sealed once, so that both packs hold the same ciphertext.
                pb.add(
                    BlobKind::Data,
                    keys.blob_id(BlobKind::Data, &data),
                    &sealed[i as usize],
                    data.len() as u32,
                    None,
                );
            }
            pb.store(&keys, backend).unwrap()
        };
        assert!(matches!(PackBuilder::staged_or_with_capacity(&local, 0).unwrap().body, Body::Staged { .. }));
        let (staged_id, staged_entries) = build(&local);
        let (memory_id, memory_entries) = build(&memory);
        assert_eq!(staged_entries, memory_entries);
        let staged = local.get(&rf::pack_name(&staged_id), None).unwrap();
        let in_memory = memory.get(&rf::pack_name(&memory_id), None).unwrap();
        let blobs_end = staged_entries.last().unwrap().range().end as usize;
        assert_eq!(staged[..blobs_end], in_memory[..blobs_end]);
        assert_eq!(Id::of_stored(&staged), staged_id);
        let read = read_header(&local, &keys, &rf::pack_name(&staged_id), staged.len() as u64).unwrap();
        assert_eq!(read, staged_entries);
    }
}
