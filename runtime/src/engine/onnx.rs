//! The ONNX Runtime engine for ONNX bundles: edgepack's own prefill/decode loop over an
//! onnxruntime-genai style decoder folder (`genai_config.json`, `model.onnx` and its external
//! data, `tokenizer.json`), with the KV cache carried from one call's `present.*` outputs to
//! the next call's `past_key_values.*` inputs.
//!
//! ONNX Runtime is loaded at run time (`ort`'s `load-dynamic`): the board image's library, or
//! the one the bundle carries, never one linked into the binary. Why this rather than
//! onnxruntime-genai's C API is in docs/engines.md.

use std::borrow::Cow;
use std::path::Path;
use std::sync::mpsc;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use serde_json::Value as Json;

use super::generate::{self, Job};
use super::hf::HfVocab;
use super::types::{EngineConfig, EngineError, Forward, ModelInfo};

const ENGINE: &str = "onnxruntime";

fn load_err(path: &Path, reason: impl std::fmt::Display) -> EngineError {
    EngineError::Load {
        engine: ENGINE,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn decode_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Decode {
        engine: ENGINE,
        reason: e.to_string(),
    }
}

/// What `genai_config.json` says about the decoder.
#[derive(Debug)]
struct GenaiConfig {
    filename: String,
    input_ids: String,
    attention_mask: String,
    past_key: String,
    past_value: String,
    logits: String,
    present_key: String,
    present_value: String,
    layers: usize,
    kv_heads: usize,
    head_size: usize,
    context_length: u32,
    vocab_size: usize,
    eos: Vec<u32>,
}

impl GenaiConfig {
    fn read(path: &Path) -> Result<GenaiConfig, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|e| load_err(path, e))?;
        let v: Json =
            serde_json::from_str(&text).map_err(|e| load_err(path, format!("not JSON: {e}")))?;
        let at = |ptr: &str| {
            v.pointer(ptr)
                .ok_or_else(|| load_err(path, format!("field {ptr}: missing")))
        };
        let string = |ptr: &str| -> Result<String, EngineError> {
            at(ptr)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| load_err(path, format!("field {ptr}: not a string")))
        };
        // Counts and sizes bounded so a hostile file cannot ask for huge allocations.
        let count = |ptr: &str, max: u64| -> Result<u64, EngineError> {
            match at(ptr)?.as_u64() {
                Some(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(load_err(
                    path,
                    format!("field {ptr}: not a whole number from 1 to {max}"),
                )),
            }
        };
        let eos = match at("/model/eos_token_id")? {
            Json::Array(a) => a
                .iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<Vec<u32>>>(),
            x => x
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(|n| vec![n]),
        }
        .ok_or_else(|| {
            load_err(
                path,
                "field /model/eos_token_id: not a token id or a list of them",
            )
        })?;
        Ok(GenaiConfig {
            filename: string("/model/decoder/filename")?,
            input_ids: string("/model/decoder/inputs/input_ids")?,
            attention_mask: string("/model/decoder/inputs/attention_mask")?,
            past_key: string("/model/decoder/inputs/past_key_names")?,
            past_value: string("/model/decoder/inputs/past_value_names")?,
            logits: string("/model/decoder/outputs/logits")?,
            present_key: string("/model/decoder/outputs/present_key_names")?,
            present_value: string("/model/decoder/outputs/present_value_names")?,
            layers: count("/model/decoder/num_hidden_layers", 1024)? as usize,
            kv_heads: count("/model/decoder/num_key_value_heads", 1024)? as usize,
            head_size: count("/model/decoder/head_size", 4096)? as usize,
            context_length: count("/model/context_length", 1 << 24)? as u32,
            vocab_size: count("/model/vocab_size", 1 << 24)? as usize,
            eos,
        })
    }
}

/// The version string of the ONNX Runtime library at `path`.
fn library_version(path: &Path) -> Result<String, EngineError> {
    let bad = |m: String| EngineError::Library(format!("{}: {m}", path.display()));
    // SAFETY: loading a shared library runs its initialisers; the file is the ONNX Runtime
    // library the board image or the verified bundle provides, checked to be an ELF file for
    // this CPU. `OrtGetApiBase` takes no arguments and returns a pointer to a static table
    // whose `GetVersionString` returns a static NUL-terminated string.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| bad(format!("cannot load: {e}")))?;
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> = lib
            .get(b"OrtGetApiBase\0")
            .map_err(|_| bad("not an ONNX Runtime library (no OrtGetApiBase)".into()))?;
        let base = get();
        if base.is_null() {
            return Err(bad("OrtGetApiBase returned nothing".into()));
        }
        let v = ((*base).GetVersionString)();
        if v.is_null() {
            return Err(bad("no version string".into()));
        }
        let version = std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned();
        // Keep the library loaded: ort opens the same file next, and unloading ONNX Runtime
        // while its threads exist is not safe.
        std::mem::forget(lib);
        Ok(version)
    }
}

