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
            self.entries.sort_unstable_by_key(|a| a.id);
            self.entries.shrink_to_fit();
            self.sorted = true;
        }
    }

    fn position(&self, id: &Id) -> Option<usize> {
        assert!(self.sorted, "MasterIndex used before finalize()");
        self.entries.binary_search_by(|e| e.id.cmp(&id.0)).ok()
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
}
