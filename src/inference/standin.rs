//! A stand-in for Ollama, for tests and benchmarks where no model can run:
//! `/api/version`, `/api/tags`, `/api/pull`, and `/api/generate` and
//! `/api/chat` answering in NDJSON chunks the way Ollama streams them (one
//! JSON object per line, the last with `"done": true`), or whole with
//! `"stream": false`. Knobs: how many tokens an answer has, the pause
//! before each, and failing every generation.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode, header};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Knobs {
    /// Tokens in each answer.
    pub tokens: usize,
    /// Pause before each token.
    pub token_delay: Duration,
    /// Every generation answers 500.
    pub fail: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            tokens: 8,
            token_delay: Duration::from_millis(0),
            fail: false,
        }
    }
}

/// The one model it knows.
pub const MODEL: &str = "standin:latest";

type Body = BoxBody<Bytes, std::convert::Infallible>;

fn json_response(status: StatusCode, v: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("a valid response")
}

/// Serves on `listener` until `stop`, then lets requests in flight finish.
pub async fn serve(listener: impl super::Listener, knobs: Knobs, stop: CancellationToken) {
    let knobs = Arc::new(knobs);
    super::serve_http(
        listener,
        Arc::new(move |req| {
            let knobs = knobs.clone();
            async move { handle(req, &knobs).await }
        }),
        stop,
    )
    .await
}

async fn handle(req: Request<Incoming>, knobs: &Knobs) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let ask: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (method.as_str(), path.as_str()) {
        ("GET", "/api/version") => {
            json_response(StatusCode::OK, json!({"version": "0.0.0-standin"}))
        }
        ("GET", "/api/tags") => json_response(
            StatusCode::OK,
            json!({"models": [{"name": MODEL, "model": MODEL, "size": 0, "digest": "standin"}]}),
        ),
        // Only its own model exists, as Ollama answers for an unknown one.
        ("POST", "/api/pull") => match ask["model"].as_str().or(ask["name"].as_str()) {
            Some(MODEL) | Some("standin") => {
                json_response(StatusCode::OK, json!({"status": "success"}))
            }
            _ => json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "pull model manifest: file does not exist"}),
            ),
        },
        ("POST", "/api/generate") | ("POST", "/api/chat") => {
            if knobs.fail {
                return json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "the stand-in was told to fail"}),
                );
            }
            generate(path == "/api/chat", &ask, knobs)
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}

/// One chunk of an answer, shaped as Ollama shapes it.
fn chunk(chat: bool, text: &str, done: bool) -> Value {
    let mut v = if chat {
        json!({"model": MODEL, "message": {"role": "assistant", "content": text}, "done": done})
    } else {
        json!({"model": MODEL, "response": text, "done": done})
    };
    v["created_at"] =
        json!(humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string());
    if done {
        v["done_reason"] = json!("stop");
    }
    v
}

fn generate(chat: bool, ask: &Value, knobs: &Knobs) -> Response<Body> {
    let stream = ask.get("stream").and_then(Value::as_bool).unwrap_or(true);
    let tokens = knobs.tokens;
    let delay = knobs.token_delay;
    if !stream {
        // Whole, once every token is made.
        let text: String = (0..tokens).map(|i| format!("t{i} ")).collect();
        let whole = chunk(chat, &text, true).to_string();
        let once = futures_util::stream::once(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay * tokens as u32).await;
            }
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(whole)))
        });
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
            .body(BodyExt::boxed(StreamBody::new(once)))
            .expect("a valid response");
    }
    let lines = futures_util::stream::unfold(0usize, move |i| async move {
        if i > tokens {
            return None;
        }
        if i < tokens && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let v = if i < tokens {
            chunk(chat, &format!("t{i} "), false)
        } else {
            chunk(chat, "", true)
        };
        let mut line = v.to_string();
        line.push('\n');
        Some((
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(line))),
            i + 1,
        ))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(BodyExt::boxed(StreamBody::new(lines)))
        .expect("a valid response")
}
