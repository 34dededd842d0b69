//! PEFT adapter -> GGUF LoRA adapter, the file llama.cpp's `--lora` and Ollama's ADAPTER load
//! (`general.type = adapter`; facts §4.1, §4.2).
//!
//! llama.cpp applies `s = alpha / r` with one alpha for the whole file. Where PEFT's scale
//! differs per module (rsLoRA, alpha_pattern, rank_pattern), the correction factor is folded
//! into lora_b so that llama.cpp computes exactly PEFT's update.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::export::gguf::stream_quantized;
use crate::gguf::names::{hf_to_gguf, rope_permutation, rope_permute_heads};
use crate::gguf::value::{Metadata, Value};
use crate::gguf::writer::{GgufWriter, TensorPlan};
use crate::model::{Model, Source, Tensor};
use crate::progress::Silent;
use crate::quant::GgmlType;
use crate::transform::lora::{LoraAdapter, ModuleKind};

#[derive(Debug, Clone, Serialize)]
pub struct LoraReport {
    pub path: String,
    pub alpha: f32,
    pub modules: usize,
    pub bytes: u64,
    #[serde(rename = "type")]
    pub ty: String,
}

/// Writes `adapter` (checked against `base`) as a GGUF LoRA at `out`, tensors in `ty`
/// (F32, F16, BF16 or Q8_0).
pub fn export_gguf_lora(
    adapter: &LoraAdapter,
    base: &Model,
    out: &Path,
    ty: GgmlType,
) -> Result<LoraReport> {
    adapter.check_against(base)?;
    if !matches!(
        ty,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    ) {
        return Err(Error::Invalid(format!(
            "{}: LoRA tensors are written as F32, F16, BF16 or Q8_0, not {ty}",
            out.display()
        )));
    }
    if adapter.use_dora {
        return Err(Error::unsupported(
            &adapter.path,
            "use_dora",
            "DoRA cannot be applied at run time by llama.cpp\nhint: merge it instead: edgepack export gguf BASE --lora ADAPTER",
        ));
    }
    if let Some(r) = adapter.replacements.first() {
        return Err(Error::unsupported(
            &adapter.path,
            &r.name,
            "modules_to_save weights cannot be expressed as a GGUF LoRA\nhint: merge the adapter instead: edgepack export gguf BASE --lora ADAPTER",
        ));
    }
    let c = &base.config;
    // The file's alpha: the configured lora_alpha; per-module differences go into lora_b.
    let alpha = adapter
        .config
        .get("lora_alpha")
        .and_then(|v| v.as_f64())
        .unwrap_or(8.0) as f32;
    let mut items: Vec<(String, Tensor)> = Vec::new();
    for m in &adapter.modules {
        if m.kind == ModuleKind::Embedding {
            return Err(Error::unsupported(
                &adapter.path,
                &m.a.name,
                "embedding LoRA cannot be written as a GGUF adapter\nhint: merge the adapter instead",
            ));
        }
        if m.bias.is_some() {
            return Err(Error::unsupported(
                &adapter.path,
                &m.target,
                "lora_bias cannot be written as a GGUF adapter\nhint: merge the adapter instead",
            ));
        }
        if c.tie_word_embeddings && m.target == crate::model::names::LM_HEAD {
            return Err(Error::unsupported(
                &adapter.path,
                &m.a.name,
                "adapts lm_head, which this base ties to the embeddings",
            ));
        }
        let g = hf_to_gguf(&m.target)
            .ok_or_else(|| Error::unsupported(&adapter.path, &m.target, "has no GGUF name"))?;
        // llama.cpp: s = alpha / r. PEFT: m.scale. Fold the ratio into B.
        let llama_scale = alpha as f64 / m.rank as f64;
        let fix = (m.scale / llama_scale) as f32;
        let mut b = m.b.clone();
        if (fix - 1.0).abs() > f32::EPSILON {
            let vals: Vec<f32> = b.to_f32()?.into_iter().map(|v| v * fix).collect();
            b.source = Source::Owned(Arc::new(vals));
        }
        if let Some(n_head) = rope_permute_heads(&m.target, c) {
            b.source = Source::RowPermute {
                inner: Box::new(b.source.clone()),
                perm: Arc::new(rope_permutation(b.shape[0], n_head)),
                row_len: b.shape[1],
            };
        }
        items.push((format!("{g}.lora_a"), m.a.clone()));
        items.push((format!("{g}.lora_b"), b));
    }
    items.sort_by(|a, b| crate::quant::preset::gguf_tensor_order(&a.0, &b.0));
    let mut md = Metadata::new();
    md.set(
        "general.architecture",
        Value::String(c.arch.gguf_name().into()),
    );
    md.set("general.type", Value::String("adapter".into()));
    md.set("adapter.type", Value::String("lora".into()));
    md.set("adapter.lora.alpha", Value::F32(alpha));
    if let Some(n) = adapter.path.file_name() {
        md.set("general.name", Value::String(n.to_string_lossy().into()));
    }
    let plans: Vec<TensorPlan> = items
        .iter()
        .map(|(n, t)| {
            let row = t.row_len();
            // Rows that do not fill Q8_0 blocks stay F32 rather than failing.
            let tty = if ty.bytes_for(row).is_some() {
                ty
            } else {
                GgmlType::F32
            };
            TensorPlan {
                name: n.clone(),
                ne: t.shape.iter().rev().copied().collect(),
                ty: tty,
            }
        })
        .collect();
    let w = GgufWriter::new(&md, plans, out)?;
    w.write(out, |i, plan, sink| {
        stream_quantized(&items[i].1, plan.ty, None, out, &plan.name, sink, &Silent)
    })?;
    Ok(LoraReport {
        path: out.display().to_string(),
        alpha,
        modules: adapter.modules.len(),
        bytes: w.file_size() as u64,
        ty: ty.to_string(),
    })
}
