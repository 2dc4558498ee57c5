//! Control messages: the JSON envelope and every typed payload.
//!
//! Each text frame is one envelope `{"type": ..., "id": ..., "payload": ...}`.
//! Unknown payload fields are ignored (forward compatibility); missing or
//! mistyped fields are rejected with `invalid_request`.

use super::{ErrorBody, ErrorCode, MAX_CONTROL_BYTES};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The outer shape of every control message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub payload: Value,
}

/// First message on a connection, agent to server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    /// Protocol versions the agent speaks, preferred first.
    pub versions: Vec<u32>,
    pub node_id: String,
    pub agent_version: String,
    /// Workers the agent found on its node (by label), for reconciliation.
    /// Absent when the agent could not list them (Docker unreachable): the
    /// server then keeps its view instead of emptying it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<Vec<WorkerInfo>>,
    /// What the agent has received on each open channel, for resumption.
    #[serde(default)]
    pub channels: Vec<ChannelState>,
    /// Exec channels the agent still runs, so a server that restarted can
    /// adopt them and let their clients re-attach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open: Vec<OpenChannel>,
    /// `config_version` of the configuration the agent has applied, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
    /// Capability report (see docs/protocol.md); opaque to this layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
}

/// Server's answer to `hello`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Welcome {
    /// The version chosen for this connection.
    pub version: u32,
    pub session_id: String,
    /// Seconds between pings each side sends.
    pub heartbeat_interval_secs: u64,
    /// Seconds without any inbound traffic after which a side drops the link.
    pub heartbeat_timeout_secs: u64,
    /// What the server has received on each channel it still has open for
    /// this node; the agent replays the rest and forgets channels not listed.
    #[serde(default)]
    pub channels: Vec<ChannelState>,
}

/// An exec channel still running on the agent (in `hello`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpenChannel {
    pub channel: u32,
    pub worker_id: String,
    /// The lowest output offset the agent can still replay.
    pub from: u64,
    /// Output bytes sent so far.
    pub sent: u64,
}

/// Resumption state of one channel, from the side that sends it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelState {
    pub channel: u32,
    /// Bytes received so far: the peer replays from this offset.
    pub received: u64,
    /// Credit granted: the peer may send up to this offset.
    pub limit: u64,
}

/// Resource limits of a worker. Missing values take the node's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    /// Writable-layer size in MB (`unsupported` where the engine's storage
    /// driver cannot limit it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

/// What the operator asks for when spawning (operator API body). Unknown
/// fields are refused, naming the field: a misspelt limit must not be
/// silently dropped.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub image: String,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Seconds after which the worker is stopped and removed (`timeout`
    /// worker event); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Run privileged (refused unless the node allows it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// `host` to share the node's network (refused unless allowed); absent:
    /// the worker's own bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Host devices to pass in, e.g. `/dev/fuse` (refused unless allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Host paths to mount (only under the node's allowed host paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Node to place the worker on; the server picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// What the worker may reach; absent: the node's
    /// `sandbox.default_network_policy`. A request may only narrow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicy>,
}

/// What a worker may reach over the network, narrowest first (the order
/// is the one a spawn may narrow along): `none` < `allowlist` < `restricted`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum NetworkPolicy {
    /// No network at all (Docker's `none`); exec and files still work.
    None,
    /// Only the node's `allowed_egress_domains`, by name, through a
    /// per-worker HTTP(S) egress proxy.
    Allowlist,
    /// The internet, but not the host, link-local, other workers or private
    /// ranges (unless the node lists them in `allowed_private_cidrs`).
    Restricted,
}

impl NetworkPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkPolicy::None => "none",
            NetworkPolicy::Allowlist => "allowlist",
            NetworkPolicy::Restricted => "restricted",
        }
    }
}

impl std::str::FromStr for NetworkPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NetworkPolicy::None),
            "allowlist" => Ok(NetworkPolicy::Allowlist),
            "restricted" => Ok(NetworkPolicy::Restricted),
            _ => Err(format!(
                "network policy must be none, allowlist or restricted, got {s:?}"
            )),
        }
    }
}

