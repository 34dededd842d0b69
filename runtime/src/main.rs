//! `edgepack-runtime`: serve or bench a verified edgepack bundle on the board.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgepack_runtime::auth::ApiKey;
use edgepack_runtime::bench::{self, BenchConfig};
use edgepack_runtime::bundle::{self, DelegateChoice};
use edgepack_runtime::engine::{Engine, EngineConfig};
use edgepack_runtime::listen;
use edgepack_runtime::rag::{self, Retrieval};
use edgepack_runtime::receive;
use edgepack_runtime::server::{self, AppState};

/// Context size when none is asked for: room for a chat turn and its answer without a
/// board-sized model's KV cache growing past a few tens of MiB.
const DEFAULT_CTX_SIZE: u32 = 2048;
/// llama-server's own default number of slots.
const DEFAULT_PARALLEL: u32 = 4;

#[derive(Debug, Parser)]
#[command(
    name = "edgepack-runtime",
    version,
    about = "Serve or bench an edgepack bundle: verify it, load the model with llama.cpp (GGUF), ONNX Runtime (ONNX) or LiteRT (TFLite), answer an OpenAI-compatible HTTP API",
    after_help = "Example:\n  edgepack-runtime serve --bundle /opt/edgepack/current --host 0.0.0.0 --port 8080 --api-key-file /etc/edgepack/api-key\n  edgepack-runtime bench --bundle /opt/edgepack/current --prompt-sizes 32,128,512 --json"
)]
struct Cli {
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify the bundle, load its model, and serve /v1/chat/completions, /v1/completions,
    /// /v1/models, /health and /metrics.
    #[command(
        after_help = "Example:\n  edgepack-runtime serve --bundle /opt/edgepack/current --trusted-key /etc/edgepack/key.pub.pem --host 0.0.0.0 --port 8080 --api-key-file /etc/edgepack/api-key --parallel 4 --queue-depth 8\n  curl -s localhost:8080/v1/chat/completions -H \"Authorization: Bearer $(cat /etc/edgepack/api-key)\" -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"temperature\":0}'\n\nThe API key file holds one token (no whitespace inside) and must not be readable by every user (chmod 600). Without --api-key-file anyone who reaches the port may use it: keep the default loopback --host, or set a key before serving 0.0.0.0."
    )]
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// Address to listen on (loopback by default; 0.0.0.0 to serve the network).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[command(flatten)]
        limits: ServeLimits,
    },
    /// Measure time to first token and decode tokens/s for each prompt size.
    #[command(
        after_help = "Example:\n  edgepack-runtime bench --bundle /opt/edgepack/current --prompt-sizes 32,128,512 --gen-tokens 64 --json"
    )]
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt lengths in tokens, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "32,128,512")]
        prompt_sizes: Vec<usize>,
        /// Tokens to generate per run.
        #[arg(long, default_value_t = 64)]
        gen_tokens: u32,
        /// Runs per prompt size; the medians are reported.
        #[arg(long, default_value_t = 3)]
        repetitions: u32,
    },
    /// Append standard input to FILE and print the sha256 of the bytes appended, then FILE's
    /// size, one per line: the board's end of `edgepack deploy`'s upload, which hands the
    /// rest of a release to that release's runtime once the board has checked its hash.
    #[command(
        after_help = "Example:\n  zstd -c model.gguf | ssh board edgepack-runtime receive --zstd /opt/edgepack/.incoming/r1/model/model.gguf\n\nThe folder and the file are created when missing; a cut stream leaves what arrived in place, so the next upload appends the rest."
    )]
    Receive {
        /// The file to append to.
        file: PathBuf,
        /// The stream is zstd-compressed (one or more frames).
        #[arg(long)]
        zstd: bool,
    },
}

