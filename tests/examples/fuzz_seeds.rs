//! Writes the fuzz targets' seed corpora (tests/fuzz/corpus/<target>/) from real files: the
//! SmolLM2 GGUF of `cargo xtask setup` (its metadata with arrays cut to 32 entries and its
//! first tensor infos at small shapes; its config and tokenizer_config as the importer reads
//! them), an adapter_config.json as the trainer writes it, a bundle of those small files with
//! its manifest and archive, the shipped recipes, a statistics file, and API requests.
//!
//! Run by `cargo xtask fuzz --seed-corpus`, or `cargo run -p edgepack-tests --example
//! fuzz_seeds -- tests/fuzz/corpus`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use edgepack_converters::gguf::reader::GgufFile;
use edgepack_converters::gguf::value::{Array, Metadata, Value};
use edgepack_converters::gguf::writer::{GgufWriter, TensorPlan};
use edgepack_converters::import::gguf::import_gguf;
use edgepack_converters::model::stats::{CalibStats, ModelIdentity};
use edgepack_converters::train::adapter::{write_adapter, LoraSpec};
use edgepack_targets::bundle;
use edgepack_targets::Manifest;
use serde_json::json;

fn cut<T: Clone>(v: &[T]) -> Vec<T> {
    v[..v.len().min(32)].to_vec()
}

fn cut_array(a: &Array) -> Array {
    match a {
        Array::U8(v) => Array::U8(cut(v)),
        Array::I8(v) => Array::I8(cut(v)),
        Array::U16(v) => Array::U16(cut(v)),
        Array::I16(v) => Array::I16(cut(v)),
        Array::U32(v) => Array::U32(cut(v)),
        Array::I32(v) => Array::I32(cut(v)),
        Array::F32(v) => Array::F32(cut(v)),
        Array::Bool(v) => Array::Bool(cut(v)),
        Array::String(v) => Array::String(cut(v)),
        Array::U64(v) => Array::U64(cut(v)),
        Array::I64(v) => Array::I64(cut(v)),
        Array::F64(v) => Array::F64(cut(v)),
    }
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).expect("create a corpus folder");
    fs::write(d.join(name), bytes).expect("write a seed");
    println!("{target}/{name}: {} bytes", bytes.len());
}

