//! Commands about boards and what leaves the workstation: `targets list|show`, `fit`,
//! `keygen`, `bundle`, `verify`. They glue the converters (export, sizes) to
//! `edgepack-targets` (profiles, fit arithmetic, bundle format), which knows nothing of
//! conversion.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use edgepack_converters::export::gguf::{
    export_gguf, model_metadata, plan_types, GgufOptions, GgufReport,
};
use edgepack_converters::gguf::value::Value;
use edgepack_converters::gguf::writer::{GgufWriter, TensorPlan};
use edgepack_converters::io::ensure_not_input;
use edgepack_converters::model::Model;
use edgepack_converters::quant::preset::Preset;
use edgepack_encoder::ground::{DEFAULT_REFUSAL, DEFAULT_TEMPLATE, DEFAULT_TOP_K};
use edgepack_recipes::bundle::{
    check_library, check_retrieval, check_runtime, slug, tensor_types, write_bundle, BundleSpec,
    RetrievalSpec,
};
use edgepack_targets::bundle::{self, QuantInfo, SignatureState};
use edgepack_targets::fit::{self, KvShape};
use edgepack_targets::{sign, Profile};
use serde_json::json;

use crate::args::{inputs, load, resolve_profile, LoraArgs};
use crate::progress::Bars;

const MIB: f64 = (1u64 << 20) as f64;

#[derive(Subcommand, Debug)]
pub enum TargetCommand {
    /// Board profiles: list the built-in ones or show one in full.
    #[command(
        subcommand,
        after_help = "Example:\n  edgepack targets list\n  edgepack targets show imx93\n  edgepack targets show --profile my-board.toml"
    )]
    Targets(Targets),
    /// Will a model fit a board? Weights + KV cache + runtime overhead against each RAM variant.
    #[command(
        after_help = "Example:\n  edgepack fit ./merged --target imx93 --quant Q4_0 --ctx 2048\n  edgepack fit model.gguf --profile my-board.toml --json\n\nWeights are the exact size of the GGUF `edgepack export gguf` writes for the preset; the KV cache is f16 (2 x layers x ctx x kv_heads x head_dim x 2 bytes); the runtime overhead is a fixed estimate; the OS share comes from the profile. The decode ceiling is memory bandwidth / bytes read per token (all weights + the KV cache at --ctx)."
    )]
    Fit {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        #[command(flatten)]
        target: TargetArgs,
        /// Quantization preset (default: the profile's default precision).
        #[arg(long)]
        quant: Option<String>,
        /// Context length in tokens the KV cache is sized for.
        #[arg(long, default_value_t = 2048)]
        ctx: u64,
    },
    /// Create an ed25519 key pair for signing bundles.
    #[command(
        after_help = "Example:\n  edgepack keygen -o key            # writes key.pem (private, 0600) and key.pub.pem\n  edgepack bundle ./merged --target imx95 --sign key.pem -o out/\n  edgepack verify out/smollm2-imx95.tar.zst --key key.pub.pem\n\nThe files are PKCS#8 / SubjectPublicKeyInfo PEM, readable by OpenSSL. Existing files are never overwritten."
    )]
    Keygen {
        /// Output path without extension: PATH.pem and PATH.pub.pem are written.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Build a bundle for one board: model, tokenizer, optional runtime binary, manifest, signature.
    #[command(
        after_help = "Example:\n  edgepack bundle ./merged --target imx95 --format gguf --quant Q4_K_M --name smollm2 --sign key.pem -o out/\n  edgepack bundle ./base --lora ./adapter --target rpi5 --runtime target/aarch64-unknown-linux-gnu/release/edgepack-runtime -o out/\n  edgepack bundle ./merged --target imx95 --format onnx --precision int8 -o out/\n  edgepack bundle ./merged --target imx93 --format tflite --precision int8 --stats s.calib -o out/\n  edgepack bundle ./merged --target imx95 --kb kb/ -o out/\n\nWrites out/<name>-<target>/ and out/<name>-<target>.tar.zst. Identical inputs give byte-identical archives (no timestamps unless --timestamp)."
    )]
    Bundle {
        /// A Hugging Face model folder or a .gguf file.
        model: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        #[command(flatten)]
        target: TargetArgs,
        /// Model format: gguf, onnx or tflite (default: the profile's default format).
        #[arg(long)]
        format: Option<String>,
        /// Quantization preset (GGUF, e.g. Q4_K_M) or precision (ONNX: fp32, fp16, int8, int4;
        /// TFLite: fp32, fp16, dynamic-int8, int8, int8-a16); default: the profile's choice
        /// for the format.
        #[arg(long, visible_alias = "precision")]
        quant: Option<String>,
        #[command(flatten)]
        tflite: Box<TfliteBundleArgs>,
        #[command(flatten)]
        kb: Box<KbBundleArgs>,
        /// An engine library to carry in the bundle's lib/ for boards whose image lacks it
        /// (ONNX: libonnxruntime.so.* from the onnxruntime wheel for the board's CPU; TFLite:
        /// libLiteRt.so* from the ai-edge-litert wheel; `cargo xtask dist --engine-libs`).
        #[arg(long, value_name = "PATH")]
        engine_lib: Vec<PathBuf>,
        /// The runtime binary built for the board (`cargo xtask dist --target ...`).
        #[arg(long, value_name = "PATH")]
        runtime: Option<PathBuf>,
        /// Version recorded for --runtime (default: this edgepack's version).
        #[arg(long, requires = "runtime")]
        runtime_version: Option<String>,
        /// Sign the manifest with this ed25519 private key (PEM, from `edgepack keygen`).
        #[arg(long, value_name = "KEY.pem")]
        sign: Option<PathBuf>,
        /// Bundle name (default: the model's name, lower-cased, with `-` for other characters).
        #[arg(long)]
        name: Option<String>,
        /// Record the creation time in the manifest (the archive is then no longer reproducible).
        #[arg(long)]
        timestamp: bool,
        /// Output folder for <name>-<target>/ and <name>-<target>.tar.zst.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Check a bundle: every file's size and SHA-256, no extra files, the signature, the target.
    #[command(
        after_help = "Example:\n  edgepack verify out/smollm2-imx95.tar.zst --key key.pub.pem --target imx95\n  edgepack verify out/smollm2-imx95/ --json\n\nWithout --key a signed bundle passes its checksums but is reported as `signature: unverified`; with --key the signature is required. Any mismatch fails and names the file."
    )]
    Verify {
        /// A bundle folder or a .tar.zst archive.
        bundle: PathBuf,
        /// The signer's public key (PEM); makes the signature required.
        #[arg(long, value_name = "KEY.pub.pem")]
        key: Option<PathBuf>,
        /// Require the bundle to be made for this target.
        #[arg(long)]
        target: Option<String>,
    },
}

