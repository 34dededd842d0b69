//! `edgepack build`: runs a recipe through `edgepack-recipes` and prints the stage plan, the
//! result table and the gates.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::Args;
use edgepack_recipes::report::table;
use edgepack_recipes::run::{counts, Event, Observer, Options};
use edgepack_recipes::{build, Recipe};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// A gate did not hold: the build finished, its report is written, and the exit status says
/// so (3) apart from an error (1).
#[derive(Debug)]
pub struct GateFailed(pub String);

impl std::fmt::Display for GateFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GateFailed {}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The recipe file (TOML; see docs/recipes.md).
    recipe: PathBuf,
    /// Build only this target (a `[targets.NAME]` of the recipe).
    #[arg(long)]
    target: Option<String>,
    /// Show the stage plan (fresh, or will run and why) without running anything.
    #[arg(long)]
    dry_run: bool,
    /// Stages that may run at once.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Memory the running stages' peak estimates may add up to, in MiB (default: 80% of the
    /// memory available now).
    #[arg(long)]
    memory_budget: Option<u64>,
    /// The output folder (default: out/<recipe name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The stage cache (default: $EDGEPACK_BUILD_CACHE, else out/.cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// After the build, remove every cache entry it did not use.
    #[arg(long)]
    clean: bool,
    /// Sign every bundle with this ed25519 key (PKCS#8 PEM from `edgepack keygen`), in place
    /// of the recipe's `[sign] key`.
    #[arg(long)]
    sign: Option<PathBuf>,
    /// Put this runtime binary in the bundles of a target, in place of its `runtime` key:
    /// `TARGET=PATH` (for example `imx93=target/dist/imx93/edgepack-runtime`). Repeatable.
    #[arg(long, value_name = "TARGET=PATH")]
    runtime: Vec<String>,
}

/// Progress on a terminal; one line per finished stage on a plain stderr; nothing in CI or
/// with --json.
struct Display {
    bar: Option<ProgressBar>,
    lines: bool,
    running: Mutex<Vec<String>>,
}

impl Display {
    fn new(json: bool) -> Display {
        let quiet = json || std::env::var_os("CI").is_some();
        let tty = std::io::stderr().is_terminal();
        let bar = (!quiet && tty).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} {wide_msg}")
                    .expect("valid template"),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b
        });
        Display {
            bar,
            lines: !quiet && !tty,
            running: Mutex::new(Vec::new()),
        }
    }

    fn show(&self) {
        if let Some(b) = &self.bar {
            let r = self.running.lock().expect("running list");
            b.set_message(format!("running: {}", r.join(", ")));
        }
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(b) => b.println(s),
            None if self.lines => eprintln!("{s}"),
            None => {}
        }
    }
}

impl Observer for Display {
    fn event(&self, e: &Event) {
        match e {
            Event::Started { id, .. } => {
                self.running.lock().expect("running list").push(id.clone());
            }
            Event::Finished { id, seconds } => {
                self.running
                    .lock()
                    .expect("running list")
                    .retain(|x| x != id);
                self.line(format!("  done {id} ({seconds:.1} s)"));
            }
            Event::Failed { id, error } => {
                self.running
                    .lock()
                    .expect("running list")
                    .retain(|x| x != id);
                self.line(format!("FAILED {id}: {error}"));
            }
        }
        self.show();
    }
}

/// `edgepack cache`: the stage cache's size, and removing what no recipe uses.
#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// Bytes held by finished stages.
    #[command(
        after_help = "Example:\n  edgepack cache size\n  edgepack cache size --cache /data/edgepack-cache --json"
    )]
    Size {
        /// The stage cache (default: $EDGEPACK_BUILD_CACHE, else out/.cache).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Remove every finished stage that none of the given recipes, as they are now, uses.
    #[command(
        after_help = "Example:\n  edgepack cache gc recipes/smollm2-assistant.toml recipes/smollm2-sparse24.toml"
    )]
    Gc {
        /// The recipes whose stages stay.
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
        /// The stage cache (default: $EDGEPACK_BUILD_CACHE, else out/.cache).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
}

fn cache_dir(flag: &Option<PathBuf>) -> PathBuf {
    flag.clone()
        .or_else(|| std::env::var_os("EDGEPACK_BUILD_CACHE").map(PathBuf::from))
        .unwrap_or_else(|| Path::new("out").join(".cache"))
}

