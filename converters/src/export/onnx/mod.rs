//! ONNX export: lowers the shared [`DecoderGraph`] to an ONNX decoder with a KV cache and
//! writes a folder that onnxruntime (and, for `--ops contrib`, onnxruntime-genai) runs as is.
//!
//! Layout of the output folder:
//! - `contrib`: `model.onnx`, `model.onnx.data`, `genai_config.json`, tokenizer files
//!   (onnxruntime-genai's model-builder layout, shared/facts/onnx.md §1.8–1.9).
//! - `standard`: `model.onnx`, `model.onnx_data`, `config.json` (with
//!   `transformers.js_config.use_external_data_format`), tokenizer and generation files
//!   (Optimum / transformers.js names, §2).
//!
//! Every weight goes to the external data file whatever the model's size: one layout for all
//! models, the `.onnx` stays a small graph far below protobuf's 2 GiB limit, and the writer
//! streams each tensor straight to disk (see `data`). Small shape-like constants stay inline as
//! Constant nodes, which load-time shape inference needs (§6.2).
//!
//! Header: IR version 10, default-domain opset 21, `com.microsoft` opset 1 (§6.1: the model
//! builder's choice, loadable by onnxruntime 1.18+, and the first opset with int4 and blocked
//! DequantizeLinear).
//!
//! Everything that can be refused (architecture features the graph cannot express, option
//! combinations) is checked before the output folder is created.

mod builder;
mod data;
mod lower;
mod options;
mod pack;
pub mod proto;
mod stream;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use prost::Message;
use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::calib::forward::Forward;
use crate::calib::w8a8;
use crate::error::{Error, Result};
use crate::export::graph::{DecoderGraph, LinearRole, WeightId, WeightKind};
use crate::export::hf::write_json;
use crate::io::{write_file, AtomicDir};
use crate::model::stats::CalibStats;
use crate::model::Model;
use crate::progress::Progress;
use crate::transform::smooth::{self, Alpha};

pub use options::{OpSet, Precision};

/// ONNX IR version written (shared/facts/onnx.md §6.1).
pub const IR_VERSION: i64 = 10;
/// Default-domain opset (§6.1).
pub const OPSET: i64 = 21;
/// `com.microsoft` opset (§1.1).
pub const MS_OPSET: i64 = 1;
/// Block sizes offered for int4 (MatMulNBits takes any power of two ≥ 16; these are the
/// model builder's common choices, §1.5).
pub const BLOCK_SIZES: [usize; 3] = [32, 64, 128];
/// int8 codes span ±127 (symmetric, the zero point is 0).
const INT8_MAX: f32 = 127.0;

/// Calibration input of int8-static.
#[derive(Debug, Clone)]
pub struct StaticCalibration {
    pub stats: CalibStats,
    /// The stats file, named in errors.
    pub path: std::path::PathBuf,
    /// SmoothQuant strength; `None` quantizes the unsmoothed model.
    pub smooth: Option<f32>,
}

