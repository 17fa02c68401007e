//! rsync deltas on the collector's side: the signature of the previous version, computed by
//! streaming it from the repository, and the application of the agent's window deltas to that
//! version, read back from the repository a range at a time. Neither holds a whole file in
//! memory. The result is only trusted once its BLAKE3 matches the agent's (MD4 is not trusted).

use anyhow::{Result, bail};
use repo_format::archive::Origin;
use repo_format::blob_reader::BlobReader;
use repo_format::repofile::pack::Check;
use repo_format::repofile::tree::{ChunkRef, Node};
use repo_format::{Id, Repository};

/// Files smaller than this travel whole: a delta would not pay for its round trip.
pub const DELTA_MIN: u64 = 1 << 20;
/// Largest window an agent diffs at once (it uses 4 MiB).
pub const MAX_WINDOW: u64 = 16 << 20;
/// MD4 bytes per block in the signature; BLAKE3 verifies the result anyway.
const CRYPTO_HASH_SIZE: u32 = 8;

/// Block size for a previous version of `size` bytes: 2 KiB until the signature would pass a
/// million blocks (a 2 GiB file), then larger, up to 64 KiB.
///
/// rsync's square root is too coarse for database dumps: PostgreSQL moves updated rows, so a
/// 2% update touches a row every ~15 KB of a dump, and a square-root block of a 600 MB dump
/// (24 KiB) then almost never matches. Small blocks keep matching and also make the agent's
/// diff fast (a match skips a block; a miss rolls byte by byte).
pub fn block_size(size: u64) -> u32 {
    let per_million = size.div_ceil(1 << 20).next_power_of_two();
    per_million.clamp(2048, 65536) as u32
}

/// The previous version of a file, readable at any offset from the repository.
pub struct OldContent<'r> {
    repo: &'r Repository,
    /// (start offset, chunk range).
    refs: Vec<(u64, ChunkRef)>,
    size: u64,
    blobs: BlobReader,
    /// Bytes the applied deltas produced so far: the offset in the new version of the next.
    produced: u64,
    /// Where the copies of the deltas applied since the last [`OldContent::take_origins`] came
    /// from, while noted.
    origins: Option<Vec<Origin>>,
}

