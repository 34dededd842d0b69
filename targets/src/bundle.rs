//! The bundle: the directory (and its `.tar.zst`) that carries a model to one board.
//!
//! ```text
//! manifest.json          schema 1; fixed key order, no timestamps unless asked
//! manifest.sig           optional: ed25519 signature of the exact bytes of manifest.json
//! model/<name>.gguf      the model in the bundle's format (onnx/tflite files join under model/)
//! model/tokenizer.json, model/tokenizer_config.json   when the model has them
//! bin/edgepack-runtime   optional: the runtime built for the board's triple
//! ```
//!
//! `manifest.json` lists every other file with its size and SHA-256; the signature covers the
//! manifest, so it covers every file. Verification refuses missing files, unlisted files,
//! anything but regular files and folders, and paths that leave the bundle. Archives are
//! byte-identical for identical inputs: entries sorted, mtime 0, uid/gid 0, modes 0644/0755,
//! one zstd level.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::BundleError;
use crate::io::{set_mode, tmp_sibling, write_atomic};
use crate::sign;

/// The manifest format this code writes and reads.
pub const SCHEMA: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.sig";
/// zstd's own default level: quantized weights are close to incompressible, so higher levels
/// cost minutes on large models for a few percent. Fixed so archives are reproducible.
pub const ZSTD_LEVEL: i32 = 3;
/// Modes written to archives: files are 0644, executables 0755, folders 0755.
const FILE_MODE: u32 = 0o644;
const EXEC_MODE: u32 = 0o755;
const HASH_BUFFER: usize = 1 << 20;

/// A file of the bundle (or of the model's sources): path relative to its folder, `/`-separated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// The board the bundle was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetInfo {
    /// The profile name.
    pub profile: String,
    pub rust_target: String,
    pub target_cpu: String,
    pub glibc_floor: String,
}

/// A LoRA adapter merged into the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterInfo {
    pub weight: f32,
    pub files: Vec<FileEntry>,
}

/// What the model is and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    /// Architecture (llama.cpp's name: `llama`, `qwen2`, `phi3`).
    pub arch: String,
    pub n_params: u64,
    /// The model file inside the bundle.
    pub file: String,
    /// The files the model was made from, named relative to the source (a file, or each file
    /// of a source folder).
    pub sources: Vec<FileEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterInfo>,
}

/// How the weights are quantized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantInfo {
    /// The preset or precision asked for, e.g. `Q4_K_M`.
    pub preset: String,
    /// Number of tensors of each type in the model file.
    pub tensor_types: BTreeMap<String, u64>,
}

/// The tokenizer files shipped beside the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    pub files: Vec<String>,
    pub chat_template: bool,
}

/// The engine that runs the model on the board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineInfo {
    /// `llama.cpp`, `onnxruntime` or `litert`, as the profile's `[runtime]` names it.
    pub name: String,
    /// The accelerator delegate the profile asks for (TFLite), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<String>,
    /// Engine libraries the bundle carries in `lib/` (for boards whose image lacks them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub libraries: Vec<String>,
    /// The model compiled ahead of time for the delegate (Vela's for Ethos-U), beside the
    /// plain one the CPU runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate_model: Option<String>,
}

/// The runtime binary shipped in the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeInfo {
    pub file: String,
    pub version: String,
    /// The triple the binary was built for.
    pub triple: String,
}

/// Retrieval on the board: a knowledge base and the sentence encoder that built it. The chat
/// endpoint embeds each question, searches the knowledge base and either refuses it (best
/// passage below `threshold`) or answers from the `top_k` passages put into `template`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalInfo {
    /// The knowledge base file (`rag/kb.safetensors`).
    pub kb: String,
    /// The sentence encoder's folder (`rag/encoder`): `config.json`, `model.safetensors`,
    /// `tokenizer.json` and, when it has one, `sentence_bert_config.json`.
    pub encoder: String,
    /// Passages put into the prompt.
    pub top_k: u32,
    /// Best-passage score (cosine) below which a question is out of domain and gets
    /// `refusal` without the model running; `None`: every question is answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// The answer to an out-of-domain question.
    pub refusal: String,
    /// The user turn sent to the model: `{context}` becomes the numbered passages,
    /// `{question}` the user's question.
    pub template: String,
}

/// The files a retrieval section needs: the kb and the encoder's three required files.
pub const ENCODER_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// The tool that made the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

