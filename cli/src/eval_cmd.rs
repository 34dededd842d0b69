//! `edgepack eval` and `edgepack sparsify`: what a quantization or pruning costs in quality,
//! measured with the reference forward pass.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgepack_converters::calib::data::{self, chunk_tokens};
use edgepack_converters::calib::embed::Embedder;
use edgepack_converters::calib::eval::{self, answer_qa, read_qa, GenTiming, QaScore, Scores};
use edgepack_converters::calib::forward::Forward;
use edgepack_converters::export::hf::export_hf;
use edgepack_converters::import;
use edgepack_converters::io::{ensure_not_input, AtomicFile};
use edgepack_converters::model::chat::Prompter;
use edgepack_converters::model::stats::CalibStats;
use edgepack_converters::model::Model;
use edgepack_converters::transform::smooth::{self, Alpha, Scope};
use edgepack_converters::transform::sparsify::{self, Method, Pattern};
use serde::Serialize;
use serde_json::json;

use crate::progress::Bars;

/// Tokens per sample of the α search behind `--w8a8-smooth auto` (as `edgepack smooth`).
const SEARCH_SEQ_LEN: usize = 256;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The reference model (float): a Hugging Face folder or a .gguf file.
    model: PathBuf,
    /// A candidate to compare with the reference: a quantized GGUF, a smoothed or sparse
    /// folder (repeatable).
    #[arg(long = "against", value_name = "MODEL")]
    against: Vec<PathBuf>,
    /// Also compare a simulated static W8A8 engine (int8 per-channel weights, int8 per-tensor
    /// activations with the scales of --stats) running the reference.
    #[arg(long, requires = "stats")]
    w8a8: bool,
    /// Also compare W8A8 after SmoothQuant at this alpha, or `auto` for the per-layer search
    /// on edgepack's calibration corpus (repeatable).
    #[arg(long = "w8a8-smooth", value_name = "ALPHA|auto", requires = "stats")]
    w8a8_smooth: Vec<String>,
    /// Calibration statistics of the reference (`edgepack calibrate`), for the W8A8 scales.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Text to score: plain UTF-8, or JSONL with `text` or chat `messages` (default:
    /// edgepack's own corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokens per chunk; each chunk runs from an empty context.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many chunks.
    #[arg(long, default_value_t = 8)]
    chunks: usize,
    /// Questions and reference answers, JSONL with `question` and `answer` per line: each
    /// model answers greedily with its chat template; the score is the cosine similarity of
    /// sentence embeddings of its answer and the reference answer.
    #[arg(long, requires = "embedder")]
    qa: Option<PathBuf>,
    /// A sentence-transformers BERT folder for --qa (all-MiniLM-L6-v2).
    #[arg(long)]
    embedder: Option<PathBuf>,
    /// Tokens an answer may have (--qa).
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Measure time to first token and decode speed of the reference engine at these prompt
    /// lengths (comma-separated).
    #[arg(long, value_delimiter = ',')]
    prompt_sizes: Vec<usize>,
    /// Tokens to decode per speed measurement.
    #[arg(long, default_value_t = 16)]
    gen_tokens: usize,
    /// Write an SVG plot of time to first token against prompt length (needs --prompt-sizes).
    #[arg(long, requires = "prompt_sizes")]
    plot: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    reference: String,
    data: String,
    ctx: usize,
    chunks: usize,
    models: Vec<Scores>,
    qa: Vec<QaScore>,
    speed: Vec<GenTiming>,
    seconds: f64,
}

/// A candidate to score: a model file, or the reference run by a simulated W8A8 engine.
enum Candidate {
    Model(PathBuf),
    /// W8A8 without smoothing, at a global α, or at the searched per-layer α (`None` inside).
    W8A8(Option<Option<f32>>),
}

impl Candidate {
    fn name(&self) -> String {
        match self {
            Candidate::Model(p) => p.display().to_string(),
            Candidate::W8A8(None) => "W8A8".into(),
            Candidate::W8A8(Some(Some(a))) => format!("W8A8 + SmoothQuant α={a}"),
            Candidate::W8A8(Some(None)) => "W8A8 + SmoothQuant α=auto".into(),
        }
    }

