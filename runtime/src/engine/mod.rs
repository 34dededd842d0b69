//! The inference engines behind one interface: llama.cpp for GGUF (linked in) and ONNX
//! Runtime for ONNX (loaded at run time). Each splits into a [`Vocab`] (prompts to ids, ids to
//! text) and a [`Forward`] (a model with a KV cache); `generate` runs the one generation loop
//! (sampling, stop strings, streaming, statistics) over either, so the server, metrics and
//! bench never name an engine.
//!
//! An engine is not thread-safe, so requests queue on a channel to one engine thread.
//! llama.cpp's runs several at once, each in its own cache sequence, in one batched decode
//! a step (a board's cores are no faster for two threads' generations, but a batch reads the
//! weights once for all); ONNX Runtime's and LiteRT's run one at a time.
//! [`Engine::try_submit`] bounds how many may wait. Each request gets a
//! channel of [`GenEvent`]s back; dropping that receiver (a client that hung up) stops the
//! generation at the next token, or skips it if it has not started, and is counted.

mod generate;
mod handle;
mod hf;
mod litert;
mod llama;
mod load;
mod onnx;
mod sample;
mod types;

pub use generate::PROMPT_BATCH;
pub use handle::{Engine, QueueFull};
pub use load::LoadCounts;
pub use types::{
    ChatMessage, DelegatePlan, Detokenizer, EngineConfig, EngineError, FinishReason, Format,
    Forward, GenEvent, GenRequest, GenStats, ModelInfo, Prompt, Vocab,
};
