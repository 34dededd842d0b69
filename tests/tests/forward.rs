//! The reference forward pass (`calib::forward`) against transformers' float32 logits on tiny
//! Llama, Qwen2 and Phi-3 models, a llama3 rope-scaled model past its original context, and the
//! real SmolLM2-135M; and its KV cache against full-sequence runs.

use std::path::{Path, PathBuf};

use edgepack_converters::calib::eval;
use edgepack_converters::calib::forward::Forward;
use edgepack_converters::import;
use edgepack_tests::fixtures::Tiny;
use edgepack_tests::{
    hf_logits, hf_logits_many, our_logits, smollm2_gguf, smollm2_hf, tiny, token_ids,
};

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A tiny model of each architecture: tied Llama, untied Qwen2, Phi-3 with a SentencePiece
/// tokenizer.
fn three_architectures() -> [(&'static str, Tiny); 3] {
    [
        ("llama-tied-f32", Tiny::llama()),
        ("qwen2-untied-f32", Tiny::qwen2()),
        ("phi3-untied-spm-f32", Tiny::phi3()),
    ]
}

#[test]
fn forward_matches_transformers_logits_for_llama_qwen2_and_phi3() {
    let ids = token_ids(12, 520);
    let dirs: Vec<(&str, PathBuf)> = three_architectures()
        .into_iter()
        .map(|(name, spec)| (name, tiny(name, spec)))
        .collect();
    let folders: Vec<&Path> = dirs.iter().map(|(_, d)| d.as_path()).collect();
    for ((name, dir), want) in dirs.iter().zip(hf_logits_many(&folders, &ids)) {
        let got = our_logits(dir, &ids);
        let d = max_abs_diff(&got, &want);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("{name}: max abs diff {d:e} (max |logit| {scale})");
        assert!(d < 1e-3, "{name}: max abs diff {d} vs transformers");
    }
}

#[test]
fn kv_cache_decoding_equals_full_prompt_logits() {
    let n = 16;
    let prefill = 5;
    for (name, spec) in three_architectures() {
        let model = import::open(&tiny(name, spec)).unwrap();
        let fwd = Forward::new(&model).unwrap();
        let vocab = model.config.vocab_size;
        let ids = token_ids(n, 520);
        let full = fwd.forward(&ids, &mut fwd.cache(n)).unwrap();

        let mut cache = fwd.cache(n);
        let mut stepped = fwd.forward(&ids[..prefill], &mut cache).unwrap();
        for t in prefill..n {
            let row = fwd.forward(&ids[t..t + 1], &mut cache).unwrap();
            assert_eq!(row.len(), vocab);
            let d = max_abs_diff(&row, &full[t * vocab..(t + 1) * vocab]);
            assert!(d < 1e-4, "{name}: position {t}: max abs diff {d}");
            stepped.extend(row);
        }
        assert_eq!(cache.len(), n);
        let d = max_abs_diff(&stepped, &full);
        eprintln!("{name}: prefill {prefill} + decode, max abs diff {d:e}");
        assert!(d < 1e-4, "{name}: {d}");

        // A full cache refuses more positions rather than growing past its limit.
        let err = fwd.forward(&ids[..1], &mut cache).unwrap_err().to_string();
        assert!(err.contains("exceed the cache"), "{err}");
    }
}

#[test]
fn sequences_run_together_give_the_logits_and_answers_they_give_alone() {
    for (name, spec) in three_architectures() {
        let model = import::open(&tiny(name, spec)).unwrap();
        let fwd = Forward::new(&model).unwrap();
        let vocab = model.config.vocab_size;
        let ids = token_ids(40, 520);
        // Three sequences of different lengths, at different depths of their caches.
        let (a, b, c) = (&ids[..7], &ids[7..10], &ids[10..22]);
        let mut alone = Vec::new();
        let mut caches = Vec::new();
        for s in [a, b, c] {
            let mut cache = fwd.cache(32);
            let l = fwd.forward(s, &mut cache).unwrap();
            alone.extend_from_slice(&l[l.len() - vocab..]);
            caches.push(cache);
        }
        let mut fresh: Vec<_> = (0..3).map(|_| fwd.cache(32)).collect();
        let mut refs: Vec<_> = fresh.iter_mut().collect();
        let together = fwd.forward_last(&[a, b, c], &mut refs).unwrap();
        assert_eq!(together.len(), 3 * vocab);
        let d = max_abs_diff(&together, &alone);
        assert!(d < 1e-4, "{name}: prompts together vs alone: {d}");
        assert_eq!(
            fresh.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [7, 3, 12]
        );

        // One more token each, mixed with a prompt that starts now.
        let (na, nb, d_prompt) = (&ids[22..23], &ids[23..24], &ids[24..29]);
        let mut want = Vec::new();
        for (s, cache) in [na, nb].into_iter().zip(caches.iter_mut()) {
            want.extend(fwd.forward(s, cache).unwrap());
        }
        let l = fwd.forward(d_prompt, &mut fwd.cache(32)).unwrap();
        want.extend_from_slice(&l[l.len() - vocab..]);
        let mut fourth = fwd.cache(32);
        let [fa, fb, fc] = &mut fresh[..] else {
            unreachable!()
        };
        let mut refs = vec![fa, fb, &mut fourth];
        let got = fwd.forward_last(&[na, nb, d_prompt], &mut refs).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{name}: decode steps with a new prompt: {d}");
        assert_eq!(fc.len(), 12, "an unlisted cache is untouched");

        // Bad input changes no cache: a sequence past its cache's room.
        let mut small = fwd.cache(4);
        let mut refs = vec![&mut fourth, &mut small];
        let err = fwd
            .forward_last(&[na, &ids[..5]], &mut refs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceed the cache"), "{err}");
        assert_eq!((fourth.len(), small.len()), (5, 0));

        // Greedy generation of several prompts at once answers as each does alone.
        let prompts: Vec<Vec<u32>> = [&ids[..3], &ids[3..11], &ids[11..12], &ids[12..30]]
            .iter()
            .map(|p| p.to_vec())
            .collect();
        let stop = [ids[35]];
        let many = eval::generate_many(&fwd, &prompts, 12, &stop, 3).unwrap();
        for (p, got) in prompts.iter().zip(&many) {
            let (want, _) = eval::generate(&fwd, p, 12, &stop).unwrap();
            assert_eq!(got, &want, "{name}: prompt of {} tokens", p.len());
        }
        assert!(many.iter().any(|a| a.len() == 12), "{name}: {many:?}");
    }
}

#[test]
fn observer_sees_the_input_of_every_linear_layer() {
    for (name, spec) in [
        ("llama-tied-f32", Tiny::llama()),
        ("phi3-untied-spm-f32", Tiny::phi3()),
    ] {
        let model = import::open(&tiny(name, spec)).unwrap();
        let fwd = Forward::new(&model).unwrap();
        let ids = token_ids(6, 520);
        let mut seen: Vec<(String, usize, usize)> = Vec::new();
        let observed = fwd
            .forward_observed(&ids, &mut fwd.cache(6), &mut |name, x, inn| {
                assert!(x.iter().all(|v| v.is_finite()), "{name}");
                seen.push((name.to_string(), x.len(), inn));
            })
            .unwrap();
        assert_eq!(observed, fwd.forward(&ids, &mut fwd.cache(6)).unwrap());
        // Every 2-D weight but the embedding lookup is a linear layer; a tied embedding is
        // the output projection, so it is observed there.
        let mut want: Vec<(String, usize)> = model
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2)
            .filter(|t| t.name != "model.embed_tokens.weight" || model.config.tie_word_embeddings)
            .map(|t| (t.name.clone(), t.shape[1]))
            .collect();
        let mut got: Vec<(String, usize)> = seen
            .iter()
            .map(|(n, len, inn)| {
                assert_eq!(*len, ids.len() * inn, "{n}");
                (n.clone(), *inn)
            })
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn forward_on_real_smollm2_matches_transformers() {
    let dir = smollm2_hf();
    let ids = token_ids(32, 49152);
    let want = hf_logits(&dir, &ids);
    let got = our_logits(&dir, &ids);
    let d = max_abs_diff(&got, &want);
    eprintln!("smollm2: max abs diff {d:e}");
    assert!(d < 1e-3, "SmolLM2: max abs diff {d} vs transformers");

    // Straight from the Q4_1 GGUF (dequantized on demand, Q/K rows restored to HF order), the
    // pass sees the same weights the lossless F32 export holds.
    let from_gguf = our_logits(&smollm2_gguf(), &ids);
    let d = max_abs_diff(&from_gguf, &got);
    eprintln!("smollm2: GGUF vs its F32 HF export, max abs diff {d:e}");
    assert!(d < 1e-5, "SmolLM2 GGUF vs HF export: max abs diff {d}");
}

#[test]
fn llama3_rope_scaling_matches_transformers_past_the_original_context() {
    let base = tiny("llama-tied-f32", Tiny::llama());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("llama3-rope");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(&base).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64});
    cfg["max_position_embeddings"] = serde_json::json!(512);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();

    let n = 96;
    let ids = token_ids(n, 520);
    let want = hf_logits(&dir, &ids);
    let got = our_logits(&dir, &ids);
    let vocab = want.len() / n;
    let late = 64 * vocab..;
    let d = max_abs_diff(&got, &want);
    let d_late = max_abs_diff(&got[late.clone()], &want[late.clone()]);
    eprintln!("llama3 rope: max abs diff {d:e}, positions 64..96 {d_late:e}");
    assert!(d < 1e-3, "llama3 rope: max abs diff {d} vs transformers");

    // The scaling must matter at these positions, or the comparison proves nothing.
    let unscaled = our_logits(&base, &ids);
    let moved = max_abs_diff(&unscaled[late.clone()], &got[late]);
    assert!(
        moved > 1e-2,
        "llama3 scaling changed logits by only {moved}"
    );
}

/// Writes a two-layer Llama whose `head_dim` (32) is not `hidden_size / heads` (16), with
/// tokenizer files copied from `tokenizer_from` (vocabulary 520).
fn write_wide_head_llama(dir: &Path, tokenizer_from: &Path) {
    use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
    let (hidden, heads, kv_heads, head_dim, ff, vocab) = (64, 4, 2, 32, 128, 520);
    let (q, kv) = (heads * head_dim, kv_heads * head_dim);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    for l in 0..2 {
        for (s, shape) in [
            ("input_layernorm.weight", vec![hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
            ("self_attn.q_proj.weight", vec![q, hidden]),
            ("self_attn.k_proj.weight", vec![kv, hidden]),
            ("self_attn.v_proj.weight", vec![kv, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, q]),
            ("mlp.gate_proj.weight", vec![ff, hidden]),
            ("mlp.up_proj.weight", vec![ff, hidden]),
            ("mlp.down_proj.weight", vec![hidden, ff]),
        ] {
            shapes.push((format!("model.layers.{l}.{s}"), shape));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let fan_in = *shape.last().unwrap() as f32;
            let bytes = (0..n)
                .flat_map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    // Norm weights near 1, matrices scaled to keep activations O(1).
                    let v = if shape.len() == 1 {
                        1.0 + 0.2 * u
                    } else {
                        3.0 * u / fan_in.sqrt()
                    };
                    v.to_le_bytes()
                })
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": ff, "num_hidden_layers": 2,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0, "tie_word_embeddings": false, "hidden_act": "silu",
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for e in std::fs::read_dir(tokenizer_from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name.to_string_lossy().starts_with("tokenizer") {
            std::fs::copy(e.path(), dir.join(name)).unwrap();
        }
    }
}

#[test]
fn head_dim_other_than_hidden_over_heads_matches_transformers() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("wide-head");
    write_wide_head_llama(&dir, &tiny("phi3-untied-spm-f32", Tiny::phi3()));
    let ids = token_ids(20, 520);
    let want = hf_logits(&dir, &ids);
    let got = our_logits(&dir, &ids);
    let d = max_abs_diff(&got, &want);
    eprintln!("head_dim 32 with hidden 64 / 4 heads: max abs diff {d:e}");
    assert!(d < 1e-3, "max abs diff {d} vs transformers");
}
