//! The agent's view of the Docker Engine API (via bollard): one file per API
//! area. Everything the agent creates carries the labels in [`labels`].

pub mod archive;
pub mod containers;
pub mod egress;
pub mod exec;
pub mod joined;
pub mod networks;

use crate::protocol::{ErrorBody, ErrorCode};
use bollard::Docker;
use bollard::errors::Error as DockerError;

/// Labels on every object tether creates, so the agent can find, re-adopt
/// and garbage-collect them.
pub mod labels {
    pub const MANAGED: &str = "tether.managed";
    pub const WORKER: &str = "tether.worker_id";
    pub const NODE: &str = "tether.node_id";
    pub const TASK: &str = "tether.task_id";
    pub const JOB: &str = "tether.job_id";
    /// Unix time after which the worker is reaped.
    pub const DEADLINE: &str = "tether.deadline";
    /// The network policy a worker runs under.
    pub const NETWORK_POLICY: &str = "tether.network_policy";
    /// On an egress proxy and its network: the worker they serve.
    pub const EGRESS_FOR: &str = "tether.egress_for";
    /// Prefix reserved for tether; user labels may not use it.
    pub const PREFIX: &str = "tether.";
}

/// Connects to the engine at `socket` (default `/var/run/docker.sock`, or
/// `DOCKER_HOST`) and negotiates the API version, so older engines work.
pub async fn connect(socket: Option<&str>) -> Result<Docker, DockerError> {
    let docker = match socket {
        Some(path) => Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)?,
        None => Docker::connect_with_local_defaults()?,
    };
    docker.negotiate_version().await
}

/// Maps an engine error to a protocol error, naming what was being done.
pub fn to_error(e: DockerError, what: &str) -> ErrorBody {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => {
            let code = match status_code {
                404 => ErrorCode::NotFound,
                409 => ErrorCode::Conflict,
                400 => ErrorCode::InvalidRequest,
                403 => ErrorCode::PolicyDenied,
                _ => ErrorCode::Internal,
            };
            ErrorBody::new(code, format!("{what}: {message}"))
        }
        DockerError::RequestTimeoutError => ErrorBody::new(
            ErrorCode::Timeout,
            format!("{what}: Docker did not answer in time"),
        ),
        e @ (DockerError::HyperResponseError { .. }
        | DockerError::IOError { .. }
        | DockerError::SocketNotFoundError(_)) => ErrorBody::new(
            ErrorCode::Unavailable,
            format!("{what}: the Docker engine is unreachable: {e}"),
        ),
        e => ErrorBody::new(ErrorCode::Internal, format!("{what}: {e}")),
    }
}

/// Container and network name of a worker.
pub fn object_name(worker_id: &str) -> String {
    format!("tether-{}", worker_id.to_ascii_lowercase())
}

/// Worker ids become Docker object names and label values: lowercase
/// letters, digits, `-` and `_`, at most 64 (the server issues lowercase ULIDs).
/// `-egress` ends the names of egress proxies' objects: no worker's.
pub fn valid_worker_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.ends_with("-egress")
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Node ids: letters, digits, `-`, `_` and `.` (host names), at most 64, not
/// starting with `.` or `-`.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_worker_id("01hx-a_b"));
        assert!(!valid_worker_id("01HX"));
        assert!(!valid_worker_id("a/b"));
        assert!(!valid_worker_id(""));
        assert!(!valid_worker_id("x-egress"), "the proxies' suffix");
        assert!(valid_node_id("host-1.example.com"));
        assert!(!valid_node_id(".."));
        assert!(!valid_node_id("-x"));
        assert!(!valid_node_id("a b"));
        assert!(!valid_node_id(&"a".repeat(65)));
    }
}
