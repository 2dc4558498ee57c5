//! Attacks on the node, each performed against the real engine
//! (docs/security.md): host paths through links, uploads carrying setuid
//! programs, capabilities or devices, Docker objects tether did not create, a worker filling the disk through its logs, requests with
//! fields the node would silently drop.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use tether::docker::containers;
use tether::docker::egress::NetPlan;
use tether::docker::networks::SubnetPool;
use tether::protocol::{ErrorCode, Spawn, SpawnRequest};

async fn spawn_err(h: &Harness, args: &[&str]) -> String {
    let out = h.ctl(args).await;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(125),
        "spawn {args:?} was not refused: {}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// The refusal of a spawn of `image()` that mounts `spec` (`-v`) and runs
/// `true`.
async fn mount_err(h: &Harness, spec: &str) -> String {
    spawn_err(h, &["spawn", "--image", &image(), "-v", spec, "--", "true"]).await
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_never_follow_links_a_worker_planted() {
    let mut h = Harness::server().await;
    let allowed = h.state_path("allowed");
    std::fs::create_dir_all(allowed.join("sub")).unwrap();
    let allowed_s = allowed.to_str().unwrap().to_string();
    let node = unique("test");
    let mut cfg = h.agent_config(&node);
    // The test's directory holds the agent's state directory too: allowed
    // as a whole, the state inside it still stays out.
    let top = h
        .state_path("")
        .to_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    cfg.policy.allowed_host_paths = vec![allowed_s.clone(), top.clone()];
    cfg.policy.read_only_by_default = true;
    let state = cfg.state_dir.clone();
    h.add_agent_with(cfg).await;
    let img = image();
    assert!(
        state.join("node.key").exists(),
        "the agent keeps its key there"
    );
    for source in [top.clone(), state.to_str().unwrap().to_string()] {
        let err = mount_err(&h, &format!("{source}:/s:ro")).await;
        assert!(
            err.contains("policy_denied") && err.contains("the agent's state directory"),
            "{source}: {err}"
        );
    }

    // Worker A may write the allowed directory, and plants a link to the
    // host's root in it.
    let a = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &img,
            "-v",
            &format!("{allowed_s}:/data:rw"),
            "--",
            "sh",
            "-c",
            "ln -s / /data/esc && sleep 3600",
        ])
        .await
        .trim()
        .to_string();
    let esc = allowed.join("esc");
    wait_for("the planted link", || esc.symlink_metadata().is_ok()).await;

    // Worker B asks for the link: refused, the host's root stays out.
    let err = spawn_err(
        &h,
        &[
            "spawn",
            "--image",
            &img,
            "-v",
            &format!("{allowed_s}/esc:/host:ro"),
            "--",
            "ls",
            "/host",
        ],
    )
    .await;
    assert!(
        err.contains("policy_denied") && err.contains("symbolic link"),
        "{err}"
    );
    let err = mount_err(&h, &format!("{allowed_s}/esc/var/run:/run2")).await;
    assert!(err.contains("symbolic link"), "{err}");

    // A path inside what A can write could be swapped for a link between
    // the check and the mount: refused while A runs.
    let sub = format!("{allowed_s}/sub:/x:ro");
    let err = mount_err(&h, &sub).await;
    assert!(err.contains("read-write"), "{err}");
    // Targets over the kernel's views, and sources that do not exist (the
    // engine would create them as root), are refused too.
    let err = mount_err(&h, &format!("{allowed_s}:/proc/x")).await;
    assert!(err.contains("/proc"), "{err}");
    let err = mount_err(&h, &format!("{allowed_s}/missing:/m")).await;
    assert!(err.contains("policy_denied"), "{err}");
    assert!(!allowed.join("missing").exists());

    // Stopped, A still counts: its bind can be written by a file upload, or
    // by A itself once restarted.
    h.ctl_ok(&["stop", &a]).await;
    let err = mount_err(&h, &sub).await;
    assert!(err.contains("read-write"), "{err}");

    // With A gone the same path mounts, read-only by default.
    h.ctl_ok(&["rm", "-f", &a]).await;
    std::fs::write(allowed.join("sub/f"), b"inside").unwrap();
    let c = h
        .ctl_ok(&["spawn", "--image", &img, "-v", &sub, "--", "sleep", "3600"])
        .await
        .trim()
        .to_string();
    assert_eq!(h.ctl_ok(&["exec", &c, "--", "cat", "/x/f"]).await, "inside");
    let out = h
        .ctl(&["exec", &c, "--", "sh", "-c", "echo x > /x/g"])
        .await;
    assert_ne!(out.status.code(), Some(0), "the mount is read-only");
    // Nor may a worker write around what C mounts: it could swap C's path
    // for a link, and the engine resolves it again when C restarts.
    let err = mount_err(&h, &format!("{allowed_s}:/data:rw")).await;
    assert!(
        err.contains("policy_denied") && err.contains("holds"),
        "{err}"
    );
    h.ctl_ok(&["rm", "-f", &c]).await;
    // Nor one spawn both: a restart policy would mount the swapped path.
    let err = spawn_err(
        &h,
        &[
            "spawn",
            "--image",
            &img,
            "-v",
            &format!("{allowed_s}/sub:/x:rw"),
            "-v",
            &format!("{allowed_s}/sub/f:/f:ro"),
            "--",
            "true",
        ],
    )
    .await;
    assert!(
        err.contains("policy_denied") && err.contains("this spawn also mounts"),
        "{err}"
    );
    h.stop().await;
}