/// `manifest.json`. Fields serialize in declaration order, so equal manifests are equal bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: u32,
    pub target: TargetInfo,
    /// `gguf` or `onnx` (later `tflite`).
    pub format: String,
    /// The engine for the format; absent in bundles made before engines were recorded
    /// (those are GGUF, run by llama.cpp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineInfo>,
    pub model: ModelInfo,
    pub quant: QuantInfo,
    pub tokenizer: TokenizerInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeInfo>,
    /// Retrieval-augmented answers with an out-of-domain guard, when the bundle has a kb.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<RetrievalInfo>,
    pub created_by: Tool,
    /// Only when asked for: a timestamp makes two otherwise identical bundles differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Every file of the bundle except the manifest and its signature, sorted by path.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// The exact bytes written to `manifest.json`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        b.push(b'\n');
        b
    }

    /// Parses manifest bytes read from `path`, checking the schema first so a newer bundle
    /// gets a clear message rather than a field error.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Manifest, BundleError> {
        let bad = |message: String| BundleError::Manifest {
            path: path.to_path_buf(),
            message,
        };
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        match v.get("schema").and_then(serde_json::Value::as_u64) {
            Some(s) if s == SCHEMA as u64 => {}
            Some(found) => {
                return Err(BundleError::Schema {
                    path: path.to_path_buf(),
                    found,
                    supported: SCHEMA,
                })
            }
            None => return Err(bad("field `schema`: missing or not a number".into())),
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        m.check(path)?;
        Ok(m)
    }

    /// The listed file at `path`, if any.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Sum of the listed files' sizes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    fn check(&self, path: &Path) -> Result<(), BundleError> {
        let bad = |message: String| BundleError::Manifest {
            path: path.to_path_buf(),
            message,
        };
        let mut seen = BTreeSet::new();
        for f in &self.files {
            if !is_safe_relative(&f.path) {
                return Err(BundleError::UnsafePath {
                    path: path.to_path_buf(),
                    entry: f.path.clone(),
                });
            }
            if f.path == MANIFEST || f.path == SIGNATURE {
                return Err(bad(format!(
                    "field `files`: lists `{}`, which cannot hash itself",
                    f.path
                )));
            }
            if !seen.insert(f.path.as_str()) {
                return Err(bad(format!("field `files`: `{}` is listed twice", f.path)));
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(format!(
                    "field `files`: `{}` has no valid sha256",
                    f.path
                )));
            }
        }
        let mut named = vec![("model.file", &self.model.file)];
        named.extend(self.tokenizer.files.iter().map(|f| ("tokenizer.files", f)));
        if let Some(r) = &self.runtime {
            named.push(("runtime.file", &r.file));
        }
        let encoder_files: Vec<String>;
        if let Some(r) = &self.retrieval {
            named.push(("retrieval.kb", &r.kb));
            encoder_files = ENCODER_FILES
                .iter()
                .map(|f| format!("{}/{f}", r.encoder))
                .collect();
            named.extend(encoder_files.iter().map(|f| ("retrieval.encoder", f)));
            if r.top_k == 0 || r.top_k > 64 {
                return Err(bad(format!(
                    "field `retrieval.top_k`: {} is outside 1..=64",
                    r.top_k
                )));
            }
            if let Some(t) = r.threshold.filter(|t| !(-1.0..=1.0).contains(t)) {
                return Err(bad(format!(
                    "field `retrieval.threshold`: {t} is not a cosine in -1..=1"
                )));
            }
            if !r.template.contains("{context}") || !r.template.contains("{question}") {
                return Err(bad(
                    "field `retrieval.template`: must contain `{context}` and `{question}`".into(),
                ));
            }
        }
        for (field, file) in named {
            if !seen.contains(file.as_str()) {
                return Err(bad(format!(
                    "field `{field}`: `{file}` is not among `files`"
                )));
            }
        }
        Ok(())
    }
}

/// A path written in a manifest or an archive: relative, `/`-separated parts of POSIX's
/// portable file-name characters (ASCII letters, digits, `.`, `_`, `-`), no empty, `.` or
/// `..` part, none starting with `-`. So no path can carry a newline, a quote or a space
/// into the shell scripts that deploy a bundle, nor read as an option.
pub fn is_safe_relative(p: &str) -> bool {
    !p.is_empty()
        && p.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && !c.starts_with('-')
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
        })
}

/// The largest `manifest.json` read: a bundle of a hundred thousand files stays below it.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// An ed25519 signature is 64 bytes; anything much larger is not one.
const MAX_SIGNATURE_BYTES: u64 = 4 << 10;

/// Reads a small file of a bundle with bounds: it must be a regular file (a link, FIFO or
/// device is refused without being opened for reading) of at most `limit` bytes. `None`
/// when it does not exist.
fn read_bounded(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, BundleError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(BundleError::io(path, e)),
    };
    if !meta.file_type().is_file() {
        return Err(BundleError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > limit {
        return Err(BundleError::Manifest {
            path: path.to_path_buf(),
            message: format!(
                "{} bytes; more than the {limit} a bundle's may have",
                meta.len()
            ),
        });
    }
    let f = {
        use std::os::unix::fs::OpenOptionsExt;
        // No following a link swapped in since the check, no blocking on a FIFO.
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| BundleError::io(path, e))?
    };
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| BundleError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(BundleError::Manifest {
            path: path.to_path_buf(),
            message: format!("grew past the {limit} bytes a bundle's may have while read"),
        });
    }
    Ok(Some(bytes))
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct it is given for a NUL-terminated path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

