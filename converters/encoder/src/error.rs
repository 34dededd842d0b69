//! The one error of this crate: which file and field, and what is wrong with it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    /// A file that is not what it should be, naming the field at fault.
    #[error("{}: {field}: {message}", path.display())]
    Format {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl EncoderError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> EncoderError {
        EncoderError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    pub fn format(
        path: &Path,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> EncoderError {
        EncoderError::Format {
            path: path.to_path_buf(),
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, EncoderError>;
