//! Transforms: each one changes a model in the internal layout and does one thing.

pub mod lora;
pub mod smooth;
pub mod sparsify;