/// A host path mounted into a worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub source: String,
    pub target: String,
    /// Absent: the node's `read_only_by_default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

/// `spawn` request payload, server to agent: the [`SpawnRequest`] fields
/// and `worker_id` in one object. Deserialised by hand because serde's
/// `flatten` would drop unknown fields instead of refusing them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spawn {
    /// Chosen by the server; a spawn with an id that already exists returns
    /// the existing worker.
    pub worker_id: String,
    #[serde(flatten)]
    pub spec: SpawnRequest,
}

impl<'de> Deserialize<'de> for Spawn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::<String, Value>::deserialize(d)?;
        let worker_id = match map.remove("worker_id") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(D::Error::custom("worker_id must be a string")),
            None => return Err(D::Error::missing_field("worker_id")),
        };
        let spec = SpawnRequest::deserialize(Value::Object(map)).map_err(D::Error::custom)?;
        Ok(Spawn { worker_id, spec })
    }
}

/// A worker as the agent and the server describe it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub node_id: String,
    pub image: String,
    pub container_id: String,
    /// Name of the worker's dedicated bridge network.
    pub network: String,
    /// Subnet of that network (CIDR).
    #[serde(default)]
    pub subnet: Option<String>,
    /// The worker's address on its network.
    #[serde(default)]
    pub ip: Option<String>,
    /// Docker's state: created, running, exited, ...
    pub state: String,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub task_id: Option<String>,
    #[serde(default)]
    pub job_id: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// Unix time at which the worker is stopped and removed, if it has a timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// The network policy the worker runs under (absent for workers made
    /// before policies were enforced, and for host-network workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicy>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerRef {
    pub worker_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stop {
    pub worker_id: String,
    /// Seconds between SIGTERM and SIGKILL (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Remove {
    pub worker_id: String,
    /// Remove even if running.
    #[serde(default)]
    pub force: bool,
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TermSize {
    pub cols: u16,
    pub rows: u16,
}

/// `exec` request payload: opens `channel`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Exec {
    pub channel: u32,
    pub worker_id: String,
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
    /// Whether the server will send stdin frames.
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub size: Option<TermSize>,
    /// Seconds after which the process is killed and the channel closes
    /// with `timeout`; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Initial credit, in bytes, each direction.
    pub window: u64,
}

/// `logs` request payload: opens `channel`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Logs {
    pub channel: u32,
    pub worker_id: String,
    #[serde(default)]
    pub follow: bool,
    /// Only lines since this time (Unix seconds).
    #[serde(default)]
    pub since: Option<i64>,
    /// Only the last N lines.
    #[serde(default)]
    pub tail: Option<u64>,
    #[serde(default)]
    pub timestamps: bool,
    pub window: u64,
}

/// `put_archive` / `get_archive` payload: opens `channel` carrying a tar stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Archive {
    pub channel: u32,
    pub worker_id: String,
    /// For put: directory to extract into. For get: file or directory to pack.
    pub path: String,
    pub window: u64,
}

/// `stat` request payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stat {
    pub worker_id: String,
    pub path: String,
}

/// `stat` result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatResult {
    pub exists: bool,
    #[serde(default)]
    pub is_dir: bool,
    #[serde(default)]
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Resize {
    pub channel: u32,
    #[serde(flatten)]
    pub size: TermSize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerList {
    pub workers: Vec<WorkerInfo>,
}

/// Credit and acknowledgement for one channel direction: the receiver has
/// consumed `acked` bytes and the sender may send bytes up to offset `limit`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Window {
    pub channel: u32,
    pub acked: u64,
    pub limit: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelEof {
    pub channel: u32,
}

/// End of a channel. From the agent: the operation finished (with an exit
/// code for exec, or an error). From the server: cancel the operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChannelClose {
    pub channel: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Something happened to a worker outside any request (Docker events).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerEvent {
    pub worker_id: String,
    pub event: WorkerEventKind,
    #[serde(default)]
    pub exit_code: Option<i64>,
    pub at: String,
}

/// What happened to a worker, in a [`WorkerEvent`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerEventKind {
    /// Its main process ended (Docker `die`).
    Exited,
    /// The kernel killed a process of it for memory (Docker `oom`).
    OomKilled,
    /// The agent removed it at its deadline.
    Timeout,
    /// It is gone (the reference agent does not send this).
    Removed,
    /// A kind this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

/// The node's health, agent to server: sent at the start of every
/// connection and whenever it changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    /// `ok`, or `degraded` when the container runtime is unreachable.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
}

