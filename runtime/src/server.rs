//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions` (both with SSE
//! streaming), `/v1/models`, `/health` and `/metrics`.
//!
//! `/health` follows llama-server: 503 while the model loads, 200 once it answers, so a
//! deploy's health check waits for readiness rather than liveness.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{ChatMessage, Engine, EngineError, GenEvent, GenRequest, GenStats, Prompt};
use crate::metrics::Metrics;

/// OpenAI's default `max_tokens` is "until the context is full"; on a board that can mean
/// minutes, so an unset limit is this many tokens.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// OpenAI's documented defaults for sampling.
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
pub const DEFAULT_TOP_P: f32 = 1.0;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The model id in API answers (the bundle's model name).
    pub model_id: String,
    /// Set once the model has loaded.
    pub engine: OnceLock<Engine>,
    pub metrics: Metrics,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(model_id: String) -> AppState {
        AppState {
            model_id,
            engine: OnceLock::new(),
            metrics: Metrics::default(),
            next_id: AtomicU64::new(1),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        Json(json!({"error": {"code": status.as_u16(), "message": message, "type": kind}})),
    )
        .into_response()
}

fn loading() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable_error",
        "Loading model",
    )
}

fn engine_error(e: &EngineError) -> Response {
    if e.is_client_error() {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            e.to_string(),
        )
    } else {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    }
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.engine.get() {
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => loading(),
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    let meta = st
        .engine
        .get()
        .map(|e| serde_json::to_value(&e.info).unwrap_or(Value::Null));
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "edgepack",
            "meta": meta,
        }],
    }))
    .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics
            .render(&st.model_id, st.engine.get().map(|e| &e.info)),
    )
        .into_response()
}

/// `stop` is a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Message content is a string or a list of typed parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Sampling {
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    #[serde(flatten)]
    sampling: Sampling,
}

impl Sampling {
    fn request(&self, prompt: Prompt) -> Result<GenRequest, String> {
        let temperature = self.temperature.unwrap_or(DEFAULT_TEMPERATURE);
        let top_p = self.top_p.unwrap_or(DEFAULT_TOP_P);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(format!("temperature {temperature} is outside 0..=2"));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(format!("top_p {top_p} is outside (0, 1]"));
        }
        Ok(GenRequest {
            prompt,
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(DEFAULT_MAX_TOKENS),
            temperature,
            top_p,
            seed: self.seed.unwrap_or(0),
            stop: match &self.stop {
                None => vec![],
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            ignore_eos: false,
            stream: self.stream,
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

fn chat_prompt(messages: Vec<Message>) -> Result<Prompt, String> {
    if messages.is_empty() {
        return Err("messages is empty".into());
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(format!(
                                "messages[{i}].content: part type {kind:?} is not supported (text only)"
                            ))
                        }
                    }
                }
                text
            }
        };
        out.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    Ok(Prompt::Chat(out))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn usage(stats: &GenStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    })
}

/// Which endpoint a generation answers: they differ only in the JSON around the text.
#[derive(Debug, Clone, Copy)]
enum Api {
    Chat,
    Completion,
}

impl Api {
    fn id_prefix(self) -> &'static str {
        match self {
            Api::Chat => "chatcmpl",
            Api::Completion => "cmpl",
        }
    }

    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completion, _) => "text_completion",
        }
    }

    fn full_choice(self, text: String, finish: Value) -> Value {
        match self {
            Api::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }),
            Api::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            }),
        }
    }

    fn delta_choice(self, text: Option<String>, first: bool, finish: Value) -> Value {
        match self {
            Api::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
            Api::Completion => json!({
                "index": 0, "text": text.unwrap_or_default(), "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }
}

async fn chat_completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let req: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
    };
    let prompt = match chat_prompt(req.messages) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
    };
    generate(st, Api::Chat, prompt, req.sampling).await
}

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let req: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
    };
    let prompt = match req.prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(v) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!(
                    "prompt: {} prompts given, one per request is supported",
                    v.len()
                ),
            )
        }
    };
    generate(st, Api::Completion, Prompt::Text(prompt), req.sampling).await
}

async fn generate(st: Arc<AppState>, api: Api, prompt: Prompt, sampling: Sampling) -> Response {
    let Some(engine) = st.engine.get() else {
        return loading();
    };
    let request = match sampling.request(prompt) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
    };
    let id = format!(
        "{}-{}",
        api.id_prefix(),
        st.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = now_secs();
    let mut events = engine.submit(request);

    if !sampling.stream {
        let mut text = String::new();
        while let Some(ev) = events.recv().await {
            match ev {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Done(stats) => {
                    st.metrics.record(&stats);
                    return Json(json!({
                        "id": id,
                        "object": api.object(false),
                        "created": created,
                        "model": st.model_id,
                        "choices": [api.full_choice(text, json!(stats.finish_reason))],
                        "usage": usage(&stats),
                    }))
                    .into_response();
                }
                GenEvent::Error(e) => {
                    st.metrics.record_failure();
                    return engine_error(&e);
                }
            }
        }
        st.metrics.record_failure();
        return engine_error(&EngineError::Stopped);
    }

    // Streaming: errors found before the first token (a prompt too long, no template) still
    // get a proper HTTP status; later ones arrive as an `error` event, as in Ollama's API.
    let first = match events.recv().await {
        Some(GenEvent::Error(e)) => {
            st.metrics.record_failure();
            return engine_error(&e);
        }
        Some(ev) => ev,
        None => {
            st.metrics.record_failure();
            return engine_error(&EngineError::Stopped);
        }
    };
    let include_usage = sampling.include_usage();
    let model = st.model_id.clone();
    let chunk = move |choices: Value, usage: Option<Value>| -> Event {
        let mut v = json!({
            "id": id,
            "object": api.object(true),
            "created": created,
            "model": model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let mut sent_first = false;
        let mut next = Some(first);
        while let Some(ev) = next.take() {
            let mut out: Vec<Event> = Vec::new();
            let mut end = false;
            match ev {
                GenEvent::Text(t) => {
                    out.push(chunk(
                        json!([api.delta_choice(Some(t), !sent_first, Value::Null)]),
                        None,
                    ));
                    sent_first = true;
                }
                GenEvent::Done(stats) => {
                    st.metrics.record(&stats);
                    out.push(chunk(
                        json!([api.delta_choice(None, !sent_first, json!(stats.finish_reason))]),
                        None,
                    ));
                    if include_usage {
                        out.push(chunk(json!([]), Some(usage(&stats))));
                    }
                    out.push(Event::default().data("[DONE]"));
                    end = true;
                }
                GenEvent::Error(e) => {
                    st.metrics.record_failure();
                    let body = json!({"error": {"message": e.to_string(), "type": "server_error"}});
                    out.push(Event::default().data(body.to_string()));
                    end = true;
                }
            }
            for event in out {
                if tx.send(Ok(event)).is_err() {
                    // The client hung up; dropping `events` stops the generation.
                    return;
                }
            }
            if !end {
                next = events.recv().await;
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(rx)).into_response()
}
