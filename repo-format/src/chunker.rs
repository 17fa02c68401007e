//! Content-defined chunking with FastCDC 2020, its gear table keyed by the repository.
//!
//! [`Chunker`] finds cut points in a buffer that the caller fills from a stream: it needs at
//! least `max` bytes before it can decide (or the end of the stream), so a caller's memory is
//! bounded by one maximum chunk plus its read size, whatever the size of the input.

use std::borrow::Cow;

use fastcdc::v2020::{self, Normalization};

use crate::error::{Error, Result};

/// Minimum, average and maximum chunk sizes in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkerParams {
    /// No chunk is smaller (but the last of a stream).
    pub min: u32,
    /// The target average.
    pub avg: u32,
    /// No chunk is larger.
    pub max: u32,
}

impl ChunkerParams {
    /// For file trees: on a real server tree the average chunk size barely changed the stored size
    /// (see FORMAT.md, "Chunking"), so a large average keeps the index small.
    pub const FILES: ChunkerParams = ChunkerParams { min: 256 * 1024, avg: 1024 * 1024, max: 4 * 1024 * 1024 };

    /// For database dumps: changed rows are spread through the dump (PostgreSQL even moves
    /// updated rows to the end), so chunks are small enough that most of a day's dump is
    /// unchanged chunks; a changed one is stored against the chunk it replaces, whatever its
    /// size, so larger ones cost less per blob. 32 KiB against 8 KiB on the bench: day 1 stores
    /// 1% less, day 2 a quarter less, in about the same time (see FORMAT.md).
    pub const DUMPS: ChunkerParams = ChunkerParams { min: 8 * 1024, avg: 32 * 1024, max: 128 * 1024 };

    /// Check the bounds FastCDC only asserts in debug builds.
    pub fn validate(&self) -> Result<()> {
        let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&(self.min as usize))
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&(self.avg as usize))
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&(self.max as usize))
            && self.min < self.avg
            && self.avg < self.max
            && self.min.is_multiple_of(2)
            && self.avg.is_multiple_of(2)
            && self.max.is_multiple_of(2);
        if ok {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "chunk sizes min {} avg {} max {} are out of FastCDC's bounds ({}..={}, {}..={}, {}..={}, even, min < avg < max)",
                self.min,
                self.avg,
                self.max,
                v2020::MINIMUM_MIN,
                v2020::MINIMUM_MAX,
                v2020::AVERAGE_MIN,
                v2020::AVERAGE_MAX,
                v2020::MAXIMUM_MIN,
                v2020::MAXIMUM_MAX
            )))
        }
    }
}

/// How many first bytes of a file [`is_database_content`] looks at.
pub const DATABASE_HEAD: usize = 512;

/// Whether a file's first bytes are those of a database dump or a database file: such content
/// changes in scattered places from one backup to the next, so it deserves the dump chunker even
/// where it is found among ordinary files (a nightly `pg_dump` into a backed-up folder).
///
/// Recognised: PostgreSQL plain dumps (`-- PostgreSQL database dump`, and `pg_dumpall`'s
/// `-- PostgreSQL database cluster dump`), PostgreSQL custom-format dumps (`PGDMP`) whose data is
/// not compressed, MySQL and MariaDB dumps (`-- MySQL dump`, `-- MariaDB dump` within the first
/// [`DATABASE_HEAD`] bytes, after the sandbox-mode line newer `mariadb-dump` writes first), SQLite
/// databases (`SQLite format 3\0`) and Redis RDB files (`REDIS` and four digits). See FORMAT.md §12.
pub fn is_database_content(head: &[u8]) -> bool {
    let within = &head[..head.len().min(DATABASE_HEAD)];
    let contains = |needle: &[u8]| within.windows(needle.len()).any(|w| w == needle);
    (head.starts_with(b"PGDMP") && pg_custom_uncompressed(head))
        || head.starts_with(b"SQLite format 3\0")
        || (head.len() >= 9 && head.starts_with(b"REDIS") && head[5..9].iter().all(u8::is_ascii_digit))
        || (within.starts_with(b"--")
            && (contains(b"-- PostgreSQL database dump") || contains(b"-- PostgreSQL database cluster dump")))
        || contains(b"-- MySQL dump ")
        || contains(b"-- MariaDB dump ")
}

/// Whether a PostgreSQL custom-format header says its data is stored uncompressed (`pg_dump -Fc
/// -Z0`). The default, compressed, changes throughout a table from its first changed row on, so
/// small chunks would only multiply the index. Header: `PGDMP`, version major, minor, revision,
/// int size, offset size, format; then from version 1.15 a compression algorithm byte (0: none),
/// before it a compression level as a sign byte and an int of `int size` bytes (0: none).
fn pg_custom_uncompressed(head: &[u8]) -> bool {
    let (Some(&major), Some(&minor), Some(&int_size)) = (head.get(5), head.get(6), head.get(8)) else {
        return false;
    };
    if (major, minor) >= (1, 15) {
        return head.get(11) == Some(&0);
    }
    head.get(11..12 + int_size as usize).is_some_and(|level| level.iter().all(|&b| b == 0))
}