/// Size and lower-case hex SHA-256 of a file, streamed.
pub fn file_digest(path: &Path) -> Result<(u64, String), BundleError> {
    let mut f = File::open(path).map_err(|e| BundleError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUFFER];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| BundleError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(h.finalize())))
}

/// [`file_digest`] of each path, on as many threads as there are cores (at most one a file),
/// in the order given.
fn digest_all(paths: &[&PathBuf]) -> Vec<Result<(u64, String), BundleError>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(paths.len())
        .max(1);
    // Biggest first, so that the long hashes start early.
    let mut order: Vec<usize> = (0..paths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(fs::metadata(paths[i]).map(|m| m.len()).unwrap_or(0)));
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Slot = std::sync::Mutex<Option<Result<(u64, String), BundleError>>>;
    let results: Vec<Slot> = paths.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let r = file_digest(paths[i]);
                *results[i].lock().expect("digest slot") = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .expect("digest slot")
                .expect("every file hashed")
        })
        .collect()
}

/// A file's entry: `name` as recorded, digest of `path`.
pub fn file_entry(path: &Path, name: &str) -> Result<FileEntry, BundleError> {
    let (size, sha256) = file_digest(path)?;
    Ok(FileEntry {
        path: name.to_string(),
        size,
        sha256,
    })
}

/// What a walk of a bundle folder finds, by relative `/`-separated path.
struct Tree {
    files: BTreeMap<String, PathBuf>,
    dirs: BTreeSet<String>,
}

fn walk(root: &Path) -> Result<Tree, BundleError> {
    let mut tree = Tree {
        files: BTreeMap::new(),
        dirs: BTreeSet::new(),
    };
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(|e| BundleError::io(&dir, e))? {
            let entry = entry.map_err(|e| BundleError::io(&dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| BundleError::UnsafePath {
                path: path.clone(),
                entry: name.to_string_lossy().into_owned(),
            })?;
            let rel_path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            if !is_safe_relative(&rel_path) {
                return Err(BundleError::UnsafePath {
                    path: path.clone(),
                    entry: rel_path,
                });
            }
            let ty = entry.file_type().map_err(|e| BundleError::io(&path, e))?;
            if ty.is_dir() {
                tree.dirs.insert(rel_path.clone());
                stack.push((path, rel_path));
            } else if ty.is_file() {
                tree.files.insert(rel_path, path);
            } else {
                return Err(BundleError::NotRegular { path });
            }
        }
    }
    Ok(tree)
}

/// Whether the signature of a checked bundle was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureState {
    /// No `manifest.sig` and no key asked for one.
    Unsigned,
    /// `manifest.sig` verified with the given key.
    Verified,
    /// `manifest.sig` present, but no key was given to check it.
    Unverified,
}

/// A bundle whose files all match its manifest.
#[derive(Debug, Clone)]
pub struct Checked {
    pub manifest: Manifest,
    pub signature: SignatureState,
}

/// Checks a bundle folder: the signature (when `trusted` is given it is required and must
/// match), then that the files on disk are exactly the listed ones with the listed sizes and
/// SHA-256. A signed bundle checked without a key is reported as
/// [`SignatureState::Unverified`]; callers that must not load an unverified bundle use
/// [`verify_dir`].
pub fn check_dir(dir: &Path, trusted: Option<&VerifyingKey>) -> Result<Checked, BundleError> {
    let manifest_path = dir.join(MANIFEST);
    let sig_path = dir.join(SIGNATURE);
    let bytes =
        read_bounded(&manifest_path, MAX_MANIFEST_BYTES)?.ok_or_else(|| BundleError::Missing {
            path: manifest_path.clone(),
        })?;
    let sig = read_bounded(&sig_path, MAX_SIGNATURE_BYTES)?;
    let signature = check_signature(&bytes, sig.as_deref(), trusted, &sig_path)?;
    let manifest = Manifest::from_bytes(&bytes, &manifest_path)?;
    let tree = walk(dir)?;
    let listed: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    for f in &manifest.files {
        if !tree.files.contains_key(&f.path) {
            let path = dir.join(&f.path);
            return Err(if tree.dirs.contains(&f.path) {
                BundleError::NotRegular { path }
            } else {
                BundleError::Missing { path }
            });
        }
    }
    for (rel, path) in &tree.files {
        if rel != MANIFEST && rel != SIGNATURE && !listed.contains(rel.as_str()) {
            return Err(BundleError::Unlisted { path: path.clone() });
        }
    }
    for f in &manifest.files {
        let path = &tree.files[&f.path];
        let size = fs::metadata(path)
            .map_err(|e| BundleError::io(path, e))?
            .len();
        if size != f.size {
            return Err(BundleError::Size {
                path: path.clone(),
                expected: f.size,
                actual: size,
            });
        }
    }
    // Files are hashed on every core (a bundle is mostly two big files: the model and the
    // runtime); the first mismatch in manifest order is the one reported.
    let paths: Vec<&PathBuf> = manifest
        .files
        .iter()
        .map(|f| &tree.files[&f.path])
        .collect();
    let digests = digest_all(&paths);
    for (f, digest) in manifest.files.iter().zip(digests) {
        let path = &tree.files[&f.path];
        let (_, sha) = digest?;
        if sha != f.sha256 {
            return Err(BundleError::Digest {
                path: path.clone(),
                expected: f.sha256.clone(),
                actual: sha,
            });
        }
    }
    Ok(Checked {
        manifest,
        signature,
    })
}

