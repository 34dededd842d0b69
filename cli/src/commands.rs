//! Command definitions (clap) and their dispatch to the command modules.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::args::LoraArgs;
use crate::{
    build_cmd, deploy_cmd, eval_cmd, export_cmd, finetune_cmd, mender_cmd, model_cmd, rag_cmd,
    targets_cmd,
};

#[derive(Parser, Debug)]
#[command(
    name = "edgepack",
    version,
    about = "Package language models for small Linux boards",
    long_about = "edgepack imports Hugging Face folders and GGUF files, merges LoRA adapters, \
calibrates, smooths, sparsifies and quantizes, exports GGUF, ONNX and TFLite shaped for a board, \
measures what that costs, and bundles and deploys the result to boards over SSH.",
    after_help = "Examples:\n  edgepack inspect ./SmolLM2-135M-Instruct\n  edgepack export gguf ./base --lora ./adapter --quant Q4_K_M -o model.gguf"
)]
pub struct Cli {
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a model's architecture, parameters, dtypes, tokenizer and size per quant type.
    #[command(
        after_help = "Example:\n  edgepack inspect ./TinyLlama-1.1B-Chat\n  edgepack inspect model.gguf --json"
    )]
    Inspect {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
    },
    /// Merge PEFT LoRA adapters into a base model and write a Hugging Face folder.
    #[command(
        after_help = "Example:\n  edgepack merge ./base --lora ./adapter -o ./merged\n  edgepack merge ./base --lora ./a:1.0 --lora ./b:0.5 -o ./merged --dtype f32"
    )]
    Merge {
        /// The base model: a Hugging Face folder or a .gguf file.
        base: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// Weight dtype of the output: f32, f16 or bf16 (default: the base's float type).
        #[arg(long)]
        dtype: Option<String>,
        /// Output folder (must not exist or be empty).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Compute an importance matrix (llama-imatrix's GGUF format) for weighted quantization.
    #[command(
        after_help = "Example:\n  edgepack imatrix ./SmolLM2-135M-Instruct --data calib.txt -o imatrix.gguf\n  edgepack export gguf ./SmolLM2-135M-Instruct --quant Q4_K_M --imatrix imatrix.gguf -o model.gguf\n\n--data takes plain UTF-8 text, or JSONL with a \"text\" field per line (.jsonl, or lines starting with '{'). Without --data, edgepack's own calibration text is used."
    )]
    Imatrix {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// Calibration text: plain text, or JSONL with a `text` field per line (default: edgepack's built-in corpus).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Tokens per chunk; each chunk runs from an empty context (llama-imatrix's -c).
        #[arg(long, default_value_t = 512)]
        chunk_size: usize,
        /// Run at most this many chunks (default: all the text gives).
        #[arg(long)]
        chunks: Option<usize>,
        /// Output imatrix path (.gguf).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Record activation statistics of every linear layer's input (for SmoothQuant and static int8 scales).
    #[command(
        after_help = "Example:\n  edgepack calibrate ./SmolLM2-135M-Instruct --data calib.jsonl --samples 64 --seq-len 512 -o stats.calib\n  edgepack smooth ./SmolLM2-135M-Instruct --stats stats.calib --alpha 0.5 -o ./smoothed\n\nThe texts are joined and cut into samples of --seq-len tokens (each from an empty context); text beyond --samples x --seq-len tokens is left out and reported. Without --data, edgepack's own calibration text is used.\n\nThe output is safetensors: per weight W, W.absmax, W.sum_sq and W.hist (|x| histogram), with the model identity and per-tensor min, max and 99.99th percentile of |x| in __metadata__."
    )]
    Calibrate {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// Calibration text: plain text, or JSONL with a `text` field per line (default: edgepack's built-in corpus).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Run at most this many samples (default: all the text gives).
        #[arg(long)]
        samples: Option<usize>,
        /// Tokens per sample; each sample runs from an empty context.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Output statistics file (.calib, safetensors).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Apply SmoothQuant (an exact rescaling of norms, projections and their consumers) and write a Hugging Face folder.
    #[command(
        after_help = "Example:\n  edgepack calibrate ./model -o stats.calib\n  edgepack smooth ./model --stats stats.calib --alpha 0.5 -o ./smoothed\n  edgepack smooth ./model --stats stats.calib --alpha 0.5,0.5,0.8,0.8 -o ./smoothed --dtype f32\n  edgepack smooth ./model --stats stats.calib --alpha auto --data calib.txt -o ./smoothed\n\n--alpha takes one value, one per layer separated by commas, or `auto`: a search per layer for the alpha with the lowest int8 (W8A8) output error on calibration text. The result computes the same function as the input (up to float rounding); only the input of an int8-activation quantizer benefits."
    )]
    Smooth(model_cmd::SmoothArgs),
    /// Prune the decoder's linear weights (magnitude or Wanda; unstructured or N:M) and write a Hugging Face folder.
    #[command(
        after_help = "Example:\n  edgepack calibrate ./model -o stats.calib\n  edgepack sparsify ./model --method wanda --ratio 0.5 --stats stats.calib -o ./sparse\n  edgepack sparsify ./model --method magnitude --pattern 2:4 -o ./sparse24\n\nEmbeddings, norms and the output projection stay dense. The report lists the sparsity each tensor reached."
    )]
    Sparsify(eval_cmd::SparsifyArgs),
    /// Measure quality: perplexity, KL divergence and top-1 agreement of candidates against the float model, answer similarity, and speed.
    #[command(
        after_help = "Example:\n  edgepack eval ./model --against model-Q4_K_M.gguf --data eval.txt\n  edgepack eval ./model --stats stats.calib --w8a8 --w8a8-smooth 0.5 --json\n  edgepack eval ./model --qa qa.jsonl --embedder ./all-MiniLM-L6-v2 --prompt-sizes 32,128,512 --plot ttft.svg\n\nCandidates are dequantized and run by the same f32 engine as the reference, so the figures measure the weights (and, for --w8a8, the int8 activations), not a runtime."
    )]
    Eval(eval_cmd::EvalArgs),
    /// Export a model to a file format.
    #[command(subcommand)]
    Export(export_cmd::Export),
    #[command(flatten)]
    Targets(targets_cmd::TargetCommand),
    #[command(flatten)]
    Deploy(deploy_cmd::DeployCommand),
    /// Write a bundle as a Mender artifact (format 3, payload type edgepack-bundle), or the
    /// update module that installs it on a board.
    #[command(after_help = mender_cmd::AFTER_MENDER)]
    Mender(mender_cmd::MenderArgs),
    /// Build a recipe: every target's outputs, evaluated, gated, bundled and verified, with
    /// each stage cached so an unchanged recipe does no work.
    #[command(
        after_help = "Example:\n  edgepack build recipes/smollm2-assistant.toml\n  edgepack build recipes/smollm2-assistant.toml --target imx93 --dry-run\n  edgepack build recipes/smollm2-assistant.toml --json > result.json\n\nExit status: 0 built and every gate held, 3 built but a quality gate failed, 1 error.\nThe recipe format: docs/recipes.md."
    )]
    Build(build_cmd::BuildArgs),
    /// Train a LoRA adapter on domain data and write a PEFT adapter folder.
    #[command(
        after_help = "Example:\n  edgepack finetune ./SmolLM2-135M-Instruct --data manual_qa.jsonl --eval-split 0.1 --rank 16 --alpha 32 --lr 2e-4 --epochs 3 --batch 8 --seq-len 512 -o ./adapter\n  edgepack finetune ./SmolLM2-135M-Instruct --data manual_qa.jsonl --save-steps 50 -o ./adapter\n  edgepack finetune ./SmolLM2-135M-Instruct --data manual_qa.jsonl --save-steps 50 --resume ./adapter/checkpoint-100 -o ./adapter\n  edgepack finetune ./SmolLM2-135M-Instruct --data manual_qa.jsonl --select 64 -o ./adapter-64\n  edgepack finetune ./SmolLM2-135M-Instruct --data manual_qa.jsonl --base-dtype bf16 -o ./adapter\n  edgepack merge ./SmolLM2-135M-Instruct --lora ./adapter -o ./merged\n\nData is JSONL with chat `messages`, `prompt`/`completion`, `question`/`answer` or `text` per line; the loss is taken on the answers (assistant turns, completions) unless --train-on all. The folder gets adapter_config.json, adapter_model.safetensors (PEFT's names) and training_report.json; checkpoints go to checkpoint-N/ inside it."
    )]
    Finetune(finetune_cmd::FinetuneArgs),
    /// The recipe stage cache: its size, and removing stages no recipe uses.
    #[command(subcommand)]
    Cache(build_cmd::CacheCommand),
    /// A knowledge base of documents for retrieval: build, add, remove, query, calibrate.
    #[command(subcommand)]
    Rag(rag_cmd::RagCommand),
}

