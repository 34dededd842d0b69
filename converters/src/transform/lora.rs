//! PEFT LoRA adapters: reading `adapter_config.json` + `adapter_model.safetensors`, and merging
//! them into a model lazily (the update is computed when the tensor is exported), following
//! PEFT's `merge_and_unload` semantics (shared/facts/gguf.md §4.3).

use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::import::hf::{map_safetensors, read_json};
use crate::model::names::EMBED;
use crate::model::{Delta, Model, Source, Tensor};

/// How an adapter module's update is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    Linear,
    Embedding,
}

/// One adapted base parameter.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The base parameter (HF name, e.g. `model.layers.0.self_attn.q_proj.weight`).
    pub target: String,
    pub kind: ModuleKind,
    /// [r, in] (embeddings: [r, vocab]).
    pub a: Tensor,
    /// [out, r] (embeddings: [dim, r]).
    pub b: Tensor,
    pub rank: usize,
    pub alpha: f64,
    /// alpha / r, or alpha / sqrt(r) for rsLoRA.
    pub scale: f64,
    /// DoRA magnitude vector, [out].
    pub magnitude: Option<Tensor>,
    /// `lora_B.bias`, added to the base bias.
    pub bias: Option<Tensor>,
}

/// A parsed PEFT adapter.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub config: Json,
    pub modules: Vec<LoraModule>,
    /// `modules_to_save`: full replacement weights under base names.
    pub replacements: Vec<Tensor>,
    pub use_dora: bool,
    pub base_model: Option<String>,
}

/// Compiles a PEFT pattern key (rank_pattern/alpha_pattern) the way PEFT matches it: the key is
/// a regex that must match the end of the module path, at a `.` boundary.
fn pattern_matches(key: &str, module: &str) -> bool {
    Regex::new(&format!(r"^(.*\.)?({key})$"))
        .map(|re| re.is_match(module))
        .unwrap_or(false)
}

/// The value `field` (`rank_pattern`, `alpha_pattern`) gives `module`, if a key matches. A
/// field that is not an object, or a matching value that is not a number, is an error.
fn lookup_pattern(cfg: &Json, path: &Path, field: &str, module: &str) -> Result<Option<f64>> {
    let Some(v) = cfg.get(field) else {
        return Ok(None);
    };
    let Some(map) = v.as_object() else {
        return Err(Error::format(path, field, format!("{v} is not an object")));
    };
    match map.iter().find(|(k, _)| pattern_matches(k, module)) {
        None => Ok(None),
        Some((k, v)) => v.as_f64().map(Some).ok_or_else(|| {
            Error::format(path, format!("{field}.{k}"), format!("{v} is not a number"))
        }),
    }
}

/// A number of adapter_config.json: PEFT's `default` when absent; a value of another type is
/// an error, never the default.
fn config_number(cfg: &Json, path: &Path, key: &str, default: f64) -> Result<f64> {
    match cfg.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| Error::format(path, key, format!("{v} is not a number"))),
    }
}

/// A flag of adapter_config.json, as [`config_number`].
fn config_flag(cfg: &Json, path: &Path, key: &str) -> Result<bool> {
    match cfg.get(key) {
        None => Ok(false),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Error::format(path, key, format!("{v} is not true or false"))),
    }
}

/// Splits an adapter key into (module path, LoRA part).
fn split_key(key: &str) -> (&str, &str) {
    for part in [
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_B.bias",
        ".lora_embedding_A",
        ".lora_embedding_B",
        ".lora_magnitude_vector.weight",
        ".lora_magnitude_vector",
    ] {
        if let Some(m) = key.strip_suffix(part) {
            return (m, &part[1..]);
        }
    }
    (key, "")
}

