//! S3-compatible object storage (object_store): create-only puts through `If-None-Match: *`,
//! multipart uploads for large packs, range reads, listings and deletes, with object_store's
//! retries and backoff. Nothing here needs
//! rename, which S3 lacks: the repository's write order and lock protocol use only these four
//! operations (FORMAT.md §11, §14).
//!
//! The trait is synchronous; object_store is not. Calls run on the backend's own runtime, from a
//! scoped thread when the caller is itself inside a tokio runtime (blocking one of its threads
//! would panic).

use std::ops::Range;

use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload};

use super::{Backend, BackendError, ObjectInfo, PutOutcome};

/// Packs larger than this go as a multipart upload. Measured against one PUT on loopback
/// (`tests/bench/s3-bench.sh`), parts bought no speed for default 16 MiB packs and cost five
/// requests instead of one; they pay for large packs (`pack_size` raised), and S3 needs them
/// above 5 GiB.
const MULTIPART_THRESHOLD: usize = 64 << 20;
/// Size of each part (S3's smallest is 5 MiB), and how many are in flight at once.
const MULTIPART_PART_SIZE: usize = 16 << 20;
const MULTIPART_IN_FLIGHT: usize = 4;

/// Where and how to reach the bucket.
#[derive(Clone, Debug, Default)]
pub struct S3Config {
    pub bucket: String,
    /// Folder inside the bucket ("" for its root).
    pub prefix: String,
    /// For S3-compatible servers ("http://127.0.0.1:9000"); None for AWS.
    pub endpoint: Option<String>,
    pub region: String,
    /// Path-style requests (most S3-compatible servers), not virtual-hosted buckets.
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl S3Config {
    /// Parse `s3://bucket/prefix`.
    pub fn from_url(url: &str) -> Option<(String, String)> {
        let rest = url.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        (!bucket.is_empty()).then(|| (bucket.to_string(), prefix.trim_matches('/').to_string()))
    }
}

#[derive(Debug)]
pub struct S3Backend {
    store: AmazonS3,
    cfg: S3Config,
    rt: tokio::runtime::Runtime,
}

fn io_err(name: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::io(name, std::io::Error::other(e.to_string()))
}

impl S3Backend {
    pub fn new(cfg: S3Config) -> Result<S3Backend, BackendError> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .with_virtual_hosted_style_request(!cfg.path_style)
            // PutMode::Create as `If-None-Match: *`: create-only, as AWS and most compatible
            // servers honour it.
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        let store = b.build().map_err(|e| io_err(&format!("s3://{}", cfg.bucket), e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("magpie-s3")
            .enable_all()
            .build()
            .map_err(|e| BackendError::io("s3 runtime", e))?;
        Ok(S3Backend { store, cfg, rt })
    }

    fn key(&self, name: &str) -> Key {
        if self.cfg.prefix.is_empty() { Key::from(name) } else { Key::from(format!("{}/{name}", self.cfg.prefix)) }
    }

    /// A large pack in parts sent side by side. A multipart upload cannot be made create-only
    /// everywhere (`If-None-Match` on CompleteMultipartUpload is recent and not universal), so this
    /// relies on what a pack's name is: the hash of its bytes (FORMAT.md §5). An existing object of
    /// that name already holds exactly these bytes; a HEAD finds it and nothing is sent, and a
    /// racing writer of the same name can only write the same bytes.
    fn put_pack_multipart(&self, name: &str, key: &Key, data: &[u8]) -> Result<PutOutcome, BackendError> {
        self.block(async {
            match self.store.head(key).await {
                Ok(_) => return Ok(PutOutcome::AlreadyExists),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            use futures_util::{StreamExt, TryStreamExt};
            let mut upload = self.store.put_multipart(key).await?;
            let whole = bytes::Bytes::copy_from_slice(data);
            let parts: Vec<_> = (0..data.len())
                .step_by(MULTIPART_PART_SIZE)
                .map(|at| {
                    upload.put_part(PutPayload::from(whole.slice(at..(at + MULTIPART_PART_SIZE).min(data.len()))))
                })
                .collect();
            let sent: Result<Vec<()>, _> =
                futures_util::stream::iter(parts).buffer_unordered(MULTIPART_IN_FLIGHT).try_collect().await;
            match sent {
                Ok(_) => match upload.complete().await {
                    Ok(_) => Ok(PutOutcome::Created),
                    Err(e) => {
                        let _ = upload.abort().await;
                        Err(e)
                    }
                },
                Err(e) => {
                    // Parts already stored would otherwise be billed until a lifecycle rule ends them.
                    let _ = upload.abort().await;
                    Err(e)
                }
            }
        })
        .map_err(|e| io_err(name, e))
    }

    /// Run `f` to completion on the backend's runtime.
    fn block<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> T {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(|| self.rt.block_on(f)).join().expect("the S3 call panicked"))
        } else {
            self.rt.block_on(f)
        }
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.cfg.bucket, self.cfg.prefix)
    }

    fn get(&self, name: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
        let key = self.key(name);
        let opts = GetOptions { range: range.map(GetRange::Bounded), ..Default::default() };
        self.block(async {
            let r = self.store.get_opts(&key, opts).await?;
            r.bytes().await
        })
        .map(|b| b.to_vec())
        .map_err(|e| match e {
            object_store::Error::NotFound { .. } => BackendError::NotFound(name.to_string()),
            e => io_err(name, e),
        })
    }

    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        let key = self.key(name);
        if data.len() > MULTIPART_THRESHOLD && name.starts_with("data/") {
            return self.put_pack_multipart(name, &key, data);
        }
        let payload = PutPayload::from(data.to_vec());
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.block(self.store.put_opts(&key, payload, opts)) {
            Ok(_) => Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(e) => Err(io_err(name, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        // List the folder part; filter the rest by name, as the local backend does.
        let (dir, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let folder = if dir.is_empty() { None } else { Some(self.key(dir)) };
        let root = if self.cfg.prefix.is_empty() { String::new() } else { format!("{}/", self.cfg.prefix) };
        let objects = self.block(async {
            use futures_util::TryStreamExt;
            let base =
                folder.clone().or_else(|| (!self.cfg.prefix.is_empty()).then(|| Key::from(self.cfg.prefix.as_str())));
            self.store.list(base.as_ref()).try_collect::<Vec<_>>().await
        });
        let objects = objects.map_err(|e| io_err(prefix, e))?;
        Ok(objects
            .into_iter()
            .filter_map(|m| {
                let name = m.location.as_ref().strip_prefix(&root)?.to_string();
                name.starts_with(prefix).then_some(ObjectInfo { name, size: m.size })
            })
            .collect())
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        let key = self.key(name);
        match self.block(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io_err(name, e)),
        }
    }
}
