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
            StreamEvent::Gap(n) => panic!("{n} bytes lost"),
            StreamEvent::Eof => panic!("an exec reports no separate end of data"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_exec_gets_its_size_and_follows_resizes() {
    use tether::protocol::TermSize;
    let (h, _node) = Harness::start().await;
    let w = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec!["sleep".into(), "600".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut s = h
        .hub
        .exec(
            &w.worker_id,
            ExecOptions {
                // Docker 20.10 cannot size an exec before it starts: the agent resizes
                // right after start, so give the shell a moment.
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "sleep 1; stty size; read line; stty size".into(),
                ],
                tty: true,
                stdin: true,
                size: Some(TermSize {
                    cols: 100,
                    rows: 40,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut text = String::new();
    let mut resized = false;
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(30), s.output.next())
            .await
            .unwrap()
            .unwrap()
        {
            StreamEvent::Data(kind, b) => {
                assert_eq!(kind, StreamKind::Stdout, "a TTY has one stream");
                text.push_str(&String::from_utf8_lossy(&b));
                if !resized && text.contains("40 100") {
                    resized = true;
                    s.input
                        .resize(TermSize {
                            cols: 120,
                            rows: 50,
                        })
                        .await
                        .unwrap();
                    s.input
                        .write(bytes::Bytes::from_static(b"go\r"))
                        .await
                        .unwrap();
                }
            }
            StreamEvent::Gap(n) => panic!("{n} bytes lost"),
            StreamEvent::Eof => panic!("an exec reports no separate end of data"),
            StreamEvent::End { exit_code, error } => {
                assert!(error.is_none(), "{error:?}");
                break exit_code;
            }
        }
    };
    assert_eq!(exit, Some(0));
    assert!(
        text.contains("40 100") && text.contains("50 120"),
        "{text:?}"
    );
    h.stop().await;
}
