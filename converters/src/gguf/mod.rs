//! GGUF, llama.cpp's file format: reading, streaming writing, llama.cpp's tensor names and
//! metadata per architecture, and tokenizer keys.

pub mod names;
pub mod reader;
pub mod value;
pub mod vocab;
pub mod writer;

/// `"GGUF"` (facts §1.1).
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// The version edgepack writes.
pub const GGUF_VERSION: u32 = 3;
/// Alignment when `general.alignment` is absent (facts §1.3).
pub const DEFAULT_ALIGNMENT: usize = 32;
/// `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// `GGML_MAX_NAME`, including the terminating NUL (facts §1.4).
pub const MAX_NAME_BYTES: usize = 64;