/// A keyed FastCDC 2020 cut-point finder.
#[derive(Clone, Debug)]
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    gear: Cow<'static, [u64]>,
    gear_ls: Cow<'static, [u64]>,
}

impl Chunker {
    /// A chunker with the given sizes and gear seed (normalization level 1).
    pub fn new(params: ChunkerParams, seed: u64) -> Result<Chunker> {
        params.validate()?;
        let (mask_s, mask_l) = v2020::select_masks(params.avg as usize, Normalization::Level1);
        let (gear, gear_ls) = v2020::get_gear_with_seed(seed);
        Ok(Chunker { params, mask_s, mask_l, gear, gear_ls })
    }

    /// The sizes in use.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// The length of the next chunk at the start of `buf`, or `None` if more input is needed to
    /// decide. With `at_end`, every non-empty buffer yields a chunk.
    pub fn next_cut(&self, buf: &[u8], at_end: bool) -> Option<usize> {
        if buf.is_empty() || (!at_end && buf.len() < self.params.max as usize) {
            return None;
        }
        let (_, len) = v2020::cut_gear(
            buf,
            self.params.min as usize,
            self.params.avg as usize,
            self.params.max as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        Some(len.max(1))
    }

    /// Split a whole buffer (tests, benchmarks).
    pub fn split<'a>(&self, mut data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        while let Some(n) = self.next_cut(data, true) {
            let (c, rest) = data.split_at(n);
            out.push(c);
            data = rest;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn bounds_and_resync_after_insert() {
        let p = ChunkerParams::DUMPS;
        let c = Chunker::new(p, 42).unwrap();
        let data = noise(4 << 20, 7);
        let chunks = c.split(&data);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), data.len());
        for ch in &chunks[..chunks.len() - 1] {
            assert!(ch.len() >= p.min as usize && ch.len() <= p.max as usize);
        }
        let mut edited = data.clone();
        edited.splice(2_000_000..2_000_000, b"inserted bytes".iter().copied());
        let again = c.split(&edited);
        let before: std::collections::HashSet<_> = chunks.iter().collect();
        let changed = again.iter().filter(|c| !before.contains(c)).count();
        assert!(changed <= 3, "an insertion re-cut {changed} chunks");
    }

    #[test]
    fn seed_changes_boundaries() {
        let data = noise(2 << 20, 9);
        let a = Chunker::new(ChunkerParams::DUMPS, 1).unwrap().split(&data).len();
        let b: Vec<_> = Chunker::new(ChunkerParams::DUMPS, 2).unwrap().split(&data).iter().map(|c| c.len()).collect();
        let a2: Vec<_> = Chunker::new(ChunkerParams::DUMPS, 1).unwrap().split(&data).iter().map(|c| c.len()).collect();
        assert_eq!(a, a2.len());
        assert_ne!(a2, b);
    }

    #[test]
    fn database_content_is_recognised_by_its_first_bytes() {
        let pg = b"--\n-- PostgreSQL database dump\n--\n\n-- Dumped from database version 15.8\n";
        let maria = b"/*M!999999\\- enable the sandbox mode */ \n-- MariaDB dump 10.19-11.4.3-MariaDB, for Linux\n";
        // Custom-format headers as pg_dump 15 (archive 1.14: sign byte and 4-byte level) and 16
        // (archive 1.15: algorithm byte) write them, with -Z0 and by default.
        let (pg15_z0, pg15_default) = (
            b"PGDMP\x01\x0e\x00\x04\x08\x01\x00\x00\x00\x00\x00\x00",
            b"PGDMP\x01\x0e\x00\x04\x08\x01\x01\x01\x00\x00\x00\x00",
        );
        let (pg16_none, pg16_gzip) =
            (b"PGDMP\x01\x0f\x00\x04\x08\x01\x00\x00", b"PGDMP\x01\x0f\x00\x04\x08\x01\x01\x00");
        for head in [
            &pg[..],
            b"--\n-- PostgreSQL database cluster dump\n--\n",
            pg15_z0,
            pg16_none,
            &maria[..],
            b"-- MySQL dump 10.13  Distrib 8.0.36\n",
            b"SQLite format 3\0\x10\x00",
            b"REDIS0011\xfa",
        ] {
            assert!(is_database_content(head), "{}", String::from_utf8_lossy(head));
        }
        for head in [
            &b"-- a shell comment about PGDMP\n"[..],
            pg15_default,
            pg16_gzip,
            b"PGDMP",
            b"REDISTRIBUTE.txt",
            b"#!/bin/sh\n",
            b"",
            b"COPY public.posts (id) FROM stdin;\n",
        ] {
            assert!(!is_database_content(head), "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn rejects_bad_params() {
        let bad = ChunkerParams { min: 10, avg: 20, max: 30 };
        assert!(Chunker::new(bad, 0).is_err());
    }
}