pub fn run(cli: Cli) -> Result<()> {
    let json_out = cli.json;
    match cli.command {
        Command::Inspect { model } => model_cmd::inspect(&model, json_out),
        Command::Sparsify(a) => eval_cmd::run_sparsify(&a, json_out),
        Command::Eval(a) => eval_cmd::run_eval(&a, json_out),
        Command::Targets(c) => targets_cmd::run(c, json_out),
        Command::Deploy(c) => deploy_cmd::run(c, json_out),
        Command::Mender(a) => mender_cmd::run(&a, json_out),
        Command::Build(a) => build_cmd::run_build(&a, json_out),
        Command::Finetune(a) => finetune_cmd::run_finetune(&a, json_out),
        Command::Cache(c) => build_cmd::run_cache(&c, json_out),
        Command::Rag(c) => rag_cmd::run(c, json_out),
        Command::Merge {
            base,
            lora,
            dtype,
            output,
        } => export_cmd::run_merge(&base, &lora, dtype.as_deref(), &output, json_out),
        Command::Export(c) => export_cmd::run(c, json_out),
        Command::Imatrix {
            model,
            lora,
            data,
            chunk_size,
            chunks,
            output,
        } => model_cmd::run_imatrix(
            &model,
            &lora,
            data.as_deref(),
            chunk_size,
            chunks,
            &output,
            json_out,
        ),
        Command::Calibrate {
            model,
            lora,
            data,
            samples,
            seq_len,
            output,
        } => model_cmd::run_calibrate(
            &model,
            &lora,
            data.as_deref(),
            samples,
            seq_len,
            &output,
            json_out,
        ),
        Command::Smooth(a) => model_cmd::run_smooth(&a, json_out),
    }
}
