//! The resident blob index: blob id → (pack, offset, lengths).
//!
//! One entry is 48 bytes (32-byte id, pack ordinal with the blob kind in its top bit, offset,
//! stored and raw length) in a sorted `Vec`, found by binary search: no per-entry allocation and
//! no hash-table slack. FORMAT.md ("Index in memory") records the measured figure. The few blobs
//! compressed against a base keep their base's id in a separate map rather than widening every
//! entry by 32 bytes.

use std::collections::HashMap;

use crate::id::Id;
use crate::repofile::index::IndexFile;
use crate::repofile::pack::{BlobKind, PackEntry};

const TREE_BIT: u32 = 1 << 31;

/// Bytewise order of ids, decided by their first 8 bytes as one integer whenever they differ
/// there (ids are uniformly random, so almost always): comparing `[u8; 32]` calls `memcmp`, and
/// sorting a bench repository's index that way was 4% of a day-2 pull's CPU.
fn id_order(a: &[u8; 32], b: &[u8; 32]) -> std::cmp::Ordering {
    head(a).cmp(&head(b)).then_with(|| a.cmp(b))
}

/// An id's first 8 bytes, big-endian.
fn head(id: &[u8; 32]) -> u64 {
    u64::from_be_bytes(id[..8].try_into().expect("8 bytes"))
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    id: [u8; 32],
    pack: u32,
    offset: u32,
    stored_len: u32,
    raw_len: u32,
}

/// Where a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// The pack's storage id.
    pub pack: Id,
    /// The blob within it.
    pub entry: PackEntry,
}

/// All blobs of a repository, merged from its index files.
#[derive(Default, Debug, Clone)]
pub struct MasterIndex {
    packs: Vec<Id>,
    pack_ord: HashMap<Id, u32>,
    entries: Vec<Entry>,
    /// Blob → its base, for the blobs that have one.
    bases: HashMap<Id, Id>,
    /// `starts[b]` is the first entry whose id's top `bucket_bits` bits are ≥ b: a lookup
    /// searches one bucket of 4 to 8 entries instead of the whole table (17 steps, each a cache
    /// miss, for 100k entries; 5% of a day-2 pull's collector CPU). At most one byte per entry.
    starts: Vec<u32>,
    bucket_bits: u32,
    sorted: bool,
}

impl MasterIndex {
    /// An empty index.
    pub fn new() -> MasterIndex {
        MasterIndex { sorted: true, ..Default::default() }
    }

    /// Add every pack of an index file.
    pub fn add_file(&mut self, file: &IndexFile) {
        for (pack, entries) in &file.packs {
            self.add_pack(*pack, entries);
        }
    }

    /// Add one pack's entries (a pack already present is skipped).
    pub fn add_pack(&mut self, pack: Id, entries: &[PackEntry]) {
        if self.pack_ord.contains_key(&pack) {
            return;
        }
        let ord = self.packs.len() as u32;
        self.packs.push(pack);
        self.pack_ord.insert(pack, ord);
        self.bases.extend(entries.iter().filter_map(|e| Some((e.id, e.base?))));
        self.entries.extend(entries.iter().map(|e| Entry {
            id: e.id.0,
            pack: ord | if e.kind == BlobKind::Tree { TREE_BIT } else { 0 },
            offset: e.offset,
            stored_len: e.stored_len,
            raw_len: e.raw_len,
        }));
        self.sorted = false;
    }

    /// Sort after adding; lookups need it.
    pub fn finalize(&mut self) {
        if !self.sorted {
            self.entries.sort_unstable_by(|a, b| id_order(&a.id, &b.id));
            self.entries.shrink_to_fit();
            self.bucket_bits = (self.entries.len() / 4).max(1).ilog2().min(32);
            let mut starts = vec![0u32; (1 << self.bucket_bits) + 1];
            for e in &self.entries {
                starts[self.bucket(&e.id) + 1] += 1;
            }
            for b in 1..starts.len() {
                starts[b] += starts[b - 1];
            }
            self.starts = starts;
            self.sorted = true;
        }
    }

