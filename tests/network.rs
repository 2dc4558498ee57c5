//! Worker networks: isolation between workers, and room for many.

mod common;
use common::*;
use futures_util::StreamExt;
use std::collections::HashSet;
use tether::protocol::{Resources, SpawnRequest};

/// Under plain `cargo test` the two tests of this file would run at once;
/// the network churn of one must not overlap the isolation check.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spec(img: &str, cmd: &[&str]) -> SpawnRequest {
    SpawnRequest {
        image: img.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        resources: Resources {
            memory_mb: Some(16),
            cpus: Some(0.1),
            pids: Some(16),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_cannot_reach_each_other() {
    let _serial = SERIAL.lock().await;
    let (h, _node) = Harness::start().await;
    let img = image();
    let server = "while true; do echo pong | nc -l -p 8080; done";
    let a = h
        .hub
        .spawn(spec(&img, &["sh", "-c", server]))
        .await
        .unwrap();
    let b = h.hub.spawn(spec(&img, &["sleep", "600"])).await.unwrap();
    let a_ip = a.ip.clone().expect("worker has an address");
    assert_ne!(a.subnet, b.subnet);

    // Control: the listener answers on its own address, so the probe works.
    let probe = format!("echo ping | nc -w 2 {a_ip} 8080");
    let mut ok = false;
    for _ in 0..50 {
        let (code, out, _) = h
            .hub
            .exec_collect(&a.worker_id, &["sh", "-c", &probe])
            .await
            .unwrap();
        if code == 0 && String::from_utf8_lossy(&out).contains("pong") {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "the listener in worker A never answered on {a_ip}");

    // The same probe from worker B gets nothing.
    let (code, out, _) = h
        .hub
        .exec_collect(&b.worker_id, &["sh", "-c", &probe])
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out).contains("pong"),
        "B reached A: {out:?}"
    );
    assert_ne!(code, 0);

    // Nor over IPv6 (the guard matches IPv4): it is off in the worker,
    // asked of the engine whatever the engine's own default.
    let sysctls = docker(&[
        "inspect",
        "--format",
        "{{json .HostConfig.Sysctls}}",
        &b.container_id,
    ]);
    assert!(
        sysctls.contains("\"net.ipv6.conf.all.disable_ipv6\":\"1\""),
        "{sysctls}"
    );
    let (_, out, _) = h
        .hub
        .exec_collect(
            &b.worker_id,
            &["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"],
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out).trim(), "1");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_holds_two_hundred_workers() {
    let _serial = SERIAL.lock().await;
    const N: usize = 200;
    let (h, node) = Harness::start().await;
    let img = image();
    let hub = h.hub.clone();
    let spawned: Vec<_> = futures_util::stream::iter(0..N)
        .map(|_| {
            let hub = hub.clone();
            let s = spec(&img, &["sleep", "3600"]);
            async move { hub.spawn(s).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let workers: Vec<_> = spawned.into_iter().map(|r| r.expect("spawn")).collect();
    let filter = format!("label=tether.node_id={node}");
    let running = docker(&[
        "ps",
        "-q",
        "--filter",
        &filter,
        "--filter",
        "status=running",
    ]);
    assert_eq!(
        running.lines().count(),
        N,
        "all {N} workers running at once"
    );
    let nets = docker(&["network", "ls", "-q", "--filter", &filter]);
    assert_eq!(nets.lines().count(), N, "one network per worker");
    let subnets: HashSet<_> = workers.iter().map(|w| w.subnet.clone().unwrap()).collect();
    assert_eq!(subnets.len(), N, "every worker has its own subnet");
    // The last one still works.
    let (code, out, _) = h
        .hub
        .exec_collect(&workers[N - 1].worker_id, &["echo", "alive"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"alive\n".to_vec()));

    let removed: Vec<_> = futures_util::stream::iter(workers.iter().map(|w| w.worker_id.clone()))
        .map(|id| {
            let hub = hub.clone();
            async move { hub.remove(&id, true).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(
        removed.iter().all(|r| r.is_ok()),
        "{:?}",
        removed.iter().find(|r| r.is_err())
    );
    assert_eq!(docker(&["ps", "-aq", "--filter", &filter]), "");
    assert_eq!(docker(&["network", "ls", "-q", "--filter", &filter]), "");
    h.stop().await;
}
