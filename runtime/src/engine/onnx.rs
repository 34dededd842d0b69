//! The ONNX Runtime engine for ONNX bundles: edgepack's own prefill/decode loop over an
//! onnxruntime-genai style decoder folder (`genai_config.json`, `model.onnx` and its external
//! data, `tokenizer.json`), with the KV cache carried from one call's `present.*` outputs to
//! the next call's `past_key_values.*` inputs.
//!
//! ONNX Runtime is loaded at run time (`ort`'s `load-dynamic`): the board image's library, or
//! the one the bundle carries, never one linked into the binary. Why this rather than
//! onnxruntime-genai's C API is in docs/engines.md.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::mpsc;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, TensorRefMut, ValueType};
use ort::AsPointer;
use serde_json::Value as Json;

use super::generate::{self, Job};
use super::hf::HfVocab;
use super::load::Load;
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
    tally: &Load,
) {
    match load(&config) {
        Ok((vocab, mut fwd, info)) => generate::serve(&vocab, &mut fwd, info, jobs, ready, tally),
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
            // On x86 without VNNI, onnxruntime's u8 x s8 kernels add pairs of products in
            // saturating 16-bit lanes, which full-range int8 weights (edgepack's) overflow;
            // this has it compute them as u8 x u8 there. Elsewhere (the boards' Arm cores,
            // VNNI) it changes nothing.
            .with_config_entry("session.x64quantprecision", "1")
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
        slots: 1,
    };
    let vocab = HfVocab {
        prompter,
        stop,
        n_vocab: genai.vocab_size,
        source: dir.to_path_buf(),
        engine: ENGINE,
    };
    let logits_f16 = match session
        .outputs()
        .iter()
        .find(|o| o.name() == genai.logits)
        .map(|o| o.dtype())
    {
        Some(ValueType::Tensor {
            ty: TensorElementType::Float16,
            ..
        }) => true,
        Some(ValueType::Tensor {
            ty: TensorElementType::Float32,
            ..
        }) => false,
        _ => {
            return Err(load_err(
                model_file,
                format!("output {}: not a float32 or float16 tensor", genai.logits),
            ))
        }
    };
    let fwd = OrtForward::new(
        session,
        &past_names,
        &present_names,
        n_ctx,
        cache_f16,
        logits_f16,
        genai,
    )
    .map_err(|e| load_err(model_file, e))?;
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

/// The decoder with its KV cache in one buffer per layer and tensor, `[1, kv_heads, n_ctx,
/// head_size]`, bound through one ONNX Runtime IoBinding as both the `past_key_values.*` input
/// and the `present.*` output: GroupQueryAttention then writes each call's keys and values in
/// place (onnxruntime-genai's `past_present_share_buffer`), so nothing is copied or allocated
/// per token but the ids, the mask and the logits.
struct OrtForward {
    session: Session,
    binding: NonNull<ort::sys::OrtIoBinding>,
    /// Keeps the bound cache buffers alive.
    _cache: Vec<DynValue>,
    /// Logits of one-token calls, bound once.
    decode_logits: DynValue,
    /// The id of one-token calls, written in place.
    decode_ids: DynValue,
    /// Whether `decode_ids` (not a prompt chunk) is bound as `input_ids`.
    decode_ids_bound: bool,
    /// Ones for the attention mask; each call binds a view of its first `total`.
    ones: Vec<i64>,
    /// Logits of prompt chunks, grown to the largest chunk and reused (a fresh buffer per
    /// chunk costs a page fault per 4 KiB as ONNX Runtime first writes it).
    prefill_f32: Vec<f32>,
    prefill_f16: Vec<half::f16>,
    input_ids: CString,
    attention_mask: CString,
    logits_name: CString,
    /// Tokens in the cache.
    len: usize,
    n_ctx: u32,
    logits_f16: bool,
    vocab: usize,
    logits: Vec<f32>,
}

/// Turns an ONNX Runtime status into a message (and frees it).
fn status(what: &str, st: ort::sys::OrtStatusPtr) -> Result<(), String> {
    if st.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from an ONNX Runtime call; its message is read, then the
    // status is released once.
    let msg = unsafe {
        let m = (api.GetErrorMessage)(st.0);
        let text = if m.is_null() {
            String::from("unknown error")
        } else {
            CStr::from_ptr(m).to_string_lossy().into_owned()
        };
        (api.ReleaseStatus)(st.0);
        text
    };
    Err(format!("{what}: {msg}"))
}

fn zeros<
    T: ort::value::PrimitiveTensorElementType + Clone + Default + std::fmt::Debug + 'static,
>(
    shape: [usize; 4],
) -> Result<DynValue, String> {
    let n: usize = shape.iter().product();
    Tensor::from_array((shape, vec![T::default(); n]))
        .map(|t| t.into_dyn())
        .map_err(|e| e.to_string())
}

impl OrtForward {
    fn new(
        session: Session,
        past_names: &[String],
        present_names: &[String],
        n_ctx: u32,
        cache_f16: bool,
        logits_f16: bool,
        genai: GenaiConfig,
    ) -> Result<OrtForward, String> {
        let api = ort::api();
        let shape = [1, genai.kv_heads, n_ctx as usize, genai.head_size];
        let cache: Vec<DynValue> = (0..past_names.len())
            .map(|_| {
                if cache_f16 {
                    zeros::<half::f16>(shape)
                } else {
                    zeros::<f32>(shape)
                }
            })
            .collect::<Result<_, _>>()?;
        let decode_logits = if logits_f16 {
            Tensor::from_array((
                [1usize, 1, genai.vocab_size],
                vec![half::f16::ZERO; genai.vocab_size],
            ))
            .map(|t| t.into_dyn())
        } else {
            Tensor::from_array(([1usize, 1, genai.vocab_size], vec![0f32; genai.vocab_size]))
                .map(|t| t.into_dyn())
        }
        .map_err(|e| e.to_string())?;
        let cstr = |n: &str| CString::new(n).map_err(|_| format!("tensor name {n:?} holds a NUL"));
        let mut raw = std::ptr::null_mut();
        // SAFETY: the session is live; CreateIoBinding writes a binding we own (released in
        // Drop). Each bound value outlives the binding: `_cache` is dropped after it.
        let binding = unsafe {
            status(
                "CreateIoBinding",
                (api.CreateIoBinding)(session.ptr().cast_mut(), &mut raw),
            )?;
            NonNull::new(raw).ok_or("CreateIoBinding returned nothing")?
        };
        let mut fwd = OrtForward {
            session,
            binding,
            _cache: Vec::new(),
            decode_logits,
            decode_ids: Tensor::from_array(([1usize, 1], vec![0i64]))
                .map(|t| t.into_dyn())
                .map_err(|e| e.to_string())?,
            decode_ids_bound: false,
            ones: vec![1i64; n_ctx as usize],
            prefill_f32: Vec::new(),
            prefill_f16: Vec::new(),
            input_ids: cstr(&genai.input_ids)?,
            attention_mask: cstr(&genai.attention_mask)?,
            logits_name: cstr(&genai.logits)?,
            len: 0,
            n_ctx,
            logits_f16,
            vocab: genai.vocab_size,
            logits: Vec::new(),
        };
        for ((past, present), value) in past_names.iter().zip(present_names).zip(&cache) {
            let (past, present) = (cstr(past)?, cstr(present)?);
            // SAFETY: binding and value are live; names are NUL-terminated.
            unsafe {
                status(
                    "BindInput",
                    (api.BindInput)(fwd.binding.as_ptr(), past.as_ptr(), value.ptr()),
                )?;
                status(
                    "BindOutput",
                    (api.BindOutput)(fwd.binding.as_ptr(), present.as_ptr(), value.ptr()),
                )?;
            }
        }
        fwd._cache = cache;
        Ok(fwd)
    }
}

impl Drop for OrtForward {
    fn drop(&mut self) {
        // SAFETY: the binding came from CreateIoBinding and is released once, before the
        // session and the bound values (fields drop after this).
        unsafe { (ort::api().ReleaseIoBinding)(self.binding.as_ptr()) };
    }
}

impl Forward for OrtForward {
    fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        // Attention reads only the positions the mask covers, so old contents never count.
        self.len = 0;
        Ok(())
    }

    fn forward(&mut self, tokens: &[i32]) -> Result<&[f32], EngineError> {
        let n = tokens.len();
        let total = self.len + n;
        if n == 0 || total > self.n_ctx as usize {
            return Err(decode_err(format!(
                "{n} tokens after {} do not fit the cache of {}",
                self.len, self.n_ctx
            )));
        }
        let api = ort::api();
        let b = self.binding.as_ptr();
        // A prompt chunk gets its own ids and logits; a decode step writes its id into the
        // tensor bound for it and reads the logits buffer bound once.
        let want = n * self.vocab;
        let prompt = if n > 1 {
            let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
            let ids = Tensor::from_array(([1usize, n], ids)).map_err(decode_err)?;
            let shape = [1usize, n, self.vocab];
            let logits = if self.logits_f16 {
                if self.prefill_f16.len() < want {
                    self.prefill_f16.resize(want, half::f16::ZERO);
                }
                TensorRefMut::from_array_view_mut((shape, &mut self.prefill_f16[..want]))
                    .map(|t| t.into_dyn())
            } else {
                if self.prefill_f32.len() < want {
                    self.prefill_f32.resize(want, 0.0);
                }
                TensorRefMut::from_array_view_mut((shape, &mut self.prefill_f32[..want]))
                    .map(|t| t.into_dyn())
            }
            .map_err(decode_err)?;
            Some((ids.into_dyn(), logits))
        } else {
            let (_, id) = self
                .decode_ids
                .try_extract_tensor_mut::<i64>()
                .map_err(decode_err)?;
            id[0] = i64::from(tokens[0]);
            None
        };
        let mask = TensorRef::from_array_view(([1usize, total], &self.ones[..total]))
            .map_err(decode_err)?;
        // SAFETY: binding, session and values are live across the run; the ids, mask and
        // logits values are dropped only after it, and rebinding replaces the earlier ones.
        unsafe {
            let bind_in = |name: &CString, v: *const ort::sys::OrtValue| {
                status("BindInput", (api.BindInput)(b, name.as_ptr(), v))
            };
            let bind_out = |v: *const ort::sys::OrtValue| {
                status(
                    "BindOutput",
                    (api.BindOutput)(b, self.logits_name.as_ptr(), v),
                )
            };
            let mut r = bind_in(&self.attention_mask, mask.ptr());
            match &prompt {
                Some((ids, logits)) => {
                    r = r
                        .and_then(|()| bind_in(&self.input_ids, ids.ptr()))
                        .and_then(|()| bind_out(logits.ptr()));
                    self.decode_ids_bound = false;
                }
                None if !self.decode_ids_bound => {
                    r = r
                        .and_then(|()| bind_in(&self.input_ids, self.decode_ids.ptr()))
                        .and_then(|()| bind_out(self.decode_logits.ptr()));
                    self.decode_ids_bound = r.is_ok();
                }
                None => {}
            }
            r.and_then(|()| {
                status(
                    "RunWithBinding",
                    (api.RunWithBinding)(self.session.ptr().cast_mut(), std::ptr::null(), b),
                )
            })
            .map_err(decode_err)?;
        }
        drop(mask);
        self.len = total;
        if prompt.is_none() && !self.logits_f16 {
            // A decode step's float logits are read where ONNX Runtime wrote them.
            let (_, data) = self
                .decode_logits
                .try_extract_tensor::<f32>()
                .map_err(decode_err)?;
            return Ok(data);
        }
        drop(prompt);
        let last = (n - 1) * self.vocab;
        self.logits.clear();
        if self.logits_f16 {
            let rows: &[half::f16] = if n > 1 {
                &self.prefill_f16[..want]
            } else {
                self.decode_logits
                    .try_extract_tensor::<half::f16>()
                    .map_err(decode_err)?
                    .1
            };
            self.logits
                .extend(rows[last..last + self.vocab].iter().map(|x| x.to_f32()));
        } else {
            self.logits
                .extend_from_slice(&self.prefill_f32[last..last + self.vocab]);
        }
        Ok(&self.logits)
    }
}
