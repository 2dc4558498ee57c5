//! Exec: create and start a process in a worker with stdout and stderr kept
//! apart (or a TTY), resize it, read its exit code.

use super::{object_name, to_error};
use crate::protocol::{ErrorBody, ErrorCode, Exec, StreamKind, TermSize};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};

pub type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;
pub type Input = Pin<Box<dyn AsyncWrite + Send>>;

pub struct Started {
    pub exec_id: String,
    pub output: Output,
    pub input: Input,
}

/// Creates the exec (nothing runs until [`attach`]).
pub async fn create(docker: &Docker, req: &Exec) -> Result<String, ErrorBody> {
    if req.cmd.is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            "exec needs a command",
        ));
    }
    let env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let created = docker
        .create_exec(
            &object_name(&req.worker_id),
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
            let mut e = to_error(e, "create exec");
            if e.code == ErrorCode::Conflict {
                e.message = format!("worker {} is not running ({})", req.worker_id, e.message);
            }
            e
        })?;
    Ok(created.id)
}

/// Starts a created exec and attaches to its streams.
pub async fn attach(docker: &Docker, exec_id: String, tty: bool) -> Result<Started, ErrorBody> {
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
        .map_err(|e| to_error(e, "start exec"))?;
    match started {
        StartExecResults::Attached { output, input } => Ok(Started {
            exec_id,
            output,
            input,
        }),
        StartExecResults::Detached => {
            Err(ErrorBody::new(ErrorCode::Internal, "exec started detached"))
        }
    }
}

pub async fn resize(docker: &Docker, exec_id: &str, size: TermSize) -> Result<(), ErrorBody> {
    docker
        .resize_exec(
            exec_id,
            bollard::exec::ResizeExecOptions {
                width: size.cols,
                height: size.rows,
            },
        )
        .await
        .map_err(|e| to_error(e, "resize exec"))
}

