//! Trained LoRA pairs on disk as a PEFT adapter folder (`adapter_config.json` and
//! `adapter_model.safetensors` under PEFT's tensor names), which `PeftModel.from_pretrained`,
//! `edgepack merge` and `export gguf-lora` read; and initial pairs read back from one.

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::transform::lora::load_adapter;

/// The LoRA hyper-parameters an adapter records.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    /// Module names as the user gave them (`q_proj`), PEFT's `target_modules`.
    pub targets: Vec<String>,
}

/// One trained pair: `a` `[rank, in]`, `b` `[out, rank]`, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Module path, `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub a: Vec<f32>,
    pub a_shape: [usize; 2],
    pub b: Vec<f32>,
    pub b_shape: [usize; 2],
}

fn key(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.{part}.weight")
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serializes f32 tensors to safetensors bytes, in the order given.
pub(crate) fn safetensors_bytes(tensors: &[(String, &[f32], Vec<usize>)]) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, v, _)| le_bytes(v)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, _, shape), b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Invalid(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Invalid(format!("serializing tensors: {e}")))
}

/// Writes the adapter files into `dir` (an existing, empty staging folder).
pub fn write_adapter(dir: &Path, base: &str, spec: &LoraSpec, pairs: &[Pair]) -> Result<()> {
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": spec.targets,
        "use_rslora": spec.rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
    let p = dir.join("adapter_config.json");
    std::fs::write(&p, text + "\n").map_err(|e| Error::io(&p, e))?;
    let mut tensors = Vec::with_capacity(pairs.len() * 2);
    for pr in pairs {
        tensors.push((
            key(&pr.module, "lora_A"),
            pr.a.as_slice(),
            pr.a_shape.to_vec(),
        ));
        tensors.push((
            key(&pr.module, "lora_B"),
            pr.b.as_slice(),
            pr.b_shape.to_vec(),
        ));
    }
    let bytes = safetensors_bytes(&tensors)?;
    let p = dir.join("adapter_model.safetensors");
    std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
}

/// Reads the A/B pairs of a PEFT adapter for the modules `expect` (module path, A shape,
/// B shape), refusing an adapter whose modules, rank or shapes differ.
pub fn read_pairs(dir: &Path, expect: &[(String, [usize; 2], [usize; 2])]) -> Result<Vec<Pair>> {
    let ad = load_adapter(dir)?;
    let mut by_module: HashMap<String, _> = ad
        .modules
        .iter()
        .map(|m| (m.target.trim_end_matches(".weight").to_string(), m))
        .collect();
    let mut out = Vec::with_capacity(expect.len());
    for (module, a_shape, b_shape) in expect {
        let m = by_module.remove(module).ok_or_else(|| {
            Error::mismatch(
                dir.join("adapter_model.safetensors"),
                module,
                "the adapter has no LoRA pair for this module, which the run trains\nhint: give the same --targets as the adapter was made with",
            )
        })?;
        for (what, got, want) in [
            ("lora_A", &m.a.shape, a_shape),
            ("lora_B", &m.b.shape, b_shape),
        ] {
            if got.as_slice() != want.as_slice() {
                return Err(Error::mismatch(
                    dir.join("adapter_model.safetensors"),
                    format!("{module}.{what}"),
                    format!("shape {got:?}, the run needs {want:?} (another rank or base?)"),
                ));
            }
        }
        out.push(Pair {
            module: module.clone(),
            a: m.a.to_f32()?,
            a_shape: *a_shape,
            b: m.b.to_f32()?,
            b_shape: *b_shape,
        });
    }
    if let Some(extra) = by_module.keys().next() {
        return Err(Error::mismatch(
            dir.join("adapter_model.safetensors"),
            extra,
            "the adapter adapts this module, which the run does not train\nhint: give the same --targets as the adapter was made with",
        ));
    }
    Ok(out)
}
