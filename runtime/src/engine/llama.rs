//! The llama.cpp engine for GGUF bundles: one model and context on the engine thread,
//! serving several requests at once as llama-server's parallel slots do. Each request has a
//! sequence of its own in the context's cache; every step runs one batch holding the next
//! token of each generating sequence and as much of the waiting prompts as fits, so the
//! weights are read once per step for all of them.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::mpsc::{self, TryRecvError};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use super::generate::{accept, conclude, Job, Stream, PROMPT_BATCH};
use super::load::Load;
use super::types::{Detokenizer, EngineConfig, EngineError, ModelInfo, Prompt, Vocab};
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
    // Up to SHARED_CACHE_MAX_SLOTS sequences share one cache of slots x n_ctx cells
    // (llama.cpp's unified KV): a step's next tokens and prompt tokens of different sequences
    // run as one pass over the weights, where separate caches split the batch by sequence.
    // Each request is held to n_ctx tokens, so together they never fill it. Beyond that, a
    // cache each: in a shared one every token's attention spans all sequences' cells.
    let n_ctx = config.ctx_size.min(model.n_ctx_train()).max(1);
    let slots = config.parallel.clamp(1, MAX_SLOTS);
    let total = n_ctx.saturating_mul(slots);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(total))
        .with_n_seq_max(slots)
        .with_kv_unified(slots <= SHARED_CACHE_MAX_SLOTS)
        .with_n_batch((PROMPT_BATCH as u32).min(total).max(slots))
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
                n_ctx: total,
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
        n_ctx: ctx.n_ctx() / slots,
        n_ctx_train: model.n_ctx_train(),
        slots,
        n_params: Some(model.n_params()),
        size_bytes: model.size(),
        n_vocab: model.n_vocab(),
        chat_template: vocab.template.is_some(),
        threads: config.threads,
        delegate: None,
        delegate_fallback: None,
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    serve_slots(&vocab, ctx, slots as usize, jobs, tally);
}

/// Sequences one context serves at most (llama.cpp's own limit is 256).
const MAX_SLOTS: u32 = 64;

/// Sequences that share one KV cache; more get one each. `cargo xtask bench load` on two
/// cores (SmolLM2, 512 tokens a sequence), shared against separate in back-to-back runs:
/// 177 against 164 tok/s at 16 clients, 148 against 198 at 32; at 4 and 8 clients separate
/// caches were 0.6-0.7x of shared ones.
const SHARED_CACHE_MAX_SLOTS: u32 = 16;

/// A request the engine generates for, in its own sequence of the cache.
struct Slot<'v> {
    job: Job,
    started: Instant,
    seq: i32,
    stream: Stream<'v>,
    prompt: Vec<i32>,
    /// Tokens of this sequence in the cache: where the next one goes.
    pos: i32,
    /// The token to run next once the prompt is in: the last one sampled.
    next: Option<i32>,
    /// The row of this sequence's logits in the batch just run.
    logits_at: Option<i32>,
}

impl Slot<'_> {
    /// Prompt tokens not yet in the cache (while the prompt is read).
    fn prompt_left(&self) -> usize {
        self.prompt.len().saturating_sub(self.pos as usize)
    }

    /// Ends the job, with the generation's own end or with `failed`, and frees its sequence
    /// (the cache's part for it emptied for the next request).
    fn close(
        self,
        ctx: &mut LlamaContext,
        free: &mut Vec<i32>,
        failed: Option<EngineError>,
        tally: &Load,
    ) {
        let Slot {
            job,
            started,
            seq,
            stream,
            ..
        } = self;
        let result = match failed {
            None => Ok(stream.end(&job.events)),
            Some(e) => Err(e),
        };
        let _ = ctx.clear_kv_cache_seq(u32::try_from(seq).ok(), None, None);
        free.push(seq);
        conclude(job, result, started, tally);
    }
}

