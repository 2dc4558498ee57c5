//! Exec: create and start a process in a worker with stdout and stderr kept
//! apart (or a TTY), resize it, read its exit code.

use super::Error;
use super::joined::{Joined, Wait};
use crate::protocol::{ErrorBody, ErrorCode, Exec, StreamKind, TermSize};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::pin::Pin;
use std::time::Duration;
use tokio::io::AsyncWrite;

pub type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;
pub type Input = Pin<Box<dyn AsyncWrite + Send>>;

pub struct Started {
    pub exec_id: String,
    pub output: Output,
    pub input: Input,
}

/// Creates the exec of `req` in `container` (the worker's container name
/// or id); nothing runs until [`attach`].
pub async fn create(docker: &Docker, container: &str, req: &Exec) -> Result<String, Error> {
    if req.cmd.is_empty() {
        return Err(ErrorBody::new(ErrorCode::InvalidRequest, "exec needs a command").into());
    }
    let env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let created = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdin: Some(req.stdin),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(req.tty),
                cmd: Some(req.cmd.clone()),
                env: (!env.is_empty()).then_some(env),
                working_dir: req.workdir.clone(),
                user: req.user.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            let e = Error::engine(e, "create exec");
            if e.code() != ErrorCode::Conflict {
                return e;
            }
            let b = ErrorBody::from(e);
            let msg = format!("worker {} is not running ({})", req.worker_id, b.message);
            ErrorBody::new(b.code, msg).into()
        })?;
    Ok(created.id)
}

/// Starts a created exec and attaches to its streams.
pub async fn attach(docker: &Docker, exec_id: String, tty: bool) -> Result<Started, Error> {
    let started = docker
        .start_exec(
            &exec_id,
            Some(StartExecOptions {
                detach: false,
                tty,
                output_capacity: Some(64 * 1024),
            }),
        )
        .await
        .map_err(|e| Error::engine(e, "start exec"))?;
    match started {
        StartExecResults::Attached { output, input } => Ok(Started {
            exec_id,
            output,
            input,
        }),
        StartExecResults::Detached => {
            Err(ErrorBody::new(ErrorCode::Internal, "exec started detached").into())
        }
    }
}

pub async fn resize(docker: &Docker, exec_id: &str, size: TermSize) -> Result<(), Error> {
    docker
        .resize_exec(
            exec_id,
            bollard::exec::ResizeExecOptions {
                width: size.cols,
                height: size.rows,
            },
        )
        .await
        .map_err(|e| Error::engine(e, "resize exec"))
}

/// Exit code of a finished exec. The output stream can end a moment before
/// Docker records the exit, so poll: soon at first (it is usually a matter
/// of a millisecond), then every 10 ms, for about 2 s in all.
pub async fn exit_code(docker: &Docker, exec_id: &str) -> Result<i64, Error> {
    let mut pause = Duration::from_millis(1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let i = docker
            .inspect_exec(exec_id)
            .await
            .map_err(|e| Error::engine(e, "inspect exec"))?;
        if i.running != Some(true)
            && let Some(code) = i.exit_code
        {
            return Ok(code);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ErrorBody::new(
                ErrorCode::Timeout,
                "exec output ended but Docker reports no exit code",
            )
            .into());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Kills an exec's process and everything it started, when the agent can
/// see the host's processes (a host process, or a container with the host
/// PID namespace). Returns how many processes were signalled.
pub async fn kill(docker: &Docker, exec_id: &str) -> Result<usize, Error> {
    let info = docker
        .inspect_exec(exec_id)
        .await
        .map_err(|e| Error::engine(e, "inspect exec"))?;
    let Some(pid) = info.pid.filter(|p| *p > 0) else {
        return Ok(0); // already gone
    };
    // Only if that PID is really this container's process here: an agent in
    // its own PID namespace may see an unrelated process with that number.
    let container = info.container_id.unwrap_or_default();
    // A scan of /proc: off the async runtime (the agent's has one thread).
    let tree = tokio::task::spawn_blocking(move || {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if !container.is_empty() && cgroup.contains(&container) {
            process_tree(pid as i32)
        } else {
            Vec::new()
        }
    })
    .await
    .unwrap_or_default();
    if tree.is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::Unsupported,
            format!(
                "process {pid} is not visible to the agent (run it with the host PID namespace to kill execs)"
            ),
        ).into());
    }
    let mut n = 0;
    for p in tree {
        if let Some(p) = rustix::process::Pid::from_raw(p)
            && rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok()
        {
            n += 1;
        }
    }
    Ok(n)
}

/// `root` and all its descendants, from /proc.
fn process_tree(root: i32) -> Vec<i32> {
    if !std::path::Path::new(&format!("/proc/{root}")).exists() {
        return Vec::new();
    }
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // Fields after the command name, which may contain spaces.
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid: i32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// Splits Docker's multiplexed output into the protocol's streams.
fn split(item: LogOutput) -> Option<(StreamKind, Bytes)> {
    match item {
        LogOutput::StdOut { message } | LogOutput::Console { message } => {
            Some((StreamKind::Stdout, message))
        }
        LogOutput::StdErr { message } => Some((StreamKind::Stderr, message)),
        LogOutput::StdIn { .. } => None,
    }
}

/// Exec or logs output as the agent forwards it: Docker's pieces of each
/// stream joined into chunks of up to `max` bytes ([`Joined`]); a bulk
/// piece waits up to [`LINGER`](super::joined::LINGER) for more.
///
/// An attached exec's output waits [`Wait::Asleep`]: it is read straight
/// from the hijacked socket, so what Docker writes meanwhile piles up in
/// the socket's buffer. A logs response is an HTTP body, which the client
/// reads from the socket only when asked for the next piece: it waits
/// [`Wait::Reading`].
pub fn joined(
    output: impl Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send + 'static,
    max: usize,
    wait: Wait,
) -> Joined<bollard::errors::Error> {
    let pieces = output.filter_map(|r| std::future::ready(r.map(split).transpose()));
    Joined::forwarded(Box::pin(pieces), max, wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::joined::LINGER;
    use futures_util::FutureExt;
    use tokio::sync::mpsc;

    /// Exec output and logs both join bulk output (each its own way, see
    /// `Joined`); stdin echoes are dropped, stderr stays stderr.
    #[tokio::test(start_paused = true)]
    async fn output_is_split_and_bulk_waits_for_more() {
        for wait in [Wait::Asleep, Wait::Reading] {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let inner = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let mut j = joined(inner, 64 * 1024, wait);
            let piece = |b: u8| Bytes::from(vec![b; 8192]);
            tx.send(Ok(LogOutput::StdIn {
                message: piece(b'i'),
            }))
            .unwrap();
            tx.send(Ok(LogOutput::StdErr {
                message: piece(b'e'),
            }))
            .unwrap();
            assert!(j.next().now_or_never().is_none(), "{wait:?}: bulk waits");
            tokio::time::advance(LINGER).await;
            let (kind, data) = j.next().await.unwrap().unwrap();
            assert_eq!((kind, data), (StreamKind::Stderr, piece(b'e')), "{wait:?}");
        }
    }
}
