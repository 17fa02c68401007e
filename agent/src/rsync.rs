//! rsync deltas in librsync's format (as `fast_rsync` writes them and the collector applies
//! them) of new data against the MD4 signature of an old version.
//!
//! `fast_rsync::diff` probes a hash map of all the signature's blocks at every byte where no
//! block matches. A database dump needs small blocks (2 KiB: a 600 MB dump has 300 000), the map
//! no longer fits in a cache, and each probe is a miss: rolling through a day's changed rows took
//! half of the agent's CPU in a day-2 pull. Here a Bloom filter of the rolling checksums answers
//! "no block has this checksum" first (its first bit alone, mostly), and the blocks are searched
//! only when it says "maybe". The strong hash decides a match, as in rsync; the
//! collector then checks the whole result against BLAKE3 anyway.
//!
//! Most of a changed file is still its old blocks in order, and the search costs a cache miss per
//! byte, so it runs only where nothing nearer is known. After a match the next blocks are compared
//! as a run: their signature is computed the way the collector computed the old one (fast_rsync
//! hashes 8 blocks at once with SIMD MD4) and compared entry by entry with the blocks that followed.
//! Where a run breaks, the rolling checksum is compared with those of the next few old blocks
//! only, over a few blocks' bytes. On the bench's 600 MB dump with 2% of its rows moved, these
//! took the agent's CPU for the day-2 pull from 3.7 to 2.1 seconds.

use std::collections::HashMap;

use md4::{Digest, Md4};

/// librsync's magic numbers: an MD4 signature, a delta.
pub const SIGNATURE_MAGIC: u32 = 0x7273_0136;
const DELTA_MAGIC: u32 = 0x7273_0236;
/// Delta commands: end, literal with a 1/2/4/8-byte length, copy (offset and length widths in
/// the command), and literals of 1 to 64 bytes with the length in the command itself.
const OP_END: u8 = 0;
const OP_LITERAL_N1: u8 = 0x41;
const OP_COPY_N1_N1: u8 = 0x45;
/// librsync's rolling checksum adds this to every byte.
const CHAR_OFFSET: u16 = 31;
/// Bits of the checksum filter (16 Mi bits, 2 MiB), and the two bits each checksum sets: a
/// 300 000-block signature passes 3.5% of other checksums at the first bit and 0.12% at both
/// (a pass costs a search of the blocks, whose table is far larger than a cache).
const FILTER_BITS: u32 = 24;
const FILTER_HASHES: [u32; 2] = [0x9E37_79B1, 0x85EB_CA77];
/// Where a run breaks, the blocks looked for next (the one that broke and those after it), over
/// how many blocks' bytes, and after how many strong-hash mismatches the look gives up.
const RESUME_BLOCKS: usize = 3;
const RESUME_REACH: usize = 3;
const RESUME_MISMATCHES: u32 = 16;
/// Strong-hash mismatches after which a checksum is no longer tried: a crafted or degenerate
/// signature must not make every byte cost an MD4 of a block.
const MAX_COLLISIONS: u32 = 1024;
/// Blocks with the same checksum compared at one position, at most.
const MAX_CANDIDATES: usize = 64;
/// Blocks compared at once after a match: the SIMD MD4's lanes at first, twice as many after
/// each run that held, up to a bound on what a broken run wastes.
const MIN_RUN: usize = 8;
const MAX_RUN: usize = 128;

/// librsync's rolling checksum of a block: two 16-bit sums.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Rollsum {
    s1: u16,
    s2: u16,
}

impl Rollsum {
    /// The sums in closed form, s1 = Σ(bᵢ + 31) and s2 = Σ(n − i)(bᵢ + 31), modulo 2¹⁶ like the
    /// sums themselves (so lengths and weights may wrap too): 16-bit lanes vectorize even on
    /// baseline x86-64, and a block's sum is taken after every match, so over most of a file.
    fn of(block: &[u8]) -> Rollsum {
        let n = block.len() as u16;
        let (mut sum, mut weighted) = (0u16, 0u16);
        for (i, &b) in block.iter().enumerate() {
            sum = sum.wrapping_add(b as u16);
            weighted = weighted.wrapping_add(n.wrapping_sub(i as u16).wrapping_mul(b as u16));
        }
        // Σ(n − i) over i < n is n(n + 1)/2, taken whole before the halving (n may be 2¹⁶).
        let len = block.len() as u64;
        let triangle = (len * (len + 1) / 2) as u16;
        Rollsum {
            s1: sum.wrapping_add(CHAR_OFFSET.wrapping_mul(n)),
            s2: weighted.wrapping_add(CHAR_OFFSET.wrapping_mul(triangle)),
        }
    }

