//! Imports a Hugging Face model folder: config.json, single or sharded safetensors (memory
//! mapped; nothing is read until a tensor is used), tokenizer and generation files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::model::names::{expected_tensor_count, expected_tensors, LM_HEAD};
use crate::model::{Model, ModelConfig, Source, SourceFormat, Tensor, TokenizerFiles};
use crate::quant::GgmlType;

pub(crate) fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, "json", e.to_string()))
}

fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Reads the tokenizer and generation files of a folder (whatever is present).
pub fn read_tokenizer_files(dir: &Path) -> Result<TokenizerFiles> {
    let tj = dir.join("tokenizer.json");
    let tokenizer_json = if tj.is_file() {
        let text = std::fs::read_to_string(&tj).map_err(|e| Error::io(&tj, e))?;
        serde_json::from_str::<Json>(&text)
            .map_err(|e| Error::format(&tj, "json", e.to_string()))?;
        Some(text)
    } else {
        None
    };
    let sp = dir.join("tokenizer.model");
    let sentencepiece_model = if sp.is_file() {
        Some(std::fs::read(&sp).map_err(|e| Error::io(&sp, e))?)
    } else {
        None
    };
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: read_json_opt(&dir.join("tokenizer_config.json"))?,
        special_tokens_map: read_json_opt(&dir.join("special_tokens_map.json"))?,
        generation_config: read_json_opt(&dir.join("generation_config.json"))?,
        sentencepiece_model,
    })
}

/// A name with no folder part: not empty, no separator, not `.` or `..`.
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(n)), None) if n == name
    ) && !name.contains(['/', '\\'])
}

/// The safetensors files of a folder: the index's shards, or the single file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let j = read_json(&index)?;
        let map = j
            .get("weight_map")
            .and_then(Json::as_object)
            .ok_or_else(|| Error::format(&index, "weight_map", "missing or not an object"))?;
        let mut files = BTreeSet::new();
        for (tensor, v) in map {
            let field = || format!("weight_map.{tensor}");
            let f = v
                .as_str()
                .ok_or_else(|| Error::format(&index, field(), "is not a file name"))?;
            // The index is data: it must not send the importer to a file outside the folder.
            if !is_plain_file_name(f) {
                return Err(Error::format(
                    &index,
                    field(),
                    format!("shard `{f}` is not a plain file name inside the model folder"),
                ));
            }
            files.insert(dir.join(f));
        }
        return Ok(files.into_iter().collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if dir.join("pytorch_model.bin").is_file() {
        return Err(Error::unsupported(
            dir.join("pytorch_model.bin"),
            "weights",
            "pickle checkpoints are never unpickled; convert the model to safetensors first\nhint: transformers' save_pretrained(..., safe_serialization=True)",
        ));
    }
    Err(Error::format(
        dir,
        "model.safetensors",
        "no safetensors weights found (model.safetensors or model.safetensors.index.json)",
    ))
}

fn ggml_dtype(d: Dtype, path: &Path, name: &str) -> Result<GgmlType> {
    Ok(match d {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::BF16 => GgmlType::BF16,
        other => {
            return Err(Error::unsupported(
                path,
                name,
                format!("dtype {other:?} (F32, F16 and BF16 are supported)"),
            ))
        }
    })
}

/// Memory-maps one safetensors file and lists its tensors as lazy sources.
pub fn map_safetensors(path: &Path) -> Result<Vec<Tensor>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of an input edgepack never writes.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
    let (header_len, meta) = SafeTensors::read_metadata(&map[..])
        .map_err(|e| Error::format(path, "header", format!("{e} (truncated or corrupt?)")))?;
    let base = 8 + header_len;
    let file_arc = Arc::new(path.to_path_buf());
    let mut out = Vec::new();
    let mut infos: Vec<_> = meta.tensors().into_iter().collect();
    infos.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, info) in infos {
        let dtype = ggml_dtype(info.dtype, path, &name)?;
        let (s, e) = info.data_offsets;
        let numel: usize = info.shape.iter().product();
        if e - s != numel * dtype.type_size() || base + e > map.len() {
            return Err(Error::format(
                path,
                &name,
                format!(
                    "data [{s}, {e}) does not hold shape {:?} of {dtype}, or lies past the end of the file",
                    info.shape
                ),
            ));
        }
        out.push(Tensor {
            name,
            shape: info.shape.clone(),
            source: Source::Mapped {
                file: file_arc.clone(),
                map: map.clone(),
                offset: base + s,
                len: e - s,
                dtype,
            },
        });
    }
    Ok(out)
}

/// Parameters some checkpoints carry that are buffers, not weights.
fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Imports an HF folder into the internal layout.
pub fn import_folder(dir: &Path) -> Result<Model> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::format(
            dir,
            "config.json",
            "missing: not a Hugging Face model folder",
        ));
    }
    let config = ModelConfig::from_hf_json(&read_json(&cfg_path)?, &cfg_path)?;
    let mut by_name: BTreeMap<String, (Tensor, PathBuf)> = BTreeMap::new();
    for f in weight_files(dir)? {
        for t in map_safetensors(&f)? {
            if is_ignorable(&t.name) {
                continue;
            }
            if let Some((_, other)) = by_name.get(&t.name) {
                return Err(Error::format(
                    &f,
                    &t.name,
                    format!("tensor also present in {}", other.display()),
                ));
            }
            by_name.insert(t.name.clone(), (t, f.clone()));
        }
    }
    match expected_tensor_count(&config) {
        Some(n) if n <= by_name.len() => {}
        n => {
            return Err(Error::format(
                &cfg_path,
                "num_hidden_layers",
                format!(
                    "{} layers need {} tensors, but the safetensors files hold {}",
                    config.num_hidden_layers,
                    n.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                    by_name.len()
                ),
            ))
        }
    }
    // Bounded by the tensors of the files, checked just above.
    let expected = expected_tensors(&config);
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        let (t, f) = by_name.remove(&name).ok_or_else(|| {
            Error::format(dir, &name, "tensor missing from the safetensors files")
        })?;
        if t.shape != shape {
            return Err(Error::mismatch(
                f,
                &name,
                format!(
                    "shape {:?} does not match config.json, which implies {:?}",
                    t.shape, shape
                ),
            ));
        }
        tensors.push(t);
    }
    // A tied model may still ship an lm_head copy; keep it so nothing is lost.
    if let Some((t, _)) = by_name.remove(LM_HEAD) {
        tensors.push(t);
    }
    if let Some((name, (_, f))) = by_name.into_iter().next() {
        return Err(Error::unsupported(
            f,
            &name,
            format!("unexpected tensor for {}", config.arch.hf_class()),
        ));
    }
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    Ok(Model {
        config,
        tensors,
        tokenizer: read_tokenizer_files(dir)?,
        source: dir.to_path_buf(),
        source_format: SourceFormat::HfFolder,
        name,
        card: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_file_names_are_shard_names() {
        for ok in ["model-00001-of-00002.safetensors", "a..b", ".hidden"] {
            assert!(is_plain_file_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/passwd",
            "sub/x",
            "x/",
            "./x",
            "a\\b",
            "..\\x",
        ] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
