//! Registration (`POST /api/v1/register`, `docs/protocol.md` §3): what the
//! agent sends with the pre-shared key, and the bootstrap payload it gets
//! back. Types only, no I/O.

use serde::{Deserialize, Serialize};

/// The registration body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub node_id: String,
    /// Hex Ed25519 public key the node id is bound to (§3.3).
    pub public_key: String,
    /// `<unix ms>.<hex signature>` for purpose `register`.
    pub proof: String,
}

/// Registration reply (the node's bootstrap payload).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bootstrap {
    pub version: u32,
    pub node_id: String,
    pub orchestrator: Orchestrator,
    pub auth: NodeAuth,
    /// Configuration version the node should fetch; none yet.
    pub config_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Orchestrator {
    pub base_url: String,
    pub connect_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeAuth {
    pub node_jwt: String,
    /// RFC 3339 UTC.
    pub expires_at: String,
}
