//! `edgepack finetune`: trains a LoRA adapter on the host and writes a PEFT adapter folder.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use edgepack_converters::import;
use edgepack_converters::io::ensure_not_input;
use edgepack_converters::train::{self, EvalLog, StepLog, TrainConfig, TrainProgress};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// The base model: a Hugging Face folder or a .gguf file (llama, qwen2 or phi3).
    pub base: PathBuf,
    /// Training data, JSONL: `messages`, `prompt`/`completion`, `question`/`answer` or `text` per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Share of the samples held out for eval loss (0 for none).
    #[arg(long, default_value_t = 0.1)]
    pub eval_split: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Dropout on the LoRA input while training.
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f32,
    /// Scale by alpha / sqrt(rank) (rsLoRA).
    #[arg(long)]
    pub rslora: bool,
    /// Modules to adapt, by name (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: Vec<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Passes over the training samples.
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Samples per forward/backward group.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Groups accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest sample in tokens; longer ones are cut (and counted).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Warmup steps (linear from 0).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Learning-rate decay after warmup: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// AdamW weight decay (decoupled).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the gradient's global L2 norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed of the LoRA initialisation, data order, split and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Which tokens carry the loss: `completion` (assistant answers) or `all`.
    #[arg(long, default_value = "completion")]
    pub train_on: String,
    /// Train on the K most useful training samples only: scored with the base model (loss and
    /// entropy on the answers) and spread by a diversity term; per-sample scores go in
    /// training_report.json.
    #[arg(long, value_name = "K")]
    pub select: Option<usize>,
    /// How --select picks: `score`, or `random` (the baseline, drawn with --seed).
    #[arg(long, default_value = "score")]
    pub select_by: String,
    /// Weight of diversity (1 - cosine similarity to the samples already picked) against
    /// usefulness when scoring; 0 keeps the K hardest samples.
    #[arg(long, default_value_t = 1.0)]
    pub select_diversity: f64,
    /// How the frozen base weights are held in memory: `f32`, or `bf16` to halve them
    /// (products still run in f32; the weights are rounded to bf16 once).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub base_dtype: String,
    /// Start from this PEFT adapter's A/B instead of a fresh initialisation.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue a run from one of its checkpoint folders (same options and data).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Save a checkpoint every N optimizer steps (0: none).
    #[arg(long, default_value_t = 0)]
    pub save_steps: u64,
    /// Keep at most this many checkpoints (0: all).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Measure eval loss every N steps (0: before and after training only).
    #[arg(long, default_value_t = 0)]
    pub eval_steps: u64,
    /// Threads, each training on its own packs of samples (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Output adapter folder (must not exist or be empty, unless resuming into it).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// A progress bar with loss, learning rate and tokens/s on a terminal; JSON lines on stderr
/// under `--json` or CI; nothing otherwise.
struct Show {
    bar: Option<ProgressBar>,
    json_lines: bool,
}

impl Show {
    fn new(json_out: bool) -> Show {
        let ci = std::env::var_os("CI").is_some();
        let tty = std::io::stderr().is_terminal();
        Show {
            bar: (!json_out && !ci && tty).then(ProgressBar::hidden),
            json_lines: json_out || ci,
        }
    }
}

impl TrainProgress for Show {
    fn start(&self, total: u64, first: u64) {
        if let Some(b) = &self.bar {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b.set_length(total);
            b.set_position(first);
            b.set_style(
                ProgressStyle::with_template(
                    "finetune [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {wide_msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
        }
    }

    fn step(&self, log: &StepLog) {
        if let Some(b) = &self.bar {
            b.set_position(log.step);
            b.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                log.loss,
                log.lr,
                log.tokens as f64 / log.seconds.max(1e-9)
            ));
        }
        if self.json_lines {
            eprintln!("{}", json!({"event": "step", "log": log}));
        }
    }

    fn eval(&self, log: &EvalLog) {
        match &self.bar {
            Some(b) => b.println(format!("eval loss at step {}: {:.4}", log.step, log.loss)),
            None if self.json_lines => eprintln!("{}", json!({"event": "eval", "log": log})),
            None => {}
        }
    }

