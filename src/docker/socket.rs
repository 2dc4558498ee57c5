//! The engine's Unix socket as bollard's transport.
//!
//! bollard's own Unix transport (hyperlocal) does not tell hyper that the
//! socket takes vectored writes, so hyper copies every chunk of a request
//! body into its write buffer before sending it: for an upload, one more
//! copy of every byte. Over tokio's Unix stream hyper writes the chunk
//! header and the chunk itself with one `writev`, from where they are.

use bollard::{BollardRequest, Docker};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Where the engine listens, given `DOCKER_HOST`: the Unix socket it
/// names, else `/var/run/docker.sock`; `None` for another kind of
/// `DOCKER_HOST` (left to bollard's defaults).
pub fn socket_path(docker_host: Option<&str>) -> Option<PathBuf> {
    match docker_host {
        Some(h) if !h.is_empty() => h.strip_prefix("unix://").map(PathBuf::from),
        _ => Some(PathBuf::from("/var/run/docker.sock")),
    }
}

/// A client of the engine at the Unix socket `path` (the request timeout
/// in seconds, as bollard's).
pub fn connect(path: &Path, timeout: u64) -> Result<Docker, bollard::errors::Error> {
    if !path.exists() {
        return Err(bollard::errors::Error::SocketNotFoundError(
            path.display().to_string(),
        ));
    }
    // As bollard's own: no idle connections kept (the engine's streams
    // each hold theirs).
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(Connector(path.into()));
    Docker::connect_with_custom_transport(
        move |req: BollardRequest| {
            let client = client.clone();
            async move {
                client
                    .request(req)
                    .await
                    .map_err(bollard::errors::Error::from)
            }
        },
        // The host of every request's URI; the socket is the connector's.
        Some("http://docker"),
        timeout,
        bollard::API_DEFAULT_VERSION,
    )
}

/// Opens a new connection to the socket for each request's URI.
#[derive(Clone)]
struct Connector(Arc<Path>);

impl tower_service::Service<hyper::Uri> for Connector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: hyper::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(&*path).await?)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_socket_is_named() {
        let e = connect(Path::new("/nonexistent/docker.sock"), 5).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/docker.sock"), "{e}");
    }

    #[test]
    fn docker_host_picks_the_socket() {
        assert_eq!(
            socket_path(Some("unix:///run/user/1000/docker.sock")),
            Some(PathBuf::from("/run/user/1000/docker.sock"))
        );
        assert_eq!(socket_path(Some("tcp://127.0.0.1:2375")), None);
        for unset in [None, Some("")] {
            assert_eq!(
                socket_path(unset),
                Some(PathBuf::from("/var/run/docker.sock"))
            );
        }
    }
}
