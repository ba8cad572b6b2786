//! An OpenAI-compatible HTTP API, over TLS with the coordinator's certificate: a tenant (or the
//! operator) sends its API token as the bearer token. `GET /v1/models` lists the models;
//! `POST /v1/chat/completions` (a conversation, in the model's chat layout) and
//! `POST /v1/completions` (a prompt taken as it is) run a job and answer with the whole
//! completion, or stream it as server-sent events (`"stream": true`), each token's text as it
//! comes. Jobs started here
//! are jobs like any other: listed, audited, limited per tenant and moved when a stage fails.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::{Value, json};
use sovra_model::{ChatTurn, SamplingParams, StopConditions};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use crate::error::CoordinatorError;
use crate::federation::{Caller, Federation};
use crate::jobs::{JobEvent, JobSpec};
use crate::records::PolicyRecord;

/// Largest request body accepted, bytes.
const MAX_BODY: usize = 4 << 20;
/// Request bodies read at once (each up to [`MAX_BODY`]); more wait their turn.
const BODIES_AT_ONCE: usize = 32;
/// Of those, the most one caller (a tenant, or the operator) may send at once; one more is
/// refused at once (429), so one caller's slow bodies cannot keep the others waiting.
const BODIES_PER_CALLER: usize = 8;
/// Time a client has to send its request body (waiting for its turn included).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 256;
/// Time an HTTP/1 client has to send a request's headers (an idle kept-alive connection is
/// closed after it too).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request under way for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams at once on one connection.
const MAX_STREAMS: u32 = 16;
/// Tokens a chat completion generates when the request names no limit.
const DEFAULT_MAX_TOKENS: usize = 256;
/// Tokens a text completion generates when the request names no limit (OpenAI's default).
const DEFAULT_TEXT_MAX_TOKENS: usize = 16;
/// Time a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// On a stop, how long the responses under way have to end (the coordinator fails their
/// jobs, so a streamed answer ends with an error event) before their connections are cut.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

type Body = BoxBody<Bytes, Infallible>;

/// The TLS side of the API: the coordinator's certificate, HTTP/2 or HTTP/1.1.
pub fn tls_acceptor(fed: &Federation) -> Result<tokio_rustls::TlsAcceptor, CoordinatorError> {
    let (chain, key) = fed
        .ca()
        .issue_server_cert(&fed.config().advertise)
        .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CoordinatorError::Internal(format!("the HTTP API's certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| CoordinatorError::Internal(format!("the HTTP API's key: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|e| CoordinatorError::Internal(format!("TLS setup of the HTTP API: {e}")))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// Serves the API on `listener` with `acceptor` (see [`tls_acceptor`]) until `shutdown`
/// resolves; then takes no new request and lets the responses under way end (within
/// [`DRAIN_GRACE`]), so a streamed answer whose job the stop ended gets its last error event
/// instead of a reset.
pub async fn serve(
    fed: Arc<Federation>,
    acceptor: tokio_rustls::TlsAcceptor,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    info!(addr = ?listener.local_addr().ok(), "OpenAI-compatible API serving");
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let bodies = Arc::new(Bodies::default());
    let (drain, draining) = tokio::sync::watch::channel(false);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(cause = %e, "accepting an HTTP API connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "HTTP API: {MAX_CONNECTIONS} connections open already; closing a new one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let fed = fed.clone();
        let bodies = bodies.clone();
        let draining = draining.clone();
        connections.spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, cause = %e, "HTTP API handshake failed"),
                Err(_) => return debug!(%peer, "HTTP API handshake timed out"),
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            // A connection with nothing under way for a while is closed: one that never sends
            // a request (HTTP/2 has no header timeout) as well as one left idle.
            let activity = Arc::new(Activity::new());
            let seen = activity.clone();
            let service = hyper::service::service_fn(move |req| {
                let fed = fed.clone();
                let bodies = bodies.clone();
                let busy = Busy::start(seen.clone());
                async move {
                    let response = handle(&fed, &bodies, req).await;
                    Ok::<_, Infallible>(
                        response.map(|inner| BodyExt::boxed(Tracked { inner, _busy: busy })),
                    )
                }
            });
            let io = TokioIo::new(tls);
            let served = if h2 {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(20))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .max_concurrent_streams(MAX_STREAMS)
                    .serve_connection(io, service);
                until_idle(conn, &activity, draining, |c| c.graceful_shutdown()).await
            } else {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(64 << 10)
                    .serve_connection(io, service);
                until_idle(conn, &activity, draining, |c| c.graceful_shutdown()).await
            };
            if let Err(e) = served {
                debug!(%peer, cause = %e, "HTTP API connection ended");
            }
        });
        // Forget the connections that ended.
        while connections.try_join_next().is_some() {}
    }
    let _ = drain.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_GRACE, drained).await.is_err() {
        warn!(
            left = connections.len(),
            "HTTP API: responses still under way {DRAIN_GRACE:?} after the stop; cut"
        );
    }
    connections.abort_all();
    Ok(())
}

