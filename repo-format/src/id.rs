//! 32-byte identifiers: blob ids (keyed BLAKE3 of the plaintext) and storage ids (plain BLAKE3 of
//! the stored bytes, which name packs, index files, snapshots, keys and locks).

use std::fmt;
use std::str::FromStr;

/// A 32-byte identifier, shown as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// Length in bytes.
    pub const LEN: usize = 32;

    /// The storage id of an object: plain BLAKE3 of its stored bytes, checkable without a key.
    pub fn of_stored(bytes: &[u8]) -> Id {
        Id::of_stored_hasher(blake3::Hasher::new().update(bytes))
    }

    /// [`Id::of_stored`] of the bytes fed to `hasher` (an object hashed as it is written).
    pub fn of_stored_hasher(hasher: &blake3::Hasher) -> Id {
        Id(*hasher.finalize().as_bytes())
    }

    /// A random id (locks, repository ids).
    pub fn random() -> Id {
        let mut b = [0u8; 32];
        crate::crypto::fill_random(&mut b);
        Id(b)
    }

    /// Full hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The 8-digit form used in listings.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// Parse from a byte slice of exactly 32 bytes.
    pub fn from_slice(b: &[u8]) -> Option<Id> {
        Some(Id(b.try_into().ok()?))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl FromStr for Id {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b)?;
        Ok(Id(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = Id::of_stored(b"abc");
        assert_eq!(id.to_hex().parse::<Id>().unwrap(), id);
        assert_eq!(id.short().len(), 8);
        assert!("zz".parse::<Id>().is_err());
    }
}
