//! The text half of engines that load Hugging Face tokenizer files (ONNX Runtime, LiteRT):
//! prompts to ids through `edgepack-text` (the same code the host's calibration and evaluation
//! use), ids back to streamed text.

use std::path::{Path, PathBuf};

use super::types::{ChatMessage, Detokenizer, EngineError, Prompt, Vocab};

/// A Hugging Face tokenizer (`tokenizer.json` and its configs) with the model's chat template.
pub struct HfVocab {
    pub prompter: edgepack_text::Prompter,
    /// Ids that end a generation.
    pub stop: Vec<u32>,
    pub n_vocab: usize,
    /// Where the tokenizer files came from, for error messages.
    pub source: PathBuf,
    /// The engine named in decode errors.
    pub engine: &'static str,
}

fn text_err(engine: &'static str, source: &Path, e: edgepack_text::TextError) -> EngineError {
    match e.field {
        "chat_template" if e.message.starts_with("missing") => {
            EngineError::NoChatTemplate("tokenizer_config.json chat_template")
        }
        "chat_template" => EngineError::Template(e.message),
        _ => EngineError::Decode {
            engine,
            reason: format!("{}: {e}", source.join(e.field).display()),
        },
    }
}

impl Vocab for HfVocab {
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<i32>, EngineError> {
        let ids = match prompt {
            Prompt::Text(t) => self.prompter.encode(t, true),
            Prompt::Chat(messages) => {
                let msgs: Vec<edgepack_text::Message> = messages
                    .iter()
                    .map(|ChatMessage { role, content }| edgepack_text::Message {
                        role: role.clone(),
                        content: content.clone(),
                    })
                    .collect();
                self.prompter.chat(&msgs)
            }
            Prompt::Tokens(ids) => return Ok(ids.clone()),
        }
        .map_err(|e| text_err(self.engine, &self.source, e))?;
        Ok(ids.into_iter().map(|t| t as i32).collect())
    }

    fn is_eog(&self, token: i32) -> bool {
        u32::try_from(token).is_ok_and(|t| self.stop.contains(&t))
    }

    fn detokenizer(&self) -> Box<dyn Detokenizer + '_> {
        Box::new(HfDetok {
            stream: self.prompter.stream(),
            source: &self.source,
            engine: self.engine,
        })
    }

    fn n_vocab(&self) -> usize {
        self.n_vocab
    }
}

struct HfDetok<'a> {
    stream: edgepack_text::TextStream<'a>,
    source: &'a Path,
    engine: &'static str,
}

impl Detokenizer for HfDetok<'_> {
    fn push(&mut self, token: i32) -> Result<String, EngineError> {
        let id = u32::try_from(token).map_err(|_| EngineError::BadToken {
            id: token,
            n_vocab: 0,
        })?;
        self.stream
            .push(id)
            .map_err(|e| text_err(self.engine, self.source, e))
    }

    fn finish(&mut self) -> String {
        self.stream.finish().unwrap_or_default()
    }
}