/// Requests under way on a connection (from their start until their response body is done)
/// and when the last one began or ended.
struct Activity {
    opened: tokio::time::Instant,
    active: AtomicUsize,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: tokio::time::Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(now, Relaxed);
    }

    /// Nothing under way, and nothing began or ended for [`IDLE_TIMEOUT`].
    fn idle(&self) -> bool {
        let last = Duration::from_millis(self.last_ms.load(Relaxed));
        self.active.load(Relaxed) == 0 && self.opened.elapsed().saturating_sub(last) > IDLE_TIMEOUT
    }
}

/// One request under way, until dropped with its response body.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Self {
        activity.active.fetch_add(1, Relaxed);
        activity.touch();
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        self.0.touch();
    }
}

/// A response body that keeps its request counted as under way.
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `conn` until it ends, or drops it once it has been idle (see [`Activity::idle`]).
/// Once `draining` turns true, `graceful` tells the connection to take no new request and to
/// close once the responses under way have been sent.
async fn until_idle<C, E>(
    conn: C,
    activity: &Activity,
    mut draining: tokio::sync::watch::Receiver<bool>,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let mut graceful = Some(graceful);
    loop {
        if *draining.borrow()
            && let Some(graceful) = graceful.take()
        {
            graceful(conn.as_mut());
        }
        tokio::select! {
            served = conn.as_mut() => return served,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if activity.idle() {
                    return Ok(());
                }
            }
            changed = draining.changed(), if graceful.is_some() => {
                if changed.is_err() {
                    // The server is gone: nothing will ask for a graceful end any more.
                    graceful = None;
                }
            }
        }
    }
}

/// The request bodies being read: at most [`BODIES_AT_ONCE`], [`BODIES_PER_CALLER`] a caller.
struct Bodies {
    slots: tokio::sync::Semaphore,
    per_caller: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Default for Bodies {
    fn default() -> Self {
        Self {
            slots: tokio::sync::Semaphore::new(BODIES_AT_ONCE),
            per_caller: Default::default(),
        }
    }
}

/// A caller's share of [`Bodies`], given back when dropped.
struct BodyShare<'a> {
    bodies: &'a Bodies,
    caller: String,
}

impl Bodies {
    /// Counts one more body of `caller`, or refuses it when the caller sends its share.
    fn share(&self, caller: &Caller) -> Result<BodyShare<'_>, ApiError> {
        let caller = caller.name().to_string();
        let mut counts = self.per_caller.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(caller.clone()).or_default();
        if *count >= BODIES_PER_CALLER {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("{BODIES_PER_CALLER} request bodies of yours are being received already"),
            ));
        }
        *count += 1;
        Ok(BodyShare {
            bodies: self,
            caller,
        })
    }
}

impl Drop for BodyShare<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .bodies
            .per_caller
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

