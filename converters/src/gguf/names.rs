//! llama.cpp's names and layouts: HF <-> GGUF tensor names, the rotary row permutation of
//! llama-arch Q/K weights, and the hyperparameter keys with the exact value types llama.cpp
//! checks (shared/facts/gguf.md §2).

use std::path::Path;

use super::value::{Metadata, Value};
use crate::error::{Error, Result};
use crate::model::names::{parse_layer_name, EMBED, FINAL_NORM, LM_HEAD};
use crate::model::{Arch, ModelConfig};

/// HF parameter name -> GGUF tensor name.
pub fn hf_to_gguf(name: &str) -> Option<String> {
    match name {
        EMBED => return Some("token_embd.weight".into()),
        FINAL_NORM => return Some("output_norm.weight".into()),
        LM_HEAD => return Some("output.weight".into()),
        _ => {}
    }
    let (l, module, suffix) = parse_layer_name(name)?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        // Phi-3's fused [gate; up] is llama.cpp's ffn_up with 2·n_ff rows.
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{l}.{g}.{suffix}"))
}

/// GGUF tensor name -> HF parameter name, for an architecture.
pub fn gguf_to_hf(name: &str, arch: Arch) -> Option<String> {
    match name {
        "token_embd.weight" => return Some(EMBED.into()),
        "output_norm.weight" => return Some(FINAL_NORM.into()),
        "output.weight" => return Some(LM_HEAD.into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (l, rest) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let (g, suffix) = rest.rsplit_once('.')?;
    let m = match (g, arch) {
        ("attn_norm", _) => "input_layernorm",
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_qkv", Arch::Phi3) => "self_attn.qkv_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("ffn_norm", _) => "post_attention_layernorm",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", Arch::Phi3) => "mlp.gate_up_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{l}.{m}.{suffix}"))
}

/// Tensors llama.cpp generates at conversion time that have no HF parameter.
pub fn is_generated(name: &str) -> bool {
    matches!(
        name,
        "rope_freqs.weight" | "rope_factors_long.weight" | "rope_factors_short.weight"
    )
}

/// How many heads a tensor's rows are permuted over, if llama.cpp permutes it: llama-arch Q
/// (n_head) and K (n_head_kv) weights and biases. Qwen2 and Phi-3 use NEOX rope: no permutation.
pub fn rope_permute_heads(hf_name: &str, c: &ModelConfig) -> Option<usize> {
    if c.arch != Arch::Llama {
        return None;
    }
    let (_, module, _) = parse_layer_name(hf_name)?;
    match module {
        "self_attn.q_proj" => Some(c.num_attention_heads),
        "self_attn.k_proj" => Some(c.num_key_value_heads),
        _ => None,
    }
}

/// Row order llama.cpp stores for HF rows: GGUF row `i` is HF row `perm[i]`. Within each
/// head the first and second halves are interleaved (r0, r(h/2), r1, r(h/2+1), ...).
pub fn rope_permutation(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut perm = Vec::with_capacity(rows);
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                perm.push(h * hd + j * half + i);
            }
        }
    }
    perm
}

/// The inverse: HF row `i` is GGUF row `inv[i]`.
pub fn rope_unpermutation(rows: usize, n_head: usize) -> Vec<usize> {
    let perm = rope_permutation(rows, n_head);
    let mut inv = vec![0; rows];
    for (g, &h) in perm.iter().enumerate() {
        inv[h] = g;
    }
    inv
}

