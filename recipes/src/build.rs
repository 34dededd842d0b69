//! One build of a recipe, end to end: plan, fetch the model, check the adapters against it,
//! run what is not fresh, publish the outputs, write the report, and apply the gates.
//!
//! The output folder (`out/<recipe>/` by default) holds the bundles (`<name>.tar.zst` and the
//! unpacked `<name>/`), the outputs that are not bundled (`exports/`), `report.json`,
//! `report.md`, `report.svg` and `state.json` (what the next build compares against to say why a
//! stage reruns). Everything there is replaced only after every stage succeeded; each item is
//! moved into place by a rename.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use edgepack_converters::import;
use edgepack_converters::train;
use edgepack_converters::transform::lora::load_adapter;

use crate::bundle::link_or_copy;
use crate::cache::{pid_alive, Cache};
use crate::error::{RecipeError, Result};
use crate::plan::{plan, Plan};
use crate::recipe::{Finetune, ModelSource, Recipe};
use crate::report::{build_report, markdown, svg, Report};
use crate::run::{execute, fetch_first, Observer, Options, StageStatus, State};

/// What a build produced.
pub struct Outcome {
    pub status: Vec<StageStatus>,
    /// `None` for a dry run.
    pub report: Option<Report>,
    pub out_dir: PathBuf,
    /// Bytes removed from the cache by `clean`.
    pub freed: u64,
}

impl Outcome {
    /// Whether every gate held (a dry run has none).
    pub fn passed(&self) -> bool {
        self.report.as_ref().is_none_or(|r| r.passed)
    }
}

/// The bytes of memory available now (`MemAvailable`), for the default budget.
pub fn available_memory() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024)
}

/// Builds `recipe`: the cache lives in `cache_dir`, the outputs go to `out_dir`. With
/// `clean`, cache entries this build does not use are removed afterwards.
pub fn build(
    recipe: &Recipe,
    out_dir: &Path,
    cache_dir: &Path,
    opts: &Options,
    clean: bool,
    obs: &dyn Observer,
) -> Result<Outcome> {
    let t0 = Instant::now();
    let cache = Cache::open(cache_dir)?;
    let state_path = out_dir.join("state.json");
    let prev = State::read(&state_path);
    let first = plan(recipe, &cache, None)?;
    // The model's fetch runs ahead of the rest (the adapters are checked against it); it is
    // reported as run, not as fresh, when this build did it.
    let fetching: Option<(String, String)> = first
        .stages
        .iter()
        .find(|s| s.id == "fetch:model" && cache.lookup(s.kind(), &s.key).is_none())
        .map(|s| (s.id.clone(), s.key.clone()));
    let fetched = fetch_first(&first, &cache, opts, obs)?;
    let p = match &fetched {
        Some(f) => plan(recipe, &cache, Some(f))?,
        None => first,
    };
    // A trained adapter in the cache was made from data that was read and checked then.
    let finetune = recipe.finetune.as_ref().filter(|_| {
        p.finetune
            .is_none_or(|i| cache.lookup("finetune", &p.stages[i].key).is_none())
    });
    preflight(recipe, finetune, fetched.as_deref())?;
    let mut status = execute(&p, &cache, &prev, opts, obs)?;
    if let Some((id, key)) = fetching.filter(|_| !opts.dry_run) {
        if let Some(s) = status.iter_mut().find(|s| s.id == id) {
            s.status = "ran".into();
            s.reason = "not built before".into();
            s.seconds = cache.lookup("fetch", &key).map_or(0.0, |i| i.seconds);
        }
    }
    if opts.dry_run {
        return Ok(Outcome {
            status,
            report: None,
            out_dir: out_dir.to_path_buf(),
            freed: 0,
        });
    }
    let published = publish(recipe, &p, &status, out_dir, &prev)?;
    let report = build_report(recipe, &p, &status, t0.elapsed().as_secs_f64());
    write_atomic(
        &out_dir.join("report.json"),
        &serde_json::to_vec_pretty(&report).map_err(|e| RecipeError::Cache(e.to_string()))?,
    )?;
    write_atomic(&out_dir.join("report.md"), markdown(&report).as_bytes())?;
    write_atomic(&out_dir.join("report.svg"), svg(&report).as_bytes())?;
    let state = State::record(&p, published);
    write_atomic(
        &state_path,
        &serde_json::to_vec_pretty(&state).map_err(|e| RecipeError::Cache(e.to_string()))?,
    )?;
    let freed = if clean {
        let keep: BTreeSet<PathBuf> = p
            .stages
            .iter()
            .map(|s| cache.entry_dir(s.kind(), &s.key))
            .collect();
        cache.gc(&keep)?
    } else {
        0
    };
    Ok(Outcome {
        status,
        report: Some(report),
        out_dir: out_dir.to_path_buf(),
        freed,
    })
}

/// Removes every cache entry that none of `recipes` (as they are now) uses; returns the
/// bytes freed and the bytes kept.
pub fn gc(recipes: &[Recipe], cache_dir: &Path) -> Result<(u64, u64)> {
    let cache = Cache::open(cache_dir)?;
    let mut keep = BTreeSet::new();
    for r in recipes {
        let p = plan(r, &cache, None)?;
        keep.extend(p.stages.iter().map(|s| cache.entry_dir(s.kind(), &s.key)));
    }
    let freed = cache.gc(&keep)?;
    Ok((freed, cache.size()))
}

