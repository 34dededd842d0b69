//! `cargo xtask demo`: the main job on the real small model, SmolLM2-135M-Instruct inspected,
//! written back as an HF folder, and exported as a Q4_K_M GGUF in out/.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::setup;
use crate::util::{cargo, root, run};

pub fn demo() -> Result<()> {
    let gguf = setup::smollm2(Path::new("python3"))?;
    run(cargo().args(["build", "--release", "-p", "edgepack"]))?;
    let ep = root().join("target/release/edgepack");
    let out = root().join("out");
    std::fs::create_dir_all(&out)?;
    run(Command::new(&ep).arg("inspect").arg(&gguf))?;
    let hf = out.join("smollm2-hf");
    if !hf.exists() {
        run(Command::new(&ep)
            .args(["export", "hf"])
            .arg(&gguf)
            .args(["--dtype", "bf16", "-o"])
            .arg(&hf))?;
    }
    let q = out.join("smollm2-Q4_K_M.gguf");
    run(Command::new(&ep)
        .args(["export", "gguf"])
        .arg(&hf)
        .args(["--quant", "Q4_K_M", "-o"])
        .arg(&q))?;
    eprintln!(
        "\nready: {}\n(llama.cpp: llama-cli -m {} -p \"What is the capital of France?\")",
        q.display(),
        q.display()
    );
    Ok(())
}