/// Runs jobs until every handle is dropped: takes waiting jobs into free sequences, then
/// runs one batch a step for every sequence that has work (the next token of each
/// generating one first, then prompt tokens in the room left), and hands each its logits.
fn serve_slots(
    vocab: &LlamaVocab,
    mut ctx: LlamaContext,
    n_slots: usize,
    jobs: mpsc::Receiver<Job>,
    tally: &Load,
) {
    let n_ctx_seq = (ctx.n_ctx() as usize / n_slots).max(1);
    let room = (ctx.n_batch() as usize).max(n_slots);
    let mut batch = LlamaBatch::new(room, 1);
    let mut slots: Vec<Slot> = Vec::with_capacity(n_slots);
    let mut free: Vec<i32> = (0..n_slots as i32).rev().collect();
    let mut open = true;
    loop {
        // Take jobs while a sequence is free; wait for one only when there is nothing to run.
        while open && !free.is_empty() {
            let job = if slots.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            let Some((job, started)) = accept(job, tally) else {
                continue;
            };
            match Stream::begin(vocab, &job.request, n_ctx_seq, started) {
                Err(e) => conclude(job, Err(e), started, tally),
                Ok((prompt, stream)) => {
                    let seq = free.pop().expect("a free sequence");
                    slots.push(Slot {
                        job,
                        started,
                        seq,
                        stream,
                        prompt,
                        pos: 0,
                        next: None,
                        logits_at: None,
                    });
                }
            }
        }
        if slots.is_empty() {
            if open {
                continue;
            }
            return;
        }

        // A client that went away while its prompt waits is dropped before it costs a step.
        let mut i = 0;
        while i < slots.len() {
            if slots[i].next.is_none() && slots[i].job.events.is_closed() {
                let gone = EngineError::Cancelled { generated: 0 };
                slots
                    .swap_remove(i)
                    .close(&mut ctx, &mut free, Some(gone), tally);
            } else {
                i += 1;
            }
        }
        if slots.is_empty() {
            continue;
        }

        batch.clear();
        let built = fill_batch(&mut batch, &mut slots, room);
        let ran = built.and_then(|()| ctx.decode(&mut batch).map_err(decode_err));
        if let Err(e) = ran {
            // A failed step leaves every sequence in it unknown: end them all.
            let reason = match e {
                EngineError::Decode { reason, .. } => reason,
                other => other.to_string(),
            };
            for slot in std::mem::take(&mut slots) {
                let failed = decode_err(&reason);
                slot.close(&mut ctx, &mut free, Some(failed), tally);
            }
            continue;
        }

        let mut i = 0;
        while i < slots.len() {
            let slot = &mut slots[i];
            let outcome = match slot.logits_at.take() {
                // A prompt still being read, or one after which nothing may be generated.
                None => Ok(slot.next.is_some() || slot.prompt_left() > 0),
                Some(row) => {
                    let logits = ctx.get_logits_ith(row);
                    slot.stream.step(logits, &slot.job.events).map(|next| {
                        slot.next = next;
                        next.is_some()
                    })
                }
            };
            match outcome {
                Ok(true) => i += 1,
                Ok(false) => slots.swap_remove(i).close(&mut ctx, &mut free, None, tally),
                Err(e) => slots
                    .swap_remove(i)
                    .close(&mut ctx, &mut free, Some(e), tally),
            }
        }
    }
}

/// Puts one step's work into `batch`: the next token of every generating sequence, then the
/// prompts in order in the room left. Marks where each sequence's logits will be.
fn fill_batch(batch: &mut LlamaBatch, slots: &mut [Slot], room: usize) -> Result<(), EngineError> {
    let mut used = 0;
    for slot in slots.iter_mut() {
        if let Some(tok) = slot.next {
            batch
                .add(LlamaToken(tok), slot.pos, &[slot.seq], true)
                .map_err(decode_err)?;
            slot.logits_at = Some(used as i32);
            slot.pos += 1;
            used += 1;
        }
    }
    for slot in slots.iter_mut() {
        if slot.next.is_some() || used >= room {
            continue;
        }
        let take = slot.prompt_left().min(room - used);
        let from = slot.pos as usize;
        for (k, &tok) in slot.prompt[from..from + take].iter().enumerate() {
            let last_of_prompt = from + k + 1 == slot.prompt.len();
            let wanted = last_of_prompt && slot.stream.wants_tokens();
            batch
                .add(LlamaToken(tok), slot.pos, &[slot.seq], wanted)
                .map_err(decode_err)?;
            if wanted {
                slot.logits_at = Some(used as i32);
            }
            slot.pos += 1;
            used += 1;
        }
    }
    Ok(())
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
