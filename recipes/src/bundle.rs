//! Assembling a bundle from an exported model: the model file, the tokenizer files, the
//! runtime binary and the manifest, packed into a reproducible archive and optionally signed.
//! `edgepack bundle` and the recipe's bundle stage both come through here.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use edgepack_converters::io::AtomicDir;
use edgepack_converters::model::Model;
use edgepack_encoder::kb::Kb;
use edgepack_encoder::{Embedder, EncoderError};
use edgepack_targets::bundle::{
    self, AdapterInfo, EngineInfo, FileEntry, Manifest, ModelInfo, QuantInfo, RetrievalInfo,
    RuntimeInfo, TargetInfo, TokenizerInfo, Tool,
};
use edgepack_targets::Profile;

use crate::error::{RecipeError, Result};

/// Where the runtime sits inside a bundle.
pub const RUNTIME_FILE: &str = "bin/edgepack-runtime";
/// Where a knowledge base and its encoder sit inside a bundle.
pub const KB_FILE: &str = "rag/kb.safetensors";
pub const ENCODER_DIR: &str = "rag/encoder";
/// A knowledge base to carry, with the encoder that built it and how the board uses it.
pub struct RetrievalSpec<'a> {
    /// A folder holding `kb.safetensors`, or the file.
    pub kb: &'a Path,
    /// The sentence-transformers folder that built it.
    pub encoder: &'a Path,
    pub top_k: u32,
    /// The guard's threshold; `None` takes the one `rag calibrate` stored in the kb (and no
    /// guard if it stored none).
    pub threshold: Option<f32>,
    pub refusal: String,
    pub template: String,
}

/// What goes into one bundle.
pub struct BundleSpec<'a> {
    /// The model the file was exported from: its name, architecture, size and tokenizer.
    pub model: &'a Model,
    /// The exported model: a GGUF file, or an ONNX folder whose every file goes into
    /// `model/` (its tokenizer files included).
    pub file: &'a Path,
    /// The model file inside an exported folder (`model.onnx`); `None` for a single file.
    pub main_file: Option<&'a str>,
    /// The bundle's format (`gguf`, `onnx`).
    pub format: &'a str,
    /// Engine libraries for the board (`libonnxruntime.so...`), carried in `lib/`.
    pub engine_libs: &'a [PathBuf],
    /// The model compiled for the board's delegate (Vela's `.tflite`), carried beside it.
    pub delegate_model: Option<&'a Path>,
    /// The quantization preset and the number of tensors of each type.
    pub quant: QuantInfo,
    /// The model's source (file or folder), listed by SHA-256 in the manifest.
    pub sources: &'a Path,
    pub adapters: &'a [(PathBuf, f32)],
    pub profile: &'a Profile,
    pub runtime: Option<&'a Path>,
    pub runtime_version: Option<String>,
    /// A knowledge base for answers grounded in documents, with an out-of-domain guard.
    pub retrieval: Option<RetrievalSpec<'a>>,
    pub key: Option<&'a SigningKey>,
    /// The bundle's name: its folder, `<top>.tar.zst` and the model file's stem.
    pub top: &'a str,
    /// The model file's stem inside `model/`.
    pub model_name: &'a str,
    pub timestamp: bool,
    /// The folder that receives `<top>/` and `<top>.tar.zst`.
    pub output: &'a Path,
}

/// What was written.
pub struct BundleOutcome {
    pub dir: PathBuf,
    pub archive: PathBuf,
    pub archive_bytes: u64,
    pub manifest: Manifest,
}

/// A model name as a file-name part: lower case, ASCII letters and digits, single `-`.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches(['-', '.']).to_string()
}

/// Size and SHA-256 of a model source: the file itself, or every file of a folder.
pub fn source_entries(path: &Path) -> Result<Vec<FileEntry>> {
    if path.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return bundle::file_entry(path, &name)
            .map(|e| vec![e])
            .map_err(bundle_err);
    }
    let mut names: Vec<(String, PathBuf)> = fs::read_dir(path)
        .map_err(|e| RecipeError::io(path, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    names.sort();
    names
        .iter()
        .map(|(n, p)| bundle::file_entry(p, n).map_err(bundle_err))
        .collect()
}

fn bundle_err(e: edgepack_targets::BundleError) -> RecipeError {
    RecipeError::Io {
        path: e.path().to_path_buf(),
        message: e.to_string(),
    }
}

/// The ELF machine of a binary, as a Rust triple's architecture part.
pub fn elf_arch(path: &Path) -> Result<&'static str> {
    edgepack_targets::elf::machine(path).map_err(bundle_err)
}

/// Checks that a runtime binary is built for the profile's architecture.
pub fn check_runtime(rt: &Path, p: &Profile) -> Result<()> {
    let arch = elf_arch(rt)?;
    if arch != p.arch() {
        return Err(RecipeError::io(
            rt,
            format!(
                "built for {arch}, but {} needs {}\nhint: cargo xtask dist --target {}",
                p.name, p.rust_target, p.name
            ),
        ));
    }
    Ok(())
}