async fn handle(fed: &Federation, bodies: &Bodies, req: Request<Incoming>) -> Response<Body> {
    // `Authorization: Bearer <token>`, the scheme in any case.
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string());
    let path = req.uri().path().to_string();
    let result = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/models")
        | (&Method::POST, "/v1/chat/completions" | "/v1/completions") => {
            let endpoint = if path == "/v1/completions" {
                Endpoint::Text
            } else {
                Endpoint::Chat
            };
            match fed.authenticate(bearer.as_deref()) {
                Err(e) => Err(e.into()),
                Ok(_) if req.method() == Method::GET => models(fed),
                Ok(caller) => complete(fed, &caller, bodies, req, endpoint).await,
            }
        }
        (&Method::GET, path) if path.starts_with("/v1/models/") => fed
            .authenticate(bearer.as_deref())
            .map_err(ApiError::from)
            .and_then(|_| model(fed, &path["/v1/models/".len()..])),
        (_, "/v1/models" | "/v1/chat/completions" | "/v1/completions") => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{} is not allowed here", req.method()),
        )),
        (_, path) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "no such endpoint `{}`: this API serves GET /v1/models, GET /v1/models/{{id}}, POST /v1/chat/completions and POST /v1/completions",
                crate::error::shown(path, 200)
            ),
        )),
    };
    result.unwrap_or_else(|e| e.response())
}

/// An error as the OpenAI API reports them.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": null}})
    }

    fn response(&self) -> Response<Body> {
        json_response(self.status, &self.body())
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(e: CoordinatorError) -> Self {
        let message = crate::error::shown(&e.to_string(), 1000);
        let (status, kind) = match e {
            CoordinatorError::Unauthenticated(_) => {
                (StatusCode::UNAUTHORIZED, "authentication_error")
            }
            CoordinatorError::PermissionDenied(_) => (StatusCode::FORBIDDEN, "permission_error"),
            CoordinatorError::InvalidArgument(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            CoordinatorError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found_error"),
            CoordinatorError::AlreadyExists { .. } => {
                (StatusCode::CONFLICT, "invalid_request_error")
            }
            CoordinatorError::FailedPrecondition(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable_error")
            }
            CoordinatorError::ResourceExhausted(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error")
            }
            CoordinatorError::Io(_)
            | CoordinatorError::Store(_)
            | CoordinatorError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "api_error"),
        };
        Self::new(status, kind, message)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn model_json(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "sovra"})
}

fn models(fed: &Federation) -> Result<Response<Body>, ApiError> {
    let data: Vec<Value> = fed
        .list_models()?
        .into_iter()
        .map(|m| model_json(&m.name))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data}),
    ))
}

/// One model, by name (`GET /v1/models/{id}`).
fn model(fed: &Federation, name: &str) -> Result<Response<Body>, ApiError> {
    let m = fed.model(name)?;
    Ok(json_response(StatusCode::OK, &model_json(&m.name)))
}

/// A chat completion request; fields this API does not use are ignored.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(flatten)]
    generation: Generation,
    /// The other fields: checked against those this API cannot honour.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// What chat and text completion requests share: sampling, stopping, streaming.
#[derive(Debug, Deserialize)]
struct Generation {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
}

impl Generation {
    /// Refuses more than one choice.
    fn one_choice(&self) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only one choice (`n`: 1) is generated"));
        }
        Ok(())
    }

    /// Sampling as OpenAI's fields ask: temperature 1 and top_p 1 (all tokens) by default;
    /// without a seed, each request draws its own (a job moved after a failure keeps it).
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: None,
            top_p: self.top_p.filter(|&p| p != 1.0),
            seed: self.seed.unwrap_or_else(|| {
                u64::from_str_radix(&sovra_proto::token::random_hex(8), 16).unwrap_or(0)
            }),
        }
    }

    /// When to stop: at most `max_tokens` (`default` when absent), at a stop string, or at the
    /// end of sequence.
    fn stopping(self, max_tokens: Option<u64>, default: usize) -> Result<StopConditions, ApiError> {
        let max_tokens = max_tokens.map_or(Ok(default), |n| {
            usize::try_from(n).map_err(|_| ApiError::invalid("`max_tokens` is out of range"))
        })?;
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        Ok(StopConditions {
            max_tokens,
            stop,
            ignore_eos: false,
        })
    }

    /// How the completion is answered.
    fn answer(&self) -> Answer {
        Answer {
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        }
    }
}

/// A text completion request: the prompt goes to the model as it is (no chat layout); fields
/// this API does not use are ignored.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(flatten)]
    generation: Generation,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    suffix: Option<String>,
    /// The other fields: checked against those this API cannot honour.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// A text completion's prompt: text, or a list holding one text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<Value>),
}