/// Reads a PEFT LoRA adapter folder.
pub fn load_adapter(dir: &Path) -> Result<LoraAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    if !cfg_path.is_file() {
        return Err(Error::format(
            dir,
            "adapter_config.json",
            "missing: not a PEFT adapter folder",
        ));
    }
    let cfg = read_json(&cfg_path)?;
    if let Some(t) = cfg.get("peft_type") {
        let Some(t) = t.as_str() else {
            return Err(Error::format(
                &cfg_path,
                "peft_type",
                format!("{t} is not a string"),
            ));
        };
        if t != "LORA" {
            return Err(Error::unsupported(
                &cfg_path,
                "peft_type",
                format!("`{t}` adapters (only LORA is supported)"),
            ));
        }
    }
    let weights = dir.join("adapter_model.safetensors");
    if !weights.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            return Err(Error::unsupported(
                dir.join("adapter_model.bin"),
                "weights",
                "pickle files are never unpickled; save the adapter with safetensors\nhint: peft's save_pretrained(..., safe_serialization=True)",
            ));
        }
        return Err(Error::format(dir, "adapter_model.safetensors", "missing"));
    }
    // PEFT's LoraConfig defaults: r 8, lora_alpha 8.
    let r_default = config_number(&cfg, &cfg_path, "r", 8.0)?;
    let alpha_default = config_number(&cfg, &cfg_path, "lora_alpha", 8.0)?;
    let rslora = config_flag(&cfg, &cfg_path, "use_rslora")?;
    let use_dora = config_flag(&cfg, &cfg_path, "use_dora")?;
    if config_flag(&cfg, &cfg_path, "fan_in_fan_out")? {
        // PEFT itself resets fan_in_fan_out to false for nn.Linear targets, which is every
        // module of these architectures, so the update is applied untransposed as PEFT does.
        tracing::warn!(
            "{}: fan_in_fan_out is true; PEFT ignores it for nn.Linear modules and so does edgepack",
            cfg_path.display()
        );
    }

    let mut parts: std::collections::BTreeMap<String, Vec<(String, Tensor)>> = Default::default();
    let mut replacements = Vec::new();
    for t in map_safetensors(&weights)? {
        let key = t.name.clone();
        let stripped = key
            .strip_prefix("base_model.model.")
            .ok_or_else(|| {
                Error::format(&weights, &key, "key does not start with base_model.model.")
            })?
            .to_string();
        let (module, part) = split_key(&stripped);
        if part.is_empty() {
            // modules_to_save: a whole replacement weight under its module path.
            // PEFT also saves targeted embedding layers whole (`save_embedding_layers`), under
            // `<module>.base_layer.weight`: a replacement like modules_to_save.
            let plain = stripped
                .replace(".modules_to_save.default.", ".")
                .replace(".modules_to_save.", ".")
                .replace(".original_module.", ".")
                .replace(".base_layer.", ".");
            replacements.push(Tensor { name: plain, ..t });
            continue;
        }
        parts
            .entry(module.to_string())
            .or_default()
            .push((part.to_string(), t));
    }
    let mut modules = Vec::new();
    for (module, ps) in parts {
        let get = |p: &str| ps.iter().find(|(n, _)| n == p).map(|(_, t)| t.clone());
        let (a, b, kind) = match (get("lora_A.weight"), get("lora_B.weight")) {
            (Some(a), Some(b)) => (a, b, ModuleKind::Linear),
            _ => match (get("lora_embedding_A"), get("lora_embedding_B")) {
                (Some(a), Some(b)) => (a, b, ModuleKind::Embedding),
                _ => {
                    return Err(Error::format(
                        &weights,
                        &module,
                        "has no complete lora_A/lora_B pair",
                    ))
                }
            },
        };
        if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != b.shape[1] {
            return Err(Error::format(
                &weights,
                &module,
                format!(
                    "lora_A {:?} and lora_B {:?} do not form a low-rank pair",
                    a.shape, b.shape
                ),
            ));
        }
        let rank = a.shape[0];
        let alpha =
            lookup_pattern(&cfg, &cfg_path, "alpha_pattern", &module)?.unwrap_or(alpha_default);
        let r_cfg = lookup_pattern(&cfg, &cfg_path, "rank_pattern", &module)?.unwrap_or(r_default);
        if (r_cfg as usize) != rank {
            tracing::warn!(
                "{}: {module}: tensor rank {rank} differs from the configured r {r_cfg}; using {rank}",
                weights.display()
            );
        }
        let scale = if rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        modules.push(LoraModule {
            target: format!("{module}.weight"),
            kind,
            a,
            b,
            rank,
            alpha,
            scale,
            magnitude: get("lora_magnitude_vector.weight").or_else(|| get("lora_magnitude_vector")),
            bias: get("lora_B.bias"),
        });
    }
    if use_dora
        && modules
            .iter()
            .any(|m| m.kind == ModuleKind::Linear && m.magnitude.is_none())
    {
        return Err(Error::format(
            &weights,
            "lora_magnitude_vector",
            "adapter_config.json sets use_dora but a module has no magnitude vector",
        ));
    }
    if modules.is_empty() && replacements.is_empty() {
        return Err(Error::format(
            &weights,
            "tensors",
            "the adapter has no LoRA tensors",
        ));
    }
    Ok(LoraAdapter {
        path: dir.to_path_buf(),
        base_model: cfg
            .get("base_model_name_or_path")
            .and_then(Json::as_str)
            .map(str::to_owned),
        config: cfg,
        modules,
        replacements,
        use_dora,
    })
}

