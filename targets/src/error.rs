//! The error of bundle writing, reading, verification and keys. Each names the file it is
//! about.

use std::path::{Path, PathBuf};

/// Errors of bundle writing, reading and verification. Each names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("{}: schema {found} is not supported (this edgepack reads schema {supported})\nhint: use the edgepack version that made the bundle", path.display())]
    Schema {
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error("{}: listed in manifest.json but missing from the bundle", path.display())]
    Missing { path: PathBuf },
    #[error("{}: not listed in manifest.json; a bundle holds only the files its manifest names", path.display())]
    Unlisted { path: PathBuf },
    #[error("{}: not a regular file or folder; bundles hold no links or devices", path.display())]
    NotRegular { path: PathBuf },
    #[error("{}: size is {actual} bytes, manifest.json says {expected}", path.display())]
    Size {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: sha256 is {actual}, manifest.json says {expected}", path.display())]
    Digest {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: {entry:?} is not a safe relative path inside the bundle (parts of ASCII letters, digits, `.`, `_` and `-`, none starting with `-` or being `.` or `..`, joined by `/`)", path.display())]
    UnsafePath { path: PathBuf, entry: String },
    #[error("{}: missing; a public key was given, so the bundle must be signed\nhint: sign it with `edgepack bundle ... --sign key.pem`", path.display())]
    SignatureMissing { path: PathBuf },
    #[error("{}: the signature does not match manifest.json for key {fingerprint}; the manifest was changed or signed with another key", path.display())]
    SignatureInvalid { path: PathBuf, fingerprint: String },
    #[error("{}: the bundle is signed but no public key was given, so the signature is unverified\nhint: pass the signer's public key (--key key.pub.pem)", path.display())]
    SignatureUnverified { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Archive { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Elf { path: PathBuf, message: String },
}

impl BundleError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        BundleError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            BundleError::Io { path, .. }
            | BundleError::Manifest { path, .. }
            | BundleError::Schema { path, .. }
            | BundleError::Missing { path }
            | BundleError::Unlisted { path }
            | BundleError::NotRegular { path }
            | BundleError::Size { path, .. }
            | BundleError::Digest { path, .. }
            | BundleError::UnsafePath { path, .. }
            | BundleError::SignatureMissing { path }
            | BundleError::SignatureInvalid { path, .. }
            | BundleError::SignatureUnverified { path }
            | BundleError::Key { path, .. }
            | BundleError::Archive { path, .. }
            | BundleError::Elf { path, .. } => path,
        }
    }
}
