//! An MCP client through the official SDK's client (`rmcp`, Streamable
//! HTTP), as an AI agent drives `/mcp`.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

/// An MCP client session through the official SDK's client (`rmcp`,
/// Streamable HTTP), with the progress notifications it heard.
pub struct Mcp {
    pub client: rmcp::service::RunningService<rmcp::RoleClient, Progress>,
    pub notes: Arc<Mutex<Vec<(String, String)>>>,
}

/// Keeps the progress notifications: their token and message.
pub struct Progress(Arc<Mutex<Vec<(String, String)>>>);

impl rmcp::ClientHandler for Progress {
    async fn on_progress(
        &self,
        params: rmcp::model::ProgressNotificationParam,
        _: rmcp::service::NotificationContext<rmcp::RoleClient>,
    ) {
        self.0.lock().unwrap().push((
            format!("{:?}", params.progress_token),
            params.message.unwrap_or_default(),
        ));
    }
}

impl Mcp {
    pub async fn connect(url: &str, token: &str) -> Mcp {
        use rmcp::ServiceExt;
        use rmcp::transport::StreamableHttpClientTransport;
        use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
        let notes = Arc::new(Mutex::new(Vec::new()));
        let cfg =
            StreamableHttpClientTransportConfig::with_uri(format!("{url}/mcp")).auth_header(token);
        let client = Progress(notes.clone())
            .serve(StreamableHttpClientTransport::from_config(cfg))
            .await
            .expect("MCP initialize");
        assert!(
            client
                .peer_info()
                .is_some_and(|i| i.capabilities.tools.is_some()),
            "the server offers tools"
        );
        Mcp { client, notes }
    }

    /// `tools/list`, or a `tools/call` with `params` as sent: the answer as
    /// JSON-RPC puts it (`result`, or `error`).
    pub async fn request(&mut self, method: &str, params: Value) -> Value {
        let answer = match method {
            "tools/list" => self
                .client
                .list_tools(None)
                .await
                .map(|r| serde_json::to_value(r).unwrap()),
            "tools/call" => {
                let params = rmcp::model::CallToolRequestParams::new(
                    params["name"].as_str().unwrap().to_string(),
                )
                .with_arguments(params["arguments"].as_object().cloned().unwrap_or_default());
                self.client
                    .call_tool(params)
                    .await
                    .map(|r| serde_json::to_value(r).unwrap())
            }
            other => panic!("no {other} here"),
        };
        match answer {
            Ok(result) => json!({ "result": result }),
            Err(rmcp::ServiceError::McpError(e)) => json!({ "error": e }),
            // The transport refused (a revoked token): no JSON-RPC answer.
            Err(e) => json!({ "error": { "message": e.to_string() }, "transport": true }),
        }
    }

    /// A tool's result: `Ok(structured content)` or `Err(error text)`.
    pub async fn call(&mut self, tool: &str, args: Value) -> Result<Value, String> {
        let v = self
            .request("tools/call", json!({"name": tool, "arguments": args}))
            .await;
        if v["transport"] == true {
            return Err(v["error"]["message"].as_str().unwrap_or("").to_string());
        }
        let r = &v["result"];
        assert!(r.is_object(), "{v}");
        if r["isError"] == true {
            return Err(r["content"][0]["text"].as_str().unwrap_or("").to_string());
        }
        Ok(r["structuredContent"].clone())
    }

    /// `sandbox.exec` asking for progress: the progress messages that came
    /// before the result, and the result.
    pub async fn exec_with_progress(&mut self, args: Value) -> (Vec<String>, Value) {
        use rmcp::model::RequestParamsMeta;
        self.notes.lock().unwrap().clear();
        let mut params = rmcp::model::CallToolRequestParams::new("sandbox.exec")
            .with_arguments(args.as_object().cloned().unwrap_or_default());
        params.set_progress_token(rmcp::model::ProgressToken(
            rmcp::model::NumberOrString::String("p1".into()),
        ));
        let r = self.client.call_tool(params).await.expect("sandbox.exec");
        let notes = std::mem::take(&mut *self.notes.lock().unwrap());
        // Every notification names the call's progress token (the SDK's
        // client gives each call its own).
        assert!(
            notes.windows(2).all(|w| w[0].0 == w[1].0),
            "one token: {notes:?}"
        );
        let messages = notes.into_iter().map(|(_, m)| m).collect();
        (messages, r.structured_content.unwrap_or_default())
    }
}
