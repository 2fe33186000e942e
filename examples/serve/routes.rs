//! HTTP routes: the OpenAI endpoints, `/v1/models`, `/health`, `/metrics` and the chat page,
//! with bearer-key checks, a body size limit and OpenAI-style JSON for every error.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flexgen_opt::{chat, GenerationConfig, OptTokenizer, BOS_TOKEN_ID};
use serde_json::{json, Value};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

use flexgen::serve::{
    ApiError, ChatRequest, CompletionRequest, Event, Kind, Metrics, Options, Prompt, Reply,
};

use crate::engine::{Engine, JobSpec};

/// `max_tokens` of a completion request that gives none (OpenAI's default).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// What every handler shares.
pub struct AppState {
    /// The engine thread's queue.
    pub engine: Engine,
    /// Text <-> ids (handlers tokenize; the engine decodes).
    pub tokenizer: Arc<OptTokenizer>,
    /// The id clients pass as `model`.
    pub model_id: String,
    /// Positions the model has (prompt + new tokens - 1 must fit).
    pub max_positions: usize,
    /// Rows of the model's embedding (token ids must be below).
    pub vocab_size: usize,
    /// Required bearer key of `/v1/*`, if any.
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// When the server started (Unix seconds), reported as the model's `created`.
    pub started: u64,
}

type Shared = Arc<AppState>;

/// An [`ApiError`] as an HTTP response (its status and OpenAI's JSON error body).
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0.body())).into_response()
    }
}

/// The whole application.
pub fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A response id unique within this process: `{prefix}-{hex}`.
fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:06x}", now())
}

/// The route label of a path for metrics (unknown paths share one label).
fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    }
}

async fn count_responses(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let resp = next.run(req).await;
    s.metrics.response(route, resp.status().as_u16());
    resp
}

/// Constant-time comparison, so response timing does not reveal how much of a key matched.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn require_key(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return HttpError(ApiError::unauthorized(
                    "You didn't provide an API key: send the header 'Authorization: Bearer KEY'",
                ))
                .into_response()
            }
            Some(g) if !same_key(g.trim(), key) => {
                return HttpError(ApiError::unauthorized("Incorrect API key provided"))
                    .into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

async fn not_found(method: Method, uri: Uri) -> HttpError {
    HttpError(ApiError::no_route(method.as_str(), uri.path()))
}

async fn wrong_method(method: Method, uri: Uri) -> HttpError {
    HttpError(ApiError::wrong_method(method.as_str(), uri.path()))
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(s): State<Shared>) -> Json<Value> {
    Json(json!({"status": "ok", "model": s.model_id}))
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

fn model_object(s: &AppState) -> Value {
    json!({
        "id": s.model_id,
        "object": "model",
        "created": s.started,
        "owned_by": "flexgen",
        "max_model_len": s.max_positions,
    })
}

async fn list_models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&s)]}))
}

async fn get_model(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, HttpError> {
    s.check_model(&id)?;
    Ok(Json(model_object(&s)))
}

impl AppState {
    fn check_model(&self, name: &str) -> Result<(), ApiError> {
        if name == self.model_id {
            Ok(())
        } else {
            Err(ApiError::model_not_found(name, &self.model_id))
        }
    }

    fn body(&self, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
        body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::invalid(
                    None,
                    format!(
                        "The request body is larger than this server's limit of {} bytes",
                        self.max_body_bytes
                    ),
                )
                .with_status(StatusCode::PAYLOAD_TOO_LARGE.as_u16())
                .with_code("request_too_large")
            } else {
                ApiError::invalid(None, rejection.body_text())
            }
        })
    }

    fn encode(&self, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text)
            .map_err(|e| ApiError::invalid(Some(param), format!("cannot tokenize {param}: {e}")))
    }

    /// Token ids given by the client: below the vocabulary size, BOS prepended when missing.
    fn ids(&self, mut ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ApiError::invalid(
                Some("prompt"),
                format!(
                    "token id {bad} is outside the vocabulary (ids below {})",
                    self.vocab_size
                ),
            ));
        }
        if ids.first() != Some(&BOS_TOKEN_ID) {
            ids.insert(0, BOS_TOKEN_ID);
        }
        Ok(ids)
    }

    /// The prompt plus `max_tokens` new tokens must fit the model's positions (the last new
    /// token is never fed back, so it needs none).
    fn check_length(&self, prompt: usize, max_tokens: usize, param: &str) -> Result<(), ApiError> {
        let m = self.max_positions;
        if max_tokens > m {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "max_tokens is too large: {max_tokens}. This model has {m} positions, so at \
                     most {m} tokens can be generated"
                ),
            ));
        }
        if prompt + max_tokens.saturating_sub(1) > m {
            return Err(ApiError::invalid(
                Some(param),
                format!(
                    "This model's maximum context length is {m} tokens. However, you requested \
                     {} tokens ({prompt} in the prompt, {max_tokens} for the completion). Please \
                     reduce the prompt or the completion length",
                    prompt + max_tokens
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Ok(())
    }

    fn config(
        &self,
        o: &Options,
        max_tokens: usize,
        seed: u64,
        stops: Vec<String>,
    ) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: max_tokens,
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            seed,
            stop_strings: stops,
            ..GenerationConfig::default()
        }
    }
}

