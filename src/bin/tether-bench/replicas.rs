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
