//! Benchmarks, each run side by side with the peer tool on the same input in the same run, and
//! written as JSON. Numbers are measured, never asserted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::{cache_dir, root, run, setup};

#[derive(Subcommand)]
pub enum Bench {
    /// HF folder -> quantized GGUF: edgepack against llama.cpp's convert_hf_to_gguf.py +
    /// llama-quantize (wall time, peak RSS, bytes, agreement of the K-quant bytes).
    #[command(
        after_help = "Example:\n  cargo xtask bench convert --quant Q4_K_M -o target/bench/convert.json"
    )]
    Convert {
        /// An HF model folder (default: SmolLM2-135M-Instruct recovered from its GGUF as BF16).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Quantization preset.
        #[arg(long, default_value = "Q4_K_M")]
        quant: String,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/convert.json")]
        output: PathBuf,
    },
    /// What each compression costs on SmolLM2: `edgepack eval` of Q8_0, Q4_K_M (with and
    /// without imatrix, and llama.cpp's own), Wanda/magnitude/2:4 sparsity and simulated W8A8
    /// (plain, SmoothQuant 0.5 and auto) against the float model; answer similarity; TTFT.
    #[command(
        after_help = "Example:\n  cargo xtask bench quality -o target/bench/quality.json\n\nAlso writes the Markdown table (.md) and the TTFT plot (.svg) beside the JSON."
    )]
    Quality {
        /// Tokens per evaluation chunk.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Chunks of edgepack's corpus to score.
        #[arg(long, default_value_t = 8)]
        chunks: usize,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/quality.json")]
        output: PathBuf,
    },
    /// Model -> TFLite per precision: export time, peak RSS, file size, and LiteRT's
    /// prefill and decode tokens/s on this machine.
    #[command(
        after_help = "Example:\n  cargo xtask bench tflite --seq-len 256 --prefill-len 64 -o target/bench/tflite.json"
    )]
    Tflite {
        /// A model folder or GGUF (default: the SmolLM2-135M-Instruct GGUF).
        #[arg(long)]
        model: Option<PathBuf>,
        /// KV cache length of the exported models.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Prefill signature length (the prompt run for tokens/s).
        #[arg(long, default_value_t = 64)]
        prefill_len: usize,
        /// Decode steps timed.
        #[arg(long, default_value_t = 64)]
        decode_steps: usize,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/tflite.json")]
        output: PathBuf,
    },
    /// HF folder -> ONNX per operator set and precision: export time, peak RSS and bytes against
    /// onnxruntime-genai's model builder on the same folder, and onnxruntime tokens/s of each.
    #[command(
        after_help = "Example:\n  cargo xtask bench onnx --prefill 64 --decode 64 -o target/bench/onnx.json"
    )]
    Onnx {
        /// An HF model folder (default: SmolLM2-135M-Instruct recovered from its GGUF as F32).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Prompt tokens run as one prefill.
        #[arg(long, default_value_t = 64)]
        prefill: usize,
        /// Greedy decode steps timed.
        #[arg(long, default_value_t = 64)]
        decode: usize,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/onnx.json")]
        output: PathBuf,
    },
    /// edgepack-runtime against llama.cpp's llama-bench on the same Q8_0 SmolLM2 GGUF: time to
    /// first token, prompt and decode tokens/s.
    #[command(
        after_help = "Example:\n  cargo xtask bench runtime --prompt-sizes 32,128,512 -o target/bench/runtime.json"
    )]
    Runtime {
        /// Prompt lengths in tokens.
        #[arg(long, value_delimiter = ',', default_value = "32,128,512")]
        prompt_sizes: Vec<usize>,
        /// Tokens generated per run.
        #[arg(long, default_value_t = 64)]
        gen_tokens: u32,
        /// Rounds; each runs both tools once per size, alternating (medians are reported).
        #[arg(long, default_value_t = 3)]
        repetitions: u32,
        /// Threads for both tools (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Flash attention on both sides (llama-bench's `-fa on`); off by default.
        #[arg(long)]
        flash_attn: bool,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/runtime.json")]
        output: PathBuf,
    },
    /// `edgepack deploy` (first deploy and redeploy of one bundle) against plain `scp -r` of
    /// the same files, over a real sshd on loopback: seconds and bytes on the wire.
    #[command(after_help = "Example:\n  cargo xtask bench deploy -o target/bench/deploy.json")]
    Deploy {
        /// Quantization of the SmolLM2 bundle deployed.
        #[arg(long, default_value = "Q8_0")]
        quant: String,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/deploy.json")]
        output: PathBuf,
    },
}

/// Wall time and peak resident memory of a child process.
pub(crate) struct Measured {
    pub seconds: f64,
    pub max_rss_mib: f64,
}

pub(crate) fn measure(cmd: &mut Command) -> Result<Measured> {
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

pub(crate) fn edgepack_release() -> Result<PathBuf> {
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args(["build", "--release", "-p", "edgepack"]),
    )?;
    Ok(root().join("target/release/edgepack"))
}

