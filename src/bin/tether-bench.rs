//! tether-bench: what tether costs over talking to Docker directly (issue 5).
//!
//! Every figure is measured through tether (client -> server -> WebSocket ->
//! agent -> Docker and back, with the embeddable `Hub` as the client and a
//! real server and agent on loopback; exec and file figures also through
//! the server's HTTP API, as `tether ctl` uses it) and, where one exists, directly with
//! bollard against the same engine, interleaved in the same run, after a
//! warm-up. Run it with `scripts/bench [--quick] [--json FILE]`; see
//! docs/performance.md.

#[path = "tether-bench/api.rs"]
mod api;
#[path = "tether-bench/direct.rs"]
mod direct;
#[path = "tether-bench/figures.rs"]
mod figures;
#[path = "tether-bench/fleet.rs"]
mod fleet;
#[path = "tether-bench/inference.rs"]
mod inference;
#[path = "tether-bench/procfs.rs"]
mod procfs;
#[path = "tether-bench/replicas.rs"]
mod replicas;
#[path = "tether-bench/report.rs"]
mod report;
#[path = "tether-bench/scale.rs"]
mod scale;
#[path = "tether-bench/setup.rs"]
mod setup;
#[path = "tether-bench/stats.rs"]
mod stats;
#[path = "tether-bench/tunnel.rs"]
mod tunnel;

use anyhow::Context;
use clap::Parser;
use figures::{Bench, Params};
use setup::{InProc, Scratch, ulid};
use stats::Figure;
use std::path::PathBuf;
use std::time::Instant;

const SECTIONS: [&str; 12] = [
    "exec",
    "throughput",
    "files",
    "spawn",
    "concurrent",
    "tunnel",
    "mcp",
    "inference",
    "agent",
    "scale",
    "replicas",
    "replica-scale",
];

#[derive(Parser)]
#[command(name = "tether-bench", about = "tether's cost over direct Docker")]
struct Cli {
    /// Smaller sizes and counts: finishes in under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Also write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The tether binary, for the agent and server run as separate processes.
    #[arg(long, default_value = "target/release/tether")]
    tether_bin: PathBuf,
    /// The agent binary measured for memory (`tether-agent`, what the agent image ships).
    #[arg(long, default_value = "target/release/tether-agent")]
    agent_bin: PathBuf,
    /// Worker image (must be present locally).
    #[arg(
        long,
        env = "TETHER_TEST_IMAGE",
        default_value = "tether-test-busybox:latest"
    )]
    image: String,
    /// Run only these sections (exec, throughput, files, spawn, concurrent, tunnel, mcp, agent, inference, replicas, replica-scale, scale).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Cap the number of simulated agents of the scale section.
    #[arg(long)]
    max_agents: Option<usize>,
    /// Internal: play part of the replica-scale fleet (see fleet.rs).
    #[arg(long, hide = true, value_name = "SPEC")]
    fleet_child: Option<String>,
}

/// Collects figures and notes; a failed section is noted and the rest go on.
struct Run {
    figures: Vec<Figure>,
    notes: Vec<String>,
    failed: Vec<String>,
}