impl LoraAdapter {
    /// Checks every module against the base: the target exists and shapes fit. The error names
    /// the adapter tensor.
    pub fn check_against(&self, model: &Model) -> Result<()> {
        let weights = self.path.join("adapter_model.safetensors");
        for m in &self.modules {
            let base = model.tensor(&m.target).ok_or_else(|| {
                Error::mismatch(
                    &weights,
                    &m.a.name,
                    format!(
                        "targets `{}`, which the base model {} does not have (an adapter for another base?)",
                        m.target,
                        model.source.display()
                    ),
                )
            })?;
            let (out, inn) = match m.kind {
                ModuleKind::Linear => (m.b.shape[0], m.a.shape[1]),
                ModuleKind::Embedding => (m.a.shape[1], m.b.shape[0]),
            };
            if base.shape != [out, inn] {
                return Err(Error::mismatch(
                    &weights,
                    &m.a.name,
                    format!(
                        "update shape [{out}, {inn}] does not fit base tensor `{}` of shape {:?} (an adapter for another base?)",
                        m.target, base.shape
                    ),
                ));
            }
            if let Some(mag) = &m.magnitude {
                if mag.numel() != out {
                    return Err(Error::mismatch(
                        &weights,
                        &mag.name,
                        format!(
                            "has {} entries, the base has {out} output rows",
                            mag.numel()
                        ),
                    ));
                }
            }
            if let Some(bias) = &m.bias {
                let bname = m.target.trim_end_matches(".weight").to_string() + ".bias";
                let base_bias = model.tensor(&bname).ok_or_else(|| {
                    Error::mismatch(
                        &weights,
                        &bias.name,
                        format!("the base has no `{bname}` to add to"),
                    )
                })?;
                if base_bias.shape != bias.shape {
                    return Err(Error::mismatch(
                        &weights,
                        &bias.name,
                        format!(
                            "shape {:?} does not fit `{bname}` {:?}",
                            bias.shape, base_bias.shape
                        ),
                    ));
                }
            }
        }
        for r in &self.replacements {
            let base = model.tensor(&r.name).ok_or_else(|| {
                Error::mismatch(
                    &weights,
                    &r.name,
                    "modules_to_save weight has no counterpart in the base model",
                )
            })?;
            if base.shape != r.shape {
                return Err(Error::mismatch(
                    &weights,
                    &r.name,
                    format!(
                        "shape {:?} does not fit the base's {:?}",
                        r.shape, base.shape
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Adds `weight ×` each adapter's updates to the model's tensors (lazily: nothing is computed
/// until a tensor is read). Several adapters stack; DoRA modules must be alone on their tensor.
pub fn merge_adapters(model: &mut Model, adapters: &[(LoraAdapter, f32)]) -> Result<()> {
    for (ad, _) in adapters {
        ad.check_against(model)?;
    }
    for (ad, weight) in adapters {
        if ad.use_dora && adapters.len() > 1 {
            return Err(Error::unsupported(
                &ad.path,
                "use_dora",
                "a DoRA adapter cannot be stacked with other adapters; merge it alone",
            ));
        }
        // Replacements first: a saved base layer is what this adapter's updates apply to.
        for r in &ad.replacements {
            let t = model.tensor_mut(&r.name).expect("checked");
            if matches!(t.source, Source::Merged { .. }) {
                return Err(Error::unsupported(
                    &ad.path,
                    &r.name,
                    "a modules_to_save weight replaces a tensor that another adapter also changes",
                ));
            }
            t.source = r.source.clone();
        }
        for m in &ad.modules {
            if m.kind == ModuleKind::Embedding && m.target != EMBED {
                return Err(Error::unsupported(
                    &ad.path,
                    &m.a.name,
                    "embedding LoRA on a module that is not the token embedding",
                ));
            }
            let scale = (m.scale * *weight as f64) as f32;
            let t = model.tensor_mut(&m.target).expect("checked");
            add_delta(
                t,
                Delta::LowRank {
                    a: m.a.clone(),
                    b: m.b.clone(),
                    scale,
                    transpose: m.kind == ModuleKind::Embedding,
                },
                m.magnitude.clone(),
            );
            if let Some(bias) = &m.bias {
                let bname = m.target.trim_end_matches(".weight").to_string() + ".bias";
                let t = model.tensor_mut(&bname).expect("checked");
                add_delta(
                    t,
                    Delta::Dense {
                        t: bias.clone(),
                        scale,
                    },
                    None,
                );
            }
        }
    }
    Ok(())
}

fn add_delta(t: &mut Tensor, delta: Delta, magnitude: Option<Tensor>) {
    let mag = magnitude.map(Box::new);
    match &mut t.source {
        Source::Merged { deltas, .. } => deltas.push(delta),
        other => {
            let base = std::mem::replace(other, Source::Owned(Default::default()));
            *other = Source::Merged {
                base: Box::new(base),
                deltas: vec![delta],
                magnitude: mag,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_patterns_match_at_module_boundaries() {
        assert!(pattern_matches("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(pattern_matches(
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.q_proj"
        ));
        assert!(!pattern_matches("proj", "model.layers.0.self_attn.q_proj"));
        assert!(pattern_matches(
            r"layers\.1\..*v_proj",
            "model.layers.1.self_attn.v_proj"
        ));
    }

    #[test]
    fn adapter_keys_split_into_module_and_part() {
        assert_eq!(
            split_key("model.layers.0.self_attn.q_proj.lora_A.weight"),
            ("model.layers.0.self_attn.q_proj", "lora_A.weight")
        );
        assert_eq!(
            split_key("model.embed_tokens.lora_embedding_B"),
            ("model.embed_tokens", "lora_embedding_B")
        );
        assert_eq!(split_key("lm_head.weight"), ("lm_head.weight", ""));
    }

    /// An adapter folder with one rank-2 pair on q_proj and `cfg` as its config.
    fn adapter(cfg: serde_json::Value) -> tempfile::TempDir {
        use safetensors::tensor::{Dtype, TensorView};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        let a = vec![0u8; 2 * 4 * 4];
        let b = vec![0u8; 4 * 2 * 4];
        let m = "base_model.model.model.layers.0.self_attn.q_proj";
        let views = vec![
            (
                format!("{m}.lora_A.weight"),
                TensorView::new(Dtype::F32, vec![2, 4], &a).unwrap(),
            ),
            (
                format!("{m}.lora_B.weight"),
                TensorView::new(Dtype::F32, vec![4, 2], &b).unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.path().join("adapter_model.safetensors"), bytes).unwrap();
        dir
    }

    #[test]
    fn config_values_of_the_wrong_type_are_refused_by_field_never_defaulted() {
        let good = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 16});
        let a = load_adapter(adapter(good.clone()).path()).unwrap();
        assert_eq!(a.modules[0].scale, 8.0);
        let rs = load_adapter(
            adapter(serde_json::json!({"r": 2, "lora_alpha": 16, "use_rslora": true})).path(),
        )
        .unwrap();
        assert_eq!(rs.modules[0].scale, 16.0 / 2f64.sqrt());
        let refused = |key: &str, v: serde_json::Value, field: &str| {
            let mut cfg = good.clone();
            cfg[key] = v;
            let e = match load_adapter(adapter(cfg).path()) {
                Ok(_) => panic!("{key}: accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains("adapter_config.json") && e.contains(field),
                "{key}: {e}"
            );
        };
        // PEFT would scale by 32 / 2; a default of 8 would have merged a quarter of it.
        refused("lora_alpha", "32".into(), "lora_alpha");
        refused("r", "2".into(), "r");
        refused("use_rslora", "true".into(), "use_rslora");
        refused("use_dora", 1.into(), "use_dora");
        refused("peft_type", 3.into(), "peft_type");
        refused(
            "alpha_pattern",
            serde_json::json!({"q_proj": "4"}),
            "alpha_pattern.q_proj",
        );
        refused("rank_pattern", serde_json::json!([2]), "rank_pattern");
    }
}