    fn load(&self, reference: &Model, stats: Option<(&CalibStats, &Path)>) -> Result<Forward> {
        Ok(match self {
            Candidate::Model(p) => {
                let m = import::open(p).with_context(|| format!("importing {}", p.display()))?;
                Forward::new(&m).with_context(|| format!("loading {}", p.display()))?
            }
            Candidate::W8A8(alpha) => {
                let (st, sp) = stats.context("--w8a8 needs --stats")?;
                let a = match alpha {
                    None => None,
                    Some(Some(a)) => Some(Alpha::Global(*a)),
                    Some(None) => {
                        let texts = [data::DEFAULT_CORPUS.to_string()];
                        let (a, _) = smooth::search_alpha(
                            reference,
                            st,
                            sp,
                            &texts,
                            SEARCH_SEQ_LEN,
                            Scope::All,
                            &edgepack_converters::progress::Silent,
                        )?;
                        Some(a)
                    }
                };
                let (m, scales) = smooth::prepare_w8a8(reference, st, sp, a.as_ref())
                    .with_context(|| format!("W8A8 scales from {}", sp.display()))?;
                let mut f = Forward::new(&m)?;
                f.simulate_w8a8(&scales)?;
                f
            }
        })
    }
}

pub fn run_eval(a: &EvalArgs, json_out: bool) -> Result<()> {
    let t0 = Instant::now();
    for out in a.plot.iter().chain(&a.markdown) {
        let mut ins: Vec<&Path> = vec![&a.model];
        ins.extend(a.against.iter().map(PathBuf::as_path));
        ins.extend(a.data.as_deref());
        ins.extend(a.qa.as_deref());
        ensure_not_input(out, &ins)?;
    }
    let reference =
        import::open(&a.model).with_context(|| format!("importing {}", a.model.display()))?;
    let stats = match &a.stats {
        Some(p) => Some(
            CalibStats::read(p).with_context(|| format!("reading statistics {}", p.display()))?,
        ),
        None => None,
    };
    let stats_ref = stats.as_ref().zip(a.stats.as_deref());
    let (texts, dataset) =
        data::texts_or_default(a.data.as_deref(), &reference).context("reading --data")?;
    let chunks = chunk_tokens(&reference, &texts, a.ctx, Some(a.chunks))
        .with_context(|| format!("tokenizing {dataset}"))?;
    let bars = Bars::new(json_out);

    let mut candidates: Vec<Candidate> = a.against.iter().cloned().map(Candidate::Model).collect();
    if a.w8a8 {
        candidates.push(Candidate::W8A8(None));
    }
    for x in &a.w8a8_smooth {
        candidates.push(Candidate::W8A8(Some(match x.trim() {
            "auto" => None,
            v => Some(v.parse::<f32>().map_err(|_| {
                anyhow::anyhow!("--w8a8-smooth {v}: give a number in 0..=1 or `auto`")
            })?),
        })));
    }

    let ref_name = a.model.display().to_string();
    let ref_fwd =
        Forward::new(&reference).with_context(|| format!("loading {}", a.model.display()))?;
    // One candidate in memory at a time beside the reference.
    let mut models = eval::evaluate((&ref_name, &ref_fwd), &[], &chunks.chunks, &bars)?;
    let mut qa = Vec::new();
    let qa_items = match &a.qa {
        Some(p) => read_qa(p)?,
        None => Vec::new(),
    };
    let embedder = match &a.embedder {
        Some(d) if !qa_items.is_empty() => Some(
            Embedder::open(d)
                .with_context(|| format!("loading the sentence embedder {}", d.display()))?,
        ),
        _ => None,
    };
    let prompter = Prompter::new(&reference)?;
    if let Some(e) = &embedder {
        qa.push(answer_qa(
            &ref_name,
            &ref_fwd,
            &prompter,
            e,
            &qa_items,
            a.max_new_tokens,
        )?);
    }
    for c in &candidates {
        let f = c.load(&reference, stats_ref)?;
        let name = c.name();
        let mut s = eval::evaluate(
            (&ref_name, &ref_fwd),
            &[(name.clone(), &f)],
            &chunks.chunks,
            &bars,
        )?;
        models.push(s.remove(1));
        if let Some(e) = &embedder {
            qa.push(answer_qa(
                &name,
                &f,
                &prompter,
                e,
                &qa_items,
                a.max_new_tokens,
            )?);
        }
    }

    let mut speed = Vec::new();
    if !a.prompt_sizes.is_empty() {
        let ids: Vec<u32> = chunks.chunks.concat();
        for &n in &a.prompt_sizes {
            if n == 0 || n > ids.len() {
                bail!(
                    "--prompt-sizes {n}: the text gives {} tokens; give sizes from 1 to that",
                    ids.len()
                );
            }
            let (_, t) = eval::generate(&ref_fwd, &ids[..n], a.gen_tokens, &[])?;
            speed.push(t);
        }
    }
    let report = Report {
        reference: ref_name,
        data: dataset,
        ctx: a.ctx,
        chunks: chunks.chunks.len(),
        models,
        qa,
        speed,
        seconds: t0.elapsed().as_secs_f64(),
    };
    let md = markdown(&report);
    if let Some(p) = &a.markdown {
        write_file(p, md.as_bytes())?;
    }
    if let Some(p) = &a.plot {
        write_file(p, ttft_svg(&report.speed).as_bytes())?;
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{md}");
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)?;
    f.commit()?;
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Reference: {} · data: {} · {} chunks of {} tokens\n",
        r.reference, r.data, r.chunks, r.ctx
    );
    let _ = writeln!(
        s,
        "| model | PPL | KL mean | KL p99 | KL max | top-1 | max Δlogit | mean Δlogit |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for m in &r.models {
        match &m.vs_reference {
            Some(d) => {
                let _ = writeln!(
                    s,
                    "| {} | {:.4} | {:.6} | {:.6} | {:.6} | {:.2}% | {:.4} | {:.4} |",
                    m.name,
                    m.perplexity,
                    d.kl_mean,
                    d.kl_p99,
                    d.kl_max,
                    100.0 * d.top1_agreement,
                    d.logit_diff_max,
                    d.logit_diff_mean
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "| {} (reference) | {:.4} | | | | | | |",
                    m.name, m.perplexity
                );
            }
        }
    }
    if !r.qa.is_empty() {
        let _ = writeln!(s, "\n| model | answer similarity |\n|---|---:|");
        for q in &r.qa {
            let _ = writeln!(s, "| {} | {:.4} |", q.model, q.mean_similarity);
        }
    }
    if !r.speed.is_empty() {
        let _ = writeln!(
            s,
            "\n| prompt tokens | TTFT (s) | decode tokens/s |\n|---:|---:|---:|"
        );
        for t in &r.speed {
            let _ = writeln!(
                s,
                "| {} | {:.3} | {:.2} |",
                t.prompt_tokens, t.ttft_s, t.decode_tokens_per_s
            );
        }
    }
    s
}

