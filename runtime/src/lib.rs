//! What runs on the board: verify a bundle, load the model, serve HTTP, bench.
//!
//! It stays small and never depends on `edgepack-converters`: the bundle is checked with
//! `edgepack-targets`, the model runs in llama.cpp (`llama-cpp-2`, linked in) or ONNX Runtime
//! (`ort`, loaded at run time), and the HTTP API is axum.

pub mod auth;
pub mod bench;
pub mod bundle;
pub mod engine;
pub mod library;
pub mod listen;
pub mod metrics;
pub mod rag;
pub mod receive;
pub mod server;
pub mod stop;
