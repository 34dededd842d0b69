//! Argument types and loaders that several commands share: LoRA adapters on the command line,
//! opening and merging a model, the inputs an output must not overwrite, `--dtype`,
//! `--alpha`/`--smooth` values and board profiles.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use edgepack_converters::import;
use edgepack_converters::model::Model;
use edgepack_converters::quant::GgmlType;
use edgepack_converters::transform::lora::{load_adapter, merge_adapters, LoraAdapter};
use edgepack_converters::transform::smooth::Alpha;
use edgepack_targets::Profile;

#[derive(Args, Debug, Clone)]
pub(crate) struct LoraArgs {
    /// PEFT LoRA adapter folder to merge, optionally with a weight: --lora ./a:0.5 (repeatable).
    #[arg(long = "lora", value_name = "DIR[:WEIGHT]")]
    pub(crate) adapters: Vec<String>,
}

impl LoraArgs {
    pub(crate) fn parse(&self) -> Result<Vec<(PathBuf, f32)>> {
        self.adapters
            .iter()
            .map(|s| {
                if let Some((p, w)) = s.rsplit_once(':') {
                    if let Ok(w) = w.parse::<f32>() {
                        return Ok((PathBuf::from(p), w));
                    }
                    if !Path::new(s).exists() {
                        bail!("--lora {s}: `{w}` is not a number\nhint: --lora DIR or --lora DIR:WEIGHT");
                    }
                }
                Ok((PathBuf::from(s), 1.0))
            })
            .collect()
    }

    pub(crate) fn paths(&self) -> Result<Vec<PathBuf>> {
        Ok(self.parse()?.into_iter().map(|(p, _)| p).collect())
    }
}

pub(crate) fn parse_float_dtype(s: &str) -> Result<GgmlType> {
    let t: GgmlType = s.parse().map_err(anyhow::Error::msg)?;
    if !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        bail!("--dtype {s}: use f32, f16 or bf16");
    }
    Ok(t)
}

/// Opens a model and merges adapters into it (lazily).
pub(crate) fn load(model: &Path, lora: &LoraArgs) -> Result<(Model, Vec<LoraAdapter>)> {
    let mut m = import::open(model).with_context(|| format!("importing {}", model.display()))?;
    let mut adapters = Vec::new();
    for (p, w) in lora.parse()? {
        let ad = load_adapter(&p).with_context(|| format!("reading adapter {}", p.display()))?;
        if let Some(base) = &ad.base_model {
            let leaf = base.rsplit('/').next().unwrap_or(base);
            if !m.name.to_lowercase().contains(&leaf.to_lowercase()) {
                tracing::info!(
                    "{}: trained on `{base}`; the base given is `{}` (shapes are checked)",
                    p.display(),
                    m.name
                );
            }
        }
        adapters.push((ad, w));
    }
    merge_adapters(&mut m, &adapters).context("merging LoRA adapters")?;
    Ok((m, adapters.into_iter().map(|(a, _)| a).collect()))
}

pub(crate) fn inputs<'a>(model: &'a Path, lora: &'a [PathBuf]) -> Vec<&'a Path> {
    let mut v = vec![model];
    v.extend(lora.iter().map(PathBuf::as_path));
    v
}

pub(crate) fn parse_alpha(s: &str) -> Result<Alpha> {
    let vals = s
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .map_err(|_| anyhow::anyhow!("--alpha {s}: `{v}` is not a number\nhint: --alpha 0.5, or one value per layer: --alpha 0.5,0.5,0.8"))
        })
        .collect::<Result<Vec<f32>>>()?;
    Ok(if vals.len() == 1 {
        Alpha::Global(vals[0])
    } else {
        Alpha::PerLayer(vals)
    })
}

pub(crate) fn resolve_profile(name: Option<&str>, file: Option<&Path>) -> Result<Profile> {
    match (name, file) {
        (_, Some(f)) => {
            let p = Profile::load(f).with_context(|| format!("reading profile {}", f.display()))?;
            if let Some(n) = name {
                if n != p.name {
                    bail!(
                        "--target {n} but {} describes `{}`\nhint: give one of --target and --profile",
                        f.display(),
                        p.name
                    );
                }
            }
            Ok(p)
        }
        (Some(n), None) => Ok(Profile::builtin(n)?),
        (None, None) => bail!("give --target NAME or --profile FILE"),
    }
}
