//! Reading the blobs of a file in order, as a restore and an rsync delta do.
//!
//! The last few blobs are kept: small files share chunks, and a delta copies from near the same
//! offset again and again. Blobs that lie near one another in a pack, as the chunks of a file
//! stored in one backup do, are fetched with one read of up to [`READ_AHEAD`] bytes instead of
//! one read each: a 600 MB dump is 73k blobs of about 3 KB stored, and a read is an open, a
//! pread and a close on a local disk, or a request to S3.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::repofile::pack::Check;
use crate::repository::Repository;

/// Blobs kept after use.
const RECENT: usize = 4;
/// Most stored bytes fetched in one read.
pub const READ_AHEAD: u64 = 1 << 20;

/// The blobs a caller expects to want next, listed afresh on each call.
type Upcoming<'u> = dyn Fn() -> Box<dyn Iterator<Item = Id> + 'u> + 'u;

/// Reads blobs, keeping the last few and the stored bytes of those expected next.
#[derive(Default)]
pub struct BlobReader {
    check: Check,
    /// Shared, so that a caller may keep a blob beyond its turn here (as the base of a new
    /// version of it, see [`crate::archive::Origin`]) without a copy.
    recent: VecDeque<(Id, Arc<Vec<u8>>, Option<Id>)>,
    /// A pack, where in it `stored` starts, and the stored bytes of a run of blobs.
    ahead: Option<(Id, u64, Vec<u8>)>,
    /// Reads the bases of the blobs that have one, with read-ahead of their own: the bases of a
    /// dump's changed chunks are the previous version's chunks, stored together elsewhere.
    bases: Option<Box<BlobReader>>,
}

impl BlobReader {
    /// A reader checking each blob as `check` says ([`BlobReader::default`] checks ids).
    pub fn new(check: Check) -> BlobReader {
        BlobReader { check, ..BlobReader::default() }
    }

    /// The plaintext of blob `id`, opened and checked. `upcoming` are the blobs the caller
    /// expects to want next, in order: those stored near `id` in its pack come with it.
    pub fn get<'u, I>(&mut self, repo: &Repository, id: &Id, upcoming: I) -> Result<&Arc<Vec<u8>>>
    where
        I: IntoIterator<Item = Id>,
        I::IntoIter: Clone + 'u,
    {
        let upcoming = upcoming.into_iter();
        self.get_with(repo, id, &|| Box::new(upcoming.clone()))
    }

    /// [`BlobReader::get`] with the upcoming blobs as a function that lists them afresh: a
    /// reader's base reader is asked for the bases of those blobs, and one generic function
    /// calling itself with a wrapped iterator would never finish compiling.
    fn get_with<'u>(&mut self, repo: &Repository, id: &Id, upcoming: &Upcoming<'u>) -> Result<&Arc<Vec<u8>>> {
        if let Some(pos) = self.recent.iter().position(|(i, ..)| i == id) {
            return Ok(&self.recent[pos].1);
        }
        let loc = repo.locate(id)?;
        let want = loc.entry.range();
        if self.slice(&loc.pack, &want).is_none() {
            // The span of the pack holding this blob and the next ones in it. Write workers
            // append batches to a pack in the order they finish them, so the next blobs may lie
            // before this one, not only after it.
            let mut span = want.clone();
            for next in upcoming() {
                let Ok(n) = repo.locate(&next) else { break };
                let r = n.entry.range();
                let wider = span.start.min(r.start)..span.end.max(r.end);
                if n.pack != loc.pack || wider.end - wider.start > READ_AHEAD {
                    break;
                }
                span = wider;
            }
            let stored = repo.read_pack_range(&loc.pack, span.clone())?;
            self.ahead = Some((loc.pack, span.start, stored));
        }
        let base = match loc.entry.base {
            None => None,
            Some(b) => {
                // Checked first, so that the base reader never needs a reader of its own.
                if let Some(why) = repo.unusable_base(&b) {
                    return Err(Error::corrupt(format!("blob {id}"), format!("its base {b} {why}")));
                }
                let check = self.check;
                let reader = self.bases.get_or_insert_with(|| Box::new(Self::new(check)));
                let next_bases: &Upcoming<'_> =
                    &|| Box::new(upcoming().filter_map(|u| repo.locate(&u).ok()?.entry.base));
                Some(reader.get_with(repo, &b, next_bases)?.clone())
            }
        };
        // A backend may answer a range past the end of a truncated pack with fewer bytes.
        let stored = self
            .slice(&loc.pack, &want)
            .ok_or_else(|| Error::corrupt(format!("pack {}", loc.pack), format!("shorter than blob {} needs", id)))?;
        let data = repo.decode_blob_against(&loc, stored, self.check, base.as_ref().map(|b| b.as_slice()))?.0;
        if self.recent.len() >= RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((*id, Arc::new(data), loc.entry.base));
        Ok(&self.recent.back().expect("just pushed").1)
    }

    /// For a blob among the last read: the blob a changed version of it is compressed against,
    /// with its plaintext: itself, or its base if it has one (read with it, so at hand).
    pub fn base_for(&self, id: &Id) -> Option<(Id, Arc<Vec<u8>>)> {
        let (_, plain, base) = self.recent.iter().find(|(i, ..)| i == id)?;
        let Some(base) = base else { return Some((*id, plain.clone())) };
        let (_, plain, _) = self.bases.as_ref()?.recent.iter().find(|(i, ..)| i == base)?;
        Some((*base, plain.clone()))
    }

    /// The stored bytes at `range` of `pack`, if the last read holds them.
    fn slice(&self, pack: &Id, range: &Range<u64>) -> Option<&[u8]> {
        let (p, start, stored) = self.ahead.as_ref()?;
        let from = range.start.checked_sub(*start)? as usize;
        let to = range.end.checked_sub(*start)? as usize;
        (p == pack).then(|| stored.get(from..to)).flatten()
    }
}
