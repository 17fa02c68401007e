//! Measures what parameters cost on real data: repository size for a directory under several
//! chunk sizes and zstd levels, and the time each takes. Used to choose the defaults recorded in
//! FORMAT.md.
//!
//! cargo run --release -p magpie-repo-format --example measure -- DIR [DIR2]
//! (DIR2, if given, is stored after DIR into the same repository, as "the next day".)

use std::sync::Arc;
use std::time::Instant;

use repo_format::backend::MemoryBackend;
use repo_format::chunker::ChunkerParams;
use repo_format::crypto::KdfParams;
use repo_format::{InitOptions, Repository, Writer};

fn run(dirs: &[String], params: ChunkerParams, level: i32, small: u32) -> (Vec<u64>, f64) {
    let mut o = InitOptions::encrypted("x");
    o.kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
    o.chunker_files = params;
    o.compression_level = level;
    o.small_file_threshold = small;
    let backend = Arc::new(MemoryBackend::new());
    let mut repo = Repository::init(backend.clone(), &o).unwrap();
    let t = Instant::now();
    let mut sizes = Vec::new();
    for d in dirs {
        let mut w = Writer::new(&repo, 0);
        repo_format::fs::import_dir(&mut w, std::path::Path::new(d)).unwrap();
        let (idx, _) = w.finish().unwrap();
        if let Some((id, f)) = idx {
            repo.add_index(id, &f);
        }
        sizes.push(backend.total_size());
    }
    (sizes, t.elapsed().as_secs_f64())
}

fn main() {
    let dirs: Vec<String> = std::env::args().skip(1).collect();
    let kib = |k: u32| k * 1024;
    println!("{:<28} {:>5} {:>7} {:>14} {:>9}", "chunks min/avg/max", "zstd", "small", "stored bytes", "seconds");
    let report = |label: String, level: i32, small: u32, r: (Vec<u64>, f64)| {
        println!("{label:<28} {level:>5} {small:>7} {:>14} {:>9.1}", format!("{:?}", r.0), r.1);
    };
    // MEASURE_SIZES="2,8,32;16,64,256" overrides the chunk sizes tried (KiB).
    let sizes: Vec<(u32, u32, u32)> = std::env::var("MEASURE_SIZES")
        .unwrap_or_else(|_| "16,64,256;64,256,1024;256,1024,4096".into())
        .split(';')
        .map(|t| {
            let v: Vec<u32> = t.split(',').map(|x| x.trim().parse().expect("KiB")).collect();
            (v[0], v[1], v[2])
        })
        .collect();
    for (min, avg, max) in sizes {
        let p = ChunkerParams { min: kib(min), avg: kib(avg), max: kib(max) };
        report(format!("{min}/{avg}/{max} KiB"), 3, kib(16), run(&dirs, p, 3, kib(16)));
    }
    let p = ChunkerParams::FILES;
    report("files default, no batching".into(), 3, 0, run(&dirs, p, 3, 0));
    for level in [1, 3, 6, 9, 19] {
        report("files default".into(), level, kib(16), run(&dirs, p, level, kib(16)));
    }
}
