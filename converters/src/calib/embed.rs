//! The sentence encoder for the answer-similarity metric. It lives in `edgepack-encoder`,
//! which the runtime shares (it embeds questions on the board for retrieval); this module
//! names it where the host engine's evaluation looks for it.

pub use edgepack_encoder::{cosine, Embedder};
