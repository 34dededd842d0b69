//! Exporters: each maps the internal layout into one file format.

pub mod gguf;
pub mod gguf_lora;
pub mod graph;
pub mod hf;
pub mod onnx;
pub mod tflite;
