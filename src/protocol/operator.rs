//! The operator side of the wire (`docs/protocol.md` §12): the bodies the
//! HTTP API and `tether ctl` exchange, and the messages of the exec and logs
//! WebSockets in both directions. One definition, used by the server that
//! writes them and the client that reads them. Types only, no I/O.

use super::{ErrorBody, StreamKind, TermSize};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Unacknowledged input a client may assume the server takes when
/// [`Started`] names no `stdin_window`.
pub const ASSUMED_STDIN_WINDOW: u64 = 1024 * 1024;

/// Options of an exec; the first text message a client sends on the exec
/// WebSocket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecOptions {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub size: Option<TermSize>,
    /// Kill the process after this many seconds (`timeout` error).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Operator WebSocket only: the client acknowledges output
    /// ([`ClientMsg::Ack`]), so it can re-attach after a lost connection or
    /// a server restart without losing a byte.
    #[serde(default)]
    pub client_acks: bool,
    /// The server's own label for the exec, kept by the agent with its
    /// channel (§5.8); never taken from an operator.
    #[serde(skip)]
    pub label: Option<String>,
}

/// Options of a log request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LogOptions {
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub since: Option<i64>,
    #[serde(default)]
    pub tail: Option<u64>,
    #[serde(default)]
    pub timestamps: bool,
}

/// A node's state as the operator sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Online,
    Offline,
    /// Connected, but its container runtime does not answer.
    Degraded,
    /// Connected and taking no new workers.
    Draining,
    /// A state this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::Offline => "offline",
            NodeState::Degraded => "degraded",
            NodeState::Draining => "draining",
            NodeState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for NodeState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A node as the operator sees it (`GET /api/v1/nodes`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub node_id: String,
    pub status: NodeState,
    pub draining: bool,
    pub workers: usize,
    /// RFC 3339 UTC time of the last traffic from the agent.
    pub last_seen: Option<String>,
    /// Why the node is offline or degraded, when it is.
    pub offline_reason: Option<String>,
    pub agent_version: Option<String>,
    /// When the current connection started (RFC 3339 UTC, sub-second).
    #[serde(default)]
    pub connected_since: Option<String>,
    /// The organization the node belongs to (by the key it registered
    /// with).
    #[serde(default)]
    pub org: Option<String>,
}

/// An open tunnel: every connection to one port of one worker, through
/// port-forwards and preview URLs (`GET /api/v1/tunnels`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TunnelInfo {
    /// `WORKER:PORT`, what `DELETE /api/v1/tunnels/{id}` takes.
    pub id: String,
    pub worker_id: String,
    pub port: u16,
    pub connections: usize,
    pub bytes_to_worker: u64,
    pub bytes_from_worker: u64,
    /// RFC 3339 UTC: when its first open connection opened.
    pub since: String,
}

/// Asks for a preview URL (`POST /api/v1/workers/{id}/previews`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreviewRequest {
    pub port: u16,
    /// Lifetime in seconds; 1 hour when left out, 30 days at most.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// An issued preview URL (and, listed, one not yet expired or revoked).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreviewInfo {
    /// What `DELETE /api/v1/previews/{id}` takes to revoke it.
    pub id: String,
    pub worker_id: String,
    pub port: u16,
    /// RFC 3339 UTC.
    pub expires_at: String,
    /// The path-based URL's path and query, for the server's own address.
    /// Only when issued (a listing does not repeat the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The host-based URL, when the server has a preview domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// What the server says on an exec or logs WebSocket, as text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// The stream is open; output follows as data frames.
    Started(Started),
    /// Output bytes `from..to` are lost for good (never silent).
    Gap { from: u64, to: u64 },
    /// The agent has the client's input up to `offset`: the client may
    /// forget it.
    StdinAck { offset: u64 },
    /// A tunnel's worker side half-closed: no more data follows, the
    /// client's direction stays open.
    Eof,
    /// The stream ended; for an exec, with its exit code.
    Exit { exit_code: Option<i64> },
    /// The stream ended with an error.
    Error { error: ErrorBody },
    /// A message this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ServerMsg {
    /// The message that ends a stream.
    pub fn end(exit_code: Option<i64>, error: Option<ErrorBody>) -> ServerMsg {
        match error {
            Some(error) => ServerMsg::Error { error },
            None => ServerMsg::Exit { exit_code },
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("operator messages serialize")
    }
}

/// The `started` message. Exec streams carry every field; logs streams only
/// `idle_timeout_secs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Started {
    /// The exec's channel, to re-attach with (`?attach=CHANNEL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<u32>,
    /// Output position of the first data frame that follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Input bytes the server has: a re-attaching client sends the rest.
    /// Absent: the server does not track input (the client keeps none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_offset: Option<u64>,
    /// The server pings at least this often: silence longer than this
    /// means the connection is dead.
    pub idle_timeout_secs: u64,
    /// Unacknowledged input the server takes before it stops reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_window: Option<u64>,
}