/// Checks what can only be checked against the real model before any stage runs: that every
/// adapter was trained for this base (module names and shapes), and that the data of a
/// training still to run reads.
fn preflight(recipe: &Recipe, finetune: Option<&Finetune>, fetched: Option<&Path>) -> Result<()> {
    if recipe.adapters.is_empty() && finetune.is_none() {
        return Ok(());
    }
    let base = match (&recipe.model, fetched) {
        (ModelSource::Path(p), _) => p.clone(),
        (_, Some(f)) => f.to_path_buf(),
        // A dry run of a package recipe before its first fetch: checked when it runs.
        _ => return Ok(()),
    };
    let m = import::open(&base).map_err(|e| RecipeError::io(&base, e))?;
    if let Some(f) = finetune {
        // The data as the trainer will read it: a bad line fails the build before any stage.
        train::preflight(&m, &f.data, &f.config).map_err(|e| RecipeError::Invalid {
            file: recipe.file.clone(),
            line: f.at.0,
            column: f.at.1,
            key: "finetune.data".into(),
            message: e.to_string(),
        })?;
    }
    for (i, a) in recipe.adapters.iter().enumerate() {
        let bad = |message: String| RecipeError::Invalid {
            file: recipe.file.clone(),
            line: a.at.0,
            column: a.at.1,
            key: format!("adapters[{i}].path"),
            message,
        };
        let ad = load_adapter(&a.path).map_err(|e| bad(e.to_string()))?;
        ad.check_against(&m).map_err(|e| {
            bad(format!(
                "{e}\nhint: the adapter was trained for another base model than {}",
                base.display()
            ))
        })?;
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    edgepack_converters::io::write_file(path, bytes).map_err(|e| RecipeError::io(path, e))
}

/// Hard-links (or copies) a file or a folder tree.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    let meta = fs::metadata(from).map_err(|e| RecipeError::io(from, e))?;
    if meta.is_dir() {
        fs::create_dir_all(to).map_err(|e| RecipeError::io(to, e))?;
        for e in fs::read_dir(from).map_err(|e| RecipeError::io(from, e))? {
            let e = e.map_err(|e| RecipeError::io(from, e))?;
            link_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else {
        link_or_copy(from, to)?;
    }
    Ok(())
}

/// Puts the bundles and the other outputs into `out_dir`; returns the published names.
fn publish(
    recipe: &Recipe,
    p: &Plan,
    status: &[StageStatus],
    out_dir: &Path,
    prev: &State,
) -> Result<Vec<String>> {
    fs::create_dir_all(out_dir).map_err(|e| RecipeError::io(out_dir, e))?;
    // A build killed while publishing left its staging folder: remove those of dead builds.
    for e in fs::read_dir(out_dir)
        .map_err(|e| RecipeError::io(out_dir, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(".publish.")
            .or_else(|| name.strip_prefix(".old."))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !pid_alive(pid) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let staging = out_dir.join(format!(".publish.{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| RecipeError::io(&staging, e))?;
    }
    fs::create_dir_all(staging.join("exports")).map_err(|e| RecipeError::io(&staging, e))?;
    let mut items: Vec<String> = Vec::new();
    for po in &p.outputs {
        let t = recipe
            .targets
            .iter()
            .find(|t| t.name == po.target)
            .expect("planned from the recipe");
        let o = &t.outputs[po.output];
        if let Some(b) = po.bundle {
            let s = &status[b];
            let dir = s
                .dir
                .as_ref()
                .ok_or_else(|| RecipeError::stage(&s.id, "no output"))?;
            let name = s.result["bundle"].as_str().unwrap_or_default().to_string();
            let archive = format!("{name}.tar.zst");
            link_tree(&dir.join(&archive), &staging.join(&archive))?;
            link_tree(&dir.join(&name), &staging.join(&name))?;
            items.push(archive);
            items.push(name);
        } else {
            let s = &status[po.export];
            let dir = s
                .dir
                .as_ref()
                .ok_or_else(|| RecipeError::stage(&s.id, "no output"))?;
            let model = s.result["model"].as_str().unwrap_or_default();
            let src = dir.join(model);
            let ext = Path::new(model)
                .extension()
                .map(|e| format!(".{}", e.to_string_lossy()))
                .unwrap_or_default();
            let name = format!("exports/{}-{}{ext}", t.name, o.label());
            link_tree(&src, &staging.join(&name))?;
            items.push(name);
        }
    }
    // The trained adapter (what `edgepack merge` and `export gguf-lora` take, and PEFT
    // loads) and the knowledge base (what `edgepack rag query` and `bundle --kb` take).
    for (stage, folder) in [(p.finetune, "adapter"), (p.rag, "kb")] {
        let Some(i) = stage else { continue };
        let s = &status[i];
        let dir = s
            .dir
            .as_ref()
            .ok_or_else(|| RecipeError::stage(&s.id, "no output"))?;
        link_tree(&dir.join(folder), &staging.join(folder))?;
        items.push(folder.into());
    }
    // Replace what the last build published; drop what this one no longer makes.
    for old in &prev.published {
        if !items.contains(old) {
            let path = out_dir.join(old);
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
    }
    fs::create_dir_all(out_dir.join("exports")).map_err(|e| RecipeError::io(out_dir, e))?;
    for it in &items {
        let from = staging.join(it);
        let to = out_dir.join(it);
        if to.is_dir() {
            let aside = out_dir.join(format!(".old.{}", std::process::id()));
            fs::rename(&to, &aside).map_err(|e| RecipeError::io(&to, e))?;
            fs::rename(&from, &to).map_err(|e| RecipeError::io(&to, e))?;
            let _ = fs::remove_dir_all(&aside);
        } else {
            fs::rename(&from, &to).map_err(|e| RecipeError::io(&to, e))?;
        }
    }
    let _ = fs::remove_dir_all(&staging);
    if fs::read_dir(out_dir.join("exports")).is_ok_and(|mut d| d.next().is_none()) {
        let _ = fs::remove_dir(out_dir.join("exports"));
    }
    Ok(items)
}
