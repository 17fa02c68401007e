//! Every magic number, domain tag and format version, in one place.
//!
//! DO NOT MODIFY existing values: they are on disk in users' repositories. Append only, and
//! record each addition in FORMAT.md's "Changes" section.

/// First 8 bytes of the `config` object.
pub const CONFIG_MAGIC: &[u8; 8] = b"MAGPIE\0R";
/// Repository format version written by this build; readers refuse newer versions.
pub const REPO_VERSION: u32 = 1;
/// First 8 bytes of a decrypted index file.
pub const INDEX_MAGIC: &[u8; 8] = b"MAGPIDX\x01";
/// First 8 bytes of a decrypted index file whose entries carry a base blob id (written only when
/// one of its blobs has a base, so that repositories without any stay readable by older builds).
pub const INDEX_MAGIC_BASES: &[u8; 8] = b"MAGPIDX\x02";
/// Version byte at the start of a decrypted pack header.
pub const PACK_HEADER_VERSION: u8 = 1;
/// Version byte of a pack header whose entries carry a base blob id (as for the index).
pub const PACK_HEADER_VERSION_BASES: u8 = 2;
/// Version of the snapshot, tree and lock messages written by this build.
pub const METADATA_VERSION: u32 = 1;

/// Additional authenticated data: one byte naming the kind of object a ciphertext belongs to,
/// so that a ciphertext of one kind cannot be passed off as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Domain {
    /// The wrapped master secret in a key file.
    Key = 1,
    /// The `config` payload.
    Config = 2,
    /// A data blob inside a pack.
    DataBlob = 3,
    /// A tree blob inside a pack.
    TreeBlob = 4,
    /// A pack header.
    PackHeader = 5,
    /// An index file.
    Index = 6,
    /// A snapshot.
    Snapshot = 7,
    /// A lock.
    Lock = 8,
    /// A compression dictionary.
    Dictionary = 9,
}

/// BLAKE3 `derive_key` contexts for the sub-keys of the master secret.
pub const CTX_ENCRYPTION: &str = "magpie 2026-11 repository encryption key v1";
/// Context for the key that names data blobs.
pub const CTX_DATA_BLOB_ID: &str = "magpie 2026-11 data blob id key v1";
/// Context for the key that names tree blobs: a different key, so that no file content can
/// ever have the id of a tree (and be taken for one by deduplication).
pub const CTX_TREE_BLOB_ID: &str = "magpie 2026-11 tree blob id key v1";
/// Context for the chunker's gear seed.
pub const CTX_CHUNKER_SEED: &str = "magpie 2026-11 chunker seed v1";

/// Blob payload compression flags (first plaintext byte of a blob).
pub const COMPRESSION_NONE: u8 = 0;
/// zstd frame follows.
pub const COMPRESSION_ZSTD: u8 = 1;
/// zstd frame compressed with a dictionary from `dicts/` follows.
pub const COMPRESSION_ZSTD_DICTIONARY: u8 = 2;
/// zstd frame compressed with the plaintext of another data blob, its base, as raw-content
/// dictionary follows; the base's id is in the blob's index and pack-header entries.
pub const COMPRESSION_ZSTD_BASE: u8 = 3;

/// Cipher identifiers in `config`.
pub const CIPHER_NONE: u8 = 0;
/// XChaCha20-Poly1305 with 24-byte random nonces.
pub const CIPHER_XCHACHA20_POLY1305: u8 = 1;

/// Prefix of temporary names in the local backend; listings skip them.
pub const TEMP_PREFIX: &str = ".tmp-";