/// Versioned node configuration pushed by the orchestrator (`configure`).
/// The node's own YAML policy stays the last word: this can only narrow it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default = "one")]
    pub version: u32,
    /// A ULID: monotonic by string order; an older or equal one is ignored.
    #[serde(default)]
    pub config_version: String,
    /// Registries and their pull credentials (used for image pulls only).
    #[serde(default)]
    pub registries: Vec<Registry>,
    #[serde(default)]
    pub policy: ConfigPolicy,
    #[serde(default)]
    pub constraints: Constraints,
    /// Reserved for node-local inference (stored, not acted on yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_backend: Option<Value>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub server: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigPolicy {
    /// Same keys as the node YAML's `sandbox` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_job_timeout_seconds: Option<u64>,
}

/// The agent's answer to `configure`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigAck {
    pub config_version: String,
    /// `applied`, `failed` or `rolled_back`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ConfigAckError>,
    /// SHA-256 of the configuration in force after this push (secrets excluded).
    pub effective_config_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigAckError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// Payload of `config_poll`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigPoll {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
}

/// A fresh node token, server to agent, sent over the live connection before
/// the current one expires; the agent uses it for its next connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRefresh {
    pub node_jwt: String,
    /// RFC 3339 UTC.
    pub expires_at: String,
}

/// Hash of a capability report: SHA-256 of its canonical JSON (keys sorted)
/// without the volatile `reported_at` and `compute.storage_free_mb`.
pub fn capability_hash(report: &Value) -> String {
    use sha2::Digest;
    let mut v = report.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("reported_at");
        if let Some(c) = o.get_mut("compute").and_then(|c| c.as_object_mut()) {
            c.remove("storage_free_mb");
        }
    }
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))
}

/// Requests the server sends to an agent; each gets one `result` or `error`.
// A request lives only while it is handled; boxing the large spawn would
// add an allocation and change nothing that matters.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Spawn(Spawn),
    Stop(Stop),
    Remove(Remove),
    Inspect(WorkerRef),
    ListWorkers,
    Exec(Exec),
    Logs(Logs),
    PutArchive(Archive),
    GetArchive(Archive),
    Stat(Stat),
    Resize(Resize),
    Configure(NodeConfig),
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Spawn(_) => "spawn",
            Request::Stop(_) => "stop",
            Request::Remove(_) => "remove",
            Request::Inspect(_) => "inspect",
            Request::ListWorkers => "list_workers",
            Request::Exec(_) => "exec",
            Request::Logs(_) => "logs",
            Request::PutArchive(_) => "put_archive",
            Request::GetArchive(_) => "get_archive",
            Request::Stat(_) => "stat",
            Request::Resize(_) => "resize",
            Request::Configure(_) => "configure",
        }
    }

    fn payload(&self) -> Value {
        let v = match self {
            Request::Spawn(p) => serde_json::to_value(p),
            Request::Stop(p) => serde_json::to_value(p),
            Request::Remove(p) => serde_json::to_value(p),
            Request::Inspect(p) => serde_json::to_value(p),
            Request::ListWorkers => Ok(Value::Object(Default::default())),
            Request::Exec(p) => serde_json::to_value(p),
            Request::Logs(p) => serde_json::to_value(p),
            Request::PutArchive(p) | Request::GetArchive(p) => serde_json::to_value(p),
            Request::Stat(p) => serde_json::to_value(p),
            Request::Resize(p) => serde_json::to_value(p),
            Request::Configure(p) => serde_json::to_value(p),
        };
        v.expect("protocol payloads serialize")
    }
}

