//! GGUF export: maps the internal layout to llama.cpp's names and layout, picks a type per
//! tensor with llama-quantize's rules, and streams the file tensor by tensor (each tensor is
//! computed, quantized on all cores, written, and dropped).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gguf::names::{
    hf_to_gguf, hparams_metadata, llama3_rope_freqs, rope_permutation, rope_permute_heads,
};
use crate::gguf::value::{Array, Metadata, Value};
use crate::gguf::vocab::gguf_vocab_from_hf;
use crate::gguf::writer::{GgufWriter, TensorPlan};
use crate::model::{CardValue, Model, Source, Tensor};
use crate::progress::Progress;
use crate::quant::preset::{gguf_tensor_order, plan, PlanInput, PlanOptions, Preset};
use crate::quant::{self, GgmlType};

/// `general.quantization_version` (GGML_QNT_VERSION).
const QUANTIZATION_VERSION: u32 = 2;

/// Options of a GGUF export.
#[derive(Debug, Clone)]
pub struct GgufOptions {
    pub preset: Preset,
    /// Every quantizable tensor at the preset's base type (`llama-quantize --pure`).
    pub pure: bool,
    /// Per-column importance weights by GGUF tensor name.
    pub imatrix: Option<Arc<HashMap<String, Vec<f32>>>>,
    /// `general.name`; the model's name when absent.
    pub name: Option<String>,
    /// Further keys to record, such as llama-quantize's `quantize.imatrix.*` provenance.
    pub extra: Metadata,
}

/// What was written, per tensor and in total.
#[derive(Debug, Clone, Serialize)]
pub struct GgufReport {
    pub path: String,
    pub preset: String,
    pub file_type: u32,
    pub bytes: u64,
    pub n_params: u64,
    pub bits_per_weight: f64,
    pub tensors: Vec<TensorReport>,
    /// Tensors whose shape forced another type than the mixture wanted.
    pub fallbacks: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub ne: Vec<usize>,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wanted: Option<String>,
    pub bytes: u64,
}

/// One GGUF tensor to be produced from the model.
struct Item {
    name: String,
    ne: Vec<usize>,
    tensor: Tensor,
}

/// The GGUF tensors of a model, in llama.cpp's loader order, with llama-arch Q/K rows permuted.
fn gguf_items(model: &Model) -> Result<Vec<Item>> {
    let c = &model.config;
    let mut items = Vec::with_capacity(model.tensors.len() + 1);
    for t in &model.tensors {
        if c.tie_word_embeddings && t.name == crate::model::names::LM_HEAD {
            // llama.cpp reuses token_embd when output.weight is absent.
            continue;
        }
        let name = hf_to_gguf(&t.name)
            .ok_or_else(|| Error::unsupported(&model.source, &t.name, "has no GGUF name"))?;
        let mut tensor = t.clone();
        if let Some(n_head) = rope_permute_heads(&t.name, c) {
            let rows = t.shape[0];
            tensor.source = Source::RowPermute {
                inner: Box::new(t.source.clone()),
                perm: Arc::new(rope_permutation(rows, n_head)),
                row_len: t.shape.get(1).copied().unwrap_or(1),
            };
        }
        items.push(Item {
            ne: t.shape.iter().rev().copied().collect(),
            name,
            tensor,
        });
    }
    if let Some(freqs) = llama3_rope_freqs(c) {
        items.push(Item {
            name: "rope_freqs.weight".into(),
            ne: vec![freqs.len()],
            tensor: Tensor {
                name: "rope_freqs.weight".into(),
                shape: vec![freqs.len()],
                source: Source::Owned(Arc::new(freqs)),
            },
        });
    }
    items.sort_by(|a, b| gguf_tensor_order(&a.name, &b.name));
    Ok(items)
}

/// The `general.*`, hyperparameter and tokenizer keys of a model.
pub fn model_metadata(model: &Model, preset: Preset, name: Option<&str>) -> Result<Metadata> {
    let c = &model.config;
    let mut m = Metadata::new();
    m.set(
        "general.architecture",
        Value::String(c.arch.gguf_name().into()),
    );
    m.set("general.type", Value::String("model".into()));
    m.set(
        "general.name",
        Value::String(name.unwrap_or(&model.name).to_string()),
    );
    for (k, v) in &model.card {
        let v = match v {
            CardValue::Text(s) => Value::String(s.clone()),
            CardValue::List(l) => Value::Array(Array::String(l.clone())),
        };
        m.set(format!("general.{k}"), v);
    }
    for (k, v) in hparams_metadata(c, &model.source)?.iter() {
        m.set(k, v.clone());
    }
    m.set("general.file_type", Value::U32(preset.file_type()));
    m.set(
        "general.quantization_version",
        Value::U32(QUANTIZATION_VERSION),
    );
    if model.tokenizer.is_empty() {
        return Err(Error::format(
            &model.source,
            "tokenizer.json",
            "missing: a GGUF needs the tokenizer (tokenizer.json or tokenizer.model)",
        ));
    }
    let cfg_json = c.to_hf_json("float32");
    let vocab = gguf_vocab_from_hf(&model.tokenizer, &cfg_json, c.vocab_size, &model.source)?;
    for (k, v) in vocab.iter() {
        m.set(k, v.clone());
    }
    Ok(m)
}

