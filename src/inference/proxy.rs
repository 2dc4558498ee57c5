//! The per-job inference proxy (`tether-agent inference-proxy`, hidden):
//! listens where the job expects Ollama (`localhost:11434` inside the
//! job's network namespace) and passes each request to the node's backend
//! over a path the job does not share (a Unix socket, or an address only
//! the proxy reaches).
//!
//! What it enforces, whatever the job sends: a request body over the limit
//! is `413`; a request that runs past the timeout is `504` (or, when its
//! answer is already streaming, cut); `503` while the backend cannot be
//! reached; at most `max_concurrency` requests at the backend at once (the
//! others wait, within their timeout). Answers stream through as the
//! backend produces them: nothing is buffered whole. It holds no
//! credential and adds none. Every error is a JSON body `{"error": "..."}`,
//! the shape Ollama's own errors have.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where Ollama clients look by default.
pub const PORT: u16 = 11434;
/// Default largest request body.
pub const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;
/// Default longest request, answer included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How the proxy reaches the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::str::FromStr for Backend {
    type Err = String;
    /// `unix:/path` or `HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(p) if p.starts_with('/') => Ok(Backend::Unix(p.into())),
            Some(_) => Err(format!("{s:?}: a unix backend needs an absolute path")),
            None => s
                .parse()
                .map(Backend::Tcp)
                .map_err(|_| format!("{s:?}: expected unix:/path or IP:PORT")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub backend: Backend,
    pub max_body: u64,
    pub timeout: Duration,
    /// Requests at the backend at once; `None`: no bound.
    pub max_concurrency: Option<usize>,
}

impl Config {
    pub fn new(backend: Backend) -> Config {
        Config {
            backend,
            max_body: DEFAULT_MAX_BODY,
            timeout: DEFAULT_TIMEOUT,
            max_concurrency: None,
        }
    }
}

/// What the proxy has carried.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    /// Requests answered with an error of the proxy's own (413, 503, 504).
    pub refused: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

type Body = BoxBody<Bytes, BoxError>;

fn json_error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    let body = serde_json::json!({ "error": message.to_string() }).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())
        .expect("a valid response")
}

struct Proxy {
    cfg: Config,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    counters: Arc<Counters>,
}

/// Serves on `listener` until `stop`, then lets requests in flight finish.
pub async fn serve(
    listener: impl super::Listener,
    cfg: Config,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let proxy = Arc::new(Proxy {
        gate: cfg
            .max_concurrency
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
        cfg,
        counters,
    });
    super::serve_http(
        listener,
        Arc::new(move |req| {
            let proxy = proxy.clone();
            async move { proxy.handle(req).await }
        }),
        stop,
    )
    .await
}

impl Proxy {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        match tokio::time::timeout_at(deadline, self.forward(req, deadline)).await {
            Ok(Ok(r)) => r,
            Ok(Err(refusal)) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                refusal
            }
            Err(_) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                json_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the inference backend did not answer within {} s",
                        self.cfg.timeout.as_secs_f64()
                    ),
                )
            }
        }
    }

    /// The backend's answer, or the proxy's own refusal.
    async fn forward(
        &self,
        req: Request<Incoming>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Body>, Response<Body>> {
        if !open_to_jobs(req.method(), req.uri().path()) {
            return Err(json_error(
                StatusCode::FORBIDDEN,
                format!(
                    "{} {} is not open to jobs (they may list, show and use models: {})",
                    req.method(),
                    req.uri().path(),
                    JOB_API
                ),
            ));
        }
        let max = self.cfg.max_body;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(too_large(max));
        }
        // Held until the answer's last byte: the bound is on whole exchanges.
        let turn = match &self.gate {
            Some(g) => Some(
                g.clone()
                    .acquire_owned()
                    .await
                    .expect("the gate is never closed"),
            ),
            None => None,
        };
        // The body is read whole before the backend sees the request, so an
        // oversized one (chunked, undeclared) is refused before anything
        // reaches the backend; it is at most `max_body`.
        let (mut parts, body) = req.into_parts();
        let body = match Limited::new(body, max as usize).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return Err(too_large(max));
            }
            Err(e) => {
                return Err(json_error(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request: {e}"),
                ));
            }
        };
        self.counters
            .bytes_in
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let body = shared_use_only(&parts.method, parts.uri.path(), body)
            .map_err(|why| json_error(StatusCode::BAD_REQUEST, why))?;
        parts
            .headers
            .insert(header::CONTENT_LENGTH, body.len().into());
        let (mut sender, upstream) = match self.connect().await {
            Ok(s) => s,
            Err(e) => {
                return Err(json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the inference backend is unavailable: {e}"),
                ));
            }
        };
        // From here the exchange holds the backend until its lease ends.
        let lease = Lease::new(turn, upstream, deadline);
        let mut req = Request::from_parts(parts, Full::new(body));
        // The backend sees the proxy's own connection, not the job's.
        req.headers_mut().remove(header::CONNECTION);
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                return Err(json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the inference backend failed: {e}"),
                ));
            }
        };
        let counters = self.counters.clone();
        Ok(resp.map(move |b| {
            Deadline {
                inner: b,
                at: Box::pin(tokio::time::sleep_until(deadline)),
                _lease: lease,
            }
            .map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    counters
                        .bytes_out
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                f
            })
            .boxed()
        }))
    }

    /// A connection to the backend for one exchange, and the handle that
    /// closes it.
    async fn connect(&self) -> std::io::Result<(Sender, tokio::task::AbortHandle)> {
        async fn handshake<T>(io: T) -> std::io::Result<(Sender, tokio::task::AbortHandle)>
        where
            T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(std::io::Error::other)?;
            // Ends with the exchange: the connection is this request's.
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok((sender, task.abort_handle()))
        }
        match &self.cfg.backend {
            Backend::Unix(p) => handshake(tokio::net::UnixStream::connect(p).await?).await,
            Backend::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                let _ = s.set_nodelay(true);
                handshake(s).await
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// What an exchange holds of the backend: its place under
/// `max_concurrency` and its connection. Both are let go at the end of the
/// answer, or at the deadline whatever the reader does: hyper polls an
/// answer's body only as the client takes it in, so a deadline checked in
/// the body alone never comes for a client that stops reading, and it
/// would keep the node's backend (and every other job's turn) for ever.
struct Lease {
    turn: std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    upstream: tokio::task::AbortHandle,
    timer: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

impl Lease {
    fn new(
        turn: Option<tokio::sync::OwnedSemaphorePermit>,
        upstream: tokio::task::AbortHandle,
        deadline: tokio::time::Instant,
    ) -> Arc<Lease> {
        let lease = Arc::new(Lease {
            turn: std::sync::Mutex::new(turn),
            upstream,
            timer: Default::default(),
        });
        let weak = Arc::downgrade(&lease);
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(l) = weak.upgrade() {
                l.end();
            }
        });
        *lease.timer.lock().unwrap() = Some(timer.abort_handle());
        lease
    }

    /// Gives back the turn and closes the backend connection (which ends
    /// the answer's stream with an error if it had not ended).
    fn end(&self) {
        drop(self.turn.lock().unwrap().take());
        self.upstream.abort();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.end();
        if let Some(t) = self.timer.lock().unwrap().take() {
            t.abort();
        }
    }
}

