//! The one error type of the converters library: every variant names the file and, where there
//! is one, the field or tensor that was wrong.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or write. The OS message is part of the text (not
    /// a separate `source`), so error chains print it once.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A file is malformed: truncated, corrupt, or a field has the wrong type or value.
    #[error("{path}: {field}: {msg}")]
    Format {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// A well-formed input asks for something edgepack does not support.
    #[error("{path}: {field}: unsupported: {msg}")]
    Unsupported {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// Two inputs do not fit together (an adapter for another base, a wrong shape).
    #[error("{path}: {field}: {msg}")]
    Mismatch {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// A request that cannot be carried out as asked (bad option, output over an input).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<edgepack_encoder::EncoderError> for Error {
    fn from(e: edgepack_encoder::EncoderError) -> Error {
        use edgepack_encoder::EncoderError as E;
        match e {
            E::Format {
                path,
                field,
                message,
            } => Error::Format {
                path,
                field,
                msg: message,
            },
            other => Error::Invalid(other.to_string()),
        }
    }
}

impl Error {
    pub fn io(path: impl AsRef<Path>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            cause,
        }
    }

    pub fn format(
        path: impl AsRef<Path>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub fn unsupported(
        path: impl AsRef<Path>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Unsupported {
            path: path.as_ref().to_path_buf(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub fn mismatch(
        path: impl AsRef<Path>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Mismatch {
            path: path.as_ref().to_path_buf(),
            field: field.into(),
            msg: msg.into(),
        }
    }
}
