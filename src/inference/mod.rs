//! Node-local inference: the per-job proxy a sandbox reaches on
//! `localhost:11434` ([`proxy`]) and an Ollama stand-in for tests and
//! benchmarks ([`standin`]).

pub mod proxy;
pub mod standin;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A listener an HTTP server here accepts on (TCP or a Unix socket).
pub trait Listener: Send + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_io(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        let (s, _) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Connections served at once by one proxy (a job's or the gateway);
/// the gateway's memory (64 MiB) must hold every one's request head.
const MAX_CONNECTIONS: usize = 256;
/// Largest request head, in bytes.
const MAX_HEAD: usize = 64 * 1024;

/// Serves HTTP/1.1 on `listener` with `handle` until `stop`, then lets the
/// exchanges in flight finish.
async fn serve_http<H, F, B>(listener: impl Listener, handle: Arc<H>, stop: CancellationToken)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tasks = TaskTracker::new();
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Accept failures (out of descriptors: a job holding many connections)
    // are logged at most every 10 s, with how many there were.
    let (mut failed, mut warned) = (0u64, None::<tokio::time::Instant>);
    loop {
        // Connections beyond the bound wait in the listen queue.
        let place = tokio::select! {
            _ = stop.cancelled() => break,
            p = open.clone().acquire_owned() => p.expect("the bound is never closed"),
        };
        let io = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept_io() => match r {
                Ok(io) => io,
                Err(e) => {
                    failed += 1;
                    if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(error = %e, failures = failed, "accept failed");
                        (failed, warned) = (0, Some(tokio::time::Instant::now()));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tasks.spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |req| {
                let answer = handle(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            // A client that half-closes after its request (`nc`, curl with
            // HTTP/1.0) still gets its answer. A request head is at most
            // 64 KiB (hyper's default buffer lets one hold ~400 KiB).
            // A head must come whole within 30 s, an idle kept-alive
            // connection's next one included, so idle connections do not
            // keep places.
            let _ = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .max_header_size(MAX_HEAD)
                .serve_connection(TokioIo::new(io), service)
                .await;
        });
    }
    tasks.close();
    tasks.wait().await;
}

#[cfg(test)]
mod tests {
    use super::proxy::{self, Backend, Config, Counters};
    use super::standin::{self, Knobs};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    use tokio_util::sync::CancellationToken;

    struct Rig {
        url: String,
        counters: Arc<Counters>,
        stop: CancellationToken,
        _dir: tempfile::TempDir,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    /// A stand-in behind a Unix socket (or none, `knobs: None`) and a proxy
    /// in front of it.
    async fn rig(knobs: Option<Knobs>, tweak: impl FnOnce(&mut Config)) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("backend.sock");
        let stop = CancellationToken::new();
        if let Some(k) = knobs {
            let l = tokio::net::UnixListener::bind(&sock).unwrap();
            tokio::spawn(standin::serve(l, k, stop.clone()));
        }
        let mut cfg = Config::new(Backend::Unix(sock));
        tweak(&mut cfg);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let counters = Arc::new(Counters::default());
        tokio::spawn(proxy::serve(l, cfg, counters.clone(), stop.clone()));
        Rig {
            url,
            counters,
            stop,
            _dir: dir,
        }
    }

    fn http() -> reqwest::Client {
        crate::init_crypto();
        crate::http_client()
    }

    async fn error_of(r: reqwest::Response) -> (u16, String) {
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        (status, v["error"].as_str().unwrap_or_default().to_string())
    }

    /// `nc` sends its request and half-closes: the answer, which takes the
    /// backend a while, still comes back whole.
    #[tokio::test]
    async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let knobs = Knobs {
            tokens: 3,
            token_delay: Duration::from_millis(100),
            ..Default::default()
        };
        let r = rig(Some(knobs), |_| {}).await;
        let addr = r.url.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = format!(r#"{{"model":"{}","prompt":"hi"}}"#, standin::MODEL);
        let req = format!(
            "POST /api/generate HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        assert!(answer.contains(r#""done":true"#), "{answer}");
    }

    #[tokio::test]
    async fn requests_pass_and_streams_arrive_chunk_by_chunk() {
        let knobs = Knobs {
            tokens: 5,
            token_delay: Duration::from_millis(150),
            ..Default::default()
        };
        let r = rig(Some(knobs), |_| {}).await;
        let tags: serde_json::Value = http()
            .get(format!("{}/api/tags", r.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(tags["models"][0]["name"], standin::MODEL);

        let t0 = Instant::now();
        let mut resp = http()
            .post(format!("{}/api/generate", r.url))
            .json(&serde_json::json!({"model": standin::MODEL, "prompt": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut arrivals = Vec::new();
        let mut text = Vec::new();
        while let Some(c) = resp.chunk().await.unwrap() {
            arrivals.push(t0.elapsed());
            text.extend_from_slice(&c);
        }
        let lines: Vec<serde_json::Value> = String::from_utf8(text)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[5]["done"], true);
        // Not buffered: the first token came long before the last.
        assert!(arrivals.len() >= 5, "{arrivals:?}");
        assert!(
            arrivals[arrivals.len() - 1] - arrivals[0] >= Duration::from_millis(450),
            "the chunks arrived together: {arrivals:?}"
        );
        assert!(r.counters.requests.load(Ordering::Relaxed) >= 2);
        assert!(r.counters.bytes_out.load(Ordering::Relaxed) > 0);
        assert_eq!(r.counters.refused.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused_declared_or_not() {
        let r = rig(Some(Knobs::default()), |c| c.max_body = 1024).await;
        let (status, msg) = error_of(
            http()
                .post(format!("{}/api/generate", r.url))
                .body(vec![b'x'; 2048])
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 413);
        assert!(msg.contains("1024"), "{msg}");
        // Chunked, with no length declared.
        let chunks = futures_util::stream::iter(
            (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 512]))),
        );
        let (status, _) = error_of(
            http()
                .post(format!("{}/api/generate", r.url))
                .body(reqwest::Body::wrap_stream(chunks))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 413);
        // Under the limit: through.
        let ok = http()
            .post(format!("{}/api/generate", r.url))
            .json(&serde_json::json!({"prompt": "x", "stream": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(r.counters.refused.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_slow_backend_times_out_and_a_missing_one_is_unavailable() {
        let slow = Knobs {
            tokens: 3,
            token_delay: Duration::from_millis(400),
            ..Default::default()
        };
        let r = rig(Some(slow), |c| c.timeout = Duration::from_millis(300)).await;
        // The whole answer takes 1.2 s: the proxy gives up at 0.3 s. Its
        // status was sent at once, so the body is what is cut.
        let whole = http()
            .post(format!("{}/api/generate", r.url))
            .json(&serde_json::json!({"prompt": "x", "stream": false}))
            .send()
            .await
            .unwrap();
        assert!(
            whole.bytes().await.is_err(),
            "a whole answer past the timeout must be cut"
        );
        // A streamed one is cut after its first chunks.
        let mut resp = http()
            .post(format!("{}/api/generate", r.url))
            .json(&serde_json::json!({"prompt": "x"}))
            .send()
            .await
            .unwrap();
        let mut cut = false;
        loop {
            match resp.chunk().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
        assert!(cut, "a stream past the timeout must be cut");

        let down = rig(None, |_| {}).await;
        let (status, msg) = error_of(
            http()
                .get(format!("{}/api/tags", down.url))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 503);
        assert!(msg.contains("unavailable"), "{msg}");
    }

    #[tokio::test]
    async fn a_backend_that_never_answers_is_a_gateway_timeout() {
        // A backend that accepts and says nothing.
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("mute.sock");
        let mute = tokio::net::UnixListener::bind(&sock).unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = mute.accept().await {
                conns.push(s);
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let mut cfg = Config::new(Backend::Unix(sock));
        cfg.timeout = Duration::from_millis(300);
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        tokio::spawn(proxy::serve(l, cfg, counters.clone(), stop.clone()));
        let t0 = Instant::now();
        let (status, _) =
            error_of(http().get(format!("{url}/api/tags")).send().await.unwrap()).await;
        assert_eq!(status, 504);
        assert!(t0.elapsed() < Duration::from_secs(3));
        stop.cancel();
        held.abort();
    }

    #[tokio::test]
    async fn concurrency_is_bounded() {
        let knobs = Knobs {
            tokens: 2,
            token_delay: Duration::from_millis(200),
            ..Default::default()
        };
        let r = rig(Some(knobs), |c| c.max_concurrency = Some(1)).await;
        let t0 = Instant::now();
        let one = || async {
            http()
                .post(format!("{}/api/generate", r.url))
                .json(&serde_json::json!({"prompt": "x"}))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        };
        let (a, b) = tokio::join!(one(), one());
        assert!(!a.is_empty() && !b.is_empty());
        // Two answers of 400 ms each, one after the other.
        assert!(
            t0.elapsed() >= Duration::from_millis(780),
            "ran side by side: {:?}",
            t0.elapsed()
        );
    }

    /// A client that asks for a long answer and stops reading it holds the
    /// backend only until its deadline: hyper stops polling a body whose
    /// reader does not read, so the deadline cannot wait for the body.
    #[tokio::test]
    async fn a_client_that_stops_reading_gives_the_backend_back_at_its_deadline() {
        use tokio::io::AsyncWriteExt;
        let knobs = Knobs {
            tokens: 50_000_000,
            ..Default::default()
        };
        let r = rig(Some(knobs), |c| {
            c.max_concurrency = Some(1);
            c.timeout = Duration::from_secs(3);
        })
        .await;
        let addr = r.url.trim_start_matches("http://").to_string();
        let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let body = r#"{"prompt":"x"}"#;
        stalled
            .write_all(
                format!(
                    "POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        // Its answer fills the socket buffers and stops; it holds the turn.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(r.counters.requests.load(Ordering::Relaxed), 1);
        // Another request waits for the turn, and gets it once the stalled
        // one's deadline has passed, well within its own.
        let t0 = Instant::now();
        let next = http()
            .get(format!("{}/api/version", r.url))
            .send()
            .await
            .unwrap();
        assert_eq!(next.status(), 200, "after {:?}", t0.elapsed());
        drop(stalled);
    }

    #[tokio::test]
    async fn a_request_head_over_64_kib_is_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let r = rig(Some(Knobs::default()), |_| {}).await;
        let addr = r.url.trim_start_matches("http://").to_string();
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "GET /api/version HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100_000)
        );
        let _ = c.write_all(head.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }

    #[test]
    fn a_job_cannot_unload_pin_or_reload_the_shared_models() {
        let post = hyper::Method::POST;
        let pass = |path: &str, body: &str| {
            proxy::shared_use_only(&post, path, bytes::Bytes::from(body.to_string()))
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
        };
        let v: serde_json::Value = serde_json::from_str(
            &pass(
                "/api/generate",
                r#"{"model":"m","prompt":"p","keep_alive":0,"options":{"temperature":0.2,"num_ctx":131072,"num_gpu":0}}"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"model":"m","prompt":"p","options":{"temperature":0.2}})
        );
        // Every spelling Go's decoder would take for the field: any case,
        // the Kelvin sign for `k`, the long s for `s`.
        for body in [
            r#"{"model":"m","KEEP_ALIVE":-1}"#,
            "{\"model\":\"m\",\"\u{212A}eep_alive\":0}",
            r#"{"model":"m","Options":{"NUM_CTX":9}}"#,
            "{\"model\":\"m\",\"option\u{17F}\":{\"num_ctx\":9}}",
        ] {
            let out = pass("/api/chat", body).unwrap();
            assert!(
                !out.to_lowercase().contains("alive") && !out.contains("9"),
                "{body} -> {out}"
            );
        }
        // The backend reads the first value and ignores the rest: a body
        // that is not exactly one object is refused, not passed on unread.
        for body in [r#"{"keep_alive":0} x"#, "not json", "", "[1]"] {
            assert!(pass("/api/generate", body).is_err(), "{body:?}");
        }
        // What has nothing to take out passes byte for byte.
        let plain = r#"{"model":"m",  "prompt":"p"}"#;
        assert_eq!(pass("/api/generate", plain).unwrap(), plain);
        // Only Ollama's own API's POST bodies are read.
        assert_eq!(pass("/v1/chat/completions", "x").unwrap(), "x");
    }

    #[test]
    fn backends_parse() {
        assert_eq!(
            "unix:/run/x.sock".parse::<Backend>(),
            Ok(Backend::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:11434".parse::<Backend>(),
            Ok(Backend::Tcp("127.0.0.1:11434".parse().unwrap()))
        );
        assert!("unix:rel".parse::<Backend>().is_err());
        assert!("nonsense".parse::<Backend>().is_err());
    }
}
