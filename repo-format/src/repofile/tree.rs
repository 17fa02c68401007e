//! Trees: one directory's entries, stored as a deduplicated tree blob.
//!
//! Entries are sorted by name, so an unchanged directory encodes to the same bytes and its tree
//! blob is stored once. Protobuf keeps the format open: fields added later are skipped by old
//! readers.

use prost::Message;

/// The kind of a directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum NodeKind {
    /// Never written.
    Unknown = 0,
    /// A regular file; `content` holds its bytes.
    File = 1,
    /// A directory; `subtree` names its tree blob.
    Dir = 2,
    /// A symbolic link; `link_target` is its target, as is.
    Symlink = 3,
    /// A further name of a file seen earlier in this snapshot; `link_target` is that first
    /// name's path relative to the snapshot root.
    Hardlink = 4,
    /// Character device (metadata only).
    CharDevice = 5,
    /// Block device (metadata only).
    BlockDevice = 6,
    /// Named pipe (metadata only).
    Fifo = 7,
    /// Unix socket (metadata only).
    Socket = 8,
}

/// A byte range of a data blob.
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct ChunkRef {
    /// The blob id (32 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    /// Start of the range within the blob's plaintext.
    #[prost(uint32, tag = "2")]
    pub offset: u32,
    /// Length of the range.
    #[prost(uint32, tag = "3")]
    pub length: u32,
}

/// An extended attribute.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Xattr {
    /// Name, e.g. `user.comment`.
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    /// Value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// One directory entry.
#[derive(Clone, PartialEq, Message)]
pub struct Node {
    /// File name (bytes: Unix names need not be UTF-8).
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    /// Entry kind.
    #[prost(enumeration = "NodeKind", tag = "2")]
    pub kind: i32,
    /// Permission bits with setuid/setgid/sticky (`st_mode & 0o7777`).
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    /// Owner uid.
    #[prost(uint32, tag = "4")]
    pub uid: u32,
    /// Owner gid.
    #[prost(uint32, tag = "5")]
    pub gid: u32,
    /// Owner name, when known.
    #[prost(string, tag = "6")]
    pub user: String,
    /// Group name, when known.
    #[prost(string, tag = "7")]
    pub group: String,
    /// Modification time, nanoseconds since the epoch.
    #[prost(sint64, tag = "8")]
    pub mtime_ns: i64,
    /// Status change time, nanoseconds since the epoch.
    #[prost(sint64, tag = "9")]
    pub ctime_ns: i64,
    /// Size in bytes (files).
    #[prost(uint64, tag = "10")]
    pub size: u64,
    /// Inode number on the source.
    #[prost(uint64, tag = "11")]
    pub inode: u64,
    /// Device number of the source file system.
    #[prost(uint64, tag = "12")]
    pub device: u64,
    /// Link count on the source.
    #[prost(uint32, tag = "13")]
    pub nlink: u32,
    /// Symlink target, or the first path of a hard-linked file.
    #[prost(bytes = "vec", tag = "14")]
    pub link_target: Vec<u8>,
    /// Device number of a device node.
    #[prost(uint64, tag = "15")]
    pub rdev: u64,
    /// Extended attributes, sorted by name.
    #[prost(message, repeated, tag = "16")]
    pub xattrs: Vec<Xattr>,
    /// File content: byte ranges of data blobs, in order.
    #[prost(message, repeated, tag = "17")]
    pub content: Vec<ChunkRef>,
    /// Directory: id of its tree blob.
    #[prost(bytes = "vec", tag = "18")]
    pub subtree: Vec<u8>,
    /// File: BLAKE3 (unkeyed) of the whole content, to verify a restore end to end.
    #[prost(bytes = "vec", tag = "19")]
    pub blake3: Vec<u8>,
}

impl Node {
    /// The entry kind (unknown values read as [`NodeKind::Unknown`]).
    pub fn node_kind(&self) -> NodeKind {
        NodeKind::try_from(self.kind).unwrap_or(NodeKind::Unknown)
    }
}

/// A directory.
#[derive(Clone, PartialEq, Message)]
pub struct Tree {
    /// Version of the tree message ([`crate::magic::METADATA_VERSION`]).
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Entries sorted by name.
    #[prost(message, repeated, tag = "2")]
    pub nodes: Vec<Node>,
}