/// An answer's body that fails at the request's deadline: a stream that
/// runs past the timeout is cut (its status was sent long ago).
struct Deadline<B> {
    inner: B,
    at: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The exchange's hold on the backend, let go at the end.
    _lease: Arc<Lease>,
}

impl<B> hyper::body::Body for Deadline<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.at.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Some(Err(
                "the request ran past the proxy's timeout".into()
            )));
        }
        std::pin::Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// What a job may ask of the node's backend, as said in refusals.
const JOB_API: &str = "GET /, /api/tags, /api/version, /api/ps, /v1/models; POST /api/show, /api/generate, /api/chat, /api/embed, /api/embeddings, /v1/chat/completions, /v1/completions, /v1/embeddings";

/// Whether a job may make this request of the backend: using and listing
/// models, not managing them. `pull`/`push` would reach any registry (a
/// way out for a job whose network policy is `none`), `delete`, `copy`,
/// `create` and blob uploads would change or fill what every job shares.
fn open_to_jobs(method: &hyper::Method, path: &str) -> bool {
    use hyper::Method;
    let path = path.trim_end_matches('/');
    match *method {
        Method::GET | Method::HEAD => {
            matches!(
                path,
                "" | "/api/tags" | "/api/version" | "/api/ps" | "/v1/models"
            ) || path
                .strip_prefix("/v1/models/")
                .is_some_and(|m| !m.is_empty())
        }
        Method::POST => matches!(
            path,
            "/api/show"
                | "/api/generate"
                | "/api/chat"
                | "/api/embed"
                | "/api/embeddings"
                | "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/embeddings"
        ),
        _ => false,
    }
}

/// The sampling options a job may set; the others (`num_ctx`, `num_gpu`,
/// `num_batch`, `main_gpu`, `use_mmap`, …) change how a model is loaded,
/// which reloads it for every job that shares it.
const JOB_OPTIONS: &[&str] = &[
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "tfs_z",
    "repeat_last_n",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalize_newline",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "seed",
    "stop",
    "num_predict",
    "num_keep",
];

/// A key as Go's `encoding/json` (Ollama's) matches it: without regard to
/// case, the Kelvin sign folded to `k` and the long s to `s`.
fn folded(key: &str) -> String {
    key.chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c == 'ſ' { 's' } else { c })
        .collect()
}

/// A `POST` body of Ollama's own API (`/api/…`) without what would manage
/// the backend every job shares: `keep_alive` (0 unloads a model other
/// jobs use, -1 pins one in memory for ever) and the options that reload
/// a model, under any spelling the backend would read as theirs. The body
/// must be exactly one JSON object: the backend reads the first value of
/// a body and ignores what follows, which the proxy must not let pass
/// unread.
pub(super) fn shared_use_only(
    method: &hyper::Method,
    path: &str,
    body: Bytes,
) -> Result<Bytes, String> {
    if method != hyper::Method::POST || !path.starts_with("/api/") {
        return Ok(body);
    }
    let Ok(serde_json::Value::Object(mut ask)) = serde_json::from_slice(&body) else {
        return Err("the request body must be one JSON object".into());
    };
    let before = ask.len();
    ask.retain(|k, _| folded(k) != "keep_alive");
    let mut changed = ask.len() != before;
    for (k, v) in ask.iter_mut() {
        if folded(k) != "options" {
            continue;
        }
        if let serde_json::Value::Object(options) = v {
            let before = options.len();
            options.retain(|k, _| JOB_OPTIONS.contains(&folded(k).as_str()));
            changed |= options.len() != before;
        }
    }
    if !changed {
        return Ok(body);
    }
    Ok(Bytes::from(
        serde_json::to_vec(&ask).expect("a JSON object serializes"),
    ))
}

fn too_large(max: u64) -> Response<Body> {
    json_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is over the node's limit of {max} bytes"),
    )
}
