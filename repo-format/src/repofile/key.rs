//! Key files: the master secret wrapped by a passphrase.
//!
//! A repository may have several key files (one per passphrase); `collector key passwd` adds
//! a new one, then removes the old one, so a crash in between leaves both working.

use prost::Message;
use zeroize::Zeroizing;

use crate::crypto::{self, KdfParams, Keys};
use crate::error::{Error, Result};
use crate::magic::Domain;

/// A stored key file.
#[derive(Clone, PartialEq, Message)]
pub struct KeyFile {
    /// Key file format version (1).
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Key derivation function: "argon2id".
    #[prost(string, tag = "2")]
    pub kdf: String,
    /// Argon2id memory in KiB.
    #[prost(uint32, tag = "3")]
    pub memory_kib: u32,
    /// Argon2id passes.
    #[prost(uint32, tag = "4")]
    pub iterations: u32,
    /// Argon2id lanes.
    #[prost(uint32, tag = "5")]
    pub parallelism: u32,
    /// 16 random bytes.
    #[prost(bytes = "vec", tag = "6")]
    pub salt: Vec<u8>,
    /// The master secret sealed with the passphrase key (nonce || ciphertext || tag).
    #[prost(bytes = "vec", tag = "7")]
    pub wrapped: Vec<u8>,
    /// When it was made, seconds since the epoch.
    #[prost(int64, tag = "8")]
    pub created_unix: i64,
    /// Host it was made on (informational).
    #[prost(string, tag = "9")]
    pub host: String,
}

/// Wrap the master secret of `keys` under `passphrase`.
pub fn wrap(keys: &Keys, passphrase: &[u8], params: KdfParams, host: &str) -> Result<KeyFile> {
    let mut salt = vec![0u8; 16];
    crypto::fill_random(&mut salt);
    let kek = crypto::derive_kek(passphrase, &salt, params).map_err(Error::Invalid)?;
    Ok(KeyFile {
        version: 1,
        kdf: "argon2id".into(),
        memory_kib: params.memory_kib,
        iterations: params.iterations,
        parallelism: params.parallelism,
        salt,
        wrapped: crypto::seal_with(&kek, Domain::Key, keys.master()),
        created_unix: chrono::Utc::now().timestamp(),
        host: host.into(),
    })
}

/// Unwrap with `passphrase`; `Ok(None)` when the passphrase does not fit.
pub fn unwrap(name: &str, bytes: &[u8], passphrase: &[u8]) -> Result<Option<Keys>> {
    let kf = KeyFile::decode(bytes).map_err(|e| Error::corrupt(name, e))?;
    if kf.version != 1 || kf.kdf != "argon2id" {
        return Err(Error::UnsupportedVersion { object: name.into(), found: kf.version, supported: 1 });
    }
    let params = KdfParams { memory_kib: kf.memory_kib, iterations: kf.iterations, parallelism: kf.parallelism };
    let kek = crypto::derive_kek(passphrase, &kf.salt, params).map_err(|e| Error::corrupt(name, e))?;
    let Some(master) = crypto::open_with(&kek, Domain::Key, &kf.wrapped) else {
        return Ok(None);
    };
    let master: [u8; 32] =
        master.as_slice().try_into().map_err(|_| Error::corrupt(name, "wrapped master secret is not 32 bytes"))?;
    Ok(Some(Keys::from_master(Zeroizing::new(master), true)))
}
