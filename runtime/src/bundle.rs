//! Opening a bundle on the board: verify everything, then name the model file to load.
//!
//! Verification (`edgepack_targets::bundle::verify_dir`: every file's size and SHA-256 against
//! the manifest, no unlisted files, the signature when present or required) happens before a
//! single model byte is mapped, so a tampered bundle never reaches llama.cpp.

use std::path::{Path, PathBuf};

use edgepack_targets::bundle::{self, Manifest};
use edgepack_targets::sign;
use edgepack_targets::BundleError;

/// The one model format this runtime loads (llama.cpp).
pub const FORMAT: &str = "gguf";

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{}: format is {format:?}; edgepack-runtime runs {FORMAT} bundles", manifest.display())]
    Format { manifest: PathBuf, format: String },
}

/// A bundle that passed verification.
#[derive(Debug)]
pub struct Verified {
    pub manifest: Manifest,
    pub model_path: PathBuf,
    /// The id the API answers with: the manifest's model name.
    pub model_id: String,
}

/// Verifies `dir` (against `trusted_key` when given) and finds its model.
pub fn open(dir: &Path, trusted_key: Option<&Path>) -> Result<Verified, OpenError> {
    let key = trusted_key.map(sign::read_public_key).transpose()?;
    let manifest = bundle::verify_dir(dir, key.as_ref())?;
    if manifest.format != FORMAT {
        return Err(OpenError::Format {
            manifest: dir.join(bundle::MANIFEST),
            format: manifest.format.clone(),
        });
    }
    // verify_dir has checked that model.file is a listed, safe, present path.
    Ok(Verified {
        model_path: dir.join(&manifest.model.file),
        model_id: manifest.model.name.clone(),
        manifest,
    })
}
