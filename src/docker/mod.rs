//! The agent's view of the Docker Engine API (via bollard): one file per API
//! area. Everything the agent creates carries the labels in [`labels`].

pub mod archive;
pub mod containers;
pub mod deployment;
pub mod egress;
pub mod exec;
pub mod inference;
pub mod joined;
pub mod networks;
pub mod sidecar;
pub mod socket;
pub mod tar_guard;

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
    /// On the node's inference containers, network and volumes.
    pub const INFERENCE: &str = "tether.inference";
    /// On a sidecar: the worker whose network namespace it shares.
    pub const SIDECAR_FOR: &str = "tether.sidecar_for";
    /// On the inference backend: the GPUs it was given.
    pub const INFERENCE_GPUS: &str = "tether.inference_gpus";
    /// On a deployment's services, network and volumes: its name.
    pub const DEPLOYMENT: &str = "tether.deployment";
    /// On a deployment's service: the service's name.
    pub const SERVICE: &str = "tether.service";
    /// On a deployment's service: the hash of what it was made from.
    pub const SPEC_HASH: &str = "tether.spec_hash";
    /// On a worker that is not on a network named after it: its network.
    pub const NETWORK: &str = "tether.network";
    /// On a tunnel relay whose `tunnel-connect` frames what the worker sends.
    pub const RELAY_FRAMING: &str = "tether.relay_framing";
    /// Prefix reserved for tether; user labels may not use it.
    pub const PREFIX: &str = "tether.";
    /// Where a user's labels are kept on a container: `tether.label.KEY`.
    /// No tool on the host reads them there, so a label given at spawn
    /// cannot ask a reverse proxy (Traefik, Caddy), an updater or a
    /// scheduler watching the engine to act on a worker: a worker with
    /// `traefik.http.routers…` would otherwise be published by a Traefik
    /// on the node, a hole in a firewall that opens nothing.
    pub const USER: &str = "tether.label.";

    /// A user's labels as they are written on a container.
    pub fn stored<'a>(
        user: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> impl Iterator<Item = (String, String)> {
        user.into_iter()
            .map(|(k, v)| (format!("{USER}{k}"), v.clone()))
    }

    /// A user's labels, read back from a container's: only those stored by
    /// [`stored`], under the keys given. An image's own labels are not
    /// the user's and are left out.
    pub fn given<'a>(
        on_container: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> std::collections::BTreeMap<String, String> {
        on_container
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(USER)?.to_string(), v.clone())))
            .collect()
    }

    /// Every label the agent reads back from a container. The engine copies
    /// an image's labels onto each container made from it unless the create
    /// call sets them, so an image that carries one of these is refused: it
    /// could pass its worker off as another's sidecar, a deployment's
    /// service or the inference backend.
    /// Attributes of the engine's container events that the agent reads.
    /// The engine copies a container's labels (its image's included) over
    /// an event's attributes, so an image carrying `exitCode` would report
    /// every exit of its workers as that code: refused like [`READ`].
    pub const EVENT: &[&str] = &["exitCode"];

    pub const READ: &[&str] = &[
        MANAGED,
        WORKER,
        NODE,
        TASK,
        JOB,
        DEADLINE,
        NETWORK_POLICY,
        EGRESS_FOR,
        INFERENCE,
        SIDECAR_FOR,
        INFERENCE_GPUS,
        DEPLOYMENT,
        SERVICE,
        SPEC_HASH,
        NETWORK,
        RELAY_FRAMING,
    ];
}

/// Connects to the engine at `socket` (default: `DOCKER_HOST`'s `unix://`
/// socket, or `/var/run/docker.sock`; a `tcp://` `DOCKER_HOST` is spoken
/// to over plain HTTP) and negotiates the API version, so older engines
/// work.
pub async fn connect(socket: Option<&str>) -> Result<Docker, DockerError> {
    let host = std::env::var("DOCKER_HOST").ok();
    let path = match socket {
        Some(path) => Some(std::path::PathBuf::from(path.trim_start_matches("unix://"))),
        None => socket::socket_path(host.as_deref()),
    };
    let docker = match path {
        Some(path) => socket::connect(&path, 120)?,
        None => Docker::connect_with_http_defaults()?,
    };
    docker.negotiate_version().await
}

/// Why an engine operation failed. The engine's own error keeps its source
/// until the wire boundary, where [`ErrorBody::from`] gives it a code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine refused the call or could not be reached.
    #[error("{what}: {source}")]
    Engine {
        /// What was being done, for the message.
        what: String,
        #[source]
        source: DockerError,
    },
    /// tether refused it before or after asking the engine (a name taken
    /// by a container it did not create, a worker that is not this node's).
    #[error("{0}")]
    Refused(ErrorBody),
}