impl Prompt {
    fn text(self) -> Result<String, ApiError> {
        match self {
            Prompt::One(text) => Ok(text),
            Prompt::Many(mut list) => match (list.len(), list.pop()) {
                (1, Some(Value::String(text))) => Ok(text),
                _ => Err(ApiError::invalid(
                    "`prompt` must be one text (several prompts and token arrays are not supported)",
                )),
            },
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Refuses a request that asks for what this API does not do (rather than answering as if it
/// had not been asked): tools, structured output, log-probabilities, penalties, biases.
fn refuse_unsupported(rest: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for (key, value) in rest {
        let asked = match key.as_str() {
            "tools" | "functions" | "logit_bias" => match value {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            },
            "tool_choice" | "function_call" => !(value.is_null() || value == "none"),
            "response_format" => !(value.is_null() || value["type"] == "text"),
            "logprobs" => value.as_bool().unwrap_or(!value.is_null()),
            "top_logprobs" | "audio" | "prediction" => !value.is_null(),
            "presence_penalty" | "frequency_penalty" => {
                value.as_f64().is_some_and(|v| v != 0.0) || !(value.is_null() || value.is_number())
            }
            _ => false,
        };
        if asked {
            return Err(ApiError::invalid(format!(
                "`{}` is not supported by this API",
                crate::error::shown(key, 40)
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Content,
}

/// A message's content: text, or parts of which only text parts are accepted.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Content {
    fn text(self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t),
            Content::Parts(parts) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => Ok(t),
                    (kind, _) => Err(ApiError::invalid(format!(
                        "content parts of type `{}` are not supported (text only)",
                        crate::error::shown(kind, 40)
                    ))),
                })
                .collect(),
        }
    }
}

/// The conversation as turns of the chat layout (`developer` is a system turn). What the turns
/// say is text only: the head encodes it so that nothing in it becomes a special token.
fn turns(messages: Vec<Message>) -> Result<Vec<ChatTurn>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("`messages` is empty"));
    }
    messages
        .into_iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(format!(
                        "messages of role `{}` are not supported (system, developer, user, assistant)",
                        crate::error::shown(other, 40)
                    )));
                }
            };
            Ok(ChatTurn::new(role, &m.content.text()?))
        })
        .collect()
}

/// How a completion is answered.
struct Answer {
    stream: bool,
    /// Streamed: a last chunk with the token counts.
    include_usage: bool,
}

/// The job a chat request asks for.
fn job_spec(r: ChatRequest) -> Result<(JobSpec, Answer), ApiError> {
    r.generation.one_choice()?;
    refuse_unsupported(&r.rest)?;
    let max_tokens = r.max_completion_tokens.or(r.max_tokens);
    let answer = r.generation.answer();
    let spec = JobSpec {
        model: r.model,
        // The conversation goes as turns; a head that knew no turns would see an empty prompt
        // and refuse it, not answer an empty question.
        prompt: String::new(),
        chat: false,
        system: None,
        turns: turns(r.messages)?,
        sampling: r.generation.sampling(),
        stop: r.generation.stopping(max_tokens, DEFAULT_MAX_TOKENS)?,
        policy: PolicyRecord::default(),
    };
    Ok((spec, answer))
}

/// The job a text completion request asks for.
fn text_job_spec(r: CompletionRequest) -> Result<(JobSpec, Answer), ApiError> {
    r.generation.one_choice()?;
    if r.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "only one choice (`best_of`: 1) is generated",
        ));
    }
    if r.echo {
        return Err(ApiError::invalid("`echo` is not supported by this API"));
    }
    if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("`suffix` is not supported by this API"));
    }
    refuse_unsupported(&r.rest)?;
    let answer = r.generation.answer();
    let spec = JobSpec {
        model: r.model,
        prompt: r.prompt.text()?,
        chat: false,
        system: None,
        turns: Vec::new(),
        sampling: r.generation.sampling(),
        stop: r.generation.stopping(
            r.max_completion_tokens.or(r.max_tokens),
            DEFAULT_TEXT_MAX_TOKENS,
        )?,
        policy: PolicyRecord::default(),
    };
    Ok((spec, answer))
}