/// The signature rule, on the manifest's raw bytes before anything in them is believed: with
/// `trusted`, `sig` must be present and verify; without, a present signature is
/// [`SignatureState::Unverified`].
fn check_signature(
    bytes: &[u8],
    sig: Option<&[u8]>,
    trusted: Option<&VerifyingKey>,
    sig_path: &Path,
) -> Result<SignatureState, BundleError> {
    Ok(match (trusted, sig) {
        (Some(key), Some(sig)) => {
            if !sign::verify(key, bytes, sig) {
                return Err(BundleError::SignatureInvalid {
                    path: sig_path.to_path_buf(),
                    fingerprint: sign::fingerprint(key),
                });
            }
            SignatureState::Verified
        }
        (Some(_), None) => {
            return Err(BundleError::SignatureMissing {
                path: sig_path.to_path_buf(),
            })
        }
        (None, Some(_)) => SignatureState::Unverified,
        (None, None) => SignatureState::Unsigned,
    })
}

/// A bundle's manifest and signature, checked without reading its files (they are hashed
/// later, by whoever uses them).
#[derive(Debug, Clone)]
pub struct Head {
    /// The archive's top folder, or the folder's own name.
    pub top: String,
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub signature: Option<Vec<u8>>,
}

/// Reads and checks `dir`'s manifest and signature as [`verify_dir`] does (a signed bundle
/// needs `trusted`), and that every listed file is there with its size; hashes nothing.
pub fn read_head(dir: &Path, trusted: Option<&VerifyingKey>) -> Result<Head, BundleError> {
    let manifest_path = dir.join(MANIFEST);
    let sig_path = dir.join(SIGNATURE);
    let bytes =
        read_bounded(&manifest_path, MAX_MANIFEST_BYTES)?.ok_or_else(|| BundleError::Missing {
            path: manifest_path.clone(),
        })?;
    let sig = read_bounded(&sig_path, MAX_SIGNATURE_BYTES)?;
    if check_signature(&bytes, sig.as_deref(), trusted, &sig_path)? == SignatureState::Unverified {
        return Err(BundleError::SignatureUnverified { path: sig_path });
    }
    let manifest = Manifest::from_bytes(&bytes, &manifest_path)?;
    for f in &manifest.files {
        let path = dir.join(&f.path);
        let meta =
            fs::symlink_metadata(&path).map_err(|_| BundleError::Missing { path: path.clone() })?;
        if !meta.is_file() {
            return Err(BundleError::NotRegular { path });
        }
        if meta.len() != f.size {
            return Err(BundleError::Size {
                path,
                expected: f.size,
                actual: meta.len(),
            });
        }
    }
    let top = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| manifest.model.name.clone());
    Ok(Head {
        top,
        manifest,
        manifest_bytes: bytes,
        signature: sig,
    })
}

