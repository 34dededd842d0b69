//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions` (both with SSE
//! streaming), `/v1/models`, `/health` and `/metrics`.
//!
//! `/health` follows llama-server: 503 while the model loads, 200 once it answers, so a
//! deploy's health check waits for readiness rather than liveness. It never needs the API
//! key and never queues.
//!
//! Generation requests queue for the engine up to the queue depth; beyond it they are
//! answered 503 with `Retry-After` at once, before their prompt is tokenized.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::auth::ApiKey;
use crate::engine::{
    ChatMessage, Engine, EngineError, GenEvent, GenRequest, GenStats, Prompt, QueueFull,
};
use crate::metrics::{Metrics, Rejected, Retrieved};
use crate::rag::{Decision, Retrieval};

/// OpenAI's default `max_tokens` is "until the context is full"; on a board that can mean
/// minutes, so an unset limit is this many tokens.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// OpenAI's documented defaults for sampling.
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
pub const DEFAULT_TOP_P: f32 = 1.0;
/// Requests that may wait for the engine while it generates, when none is asked for: a
/// board answers one at a time, and a client at the back of a queue of 16 short answers
/// still hears back within a couple of minutes on a Cortex-A53.
pub const DEFAULT_QUEUE_DEPTH: usize = 16;
/// `Retry-After` seconds before any request has finished, and the most ever suggested.
const RETRY_AFTER_MIN_S: u64 = 1;
const RETRY_AFTER_MAX_S: u64 = 60;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The model id in API answers (the bundle's model name).
    pub model_id: String,
    /// Set once the model has loaded.
    pub engine: OnceLock<Engine>,
    /// The bundle's knowledge base, set before the engine when the bundle has one.
    pub retrieval: OnceLock<Arc<Retrieval>>,
    pub metrics: Metrics,
    /// Generation requests that may wait while the engine runs one; more are answered 503.
    pub queue_depth: usize,
    /// The bearer token every endpoint but `/health` requires, when one is set.
    pub api_key: Option<ApiKey>,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(model_id: String) -> AppState {
        AppState {
            model_id,
            engine: OnceLock::new(),
            retrieval: OnceLock::new(),
            metrics: Metrics::default(),
            queue_depth: DEFAULT_QUEUE_DEPTH,
            api_key: None,
            next_id: AtomicU64::new(1),
        }
    }
}

/// The API. Request bodies above `max_body` bytes are answered 413 before they are read
/// whole, let alone tokenized.
pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}

/// Refuses requests without the API key (when one is set) before their body is read; only
/// `/health` answers anyone.
async fn authorize(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let open = matches!(req.uri().path(), "/health" | "/v1/health");
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if !open && !key.accepts(given) {
            st.metrics.record_rejection(Rejected::Unauthorized);
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "this server needs an API key: send Authorization: Bearer <key>",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// The answer to a request the queue has no room for: 503 with a `Retry-After` of about
/// one request's time on the engine (when the one running now should be done).
fn queue_full(st: &AppState, engine: &Engine, full: QueueFull) -> Response {
    st.metrics.record_rejection(Rejected::QueueFull);
    let retry = engine
        .load_counts()
        .mean_request_time()
        .map_or(RETRY_AFTER_MIN_S, |d| d.as_secs_f64().ceil() as u64)
        .clamp(RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S);
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable_error",
        format!(
            "the server is busy: {} requests already wait (--queue-depth {}); retry after {retry} s",
            full.waiting, st.queue_depth
        ),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    r
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
    let meta = st.engine.get().map(|e| {
        let mut v = serde_json::to_value(&e.info).unwrap_or(Value::Null);
        if let (Some(r), Some(o)) = (st.retrieval.get(), v.as_object_mut()) {
            o.insert("retrieval".into(), r.describe());
        }
        v
    });
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
        st.metrics.render(
            &st.model_id,
            st.engine.get().map(|e| (&e.info, e.load_counts())),
            st.retrieval.get().is_some(),
        ),
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
    /// Drop the prompt's oldest part when it leaves too little room in the context.
    #[serde(default)]
    truncate: bool,
}

/// A chat request's own field; the sampling fields are read from the same body.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

/// A completion request's own field; the sampling fields are read from the same body.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
}

impl Sampling {
    /// The temperature and top-p asked for, checked.
    fn checked(&self) -> Result<(f32, f32), String> {
        let temperature = self.temperature.unwrap_or(DEFAULT_TEMPERATURE);
        let top_p = self.top_p.unwrap_or(DEFAULT_TOP_P);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(format!("temperature {temperature} is outside 0..=2"));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(format!("top_p {top_p} is outside (0, 1]"));
        }
        Ok((temperature, top_p))
    }

    fn request(&self, prompt: Prompt) -> Result<GenRequest, String> {
        let (temperature, top_p) = self.checked()?;
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
            truncate: self.truncate,
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

/// A request body: `T` (the endpoint's own fields) and the sampling fields, each error naming
/// the field it is about (`max_tokens: invalid type: string "8", expected u32`).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, Sampling), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
    if !value.is_object() {
        return Err("invalid request body: not a JSON object".into());
    }
    let field = |e: serde_path_to_error::Error<serde_json::Error>| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            format!("invalid request body: {inner}")
        } else {
            format!("{path}: {inner}")
        }
    };
    let own = serde_path_to_error::deserialize(&value).map_err(field)?;
    let sampling = serde_path_to_error::deserialize(&value).map_err(field)?;
    Ok((own, sampling))
}