impl<'r> OldContent<'r> {
    pub fn new(repo: &'r Repository, node: &Node) -> OldContent<'r> {
        let mut refs = Vec::with_capacity(node.content.len());
        let mut at = 0u64;
        for c in &node.content {
            refs.push((at, c.clone()));
            at += c.length as u64;
        }
        // Whatever is rebuilt from these blobs is checked whole against the agent's BLAKE3.
        OldContent { repo, refs, size: at, blobs: BlobReader::new(Check::Caller), produced: 0, origins: None }
    }

    /// Note, or stop noting, where the deltas' copies come from. Each origin holds its old
    /// chunk's plaintext until taken and used: meant for database dumps, whose chunks are 32 KiB;
    /// a file's 1 MiB chunks would hold tens of MiB per window queued.
    pub fn note_origins(&mut self, on: bool) {
        self.origins = on.then(Vec::new);
    }

    /// The origins noted since the last call.
    pub fn take_origins(&mut self) -> Vec<Origin> {
        self.origins.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Append bytes `offset..offset + len` of the old version to `out`.
    pub fn read(&mut self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<()> {
        self.read_noting(offset, len, out, false)
    }

    /// [`OldContent::read`], noting where the bytes come from when `note` (a delta's copy).
    fn read_noting(&mut self, mut offset: u64, mut len: u64, out: &mut Vec<u8>, note: bool) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            bail!("the delta copies {len} bytes at {offset}, past the previous version's {} bytes", self.size);
        }
        while len > 0 {
            let i = self.refs.partition_point(|(start, c)| start + c.length as u64 <= offset);
            let (start, c) = &self.refs[i];
            let id = Id::from_slice(&c.id).ok_or_else(|| anyhow::anyhow!("chunk reference without a 32-byte id"))?;
            let upcoming = self.refs[i + 1..].iter().filter_map(|(_, u)| Id::from_slice(&u.id));
            let blob = self.blobs.get(self.repo, &id, upcoming)?;
            let within = offset - start;
            let take = len.min(c.length as u64 - within);
            let from = c.offset as usize + within as usize;
            let piece = blob
                .get(from..from + take as usize)
                .ok_or_else(|| anyhow::anyhow!("blob {id} is shorter than its reference"))?;
            out.extend_from_slice(piece);
            let blob_len = blob.len() as u64;
            if let Some(origins) = self.origins.as_mut().filter(|_| note) {
                let from = from as u64;
                match origins.last_mut() {
                    Some(o) if o.blob == id && o.at + o.len == self.produced && o.from + o.len == from => o.len += take,
                    _ => origins.push(Origin {
                        at: self.produced,
                        len: take,
                        blob: id,
                        from,
                        whole: false,
                        base: self.blobs.base_for(&id),
                    }),
                }
                let last = origins.last_mut().expect("just added to");
                if last.from == 0 && last.len == blob_len {
                    last.whole = true;
                    last.base = None;
                }
            }
            if note {
                self.produced += take;
            }
            offset += take;
            len -= take;
        }
        Ok(())
    }

    /// The fast_rsync signature of the whole old version, computed a window at a time (a
    /// signature is a header then one entry per block, so block-aligned windows concatenate).
    pub fn signature(&mut self) -> Result<Vec<u8>> {
        let bs = block_size(self.size);
        let opts = fast_rsync::SignatureOptions { block_size: bs, crypto_hash_size: CRYPTO_HASH_SIZE };
        let window = bs as u64 * 1024;
        let mut sig: Vec<u8> = Vec::new();
        let mut buf = Vec::with_capacity(window as usize);
        let mut at = 0;
        loop {
            buf.clear();
            let len = window.min(self.size - at);
            self.read(at, len, &mut buf)?;
            let part = fast_rsync::Signature::calculate(&buf, opts).into_serialized();
            if sig.is_empty() {
                sig = part;
            } else {
                sig.extend_from_slice(&part[12..]);
            }
            at += len;
            if at >= self.size {
                return Ok(sig);
            }
        }
    }

    /// Apply one window's delta (librsync format), appending at most `limit` bytes to `out`.
    pub fn apply(&mut self, delta: &[u8], limit: u64, out: &mut Vec<u8>) -> Result<()> {
        if limit > MAX_WINDOW {
            bail!("a delta window of {limit} bytes is larger than any agent sends ({MAX_WINDOW})");
        }
        let start_len = out.len();
        let mut d = Reader { b: delta, pos: 0 };
        if d.int(4)? != 0x7273_0236 {
            bail!("not an rsync delta (bad magic)");
        }
        loop {
            let cmd = d.int(1)? as u8;
            let produced = (out.len() - start_len) as u64;
            match cmd {
                0 => break,
                1..=0x44 => {
                    let n = if cmd <= 0x40 { cmd as u64 } else { d.int(1 << (cmd - 0x41))? };
                    if produced.saturating_add(n) > limit {
                        bail!("the delta produces more than its window of {limit} bytes");
                    }
                    out.extend_from_slice(d.take(n)?);
                    self.produced += n;
                }
                0x45..=0x54 => {
                    let m = cmd - 0x45;
                    let offset = d.int(1 << (m / 4))?;
                    let n = d.int(1 << (m % 4))?;
                    if produced.saturating_add(n) > limit {
                        bail!("the delta produces more than its window of {limit} bytes");
                    }
                    self.read_noting(offset, n, out, true)?;
                }
                other => bail!("unknown rsync delta command {other:#x}"),
            }
        }
        if (out.len() - start_len) as u64 != limit {
            bail!("the delta produced {} bytes for a window of {limit}", out.len() - start_len);
        }
        Ok(())
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n as usize).filter(|&e| e <= self.b.len());
        let Some(end) = end else { bail!("the delta is truncated") };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// A big-endian integer of `width` bytes.
    fn int(&mut self, width: usize) -> Result<u64> {
        Ok(self.take(width as u64)?.iter().fold(0u64, |a, &x| (a << 8) | x as u64))
    }
}

/// Signatures of versions the collector stored, by content, so that the next delta of a file
/// needs no read of its previous version from the repository. A missing or damaged entry is
/// rebuilt from the repository; the cache is never trusted for content (BLAKE3 verifies).
pub struct SignatureCache {
    dir: std::path::PathBuf,
}

impl SignatureCache {
    /// The cache in `dir` (created on first write).
    pub fn new(dir: std::path::PathBuf) -> SignatureCache {
        SignatureCache { dir }
    }

    /// Where the collector keeps it by default: systemd's CacheDirectory, else the XDG cache.
    pub fn default_dir() -> std::path::PathBuf {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
        env("CACHE_DIRECTORY")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("magpie")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/magpie")))
            .unwrap_or_else(|| "/var/cache/magpie".into())
            .join("signatures")
    }