/// Llama 3 rope scaling as llama.cpp's converter encodes it: the `rope_freqs.weight` tensor of
/// head_dim/2 per-frequency divisors (facts §2.2).
pub fn llama3_rope_freqs(c: &ModelConfig) -> Option<Vec<f32>> {
    let r = c.rope_scaling.as_ref()?;
    if c.rope_type().as_deref() != Some("llama3") {
        return None;
    }
    let get = |k: &str, d: f64| r.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let factor = get("factor", 8.0);
    let low = get("low_freq_factor", 1.0);
    let high = get("high_freq_factor", 4.0);
    let old_ctx = get("original_max_position_embeddings", 8192.0);
    let dim = c.head_dim as f64;
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    let mut out = Vec::with_capacity(c.head_dim / 2);
    for i in (0..c.head_dim).step_by(2) {
        let freq = 1.0 / c.rope_theta.powf(i as f64 / dim);
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let v = if wavelen < high_wavelen {
            1.0
        } else if wavelen > low_wavelen {
            factor
        } else {
            let smooth = (old_ctx / wavelen - low) / (high - low);
            1.0 / ((1.0 - smooth) / factor + smooth)
        };
        out.push(v as f32);
    }
    Some(out)
}

/// The `{arch}.*` hyperparameter keys, typed as llama.cpp's loader demands (UINT32 counts,
/// FLOAT32 eps/theta).
pub fn hparams_metadata(c: &ModelConfig, src: &Path) -> Result<Metadata> {
    let a = c.arch.gguf_name();
    let mut m = Metadata::new();
    let u = |v: usize| Value::U32(v as u32);
    m.set(format!("{a}.context_length"), u(c.max_position_embeddings));
    m.set(format!("{a}.embedding_length"), u(c.hidden_size));
    m.set(format!("{a}.feed_forward_length"), u(c.intermediate_size));
    m.set(format!("{a}.block_count"), u(c.num_hidden_layers));
    m.set(
        format!("{a}.attention.head_count"),
        u(c.num_attention_heads),
    );
    m.set(
        format!("{a}.attention.head_count_kv"),
        u(c.num_key_value_heads),
    );
    m.set(
        format!("{a}.rope.freq_base"),
        Value::F32(c.rope_theta as f32),
    );
    m.set(
        format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(c.rms_norm_eps as f32),
    );
    // llama.cpp's converter writes these whenever transformers' config has `head_dim`, which
    // for current transformers is every Llama config (it fills the default in). A config read
    // from a GGUF (`raw` is None unless it had key_length) keeps what that file had.
    let explicit_head_dim = c.raw.as_ref().is_some_and(|r| r.get("head_dim").is_some())
        || c.head_dim != c.hidden_size / c.num_attention_heads
        || (c.arch == Arch::Llama && c.raw.is_some());
    if explicit_head_dim {
        m.set(format!("{a}.attention.key_length"), u(c.head_dim));
        m.set(format!("{a}.attention.value_length"), u(c.head_dim));
    }
    match c.rope_type().as_deref() {
        None | Some("default") | Some("llama3") => {}
        Some("linear") => {
            let f = factor(c, src)?;
            m.set(
                format!("{a}.rope.scaling.type"),
                Value::String("linear".into()),
            );
            m.set(format!("{a}.rope.scaling.factor"), Value::F32(f));
        }
        Some("yarn") => {
            let f = factor(c, src)?;
            let orig = c
                .rope_scaling
                .as_ref()
                .and_then(|r| r.get("original_max_position_embeddings"))
                .and_then(|v| v.as_u64())
                .ok_or_else(|| {
                    Error::format(
                        src,
                        "rope_scaling.original_max_position_embeddings",
                        "missing",
                    )
                })?;
            m.set(
                format!("{a}.rope.scaling.type"),
                Value::String("yarn".into()),
            );
            m.set(format!("{a}.rope.scaling.factor"), Value::F32(f));
            m.set(
                format!("{a}.rope.scaling.original_context_length"),
                Value::U32(orig as u32),
            );
        }
        Some(other) => {
            return Err(Error::unsupported(
                src,
                "rope_scaling",
                format!("rope scaling type `{other}` is not supported by the GGUF exporter"),
            ))
        }
    }
    match c.arch {
        Arch::Llama => {
            m.set(format!("{a}.vocab_size"), u(c.vocab_size));
            m.set(format!("{a}.rope.dimension_count"), u(c.head_dim));
        }
        Arch::Qwen2 => {}
        Arch::Phi3 => {
            m.set(format!("{a}.rope.dimension_count"), u(c.head_dim));
            let orig = c
                .original_max_position_embeddings
                .unwrap_or(c.max_position_embeddings);
            m.set(format!("{a}.rope.scaling.original_context_length"), u(orig));
            m.set(
                format!("{a}.attention.sliding_window"),
                u(c.sliding_window.unwrap_or(0)),
            );
        }
    }
    Ok(m)
}

