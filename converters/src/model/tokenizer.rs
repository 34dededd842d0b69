//! The tokenizer files that travel with a model, kept as Hugging Face has them.

use serde_json::Value as Json;

/// Tokenizer and generation files of a model in Hugging Face form. Importers fill what they
/// find (a GGUF importer rebuilds them from `tokenizer.ggml.*` keys); exporters read them.
#[derive(Debug, Clone, Default)]
pub struct TokenizerFiles {
    /// `tokenizer.json` (the `tokenizers` library's format), as text.
    pub tokenizer_json: Option<String>,
    /// `tokenizer_config.json`: chat template, special tokens, add_bos/add_eos.
    pub tokenizer_config: Option<Json>,
    /// `special_tokens_map.json`.
    pub special_tokens_map: Option<Json>,
    /// `generation_config.json`.
    pub generation_config: Option<Json>,
    /// `tokenizer.model` (SentencePiece protobuf), raw bytes.
    pub sentencepiece_model: Option<Vec<u8>>,
}

impl TokenizerFiles {
    pub fn is_empty(&self) -> bool {
        self.tokenizer_json.is_none() && self.sentencepiece_model.is_none()
    }

    /// The chat template from `tokenizer_config.json`, if any (a string, or the default entry of
    /// a list of named templates).
    pub fn chat_template(&self) -> Option<String> {
        self.tokenizer_config
            .as_ref()
            .and_then(edgepack_text::chat::template)
    }
}