/// Every control message, typed.
// Messages live briefly between the socket and a handler; boxing the large
// request variant would buy nothing measurable.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Request {
        id: String,
        request: Request,
    },
    /// Success reply to the request `id`; the payload depends on the request.
    Result {
        id: String,
        payload: Value,
    },
    /// Failure reply to the request `id`, or a connection-level error without id.
    Error {
        id: Option<String>,
        error: ErrorBody,
    },
    Window(Window),
    ChannelEof(ChannelEof),
    ChannelClose(ChannelClose),
    WorkerEvent(WorkerEvent),
    NodeStatus(NodeStatus),
    /// A new capability report (agent to server), sent when its hash changes.
    Capabilities(Value),
    Token(TokenRefresh),
    /// Agent to server: "send me newer configuration if you have it"
    /// (`updates.enable_dynamic_config`); carries the applied version.
    ConfigPoll(ConfigPoll),
    /// A type this build does not know; answered with `unsupported` when it has an id.
    Unknown {
        kind: String,
        id: Option<String>,
    },
}

/// A text frame that could not be turned into a [`Message`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct DecodeError {
    /// The request id, when the envelope was readable enough to carry one.
    pub id: Option<String>,
    pub error: ErrorBody,
}

fn typed<T: DeserializeOwned>(kind: &str, id: &Option<String>, v: Value) -> Result<T, DecodeError> {
    serde_json::from_value(v).map_err(|e| DecodeError {
        id: id.clone(),
        error: ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("malformed `{kind}` payload: {e}"),
        ),
    })
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("protocol payloads serialize")
}

impl Message {
    /// The `too_large` answer to a text over a receiver's limit: with the
    /// message's `id` when the text is a JSON object whose `id` is a string
    /// (so the request, or the request a reply answers, fails at once
    /// instead of waiting for its timeout), else without (§4.3).
    pub fn oversized(text: &str, message: String) -> DecodeError {
        #[derive(Deserialize)]
        struct IdOnly {
            id: Option<String>,
        }
        DecodeError {
            id: serde_json::from_str::<IdOnly>(text).ok().and_then(|e| e.id),
            error: ErrorBody::new(ErrorCode::TooLarge, message),
        }
    }