/// A knowledge base for `bundle --kb`: the runtime answers chat questions from its passages
/// and refuses those it does not cover.
#[derive(Args, Debug)]
pub struct KbBundleArgs {
    /// A knowledge base folder from `edgepack rag build` to carry in the bundle's rag/ with
    /// its encoder; the board's chat endpoint then answers from it.
    #[arg(long, value_name = "DIR")]
    kb: Option<PathBuf>,
    /// The sentence-transformers folder that built --kb (checked against the kb's record of
    /// its weights); default: the one `rag build` recorded in KB/encoder.path.
    #[arg(long, value_name = "DIR", requires = "kb")]
    embedder: Option<PathBuf>,
    /// Passages put into the prompt.
    #[arg(long, default_value_t = DEFAULT_TOP_K, requires = "kb")]
    kb_top_k: u32,
    /// The out-of-domain guard's threshold (best passage cosine below it: refused without
    /// running the model); default: the one `edgepack rag calibrate` stored in the kb.
    #[arg(long, value_name = "COSINE", requires = "kb")]
    kb_threshold: Option<f32>,
    /// The answer to an out-of-domain question.
    #[arg(long, value_name = "TEXT", requires = "kb")]
    kb_refusal: Option<String>,
    /// A text file with the user turn sent to the model: `{context}` becomes the numbered
    /// passages, `{question}` the question.
    #[arg(long, value_name = "FILE", requires = "kb")]
    kb_template: Option<PathBuf>,
}

impl KbBundleArgs {
    /// These settings with `--embedder` filled in from the kb's record when not given.
    fn resolved(self: Box<Self>) -> Result<Box<KbBundleArgs>> {
        let Some(kb) = &self.kb else {
            return Ok(self);
        };
        let embedder =
            edgepack_encoder::kb::encoder_dir(kb, self.embedder.as_deref()).context("--kb")?;
        Ok(Box::new(KbBundleArgs {
            embedder: Some(embedder),
            ..*self
        }))
    }

    fn spec(&self) -> Result<Option<RetrievalSpec<'_>>> {
        let (Some(kb), Some(encoder)) = (&self.kb, &self.embedder) else {
            return Ok(None);
        };
        let template = match &self.kb_template {
            Some(f) => fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            None => DEFAULT_TEMPLATE.to_string(),
        };
        Ok(Some(RetrievalSpec {
            kb,
            encoder,
            top_k: self.kb_top_k,
            threshold: self.kb_threshold,
            refusal: self
                .kb_refusal
                .clone()
                .unwrap_or_else(|| DEFAULT_REFUSAL.to_string()),
            template,
        }))
    }
}

