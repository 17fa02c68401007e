//! The `config` object: what a reader must know before reading anything else.

use prost::Message;

use crate::chunker::ChunkerParams;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::magic::{self, Domain};

/// Chunker sizes as stored.
#[derive(Clone, PartialEq, Message)]
pub struct ChunkerSizes {
    /// Minimum chunk size.
    #[prost(uint32, tag = "1")]
    pub min: u32,
    /// Average chunk size.
    #[prost(uint32, tag = "2")]
    pub avg: u32,
    /// Maximum chunk size.
    #[prost(uint32, tag = "3")]
    pub max: u32,
}

impl From<ChunkerParams> for ChunkerSizes {
    fn from(p: ChunkerParams) -> Self {
        ChunkerSizes { min: p.min, avg: p.avg, max: p.max }
    }
}

impl From<&ChunkerSizes> for ChunkerParams {
    fn from(s: &ChunkerSizes) -> Self {
        ChunkerParams { min: s.min, avg: s.avg, max: s.max }
    }
}

/// The repository's fixed parameters.
#[derive(Clone, PartialEq, Message)]
pub struct RepoConfig {
    /// Format version ([`magic::REPO_VERSION`]).
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Random repository id.
    #[prost(bytes = "vec", tag = "2")]
    pub id: Vec<u8>,
    /// Creation time, seconds since the epoch.
    #[prost(int64, tag = "3")]
    pub created_unix: i64,
    /// Chunk sizes for files.
    #[prost(message, optional, tag = "4")]
    pub chunker_files: Option<ChunkerSizes>,
    /// Chunk sizes for database dumps.
    #[prost(message, optional, tag = "5")]
    pub chunker_dumps: Option<ChunkerSizes>,
    /// zstd level for new blobs (1..=22).
    #[prost(int32, tag = "6")]
    pub compression_level: i32,
    /// Target pack size in bytes.
    #[prost(uint32, tag = "7")]
    pub pack_size: u32,
    /// Files smaller than this share chunks with their neighbours.
    #[prost(uint32, tag = "8")]
    pub small_file_threshold: u32,
    /// The master secret, present only in an unencrypted repository.
    #[prost(bytes = "vec", tag = "9")]
    pub plain_master_secret: Vec<u8>,
}

impl RepoConfig {
    /// Chunker sizes for files.
    pub fn files_params(&self) -> ChunkerParams {
        self.chunker_files.as_ref().map(Into::into).unwrap_or(ChunkerParams::FILES)
    }

    /// Chunker sizes for dumps.
    pub fn dumps_params(&self) -> ChunkerParams {
        self.chunker_dumps.as_ref().map(Into::into).unwrap_or(ChunkerParams::DUMPS)
    }

    /// The repository id.
    pub fn repo_id(&self) -> Id {
        Id::from_slice(&self.id).unwrap_or_default()
    }
}

/// Encode `config`: magic (8) || version u32 LE || cipher u8 || payload.
pub fn encode(cfg: &RepoConfig, keys: &crate::crypto::Keys) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(magic::CONFIG_MAGIC);
    out.extend_from_slice(&magic::REPO_VERSION.to_le_bytes());
    let cipher = if keys.encrypted() { magic::CIPHER_XCHACHA20_POLY1305 } else { magic::CIPHER_NONE };
    out.push(cipher);
    out.extend_from_slice(&keys.seal(Domain::Config, &cfg.encode_to_vec()));
    out
}

/// The readable head of `config`: version and cipher, then the payload.
pub struct ConfigHead<'a> {
    /// Format version.
    pub version: u32,
    /// Cipher id.
    pub cipher: u8,
    /// The (sealed) payload.
    pub payload: &'a [u8],
}

/// Split the plain header from the payload.
pub fn parse_head(bytes: &[u8]) -> Result<ConfigHead<'_>> {
    if bytes.len() < 13 || &bytes[..8] != magic::CONFIG_MAGIC {
        return Err(Error::corrupt("config", "not a magpie repository config (bad magic)"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version > magic::REPO_VERSION {
        return Err(Error::UnsupportedVersion {
            object: "config".into(),
            found: version,
            supported: magic::REPO_VERSION,
        });
    }
    let cipher = bytes[12];
    if cipher != magic::CIPHER_NONE && cipher != magic::CIPHER_XCHACHA20_POLY1305 {
        return Err(Error::corrupt("config", format!("unknown cipher {cipher}")));
    }
    Ok(ConfigHead { version, cipher, payload: &bytes[13..] })
}

/// Decode the payload once the keys are known.
pub fn decode_payload(payload: &[u8], keys: &crate::crypto::Keys) -> Result<RepoConfig> {
    let plain = keys.open(Domain::Config, payload).ok_or_else(|| Error::corrupt("config", "authentication failed"))?;
    RepoConfig::decode(plain.as_slice()).map_err(|e| Error::corrupt("config", e))
}