impl Run {
    fn section(&mut self, name: &str, started: Instant, r: anyhow::Result<Vec<Figure>>) {
        match r {
            Ok(f) => {
                eprintln!(
                    "tether-bench: {name}: done in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                self.figures.extend(f);
            }
            Err(e) => {
                eprintln!("tether-bench: {name}: FAILED: {e:#}");
                self.notes.push(format!("{name} failed: {e:#}"));
                self.failed.push(name.to_string());
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter =
        tether::cli::log_filter(std::env::var("TETHER_BENCH_LOG").ok().as_deref(), "error");
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init();
    }
    for s in &cli.only {
        if !SECTIONS.contains(&s.as_str()) {
            eprintln!("tether-bench: unknown section {s:?} (one of {SECTIONS:?})");
            return std::process::ExitCode::from(2);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // On a runtime worker, as a server's request handlers run: a future
    // driven by `block_on` lives on the main thread, and every wake-up of it
    // (each credit grant of an upload, say) costs a futex call and a switch.
    if let Some(spec) = cli.fleet_child {
        return match rt.block_on(rt.spawn(async move { fleet::child(&spec).await })) {
            Ok(Ok(())) => std::process::ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("tether-bench fleet: {e:#}");
                std::process::ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("tether-bench fleet: {e}");
                std::process::ExitCode::from(1)
            }
        };
    }
    let bench = rt.block_on(rt.spawn(run(cli)));
    match bench.unwrap_or_else(|e| Err(anyhow::anyhow!("the benchmark task failed: {e}"))) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("tether-bench: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Runs the selected sections; true if all succeeded.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let started = Instant::now();
    let load_start = procfs::loadavg();
    let p = Params::new(cli.quick);
    let want = |s: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == s);
    let docker = tether::docker::connect(None)
        .await
        .context("connect to the Docker engine")?;
    docker
        .inspect_image(&cli.image)
        .await
        .with_context(|| format!("image {} (run scripts/build-test-image.sh)", cli.image))?;
    if (want("agent") || want("scale")) && !cli.tether_bin.is_file() {
        anyhow::bail!(
            "{} not found: build it with `cargo build --release --bin tether`",
            cli.tether_bin.display()
        );
    }
    if (want("agent") || want("inference")) && !cli.agent_bin.is_file() {
        anyhow::bail!(
            "{} not found: build it with `cargo build --release --bin tether-agent`",
            cli.agent_bin.display()
        );
    }
    let machine = procfs::machine(docker.version().await.ok().and_then(|v| v.version));
    let scratch = Scratch::new()?;
    let run_id = ulid();
    eprintln!(
        "tether-bench: {} run {run_id}, scratch {}",
        p.mode,
        scratch.0.display()
    );
    let mut out = Run {
        figures: Vec::new(),
        notes: Vec::new(),
        failed: Vec::new(),
    };

    let docker_sections = [
        "exec",
        "throughput",
        "files",
        "spawn",
        "concurrent",
        "tunnel",
        "mcp",
        "agent",
    ];
    if docker_sections.iter().any(|s| want(s)) {
        let t0 = Instant::now();
        let t = InProc::start(&scratch.0)
            .await
            .context("start the in-process server and agent")?;
        let node = t.node.clone();
        let mut b = Bench {
            p: p.clone(),
            t,
            docker: docker.clone(),
            run: run_id.clone(),
            image: cli.image.clone(),
            agent_bin: cli.agent_bin.clone(),
            dir: scratch.0.clone(),
            worker: String::new(),
            container: String::new(),
            proc_nodes: Vec::new(),
            notes: Vec::new(),
        };
        let r = b.spawn_worker().await;
        out.section("setup", t0, r.map(|()| Vec::new()));
        if out.failed.is_empty() {
            macro_rules! section {
                ($name:literal, $call:expr) => {
                    if want($name) {
                        eprintln!("tether-bench: {} ...", $name);
                        let t0 = Instant::now();
                        let r = $call.await;
                        out.section($name, t0, r);
                    }
                };
            }
            section!("exec", b.exec_rtt());
            section!("throughput", b.throughput());
            section!("files", b.files());
            section!("spawn", b.spawn());
            section!("concurrent", b.concurrent());
            section!("tunnel", b.tunnels());
            section!("mcp", b.mcp());
            section!("agent", b.agent_rss());
        }
        if !b.worker.is_empty()
            && let Err(e) = b.t.hub.remove(&b.worker, true).await
        {
            out.notes
                .push(format!("removing worker {} failed: {e}", b.worker));
        }
        b.t.stop().await;
        out.notes.append(&mut b.notes);
        // Whatever is left of the agents' workers and the baseline's objects.
        let mut left = 0;
        for n in std::iter::once(&node).chain(&b.proc_nodes) {
            left += direct::remove_labelled(&docker, &format!("tether.node_id={n}")).await;
        }
        left += direct::remove_labelled(&docker, &format!("{}={run_id}", direct::RUN_LABEL)).await;
        if left > 0 {
            eprintln!("tether-bench: removed {left} leftover Docker object(s)");
        }
    }
    if want("inference") {
        eprintln!("tether-bench: inference ...");
        let t0 = Instant::now();
        let r = inference::run(&cli.agent_bin, &scratch.0, p.rtt_n).await;
        out.section("inference", t0, r);
    }
    if want("replicas") {
        eprintln!("tether-bench: replicas ...");
        let t0 = Instant::now();
        let r = replicas::run(&scratch.0, &cli.image, p.rtt_n, p.rtt_warmup).await;
        out.section("replicas", t0, r);
    }
    if want("replica-scale") {
        eprintln!("tether-bench: replica-scale ...");
        let t0 = Instant::now();
        let r = replicas::scale(
            &p,
            &cli.tether_bin,
            &scratch.0,
            &run_id,
            cli.max_agents,
            &mut out.notes,
        )
        .await;
        out.section("replica-scale", t0, r);
    }
    if want("scale") {
        eprintln!("tether-bench: scale ...");
        let t0 = Instant::now();
        let r = scale::run(
            &p,
            &cli.tether_bin,
            &scratch.0,
            &run_id,
            cli.max_agents,
            &mut out.notes,
        )
        .await;
        out.section("scale", t0, r);
    }

    out.notes.push(format!(
        "load average (1, 5, 15 min) at start {load_start}, at end {}",
        procfs::loadavg()
    ));
    let targets = report::targets(&out.figures);
    println!();
    println!(
        "tether-bench ({} mode, {:.0} s) on {} cores, {}",
        p.mode,
        started.elapsed().as_secs_f64(),
        machine["cores"],
        machine["cpu"].as_str().unwrap_or("unknown CPU")
    );
    println!();
    print!("{}", report::table(&out.figures));
    println!();
    print!("{}", report::targets_text(&targets));
    if !out.notes.is_empty() {
        println!();
        println!("Notes:");
        for n in &out.notes {
            println!("  - {n}");
        }
    }
    if let Some(path) = &cli.json {
        let run = serde_json::json!({
            "id": run_id,
            "mode": p.mode,
            "params": p,
            "duration_s": stats::round(started.elapsed().as_secs_f64(), 1),
            "failed_sections": out.failed,
            "notes": out.notes,
        });
        let doc = report::json(machine, &out.figures, &targets, run);
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("tether-bench: wrote {}", path.display());
    }
    Ok(out.failed.is_empty())
}
