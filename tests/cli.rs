//! End-to-end through the public CLI: spawn, exec, cp, logs, stop, rm against
//! the real Docker engine, checked the way a user would check.

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_lifecycle_through_ctl() {
    let (h, node) = Harness::start().await;
    let img = image();

    // nodes shows the agent online.
    let nodes = h.ctl_ok(&["nodes"]).await;
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with(&node) && l.contains("online")),
        "{nodes}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&h.ctl_ok(&["nodes", "--json"]).await).unwrap();
    assert_eq!(json.as_array().unwrap()[0]["status"], "online");

    // spawn prints only the id.
    let out = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &img,
            "--task-id",
            "task-7",
            "--job-id",
            "job-3",
            "--label",
            "team=blue",
            "--env",
            "GREETING=hi there",
            "--memory",
            "64",
            "--cpus",
            "0.5",
            "--pids",
            "64",
            "--",
            "sh",
            "-c",
            "echo booted; echo warn >&2; exec sleep 3600",
        ])
        .await;
    let w = out.trim().to_string();
    assert_eq!(out.lines().count(), 1, "spawn prints only the id: {out:?}");

    // Docker's view: labels, limits, hardening, no published port, one dedicated network.
    let name = format!("tether-{w}");
    let insp: serde_json::Value = serde_json::from_str(&docker(&["inspect", &name])).unwrap();
    let c = &insp[0];
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["tether.worker_id"], w.as_str());
    assert_eq!(labels["tether.node_id"], node.as_str());
    assert_eq!(labels["tether.task_id"], "task-7");
    assert_eq!(labels["tether.job_id"], "job-3");
    // A user's label is kept under tether's name, where no other tool looks.
    assert_eq!(labels["tether.label.team"], "blue");
    assert!(labels["team"].is_null(), "{labels}");
    let hc = &c["HostConfig"];
    assert_eq!(hc["Memory"], 64 * 1024 * 1024);
    assert_eq!(hc["NanoCpus"], 500_000_000);
    assert_eq!(hc["PidsLimit"], 64);
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(hc["Init"], true);
    assert!(hc["SecurityOpt"].to_string().contains("no-new-privileges"));
    assert!(
        hc["PortBindings"].as_object().is_none_or(|m| m.is_empty()),
        "{}",
        hc["PortBindings"]
    );
    assert!(
        c["NetworkSettings"]["Ports"]
            .as_object()
            .is_none_or(|m| m.is_empty())
    );
    let nets = c["NetworkSettings"]["Networks"].as_object().unwrap();
    assert_eq!(
        nets.keys().collect::<Vec<_>>(),
        vec![&name],
        "exactly one network, the worker's own"
    );
    let net: serde_json::Value =
        serde_json::from_str(&docker(&["network", "inspect", &name])).unwrap();
    assert_eq!(net[0]["Labels"]["tether.worker_id"], w.as_str());
    assert_eq!(
        net[0]["Containers"].as_object().unwrap().len(),
        1,
        "network is dedicated"
    );
    let subnet = net[0]["IPAM"]["Config"][0]["Subnet"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(subnet.ends_with("/28"), "{subnet}");

    // ps lists it.
    let ps = h.ctl_ok(&["ps"]).await;
    assert!(
        ps.contains(&w) && ps.contains("running") && ps.contains("task-7"),
        "{ps}"
    );

    // exec: exit code passthrough, stdout and stderr apart, env visible.
    let out = h
        .ctl(&[
            "exec",
            &w,
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; echo $GREETING; exit 42",
        ])
        .await;
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to-out\nhi there\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-err\n");

    // exec -i forwards stdin and its EOF.
    let input: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let out = h
        .ctl_stdin(&["exec", "-i", &w, "--", "sha256sum"], Some(&input))
        .await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256(&input)));

    // A process that echoes its input: output must be acknowledged while
    // input is still going out (a deadlock until the server read on).
    let input: Vec<u8> = (0..30_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        h.ctl_stdin(&["exec", "-i", &w, "--", "cat"], Some(&input)),
    )
    .await
    .expect("30 MB echoed through cat within 120 s");
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), input.len());
    assert_eq!(sha256(&out.stdout), sha256(&input));

    // cp a file in and out, compared by hash.
    let local = h.state_path("payload.bin");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&local, &data).unwrap();
    h.ctl_ok(&["cp", local.to_str().unwrap(), &format!("{w}:/tmp/in.bin")])
        .await;
    let remote_hash = h
        .ctl_ok(&["exec", &w, "--", "sha256sum", "/tmp/in.bin"])
        .await;
    assert!(remote_hash.starts_with(&sha256(&data)), "{remote_hash}");
    let back = h.state_path("back.bin");
    h.ctl_ok(&["cp", &format!("{w}:/tmp/in.bin"), back.to_str().unwrap()])
        .await;
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&data));

    // cp a directory tree both ways.
    let tree = h.state_path("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(tree.join("sub/b.bin"), &data[..70_000]).unwrap();
    std::fs::write(tree.join("sub/deeper/c"), b"").unwrap();
    h.ctl_ok(&["cp", tree.to_str().unwrap(), &format!("{w}:/tmp")])
        .await;
    let listing = h
        .ctl_ok(&[
            "exec",
            &w,
            "--",
            "sh",
            "-c",
            "cd /tmp/tree && find . -type f | sort && cat a.txt && sha256sum sub/b.bin",
        ])
        .await;
    assert!(
        listing.contains("./a.txt\n./sub/b.bin\n./sub/deeper/c\nalpha\n"),
        "{listing}"
    );
    assert!(listing.contains(&sha256(&data[..70_000])));
    h.ctl_ok(&[
        "exec",
        &w,
        "--",
        "sh",
        "-c",
        "echo made-inside > /tmp/tree/new.txt",
    ])
    .await;
    let copy = h.state_path("copy");
    h.ctl_ok(&["cp", &format!("{w}:/tmp/tree"), copy.to_str().unwrap()])
        .await;
    assert_eq!(std::fs::read(copy.join("a.txt")).unwrap(), b"alpha\n");
    assert_eq!(
        sha256(&std::fs::read(copy.join("sub/b.bin")).unwrap()),
        sha256(&data[..70_000])
    );
    assert_eq!(
        std::fs::read(copy.join("new.txt")).unwrap(),
        b"made-inside\n"
    );
    assert!(copy.join("sub/deeper/c").is_file());

    // Copying into an existing local directory keeps the name.
    let into = h.state_path("into");
    std::fs::create_dir(&into).unwrap();
    h.ctl_ok(&["cp", &format!("{w}:/tmp/in.bin"), into.to_str().unwrap()])
        .await;
    assert_eq!(
        sha256(&std::fs::read(into.join("in.bin")).unwrap()),
        sha256(&data)
    );

    // logs: stdout and stderr apart; --tail.
    let out = h.ctl(&["logs", &w]).await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "booted\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "warn\n");
    let out = h.ctl(&["logs", "--tail", "0", &w]).await;
    assert_eq!(out.stdout.len() + out.stderr.len(), 0);

    // rm without -f refuses a running worker; stop then rm works.
    let out = h.ctl(&["rm", &w]).await;
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("conflict"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    h.ctl_ok(&["stop", &w]).await;
    let state = docker(&["inspect", "-f", "{{.State.Status}}", &name]);
    assert_eq!(state, "exited");
    h.ctl_ok(&["rm", &w]).await;

    // Really gone from Docker, container and network.
    assert_eq!(
        docker(&["ps", "-aq", "--filter", &format!("name={name}")]),
        ""
    );
    assert_eq!(
        docker(&["network", "ls", "-q", "--filter", &format!("name={name}")]),
        ""
    );
    assert!(!h.ctl_ok(&["ps"]).await.contains(&w));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_streams_until_the_worker_exits() {
    let (h, _node) = Harness::start().await;
    let img = image();
    let w = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &img,
            "--",
            "sh",
            "-c",
            "for i in 1 2 3; do echo line$i; sleep 1; done",
        ])
        .await
        .trim()
        .to_string();
    let out = h.ctl(&["logs", "-f", &w]).await;
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "line1\nline2\nline3\n"
    );
    h.ctl_ok(&["rm", "-f", &w]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_workers_and_refuses_new_ones() {
    let (mut h, n1) = Harness::start().await;
    let n2 = h.add_agent().await;
    let img = image();
    let a = h
        .ctl_ok(&[
            "spawn", "--image", &img, "--node", &n1, "--", "sleep", "600",
        ])
        .await
        .trim()
        .to_string();
    h.ctl_ok(&["drain", &n1]).await;
    let nodes = h.ctl_ok(&["nodes"]).await;
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with(&n1) && l.contains("draining")),
        "{nodes}"
    );
    // Scheduling avoids the draining node; naming it is refused.
    for _ in 0..2 {
        let w = h
            .ctl_ok(&["spawn", "--image", &img, "--", "sleep", "600"])
            .await
            .trim()
            .to_string();
        assert_eq!(h.hub.worker(&w).unwrap().node_id, n2);
    }
    let out = h
        .ctl(&["spawn", "--image", &img, "--node", &n1, "--", "true"])
        .await;
    assert_eq!(out.status.code(), Some(125));
    // The draining node's worker keeps running and serving.
    assert_eq!(
        h.ctl_ok(&["exec", &a, "--", "echo", "still-here"]).await,
        "still-here\n"
    );
    h.ctl_ok(&["undrain", &n1]).await;
    // Least loaded: n1 has 1 worker, n2 has 2.
    let w = h
        .ctl_ok(&["spawn", "--image", &img, "--", "sleep", "600"])
        .await
        .trim()
        .to_string();
    assert_eq!(h.hub.worker(&w).unwrap().node_id, n1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_whose_client_goes_away_is_killed() {
    let (h, _node) = Harness::start().await;
    let w = h.ctl_spawn_sleeper().await;
    let mut client = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["ctl", "exec", &w, "--", "sh", "-c", "sleep 333 & sleep 334"])
        .env("TETHER_SERVER", &h.url)
        .env("TETHER_TOKEN", &h.token)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let running = |ps: &str| ps.contains("sleep 333") || ps.contains("sleep 334");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !running(&h.ctl_ok(&["exec", &w, "--", "ps", "-o", "args"]).await) {
        assert!(
            std::time::Instant::now() < deadline,
            "the exec never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    client.start_kill().unwrap(); // like a closed terminal
    client.wait().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let ps = h.ctl_ok(&["exec", &w, "--", "ps", "-o", "args"]).await;
        if !running(&ps) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left running after its client went away:\n{ps}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    h.stop().await;
}

/// The agent remembers which container a worker's execs go to. When that
/// container is removed behind its back and another one takes its name, an
/// exec must not run in the newcomer, which is not tether's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_never_reaches_a_container_that_took_a_removed_workers_name() {
    let (h, node) = Harness::start().await;
    let w = h.ctl_spawn_sleeper().await;
    assert_eq!(
        h.ctl_ok(&["exec", &w, "--", "echo", "mine"]).await,
        "mine\n"
    );
    let name = tether::docker::object_name(&w);
    docker(&["rm", "-f", &name]);
    // Labelled with the node so that the harness removes it, but not as a
    // tether worker.
    let node_label = format!("tether.node_id={node}");
    let img = image();
    let started = docker_all(&[
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        &node_label,
        "--label",
        "tether.test=1",
        &img,
        "sleep",
        "600",
    ]);
    assert!(
        docker(&["ps", "-q", "--filter", &format!("name={name}")]).len() >= 12,
        "the stand-in did not start: {started}"
    );
    let out = h
        .ctl(&["exec", &w, "--", "sh", "-c", "echo reached > /tmp/reached"])
        .await;
    assert!(!out.status.success(), "an exec ran in a foreign container");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not found") || err.contains("no such"),
        "{err}"
    );
    assert_eq!(
        docker_all(&["exec", &name, "cat", "/tmp/reached"]).trim(),
        "cat: can't open '/tmp/reached': No such file or directory"
    );
    docker(&["rm", "-f", &name]);
    h.stop().await;
}

