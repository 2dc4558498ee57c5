//! Organizations: nodes join the organization of the key they register
//! with; an organization's operator token sees and schedules only its own
//! nodes, workers and audit records, and another organization's are
//! `not_found`, exactly as what does not exist. Real agents, real Docker.

mod common;

use common::*;
use std::process::Output;
use std::time::Duration;
use tether::agent::identity::NodeKey;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// `ctl ARGS` as `token`, which must fail; its error output.
async fn refused(h: &Harness, token: &str, args: &[&str]) -> String {
    let o = h.ctl_as(token, args, None).await;
    assert!(
        !o.status.success(),
        "ctl {args:?} should have failed: {}",
        stdout(&o)
    );
    stderr(&o)
}

async fn ok_as(h: &Harness, token: &str, args: &[&str]) -> String {
    h.ctl_ok_as(token, args).await
}

/// Another organization's worker and a worker that never existed get the
/// same answer, with only the id changed.
fn same_refusal(theirs: &str, none: &str, their_id: &str, no_id: &str) {
    assert_eq!(
        theirs.replace(their_id, "ID"),
        none.replace(no_id, "ID"),
        "another organization's object must look absent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_sees_and_schedules_only_its_own_nodes_and_workers() {
    let mut h = Harness::server().await;
    let img = image();
    let admin = h.token.clone();

    // The admin makes two organizations; names are checked.
    let key_a = h
        .ctl_ok(&["org", "create", "acme"])
        .await
        .trim()
        .to_string();
    let key_b = h
        .ctl_ok(&["org", "create", "globex"])
        .await
        .trim()
        .to_string();
    assert!(key_a.starts_with("treg_") && key_a != key_b);
    let e = refused(&h, &admin, &["org", "create", "acme"]).await;
    assert!(e.contains("exists"), "{e}");
    let e = refused(&h, &admin, &["org", "create", "Not_Valid"]).await;
    assert!(e.contains("lower-case"), "{e}");

    // One node in each, by the key it registers with.
    let mut cfg = h.agent_config(&unique("acme"));
    cfg.psk = key_a.clone();
    let na = h.add_agent_with(cfg).await;
    let mut cfg = h.agent_config(&unique("globex"));
    cfg.psk = key_b.clone();
    let nb = h.add_agent_with(cfg).await;

    let ta = h
        .ctl_ok(&["token", "create", "--org", "acme"])
        .await
        .trim()
        .to_string();
    let tb = h
        .ctl_ok(&["token", "create", "--org", "globex"])
        .await
        .trim()
        .to_string();
    assert!(ta.starts_with("top_"));
    let e = refused(&h, &admin, &["token", "create", "--org", "nope"]).await;
    assert!(e.contains("no such organization: nope"), "{e}");

    // Each sees its own node only; the admin sees both, with their org.
    let nodes_a = ok_as(&h, &ta, &["nodes"]).await;
    assert!(nodes_a.contains(&na) && !nodes_a.contains(&nb), "{nodes_a}");
    let all: serde_json::Value =
        serde_json::from_str(&h.ctl_ok(&["nodes", "--json"]).await).unwrap();
    let org_of = |n: &str| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|x| x["node_id"] == n)
            .map(|x| x["org"].clone())
    };
    assert_eq!(org_of(&na), Some("acme".into()), "{all}");
    assert_eq!(org_of(&nb), Some("globex".into()), "{all}");

    // Placement never crosses: acme's second worker goes to acme's node
    // although globex's is idle.
    let spawn = ["spawn", "--image", &img, "--", "sleep", "3600"];
    let wa1 = ok_as(&h, &ta, &spawn).await.trim().to_string();
    let wa2 = ok_as(&h, &ta, &spawn).await.trim().to_string();
    let wb = ok_as(&h, &tb, &spawn).await.trim().to_string();
    for (w, node) in [(&wa1, &na), (&wa2, &na), (&wb, &nb)] {
        let info: serde_json::Value =
            serde_json::from_str(&h.ctl_ok(&["inspect", w]).await).unwrap();
        assert_eq!(info["node_id"], node.as_str(), "{info}");
    }
    let ps_a = ok_as(&h, &ta, &["ps"]).await;
    assert!(
        ps_a.contains(&wa1) && ps_a.contains(&wa2) && !ps_a.contains(&wb),
        "{ps_a}"
    );

    // The admin's unplaced work goes to the default organization's nodes
    // only (there are none here): another organization's node is reached
    // by naming it.
    let e = refused(&h, &admin, &spawn).await;
    assert!(
        e.contains("no online node accepts new workers in the default organization"),
        "{e}"
    );
    let pinned = ["spawn", "--node", &na, "--image", &img, "--", "true"];
    let w = h.ctl_ok(&pinned).await.trim().to_string();
    h.ctl_ok(&["rm", "-f", &w]).await;

    // globex's worker is not found by acme, by every road, and the answer
    // is the one a worker that never existed gets.
    let ghost = "01aaaaaaaaaaaaaaaaaaaaaaaa";
    let cp_out = h.state_path("cp-out").to_string_lossy().to_string();
    for args in [
        vec!["inspect", "ID"],
        vec!["exec", "ID", "--", "true"],
        vec!["logs", "ID"],
        vec!["stop", "ID"],
        vec!["rm", "-f", "ID"],
        vec!["cp", "ID:/etc/hostname", &cp_out],
        vec!["preview-url", "ID", "80"],
    ] {
        let with = |id: &str| -> Vec<String> {
            args.iter().map(|a| a.replace("ID", id)).collect::<Vec<_>>()
        };
        let theirs = with(&wb);
        let theirs: Vec<&str> = theirs.iter().map(String::as_str).collect();
        let none = with(ghost);
        let none: Vec<&str> = none.iter().map(String::as_str).collect();
        let e_theirs = refused(&h, &ta, &theirs).await;
        assert!(e_theirs.contains("no such worker"), "{args:?}: {e_theirs}");
        let e_none = refused(&h, &ta, &none).await;
        same_refusal(&e_theirs, &e_none, &wb, ghost);
    }
    // A path-based preview with acme's token is refused the same way.
    let r = reqwest::Client::new()
        .get(format!("{}/api/v1/workers/{wb}/ports/80/", h.url))
        .bearer_auth(&ta)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body = r.text().await.unwrap();
    assert!(body.contains(&format!("no such worker: {wb}")), "{body}");
    // The worker is untouched by those attempts.
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{.State.Running}}",
            &format!("tether-{wb}")
        ]),
        "true"
    );

    // Nor is globex's node, for naming, draining, configuring or placing.
    for args in [
        vec!["node", "inspect", "ID"],
        vec!["drain", "ID"],
        vec!["spawn", "--node", "ID", "--image", &img, "--", "true"],
        vec!["mcp", "allow", "ID"],
    ] {
        let cmd: Vec<String> = args.iter().map(|a| a.replace("ID", &nb)).collect();
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let e = refused(&h, &ta, &cmd).await;
        assert!(e.contains(&format!("no such node: {nb}")), "{args:?}: {e}");
    }

    // An organization's token manages nothing server-wide.
    for args in [vec!["org", "create", "mine"], vec!["org", "key", "acme"]] {
        let e = refused(&h, &ta, &args).await;
        assert!(e.contains("only the server's admin token"), "{args:?}: {e}");
    }
    let orgs_a = ok_as(&h, &ta, &["org", "ls"]).await;
    assert_eq!(
        orgs_a
            .lines()
            .map(|l| l.split('\t').next().unwrap())
            .collect::<Vec<_>>(),
        vec!["acme"],
        "{orgs_a}"
    );
    let all_orgs = h.ctl_ok(&["org", "ls"]).await;
    for o in ["default", "acme", "globex"] {
        assert!(all_orgs.lines().any(|l| l.starts_with(o)), "{all_orgs}");
    }

    // MCP: with both nodes on the allowlist, acme's operator token and an
    // MCP token its operator made reach acme's node only.
    h.ctl_ok(&["mcp", "allow", &na]).await;
    h.ctl_ok(&["mcp", "allow", &nb]).await;
    let allowed_a = ok_as(&h, &ta, &["mcp", "list"]).await;
    assert_eq!(allowed_a.trim(), na, "{allowed_a}");
    let mcp_a = ok_as(&h, &ta, &["mcp", "token", "create"])
        .await
        .trim()
        .to_string();
    for token in [&ta, &mcp_a] {
        let listed = mcp_call(&h.url, token, "node.list", serde_json::json!({}))
            .await
            .unwrap();
        let ids: Vec<&str> = listed["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec![na.as_str()], "{listed}");
        let e = mcp_call(
            &h.url,
            token,
            "sandbox.create",
            serde_json::json!({"task_id": "t1", "image": img, "node": nb}),
        )
        .await
        .unwrap_err();
        assert!(e.contains(&format!("no such node: {nb}")), "{e}");
        let e = mcp_call(
            &h.url,
            token,
            "sandbox.destroy",
            serde_json::json!({"task_id": "t1", "worker_id": wb}),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains(&format!("no such worker: {wb}")) && !e.contains(&nb),
            "{e}"
        );
    }
    // The admin's MCP view still holds both.
    let listed = mcp_call(&h.url, &admin, "node.list", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(listed["nodes"].as_array().unwrap().len(), 2, "{listed}");

    // The audit trail: acme reads its own operations only. An exec is
    // recorded when it starts and, with its exit code, when it ends.
    let out = h
        .ctl_as(
            &ta,
            &["exec", &wa1, "--", "sh", "-c", "echo four; exit 4"],
            None,
        )
        .await;
    assert_eq!(out.status.code(), Some(4));
    let audit_a = ok_as(&h, &ta, &["audit", "--json"]).await;
    let records: Vec<serde_json::Value> = audit_a
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["worker_id"] == wa1.as_str() && r["operation"] == "api:spawn"),
        "{audit_a}"
    );
    assert!(
        records.iter().all(|r| r["org"] == "acme"),
        "only acme's records: {audit_a}"
    );
    let of_exec = |op: &str| {
        records
            .iter()
            .filter(|r| r["worker_id"] == wa1.as_str() && r["operation"] == op)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(!of_exec("api:exec").is_empty(), "{audit_a}");
    let end = of_exec("api:exec_end");
    assert!(
        end.iter().any(|r| r["exit_code"] == 4
            && r["bytes"] == 5
            && r["outcome"] == "ok"
            && r["caller"]
                .as_str()
                .is_some_and(|c| c.starts_with("token:"))),
        "the exec's end with its exit code and output bytes: {end:?}"
    );
    // Neither globex's own operations nor a record placed on its node
    // appear (acme's refused attempts hold only the ids acme gave).
    assert!(
        !records
            .iter()
            .any(|r| r["worker_id"] == wb.as_str() && r["outcome"] == "ok"),
        "{audit_a}"
    );
    assert!(
        !records.iter().any(|r| r["node_id"] == nb.as_str()),
        "{audit_a}"
    );

    // With its only node draining, acme's work waits: it is not placed on
    // globex's node.
    ok_as(&h, &ta, &["drain", &na]).await;
    let e = refused(&h, &ta, &spawn).await;
    assert!(e.contains("no online node accepts new workers"), "{e}");
    ok_as(&h, &ta, &["undrain", &na]).await;

    // Tokens: kept hashed, listed without secrets, revoked at once, and
    // expired after their time.
    let mut state = std::fs::read(h.state_path("server/state.db")).unwrap();
    state.extend(std::fs::read(h.state_path("server/state.db-wal")).unwrap_or_default());
    let holds = |s: &str| state.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(holds(&na), "the store keeps acme's node");
    for secret in [&ta, &tb, &key_a, &key_b] {
        assert!(!holds(secret), "a secret in the server's store");
    }
    let listed = h.ctl_ok(&["token", "ls"]).await;
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(!listed.contains(&ta) && !listed.contains(&tb), "{listed}");
    let id_b = listed
        .lines()
        .find(|l| l.contains("\tglobex\t"))
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_string();
    h.ctl_ok(&["token", "revoke", &id_b]).await;
    let e = refused(&h, &tb, &["ps"]).await;
    assert!(e.contains("invalid operator token"), "{e}");
    let short = h
        .ctl_ok(&["token", "create", "--org", "acme", "--expires", "3s"])
        .await
        .trim()
        .to_string();
    // An MCP token made with it is refused from then on too: a short-lived
    // token cannot mint a lasting one for /mcp either.
    let mcp_token = ok_as(&h, &short, &["mcp", "token", "create"])
        .await
        .trim()
        .to_string();
    assert!(mcp_token.starts_with("tmcp_"), "{mcp_token}");
    let initialize = async |token: &str| {
        reqwest::Client::new()
            .post(format!("{}/mcp", h.url))
            .bearer_auth(token)
            .header("accept", "application/json, text/event-stream")
            .json(&serde_json::json!({
                "jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "0"}}
            }))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        initialize(&mcp_token).await,
        200,
        "the MCP token works at first"
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let e = refused(&h, &short, &["ps"]).await;
    assert!(e.contains("has expired"), "{e}");
    assert_eq!(
        initialize(&mcp_token).await,
        401,
        "the MCP token expires with the token that made it"
    );

    // An organization's operator makes and revokes its own organization's
    // tokens, no other's, and none outliving its own.
    let e = refused(&h, &ta, &["token", "create", "--org", "globex"]).await;
    assert!(e.contains("its own organization only"), "{e}");
    // The lines of acme's token list that `make` adds.
    let ls = async |token: &str| -> Vec<String> {
        ok_as(&h, token, &["token", "ls"])
            .await
            .lines()
            .map(str::to_string)
            .collect()
    };
    let before = ls(&ta).await;
    assert!(
        before.iter().all(|l| l.contains("\tacme\t")),
        "acme's operator lists acme's tokens only: {before:?}"
    );
    let minted = ok_as(&h, &ta, &["token", "create"])
        .await
        .trim()
        .to_string();
    let seen = ok_as(&h, &minted, &["ps"]).await;
    assert!(seen.contains(&wa1) && !seen.contains(&wb), "{seen}");
    let added: Vec<String> = ls(&ta)
        .await
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    assert_eq!(added.len(), 1, "{added:?}");
    assert!(added[0].ends_with("expires=never"), "{added:?}");
    let minted_id = added[0].split('\t').next().unwrap().to_string();
    let hour = h
        .ctl_ok(&["token", "create", "--org", "acme", "--expires", "1h"])
        .await
        .trim()
        .to_string();
    let e = refused(&h, &hour, &["token", "create", "--expires", "2h"]).await;
    assert!(e.contains("may not outlive"), "{e}");
    let before = ls(&ta).await;
    ok_as(&h, &hour, &["token", "create"]).await;
    let child: Vec<String> = ls(&ta)
        .await
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    assert_eq!(child.len(), 1, "{child:?}");
    assert!(
        !child[0].ends_with("expires=never"),
        "the child expires: {child:?}"
    );
    assert!(
        before
            .iter()
            .filter(|l| !l.ends_with("expires=never"))
            .any(|p| p.rsplit('=').next() == child[0].rsplit('=').next()),
        "the child expires with its parent: {child:?} {before:?}"
    );
    h.ctl_ok(&["token", "create", "--org", "globex"]).await;
    let globex_id = h
        .ctl_ok(&["token", "ls"])
        .await
        .lines()
        .find(|l| l.contains("\tglobex\t"))
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_string();
    let e = refused(&h, &ta, &["token", "revoke", &globex_id]).await;
    assert!(e.contains("no such operator token"), "{e}");
    ok_as(&h, &ta, &["token", "revoke", &minted_id]).await;
    let e = refused(&h, &minted, &["ps"]).await;
    assert!(e.contains("invalid operator token"), "{e}");

    // An organization goes with its keys and tokens, but not while it has
    // nodes.
    let e = refused(&h, &admin, &["org", "rm", "acme"]).await;
    assert!(e.contains("still has 1 node"), "{e}");
    let key_e = h
        .ctl_ok(&["org", "create", "empty"])
        .await
        .trim()
        .to_string();
    let te = h
        .ctl_ok(&["token", "create", "--org", "empty"])
        .await
        .trim()
        .to_string();
    assert!(h.ctl_as(&te, &["ps"], None).await.status.success());
    // Its refused spawn (it has no node) is in its audit trail.
    let e = refused(&h, &te, &spawn).await;
    assert!(e.contains("no online node"), "{e}");
    let mut trail = String::new();
    for _ in 0..50 {
        trail = ok_as(&h, &te, &["audit", "--json"]).await;
        if trail.contains("api:spawn") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(trail.contains("\"org\":\"empty\""), "{trail}");
    let e = refused(&h, &ta, &["org", "rm", "empty"]).await;
    assert!(e.contains("only the server's admin token"), "{e}");
    h.ctl_ok(&["org", "rm", "empty"]).await;
    // An organization made again under the name starts with an empty
    // trail: the removed one's records are the admin's to read.
    h.ctl_ok(&["org", "create", "empty"]).await;
    let te2 = h
        .ctl_ok(&["token", "create", "--org", "empty"])
        .await
        .trim()
        .to_string();
    assert_eq!(ok_as(&h, &te2, &["audit", "--json"]).await.trim(), "");
    assert!(
        h.ctl_ok(&["audit", "--json"])
            .await
            .contains("\"org\":\"empty\"")
    );
    h.ctl_ok(&["org", "rm", "empty"]).await;
    let e = refused(&h, &te, &["ps"]).await;
    assert!(e.contains("invalid operator token"), "{e}");
    let gone = fake::register(&h, &unique("empty"), &key_e, &NodeKey::generate()).await;
    assert_eq!(gone.status(), 401, "its registration key went with it");
    assert!(!h.ctl_ok(&["org", "ls"]).await.contains("empty"));
    let e = refused(&h, &admin, &["org", "rm", "default"]).await;
    assert!(e.contains("cannot be removed"), "{e}");

    // acme cleans up its own workers; globex's is the admin's to remove.
    ok_as(&h, &ta, &["rm", "-f", &wa1]).await;
    ok_as(&h, &ta, &["rm", "-f", &wa2]).await;
    h.ctl_ok(&["rm", "-f", &wb]).await;
    for w in [&wa1, &wa2, &wb] {
        assert_eq!(
            docker_all(&["ps", "-a", "-q", "--filter", &format!("name=tether-{w}")]),
            ""
        );
    }
    h.stop().await;
}

/// After a restart, a node that has a stored configuration is known before
/// it connects again. It stays in its own organization: it does not fall
/// into the default organization, whose operators must not see, drain,
/// configure, forget or allow it while it is offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_node_stays_in_its_organization_across_a_restart() {
    let mut h = Harness::server().await;
    let key = h
        .ctl_ok(&["org", "create", "acme"])
        .await
        .trim()
        .to_string();
    // acme's node reaches the server through a proxy that can keep it away.
    let proxy = common::proxy::Proxy::start(h.addr).await;
    let node = unique("acme");
    let mut cfg = h.agent_config(&node);
    cfg.psk = key;
    cfg.server = format!("http://{}", proxy.addr).parse().unwrap();
    h.add_agent_with(cfg).await;
    let file = h.state_path("acme-node.yaml");
    let version = ulid::Ulid::new().to_string();
    std::fs::write(&file, format!("config_version: \"{version}\"\n")).unwrap();
    let file = file.to_string_lossy().to_string();
    let pushed = h.ctl(&["config", "push", &node, &file]).await;
    assert!(pushed.status.success(), "{}", stdout(&pushed));

    proxy.refuse(true);
    proxy.cut();
    h.restart_server().await;

    // The admin sees it, offline, as acme's.
    let all: serde_json::Value =
        serde_json::from_str(&h.ctl_ok(&["nodes", "--json"]).await).unwrap();
    let listed = all
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == node.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{all}"));
    assert_eq!(listed["org"], "acme", "{listed}");

    // The default organization's operator does not see it, and every
    // command on it gets the answer a node that never existed gets.
    let td = h
        .ctl_ok(&["token", "create", "--org", "default"])
        .await
        .trim()
        .to_string();
    let nodes = ok_as(&h, &td, &["nodes"]).await;
    assert!(!nodes.contains(&node), "{nodes}");
    let ghost = unique("acme");
    for args in [
        vec!["node", "inspect", "ID"],
        vec!["drain", "ID"],
        vec!["config", "push", "ID", &file],
        vec!["mcp", "allow", "ID"],
        vec!["node", "rm", "ID"],
    ] {
        let with = |id: &str| -> Vec<String> { args.iter().map(|a| a.replace("ID", id)).collect() };
        let theirs = with(&node);
        let theirs: Vec<&str> = theirs.iter().map(String::as_str).collect();
        let none = with(&ghost);
        let none: Vec<&str> = none.iter().map(String::as_str).collect();
        same_refusal(
            &refused(&h, &td, &theirs).await,
            &refused(&h, &td, &none).await,
            &node,
            &ghost,
        );
    }

    // The node comes back as it was: acme's, undrained, its configuration
    // the admin's.
    proxy.refuse(false);
    h.wait_status(&node, "online").await;
    let detail: serde_json::Value =
        serde_json::from_str(&h.ctl_ok(&["node", "inspect", &node]).await).unwrap();
    assert_eq!(detail["org"], "acme", "{detail}");
    assert_eq!(detail["config_version"], version.as_str(), "{detail}");
    assert_ne!(detail["draining"], true, "{detail}");
    h.stop().await;
}
