//! `cargo xtask test`: setup, then formatting, clippy, and the whole test suite
//! (cargo-nextest when present).

use std::process::Command;

use anyhow::{Context, Result};

use crate::setup;
use crate::util::{cargo, run};

pub fn test(args: &[String]) -> Result<()> {
    setup::setup()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("formatting differs\nhint: run `cargo fmt --all`")?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Every binary and test target in one build, before any test runs: the tests that drive
    // the real binaries find them built with the very dependencies the test executables use
    // (a `cargo build -p` inside the suite would rebuild those under cargo's lock).
    let mut build = cargo();
    build.args(["build", "--workspace", "--all-targets"]);
    if args.iter().any(|a| a == "--release") {
        build.arg("--release");
    }
    run(&mut build)?;
    let nextest = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if nextest {
        run(cargo()
            .args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .args(args))
    } else {
        run(cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(args))
    }
}