pub fn run_cache(c: &CacheCommand, json_out: bool) -> Result<()> {
    const MIB: f64 = (1u64 << 20) as f64;
    match c {
        CacheCommand::Size { cache } => {
            let dir = cache_dir(cache);
            let bytes = if dir.join("stages").is_dir() {
                edgepack_recipes::cache::Cache::open(&dir)?.size()
            } else {
                0
            };
            if json_out {
                println!(
                    "{}",
                    json!({"cache": dir.display().to_string(), "bytes": bytes})
                );
            } else {
                println!("{}: {:.1} MiB", dir.display(), bytes as f64 / MIB);
            }
        }
        CacheCommand::Gc { recipes, cache } => {
            let dir = cache_dir(cache);
            let loaded = recipes
                .iter()
                .map(|r| Recipe::load(r).with_context(|| format!("reading {}", r.display())))
                .collect::<Result<Vec<_>>>()?;
            let (freed, kept) = edgepack_recipes::build::gc(&loaded, &dir)
                .with_context(|| format!("cleaning {}", dir.display()))?;
            if json_out {
                println!(
                    "{}",
                    json!({"cache": dir.display().to_string(), "freed_bytes": freed, "kept_bytes": kept})
                );
            } else {
                println!(
                    "{}: removed {:.1} MiB, kept {:.1} MiB",
                    dir.display(),
                    freed as f64 / MIB,
                    kept as f64 / MIB
                );
            }
        }
    }
    Ok(())
}

fn default_out(name: &str) -> PathBuf {
    Path::new("out").join(name)
}

pub fn run_build(a: &BuildArgs, json_out: bool) -> Result<()> {
    let mut recipe = Recipe::load(&a.recipe)?;
    if let Some(t) = &a.target {
        recipe = recipe.only_target(t)?;
    }
    for r in &a.runtime {
        let (t, p) = r
            .split_once('=')
            .with_context(|| format!("--runtime {r}: give TARGET=PATH"))?;
        let target = recipe
            .targets
            .iter_mut()
            .find(|x| x.name == t)
            .with_context(|| format!("--runtime {r}: the recipe has no target `{t}`"))?;
        let path = PathBuf::from(p);
        anyhow::ensure!(path.is_file(), "--runtime {r}: no such file");
        target.runtime = Some(path);
    }
    if let Some(k) = &a.sign {
        anyhow::ensure!(k.is_file(), "--sign {}: no such file", k.display());
        recipe.sign = Some(k.clone());
    }
    let out = a.out.clone().unwrap_or_else(|| default_out(&recipe.name));
    let cache = cache_dir(&a.cache);
    let opts = Options {
        jobs: a.jobs.max(1),
        memory_budget: a
            .memory_budget
            .map(|m| m << 20)
            .unwrap_or_else(|| edgepack_recipes::build::available_memory() / 10 * 8),
        dry_run: a.dry_run,
    };
    let display = Display::new(json_out);
    let outcome = build(&recipe, &out, &cache, &opts, a.clean, &display)
        .with_context(|| format!("building {}", a.recipe.display()))?;
    if let Some(b) = &display.bar {
        b.finish_and_clear();
    }
    if json_out {
        let v = json!({
            "recipe": recipe.name,
            "out": outcome.out_dir.display().to_string(),
            "dry_run": a.dry_run,
            "targets": recipe
                .targets
                .iter()
                .map(|t| json!({"name": t.name, "board": t.profile.name, "profile": t.profile_source}))
                .collect::<Vec<_>>(),
            "counts": counts(&outcome.status),
            "stages": outcome.status,
            "report": outcome.report,
            "passed": outcome.passed(),
            "cache_freed_bytes": outcome.freed,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if a.dry_run {
        println!("{:<10} {:<44} why", "status", "stage");
        for s in &outcome.status {
            let state = if s.status == "fresh" {
                "fresh"
            } else {
                "will run"
            };
            println!("{state:<10} {:<44} {}", s.id, s.reason);
        }
        let c = counts(&outcome.status);
        println!(
            "\n{} stages: {} fresh, {} to run",
            c["total"], c["fresh"], c["would_run"]
        );
    } else if let Some(r) = &outcome.report {
        print!("{}", table(r));
        let c = counts(&outcome.status);
        println!(
            "\n{} stages ({} fresh, {} ran) in {:.1} s; report: {}",
            c["total"],
            c["fresh"],
            c["ran"],
            r.seconds,
            outcome.out_dir.join("report.md").display()
        );
        if a.clean {
            println!(
                "cache: removed {:.1} MiB of entries this build did not use",
                outcome.freed as f64 / (1u64 << 20) as f64
            );
        }
    }
    if !outcome.passed() {
        let failed: Vec<String> = outcome
            .report
            .iter()
            .flat_map(|r| r.gates.iter().filter(|g| !g.passed))
            .map(|g| {
                format!(
                    "{} {} {}: limit {}, measured {}",
                    g.target,
                    g.output,
                    g.gate,
                    g.limit,
                    g.measured.map_or("nothing".into(), |m| format!("{m:.4}"))
                )
            })
            .collect();
        return Err(GateFailed(format!("quality gates failed:\n  {}", failed.join("\n  "))).into());
    }
    Ok(())
}
