//! The replica-scale load generator spread over child processes. One
//! process holds one socket per simulated agent, and the open-file limit is
//! per process: 30,000 agents in one load generator do not fit a 20,000
//! limit, 10,000 in each of three do. A child is this binary run with
//! `--fleet-child SPEC`: it brings its agents up, prints their worker ids as
//! one JSON line, then a JSON line with its connection counts whenever they
//! change, and stops its agents when its stdin closes.

use crate::scale::Fleet;
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::task::JoinHandle;

/// Agents one child process plays at most.
pub(crate) const PER_CHILD: usize = 10_000;

/// What a child plays: agents `first..first + count` of the fleet.
#[derive(Serialize, Deserialize)]
pub(crate) struct ChildSpec {
    pub ports: Vec<u16>,
    pub psk: String,
    pub run: String,
    pub first: usize,
    pub count: usize,
}

/// The child's first line: its agents' worker ids and why it stopped short.
#[derive(Serialize, Deserialize)]
struct Grown {
    workers: Vec<String>,
    error: Option<String>,
}

/// The child's later lines: connections up, in all and by server.
#[derive(Serialize, Deserialize, PartialEq, Clone, Default)]
struct Counts {
    live: usize,
    live_at: Vec<usize>,
}

/// Runs as a child: plays the agents of `spec` until stdin closes.
pub(crate) async fn child(spec: &str) -> anyhow::Result<()> {
    let spec: ChildSpec = serde_json::from_str(spec).context("--fleet-child SPEC")?;
    let mut fleet = Fleet::new(spec.ports, &spec.psk, &spec.run).starting_at(spec.first);
    let error = fleet.grow(spec.first + spec.count).await;
    let grown = Grown {
        workers: fleet.workers.clone(),
        error,
    };
    println!("{}", serde_json::to_string(&grown)?);
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let mut last = Counts::default();
    loop {
        tokio::select! {
            n = stdin.read(&mut sink) => if !matches!(n, Ok(n) if n > 0) { break },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                let now = Counts {
                    live: fleet.live.load(Ordering::SeqCst),
                    live_at: fleet.live_at.iter().map(|a| a.load(Ordering::SeqCst)).collect(),
                };
                if now != last {
                    println!("{}", serde_json::to_string(&now)?);
                    last = now;
                }
            }
        }
    }
    fleet.shutdown().await;
    Ok(())
}

/// The fleet as the parent sees it: the children's counts summed.
pub(crate) struct ProcFleet {
    ports: Vec<u16>,
    psk: String,
    run: String,
    pub(crate) http: reqwest::Client,
    /// Connections currently up.
    pub(crate) live: Arc<AtomicUsize>,
    /// Connections currently up, by index in `ports`.
    pub(crate) live_at: Arc<Vec<AtomicUsize>>,
    /// Worker id of each agent that registered.
    pub(crate) workers: Vec<String>,
    children: Vec<(Child, ChildStdin, JoinHandle<()>)>,
}

impl ProcFleet {
    pub(crate) fn new(ports: Vec<u16>, psk: &str, run: &str) -> ProcFleet {
        let live_at = Arc::new(ports.iter().map(|_| AtomicUsize::new(0)).collect());
        ProcFleet {
            ports,
            psk: psk.into(),
            run: run.into(),
            http: tether::http_client(),
            live: Arc::new(AtomicUsize::new(0)),
            live_at,
            workers: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Brings the fleet up to `target` agents, `PER_CHILD` to a child, the
    /// children ramping up at once; returns the first error a child met.
    pub(crate) async fn grow(&mut self, target: usize) -> Option<String> {
        let mut starting = Vec::new();
        let mut first = self.workers.len();
        while first < target {
            let count = PER_CHILD.min(target - first);
            starting.push(self.start_child(first, count));
            first += count;
        }
        let mut first_error = None;
        for r in futures_util::future::join_all(starting).await {
            match r {
                Ok((workers, error, child)) => {
                    self.workers.extend(workers);
                    self.children.push(child);
                    if let Some(e) = error {
                        first_error.get_or_insert(e);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(format!("{e:#}"));
                }
            }
        }
        first_error
    }

    async fn start_child(
        &self,
        first: usize,
        count: usize,
    ) -> anyhow::Result<(
        Vec<String>,
        Option<String>,
        (Child, ChildStdin, JoinHandle<()>),
    )> {
        let spec = serde_json::to_string(&ChildSpec {
            ports: self.ports.clone(),
            psk: self.psk.clone(),
            run: self.run.clone(),
            first,
            count,
        })?;
        let exe: PathBuf = std::env::current_exe().context("the benchmark's own binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--fleet-child")
            .arg(spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start a load-generator process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let mut lines = BufReader::new(child.stdout.take().context("child stdout")?).lines();
        let Some(line) = lines.next_line().await? else {
            bail!("a load-generator process ended before its agents were up");
        };
        let grown: Grown = serde_json::from_str(&line).context("a load generator's report")?;
        let (live, live_at) = (self.live.clone(), self.live_at.clone());
        // Each report replaces the child's last one: the totals move by the
        // difference.
        let reader = tokio::spawn(async move {
            let mut last = Counts {
                live: 0,
                live_at: vec![0; live_at.len()],
            };
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(now) = serde_json::from_str::<Counts>(&line) else {
                    continue;
                };
                apply(&live, now.live, last.live);
                for (k, total) in live_at.iter().enumerate() {
                    let (n, l) = (now.live_at.get(k), last.live_at.get(k));
                    apply(total, *n.unwrap_or(&0), *l.unwrap_or(&0));
                }
                last = now;
            }
            // A child gone: its agents are gone too.
            apply(&live, 0, last.live);
            for (k, total) in live_at.iter().enumerate() {
                apply(total, 0, *last.live_at.get(k).unwrap_or(&0));
            }
        });
        Ok((grown.workers, grown.error, (child, stdin, reader)))
    }

    /// Stops every child: stdin closed (each closes its agents' sockets),
    /// killed after 30 s if still there.
    pub(crate) async fn shutdown(&mut self) {
        for (mut child, stdin, reader) in self.children.drain(..) {
            drop(stdin);
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            let _ = reader.await;
        }
    }
}

fn apply(total: &AtomicUsize, now: usize, last: usize) {
    if now >= last {
        total.fetch_add(now - last, Ordering::SeqCst);
    } else {
        total.fetch_sub(last - now, Ordering::SeqCst);
    }
}
