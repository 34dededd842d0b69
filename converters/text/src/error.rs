//! The one error of this crate: which file and field, and what is wrong with it.

/// What went wrong, naming the tokenizer file or field involved.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TextError {
    /// The file or key at fault (`tokenizer.json`, `chat_template`).
    pub field: &'static str,
    pub message: String,
}

impl TextError {
    pub fn new(field: &'static str, message: impl Into<String>) -> TextError {
        TextError {
            field,
            message: message.into(),
        }
    }
}
