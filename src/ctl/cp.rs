//! `ctl cp SRC DST`: files and directories in both directions, docker-style
//! (`WORKER:PATH`), streamed as tar: never a whole file in memory.

use super::{Client, CtlError};
use crate::protocol::StatResult;
use futures_util::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
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
                if !w.is_empty() && !w.contains('/') {
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
        .request(Method::GET, &format!("/api/v1/workers/{worker}/stat"))
        .query(&[("path", path)]);
    client
        .send(rb)
        .await?
        .json()
        .await
        .map_err(|e| CtlError::Local(format!("bad stat reply: {e}")))
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
        .request(Method::PUT, &format!("/api/v1/workers/{worker}/archive"))
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

/// Maps an archive entry path to where it lands locally, refusing escapes.
fn entry_target(entry: &Path, into_dir: Option<&Path>, rename_to: &Path) -> Option<PathBuf> {
    let mut comps = entry
        .components()
        .filter(|c| !matches!(c, Component::CurDir));
    let first = comps.next()?;
    let Component::Normal(first) = first else {
        return None;
    };
    let mut out = match into_dir {
        Some(d) => d.join(first),
        None => rename_to.to_path_buf(),
    };
    for c in comps {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return None,
        }
    }
    Some(out)
}

async fn download(client: &Client, worker: &str, src: &str, dst: &Path) -> Result<u64, CtlError> {
    let info = stat(client, worker, src).await?;
    if !info.exists {
        return Err(CtlError::Api(crate::protocol::ErrorBody::new(
            crate::protocol::ErrorCode::NotFound,
            format!("{src}: no such file or directory in worker {worker}"),
        )));
    }
    let into_dir = dst.is_dir().then(|| dst.to_path_buf());
    if into_dir.is_none() {
        let parent = dst
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(local(format!("{}: no such directory", parent.display())));
        }
    }
    let rb = client
        .request(Method::GET, &format!("/api/v1/workers/{worker}/archive"))
        .query(&[("path", src)]);
    let resp = client.send(rb).await?;
    let pb = progress(if info.is_dir { 0 } else { info.size });
    let pb2 = pb.clone();
    let stream = resp
        .bytes_stream()
        .inspect_ok(move |b| pb2.inc(b.len() as u64))
        .map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let dst = dst.to_path_buf();
    let total = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut ar = tar::Archive::new(reader);
        ar.set_preserve_permissions(true);
        let mut total = 0u64;
        for entry in ar.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            let Some(target) = entry_target(&path, into_dir.as_deref(), &dst) else {
                return Err(std::io::Error::other(format!(
                    "refusing unsafe archive path {}",
                    path.display()
                )));
            };
            if let Some(p) = target.parent() {
                std::fs::create_dir_all(p)?;
            }
            total += entry.header().size().unwrap_or(0);
            entry.unpack(&target)?;
        }
        Ok(total)
    })
    .await
    .map_err(local)?
    .map_err(|e| local(format!("writing {}: {e}", "archive")))?;
    pb.finish_and_clear();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_syntax() {
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
    fn entry_targets_rename_and_refuse_escape() {
        let d = Path::new("/out");
        assert_eq!(
            entry_target(Path::new("f"), Some(d), Path::new("x")),
            Some("/out/f".into())
        );
        assert_eq!(
            entry_target(Path::new("dir/a/b"), None, Path::new("/new")),
            Some("/new/a/b".into())
        );
        assert_eq!(
            entry_target(Path::new("dir/../../etc"), None, Path::new("/new")),
            None
        );
        assert_eq!(
            entry_target(Path::new("/etc/passwd"), None, Path::new("/new")),
            None
        );
    }

    #[test]
    fn parent_and_base() {
        assert_eq!(parent_of("/tmp/x"), "/tmp");
        assert_eq!(parent_of("/x"), "/");
        assert_eq!(base_name("/tmp/x/"), Some("x".into()));
    }
}