/// A line plot of TTFT against prompt length, as a self-contained SVG.
fn ttft_svg(speed: &[GenTiming]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const M: f64 = 60.0;
    let xmax = speed
        .iter()
        .map(|t| t.prompt_tokens)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let ymax = speed
        .iter()
        .map(|t| t.ttft_s)
        .fold(0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let px = |x: f64| M + x / xmax * (W - 2.0 * M);
    let py = |y: f64| H - M - y / ymax * (H - 2.0 * M);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        s,
        "<line x1=\"{M}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{M}\" y1=\"{M}\" x2=\"{M}\" y2=\"{b}\" stroke=\"black\"/>",
        b = H - M,
        r = W - M
    );
    for i in 0..=4 {
        let (xv, yv) = (xmax * i as f64 / 4.0, ymax * i as f64 / 4.0);
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.3}</text>",
            px(xv),
            H - M + 18.0,
            xv,
            M - 6.0,
            py(yv) + 4.0,
            yv
        );
    }
    let pts: Vec<String> = speed
        .iter()
        .map(|t| format!("{:.1},{:.1}", px(t.prompt_tokens as f64), py(t.ttft_s)))
        .collect();
    let _ = writeln!(
        s,
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>",
        pts.join(" ")
    );
    for p in &pts {
        let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
        let _ = writeln!(
            s,
            "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"#1f77b4\"/>"
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">prompt tokens</text><text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">time to first token (s)</text>\n<text x=\"{:.1}\" y=\"24\" text-anchor=\"middle\">Time to first token, edgepack reference engine</text>\n</svg>",
        W / 2.0,
        H - 14.0,
        H / 2.0,
        H / 2.0,
        W / 2.0
    );
    s
}

