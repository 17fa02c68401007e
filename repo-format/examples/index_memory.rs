//! Resident bytes per chunk of the in-memory index, measured on N synthetic entries.
//!
//! cargo run --release -p magpie-repo-format --example index_memory -- 1000000

use repo_format::Id;
use repo_format::index::MasterIndex;
use repo_format::repofile::pack::{BlobKind, PackEntry};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let per_pack = 128; // 32 MiB packs of 256 KiB chunks
    let before = rss_kib();
    let mut idx = MasterIndex::new();
    let mut entries = Vec::with_capacity(per_pack);
    for p in 0..n.div_ceil(per_pack) {
        entries.clear();
        for i in 0..per_pack.min(n - p * per_pack) {
            let id = Id(*blake3::hash(&((p * per_pack + i) as u64).to_le_bytes()).as_bytes());
            entries.push(PackEntry {
                kind: BlobKind::Data,
                id,
                offset: (i * 1000) as u32,
                stored_len: 1000,
                raw_len: 2000,
                base: None,
            });
        }
        idx.add_pack(Id(*blake3::hash(&(p as u64).to_be_bytes()).as_bytes()), &entries);
    }
    idx.finalize();
    let after = rss_kib();
    println!(
        "{n} entries: {} bytes held ({:.1} per entry, {} per entry in the table); RSS grew {:.1} bytes per entry",
        idx.heap_bytes(),
        idx.heap_bytes() as f64 / n as f64,
        MasterIndex::BYTES_PER_ENTRY,
        (after.saturating_sub(before) * 1024) as f64 / n as f64
    );
}