/// The request's seed, or a fresh one.
fn seed_of(o: &Options) -> u64 {
    o.seed.unwrap_or_else(rand::random)
}

async fn completions(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let req = CompletionRequest::parse(&s.body(body)?)?;
    s.check_model(&req.model)?;
    let o = &req.options;
    let max_tokens = o.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS);
    let seed = seed_of(o);
    let mut specs = Vec::with_capacity(req.prompts.len());
    for (index, p) in req.prompts.iter().enumerate() {
        let prompt = match p {
            Prompt::Text(t) => s.encode(t, "prompt")?,
            Prompt::Ids(ids) => s.ids(ids.clone())?,
        };
        s.check_length(prompt.len(), max_tokens, "prompt")?;
        let cfg = s.config(
            o,
            max_tokens,
            seed.wrapping_add(index as u64),
            o.stop.clone(),
        );
        specs.push(JobSpec { index, prompt, cfg });
    }
    start(&s, "completions", Kind::Completion, specs, o).await
}

async fn chat_completions(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let req = ChatRequest::parse(&s.body(body)?)?;
    s.check_model(&req.model)?;
    let o = &req.options;
    let prompt = s.encode(&chat::render(&req.messages), "messages")?;
    if prompt.len() > s.max_positions {
        return Err(ApiError::invalid(
            Some("messages"),
            format!(
                "This model's maximum context length is {} tokens. However, your messages \
                 resulted in {} tokens. Please reduce the length of the messages",
                s.max_positions,
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded")
        .into());
    }
    // Without max_tokens a reply may use every remaining position.
    let max_tokens = o.max_tokens.unwrap_or(s.max_positions + 1 - prompt.len());
    s.check_length(prompt.len(), max_tokens, "messages")?;
    // A reply is one line, as in FlexGen's chatbot (the next line would be "Human: ...").
    let mut stops = vec!["\n".to_string()];
    stops.extend(o.stop.iter().filter(|s| *s != "\n").cloned());
    let cfg = s.config(o, max_tokens, seed_of(o), stops);
    let specs = vec![JobSpec {
        index: 0,
        prompt,
        cfg,
    }];
    start(&s, "chat_completions", Kind::Chat, specs, o).await
}

/// Queues the rows and answers: the whole JSON when it is done, or a stream of chunks.
async fn start(
    s: &AppState,
    endpoint: &'static str,
    kind: Kind,
    specs: Vec<JobSpec>,
    o: &Options,
) -> Result<Response, HttpError> {
    let prompt_tokens = specs.iter().map(|j| j.prompt.len()).sum();
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    let reply = Reply::new(kind, new_id(prefix), now(), s.model_id.clone(), specs.len());
    let rx = s.engine.submit(specs)?;
    s.metrics.accepted(endpoint, prompt_tokens);
    if o.stream {
        Ok(stream(reply, rx, o.include_usage))
    } else {
        Ok(Json(collect(reply, rx).await?).into_response())
    }
}

/// Waits for every choice to finish. If the client goes away, this future is dropped with
/// the receiver, and the engine stops the rows.
async fn collect(mut reply: Reply, mut rx: UnboundedReceiver<Event>) -> Result<Value, ApiError> {
    while !reply.done() {
        match rx.recv().await {
            Some(ev) => {
                reply.apply(ev)?;
            }
            None => {
                return Err(ApiError::internal(
                    "the engine stopped before the reply ended",
                ))
            }
        }
    }
    Ok(reply.response())
}

/// Server-sent events: OpenAI chunks as they come, then `data: [DONE]`. A task forwards engine
/// events; it ends as soon as the client disconnects, dropping the receiver so the engine stops
/// the rows (even those still waiting in the queue).
fn stream(mut reply: Reply, mut rx: UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(v))).await.is_ok() }
        };
        for chunk in reply.opening_chunks() {
            if !send(chunk.to_string()).await {
                return;
            }
        }
        while !reply.done() {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = tx.closed() => return,
            };
            let chunk = match ev {
                Some(ev) => reply.apply(ev),
                None => Err(ApiError::internal(
                    "the engine stopped before the reply ended",
                )),
            };
            match chunk {
                Ok(Some(c)) => {
                    if !send(c.to_string()).await {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = send(e.body().to_string()).await;
                    break;
                }
            }
        }
        if include_usage && reply.done() && !send(reply.usage_chunk().to_string()).await {
            return;
        }
        let _ = send("[DONE]".to_string()).await;
    });
    Sse::new(ReceiverStream::new(out))
        .keep_alive(KeepAlive::default())
        .into_response()
}
