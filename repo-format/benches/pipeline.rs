//! Ingest (chunk → id → compress → seal → pack → store) and read-back on both cores, on
//! compressible text and on incompressible data, next to the limits of the parts (zstd alone,
//! keyed BLAKE3 alone, FastCDC alone); and dump content in dump-sized chunks with and without its
//! dictionary (FORMAT.md §12).
//!
//! cargo bench -p magpie-repo-format --bench pipeline

use std::sync::Arc;

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use repo_format::archive::{ChunkedContent, store_stream};
use repo_format::backend::MemoryBackend;
use repo_format::crypto::KdfParams;
use repo_format::{Id, InitOptions, Repository, Writer};

const SIZE: usize = 64 << 20;

fn text(n: usize) -> Vec<u8> {
    // Words of this machine's licence texts and kernel headers, drawn at random (deterministic
    // seed): compresses like prose or code (about 3:1) but never repeats, so nothing dedups.
    let mut words: Vec<Vec<u8>> = Vec::new();
    for dir in ["/usr/share/common-licenses", "/usr/include/linux"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Ok(b) = std::fs::read(e.path()) {
                words.extend(b.split(|c| c.is_ascii_whitespace()).filter(|w| !w.is_empty()).map(<[u8]>::to_vec));
            }
        }
    }
    words.sort();
    words.dedup();
    if words.len() < 100 {
        words = (0..5000u32).map(|i| format!("word{i}").into_bytes()).collect();
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut out = Vec::with_capacity(n + 64);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Zipf-like: most words come from the first few hundred.
        let r = (x % 1000) as usize;
        let idx = if r < 800 { (x >> 20) as usize % 300 } else { (x >> 20) as usize % words.len() };
        out.extend_from_slice(&words[idx.min(words.len() - 1)]);
        out.push(if x.is_multiple_of(13) { b'\n' } else { b' ' });
    }
    out.truncate(n);
    out
}

fn new_repo() -> (Arc<MemoryBackend>, Repository) {
    let mut o = InitOptions::encrypted("bench");
    o.kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
    let b = Arc::new(MemoryBackend::new());
    let r = Repository::init(b.clone(), &o).unwrap();
    (b, r)
}

fn ingest(repo: &mut Repository, data: &[u8]) -> Vec<Id> {
    let chunker = repo.chunker(false).unwrap();
    let mut w = Writer::new(repo, 0);
    let c = store_stream(&mut w, &chunker, data, std::path::Path::new("bench")).unwrap();
    let (idx, _) = w.finish().unwrap();
    if let Some((id, f)) = idx {
        repo.add_index(id, &f);
    }
    c.chunks.iter().map(|c| Id::from_slice(&c.id).unwrap()).collect()
}

fn bench(c: &mut Criterion) {
    let inputs = [("text", text(SIZE)), ("random", common::noise(SIZE, 1))];
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    for (name, data) in &inputs {
        let stored = {
            let (b, mut r) = new_repo();
            ingest(&mut r, data);
            b.total_size()
        };
        eprintln!("{name}: {SIZE} bytes stored as {stored} ({:.3} of input)", stored as f64 / SIZE as f64);
        g.bench_function(format!("ingest/{name}"), |bch| {
            bch.iter_batched(new_repo, |(_b, mut r)| ingest(&mut r, data), BatchSize::PerIteration)
        });
        let (_b, mut r) = new_repo();
        let ids = ingest(&mut r, data);
        g.bench_function(format!("read-back/{name}"), |bch| {
            bch.iter(|| {
                // Read on both cores, as restore does per file.
                let half = ids.len() / 2;
                std::thread::scope(|s| {
                    for part in [&ids[..half], &ids[half..]] {
                        let r = &r;
                        s.spawn(move || part.iter().map(|id| r.read_blob(id).unwrap().len()).sum::<usize>());
                    }
                });
            })
        });
        // The parts alone, single-threaded (the pipeline runs them on two cores).
        g.bench_function(format!("zstd-3-alone/{name}"), |bch| {
            let mut z = zstd::bulk::Compressor::new(3).unwrap();
            bch.iter(|| data.chunks(1 << 20).map(|c| z.compress(c).unwrap().len()).sum::<usize>())
        });
        g.bench_function(format!("blake3-keyed-alone/{name}"), |bch| {
            let k = r.keys().clone();
            bch.iter(|| {
                data.chunks(1 << 20).map(|c| k.blob_id(repo_format::BlobKind::Data, c).0[0] as usize).sum::<usize>()
            })
        });
        g.bench_function(format!("fastcdc-alone/{name}"), |bch| {
            let ch = r.chunker(false).unwrap();
            bch.iter(|| ch.split(data).len())
        });
    }
    g.finish();
}

/// Store `data` as dump content in dump-sized chunks: with the stored dictionary `dictionary`, or,
/// without one, compressed chunk by chunk. Returns the stored bytes.
fn ingest_dump(repo: &mut Repository, data: &[u8], dictionary: Option<Id>) -> u64 {
    let chunker = repo.chunker(true).unwrap();
    let mut w = Writer::new(repo, 0);
    let mut content = match dictionary {
        Some(d) => {
            w.use_dictionary(&d).unwrap();
            ChunkedContent::dump(chunker)
        }
        None => ChunkedContent::new(chunker),
    };
    content.push(&mut w, data).unwrap();
    content.finish(&mut w).unwrap();
    let (index, stats) = w.finish().unwrap();
    if let Some((id, f)) = index {
        repo.add_index(id, &f);
    }
    stats.stored_bytes
}

/// A repository holding a dictionary trained on `sample` (as a first backup of a dump would).
fn repo_with_dictionary(sample: &[u8]) -> (Arc<MemoryBackend>, Repository, Id) {
    let (b, r) = new_repo();
    let mut w = Writer::new(&r, 0);
    let mut content = ChunkedContent::dump(r.chunker(true).unwrap());
    content.push(&mut w, sample).unwrap();
    content.finish(&mut w).unwrap();
    let dictionary = w.finish().unwrap().1.dictionary.expect("a dictionary");
    (b, r, dictionary)
}

fn dump_chunks(c: &mut Criterion) {
    const DUMP: usize = 32 << 20;
    // Training sample and measured data come from one stream of the same words, apart, so that
    // nothing of the sample dedups.
    let all = text(DUMP + (4 << 20));
    let (data, sample) = all.split_at(DUMP);
    let mut g = c.benchmark_group("dump-chunks");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(DUMP as u64));
    let plain = ingest_dump(&mut new_repo().1, data, None);
    let (_b, mut r, d) = repo_with_dictionary(sample);
    let with = ingest_dump(&mut r, data, Some(d));
    eprintln!(
        "dump in dump-sized chunks: {DUMP} bytes stored as {plain} ({:.3}) alone, {with} ({:.3}) with the dictionary",
        plain as f64 / DUMP as f64,
        with as f64 / DUMP as f64
    );
    g.bench_function("ingest/alone", |bch| {
        bch.iter_batched(new_repo, |(_b, mut r)| ingest_dump(&mut r, data, None), BatchSize::PerIteration)
    });
    g.bench_function("ingest/with-dictionary", |bch| {
        bch.iter_batched(
            || repo_with_dictionary(sample),
            |(_b, mut r, d)| ingest_dump(&mut r, data, Some(d)),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench, dump_chunks);
criterion_main!(benches);
