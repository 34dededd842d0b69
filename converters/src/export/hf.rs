//! Hugging Face folder export: config.json, safetensors (streamed tensor by tensor, sharded with
//! an index past a size limit), tokenizer and generation files. transformers loads the result.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::error::{Error, Result};
use crate::export::gguf::stream_quantized;
use crate::io::{write_file, AtomicDir, AtomicFile};
use crate::model::{Model, Tensor};
use crate::progress::Progress;
use crate::quant::GgmlType;

/// Largest shard written before starting another (transformers' default is 5 GB; we stay below).
pub const MAX_SHARD_BYTES: usize = 4 << 30;

#[derive(Debug, Clone, Serialize)]
pub struct HfReport {
    pub path: String,
    pub dtype: String,
    pub files: Vec<String>,
    pub bytes: u64,
    pub n_tensors: usize,
}

fn st_dtype(t: GgmlType) -> &'static str {
    match t {
        GgmlType::F32 => "F32",
        GgmlType::F16 => "F16",
        GgmlType::BF16 => "BF16",
        _ => unreachable!("checked by export_hf"),
    }
}

fn torch_dtype(t: GgmlType) -> &'static str {
    match t {
        GgmlType::F32 => "float32",
        GgmlType::F16 => "float16",
        GgmlType::BF16 => "bfloat16",
        _ => unreachable!("checked by export_hf"),
    }
}

/// Writes one safetensors file from tensors, one at a time.
fn write_safetensors(
    path: &Path,
    tensors: &[&Tensor],
    dtype: GgmlType,
    progress: &dyn Progress,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for t in tensors {
        let n = t.numel() * dtype.type_size();
        header.insert(
            t.name.clone(),
            json!({"dtype": st_dtype(dtype), "shape": t.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut h = serde_json::to_vec(&Json::Object(header))
        .map_err(|e| Error::Invalid(format!("{}: header: {e}", path.display())))?;
    // The data section starts 8-byte aligned, padded with spaces as the reference writer does.
    while (h.len() + 8) % 8 != 0 {
        h.push(b' ');
    }
    let mut f = AtomicFile::create(path)?;
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    // Every tensor streams through f32 in chunks, even when its type does not change: the
    // conversion is exact for F16/BF16/F32 values and keeps memory bounded (mapped input pages
    // are released as they are read).
    for t in tensors {
        stream_quantized(
            t,
            dtype,
            None,
            path,
            &t.name,
            &mut |b: &[u8]| f.write_all(b),
            progress,
        )?;
    }
    f.commit()?;
    Ok((8 + h.len() + offset) as u64)
}

/// Exports `model` as an HF folder at `out`, weights in `dtype` (F32, F16 or BF16).
pub fn export_hf(
    model: &Model,
    out: &Path,
    dtype: GgmlType,
    progress: &dyn Progress,
) -> Result<HfReport> {
    if !matches!(dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return Err(Error::Invalid(format!(
            "{}: HF folders hold F32, F16 or BF16 weights, not {dtype}",
            out.display()
        )));
    }
    let dir = AtomicDir::create(out)?;
    let stage = dir.staging().to_path_buf();
    let tensors: Vec<&Tensor> = model
        .tensors
        .iter()
        .filter(|t| !(model.config.tie_word_embeddings && t.name == crate::model::names::LM_HEAD))
        .collect();
    // Group into shards by size, in the model's order.
    let mut shards: Vec<Vec<&Tensor>> = vec![Vec::new()];
    let mut size = 0usize;
    for t in &tensors {
        let n = t.numel() * dtype.type_size();
        if size + n > MAX_SHARD_BYTES && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().unwrap().push(t);
    }
    let total: u64 = tensors.iter().map(|t| t.numel() as u64).sum();
    progress.start("writing safetensors", total);
    let mut files = Vec::new();
    let mut bytes = 0u64;
    let mut weight_map = BTreeMap::new();
    let n = shards.len();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        bytes += write_safetensors(&stage.join(&fname), shard, dtype, progress)?;
        for t in shard {
            weight_map.insert(t.name.clone(), json!(fname));
        }
        files.push(fname);
    }
    progress.finish();
    if n > 1 {
        let total_size: usize = tensors.iter().map(|t| t.numel() * dtype.type_size()).sum();
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_json(&stage.join("model.safetensors.index.json"), &index)?;
        files.push("model.safetensors.index.json".into());
    }
    write_json(
        &stage.join("config.json"),
        &model.config.to_hf_json(torch_dtype(dtype)),
    )?;
    files.push("config.json".into());
    files.extend(write_tokenizer_files(model, &stage)?);
    dir.commit()?;
    Ok(HfReport {
        path: out.display().to_string(),
        dtype: dtype.to_string(),
        files,
        bytes,
        n_tensors: tensors.len(),
    })
}

/// Writes the model's tokenizer and generation files into `stage` as Hugging Face has them;
/// returns their names. Every exporter that ships a tokenizer beside the model uses this.
pub(crate) fn write_tokenizer_files(model: &Model, stage: &Path) -> Result<Vec<String>> {
    let tok = &model.tokenizer;
    let mut files = Vec::new();
    if let Some(t) = &tok.tokenizer_json {
        write_file(&stage.join("tokenizer.json"), t.as_bytes())?;
        files.push("tokenizer.json".to_string());
    }
    if let Some(b) = &tok.sentencepiece_model {
        write_file(&stage.join("tokenizer.model"), b)?;
        files.push("tokenizer.model".into());
    }
    for (name, v) in [
        ("tokenizer_config.json", &tok.tokenizer_config),
        ("special_tokens_map.json", &tok.special_tokens_map),
        ("generation_config.json", &tok.generation_config),
    ] {
        if let Some(v) = v {
            write_json(&stage.join(name), v)?;
            files.push(name.into());
        }
    }
    Ok(files)
}

/// Pretty JSON with a final newline, written atomically.
pub(crate) fn write_json(path: &Path, v: &Json) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    s.push('\n');
    write_file(path, s.as_bytes())
}
