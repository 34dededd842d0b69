//! Files written so that a crash never leaves half of one: a temporary name in the same
//! folder, fsync, rename.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::BundleError;

/// Writes a small file through a temporary name in the same folder, fsynced, then renamed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BundleError> {
    let tmp = tmp_sibling(path);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        set_mode(&tmp, mode)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(BundleError::io(&tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| BundleError::io(path, e))
}

pub(crate) fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

#[cfg(unix)]
pub(crate) fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
pub(crate) fn set_mode(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Ok(())
}