/// Reads the manifest and signature at the head of an archive edgepack wrote (they come
/// first) and checks them as [`read_head`] does, without unpacking the rest. `None` when
/// the archive does not start with its manifest (not written by edgepack): unpack it whole.
pub fn read_archive_head(
    archive: &Path,
    trusted: Option<&VerifyingKey>,
) -> Result<Option<Head>, BundleError> {
    let bad = |message: String| BundleError::Archive {
        path: archive.to_path_buf(),
        message,
    };
    let file = File::open(archive).map_err(|e| BundleError::io(archive, e))?;
    let dec = zstd::Decoder::new(file).map_err(|e| BundleError::io(archive, e))?;
    let mut tar = tar::Archive::new(dec);
    let mut top: Option<String> = None;
    let mut bytes: Option<Vec<u8>> = None;
    let mut sig: Option<Vec<u8>> = None;
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("not a tar.zst archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a tar.zst archive: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("entry path: {e}")))?
            .to_string_lossy()
            .into_owned();
        let rel = raw.trim_end_matches('/');
        let (first, inner) = rel.split_once('/').unwrap_or((rel, ""));
        if !is_safe_relative(rel) || top.as_deref().is_some_and(|t| t != first) {
            return Err(BundleError::UnsafePath {
                path: archive.to_path_buf(),
                entry: raw.clone(),
            });
        }
        top = Some(first.to_string());
        let size = entry.header().size().unwrap_or(u64::MAX);
        let limit = match inner {
            "" => continue,
            MANIFEST if bytes.is_none() => MAX_MANIFEST_BYTES,
            SIGNATURE if bytes.is_some() => MAX_SIGNATURE_BYTES,
            _ => break,
        };
        if size > limit || entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(format!(
                "`{raw}` is not a manifest this archive can hold"
            )));
        }
        let mut buf = Vec::with_capacity(size as usize);
        (&mut entry)
            .take(size)
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("`{raw}`: {e}")))?;
        if inner == MANIFEST {
            bytes = Some(buf);
        } else {
            sig = Some(buf);
            break;
        }
    }
    let (Some(top), Some(bytes)) = (top, bytes) else {
        return Ok(None);
    };
    let sig_path = archive.join(&top).join(SIGNATURE);
    if check_signature(&bytes, sig.as_deref(), trusted, &sig_path)? == SignatureState::Unverified {
        return Err(BundleError::SignatureUnverified { path: sig_path });
    }
    let manifest = Manifest::from_bytes(&bytes, &archive.join(&top).join(MANIFEST))?;
    Ok(Some(Head {
        top,
        manifest,
        manifest_bytes: bytes,
        signature: sig,
    }))
}

/// Verifies a bundle folder before anything in it is used: every listed file present with its
/// size and SHA-256, no unlisted files, and the signature. With `trusted` the bundle must be
/// signed by that key. Without it an unsigned bundle passes on its checksums, and a signed one
/// is refused with [`BundleError::SignatureUnverified`]: whoever signed it meant it to be
/// checked, so a loader with no key must not treat it as verified.
pub fn verify_dir(dir: &Path, trusted: Option<&VerifyingKey>) -> Result<Manifest, BundleError> {
    let c = check_dir(dir, trusted)?;
    if c.signature == SignatureState::Unverified {
        return Err(BundleError::SignatureUnverified {
            path: dir.join(SIGNATURE),
        });
    }
    Ok(c.manifest)
}

/// Fills `manifest.files` from what is in `dir` (every file but the manifest and signature),
/// writes `manifest.json`, and with `key` writes `manifest.sig`. Returns the manifest bytes.
pub fn write_manifest(
    dir: &Path,
    manifest: &mut Manifest,
    key: Option<&SigningKey>,
) -> Result<Vec<u8>, BundleError> {
    let tree = walk(dir)?;
    let listed: Vec<(&String, &PathBuf)> = tree
        .files
        .iter()
        .filter(|(rel, _)| *rel != MANIFEST && *rel != SIGNATURE)
        .collect();
    let paths: Vec<&PathBuf> = listed.iter().map(|(_, p)| *p).collect();
    manifest.files = listed
        .iter()
        .zip(digest_all(&paths))
        .map(|((rel, _), digest)| {
            digest.map(|(size, sha256)| FileEntry {
                path: rel.to_string(),
                size,
                sha256,
            })
        })
        .collect::<Result<_, _>>()?;
    manifest.schema = SCHEMA;
    let path = dir.join(MANIFEST);
    manifest.check(&path)?;
    let bytes = manifest.to_bytes();
    write_atomic(&path, &bytes, FILE_MODE)?;
    let sig_path = dir.join(SIGNATURE);
    match key {
        Some(k) => write_atomic(&sig_path, &sign::sign(k, &bytes), FILE_MODE)?,
        None if sig_path.exists() => {
            fs::remove_file(&sig_path).map_err(|e| BundleError::io(&sig_path, e))?
        }
        None => {}
    }
    Ok(bytes)
}

#[cfg(unix)]
fn is_executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &fs::Metadata) -> bool {
    false
}

