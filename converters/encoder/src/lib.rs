//! The sentence encoder (a BERT model as sentence-transformers runs it: mean pooling and L2
//! normalisation, on candle) and the knowledge base built with it: documents cut into chunks
//! by the encoder's tokens, their embeddings in one versioned file, exact inner-product
//! search and the out-of-domain guard's calibration. The converters (answer similarity) and
//! the runtime (questions on the board) both embed through this crate.

pub mod bert;
pub mod chunk;
pub mod error;
pub mod ground;
pub mod kb;
mod ops;

pub use bert::{cosine, Embedder};
pub use error::{EncoderError, Result};