    fn bucket(&self, id: &[u8; 32]) -> usize {
        head(id).checked_shr(64 - self.bucket_bits).unwrap_or(0) as usize
    }

    fn position(&self, id: &Id) -> Option<usize> {
        assert!(self.sorted, "MasterIndex used before finalize()");
        if self.starts.is_empty() {
            return None;
        }
        let b = self.bucket(&id.0);
        let (from, to) = (self.starts[b] as usize, self.starts[b + 1] as usize);
        self.entries[from..to].binary_search_by(|e| id_order(&e.id, &id.0)).ok().map(|i| from + i)
    }

    /// Whether the blob is stored.
    pub fn contains(&self, id: &Id) -> bool {
        self.position(id).is_some()
    }

    /// Where the blob is (one of its copies if it is stored more than once).
    pub fn get(&self, id: &Id) -> Option<Location> {
        self.position(id).map(|i| self.location(&self.entries[i]))
    }

    fn location(&self, e: &Entry) -> Location {
        Location {
            pack: self.packs[(e.pack & !TREE_BIT) as usize],
            entry: PackEntry {
                kind: if e.pack & TREE_BIT != 0 { BlobKind::Tree } else { BlobKind::Data },
                id: Id(e.id),
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
                base: if self.bases.is_empty() { None } else { self.bases.get(&Id(e.id)).copied() },
            },
        }
    }

    /// Every entry (a blob stored twice appears twice).
    pub fn iter(&self) -> impl Iterator<Item = Location> + '_ {
        self.entries.iter().map(|e| self.location(e))
    }

    /// Packs the index knows.
    pub fn packs(&self) -> &[Id] {
        &self.packs
    }

    /// Whether the pack is indexed.
    pub fn has_pack(&self, pack: &Id) -> bool {
        self.pack_ord.contains_key(pack)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Resident bytes per entry of the entry table (excluding the per-pack table).
    pub const BYTES_PER_ENTRY: usize = std::mem::size_of::<Entry>();

    /// Bytes held by the index (entry table and pack tables), for measurement.
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * Self::BYTES_PER_ENTRY
            + self.packs.capacity() * 32
            + self.pack_ord.capacity() * (32 + 4 + 8)
            + self.bases.capacity() * (32 + 32 + 1)
            + self.starts.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_kinds() {
        let mut m = MasterIndex::new();
        let (a, b) = (Id::random(), Id::random());
        let p = Id::random();
        m.add_pack(
            p,
            &[
                PackEntry { kind: BlobKind::Data, id: a, offset: 0, stored_len: 5, raw_len: 4, base: None },
                PackEntry { kind: BlobKind::Tree, id: b, offset: 5, stored_len: 7, raw_len: 6, base: None },
            ],
        );
        m.finalize();
        assert_eq!(MasterIndex::BYTES_PER_ENTRY, 48);
        assert_eq!(m.get(&b).unwrap().entry.kind, BlobKind::Tree);
        assert_eq!(m.get(&a).unwrap().pack, p);
        assert!(!m.contains(&Id::random()));
    }

    /// The bucket table finds every entry, at every size (from empty to many buckets), and
    /// nothing else; ids sharing their first 8 bytes fall back to comparing the rest.
    #[test]
    fn every_entry_is_found_at_every_size() {
        for n in [0usize, 1, 3, 8, 9, 100, 5000] {
            let mut ids: Vec<Id> = (0..n).map(|_| Id::random()).collect();
            if let Some(&first) = ids.first() {
                let mut twin = first;
                twin.0[31] ^= 1;
                ids.push(twin);
            }
            let mut m = MasterIndex::new();
            let entry = |id| PackEntry { kind: BlobKind::Data, id, offset: 0, stored_len: 1, raw_len: 1, base: None };
            m.add_pack(Id::random(), &ids.iter().map(|&id| entry(id)).collect::<Vec<_>>());
            m.finalize();
            assert!(ids.iter().all(|id| m.contains(id)), "{n} entries");
            assert!((0..100).all(|_| !m.contains(&Id::random())), "{n} entries");
        }
    }
}