fn pretty(v: &serde_json::Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("JSON");
    b.push(b'\n');
    b
}

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: fuzz_seeds <corpus folder>"),
    );
    let work = tempfile::tempdir().expect("a work folder");
    let smollm2 = edgepack_tests::smollm2_gguf();

    // GGUF: SmolLM2's metadata (arrays cut) and its first four tensors at small shapes.
    let g = GgufFile::open(&smollm2).expect("open SmolLM2");
    let mut meta = Metadata::new();
    for (k, v) in g.metadata.iter() {
        let v = match v {
            Value::Array(a) => Value::Array(cut_array(a)),
            other => other.clone(),
        };
        meta.set(k, v);
    }
    let plans: Vec<TensorPlan> = g
        .tensors
        .iter()
        .take(4)
        .map(|t| TensorPlan {
            name: t.name.clone(),
            ne: (0..t.ne.len())
                .map(|i| if i == 0 { t.ty.block_size() } else { 2 })
                .collect(),
            ty: t.ty,
        })
        .collect();
    let small = work.path().join("smollm2-small.gguf");
    GgufWriter::new(&meta, plans, &small)
        .and_then(|w| w.write(&small, |_, plan, sink| sink(&vec![0u8; plan.nbytes()])))
        .expect("write the small GGUF");
    let small_bytes = fs::read(&small).expect("read the small GGUF");
    write(&out, "gguf", "smollm2-small.gguf", &small_bytes);

    // HF files as the importer reads them from SmolLM2.
    let model = import_gguf(&smollm2).expect("import SmolLM2");
    let config = model.config.to_hf_json("bfloat16");
    write(&out, "hf_config", "smollm2-config.json", &pretty(&config));
    for class in ["Qwen2ForCausalLM", "Phi3ForCausalLM"] {
        let mut c = config.clone();
        c["architectures"] = json!([class]);
        let name = format!(
            "{}-config.json",
            class.trim_end_matches("ForCausalLM").to_lowercase()
        );
        write(&out, "hf_config", &name, &pretty(&c));
    }
    let tok = model
        .tokenizer
        .tokenizer_config
        .as_ref()
        .expect("SmolLM2 has a tokenizer_config");
    let tok_bytes = pretty(tok);
    write(
        &out,
        "tokenizer_config",
        "smollm2-tokenizer_config.json",
        &tok_bytes,
    );

    // safetensors: SmolLM2's first tensor names at small shapes, one per supported dtype.
    let names: Vec<&str> = model
        .tensors
        .iter()
        .take(3)
        .map(|t| t.name.as_str())
        .collect();
    let data = [0u8; 4 * 8 * 4];
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = names
        .iter()
        .zip([
            (safetensors::Dtype::F32, 4usize),
            (safetensors::Dtype::F16, 2),
            (safetensors::Dtype::BF16, 2),
        ])
        .map(|(n, (dt, size))| {
            let view = safetensors::tensor::TensorView::new(dt, vec![4, 8], &data[..32 * size])
                .expect("a tensor view");
            (n.to_string(), view)
        })
        .collect();
    let st = safetensors::serialize(views, None).expect("serialize safetensors");
    write(&out, "safetensors", "smollm2-names.safetensors", &st);

    // adapter_config.json as the trainer writes it, and one with PEFT's patterns.
    let ad = work.path().join("adapter");
    fs::create_dir_all(&ad).expect("adapter folder");
    let spec = LoraSpec {
        rank: 2,
        alpha: 4.0,
        dropout: 0.05,
        rslora: false,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    write_adapter(&ad, "HuggingFaceTB/SmolLM2-135M-Instruct", &spec, &[]).expect("write adapter");
    let cfg_bytes = fs::read(ad.join("adapter_config.json")).expect("read adapter_config");
    write(&out, "adapter_config", "trained.json", &cfg_bytes);
    let mut cfg: serde_json::Value = serde_json::from_slice(&cfg_bytes).expect("JSON");
    cfg["rank_pattern"] = json!({"q_proj": 2, "model.layers.0.self_attn.q_proj": 2});
    cfg["alpha_pattern"] = json!({"^model.layers.0": 8.0});
    cfg["use_rslora"] = json!(true);
    write(&out, "adapter_config", "patterns.json", &pretty(&cfg));

    // A bundle of the small GGUF and the tokenizer config, with a manifest shaped as
    // `edgepack bundle` writes one for imx93.
    let dir = work.path().join("tiny-imx93");
    fs::create_dir_all(dir.join("model")).expect("bundle folder");
    fs::write(dir.join("model/tiny.gguf"), &small_bytes).expect("bundle model");
    fs::write(dir.join("model/tokenizer_config.json"), &tok_bytes).expect("bundle tokenizer");
    let skeleton = json!({
        "schema": 1,
        "target": {"profile": "imx93", "rust_target": "aarch64-unknown-linux-gnu",
                   "target_cpu": "cortex-a55", "glibc_floor": "2.35"},
        "format": "gguf",
        "engine": {"name": "llama.cpp"},
        "model": {"name": "smollm2-small", "arch": "llama", "n_params": 512,
                  "file": "model/tiny.gguf",
                  "sources": [bundle::file_entry(&small, "smollm2-small.gguf").expect("entry")]},
        "quant": {"preset": "Q4_1", "tensor_types": {"Q4_1": 4}},
        "tokenizer": {"files": ["model/tokenizer_config.json"], "chat_template": true},
        "created_by": {"name": "edgepack", "version": "0.1.0"},
        "files": [],
    });
    // `files` is filled (and the whole manifest checked) by write_manifest.
    let mut m: Manifest = serde_json::from_value(skeleton).expect("a manifest skeleton");
    let bytes = bundle::write_manifest(&dir, &mut m, None).expect("write the manifest");
    write(&out, "manifest", "tiny-imx93.json", &bytes);
    let archive = work.path().join("tiny-imx93.tar.zst");
    bundle::pack(&dir, "tiny-imx93", &archive).expect("pack the bundle");
    let zst = fs::read(&archive).expect("read the archive");
    let mut tar = Vec::new();
    zstd::Decoder::new(&zst[..])
        .and_then(|mut d| d.read_to_end(&mut tar))
        .expect("decompress the archive");
    write(&out, "unpack", "tiny-imx93.tar", &tar);
    write(&out, "unpack", "tiny-imx93.tar.zst", &zst);

    // The shipped recipes.
    let recipes = edgepack_tests::root().join("recipes");
    for r in ["smollm2-assistant.toml", "smollm2-sparse24.toml"] {
        write(
            &out,
            "recipe",
            r,
            &fs::read(recipes.join(r)).expect("a shipped recipe"),
        );
    }

    // A statistics file for SmolLM2's identity with one input of 8 channels.
    let mut stats = CalibStats::new(ModelIdentity::of(&model));
    let acts: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 4.0).collect();
    stats
        .accumulate("model.layers.0.self_attn.q_proj", &acts, 8)
        .expect("accumulate");
    stats.samples = 1;
    stats.seq_len = 4;
    stats.tokens_total = 4;
    stats.tokens_used = 4;
    stats.dataset = "fuzz seed".into();
    stats.sample_tokens = vec![vec![1, 2, 3, 4]];
    let sp = work.path().join("stats.safetensors");
    stats.write(&sp).expect("write stats");
    write(
        &out,
        "stats",
        "smollm2-one-input.safetensors",
        &fs::read(&sp).expect("read stats"),
    );

    // Requests as OpenAI clients send them.
    let requests = [
        (
            "chat.json",
            json!({"model": "smollm2", "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["\n\n"]}),
        ),
        (
            "chat-parts-stream.json",
            json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
            "stream": true, "stream_options": {"include_usage": true},
            "max_completion_tokens": 8, "stop": "END"}),
        ),
        (
            "completion.json",
            json!({"prompt": "Once upon a time", "max_tokens": 16,
            "temperature": 0.0}),
        ),
        (
            "completion-list.json",
            json!({"prompt": ["The sky is"], "stream": false}),
        ),
    ];
    for (name, v) in requests {
        write(&out, "runtime_request", name, &pretty(&v));
    }
}