/// The endpoint a completion request came to, and the shapes of its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Text,
}

impl Endpoint {
    fn id(self, job_id: &str) -> String {
        match self {
            Endpoint::Chat => format!("chatcmpl-{job_id}"),
            Endpoint::Text => format!("cmpl-{job_id}"),
        }
    }

    fn object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion",
            Endpoint::Text => "text_completion",
        }
    }

    fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Text => "text_completion",
        }
    }

    /// The one choice of a whole answer.
    fn choice(self, text: String, finish: &str) -> Value {
        match self {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }),
            Endpoint::Text => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }

    /// The choices of a streamed chunk: some text, or the finish.
    fn delta(self, text: Option<String>, finish: Option<&str>) -> Value {
        match self {
            Endpoint::Chat => {
                let delta = text.map_or_else(|| json!({}), |t| json!({"content": t}));
                json!([{"index": 0, "delta": delta, "finish_reason": finish}])
            }
            Endpoint::Text => json!([{
                "index": 0,
                "text": text.unwrap_or_default(),
                "logprobs": null,
                "finish_reason": finish,
            }]),
        }
    }
}

/// OpenAI's name for why a generation ended.
fn finish_reason(reason: &str) -> &'static str {
    match reason {
        "length" => "length",
        _ => "stop",
    }
}

