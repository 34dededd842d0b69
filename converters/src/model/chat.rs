//! Chat prompts: a model's Jinja chat template (from `tokenizer_config.json`, or rebuilt from a
//! GGUF's `tokenizer.chat_template`) rendered the way transformers' `apply_chat_template`
//! does, with `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and
//! `raise_exception`, and Python string methods (`.strip()`, `.startswith()`) that templates
//! use.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::model::TokenizerFiles;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: &str) -> Message {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A special token of `tokenizer_config.json`: a string or an `AddedToken` object.
fn special(cfg: Option<&Json>, key: &str) -> String {
    match cfg.and_then(|c| c.get(key)) {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Object(o)) => o
            .get("content")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
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
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let bad = |e: minijinja::Error| {
        Error::format(source, "chat_template", format!("cannot render: {e:#}"))
    };
    env.add_template("chat", &template).map_err(bad)?;
    let cfg = tok.tokenizer_config.as_ref();
    env.get_template("chat")
        .map_err(bad)?
        .render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => special(cfg, "bos_token"),
            eos_token => special(cfg, "eos_token"),
        })
        .map_err(bad)
}

/// Turns chat turns into token ids and ids back into text with a model's tokenizer.json and
/// chat template, and knows which ids end an answer.
pub struct Prompter {
    tok: tokenizers::Tokenizer,
    files: TokenizerFiles,
    source: std::path::PathBuf,
    stop: Vec<u32>,
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
        let tok = json.parse::<tokenizers::Tokenizer>().map_err(|e| {
            Error::format(
                src,
                "tokenizer.json",
                format!("the tokenizers library cannot load it: {e}"),
            )
        })?;
        // Stop at generation_config's eos ids (a number or a list) and the eos token.
        let mut stop = Vec::new();
        match model
            .tokenizer
            .generation_config
            .as_ref()
            .and_then(|g| g.get("eos_token_id"))
        {
            Some(Json::Number(n)) => stop.extend(n.as_u64().map(|v| v as u32)),
            Some(Json::Array(a)) => {
                stop.extend(a.iter().filter_map(Json::as_u64).map(|v| v as u32))
            }
            _ => {}
        }
        let eos = special(model.tokenizer.tokenizer_config.as_ref(), "eos_token");
        stop.extend(tok.token_to_id(&eos));
        stop.sort_unstable();
        stop.dedup();
        Ok(Prompter {
            tok,
            files: model.tokenizer.clone(),
            source: src.clone(),
            stop,
        })
    }

    /// Ids of a conversation rendered with the chat template and a generation prompt; the
    /// template places any BOS itself, so no special tokens are added.
    pub fn chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = render(&self.files, messages, true, &self.source)?;
        self.encode(&text, false)
    }

    /// Ids of plain text (`special`: let the tokenizer add BOS/EOS as it is configured to).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        self.tok
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| {
                Error::format(
                    &self.source,
                    "tokenizer.json",
                    format!("cannot encode: {e}"),
                )
            })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok.decode(ids, true).map_err(|e| {
            Error::format(
                &self.source,
                "tokenizer.json",
                format!("cannot decode: {e}"),
            )
        })
    }

    /// Ids that end an answer.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(template: &str) -> TokenizerFiles {
        TokenizerFiles {
            tokenizer_config: Some(serde_json::json!({
                "chat_template": template,
                "bos_token": {"content": "<s>"},
                "eos_token": "</s>",
            })),
            ..TokenizerFiles::default()
        }
    }

    #[test]
    fn renders_a_chatml_template_with_generation_prompt() {
        let t = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let out = render(&files(t), &[Message::user(" Hi ")], true, Path::new("m")).unwrap();
        assert_eq!(
            out,
            "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_and_a_missing_template_are_errors_naming_the_field() {
        let t = "{{ raise_exception('only user turns') }}";
        let e = render(&files(t), &[], false, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("chat_template") && e.contains("only user turns"),
            "{e}"
        );
        let e = render(&TokenizerFiles::default(), &[], false, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat_template") && e.contains("missing"), "{e}");
    }
}
