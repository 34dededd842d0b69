//! What every benchmark uses: timing a child process, the release `edgepack` and runtime, the
//! peers' Python, a fresh work folder, the shared input model and its Q8_0 bundle, and
//! llama.cpp's own tools built from the tree llama-cpp-python vendors. Uses no benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::setup;
use crate::util::{cache_dir, cargo, root, run};

/// The llama-cpp-python sdist whose llama.cpp tree `setup::llama_cpp_source` unpacks.
pub const LLAMA_CPP_PYTHON: &str = "0.3.36";

/// Wall time and peak resident memory of a child process.
pub struct Measured {
    pub seconds: f64,
    pub max_rss_mib: f64,
}

pub fn measure(cmd: &mut Command) -> Result<Measured> {
    eprintln!("$ {cmd:?}");
    let t0 = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel; the pid is our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let seconds = t0.elapsed().as_secs_f64();
    if r != pid {
        bail!("wait4 failed for {:?}", cmd.get_program());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{cmd:?} failed (status {status})");
    }
    Ok(Measured {
        seconds,
        max_rss_mib: ru.ru_maxrss as f64 / 1024.0,
    })
}

pub fn edgepack_release() -> Result<PathBuf> {
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args(["build", "--release", "-p", "edgepack"]),
    )?;
    Ok(root().join("target/release/edgepack"))
}

/// The runtime's ordinary release build.
pub fn release_runtime() -> Result<PathBuf> {
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args(["build", "--release", "-p", "edgepack-runtime"]),
    )
    .context("building edgepack-runtime")?;
    Ok(root().join("target/release/edgepack-runtime"))
}

/// A child's standard output; its standard error in the error when it fails.
pub fn output_of(cmd: &mut Command) -> Result<Vec<u8>> {
    eprintln!("$ {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

pub fn py() -> PathBuf {
    cache_dir().join("venv/bin/python")
}

/// An empty `target/bench/<name>` for one benchmark's files.
pub fn fresh_work_dir(name: &str) -> Result<PathBuf> {
    let work = root().join("target/bench").join(name);
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    Ok(work)
}

/// `model` if given, else SmolLM2-135M-Instruct recovered from its GGUF as an HF folder of
/// `dtype` in `work`: both tools of a benchmark then read the same folder.
pub fn model_or_smollm2(
    ep: &Path,
    work: &Path,
    model: Option<PathBuf>,
    dtype: &str,
) -> Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m);
    }
    let hf = work.join("smollm2-hf");
    run(Command::new(ep)
        .args(["export", "hf"])
        .arg(setup::smollm2_gguf())
        .args(["--dtype", dtype, "-o"])
        .arg(&hf)
        .env("CI", "1"))?;
    Ok(hf)
}

/// Builds llama.cpp's `tool` (`llama-bench`, `llama-server`) from `src` into the cache (never
/// into the repository), once per source version, with the ggml options llama-cpp-sys-2 uses
/// for the runtime: `GGML_NATIVE=OFF`, no OpenMP. llama-server is built without its web UI
/// (the benchmarks call its API only, and nothing is downloaded at build time).
pub fn llama_cpp_tool(src: &Path, tool: &str) -> Result<PathBuf> {
    let build = cache_dir().join(format!("build/{tool}-llama-cpp-python-{LLAMA_CPP_PYTHON}"));
    let bin = build.join("bin").join(tool);
    if bin.is_file() {
        return Ok(bin);
    }
    let server = tool == "llama-server";
    let on_off = |b: bool| if b { "ON" } else { "OFF" };
    run(Command::new("cmake")
        .arg("-S")
        .arg(src)
        .arg("-B")
        .arg(&build)
        .args([
            "-DCMAKE_BUILD_TYPE=Release",
            // What llama-cpp-sys-2 passes when no target-cpu is given.
            "-DGGML_NATIVE=OFF",
            "-DGGML_OPENMP=OFF",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            &format!("-DLLAMA_BUILD_SERVER={}", on_off(server)),
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            // Only the tool and what it links.
            "-DLLAMA_BUILD_APP=OFF",
            "-DBUILD_SHARED_LIBS=OFF",
        ]))
    .with_context(|| format!("configuring {tool}"))?;
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    run(Command::new("cmake").arg("--build").arg(&build).args([
        "--target",
        tool,
        "-j",
        &jobs.to_string(),
    ]))
    .with_context(|| format!("building {tool}"))?;
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

/// A Q8_0 SmolLM2 bundle for this machine in `work`, made by the release `edgepack bundle`.
pub fn smollm2_bundle(work: &Path) -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "edgepack"]))?;
    let ep = root().join("target/release/edgepack");
    let out = work.join("bundle");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    run(Command::new(&ep)
        .arg("bundle")
        .arg(setup::smollm2_gguf())
        .args([
            "--target",
            "generic-x86_64",
            "--format",
            "gguf",
            "--quant",
            "Q8_0",
        ])
        .args(["--name", "smollm2", "-o"])
        .arg(&out)
        .env("CI", "1"))?;
    Ok(out.join("smollm2-generic-x86_64"))
}
