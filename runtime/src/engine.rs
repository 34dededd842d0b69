//! The inference engine: one llama.cpp model and context owned by one worker thread.
//!
//! A llama.cpp context is not thread-safe, and a board has too few cores to serve two
//! generations at once without both getting slower, so requests queue on a channel and run
//! one at a time. Each request gets a channel of [`GenEvent`]s back; dropping that receiver
//! (a client that hung up) stops the generation at the next token.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::stop::StopFilter;

/// Tokens decoded per `llama_decode` call while reading a prompt; llama.cpp's own default
/// (`llama_context_default_params().n_batch`).
pub const PROMPT_BATCH: u32 = 2048;
/// llama.h `enum llama_flash_attn_type`: DISABLED = 0, ENABLED = 1 (AUTO = -1 is the default
/// of `llama_context_default_params`).
const FLASH_ATTN_DISABLED: i32 = 0;
const FLASH_ATTN_ENABLED: i32 = 1;

/// Why the engine could not load or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load model {path}: llama.cpp refused it ({reason})")]
    Load { path: PathBuf, reason: String },
    #[error("cannot create a llama.cpp context of {n_ctx} tokens: {reason}")]
    Context { n_ctx: u32, reason: String },
    #[error(
        "the model has no chat template (GGUF key tokenizer.chat_template); use /v1/completions"
    )]
    NoChatTemplate,
    #[error("cannot apply the chat template: {0}")]
    Template(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens and max_tokens asks for {max_tokens} more, but the context holds {n_ctx}")]
    TooLong {
        prompt: usize,
        max_tokens: u32,
        n_ctx: u32,
    },
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    #[error("the engine thread has stopped")]
    Stopped,
}

impl EngineError {
    /// Whether the request, not the engine, was at fault (HTTP 400 versus 500).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            EngineError::NoChatTemplate
                | EngineError::Template(_)
                | EngineError::EmptyPrompt
                | EngineError::TooLong { .. }
        )
    }
}

/// How to start the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// Threads for decoding and prompt processing (llama.cpp `n_threads`).
    pub threads: i32,
    /// Context size in tokens; capped at the model's training context.
    pub ctx_size: u32,
    /// Flash attention. Off unless asked; llama.cpp's own default (auto) turns it on for
    /// CPUs. `cargo xtask bench runtime` sets it the same way on both sides.
    pub flash_attn: bool,
}

/// What the loaded model reports about itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub n_ctx: u32,
    pub n_ctx_train: u32,
    pub n_params: u64,
    pub size_bytes: u64,
    pub n_vocab: i32,
    pub chat_template: bool,
    pub threads: i32,
}

/// One chat message as the API gives it.
#[derive(Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Raw text (`/v1/completions`): tokenized as is, special-token text stays text.
    Text(String),
    /// Chat messages, rendered with the model's own chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids (the benchmark builds prompts of exact lengths).
    Tokens(Vec<i32>),
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Prompt,
    pub max_tokens: u32,
    /// 0 selects greedy decoding, which is deterministic.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u32,
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks need fixed lengths).
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

/// Timings and counts of one finished generation.
#[derive(Debug, Clone, Copy)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
    /// From the engine taking the request to the first generated token.
    pub ttft: Duration,
    /// From the first generated token to the last.
    pub decode: Duration,
}

impl GenStats {
    /// Decode speed: tokens after the first one over the time they took.
    pub fn decode_tokens_per_second(&self) -> Option<f64> {
        let secs = self.decode.as_secs_f64();
        (self.completion_tokens > 1 && secs > 0.0)
            .then(|| (self.completion_tokens - 1) as f64 / secs)
    }
}

/// What a running generation reports, in order: `Text`* then `Done` or `Error`.
#[derive(Debug)]
pub enum GenEvent {
    Text(String),
    Done(GenStats),
    Error(EngineError),
}

struct Job {
    request: GenRequest,
    events: UnboundedSender<GenEvent>,
}

/// A handle to the engine thread; cheap to share.
#[derive(Debug)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    pub info: ModelInfo,
}

impl Engine {
    /// Loads the model on a new thread and returns once it is ready (or failed).
    pub fn load(config: EngineConfig) -> Result<Engine, EngineError> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<ModelInfo, EngineError>>();
        std::thread::Builder::new()
            .name("llama".into())
            .spawn(move || worker(config, jobs_rx, ready_tx))
            .map_err(|e| EngineError::Decode(format!("cannot start the engine thread: {e}")))?;
        let info = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Engine {
            jobs: jobs_tx,
            info,
        })
    }

    /// Queues a request; events arrive on the returned channel.
    pub fn submit(&self, request: GenRequest) -> UnboundedReceiver<GenEvent> {
        let (tx, rx) = unbounded_channel();
        if let Err(mpsc::SendError(job)) = self.jobs.send(Job {
            request,
            events: tx,
        }) {
            let _ = job.events.send(GenEvent::Error(EngineError::Stopped));
        }
        rx
    }

    /// Runs a request to the end from synchronous code: the text and the stats.
    pub fn generate_blocking(
        &self,
        request: GenRequest,
    ) -> Result<(String, GenStats), EngineError> {
        let mut rx = self.submit(request);
        let mut text = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Done(stats) => return Ok((text, stats)),
                GenEvent::Error(e) => return Err(e),
            }
        }
        Err(EngineError::Stopped)
    }
}