/// What one client may hold of the server.
#[derive(Debug, Args)]
struct ServeLimits {
    /// Connections open at once; more are closed on accept and counted in /metrics
    /// (default: 1024, or the open-file limit less 64 when that is lower).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers, idle kept-alive connections
    /// included; then the connection is closed.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Largest request body in bytes; larger ones are answered 413 unread.
    #[arg(long, default_value_t = 256 * 1024)]
    max_body: usize,
    /// Generation requests that may wait while the engine answers one; more are answered
    /// 503 with Retry-After and counted in /metrics (requests_rejected_total{reason="queue_full"}).
    #[arg(long, default_value_t = server::DEFAULT_QUEUE_DEPTH)]
    queue_depth: usize,
    /// A file holding a bearer token: every endpoint but /health then answers 401 without
    /// `Authorization: Bearer <token>`. The file must not be readable by every user.
    #[arg(long, value_name = "FILE", env = "EDGEPACK_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// The bundle directory (manifest.json, model/, bin/); verified before anything loads.
    #[arg(long)]
    bundle: PathBuf,
    /// Public key (PEM) the bundle's manifest.sig must verify against; without it an
    /// unsigned bundle is accepted on its checksums and a signed one is refused (whoever
    /// signed it meant it to be checked).
    #[arg(long)]
    trusted_key: Option<PathBuf>,
    /// Threads for the engine (default: every available core).
    #[arg(long)]
    threads: Option<usize>,
    /// Context size in tokens of each request (capped at the model's training context).
    #[arg(long, default_value_t = DEFAULT_CTX_SIZE)]
    ctx_size: u32,
    /// Requests generated together (GGUF bundles; ONNX and TFLite run one at a time), as
    /// llama-server's parallel slots: one batched decode a step serves them all, so the
    /// tokens per second of all clients together grow with their number. Each holds
    /// --ctx-size tokens of cache (SmolLM2-135M: 45 MiB per 2048); 1 takes the least memory.
    #[arg(long, default_value_t = DEFAULT_PARALLEL, value_parser = clap::value_parser!(u32).range(1..=64))]
    parallel: u32,
    /// Use llama.cpp's flash attention (off by default).
    #[arg(long)]
    flash_attn: bool,
    /// The engine's shared library for ONNX bundles (libonnxruntime.so) or TFLite bundles
    /// (libLiteRt.so); by default the paths the board's profile lists, then the bundle's lib/.
    #[arg(long, env = "EDGEPACK_ENGINE_LIB")]
    engine_lib: Option<PathBuf>,
    /// The accelerator delegate library for TFLite bundles whose manifest names one (a TFLite
    /// external delegate such as /usr/lib/libvx_delegate.so); by default the paths the board's
    /// profile lists. Without one the model runs on the CPU and the reason is logged.
    #[arg(long, env = "EDGEPACK_DELEGATE", value_name = "PATH")]
    delegate: Option<PathBuf>,
    /// Run TFLite bundles on the CPU even when their manifest names a delegate.
    #[arg(long, conflicts_with = "delegate")]
    no_delegate: bool,
}

impl ModelArgs {
    fn threads(&self) -> Result<i32> {
        let n = match self.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        i32::try_from(n).context("--threads is too large")
    }