    fn path(&self, blake3: &[u8], bs: u32) -> std::path::PathBuf {
        self.dir.join(format!("{}-{bs}.sig", hex::encode(blake3)))
    }

    /// The signature of the content with this BLAKE3 at block size `bs`, if cached.
    pub fn get(&self, blake3: &[u8], bs: u32) -> Option<Vec<u8>> {
        let sig = std::fs::read(self.path(blake3, bs)).ok()?;
        let ok =
            sig.len() >= 12 && sig[4..8] == bs.to_be_bytes() && (sig.len() - 12) % (4 + CRYPTO_HASH_SIZE as usize) == 0;
        ok.then_some(sig)
    }

    /// Store a signature; a failure only costs a rebuild later, so it is logged, not raised.
    pub fn put(&self, blake3: &[u8], bs: u32, sig: &[u8]) {
        let path = self.path(blake3, bs);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let r = std::fs::create_dir_all(&self.dir)
            .and_then(|_| std::fs::write(&tmp, sig))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("signature cache {}: {e}", self.dir.display());
        }
    }

    /// Forget the signature of a version that is no longer the newest.
    pub fn remove(&self, blake3: &[u8], size: u64) {
        let _ = std::fs::remove_file(self.path(blake3, block_size(size)));
    }
}

/// A signature computed from content arriving in pieces, in block-aligned windows.
pub struct SignatureBuilder {
    opts: fast_rsync::SignatureOptions,
    buf: Vec<u8>,
    sig: Vec<u8>,
}

impl SignatureBuilder {
    /// For content expected to be `size` bytes (the block size depends on it).
    pub fn new(size: u64) -> SignatureBuilder {
        SignatureBuilder {
            opts: fast_rsync::SignatureOptions { block_size: block_size(size), crypto_hash_size: CRYPTO_HASH_SIZE },
            buf: Vec::new(),
            sig: Vec::new(),
        }
    }

    /// Append the signature of `data`, whole blocks except at the end of the content.
    fn add(sig: &mut Vec<u8>, opts: fast_rsync::SignatureOptions, data: &[u8]) {
        let part = fast_rsync::Signature::calculate(data, opts).into_serialized();
        if sig.is_empty() {
            *sig = part;
        } else {
            sig.extend_from_slice(&part[12..]);
        }
    }

    /// Sign the whole blocks of `data` where it lies; only a partial block is copied, to wait
    /// for the rest of its bytes.
    pub fn push(&mut self, mut data: &[u8]) {
        let bs = self.opts.block_size as usize;
        if !self.buf.is_empty() {
            let take = (bs - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < bs {
                return;
            }
            Self::add(&mut self.sig, self.opts, &self.buf);
            self.buf.clear();
        }
        let whole = data.len() / bs * bs;
        if whole > 0 {
            Self::add(&mut self.sig, self.opts, &data[..whole]);
        }
        self.buf.extend_from_slice(&data[whole..]);
    }

    /// The block size and signature, if the content's size kept the expected block size.
    pub fn finish(mut self, size: u64) -> Option<(u32, Vec<u8>)> {
        if !self.buf.is_empty() || self.sig.is_empty() {
            Self::add(&mut self.sig, self.opts, &self.buf);
        }
        (block_size(size) == self.opts.block_size).then_some((self.opts.block_size, self.sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_built_in_pieces_equals_one_built_at_once() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let bs = block_size(data.len() as u64);
        let whole = fast_rsync::Signature::calculate(
            &data,
            fast_rsync::SignatureOptions { block_size: bs, crypto_hash_size: CRYPTO_HASH_SIZE },
        );
        // Pieces of many blocks, of less than a block, and of the whole content.
        for piece_len in [100_003, 1000, data.len()] {
            let mut b = SignatureBuilder::new(data.len() as u64);
            for piece in data.chunks(piece_len) {
                b.push(piece);
            }
            let (got_bs, sig) = b.finish(data.len() as u64).unwrap();
            assert_eq!(got_bs, bs);
            assert_eq!(sig, whole.serialized(), "pieces of {piece_len} bytes");
        }
    }

    #[test]
    fn block_sizes_grow_with_the_file_within_bounds() {
        assert_eq!(block_size(1000), 2048);
        assert_eq!(block_size(600 << 20), 2048);
        assert_eq!(block_size(8 << 30), 8192);
        assert_eq!(block_size(1 << 40), 65536);
    }
}
