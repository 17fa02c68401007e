//! An in-memory backend for tests and benchmarks.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::{Backend, BackendError, ObjectInfo, PutOutcome};

/// Objects in a shared map; clones see the same objects.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    objects: Arc<Mutex<BTreeMap<String, Arc<Vec<u8>>>>>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// Total bytes stored.
    pub fn total_size(&self) -> u64 {
        let m = self.objects.lock().expect("memory backend lock");
        m.values().map(|v| v.len() as u64).sum()
    }
}

impl Backend for MemoryBackend {
    fn location(&self) -> String {
        "memory".into()
    }

    fn get(&self, name: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
        let m = self.objects.lock().expect("memory backend lock");
        let obj = m.get(name).ok_or_else(|| BackendError::NotFound(name.to_string()))?;
        match range {
            None => Ok(obj.to_vec()),
            Some(r) => obj.get(r.start as usize..r.end as usize).map(<[u8]>::to_vec).ok_or_else(|| {
                BackendError::io(name, std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "range past the end"))
            }),
        }
    }

    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        let mut m = self.objects.lock().expect("memory backend lock");
        if m.contains_key(name) {
            return Ok(PutOutcome::AlreadyExists);
        }
        m.insert(name.to_string(), Arc::new(data.to_vec()));
        Ok(PutOutcome::Created)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let m = self.objects.lock().expect("memory backend lock");
        Ok(m.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectInfo { name: k.clone(), size: v.len() as u64 })
            .collect())
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        self.objects.lock().expect("memory backend lock").remove(name);
        Ok(())
    }
}