/// The lowest ONNX Runtime this engine runs on (C API version 17).
const MIN_MINOR: u32 = 17;

/// Loads the folder and serves jobs until the handle is dropped.
pub fn run(
    config: EngineConfig,
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Result<ModelInfo, EngineError>>,
) {
    match load(&config) {
        Ok((vocab, mut fwd, info)) => generate::serve(&vocab, &mut fwd, info, jobs, ready),
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

fn read_json(path: &Path) -> Result<Option<Json>, EngineError> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| load_err(path, format!("not JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(load_err(path, e)),
    }
}

fn load(config: &EngineConfig) -> Result<(HfVocab, OrtForward, ModelInfo), EngineError> {
    let model_file = &config.model_path;
    let dir = model_file.parent().unwrap_or(Path::new("."));
    let genai = GenaiConfig::read(&dir.join("genai_config.json"))?;
    if dir.join(&genai.filename) != *model_file {
        return Err(load_err(
            &dir.join("genai_config.json"),
            format!(
                "field /model/decoder/filename: names {}, the manifest names {}",
                genai.filename,
                model_file.display()
            ),
        ));
    }
    let lib = config.library.as_deref().ok_or_else(|| {
        EngineError::Library("the ONNX engine needs ONNX Runtime's library (--engine-lib)".into())
    })?;
    let version = library_version(lib)?;
    let minor = version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok());
    if minor.is_none_or(|m| m < MIN_MINOR) {
        return Err(EngineError::Library(format!(
            "{}: ONNX Runtime {version} is older than 1.{MIN_MINOR}, the oldest this runtime loads",
            lib.display()
        )));
    }
    let env = ort::init_from(lib)
        .map_err(|e| EngineError::Library(format!("{}: {e}", lib.display())))?
        .with_name("edgepack")
        .with_telemetry(false)
        .build()
        .map_err(|e| EngineError::Library(format!("{}: {e}", lib.display())))?;
    let threads = usize::try_from(config.threads.max(1)).unwrap_or(1);
    let session = (|| -> Result<Session, String> {
        let s = |e: ort::Error<ort::session::builder::SessionBuilder>| e.to_string();
        Session::builder(&env)
            .map_err(|e| e.to_string())?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(s)?
            .with_intra_threads(threads)
            .map_err(s)?
            .with_inter_threads(1)
            .map_err(s)?
            .commit_from_file(model_file)
            .map_err(|e| e.to_string())
    })()
    .map_err(|e| load_err(model_file, e))?;

    let past_type = input_type(&session, &genai.past_key.replace("%d", "0"), model_file)?;
    let cache_f16 = match past_type {
        TensorElementType::Float32 => false,
        TensorElementType::Float16 => true,
        other => {
            return Err(load_err(
                model_file,
                format!(
                    "input {}: KV cache of type {other:?}; float32 or float16 expected",
                    genai.past_key.replace("%d", "0")
                ),
            ))
        }
    };
    let name = |pattern: &str, i: usize| pattern.replace("%d", &i.to_string());
    let mut past_names = Vec::with_capacity(2 * genai.layers);
    let mut present_names = Vec::with_capacity(2 * genai.layers);
    for i in 0..genai.layers {
        past_names.push(name(&genai.past_key, i));
        past_names.push(name(&genai.past_value, i));
        present_names.push(name(&genai.present_key, i));
        present_names.push(name(&genai.present_value, i));
    }
    for n in &past_names {
        input_type(&session, n, model_file)?;
    }
    for n in present_names.iter().chain([&genai.logits]) {
        if !session.outputs().iter().any(|o| o.name() == n) {
            return Err(load_err(
                model_file,
                format!("output {n}: genai_config.json names it, the graph has none"),
            ));
        }
    }

    let tok_path = dir.join("tokenizer.json");
    let tok_json = std::fs::read_to_string(&tok_path).map_err(|e| load_err(&tok_path, e))?;
    let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
    let gen_config = read_json(&dir.join("generation_config.json"))?;
    let prompter =
        edgepack_text::Prompter::new(&tok_json, tok_config.as_ref(), gen_config.as_ref())
            .map_err(|e| load_err(&dir.join(e.field), e.message))?;
    let mut stop = prompter.stop_ids().to_vec();
    stop.extend(&genai.eos);
    let size_bytes = std::fs::read_dir(dir)
        .map_err(|e| load_err(dir, e))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&genai.filename))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let n_ctx = config.ctx_size.min(genai.context_length).max(1);
    let info = ModelInfo {
        engine: ENGINE,
        engine_version: version,
        library: Some(lib.to_path_buf()),
        n_ctx,
        n_ctx_train: genai.context_length,
        n_params: None,
        size_bytes,
        n_vocab: i32::try_from(genai.vocab_size).unwrap_or(i32::MAX),
        chat_template: prompter.has_chat_template(),
        threads: config.threads,
        delegate: None,
        delegate_fallback: None,
    };
    let vocab = HfVocab {
        prompter,
        stop,
        n_vocab: genai.vocab_size,
        source: dir.to_path_buf(),
        engine: ENGINE,
    };
    let fwd = OrtForward {
        session,
        past_names,
        present_names,
        past: Vec::new(),
        len: 0,
        n_ctx,
        cache_f16,
        logits: Vec::new(),
        genai,
    };
    Ok((vocab, fwd, info))
}