/// Checks that an engine library is an ELF shared library for the profile's architecture.
pub fn check_library(lib: &Path, p: &Profile) -> Result<()> {
    edgepack_targets::elf::expect_machine(lib, p.arch()).map_err(|e| {
        RecipeError::io(
            lib,
            format!(
                "{e}\nhint: take the library from the {} wheel of the engine's Python package",
                p.arch()
            ),
        )
    })
}

/// Hard-links a file (same file system), or copies it.
pub(crate) fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).map_err(|e| RecipeError::io(to, e))?;
    }
    Ok(())
}

#[cfg(unix)]
fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| RecipeError::io(path, e))
}

/// Writes `<output>/<top>/` and `<output>/<top>.tar.zst` atomically: the folder appears
/// complete or not at all, the archive is written under a temporary name and renamed.
pub fn write_bundle(s: &BundleSpec<'_>) -> Result<BundleOutcome> {
    let p = s.profile;
    if let Some(rt) = s.runtime {
        check_runtime(rt, p)?;
    }
    let dir = s.output.join(s.top);
    let archive = s.output.join(format!("{}.tar.zst", s.top));
    let out = AtomicDir::create(&dir).map_err(|e| RecipeError::io(&dir, e))?;
    let staging = out.staging();
    let model_dir = staging.join("model");
    fs::create_dir_all(&model_dir).map_err(|e| RecipeError::io(staging, e))?;
    let m = s.model;
    let mut tok_files = Vec::new();
    let model_rel = match s.main_file {
        Some(main) => {
            // An exported folder travels whole: graph, external data, configs, tokenizer.
            for e in source_entries(s.file)? {
                link_or_copy(&s.file.join(&e.path), &model_dir.join(&e.path))?;
                if e.path.starts_with("tokenizer") {
                    tok_files.push(format!("model/{}", e.path));
                }
            }
            if !model_dir.join(main).is_file() {
                return Err(RecipeError::io(
                    &s.file.join(main),
                    "missing from the exported folder",
                ));
            }
            format!("model/{main}")
        }
        None => {
            let ext = s
                .file
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_else(|| s.format.to_string());
            let rel = format!("model/{}.{ext}", s.model_name);
            link_or_copy(s.file, &staging.join(&rel))?;
            rel
        }
    };
    let mut libraries = Vec::new();
    for lib in s.engine_libs {
        check_library(lib, p)?;
        let name = lib
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| RecipeError::io(lib, "not a file"))?;
        let rel = format!("lib/{name}");
        let dst = staging.join(&rel);
        fs::create_dir_all(dst.parent().expect("has a parent"))
            .map_err(|e| RecipeError::io(&dst, e))?;
        fs::copy(lib, &dst).map_err(|e| RecipeError::io(lib, e))?;
        libraries.push(rel);
    }
    // The delegate the runtime should try: the board's NPU's, where it takes this format.
    let delegate = p
        .npu
        .as_ref()
        .filter(|n| n.takes(s.format) && s.format == "tflite")
        .and_then(|n| n.delegate.as_ref())
        .map(|d| d.name.clone());
    let delegate_model = match s.delegate_model {
        Some(f) => {
            let rel = format!("model/{}_vela.tflite", s.model_name);
            link_or_copy(f, &staging.join(&rel))?;
            Some(rel)
        }
        None => None,
    };
    let engine = p.engine(s.format).map(|name| EngineInfo {
        name: name.to_string(),
        delegate,
        libraries,
        delegate_model,
    });
    // An exported folder brought its own tokenizer files.
    let single_file = s.main_file.is_none();
    if let Some(t) = m.tokenizer.tokenizer_json.as_ref().filter(|_| single_file) {
        let rel = "model/tokenizer.json";
        fs::write(staging.join(rel), t).map_err(|e| RecipeError::io(&staging.join(rel), e))?;
        tok_files.push(rel.to_string());
    }
    if let Some(t) = m
        .tokenizer
        .tokenizer_config
        .as_ref()
        .filter(|_| single_file)
    {
        let rel = "model/tokenizer_config.json";
        let mut text = serde_json::to_string_pretty(t).map_err(|e| RecipeError::io(&dir, e))?;
        text.push('\n');
        fs::write(staging.join(rel), text).map_err(|e| RecipeError::io(&staging.join(rel), e))?;
        tok_files.push(rel.to_string());
    }
    let runtime = match s.runtime {
        Some(rt) => {
            let dst = staging.join(RUNTIME_FILE);
            fs::create_dir_all(dst.parent().expect("has a parent"))
                .map_err(|e| RecipeError::io(&dst, e))?;
            fs::copy(rt, &dst).map_err(|e| RecipeError::io(rt, e))?;
            set_executable(&dst)?;
            Some(RuntimeInfo {
                file: RUNTIME_FILE.into(),
                version: s
                    .runtime_version
                    .clone()
                    .unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()),
                triple: p.rust_target.clone(),
            })
        }
        None => None,
    };
    let retrieval = match &s.retrieval {
        Some(r) => Some(add_retrieval(r, staging)?),
        None => None,
    };
    let mut adapter_info = Vec::new();
    for (path, weight) in s.adapters {
        adapter_info.push(AdapterInfo {
            weight: *weight,
            files: source_entries(path)?,
        });
    }
    let mut manifest = Manifest {
        schema: bundle::SCHEMA,
        target: TargetInfo {
            profile: p.name.clone(),
            rust_target: p.rust_target.clone(),
            target_cpu: p.target_cpu.clone(),
            glibc_floor: p.glibc_floor.clone(),
        },
        format: s.format.to_string(),
        engine,
        model: ModelInfo {
            name: m.name.clone(),
            arch: m.config.arch.gguf_name().to_string(),
            n_params: m.n_params() as u64,
            file: model_rel,
            sources: source_entries(s.sources)?,
            adapters: adapter_info,
        },
        quant: s.quant.clone(),
        tokenizer: TokenizerInfo {
            files: tok_files,
            chat_template: m.tokenizer.chat_template().is_some(),
        },
        runtime,
        retrieval,
        created_by: Tool {
            name: "edgepack".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        created_at: s.timestamp.then(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| format!("unix:{}", d.as_secs()))
                .unwrap_or_default()
        }),
        files: vec![],
    };
    bundle::write_manifest(staging, &mut manifest, s.key).map_err(bundle_err)?;
    bundle::pack(staging, s.top, &archive).map_err(bundle_err)?;
    out.commit().map_err(|e| RecipeError::io(&dir, e))?;
    let archive_bytes = fs::metadata(&archive)
        .map_err(|e| RecipeError::io(&archive, e))?
        .len();
    Ok(BundleOutcome {
        dir,
        archive,
        archive_bytes,
        manifest,
    })
}