/// A tar header for the upload tests.
fn entry(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_path(path).unwrap();
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    h
}

/// Puts `archive` into `path` of worker `w` through the HTTP API: the
/// status and the body.
async fn put_raw(h: &Harness, w: &str, path: &str, archive: Vec<u8>) -> (u16, String) {
    let r = reqwest::Client::new()
        .put(format!("{}/api/v1/workers/{w}/archive", h.url))
        .query(&[("path", path)])
        .bearer_auth(&h.token)
        .body(archive)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A worker's writable bind is a directory of the host, and Docker extracts
/// an upload as root with the modes and attributes the archive names: an
/// upload must not leave a setuid-root program, a file with capabilities
/// or a device node there for a host user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_leaves_no_setuid_program_capability_or_device_on_the_host() {
    let mut h = Harness::server().await;
    let allowed = h.state_path("bind");
    std::fs::create_dir_all(&allowed).unwrap();
    let allowed_s = allowed.to_str().unwrap().to_string();
    let mut cfg = h.agent_config(&unique("test"));
    cfg.policy.allowed_host_paths = vec![allowed_s.clone()];
    h.add_agent_with(cfg).await;
    let w = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &image(),
            "-v",
            &format!("{allowed_s}:/data:rw"),
            "--",
            "sleep",
            "3600",
        ])
        .await
        .trim()
        .to_string();

    // A setuid-root program, and one with CAP_SETUID in `security.capability`
    // (a version-2 capability set: magic | effective, permitted bit 7).
    let body = b"#!/bin/sh\nid\n";
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &entry(tar::EntryType::Regular, "su", 0o4755, body.len() as u64),
        &body[..],
    )
    .unwrap();
    let mut cap = vec![0x01, 0x00, 0x00, 0x02, 0x80, 0, 0, 0];
    cap.resize(20, 0);
    b.append_pax_extensions([
        ("SCHILY.xattr.security.capability", &cap[..]),
        ("SCHILY.xattr.user.note", &b"kept"[..]),
    ])
    .unwrap();
    b.append(
        &entry(tar::EntryType::Regular, "capped", 0o2755, body.len() as u64),
        &body[..],
    )
    .unwrap();
    let (status, text) = put_raw(&h, &w, "/data", b.into_inner().unwrap()).await;
    assert_eq!(status, 200, "{text}");
    for name in ["su", "capped"] {
        let meta = std::fs::metadata(allowed.join(name)).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(meta.uid(), 0);
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o755,
            "{name}: setuid or setgid kept"
        );
        assert_eq!(std::fs::read(allowed.join(name)).unwrap(), body);
    }
    let mut buf = [0u8; 64];
    let capped = allowed.join("capped");
    assert!(
        rustix::fs::getxattr(&capped, "security.capability", &mut buf).is_err(),
        "file capabilities reached the host"
    );
    let n = rustix::fs::getxattr(&capped, "user.note", &mut buf).expect("user attributes pass");
    assert_eq!(&buf[..n], b"kept");

    // A device node (the host's first disk) refuses the whole upload.
    let mut dev = entry(tar::EntryType::Block, "sda", 0o666, 0);
    dev.set_device_major(8).unwrap();
    dev.set_device_minor(0).unwrap();
    dev.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&dev, &[][..]).unwrap();
    let (status, text) = put_raw(&h, &w, "/data", b.into_inner().unwrap()).await;
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("policy_denied") && text.contains("a block device"),
        "{text}"
    );
    assert!(
        allowed.join("sda").symlink_metadata().is_err(),
        "the device node was made"
    );

    // A stream Docker would decompress: a gzip header whose extra field
    // holds a harmless archive, the real one compressed behind it.
    let mut polyglot = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff];
    polyglot.resize(2048, 0);
    let (status, text) = put_raw(&h, &w, "/data", polyglot).await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("not a plain tar archive") && text.contains("gzip"),
        "{text}"
    );

    h.ctl_ok(&["rm", "-f", &w]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_never_touches_objects_it_did_not_create() {
    ensure_image();
    let engine = tether::docker::connect(None).await.unwrap();
    let pool = SubnetPool::new("10.213.0.0/16".parse().unwrap(), 28).unwrap();
    pool.sync(&engine).await.unwrap();
    let node = unique("test");
    let img = image();
    let spec = |worker_id: &str| Spawn {
        worker_id: worker_id.into(),
        spec: SpawnRequest {
            image: img.clone(),
            cmd: vec!["sleep".into(), "60".into()],
            ..Default::default()
        },
    };

    // A container of someone else's under the name a worker id maps to (as
    // `tether-agent` would be for worker id `agent`).
    let wid = format!("victim{}", &unique("x")[2..14]);
    let victim = format!("tether-{wid}");
    docker_all(&[
        "run",
        "-d",
        "--name",
        &victim,
        "--label",
        "tether.test=1",
        &img,
        "sleep",
        "3600",
    ]);
    let e = containers::spawn(
        &engine,
        &pool,
        &node,
        Default::default(),
        &spec(&wid),
        None,
        &NetPlan::Restricted,
        Ok(()),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict, "{e}");
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &victim]),
        "true"
    );
    let e = containers::remove(&engine, &pool, &node, &wid, true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound);
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &victim]),
        "true"
    );
    // No network was left behind for it either.
    assert_eq!(
        docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=tether.node_id={node}")
        ]),
        ""
    );

    // Someone else's network under a worker's network name.
    let wid2 = format!("netvictim{}", &unique("x")[2..14]);
    let net = format!("tether-{wid2}");
    docker_all(&["network", "create", "--label", "tether.test=1", &net]);
    let e = containers::spawn(
        &engine,
        &pool,
        &node,
        Default::default(),
        &spec(&wid2),
        None,
        // Nothing may start: the network name is taken.
        &NetPlan::Restricted,
        Ok(()),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict, "{e}");
    assert!(e.to_string().contains("network"), "{e}");
    assert_eq!(
        docker(&["network", "ls", "-q", "--filter", &format!("name=^{net}$")])
            .lines()
            .count(),
        1
    );
    assert_eq!(
        docker(&["ps", "-aq", "--filter", &format!("name=^{net}$")]),
        ""
    );

    docker_all(&["rm", "-f", &victim]);
    docker_all(&["network", "rm", &net]);
    docker_cleanup(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_fill_the_disk_through_its_logs() {
    let mut h = Harness::server().await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.defaults.log_max_size_mb = 1;
    cfg.defaults.log_max_files = 2;
    h.add_agent_with(cfg).await;
    let img = image();
    // 8 MB of output, then it stays up so its files can be measured.
    let w = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &img,
            "--",
            "sh",
            "-c",
            "yes 0123456789abcdef0123456789abcdef | head -c 8000000; echo done; sleep 3600",
        ])
        .await
        .trim()
        .to_string();
    let name = format!("tether-{w}");
    let log_path = docker(&["inspect", "-f", "{{.LogPath}}", &name]);
    let dir = Path::new(&log_path).parent().unwrap().to_path_buf();
    let logged = || -> u64 {
        std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().contains("-json.log"))
                    .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    };
    wait_for("the worker's output to end", || {
        docker_all(&["logs", "--tail", "1", &name]).contains("done")
    })
    .await;
    let total = logged();
    // JSON framing makes the 8 MB about 14 MB on disk; two files of 1 MB
    // (and a line's slack) are kept.
    assert!(
        total <= 2 * 1024 * 1024 + 64 * 1024,
        "{total} bytes of logs kept"
    );
    assert!(total > 0, "logs are kept at all ({})", dir.display());
    let cfg = docker(&["inspect", "-f", "{{json .HostConfig.LogConfig}}", &name]);
    let cfg: Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["Type"], "json-file");
    assert_eq!(cfg["Config"]["max-size"], "1m");
    assert_eq!(cfg["Config"]["max-file"], "2");

    // A disk limit is applied where the storage driver can, and refused
    // clearly where it cannot.
    let out = h
        .ctl(&[
            "spawn", "--image", &img, "--disk", "64", "--", "sleep", "60",
        ])
        .await;
    if out.status.success() {
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let opt = docker(&[
            "inspect",
            "-f",
            "{{json .HostConfig.StorageOpt}}",
            &format!("tether-{id}"),
        ]);
        assert!(opt.contains("\"size\":\"64M\""), "{opt}");
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unsupported") && err.contains("storage driver"),
            "{err}"
        );
    }
    h.ctl_ok(&["rm", "-f", &w]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_requests_with_unknown_fields_are_refused_by_name() {
    let (h, _node) = Harness::start().await;
    let resp = tether::http_client()
        .post(format!("{}/api/v1/workers", h.url))
        .bearer_auth(&h.token)
        .json(&serde_json::json!({"image": image(), "cmd": ["true"], "privilegd": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("privilegd"),
        "{v}"
    );
    let ps: Value = serde_json::from_str(&h.ctl_ok(&["ps", "--json"]).await).unwrap();
    assert_eq!(ps.as_array().unwrap().len(), 0, "nothing was spawned");
    h.stop().await;
}

/// The engine copies an image's labels onto its containers, and the agent
/// tells its own containers apart by label and name: an image carrying
/// one of tether's labels is refused, and so is a deployment's service
/// named like another service's relay sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_with_tethers_labels_or_a_sidecars_name_is_refused() {
    let mut h = Harness::server().await;
    h.add_agent().await;
    // Built from the test image, so it carries the test label too.
    let labelled = format!("tether-test-labelled:{}", unique("x"));
    let dockerfile = format!(
        "FROM {}\nLABEL tether.sidecar_for=somebody tether.relay_framing=1\n",
        image()
    );
    build_image_from(&labelled, &dockerfile);
    let err = spawn_err(&h, &["spawn", "--image", &labelled, "--", "true"]).await;
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", &labelled])
        .output();
    assert!(
        err.contains("invalid_request") && err.contains("carries the label"),
        "{err}"
    );
    // Nor may one carry an attribute of the engine's events: the engine
    // copies labels over them, and `exitCode=0` would make every exit of
    // its workers look like a success.
    let exits = format!("tether-test-exits:{}", unique("x"));
    build_image_from(&exits, &format!("FROM {}\nLABEL exitCode=0\n", image()));
    let err = spawn_err(
        &h,
        &["spawn", "--image", &exits, "--", "sh", "-c", "exit 3"],
    )
    .await;
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", &exits])
        .output();
    assert!(err.contains("carries the label \"exitCode\""), "{err}");

    // A service named as service web's relay sidecar would be.
    let file = h.state_path("shop.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  web:\n    image: {img}\n    command: [\"sleep\", \"3600\"]\n  web-relay:\n    image: {img}\n    command: [\"sleep\", \"3600\"]\n",
            img = image()
        ),
    )
    .unwrap();
    let name = unique("shop");
    let out = h
        .ctl(&[
            "deploy",
            "up",
            "-f",
            file.to_str().unwrap(),
            "--name",
            &name,
        ])
        .await;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("tether's sidecars"), "{err}");
    // Nothing of it was left running.
    let ps = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=tether.deployment={name}"),
        ])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&ps.stdout)
    );
    h.stop().await;
}

