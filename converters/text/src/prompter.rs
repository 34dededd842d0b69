//! A model's tokenizer (`tokenizer.json`) with its chat template and stop ids: conversations
//! to ids, ids back to text, and a stream that turns generated ids into text as they come.

use serde_json::Value as Json;

use crate::chat::{self, Message};
use crate::error::TextError;
use crate::pieces::{render_pieces, Piece};

/// Turns chat turns into token ids and ids back into text, and knows which ids end an answer.
pub struct Prompter {
    tok: tokenizers::Tokenizer,
    /// The same tokenizer with special-token text read as plain text: for message contents.
    plain: tokenizers::Tokenizer,
    config: Option<Json>,
    template: Option<String>,
    stop: Vec<u32>,
}

impl std::fmt::Debug for Prompter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompter")
            .field("vocab", &self.tok.get_vocab_size(true))
            .field("chat_template", &self.template.is_some())
            .field("stop", &self.stop)
            .finish()
    }
}

impl Prompter {
    /// From the text of `tokenizer.json` and the parsed `tokenizer_config.json` and
    /// `generation_config.json`, when the model has them.
    pub fn new(
        tokenizer_json: &str,
        tokenizer_config: Option<&Json>,
        generation_config: Option<&Json>,
    ) -> Result<Prompter, TextError> {
        let tok = tokenizer_json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| {
                TextError::new(
                    "tokenizer.json",
                    format!("the tokenizers library cannot load it: {e}"),
                )
            })?;
        // Stop at generation_config's eos ids (a number or a list) and the eos token.
        let mut stop = Vec::new();
        match generation_config.and_then(|g| g.get("eos_token_id")) {
            Some(Json::Number(n)) => stop.extend(n.as_u64().and_then(|v| u32::try_from(v).ok())),
            Some(Json::Array(a)) => stop.extend(
                a.iter()
                    .filter_map(Json::as_u64)
                    .filter_map(|v| u32::try_from(v).ok()),
            ),
            _ => {}
        }
        let eos = chat::special_token(tokenizer_config, "eos_token");
        stop.extend(tok.token_to_id(&eos));
        stop.sort_unstable();
        stop.dedup();
        let mut plain = tok.clone();
        plain.set_encode_special_tokens(true);
        Ok(Prompter {
            tok,
            plain,
            template: tokenizer_config.and_then(chat::template),
            config: tokenizer_config.cloned(),
            stop,
        })
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The conversation rendered with the chat template (and a generation prompt).
    pub fn render(&self, messages: &[Message]) -> Result<String, TextError> {
        let template = self.template.as_deref().ok_or_else(|| {
            TextError::new(
                "chat_template",
                "missing: the model has no chat template\nhint: give plain text instead of chat messages",
            )
        })?;
        chat::render(template, self.config.as_ref(), messages, true)
    }

    /// Ids of a conversation rendered with the chat template and a generation prompt; the
    /// template places any BOS itself, so no special tokens are added. The template's text
    /// is read with its special tokens; the messages' contents as plain text, so a message
    /// that spells `<|im_start|>` does not open a turn.
    pub fn chat(&self, messages: &[Message]) -> Result<Vec<u32>, TextError> {
        let mut ids = Vec::new();
        for piece in render_pieces(messages, |m| self.render(m))? {
            let (tok, text) = match &piece {
                Piece::Template(t) => (&self.tok, t),
                Piece::Content(t) => (&self.plain, t),
            };
            let enc = tok
                .encode(text.as_str(), false)
                .map_err(|e| TextError::new("tokenizer.json", format!("cannot encode: {e}")))?;
            ids.extend_from_slice(enc.get_ids());
        }
        Ok(ids)
    }

    /// Ids of plain text (`special`: let the tokenizer add BOS/EOS as it is configured to).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, TextError> {
        self.tok
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TextError::new("tokenizer.json", format!("cannot encode: {e}")))
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        self.tok
            .decode(ids, true)
            .map_err(|e| TextError::new("tokenizer.json", format!("cannot decode: {e}")))
    }

    /// Ids that end an answer.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// A stream that turns generated ids into text as they come.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            prompter: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// Turns ids into text one at a time. Decoding a token alone loses what depends on its
/// neighbours (a leading space, a character split across byte tokens), so each step decodes a
/// short window of recent ids and emits only what the new id added, holding back text that
/// still ends in an incomplete character.
pub struct TextStream<'a> {
    prompter: &'a Prompter,
    ids: Vec<u32>,
    /// Start of the window already turned into text.
    prefix: usize,
    /// End of the ids whose text has been emitted.
    read: usize,
}

impl TextStream<'_> {
    /// The text `id` adds (empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let before = self.prompter.decode(&self.ids[self.prefix..self.read])?;
        let now = self.prompter.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{fffd}') && now.starts_with(&before) {
            let added = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(added)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the very end, replaced).
    pub fn finish(&mut self) -> Result<String, TextError> {
        let before = self.prompter.decode(&self.ids[self.prefix..self.read])?;
        let now = self.prompter.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE tokenizer with one token per byte and no merges.
    fn bytes_tokenizer() -> String {
        // GPT-2's printable stand-ins for the 256 byte values.
        let printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
        let mut extra = 0;
        let mut vocab = serde_json::Map::new();
        for b in 0u32..256 {
            let c = if printable.contains(&b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            let ch = char::from_u32(c).unwrap().to_string();
            vocab.insert(ch, Json::from(b));
        }
        vocab.insert("</s>".into(), Json::from(256));
        serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 256, "content": "</s>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        })
        .to_string()
    }

    #[test]
    fn streamed_text_equals_decoded_text_and_waits_for_whole_characters() {
        let cfg = serde_json::json!({"eos_token": "</s>"});
        let p = Prompter::new(&bytes_tokenizer(), Some(&cfg), None).unwrap();
        assert_eq!(p.stop_ids(), &[256]);
        let text = "a é, €!";
        let ids = p.encode(text, false).unwrap();
        assert_eq!(ids.len(), text.len(), "one id per byte");
        let mut s = p.stream();
        let mut out = String::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = s.push(id).unwrap();
            // The second byte of é (index 3) completes it; its first byte (index 2) emits nothing.
            if i == 2 {
                assert_eq!(piece, "");
            }
            out.push_str(&piece);
        }
        out.push_str(&s.finish().unwrap());
        assert_eq!(out, text);
    }

    #[test]
    fn a_broken_tokenizer_and_a_missing_template_name_the_field() {
        let e = Prompter::new("{", None, None).unwrap_err();
        assert_eq!(e.field, "tokenizer.json");
        let p = Prompter::new(&bytes_tokenizer(), None, None).unwrap();
        assert!(!p.has_chat_template());
        let e = p.chat(&[Message::user("hi")]).unwrap_err();
        assert_eq!(e.field, "chat_template");
    }
}
