//! Index files: which pack holds each blob, written once, never modified.
//!
//! ```text
//! index file = sealed(body)
//! body       = magic "MAGPIDX\x01" (8), or "MAGPIDX\x02" when a blob has a base
//!              || n_supersedes (u32 LE) || superseded index ids (32 each)
//!              || n_packs (u32 LE) || pack ids (32 each)
//!              || n_entries (u32 LE) || fanout (256 × u32 LE) || entries sorted by id
//! entry      = id (32) || pack ordinal (u32 LE) || offset (u32 LE) || stored_len (u32 LE)
//!              || raw_len (u32 LE) || kind (u8)                                  (49 bytes)
//!              || base (32, all zero for none; "MAGPIDX\x02" only)                (81 bytes)
//! ```
//! `fanout[b]` is the number of entries whose id's first byte is ≤ b, so the entries starting
//! with byte b are `fanout[b-1]..fanout[b]`: a reader can binary-search a slice without loading
//! the whole table, which is what lets the resident index later shrink to a filter.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::magic;
use crate::repofile::pack::{BlobKind, PackEntry, base_bytes, base_from};

const ENTRY_LEN: usize = 49;
const ENTRY_LEN_BASES: usize = ENTRY_LEN + 32;

/// The decoded content of one index file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IndexFile {
    /// Index files this one replaces (written by compact and repair); readers ignore those.
    pub supersedes: Vec<Id>,
    /// Packs and their entries.
    pub packs: Vec<(Id, Vec<PackEntry>)>,
}

impl IndexFile {
    /// Number of blob entries.
    pub fn entry_count(&self) -> usize {
        self.packs.iter().map(|(_, e)| e.len()).sum()
    }

