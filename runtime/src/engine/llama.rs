//! The llama.cpp engine for GGUF bundles: one model and context on the engine thread.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::mpsc;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use super::generate::{self, Job, PROMPT_BATCH};
use super::load::Load;
use super::types::{Detokenizer, EngineConfig, EngineError, Forward, ModelInfo, Prompt, Vocab};
use edgepack_text::pieces::{render_pieces, Piece};

const ENGINE: &str = "llama.cpp";
/// llama.h `enum llama_flash_attn_type`: DISABLED = 0, ENABLED = 1 (AUTO = -1 is the default
/// of `llama_context_default_params`).
const FLASH_ATTN_DISABLED: i32 = 0;
const FLASH_ATTN_ENABLED: i32 = 1;

fn load_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Load {
        engine: ENGINE,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn decode_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Decode {
        engine: ENGINE,
        reason: e.to_string(),
    }
}

/// Loads the GGUF and serves jobs until the handle is dropped.
pub fn run(
    config: EngineConfig,
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Result<ModelInfo, EngineError>>,
    tally: &Load,
) {
    let path = &config.model_path;
    let loaded = LlamaBackend::init()
        .map_err(|e| load_err(path, e))
        .and_then(|backend| {
            let model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default())
                .map_err(|e| load_err(path, e))?;
            Ok((backend, model))
        });
    let (backend, model) = match loaded {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let n_ctx = config.ctx_size.min(model.n_ctx_train()).max(1);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch((PROMPT_BATCH as u32).min(n_ctx))
        .with_n_threads(config.threads)
        .with_n_threads_batch(config.threads)
        .with_flash_attention_policy(if config.flash_attn {
            FLASH_ATTN_ENABLED
        } else {
            FLASH_ATTN_DISABLED
        });
    let ctx = match model.new_context(&backend, params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Context {
                n_ctx,
                reason: e.to_string(),
            }));
            return;
        }
    };
    let vocab = LlamaVocab {
        model: &model,
        template: model.chat_template(None).ok(),
    };
    let info = ModelInfo {
        engine: ENGINE,
        engine_version: ggml_version(),
        library: None,
        n_ctx: ctx.n_ctx(),
        n_ctx_train: model.n_ctx_train(),
        n_params: Some(model.n_params()),
        size_bytes: model.size(),
        n_vocab: model.n_vocab(),
        chat_template: vocab.template.is_some(),
        threads: config.threads,
        delegate: None,
        delegate_fallback: None,
    };
    let mut fwd = LlamaForward {
        batch: LlamaBatch::new(ctx.n_batch() as usize, 1),
        ctx,
        pos: 0,
    };
    generate::serve(&vocab, &mut fwd, info, jobs, ready, tally);
}

/// ggml's version and commit, as the linked library reports them.
fn ggml_version() -> String {
    let text = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            String::from("unknown")
        } else {
            // SAFETY: ggml returns pointers to static NUL-terminated strings.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    // SAFETY: both functions only return static strings.
    let (version, commit) = unsafe {
        (
            llama_cpp_sys_2::ggml_version(),
            llama_cpp_sys_2::ggml_commit(),
        )
    };
    format!("ggml {} ({})", text(version), text(commit))
}

struct LlamaVocab<'m> {
    model: &'m LlamaModel,
    template: Option<LlamaChatTemplate>,
}

