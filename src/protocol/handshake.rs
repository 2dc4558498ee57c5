//! The handshake of a connection (`hello`, `welcome`) and the node token
//! refreshed over it.

use super::{ChannelState, WorkerInfo};
use serde::{Deserialize, Serialize};

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
    pub capabilities: Option<super::CapabilityReport>,
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
    /// The `exec` request's label, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// A fresh node token, server to agent, sent over the live connection before
/// the current one expires; the agent uses it for its next connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRefresh {
    pub node_jwt: String,
    /// RFC 3339 UTC.
    pub expires_at: String,
}