    /// Encode the plaintext body.
    pub fn encode(&self) -> Vec<u8> {
        let mut rows: Vec<(u32, &PackEntry)> = Vec::with_capacity(self.entry_count());
        for (ord, (_, entries)) in self.packs.iter().enumerate() {
            rows.extend(entries.iter().map(|e| (ord as u32, e)));
        }
        rows.sort_by(|a, b| a.1.id.cmp(&b.1.id).then(a.0.cmp(&b.0)));
        // The first version unless a blob has a base, as for pack headers.
        let bases = rows.iter().any(|(_, e)| e.base.is_some());
        let mut out = Vec::with_capacity(
            8 + 12 + 1024 + 32 * (self.supersedes.len() + self.packs.len()) + rows.len() * ENTRY_LEN_BASES,
        );
        out.extend_from_slice(if bases { magic::INDEX_MAGIC_BASES } else { magic::INDEX_MAGIC });
        out.extend_from_slice(&(self.supersedes.len() as u32).to_le_bytes());
        for id in &self.supersedes {
            out.extend_from_slice(&id.0);
        }
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for (id, _) in &self.packs {
            out.extend_from_slice(&id.0);
        }
        out.extend_from_slice(&(rows.len() as u32).to_le_bytes());
        let mut fanout = [0u32; 256];
        for (_, e) in &rows {
            fanout[e.id.0[0] as usize] += 1;
        }
        let mut acc = 0;
        for f in fanout.iter_mut() {
            acc += *f;
            *f = acc;
        }
        for f in fanout {
            out.extend_from_slice(&f.to_le_bytes());
        }
        for (ord, e) in rows {
            out.extend_from_slice(&e.id.0);
            out.extend_from_slice(&ord.to_le_bytes());
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.stored_len.to_le_bytes());
            out.extend_from_slice(&e.raw_len.to_le_bytes());
            out.push(e.kind as u8);
            if bases {
                out.extend_from_slice(&base_bytes(e.base));
            }
        }
        out
    }

    /// Decode and validate a plaintext body.
    pub fn decode(name: &str, b: &[u8]) -> Result<IndexFile> {
        let bad = |why: &str| Error::corrupt(name, why);
        let mut r = Reader { b, pos: 0 };
        let bases = match r.take(8).ok_or_else(|| bad("truncated"))? {
            m if m == magic::INDEX_MAGIC => false,
            m if m == magic::INDEX_MAGIC_BASES => true,
            _ => return Err(bad("bad magic or unsupported index version")),
        };
        let entry_len = if bases { ENTRY_LEN_BASES } else { ENTRY_LEN };
        let n_sup = r.u32().ok_or_else(|| bad("truncated"))? as usize;
        let mut supersedes = Vec::with_capacity(n_sup.min(1 << 16));
        for _ in 0..n_sup {
            supersedes.push(r.id().ok_or_else(|| bad("truncated"))?);
        }
        let n_packs = r.u32().ok_or_else(|| bad("truncated"))? as usize;
        let mut packs: Vec<(Id, Vec<PackEntry>)> = Vec::with_capacity(n_packs.min(1 << 20));
        for _ in 0..n_packs {
            packs.push((r.id().ok_or_else(|| bad("truncated"))?, Vec::new()));
        }
        let n = r.u32().ok_or_else(|| bad("truncated"))? as usize;
        let mut fanout = [0u32; 256];
        for f in fanout.iter_mut() {
            *f = r.u32().ok_or_else(|| bad("truncated"))?;
        }
        if fanout[255] as usize != n || r.b.len() - r.pos != n * entry_len {
            return Err(bad("entry count does not match its length"));
        }
        let mut prev: Option<Id> = None;
        let mut counts = [0u32; 256];
        for _ in 0..n {
            let id = r.id().expect("length checked");
            let ord = r.u32().expect("length checked") as usize;
            let offset = r.u32().expect("length checked");
            let stored_len = r.u32().expect("length checked");
            let raw_len = r.u32().expect("length checked");
            let kind =
                BlobKind::from_u8(r.take(1).expect("length checked")[0]).ok_or_else(|| bad("unknown blob kind"))?;
            let base = if bases { base_from(r.take(32).expect("length checked")) } else { None };
            if prev.is_some_and(|p| p > id) {
                return Err(bad("entries are not sorted"));
            }
            prev = Some(id);
            counts[id.0[0] as usize] += 1;
            let pack = packs.get_mut(ord).ok_or_else(|| bad("entry names a pack ordinal out of range"))?;
            pack.1.push(PackEntry { kind, id, offset, stored_len, raw_len, base });
        }
        let mut acc = 0;
        for (c, f) in counts.iter().zip(fanout) {
            acc += c;
            if acc != f {
                return Err(bad("fan-out table does not match the entries"));
            }
        }
        for (_, entries) in packs.iter_mut() {
            entries.sort_by_key(|e| e.offset);
        }
        Ok(IndexFile { supersedes, packs })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn id(&mut self) -> Option<Id> {
        Id::from_slice(self.take(32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fanout() {
        let e = |id: Id, offset| PackEntry { kind: BlobKind::Data, id, offset, stored_len: 10, raw_len: 9, base: None };
        let mut f = IndexFile {
            supersedes: vec![Id::random()],
            packs: vec![
                (Id::random(), vec![e(Id::random(), 0), e(Id::random(), 10)]),
                (Id::random(), vec![e(Id::random(), 0)]),
            ],
        };
        let bytes = f.encode();
        assert_eq!(&bytes[..8], magic::INDEX_MAGIC, "no base, so readable by builds without bases");
        assert_eq!(IndexFile::decode("i", &bytes).unwrap(), f);
        f.packs[1].1[0].base = Some(f.packs[0].1[1].id);
        let with_base = f.encode();
        assert_eq!(&with_base[..8], magic::INDEX_MAGIC_BASES);
        assert_eq!(IndexFile::decode("i", &with_base).unwrap(), f);
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] = 9;
        assert!(IndexFile::decode("i", &bad).is_err());
        assert!(IndexFile::decode("i", &bytes[..bytes.len() - 3]).is_err());
    }
}
