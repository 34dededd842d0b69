//! Tiny random models for fast cases: the real architectures' tensor sets at toy sizes, with
//! deterministic values, written as Hugging Face folders. The tokenizer is SmolLM2's (the real
//! one, recovered from its GGUF), so every exporter sees a realistic vocabulary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
use serde_json::json;

/// Shape of a tiny model.
#[derive(Debug, Clone, Copy)]
pub struct Tiny {
    pub arch: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ff: usize,
    pub vocab: usize,
    pub tied: bool,
    pub dtype: Dtype,
    /// A SentencePiece tokenizer (Llama 2 / TinyLlama / Phi-3 style) instead of SmolLM2's BPE.
    pub spm: bool,
}

impl Tiny {
    /// A llama-arch toy whose rows divide into 256-element K-quant blocks.
    pub fn llama() -> Tiny {
        Tiny {
            arch: "llama",
            hidden: 256,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ff: 512,
            vocab: 49152,
            tied: true,
            dtype: Dtype::F32,
            spm: false,
        }
    }

    /// A Qwen2-style toy: the Llama toy with q/k/v biases, untied.
    pub fn qwen2() -> Tiny {
        Tiny {
            arch: "qwen2",
            tied: false,
            ..Tiny::llama()
        }
    }

    /// A Phi-3-style toy: fused projections, untied, SentencePiece tokenizer.
    pub fn phi3() -> Tiny {
        Tiny {
            arch: "phi3",
            tied: false,
            kv_heads: 4,
            vocab: SPM_VOCAB,
            spm: true,
            ..Tiny::llama()
        }
    }
}

/// Vocabulary of the SentencePiece fixture: 512 pieces, 5 added tokens, 3 filler rows.
pub const SPM_VOCAB: usize = 520;

/// xorshift64*: deterministic values without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // Roughly normal: sum of uniforms, centred.
        let u = |k: u32| ((v >> (k * 16)) & 0xffff) as f32 / 65535.0;
        (u(0) + u(1) + u(2) + u(3) - 2.0) * 1.7
    }
}

fn tensors_for(t: &Tiny) -> Vec<(String, Vec<usize>, f32)> {
    let hd = t.hidden / t.heads;
    let q = t.heads * hd;
    let kv = t.kv_heads * hd;
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![t.vocab, t.hidden],
        0.05,
    )];
    for l in 0..t.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        v.push((p("input_layernorm.weight"), vec![t.hidden], -1.0));
        v.push((p("post_attention_layernorm.weight"), vec![t.hidden], -1.0));
        let ws = 1.0 / (t.hidden as f32).sqrt();
        match t.arch {
            "phi3" => {
                v.push((
                    p("self_attn.qkv_proj.weight"),
                    vec![q + 2 * kv, t.hidden],
                    ws,
                ));
                v.push((p("mlp.gate_up_proj.weight"), vec![2 * t.ff, t.hidden], ws));
            }
            _ => {
                v.push((p("self_attn.q_proj.weight"), vec![q, t.hidden], ws));
                v.push((p("self_attn.k_proj.weight"), vec![kv, t.hidden], ws));
                v.push((p("self_attn.v_proj.weight"), vec![kv, t.hidden], ws));
                v.push((p("mlp.gate_proj.weight"), vec![t.ff, t.hidden], ws));
                v.push((p("mlp.up_proj.weight"), vec![t.ff, t.hidden], ws));
                if t.arch == "qwen2" {
                    v.push((p("self_attn.q_proj.bias"), vec![q], 0.02));
                    v.push((p("self_attn.k_proj.bias"), vec![kv], 0.02));
                    v.push((p("self_attn.v_proj.bias"), vec![kv], 0.02));
                }
            }
        }
        v.push((p("self_attn.o_proj.weight"), vec![t.hidden, q], ws));
        v.push((
            p("mlp.down_proj.weight"),
            vec![t.hidden, t.ff],
            1.0 / (t.ff as f32).sqrt(),
        ));
    }
    v.push(("model.norm.weight".to_string(), vec![t.hidden], -1.0));
    if !t.tied {
        v.push(("lm_head.weight".to_string(), vec![t.vocab, t.hidden], 0.05));
    }
    v
}

fn encode(vals: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => panic!("fixture dtype {other:?}"),
    }
}

/// Writes a tiny model folder at `dir`, with tokenizer files copied from `tokenizer_from`.
pub fn write_tiny(dir: &Path, t: &Tiny, tokenizer_from: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng(seed | 1);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape, scale) in tensors_for(t) {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                if scale < 0.0 {
                    1.0 + 0.1 * rng.next_f32()
                } else {
                    scale * rng.next_f32()
                }
            })
            .collect();
        data.push((name, shape, encode(&vals, t.dtype)));
    }
    let views: HashMap<String, TensorView<'_>> = data
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(t.dtype, s.clone(), b).unwrap()))
        .collect();
    serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let class = match t.arch {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        other => panic!("arch {other}"),
    };
    let dtype = match t.dtype {
        Dtype::F32 => "float32",
        Dtype::F16 => "float16",
        _ => "bfloat16",
    };
    let mut cfg = json!({
        "architectures": [class],
        "model_type": t.arch,
        "hidden_size": t.hidden,
        "intermediate_size": t.ff,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads,
        "vocab_size": t.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": t.tied,
        "hidden_act": "silu",
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": if t.spm { 512 } else { 2 },
    });
    if t.spm {
        cfg["pad_token_id"] = json!(512);
    }
    if t.arch == "phi3" {
        cfg["original_max_position_embeddings"] = json!(2048);
        cfg["rope_scaling"] = serde_json::Value::Null;
        cfg["sliding_window"] = json!(2047);
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    for f in [
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let src = tokenizer_from.join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.join(f)).unwrap();
        }
    }
}

/// Builds `dir` once per test run with `make`, safely when tests run in parallel processes:
/// one builder at a time holds `dir.lock` (the others wait for its result rather than build
/// it again) and writes a private folder that it renames into place, so a builder that
/// fails or is killed leaves no half-built `dir`.
/// A `dir` made before the host binaries were last built (`edgepack`, and `edgepack-runtime`
/// beside it) is made again: it may hold what an older binary wrote.
pub fn build_once(dir: &Path, make: impl FnOnce(&Path)) -> PathBuf {
    if fresh(dir) {
        return dir.to_path_buf();
    }
    let lock_path = dir.with_extension("lock");
    let lock = std::fs::File::create(&lock_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", lock_path.display()));
    if fresh(dir) {
        return dir.to_path_buf();
    }
    // Stale: nobody reads it, as every reader first found it stale and waits for this lock.
    let _ = std::fs::remove_dir_all(dir);
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    make(&tmp);
    if std::fs::rename(&tmp, dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(dir.is_dir(), "{} was not built", dir.display());
    dir.to_path_buf()
}

/// Whether `dir` exists and was made after the host binaries were built.
fn fresh(dir: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // The test executable lives in target/<profile>/deps/, the binaries one folder up.
    let profile = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.to_path_buf()));
    let built = profile.and_then(|d| {
        ["edgepack", "edgepack-runtime"]
            .iter()
            .filter_map(|b| modified(&d.join(b)))
            .max()
    });
    dir.is_dir()
        && match (modified(dir), built) {
            // Gone since `is_dir`: another builder is replacing it, so it is stale.
            (None, _) => false,
            (Some(made), Some(built)) => made >= built,
            (Some(_), None) => true,
        }
}
