//! The server's HTTP/WebSocket API as `tether ctl` uses it: the `*_api_*`
//! figures. The client runs on a runtime of its own, on a thread of its
//! own, as `tether ctl` runs in a process of its own: it does not share the
//! server's workers. Each call is timed there, from its start to its end.

use crate::direct::{self, Ran};
use crate::setup::RuntimeThread;
use anyhow::{Context, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tether::server::ExecOptions;
use tokio_tungstenite::tungstenite::{Message as WsMessage, client::IntoClientRequest};

/// Output is acknowledged every this many bytes, as `tether ctl exec` does.
const ACK_EVERY: u64 = 64 * 1024;

pub struct ApiClient {
    rt: RuntimeThread,
    /// Base URL of the server (`http://127.0.0.1:PORT`).
    url: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// Starts the client on a runtime of its own, one thread.
    pub fn start(url: String, token: String) -> anyhow::Result<ApiClient> {
        Ok(ApiClient {
            rt: RuntimeThread::start("api-client")?,
            url,
            token,
            http: tether::http_client(),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<(Duration, T)> {
        let timed = async move {
            let t0 = Instant::now();
            let r = f.await?;
            Ok((t0.elapsed(), r))
        };
        self.rt
            .handle
            .spawn(timed)
            .await
            .context("the API client's task failed")?
    }

    /// `tether ctl exec WORKER -- CMD`: a WebSocket of its own, the
    /// options, the output (acknowledged), the exit.
    pub async fn exec(&self, worker: &str, cmd: &[String]) -> anyhow::Result<(Duration, Ran)> {
        let url = format!("{}/api/v1/workers/{worker}/exec", self.url);
        let mut req = url.replacen("http", "ws", 1).into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        let opts = ExecOptions {
            cmd: cmd.to_vec(),
            client_acks: true,
            ..Default::default()
        };
        self.run(async move {
            // Without Nagle's algorithm, as `tether ctl` connects.
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true).await?;
            ws.send(WsMessage::text(serde_json::to_string(&opts)?))
                .await?;
            let (mut bytes, mut acked) = (0u64, 0u64);
            while let Some(m) = ws.next().await {
                match m? {
                    // A stream-kind byte, then the data.
                    WsMessage::Binary(b) if !b.is_empty() => {
                        bytes += b.len() as u64 - 1;
                        if bytes - acked >= ACK_EVERY {
                            let ack = serde_json::json!({"type": "ack", "offset": bytes});
                            ws.send(WsMessage::text(ack.to_string())).await?;
                            acked = bytes;
                        }
                    }
                    WsMessage::Text(t) => {
                        let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                        match v["type"].as_str() {
                            Some("exit") => {
                                let exit = v["exit_code"].as_i64().unwrap_or(-1);
                                return Ok(Ran { exit, bytes });
                            }
                            Some("error") => bail!("exec over the API: {}", v["error"]),
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
            bail!("exec over the API: the connection closed before the exit")
        })
        .await
    }

    fn archive_url(&self, worker: &str, path: &str) -> String {
        format!("{}/api/v1/workers/{worker}/archive?path={path}", self.url)
    }

    /// `tether ctl cp FILE WORKER:DIR`: a tar of one file of `size` zeros
    /// named `name`, streamed into `dir`.
    pub async fn put(
        &self,
        worker: &str,
        dir: &str,
        name: &str,
        size: u64,
    ) -> anyhow::Result<Duration> {
        let chunks = direct::tar_chunks(name, size).map(Ok::<_, std::io::Error>);
        let req = (self.http)
            .put(self.archive_url(worker, dir))
            .bearer_auth(&self.token)
            .header("content-type", "application/x-tar")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )));
        let (dt, ()) = self
            .run(async move {
                let r = req.send().await?;
                let status = r.status();
                ensure!(status.is_success(), "HTTP {status}: {}", r.text().await?);
                Ok(())
            })
            .await?;
        Ok(dt)
    }

    /// `tether ctl cp WORKER:PATH ...`: the tar of `path`, read to the end.
    /// Returns its length.
    pub async fn get(&self, worker: &str, path: &str) -> anyhow::Result<(Duration, u64)> {
        let req = (self.http)
            .get(self.archive_url(worker, path))
            .bearer_auth(&self.token);
        self.run(async move {
            let r = req.send().await?;
            let status = r.status();
            ensure!(status.is_success(), "HTTP {status}: {}", r.text().await?);
            let mut body = r.bytes_stream();
            let mut n = 0u64;
            while let Some(b) = body.next().await {
                n += b?.len() as u64;
            }
            Ok(n)
        })
        .await
    }

    /// A GET through the path-based preview with the operator token, the
    /// whole body read: its time and body size.
    pub async fn preview_get(
        &self,
        worker: &str,
        port: u16,
        path: &str,
    ) -> anyhow::Result<(Duration, u64)> {
        let url = format!("{}/api/v1/workers/{worker}/ports/{port}{path}", self.url);
        self.http_get(url, true).await
    }

    /// A GET of `url`, straight (no token) unless `auth`.
    pub async fn http_get(&self, url: String, auth: bool) -> anyhow::Result<(Duration, u64)> {
        let mut rb = self.http.get(url);
        if auth {
            rb = rb.bearer_auth(&self.token);
        }
        self.run(async move {
            let r = rb.send().await?;
            ensure!(r.status().is_success(), "GET: HTTP {}", r.status());
            Ok(r.bytes().await?.len() as u64)
        })
        .await
    }
}