async fn complete(
    fed: &Federation,
    caller: &Caller,
    bodies: &Bodies,
    req: Request<Incoming>,
    endpoint: Endpoint,
) -> Result<Response<Body>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is over {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let share = bodies.share(caller)?;
    let read = async {
        let _turn = bodies.slots.acquire().await;
        Limited::new(req.into_body(), MAX_BODY).collect().await
    };
    let body = match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not come within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => return Err(ApiError::invalid(format!("reading the request body: {e}"))),
        Ok(Ok(body)) => body.to_bytes(),
    };
    drop(share);
    let not = |what: &str, e: serde_json::Error| {
        ApiError::invalid(format!("the request is not a {what}: {e}"))
    };
    let (spec, answer) = match endpoint {
        Endpoint::Chat => {
            job_spec(serde_json::from_slice(&body).map_err(|e| not("chat completion", e))?)?
        }
        Endpoint::Text => {
            text_job_spec(serde_json::from_slice(&body).map_err(|e| not("completion", e))?)?
        }
    };
    let model = spec.model.clone();
    let (job_id, mut events) = fed.run_job(caller, spec).await?;
    let id = endpoint.id(&job_id);
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if !answer.stream {
        let mut text = String::new();
        while let Some(event) = events.recv().await {
            match event {
                JobEvent::Started { .. } => {}
                JobEvent::Token { text: t, .. } => text.push_str(&t),
                JobEvent::Summary(s) => {
                    return Ok(json_response(
                        StatusCode::OK,
                        &json!({
                            "id": id,
                            "object": endpoint.object(),
                            "created": created,
                            "model": model,
                            "choices": [endpoint.choice(text, finish_reason(&s.finish_reason))],
                            "usage": {
                                "prompt_tokens": s.prompt_tokens,
                                "completion_tokens": s.generated_tokens,
                                "total_tokens": s.prompt_tokens + s.generated_tokens,
                            },
                        }),
                    ));
                }
                JobEvent::Failed(why) | JobEvent::Cancelled(why) => {
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "api_error",
                        format!("{job_id} failed: {why}"),
                    ));
                }
            }
        }
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            format!("{job_id} ended without a summary"),
        ));
    }
    // Streamed: one chunk per token's text, then the finish, then [DONE]. A client that goes
    // away drops the body, and with it the job's events: the job is cancelled.
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut chunk = json!({
            "id": id,
            "object": endpoint.chunk_object(),
            "created": created,
            "model": model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    };
    tokio::spawn(async move {
        if endpoint == Endpoint::Chat {
            let role = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]);
            if tx.send(chunk(role, None)).await.is_err() {
                return;
            }
        }
        loop {
            // A client that goes away ends this at once (its job's events are dropped: the
            // job is cancelled), also while no token comes (a long prefill, a move).
            let event = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
                _ = tx.closed() => return,
            };
            let out = match event {
                JobEvent::Started { .. } => continue,
                JobEvent::Token { text, .. } if text.is_empty() => continue,
                JobEvent::Token { text, .. } => chunk(endpoint.delta(Some(text), None), None),
                JobEvent::Summary(s) => {
                    let finish = Some(finish_reason(&s.finish_reason));
                    let mut last = vec![chunk(endpoint.delta(None, finish), None)];
                    if answer.include_usage {
                        last.push(chunk(
                            json!([]),
                            Some(json!({
                                "prompt_tokens": s.prompt_tokens,
                                "completion_tokens": s.generated_tokens,
                                "total_tokens": s.prompt_tokens + s.generated_tokens,
                            })),
                        ));
                    }
                    last.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    for bytes in last {
                        if tx.send(bytes).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                JobEvent::Failed(why) | JobEvent::Cancelled(why) => {
                    let error = ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "api_error",
                        format!("{job_id} failed: {why}"),
                    );
                    let _ = tx
                        .send(Bytes::from(format!("data: {}\n\n", error.body())))
                        .await;
                    return;
                }
            };
            if tx.send(out).await.is_err() {
                return; // the client went away
            }
        }
    });
    let body = StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "text/event-stream")
        .header(hyper::header::CACHE_CONTROL, "no-cache")
        .body(BodyExt::boxed(body))
        .expect("a valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, text: &str) -> Message {
        Message {
            role: role.into(),
            content: Content::Text(text.into()),
        }
    }

    #[test]
    fn messages_become_turns() {
        let t = turns(vec![
            message("developer", "Be brief."),
            message("user", "Hi"),
            message("assistant", "Hello."),
        ])
        .unwrap();
        assert_eq!(
            t,
            [
                ChatTurn::new("system", "Be brief."),
                ChatTurn::new("user", "Hi"),
                ChatTurn::new("assistant", "Hello.")
            ]
        );
    }

    fn text_request(extra: Value) -> Result<(JobSpec, Answer), ApiError> {
        let mut body = json!({"model": "m", "prompt": "Once upon a time"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        text_job_spec(serde_json::from_value(body).map_err(|e| ApiError::invalid(e.to_string()))?)
    }

    #[test]
    fn text_completions_take_the_prompt_as_it_is() {
        let (spec, answer) = text_request(json!({})).unwrap();
        assert_eq!(spec.prompt, "Once upon a time");
        assert!(!spec.chat && spec.turns.is_empty() && spec.system.is_none());
        assert_eq!(spec.stop.max_tokens, DEFAULT_TEXT_MAX_TOKENS);
        assert!(!answer.stream);
        let (spec, _) =
            text_request(json!({"prompt": ["<|im_start|>user"], "stop": "\n", "max_tokens": 3}))
                .unwrap();
        assert_eq!(spec.prompt, "<|im_start|>user");
        assert_eq!(
            (spec.stop.max_tokens, spec.stop.stop.clone()),
            (3, vec!["\n".to_string()])
        );
        let (spec, _) = text_request(json!({"max_completion_tokens": 5})).unwrap();
        assert_eq!(spec.stop.max_tokens, 5);
        for refused in [
            json!({"prompt": []}),
            json!({"prompt": ["a", "b"]}),
            json!({"prompt": [[1, 2]]}),
            json!({"echo": true}),
            json!({"suffix": "x"}),
            json!({"best_of": 3}),
            json!({"n": 2}),
            json!({"logprobs": 0}),
            json!({"logit_bias": {"1": 5}}),
        ] {
            assert!(text_request(refused.clone()).is_err(), "{refused}");
        }
        // Fields at their defaults pass.
        text_request(json!({"echo": false, "suffix": null, "best_of": 1, "n": 1, "logprobs": null, "user": "u"})).unwrap();
    }

    #[test]
    fn odd_conversations_are_refused() {
        assert!(turns(vec![]).is_err());
        assert!(turns(vec![message("tool", "x")]).is_err());
        let image = Message {
            role: "user".into(),
            content: Content::Parts(vec![Part {
                kind: "image_url".into(),
                text: None,
            }]),
        };
        assert!(
            turns(vec![image])
                .unwrap_err()
                .message
                .contains("image_url")
        );
    }
}