/// A worker's files are untrusted: `ctl cp` from it makes its symlinks as
/// symlinks and never follows one, keeps a hard-link pair a pair, drops
/// setuid, and refuses a fifo with tether's exit code, naming the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_from_a_hostile_worker_stays_inside_the_destination() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (h, _node) = Harness::start().await;
    let w = h.ctl_spawn_sleeper().await;
    let outside = h.state_path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"original").unwrap();
    let o = outside.to_str().unwrap();
    let script = format!(
        "set -e; mkdir -p /tmp/x/d /tmp/x/h /tmp/x/f; cd /tmp/x; \
         ln -s / d/esc; ln -s {o} d/link; ln -s {o}/victim d/victim; echo inside > d/zz; \
         head -c 300000 /dev/urandom > h/a; ln h/a h/b; chmod 4755 h/a; \
         echo x > f/a; mkfifo f/pipe; sha256sum h/a"
    );
    let out = h.ctl_ok(&["exec", &w, "--", "sh", "-c", &script]).await;
    let worker_sha = out.split_whitespace().next().unwrap().to_string();
    let untouched = || {
        let names: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["victim"]);
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"original");
    };

    // Symlinks to / and to the operator's files arrive as symlinks.
    let local = h.state_path("local");
    std::fs::create_dir(&local).unwrap();
    h.ctl_ok(&["cp", &format!("{w}:/tmp/x/d"), local.to_str().unwrap()])
        .await;
    let d = local.join("d");
    assert_eq!(
        std::fs::read_link(d.join("esc")).unwrap(),
        std::path::Path::new("/")
    );
    assert_eq!(std::fs::read_link(d.join("link")).unwrap(), outside);
    assert_eq!(std::fs::read(d.join("zz")).unwrap(), b"inside\n");
    untouched();

    // A hard-link pair: one inode, the worker's bytes, no setuid.
    h.ctl_ok(&["cp", &format!("{w}:/tmp/x/h"), local.to_str().unwrap()])
        .await;
    let (a, b) = (local.join("h/a"), local.join("h/b"));
    assert_eq!(sha256(&std::fs::read(&a).unwrap()), worker_sha);
    assert_eq!(sha256(&std::fs::read(&b).unwrap()), worker_sha);
    let (ma, mb) = (
        std::fs::metadata(&a).unwrap(),
        std::fs::metadata(&b).unwrap(),
    );
    assert_eq!((ma.ino(), ma.nlink()), (mb.ino(), 2));
    assert_eq!(ma.permissions().mode() & 0o7777, 0o755);

    // A fifo is refused: tether's exit code, the entry named, nothing made.
    let out = h
        .ctl(&["cp", &format!("{w}:/tmp/x/f"), local.to_str().unwrap()])
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains(r#"Error: refusing archive entry "f/pipe": fifo"#),
        "{err}"
    );
    assert!(!local.join("f/pipe").exists());
    untouched();
    h.stop().await;
}