    fn checkpoint(&self, path: &Path) {
        match &self.bar {
            Some(b) => b.println(format!("saved {}", path.display())),
            None if self.json_lines => {
                eprintln!(
                    "{}",
                    json!({"event": "checkpoint", "path": path.display().to_string()})
                )
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The run's options (Adam's betas and eps are transformers' defaults, as in PEFT).
fn config(a: &FinetuneArgs) -> TrainConfig {
    TrainConfig {
        rank: a.rank,
        alpha: a.alpha,
        dropout: a.dropout,
        rslora: a.rslora,
        targets: a.targets.iter().map(|t| t.trim().to_string()).collect(),
        lr: a.lr,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch: a.batch,
        grad_accum: a.grad_accum,
        seq_len: a.seq_len,
        warmup_steps: a.warmup_steps,
        schedule: a.schedule.clone(),
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        eval_split: a.eval_split,
        train_on: a.train_on.clone(),
        select: a.select,
        select_by: a.select_by.clone(),
        select_diversity: a.select_diversity,
        base_dtype: a.base_dtype.clone(),
        ..TrainConfig::default()
    }
}

pub fn run_finetune(a: &FinetuneArgs, json_out: bool) -> Result<()> {
    let threads = match a.threads {
        Some(0) => anyhow::bail!("--threads 0: give at least 1"),
        Some(n) => n,
        None => std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    // The trainer runs one pack of samples per thread; candle's operations inside each are
    // fastest single-threaded (its own pools would fight the trainer's threads for the cores).
    // Set before the first candle or rayon call, while this process has one thread.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    let mut inputs: Vec<&Path> = vec![&a.base, &a.data];
    inputs.extend(a.init.as_deref());
    ensure_not_input(&a.output, &inputs)?;
    if let Some(r) = &a.resume {
        let parent = r.parent().map(Path::to_path_buf).unwrap_or_default();
        if std::fs::canonicalize(&parent).ok() != std::fs::canonicalize(&a.output).ok() {
            anyhow::bail!(
                "--resume {}: a checkpoint continues into the folder that holds it; give -o {}",
                r.display(),
                parent.display()
            );
        }
    }
    let cfg = config(a);
    let model = import::open(&a.base).with_context(|| format!("importing {}", a.base.display()))?;
    let run = train::Run {
        model: &model,
        base_name: a.base.display().to_string(),
        data: &a.data,
        out: &a.output,
        init: a.init.as_deref(),
        resume: a.resume.as_deref(),
        save_every: a.save_steps,
        eval_every: a.eval_steps,
        keep_checkpoints: a.keep_checkpoints,
        threads,
    };
    let show = Show::new(json_out);
    let report = train::train(&run, &cfg, &show)
        .with_context(|| format!("fine-tuning {} on {}", a.base.display(), a.data.display()))?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "path": a.output.display().to_string(),
                "report": report,
            }))?
        );
    } else {
        let first = report.eval.first().map(|e| e.loss);
        let last = report.eval.last().map(|e| e.loss);
        println!(
            "wrote {} ({} modules, {} trainable parameters) after {} steps over {} samples, {:.0} tokens/s",
            a.output.display(),
            report.modules.len(),
            report.trainable_parameters,
            report.steps.len(),
            report.data.train_samples,
            report.tokens_per_second
        );
        if let Some(sel) = &report.data.selection {
            println!(
                "trained on {} of {} samples, selected by {}",
                sel.k, sel.candidates, sel.by
            );
        }
        if let Some(s) = report.steps.last() {
            println!("last training loss {:.4}", s.loss);
        }
        if let (Some(f), Some(l)) = (first, last) {
            println!(
                "eval loss {f:.4} -> {l:.4} over {} held-out samples",
                report.data.eval_samples
            );
        }
        if report.data.truncated > 0 {
            println!(
                "{} samples were cut at --seq-len {}",
                report.data.truncated, a.seq_len
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FinetuneArgs,
    }

    #[test]
    fn the_commands_defaults_are_the_trainers_defaults() {
        let cli = Cli::parse_from(["finetune", "base", "--data", "d.jsonl", "-o", "out"]);
        assert_eq!(config(&cli.args), TrainConfig::default());
    }
}
