//! Forwarding between replicas on one PostgreSQL (`server_forward_*`): the
//! same request through the replica that holds the node and through one
//! that does not (and passes it on), alternated. A PostgreSQL server of the
//! bench's own (`tests/common/postgres.rs`), two in-process servers, one
//! agent on its own runtime thread.

use crate::setup::{RuntimeThread, ulid, wait_online};
use crate::stats::{Figure, median, p99, paired_differences};
use anyhow::{Context, ensure};
use std::path::Path;
use std::time::{Duration, Instant};
use tether::server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[path = "../../../tests/common/postgres.rs"]
#[allow(dead_code)]
mod postgres;

async fn replica(dir: &Path, psk: &str, db: &str) -> anyhow::Result<(Server, String)> {
    let mut cfg = ServerConfig::new(
        "127.0.0.1:0".parse().expect("valid address"),
        psk.to_string(),
        dir.to_path_buf(),
    );
    cfg.database = Some(db.to_string());
    let server = Server::bind(cfg).await.context("bind a replica")?;
    let url = format!("http://{}", server.local_addr());
    Ok((server, url))
}

pub async fn run(dir: &Path, image: &str, n: usize, warmup: usize) -> anyhow::Result<Vec<Figure>> {
    let bin =
        std::env::var("TETHER_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    ensure!(
        Path::new(&bin).join("postgres").exists(),
        "PostgreSQL is needed at {bin} (set TETHER_PG_BIN)"
    );
    let pg = tokio::task::spawn_blocking(postgres::Postgres::start).await?;
    let db = pg.database("tether_bench");
    let psk = format!("bench-psk-{}", ulid());
    let (a, url_a) = replica(&dir.join("replica-a"), &psk, &db).await?;
    let (b, url_b) = replica(&dir.join("replica-b"), &psk, &db).await?;
    let (hub, token) = (a.hub(), a.admin_token().to_string());
    let stop = CancellationToken::new();
    tokio::spawn(a.serve(stop.clone()));
    tokio::spawn(b.serve(stop.clone()));
    let node = format!("test-bench-{}", ulid());
    let agent_rt = RuntimeThread::start("agent")?;
    let agent_stop = CancellationToken::new();
    let acfg = tether::agent::AgentConfig::new(
        url_a.parse().expect("valid URL"),
        psk,
        node.clone(),
        dir.join("replica-agent"),
    );
    let agent = agent_rt
        .handle
        .spawn(tether::agent::run(acfg, agent_stop.clone()));
    let r = async {
        wait_online(&hub, &node, Duration::from_secs(60)).await?;
        let w = hub
            .spawn(tether::protocol::SpawnRequest {
                image: image.to_string(),
                cmd: vec!["sleep".into(), "3600".into()],
                node_id: Some(node.clone()),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("spawn: {e}"))?;
        let http = tether::http_client();
        let get = |base: &str| {
            let req = http
                .get(format!("{base}/api/v1/workers/{}/stat?path=/", w.worker_id))
                .bearer_auth(&token);
            async move {
                let t0 = Instant::now();
                let r = req.send().await?;
                ensure!(r.status().is_success(), "stat: HTTP {}", r.status());
                r.bytes().await?;
                Ok::<_, anyhow::Error>(t0.elapsed().as_secs_f64() * 1e3)
            }
        };
        for _ in 0..warmup {
            get(&url_a).await?;
            get(&url_b).await?;
        }
        let (mut here, mut there) = (Vec::new(), Vec::new());
        for i in 0..n {
            if i % 2 == 0 {
                here.push(get(&url_a).await?);
                there.push(get(&url_b).await?);
            } else {
                there.push(get(&url_b).await?);
                here.push(get(&url_a).await?);
            }
        }
        let _ = hub.remove(&w.worker_id, true).await;
        let added_p99 = p99(&there).zip(p99(&here)).map(|(t, h)| t - h);
        Ok(vec![
            Figure::new(
                "server_forward_dispatch_p99_ms",
                "ms",
                p99(&there),
                p99(&here),
            ),
            Figure::solo("server_forward_dispatch_added_p99_ms", "ms", added_p99),
            Figure::solo(
                "server_forward_dispatch_added_p50_ms",
                "ms",
                median(&paired_differences(&there, &here)),
            ),
        ])
    }
    .await;
    agent_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    stop.cancel();
    crate::direct::remove_labelled(
        &tether::docker::connect(None).await?,
        &format!("tether.node_id={node}"),
    )
    .await;
    drop(pg);
    r
}

/// Many simulated agents across three replica processes on one PostgreSQL
/// (`replica_scale_*`): memory per held agent and dispatch through each
/// replica, then a reconnect storm: the replica holding a third of the
/// agents is killed (-9); how long until every agent is online at the
/// others, and dispatch through a survivor meanwhile.
pub async fn scale(
    p: &crate::figures::Params,
    bin: &Path,
    dir: &Path,
    run: &str,
    max_agents: Option<usize>,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<Figure>> {
    use crate::fleet::ProcFleet;
    use crate::scale::{dispatch, start_server_as};
    use std::sync::atomic::Ordering;
    let bin_pg =
        std::env::var("TETHER_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    ensure!(
        Path::new(&bin_pg).join("postgres").exists(),
        "PostgreSQL is needed at {bin_pg} (set TETHER_PG_BIN)"
    );
    let pg = tokio::task::spawn_blocking(postgres::Postgres::start).await?;
    let db = pg.database("tether_scale");
    let psk = format!("bench-psk-{run}");
    let mut servers = Vec::new();
    for k in 0..3 {
        servers.push(
            start_server_as(
                bin,
                dir,
                &psk,
                &format!("replica-{k}"),
                &["--database", &db],
            )
            .await?,
        );
    }
    let mut target = max_agents.unwrap_or(if p.scale_steps.len() > 1 {
        30_000
    } else {
        3_000
    });
    // The load generator's processes hold `PER_CHILD` sockets each; a
    // replica holds a third of the agents, half once one replica is gone.
    if let Some(limit) = crate::procfs::nofile_limit() {
        let room = limit.saturating_sub(512) as usize * 2;
        if target > room {
            notes.push(format!(
                "replica scale: open-file limit {limit} allows about {room} agents; capped"
            ));
            target = room;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0: Vec<u64> = servers
        .iter()
        .map(|s| crate::procfs::rss_kib(s.pid))
        .collect::<anyhow::Result<_>>()?;
    let mut fleet = ProcFleet::new(servers.iter().map(|s| s.port).collect(), &psk, run);
    let r = async {
        let t0 = Instant::now();
        let err = fleet.grow(target).await;
        let ramp = t0.elapsed();
        // The ramp's tail (capability reports, first heartbeats) settles.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let n = fleet.live.load(Ordering::SeqCst);
        if let Some(e) = &err {
            notes.push(format!("replica scale: aimed for {target}, {n} connected; first error: {e}"));
        }
        ensure!(n > 0, "no simulated agent connected: {}", err.unwrap_or_default());
        notes.push(format!(
            "replica scale: {n} agents across 3 replicas connected in {:.1} s",
            ramp.as_secs_f64()
        ));
        let mut figs = vec![Figure::solo("replica_scale_agents", "agents", Some(n as f64))];
        let samples = (p.dispatch_samples / 3).max(100);
        for (k, s) in servers.iter().enumerate() {
            let held = fleet.live_at[k].load(Ordering::SeqCst).max(1);
            let rss = crate::procfs::rss_kib(s.pid)?;
            let per = rss.saturating_sub(rss0[k]) as f64 * 1024.0 / 1000.0 / held as f64;
            let lat = dispatch(&fleet.http, s.port, &s.admin, &fleet.workers, samples).await?;
            figs.push(Figure::solo(
                &format!("replica{k}_agents_held"),
                "agents",
                Some(held as f64),
            ));
            figs.push(Figure::solo(
                &format!("replica{k}_rss_kb_per_held_agent"),
                "KB",
                Some(per),
            ));
            figs.push(Figure::solo(
                &format!("replica{k}_dispatch_p99_ms"),
                "ms",
                p99(&lat),
            ));
        }
        // The storm: replica 0 killed; its agents (number i, i % 3 == 0,
        // the number ending the worker id) go on to the others.
        let survivors: Vec<String> = fleet
            .workers
            .iter()
            .filter(|w| {
                w.rsplit('x')
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i % 3 != 0)
            })
            .cloned()
            .collect();
        let before = fleet.live.load(Ordering::SeqCst);
        let moving = fleet.live_at[0].load(Ordering::SeqCst);
        let killed = Instant::now();
        servers[0].child.start_kill()?;
        let _ = servers[0].child.wait().await;
        let (http, port, admin) = (&fleet.http, servers[1].port, servers[1].admin.clone());
        let mut lat = Vec::new();
        let mut back = None;
        while killed.elapsed() < Duration::from_secs(60) {
            if let Ok(l) = dispatch(http, port, &admin, &survivors, 20).await {
                lat.extend(l);
            }
            // Back: none left on the dead replica, all online elsewhere.
            if fleet.live_at[0].load(Ordering::SeqCst) == 0
                && fleet.live.load(Ordering::SeqCst) >= before
            {
                back = Some(killed.elapsed());
                break;
            }
        }
        notes.push(format!(
            "replica storm: the killed replica held {moving} agents; {} of {before} online after {:.1} s",
            fleet.live.load(Ordering::SeqCst),
            killed.elapsed().as_secs_f64()
        ));
        figs.push(Figure::solo(
            "replica_storm_all_back_s",
            "s",
            back.map(|d| d.as_secs_f64()),
        ));
        figs.push(Figure::solo(
            "replica_storm_dispatch_p99_ms",
            "ms",
            p99(&lat),
        ));
        Ok(figs)
    }
    .await;
    fleet.shutdown().await;
    for s in &mut servers {
        let _ = s.child.kill().await;
    }
    drop(pg);
    r
}
