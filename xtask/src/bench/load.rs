//! `cargo xtask bench load`: `edgepack-runtime serve` under 1, 4, 8 and 32 concurrent
//! streaming clients for a bounded time each, side by side with llama.cpp's own
//! `llama-server --parallel N` (built from the same vendored llama.cpp tree as `bench
//! runtime`'s llama-bench) on the same Q8_0 SmolLM2 GGUF with the same threads, on loopback.
//!
//! Each client sends greedy streaming completions (a count both servers continue to
//! `max_tokens`) one after another until the level's time
//! is up; at that moment every connection is closed, so the window is exactly the level's
//! time and what was in flight is cut off (the runtime cancels it). A 503 is counted as a
//! rejection and the client waits the `Retry-After` it was given. Reported per level and
//! server: aggregate decode tokens/s (the streamed tokens of every client within the window
//! over the window), time to first token (from sending a request to its first streamed
//! token, p50/p99), requests completed and rejected, the server's peak resident memory
//! (`VmHWM` of its process, started fresh for each level) and whether `/health` answered
//! 200 every time it was polled during the window. Numbers are measured, never asserted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::common::{llama_cpp_tool, release_runtime, smollm2_bundle, LLAMA_CPP_PYTHON};
use crate::setup;
use crate::util::root;

pub struct Options {
    /// Concurrent clients per level.
    pub clients: Vec<usize>,
    /// Seconds each level runs.
    pub seconds: u64,
    /// Tokens each request asks for.
    pub max_tokens: u32,
    pub threads: Option<usize>,
    /// Context per sequence (the runtime's --ctx-size; llama-server gets N times it).
    pub ctx: u32,
    pub output: PathBuf,
}

/// A server process, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Peak resident memory in MiB (`VmHWM`) so far.
    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }
}

/// A free loopback port (the kernel's pick, released for the server to take).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `cmd` (already told to listen on `port`) and waits until `/health` answers 200.
fn start(mut cmd: Command, port: u16) -> Result<Server> {
    eprintln!("$ {cmd:?}");
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let mut server = Server { child, port };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "{:?} exited with {status} before it was healthy",
                cmd.get_program()
            );
        }
        if health(port).is_some_and(|(s, _)| s == 200) {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{:?} was not healthy after 120 s", cmd.get_program())
}

/// `GET /health`: the status and how long the answer took.
fn health(port: u16) -> Option<(u16, Duration)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let status = String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, t0.elapsed()))
}

/// What one request came to within the window.
#[derive(Default)]
struct Outcome {
    /// Time from sending to the first streamed token, if one came.
    ttft: Option<Duration>,
    tokens: u64,
    completed: bool,
    /// A 503 and the seconds its Retry-After asked for.
    rejected: Option<u64>,
    error: Option<String>,
}

/// Sends one streaming completion request and reads it until it ends or `deadline` passes.
fn one_request(port: u16, body: &str, deadline: Instant) -> Outcome {
    let mut out = Outcome::default();
    let t0 = Instant::now();
    let run = |out: &mut Outcome| -> std::io::Result<()> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let read_line =
            |r: &mut BufReader<TcpStream>, line: &mut String| -> std::io::Result<usize> {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                r.get_ref().set_read_timeout(Some(left))?;
                line.clear();
                r.read_line(line)
            };
        read_line(&mut r, &mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut chunked = false;
        let mut retry_after = 1;
        loop {
            if read_line(&mut r, &mut line)? == 0 || line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            if let Some(v) = lower.strip_prefix("retry-after:") {
                retry_after = v.trim().parse().unwrap_or(1);
            }
        }
        if status == 503 {
            out.rejected = Some(retry_after);
            return Ok(());
        }
        if status != 200 {
            out.error = Some(format!("HTTP {status}"));
            return Ok(());
        }
        // The SSE text, de-chunked as it comes; events are `data: ...` lines.
        let mut pending = String::new();
        loop {
            let piece = if chunked {
                if read_line(&mut r, &mut line)? == 0 {
                    break;
                }
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| std::io::Error::other("bad chunk size"))?;
                if size == 0 {
                    break;
                }
                let mut buf = vec![0; size + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(size);
                String::from_utf8_lossy(&buf).into_owned()
            } else {
                if read_line(&mut r, &mut line)? == 0 {
                    break;
                }
                line.clone()
            };
            pending.push_str(&piece);
            while let Some(end) = pending.find('\n') {
                let l: String = pending.drain(..=end).collect();
                let Some(data) = l.trim().strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    out.completed = true;
                    return Ok(());
                }
                let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                if v.get("error").is_some() {
                    out.error = Some(data.to_string());
                    return Ok(());
                }
                let text = v["choices"][0]["text"].as_str().unwrap_or("");
                if !text.is_empty() {
                    out.ttft.get_or_insert_with(|| t0.elapsed());
                    out.tokens += 1;
                }
            }
        }
        out.completed = true;
        Ok(())
    };
    match run(&mut out) {
        Ok(()) => {}
        // The window closed mid-request: what arrived counts, the rest is cut off.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) => {}
        Err(e) => out.error = Some(e.to_string()),
    }
    out
}

