//! Request metrics in the Prometheus text exposition format (version 0.0.4).
//!
//! Counters for requests and tokens, a histogram of time to first token, the decode speed of
//! the last request, the queue (waiting, running, refused, cancelled): what an operator
//! watches on a board.

use std::fmt::Write as _;
use std::sync::Mutex;

use crate::engine::{GenStats, LoadCounts, ModelInfo};

/// Upper bounds (seconds) of the time-to-first-token histogram: a small model on a fast core
/// answers in tens of milliseconds, a long prompt on a Cortex-A53 takes seconds.
pub const TTFT_BUCKETS: [f64; 10] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) of the retrieval-latency histogram: embedding a question and
/// searching takes milliseconds on a workstation and tens of them on a Cortex-A53.
pub const RETRIEVAL_BUCKETS: [f64; 9] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Debug, Default)]
struct Inner {
    requests_ok: u64,
    requests_failed: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft: Histogram<{ TTFT_BUCKETS.len() }>,
    decode_seconds: f64,
    decode_tokens: u64,
    last_decode_tps: f64,
    guarded: u64,
    answered_with_kb: u64,
    rejected_queue_full: u64,
    rejected_unauthorized: u64,
    retrieval: Histogram<{ RETRIEVAL_BUCKETS.len() }>,
}

/// A Prometheus histogram over fixed upper bounds: cumulative bucket counts, sum, count.
#[derive(Debug, Clone, Copy)]
struct Histogram<const N: usize> {
    buckets: [u64; N],
    sum: f64,
    count: u64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: [0; N],
            sum: 0.0,
            count: 0,
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&mut self, v: f64, bounds: &[f64; N]) {
        self.sum += v;
        self.count += 1;
        for (bucket, le) in self.buckets.iter_mut().zip(bounds) {
            if v <= *le {
                *bucket += 1;
            }
        }
    }

    /// The `_bucket`, `_sum` and `_count` samples, each with `label`.
    fn samples(&self, label: &str, bounds: &[f64; N]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = bounds
            .iter()
            .zip(self.buckets)
            .map(|(le, n)| (format!("_bucket{{{label},le=\"{le}\"}}"), n.to_string()))
            .collect();
        out.push((
            format!("_bucket{{{label},le=\"+Inf\"}}"),
            self.count.to_string(),
        ));
        out.push((format!("_sum{{{label}}}"), format!("{}", self.sum)));
        out.push((format!("_count{{{label}}}"), self.count.to_string()));
        out
    }
}

/// What the guard decided for a question.
#[derive(Debug, Clone, Copy)]
pub enum Retrieved {
    /// Out of domain: refused without running the model.
    Guarded,
    /// Answered from the knowledge base's passages.
    Answered,
}

/// Why a request was answered without reaching the engine.
#[derive(Debug, Clone, Copy)]
pub enum Rejected {
    /// 503: the queue held `--queue-depth` waiting requests.
    QueueFull,
    /// 401: no API key or the wrong one.
    Unauthorized,
}

