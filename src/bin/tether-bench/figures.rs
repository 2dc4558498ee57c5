//! Figures 1 to 6: each measured through tether (hub -> server -> WebSocket
//! -> agent -> Docker and back) and directly with bollard, interleaved in
//! the same run, after a warm-up. Exec round trips and file transfers are
//! also measured through the server's HTTP/WebSocket API as `tether ctl`
//! uses it (`*_api_*` figures: one more loopback hop, and for an exec a
//! connection of its own), against the same direct runs.

use crate::direct::{self, Ran};
use crate::procfs;
use crate::setup::{InProc, ulid, wait_online};
use crate::stats::{Figure, max, median, p99, paired_differences};
use anyhow::{Context, bail, ensure};
use bollard::Docker;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tether::protocol::{Resources, SpawnRequest};
use tether::server::{ExecOptions, Hub, StreamEvent};

const MIB: u64 = 1024 * 1024;

/// Sizes and counts of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Params {
    pub mode: &'static str,
    pub rtt_n: usize,
    pub rtt_warmup: usize,
    pub throughput_bytes: u64,
    pub file_bytes: u64,
    /// Repetitions of each exec output transfer (median reported).
    pub reps: usize,
    /// Repetitions of each file transfer: the engine's extraction scatters
    /// by +-30% from one to the next, so more of them.
    pub file_reps: usize,
    pub spawn_n: usize,
    pub concurrent_n: usize,
    pub agent_streams: usize,
    pub agent_stream_bytes: u64,
    pub scale_steps: Vec<usize>,
    pub dispatch_samples: usize,
}

impl Params {
    pub fn new(quick: bool) -> Params {
        if quick {
            Params {
                mode: "quick",
                rtt_n: 100,
                rtt_warmup: 10,
                throughput_bytes: 128 * MIB,
                file_bytes: 64 * MIB,
                reps: 3,
                file_reps: 3,
                spawn_n: 5,
                concurrent_n: 200,
                agent_streams: 20,
                agent_stream_bytes: 10_000_000,
                scale_steps: vec![1000],
                dispatch_samples: 300,
            }
        } else {
            Params {
                mode: "full",
                rtt_n: 500,
                rtt_warmup: 20,
                throughput_bytes: 1024 * MIB,
                file_bytes: 256 * MIB,
                reps: 5,
                file_reps: 9,
                spawn_n: 20,
                concurrent_n: 1000,
                agent_streams: 100,
                agent_stream_bytes: 10_000_000,
                scale_steps: vec![1000, 10_000],
                dispatch_samples: 1000,
            }
        }
    }
}

/// Everything the sections share.
pub struct Bench {
    pub p: Params,
    pub t: InProc,
    pub docker: Docker,
    /// Run id, on the labels of the baseline's objects.
    pub run: String,
    pub image: String,
    pub agent_bin: PathBuf,
    pub dir: PathBuf,
    /// The worker both sides exec in (a tether worker; the baseline reaches
    /// the same container by name).
    pub worker: String,
    pub container: String,
    /// Nodes of agents run as separate processes (their leftovers are removed).
    pub proc_nodes: Vec<String>,
    pub notes: Vec<String>,
}

/// Fails with a clear error instead of waiting forever.
pub async fn limit<T>(
    secs: u64,
    what: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(r) => r,
        Err(_) => bail!("{what}: no answer within {secs} s"),
    }
}

pub(crate) fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub(crate) fn secs_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Seconds of CPU this process used in `f`: the client's, and for tether
/// also the server's and the agent's, which run in this process. What the
/// engine spends is not counted.
async fn cpu_of<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, f64)> {
    let me = std::process::id();
    let before = procfs::cpu_ticks(me)?;
    let r = f.await?;
    let ticks = procfs::cpu_ticks(me)?.saturating_sub(before);
    Ok((r, ticks as f64 / *CLOCK_TICKS as f64))
}