fn factor(c: &ModelConfig, src: &Path) -> Result<f32> {
    c.rope_scaling
        .as_ref()
        .and_then(|r| r.get("factor"))
        .and_then(|v| v.as_f64())
        .map(|f| f as f32)
        .ok_or_else(|| Error::format(src, "rope_scaling.factor", "missing"))
}

fn need(m: &Metadata, key: &str, src: &Path) -> Result<usize> {
    opt_count(m, key, src)?.ok_or_else(|| Error::format(src, key, "missing"))
}

/// An optional count: absent is `None`; present, it must be a non-negative integer.
fn opt_count(m: &Metadata, key: &str, src: &Path) -> Result<Option<usize>> {
    let Some(v) = m.get(key) else {
        return Ok(None);
    };
    let n = match v {
        Value::U64(u) => usize::try_from(*u).ok(),
        other => other.as_i64().and_then(|i| usize::try_from(i).ok()),
    };
    n.map(Some).ok_or_else(|| {
        Error::format(
            src,
            key,
            format!("must be a non-negative integer, found {v}"),
        )
    })
}

/// An optional number (float or integer): absent is `None`; present, it must be numeric.
fn opt_f64(m: &Metadata, key: &str, src: &Path) -> Result<Option<f64>> {
    match m.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::format(src, key, format!("must be a number, found {v}"))),
    }
}

/// The config.json field of a [`ModelConfig`] size -> the GGUF key (or tensor) it comes from.
fn gguf_key(a: &str, field: &str) -> String {
    match field {
        "hidden_size" => format!("{a}.embedding_length"),
        "intermediate_size" => format!("{a}.feed_forward_length"),
        "num_attention_heads" => format!("{a}.attention.head_count"),
        "num_key_value_heads" => format!("{a}.attention.head_count_kv"),
        "head_dim" => format!("{a}.attention.key_length"),
        "vocab_size" => "token_embd.weight".into(),
        other => other.into(),
    }
}

