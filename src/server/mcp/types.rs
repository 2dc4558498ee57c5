//! The tools' arguments and answers, as their schemas show them.

use super::*;

/// A tool's arguments. Read as the SDK's `Parameters` are (an ill-typed
/// argument is a tool error, not a protocol error), but the error names the
/// argument: `argument "argv": invalid type: integer `5`, expected a
/// sequence`. The `#[tool]` macro finds the input schema by this name.
pub struct Parameters<P>(pub P);

impl<P: JsonSchema> JsonSchema for Parameters<P> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        P::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        P::json_schema(generator)
    }
}

impl<P: serde::de::DeserializeOwned> FromContextPart<ToolCallContext<'_, Tools>> for Parameters<P> {
    fn from_context_part(
        context: &mut ToolCallContext<'_, Tools>,
    ) -> Result<Self, rmcp::ErrorData> {
        let arguments = serde_json::Value::Object(context.arguments.take().unwrap_or_default());
        serde_path_to_error::deserialize(&arguments)
            .map(Parameters)
            .map_err(|e| {
                let path = e.path().to_string();
                let what = if path == "." {
                    "the arguments".to_string()
                } else {
                    format!("argument {path:?}")
                };
                let why = format!("{what}: {}", e.into_inner());
                // The tool never runs: the refusal is audited here.
                let parts = context.request_context.extensions.get::<Parts>();
                context
                    .service
                    .audit_unparsed(parts, &context.name, &arguments, &why);
                // The SDK turns errors with this prefix into tool errors.
                rmcp::ErrorData::invalid_params(
                    format!("failed to deserialize parameters: {why}"),
                    None,
                )
            })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreateArgs {
    /// The task this sandbox serves (audited; every later call names it).
    pub task_id: String,
    pub job_id: Option<String>,
    pub image: String,
    /// The node to run on; by default the least-loaded allowed node.
    pub node: Option<String>,
    /// The main process (default: the image's).
    pub cmd: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub cpus: Option<f64>,
    pub memory_mb: Option<u64>,
    /// Removed after this many seconds.
    pub timeout_s: Option<u64>,
    /// The node's inference backend on localhost:11434.
    pub inference: Option<bool>,
    /// `none`, `restricted` or `allowlist`.
    pub network_policy: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Sandbox {
    pub worker_id: String,
    pub node_id: String,
    pub state: String,
    pub ip: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ExecArgs {
    pub task_id: String,
    /// The sandbox: its `worker_id`, or the `job_id` it was created with
    /// (one of them).
    #[serde(default)]
    pub worker_id: Option<String>,
    #[serde(default)]
    pub job_id: Option<String>,
    /// The command as arguments (or `command`, run by `sh -c`).
    pub argv: Option<Vec<String>>,
    pub command: Option<String>,
    /// Text given on standard input.
    pub stdin: Option<String>,
    pub timeout_s: Option<u64>,
    pub env: Option<BTreeMap<String, String>>,
    pub workdir: Option<String>,
    /// Bytes kept per stream (default 256 KiB, at most 16 MiB).
    pub max_output_bytes: Option<usize>,
    /// Seconds the call waits for the command to end (default 300, at most
    /// 3600). A command still running then goes on: the answer has
    /// `running: true` and an `exec_id` for `sandbox.exec_follow`.
    pub wait_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ExecResult {
    /// Set once the command has ended.
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    /// Output beyond the cap was dropped (cut on a UTF-8 boundary).
    pub truncated: bool,
    pub duration_ms: u64,
    /// The command outlived the wait and goes on.
    pub running: bool,
    /// Follow a running command with `sandbox.exec_follow`.
    pub exec_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct FollowArgs {
    pub task_id: String,
    /// From a `sandbox.exec` answer with `running: true`.
    pub exec_id: String,
    /// Seconds to wait for the command to end (default 30, at most 3600);
    /// the output since the last answer comes back either way.
    pub wait_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PutFileArgs {
    pub task_id: String,
    pub worker_id: String,
    /// Absolute path of the file in the sandbox.
    pub path: String,
    /// The content as text, or `content_base64`.
    pub content: Option<String>,
    pub content_base64: Option<String>,
    /// Permission bits, octal as a string (default "644").
    pub mode: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PutFileResult {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct GetFileArgs {
    pub task_id: String,
    pub worker_id: String,
    pub path: String,
    /// Refuse files larger than this (default and most: 4 MiB).
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct FileContent {
    pub path: String,
    pub size: u64,
    /// The content when it is UTF-8 text, else `content_base64`.
    pub content: Option<String>,
    pub content_base64: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct WorkerArgs {
    pub task_id: String,
    pub worker_id: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LogsArgs {
    pub task_id: String,
    pub worker_id: String,
    /// Only the last N lines.
    pub tail: Option<u64>,
    /// Only lines since this Unix time (seconds).
    pub since: Option<i64>,
    /// Also wait this many seconds for new lines (at most 60).
    pub follow_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LogLine {
    /// RFC 3339, from the engine.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Logs {
    pub lines: Vec<LogLine>,
    /// Lines past the output cap were dropped.
    pub truncated: bool,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Destroyed {
    pub worker_id: String,
    /// The node it ran on.
    pub node_id: String,
    pub removed: bool,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct NodeArgs {
    pub node_id: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeSummary>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct NodeSummary {
    pub node_id: String,
    pub status: String,
    pub workers: usize,
    /// New sandboxes are not placed on it.
    #[serde(default)]
    pub draining: bool,
    /// The node's inference backend runs and answers.
    pub inference: bool,
    /// The node's capability report, if it sent one.
    pub capabilities: Option<serde_json::Value>,
}
