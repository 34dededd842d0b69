//! The architecture and hyperparameters of a model, read from Hugging Face `config.json` or
//! from GGUF metadata, and written back to either.

use std::path::Path;

use serde_json::{json, Value as Json};

use crate::error::{Error, Result};

/// Decoder families edgepack understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3.x, TinyLlama, SmolLM/SmolLM2, Mistral (`LlamaForCausalLM`, `MistralForCausalLM`).
    Llama,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): q/k/v biases.
    Qwen2,
    /// Phi-3 (`Phi3ForCausalLM`): fused qkv_proj and gate_up_proj.
    Phi3,
}

impl Arch {
    /// `general.architecture` in GGUF.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Phi3 => "phi3",
        }
    }

    pub fn from_gguf_name(s: &str) -> Option<Arch> {
        match s {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "phi3" => Some(Arch::Phi3),
            _ => None,
        }
    }

    /// The `architectures[0]` of config.json that transformers loads this as.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// `model_type` of config.json.
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Phi3 => "phi3",
        }
    }

    fn from_hf_class(s: &str) -> Option<Arch> {
        match s {
            "LlamaForCausalLM" | "MistralForCausalLM" => Some(Arch::Llama),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "Phi3ForCausalLM" => Some(Arch::Phi3),
            _ => None,
        }
    }

    pub const SUPPORTED_HF: &'static str =
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM";
}

/// The hyperparameters every part of edgepack needs, plus the original config for round trips.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// `rope_scaling` as config.json has it (llama3, linear, yarn, longrope), if any.
    pub rope_scaling: Option<Json>,
    /// Phi-3's `original_max_position_embeddings`.
    pub original_max_position_embeddings: Option<usize>,
    pub sliding_window: Option<usize>,
    /// `torch_dtype` / `dtype` of the checkpoint.
    pub torch_dtype: Option<String>,
    /// The config.json as read (HF sources); exports keep unknown keys from here.
    pub raw: Option<Json>,
}

/// The JSON type a config.json field must have when it is present.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Count,
    Number,
    Bool,
    Str,
    Object,
    Numbers,
}

impl Kind {
    fn holds(self, v: &Json) -> bool {
        match self {
            Kind::Count => v.as_u64().is_some_and(|u| usize::try_from(u).is_ok()),
            Kind::Number => v.is_number(),
            Kind::Bool => v.is_boolean(),
            Kind::Str => v.is_string(),
            Kind::Object => v.is_object(),
            Kind::Numbers => v.as_array().is_some_and(|a| a.iter().all(Json::is_number)),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Count => "a non-negative integer",
            Kind::Number => "a number",
            Kind::Bool => "true or false",
            Kind::Str => "a string",
            Kind::Object => "an object",
            Kind::Numbers => "an array of numbers",
        }
    }
}

/// Fields edgepack reads from config.json outside [`ModelConfig::from_hf_json`]'s own fields
/// (the raw config and `rope_scaling` are read again by the forward pass and the exporters):
/// their types are checked once, here, so no reader falls back to a default for a value of
/// the wrong type.
const OTHER_FIELDS: &[(&str, Kind)] = &[
    ("partial_rotary_factor", Kind::Number),
    ("use_sliding_window", Kind::Bool),
    ("rope_scaling.rope_type", Kind::Str),
    ("rope_scaling.type", Kind::Str),
    ("rope_scaling.factor", Kind::Number),
    ("rope_scaling.low_freq_factor", Kind::Number),
    ("rope_scaling.high_freq_factor", Kind::Number),
    ("rope_scaling.original_max_position_embeddings", Kind::Count),
    ("rope_scaling.attention_factor", Kind::Number),
    ("rope_scaling.beta_fast", Kind::Number),
    ("rope_scaling.beta_slow", Kind::Number),
    ("rope_scaling.long_factor", Kind::Numbers),
    ("rope_scaling.short_factor", Kind::Numbers),
];

/// Field `key` of config.json (`a.b` for a field of an object field) if present; null counts
/// as absent, as transformers treats it. A present value of the wrong type is an error naming
/// the file and the field.
fn field<'a>(cfg: &'a Json, key: &str, kind: Kind, path: &Path) -> Result<Option<&'a Json>> {
    let mut v = Some(cfg);
    for part in key.split('.') {
        v = v.and_then(|o| o.get(part)).filter(|v| !v.is_null());
    }
    typed(v, kind, path, key)
}