/// Runs `run(side)` `reps` times for each of `N` sides (0: tether, 1:
/// direct, 2: tether through the HTTP API where there is one), rotating
/// which goes first, each after `setup` (not measured). Returns each side's
/// results in order and the CPU seconds this process used in its runs.
pub(crate) async fn alternate<const N: usize, T, S, R>(
    reps: usize,
    setup: impl Fn() -> S,
    run: impl Fn(usize) -> R,
) -> anyhow::Result<([Vec<T>; N], [f64; N])>
where
    S: std::future::Future<Output = anyhow::Result<()>>,
    R: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut out = std::array::from_fn(|_| Vec::new());
    let mut cpu = [0.0; N];
    for i in 0..reps {
        for k in 0..N {
            let side = (i + k) % N;
            setup().await?;
            let (r, s) = cpu_of(run(side)).await?;
            cpu[side] += s;
            out[side].push(r);
        }
    }
    Ok((out, cpu))
}

static CLOCK_TICKS: std::sync::LazyLock<u64> = std::sync::LazyLock::new(procfs::clock_ticks);

/// A CPU-cost figure: milliseconds of this process's CPU per MB moved.
fn cpu_figure(name: &str, cpu_s: [f64; 2], bytes: u64) -> Figure {
    let mb = bytes as f64 / 1e6;
    let per_mb = |s: f64| Some(s * 1000.0 / mb);
    Figure::new(name, "ms/MB", per_mb(cpu_s[0]), per_mb(cpu_s[1]))
}

/// Runs `cmd` through tether to completion, counting output bytes.
pub async fn tether_exec(hub: &Hub, worker: &str, cmd: &[String]) -> anyhow::Result<Ran> {
    let mut s = hub
        .exec(
            worker,
            ExecOptions {
                cmd: cmd.to_vec(),
                ..Default::default()
            },
        )
        .await?;
    let mut bytes = 0u64;
    loop {
        match s.output.next().await {
            Some(StreamEvent::Data(_, b)) => bytes += b.len() as u64,
            Some(StreamEvent::Gap(n)) => bail!("{n} bytes of output lost"),
            Some(StreamEvent::Eof) => {}
            Some(StreamEvent::End { error: Some(e), .. }) => return Err(e.into()),
            Some(StreamEvent::End { exit_code, .. }) => {
                return Ok(Ran {
                    exit: exit_code.unwrap_or(-1),
                    bytes,
                });
            }
            None => bail!("exec ended without an exit"),
        }
    }
}