/// The type chosen for one GGUF tensor.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub ne: Vec<usize>,
    pub ty: GgmlType,
    /// What the mixture wanted before a shape fallback.
    pub wanted: Option<GgmlType>,
}

/// Chooses the type of every GGUF tensor of `model` for `opts` (no data is read).
pub fn plan_types(model: &Model, opts: &GgufOptions) -> Result<Vec<Planned>> {
    let items = gguf_items(model)?;
    let inputs: Vec<PlanInput<'_>> = items
        .iter()
        .map(|i| PlanInput {
            name: &i.name,
            ne: &i.ne,
        })
        .collect();
    let c = &model.config;
    let choices = plan(
        &inputs,
        &PlanOptions {
            preset: opts.preset,
            pure: opts.pure,
            has_imatrix: opts.imatrix.is_some(),
            n_layer: c.num_hidden_layers,
            n_gqa: c.num_attention_heads / c.num_key_value_heads.max(1),
        },
    );
    Ok(items
        .into_iter()
        .zip(choices)
        .map(|(i, ch)| Planned {
            name: i.name,
            ne: i.ne,
            ty: ch.ty,
            wanted: ch.wanted,
        })
        .collect())
}

/// Streams a tensor through `sink` in `ty`, a chunk of rows at a time: values are computed,
/// quantized on all cores, written, and dropped.
pub fn stream_quantized(
    tensor: &Tensor,
    ty: GgmlType,
    imatrix: Option<&[f32]>,
    out: &Path,
    name: &str,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    progress: &dyn Progress,
) -> Result<()> {
    let n_rows = tensor.n_rows();
    let step = tensor.rows_per_chunk();
    let mut row = 0;
    while row < n_rows {
        let end = (row + step).min(n_rows);
        let values = tensor.rows_f32(row..end)?;
        let bytes = quant::quantize(ty, &values, tensor.row_len(), imatrix)
            .map_err(|e| Error::format(out, name, e.to_string()))?;
        sink(&bytes)?;
        progress.advance(values.len() as u64, name);
        row = end;
    }
    Ok(())
}

/// Exports `model` as a GGUF file at `out` (atomically).
pub fn export_gguf(
    model: &Model,
    out: &Path,
    opts: &GgufOptions,
    progress: &dyn Progress,
) -> Result<GgufReport> {
    let mut metadata = model_metadata(model, opts.preset, opts.name.as_deref())?;
    for (k, v) in opts.extra.iter() {
        metadata.set(k, v.clone());
    }
    let items = gguf_items(model)?;
    let planned = plan_types(model, opts)?;
    let plans: Vec<TensorPlan> = planned
        .iter()
        .map(|p| TensorPlan {
            name: p.name.clone(),
            ne: p.ne.clone(),
            ty: p.ty,
        })
        .collect();
    let writer = GgufWriter::new(&metadata, plans, out)?;
    let total: u64 = items.iter().map(|i| i.tensor.numel() as u64).sum();
    progress.start("writing GGUF", total);
    writer.write(out, |i, plan, sink| {
        let item = &items[i];
        let w = opts
            .imatrix
            .as_ref()
            .and_then(|m| m.get(&plan.name))
            .filter(|_| plan.ty.is_quantized())
            .map(Vec::as_slice);
        stream_quantized(&item.tensor, plan.ty, w, out, &plan.name, sink, progress)
    })?;
    progress.finish();
    let tensors: Vec<TensorReport> = writer
        .tensors()
        .iter()
        .zip(&planned)
        .map(|(t, p)| TensorReport {
            name: t.name.clone(),
            ne: t.ne.clone(),
            ty: t.ty.to_string(),
            wanted: p.wanted.map(|w| w.to_string()),
            bytes: t.nbytes() as u64,
        })
        .collect();
    let data_bytes: u64 = tensors.iter().map(|t| t.bytes).sum();
    Ok(GgufReport {
        path: out.display().to_string(),
        preset: opts.preset.to_string(),
        file_type: opts.preset.file_type(),
        bytes: writer.file_size() as u64,
        n_params: total,
        bits_per_weight: data_bytes as f64 * 8.0 / total.max(1) as f64,
        fallbacks: planned.iter().filter(|p| p.wanted.is_some()).count(),
        tensors,
    })
}
