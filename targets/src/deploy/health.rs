//! The health check: `/health` until the model is loaded, then one streamed chat prompt whose
//! time to first token and decode speed are measured here, at the end of the SSH forward.
//!
//! The runtime listens on the board's loopback only; the check reaches it through a local unix
//! socket that ssh forwards, so nothing on the board (no curl) is needed and no port opens to
//! the network. Requests are HTTP/1.0, so the answer arrives unchunked and ends when the
//! server closes the connection.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The smoke prompt: short, with an answer any instruct model gives in a few tokens.
pub const SMOKE_PROMPT: &str = "What is the capital of France? Answer in one word.";
/// Tokens the smoke prompt may generate: enough to measure decode speed, short enough to be
/// quick under emulation.
pub const SMOKE_MAX_TOKENS: u32 = 16;

/// What a passed health check measured.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// Seconds from the (re)start until `/health` answered 200.
    pub ready_s: f64,
    /// Time from sending the prompt to the first generated text, in milliseconds.
    pub ttft_ms: f64,
    /// Generated tokens after the first over the time they took.
    pub tokens_per_s: Option<f64>,
    pub completion_tokens: u64,
    pub reply: String,
}

/// One HTTP/1.0 exchange: status and body, and when the first body bytes holding `marker`
/// arrived.
pub(crate) struct Answer {
    pub status: u16,
    pub body: String,
}

pub(crate) async fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Answer> {
    tokio::time::timeout(timeout, async {
        let mut s = UnixStream::connect(sock).await?;
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        parse(&raw)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}

fn parse(raw: &[u8]) -> std::io::Result<Answer> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&raw[split + 4..]).into_owned(),
    })
}

/// Sends the smoke prompt as a streamed chat completion and times it.
/// `api_key` is the runtime's bearer token when it serves with `--api-key-file`.
pub(crate) async fn smoke(
    sock: &Path,
    timeout: Duration,
    api_key: Option<&str>,
) -> Result<Health, String> {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": SMOKE_PROMPT}],
        "max_tokens": SMOKE_MAX_TOKENS,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let run = async {
        let mut s = UnixStream::connect(sock)
            .await
            .map_err(|e| format!("connecting to the runtime: {e}"))?;
        let auth = api_key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let sent = Instant::now();
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("sending the smoke prompt: {e}"))?;
        let mut raw: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let mut scanned = 0usize;
        let mut header_end: Option<usize> = None;
        let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
        let mut reply = String::new();
        let mut tokens: Option<u64> = None;
        let mut chunks = 0u64;
        loop {
            let n = s
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading the smoke answer: {e}"))?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            raw.extend_from_slice(&buf[..n]);
            if header_end.is_none() {
                if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    header_end = Some(p + 4);
                    scanned = p + 4;
                    let a = parse(&raw).map_err(|e| e.to_string())?;
                    if a.status != 200 {
                        // The rest of the body says why; read it before reporting.
                        let _ = s.read_to_end(&mut raw).await;
                        let body = parse(&raw).map(|a| a.body).unwrap_or_default();
                        return Err(format!(
                            "the smoke prompt got HTTP {}: {}",
                            a.status,
                            body.trim()
                        ));
                    }
                }
            }
            if header_end.is_none() {
                continue;
            }
            // Server-sent events: one `data: {json}` line per chunk.
            while let Some(nl) = raw[scanned..].iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&raw[scanned..scanned + nl]).into_owned();
                scanned += nl + 1;
                let Some(data) = line.trim_end().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data)
                    .map_err(|e| format!("the runtime streamed invalid JSON ({e}): {data}"))?;
                if let Some(e) = v.get("error") {
                    return Err(format!("the runtime failed mid-answer: {e}"));
                }
                if let Some(t) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(|c| c.as_str())
                {
                    if !t.is_empty() {
                        first.get_or_insert(now);
                        last = Some(now);
                        chunks += 1;
                        reply.push_str(t);
                    }
                }
                if let Some(u) = v
                    .pointer("/usage/completion_tokens")
                    .and_then(|c| c.as_u64())
                {
                    tokens = Some(u);
                }
            }
        }
        let first = first.ok_or("the smoke prompt produced no text")?;
        let completion_tokens = tokens.unwrap_or(chunks);
        let decode = last
            .map(|l| l.duration_since(first).as_secs_f64())
            .unwrap_or(0.0);
        Ok(Health {
            ready_s: 0.0,
            ttft_ms: first.duration_since(sent).as_secs_f64() * 1e3,
            tokens_per_s: (completion_tokens > 1 && decode > 0.0)
                .then(|| (completion_tokens - 1) as f64 / decode),
            completion_tokens,
            reply,
        })
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("the smoke prompt got no full answer within {timeout:?}"))?
}