impl Vocab for LlamaVocab<'_> {
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<i32>, EngineError> {
        let vocab = self.model.vocab();
        let tokens = match prompt {
            Prompt::Text(text) => vocab.tokenize(text.as_bytes(), true, false),
            Prompt::Chat(messages) => {
                let template = self.template.as_ref().ok_or(EngineError::NoChatTemplate(
                    "GGUF key tokenizer.chat_template",
                ))?;
                let msgs: Vec<edgepack_text::Message> = messages
                    .iter()
                    .map(|m| edgepack_text::Message {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                let pieces = render_pieces(&msgs, |ms| {
                    let chat = ms
                        .iter()
                        .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| EngineError::Template(e.to_string()))?;
                    self.model
                        .apply_chat_template(template, &chat, true)
                        .map_err(|e| EngineError::Template(e.to_string()))
                })?;
                // The template's text spells its role markers as special-token text; the
                // messages' contents are plain text, whatever they spell. BOS (when the
                // model wants one) only before the first piece.
                let mut out = Vec::new();
                for (i, piece) in pieces.iter().enumerate() {
                    let (text, special) = match piece {
                        Piece::Template(t) => (t, true),
                        Piece::Content(t) => (t, false),
                    };
                    out.extend(vocab.tokenize(text.as_bytes(), i == 0, special));
                }
                out
            }
            Prompt::Tokens(ids) => return Ok(ids.clone()),
        };
        Ok(tokens.into_iter().map(|t| t.0).collect())
    }

    fn is_eog(&self, token: i32) -> bool {
        self.model.vocab().is_eog(LlamaToken(token))
    }

    fn detokenizer(&self) -> Box<dyn Detokenizer + '_> {
        Box::new(LlamaDetok {
            model: self.model,
            utf8: Vec::new(),
        })
    }

    fn n_vocab(&self) -> usize {
        usize::try_from(self.model.n_vocab()).unwrap_or(0)
    }
}

struct LlamaDetok<'m> {
    model: &'m LlamaModel,
    utf8: Vec<u8>,
}

impl Detokenizer for LlamaDetok<'_> {
    fn push(&mut self, token: i32) -> Result<String, EngineError> {
        self.utf8.extend(
            self.model
                .vocab()
                .token_to_piece(LlamaToken(token), false, None),
        );
        Ok(take_utf8(&mut self.utf8))
    }

    fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.utf8).into_owned();
        self.utf8.clear();
        s
    }
}

struct LlamaForward<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    pos: i32,
}

impl Forward for LlamaForward<'_> {
    fn n_ctx(&self) -> u32 {
        self.ctx.n_ctx()
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        self.ctx.clear_kv_cache();
        self.pos = 0;
        Ok(())
    }

    fn forward(&mut self, tokens: &[i32]) -> Result<&[f32], EngineError> {
        // The context's batch can be smaller than the prompt batch (a context under 512
        // tokens): calls of at most its size, logits of the last token only.
        let cap = (self.ctx.n_batch() as usize).max(1);
        for chunk in tokens.chunks(cap) {
            self.batch.clear();
            for (i, &tok) in chunk.iter().enumerate() {
                let last = i + 1 == chunk.len();
                self.batch
                    .add(LlamaToken(tok), self.pos + i as i32, &[0], last)
                    .map_err(decode_err)?;
            }
            self.ctx.decode(&mut self.batch).map_err(decode_err)?;
            self.pos += chunk.len() as i32;
        }
        Ok(self.ctx.get_logits_ith(self.batch.n_tokens() - 1))
    }
}

/// Splits off the longest valid UTF-8 prefix; a character cut between two tokens waits for
/// the next token. Bytes that can never become valid are replaced, not dropped.
fn take_utf8(buf: &mut Vec<u8>) -> String {
    match std::str::from_utf8(buf) {
        Ok(s) => {
            let s = s.to_owned();
            buf.clear();
            s
        }
        Err(e) => {
            let valid = e.valid_up_to();
            let keep_tail = e.error_len().is_none();
            let end = if keep_tail { valid } else { buf.len() };
            let out = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::take_utf8;

    #[test]
    fn a_character_split_across_tokens_waits_for_its_tail() {
        let euro = "€".as_bytes();
        let mut buf = vec![b'a', euro[0], euro[1]];
        assert_eq!(take_utf8(&mut buf), "a");
        buf.push(euro[2]);
        assert_eq!(take_utf8(&mut buf), "€");
        assert!(buf.is_empty());
    }

    #[test]
    fn invalid_bytes_are_replaced_not_held_forever() {
        let mut buf = vec![0xff, b'b'];
        assert_eq!(take_utf8(&mut buf), "\u{fffd}b");
        assert!(buf.is_empty());
    }
}
