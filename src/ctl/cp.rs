//! `ctl cp SRC DST`: files and directories in both directions, docker-style
//! (`WORKER:PATH`), streamed as tar: never a whole file in memory. Downloads
//! are unpacked by [`super::extract`], which trusts neither worker nor server.

use super::{Client, CtlError};
use crate::protocol::StatResult;
use futures_util::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpTarget {
    Local(PathBuf),
    Worker { worker: String, path: String },
}

impl CpTarget {
    /// Docker's rule: `NAME:PATH` is a worker path; a local path containing
    /// a colon must start with `/` or `.`.
    pub fn parse(s: &str) -> CpTarget {
        if !s.starts_with('/') && !s.starts_with('.') {
            if let Some((w, p)) = s.split_once(':') {
                // `NAME/SERVICE:` is a deployment's service (a local path
                // of that shape is written `./NAME/SERVICE:...`).
                let service = w.split_once('/').is_some_and(|(d, svc)| {
                    crate::protocol::valid_name(d, crate::protocol::MAX_DEPLOYMENT_NAME)
                        && crate::protocol::valid_name(svc, crate::protocol::MAX_SERVICE_NAME)
                });
                if !w.is_empty() && (!w.contains('/') || service) {
                    return CpTarget::Worker {
                        worker: w.to_string(),
                        path: if p.is_empty() {
                            "/".into()
                        } else {
                            p.to_string()
                        },
                    };
                }
            }
        }
        CpTarget::Local(PathBuf::from(s))
    }
}

fn local(e: impl std::fmt::Display) -> CtlError {
    CtlError::Local(e.to_string())
}

fn progress(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() || total < 4 * 1024 * 1024 {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

fn base_name(p: &str) -> Option<String> {
    Path::new(p.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn parent_of(p: &str) -> String {
    let trimmed = p.trim_end_matches('/');
    match Path::new(trimmed).parent() {
        Some(par) if !par.as_os_str().is_empty() => par.to_string_lossy().into_owned(),
        _ => "/".into(),
    }
}

fn local_size(p: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| local_size(&e.path())).sum())
            .unwrap_or(0)
    } else {
        m.len()
    }
}

async fn stat(client: &Client, worker: &str, path: &str) -> Result<StatResult, CtlError> {
    let rb = client
        .request(Method::GET, &format!("{}/stat", super::worker_path(worker)))
        .query(&[("path", path)]);
    client.json(rb).await
}

/// Copies between the local machine and a worker; returns bytes of file data.
pub async fn copy(client: &Client, src: CpTarget, dst: CpTarget) -> Result<u64, CtlError> {
    match (src, dst) {
        (CpTarget::Local(s), CpTarget::Worker { worker, path }) => {
            upload(client, &s, &worker, &path).await
        }
        (CpTarget::Worker { worker, path }, CpTarget::Local(d)) => {
            download(client, &worker, &path, &d).await
        }
        _ => Err(CtlError::Local(
            "exactly one of SRC and DST must be a worker path (WORKER:PATH)".into(),
        )),
    }
}

async fn upload(client: &Client, src: &Path, worker: &str, dst: &str) -> Result<u64, CtlError> {
    let meta = std::fs::metadata(src).map_err(|e| local(format!("{}: {e}", src.display())))?;
    let src_name = src
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| local(format!("{}: cannot copy a root directory", src.display())))?;
    let target = stat(client, worker, dst).await?;
    // Where to extract, and under which name, following docker cp.
    let (dir, name) = if target.exists && target.is_dir {
        (dst.to_string(), src_name)
    } else if target.exists && meta.is_dir() {
        return Err(local(format!(
            "cannot copy directory {} onto file {dst}",
            src.display()
        )));
    } else {
        if dst.ends_with('/') {
            return Err(local(format!(
                "{dst}: no such directory in worker {worker}"
            )));
        }
        let name = base_name(dst).ok_or_else(|| local(format!("invalid destination {dst}")))?;
        (parent_of(dst), name)
    };
    let total = local_size(src);
    let pb = progress(total);
    let (reader, writer) = tokio::io::duplex(256 * 1024);
    let src_owned = src.to_path_buf();
    let is_dir = meta.is_dir();
    let packer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut b = tar::Builder::new(SyncIoBridge::new(writer));
        b.follow_symlinks(false);
        if is_dir {
            b.append_dir_all(&name, &src_owned)?;
        } else {
            b.append_path_with_name(&src_owned, &name)?;
        }
        b.into_inner()?.shutdown()
    });
    let pb2 = pb.clone();
    let body =
        ReaderStream::with_capacity(reader, 64 * 1024).inspect_ok(move |b| pb2.inc(b.len() as u64));
    let rb = client
        .request(
            Method::PUT,
            &format!("{}/archive", super::worker_path(worker)),
        )
        .query(&[("path", dir.as_str())])
        .header("content-type", "application/x-tar")
        .body(reqwest::Body::wrap_stream(body));
    let sent = client.send(rb).await;
    let packed = packer.await.map_err(local)?;
    pb.finish_and_clear();
    sent?;
    packed.map_err(|e| local(format!("reading {}: {e}", src.display())))?;
    Ok(total)
}