/// The TFLite export settings of `bundle --format tflite`.
#[derive(Args, Debug)]
pub struct TfliteBundleArgs {
    /// TFLite: KV cache length, the most tokens one conversation holds.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// TFLite: tokens per prefill call (the prefill_<L> signature).
    #[arg(long, default_value_t = 32)]
    prefill_len: usize,
    /// TFLite int8 / int8-a16: activation statistics from `edgepack calibrate`.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// TFLite int8 / int8-a16: SmoothQuant strength (a number or `auto`); needs --stats.
    #[arg(long, value_name = "ALPHA")]
    smooth: Option<String>,
    /// TFLite on Ethos-U boards (imx93): Arm's Vela compiler to run on the full-integer
    /// model (pip ethos-u-vela).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "vela",
        env = "EDGEPACK_VELA"
    )]
    vela: PathBuf,
    /// TFLite on Ethos-U boards: bundle the CPU model only, without running Vela.
    #[arg(long)]
    no_vela: bool,
}

#[derive(Subcommand, Debug)]
pub enum Targets {
    /// List the built-in board profiles.
    #[command(after_help = "Example:\n  edgepack targets list\n  edgepack targets list --json")]
    List,
    /// Show one profile: CPU, ISA features, RAM, bandwidth, NPU, formats, triple, glibc floor.
    #[command(
        after_help = "Example:\n  edgepack targets show imx93\n  edgepack targets show --profile my-board.toml --json"
    )]
    Show {
        /// A built-in target name.
        name: Option<String>,
        /// A profile file of your own (TOML, same fields as targets/profiles/*.toml).
        #[arg(long, value_name = "FILE", conflicts_with = "name")]
        profile: Option<PathBuf>,
    },
}

/// Which board: a built-in name or a profile file.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// A built-in target (`edgepack targets list`).
    #[arg(long, required_unless_present = "profile")]
    target: Option<String>,
    /// A profile file of your own (TOML, same fields as targets/profiles/*.toml).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
}

impl TargetArgs {
    fn resolve(&self) -> Result<Profile> {
        resolve_profile(self.target.as_deref(), self.profile.as_deref())
    }
}

pub fn run(cmd: TargetCommand, json_out: bool) -> Result<()> {
    match cmd {
        TargetCommand::Targets(Targets::List) => list(json_out),
        TargetCommand::Targets(Targets::Show { name, profile }) => {
            if name.is_none() && profile.is_none() {
                bail!("name a target or give --profile FILE\nhint: edgepack targets show imx93");
            }
            show(
                &resolve_profile(name.as_deref(), profile.as_deref())?,
                json_out,
            )
        }
        TargetCommand::Fit {
            model,
            lora,
            target,
            quant,
            ctx,
        } => run_fit(
            &model,
            &lora,
            &target.resolve()?,
            quant.as_deref(),
            ctx,
            json_out,
        ),
        TargetCommand::Keygen { output } => keygen(&output, json_out),
        TargetCommand::Bundle {
            model,
            lora,
            target,
            format,
            quant,
            tflite,
            kb,
            engine_lib,
            runtime,
            runtime_version,
            sign,
            name,
            timestamp,
            output,
        } => run_bundle(
            &BundleRequest {
                model: &model,
                lora: &lora,
                profile: target.resolve()?,
                format,
                quant,
                tflite: &tflite,
                kb: &*kb.resolved()?,
                engine_libs: &engine_lib,
                runtime: runtime.as_deref(),
                runtime_version,
                sign: sign.as_deref(),
                name,
                timestamp,
                output: &output,
            },
            json_out,
        ),
        TargetCommand::Verify {
            bundle,
            key,
            target,
        } => run_verify(&bundle, key.as_deref(), target.as_deref(), json_out),
    }
}

fn list(json_out: bool) -> Result<()> {
    let all = Profile::all_builtin();
    if json_out {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<14} {:>5} {:>10}  {:<30} {:<26} description",
        "name", "cpu", "cores", "RAM GiB", "npu", "triple"
    );
    for p in all {
        let ram: Vec<String> = p
            .memory
            .ram_variants_mib
            .iter()
            .map(|m| format!("{}", *m as f64 / 1024.0))
            .collect();
        println!(
            "{:<16} {:<14} {:>5} {:>10}  {:<30} {:<26} {}",
            p.name,
            p.cpu.model,
            p.cpu.cores,
            ram.join("/"),
            p.npu.as_ref().map(|n| n.name.as_str()).unwrap_or("-"),
            p.rust_target,
            p.description
        );
    }
    Ok(())
}