/// The `p`-th percentile (0..=100, nearest rank) of sorted `v`.
fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// `clients` clients against `server` for `seconds`, with `/health` polled throughout.
fn level(server: &Server, clients: usize, o: &Options, extra: &Value) -> Result<Value> {
    let port = server.port;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(o.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut polls, mut not_ok, mut max) = (0u64, 0u64, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                polls += 1;
                match health(port) {
                    Some((200, took)) => max = max.max(took),
                    _ => not_ok += 1,
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            (polls, not_ok, max)
        })
    };
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let max_tokens = o.max_tokens;
            let extra = extra.clone();
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                let mut n = 0;
                while Instant::now() < deadline {
                    n += 1;
                    // A different prompt per request (no server reuses another's), and one both
                    // continue for thousands of tokens under greedy decoding: every request
                    // streams max_tokens tokens, whatever chat template a server applies.
                    let mut body = json!({
                        "prompt": format!("Request {c}-{n}: 1, 2, 3, 4, 5,"),
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "stream": true,
                    });
                    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                        b.extend(e.clone());
                    }
                    let out = one_request(port, &body.to_string(), deadline);
                    if let Some(s) = out.rejected {
                        let wait = Duration::from_secs(s.max(1))
                            .min(deadline.saturating_duration_since(Instant::now()));
                        std::thread::sleep(wait);
                    }
                    let failed = out.error.is_some();
                    outcomes.push(out);
                    if failed {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                outcomes
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(
            w.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?,
        );
    }
    let window = start.elapsed().as_secs_f64().max(o.seconds as f64);
    stop.store(true, Ordering::Relaxed);
    let (polls, not_ok, max_health) = poller
        .join()
        .map_err(|_| anyhow::anyhow!("the health poller panicked"))?;
    let tokens: u64 = outcomes.iter().map(|o| o.tokens).sum();
    let mut ttft: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.ttft.map(|d| d.as_secs_f64() * 1e3))
        .collect();
    ttft.sort_by(f64::total_cmp);
    let errors: Vec<&String> = outcomes.iter().filter_map(|o| o.error.as_ref()).collect();
    Ok(json!({
        "clients": clients,
        "window_s": window,
        "aggregate_decode_tokens_per_s": tokens as f64 / window,
        "tokens": tokens,
        "requests_completed": outcomes.iter().filter(|o| o.completed).count(),
        "requests_with_a_first_token": ttft.len(),
        "rejected_503": outcomes.iter().filter(|o| o.rejected.is_some()).count(),
        "errors": errors.len(),
        "first_error": errors.first(),
        "ttft_ms": {"p50": percentile(&ttft, 50.0), "p99": percentile(&ttft, 99.0),
                    "max": ttft.last()},
        "peak_rss_mib": server.peak_rss_mib(),
        "health": {"polls": polls, "not_200": not_ok, "always_200": not_ok == 0 && polls > 0,
                   "slowest_ms": max_health.as_secs_f64() * 1e3},
    }))
}

fn runtime_cmd(
    runtime: &Path,
    bundle: &Path,
    port: u16,
    threads: usize,
    n: usize,
    o: &Options,
) -> Command {
    let mut c = Command::new(runtime);
    c.args(["serve", "--bundle"])
        .arg(bundle)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--threads", &threads.to_string()])
        // One sequence per client, as llama-server's slots below.
        .args(["--parallel", &n.to_string()])
        .args(["--ctx-size", &o.ctx.to_string()]);
    c
}

