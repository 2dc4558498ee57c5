//! Stable error codes carried by `error` messages and the operator API.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A stable, snake_case error code. Clients match on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or names something impossible.
    InvalidRequest,
    /// The worker, node, image or path does not exist.
    NotFound,
    /// A local or orchestrator policy forbids the request.
    PolicyDenied,
    /// The request conflicts with the current state (e.g. removing a running worker without force).
    Conflict,
    /// A frame, message or request exceeds a size limit.
    TooLarge,
    /// The operation did not finish within its time limit.
    Timeout,
    /// The node, its connection or its container runtime cannot serve now; retry later.
    Unavailable,
    /// Missing or invalid credentials.
    Unauthorized,
    /// The message type or protocol version is not supported by this peer.
    Unsupported,
    /// A bug or an unexpected failure of a dependency.
    Internal,
    /// Nothing accepts connections on the worker's port (a tunnel).
    ConnectionRefused,
    /// The worker's address cannot be reached from the node (a tunnel).
    HostUnreachable,
    /// A code this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Internal => "internal",
            ErrorCode::ConnectionRefused => "connection_refused",
            ErrorCode::HostUnreachable => "host_unreachable",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// HTTP status used for this code on the operator API.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::PolicyDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::Unsupported => 501,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::ConnectionRefused | ErrorCode::HostUnreachable => 502,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Payload of an `error` message, and body of every operator API error
/// (`{"error": {"code": ..., "message": ...}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}