fn show(p: &Profile, json_out: bool) -> Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(p)?);
        return Ok(());
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("{}  {}", p.name, p.description);
    println!(
        "  cpu            {} x{} @ {} GHz",
        p.cpu.model, p.cpu.cores, p.cpu.clock_ghz
    );
    println!(
        "  isa            dotprod {}, i8mm {}, fp16 {}  (llvm: {})",
        yes(p.cpu.dotprod),
        yes(p.cpu.i8mm),
        yes(p.cpu.fp16),
        p.cpu.llvm_features.join(" ")
    );
    let ram: Vec<String> = p
        .memory
        .ram_variants_mib
        .iter()
        .map(|m| format!("{m} MiB"))
        .collect();
    println!(
        "  ram            {}  ({} MiB kept by the OS)",
        ram.join(", "),
        p.memory.os_reserved_mib
    );
    println!(
        "  bandwidth      {} GB/s peak{}",
        p.memory.bandwidth_gbs,
        p.memory
            .bandwidth_sustained_gbs
            .map(|s| format!(", {s} GB/s sustained"))
            .unwrap_or_default()
    );
    match &p.npu {
        Some(n) => {
            println!(
                "  npu            {} ({} TOPS) via {}; formats {}; int8 weights {}{}",
                n.name,
                n.tops,
                n.compiler,
                n.formats.join(", "),
                n.int8_weights.join(", "),
                n.preferred_int8_weights
                    .as_ref()
                    .map(|g| format!(" (prefer {g})"))
                    .unwrap_or_default()
            );
            if let Some(d) = &n.delegate {
                println!("  delegate       {} ({})", d.name, d.paths.join(", "));
            }
            if let Some(ops) = &n.ops {
                println!("  npu ops        {}", ops.join(" "));
            }
            if !n.cpu_ops.is_empty() {
                println!("  npu cpu ops    {}", n.cpu_ops.join(" "));
            }
            if n.integer_only {
                println!("  npu types      integer only (float operators run on the CPU)");
            }
        }
        None => println!("  npu            none"),
    }
    let engines: Vec<String> = p.runtime.iter().map(|(f, e)| format!("{f}: {e}")).collect();
    println!("  engines        {}", engines.join(", "));
    println!(
        "  default        {} {}",
        p.defaults.format, p.defaults.precision
    );
    println!(
        "  build          {} -C target-cpu={}, glibc >= {}",
        p.rust_target, p.target_cpu, p.glibc_floor
    );
    Ok(())
}

/// The exact size of the GGUF the exporter writes for a preset, and its tensor-data bytes.
struct GgufSize {
    file_bytes: u64,
    data_bytes: u64,
}

/// Sizes every preset as `edgepack export gguf` would write it: the exporter's own metadata and
/// type plan laid out by its own writer; no tensor data is read.
fn gguf_sizes(m: &Model, presets: &[Preset]) -> Result<Vec<(Preset, GgufSize)>> {
    let mut metadata = model_metadata(m, Preset::F16, None)?;
    let mut out = Vec::new();
    for &preset in presets {
        let opts = GgufOptions {
            preset,
            pure: false,
            imatrix: None,
            name: None,
            extra: Default::default(),
        };
        metadata.set("general.file_type", Value::U32(preset.file_type()));
        let plans: Vec<TensorPlan> = plan_types(m, &opts)?
            .into_iter()
            .map(|p| TensorPlan {
                name: p.name,
                ne: p.ne,
                ty: p.ty,
            })
            .collect();
        let w = GgufWriter::new(&metadata, plans, &m.source)?;
        out.push((
            preset,
            GgufSize {
                file_bytes: w.file_size() as u64,
                data_bytes: w.tensors().iter().map(|t| t.nbytes() as u64).sum(),
            },
        ));
    }
    Ok(out)
}

fn parse_preset(s: &str) -> Result<Preset> {
    s.parse().map_err(anyhow::Error::msg)
}