/// `v`, the value of `field` in the JSON file `path`, if present; null counts as absent. A
/// present value of the wrong type is an error naming the file and the field.
pub(crate) fn typed<'a>(
    v: Option<&'a Json>,
    kind: Kind,
    path: &Path,
    field: &str,
) -> Result<Option<&'a Json>> {
    match v.filter(|v| !v.is_null()) {
        Some(v) if !kind.holds(v) => Err(Error::format(
            path,
            field,
            format!("must be {}, found {v}", kind.describe()),
        )),
        v => Ok(v),
    }
}

fn opt_usize(cfg: &Json, key: &str, path: &Path) -> Result<Option<usize>> {
    Ok(field(cfg, key, Kind::Count, path)?
        .and_then(Json::as_u64)
        .map(|v| v as usize))
}

fn req_usize(cfg: &Json, key: &str, path: &Path) -> Result<usize> {
    opt_usize(cfg, key, path)?.ok_or_else(|| Error::format(path, key, "missing"))
}

fn opt_f64(cfg: &Json, key: &str, path: &Path) -> Result<Option<f64>> {
    Ok(field(cfg, key, Kind::Number, path)?.and_then(Json::as_f64))
}

fn opt_str(cfg: &Json, key: &str, path: &Path) -> Result<Option<String>> {
    Ok(field(cfg, key, Kind::Str, path)?
        .and_then(Json::as_str)
        .map(str::to_owned))
}

