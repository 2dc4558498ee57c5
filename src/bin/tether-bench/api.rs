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

    /// JSON-RPC to `/mcp` as an MCP client sends it; the answer's body.
    async fn mcp_post(
        http: &reqwest::Client,
        url: &str,
        token: &str,
        session: Option<&str>,
        body: serde_json::Value,
    ) -> anyhow::Result<(Option<String>, serde_json::Value)> {
        let mut rb = http
            .post(url)
            .bearer_auth(token)
            .header("Accept", "application/json, text/event-stream")
            .json(&body);
        if let Some(s) = session {
            rb = rb.header("mcp-session-id", s);
        }
        let r = rb.send().await?;
        ensure!(r.status().is_success(), "MCP: HTTP {}", r.status());
        let session = r
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let text = r.text().await?;
        // JSON, or an event stream whose data line holds it.
        let json = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("data:")
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
            })
            .unwrap_or(text.trim());
        let v = if json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(json).context("an MCP answer as JSON")?
        };
        Ok((session, v))
    }

    /// Opens an MCP session: `initialize`, then `notifications/initialized`.
    pub async fn mcp_session(&self) -> anyhow::Result<String> {
        let (http, url, token) = (
            self.http.clone(),
            format!("{}/mcp", self.url),
            self.token.clone(),
        );
        let (_, session) = self
            .run(async move {
                let init = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "tether-bench", "version": "1"}}});
                let (session, _) = Self::mcp_post(&http, &url, &token, None, init).await?;
                let session = session.context("no MCP session id")?;
                let note = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
                Self::mcp_post(&http, &url, &token, Some(&session), note).await?;
                Ok(session)
            })
            .await?;
        Ok(session)
    }

    /// One MCP tool call; its structured result.
    pub async fn mcp_call(
        &self,
        session: &str,
        tool: &str,
        args: serde_json::Value,
    ) -> anyhow::Result<(Duration, serde_json::Value)> {
        let (http, url, token) = (
            self.http.clone(),
            format!("{}/mcp", self.url),
            self.token.clone(),
        );
        let session = session.to_string();
        let tool = tool.to_string();
        self.run(async move {
            let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": tool, "arguments": args}});
            let (_, v) = Self::mcp_post(&http, &url, &token, Some(&session), body).await?;
            let r = &v["result"];
            ensure!(r["isError"] != true, "{tool}: {}", r["content"][0]["text"]);
            Ok(r["structuredContent"].clone())
        })
        .await
    }

    /// Puts a node on the MCP allowlist.
    pub async fn mcp_allow(&self, node: &str) -> anyhow::Result<()> {
        let rb = self
            .http
            .put(format!("{}/api/v1/mcp/nodes/{node}", self.url))
            .bearer_auth(&self.token);
        self.run(async move {
            let r = rb.send().await?;
            ensure!(r.status().is_success(), "allow: HTTP {}", r.status());
            Ok(())
        })
        .await
        .map(|_| ())
    }
}
