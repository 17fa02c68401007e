//! One module per object stored in a repository: how each is named and encoded.
//!
//! | object | name | encoding |
//! |---|---|---|
//! | [`config`] | `config` | magic, version, cipher, then a (sealed) protobuf |
//! | [`key`] | `keys/<storage id>` | protobuf, master secret wrapped by Argon2id |
//! | [`pack`] | `data/<2 hex>/<storage id>` | sealed blobs, sealed header, header length |
//! | [`index`] | `index/<storage id>` | sealed, sorted binary table with a fan-out |
//! | [`snapshot`] | `snapshots/<storage id>` | sealed protobuf |
//! | [`tree`] | a tree blob in a pack | protobuf |
//! | [`lock`] | `locks/<storage id>` | sealed protobuf |
//! | [`dictionary`] | `dicts/<storage id>` | a sealed zstd dictionary |

pub mod config;
pub mod dictionary;
pub mod index;
pub mod key;
pub mod lock;
pub mod pack;
pub mod snapshot;
pub mod tree;

use crate::id::Id;

/// Folder of packs.
pub const DATA_DIR: &str = "data/";
/// Folder of index files.
pub const INDEX_DIR: &str = "index/";
/// Folder of snapshots.
pub const SNAPSHOT_DIR: &str = "snapshots/";
/// Folder of key files.
pub const KEY_DIR: &str = "keys/";
/// Folder of locks.
pub const LOCK_DIR: &str = "locks/";
/// Folder of compression dictionaries.
pub const DICT_DIR: &str = "dicts/";
/// The config object.
pub const CONFIG_NAME: &str = "config";

/// Storage name of a pack.
pub fn pack_name(id: &Id) -> String {
    let h = id.to_hex();
    format!("{DATA_DIR}{}/{h}", &h[..2])
}

/// The id in an object name (its last path component), if it is one.
pub fn id_of_name(name: &str) -> Option<Id> {
    name.rsplit('/').next()?.parse().ok()
}