impl Bench {
    /// Spawns the worker the exec and file figures use.
    pub async fn spawn_worker(&mut self) -> anyhow::Result<()> {
        let w = self
            .t
            .hub
            .spawn(SpawnRequest {
                image: self.image.clone(),
                cmd: cmd(&["sleep", "3600"]),
                node_id: Some(self.t.node.clone()),
                // Room for 1,000 concurrent execs and a 256 MiB file.
                resources: Resources {
                    pids: Some(4096),
                    memory_mb: Some(1024),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await
            .context("spawn the benchmark worker")?;
        self.container = w.container_id.clone();
        self.worker = w.worker_id;
        Ok(())
    }

    async fn tether(&self, c: &[String]) -> anyhow::Result<(Duration, Ran)> {
        let t0 = Instant::now();
        let r = limit(
            900,
            "tether exec",
            tether_exec(&self.t.hub, &self.worker, c),
        )
        .await?;
        Ok((t0.elapsed(), r))
    }

    async fn direct(&self, c: &[String]) -> anyhow::Result<(Duration, Ran)> {
        let t0 = Instant::now();
        let r = limit(
            900,
            "direct exec",
            direct::exec(&self.docker, &self.container, c),
        )
        .await?;
        Ok((t0.elapsed(), r))
    }

    async fn api(&self, c: &[String]) -> anyhow::Result<(Duration, Ran)> {
        limit(
            900,
            "tether exec over the API",
            self.t.api.exec(&self.worker, c),
        )
        .await
    }

    /// An exec on side 0 (tether through the hub), 1 (direct) or 2 (tether
    /// through the API), as [`alternate`] numbers them.
    async fn exec_side(&self, side: usize, c: &[String]) -> anyhow::Result<(Duration, Ran)> {
        match side {
            0 => self.tether(c).await,
            1 => self.direct(c).await,
            _ => self.api(c).await,
        }
    }

    /// Figure 1: Sequential `true` round trips.
    pub async fn exec_rtt(&mut self) -> anyhow::Result<Vec<Figure>> {
        let c = cmd(&["true"]);
        for _ in 0..self.p.rtt_warmup {
            for side in 0..3 {
                self.exec_side(side, &c).await?;
            }
        }
        let exits = direct::EXITS.load(Ordering::Relaxed);
        let late = direct::EXITS_LATE.load(Ordering::Relaxed);
        let (this, c) = (&*self, &c);
        // Round i holds t[i], d[i] and a[i].
        let ([t, d, a], _) = alternate(
            this.p.rtt_n,
            || async { Ok(()) },
            |side| async move {
                let (dt, r) = this.exec_side(side, c).await?;
                ensure!(r.exit == 0, "`true` failed");
                Ok(secs_ms(dt))
            },
        )
        .await?;
        let exits = direct::EXITS.load(Ordering::Relaxed) - exits;
        let late = direct::EXITS_LATE.load(Ordering::Relaxed) - late;
        self.notes.push(format!(
            "exec: in {late} of {exits} direct execs the engine still reported the exec running when its output ended (a direct client polls every 1 ms; tether's agent polls after 1, 2, 4 and 8 ms, then every 10 ms)"
        ));
        // Each tether exec ran in the same round as a direct one: the median
        // of the pairs' differences cancels drift in the engine's own time.
        let added = paired_differences(&t, &d);
        let api_added = paired_differences(&a, &d);
        Ok(vec![
            Figure::new("exec_rtt_p50_ms", "ms", median(&t), median(&d)),
            Figure::new("exec_rtt_p99_ms", "ms", p99(&t), p99(&d)),
            Figure::solo("exec_rtt_added_p50_ms", "ms", median(&added)),
            Figure::new("exec_rtt_api_p50_ms", "ms", median(&a), median(&d)),
            Figure::new("exec_rtt_api_p99_ms", "ms", p99(&a), p99(&d)),
            Figure::solo("exec_rtt_api_added_p50_ms", "ms", median(&api_added)),
        ])
    }

    /// A trivial `sandbox.exec` through MCP against `tether ctl exec` (the
    /// API's WebSocket) to the same worker, alternated.
    pub async fn mcp(&mut self) -> anyhow::Result<Vec<Figure>> {
        let api = &self.t.api;
        api.mcp_allow(&self.t.node).await?;
        let session = api.mcp_session().await?;
        let (_, sb) = api
            .mcp_call(
                &session,
                "sandbox.create",
                serde_json::json!({"task_id": "bench", "image": self.image, "cmd": ["sleep", "3600"]}),
            )
            .await?;
        let worker = sb["worker_id"]
            .as_str()
            .context("a sandbox id")?
            .to_string();
        let (this, worker, session) = (&*self, worker.as_str(), session.as_str());
        let c = cmd(&["true"]);
        let c = &c;
        let run = |side: usize| async move {
            if side == 0 {
                let (dt, r) = this
                    .t
                    .api
                    .mcp_call(
                        session,
                        "sandbox.exec",
                        serde_json::json!({"task_id": "bench", "worker_id": worker, "argv": ["true"]}),
                    )
                    .await?;
                ensure!(r["exit_code"] == 0, "`true` failed through MCP: {r}");
                Ok(secs_ms(dt))
            } else {
                let (dt, r) = this.t.api.exec(worker, c).await?;
                ensure!(r.exit == 0, "`true` failed through the API");
                Ok(secs_ms(dt))
            }
        };
        for _ in 0..self.p.rtt_warmup {
            run(0).await?;
            run(1).await?;
        }
        let r = alternate(self.p.rtt_n, || async { Ok(()) }, run).await;
        let destroyed = this
            .t
            .api
            .mcp_call(
                session,
                "sandbox.destroy",
                serde_json::json!({"task_id": "bench", "worker_id": worker}),
            )
            .await;
        let ([m, a], _) = r?;
        destroyed?;
        Ok(vec![
            Figure::new("mcp_exec_rtt_p50_ms", "ms", median(&m), median(&a)),
            Figure::solo(
                "mcp_exec_rtt_added_ms",
                "ms",
                median(&paired_differences(&m, &a)),
            ),
        ])
    }

    /// Figure 2: Bulk output of one exec to the client.
    pub async fn throughput(&mut self) -> anyhow::Result<Vec<Figure>> {
        let n = self.p.throughput_bytes;
        let warm = cmd(&["head", "-c", &MIB.to_string(), "/dev/zero"]);
        for side in 0..3 {
            self.exec_side(side, &warm).await?;
        }
        let c = cmd(&["head", "-c", &n.to_string(), "/dev/zero"]);
        let (this, c) = (&*self, &c);
        let ([t, d, a], cpu) = alternate(
            this.p.reps,
            || async { Ok(()) },
            |side| async move {
                let (dt, r) = this.exec_side(side, c).await?;
                ensure!(
                    r.exit == 0 && r.bytes == n,
                    "throughput run got {} of {n} bytes, exit {}",
                    r.bytes,
                    r.exit
                );
                Ok(mb_s(n, dt))
            },
        )
        .await?;
        let bytes = n * self.p.reps as u64;
        Ok(vec![
            Figure::new("exec_throughput_mb_s", "MB/s", median(&t), median(&d)),
            cpu_figure("exec_throughput_cpu_ms_per_mb", [cpu[0], cpu[1]], bytes),
            Figure::new("exec_throughput_api_mb_s", "MB/s", median(&a), median(&d)),
            cpu_figure("exec_throughput_api_cpu_ms_per_mb", [cpu[2], cpu[1]], bytes),
        ])
    }

    async fn tether_put(&self, name: &str, size: u64) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        limit(900, "tether put", async {
            let mut up = self.t.hub.put_archive(&self.worker, "/tmp").await?;
            for chunk in direct::tar_chunks(name, size) {
                up.write(chunk).await?;
            }
            Ok(up.finish().await?)
        })
        .await?;
        Ok(t0.elapsed())
    }

    async fn direct_put(&self, name: &str, size: u64) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let up = direct::upload(&self.docker, &self.container, "/tmp", name, size);
        limit(900, "direct put", up).await?;
        Ok(t0.elapsed())
    }

    async fn api_put(&self, name: &str, size: u64) -> anyhow::Result<Duration> {
        let up = self.t.api.put(&self.worker, "/tmp", name, size);
        limit(900, "tether put over the API", up).await
    }

    async fn api_get(&self, path: &str) -> anyhow::Result<(Duration, u64)> {
        limit(
            900,
            "tether get over the API",
            self.t.api.get(&self.worker, path),
        )
        .await
    }

    async fn tether_get(&self, path: &str) -> anyhow::Result<(Duration, u64)> {
        let t0 = Instant::now();
        let n = limit(900, "tether get", async {
            let mut s = self.t.hub.get_archive(&self.worker, path).await?;
            let mut n = 0u64;
            loop {
                match s.next().await {
                    Some(StreamEvent::Data(_, b)) => n += b.len() as u64,
                    Some(StreamEvent::Gap(g)) => bail!("{g} bytes of the archive lost"),
                    Some(StreamEvent::Eof) => {}
                    Some(StreamEvent::End { error: Some(e), .. }) => return Err(e.into()),
                    Some(StreamEvent::End { .. }) | None => return Ok(n),
                }
            }
        })
        .await?;
        Ok((t0.elapsed(), n))
    }

    async fn direct_get(&self, path: &str) -> anyhow::Result<(Duration, u64)> {
        let t0 = Instant::now();
        let get = direct::download(&self.docker, &self.container, path);
        let n = limit(900, "direct get", get).await?;
        Ok((t0.elapsed(), n))
    }

    async fn sh(&self, script: &str) -> anyhow::Result<()> {
        let c = cmd(&["sh", "-c", script]);
        let r = limit(300, script, direct::exec(&self.docker, &self.container, &c)).await?;
        ensure!(r.exit == 0, "`{script}` exited with {}", r.exit);
        Ok(())
    }

    /// Figure 3: Archive upload and download of one file of zeros, through
    /// the hub, directly, and through the server's HTTP API.
    pub async fn files(&mut self) -> anyhow::Result<Vec<Figure>> {
        let n = self.p.file_bytes;
        let put = "bench-put.bin";
        self.tether_put(put, MIB).await?;
        self.direct_put(put, MIB).await?;
        self.api_put(put, MIB).await?;
        let (this, reps) = (&*self, self.p.file_reps);
        let rm = || this.sh("rm -f /tmp/bench-put.bin");
        let ([tp, dp, hp], put_cpu) = alternate(reps, rm, |side| async move {
            let dt = match side {
                0 => this.tether_put(put, n).await?,
                1 => this.direct_put(put, n).await?,
                _ => this.api_put(put, n).await?,
            };
            Ok(mb_s(n, dt))
        })
        .await?;
        self.sh(&format!(
            "test $(wc -c < /tmp/bench-put.bin) -eq {n} && rm -f /tmp/bench-put.bin"
        ))
        .await
        .context("the uploaded file has the wrong size")?;

        let get = "/tmp/bench-get.bin";
        self.sh(&format!("head -c {n} /dev/zero > {get}")).await?;
        self.tether_get(get).await?;
        self.direct_get(get).await?;
        self.api_get(get).await?;
        let ([tg, dg, hg], get_cpu) = alternate(
            reps,
            || async { Ok(()) },
            |side| async move {
                let (dt, len) = match side {
                    0 => this.tether_get(get).await?,
                    1 => this.direct_get(get).await?,
                    _ => this.api_get(get).await?,
                };
                ensure!(len > n, "archive of {len} bytes for a file of {n}");
                Ok(mb_s(n, dt))
            },
        )
        .await?;
        self.sh(&format!("rm -f {get}")).await?;
        let bytes = n * reps as u64;
        Ok(vec![
            Figure::new("file_put_mb_s", "MB/s", median(&tp), median(&dp)),
            Figure::new("file_get_mb_s", "MB/s", median(&tg), median(&dg)),
            cpu_figure("file_put_cpu_ms_per_mb", [put_cpu[0], put_cpu[1]], bytes),
            cpu_figure("file_get_cpu_ms_per_mb", [get_cpu[0], get_cpu[1]], bytes),
            Figure::new("file_put_api_mb_s", "MB/s", median(&hp), median(&dp)),
            Figure::new("file_get_api_mb_s", "MB/s", median(&hg), median(&dg)),
            cpu_figure(
                "file_put_api_cpu_ms_per_mb",
                [put_cpu[2], put_cpu[1]],
                bytes,
            ),
            cpu_figure(
                "file_get_api_cpu_ms_per_mb",
                [get_cpu[2], get_cpu[1]],
                bytes,
            ),
        ])
    }

    async fn tether_spawn(&self) -> anyhow::Result<Duration> {
        limit(300, "tether spawn", self.tether_spawn_once()).await
    }

    async fn tether_spawn_once(&self) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let w = self
            .t
            .hub
            .spawn(SpawnRequest {
                image: self.image.clone(),
                cmd: cmd(&["sleep", "3600"]),
                node_id: Some(self.t.node.clone()),
                ..Default::default()
            })
            .await?;
        let dt = t0.elapsed();
        ensure!(
            w.state == tether::protocol::WorkerState::Running,
            "spawned worker is {}",
            w.state
        );
        self.t.hub.remove(&w.worker_id, true).await?;
        Ok(dt)
    }

