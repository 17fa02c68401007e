//! Compression dictionaries: `dicts/<storage id>` = seal(9, a zstd dictionary).
//!
//! Database dumps are cut into chunks of a few KiB so that a day's scattered row changes store
//! little, but zstd compresses a few KiB alone far worse than a whole dump: each chunk starts
//! without having seen the table's words. A dictionary trained on the first megabytes of a
//! source's dump content gives every chunk that context (FORMAT.md §12). A blob compressed with
//! one names it only by the 32-bit dictionary id zstd writes into the frame header; the rare
//! dictionaries that share an id are tried in turn, and the blob id tells which one was right.
//!
//! Dictionaries are never deleted: they are a few per repository, 256 KiB at most, and any blob of
//! any snapshot may have been compressed with one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use zstd::zstd_safe::{CDict, DDict};

use crate::backend::Backend;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::magic::Domain;
use crate::repofile::{self as rf};
use crate::repository::{ids_in, put_named, read_named};

/// Dump bytes a dictionary is trained on. Measured on a 60 MB dump: samples of 2 MB compress its
/// 8 KiB chunks as well as samples of 10 MB do, and training takes a third of a second.
pub const TRAIN_BYTES: usize = 4 << 20;
/// Below this there is too little to learn from, and a dump this small costs little anyway.
pub const MIN_TRAIN_BYTES: usize = 1 << 20;
/// On the same dump a 256 KiB dictionary stores 1.7% less than zstd's usual 112 KiB, at the same
/// compression speed.
const MAX_SIZE: usize = 256 * 1024;

/// Train a dictionary on `samples`, the concatenation of chunks of the given `sizes`; `None`
/// when they are too few or zstd finds nothing to learn.
pub fn train(samples: &[u8], sizes: &[usize]) -> Option<Vec<u8>> {
    if samples.len() < MIN_TRAIN_BYTES {
        return None;
    }
    zstd::dict::from_continuous(samples, sizes, MAX_SIZE).ok()
}

/// One dictionary, prepared for compression (on first use) and decompression.
pub struct Dictionary {
    id: Id,
    zstd_id: u32,
    raw: Vec<u8>,
    level: i32,
    encoder: OnceLock<CDict<'static>>,
    decoder: DDict<'static>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dictionary({}, zstd id {:08x})", self.id.short(), self.zstd_id)
    }
}

impl Dictionary {
    fn new(id: Id, raw: Vec<u8>, level: i32) -> Result<Dictionary> {
        let zstd_id = zstd::zstd_safe::get_dict_id_from_dict(&raw)
            .ok_or_else(|| Error::corrupt(name(&id), "not a zstd dictionary"))?
            .get();
        // try_create: a dictionary that zstd cannot load is an error here, not a panic.
        let decoder = DDict::try_create(&raw).ok_or_else(|| Error::corrupt(name(&id), "zstd cannot load it"))?;
        Ok(Dictionary { id, zstd_id, raw, level, encoder: OnceLock::new(), decoder })
    }

    /// Storage id (`dicts/<id>`).
    pub fn id(&self) -> Id {
        self.id
    }

    pub(crate) fn encoder(&self) -> &CDict<'static> {
        self.encoder.get_or_init(|| CDict::create(&self.raw, self.level))
    }

    pub(crate) fn decoder(&self) -> &DDict<'static> {
        &self.decoder
    }
}

fn name(id: &Id) -> String {
    format!("{}{id}", rf::DICT_DIR)
}

/// The repository's dictionaries, read from storage when first needed.
pub struct Dictionaries {
    backend: Arc<dyn Backend>,
    keys: Keys,
    level: i32,
    loaded: Mutex<Loaded>,
}

#[derive(Default)]
struct Loaded {
    by_id: HashMap<Id, Arc<Dictionary>>,
    /// Whether every dictionary in storage was read once (all that share a zstd id are needed).
    listed: bool,
    /// zstd ids looked for and not found at the last listing: listed again only for a new one.
    absent: HashSet<u32>,
}

impl std::fmt::Debug for Dictionaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dictionaries")
    }
}

impl Dictionaries {
    /// The dictionaries in `backend`, prepared for compression at `level`.
    pub fn new(backend: Arc<dyn Backend>, keys: Keys, level: i32) -> Dictionaries {
        Dictionaries { backend, keys, level, loaded: Mutex::default() }
    }

    /// Read and verify `dicts/<id>`.
    pub fn load(&self, id: &Id) -> Result<Arc<Dictionary>> {
        if let Some(d) = self.loaded.lock().expect("dictionaries").by_id.get(id) {
            return Ok(d.clone());
        }
        let raw = read_named(&*self.backend, &self.keys, &name(id), Domain::Dictionary)?;
        let d = Arc::new(Dictionary::new(*id, raw, self.level)?);
        self.loaded.lock().expect("dictionaries").by_id.insert(*id, d.clone());
        Ok(d)
    }

    /// Store a newly trained dictionary; durable on return.
    pub fn store(&self, raw: Vec<u8>) -> Result<Arc<Dictionary>> {
        let id = put_named(&*self.backend, rf::DICT_DIR, &self.keys.seal(Domain::Dictionary, &raw))?;
        let d = Arc::new(Dictionary::new(id, raw, self.level)?);
        self.loaded.lock().expect("dictionaries").by_id.insert(id, d.clone());
        Ok(d)
    }

    /// Storage ids of every dictionary in the repository.
    pub fn list(&self) -> Result<Vec<Id>> {
        ids_in(&*self.backend, rf::DICT_DIR)
    }

    /// The dictionaries whose zstd id is `zstd_id` (usually one; none when it is missing). A
    /// damaged dictionary is skipped here (check reports it, and the blobs that need it fail their
    /// id check); storage trouble is an error, so that no blob is taken for damaged because of it.
    pub(crate) fn with_zstd_id(&self, zstd_id: u32) -> Result<Vec<Arc<Dictionary>>> {
        let known = |l: &Loaded| -> Vec<Arc<Dictionary>> {
            l.by_id.values().filter(|d| d.zstd_id == zstd_id).cloned().collect()
        };
        {
            let l = self.loaded.lock().expect("dictionaries");
            let found = known(&l);
            if l.listed && (!found.is_empty() || l.absent.contains(&zstd_id)) {
                return Ok(found);
            }
        }
        for id in self.list()? {
            match self.load(&id) {
                Ok(_) | Err(Error::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let mut l = self.loaded.lock().expect("dictionaries");
        l.listed = true;
        let found = known(&l);
        if found.is_empty() {
            l.absent.insert(zstd_id);
        }
        Ok(found)
    }
}