/// Packs the folder `dir` as `archive` (.tar.zst) with every entry under `top/`, reproducibly
/// (see [`write_tar`]) at zstd level [`ZSTD_LEVEL`]. The archive appears atomically.
pub fn pack(dir: &Path, top: &str, archive: &Path) -> Result<(), BundleError> {
    if !is_safe_relative(top) || top.contains('/') {
        return Err(BundleError::UnsafePath {
            path: archive.to_path_buf(),
            entry: top.to_string(),
        });
    }
    let tmp = tmp_sibling(archive);
    let res = (|| -> Result<(), BundleError> {
        let file = File::create(&tmp).map_err(|e| BundleError::io(&tmp, e))?;
        let mut enc = zstd::Encoder::new(BufWriter::new(file), ZSTD_LEVEL)
            .map_err(|e| BundleError::io(&tmp, e))?;
        enc.include_checksum(true)
            .map_err(|e| BundleError::io(&tmp, e))?;
        let enc = write_tar(dir, Some(top), enc, &tmp)?;
        let out = enc.finish().map_err(|e| BundleError::io(&tmp, e))?;
        let file = out
            .into_inner()
            .map_err(|e| BundleError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| BundleError::io(&tmp, e))?;
        set_mode(&tmp, FILE_MODE).map_err(|e| BundleError::io(&tmp, e))
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, archive).map_err(|e| BundleError::io(archive, e))
}

/// Writes the folder `dir` to `out` as a tar stream, reproducibly: the manifest (and its
/// signature) first, so an unpacker knows every entry's name and size before it writes a
/// byte, then the rest sorted by path; mtime 0, uid/gid 0, no owner names, modes 0644 (0755
/// for executables and folders). Every entry is under `top/`, or at the top with `None`.
/// `out_path` names the output in errors. Returns `out` after the tar's end blocks.
pub fn write_tar<W: Write>(
    dir: &Path,
    top: Option<&str>,
    out: W,
    out_path: &Path,
) -> Result<W, BundleError> {
    let tree = walk(dir)?;
    let mut entries: Vec<(String, Option<&PathBuf>)> = tree
        .dirs
        .iter()
        .map(|d| (d.clone(), None))
        .chain(tree.files.iter().map(|(r, p)| (r.clone(), Some(p))))
        .collect();
    entries.sort_by(|a, b| {
        let rank = |n: &str| match n {
            MANIFEST => 0,
            SIGNATURE => 1,
            _ => 2,
        };
        rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0))
    });
    let io = |e| BundleError::io(out_path, e);
    let mut tar = tar::Builder::new(out);
    let prefix = match top {
        Some(top) => {
            let mut h = header(tar::EntryType::Directory, 0, EXEC_MODE);
            tar.append_data(&mut h, format!("{top}/"), std::io::empty())
                .map_err(io)?;
            format!("{top}/")
        }
        None => String::new(),
    };
    for (rel, path) in entries {
        let name = format!("{prefix}{rel}");
        match path {
            None => {
                let mut h = header(tar::EntryType::Directory, 0, EXEC_MODE);
                tar.append_data(&mut h, format!("{name}/"), std::io::empty())
                    .map_err(io)?;
            }
            Some(path) => {
                let f = File::open(path).map_err(|e| BundleError::io(path, e))?;
                let meta = f.metadata().map_err(|e| BundleError::io(path, e))?;
                let mode = if is_executable(&meta) {
                    EXEC_MODE
                } else {
                    FILE_MODE
                };
                let mut h = header(tar::EntryType::Regular, meta.len(), mode);
                tar.append_data(&mut h, &name, BufReader::new(f))
                    .map_err(|e| BundleError::io(path, e))?;
            }
        }
    }
    tar.into_inner().map_err(io)
}

