//! Where the repository passphrase comes from, in order: `--passphrase-file`, the environment
//! variable `MAGPIE_PASSPHRASE`, the systemd credential `magpie-passphrase`
//! (`LoadCredential=` puts it in `$CREDENTIALS_DIRECTORY`). The passphrase is never logged.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use zeroize::Zeroizing;

/// Name of the systemd credential.
pub const CREDENTIAL: &str = "magpie-passphrase";
/// Environment variable holding the passphrase itself.
pub const ENV: &str = "MAGPIE_PASSPHRASE";

/// Read a passphrase file: its first line, without the line end.
pub fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let raw =
        Zeroizing::new(std::fs::read(path).with_context(|| format!("cannot read passphrase file {}", path.display()))?);
    let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!("passphrase file {} is empty", path.display());
    }
    Ok(Zeroizing::new(line.to_vec()))
}

/// The passphrase from the first source that has one, or `None`.
pub fn find(file: Option<&Path>) -> Result<Option<Zeroizing<Vec<u8>>>> {
    if let Some(f) = file {
        return read_file(f).map(Some);
    }
    if let Some(v) = std::env::var_os(ENV) {
        use std::os::unix::ffi::OsStrExt;
        if !v.is_empty() {
            return Ok(Some(Zeroizing::new(v.as_bytes().to_vec())));
        }
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let p = PathBuf::from(dir).join(CREDENTIAL);
        if p.exists() {
            return read_file(&p).map(Some);
        }
    }
    Ok(None)
}