/// A `/v1/chat/completions` body as the handler reads it before any engine or knowledge base
/// sees it: JSON, messages, sampling checks. The message is the 400 answer's.
pub fn parse_chat_request(body: &[u8]) -> Result<GenRequest, String> {
    let (req, sampling): (ChatRequest, Sampling) = parse(body)?;
    let messages = chat_messages(req.messages)?;
    sampling.request(Prompt::Chat(messages))
}

/// A `/v1/completions` body as the handler reads it: JSON, the one prompt, sampling checks.
pub fn parse_completion_request(body: &[u8]) -> Result<GenRequest, String> {
    let (req, sampling): (CompletionRequest, Sampling) = parse(body)?;
    let prompt = one_prompt(req.prompt)?;
    sampling.request(Prompt::Text(prompt))
}

/// The single prompt a completion request may carry.
fn one_prompt(p: PromptField) -> Result<String, String> {
    match p {
        PromptField::One(p) => Ok(p),
        PromptField::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
        PromptField::Many(v) => Err(format!(
            "prompt: {} prompts given, one per request is supported",
            v.len()
        )),
    }
}

fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, String> {
    if messages.is_empty() {
        return Err("messages is empty".into());
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        // Roles go into the template's own text: only the ones chat templates know.
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(format!(
                "messages[{i}].role: {:?} is not one of system, user, assistant, tool",
                m.role
            ));
        }
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
    Ok(out)
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
    let (req, sampling): (ChatRequest, Sampling) = match parse(&body) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
    };
    let mut messages = match chat_messages(req.messages) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
    };
    if st.engine.get().is_none() {
        return loading();
    }
    if let Err(msg) = sampling.checked() {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", msg);
    }
    let mut extra = None;
    if let Some(r) = st.retrieval.get() {
        match ground(&st, r.clone(), &mut messages).await {
            Ok(Grounded::Answer(fields)) => extra = Some(fields),
            Ok(Grounded::Refuse(fields)) => return refuse(&st, r, fields, &sampling),
            Ok(Grounded::NoQuestion) => {}
            Err(resp) => return resp,
        }
    }
    generate(st, Api::Chat, Prompt::Chat(messages), sampling, extra).await
}

/// What retrieval made of a chat request.
enum Grounded {
    /// The last user turn now holds the passages; these fields join the response.
    Answer(serde_json::Map<String, Value>),
    /// Out of domain: answer with the refusal and these fields.
    Refuse(serde_json::Map<String, Value>),
    /// No user turn to search for.
    NoQuestion,
}

