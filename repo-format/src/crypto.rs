//! Keys and authenticated encryption.
//!
//! A repository has one random 32-byte *master secret*. Three sub-keys are derived from it with
//! BLAKE3's `derive_key` (contexts in [`crate::magic`]): the XChaCha20-Poly1305 key, the keyed-BLAKE3
//! key that names blobs, and the seed of the chunker's gear table (so chunk boundaries, like ids,
//! reveal nothing about content to whoever holds the storage but not the key). The master secret
//! is stored wrapped by a key derived from a passphrase with Argon2id (see [`crate::repofile::key`]).

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::id::Id;
use crate::magic::{self, Domain};
use crate::repofile::pack::BlobKind;

/// Nonce length of XChaCha20-Poly1305.
pub const NONCE_LEN: usize = 24;
/// Authentication tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed object adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Fill `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    // The OS generator failing is not something a backup can continue without.
    getrandom::fill(buf).expect("operating system random generator failed");
}

/// The keys of an open repository.
#[derive(Clone)]
pub struct Keys {
    master: Zeroizing<[u8; 32]>,
    cipher: Option<XChaCha20Poly1305>,
    data_id_key: Zeroizing<[u8; 32]>,
    tree_id_key: Zeroizing<[u8; 32]>,
    chunker_seed: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { .. }")
    }
}

impl Keys {
    /// A new random master secret.
    pub fn generate(encrypted: bool) -> Keys {
        let mut m = Zeroizing::new([0u8; 32]);
        fill_random(m.as_mut());
        Keys::from_master(m, encrypted)
    }

    /// Derive the sub-keys from a master secret.
    pub fn from_master(master: Zeroizing<[u8; 32]>, encrypted: bool) -> Keys {
        let enc = Zeroizing::new(blake3::derive_key(magic::CTX_ENCRYPTION, master.as_ref()));
        let data_id_key = Zeroizing::new(blake3::derive_key(magic::CTX_DATA_BLOB_ID, master.as_ref()));
        let tree_id_key = Zeroizing::new(blake3::derive_key(magic::CTX_TREE_BLOB_ID, master.as_ref()));
        let seed = blake3::derive_key(magic::CTX_CHUNKER_SEED, master.as_ref());
        let chunker_seed = u64::from_le_bytes(seed[..8].try_into().expect("8 bytes"));
        Keys {
            cipher: encrypted.then(|| XChaCha20Poly1305::new(enc.as_ref().into())),
            master,
            data_id_key,
            tree_id_key,
            chunker_seed,
        }
    }

    /// The master secret (to wrap it in a key file).
    pub(crate) fn master(&self) -> &[u8; 32] {
        &self.master
    }

    /// Whether objects are encrypted.
    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// The id of a blob: keyed BLAKE3 of its plaintext, with one key per blob kind.
    pub fn blob_id(&self, kind: BlobKind, plaintext: &[u8]) -> Id {
        let key = match kind {
            BlobKind::Data => &self.data_id_key,
            BlobKind::Tree => &self.tree_id_key,
        };
        Id(*blake3::keyed_hash(key, plaintext).as_bytes())
    }

    /// The chunker's gear seed.
    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    /// Seal `plaintext` as `nonce || ciphertext || tag`, or return it as is in unencrypted mode.
    pub fn seal(&self, domain: Domain, plaintext: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.seal_room() + plaintext.len() + TAG_LEN);
        buf.resize(self.seal_room(), 0);
        buf.extend_from_slice(plaintext);
        self.seal_in_place(domain, &mut buf);
        buf
    }

    /// Bytes a buffer for [`Keys::seal_in_place`] leaves free before the plaintext: the nonce's
    /// room, none when unencrypted.
    pub fn seal_room(&self) -> usize {
        if self.cipher.is_some() { NONCE_LEN } else { 0 }
    }

    /// Seal `buf[seal_room()..]` where it lies, with the same result as [`Keys::seal`]: a blob
    /// written straight into its buffer is then neither copied nor allocated again (`TAG_LEN`
    /// bytes of spare capacity avoid the one reallocation).
    pub fn seal_in_place(&self, domain: Domain, buf: &mut Vec<u8>) {
        if let Some(c) = &self.cipher {
            let mut nonce = [0u8; NONCE_LEN];
            fill_random(&mut nonce);
            let tag = c
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), &[domain as u8], &mut buf[NONCE_LEN..])
                .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
            buf[..NONCE_LEN].copy_from_slice(&nonce);
            buf.extend_from_slice(&tag);
        }
    }

    /// Open a sealed object; `None` when authentication fails.
    pub fn open(&self, domain: Domain, sealed: &[u8]) -> Option<Vec<u8>> {
        match &self.cipher {
            None => Some(sealed.to_vec()),
            Some(c) => open_with(c, domain, sealed),
        }
    }
}

pub(crate) fn seal_with(c: &XChaCha20Poly1305, domain: Domain, plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    let aad = [domain as u8];
    let ct = c
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    [nonce.as_slice(), &ct].concat()
}

pub(crate) fn open_with(c: &XChaCha20Poly1305, domain: Domain, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < OVERHEAD {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let aad = [domain as u8];
    c.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad }).ok()
}

/// Argon2id cost parameters, recorded in each key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 2 lanes: about half a second on one core of a small server, so a
    /// stolen key file costs an attacker that much per guess.
    fn default() -> Self {
        KdfParams { memory_kib: 64 * 1024, iterations: 3, parallelism: 2 }
    }
}

/// Derive the key-encryption key from a passphrase.
pub(crate) fn derive_kek(passphrase: &[u8], salt: &[u8], p: KdfParams) -> Result<XChaCha20Poly1305, String> {
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| format!("invalid Argon2id parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = Zeroizing::new([0u8; 32]);
    argon.hash_password_into(passphrase, salt, kek.as_mut()).map_err(|e| format!("Argon2id failed: {e}"))?;
    Ok(XChaCha20Poly1305::new(kek.as_ref().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_domain_separation() {
        let k = Keys::generate(true);
        let s = k.seal(Domain::Snapshot, b"hello");
        assert_eq!(s.len(), 5 + OVERHEAD);
        assert_eq!(k.open(Domain::Snapshot, &s).unwrap(), b"hello");
        assert!(k.open(Domain::Index, &s).is_none(), "a snapshot must not open as an index");
        let mut bad = s.clone();
        bad[30] ^= 1;
        assert!(k.open(Domain::Snapshot, &bad).is_none());
    }

    #[test]
    fn ids_are_keyed() {
        let a = Keys::generate(true);
        let b = Keys::generate(true);
        assert_ne!(a.blob_id(BlobKind::Data, b"x"), b.blob_id(BlobKind::Data, b"x"));
        assert_eq!(a.blob_id(BlobKind::Data, b"x"), a.blob_id(BlobKind::Data, b"x"));
        assert_ne!(a.blob_id(BlobKind::Data, b"x"), a.blob_id(BlobKind::Tree, b"x"), "kinds never share ids");
    }
}
