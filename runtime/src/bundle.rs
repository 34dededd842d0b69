//! Opening a bundle on the board: verify everything, then name the model to load, its
//! engine, and (for engines loaded at run time) the engine's library.
//!
//! Verification (`edgepack_targets::bundle::verify_dir`: every file's size and SHA-256 against
//! the manifest, no unlisted files, the signature when present or required) happens before a
//! single model byte is mapped or a library loaded, so a tampered bundle never reaches an
//! engine.

use std::path::{Path, PathBuf};

use edgepack_targets::bundle::{self, Manifest};
use edgepack_targets::{elf, sign, BundleError, Profile};

use crate::library::{self, LibraryError, Search};

/// The delegate a bundle asks for and what the search for its library found.
#[derive(Debug, Clone)]
pub struct DelegatePlan {
    /// The manifest's name for it (`vx`, `ethos-u`, `neutron`).
    pub name: String,
    /// The delegate's shared library, if one was found.
    pub library: Option<PathBuf>,
    /// Where it was looked for, said when it was not found.
    pub searched: String,
    /// The model compiled for it ahead of time (Vela's), run in its place when it attaches.
    pub model: Option<PathBuf>,
}

/// The model formats the runtime loads, each with its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A GGUF file, run by llama.cpp (linked in).
    Gguf,
    /// An onnxruntime-genai style folder, run by ONNX Runtime (loaded at run time).
    Onnx,
    /// A generative `.tflite` (prefill and decode signatures), run by LiteRT (loaded at run
    /// time).
    Tflite,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "gguf" => Some(Format::Gguf),
            "onnx" => Some(Format::Onnx),
            "tflite" => Some(Format::Tflite),
            _ => None,
        }
    }

    /// The engine name profiles and manifests use for this format.
    pub fn engine(self) -> &'static str {
        match self {
            Format::Gguf => "llama.cpp",
            Format::Onnx => "onnxruntime",
            Format::Tflite => "litert",
        }
    }

    /// Whether the engine's library is loaded at run time rather than linked in.
    pub fn loads_library(self) -> bool {
        matches!(self, Format::Onnx | Format::Tflite)
    }
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{}: format is {format:?}; this edgepack-runtime runs gguf, onnx and tflite bundles", manifest.display())]
    Format { manifest: PathBuf, format: String },
    #[error(transparent)]
    Library(#[from] LibraryError),
}

/// A bundle that passed verification.
#[derive(Debug)]
pub struct Verified {
    pub manifest: Manifest,
    pub format: Format,
    /// The GGUF file, or the ONNX model file inside its folder.
    pub model_path: PathBuf,
    /// The engine's library, for engines loaded at run time.
    pub library: Option<PathBuf>,
    /// The id the API answers with: the manifest's model name.
    pub model_id: String,
    /// The accelerator delegate the manifest asks for, and where its library is.
    pub delegate: Option<DelegatePlan>,
}

/// Which delegate library to use for a bundle that asks for one.
#[derive(Debug, Clone, Default)]
pub enum DelegateChoice {
    /// The paths the board's profile lists (`[npu.delegate].paths`).
    #[default]
    Profile,
    /// Exactly this file (`--delegate PATH`).
    Path(PathBuf),
    /// None: run on the CPU (`--no-delegate`).
    Off,
}

/// Resolves the delegate a manifest asks for: its library by `choice`, each candidate checked
/// to be an ELF file for this CPU; a miss is recorded with every place searched, not an error
/// (the engine falls back to the CPU and says why).
fn find_delegate(
    dir: &Path,
    manifest: &Manifest,
    profile: Option<&Profile>,
    choice: &DelegateChoice,
) -> Option<DelegatePlan> {
    let engine = manifest.engine.as_ref()?;
    let name = engine.delegate.clone()?;
    let model = engine.delegate_model.as_ref().map(|m| dir.join(m));
    let plan = |library: Option<PathBuf>, searched: String| {
        Some(DelegatePlan {
            name: name.clone(),
            library,
            searched,
            model: model.clone(),
        })
    };
    let candidates: Vec<PathBuf> = match choice {
        DelegateChoice::Off => return plan(None, "--no-delegate".into()),
        DelegateChoice::Path(p) => vec![p.clone()],
        DelegateChoice::Profile => profile
            .and_then(|p| p.npu.as_ref())
            .and_then(|n| n.delegate.as_ref())
            .map(|d| d.paths.iter().map(PathBuf::from).collect())
            .unwrap_or_default(),
    };
    let mut searched = Vec::new();
    for c in &candidates {
        if !c.is_file() {
            searched.push(format!("{}: not found", c.display()));
            continue;
        }
        match elf::expect_machine(c, std::env::consts::ARCH) {
            Ok(()) => return plan(Some(c.clone()), String::new()),
            Err(e) => searched.push(e.to_string()),
        }
    }
    if candidates.is_empty() {
        searched.push(format!(
            "profile {} lists no [npu.delegate].paths",
            manifest.target.profile
        ));
    }
    plan(None, searched.join("; "))
}

/// Verifies `dir` (against `trusted_key` when given), finds its model and, for engines loaded
/// at run time, the engine's library (`engine_lib` first, see [`library::find`]).
pub fn open(
    dir: &Path,
    trusted_key: Option<&Path>,
    engine_lib: Option<&Path>,
    delegate: &DelegateChoice,
) -> Result<Verified, OpenError> {
    let key = trusted_key.map(sign::read_public_key).transpose()?;
    let manifest = bundle::verify_dir(dir, key.as_ref())?;
    let format = Format::parse(&manifest.format).ok_or_else(|| OpenError::Format {
        manifest: dir.join(bundle::MANIFEST),
        format: manifest.format.clone(),
    })?;
    let profile = Profile::builtin(&manifest.target.profile).ok();
    let delegate = match format {
        Format::Tflite => find_delegate(dir, &manifest, profile.as_ref(), delegate),
        _ => None,
    };
    let library = if format.loads_library() {
        Some(library::find(&Search {
            engine: format.engine(),
            format: &manifest.format,
            explicit: engine_lib,
            profile: profile.as_ref(),
            profile_name: &manifest.target.profile,
            bundle_dir: dir,
        })?)
    } else {
        None
    };
    // verify_dir has checked that model.file is a listed, safe, present path.
    Ok(Verified {
        model_path: dir.join(&manifest.model.file),
        model_id: manifest.model.name.clone(),
        format,
        library,
        delegate,
        manifest,
    })
}