impl Error {
    /// An engine error met while doing `what`.
    pub fn engine(source: DockerError, what: impl Into<String>) -> Error {
        Error::Engine {
            what: what.into(),
            source,
        }
    }

    /// The protocol code this error gets on the wire.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Refused(b) => b.code,
            Error::Engine { source, .. } => engine_code(source),
        }
    }
}

fn engine_code(e: &DockerError) -> ErrorCode {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => match status_code {
            404 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            400 => ErrorCode::InvalidRequest,
            403 => ErrorCode::PolicyDenied,
            _ => ErrorCode::Internal,
        },
        DockerError::RequestTimeoutError => ErrorCode::Timeout,
        DockerError::HyperResponseError { .. }
        | DockerError::IOError { .. }
        | DockerError::SocketNotFoundError(_) => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}

impl From<ErrorBody> for Error {
    fn from(b: ErrorBody) -> Error {
        Error::Refused(b)
    }
}

/// The wire boundary: an engine error becomes a protocol error whose
/// message names what was being done.
impl From<Error> for ErrorBody {
    fn from(e: Error) -> ErrorBody {
        let code = e.code();
        match e {
            Error::Refused(b) => b,
            Error::Engine { what, source } => {
                let message = match (&source, code) {
                    (DockerError::DockerResponseServerError { message, .. }, _) => {
                        format!("{what}: {message}")
                    }
                    (_, ErrorCode::Timeout) => format!("{what}: Docker did not answer in time"),
                    (_, ErrorCode::Unavailable) => {
                        format!("{what}: the Docker engine is unreachable: {source}")
                    }
                    _ => format!("{what}: {source}"),
                };
                ErrorBody::new(code, message)
            }
        }
    }
}

/// Maps an engine error to a protocol error, naming what was being done.
pub fn to_error(e: DockerError, what: &str) -> ErrorBody {
    Error::engine(e, what).into()
}

/// Container and network name of a worker.
pub fn object_name(worker_id: &str) -> String {
    format!("tether-{}", worker_id.to_ascii_lowercase())
}

/// Worker ids become Docker object names and label values: lowercase
/// letters, digits, `-` and `_`, at most 64 (the server issues lowercase ULIDs).
/// `-egress`, `-relay` and `-inference` end the names of a worker's
/// proxies and sidecars: no worker's (a deployment's service `web-relay`
/// would otherwise be taken for the relay of its service `web`).
pub fn valid_worker_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && sidecar_suffix(id).is_none()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The suffix of a worker's proxies and sidecars that `id` ends in.
pub fn sidecar_suffix(id: &str) -> Option<&'static str> {
    ["-egress", "-relay", "-inference"]
        .into_iter()
        .find(|s| id.ends_with(s))
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
    fn engine_errors_keep_their_source_until_the_wire() {
        use std::error::Error as _;
        let refused = DockerError::DockerResponseServerError {
            status_code: 409,
            message: "name in use".into(),
        };
        let e = Error::engine(refused, "create network");
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert!(e.source().is_some(), "the engine's error is kept");
        let body = ErrorBody::from(e);
        assert_eq!(body.code, ErrorCode::Conflict);
        assert_eq!(body.message, "create network: name in use");

        let gone = DockerError::SocketNotFoundError("/var/run/docker.sock".into());
        let body = ErrorBody::from(Error::engine(gone, "ping"));
        assert_eq!(body.code, ErrorCode::Unavailable);
        assert!(
            body.message
                .starts_with("ping: the Docker engine is unreachable"),
            "{}",
            body.message
        );
        assert_eq!(
            ErrorBody::from(Error::engine(DockerError::RequestTimeoutError, "stop")).code,
            ErrorCode::Timeout
        );

        // tether's own refusals pass through unchanged.
        let own = ErrorBody::new(ErrorCode::NotFound, "no such worker: w");
        let e = Error::from(own.clone());
        assert_eq!(e.code(), ErrorCode::NotFound);
        assert_eq!(ErrorBody::from(e), own);
    }

    #[test]
    fn ids() {
        assert!(valid_worker_id("01hx-a_b"));
        assert!(!valid_worker_id("01HX"));
        assert!(!valid_worker_id("a/b"));
        assert!(!valid_worker_id(""));
        for sidecar in ["x-egress", "x-relay", "x-inference"] {
            assert!(!valid_worker_id(sidecar), "the sidecars' suffix: {sidecar}");
        }
        assert!(valid_node_id("host-1.example.com"));
        assert!(!valid_node_id(".."));
        assert!(!valid_node_id("-x"));
        assert!(!valid_node_id("a b"));
        assert!(!valid_node_id(&"a".repeat(65)));
    }
}