async fn download(client: &Client, worker: &str, src: &str, dst: &Path) -> Result<u64, CtlError> {
    let info = stat(client, worker, src).await?;
    if !info.exists {
        return Err(CtlError::Api(crate::protocol::ErrorBody::new(
            crate::protocol::ErrorCode::NotFound,
            format!("{src}: no such file or directory in worker {worker}"),
        )));
    }
    // Where to extract, and under which name, following docker cp: into an
    // existing directory under the source's name, else onto DST. Either
    // way every entry is put under that one name: an archive whose entries
    // are named otherwise (a hostile server's `.bashrc`, `.git/hooks/…`)
    // cannot write beside it in the directory.
    let (into, rename) = if dst.is_dir() {
        // A source without a name of its own (`/`, `.`, `x/..`) would have
        // its entries land in DST under whatever names they carry.
        let name = Path::new(src.trim_end_matches('/'))
            .file_name()
            .ok_or_else(|| {
                local(format!(
                    "{src} has no name to copy into {} under: give a new path as the destination (e.g. {}/copy)",
                    dst.display(),
                    dst.display()
                ))
            })?;
        (dst.to_path_buf(), Some(name.to_os_string()))
    } else {
        let parent = dst
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(local(format!("{}: no such directory", parent.display())));
        }
        let name = dst
            .file_name()
            .ok_or_else(|| local(format!("invalid destination {}", dst.display())))?;
        (parent.to_path_buf(), Some(name.to_os_string()))
    };
    let rb = client
        .request(
            Method::GET,
            &format!("{}/archive", super::worker_path(worker)),
        )
        .query(&[("path", src)]);
    let resp = client.send(rb).await?;
    let pb = progress(if info.is_dir { 0 } else { info.size });
    let pb2 = pb.clone();
    let stream = resp
        .bytes_stream()
        .inspect_ok(move |b| pb2.inc(b.len() as u64))
        .map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let total = tokio::task::spawn_blocking(move || {
        super::extract::extract(reader, &into, rename.as_deref())
    })
    .await
    .map_err(local)??;
    pb.finish_and_clear();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_syntax() {
        assert_eq!(
            CpTarget::parse("shop/web:/srv"),
            CpTarget::Worker {
                worker: "shop/web".into(),
                path: "/srv".into()
            }
        );
        assert_eq!(
            CpTarget::parse("./shop/web:/srv"),
            CpTarget::Local(PathBuf::from("./shop/web:/srv"))
        );
        assert_eq!(
            CpTarget::parse("w1:/tmp/x"),
            CpTarget::Worker {
                worker: "w1".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(CpTarget::parse("./a:b"), CpTarget::Local("./a:b".into()));
        assert_eq!(
            CpTarget::parse("/abs/a:b"),
            CpTarget::Local("/abs/a:b".into())
        );
        assert_eq!(CpTarget::parse("file"), CpTarget::Local("file".into()));
        assert_eq!(
            CpTarget::parse("w:"),
            CpTarget::Worker {
                worker: "w".into(),
                path: "/".into()
            }
        );
    }

    #[test]
    fn parent_and_base() {
        assert_eq!(parent_of("/tmp/x"), "/tmp");
        assert_eq!(parent_of("/x"), "/");
        assert_eq!(base_name("/tmp/x/"), Some("x".into()));
    }
}
