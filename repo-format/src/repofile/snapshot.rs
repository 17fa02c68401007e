//! Snapshots: the single commit point of a backup. A snapshot exists once its object exists;
//! everything it references was written before it.

use std::collections::HashMap;

use prost::Message;

/// Counts recorded at commit.
#[derive(Clone, PartialEq, Message)]
pub struct SnapshotStats {
    /// Regular files.
    #[prost(uint64, tag = "1")]
    pub files: u64,
    /// Directories.
    #[prost(uint64, tag = "2")]
    pub dirs: u64,
    /// Other entries (links, devices…).
    #[prost(uint64, tag = "3")]
    pub others: u64,
    /// Bytes of file content.
    #[prost(uint64, tag = "4")]
    pub bytes: u64,
    /// Blobs this snapshot added to the repository.
    #[prost(uint64, tag = "5")]
    pub blobs_added: u64,
    /// Plaintext bytes of those blobs.
    #[prost(uint64, tag = "6")]
    pub bytes_added: u64,
    /// Stored (compressed, sealed) bytes of those blobs.
    #[prost(uint64, tag = "7")]
    pub stored_added: u64,
}

/// A snapshot of one source at one time.
#[derive(Clone, PartialEq, Message)]
pub struct Snapshot {
    /// Version of the snapshot message ([`crate::magic::METADATA_VERSION`]).
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Start of the backup, nanoseconds since the epoch (UTC).
    #[prost(sint64, tag = "2")]
    pub time_ns: i64,
    /// End of the backup.
    #[prost(sint64, tag = "3")]
    pub end_time_ns: i64,
    /// Host the collector ran on.
    #[prost(string, tag = "4")]
    pub host: String,
    /// The agent the source was pulled from.
    #[prost(string, tag = "5")]
    pub agent: String,
    /// Source name.
    #[prost(string, tag = "6")]
    pub source: String,
    /// Source kind: path, postgres, mariadb, sqlite, redis, command, docker-volume…
    #[prost(string, tag = "7")]
    pub source_kind: String,
    /// Restore role: db, blobs, data or config.
    #[prost(string, tag = "8")]
    pub role: String,
    /// Category label (user-source-data, derived-data…).
    #[prost(string, tag = "9")]
    pub category: String,
    /// Free-form tags.
    #[prost(string, repeated, tag = "10")]
    pub tags: Vec<String>,
    /// Root tree blob id (32 bytes).
    #[prost(bytes = "vec", tag = "11")]
    pub tree: Vec<u8>,
    /// The previous snapshot of the same source, when one was used.
    #[prost(bytes = "vec", tag = "12")]
    pub parent: Vec<u8>,
    /// Counts.
    #[prost(message, optional, tag = "13")]
    pub stats: Option<SnapshotStats>,
    /// Free-form metadata (server and tool versions, table counts…).
    #[prost(map = "string, string", tag = "14")]
    pub metadata: HashMap<String, String>,
    /// Version of the program that wrote it.
    #[prost(string, tag = "15")]
    pub program_version: String,
    /// For a dump source: what each dump file in the tree holds.
    #[prost(message, repeated, tag = "16")]
    pub dumps: Vec<DumpInfo>,
    /// For a docker-volume source: each volume as it was when the copy began.
    #[prost(message, repeated, tag = "17")]
    pub volumes: Vec<VolumeInfo>,
    /// Storage id of the dictionary the source's dump content is compressed with (empty: none),
    /// so that the next backup of the source uses it again.
    #[prost(bytes = "vec", tag = "18")]
    pub dictionary: Vec<u8>,
}

/// A Docker volume of a docker-volume snapshot: what a restore needs to make it again.
#[derive(Clone, PartialEq, Message)]
pub struct VolumeInfo {
    /// Its name; its files are under this name at the top of the snapshot's tree.
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub driver: String,
    #[prost(btree_map = "string, string", tag = "3")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Names of the containers that mounted it.
    #[prost(string, repeated, tag = "4")]
    pub containers: Vec<String>,
    /// live, pause or stop.
    #[prost(string, tag = "5")]
    pub mode: String,
    /// The containers held still during the copy, and for how long.
    #[prost(message, repeated, tag = "6")]
    pub held: Vec<ContainerHold>,
}

/// A container paused or stopped while a volume was copied.
#[derive(Clone, PartialEq, Message)]
pub struct ContainerHold {
    #[prost(string, tag = "1")]
    pub name: String,
    /// pause or stop.
    #[prost(string, tag = "2")]
    pub action: String,
    #[prost(uint64, tag = "3")]
    pub held_ms: u64,
}

/// Rows of one table when the dump was taken.
#[derive(Clone, PartialEq, Message)]
pub struct TableRows {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub rows: u64,
}

/// One dump file of a dump snapshot and what it holds.
#[derive(Clone, PartialEq, Message)]
pub struct DumpInfo {
    /// Path of the dump file in the snapshot's tree.
    #[prost(string, tag = "1")]
    pub path: String,
    /// postgres, postgres-globals, mariadb, sqlite, redis, command.
    #[prost(string, tag = "2")]
    pub kind: String,
    /// pg_dump custom, sql, sqlite3, rdb, raw.
    #[prost(string, tag = "3")]
    pub format: String,
    /// The database (for SQLite: the database file on the agent).
    #[prost(string, tag = "4")]
    pub database: String,
    #[prost(string, tag = "5")]
    pub server_version: String,
    #[prost(string, tag = "6")]
    pub tool_version: String,
    #[prost(message, repeated, tag = "7")]
    pub tables: Vec<TableRows>,
    /// The counts are those of the dump's own snapshot (else the server's statistics or a count
    /// taken just before the dump).
    #[prost(bool, tag = "8")]
    pub rows_exact: bool,
    /// Size of the dump file in bytes, and its BLAKE3 (32 bytes).
    #[prost(uint64, tag = "9")]
    pub size: u64,
    #[prost(bytes = "vec", tag = "10")]
    pub blake3: Vec<u8>,
    /// When the dump started and ended, nanoseconds since the epoch.
    #[prost(sint64, tag = "11")]
    pub start_ns: i64,
    #[prost(sint64, tag = "12")]
    pub end_ns: i64,
}

/// The newest snapshot of each (agent, source) group among `snaps`.
pub fn newest_per_group(
    snaps: impl IntoIterator<Item = (crate::Id, Snapshot)>,
) -> std::collections::BTreeMap<(String, String), (crate::Id, Snapshot)> {
    let mut newest = std::collections::BTreeMap::new();
    for (id, s) in snaps {
        match newest.entry(s.group()) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((id, s));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                if o.get().1.time_ns < s.time_ns {
                    o.insert((id, s));
                }
            }
        }
    }
    newest
}

impl Snapshot {
    /// Start time as a UTC date.
    pub fn time(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_nanos(self.time_ns)
    }

    /// The (agent, source) group retention works on.
    pub fn group(&self) -> (String, String) {
        (self.agent.clone(), self.source.clone())
    }

    /// Encoded protobuf.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}