/// A tar header with the fields reproducible archives fix: mtime 0, uid/gid 0, no names.
pub(crate) fn header(ty: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Unpacks a bundle archive into `dest/<top>/` and returns that folder. The archive must hold
/// one top folder and only regular files and folders with safe relative paths; links, devices,
/// absolute paths, `..` and duplicate entries are refused. The folder appears only when the
/// whole archive was extracted; an existing one is never replaced.
pub fn unpack(archive: &Path, dest: &Path) -> Result<PathBuf, BundleError> {
    let bad = |message: String| BundleError::Archive {
        path: archive.to_path_buf(),
        message,
    };
    fs::create_dir_all(dest).map_err(|e| BundleError::io(dest, e))?;
    let file = File::open(archive).map_err(|e| BundleError::io(archive, e))?;
    let dec = zstd::Decoder::new(file).map_err(|e| BundleError::io(archive, e))?;
    let mut tar = tar::Archive::new(dec);
    let staging = dest.join(format!(".unpack.{}.tmp", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| BundleError::io(&staging, e))?;
    }
    fs::create_dir(&staging).map_err(|e| BundleError::io(&staging, e))?;
    let res = (|| -> Result<String, BundleError> {
        let mut top: Option<String> = None;
        // What the manifest (the first entry of archives edgepack writes) lets through:
        // each listed file at its listed size; nothing else is written.
        let mut listed: Option<BTreeMap<String, u64>> = None;
        let mut free = free_bytes(dest);
        let mut first_file = true;
        let entries = tar
            .entries()
            .map_err(|e| bad(format!("not a tar.zst archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(format!("not a tar.zst archive: {e}")))?;
            let raw = entry
                .path()
                .map_err(|e| bad(format!("entry path: {e}")))?
                .to_string_lossy()
                .into_owned();
            let rel = raw.trim_end_matches('/');
            let unsafe_path = || BundleError::UnsafePath {
                path: archive.to_path_buf(),
                entry: raw.clone(),
            };
            if !is_safe_relative(rel)
                || Path::new(rel)
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_)))
            {
                return Err(unsafe_path());
            }
            let first = rel.split('/').next().unwrap_or_default().to_string();
            match &top {
                None => top = Some(first),
                Some(t) if *t == first => {}
                Some(t) => {
                    return Err(bad(format!(
                        "entries under `{t}/` and `{first}/`; a bundle archive holds one folder"
                    )))
                }
            }
            let out = staging.join(rel);
            // Bundles never need these bits; an archive asking for them is not one of ours.
            if entry.header().mode().unwrap_or(0) & 0o7000 != 0 {
                return Err(bad(format!(
                    "`{raw}` asks for setuid, setgid or sticky bits; bundles hold plain files"
                )));
            }
            match entry.header().entry_type() {
                tar::EntryType::Directory => {
                    fs::create_dir_all(&out).map_err(|e| BundleError::io(&out, e))?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry
                        .header()
                        .size()
                        .map_err(|e| bad(format!("`{raw}`: {e}")))?;
                    let inner = rel.split_once('/').map_or("", |(_, r)| r);
                    if std::mem::take(&mut first_file) && inner == MANIFEST {
                        if size > MAX_MANIFEST_BYTES {
                            return Err(bad(format!(
                                "`{raw}` is {size} bytes; more than the {MAX_MANIFEST_BYTES} a manifest may have"
                            )));
                        }
                        let mut bytes = Vec::with_capacity(size as usize);
                        (&mut entry)
                            .take(MAX_MANIFEST_BYTES + 1)
                            .read_to_end(&mut bytes)
                            .map_err(|e| bad(format!("`{raw}`: {e}")))?;
                        let m = Manifest::from_bytes(&bytes, &archive.join(&raw))?;
                        let need = m.total_bytes().saturating_add(bytes.len() as u64);
                        if let Some(f) = free.filter(|f| need > *f) {
                            return Err(bad(format!(
                                "unpacked it needs {need} bytes, and {} has {f} free",
                                dest.display()
                            )));
                        }
                        listed = Some(m.files.into_iter().map(|f| (f.path, f.size)).collect());
                        if let Some(parent) = out.parent() {
                            fs::create_dir_all(parent).map_err(|e| BundleError::io(parent, e))?;
                        }
                        fs::write(&out, &bytes).map_err(|e| BundleError::io(&out, e))?;
                        set_mode(&out, FILE_MODE).map_err(|e| BundleError::io(&out, e))?;
                        continue;
                    }
                    match &listed {
                        Some(_) if inner == SIGNATURE => {
                            if size > MAX_SIGNATURE_BYTES {
                                return Err(bad(format!(
                                    "`{raw}` is {size} bytes; not a signature"
                                )));
                            }
                        }
                        Some(l) => match l.get(inner) {
                            None => {
                                return Err(BundleError::Unlisted {
                                    path: archive.join(&raw),
                                })
                            }
                            Some(want) if *want != size => {
                                return Err(BundleError::Size {
                                    path: archive.join(&raw),
                                    expected: *want,
                                    actual: size,
                                })
                            }
                            Some(_) => {}
                        },
                        // An archive without its manifest first (not written by edgepack):
                        // each entry is held to the free space left.
                        None => {
                            if let Some(f) = free.filter(|f| size > *f) {
                                return Err(bad(format!(
                                    "`{raw}` is {size} bytes, and {} has {f} free",
                                    dest.display()
                                )));
                            }
                            free = free.map(|f| f - size);
                        }
                    }
                    if let Some(parent) = out.parent() {
                        fs::create_dir_all(parent).map_err(|e| BundleError::io(parent, e))?;
                    }
                    let mode = entry.header().mode().unwrap_or(FILE_MODE);
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&out)
                        .map_err(|e| {
                            if e.kind() == std::io::ErrorKind::AlreadyExists {
                                bad(format!("`{raw}` appears twice"))
                            } else {
                                BundleError::io(&out, e)
                            }
                        })?;
                    let copied = std::io::copy(&mut (&mut entry).take(size), &mut f)
                        .map_err(|e| BundleError::io(&out, e))?;
                    if copied != size {
                        return Err(bad(format!("`{raw}` is cut short")));
                    }
                    let m = if mode & 0o111 != 0 {
                        EXEC_MODE
                    } else {
                        FILE_MODE
                    };
                    set_mode(&out, m).map_err(|e| BundleError::io(&out, e))?;
                }
                other => {
                    return Err(bad(format!(
                        "`{raw}` is a {other:?} entry; bundles hold only files and folders"
                    )))
                }
            }
        }
        top.ok_or_else(|| bad("the archive is empty".into()))
    })();
    let top = match res {
        Ok(t) => t,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    let target = dest.join(&top);
    if target.exists() {
        let _ = fs::remove_dir_all(&staging);
        return Err(BundleError::Archive {
            path: target,
            message: "exists; refusing to unpack over it".into(),
        });
    }
    let from = staging.join(&top);
    let renamed = fs::rename(&from, &target).map_err(|e| BundleError::io(&target, e));
    let _ = fs::remove_dir_all(&staging);
    renamed?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Manifest {
        fs::create_dir_all(dir.join("model")).unwrap();
        fs::write(dir.join("model/m.gguf"), b"GGUF weights").unwrap();
        fs::write(dir.join("model/tokenizer.json"), b"{}").unwrap();
        let mut m = Manifest {
            schema: SCHEMA,
            target: TargetInfo {
                profile: "imx93".into(),
                rust_target: "aarch64-unknown-linux-gnu".into(),
                target_cpu: "cortex-a55".into(),
                glibc_floor: "2.35".into(),
            },
            format: "gguf".into(),
            engine: None,
            model: ModelInfo {
                name: "m".into(),
                arch: "llama".into(),
                n_params: 1,
                file: "model/m.gguf".into(),
                sources: vec![],
                adapters: vec![],
            },
            quant: QuantInfo {
                preset: "Q8_0".into(),
                tensor_types: BTreeMap::new(),
            },
            tokenizer: TokenizerInfo {
                files: vec!["model/tokenizer.json".into()],
                chat_template: false,
            },
            runtime: None,
            retrieval: None,
            created_by: Tool {
                name: "edgepack".into(),
                version: "0".into(),
            },
            created_at: None,
            files: vec![],
        };
        write_manifest(dir, &mut m, None).unwrap();
        m
    }

    #[test]
    fn a_written_bundle_verifies_and_names_a_changed_file() {
        let d = tempfile::tempdir().unwrap();
        let m = sample(d.path());
        assert_eq!(verify_dir(d.path(), None).unwrap(), m);
        fs::write(d.path().join("model/m.gguf"), b"GGUF weightz").unwrap();
        let e = verify_dir(d.path(), None).unwrap_err();
        assert!(matches!(e, BundleError::Digest { .. }), "{e}");
        assert!(e.to_string().contains("model/m.gguf"), "{e}");
    }

    #[test]
    fn an_archive_head_gives_the_folder_manifest_and_keeps_the_signature_rule() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut m = sample(&src);
        let (private, public) = (d.path().join("k.pem"), d.path().join("k.pub.pem"));
        let key = sign::generate(&private, &public).unwrap();
        write_manifest(
            &src,
            &mut m,
            Some(&sign::read_secret_key(&private).unwrap()),
        )
        .unwrap();
        let a = d.path().join("m-imx93.tar.zst");
        pack(&src, "m-imx93", &a).unwrap();
        let head = read_archive_head(&a, Some(&key)).unwrap().unwrap();
        let folder = read_head(&src, Some(&key)).unwrap();
        assert_eq!(head.top, "m-imx93");
        assert_eq!(head.manifest, m);
        assert_eq!(head.manifest_bytes, folder.manifest_bytes);
        assert_eq!(head.signature, folder.signature);
        // A signed bundle with no key to check it is refused, as by verify_dir.
        let e = read_archive_head(&a, None).unwrap_err();
        assert!(matches!(e, BundleError::SignatureUnverified { .. }), "{e}");
        // A file of the wrong size is caught by the folder's head without hashing.
        fs::write(src.join("model/m.gguf"), b"short").unwrap();
        let e = read_head(&src, Some(&key)).unwrap_err();
        assert!(matches!(e, BundleError::Size { .. }), "{e}");
    }

    #[test]
    fn manifest_paths_that_leave_the_bundle_are_refused() {
        for p in ["../x", "/etc/passwd", "a//b", "./a", "a\\b", ""] {
            assert!(!is_safe_relative(p), "{p}");
        }
        assert!(is_safe_relative("model/m.gguf"));
    }

    #[test]
    fn pack_then_unpack_round_trips_and_is_reproducible() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        sample(&src);
        let (a, b) = (d.path().join("a.tar.zst"), d.path().join("b.tar.zst"));
        pack(&src, "m-imx93", &a).unwrap();
        pack(&src, "m-imx93", &b).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        let out = unpack(&a, &d.path().join("out")).unwrap();
        assert!(out.ends_with("m-imx93"));
        verify_dir(&out, None).unwrap();
        let e = unpack(&a, &d.path().join("out")).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
    }
}