fn run_fit(
    model: &Path,
    lora: &LoraArgs,
    profile: &Profile,
    quant: Option<&str>,
    ctx: u64,
    json_out: bool,
) -> Result<()> {
    if ctx == 0 {
        bail!("--ctx 0: give the context length in tokens, e.g. --ctx 2048");
    }
    let preset = parse_preset(quant.unwrap_or(&profile.defaults.precision))?;
    let (m, _) = load(model, lora)?;
    let c = &m.config;
    let shape = KvShape {
        layers: c.num_hidden_layers as u64,
        kv_heads: c.num_key_value_heads as u64,
        head_dim: c.head_dim as u64,
    };
    let kv = fit::kv_cache_bytes(shape, ctx);
    let candidates: Vec<Preset> = fit::GGUF_QUALITY_ORDER
        .iter()
        .map(|q| parse_preset(q))
        .collect::<Result<_>>()?;
    let mut presets = candidates.clone();
    if !presets.contains(&preset) {
        presets.push(preset);
    }
    let sizes = gguf_sizes(&m, &presets).with_context(|| format!("sizing {}", model.display()))?;
    let chosen = &sizes
        .iter()
        .find(|(p, _)| *p == preset)
        .expect("the asked preset is sized")
        .1;
    let report = fit::check(profile, chosen.file_bytes, kv);
    let by_name: Vec<(String, u64)> = sizes
        .iter()
        .map(|(p, s)| (p.name().to_string(), s.file_bytes))
        .collect();
    let bytes_per_token = chosen.data_bytes + kv;
    let ceiling = fit::decode_ceiling_tokens_per_s(profile.memory.bandwidth_gbs, bytes_per_token);
    let sustained = profile
        .memory
        .bandwidth_sustained_gbs
        .map(|b| fit::decode_ceiling_tokens_per_s(b, bytes_per_token));
    let variants: Vec<_> = report
        .variants
        .iter()
        .zip(&profile.memory.ram_variants_mib)
        .map(|(v, mib)| {
            let mut j = serde_json::to_value(v).expect("serializes");
            j["ram_mib"] = json!(mib);
            j["best_quant"] = json!(fit::best_fit(profile, *mib, &by_name, kv));
            j
        })
        .collect();
    if ctx > c.max_position_embeddings as u64 {
        eprintln!(
            "warning: --ctx {ctx} is longer than the model's context length {}",
            c.max_position_embeddings
        );
    }
    if json_out {
        let v = json!({
            "model": m.name,
            "path": model.display().to_string(),
            "target": profile.name,
            "quant": preset.name(),
            "ctx": ctx,
            "weights_bytes": report.weights_bytes,
            "kv_cache_bytes": report.kv_cache_bytes,
            "kv": {"layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                   "bytes_per_element": fit::KV_BYTES_PER_ELEMENT},
            "overhead_bytes": report.overhead_bytes,
            "os_reserved_bytes": profile.memory.os_reserved_mib << 20,
            "needed_bytes": report.needed_bytes,
            "variants": variants,
            "decode": {
                "bytes_per_token": bytes_per_token,
                "bandwidth_gbs": profile.memory.bandwidth_gbs,
                "tokens_per_s_ceiling": ceiling,
                "bandwidth_sustained_gbs": profile.memory.bandwidth_sustained_gbs,
                "tokens_per_s_sustained_ceiling": sustained,
            },
            "quant_sizes": sizes.iter().map(|(p, s)| json!({"quant": p.name(), "weights_bytes": s.file_bytes})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{} on {} ({}), {}, context {ctx}",
        m.name,
        profile.name,
        profile.description,
        preset.name()
    );
    println!(
        "  weights    {:>9.1} MiB  (the GGUF file edgepack export gguf writes)",
        report.weights_bytes as f64 / MIB
    );
    println!(
        "  KV cache   {:>9.1} MiB  (f16: 2 x {} layers x {ctx} tokens x {} kv heads x {} head dim x 2 B)",
        kv as f64 / MIB,
        shape.layers,
        shape.kv_heads,
        shape.head_dim
    );
    println!(
        "  runtime    {:>9.1} MiB  (overhead estimate)",
        report.overhead_bytes as f64 / MIB
    );
    println!(
        "  needed     {:>9.1} MiB  (+ {} MiB kept by the OS)",
        report.needed_bytes as f64 / MIB,
        profile.memory.os_reserved_mib
    );
    for (v, j) in report.variants.iter().zip(&variants) {
        println!(
            "  RAM {:>6} MiB: {:<13} margin {:>9.1} MiB ({:>6.1}%)  best that fits: {}",
            v.ram_bytes >> 20,
            if v.fits { "fits" } else { "DOES NOT FIT" },
            v.margin_bytes as f64 / MIB,
            v.margin_pct,
            j["best_quant"].as_str().unwrap_or("none")
        );
    }
    println!(
        "  decode     <= {:.1} tokens/s at {} GB/s peak{} ({:.1} MiB read per token)",
        ceiling,
        profile.memory.bandwidth_gbs,
        sustained
            .map(|s| format!(", <= {s:.1} at sustained bandwidth"))
            .unwrap_or_default(),
        bytes_per_token as f64 / MIB
    );
    Ok(())
}

fn keygen(output: &Path, json_out: bool) -> Result<()> {
    let base = output.to_string_lossy();
    let base = base.strip_suffix(".pem").unwrap_or(&base);
    let (secret, public) = (
        PathBuf::from(format!("{base}.pem")),
        PathBuf::from(format!("{base}.pub.pem")),
    );
    let vk = sign::generate(&secret, &public).context("creating a key pair")?;
    let fp = sign::fingerprint(&vk);
    if json_out {
        let v = json!({"private_key": secret.display().to_string(),
            "public_key": public.display().to_string(), "fingerprint": fp});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} (private, keep it secret) and {} (public), fingerprint {fp}",
            secret.display(),
            public.display()
        );
    }
    Ok(())
}

struct BundleRequest<'a> {
    model: &'a Path,
    lora: &'a LoraArgs,
    profile: Profile,
    format: Option<String>,
    quant: Option<String>,
    tflite: &'a TfliteBundleArgs,
    kb: &'a KbBundleArgs,
    engine_libs: &'a [PathBuf],
    runtime: Option<&'a Path>,
    runtime_version: Option<String>,
    sign: Option<&'a Path>,
    name: Option<String>,
    timestamp: bool,
    output: &'a Path,
}

fn run_bundle(r: &BundleRequest<'_>, json_out: bool) -> Result<()> {
    let t0 = Instant::now();
    let p = &r.profile;
    let format = r
        .format
        .clone()
        .unwrap_or_else(|| p.defaults.format.clone());
    if !["gguf", "onnx", "tflite"].contains(&format.as_str()) {
        bail!("--format {format}: use gguf, onnx or tflite");
    }
    if p.engine(&format).is_none() {
        bail!(
            "--format {format}: target {} has no engine for it (its profile's [runtime] lists {})",
            p.name,
            p.runtime.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let precision = r
        .quant
        .clone()
        .unwrap_or_else(|| p.precision_for(&format).to_string());
    if let Some(rt) = r.runtime {
        check_runtime(rt, p).context("--runtime")?;
    }
    for lib in r.engine_libs {
        check_library(lib, p).context("--engine-lib")?;
    }
    let key = r
        .sign
        .map(|k| sign::read_secret_key(k).context("reading the signing key"))
        .transpose()?;
    // The knowledge base is checked before minutes go into the export.
    let retrieval = r.kb.spec()?;
    if let Some(spec) = &retrieval {
        check_retrieval(spec).context("--kb")?;
    }
    let adapters = r.lora.parse()?;
    let lp: Vec<PathBuf> = adapters.iter().map(|(p, _)| p.clone()).collect();
    let (m, _) = load(r.model, r.lora)?;
    let name = match &r.name {
        Some(n) => slug(n),
        None => slug(&m.name),
    };
    if name.is_empty() {
        bail!(
            "the model's name `{}` gives no bundle name\nhint: pass --name",
            m.name
        );
    }
    let top = format!("{name}-{}", p.name);
    let dir = r.output.join(&top);
    let archive = r.output.join(format!("{top}.tar.zst"));
    let mut ins = inputs(r.model, &lp);
    ins.extend(r.runtime);
    ins.extend(r.sign);
    ins.extend(r.engine_libs.iter().map(PathBuf::as_path));
    ins.extend(r.tflite.stats.as_deref());
    ins.extend(r.kb.kb.as_deref());
    ins.extend(r.kb.embedder.as_deref());
    ensure_not_input(&dir, &ins)?;
    ensure_not_input(&archive, &ins)?;
    fs::create_dir_all(r.output).with_context(|| format!("creating {}", r.output.display()))?;
    // The GGUF is exported beside the bundle (same file system) and linked into it.
    let work = tempfile::Builder::new()
        .prefix(".edgepack-bundle-")
        .tempdir_in(r.output)
        .with_context(|| format!("creating a work folder in {}", r.output.display()))?;
    let bars = Bars::new(json_out);
    let mut vela_report = None;
    let (file, main_file, quant) = if format == "onnx" {
        export_onnx_folder(&m, r.model, &precision, work.path(), &bars)?
    } else if format == "tflite" {
        let path = work.path().join(format!("{name}.tflite"));
        let quant = export_tflite_file(&m, r, &precision, &path, &bars, json_out)?;
        vela_report = run_vela(r, &precision, &path, work.path(), json_out)?;
        (path, None, quant)
    } else {
        let preset = parse_preset(&precision)?;
        let gguf_path = work.path().join(format!("{name}.gguf"));
        let opts = GgufOptions {
            preset,
            pure: false,
            imatrix: None,
            name: None,
            extra: Default::default(),
        };
        let report: GgufReport = export_gguf(&m, &gguf_path, &opts, &bars)
            .with_context(|| format!("exporting {} to GGUF", r.model.display()))?;
        let quant = QuantInfo {
            preset: preset.name().to_string(),
            tensor_types: tensor_types(report.tensors.iter().map(|t| t.ty.as_str())),
        };
        (gguf_path, None, quant)
    };
    let spec = BundleSpec {
        model: &m,
        file: &file,
        main_file,
        format: &format,
        engine_libs: r.engine_libs,
        delegate_model: vela_report.as_ref().map(|v| v.compiled.as_path()),
        quant,
        sources: r.model,
        adapters: &adapters,
        profile: p,
        runtime: r.runtime,
        runtime_version: r.runtime_version.clone(),
        retrieval,
        key: key.as_ref(),
        top: &top,
        model_name: &name,
        timestamp: r.timestamp,
        output: r.output,
    };
    let out = write_bundle(&spec).context("writing the bundle")?;
    let manifest = out.manifest;
    let archive_bytes = out.archive_bytes;
    let secs = t0.elapsed().as_secs_f64();
    if json_out {
        let v = json!({
            "dir": dir.display().to_string(),
            "archive": archive.display().to_string(),
            "archive_bytes": archive_bytes,
            "signed": key.is_some(),
            "seconds": secs,
            "manifest": manifest,
            "vela": vela_report,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} and {} ({}, {} {}, {} files, {:.1} MiB{}) in {:.1}s",
            dir.display(),
            archive.display(),
            p.name,
            manifest.format,
            manifest.quant.preset,
            manifest.files.len(),
            archive_bytes as f64 / MIB,
            if key.is_some() { ", signed" } else { "" },
            secs
        );
    }
    Ok(())
}

/// Runs Vela on the exported model when the board's NPU is compiled for ahead of time (Ethos-U)
/// and the model is full-integer; prints what it placed where (unless `json_out`).
fn run_vela(
    r: &BundleRequest<'_>,
    precision: &str,
    model: &Path,
    work: &Path,
    json_out: bool,
) -> Result<Option<edgepack_recipes::vela::VelaReport>> {
    let Some(cfg) = r.profile.npu.as_ref().and_then(|n| n.vela.as_ref()) else {
        return Ok(None);
    };
    let say = |m: String| {
        if !json_out {
            eprintln!("{m}");
        }
    };
    if r.tflite.no_vela {
        say(format!(
            "{}: --no-vela, the bundle runs on the CPU only",
            r.profile.name
        ));
        return Ok(None);
    }
    if !matches!(precision, "int8" | "int8-a16") {
        say(format!("{}: Vela compiles full-integer models only (int8, int8-a16), not {precision}; the bundle runs on the CPU", r.profile.name));
        return Ok(None);
    }
    let out = work.join("vela");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    say(format!(
        "running Vela for {} ({}, {}, {})...",
        r.profile.name, cfg.accelerator, cfg.system_config, cfg.memory_mode
    ));
    let v = edgepack_recipes::vela::compile(&r.tflite.vela, model, cfg, &out)?;
    if !json_out {
        eprintln!(
            "Vela {}: {} operators on the NPU, {} on the CPU; SRAM {:.0} KiB, DRAM {:.1} MiB; estimate {:.1} ms for one call of each signature ({} cycles at {:.0} MHz, NPU operators only)",
            v.version,
            v.npu_operators,
            v.cpu_operators,
            v.sram_used_kib,
            v.dram_used_kib / 1024.0,
            v.inference_time_s * 1e3,
            v.cycles_total,
            v.core_clock_hz / 1e6
        );
        for f in &v.cpu_fallbacks {
            eprintln!("  {:>5} x {:<14} {}", f.count, f.op, f.reason);
        }
        eprintln!("  {}", v.verdict);
    }
    Ok(Some(v))
}

/// Exports the generative `.tflite` for the bundle's board at `precision` to `path`, printing
/// what the board's NPU takes (unless `json_out`); returns what the manifest records.
fn export_tflite_file(
    m: &edgepack_converters::model::Model,
    r: &BundleRequest<'_>,
    precision: &str,
    path: &Path,
    bars: &Bars,
    json_out: bool,
) -> Result<QuantInfo> {
    use edgepack_converters::export::tflite::{self, Precision, TfliteOptions};
    let a = r.tflite;
    let prec = Precision::parse(precision)
        .with_context(|| format!("--precision {precision}: TFLite takes {}", Precision::ALL))?;
    if prec.is_static() && a.stats.is_none() {
        bail!("--precision {precision}: the full-integer TFLite graph needs activation statistics (--stats FILE from `edgepack calibrate`)");
    }
    if a.smooth.is_some() && a.stats.is_none() {
        bail!("--smooth needs --stats (the activation statistics SmoothQuant scales come from)");
    }
    let calibration = match &a.stats {
        Some(p) => Some(crate::export_cmd::tflite_calibration(
            m,
            p,
            a.smooth.as_deref(),
            a.prefill_len,
            json_out,
        )?),
        None => None,
    };
    let opts = TfliteOptions {
        precision: prec,
        seq_len: a.seq_len,
        prefill_len: a.prefill_len,
        target: edgepack_recipes::stages::npu_support(&r.profile),
        calibration,
    };
    let prepared = tflite::prepare(m, &opts, bars)
        .with_context(|| format!("exporting {} to TFLite", r.model.display()))?;
    if let (Some(t), false) = (&prepared.report.target, json_out) {
        eprintln!(
            "{} ({}): {} of {} operators on the NPU",
            t.board, t.npu, t.on_npu, t.operators
        );
    }
    let report = tflite::write(prepared, path, bars)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(QuantInfo {
        preset: report.precision.name().to_string(),
        tensor_types: tensor_types(std::iter::empty()),
    })
}

/// Exports the onnxruntime-genai layout (contrib operators) at `precision` into `work/onnx`:
/// the folder, its main file and what the manifest records about its weights.
fn export_onnx_folder(
    m: &edgepack_converters::model::Model,
    source: &Path,
    precision: &str,
    work: &Path,
    bars: &Bars,
) -> Result<(PathBuf, Option<&'static str>, QuantInfo)> {
    use edgepack_converters::export::onnx::{self, OnnxOptions, Precision};
    let prec: Precision = precision
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--precision {precision}: {e}"))?;
    if prec == Precision::Int8Static {
        bail!("--precision int8-static: bundles take fp32, fp16, int8 or int4 so far (int8-static needs calibration statistics; export it with `edgepack export onnx --stats`)");
    }
    let dir = work.join("onnx");
    let opts = OnnxOptions {
        precision: prec,
        ..OnnxOptions::default()
    };
    let report = onnx::export_onnx(m, &dir, &opts, bars)
        .with_context(|| format!("exporting {} to ONNX", source.display()))?;
    let quant = QuantInfo {
        preset: report.precision.to_string(),
        tensor_types: tensor_types(std::iter::empty()),
    };
    Ok((dir, Some("model.onnx"), quant))
}

fn run_verify(path: &Path, key: Option<&Path>, target: Option<&str>, json_out: bool) -> Result<()> {
    let vk = key
        .map(|k| sign::read_public_key(k).context("reading the public key"))
        .transpose()?;
    // An archive is checked in a temporary folder; errors name its files under the archive.
    let mut unpacked = None;
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if path.is_file() {
        let tmp = tempfile::tempdir().context("creating a temporary folder")?;
        let d = bundle::unpack(path, tmp.path())
            .with_context(|| format!("bundle {} refused", path.display()))?;
        unpacked = Some(tmp);
        d
    } else {
        bail!("{}: no such bundle folder or archive", path.display());
    };
    let checked = bundle::check_dir(&dir, vk.as_ref()).map_err(|e| match &unpacked {
        Some(tmp) => anyhow::anyhow!(
            "bundle {} refused: {}",
            path.display(),
            e.to_string().replace(
                &tmp.path().display().to_string(),
                &path.display().to_string()
            )
        ),
        None => anyhow::anyhow!(e).context(format!("bundle {} refused", path.display())),
    })?;
    let m = &checked.manifest;
    if let Some(t) = target {
        if m.target.profile != t {
            bail!(
                "bundle {}: made for target `{}` ({}), not `{t}`",
                path.display(),
                m.target.profile,
                m.target.rust_target
            );
        }
        if let Ok(p) = Profile::builtin(t) {
            if p.rust_target != m.target.rust_target {
                bail!(
                    "bundle {}: built for {}, but {t} needs {}",
                    path.display(),
                    m.target.rust_target,
                    p.rust_target
                );
            }
        }
    }
    let sig = match checked.signature {
        SignatureState::Unsigned => "unsigned".to_string(),
        SignatureState::Verified => format!(
            "verified (key {})",
            sign::fingerprint(vk.as_ref().expect("verified with a key"))
        ),
        SignatureState::Unverified => "unverified: signed, but no --key was given".to_string(),
    };
    if json_out {
        let v = json!({
            "path": path.display().to_string(),
            "ok": true,
            "signature": checked.signature,
            "target": m.target,
            "format": m.format,
            "model": m.model.name,
            "quant": m.quant.preset,
            "runtime": m.runtime,
            "files": m.files.len(),
            "bytes": m.total_bytes(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: ok — {} files, {:.1} MiB match manifest.json; target {} ({}); {} {} {}; signature {sig}",
            path.display(),
            m.files.len(),
            m.total_bytes() as f64 / MIB,
            m.target.profile,
            m.target.rust_target,
            m.model.name,
            m.format,
            m.quant.preset
        );
    }
    if checked.signature == SignatureState::Unverified {
        eprintln!(
            "warning: {}: the signature was not checked; pass --key to check it",
            path.display()
        );
    }
    Ok(())
}
