//! Chat prompts: a model's Jinja chat template (from `tokenizer_config.json`) rendered the way
//! transformers' `apply_chat_template` does, with `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token` and `raise_exception`, and the Python string methods
//! (`.strip()`, `.startswith()`) that templates use.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::TextError;

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

    pub fn assistant(content: &str) -> Message {
        Message {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// The chat template of a `tokenizer_config.json`: a string, or a list of named templates of
/// which `default` (else the first) is the one.
pub fn template(tokenizer_config: &Json) -> Option<String> {
    match tokenizer_config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|e| e.get("name").and_then(Json::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|e| e.get("template"))
            .and_then(Json::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// A special token of `tokenizer_config.json`: a string or an `AddedToken` object; empty when
/// absent.
pub fn special_token(tokenizer_config: Option<&Json>, key: &str) -> String {
    match tokenizer_config.and_then(|c| c.get(key)) {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Object(o)) => o
            .get("content")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

/// Renders `messages` with `template`; `tokenizer_config` supplies `bos_token`/`eos_token`.
pub fn render(
    template: &str,
    tokenizer_config: Option<&Json>,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<String, TextError> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let bad =
        |e: minijinja::Error| TextError::new("chat_template", format!("cannot render: {e:#}"));
    env.add_template("chat", template).map_err(bad)?;
    env.get_template("chat")
        .map_err(bad)?
        .render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => special_token(tokenizer_config, "bos_token"),
            eos_token => special_token(tokenizer_config, "eos_token"),
        })
        .map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(template: &str) -> Json {
        serde_json::json!({
            "chat_template": template,
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
        })
    }

    #[test]
    fn renders_a_chatml_template_with_generation_prompt() {
        let t = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let cfg = config(t);
        let out = render(
            &template(&cfg).unwrap(),
            Some(&cfg),
            &[Message::user(" Hi ")],
            true,
        )
        .unwrap();
        assert_eq!(
            out,
            "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error_naming_the_field() {
        let e = render("{{ raise_exception('only user turns') }}", None, &[], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("chat_template") && e.contains("only user turns"),
            "{e}"
        );
    }

    #[test]
    fn a_list_of_named_templates_picks_default() {
        let cfg = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(template(&cfg).as_deref(), Some("D"));
        assert_eq!(template(&serde_json::json!({})), None);
    }
}