fn worker(
    config: EngineConfig,
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Result<ModelInfo, EngineError>>,
) {
    let loaded = (|| {
        let backend = LlamaBackend::init().map_err(|e| EngineError::Load {
            path: config.model_path.clone(),
            reason: e.to_string(),
        })?;
        let model = load_model(&backend, &config.model_path)?;
        Ok::<_, EngineError>((backend, model))
    })();
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
        .with_n_batch(PROMPT_BATCH.min(n_ctx))
        .with_n_threads(config.threads)
        .with_n_threads_batch(config.threads)
        .with_flash_attention_policy(if config.flash_attn {
            FLASH_ATTN_ENABLED
        } else {
            FLASH_ATTN_DISABLED
        });
    let mut ctx = match model.new_context(&backend, params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Context {
                n_ctx,
                reason: e.to_string(),
            }));
            return;
        }
    };
    let template = model.chat_template(None).ok();
    let info = ModelInfo {
        n_ctx: ctx.n_ctx(),
        n_ctx_train: model.n_ctx_train(),
        n_params: model.n_params(),
        size_bytes: model.size(),
        n_vocab: model.n_vocab(),
        chat_template: template.is_some(),
        threads: config.threads,
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        let result = run(&model, &mut ctx, template.as_ref(), &job, started);
        let _ = job.events.send(match result {
            Ok(stats) => GenEvent::Done(stats),
            Err(e) => GenEvent::Error(e),
        });
    }
}

fn load_model(backend: &LlamaBackend, path: &Path) -> Result<LlamaModel, EngineError> {
    LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()).map_err(|e| {
        EngineError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })
}

fn tokenize(
    model: &LlamaModel,
    template: Option<&LlamaChatTemplate>,
    prompt: &Prompt,
) -> Result<Vec<LlamaToken>, EngineError> {
    let vocab = model.vocab();
    let tokens = match prompt {
        Prompt::Text(text) => vocab.tokenize(text.as_bytes(), true, false),
        Prompt::Chat(messages) => {
            let template = template.ok_or(EngineError::NoChatTemplate)?;
            let chat = messages
                .iter()
                .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| EngineError::Template(e.to_string()))?;
            let rendered = model
                .apply_chat_template(template, &chat, true)
                .map_err(|e| EngineError::Template(e.to_string()))?;
            // The rendered template spells its role markers as special-token text.
            vocab.tokenize(rendered.as_bytes(), true, true)
        }
        Prompt::Tokens(ids) => ids.iter().map(|&t| LlamaToken(t)).collect(),
    };
    if tokens.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    Ok(tokens)
}

fn sampler(req: &GenRequest) -> LlamaSampler {
    if req.temperature <= 0.0 {
        LlamaSampler::greedy()
    } else {
        LlamaSampler::chain_simple([
            LlamaSampler::top_p(req.top_p.clamp(f32::MIN_POSITIVE, 1.0), 1),
            LlamaSampler::temp(req.temperature),
            LlamaSampler::dist(req.seed),
        ])
    }
}

fn decode_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Decode(e.to_string())
}

fn run(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    template: Option<&LlamaChatTemplate>,
    job: &Job,
    started: Instant,
) -> Result<GenStats, EngineError> {
    let req = &job.request;
    let prompt = tokenize(model, template, &req.prompt)?;
    let n_ctx = ctx.n_ctx();
    if prompt.len() + req.max_tokens as usize > n_ctx as usize {
        return Err(EngineError::TooLong {
            prompt: prompt.len(),
            max_tokens: req.max_tokens,
            n_ctx,
        });
    }
    ctx.clear_kv_cache();

    let n_batch = ctx.n_batch() as usize;
    let mut batch = LlamaBatch::new(n_batch.max(1), 1);
    let mut pos: i32 = 0;
    for chunk in prompt.chunks(n_batch) {
        batch.clear();
        for (i, &tok) in chunk.iter().enumerate() {
            let last = pos as usize + i + 1 == prompt.len();
            batch
                .add(tok, pos + i as i32, &[0], last)
                .map_err(decode_err)?;
        }
        ctx.decode(&mut batch).map_err(decode_err)?;
        pos += chunk.len() as i32;
    }

    let vocab = model.vocab();
    let mut sampler = sampler(req);
    let mut filter = StopFilter::new(req.stop.clone());
    let mut utf8 = Vec::<u8>::new();
    let mut generated = 0usize;
    let mut first_token_at: Option<Instant> = None;
    let mut finish = FinishReason::Length;

    while generated < req.max_tokens as usize {
        // `sample` also accepts the token into the sampler chain.
        let token = sampler.sample(ctx, batch.n_tokens() - 1);
        generated += 1;
        first_token_at.get_or_insert_with(Instant::now);
        if !req.ignore_eos && vocab.is_eog(token) {
            finish = FinishReason::Stop;
            break;
        }
        utf8.extend(vocab.token_to_piece(token, false, None));
        let text = take_utf8(&mut utf8);
        let (emit, stopped) = filter.push(&text);
        if !emit.is_empty() && job.events.send(GenEvent::Text(emit)).is_err() {
            // The client went away: nobody reads the rest.
            return Err(EngineError::Stopped);
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        if generated == req.max_tokens as usize {
            break;
        }
        batch.clear();
        batch.add(token, pos, &[0], true).map_err(decode_err)?;
        pos += 1;
        ctx.decode(&mut batch).map_err(decode_err)?;
    }
    let rest = filter.finish();
    if !rest.is_empty() {
        let _ = job.events.send(GenEvent::Text(rest));
    }
    let now = Instant::now();
    let first = first_token_at.unwrap_or(now);
    Ok(GenStats {
        prompt_tokens: prompt.len(),
        completion_tokens: generated,
        finish_reason: finish,
        ttft: first - started,
        decode: now - first,
    })
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