    /// Slide a block of `len` bytes one byte on: `old` leaves, `new` enters.
    fn roll(self, len: u16, old: u8, new: u8) -> Rollsum {
        let s1 = self.s1.wrapping_add(new as u16).wrapping_sub(old as u16);
        let s2 = self.s2.wrapping_add(s1).wrapping_sub(len.wrapping_mul(old as u16 + CHAR_OFFSET));
        Rollsum { s1, s2 }
    }

    fn value(self) -> u32 {
        self.s1 as u32 | (self.s2 as u32) << 16
    }
}

/// A signature prepared for diffing.
pub struct Index<'s> {
    block_len: usize,
    strong_len: usize,
    filter: Vec<u64>,
    /// (checksum, block number), sorted.
    blocks: Vec<(u32, u32)>,
    /// Where in `blocks` the checksums with each value of their top `prefix_bits` begin: a
    /// lookup reads two places, where a binary search of a table this large missed the cache at
    /// every step.
    starts: Vec<u32>,
    prefix_bits: u32,
    /// The signature's block entries: checksum then strong hash, per block.
    entries: &'s [u8],
}

fn filter_bits(sum: u32) -> impl Iterator<Item = usize> {
    FILTER_HASHES.into_iter().map(move |h| (sum.wrapping_mul(h) >> (32 - FILTER_BITS)) as usize)
}

impl<'s> Index<'s> {
    /// Index a serialized librsync MD4 signature.
    pub fn new(signature: &'s [u8]) -> Result<Index<'s>, &'static str> {
        let word = |at: usize| signature.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
        let (Some(magic), Some(block_len), Some(strong_len)) = (word(0), word(4), word(8)) else {
            return Err("shorter than its header");
        };
        if magic != SIGNATURE_MAGIC {
            return Err("not an MD4 signature");
        }
        if !(1..=1 << 16).contains(&block_len) || !(1..=16).contains(&strong_len) {
            return Err("block or hash length out of range");
        }
        let (block_len, strong_len) = (block_len as usize, strong_len as usize);
        let entries = &signature[12..];
        let entry_len = 4 + strong_len;
        if !entries.len().is_multiple_of(entry_len) || entries.len() / entry_len > u32::MAX as usize {
            return Err("a partial block entry");
        }
        let mut filter = vec![0u64; 1 << (FILTER_BITS - 6)];
        let mut blocks: Vec<(u32, u32)> = entries
            .chunks_exact(entry_len)
            .enumerate()
            .map(|(i, e)| {
                let sum = u32::from_be_bytes(e[..4].try_into().expect("4 bytes"));
                for bit in filter_bits(sum) {
                    filter[bit / 64] |= 1 << (bit % 64);
                }
                (sum, i as u32)
            })
            .collect();
        blocks.sort_unstable();
        // About one block per prefix.
        let prefix_bits = blocks.len().max(1).ilog2().clamp(1, 24);
        let mut starts = Vec::with_capacity((1 << prefix_bits) + 1);
        let mut at = 0;
        for prefix in 0..=1u64 << prefix_bits {
            while at < blocks.len() && ((blocks[at].0 as u64) >> (32 - prefix_bits)) < prefix {
                at += 1;
            }
            starts.push(at as u32);
        }
        Ok(Index { block_len, strong_len, filter, blocks, starts, prefix_bits, entries })
    }