    async fn direct_spawn(&self, i: usize) -> anyhow::Result<Duration> {
        // Subnets outside the agents' pools (10.212/16, 10.213/16).
        let (hi, lo) = (i / 16 % 256, (i % 16) * 16);
        let subnet = format!("10.214.{hi}.{lo}/28");
        let gateway = format!("10.214.{hi}.{}", lo + 1);
        let name = format!("tether-bench-{}", ulid());
        let t0 = Instant::now();
        let r = limit(
            300,
            "direct spawn",
            direct::spawn(
                &self.docker,
                &self.run,
                &name,
                &subnet,
                &gateway,
                &self.image,
            ),
        )
        .await;
        let dt = t0.elapsed();
        direct::remove(&self.docker, &name).await;
        r.map(|()| dt)
    }

    /// Figure 4: Time until a new worker (with its network) runs.
    pub async fn spawn(&mut self) -> anyhow::Result<Vec<Figure>> {
        self.tether_spawn().await?;
        self.direct_spawn(0).await?;
        let (mut t, mut d) = (Vec::new(), Vec::new());
        for i in 0..self.p.spawn_n {
            if i % 2 == 0 {
                t.push(secs_ms(self.tether_spawn().await?));
                d.push(secs_ms(self.direct_spawn(i + 1).await?));
            } else {
                d.push(secs_ms(self.direct_spawn(i + 1).await?));
                t.push(secs_ms(self.tether_spawn().await?));
            }
        }
        Ok(vec![Figure::new("spawn_ms", "ms", median(&t), median(&d))])
    }