fn input_type(
    session: &Session,
    name: &str,
    model: &Path,
) -> Result<TensorElementType, EngineError> {
    match session
        .inputs()
        .iter()
        .find(|i| i.name() == name)
        .map(|i| i.dtype())
    {
        Some(ValueType::Tensor { ty, .. }) => Ok(*ty),
        Some(_) => Err(load_err(model, format!("input {name}: not a tensor"))),
        None => Err(load_err(
            model,
            format!("input {name}: genai_config.json names it, the graph has none"),
        )),
    }
}

struct OrtForward {
    session: Session,
    past_names: Vec<String>,
    present_names: Vec<String>,
    /// `present.*` of the last call, fed back as `past_key_values.*`; empty before the first.
    past: Vec<DynValue>,
    /// Tokens in the cache.
    len: usize,
    n_ctx: u32,
    cache_f16: bool,
    logits: Vec<f32>,
    genai: GenaiConfig,
}

impl OrtForward {
    fn empty_cache(&self) -> Result<Vec<DynValue>, EngineError> {
        let shape = [1usize, self.genai.kv_heads, 0, self.genai.head_size];
        (0..self.past_names.len())
            .map(|_| {
                if self.cache_f16 {
                    Tensor::from_array((shape, Vec::<half::f16>::new())).map(|t| t.into_dyn())
                } else {
                    Tensor::from_array((shape, Vec::<f32>::new())).map(|t| t.into_dyn())
                }
                .map_err(decode_err)
            })
            .collect()
    }
}

impl Forward for OrtForward {
    fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        self.past = self.empty_cache()?;
        self.len = 0;
        Ok(())
    }

    fn forward(&mut self, tokens: &[i32]) -> Result<&[f32], EngineError> {
        if self.past.is_empty() {
            self.past = self.empty_cache()?;
        }
        let n = tokens.len();
        let total = self.len + n;
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(2 + self.past.len());
        inputs.push((
            Cow::Borrowed(self.genai.input_ids.as_str()),
            Tensor::from_array(([1usize, n], ids))
                .map_err(decode_err)?
                .into(),
        ));
        inputs.push((
            Cow::Borrowed(self.genai.attention_mask.as_str()),
            Tensor::from_array(([1usize, total], vec![1i64; total]))
                .map_err(decode_err)?
                .into(),
        ));
        for (name, v) in self.past_names.iter().zip(&self.past) {
            inputs.push((Cow::Borrowed(name.as_str()), SessionInputValue::from(v)));
        }
        let mut outputs = self.session.run(inputs).map_err(decode_err)?;
        let logits = outputs
            .remove(&self.genai.logits)
            .ok_or_else(|| decode_err("no logits output"))?;
        let mut present = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            present.push(
                outputs
                    .remove(name)
                    .ok_or_else(|| decode_err(format!("no {name} output")))?,
            );
        }
        drop(outputs);
        let vocab = self.genai.vocab_size;
        self.logits.clear();
        match logits.dtype() {
            ValueType::Tensor {
                ty: TensorElementType::Float16,
                ..
            } => {
                let (_, data) = logits
                    .try_extract_tensor::<half::f16>()
                    .map_err(decode_err)?;
                let last = data
                    .len()
                    .checked_sub(vocab)
                    .ok_or_else(|| decode_err("logits shorter than the vocabulary"))?;
                self.logits.extend(data[last..].iter().map(|x| x.to_f32()));
            }
            _ => {
                let (_, data) = logits.try_extract_tensor::<f32>().map_err(decode_err)?;
                let last = data
                    .len()
                    .checked_sub(vocab)
                    .ok_or_else(|| decode_err("logits shorter than the vocabulary"))?;
                self.logits.extend_from_slice(&data[last..]);
            }
        }
        self.past = present;
        self.len = total;
        Ok(&self.logits)
    }
}