impl ModelConfig {
    /// Reads config.json. `path` names the file in errors. Absent (or null) optional fields
    /// take transformers' defaults (`num_key_value_heads` = `num_attention_heads`, `head_dim`
    /// = `hidden_size / num_attention_heads`, `rope_theta` 10000, `max_position_embeddings`
    /// 2048, `tie_word_embeddings` false); a present field of the wrong JSON type is an error.
    pub fn from_hf_json(cfg: &Json, path: &Path) -> Result<ModelConfig> {
        if !cfg.is_object() {
            return Err(Error::format(path, "json", "must be an object"));
        }
        let class = cfg
            .get("architectures")
            .and_then(Json::as_array)
            .and_then(|a| a.first())
            .and_then(Json::as_str)
            .ok_or_else(|| {
                Error::format(
                    path,
                    "architectures",
                    "missing or not a list of class names",
                )
            })?;
        let arch = Arch::from_hf_class(class).ok_or_else(|| {
            Error::unsupported(
                path,
                "architectures",
                format!(
                    "unknown architecture `{class}` (supported: {})",
                    Arch::SUPPORTED_HF
                ),
            )
        })?;
        for (key, kind) in OTHER_FIELDS {
            field(cfg, key, *kind, path)?;
        }
        let hidden_size = req_usize(cfg, "hidden_size", path)?;
        let num_attention_heads = req_usize(cfg, "num_attention_heads", path)?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(Error::format(
                path,
                "num_attention_heads",
                format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        let num_key_value_heads =
            opt_usize(cfg, "num_key_value_heads", path)?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::format(
                path,
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim =
            opt_usize(cfg, "head_dim", path)?.unwrap_or(hidden_size / num_attention_heads);
        let rope_scaling = field(cfg, "rope_scaling", Kind::Object, path)?.cloned();
        field(cfg, "rope_parameters", Kind::Object, path)?;
        let rope_theta = match opt_f64(cfg, "rope_theta", path)? {
            Some(t) => t,
            None => opt_f64(cfg, "rope_parameters.rope_theta", path)?.unwrap_or(10000.0),
        };
        let torch_dtype = match opt_str(cfg, "torch_dtype", path)? {
            Some(d) => Some(d),
            None => opt_str(cfg, "dtype", path)?,
        };
        let config = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: req_usize(cfg, "intermediate_size", path)?,
            num_hidden_layers: req_usize(cfg, "num_hidden_layers", path)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: req_usize(cfg, "vocab_size", path)?,
            max_position_embeddings: opt_usize(cfg, "max_position_embeddings", path)?
                .unwrap_or(2048),
            rms_norm_eps: opt_f64(cfg, "rms_norm_eps", path)?
                .ok_or_else(|| Error::format(path, "rms_norm_eps", "missing"))?,
            rope_theta,
            tie_word_embeddings: field(cfg, "tie_word_embeddings", Kind::Bool, path)?
                .and_then(Json::as_bool)
                .unwrap_or(false),
            rope_scaling,
            original_max_position_embeddings: opt_usize(
                cfg,
                "original_max_position_embeddings",
                path,
            )?,
            sliding_window: opt_usize(cfg, "sliding_window", path)?,
            torch_dtype,
            raw: Some(cfg.clone()),
        };
        config.check_sizes(path, str::to_owned)?;
        Ok(config)
    }

    /// config.json for this model: the original with the fields edgepack knows updated, or a
    /// fresh one that transformers loads.
    pub fn to_hf_json(&self, dtype: &str) -> Json {
        let mut cfg = self.raw.clone().unwrap_or_else(|| json!({}));
        let obj = cfg.as_object_mut().expect("config.json is an object");
        let mut set = |k: &str, v: Json| {
            obj.insert(k.to_string(), v);
        };
        set("architectures", json!([self.arch.hf_class()]));
        set("model_type", json!(self.arch.hf_model_type()));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size));
        set("num_hidden_layers", json!(self.num_hidden_layers));
        set("num_attention_heads", json!(self.num_attention_heads));
        set("num_key_value_heads", json!(self.num_key_value_heads));
        set("vocab_size", json!(self.vocab_size));
        set(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set("rope_theta", json!(self.rope_theta));
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        set("torch_dtype", json!(dtype));
        if self.head_dim != self.hidden_size / self.num_attention_heads
            || self
                .raw
                .as_ref()
                .is_some_and(|r| r.get("head_dim").is_some())
        {
            set("head_dim", json!(self.head_dim));
        }
        if let Some(r) = &self.rope_scaling {
            set("rope_scaling", r.clone());
        }
        if let Some(o) = self.original_max_position_embeddings {
            set("original_max_position_embeddings", json!(o));
        }
        if self.raw.is_none() {
            set("hidden_act", json!("silu"));
            set("attention_bias", json!(self.arch == Arch::Qwen2));
            set("use_cache", json!(true));
            if let Some(w) = self.sliding_window {
                set("sliding_window", json!(w));
            }
        }
        cfg
    }

    /// Checks the sizes every shape, head split and rotary permutation divide or multiply by:
    /// they are positive, the KV heads divide the heads, head_dim is even (rotary pairs) and no
    /// projection's row count overflows. `key` maps a config.json field name to the name
    /// `path` gives it, so the error names the field as the file has it.
    pub fn check_sizes(&self, path: &Path, key: impl Fn(&str) -> String) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::format(path, key(field), "is 0; it must be positive"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::format(
                path,
                key("num_key_value_heads"),
                format!(
                    "{} does not divide the {} attention heads",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::format(
                path,
                key("head_dim"),
                format!(
                    "{} is odd; rotary embeddings rotate pairs of dimensions",
                    self.head_dim
                ),
            ));
        }
        let q = self.num_attention_heads.checked_mul(self.head_dim);
        let kv = self.num_key_value_heads.checked_mul(self.head_dim);
        let qkv = q
            .zip(kv)
            .and_then(|(q, kv)| kv.checked_mul(2).and_then(|kv2| q.checked_add(kv2)));
        if qkv.is_none() {
            return Err(Error::format(
                path,
                key("head_dim"),
                format!(
                    "{} heads of {} dimensions overflow",
                    self.num_attention_heads, self.head_dim
                ),
            ));
        }
        if self.intermediate_size.checked_mul(2).is_none() {
            return Err(Error::format(
                path,
                key("intermediate_size"),
                format!("{} overflows", self.intermediate_size),
            ));
        }
        Ok(())
    }

    pub fn n_embd_kv(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    pub fn n_embd_q(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// The rope scaling type string, if the config has one.
    pub fn rope_type(&self) -> Option<String> {
        let r = self.rope_scaling.as_ref()?;
        r.get("rope_type")
            .or_else(|| r.get("type"))
            .and_then(Json::as_str)
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_is_refused_naming_the_field() {
        let cfg = json!({"architectures": ["GPT2LMHeadModel"]});
        let err = ModelConfig::from_hf_json(&cfg, Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m/config.json: architectures"), "{err}");
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
    }

    fn tiny_llama() -> Json {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5})
    }

    #[test]
    fn zero_sizes_and_odd_head_dims_are_errors_naming_the_field() {
        for (field, value, want) in [
            ("hidden_size", json!(0), "config.json: hidden_size: is 0"),
            (
                "num_key_value_heads",
                json!(0),
                "config.json: num_key_value_heads:",
            ),
            (
                "num_key_value_heads",
                json!(3),
                "config.json: num_key_value_heads:",
            ),
            ("head_dim", json!(0), "config.json: head_dim: is 0"),
            ("head_dim", json!(7), "config.json: head_dim: 7 is odd"),
            (
                "intermediate_size",
                json!(0),
                "config.json: intermediate_size: is 0",
            ),
            ("vocab_size", json!(0), "config.json: vocab_size: is 0"),
            ("head_dim", json!(1u64 << 62), "config.json: head_dim:"),
        ] {
            let mut cfg = tiny_llama();
            cfg[field] = value.clone();
            let err = ModelConfig::from_hf_json(&cfg, Path::new("m/config.json"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{field}={value}: {err}");
        }
    }

    #[test]
    fn present_fields_of_the_wrong_type_are_errors_naming_the_field() {
        for (field, value) in [
            ("rope_theta", json!("100000")),
            ("max_position_embeddings", json!("8192")),
            ("max_position_embeddings", json!(8192.5)),
            ("rms_norm_eps", json!("1e-5")),
            ("vocab_size", json!("100")),
            ("hidden_size", json!(-64)),
            ("num_key_value_heads", json!(2.5)),
            ("head_dim", json!("16")),
            ("tie_word_embeddings", json!("true")),
            ("tie_word_embeddings", json!(1)),
            ("torch_dtype", json!(16)),
            ("sliding_window", json!(true)),
            ("original_max_position_embeddings", json!("4096")),
            ("rope_scaling", json!("llama3")),
            ("partial_rotary_factor", json!("0.5")),
            ("use_sliding_window", json!("yes")),
        ] {
            let mut cfg = tiny_llama();
            cfg[field] = value.clone();
            let err = ModelConfig::from_hf_json(&cfg, Path::new("m/config.json"))
                .unwrap_err()
                .to_string();
            let want = format!("m/config.json: {field}: must be ");
            assert!(err.contains(&want), "{field}={value}: {err}");
            assert!(err.contains(&value.to_string()), "{field}={value}: {err}");
        }
    }

    #[test]
    fn nested_rope_fields_of_the_wrong_type_are_errors_naming_the_field() {
        for (rope, field) in [
            (
                json!({"rope_scaling": {"rope_type": "llama3", "factor": "8"}}),
                "rope_scaling.factor",
            ),
            (
                json!({"rope_scaling": {"rope_type": 3}}),
                "rope_scaling.rope_type",
            ),
            (
                json!({"rope_scaling": {"type": "longrope", "long_factor": ["1"]}}),
                "rope_scaling.long_factor",
            ),
            (
                json!({"rope_scaling": {"rope_type": "llama3",
                    "original_max_position_embeddings": 8192.5}}),
                "rope_scaling.original_max_position_embeddings",
            ),
            (
                json!({"rope_parameters": {"rope_theta": "500000"}}),
                "rope_parameters.rope_theta",
            ),
            (json!({"rope_parameters": 500000}), "rope_parameters"),
        ] {
            let mut cfg = tiny_llama();
            for (k, v) in rope.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            let err = ModelConfig::from_hf_json(&cfg, Path::new("m/config.json"))
                .unwrap_err()
                .to_string();
            let want = format!("m/config.json: {field}: must be ");
            assert!(err.contains(&want), "{rope}: {err}");
        }
    }

    #[test]
    fn absent_or_null_optional_fields_keep_their_documented_defaults() {
        let mut cfg = tiny_llama();
        for k in [
            "rope_theta",
            "max_position_embeddings",
            "tie_word_embeddings",
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
            "rope_scaling",
            "torch_dtype",
        ] {
            cfg[k] = Json::Null;
        }
        let c = ModelConfig::from_hf_json(&cfg, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.max_position_embeddings, 2048);
        assert!(!c.tie_word_embeddings);
        assert_eq!((c.num_key_value_heads, c.head_dim), (4, 16));
        assert_eq!((c.sliding_window, c.rope_scaling.is_none()), (None, true));
        cfg["rope_theta"] = json!(500000);
        cfg["rope_parameters"] = json!({"rope_theta": 1.0});
        let c = ModelConfig::from_hf_json(&cfg, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        cfg["rope_theta"] = Json::Null;
        let c = ModelConfig::from_hf_json(&cfg, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 1.0);
    }

    #[test]
    fn head_dim_defaults_from_hidden_size_and_heads() {
        let cfg = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5});
        let c = ModelConfig::from_hf_json(&cfg, Path::new("config.json")).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.n_embd_kv(), 32);
        assert_eq!(c.rope_theta, 10000.0);
    }
}