    /// `n` concurrent `true` execs: total seconds and the slowest one.
    async fn burst(&self, tether: bool, n: usize) -> anyhow::Result<(f64, f64)> {
        let c = Arc::new(cmd(&["true"]));
        let t0 = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let c = c.clone();
            let hub = self.t.hub.clone();
            let docker = self.docker.clone();
            let worker = self.worker.clone();
            let container = self.container.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let r = if tether {
                    limit(600, "tether exec", tether_exec(&hub, &worker, &c)).await
                } else {
                    limit(600, "direct exec", direct::exec(&docker, &container, &c)).await
                };
                r.map(|r| (t.elapsed(), r.exit))
            }));
        }
        let mut lat = Vec::with_capacity(n);
        let mut failed = 0;
        let mut first_error = None;
        for task in tasks {
            match task.await? {
                Ok((dt, 0)) => lat.push(dt.as_secs_f64()),
                Ok((_, code)) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("exit code {code}"));
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        let total = t0.elapsed().as_secs_f64();
        eprintln!(
            "tether-bench:   {n} concurrent {} execs: {total:.2} s, {failed} failed",
            if tether { "tether" } else { "direct" },
        );
        if failed > 0 {
            bail!(
                "{failed} of {n} concurrent {} execs failed, first: {}",
                if tether { "tether" } else { "direct" },
                first_error.unwrap_or_default()
            );
        }
        Ok((total, max(&lat).unwrap_or(0.0)))
    }

    /// The same burst beside one exec whose large output nobody reads.
    async fn burst_stalled(&self, tether: bool, n: usize) -> anyhow::Result<(f64, f64)> {
        let big = cmd(&["head", "-c", "4000000000", "/dev/zero"]);
        let guard: Box<dyn std::any::Any + Send> = if tether {
            let open = self.t.hub.exec(
                &self.worker,
                ExecOptions {
                    cmd: big,
                    ..Default::default()
                },
            );
            Box::new(limit(60, "start the stalled exec", async { Ok(open.await?) }).await?)
        } else {
            let open = direct::exec_unread(&self.docker, &self.container, &big);
            Box::new(limit(60, "start the stalled exec", open).await?)
        };
        eprintln!("tether-bench:   stalled reader in place");
        // Let it fill its window (tether) or its pipe (direct).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = self.burst(tether, n).await;
        drop(guard); // cancels it
        r
    }

    /// Figure 5: Many concurrent short execs over one agent connection, with and
    /// without a stalled channel beside them.
    pub async fn concurrent(&mut self) -> anyhow::Result<Vec<Figure>> {
        let n = self.p.concurrent_n;
        self.burst(true, 20).await?;
        self.burst(false, 20).await?;
        // Each side's stalled burst right after its plain one: the engine
        // slowed from burst to burst in one run (41.3, 44.7, 46.0, 46.5 s), and the
        // stall is judged by that pair's ratio.
        let t = self.burst(true, n).await?;
        let ts = self.burst_stalled(true, n).await?;
        let d = self.burst(false, n).await?;
        let ds = self.burst_stalled(false, n).await?;
        self.notes.push(format!(
            "concurrent: {n} execs; stalled/unstalled total: tether {:.2}, direct {:.2}",
            ts.0 / t.0,
            ds.0 / d.0
        ));
        Ok(vec![
            Figure::new("concurrent_1000_exec_s", "s", Some(t.0), Some(d.0)),
            Figure::new(
                "concurrent_1000_exec_stalled_s",
                "s",
                Some(ts.0),
                Some(ds.0),
            ),
            Figure::new("concurrent_1000_exec_max_s", "s", Some(t.1), Some(d.1)),
            Figure::new(
                "concurrent_1000_exec_stalled_max_s",
                "s",
                Some(ts.1),
                Some(ds.1),
            ),
        ])
    }

    /// Figure 6: Memory of an agent running as its own process: idle, then while it
    /// carries many concurrent streams.
    pub async fn agent_rss(&mut self) -> anyhow::Result<Vec<Figure>> {
        let node = format!("test-bench-proc-{}", ulid());
        self.proc_nodes.push(node.clone());
        let log_path = self.dir.join("agent-proc.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = tokio::process::Command::new(&self.agent_bin)
            .args(["--log", "warn", "--server", &self.t.url])
            .args(["--node-id", &node, "--subnet-pool", "10.212.0.0/16"])
            .arg("--state-dir")
            .arg(self.dir.join("agent-proc"))
            .env("TETHER_PSK", &self.t.psk)
            .env_remove("TETHER_PSK_FILE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", self.agent_bin.display()))?;
        let pid = child.id().context("agent process id")?;
        let r = self.agent_rss_of(pid, &node).await;
        let _ = child.kill().await;
        if r.is_err() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            self.notes
                .push(format!("agent process log (last lines): {tail:?}"));
        }
        r
    }

    async fn agent_rss_of(&mut self, pid: u32, node: &str) -> anyhow::Result<Vec<Figure>> {
        let hub = self.t.hub.clone();
        wait_online(&hub, node, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_hwm = procfs::hwm_kib(pid)?;
        let idle_rss = procfs::rss_kib(pid)?;
        let w = hub
            .spawn(SpawnRequest {
                image: self.image.clone(),
                cmd: cmd(&["sleep", "3600"]),
                node_id: Some(node.to_string()),
                resources: Resources {
                    pids: Some(4096),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await?;
        let r = self.agent_streams(pid, &w.worker_id).await;
        if let Err(e) = hub.remove(&w.worker_id, true).await {
            self.notes.push(format!(
                "agent: removing worker {} failed: {e}",
                w.worker_id
            ));
        }
        let (busy_hwm, busy_rss_max) = r?;
        // MB = 10^6 bytes; /proc counts KiB.
        let mb = |k: u64| k as f64 * 1024.0 / 1e6;
        self.notes.push(format!(
            "agent process: idle VmRSS {:.1} MB (peak {:.1}); busy VmRSS max sampled {:.1} MB (peak {:.1}) over {} streams of {} bytes",
            mb(idle_rss),
            mb(idle_hwm),
            mb(busy_rss_max),
            mb(busy_hwm),
            self.p.agent_streams,
            self.p.agent_stream_bytes
        ));
        Ok(vec![
            Figure::solo("agent_idle_rss_mb", "MB", Some(mb(idle_hwm))),
            Figure::solo("agent_busy_rss_mb", "MB", Some(mb(busy_hwm))),
        ])
    }

    /// Many concurrent streams through the agent `pid`, all read by the
    /// client; returns the agent's peak RSS and the largest sampled RSS.
    async fn agent_streams(&self, pid: u32, worker: &str) -> anyhow::Result<(u64, u64)> {
        let hub = &self.t.hub;
        tether_exec(hub, worker, &cmd(&["true"])).await?;
        let peak = Arc::new(AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    if let Ok(k) = procfs::rss_kib(pid) {
                        peak.fetch_max(k, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let n = self.p.agent_stream_bytes;
        let c = Arc::new(cmd(&["head", "-c", &n.to_string(), "/dev/zero"]));
        let mut tasks = Vec::new();
        for _ in 0..self.p.agent_streams {
            let (hub, worker, c) = (hub.clone(), worker.to_string(), c.clone());
            tasks.push(tokio::spawn(async move {
                limit(600, "tether stream", tether_exec(&hub, &worker, &c)).await
            }));
        }
        let mut result = Ok(());
        for t in tasks {
            match t.await? {
                Ok(r) if r.exit == 0 && r.bytes == n => {}
                Ok(r) => {
                    result = Err(anyhow::anyhow!(
                        "stream got {} of {n} bytes, exit {}",
                        r.bytes,
                        r.exit
                    ))
                }
                Err(e) => result = Err(e),
            }
        }
        stop.cancel();
        let _ = sampler.await;
        result?;
        Ok((procfs::hwm_kib(pid)?, peak.load(Ordering::Relaxed)))
    }
}
