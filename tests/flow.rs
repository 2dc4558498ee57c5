//! Multiplexing and flow control on one agent connection: a stalled reader
//! stalls only its own channel, and back-pressure reaches the process.

mod common;
use common::*;
use std::time::{Duration, Instant};
use tether::protocol::{SpawnRequest, StreamKind};
use tether::server::{ExecOptions, StreamEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_channel_does_not_block_fifty_others() {
    let (h, _node) = Harness::start().await;
    let w = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec!["sleep".into(), "3600".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let id = w.worker_id.clone();
    const BIG: u64 = 50_000_000;

    // A 50 MB producer whose output nobody reads (yet).
    let mut stalled = h
        .hub
        .exec(
            &id,
            ExecOptions {
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("head -c {BIG} /dev/zero; touch /tmp/stalled-done"),
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();

    // 50 concurrent execs on the same connection all complete.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let hub = h.hub.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let cmd = format!("echo job-{i}; head -c 100000 /dev/zero | wc -c");
            hub.exec_collect(&id, &["sh", "-c", &cmd]).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (code, out, _) = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("exec finished while another channel is stalled")
            .unwrap()
            .unwrap();
        assert_eq!(code, 0);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("job-{i}\n100000\n")
        );
    }
    let others = started.elapsed();

    // Back-pressure reached the producer: it has not finished writing.
    let (_, out, _) = h
        .hub
        .exec_collect(
            &id,
            &[
                "sh",
                "-c",
                "ls /tmp/stalled-done 2>/dev/null || echo blocked",
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "blocked\n",
        "the unread producer should be blocked"
    );

    // Reading it now delivers every byte and its exit code.
    let mut total = 0u64;
    let exit = loop {
        match stalled.output.next().await.unwrap() {
            StreamEvent::Data(StreamKind::Stdout, b) => {
                assert!(b.iter().all(|&x| x == 0));
                total += b.len() as u64;
            }
            StreamEvent::Data(k, _) => panic!("unexpected stream {k:?}"),
            StreamEvent::End { exit_code, error } => {
                assert!(error.is_none(), "{error:?}");
                break exit_code;
            }
        }
    };
    assert_eq!(total, BIG);
    assert_eq!(exit, Some(0));
    eprintln!("50 execs beside a stalled channel: {others:?}");
    h.stop().await;
}