    fn may_hold(&self, sum: u32) -> bool {
        filter_bits(sum).all(|bit| self.filter[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// The first block with this checksum and the strong hash of `data`, and whether any block
    /// had the checksum.
    fn find(&self, sum: u32, data: &[u8]) -> (Option<u32>, bool) {
        let prefix = (sum >> (32 - self.prefix_bits)) as usize;
        let bucket = &self.blocks[self.starts[prefix] as usize..self.starts[prefix + 1] as usize];
        let from = bucket.partition_point(|&(s, _)| s < sum);
        let candidates = bucket[from..].iter().take_while(|&&(s, _)| s == sum).take(MAX_CANDIDATES);
        let mut digest = None;
        let mut any = false;
        for &(_, block) in candidates {
            any = true;
            let digest = digest.get_or_insert_with(|| Md4::digest(data));
            if self.entry(block as usize).1 == &digest[..self.strong_len] {
                return (Some(block), true);
            }
        }
        (None, any)
    }

    fn block_count(&self) -> usize {
        self.entries.len() / (4 + self.strong_len)
    }

    /// The checksum and strong hash of block `block`.
    fn entry(&self, block: usize) -> (u32, &[u8]) {
        let at = block * (4 + self.strong_len);
        let sum = u32::from_be_bytes(self.entries[at..at + 4].try_into().expect("4 bytes"));
        (sum, &self.entries[at + 4..at + 4 + self.strong_len])
    }

    /// Where, within a few blocks' bytes from `from`, `data` holds block `broken` or one of the
    /// blocks after it. A run of old blocks that broke there mostly resumes so (a row changed,
    /// moved away or added), and comparing the rolling checksum with a few known values costs
    /// no memory access, where a search of the whole signature costs a cache miss per byte.
    fn resume(&self, broken: usize, data: &[u8], from: usize) -> Option<(usize, u32)> {
        let block_len = self.block_len;
        let wanted: Vec<(u32, usize)> =
            (broken..self.block_count().min(broken + RESUME_BLOCKS)).map(|b| (self.entry(b).0, b)).collect();
        if wanted.is_empty() || data.len() - from < block_len {
            return None;
        }
        let last = (data.len() - block_len).min(from + RESUME_REACH * block_len);
        let mut mismatches = 0;
        roll(data, block_len, from, last, |at, value| {
            for &(want, block) in &wanted {
                if value == want {
                    let digest = Md4::digest(&data[at..at + block_len]);
                    if self.entry(block).1 == &digest[..self.strong_len] {
                        return Some(Some((at, block as u32)));
                    }
                    mismatches += 1;
                    if mismatches == RESUME_MISMATCHES {
                        // Stop rolling, with no match: the whole-signature search takes over.
                        return Some(None);
                    }
                }
            }
            None
        })
        .flatten()
    }

    /// How many of the blocks from block `first` on (at most `want`) `data` starts with.
    fn run_length(&self, first: usize, data: &[u8], want: usize) -> usize {
        let entry_len = 4 + self.strong_len;
        let n = want.min(self.block_count().saturating_sub(first)).min(data.len() / self.block_len);
        if n == 0 {
            return 0;
        }
        let opts = fast_rsync::SignatureOptions {
            block_size: self.block_len as u32,
            crypto_hash_size: self.strong_len as u32,
        };
        let ours = fast_rsync::Signature::calculate(&data[..n * self.block_len], opts);
        let theirs = &self.entries[first * entry_len..(first + n) * entry_len];
        ours.serialized()[12..]
            .chunks_exact(entry_len)
            .zip(theirs.chunks_exact(entry_len))
            .take_while(|(a, b)| a == b)
            .count()
    }
}

/// The delta of `data` against the signature, appended to `out`; returns how many of its bytes
/// are literal (those no block matched).
pub fn diff(index: &Index<'_>, data: &[u8], out: &mut Vec<u8>) -> usize {
    let block_len = index.block_len;
    out.extend_from_slice(&DELTA_MAGIC.to_be_bytes());
    let mut delta = Delta { out, copy: None, literal: 0 };
    let mut collisions = HashMap::new();
    // Bytes from `literal` to `here` match no block (yet).
    let (mut here, mut literal) = (0usize, 0usize);
    // The block expected next (the one after the last match), and how many to compare at once.
    let (mut next, mut run) = (None, MIN_RUN);
    while data.len() - here >= block_len {
        let (at, block) = match next.take() {
            Some(first) => {
                let n = index.run_length(first, &data[here..], run);
                if n > 0 {
                    delta.copy((first * block_len) as u64, (n * block_len) as u64);
                    here += n * block_len;
                    literal = here;
                }
                if n == run {
                    (next, run) = (Some(first + n), (run * 2).min(MAX_RUN));
                    continue;
                }
                run = MIN_RUN;
                match index.resume(first + n, data, here) {
                    Some(found) => found,
                    None => continue,
                }
            }
            None => match search(index, data, here, &mut collisions) {
                Some(found) => found,
                None => break,
            },
        };
        delta.literal(&data[literal..at]);
        delta.copy(block as u64 * block_len as u64, block_len as u64);
        here = at + block_len;
        literal = here;
        next = Some(block as usize + 1);
    }
    delta.literal(&data[literal..]);
    delta.flush_copy();
    delta.out.push(OP_END);
    delta.literal
}

/// The first position from `from` on where a block of `data` (which holds one there) has the
/// checksum and strong hash of a block of the signature, and that block.
fn search(index: &Index<'_>, data: &[u8], from: usize, collisions: &mut HashMap<u32, u32>) -> Option<(usize, u32)> {
    let block_len = index.block_len;
    roll(data, block_len, from, data.len() - block_len, |at, value| {
        if !index.may_hold(value) || collisions.get(&value).is_some_and(|&n| n >= MAX_COLLISIONS) {
            return None;
        }
        match index.find(value, &data[at..at + block_len]) {
            (Some(block), _) => Some((at, block)),
            (None, true) => {
                *collisions.entry(value).or_default() += 1;
                None
            }
            (None, false) => None,
        }
    })
}

/// Slide a window of `block_len` bytes through `data` from `from` to `last` (both start
/// positions), handing `look` each position and its window's checksum until it returns something.
fn roll<T>(
    data: &[u8],
    block_len: usize,
    from: usize,
    last: usize,
    mut look: impl FnMut(usize, u32) -> Option<T>,
) -> Option<T> {
    let mut sum = Rollsum::of(&data[from..from + block_len]);
    let mut at = from;
    loop {
        if let Some(found) = look(at, sum.value()) {
            return Some(found);
        }
        if at >= last {
            return None;
        }
        sum = sum.roll(block_len as u16, data[at], data[at + block_len]);
        at += 1;
    }
}

/// Commands being written; adjacent copies become one.
struct Delta<'o> {
    out: &'o mut Vec<u8>,
    copy: Option<(u64, u64)>,
    /// Literal bytes written.
    literal: usize,
}

impl Delta<'_> {
    fn copy(&mut self, offset: u64, len: u64) {
        match &mut self.copy {
            Some((at, n)) if *at + *n == offset => *n += len,
            _ => {
                self.flush_copy();
                self.copy = Some((offset, len));
            }
        }
    }

    fn flush_copy(&mut self) {
        if let Some((offset, len)) = self.copy.take() {
            let (ow, lw) = (width_class(offset), width_class(len));
            self.out.push(OP_COPY_N1_N1 + ow * 4 + lw);
            put_int(self.out, offset, ow);
            put_int(self.out, len, lw);
        }
    }

    fn literal(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.flush_copy();
        self.literal += bytes.len();
        let len = bytes.len() as u64;
        if len <= 64 {
            self.out.push(len as u8);
        } else {
            let w = width_class(len);
            self.out.push(OP_LITERAL_N1 + w);
            put_int(self.out, len, w);
        }
        self.out.extend_from_slice(bytes);
    }
}

/// 0, 1, 2 or 3 for a value that fits 1, 2, 4 or 8 bytes.
fn width_class(v: u64) -> u8 {
    match v {
        0..=0xff => 0,
        0x100..=0xffff => 1,
        0x1_0000..=0xffff_ffff => 2,
        _ => 3,
    }
}

fn put_int(out: &mut Vec<u8>, v: u64, class: u8) {
    let width = 1usize << class;
    out.extend_from_slice(&v.to_be_bytes()[8 - width..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn signature(old: &[u8], block_len: u32) -> Vec<u8> {
        let opts = fast_rsync::SignatureOptions { block_size: block_len, crypto_hash_size: 8 };
        fast_rsync::Signature::calculate(old, opts).into_serialized()
    }

    /// The delta rebuilds the new data (applied by fast_rsync, as librsync would) and is no
    /// larger than fast_rsync's own for the same inputs.
    #[test]
    fn deltas_rebuild_the_new_data_and_match_fast_rsync_in_size() {
        let old = noise(300_000, 7);
        let mut edited = old.clone();
        edited.splice(1000..1000, noise(333, 9));
        edited.drain(50_000..50_100);
        edited[200_000..200_010].copy_from_slice(&[0; 10]);
        edited.extend_from_slice(&old[..5000]);
        let cases: Vec<(Vec<u8>, u32)> = vec![
            (edited.clone(), 2048),
            (edited.clone(), 700),
            (old.clone(), 2048),
            (noise(10_000, 3), 2048),
            (Vec::new(), 2048),
            (old[..100].to_vec(), 2048),
            (old[..2048].to_vec(), 2048),
            ([old.as_slice(), old.as_slice()].concat(), 4096),
            // Runs of old blocks broken every few blocks (a row moved away, one changed).
            (rows_moved(&old), 2048),
            ([&old[..150_000], &old[..150_000]].concat(), 1024),
            // The largest block the collector uses: its length wraps to 0 in the 16-bit sums.
            ([&old[..70_000], &noise(5, 1)[..], &old[70_000..]].concat(), 65536),
        ];
        for (new, block_len) in cases {
            let sig = signature(&old, block_len);
            let mut ours = Vec::new();
            let literal = diff(&Index::new(&sig).unwrap(), &new, &mut ours);
            assert!(literal <= new.len());
            let mut rebuilt = Vec::new();
            fast_rsync::apply(&old, &ours, &mut rebuilt).unwrap();
            assert_eq!(rebuilt, new, "block {block_len}, {} bytes", new.len());
            let parsed = fast_rsync::Signature::deserialize(sig).unwrap();
            let mut theirs = Vec::new();
            fast_rsync::diff(&parsed.index(), &new, &mut theirs).unwrap();
            assert!(ours.len() <= theirs.len() + 16, "{} vs fast_rsync's {}", ours.len(), theirs.len());
        }
    }

    /// `data` with a byte left out every 15 000 bytes and one changed every 7 000.
    fn rows_moved(data: &[u8]) -> Vec<u8> {
        let mut out: Vec<u8> = data.iter().enumerate().filter(|(i, _)| i % 15_000 != 14_999).map(|(_, &b)| b).collect();
        for i in (3_500..out.len()).step_by(7_000) {
            out[i] ^= 0x55;
        }
        out
    }

    /// Runs of old blocks after a break are found again, and cost no literal beyond the break.
    #[test]
    fn runs_of_old_blocks_resume_after_each_change() {
        let old = noise(1 << 20, 7);
        let sig = signature(&old, 2048);
        let new = rows_moved(&old);
        let literal = diff(&Index::new(&sig).unwrap(), &new, &mut Vec::new());
        // Each of the ~220 changes costs at most the two blocks it touches.
        assert!(literal < 220 * 2 * 2048, "{literal} literal bytes");
        assert!(literal > 0);
    }

    /// The literal count: all of unrelated data, only the unmatched tail of identical data.
    #[test]
    fn literal_bytes_are_counted() {
        let old = noise(300_000, 7);
        let sig = signature(&old, 2048);
        let index = Index::new(&sig).unwrap();
        assert_eq!(diff(&index, &noise(10_000, 3), &mut Vec::new()), 10_000);
        assert_eq!(diff(&index, &old, &mut Vec::new()), 300_000 % 2048);
    }

    #[test]
    fn the_rolling_checksum_equals_one_computed_afresh() {
        let data = noise(5000, 11);
        let mut sum = Rollsum::of(&data[..1000]);
        for i in 1..4000 {
            sum = sum.roll(1000, data[i - 1], data[i + 999]);
            assert_eq!(sum, Rollsum::of(&data[i..i + 1000]));
        }
        // librsync's value for a block, as the signature stores it, at the largest block too.
        let data = noise(1 << 17, 13);
        for len in [1000, 1 << 16] {
            let sig = signature(&data[..len], len as u32);
            assert_eq!(u32::from_be_bytes(sig[12..16].try_into().unwrap()), Rollsum::of(&data[..len]).value());
        }
        let mut sum = Rollsum::of(&data[..1 << 16]);
        for i in 1..1000 {
            sum = sum.roll(0, data[i - 1], data[i + (1 << 16) - 1]);
        }
        assert_eq!(sum, Rollsum::of(&data[999..999 + (1 << 16)]));
    }

    #[test]
    fn malformed_signatures_are_refused() {
        assert!(Index::new(b"short").is_err());
        let mut sig = signature(&noise(10_000, 5), 2048);
        sig.pop();
        assert!(Index::new(&sig).is_err());
        sig[0] = 0;
        assert!(Index::new(&sig).is_err());
    }
}