#[derive(Args, Debug)]
pub struct SparsifyArgs {
    /// A Hugging Face model folder or a .gguf file.
    model: PathBuf,
    /// How weights are scored: `magnitude` (|W|) or `wanda` (|W| × input norm; needs --stats).
    #[arg(long, value_enum, default_value_t = MethodArg::Wanda)]
    method: MethodArg,
    /// Share of each tensor (magnitude) or row (Wanda) to prune, unstructured.
    #[arg(long, conflicts_with = "pattern")]
    ratio: Option<f32>,
    /// N:M structured sparsity instead: 2:4 or 4:8.
    #[arg(long)]
    pattern: Option<String>,
    /// Calibration statistics of this model (`edgepack calibrate`), for Wanda.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Weight dtype of the output: f32, f16 or bf16 (default: the model's float type).
    #[arg(long)]
    dtype: Option<String>,
    /// Output folder (must not exist or be empty).
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum MethodArg {
    Magnitude,
    Wanda,
}

pub fn run_sparsify(a: &SparsifyArgs, json_out: bool) -> Result<()> {
    let t0 = Instant::now();
    let mut ins: Vec<&Path> = vec![&a.model];
    ins.extend(a.stats.as_deref());
    ensure_not_input(&a.output, &ins)?;
    let pattern = match (&a.pattern, a.ratio) {
        (Some(p), _) => p.parse::<Pattern>().map_err(anyhow::Error::msg)?,
        (None, Some(r)) => Pattern::Unstructured(r),
        (None, None) => bail!("give --ratio 0.5 (unstructured) or --pattern 2:4"),
    };
    let method = match a.method {
        MethodArg::Magnitude => Method::Magnitude,
        MethodArg::Wanda => Method::Wanda,
    };
    let m = import::open(&a.model).with_context(|| format!("importing {}", a.model.display()))?;
    let dtype = match &a.dtype {
        Some(d) => crate::args::parse_float_dtype(d)?,
        None => m.float_dtype(),
    };
    let stats = match &a.stats {
        Some(p) => Some(
            CalibStats::read(p).with_context(|| format!("reading statistics {}", p.display()))?,
        ),
        None => None,
    };
    let bars = Bars::new(json_out);
    let (sparse, rep) = sparsify::sparsify(
        &m,
        method,
        pattern,
        stats.as_ref().zip(a.stats.as_deref()),
        &bars,
    )
    .with_context(|| format!("sparsifying {}", a.model.display()))?;
    let r = export_hf(&sparse, &a.output, dtype, &bars)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    if json_out {
        let mut v = serde_json::to_value(&r)?;
        v["sparsify"] = serde_json::to_value(&rep)?;
        v["seconds"] = json!(secs);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("| tensor | shape | sparsity |\n|---|---|---:|");
        for t in &rep.tensors {
            println!(
                "| {} | {:?} | {:.2}% |",
                t.name,
                t.shape,
                100.0 * t.sparsity
            );
        }
        println!(
            "wrote {} ({}, {} {}): {:.2}% of the pruned tensors, {:.2}% of all parameters are zero, in {:.1}s",
            r.path,
            r.dtype,
            serde_json::to_value(rep.method)?.as_str().unwrap_or_default(),
            rep.pattern,
            100.0 * rep.sparsity,
            100.0 * rep.model_sparsity,
            secs
        );
    }
    Ok(())
}
