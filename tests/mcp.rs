//! The MCP endpoint against a real server, agent and engine, driven through
//! the official SDK's client (`rmcp`) over Streamable HTTP (docs/mcp.md);
//! what a client without a token gets is checked with plain HTTP.

mod common;

use common::mcp::Mcp;
use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_drives_a_sandbox_within_its_task_on_allowed_nodes() {
    let (mut h, node) = Harness::start().await;

    // No token, no MCP.
    let r = reqwest::Client::new()
        .post(format!("{}/mcp", h.url))
        .header("Accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let mut m = Mcp::connect(&h.url, &h.token).await;
    let tools = m.request("tools/list", json!({})).await;
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for want in [
        "sandbox.create",
        "sandbox.exec",
        "sandbox.put_file",
        "sandbox.get_file",
        "sandbox.destroy",
        "node.list",
        "node.get",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    let create = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "sandbox.create")
        .unwrap();
    assert!(
        create["inputSchema"]["required"]
            .as_array()
            .unwrap()
            .contains(&json!("task_id")),
        "{create}"
    );

    // Bad input: an unknown tool, an ill-typed argument, an unknown sandbox.
    let v = m
        .request(
            "tools/call",
            json!({"name": "sandbox.nope", "arguments": {}}),
        )
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not found"),
        "{v}"
    );
    let v = m
        .request(
            "tools/call",
            json!({"name": "sandbox.exec", "arguments": {"task_id": "t1", "worker_id": "w", "argv": 5}}),
        )
        .await;
    // A tool error naming the argument and what was wrong with it; the
    // session goes on.
    assert_eq!(v["result"]["isError"], true, "{v}");
    let text = v["result"]["content"][0]["text"].as_str().unwrap_or("");
    assert!(
        text.contains("argument \"argv\"") && text.contains("invalid type: integer `5`"),
        "{v}"
    );
    let v = m
        .request(
            "tools/call",
            json!({"name": "sandbox.exec", "arguments": {"task_id": "t1", "worker_id": "w", "argv": ["true"], "timeout_s": "soon"}}),
        )
        .await;
    assert_eq!(v["result"]["isError"], true, "{v}");
    let text = v["result"]["content"][0]["text"].as_str().unwrap_or("");
    assert!(text.contains("argument \"timeout_s\""), "{v}");
    let v = m
        .request(
            "tools/call",
            json!({"name": "sandbox.exec", "arguments": {"worker_id": "w", "argv": ["true"]}}),
        )
        .await;
    assert_eq!(v["result"]["isError"], true, "{v}");
    let text = v["result"]["content"][0]["text"].as_str().unwrap_or("");
    assert!(text.contains("missing field `task_id`"), "{v}");
    let e = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": "no-such-worker", "argv": ["true"]}),
        )
        .await
        .unwrap_err();
    assert!(e.starts_with("not_found"), "{e}");

    // No node is allowed by default: a tool error naming the rule.
    let e = m
        .call("sandbox.create", json!({"task_id": "t1", "image": image()}))
        .await
        .unwrap_err();
    assert!(e.contains("allowlist"), "{e}");
    assert_eq!(
        m.call("node.list", json!({})).await.unwrap()["nodes"],
        json!([])
    );

    // Allowed through the API (as `tether ctl mcp allow` does).
    let r = reqwest::Client::new()
        .put(format!("{}/api/v1/mcp/nodes/{node}", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (url, token) = (h.url.clone(), h.token.clone());
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("ctl")
            .args(args)
            .env("TETHER_SERVER", &url)
            .env("TETHER_TOKEN", &token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(ctl(&["mcp", "list"]).trim(), node);
    let cfg: Value = serde_json::from_str(&ctl(&["mcp", "config"])).unwrap();
    assert_eq!(cfg["mcpServers"]["tether"]["url"], format!("{}/mcp", h.url));
    assert_eq!(
        cfg["mcpServers"]["tether"]["headers"]["Authorization"],
        format!("Bearer {}", h.token)
    );
    let nodes = m.call("node.list", json!({})).await.unwrap();
    assert_eq!(nodes["nodes"][0]["node_id"], node.as_str(), "{nodes}");

    let sb = m
        .call(
            "sandbox.create",
            json!({"task_id": "t1", "job_id": "j1", "image": image(), "cmd": ["sleep", "600"]}),
        )
        .await
        .unwrap();
    let w = sb["worker_id"].as_str().unwrap().to_string();
    assert_eq!(sb["node_id"], node.as_str());
    assert_eq!(sb["state"], "running");
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"tether.task_id\"}}",
            &format!("tether-{w}")
        ]),
        "t1"
    );

    let r = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "command": "cat; echo out; echo err >&2; exit 3", "stdin": "in\n"}),
        )
        .await
        .unwrap();
    assert_eq!(r["exit_code"], 3, "{r}");
    assert_eq!(r["stdout"], "in\nout\n");
    assert_eq!(r["stderr"], "err\n");
    assert_eq!(r["truncated"], false);
    // The sandbox named by the job it was created for, within the task.
    let host = |r: Value| r["stdout"].as_str().unwrap_or("").to_string();
    let by_worker = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "argv": ["hostname"]}),
        )
        .await
        .unwrap();
    let by_job = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "job_id": "j1", "argv": ["hostname"]}),
        )
        .await
        .unwrap();
    assert_eq!(host(by_job), host(by_worker));
    // Refusals of `sandbox.exec` of `true` naming the sandbox by `which`.
    let exec_refused = async |m: &mut Mcp, mut which: Value| {
        which["argv"] = json!(["true"]);
        m.call("sandbox.exec", which).await.unwrap_err()
    };
    let e = exec_refused(&mut m, json!({"task_id": "t1"})).await;
    assert!(e.contains("give worker_id or job_id"), "{e}");
    let e = exec_refused(&mut m, json!({"task_id": "t1", "job_id": "j-none"})).await;
    assert!(e.starts_with("not_found"), "{e}");
    let e = exec_refused(&mut m, json!({"task_id": "t9", "job_id": "j1"})).await;
    assert!(e.starts_with("not_found"), "another task's job: {e}");
    let twin = m
        .call(
            "sandbox.create",
            json!({"task_id": "t1", "job_id": "j1", "image": image(), "cmd": ["sleep", "600"]}),
        )
        .await
        .unwrap();
    let e = exec_refused(&mut m, json!({"task_id": "t1", "job_id": "j1"})).await;
    assert!(e.contains("has 2 sandboxes"), "{e}");
    m.call(
        "sandbox.destroy",
        json!({"task_id": "t1", "worker_id": twin["worker_id"]}),
    )
    .await
    .unwrap();

    // Output as it comes, when the client asks for progress.
    let (notes, r) = m
        .exec_with_progress(json!({"task_id": "t1", "worker_id": w,
            "command": "echo first; sleep 1; echo second >&2"}))
        .await;
    assert_eq!(r["stdout"], "first\n", "{r}");
    assert_eq!(
        notes,
        vec![
            "stdout: first\n".to_string(),
            "stderr: second\n".to_string()
        ]
    );

    // A command that outlives its call goes on, and is followed to its end
    // by the task that started it only.
    let r = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "command": "echo start; sleep 2; echo done; exit 4", "wait_s": 0}),
        )
        .await
        .unwrap();
    assert_eq!(r["running"], true, "{r}");
    assert!(r["exit_code"].is_null(), "{r}");
    let id = r["exec_id"].as_str().expect("an exec id").to_string();
    let mut out = r["stdout"].as_str().unwrap().to_string();
    let e = m
        .call(
            "sandbox.exec_follow",
            json!({"task_id": "t2", "exec_id": id}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("not_found"), "{e}");
    let (end, rest) = follow_to_end(&mut m, "t1", &id).await;
    out.push_str(&rest);
    assert_eq!(end["exit_code"], 4, "{end}");
    assert_eq!(out, "start\ndone\n");
    let e = m
        .call(
            "sandbox.exec_follow",
            json!({"task_id": "t1", "exec_id": id}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("not_found"), "{e}");

    // A sandbox keeps at most 16 execs running past their call: each holds
    // output in the server until followed.
    let mut kept = Vec::new();
    for _ in 0..16 {
        let r = m
            .call(
                "sandbox.exec",
                json!({"task_id": "t1", "worker_id": w, "command": "while [ ! -e /tmp/go ]; do usleep 50000; done; echo late", "wait_s": 0}),
            )
            .await
            .unwrap();
        assert_eq!(r["running"], true, "{r}");
        kept.push(r["exec_id"].as_str().unwrap().to_string());
    }
    let e = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "command": "true", "wait_s": 0}),
        )
        .await
        .unwrap_err();
    assert!(
        e.contains("unavailable") && e.contains("exec_follow"),
        "{e}"
    );
    // Followed to their ends, they make room again.
    docker(&["exec", &format!("tether-{w}"), "touch", "/tmp/go"]);
    for id in &kept {
        follow_to_end(&mut m, "t1", id).await;
    }
    let r = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "command": "echo again"}),
        )
        .await
        .unwrap();
    assert_eq!(r["stdout"], "again\n", "{r}");

    // Output past the cap is cut on a character boundary and flagged.
    let r = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "command": "i=0; while [ $i -lt 500 ]; do printf 'é'; i=$((i+1)); done", "max_output_bytes": 101}),
        )
        .await
        .unwrap();
    assert_eq!(r["truncated"], true, "{r}");
    assert_eq!(r["stdout"].as_str().unwrap(), "é".repeat(50));
    // The cap is held in the server's memory: bounded, and nothing runs
    // when asked for more.
    let e = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "command": "touch /tmp/ran", "max_output_bytes": 1u64 << 40}),
        )
        .await
        .unwrap_err();
    assert!(
        e.starts_with("invalid_request: max_output_bytes is at most"),
        "{e}"
    );
    let r = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "argv": ["test", "-e", "/tmp/ran"]}),
        )
        .await
        .unwrap();
    assert_eq!(r["exit_code"], 1, "{r}");

    // Files both ways: text, and bytes that are not UTF-8. The directory
    // must exist.
    let e = m
        .call(
            "sandbox.put_file",
            json!({"task_id": "t1", "worker_id": w, "path": "/tmp/nowhere/x", "content": "x"}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("not_found"), "{e}");
    m.call(
        "sandbox.exec",
        json!({"task_id": "t1", "worker_id": w, "argv": ["mkdir", "-p", "/tmp/a"]}),
    )
    .await
    .unwrap();
    let put = m
        .call(
            "sandbox.put_file",
            json!({"task_id": "t1", "worker_id": w, "path": "/tmp/a/hello.txt", "content": "hello, sandbox\n"}),
        )
        .await
        .unwrap();
    assert_eq!(put["size"], 15);
    let r = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "argv": ["cat", "/tmp/a/hello.txt"]}),
        )
        .await
        .unwrap();
    assert_eq!(r["stdout"], "hello, sandbox\n");
    m.call(
        "sandbox.exec",
        json!({"task_id": "t1", "worker_id": w, "command": "printf '\\377\\000\\001' > /tmp/bin"}),
    )
    .await
    .unwrap();
    let f = m
        .call(
            "sandbox.get_file",
            json!({"task_id": "t1", "worker_id": w, "path": "/tmp/bin"}),
        )
        .await
        .unwrap();
    assert_eq!(f["size"], 3);
    assert_eq!(f["content_base64"], "/wAB", "{f}");
    let f = m
        .call(
            "sandbox.get_file",
            json!({"task_id": "t1", "worker_id": w, "path": "/tmp/a/hello.txt"}),
        )
        .await
        .unwrap();
    assert_eq!(f["content"], "hello, sandbox\n");
    let e = m
        .call(
            "sandbox.get_file",
            json!({"task_id": "t1", "worker_id": w, "path": "/tmp/a/hello.txt", "max_bytes": 4}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("too_large") && e.contains("archive"), "{e}");
    let e = m
        .call(
            "sandbox.get_file",
            json!({"task_id": "t1", "worker_id": w, "path": "/tmp/a/missing"}),
        )
        .await
        .unwrap_err();
    assert!(
        e.starts_with("not_found"),
        "a path that does not exist: {e}"
    );
    // Binary both ways, compared by hash: in the sandbox and back again.
    use base64::Engine;
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 37 % 256) as u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    m.call(
        "sandbox.put_file",
        json!({"task_id": "t1", "worker_id": w, "path": "/tmp/a/blob", "content_base64": b64, "mode": "750"}),
    )
    .await
    .unwrap();
    let r = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "argv": ["stat", "-c", "%a", "/tmp/a/blob"]}),
        )
        .await
        .unwrap();
    assert_eq!(r["stdout"], "750\n", "the mode asked for");
    let r = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "argv": ["sha256sum", "/tmp/a/blob"]}),
        )
        .await
        .unwrap();
    assert!(
        r["stdout"].as_str().unwrap().starts_with(&sha256(&bytes)),
        "{r}"
    );
    let f = m
        .call(
            "sandbox.get_file",
            json!({"task_id": "t1", "worker_id": w, "path": "/tmp/a/blob"}),
        )
        .await
        .unwrap();
    let back = base64::engine::general_purpose::STANDARD
        .decode(f["content_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(sha256(&back), sha256(&bytes));

    // Another task cannot touch this sandbox.
    let e = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t2", "worker_id": w, "argv": ["true"]}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("another task"), "{e}");
    let e = m
        .call("sandbox.destroy", json!({"task_id": "t2", "worker_id": w}))
        .await
        .unwrap_err();
    assert!(e.contains("another task"), "{e}");

    // Denied again: the node's sandboxes are out of reach.
    let r = reqwest::Client::new()
        .delete(format!("{}/api/v1/mcp/nodes/{node}", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e = m
        .call(
            "sandbox.exec",
            json!({"task_id": "t1", "worker_id": w, "argv": ["true"]}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("allowlist"), "{e}");
    reqwest::Client::new()
        .put(format!("{}/api/v1/mcp/nodes/{node}", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();

    // The main process's output, with time stamps.
    let talker = m
        .call(
            "sandbox.create",
            json!({"task_id": "t1", "image": image(), "cmd": ["sh", "-c", "echo one; echo two >&2; sleep 1; echo three; sleep 600"]}),
        )
        .await
        .unwrap();
    let tw = talker["worker_id"].as_str().unwrap().to_string();
    let logs = m
        .call(
            "sandbox.stream_logs",
            json!({"task_id": "t1", "worker_id": tw, "follow_s": 3}),
        )
        .await
        .unwrap();
    let lines: Vec<(String, String)> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert!(l["time"].as_str().unwrap().starts_with("20"), "{l}");
            (
                l["stream"].as_str().unwrap().to_string(),
                l["line"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [("stdout", "one"), ("stderr", "two"), ("stdout", "three")] {
        assert!(
            lines.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {lines:?}"
        );
    }
    let tail = m
        .call(
            "sandbox.stream_logs",
            json!({"task_id": "t1", "worker_id": tw, "tail": 1}),
        )
        .await
        .unwrap();
    assert_eq!(tail["lines"].as_array().unwrap().len(), 1, "{tail}");
    m.call("sandbox.destroy", json!({"task_id": "t1", "worker_id": tw}))
        .await
        .unwrap();

    // A token narrowed to this node and a task prefix, made with ctl.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "ctl",
            "mcp",
            "token",
            "create",
            "--node",
            &node,
            "--task-prefix",
            "proj-",
        ])
        .env("TETHER_SERVER", &h.url)
        .env("TETHER_TOKEN", &h.token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let narrow = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(narrow.starts_with("tmcp_"), "{narrow}");
    let listed = ctl(&["mcp", "token", "ls"]);
    assert!(
        listed.contains("task_prefix=proj-") && !listed.contains(&narrow),
        "{listed}"
    );
    let mut n = Mcp::connect(&h.url, &narrow).await;
    // Outside its task prefix: refused, naming the rule.
    let e = n
        .call("sandbox.create", json!({"task_id": "t9", "image": image()}))
        .await
        .unwrap_err();
    assert!(e.contains("task ids start with \"proj-\""), "{e}");
    // Another task's sandbox (made with the operator token) stays out of reach.
    let e = n
        .call(
            "sandbox.exec",
            json!({"task_id": "proj-1", "worker_id": w, "argv": ["true"]}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("another task"), "{e}");
    let mine = n
        .call(
            "sandbox.create",
            json!({"task_id": "proj-1", "image": image(), "cmd": ["sleep", "600"]}),
        )
        .await
        .unwrap();
    let mw = mine["worker_id"].as_str().unwrap().to_string();
    let r = n
        .call(
            "sandbox.exec",
            json!({"task_id": "proj-1", "worker_id": mw, "argv": ["echo", "ok"]}),
        )
        .await
        .unwrap();
    assert_eq!(r["stdout"], "ok\n");
    // The token cannot reach the operator API.
    let r = reqwest::Client::new()
        .get(format!("{}/api/v1/workers", h.url))
        .bearer_auth(&narrow)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A second node, allowed for MCP, is still out of this token's reach.
    let node2 = h.add_agent().await;
    reqwest::Client::new()
        .put(format!("{}/api/v1/mcp/nodes/{node2}", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    let e = n
        .call(
            "sandbox.create",
            json!({"task_id": "proj-2", "image": image(), "node": node2}),
        )
        .await
        .unwrap_err();
    assert!(e.contains("may not use node"), "{e}");
    let seen = n.call("node.list", json!({})).await.unwrap();
    assert_eq!(seen["nodes"].as_array().unwrap().len(), 1, "{seen}");
    let bad = reqwest::Client::new()
        .post(format!("{}/api/v1/mcp/tokens", h.url))
        .bearer_auth(&h.token)
        .json(&json!({"nodes": ["no-such-node"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 404, "a token for an unknown node is refused");
    // Revoked: the token opens nothing.
    let id = listed.split_whitespace().next().unwrap();
    ctl(&["mcp", "token", "revoke", id]);
    let r = reqwest::Client::new()
        .post(format!("{}/mcp", h.url))
        .bearer_auth(&narrow)
        .header("Accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 99, "method": "tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let e = n.call("node.list", json!({})).await;
    assert!(e.is_err(), "the open session is refused too: {e:?}");
    m.call(
        "sandbox.destroy",
        json!({"task_id": "proj-1", "worker_id": mw}),
    )
    .await
    .unwrap();

    let nets = || {
        docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=tether.worker_id={w}"),
        ])
    };
    assert!(!nets().is_empty(), "the sandbox has its own network");
    let d = m
        .call("sandbox.destroy", json!({"task_id": "t1", "worker_id": w}))
        .await
        .unwrap();
    assert_eq!(d["removed"], true);
    assert!(
        docker(&["ps", "-aq", "--filter", &format!("name=tether-{w}")]).is_empty(),
        "the container is gone"
    );
    assert!(nets().is_empty(), "its network is gone");
    // A destroyed sandbox is gone for every tool; the session goes on.
    let e = exec_refused(&mut m, json!({"task_id": "t1", "worker_id": w})).await;
    assert!(e.starts_with("not_found"), "{e}");
    assert!(m.call("node.list", json!({})).await.is_ok());
    let got = m.call("node.get", json!({"node_id": node})).await.unwrap();
    assert_eq!(got["node_id"], node.as_str());

    // Every call is in the audit trail, with its caller and no secret.
    let records = |args: &[&str]| -> Vec<Value> {
        let mut a = vec!["audit", "--json"];
        a.extend_from_slice(args);
        ctl(&a)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // What the node tools showed, too (they name no task).
    let every = records(&[]);
    for op in ["mcp:node.list", "mcp:node.get"] {
        let r = every
            .iter()
            .find(|r| r["operation"] == op && r["outcome"] == "ok")
            .unwrap_or_else(|| panic!("{op} in {every:?}"));
        assert_eq!(r["caller"], "operator", "{r}");
        assert!(r["task_id"].is_null(), "{r}");
    }
    assert!(
        every
            .iter()
            .any(|r| r["operation"] == "mcp:node.get" && r["node_id"] == node.as_str())
    );
    let t1 = records(&["--task", "t1"]);
    // Calls whose arguments did not parse never reached their tool, and
    // are audited all the same, with why.
    let unparsed: Vec<&Value> = t1
        .iter()
        .filter(|r| {
            r["operation"] == "mcp:sandbox.exec"
                && r["outcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("invalid_request: argument"))
        })
        .collect();
    assert_eq!(unparsed.len(), 2, "{t1:?}");
    assert!(
        unparsed
            .iter()
            .any(|r| r["outcome"].as_str().unwrap().contains("\"argv\""))
    );
    assert!(unparsed.iter().all(|r| r["caller"] == "operator"));
    for op in [
        "mcp:sandbox.create",
        "mcp:sandbox.exec",
        "mcp:sandbox.put_file",
        "mcp:sandbox.get_file",
        "mcp:sandbox.stream_logs",
        "mcp:sandbox.destroy",
    ] {
        assert!(
            t1.iter()
                .any(|r| r["operation"] == op && r["outcome"] == "ok"),
            "{op} in {t1:?}"
        );
    }
    let exec3 = t1
        .iter()
        .find(|r| r["operation"] == "mcp:sandbox.exec" && r["exit_code"] == 3)
        .expect("the exec that exited 3");
    assert_eq!(exec3["caller"], "operator");
    assert_eq!(exec3["node_id"], node.as_str());
    assert_eq!(exec3["worker_id"], w.as_str());
    // Each exec that ran was recorded as it started too (the call's own
    // record comes at its end); refused calls (below) were not.
    let ran = t1
        .iter()
        .filter(|r| r["operation"] == "mcp:sandbox.exec" && r["outcome"] == "ok")
        .count();
    let starts: Vec<&Value> = t1
        .iter()
        .filter(|r| r["operation"] == "mcp:sandbox.exec_start")
        .collect();
    assert!(
        ran > 0 && starts.len() >= ran,
        "{ran} execs, starts {starts:?}"
    );
    for s in &starts {
        assert!(
            s["outcome"].as_str().unwrap().starts_with("started: exec "),
            "{s}"
        );
        assert_eq!(s["node_id"], node.as_str(), "{s}");
        assert_eq!(s["caller"], "operator", "{s}");
    }
    // Another task's calls: refused; its follow of t1's exec finds none (no
    // hint that it exists).
    let t2 = records(&["--task", "t2"]);
    assert!(
        t2.iter().all(|r| {
            let outcome = r["outcome"].as_str().unwrap();
            outcome.starts_with("policy_denied")
                || (r["operation"] == "mcp:sandbox.exec_follow" && outcome.starts_with("not_found"))
        }),
        "{t2:?}"
    );
    let proj = records(&["--task", "proj-1"]);
    // The token's calls name it by id; the operator destroyed its sandbox.
    assert!(!proj.is_empty());
    for r in &proj {
        let by_token = r["caller"].as_str().unwrap().starts_with("mcp-token:");
        assert_eq!(by_token, r["operation"] != "mcp:sandbox.destroy", "{r}");
    }
    let all = ctl(&["audit", "--json"]);
    for secret in [narrow.as_str(), h.token.as_str(), "hello, sandbox"] {
        assert!(!all.contains(secret), "the audit holds {secret:?}");
    }
    assert!(ctl(&["audit", "--worker", &w]).lines().count() > 3);
    h.stop().await;
}

/// Follows exec `id` of `task` until it ends: its last answer and the
/// stdout gathered on the way.
async fn follow_to_end(m: &mut Mcp, task: &str, id: &str) -> (Value, String) {
    let mut out = String::new();
    loop {
        let f = m
            .call(
                "sandbox.exec_follow",
                json!({"task_id": task, "exec_id": id, "wait_s": 10}),
            )
            .await
            .unwrap();
        out.push_str(f["stdout"].as_str().unwrap());
        if f["running"] == false {
            return (f, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_is_only_its_openers() {
    let (h, _node) = Harness::start().await;
    let other = h
        .ctl_ok(&["mcp", "token", "create"])
        .await
        .trim()
        .to_string();
    let post = |token: &str, session: Option<&str>, body: Value| {
        let mut r = reqwest::Client::new()
            .post(format!("{}/mcp", h.url))
            .bearer_auth(token)
            .header("Accept", "application/json, text/event-stream")
            .json(&body);
        if let Some(s) = session {
            r = r.header("mcp-session-id", s);
        }
        r.send()
    };
    let r = post(
        &h.token,
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                          "clientInfo": {"name": "t", "version": "0"}}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    // Another valid token that learns the session's id gets nothing of it.
    let r = post(&other, Some(&session), initialized.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = post(&other, Some(&session), list.clone()).await.unwrap();
    assert_eq!(r.status(), 404);
    // Its opener goes on in it.
    let r = post(&h.token, Some(&session), initialized).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let r = post(&h.token, Some(&session), list).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("sandbox.exec"));
    h.stop().await;
}
