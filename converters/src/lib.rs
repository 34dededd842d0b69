//! edgepack's model library: import (HF folders, GGUF), the internal layout with lazy tensors,
//! transforms (LoRA merge), quantization, and export (GGUF, GGUF LoRA, HF folders).
//!
//! Nothing here knows about boards or SSH; see `docs/architecture.md`.

pub mod calib;
pub mod error;
pub mod export;
pub mod gguf;
pub mod import;
pub mod io;
pub mod model;
pub mod progress;
pub mod quant;
pub mod train;
pub mod transform;

pub use error::{Error, Result};
