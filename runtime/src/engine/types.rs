//! What every engine shares: the requests, events, statistics and errors the server and the
//! benchmark see, and the two halves an engine implements ([`Vocab`] and [`Forward`]).

use std::path::PathBuf;
use std::time::Duration;

pub use crate::bundle::{DelegatePlan, Format};

/// Why the engine could not load or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load model {path}: {engine} refused it ({reason})")]
    Load {
        engine: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot create a llama.cpp context of {n_ctx} tokens: {reason}")]
    Context { n_ctx: u32, reason: String },
    #[error("{0}")]
    Library(String),
    #[error("the model has no chat template ({0}); use /v1/completions")]
    NoChatTemplate(&'static str),
    #[error("cannot apply the chat template: {0}")]
    Template(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: i32, n_vocab: usize },
    #[error("the prompt has {prompt} tokens and the context holds {n_ctx}, which leaves no room for an answer; shorten it, or send \"truncate\": true to drop its oldest part")]
    TooLong { prompt: usize, n_ctx: u32 },
    #[error("{engine} decode failed: {reason}")]
    Decode {
        engine: &'static str,
        reason: String,
    },
    #[error("the engine thread has stopped")]
    Stopped,
    /// The client went away (its receiver was dropped) after `generated` tokens.
    #[error("the client went away after {generated} generated tokens")]
    Cancelled { generated: usize },
}

impl EngineError {
    /// Whether the request, not the engine, was at fault (HTTP 400 versus 500).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            EngineError::NoChatTemplate(_)
                | EngineError::Template(_)
                | EngineError::EmptyPrompt
                | EngineError::BadToken { .. }
                | EngineError::TooLong { .. }
        )
    }
}

/// How to start the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub format: Format,
    /// The GGUF file, or the ONNX model file inside its folder.
    pub model_path: PathBuf,
    /// The engine's shared library, for engines loaded at run time (ONNX Runtime).
    pub library: Option<PathBuf>,
    /// Threads for decoding and prompt processing.
    pub threads: i32,
    /// Context size in tokens; capped at the model's training context.
    pub ctx_size: u32,
    /// Flash attention (llama.cpp only). Off unless asked; llama.cpp's own default (auto)
    /// turns it on for CPUs. `cargo xtask bench runtime` sets it the same way on both sides.
    pub flash_attn: bool,
    /// The accelerator delegate the bundle asks for (LiteRT only).
    pub delegate: Option<DelegatePlan>,
    /// Requests generated together, each in its own sequence of `ctx_size` tokens (llama.cpp
    /// only: one batched decode a step for all of them; the other engines run one).
    pub parallel: u32,
}

/// What the loaded model and engine report about themselves.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// `llama.cpp` or `onnxruntime`.
    pub engine: &'static str,
    /// The engine library's own version string.
    pub engine_version: String,
    /// The shared library the engine was loaded from (engines loaded at run time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<PathBuf>,
    /// Context of one request, in tokens.
    pub n_ctx: u32,
    pub n_ctx_train: u32,
    /// Requests the engine generates for at once.
    pub slots: u32,
    /// Parameters, where the format records them (GGUF).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_params: Option<u64>,
    /// Bytes of weights loaded.
    pub size_bytes: u64,
    pub n_vocab: i32,
    pub chat_template: bool,
    pub threads: i32,
    /// The accelerator delegate running the model, if any (otherwise the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegate: Option<String>,
    /// Why the delegate the bundle asks for is not running, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegate_fallback: Option<String>,
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
    /// Drop the prompt's oldest part (whole chat turns first, after any system message) when
    /// it leaves fewer than `max_tokens` free in the context (at most half the context is
    /// kept free); otherwise a prompt that fills the context is refused.
    pub truncate: bool,
    /// Keep generating past end-of-generation tokens (benchmarks need fixed lengths).
    pub ignore_eos: bool,
    /// Send text as it is generated; otherwise once, before `Done` (no wake-up of the
    /// receiver per token; a receiver that went away still stops the generation).
    pub stream: bool,
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

/// The text side of an engine: prompts to ids, ids to text.
pub trait Vocab {
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<i32>, EngineError>;
    /// Whether `token` ends a generation.
    fn is_eog(&self, token: i32) -> bool;
    /// A fresh detokenizer for one generation.
    fn detokenizer(&self) -> Box<dyn Detokenizer + '_>;
    fn n_vocab(&self) -> usize;
}

/// Turns generated ids into text as they come.
pub trait Detokenizer {
    /// The text `token` adds; empty while a character is incomplete.
    fn push(&mut self, token: i32) -> Result<String, EngineError>;
    /// Whatever was held back.
    fn finish(&mut self) -> String;
}

/// The compute side of an engine: a model with a KV cache.
pub trait Forward {
    /// Tokens the cache holds at most.
    fn n_ctx(&self) -> u32;
    /// Empties the cache.
    fn reset(&mut self) -> Result<(), EngineError>;
    /// Appends `tokens` to the cache and returns the logits after the last one.
    fn forward(&mut self, tokens: &[i32]) -> Result<&[f32], EngineError>;
}