    /// Parses one text frame.
    pub fn decode(text: &str) -> Result<Message, DecodeError> {
        if text.len() > MAX_CONTROL_BYTES {
            return Err(Message::oversized(
                text,
                format!(
                    "control message of {} bytes exceeds the limit of {MAX_CONTROL_BYTES}",
                    text.len()
                ),
            ));
        }
        let env: Envelope = serde_json::from_str(text).map_err(|e| DecodeError {
            id: None,
            error: ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!("malformed envelope: {e}"),
            ),
        })?;
        let Envelope { kind, id, payload } = env;
        let need_id = |id: Option<String>| {
            id.ok_or_else(|| DecodeError {
                id: None,
                error: ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!("`{kind}` message without an `id`"),
                ),
            })
        };
        let req = |r: Request, id: Option<String>| -> Result<Message, DecodeError> {
            Ok(Message::Request {
                id: need_id(id)?,
                request: r,
            })
        };
        let k = kind.as_str();
        match k {
            "hello" => Ok(Message::Hello(typed(k, &id, payload)?)),
            "welcome" => Ok(Message::Welcome(typed(k, &id, payload)?)),
            "result" => Ok(Message::Result {
                id: need_id(id)?,
                payload,
            }),
            "error" => Ok(Message::Error {
                error: typed(k, &id, payload)?,
                id,
            }),
            "window" => Ok(Message::Window(typed(k, &id, payload)?)),
            "channel_eof" => Ok(Message::ChannelEof(typed(k, &id, payload)?)),
            "channel_close" => Ok(Message::ChannelClose(typed(k, &id, payload)?)),
            "worker_event" => Ok(Message::WorkerEvent(typed(k, &id, payload)?)),
            "node_status" => Ok(Message::NodeStatus(typed(k, &id, payload)?)),
            "capabilities" => Ok(Message::Capabilities(payload)),
            "token" => Ok(Message::Token(typed(k, &id, payload)?)),
            "config_poll" => Ok(Message::ConfigPoll(typed(k, &id, payload)?)),
            "spawn" => req(Request::Spawn(typed(k, &id, payload)?), id),
            "stop" => req(Request::Stop(typed(k, &id, payload)?), id),
            "remove" => req(Request::Remove(typed(k, &id, payload)?), id),
            "inspect" => req(Request::Inspect(typed(k, &id, payload)?), id),
            "list_workers" => req(Request::ListWorkers, id),
            "exec" => req(Request::Exec(typed(k, &id, payload)?), id),
            "logs" => req(Request::Logs(typed(k, &id, payload)?), id),
            "put_archive" => req(Request::PutArchive(typed(k, &id, payload)?), id),
            "get_archive" => req(Request::GetArchive(typed(k, &id, payload)?), id),
            "stat" => req(Request::Stat(typed(k, &id, payload)?), id),
            "resize" => req(Request::Resize(typed(k, &id, payload)?), id),
            "configure" => req(Request::Configure(typed(k, &id, payload)?), id),
            _ => Ok(Message::Unknown { kind, id }),
        }
    }

    /// Serializes to the text of one frame.
    pub fn encode(&self) -> String {
        let (kind, id, payload): (&str, Option<&str>, Value) = match self {
            Message::Hello(p) => ("hello", None, to_value(p)),
            Message::Welcome(p) => ("welcome", None, to_value(p)),
            Message::Request { id, request } => (request.kind(), Some(id), request.payload()),
            Message::Result { id, payload } => ("result", Some(id), payload.clone()),
            Message::Error { id, error } => ("error", id.as_deref(), to_value(error)),
            Message::Window(p) => ("window", None, to_value(p)),
            Message::ChannelEof(p) => ("channel_eof", None, to_value(p)),
            Message::ChannelClose(p) => ("channel_close", None, to_value(p)),
            Message::WorkerEvent(p) => ("worker_event", None, to_value(p)),
            Message::NodeStatus(p) => ("node_status", None, to_value(p)),
            Message::Capabilities(p) => ("capabilities", None, p.clone()),
            Message::Token(p) => ("token", None, to_value(p)),
            Message::ConfigPoll(p) => ("config_poll", None, to_value(p)),
            Message::Unknown { kind, id } => (kind, id.as_deref(), Value::Null),
        };
        let env = Envelope {
            kind: kind.to_string(),
            id: id.map(str::to_string),
            payload,
        };
        serde_json::to_string(&env).expect("envelopes serialize")
    }

    pub fn error(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error {
            id,
            error: ErrorBody::new(code, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trip() {
        let m = Message::Request {
            id: "r1".into(),
            request: Request::Exec(Exec {
                channel: 3,
                worker_id: "w".into(),
                cmd: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: BTreeMap::new(),
                workdir: None,
                user: None,
                tty: false,
                stdin: true,
                size: None,
                timeout_secs: None,
                window: 1024,
            }),
        };
        let text = m.encode();
        assert!(
            text.starts_with(r#"{"type":"exec","id":"r1","payload":{"#),
            "{text}"
        );
        assert_eq!(Message::decode(&text).unwrap(), m);
    }

    #[test]
    fn spawn_flattens_spec() {
        let text = r#"{"type":"spawn","id":"a","payload":{"worker_id":"w1","image":"img","cmd":["true"]}}"#;
        let Message::Request {
            request: Request::Spawn(s),
            ..
        } = Message::decode(text).unwrap()
        else {
            panic!("not a spawn");
        };
        assert_eq!(s.worker_id, "w1");
        assert_eq!(s.spec.image, "img");
        assert_eq!(s.spec.cmd, vec!["true"]);
    }

    #[test]
    fn spawn_refuses_unknown_fields_by_name() {
        for (payload, field) in [
            (
                r#"{"worker_id":"w1","image":"img","privilegd":true}"#,
                "privilegd",
            ),
            (
                r#"{"worker_id":"w1","image":"img","resources":{"memroy_mb":5}}"#,
                "memroy_mb",
            ),
            (
                r#"{"worker_id":"w1","image":"img","mounts":[{"source":"/a","target":"/b","mode":"rw"}]}"#,
                "mode",
            ),
        ] {
            let text = format!(r#"{{"type":"spawn","id":"a","payload":{payload}}}"#);
            let e = Message::decode(&text).unwrap_err();
            assert_eq!(e.error.code, ErrorCode::InvalidRequest);
            assert!(e.error.message.contains(field), "{}", e.error.message);
        }
        let e: Result<SpawnRequest, _> = serde_json::from_str(r#"{"image":"i","netwrk":"host"}"#);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("unknown field `netwrk`")
        );
    }

    #[test]
    fn unknown_type_is_explicit() {
        let m = Message::decode(r#"{"type":"frobnicate","id":"x","payload":{}}"#).unwrap();
        assert_eq!(
            m,
            Message::Unknown {
                kind: "frobnicate".into(),
                id: Some("x".into())
            }
        );
    }

    #[test]
    fn malformed_payload_keeps_id() {
        let e =
            Message::decode(r#"{"type":"stop","id":"q","payload":{"worker_id":5}}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("q"));
        assert_eq!(e.error.code, ErrorCode::InvalidRequest);
        let e = Message::decode("not json").unwrap_err();
        assert_eq!(e.id, None);
        let e = Message::decode(r#"{"type":"stop","payload":{"worker_id":"w"}}"#).unwrap_err();
        assert!(e.error.message.contains("without an `id`"));
    }

    #[test]
    fn oversized_is_too_large() {
        let big = format!(
            r#"{{"type":"x","payload":"{}"}}"#,
            "a".repeat(MAX_CONTROL_BYTES)
        );
        let e = Message::decode(&big).unwrap_err();
        assert_eq!((e.error.code, e.id), (ErrorCode::TooLarge, None));
        // With its id, when it has one: the request it is fails at once.
        let big = format!(
            r#"{{"type":"result","id":"r7","payload":"{}"}}"#,
            "a".repeat(MAX_CONTROL_BYTES)
        );
        let e = Message::decode(&big).unwrap_err();
        assert_eq!(
            (e.error.code, e.id.as_deref()),
            (ErrorCode::TooLarge, Some("r7"))
        );
    }

    #[test]
    fn unknown_error_code_survives() {
        let m = Message::decode(
            r#"{"type":"error","id":"1","payload":{"code":"new_code","message":"m"}}"#,
        )
        .unwrap();
        let Message::Error { error, .. } = m else {
            panic!()
        };
        assert_eq!(error.code, ErrorCode::Unknown);
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in ".{0,200}") {
            let _ = Message::decode(&s);
        }

        #[test]
        fn decode_json_shapes_never_panics(kind in "(hello|welcome|result|error|window|spawn|exec|logs|stat|resize|channel_close|[a-z]{1,8})",
                                           id in proptest::option::of("[a-z0-9]{0,5}"),
                                           payload in "(\\{\\}|null|1|\"x\"|\\{\"channel\":1\\}|\\[\\])") {
            let text = match id {
                Some(id) => format!(r#"{{"type":"{kind}","id":"{id}","payload":{payload}}}"#),
                None => format!(r#"{{"type":"{kind}","payload":{payload}}}"#),
            };
            let _ = Message::decode(&text);
        }
    }
}