/// Searches the knowledge base for the last user turn and applies the guard; an answered
/// question's turn is replaced by the bundle's template filled with the passages.
async fn ground(
    st: &AppState,
    r: Arc<Retrieval>,
    messages: &mut [ChatMessage],
) -> Result<Grounded, Response> {
    let Some(turn) = messages.iter_mut().rev().find(|m| m.role == "user") else {
        return Ok(Grounded::NoQuestion);
    };
    let question = turn.content.clone();
    let threshold = r.threshold;
    // Embedding is CPU work: off the async workers.
    let decided = tokio::task::spawn_blocking(move || r.decide(&question))
        .await
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            )
        })?
        .map_err(|e| {
            st.metrics.record_failure();
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("retrieval: {e}"),
            )
        })?;
    let latency_ms = decided.latency.as_secs_f64() * 1e3;
    let mut fields = serde_json::Map::new();
    Ok(match decided.decision {
        Decision::Refuse { best } => {
            st.metrics
                .record_retrieval(Retrieved::Guarded, decided.latency);
            fields.insert("sources".into(), json!([]));
            fields.insert(
                "retrieval".into(),
                json!({"guarded": true, "best_score": best, "threshold": threshold, "latency_ms": latency_ms}),
            );
            Grounded::Refuse(fields)
        }
        Decision::Answer { prompt, sources } => {
            st.metrics
                .record_retrieval(Retrieved::Answered, decided.latency);
            let best = sources.first().map(|s| s.score);
            turn.content = prompt;
            fields.insert("sources".into(), json!(sources));
            fields.insert(
                "retrieval".into(),
                json!({"guarded": false, "best_score": best, "threshold": threshold, "latency_ms": latency_ms}),
            );
            Grounded::Answer(fields)
        }
    })
}

/// The refusal to an out-of-domain question, as a chat completion (streamed when asked)
/// with no model tokens.
fn refuse(
    st: &AppState,
    r: &Retrieval,
    fields: serde_json::Map<String, Value>,
    sampling: &Sampling,
) -> Response {
    let id = format!(
        "{}-{}",
        Api::Chat.id_prefix(),
        st.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let zero = json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
    let mut v = json!({
        "id": id,
        "object": Api::Chat.object(sampling.stream),
        "created": now_secs(),
        "model": st.model_id,
    });
    if !sampling.stream {
        v["choices"] = json!([Api::Chat.full_choice(r.refusal.clone(), json!("stop"))]);
        v["usage"] = zero;
        extend(&mut v, fields);
        return Json(v).into_response();
    }
    let mut first = v.clone();
    first["choices"] = json!([Api::Chat.delta_choice(Some(r.refusal.clone()), true, Value::Null)]);
    extend(&mut first, fields);
    let mut last = v.clone();
    last["choices"] = json!([Api::Chat.delta_choice(None, false, json!("stop"))]);
    let mut events = vec![first, last];
    if sampling.include_usage() {
        let mut u = v;
        u["choices"] = json!([]);
        u["usage"] = zero;
        events.push(u);
    }
    let events: Vec<Result<Event, Infallible>> = events
        .into_iter()
        .map(|e| Ok(Event::default().data(e.to_string())))
        .chain([Ok(Event::default().data("[DONE]"))])
        .collect();
    Sse::new(tokio_stream::iter(events)).into_response()
}

/// Adds `fields` to the JSON object `v`.
fn extend(v: &mut Value, fields: serde_json::Map<String, Value>) {
    if let Some(o) = v.as_object_mut() {
        o.extend(fields);
    }
}

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let (req, sampling): (CompletionRequest, Sampling) = match parse(&body) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
    };
    let prompt = match one_prompt(req.prompt) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
    };
    generate(st, Api::Completion, Prompt::Text(prompt), sampling, None).await
}

/// Runs a generation and answers it; `extra` fields (retrieval's sources) join the full
/// response, or the first chunk of a stream.
async fn generate(
    st: Arc<AppState>,
    api: Api,
    prompt: Prompt,
    sampling: Sampling,
    extra: Option<serde_json::Map<String, Value>>,
) -> Response {
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
    let mut events = match engine.try_submit(request, st.queue_depth) {
        Ok(events) => events,
        Err(full) => return queue_full(&st, engine, full),
    };
    let created = now_secs();

    if !sampling.stream {
        let mut text = String::new();
        while let Some(ev) = events.recv().await {
            match ev {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Done(stats) => {
                    st.metrics.record(&stats);
                    let mut v = json!({
                        "id": id,
                        "object": api.object(false),
                        "created": created,
                        "model": st.model_id,
                        "choices": [api.full_choice(text, json!(stats.finish_reason))],
                        "usage": usage(&stats),
                    });
                    extend(&mut v, extra.unwrap_or_default());
                    return Json(v).into_response();
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
    let mut extra = extra;
    let mut chunk = move |choices: Value, usage: Option<Value>| -> Event {
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
        if let Some(fields) = extra.take() {
            extend(&mut v, fields);
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
                // A client that hangs up between tokens is noticed here, not only when its
                // next token cannot be written: dropping `events` stops the generation.
                next = tokio::select! {
                    ev = events.recv() => ev,
                    () = tx.closed() => return,
                };
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(rx)).into_response()
}
