//! Imports a llama.cpp GGUF (llama, qwen2, phi3): tensors stay in the file and are dequantized
//! on demand, llama-arch Q/K rows are put back in HF order, and the tokenizer files are rebuilt
//! from the `tokenizer.*` keys.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gguf::names::{
    config_from_metadata, gguf_to_hf, is_generated, rope_permute_heads, rope_unpermutation,
};
use crate::gguf::reader::GgufFile;
use crate::gguf::value::{Array, Value};
use crate::gguf::vocab::hf_tokenizer_from_gguf;
use crate::model::names::{expected_tensors, LM_HEAD};
use crate::model::{CardValue, Model, Source, SourceFormat, Tensor};

/// Imports a GGUF file into the internal layout.
pub fn import_gguf(path: &Path) -> Result<Model> {
    let f = GgufFile::open(path)?;
    if let Some(t) = f.metadata.get_str("general.type") {
        if t != "model" {
            return Err(Error::unsupported(
                path,
                "general.type",
                format!("`{t}` files are not models (a LoRA adapter or imatrix?)"),
            ));
        }
    }
    let embd = f
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::format(path, "token_embd.weight", "tensor missing"))?;
    let vocab_size = embd.ne.get(1).copied().unwrap_or(0);
    let mut config = config_from_metadata(&f.metadata, vocab_size, path)?;
    config.tie_word_embeddings = f.tensor("output.weight").is_none();
    let map = f.map.clone();
    let file = Arc::new(path.to_path_buf());
    let mut found = Vec::new();
    for info in &f.tensors {
        if is_generated(&info.name) {
            continue;
        }
        let hf = gguf_to_hf(&info.name, config.arch).ok_or_else(|| {
            Error::unsupported(
                path,
                &info.name,
                format!(
                    "tensor not known for architecture {}",
                    config.arch.gguf_name()
                ),
            )
        })?;
        if !info.ty.can_dequantize() {
            return Err(Error::unsupported(
                path,
                &info.name,
                format!("tensor type {} cannot be dequantized by edgepack", info.ty),
            ));
        }
        let shape = info.torch_shape();
        let mut source = Source::Mapped {
            file: file.clone(),
            map: map.clone(),
            offset: info.offset,
            len: info.size,
            dtype: info.ty,
        };
        if let Some(n_head) = rope_permute_heads(&hf, &config) {
            source = Source::RowPermute {
                inner: Box::new(source),
                perm: Arc::new(rope_unpermutation(shape[0], n_head)),
                row_len: shape.get(1).copied().unwrap_or(1),
            };
        }
        found.push(Tensor {
            name: hf,
            shape,
            source,
        });
    }
    let mut tensors = Vec::with_capacity(found.len());
    for (name, shape) in expected_tensors(&config) {
        let i = found
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| Error::format(path, &name, "tensor missing for this architecture"))?;
        let t = found.swap_remove(i);
        if t.shape != shape {
            return Err(Error::mismatch(
                path,
                &name,
                format!(
                    "shape {:?} does not match the metadata, which implies {:?}",
                    t.shape, shape
                ),
            ));
        }
        tensors.push(t);
    }
    if let Some(t) = found.iter().find(|t| t.name != LM_HEAD) {
        return Err(Error::unsupported(path, &t.name, "unexpected tensor"));
    }
    let tokenizer = if f.metadata.get("tokenizer.ggml.model").is_some() {
        hf_tokenizer_from_gguf(&f.metadata, path)?
    } else {
        Default::default()
    };
    let name = f
        .metadata
        .get_str("general.name")
        .map(str::to_owned)
        .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    // Keys llama.cpp and edgepack derive themselves are not card facts.
    const DERIVED: [&str; 6] = [
        "architecture",
        "type",
        "name",
        "file_type",
        "quantization_version",
        "alignment",
    ];
    let mut card = Vec::new();
    for (k, v) in f.metadata.iter() {
        let Some(short) = k.strip_prefix("general.") else {
            continue;
        };
        if DERIVED.contains(&short) {
            continue;
        }
        let value = match v {
            Value::String(s) => CardValue::Text(s.clone()),
            Value::Array(Array::String(l)) => CardValue::List(l.clone()),
            _ => continue,
        };
        card.push((short.to_string(), value));
    }
    Ok(Model {
        config,
        tensors,
        tokenizer,
        source: path.to_path_buf(),
        source_format: SourceFormat::Gguf {
            file_type: f.metadata.get_i64("general.file_type").map(|v| v as u32),
        },
        name,
        card,
    })
}
