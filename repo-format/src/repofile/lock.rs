//! Lock objects: who is using the repository and how.

use prost::Message;

/// A lock as stored.
#[derive(Clone, PartialEq, Message)]
pub struct LockFile {
    /// Version of the lock message.
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// True for exclusive (prune, compact, repair), false for shared (writers, readers).
    #[prost(bool, tag = "2")]
    pub exclusive: bool,
    /// Host name of the holder.
    #[prost(string, tag = "3")]
    pub host: String,
    /// Process id of the holder.
    #[prost(uint32, tag = "4")]
    pub pid: u32,
    /// Start time of that process in clock ticks since boot (Linux `/proc/PID/stat` field 22),
    /// so a recycled pid is not taken for the holder.
    #[prost(uint64, tag = "5")]
    pub process_start: u64,
    /// The command that holds it, e.g. `collector compact`.
    #[prost(string, tag = "6")]
    pub command: String,
    /// When the lock was taken, seconds since the epoch.
    #[prost(int64, tag = "7")]
    pub created_unix: i64,
    /// When it was last refreshed (a refresh writes a new lock object and removes the old).
    #[prost(int64, tag = "8")]
    pub refreshed_unix: i64,
    /// 16 random bytes, so that two locks never share a name even unencrypted.
    #[prost(bytes = "vec", tag = "9")]
    pub nonce: Vec<u8>,
    /// The holder's kernel boot id (`/proc/sys/kernel/random/boot_id`).
    #[prost(string, tag = "10")]
    pub boot_id: String,
    /// The holder's pid namespace (inode of `/proc/self/ns/pid`).
    #[prost(uint64, tag = "11")]
    pub pid_namespace: u64,
}
