//! `cargo xtask release RECIPE`: the CI job of a recipe. Builds it with the release binary
//! (optionally with every board's cross-compiled runtime in its bundle), verifies every bundle
//! again, enforces the gates, leaves the report in the output folder, and with `--deploy`
//! pushes the bundles to an inventory with `edgepack deploy` (each host gets its target's).
//!
//! Exit status: 0 released; 3 a quality gate failed (the report names it); 1 any error.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::dist;
use crate::util::{cargo, root, run};

/// What `cargo xtask release` was asked for.
pub struct Release {
    pub recipe: PathBuf,
    pub out: Option<PathBuf>,
    pub sign: Option<PathBuf>,
    pub dist: bool,
    pub deploy: Option<PathBuf>,
    pub jobs: usize,
    /// The stage cache (`edgepack build --cache`).
    pub cache: Option<PathBuf>,
    /// An edgepack binary to run instead of building the release one.
    pub edgepack: Option<PathBuf>,
}

/// The exit status of a release whose gates failed.
pub const GATE_FAILED: i32 = 3;

/// Runs `edgepack build --json` and returns its status code and parsed output.
fn build_json(edgepack: &Path, args: &[String]) -> Result<(i32, Value)> {
    eprintln!("$ edgepack {}", args.join(" "));
    let out = Command::new(edgepack)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running edgepack build")?;
    let code = out.status.code().unwrap_or(1);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok((code, v))
}

/// Runs the release; returns the process exit status.
pub fn release(r: &Release) -> Result<i32> {
    let edgepack = match &r.edgepack {
        Some(bin) => {
            if !bin.is_file() {
                bail!("--edgepack {}: no such file", bin.display());
            }
            bin.clone()
        }
        None => {
            run(cargo().args(["build", "--release", "-p", "edgepack"]))?;
            root().join("target/release/edgepack")
        }
    };
    let recipe = r
        .recipe
        .canonicalize()
        .with_context(|| format!("{}", r.recipe.display()))?;
    let mut args: Vec<String> = vec![
        "build".into(),
        recipe.display().to_string(),
        "--json".into(),
        "--jobs".into(),
        r.jobs.to_string(),
    ];
    if let Some(o) = &r.out {
        args.extend(["--out".into(), o.display().to_string()]);
    }
    if let Some(k) = &r.sign {
        args.extend(["--sign".into(), k.display().to_string()]);
    }
    if let Some(c) = &r.cache {
        args.extend(["--cache".into(), c.display().to_string()]);
    }
    if r.dist {
        let mut dry = args.clone();
        dry.push("--dry-run".into());
        let (code, plan) = build_json(&edgepack, &dry)?;
        if code != 0 {
            bail!(
                "{}: the recipe does not plan (exit {code})",
                recipe.display()
            );
        }
        for t in plan["targets"].as_array().into_iter().flatten() {
            let name = t["name"].as_str().unwrap_or_default();
            let profile = t["profile"].as_str().unwrap_or_default();
            let built = dist::dist(profile, false)
                .with_context(|| format!("cross-compiling the runtime for {name} ({profile})"))?;
            args.extend([
                "--runtime".into(),
                format!("{name}={}", built.binary.display()),
            ]);
        }
    }
    let (code, v) = build_json(&edgepack, &args)?;
    if code != 0 && code != GATE_FAILED {
        bail!("edgepack build failed (exit {code})");
    }
    let report = &v["report"];
    let out_dir = PathBuf::from(v["out"].as_str().unwrap_or("out"));
    // Every bundle is checked again from its archive, as a board would receive it.
    let pubkey = r.sign.as_ref().map(|k| k.with_extension("pub.pem"));
    for o in report["outputs"].as_array().into_iter().flatten() {
        let Some(archive) = o["bundle"]["archive"].as_str() else {
            continue;
        };
        let mut cmd = Command::new(&edgepack);
        cmd.arg("verify")
            .arg(out_dir.join(archive))
            .args(["--target", o["board"].as_str().unwrap_or_default()]);
        if let Some(k) = pubkey.as_ref().filter(|k| k.is_file()) {
            cmd.arg("--key").arg(k);
        }
        run(&mut cmd)?;
    }
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap_or_default();
    println!("{md}");
    if code == GATE_FAILED {
        eprintln!(
            "release stopped: a quality gate failed (see {})",
            out_dir.join("report.md").display()
        );
        return Ok(GATE_FAILED);
    }
    if let Some(inv) = &r.deploy {
        deploy(&edgepack, &out_dir, inv, pubkey.as_deref())?;
    }
    Ok(0)
}

fn deploy(edgepack: &Path, out_dir: &Path, inventory: &Path, key: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new(edgepack);
    cmd.arg("deploy")
        .arg(out_dir)
        .arg("--inventory")
        .arg(inventory);
    if let Some(k) = key.filter(|k| k.is_file()) {
        cmd.arg("--key").arg(k);
    }
    run(&mut cmd).context("deploying the release")
}