    /// Verifies the bundle and returns the engine config, the model id and the retrieval
    /// section when the bundle carries a knowledge base.
    fn open(&self) -> Result<(EngineConfig, String, Option<rag::Spec>)> {
        let threads = self.threads()?;
        if self.bundle.is_file() {
            bail!(
                "{}: the runtime takes an unpacked bundle folder, not an archive\nhint: unpack it first (edgepack deploy does), e.g. tar --zstd -xf {} -C /opt/edgepack",
                self.bundle.display(),
                self.bundle.display()
            );
        }
        let verified = bundle::open(
            &self.bundle,
            self.trusted_key.as_deref(),
            self.engine_lib.as_deref(),
            &match (&self.delegate, self.no_delegate) {
                (_, true) => DelegateChoice::Off,
                (Some(p), false) => DelegateChoice::Path(p.clone()),
                (None, false) => DelegateChoice::Profile,
            },
        )
        .with_context(|| format!("refusing bundle {}", self.bundle.display()))?;
        Ok((
            EngineConfig {
                format: verified.format,
                model_path: verified.model_path,
                library: verified.library,
                threads,
                ctx_size: self.ctx_size,
                parallel: self.parallel,
                flash_attn: self.flash_attn,
                delegate: verified.delegate,
            },
            verified.model_id,
            rag::Spec::of(&verified.manifest),
        ))
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // llama.cpp logs every metadata key at load (target `llama-cpp-2`); its warnings and
    // errors are what an operator needs. The bindings' own notes about log framing are noise.
    let filter = EnvFilter::try_from_env("EDGEPACK_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,llama-cpp-2=warn,llama_cpp_2=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(
            std::env::var_os("NO_COLOR").is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
        .init();
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve {
            model,
            host,
            port,
            limits,
        } => serve(&model, &host, port, &limits, cli.json),
        Command::Receive { file, zstd } => {
            let r = receive::receive(std::io::stdin().lock(), &file, zstd)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"sha256": r.sha256, "appended": r.appended, "size": r.size})
                );
            } else {
                println!("{}\n{}", r.sha256, r.size);
            }
            Ok(())
        }
        Command::Bench {
            model,
            prompt_sizes,
            gen_tokens,
            repetitions,
        } => {
            if prompt_sizes.is_empty() || prompt_sizes.contains(&0) {
                bail!("--prompt-sizes needs one or more sizes above 0");
            }
            if gen_tokens == 0 {
                bail!("--gen-tokens must be at least 1");
            }
            let (config, model_id, _) = model.open()?;
            let model_path = config.model_path.clone();
            let engine = Engine::load(config).context("loading the model")?;
            let cfg = BenchConfig {
                prompt_sizes,
                gen_tokens,
                repetitions,
            };
            let json = cli.json;
            let info = &engine.info;
            if !json {
                println!(
                    "engine {} {}, delegate {}{}",
                    info.engine,
                    info.engine_version,
                    info.delegate.as_deref().unwrap_or("none (CPU)"),
                    info.delegate_fallback
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                );
                println!(
                    "{:>8} {:>6} {:>10} {:>12} {:>12}",
                    "prompt", "gen", "ttft_ms", "prompt_t/s", "decode_t/s"
                );
            }
            let rows = bench::run(&engine, &cfg, |r| {
                if !json {
                    println!(
                        "{:>8} {:>6} {:>10.1} {:>12.1} {:>12.1}",
                        r.prompt_tokens,
                        r.gen_tokens,
                        r.ttft_ms,
                        r.prompt_tokens_per_s,
                        r.decode_tokens_per_s
                    );
                }
            })
            .context("benchmark run")?;
            if !json {
                if let Some(mb) = peak_rss_mb() {
                    println!("peak resident memory {mb:.0} MiB");
                }
            }
            if json {
                let out = serde_json::json!({
                    "model": model_id,
                    "model_path": model_path,
                    "threads": engine.info.threads,
                    "n_ctx": engine.info.n_ctx,
                    "engine": engine.info.engine,
                    "engine_version": engine.info.engine_version,
                    "delegate": engine.info.delegate,
                    "delegate_fallback": engine.info.delegate_fallback,
                    "peak_rss_mb": peak_rss_mb(),
                    "results": rows,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            Ok(())
        }
    }
}

fn serve(model: &ModelArgs, host: &str, port: u16, limits: &ServeLimits, json: bool) -> Result<()> {
    if limits.header_timeout == 0 {
        bail!("--header-timeout must be at least 1 second");
    }
    if limits.max_connections == Some(0) {
        bail!("--max-connections must be at least 1");
    }
    let api_key = match &limits.api_key_file {
        Some(path) => {
            Some(ApiKey::from_file(path).map_err(|e| anyhow::anyhow!("--api-key-file {e}"))?)
        }
        None => None,
    };
    let fd_limit = listen::raise_fd_limit();
    let conn_limits = listen::Limits {
        max_connections: limits
            .max_connections
            .unwrap_or_else(|| listen::default_max_connections(fd_limit)),
        header_timeout: std::time::Duration::from_secs(limits.header_timeout),
    };
    // Verification happens before the socket opens or any model byte is mapped.
    let (config, model_id, retrieval) = model.open()?;
    let bundle_dir = model.bundle.clone();
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|()| anyhow::anyhow!("--host {host:?} is not an address this machine resolves"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        // HTTP is light; llama.cpp's own threads do the work.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let mut state = AppState::new(model_id.clone());
        state.queue_depth = limits.queue_depth;
        state.api_key = api_key;
        let state = Arc::new(state);
        if json {
            println!(
                "{}",
                serde_json::json!({"event": "listening", "addr": local.to_string(), "model": model_id})
            );
        } else {
            println!("listening on http://{local} (model {model_id}, loading)");
        }
        let failed = Arc::new(std::sync::Mutex::new(None));
        let load_failed = Arc::new(tokio::sync::Notify::new());
        let (loader_state, loader_failed, loader_notify) =
            (state.clone(), failed.clone(), load_failed.clone());
        let model_path = config.model_path.clone();
        tokio::task::spawn_blocking(move || {
            let fail = |e: anyhow::Error| {
                *loader_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                // A permit is stored if the server is not waiting yet.
                loader_notify.notify_one();
            };
            // The knowledge base first: /health says ready only when both answer.
            if let Some(info) = &retrieval {
                match Retrieval::open(&bundle_dir, info) {
                    Ok(r) => {
                        tracing::info!(retrieval = ?r, "knowledge base loaded");
                        let _ = loader_state.retrieval.set(Arc::new(r));
                    }
                    Err(e) => {
                        return fail(anyhow::Error::new(e).context("loading the knowledge base"))
                    }
                }
            }
            match Engine::load(config) {
            Ok(engine) => {
                tracing::info!(
                    model = %model_path.display(),
                    threads = engine.info.threads,
                    n_ctx = engine.info.n_ctx,
                    slots = engine.info.slots,
                    "model loaded"
                );
                let _ = loader_state.engine.set(engine);
            }
            Err(e) => fail(anyhow::Error::new(e).context("loading the model")),
        }});
        let refused = state.metrics.refused_connections.clone();
        let app = server::router(state, limits.max_body);
        let stop = async move {
            tokio::select! {
                () = shutdown_signal() => {},
                () = load_failed.notified() => {},
            }
        };
        tracing::info!(
            queue_depth = limits.queue_depth,
            api_key = limits.api_key_file.is_some(),
            max_connections = conn_limits.max_connections,
            header_timeout_s = conn_limits.header_timeout.as_secs(),
            fd_limit = ?fd_limit,
            "serving"
        );
        listen::serve(listener, app, conn_limits, refused, stop).await;
        if let Some(e) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// This process's peak resident memory in MiB (Linux: VmHWM), if the kernel says.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
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