/// A compromised server is in the operator's threat model too: the archive
/// it sends goes through the same extraction. A symlink then an entry
/// through it, or a hard link out of the destination: refused, with
/// tether's exit code, and nothing written outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_from_a_compromised_server_stays_inside_the_destination() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"original").unwrap();
    let o = outside.to_str().unwrap().to_string();
    let local = dir.path().join("local");
    std::fs::create_dir(&local).unwrap();

    /// One crafted entry: type, name, link name.
    type Crafted<'a> = (tar::EntryType, &'a str, &'a str);
    let attacks: [(&[Crafted], &str); 2] = [
        (
            &[
                (tar::EntryType::Directory, "d/", ""),
                (tar::EntryType::Symlink, "d/a", &o),
                (tar::EntryType::Regular, "d/a/victim", ""),
            ],
            r#"Error: refusing archive entry "d/a/victim": its path goes through a symbolic link"#,
        ),
        (
            &[
                (tar::EntryType::Directory, "e/", ""),
                (tar::EntryType::Link, "e/h", "../outside/victim"),
            ],
            r#"Error: refusing archive entry "e/h": hard link to something other than an earlier file of the archive"#,
        ),
    ];
    for (entries, expected) in attacks {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, link) in entries {
            let mut hd = tar::Header::new_ustar();
            hd.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            hd.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            hd.set_entry_type(*kind);
            hd.set_mode(0o644);
            hd.set_size(if *kind == tar::EntryType::Regular {
                6
            } else {
                0
            });
            hd.set_cksum();
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"pwned\n"
            } else {
                b""
            };
            b.append(&hd, data).unwrap();
        }
        let archive = b.into_inner().unwrap();
        let out = cp_from(archive, &local).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains(expected), "{err}");
        let names: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["victim"]);
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"original");
        assert_eq!(
            std::fs::metadata(outside.join("victim")).unwrap().nlink(),
            1
        );
    }

    // Entries named otherwise than the source (`w:/x`) land under its
    // name, not beside it: no `.bashrc` or hook in the destination.
    let into = dir.path().join("home");
    std::fs::create_dir(&into).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        (".bashrc", &b"pwned\n"[..]),
        (".git/hooks/pre-commit", b"x\n"),
    ] {
        let mut hd = tar::Header::new_gnu();
        hd.set_size(data.len() as u64);
        hd.set_mode(0o755);
        hd.set_cksum();
        b.append_data(&mut hd, name, data).unwrap();
    }
    let out = cp_from(b.into_inner().unwrap(), &into).await;
    let err = String::from_utf8_lossy(&out.stderr);
    let names: Vec<_> = std::fs::read_dir(&into)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !into.join(".bashrc").exists() && !into.join(".git").exists(),
        "written beside the copy: {names:?} {err}"
    );
    assert!(
        names.iter().all(|n| n == "x"),
        "only the source's name: {names:?} {err}"
    );
}

/// `tether ctl cp w:/x DST` against a stand-in server answering with
/// `archive`.
async fn cp_from(archive: Vec<u8>, dst: &std::path::Path) -> std::process::Output {
    let url = serve_archive(archive).await;
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["ctl", "cp", "w:/x", dst.to_str().unwrap()])
        .env("TETHER_SERVER", &url)
        .env("TETHER_TOKEN", "t")
        .output()
        .await
        .unwrap()
}

/// A stand-in server on 127.0.0.1:0 that answers every stat with "a
/// directory" and every archive request with `archive`.
async fn serve_archive(archive: Vec<u8>) -> String {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/api/v1/workers/{w}/stat",
            get(|| async { axum::Json(serde_json::json!({"exists": true, "is_dir": true})) }),
        )
        .route(
            "/api/v1/workers/{w}/archive",
            get(move || async move { archive }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}
