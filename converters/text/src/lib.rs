//! The text side of a language model that both the workstation (calibration, evaluation,
//! training) and the board (the runtime's ONNX and LiteRT engines) need: a model's chat
//! template rendered as transformers' `apply_chat_template` renders it, and a tokenizer that
//! turns a conversation into ids and streams ids back into text.
//!
//! It depends on no other edgepack crate, so the runtime can link it without `converters`.

pub mod chat;
pub mod error;
pub mod pieces;
pub mod prompter;

pub use chat::Message;
pub use error::TextError;
pub use prompter::{Prompter, TextStream};
