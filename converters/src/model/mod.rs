//! The one internal layout every importer produces and every exporter consumes: Hugging Face
//! parameter names, PyTorch shapes, lazy tensors, and the tokenizer files.

pub mod chat;
pub mod mask;
pub mod names;
pub mod spec;
pub mod stats;
pub mod tensor;
pub mod tokenizer;

use std::path::PathBuf;

pub use mask::Mask;
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
    /// Model-card facts carried through conversions (GGUF `general.*` keys such as license,
    /// basename, size_label, languages), without the `general.` prefix.
    pub card: Vec<(String, CardValue)>,
}

/// A model-card value: text or a list of texts.
#[derive(Debug, Clone, PartialEq)]
pub enum CardValue {
    Text(String),
    List(Vec<String>),
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

    /// The dtype to store exported float weights in without loss: an HF checkpoint's own float
    /// type; F32 for a GGUF, whose norms are F32 beside F16/BF16/quantized weights and whose
    /// dequantized values are f32 products that a 16-bit type would round.
    pub fn float_dtype(&self) -> GgmlType {
        if matches!(self.source_format, SourceFormat::Gguf { .. }) {
            return GgmlType::F32;
        }
        let mut best = (GgmlType::F32, 0usize);
        for (d, n) in self.dtypes() {
            if matches!(d, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) && n > best.1 {
                best = (d, n);
            }
        }
        best.0
    }
}
