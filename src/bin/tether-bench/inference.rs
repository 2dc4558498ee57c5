//! Figure 9: the per-job inference proxy. The Ollama stand-in on a Unix
//! socket (as the node's backend would be reached), asked straight over
//! that socket and through `tether-agent inference-proxy` run as its own
//! process, a fresh connection per request on both sides, interleaved.

use crate::figures::{alternate, secs_ms};
use crate::procfs;
use crate::stats::{Figure, median, paired_differences};
use anyhow::{Context, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::path::Path;
use std::time::{Duration, Instant};
use tether::inference::standin;
use tokio_util::sync::CancellationToken;

/// One POST of `body` to `path` over `io`: time to the answer's first body
/// chunk and to its end.
async fn ask<T>(io: T, path: &str, body: &'static str) -> anyhow::Result<(Duration, Duration)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let t0 = Instant::now();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let resp = sender.send_request(req).await?;
    ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    let mut body = resp.into_body();
    let mut first = None;
    while let Some(f) = body.frame().await {
        if f?.data_ref().is_some_and(|d| !d.is_empty()) {
            first.get_or_insert_with(|| t0.elapsed());
        }
    }
    let total = t0.elapsed();
    drop(sender);
    let _ = conn.await;
    Ok((first.context("an empty answer")?, total))
}

/// The proxy process; killed when dropped.
struct ProxyProcess(tokio::process::Child);

pub async fn run(agent_bin: &Path, dir: &Path, rtt_n: usize) -> anyhow::Result<Vec<Figure>> {
    let sock = dir.join("inference-standin.sock");
    let _ = std::fs::remove_file(&sock);
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let listener = tokio::net::UnixListener::bind(&sock)?;
    tokio::spawn(standin::serve(
        listener,
        standin::Knobs::default(),
        stop.clone(),
    ));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut proxy = ProxyProcess(
        tokio::process::Command::new(agent_bin)
            .args(["inference-proxy", "--listen", &addr, "--backend"])
            .arg(format!("unix:{}", sock.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {} inference-proxy", agent_bin.display()))?,
    );
    let pid = proxy.0.id().context("the proxy's pid")?;
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "the proxy never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_kib = procfs::rss_kib(pid)?;
    let side = |side: usize, body: &'static str| {
        let (sock, addr) = (sock.clone(), addr.clone());
        async move {
            if side == 0 {
                let s = tokio::net::TcpStream::connect(&addr).await?;
                s.set_nodelay(true)?;
                ask(s, "/api/generate", body).await
            } else {
                ask(
                    tokio::net::UnixStream::connect(&sock).await?,
                    "/api/generate",
                    body,
                )
                .await
            }
        }
    };
    let whole = r#"{"model":"standin:latest","prompt":"hi","stream":false}"#;
    let streamed = r#"{"model":"standin:latest","prompt":"hi"}"#;
    for s in 0..2 {
        for _ in 0..10 {
            side(s, whole).await?;
        }
    }
    let ([tr, dr], _) = alternate(
        rtt_n,
        || async { Ok(()) },
        |s| async move { Ok(secs_ms(side(s, whole).await?.1)) },
    )
    .await?;
    let ([tf, df], _) = alternate(
        rtt_n,
        || async { Ok(()) },
        |s| async move { Ok(secs_ms(side(s, streamed).await?.0)) },
    )
    .await?;
    let busy_kib = procfs::hwm_kib(pid)?;
    // What each job's proxy holds for itself: the binary's pages are the
    // agent image's file, shared by every proxy on the node.
    let anon_kib = procfs::status_kib(pid, "RssAnon")?;
    let _ = proxy.0.start_kill();
    let mb = |kib: u64| Some(kib as f64 / 1024.0);
    Ok(vec![
        Figure::new("inference_rtt_p50_ms", "ms", median(&tr), median(&dr)),
        Figure::solo(
            "inference_rtt_added_ms",
            "ms",
            median(&paired_differences(&tr, &dr)),
        ),
        Figure::new(
            "inference_first_chunk_p50_ms",
            "ms",
            median(&tf),
            median(&df),
        ),
        Figure::solo(
            "inference_first_chunk_added_ms",
            "ms",
            median(&paired_differences(&tf, &df)),
        ),
        Figure::solo("inference_proxy_idle_rss_mb", "MB", mb(idle_kib)),
        Figure::solo("inference_proxy_peak_rss_mb", "MB", mb(busy_kib)),
        Figure::solo("inference_proxy_anon_mb", "MB", mb(anon_kib)),
    ])
}