/// A label given at spawn or in a Compose file is a tether label: a Traefik,
/// Caddy or updater on the node that watches the engine's labels must not
/// find `traefik.http.routers…` on a worker and publish it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_labels_reach_no_other_tool_on_the_host() {
    let mut h = Harness::server().await;
    h.add_agent().await;
    let img = image();
    let rule = "Host(`w.example`)";
    let w = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &img,
            "--label",
            "traefik.enable=true",
            "--label",
            &format!("traefik.http.routers.w.rule={rule}"),
            "--",
            "sleep",
            "3600",
        ])
        .await
        .trim()
        .to_string();
    let name = unique("lbl");
    let text = format!(
        "services:\n  web:\n    image: {img}\n    command: [\"sleep\", \"3600\"]\n    labels:\n      traefik.enable: \"true\"\n"
    );
    let out = h.deploy_up_as(&h.token, &text, &name).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svc = format!("{name}_web");
    for (worker, rule) in [(&w, Some(rule)), (&svc, None)] {
        let on_engine: Value = serde_json::from_str(&docker(&[
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            &format!("tether-{worker}"),
        ]))
        .unwrap();
        let keys: Vec<&String> = on_engine.as_object().unwrap().keys().collect();
        assert!(
            keys.iter().all(|k| !k.starts_with("traefik")),
            "{worker}: {keys:?}"
        );
        assert_eq!(on_engine["tether.label.traefik.enable"], "true", "{worker}");
        // The user reads them back as given.
        let insp: Value = serde_json::from_str(&h.ctl_ok(&["inspect", worker]).await).unwrap();
        assert_eq!(insp["labels"]["traefik.enable"], "true", "{insp}");
        if let Some(rule) = rule {
            assert_eq!(insp["labels"]["traefik.http.routers.w.rule"], rule);
        }
        assert!(
            insp["labels"]
                .as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("tether.")),
            "{insp}"
        );
    }
    h.ctl_ok(&["deploy", "down", &name]).await;
    h.stop().await;
}
