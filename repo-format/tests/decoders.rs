//! Decoders of untrusted bytes never panic: arbitrary input, and valid objects with arbitrary
//! bytes flipped, give an error or a value, never a crash.

use proptest::prelude::*;
use prost::Message;
use repo_format::backend::{Backend, MemoryBackend};
use repo_format::crypto::Keys;
use repo_format::repofile::dictionary::Dictionaries;
use repo_format::repofile::index::IndexFile;
use repo_format::repofile::pack::{self, BlobKind, PackBuilder, PackEntry};
use repo_format::repofile::{config, tree::Tree};
use repo_format::{Id, Snapshot};

fn plain_keys() -> Keys {
    Keys::generate(false)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn index_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        let _ = IndexFile::decode("i", &bytes);
        let mut with_magic = repo_format::magic::INDEX_MAGIC.to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = IndexFile::decode("i", &with_magic);
    }

    #[test]
    fn mutated_index_never_panics(pos in any::<prop::sample::Index>(), val in any::<u8>()) {
        let f = IndexFile {
            supersedes: vec![Id::of_stored(b"a")],
            packs: vec![(Id::of_stored(b"p"), vec![PackEntry { kind: BlobKind::Data, id: Id::of_stored(b"b"), offset: 0, stored_len: 9, raw_len: 5, base: None }])],
        };
        let mut b = f.encode();
        let i = pos.index(b.len());
        b[i] = val;
        let _ = IndexFile::decode("i", &b);
    }

    #[test]
    fn pack_header_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000), tail in any::<u32>()) {
        let keys = plain_keys();
        let _ = pack::header_from_bytes(&keys, "p", &bytes);
        let mut b = bytes.clone();
        b.extend_from_slice(&tail.to_le_bytes());
        let _ = pack::header_from_bytes(&keys, "p", &b);
    }

    #[test]
    fn mutated_pack_never_panics(pos in any::<prop::sample::Index>(), val in any::<u8>()) {
        let keys = plain_keys();
        let dictionaries = Dictionaries::new(std::sync::Arc::new(MemoryBackend::new()), keys.clone(), 3);
        let mut pb = PackBuilder::new();
        for i in 0..3u8 {
            let data = vec![i; 100];
            let sealed = pack::encode_blob(&keys, BlobKind::Data, &data, None, None);
            pb.add(BlobKind::Data, keys.blob_id(BlobKind::Data, &data), &sealed, 100, None);
        }
        let store = MemoryBackend::new();
        let (id, _) = pb.store(&keys, &store).unwrap();
        let mut bytes = store.get(&repo_format::repofile::pack_name(&id), None).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] = val;
        if let Ok(entries) = pack::header_from_bytes(&keys, "p", &bytes) {
            for e in entries {
                if let Some(blob) = bytes.get(e.range().start as usize..e.range().end as usize) {
                    let _ = pack::decode_blob(&keys, &dictionaries, &e, blob, None);
                }
            }
        }
    }

    #[test]
    fn metadata_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..500)) {
        let _ = Tree::decode(bytes.as_slice());
        let _ = Snapshot::decode(bytes.as_slice());
        let _ = config::parse_head(&bytes);
        let mut cfg = repo_format::magic::CONFIG_MAGIC.to_vec();
        cfg.extend_from_slice(&1u32.to_le_bytes());
        cfg.push(0);
        cfg.extend_from_slice(&bytes);
        if let Ok(h) = config::parse_head(&cfg) {
            let _ = config::decode_payload(h.payload, &plain_keys());
        }
    }
}
