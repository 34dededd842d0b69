//! Benchmarks, each run side by side with the peer tool on the same input in the same run, and
//! written as JSON. Numbers are measured, never asserted.
//!
//! This file only dispatches; each benchmark is one file and uses nothing but `common` (and
//! the modules below `bench`).

mod common;
mod convert;
mod deploy;
mod finetune;
mod load;
mod onnx;
mod quality;
mod rag;
mod recipe;
mod runtime;
mod tflite;

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use crate::setup;
use common::{edgepack_release, py};

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
        after_help = "Example:\n  cargo xtask bench runtime --prompt-sizes 32,128,512 -o target/bench/runtime.json\n  cargo xtask bench runtime --engines onnx,tflite --prompt-sizes 32,128 --threads 2"
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
        /// Engines to measure, each against its peer: gguf (llama.cpp's llama-bench), onnx
        /// (onnxruntime-genai's Python generate), tflite (ai-edge-litert's Python interpreter).
        #[arg(long, value_delimiter = ',', default_value = "gguf,onnx,tflite")]
        engines: Vec<String>,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/runtime.json")]
        output: PathBuf,
    },
    /// `edgepack-runtime serve` under 1, 4, 8 and 32 concurrent streaming clients for a bounded
    /// time each, against llama.cpp's `llama-server --parallel N` on the same Q8_0 SmolLM2
    /// GGUF and threads, on loopback: aggregate decode tokens/s, p50/p99 time to first token,
    /// requests rejected, peak RSS and whether /health answered 200 throughout.
    #[command(
        after_help = "Example:\n  cargo xtask bench load -o target/bench/load.json\n  cargo xtask bench load --clients 1,4 --seconds 5 --threads 2"
    )]
    Load {
        /// Concurrent clients, one level each.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,32")]
        clients: Vec<usize>,
        /// Seconds each level runs, per server.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Tokens each request asks for.
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// Context per sequence in tokens (llama-server gets this times the clients).
        #[arg(long, default_value_t = 512)]
        ctx: u32,
        /// Threads for both servers (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/load.json")]
        output: PathBuf,
    },
    /// `edgepack deploy` (first deploy and redeploy of one bundle) against plain `scp` of the
    /// same files and of the same archive, over a real sshd on loopback and over a link held to
    /// a board's speed: seconds and bytes on the wire.
    #[command(
        after_help = "Example:\n  cargo xtask bench deploy -o target/bench/deploy.json\n  cargo xtask bench deploy --link-mbit 0   # loopback only"
    )]
    Deploy {
        /// Quantization of the SmolLM2 bundle deployed.
        #[arg(long, default_value = "Q8_0")]
        quant: String,
        /// Also measure over a link of this many Mbit/s each way (a board's Fast Ethernet or
        /// Wi-Fi); 0 skips it.
        #[arg(long, default_value_t = 100)]
        link_mbit: u64,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/deploy.json")]
        output: PathBuf,
    },
    /// The shipped SmolLM2 recipe by `edgepack build`, with a cold and a warm cache, against
    /// the same work as separate `edgepack` commands run by hand: wall time and peak RSS.
    #[command(after_help = "Example:\n  cargo xtask bench recipe -o target/bench/recipe.json")]
    Recipe {
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/recipe.json")]
        output: PathBuf,
    },
    /// Retrieval against its peers: embedding throughput (chunks/s) against transformers,
    /// search latency over knowledge bases of `--sizes` chunks against numpy and faiss-cpu's
    /// exact search, and the runtime's out-of-domain decision latency over HTTP.
    #[command(
        after_help = "Example:\n  cargo xtask bench rag --sizes 10000,100000 -o target/bench/rag.json"
    )]
    Rag {
        /// Knowledge-base sizes in chunks for the search timings (the first one is served).
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        sizes: Vec<usize>,
        /// Questions timed per size.
        #[arg(long, default_value_t = 20)]
        questions: usize,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/rag.json")]
        output: PathBuf,
    },
    /// LoRA training on the Tern T3 data: `edgepack finetune` against PEFT + torch (CPU, same
    /// model, data, rank, batch, sequence length, steps and threads): tokens/s and peak RSS.
    /// With `--quality K`, also the held-out answer similarity of the base model, of an
    /// adapter trained on all the data, and of adapters trained on K samples chosen by
    /// `--select` (scored) and at random.
    #[command(
        after_help = "Example:\n  cargo xtask bench finetune --steps 10 --batch 8 --threads 2 -o target/bench/finetune.json\n  cargo xtask bench finetune --quality 64"
    )]
    Finetune {
        /// Optimizer steps each tool runs.
        #[arg(long, default_value_t = 10)]
        steps: u64,
        /// Samples per step.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// LoRA rank (alpha is twice it) on all seven linears of every layer.
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Longest sample in tokens.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Threads for both tools (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Also compare data selection at this budget of samples (0: skip; takes minutes).
        #[arg(long, default_value_t = 0)]
        quality: usize,
        /// Where to write the JSON.
        #[arg(short, long, default_value = "target/bench/finetune.json")]
        output: PathBuf,
    },
}

pub fn bench(b: Bench) -> Result<()> {
    setup::setup()?;
    match b {
        Bench::Convert {
            model,
            quant,
            output,
        } => convert::convert(model, &quant, &output),
        Bench::Quality {
            ctx,
            chunks,
            output,
        } => quality::quality(
            &quality::Quality {
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
        } => onnx::onnx(model, prefill, decode, &output),
        Bench::Tflite {
            model,
            seq_len,
            prefill_len,
            decode_steps,
            output,
        } => tflite::tflite(model, seq_len, prefill_len, decode_steps, &output),
        Bench::Runtime {
            prompt_sizes,
            gen_tokens,
            repetitions,
            threads,
            flash_attn,
            engines,
            output,
        } => runtime::bench(runtime::Options {
            prompt_sizes,
            gen_tokens,
            repetitions,
            threads,
            flash_attn,
            engines,
            output,
        }),
        Bench::Load {
            clients,
            seconds,
            max_tokens,
            ctx,
            threads,
            output,
        } => load::bench(load::Options {
            clients,
            seconds,
            max_tokens,
            threads,
            ctx,
            output,
        }),
        Bench::Deploy {
            quant,
            link_mbit,
            output,
        } => deploy::bench(deploy::Options {
            quant,
            link_mbit,
            output,
        }),
        Bench::Recipe { output } => recipe::bench(&output),
        Bench::Rag {
            sizes,
            questions,
            output,
        } => rag::bench(&rag::Options {
            sizes,
            questions,
            output,
        }),
        Bench::Finetune {
            steps,
            batch,
            rank,
            seq_len,
            threads,
            quality,
            output,
        } => finetune::bench(finetune::Options {
            steps,
            batch,
            rank,
            seq_len,
            threads,
            quality,
            output,
        }),
    }
}