/// Rebuilds a config from GGUF metadata; `vocab_size` is the embedding's row count.
pub fn config_from_metadata(m: &Metadata, vocab_size: usize, src: &Path) -> Result<ModelConfig> {
    let a = m
        .get_str("general.architecture")
        .ok_or_else(|| Error::format(src, "general.architecture", "missing"))?;
    let arch = Arch::from_gguf_name(a).ok_or_else(|| {
        Error::unsupported(
            src,
            "general.architecture",
            format!("unknown architecture `{a}` (supported: llama, qwen2, phi3)"),
        )
    })?;
    let hidden = need(m, &format!("{a}.embedding_length"), src)?;
    let n_head = need(m, &format!("{a}.attention.head_count"), src)?;
    if n_head == 0 {
        return Err(Error::format(
            src,
            format!("{a}.attention.head_count"),
            "is 0",
        ));
    }
    let n_head_kv = opt_count(m, &format!("{a}.attention.head_count_kv"), src)?.unwrap_or(n_head);
    let head_dim = match opt_count(m, &format!("{a}.attention.key_length"), src)? {
        Some(d) => d,
        None if hidden % n_head != 0 => {
            return Err(Error::format(
                src,
                format!("{a}.attention.head_count"),
                format!("{n_head} does not divide {a}.embedding_length {hidden}"),
            ))
        }
        None => hidden / n_head,
    };
    let eps_key = format!("{a}.attention.layer_norm_rms_epsilon");
    let eps = opt_f64(m, &eps_key, src)?.ok_or_else(|| Error::format(src, &eps_key, "missing"))?;
    let scaling_key = format!("{a}.rope.scaling.type");
    let scaling_type = match m.get(&scaling_key) {
        None => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(v) => {
            return Err(Error::format(
                src,
                scaling_key,
                format!("must be a string, found {v}"),
            ))
        }
    };
    let orig_ctx = opt_count(m, &format!("{a}.rope.scaling.original_context_length"), src)?;
    let rope_scaling = match scaling_type.as_deref() {
        Some("linear") | Some("yarn") => {
            let f = opt_f64(m, &format!("{a}.rope.scaling.factor"), src)?.unwrap_or(1.0);
            let mut r = serde_json::json!({"rope_type": scaling_type, "factor": f});
            if let Some(o) = orig_ctx {
                r["original_max_position_embeddings"] = serde_json::json!(o);
            }
            Some(r)
        }
        _ => None,
    };
    let key_present = m.get(&format!("{a}.attention.key_length")).is_some();
    let mut raw = serde_json::json!({});
    if key_present {
        raw["head_dim"] = serde_json::json!(head_dim);
    }
    let config = ModelConfig {
        arch,
        hidden_size: hidden,
        intermediate_size: need(m, &format!("{a}.feed_forward_length"), src)?,
        num_hidden_layers: need(m, &format!("{a}.block_count"), src)?,
        num_attention_heads: n_head,
        num_key_value_heads: n_head_kv,
        head_dim,
        vocab_size,
        max_position_embeddings: need(m, &format!("{a}.context_length"), src)?,
        rms_norm_eps: eps as f32 as f64,
        rope_theta: opt_f64(m, &format!("{a}.rope.freq_base"), src)?.unwrap_or(10000.0),
        tie_word_embeddings: false,
        rope_scaling,
        original_max_position_embeddings: if arch == Arch::Phi3 { orig_ctx } else { None },
        sliding_window: opt_count(m, &format!("{a}.attention.sliding_window"), src)?
            .filter(|v| *v > 0),
        torch_dtype: None,
        raw: key_present.then_some(raw),
    };
    config.check_sizes(src, |field| gguf_key(a, field))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::value::Array;

    /// The metadata of a 2-layer llama with hidden 64, 4 heads, 2 KV heads.
    fn llama_metadata() -> Metadata {
        let mut m = Metadata::new();
        m.set("general.architecture", Value::String("llama".into()));
        for (k, v) in [
            ("embedding_length", 64),
            ("feed_forward_length", 128),
            ("block_count", 2),
            ("context_length", 2048),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 2),
        ] {
            m.set(format!("llama.{k}"), Value::U32(v));
        }
        m.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
        m
    }

    fn config_err(m: &Metadata) -> String {
        config_from_metadata(m, 100, Path::new("m.gguf"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn valid_metadata_gives_the_config() {
        let c = config_from_metadata(&llama_metadata(), 100, Path::new("m.gguf")).unwrap();
        assert_eq!((c.num_attention_heads, c.num_key_value_heads), (4, 2));
        assert_eq!(c.head_dim, 16);
    }

    #[test]
    fn zero_kv_heads_is_an_error_naming_the_file_and_key() {
        let mut m = llama_metadata();
        m.set("llama.attention.head_count_kv", Value::U32(0));
        let err = config_err(&m);
        assert!(
            err.contains("m.gguf: llama.attention.head_count_kv: is 0"),
            "{err}"
        );
    }

    #[test]
    fn head_counts_that_do_not_divide_are_errors_naming_the_key() {
        let mut m = llama_metadata();
        m.set("llama.attention.head_count_kv", Value::U32(3));
        let err = config_err(&m);
        assert!(err.contains("llama.attention.head_count_kv"), "{err}");
        assert!(err.contains("does not divide"), "{err}");
        let mut m = llama_metadata();
        m.set("llama.attention.head_count", Value::U32(5));
        m.set("llama.attention.head_count_kv", Value::U32(5));
        let err = config_err(&m);
        assert!(err.contains("m.gguf: llama.attention.head_count:"), "{err}");
        assert!(err.contains("does not divide"), "{err}");
    }

    #[test]
    fn zero_sizes_and_odd_head_dims_are_errors_naming_the_key() {
        for (key, value, want) in [
            (
                "llama.attention.head_count",
                0,
                "llama.attention.head_count: is 0",
            ),
            ("llama.embedding_length", 0, "llama.embedding_length: is 0"),
            (
                "llama.feed_forward_length",
                0,
                "llama.feed_forward_length: is 0",
            ),
            (
                "llama.attention.key_length",
                0,
                "llama.attention.key_length: is 0",
            ),
            (
                "llama.attention.key_length",
                15,
                "llama.attention.key_length: 15 is odd",
            ),
        ] {
            let mut m = llama_metadata();
            m.set(key, Value::U32(value));
            let err = config_err(&m);
            assert!(err.contains(want), "{key}={value}: {err}");
        }
        let err = config_from_metadata(&llama_metadata(), 0, Path::new("m.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("token_embd.weight: is 0"), "{err}");
    }

    #[test]
    fn negative_or_non_integer_head_counts_are_errors_not_defaults() {
        let mut m = llama_metadata();
        m.set("llama.attention.head_count_kv", Value::I32(-1));
        let err = config_err(&m);
        assert!(err.contains("llama.attention.head_count_kv"), "{err}");
        assert!(err.contains("non-negative integer, found -1"), "{err}");
        let mut m = llama_metadata();
        m.set(
            "llama.attention.head_count_kv",
            Value::Array(Array::U32(vec![2, 2])),
        );
        let err = config_err(&m);
        assert!(err.contains("llama.attention.head_count_kv"), "{err}");
        assert!(err.contains("non-negative integer"), "{err}");
    }

    #[test]
    fn present_keys_of_the_wrong_type_are_errors_not_defaults() {
        for key in [
            "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon",
            "llama.rope.scaling.factor",
            "llama.rope.scaling.original_context_length",
            "llama.attention.sliding_window",
            "llama.context_length",
        ] {
            let mut m = llama_metadata();
            m.set("llama.rope.scaling.type", Value::String("linear".into()));
            m.set(key, Value::String("100000".into()));
            let err = config_err(&m);
            assert!(err.contains(&format!("m.gguf: {key}: must be ")), "{err}");
        }
        let mut m = llama_metadata();
        m.set("llama.rope.scaling.type", Value::U32(1));
        let err = config_err(&m);
        assert!(
            err.contains("llama.rope.scaling.type: must be a string"),
            "{err}"
        );
    }

    #[test]
    fn rope_permutation_interleaves_head_halves_like_llama_cpp() {
        // 2 heads of 4 rows: llama.cpp's reshape(n_head, 2, hd/2).swapaxes(1, 2).
        assert_eq!(rope_permutation(8, 2), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        let inv = rope_unpermutation(8, 2);
        let perm = rope_permutation(8, 2);
        for i in 0..8 {
            assert_eq!(perm[inv[i]], i);
        }
    }

    #[test]
    fn names_map_both_ways_for_every_arch() {
        for (hf, g, arch) in [
            (
                "model.layers.3.self_attn.q_proj.weight",
                "blk.3.attn_q.weight",
                Arch::Llama,
            ),
            (
                "model.layers.0.self_attn.k_proj.bias",
                "blk.0.attn_k.bias",
                Arch::Qwen2,
            ),
            (
                "model.layers.1.self_attn.qkv_proj.weight",
                "blk.1.attn_qkv.weight",
                Arch::Phi3,
            ),
            (
                "model.layers.1.mlp.gate_up_proj.weight",
                "blk.1.ffn_up.weight",
                Arch::Phi3,
            ),
            (
                "model.layers.1.mlp.up_proj.weight",
                "blk.1.ffn_up.weight",
                Arch::Llama,
            ),
            ("lm_head.weight", "output.weight", Arch::Llama),
        ] {
            assert_eq!(hf_to_gguf(hf).as_deref(), Some(g));
            assert_eq!(gguf_to_hf(g, arch).as_deref(), Some(hf));
        }
    }
}