/// Exit code of a finished exec. The output stream can end a moment before
/// Docker records the exit, so poll: soon at first (it is usually a matter
/// of a millisecond), then every 10 ms, for about 2 s in all.
pub async fn exit_code(docker: &Docker, exec_id: &str) -> Result<i64, ErrorBody> {
    let mut pause = Duration::from_millis(1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let i = docker
            .inspect_exec(exec_id)
            .await
            .map_err(|e| to_error(e, "inspect exec"))?;
        if i.running != Some(true)
            && let Some(code) = i.exit_code
        {
            return Ok(code);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ErrorBody::new(
                ErrorCode::Timeout,
                "exec output ended but Docker reports no exit code",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Kills an exec's process and everything it started, when the agent can
/// see the host's processes (a host process, or a container with the host
/// PID namespace). Returns how many processes were signalled.
pub async fn kill(docker: &Docker, exec_id: &str) -> Result<usize, ErrorBody> {
    let info = docker
        .inspect_exec(exec_id)
        .await
        .map_err(|e| to_error(e, "inspect exec"))?;
    let Some(pid) = info.pid.filter(|p| *p > 0) else {
        return Ok(0); // already gone
    };
    // Only if that PID is really this container's process here: an agent in
    // its own PID namespace may see an unrelated process with that number.
    let container = info.container_id.unwrap_or_default();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let tree = if !container.is_empty() && cgroup.contains(&container) {
        process_tree(pid as i32)
    } else {
        Vec::new()
    };
    if tree.is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::Unsupported,
            format!(
                "process {pid} is not visible to the agent (run it with the host PID namespace to kill execs)"
            ),
        ));
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

/// Exec output as the agent forwards it: Docker's pieces of one stream
/// joined into chunks of up to `max` bytes.
///
/// Docker hands bulk output over in pieces of a few KiB, as the process
/// writes its pipe, and every piece forwarded on its own costs a frame, a
/// WebSocket write, a read on the server and a wake-up of each task on the
/// way. So when a piece of bulk size arrives and nothing more is ready yet,
/// the stream waits up to `linger` before it looks again, then joins all
/// that arrived meanwhile. Small pieces (a prompt, a line of text) and the
/// last piece before the end go out at once: interactive output is not
/// delayed, bulk output at most by `linger`.
pub struct Joined {
    inner: Output,
    /// A piece read but not joined (another stream, or no room left).
    held: Option<(StreamKind, Bytes)>,
    /// An error read after the chunk being built: reported next.
    error: Option<bollard::errors::Error>,
    ended: bool,
    kind: StreamKind,
    /// The chunk being built: its pieces, joined only if there are several.
    parts: Vec<Bytes>,
    len: usize,
    max: usize,
    bulk: usize,
    linger: Duration,
    timer: Pin<Box<Sleep>>,
    /// The timer runs: do not read until it fires.
    lingering: bool,
    /// This chunk waited once already: send what it has.
    lingered: bool,
}

/// Pieces of at least this many bytes count as bulk output.
pub const BULK_PIECE: usize = 2048;

/// How long bulk output may wait for more before it is forwarded. Long
/// enough for Docker to hand over a full frame's worth at the rates a
/// 2-core machine moves (about 130 KB per millisecond), and the timer's
/// resolution besides.
pub const LINGER: Duration = Duration::from_millis(1);

/// Output (of an exec or of logs) joined for forwarding in frames of
/// `max` bytes, with the agent's bulk threshold and linger.
pub fn joined(
    output: impl Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send + 'static,
    max: usize,
) -> Joined {
    Joined::new(Box::pin(output), max, BULK_PIECE, LINGER)
}

impl Joined {
    /// Pieces of at least `bulk` bytes may wait up to `linger` for more.
    pub fn new(inner: Output, max: usize, bulk: usize, linger: Duration) -> Joined {
        Joined {
            inner,
            held: None,
            error: None,
            ended: false,
            kind: StreamKind::Stdout,
            parts: Vec::new(),
            len: 0,
            max,
            bulk,
            linger,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            lingering: false,
            lingered: false,
        }
    }

    fn take(&mut self) -> (StreamKind, Bytes) {
        self.lingered = false;
        self.len = 0;
        let data = if self.parts.len() == 1 {
            self.parts.pop().unwrap_or_default()
        } else {
            let mut b = BytesMut::with_capacity(self.parts.iter().map(Bytes::len).sum());
            for p in self.parts.drain(..) {
                b.extend_from_slice(&p);
            }
            b.freeze()
        };
        (self.kind, data)
    }

    /// Adds a piece to the chunk if it belongs there; else holds it.
    fn add(&mut self, kind: StreamKind, data: Bytes) -> bool {
        if self.parts.is_empty() {
            self.kind = kind;
        } else if kind != self.kind || self.len + data.len() > self.max {
            self.held = Some((kind, data));
            return false;
        }
        self.len += data.len();
        self.parts.push(data);
        true
    }
}

impl Stream for Joined {
    type Item = Result<(StreamKind, Bytes), bollard::errors::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.lingering {
                ready!(this.timer.as_mut().poll(cx));
                this.lingering = false;
                this.lingered = true;
            }
            // Take in what is ready, up to a full chunk.
            let mut waiting = false;
            while this.held.is_none() && this.error.is_none() && !this.ended && this.len < this.max
            {
                match this.inner.as_mut().poll_next(cx) {
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                    Poll::Ready(None) => this.ended = true,
                    Poll::Ready(Some(Err(e))) => this.error = Some(e),
                    Poll::Ready(Some(Ok(o))) => {
                        if let Some((kind, data)) = split(o)
                            && !data.is_empty()
                        {
                            this.add(kind, data);
                        }
                    }
                }
            }
            if this.parts.is_empty() {
                if let Some((kind, data)) = this.held.take() {
                    this.add(kind, data);
                    continue;
                }
                if let Some(e) = this.error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                if this.ended {
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            }
            let bulk = this.parts.last().is_some_and(|p| p.len() >= this.bulk);
            if waiting && bulk && !this.lingered {
                let until = Instant::now() + this.linger;
                this.timer.as_mut().reset(until);
                this.lingering = true;
                continue;
            }
            return Poll::Ready(Some(Ok(this.take())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt};
    use tokio::sync::mpsc;

    type Item = Result<LogOutput, bollard::errors::Error>;

    /// A Docker output stream fed by hand, and the joined stream over it.
    fn fed(max: usize) -> (mpsc::UnboundedSender<Item>, Joined) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        let inner = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (
            tx,
            Joined::new(Box::pin(inner), max, 1000, Duration::from_millis(1)),
        )
    }

    fn out(n: usize, b: u8) -> Item {
        Ok(LogOutput::StdOut {
            message: Bytes::from(vec![b; n]),
        })
    }

    fn err(n: usize, b: u8) -> Item {
        Ok(LogOutput::StdErr {
            message: Bytes::from(vec![b; n]),
        })
    }

    /// The next chunk if one is ready now.
    fn now(j: &mut Joined) -> Option<Option<(StreamKind, usize)>> {
        j.next()
            .now_or_never()
            .map(|o| o.map(|r| r.map(|(k, b)| (k, b.len())).unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn small_pieces_go_out_at_once_bulk_waits_for_more() {
        let (tx, mut j) = fed(64 * 1024);
        tx.send(out(10, b'a')).unwrap();
        assert_eq!(now(&mut j), Some(Some((StreamKind::Stdout, 10))));
        assert_eq!(now(&mut j), None, "nothing more yet");
        // A bulk piece waits for the linger; what arrives meanwhile joins it.
        tx.send(out(4000, b'b')).unwrap();
        assert_eq!(now(&mut j), None, "a bulk piece lingers");
        tx.send(out(3000, b'c')).unwrap();
        tokio::time::advance(Duration::from_micros(500)).await;
        assert_eq!(now(&mut j), None, "still within the linger");
        tokio::time::advance(Duration::from_micros(600)).await;
        let (kind, data) = j.next().await.unwrap().unwrap();
        assert_eq!(kind, StreamKind::Stdout);
        let mut want = vec![b'b'; 4000];
        want.extend(vec![b'c'; 3000]);
        assert_eq!(&data[..], &want[..]);
        // The end comes through once the sender is gone.
        drop(tx);
        assert_eq!(j.next().await.map(|r| r.is_ok()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_keep_streams_apart_in_order_and_within_max() {
        let (tx, mut j) = fed(10_000);
        for _ in 0..3 {
            tx.send(out(4000, b'o')).unwrap();
        }
        tx.send(err(100, b'e')).unwrap();
        tx.send(out(5, b'p')).unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(r) = j.next().await {
            let (k, b) = r.unwrap();
            got.push((k, b.len()));
        }
        assert_eq!(
            got,
            [
                (StreamKind::Stdout, 8000),
                (StreamKind::Stdout, 4000),
                (StreamKind::Stderr, 100),
                (StreamKind::Stdout, 5),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_comes_after_the_data_before_it() {
        let (tx, mut j) = fed(64 * 1024);
        tx.send(out(3000, b'x')).unwrap();
        tx.send(Err(bollard::errors::Error::DockerStreamError {
            error: "boom".into(),
        }))
        .unwrap();
        let (_, data) = j.next().await.unwrap().unwrap();
        assert_eq!(data.len(), 3000);
        assert!(j.next().await.unwrap().is_err());
    }

    /// Random pieces of two streams, fed with random pauses: each stream's
    /// bytes come out whole, in order, in chunks of at most `max`.
    #[tokio::test(start_paused = true)]
    async fn random_pieces_come_out_byte_exact() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (tx, mut j) = fed(8192);
        let mut sent: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut pieces = Vec::new();
        for i in 0..500u32 {
            let n = rng.random_range(1..5000);
            let b = (i % 251) as u8;
            let stderr = rng.random_bool(0.2);
            sent[stderr as usize].extend(std::iter::repeat_n(b, n));
            pieces.push((
                if stderr { err(n, b) } else { out(n, b) },
                rng.random_range(0..3u64),
            ));
        }
        let feeder = tokio::spawn(async move {
            for (p, pause) in pieces {
                tx.send(p).unwrap();
                if pause > 0 {
                    tokio::time::sleep(Duration::from_micros(pause * 400)).await;
                }
            }
        });
        let mut got: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        while let Some(r) = j.next().await {
            let (k, b) = r.unwrap();
            assert!(b.len() <= 8192, "chunk of {}", b.len());
            got[(k == StreamKind::Stderr) as usize].extend_from_slice(&b);
        }
        feeder.await.unwrap();
        assert_eq!(got, sent);
    }
}
