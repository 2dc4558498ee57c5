//! Channels: the requests that open one (exec, logs, archives), credit,
//! end of input, close, and the resumption state exchanged on reconnect.

use super::ErrorBody;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Resumption state of one channel, from the side that sends it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelState {
    pub channel: u32,
    /// Bytes received so far: the peer replays from this offset.
    pub received: u64,
    /// Credit granted: the peer may send up to this offset.
    pub limit: u64,
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TermSize {
    pub cols: u16,
    pub rows: u16,
}

/// `exec` request payload: opens `channel`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
    /// Opaque to the agent: kept with the exec's channel and listed with it
    /// in `hello.open`, so a server that adopts the exec knows what it was
    /// for (the reference server: an MCP exec to keep following).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Resize {
    pub channel: u32,
    #[serde(flatten)]
    pub size: TermSize,
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

/// `tunnel` request payload: opens `channel`, carrying one TCP connection
/// from the node to `port` on the worker's own network. Data frames go both
/// ways; `channel_eof` is a half-close of that direction; the agent closes
/// the channel when both directions ended (or with an error).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tunnel {
    pub channel: u32,
    pub worker_id: String,
    /// TCP port in the worker, 1 to 65535.
    pub port: u16,
    pub window: u64,
}
