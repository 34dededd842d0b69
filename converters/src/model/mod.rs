//! The one internal layout every importer produces and every exporter consumes: Hugging Face
//! parameter names, PyTorch shapes, lazy tensors, and the tokenizer files.

pub mod names;
pub mod spec;
pub mod tensor;
pub mod tokenizer;

use std::path::PathBuf;

pub use spec::{Arch, ModelConfig};
pub use tensor::{Delta, Source, Tensor};
pub use tokenizer::TokenizerFiles;

use crate::quant::GgmlType;

/// What kind of file a model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceFormat {
    /// A Hugging Face folder (config.json + safetensors).
    HfFolder,
    /// A GGUF file; `file_type` is its `general.file_type`, if set.
    Gguf { file_type: Option<u32> },
}

/// A model in edgepack's internal layout.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    /// Parameters under their Hugging Face names, in a stable order.
    pub tensors: Vec<Tensor>,
    pub tokenizer: TokenizerFiles,
    /// The file or folder it was imported from.
    pub source: PathBuf,
    pub source_format: SourceFormat,
    /// A human name (`general.name`, or the folder name).
    pub name: String,
}

impl Model {
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.iter_mut().find(|t| t.name == name)
    }

    /// Number of parameters (a tied embedding counted once).
    pub fn n_params(&self) -> usize {
        self.tensors.iter().map(Tensor::numel).sum()
    }

    /// Bytes of the parameters at their source types.
    pub fn source_bytes(&self) -> usize {
        self.tensors.iter().map(Tensor::source_bytes).sum()
    }

    /// The storage types present, with the number of tensors of each.
    pub fn dtypes(&self) -> Vec<(GgmlType, usize)> {
        let mut v: Vec<(GgmlType, usize)> = Vec::new();
        for t in &self.tensors {
            match v.iter_mut().find(|(d, _)| *d == t.dtype()) {
                Some(e) => e.1 += 1,
                None => v.push((t.dtype(), 1)),
            }
        }
        v.sort();
        v
    }

    /// The dtype to store merged/exported float weights in: the checkpoint's float type.
    pub fn float_dtype(&self) -> GgmlType {
        let mut best = (GgmlType::F32, 0usize);
        for (d, n) in self.dtypes() {
            if matches!(d, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) && n > best.1 {
                best = (d, n);
            }
        }
        if best.1 == 0 {
            // Quantized sources (a GGUF): dequantized values are f32 products that f16 would
            // round, so only F32 keeps them exact.
            GgmlType::F32
        } else {
            best.0
        }
    }
}
