//! The tether wire protocol, as `docs/protocol.md` specifies it: message
//! types, the JSON envelope, the binary frame header for stream data and the
//! error codes. Types and codecs only, no I/O.

pub mod capabilities;
mod channel;
mod deployment;
mod error;
mod frame;
mod handshake;
mod messages;
mod node;
pub mod operator;
mod proof;
mod register;
mod worker;

pub use capabilities::CapabilityReport;
pub use channel::*;
pub use deployment::*;
pub use error::{ErrorBody, ErrorCode};
pub use frame::{FRAME_HEADER_LEN, Frame, FrameError, StreamKind};
pub use handshake::*;
pub use messages::*;
pub use node::*;
pub use proof::{
    MAX_PROOF_SKEW_MS, PROOF_HEADER, ProofError, ProofPurpose, key_id, now_millis, proof_message,
    verify_proof,
};
pub use register::{Bootstrap, NodeAuth, Orchestrator, RegisterRequest};
pub use worker::*;

/// Protocol version this build speaks (`version` in `hello` / `welcome`).
pub const PROTOCOL_VERSION: u32 = 1;
/// WebSocket subprotocol negotiated on `/api/agent/connect`.
pub const SUBPROTOCOL: &str = "tether.v1";
/// Path of the agent WebSocket endpoint on the server.
pub const AGENT_CONNECT_PATH: &str = "/api/agent/connect";
/// Path of the registration endpoint (pre-shared key in, node JWT out).
pub const REGISTER_PATH: &str = "/api/v1/register";
/// Largest payload one binary frame may carry.
pub const MAX_FRAME_PAYLOAD: usize = 64 * 1024;
/// Largest control (text) message a peer must accept.
pub const MAX_CONTROL_BYTES: usize = 1024 * 1024;
/// Transport ceiling: a message above it makes the WebSocket layer fail the
/// whole connection. Between this and the protocol limits above, a peer
/// answers `too_large` and keeps the connection.
pub const MAX_WS_MESSAGE: usize = 16 * 1024 * 1024;
/// Default initial credit of a channel, in bytes, each direction.
pub const DEFAULT_WINDOW: u64 = 256 * 1024;
/// Initial credit the reference server asks for an archive transfer
/// (`get_archive`, `put_archive`): bulk data, acknowledged less often; a
/// download goes out in bursts of several frames, a few bursts in flight.
pub const ARCHIVE_WINDOW: u64 = 1024 * 1024;
