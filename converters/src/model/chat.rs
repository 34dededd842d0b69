//! Chat prompts for the host engine: `edgepack_text` renders a model's chat template and runs
//! its tokenizer (the runtime uses the same crate on the board); this module feeds it a
//! model's tokenizer files and names the model in its errors.

use std::path::{Path, PathBuf};

pub use edgepack_text::Message;

use crate::error::{Error, Result};
use crate::model::TokenizerFiles;

fn named(source: &Path) -> impl Fn(edgepack_text::TextError) -> Error + '_ {
    move |e| Error::format(source, e.field, e.message)
}

/// Renders `messages` with the model's chat template. `source` names the model in errors.
pub fn render(
    tok: &TokenizerFiles,
    messages: &[Message],
    add_generation_prompt: bool,
    source: &Path,
) -> Result<String> {
    let template = tok.chat_template().ok_or_else(|| {
        Error::format(
            source,
            "chat_template",
            "missing: the model has no chat template\nhint: give plain text instead of chat messages",
        )
    })?;
    edgepack_text::chat::render(
        &template,
        tok.tokenizer_config.as_ref(),
        messages,
        add_generation_prompt,
    )
    .map_err(named(source))
}

/// Turns chat turns into token ids and ids back into text with a model's tokenizer.json and
/// chat template, and knows which ids end an answer.
pub struct Prompter {
    inner: edgepack_text::Prompter,
    source: PathBuf,
}

impl Prompter {
    pub fn new(model: &crate::model::Model) -> Result<Prompter> {
        let src = &model.source;
        let json = model.tokenizer.tokenizer_json.as_deref().ok_or_else(|| {
            Error::format(
                src,
                "tokenizer.json",
                "missing: prompting needs the model's tokenizer.json",
            )
        })?;
        let inner = edgepack_text::Prompter::new(
            json,
            model.tokenizer.tokenizer_config.as_ref(),
            model.tokenizer.generation_config.as_ref(),
        )
        .map_err(named(src))?;
        Ok(Prompter {
            inner,
            source: src.clone(),
        })
    }

    /// Ids of a conversation rendered with the chat template and a generation prompt.
    pub fn chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.inner.chat(messages).map_err(named(&self.source))
    }

    /// Ids of plain text (`special`: let the tokenizer add BOS/EOS as it is configured to).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, special)
            .map_err(named(&self.source))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids).map_err(named(&self.source))
    }

    /// Ids that end an answer.
    pub fn stop_ids(&self) -> &[u32] {
        self.inner.stop_ids()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_template_is_an_error_naming_the_model_and_field() {
        let e = render(&TokenizerFiles::default(), &[], false, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat_template") && e.contains("missing"), "{e}");
        let files = TokenizerFiles {
            tokenizer_config: Some(
                serde_json::json!({"chat_template": "{{ raise_exception('no') }}"}),
            ),
            ..TokenizerFiles::default()
        };
        let e = render(&files, &[], false, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat_template") && e.contains("no"), "{e}");
    }
}
