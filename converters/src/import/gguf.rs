//! Imports a llama.cpp GGUF (llama, qwen2, phi3): tensors stay in the file and are dequantized
//! on demand, llama-arch Q/K rows are put back in HF order, and the tokenizer files are rebuilt
//! from the `tokenizer.*` keys.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gguf::names::{
    config_from_metadata, gguf_to_hf, is_generated, rope_permute_heads, rope_unpermutation,
};
use crate::gguf::reader::GgufFile;
use crate::gguf::value::{Array, Value};
use crate::gguf::vocab::hf_tokenizer_from_gguf;
use crate::model::names::{expected_tensor_count, expected_tensors};
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
    let layers_key = format!("{}.block_count", config.arch.gguf_name());
    let n_models = f.tensors.iter().filter(|t| !is_generated(&t.name)).count();
    match expected_tensor_count(&config) {
        Some(n) if n <= n_models => {}
        n => {
            return Err(Error::format(
                path,
                layers_key,
                format!(
                    "{} layers need {} tensors, but the file has {n_models}",
                    config.num_hidden_layers,
                    n.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string())
                ),
            ))
        }
    }
    // Bounded by the tensors of the file, checked just above.
    let expected = expected_tensors(&config);
    let want: HashMap<&str, &[usize]> = expected
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let map = f.map.clone();
    let file = Arc::new(path.to_path_buf());
    // HF name -> (GGUF name, tensor).
    let mut found: HashMap<String, (&str, Tensor)> = HashMap::with_capacity(want.len());
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
        let shape = info.torch_shape();
        // The shape is checked before anything is sized by it (the row permutation below).
        match want.get(hf.as_str()) {
            None => return Err(Error::unsupported(path, &info.name, "unexpected tensor")),
            Some(s) if *s != shape.as_slice() => {
                return Err(Error::mismatch(
                    path,
                    &info.name,
                    format!(
                        "shape {shape:?} does not match the metadata, which implies {:?}",
                        s
                    ),
                ))
            }
            Some(_) => {}
        }
        if !info.ty.can_dequantize() {
            return Err(Error::unsupported(
                path,
                &info.name,
                format!("tensor type {} cannot be dequantized by edgepack", info.ty),
            ));
        }
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
        let t = Tensor {
            name: hf.clone(),
            shape,
            source,
        };
        if let Some((other, _)) = found.insert(hf.clone(), (&info.name, t)) {
            return Err(Error::format(
                path,
                &info.name,
                format!("maps to {hf}, as tensor {other} does"),
            ));
        }
    }
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, _) in &expected {
        let (_, t) = found
            .remove(name)
            .ok_or_else(|| Error::format(path, name, "tensor missing for this architecture"))?;
        tensors.push(t);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::value::Metadata;
    use crate::gguf::writer::{GgufWriter, TensorPlan};
    use crate::quant::GgmlType;

    /// GGUF names and dims (ne0 first) of a one-layer tied llama: hidden 64, 4 heads of 16,
    /// 2 KV heads, ffn 128, vocabulary 8.
    fn llama_tensors() -> Vec<(String, Vec<usize>)> {
        [
            ("token_embd.weight", vec![64, 8]),
            ("output_norm.weight", vec![64]),
            ("blk.0.attn_norm.weight", vec![64]),
            ("blk.0.attn_q.weight", vec![64, 64]),
            ("blk.0.attn_k.weight", vec![64, 32]),
            ("blk.0.attn_v.weight", vec![64, 32]),
            ("blk.0.attn_output.weight", vec![64, 64]),
            ("blk.0.ffn_norm.weight", vec![64]),
            ("blk.0.ffn_gate.weight", vec![64, 128]),
            ("blk.0.ffn_up.weight", vec![64, 128]),
            ("blk.0.ffn_down.weight", vec![128, 64]),
        ]
        .into_iter()
        .map(|(n, ne)| (n.to_string(), ne))
        .collect()
    }

    fn write_llama(path: &Path, tensors: Vec<(String, Vec<usize>)>) {
        let mut m = Metadata::new();
        m.set("general.architecture", Value::String("llama".into()));
        for (k, v) in [
            ("embedding_length", 64),
            ("feed_forward_length", 128),
            ("block_count", 1),
            ("context_length", 256),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 2),
        ] {
            m.set(format!("llama.{k}"), Value::U32(v));
        }
        m.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
        let plans = tensors
            .into_iter()
            .map(|(name, ne)| TensorPlan {
                name,
                ne,
                ty: GgmlType::F32,
            })
            .collect();
        let w = GgufWriter::new(&m, plans, path).unwrap();
        w.write(path, |_, t, sink| sink(&vec![0u8; t.nbytes()]))
            .unwrap();
    }

    #[test]
    fn small_llama_gguf_imports_every_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_llama(&path, llama_tensors());
        let m = import_gguf(&path).unwrap();
        assert_eq!(m.tensors.len(), 11);
        assert_eq!(m.config.head_dim, 16);
    }

    #[test]
    fn wrong_shape_is_refused_before_sizing_the_row_permutation_by_it() {
        // Zero elements, so the data fits, but 2^60 rows: the rotary permutation of that many
        // rows must never be built.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut tensors = llama_tensors();
        tensors[3].1 = vec![0, 1 << 60];
        write_llama(&path, tensors);
        let err = import_gguf(&path).unwrap_err().to_string();
        assert!(err.contains("m.gguf: blk.0.attn_q.weight: shape"), "{err}");
    }

    #[test]
    fn two_tensors_naming_one_parameter_are_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut tensors = llama_tensors();
        tensors.push(("blk.00.attn_q.weight".into(), vec![64, 64]));
        write_llama(&path, tensors);
        let err = import_gguf(&path).unwrap_err().to_string();
        assert!(err.contains("m.gguf: blk.00.attn_q.weight:"), "{err}");
        assert!(err.contains("blk.0.attn_q.weight"), "{err}");
    }
}