fn server_cmd(
    bin: &Path,
    gguf: &Path,
    port: u16,
    threads: usize,
    n: usize,
    o: &Options,
) -> Command {
    let mut c = Command::new(bin);
    c.arg("-m")
        .arg(gguf)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
        .args(["--parallel", &n.to_string()])
        // The same context per sequence as the runtime's.
        .args(["-c", &(o.ctx as usize * n).to_string()])
        // As the runtime: no flash attention (llama-server's default `auto` turns it on).
        .args(["-fa", "off"]);
    c
}

pub fn bench(o: Options) -> Result<()> {
    if o.clients.is_empty() || o.clients.contains(&0) || o.seconds == 0 {
        bail!("--clients needs counts above 0 and --seconds at least 1");
    }
    let threads = o.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let runtime = release_runtime()?;
    let work = root().join("target/bench/load-work");
    std::fs::create_dir_all(&work)?;
    let bundle = smollm2_bundle(&work)?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json"))?)?;
    let gguf = bundle.join(
        manifest["model"]["file"]
            .as_str()
            .context("manifest model.file")?,
    );
    let src = setup::llama_cpp_source()?;
    let llama_server = match llama_cpp_tool(&src, "llama-server") {
        Ok(bin) => Some(bin),
        Err(e) => {
            eprintln!("llama-server could not be built ({e:#}); measuring the runtime alone");
            None
        }
    };

    let mut levels = Vec::new();
    for &n in &o.clients {
        eprintln!("{n} clients, {} s each", o.seconds);
        let port = free_port()?;
        let server = start(runtime_cmd(&runtime, &bundle, port, threads, n, &o), port)?;
        let ours = level(&server, n, &o, &json!({}))?;
        drop(server);
        let peer = match &llama_server {
            Some(bin) => {
                let port = free_port()?;
                let server = start(server_cmd(bin, &gguf, port, threads, n, &o), port)?;
                // No prompt reuse from a slot's previous request, as the runtime has none.
                Some(level(&server, n, &o, &json!({"cache_prompt": false}))?)
            }
            None => None,
        };
        eprintln!(
            "  edgepack-runtime {:.1} tok/s, llama-server {}",
            ours["aggregate_decode_tokens_per_s"]
                .as_f64()
                .unwrap_or(0.0),
            peer.as_ref()
                .and_then(|p| p["aggregate_decode_tokens_per_s"].as_f64())
                .map_or("-".into(), |t| format!("{t:.1} tok/s"))
        );
        levels.push(json!({"clients": n, "edgepack_runtime": ours, "llama_server": peer}));
    }
    let report = json!({
        "benchmark": "load",
        "model": gguf.display().to_string(),
        "quant": "Q8_0",
        "threads": threads,
        "seconds_per_level": o.seconds,
        "max_tokens": o.max_tokens,
        "ctx_per_sequence": o.ctx,
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
        "edgepack_runtime": {"binary": runtime.display().to_string(),
            "setup": "--parallel N (one sequence per client), --ctx-size ctx, default --queue-depth; a 503 is retried after its Retry-After"},
        "llama_server": llama_server.as_ref().map(|b| json!({
            "binary": b.display().to_string(),
            "llama_cpp_python": LLAMA_CPP_PYTHON,
            "setup": "--parallel N (one slot per client), -c N x ctx, -fa off, cache_prompt false",
            "build": "GGML_NATIVE=OFF, no OpenMP, no web UI"})),
        "definitions": {
            "aggregate_decode_tokens_per_s": "tokens streamed to all clients inside the window over the window",
            "ttft_ms": "from sending a request to its first streamed token, over requests that got one inside the window",
            "peak_rss_mib": "VmHWM of the server process, started fresh for each level",
        },
        "levels": levels,
    });
    if let Some(d) = o.output.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&o.output, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", o.output.display()))?;
    println!("{}", serde_json::to_string_pretty(&report["levels"])?);
    eprintln!("wrote {}", o.output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
