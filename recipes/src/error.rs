//! The recipe error: every variant names the recipe file (with line and column where a key is
//! at fault) or the stage that failed.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The file is not valid TOML, or a key is unknown or of the wrong type.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A key is well-formed but wrong: a missing file, an unknown board, a format the board
    /// cannot run, a gate without data to compute it.
    #[error("{}:{line}:{column}: `{key}`: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    /// A stage failed; earlier finished stages stay in the cache.
    #[error("stage `{stage}` failed: {message}")]
    Stage { stage: String, message: String },
    #[error("{0}")]
    Cache(String),
}

impl RecipeError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> RecipeError {
        RecipeError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    pub fn stage(stage: &str, e: impl std::fmt::Display) -> RecipeError {
        RecipeError::Stage {
            stage: stage.to_string(),
            message: e.to_string(),
        }
    }
}

pub type Result<T, E = RecipeError> = std::result::Result<T, E>;
