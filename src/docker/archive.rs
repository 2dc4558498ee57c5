//! Files: the archive endpoints, streamed as tar in chunks.

use super::Error;
use super::joined::{Joined, Wait};
use crate::protocol::{StatResult, StreamKind};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::{
    ContainerArchiveInfoOptions, DownloadFromContainerOptions, UploadToContainerOptions,
};
use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};

/// Go's `os.ModeDir` bit, as Docker reports it in path stats.
const MODE_DIR: u32 = 1 << 31;

/// Functions here take the id of a container whose ownership was checked.
pub async fn stat(docker: &Docker, container: &str, path: &str) -> Result<StatResult, Error> {
    match docker
        .get_container_archive_info(
            container,
            Some(ContainerArchiveInfoOptions {
                path: path.to_string(),
            }),
        )
        .await
    {
        Ok(s) => Ok(StatResult {
            exists: true,
            is_dir: s.file_mode & MODE_DIR != 0,
            size: s.size.max(0) as u64,
        }),
        Err(DockerError::DockerResponseServerError {
            status_code: 404,
            message,
        }) if !message.contains("No such container") => Ok(StatResult {
            exists: false,
            is_dir: false,
            size: 0,
        }),
        Err(e) => Err(Error::engine(e, "stat path")),
    }
}

/// The tar stream of `path` in the worker, Docker's pieces (a few KiB each)
/// joined into chunks of up to `max` bytes ([`Joined`], reading while a
/// chunk waits: the body is read from the socket only when asked).
pub fn download(
    docker: &Docker,
    container: &str,
    path: &str,
    max: usize,
) -> impl Stream<Item = Result<Bytes, DockerError>> + Unpin + use<> {
    let pieces = docker
        .download_from_container(
            container,
            Some(DownloadFromContainerOptions {
                path: path.to_string(),
            }),
        )
        .map_ok(|b| (StreamKind::Data, b));
    Joined::forwarded(Box::pin(pieces), max, Wait::Reading).map_ok(|(_, b)| b)
}

/// Extracts a tar stream into directory `path` of the worker.
pub async fn upload(
    docker: &Docker,
    container: &str,
    path: &str,
    tar: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Result<(), Error> {
    docker
        .upload_to_container(
            container,
            Some(UploadToContainerOptions {
                path: path.to_string(),
                // A directory is never swapped for a link (or a file) by an
                // upload: a bind's source cannot be turned into a path out
                // of the allowed host paths that way.
                no_overwrite_dir_non_dir: Some("true".into()),
                ..Default::default()
            }),
            bollard::body_try_stream(tar),
        )
        .await
        .map_err(|e| Error::engine(e, "extract archive"))
}