/// Checks a retrieval spec before anything is exported: the encoder loads, the knowledge
/// base reads, holds passages and was built by that encoder, and the options are in range.
/// Returns the guard's threshold the bundle will carry.
pub fn check_retrieval(r: &RetrievalSpec<'_>) -> Result<Option<f32>> {
    let enc_err = |e: EncoderError| RecipeError::Io {
        path: r.kb.to_path_buf(),
        message: e.to_string(),
    };
    let encoder = Embedder::open(r.encoder).map_err(|e| RecipeError::Io {
        path: r.encoder.to_path_buf(),
        message: e.to_string(),
    })?;
    let kb = Kb::read(r.kb).map_err(enc_err)?;
    kb.check_embedder(encoder.identity()).map_err(enc_err)?;
    if kb.is_empty() {
        return Err(RecipeError::io(
            r.kb,
            "the knowledge base holds no passages (edgepack rag add KB DOCS)",
        ));
    }
    if r.top_k == 0 || r.top_k > 64 {
        return Err(RecipeError::stage(
            "bundle",
            format!("retrieval top-k {} is outside 1..=64", r.top_k),
        ));
    }
    for key in ["{context}", "{question}"] {
        if !r.template.contains(key) {
            return Err(RecipeError::stage(
                "bundle",
                format!("the retrieval template must contain {key}"),
            ));
        }
    }
    if let Some(t) = r.threshold.filter(|t| !(-1.0..=1.0).contains(t)) {
        return Err(RecipeError::stage(
            "bundle",
            format!("retrieval threshold {t} is not a cosine in -1..=1"),
        ));
    }
    Ok(r.threshold.or(kb.meta.guard.as_ref().map(|g| g.threshold)))
}

/// Checks the knowledge base against its encoder, copies both into `rag/`, and returns the
/// manifest's section.
fn add_retrieval(r: &RetrievalSpec<'_>, staging: &Path) -> Result<RetrievalInfo> {
    let threshold = check_retrieval(r)?;
    let kb_src = if r.kb.is_dir() {
        r.kb.join(edgepack_encoder::kb::KB_FILE)
    } else {
        r.kb.to_path_buf()
    };
    let dst = staging.join(KB_FILE);
    fs::create_dir_all(staging.join(ENCODER_DIR)).map_err(|e| RecipeError::io(&dst, e))?;
    link_or_copy(&kb_src, &dst)?;
    let optional = ["sentence_bert_config.json"];
    for name in bundle::ENCODER_FILES.iter().chain(&optional) {
        let from = r.encoder.join(name);
        if optional.contains(name) && !from.is_file() {
            continue;
        }
        link_or_copy(&from, &staging.join(ENCODER_DIR).join(name))?;
    }
    Ok(RetrievalInfo {
        kb: KB_FILE.into(),
        encoder: ENCODER_DIR.into(),
        top_k: r.top_k,
        threshold,
        refusal: r.refusal.clone(),
        template: r.template.clone(),
    })
}

/// Tensor counts per type, as the manifest records them.
pub fn tensor_types<'a>(types: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for t in types {
        *m.entry(t.to_string()).or_insert(0u64) += 1;
    }
    m
}
