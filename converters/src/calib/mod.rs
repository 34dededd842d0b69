//! Calibration and evaluation: the reference forward pass ([`forward`]), the one place that
//! holds a whole model in memory, in f32, to produce logits and to show calibration observers
//! the activations every linear layer sees; and importance matrices ([`imatrix`]) collected
//! from those activations for llama.cpp's weighted quantizers.

pub mod data;
pub mod embed;
pub mod eval;
pub mod forward;
pub mod imatrix;
pub mod stats;
pub mod w8a8;