pub(crate) fn py() -> PathBuf {
    cache_dir().join("venv/bin/python")
}

fn oracle(script: &str, args: &[&Path]) -> Result<Value> {
    let out = Command::new(py())
        .arg(root().join("tests/python").join(script))
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or("null"))?)
}

pub fn bench(b: Bench) -> Result<()> {
    setup::setup()?;
    match b {
        Bench::Convert {
            model,
            quant,
            output,
        } => convert(model, &quant, &output),
        Bench::Quality {
            ctx,
            chunks,
            output,
        } => crate::quality::quality(
            &crate::quality::Quality {
                ctx,
                chunks,
                output,
            },
            &edgepack_release()?,
            &py(),
        ),
        Bench::Onnx {
            model,
            prefill,
            decode,
            output,
        } => crate::bench_onnx::onnx(model, prefill, decode, &output),
        Bench::Tflite {
            model,
            seq_len,
            prefill_len,
            decode_steps,
            output,
        } => crate::bench_tflite::tflite(model, seq_len, prefill_len, decode_steps, &output),
        Bench::Runtime {
            prompt_sizes,
            gen_tokens,
            repetitions,
            threads,
            flash_attn,
            output,
        } => crate::bench_runtime::bench(crate::bench_runtime::Options {
            prompt_sizes,
            gen_tokens,
            repetitions,
            threads,
            flash_attn,
            output,
        }),
        Bench::Deploy { quant, output } => {
            crate::bench_deploy::bench(crate::bench_deploy::Options { quant, output })
        }
    }
}

/// An empty `target/bench/<name>` for one benchmark's files.
pub(crate) fn fresh_work_dir(name: &str) -> Result<PathBuf> {
    let work = root().join("target/bench").join(name);
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    Ok(work)
}

/// `model` if given, else SmolLM2-135M-Instruct recovered from its GGUF as an HF folder of
/// `dtype` in `work`: both tools of a benchmark then read the same folder.
pub(crate) fn model_or_smollm2(
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

fn convert(model: Option<PathBuf>, quant: &str, output: &Path) -> Result<()> {
    let ep = edgepack_release()?;
    let work = fresh_work_dir("convert-work")?;
    let model = model_or_smollm2(&ep, &work, model, "bf16")?;
    let ftype = match quant.to_ascii_uppercase().as_str() {
        "Q8_0" => 7,
        "Q4_0" => 2,
        "Q4_K_M" => 15,
        "Q4_K_S" => 14,
        "Q5_K_M" => 17,
        "Q6_K" => 18,
        other => {
            bail!("bench convert supports Q8_0, Q4_0, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, not {other}")
        }
    };

    let ours = work.join("edgepack.gguf");
    let m_ours = measure(
        Command::new(&ep)
            .args(["export", "gguf"])
            .arg(&model)
            .args(["--quant", quant, "-o"])
            .arg(&ours)
            .env("CI", "1"),
    )?;

    let llama_src = setup::llama_cpp_source()?;
    let peer_f16 = work.join("llama-f16.gguf");
    let m_convert = measure(
        Command::new(py())
            .arg(llama_src.join("convert_hf_to_gguf.py"))
            .arg(&model)
            .args(["--outtype", "f16", "--outfile"])
            .arg(&peer_f16),
    )?;
    let peer = work.join("llama.gguf");
    let m_quant = measure(
        Command::new(py())
            .arg(root().join("tests/python/llama_quantize.py"))
            .arg(&peer_f16)
            .arg(&peer)
            .arg(ftype.to_string()),
    )?;
    // A float reference for the error figures.
    let f32_ref = work.join("edgepack-f32.gguf");
    run(Command::new(&ep)
        .args(["export", "gguf"])
        .arg(&model)
        .args(["--quant", "F32", "-o"])
        .arg(&f32_ref)
        .env("CI", "1"))?;
    let diff = oracle("gguf_tensor_diff.py", &[&ours, &peer, &f32_ref])?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let report = json!({
        "benchmark": "convert",
        "model": model.display().to_string(),
        "quant": quant,
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
        "edgepack": {"seconds": m_ours.seconds, "max_rss_mib": m_ours.max_rss_mib, "bytes": size(&ours)},
        "llama_cpp": {
            "seconds": m_convert.seconds + m_quant.seconds,
            "max_rss_mib": m_convert.max_rss_mib.max(m_quant.max_rss_mib),
            "convert_seconds": m_convert.seconds,
            "convert_max_rss_mib": m_convert.max_rss_mib,
            "quantize_seconds": m_quant.seconds,
            "quantize_max_rss_mib": m_quant.max_rss_mib,
            "bytes": size(&peer),
        },
        "speedup": (m_convert.seconds + m_quant.seconds) / m_ours.seconds,
        "tensor_agreement": diff,
    });
    if let Some(d) = output.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(output, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