#[derive(Debug, Clone)]
pub struct OnnxOptions {
    pub ops: OpSet,
    pub precision: Precision,
    /// int4 block size along the input dimension.
    pub block_size: usize,
    /// int4: symmetric (implicit zero point 8) or asymmetric (zero point per block).
    pub symmetric: bool,
    /// Required for int8-static, refused otherwise.
    pub calibration: Option<StaticCalibration>,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        OnnxOptions {
            ops: OpSet::Contrib,
            precision: Precision::Fp32,
            block_size: 32,
            symmetric: true,
            calibration: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct OnnxReport {
    pub path: String,
    pub ops: OpSet,
    pub precision: Precision,
    pub files: Vec<String>,
    /// Bytes of the graph file and of the external data.
    pub model_bytes: u64,
    pub data_bytes: u64,
    pub nodes: usize,
    pub initializers: usize,
    /// int8-static with smoothing: the largest per-channel activation max before and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smooth: Option<smooth::SmoothReport>,
}

/// The data file's name for an operator set (genai and Optimum spell it differently, §6.2).
pub fn data_file_name(ops: OpSet) -> &'static str {
    match ops {
        OpSet::Contrib => "model.onnx.data",
        OpSet::Standard => "model.onnx_data",
    }
}

/// Checks the options on their own (before a model is read).
fn check_options(o: &OnnxOptions) -> Result<()> {
    let int4 = o.precision == Precision::Int4;
    if int4 && !BLOCK_SIZES.contains(&o.block_size) {
        return Err(Error::Invalid(format!(
            "--block-size {}: unsupported (use 32, 64 or 128)",
            o.block_size
        )));
    }
    if !int4 && (o.block_size != 32 || !o.symmetric) {
        return Err(Error::Invalid(format!(
            "--block-size and --asymmetric apply to --precision int4 only, not {}",
            o.precision
        )));
    }
    match (o.precision, &o.calibration) {
        (Precision::Int8Static, None) => Err(Error::Invalid(
            "--precision int8-static needs --stats FILE (from `edgepack calibrate`)".into(),
        )),
        (p, Some(_)) if p != Precision::Int8Static => Err(Error::Invalid(format!(
            "--stats and --smooth apply to --precision int8-static only, not {p}"
        ))),
        _ => Ok(()),
    }
}

/// Positions the exported model serves: the trained context, cut to the sliding attention
/// window where one applies. Neither lowering (nor the reference forward pass) masks keys
/// beyond a window, so the rotary tables stop there instead: within them full attention and
/// windowed attention agree, and a longer sequence fails in onnxruntime (the tables are too
/// short) rather than silently attending further than the model was trained to.
fn served_context(model: &Model) -> usize {
    let c = &model.config;
    let used = c
        .raw
        .as_ref()
        .and_then(|r| r.get("use_sliding_window"))
        .and_then(Json::as_bool)
        .unwrap_or(true);
    match c.sliding_window {
        Some(w) if used && w > 0 => w.min(c.max_position_embeddings),
        _ => c.max_position_embeddings,
    }
}

/// Per-tensor activation scales for int8-static: max |x| over the input of each quantized
/// linear, divided by the SmoothQuant factor of its channel where the input was smoothed
/// (`x / s`), over [`INT8_MAX`].
fn activation_scales(
    g: &DecoderGraph,
    cal: &StaticCalibration,
    factors: &BTreeMap<String, Vec<f32>>,
) -> Result<HashMap<WeightId, f32>> {
    let mut out = HashMap::new();
    for (id, w) in g.weights.iter().enumerate() {
        let WeightKind::Linear(role) = w.kind else {
            continue;
        };
        if role == LinearRole::LmHead {
            continue;
        }
        let key = w.stats_key.as_deref().expect("linears carry a stats key");
        let st = cal
            .stats
            .entries
            .get(key)
            .ok_or_else(|| Error::format(&cal.path, key, "no statistics for this weight"))?;
        // The factors transform::smooth divided this linear's input by, if it was smoothed.
        let amax = match factors.get(key) {
            Some(s) => st.absmax.iter().zip(s).fold(0f32, |m, (a, s)| m.max(a / s)),
            None => st.absmax.iter().fold(0f32, |m, a| m.max(*a)),
        };
        if !(amax.is_finite() && amax > 0.0) {
            return Err(Error::format(
                &cal.path,
                key,
                format!("activation range {amax} cannot set an int8 scale"),
            ));
        }
        out.insert(id, amax / INT8_MAX);
    }
    Ok(out)
}

/// The SmoothQuant fold an int8-static export makes before it quantizes (norm groups only,
/// the folds int8-static was measured with), after checking the statistics belong to `model`;
/// `None` when the calibration asks for no smoothing.
fn static_smoothing(model: &Model, cal: &StaticCalibration) -> Result<Option<smooth::Smoothed>> {
    cal.stats.check_model(model, &cal.path)?;
    cal.smooth
        .map(|a| {
            smooth::smooth(
                model,
                &cal.stats,
                &cal.path,
                &Alpha::Global(a),
                smooth::Scope::Norms,
            )
        })
        .transpose()
}

/// The host forward pass of what an `int8-static` export of `model` with `cal` computes in
/// onnxruntime: the same smoothing, the export's per-row int8 weights, and each linear's
/// input through QuantizeLinear at the static scale the export writes
/// ([`Forward::simulate_qdq_int8`]); the LM head in float. Recipes score such outputs with it.
pub fn int8_static_forward(model: &Model, cal: &StaticCalibration) -> Result<Forward> {
    let (m, factors) = match static_smoothing(model, cal)? {
        Some(sm) => (sm.model, sm.factors),
        None => (model.clone(), BTreeMap::new()),
    };
    let scales = w8a8::scales(&m, &cal.stats, &cal.path, &factors)?;
    let mut f = Forward::new(&m)?;
    f.simulate_qdq_int8(&scales)?;
    Ok(f)
}

/// Exports `model` to the folder `out` (created atomically; it must not exist or be empty).
pub fn export_onnx(
    model: &Model,
    out: &Path,
    opts: &OnnxOptions,
    progress: &dyn Progress,
) -> Result<OnnxReport> {
    check_options(opts)?;
    if opts.ops == OpSet::Contrib && model.tokenizer.tokenizer_json.is_none() {
        return Err(Error::unsupported(
            &model.source,
            "tokenizer.json",
            "missing: onnxruntime-genai loads the tokenizer from tokenizer.json (a SentencePiece \
             tokenizer.model alone is not enough)\nhint: convert the tokenizer with transformers \
             (AutoTokenizer.from_pretrained(...).save_pretrained(...)), or use --ops standard",
        ));
    }
    // int8-static: smooth first (exact), then quantize the smoothed model.
    let mut smooth_report = None;
    let mut factors = BTreeMap::new();
    let smoothed;
    let model_used = match &opts.calibration {
        Some(cal) => match static_smoothing(model, cal)? {
            Some(sm) => {
                smooth_report = Some(sm.report);
                factors = sm.factors;
                smoothed = sm.model;
                &smoothed
            }
            None => model,
        },
        None => model,
    };
    let g = DecoderGraph::build(model_used)?;
    let act_scales = match &opts.calibration {
        Some(cal) => activation_scales(&g, cal, &factors)?,
        None => HashMap::new(),
    };
    let b = lower::lower(
        &g,
        &lower::Lowering {
            ops: opts.ops,
            precision: opts.precision,
            block_size: opts.block_size,
            symmetric: opts.symmetric,
            act_scales: &act_scales,
            context: served_context(model),
        },
    )?;
    let dir = AtomicDir::create(out)?;
    let stage = dir.staging();
    let data_name = data_file_name(opts.ops);
    let mut data = data::DataFile::create(&stage.join(data_name))?;
    let initializers = stream::write_jobs(&g, &b.jobs, &mut data, data_name, progress)?;
    let data_bytes = data.finish()?;
    let n_nodes = b.nodes.len();
    let n_inits = initializers.len();
    let mut opset_import = vec![proto::OperatorSetIdProto {
        domain: String::new(),
        version: OPSET,
    }];
    if opts.ops == OpSet::Contrib {
        opset_import.push(proto::OperatorSetIdProto {
            domain: lower::MS.into(),
            version: MS_OPSET,
        });
    }
    let m = proto::ModelProto {
        ir_version: IR_VERSION,
        opset_import,
        producer_name: "edgepack".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(proto::GraphProto {
            node: b.nodes,
            name: "main_graph".into(),
            initializer: initializers,
            input: b.inputs,
            output: b.outputs,
            value_info: Vec::new(),
        }),
        metadata_props: vec![proto::StringStringEntryProto {
            key: "edgepack.precision".into(),
            value: opts.precision.to_string(),
        }],
    };
    let bytes = m.encode_to_vec();
    write_file(&stage.join("model.onnx"), &bytes)?;
    let mut files = vec!["model.onnx".to_string(), data_name.to_string()];
    match opts.ops {
        OpSet::Contrib => {
            write_json(
                &stage.join("genai_config.json"),
                &genai_config(model, &g, served_context(model))?,
            )?;
            files.push("genai_config.json".into());
        }
        OpSet::Standard => {
            let mut cfg = model
                .config
                .to_hf_json(if opts.precision == Precision::Fp16 {
                    "float16"
                } else {
                    "float32"
                });
            cfg["transformers.js_config"] = json!({"use_external_data_format": true});
            cfg["use_cache"] = json!(true);
            write_json(&stage.join("config.json"), &cfg)?;
            files.push("config.json".into());
        }
    }
    files.extend(crate::export::hf::write_tokenizer_files(model, stage)?);
    dir.commit()?;
    Ok(OnnxReport {
        path: out.display().to_string(),
        ops: opts.ops,
        precision: opts.precision,
        files,
        model_bytes: bytes.len() as u64,
        data_bytes,
        nodes: n_nodes,
        initializers: n_inits,
        smooth: smooth_report,
    })
}

/// A token id field: from generation_config.json, then config.json, then the token string
/// named in tokenizer_config.json looked up in tokenizer.json's added tokens.
fn token_id(model: &Model, key: &str) -> Option<Json> {
    let tok = &model.tokenizer;
    for src in [tok.generation_config.as_ref(), model.config.raw.as_ref()] {
        if let Some(v) = src.and_then(|j| j.get(key)).filter(|v| !v.is_null()) {
            return Some(v.clone());
        }
    }
    let tkey = key.trim_end_matches("_id");
    let text = match tok.tokenizer_config.as_ref()?.get(tkey)? {
        Json::String(s) => s.clone(),
        Json::Object(o) => o.get("content")?.as_str()?.to_string(),
        _ => return None,
    };
    let tj: Json = serde_json::from_str(tok.tokenizer_json.as_ref()?).ok()?;
    tj.get("added_tokens")?
        .as_array()?
        .iter()
        .find(|t| t.get("content").and_then(Json::as_str) == Some(text.as_str()))
        .and_then(|t| t.get("id").cloned())
}

/// `genai_config.json` as the model builder writes it (§1.9).
fn genai_config(model: &Model, g: &DecoderGraph, context: usize) -> Result<Json> {
    let d = &g.dims;
    let eos = token_id(model, "eos_token_id").ok_or_else(|| {
        Error::format(
            &model.source,
            "eos_token_id",
            "not found in generation_config.json, config.json or tokenizer_config.json",
        )
    })?;
    let first_eos = match &eos {
        Json::Array(a) => a.first().cloned().unwrap_or(Json::Null),
        v => v.clone(),
    };
    let bos = token_id(model, "bos_token_id").unwrap_or(json!(1));
    let pad = token_id(model, "pad_token_id").unwrap_or(first_eos);
    Ok(json!({
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                // onnxruntime-genai passes unknown string keys on as session config entries.
                // This one keeps integer products exact on x86 CPUs without VNNI, where the
                // u8 x s8 kernels saturate on full-range int8 weights (the int8 and
                // int8-static exports); anywhere else it changes nothing.
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "session.x64quantprecision": "1",
                    "provider_options": []
                },
                "filename": "model.onnx",
                "head_size": d.head_dim,
                "hidden_size": d.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value"
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"
                },
                "num_attention_heads": d.n_heads,
                "num_hidden_layers": d.n_layers,
                "num_key_value_heads": d.n_kv_heads
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model.config.arch.hf_model_type(),
            "vocab_size": d.vocab
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": false,
            "early_stopping": true,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": true,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, SourceFormat, TokenizerFiles};

    fn model_with(extra: Json) -> Model {
        let mut cfg = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 10, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096});
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        Model {
            config: ModelConfig::from_hf_json(&cfg, Path::new("m/config.json")).unwrap(),
            tensors: Vec::new(),
            tokenizer: TokenizerFiles::default(),
            source: "m".into(),
            source_format: SourceFormat::HfFolder,
            name: "m".into(),
            card: Vec::new(),
        }
    }

    #[test]
    fn a_sliding_window_in_use_cuts_the_served_context() {
        assert_eq!(served_context(&model_with(json!({}))), 4096);
        assert_eq!(
            served_context(&model_with(json!({"sliding_window": 2047}))),
            2047
        );
        assert_eq!(
            served_context(&model_with(
                json!({"sliding_window": 2047, "use_sliding_window": false})
            )),
            4096
        );
    }

    #[test]
    fn option_combinations_are_checked_naming_the_option() {
        let o = |precision, block_size, symmetric| OnnxOptions {
            precision,
            block_size,
            symmetric,
            ..OnnxOptions::default()
        };
        assert!(check_options(&o(Precision::Int4, 64, false)).is_ok());
        let e = check_options(&o(Precision::Int4, 48, true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--block-size 48"), "{e}");
        let e = check_options(&o(Precision::Fp16, 64, true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--block-size") && e.contains("fp16"), "{e}");
        let e = check_options(&o(Precision::Int8Static, 32, true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--stats"), "{e}");
    }
}