/// Shared between the HTTP handlers.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Connections closed at accept because the connection cap was reached (the accept
    /// loop counts them).
    pub refused_connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Metrics {
    pub fn record(&self, stats: &GenStats) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.requests_ok += 1;
        m.prompt_tokens += stats.prompt_tokens as u64;
        m.completion_tokens += stats.completion_tokens as u64;
        if stats.completion_tokens > 0 {
            m.ttft.observe(stats.ttft.as_secs_f64(), &TTFT_BUCKETS);
        }
        if let Some(tps) = stats.decode_tokens_per_second() {
            m.decode_seconds += stats.decode.as_secs_f64();
            m.decode_tokens += stats.completion_tokens as u64 - 1;
            m.last_decode_tps = tps;
        }
    }

    /// Counts a question the knowledge base was searched for, and how long that took.
    pub fn record_retrieval(&self, outcome: Retrieved, latency: std::time::Duration) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Retrieved::Guarded => m.guarded += 1,
            Retrieved::Answered => m.answered_with_kb += 1,
        }
        m.retrieval
            .observe(latency.as_secs_f64(), &RETRIEVAL_BUCKETS);
    }

    pub fn record_rejection(&self, why: Rejected) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match why {
            Rejected::QueueFull => m.rejected_queue_full += 1,
            Rejected::Unauthorized => m.rejected_unauthorized += 1,
        }
    }

    pub fn record_failure(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests_failed += 1;
    }

    /// The exposition text; `engine` (once the model is loaded) adds which engine, library
    /// version and delegate run it and its queue; `retrieval` (a bundle with a knowledge
    /// base) adds the guard's counts and the retrieval latency.
    pub fn render(
        &self,
        model: &str,
        engine: Option<(&ModelInfo, LoadCounts)>,
        retrieval: bool,
    ) -> String {
        let info = engine.map(|(i, _)| i);
        let load = engine.map(|(_, l)| l);
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let label = format!("model=\"{}\"", escape(model));
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (suffix_labels, value) in lines {
                let _ = writeln!(out, "{name}{suffix_labels} {value}");
            }
        };
        if let Some(info) = info {
            metric(
                "edgepack_engine_info",
                "gauge",
                "The engine running the model, its library version and the accelerator delegate in use (cpu when none).",
                &[(
                    format!(
                        "{{{label},engine=\"{}\",version=\"{}\",delegate=\"{}\"}}",
                        escape(info.engine),
                        escape(&info.engine_version),
                        escape(info.delegate.as_deref().unwrap_or("cpu"))
                    ),
                    "1".into(),
                )],
            );
            if let Some(reason) = &info.delegate_fallback {
                metric(
                    "edgepack_delegate_fallback",
                    "gauge",
                    "1 when the bundle asks for a delegate that is not running, with the reason.",
                    &[(
                        format!("{{{label},reason=\"{}\"}}", escape(reason)),
                        "1".into(),
                    )],
                );
            }
        }
        metric(
            "edgepack_requests_total",
            "counter",
            "Generation requests by outcome.",
            &[
                (
                    format!("{{{label},outcome=\"ok\"}}"),
                    m.requests_ok.to_string(),
                ),
                (
                    format!("{{{label},outcome=\"error\"}}"),
                    m.requests_failed.to_string(),
                ),
            ],
        );
        metric(
            "edgepack_requests_rejected_total",
            "counter",
            "Requests answered without reaching the engine: queue_full (503, the queue held --queue-depth waiting requests), unauthorized (401, no or a wrong API key).",
            &[
                (
                    format!("{{{label},reason=\"queue_full\"}}"),
                    m.rejected_queue_full.to_string(),
                ),
                (
                    format!("{{{label},reason=\"unauthorized\"}}"),
                    m.rejected_unauthorized.to_string(),
                ),
            ],
        );
        if let Some(l) = load {
            metric(
                "edgepack_requests_cancelled_total",
                "counter",
                "Generations stopped because their client went away (at the next token, or before they started).",
                &[(format!("{{{label}}}"), l.cancelled.to_string())],
            );
            metric(
                "edgepack_cancelled_completion_tokens_total",
                "counter",
                "Tokens generated for requests whose client went away before the end.",
                &[(format!("{{{label}}}"), l.cancelled_tokens.to_string())],
            );
            metric(
                "edgepack_requests_waiting",
                "gauge",
                "Generation requests queued for the engine.",
                &[(format!("{{{label}}}"), l.waiting.to_string())],
            );
            metric(
                "edgepack_requests_running",
                "gauge",
                "Generation requests the engine is working on.",
                &[(format!("{{{label}}}"), l.running.to_string())],
            );
        }
        metric(
            "edgepack_connections_refused_total",
            "counter",
            "Connections closed at once because the connection cap was reached.",
            &[(
                format!("{{{label}}}"),
                self.refused_connections
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .to_string(),
            )],
        );
        metric(
            "edgepack_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            &[(format!("{{{label}}}"), m.prompt_tokens.to_string())],
        );
        metric(
            "edgepack_completion_tokens_total",
            "counter",
            "Tokens generated.",
            &[(format!("{{{label}}}"), m.completion_tokens.to_string())],
        );
        metric(
            "edgepack_time_to_first_token_seconds",
            "histogram",
            "Time from taking a request to its first generated token.",
            &m.ttft.samples(&label, &TTFT_BUCKETS),
        );
        metric(
            "edgepack_decode_seconds_total",
            "counter",
            "Time spent generating tokens after the first one.",
            &[(format!("{{{label}}}"), format!("{}", m.decode_seconds))],
        );
        metric(
            "edgepack_decode_tokens_total",
            "counter",
            "Tokens generated after the first one (rate over decode_seconds is tokens/s).",
            &[(format!("{{{label}}}"), m.decode_tokens.to_string())],
        );
        metric(
            "edgepack_decode_tokens_per_second",
            "gauge",
            "Decode speed of the last request that generated two or more tokens.",
            &[(format!("{{{label}}}"), format!("{}", m.last_decode_tps))],
        );
        if retrieval {
            metric(
                "edgepack_retrieval_questions_total",
                "counter",
                "Chat questions searched in the knowledge base, by the guard's decision.",
                &[
                    (
                        format!("{{{label},decision=\"answered\"}}"),
                        m.answered_with_kb.to_string(),
                    ),
                    (
                        format!("{{{label},decision=\"guarded\"}}"),
                        m.guarded.to_string(),
                    ),
                ],
            );
            metric(
                "edgepack_retrieval_seconds",
                "histogram",
                "Time from a chat question to the guard's decision: embedding and search.",
                &m.retrieval.samples(&label, &RETRIEVAL_BUCKETS),
            );
        }
        out
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