/// What a client says on an exec WebSocket, as text (after the
/// [`ExecOptions`] that open it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Resize {
        cols: u16,
        rows: u16,
    },
    /// Close the process' standard input.
    StdinEof,
    /// The client has all output up to `offset`.
    Ack {
        offset: u64,
    },
    /// The client is leaving for good (its own reader went away): end the
    /// exec or tunnel now instead of keeping it for a re-attach.
    Cancel,
    /// A message this build does not know (sent by a newer client).
    #[serde(other)]
    Unknown,
}

impl ClientMsg {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("operator messages serialize")
    }
}

/// A data frame on an operator WebSocket: one stream-kind byte, then the
/// bytes (for a gap marker, the lost byte count as 8 bytes big-endian).
pub fn data_frame(kind: StreamKind, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(1 + data.len());
    buf.put_u8(kind.to_u8());
    buf.extend_from_slice(data);
    buf.freeze()
}

/// The kind and bytes of a data frame; `None` for an empty frame. An
/// unknown kind byte reads as `None` kind (print it as output).
pub fn parse_data_frame(frame: &[u8]) -> Option<(Option<StreamKind>, &[u8])> {
    let (&kind, data) = frame.split_first()?;
    Some((StreamKind::from_u8(kind), data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stream_messages_have_their_documented_shapes() {
        let cases = [
            (
                ServerMsg::Started(Started {
                    channel: Some(3),
                    offset: Some(0),
                    stdin_offset: Some(5),
                    idle_timeout_secs: 30,
                    stdin_window: Some(1024),
                }),
                json!({"type": "started", "channel": 3, "offset": 0, "stdin_offset": 5,
                       "idle_timeout_secs": 30, "stdin_window": 1024}),
            ),
            (
                ServerMsg::Started(Started {
                    idle_timeout_secs: 30,
                    ..Default::default()
                }),
                json!({"type": "started", "idle_timeout_secs": 30}),
            ),
            (
                ServerMsg::Gap { from: 1, to: 9 },
                json!({"type": "gap", "from": 1, "to": 9}),
            ),
            (
                ServerMsg::StdinAck { offset: 7 },
                json!({"type": "stdin_ack", "offset": 7}),
            ),
            (
                ServerMsg::end(Some(2), None),
                json!({"type": "exit", "exit_code": 2}),
            ),
            (
                ServerMsg::end(None, None),
                json!({"type": "exit", "exit_code": null}),
            ),
        ];
        for (msg, want) in cases {
            let v: serde_json::Value = serde_json::from_str(&msg.encode()).unwrap();
            assert_eq!(v, want);
            assert_eq!(serde_json::from_value::<ServerMsg>(v).unwrap(), msg);
        }
        let err = ServerMsg::end(
            None,
            Some(ErrorBody::new(super::super::ErrorCode::NotFound, "gone")),
        );
        let v: serde_json::Value = serde_json::from_str(&err.encode()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["code"], "not_found");
        let client = [
            (
                ClientMsg::Resize { cols: 80, rows: 24 },
                json!({"type": "resize", "cols": 80, "rows": 24}),
            ),
            (ClientMsg::StdinEof, json!({"type": "stdin_eof"})),
            (
                ClientMsg::Ack { offset: 65536 },
                json!({"type": "ack", "offset": 65536}),
            ),
        ];
        for (msg, want) in client {
            let v: serde_json::Value = serde_json::from_str(&msg.encode()).unwrap();
            assert_eq!(v, want);
            assert_eq!(serde_json::from_value::<ClientMsg>(v).unwrap(), msg);
        }
    }

    #[test]
    fn unknown_messages_and_states_are_tolerated() {
        let m: ServerMsg = serde_json::from_str(r#"{"type":"progress","x":1}"#).unwrap();
        assert_eq!(m, ServerMsg::Unknown);
        let m: ClientMsg = serde_json::from_str(r#"{"type":"signal","n":9}"#).unwrap();
        assert_eq!(m, ClientMsg::Unknown);
        let s: NodeState = serde_json::from_str(r#""cordoned""#).unwrap();
        assert_eq!(s, NodeState::Unknown);
        assert!(NodeState::Online == "online");
    }

    #[test]
    fn data_frames_round_trip() {
        let f = data_frame(StreamKind::Stderr, b"oops");
        assert_eq!(
            parse_data_frame(&f),
            Some((Some(StreamKind::Stderr), &b"oops"[..]))
        );
        assert_eq!(parse_data_frame(&[]), None);
        assert_eq!(parse_data_frame(&[200, 1]), Some((None, &[1u8][..])));
    }
}
