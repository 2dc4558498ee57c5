//! Requests for what another replica holds go to that replica, streams and
//! WebSocket upgrades included: the request is passed on as it came (the
//! operator's own token authorizes it there, so an organization's scope
//! holds) with [`FORWARDED`] set, and the answer comes back as it is.
//! Lists gather every replica's part.

use super::*;
use crate::server::replicas::{FORWARDED, Replica};

/// Whether this request came from another replica (it is answered here).
fn forwarded(req: &Request) -> bool {
    req.headers().contains_key(FORWARDED)
}

/// Whether this replica holds `node`'s agent connection now.
pub(crate) fn holds_node(app: &AppState, node: &str) -> bool {
    app.hub
        .node_info(node)
        .is_ok_and(|n| n.status != operator::NodeState::Offline)
}

/// Whether this replica holds the node of worker `id`.
pub(crate) fn holds_worker(app: &AppState, id: &str) -> bool {
    app.hub
        .worker(id)
        .is_ok_and(|w| holds_node(app, &w.node_id))
}

/// Whether this replica holds the node of a worker of `task`'s `job` in
/// organization `org` (none: any): another organization's job of the same
/// names is none of the caller's business, not even that it exists.
pub(crate) fn holds_job(app: &AppState, task: &str, job: &str, org: Option<&str>) -> bool {
    app.hub.workers().iter().any(|w| {
        w.task_id.as_deref() == Some(task)
            && w.job_id.as_deref() == Some(job)
            && holds_node(app, &w.node_id)
            && org.is_none_or(|o| app.hub.node_org(&w.node_id).as_deref() == Some(o))
    })
}

/// The URL of the other replica whose lease holds `node`, if one does.
pub(crate) async fn node_holder(app: &AppState, replica: &Replica, node: &str) -> Option<String> {
    let (store, node) = (app.store.clone(), node.to_string());
    let holder = tokio::task::spawn_blocking(move || store.node_holder(&node))
        .await
        .ok()
        .flatten();
    holder.and_then(|(id, url)| (id != replica.id).then_some(url))
}

/// Worker and deployment routes: what this replica does not know
/// (`known`) is looked for at the others; `what` names it to them.
async fn by_probe(
    app: &AppState,
    what: &str,
    id: &str,
    known: impl FnOnce() -> bool,
    req: Request,
    next: Next,
) -> Response {
    match elsewhere(app, what, id, known, req).await {
        Ok(answer) => answer,
        Err(req) => next.run(req).await,
    }
}

/// The answer of the replica that holds what this one does not know
/// (`known`), or the request back to be served here (no replicas, known
/// here, forwarded already, or held by none).
pub(super) async fn elsewhere(
    app: &AppState,
    what: &str,
    id: &str,
    known: impl FnOnce() -> bool,
    req: Request,
) -> Result<Response, Request> {
    let Some(replica) = app.replica.as_ref() else {
        return Err(req);
    };
    if forwarded(&req) || known() {
        return Err(req);
    }
    match holder_of(app, replica, what, id).await {
        Some(url) => Ok(proxy(app, replica, &url, req).await),
        None => Err(req),
    }
}

pub(super) async fn worker_route(
    State(app): State<Arc<AppState>>,
    Path(p): PathParams,
    req: Request,
    next: Next,
) -> Response {
    let id = p.get("id").cloned().unwrap_or_default();
    by_probe(
        &app,
        "worker",
        &id,
        || app.hub.worker(&id).is_ok(),
        req,
        next,
    )
    .await
}

pub(super) async fn deployment_route(
    State(app): State<Arc<AppState>>,
    Path(p): PathParams,
    req: Request,
    next: Next,
) -> Response {
    let name = p.get("name").cloned().unwrap_or_default();
    let known = || app.hub.deployment_org(&name).is_some();
    by_probe(&app, "deployment", &name, known, req, next).await
}

/// Path-based previews: as [`worker_route`], but only a request with a
/// credential that could open the preview is passed on
/// ([`super::preview::credible`]).
pub(super) async fn preview_route(
    State(app): State<Arc<AppState>>,
    Path(p): PathParams,
    req: Request,
    next: Next,
) -> Response {
    let id = p.get("id").cloned().unwrap_or_default();
    let port = p.get("port").and_then(|p| p.parse::<u16>().ok());
    let known = || app.replica.is_none() || app.hub.worker(&id).is_ok();
    let credible = match port {
        Some(port) if !known() => {
            super::preview::credible(&app, req.headers(), req.uri(), &id, port).await
        }
        _ => false,
    };
    if !credible {
        return next.run(req).await;
    }
    by_probe(&app, "worker", &id, known, req, next).await
}

/// Node routes: a node online at another replica is that replica's.
pub(super) async fn node_route(
    State(app): State<Arc<AppState>>,
    Path(p): PathParams,
    req: Request,
    next: Next,
) -> Response {
    let id = p.get("id").cloned().unwrap_or_default();
    let Some(replica) = app.replica.as_ref() else {
        return next.run(req).await;
    };
    if forwarded(&req) || holds_node(&app, &id) {
        return next.run(req).await;
    }
    match node_holder(&app, replica, &id).await {
        Some(url) => proxy(&app, replica, &url, req).await,
        None => next.run(req).await,
    }
}

/// `GET` and `POST` on the collections (`/api/v1/nodes`, `/workers`,
/// `/deployments`).
pub(super) async fn collection_route(
    app: State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() != axum::http::Method::POST {
        return list_route(app, req, next).await;
    }
    let State(app) = app;
    let Some(replica) = app.replica.as_ref() else {
        return next.run(req).await;
    };
    if forwarded(&req) {
        return next.run(req).await;
    }
    let deploy = req.uri().path().ends_with("/deployments");
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_JSON_BODY).await else {
        return error_response(ErrorBody::new(
            ErrorCode::TooLarge,
            "request body too large",
        ));
    };
    let again = || Request::from_parts(parts.clone(), Body::from(bytes.clone()));
    let body = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default();
    // Where it must go: the holder of the node a spawn names (else here),
    // or of the deployment an `up` converges.
    if deploy {
        if let Some(name) = deployment_name(&body)
            && app.hub.deployment_org(&name).is_none()
            && let Some(url) = holder_of(&app, replica, "deployment", &name).await
        {
            return proxy(&app, replica, &url, again()).await;
        }
    } else if let Some(node) = body["node_id"].as_str() {
        if !holds_node(&app, node)
            && let Some(url) = node_holder(&app, replica, node).await
        {
            return proxy(&app, replica, &url, again()).await;
        }
        return next.run(again()).await;
    }
    // Anywhere: here if this replica holds a node for it, else at the
    // first other replica that does.
    let local = next.run(again()).await;
    if local.status() != StatusCode::SERVICE_UNAVAILABLE {
        return local;
    }
    for (_, url) in peers(&app, replica).await {
        let r = proxy(&app, replica, &url, again()).await;
        if r.status() != StatusCode::SERVICE_UNAVAILABLE {
            return r;
        }
    }
    local
}

/// A deployment's name as the server reads an `up`: the request's, else
/// the Compose file's.
fn deployment_name(body: &serde_json::Value) -> Option<String> {
    body["name"].as_str().map(String::from).or_else(|| {
        let compose = body["compose"].as_str()?;
        crate::server::compose::parse(compose, None, None)
            .ok()
            .map(|d| d.deployment)
    })
}

/// `GET /api/v1/nodes`, `/workers` and `/deployments`: this replica's part and
/// every other's, each entry once (a replica's own part: what it holds
/// online; an entry another replica holds wins over a stale one here).
pub(super) async fn list_route(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(replica) = app.replica.as_ref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    let (key, id_field) = if path.ends_with("/nodes") {
        ("nodes", "node_id")
    } else if path.ends_with("/deployments") {
        ("deployments", "deployment")
    } else {
        ("workers", "worker_id")
    };
    let was_forwarded = forwarded(&req);
    let (parts, _) = req.into_parts();
    let mine = next.run(bodiless(&parts)).await;
    if !mine.status().is_success() {
        return mine;
    }
    let Ok(mine) = axum::body::to_bytes(mine.into_body(), usize::MAX).await else {
        return error_response(ErrorBody::new(ErrorCode::Internal, "could not read a list"));
    };
    let mut mine: Vec<serde_json::Value> = serde_json::from_slice::<serde_json::Value>(&mine)
        .ok()
        .and_then(|v| v[key].as_array().cloned())
        .unwrap_or_default();
    if was_forwarded {
        // Only what this replica holds: the asker has the rest.
        mine.retain(|e| holds_node(&app, e["node_id"].as_str().unwrap_or_default()));
        return Json(json!({ key: mine })).into_response();
    }
    let mut merged: Vec<serde_json::Value> = Vec::new();
    for r in peers_answers(&app, replica, &parts).await {
        if let Some(b) = ok_body(r).await
            && let Some(list) = serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v[key].as_array().cloned())
        {
            merged.extend(list);
        }
    }
    let seen: std::collections::HashSet<String> = merged
        .iter()
        .filter_map(|e| e[id_field].as_str().map(String::from))
        .collect();
    merged.extend(
        mine.into_iter()
            .filter(|e| !e[id_field].as_str().is_some_and(|i| seen.contains(i))),
    );
    merged.sort_by(|a, b| {
        let k = |e: &serde_json::Value| {
            (
                e["node_id"].as_str().unwrap_or_default().to_string(),
                e[id_field].as_str().unwrap_or_default().to_string(),
            )
        };
        k(a).cmp(&k(b))
    });
    Json(json!({ key: merged })).into_response()
}

/// `GET /api/v1/tunnels` and `DELETE /api/v1/tunnels/{id}`: a tunnel's
/// connections are carried by whichever replicas their operators' requests
/// reached, so every replica is asked. A list sums each tunnel's
/// connections and bytes over the replicas; a close succeeds where any
/// replica closed something.
pub(super) async fn tunnels_route(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(replica) = app.replica.as_ref() else {
        return next.run(req).await;
    };
    if forwarded(&req) {
        return next.run(req).await;
    }
    let (parts, _) = req.into_parts();
    let mut answers = vec![next.run(bodiless(&parts)).await];
    answers.extend(peers_answers(&app, replica, &parts).await);
    if parts.method != axum::http::Method::GET {
        let closed = answers.iter().position(|r| r.status().is_success());
        return answers.swap_remove(closed.unwrap_or(0));
    }
    let mut by_id: std::collections::BTreeMap<String, operator::TunnelInfo> = Default::default();
    for r in answers {
        let Some(b) = ok_body(r).await else {
            continue;
        };
        for t in serde_json::from_slice::<Vec<operator::TunnelInfo>>(&b).unwrap_or_default() {
            match by_id.get_mut(&t.id) {
                Some(seen) => {
                    seen.connections += t.connections;
                    seen.bytes_to_worker += t.bytes_to_worker;
                    seen.bytes_from_worker += t.bytes_from_worker;
                    // RFC 3339 UTC of one format: the earlier sorts first.
                    if t.since < seen.since {
                        seen.since = t.since;
                    }
                }
                None => {
                    by_id.insert(t.id.clone(), t);
                }
            }
        }
    }
    Json(by_id.into_values().collect::<Vec<_>>()).into_response()
}

/// The same bodiless request (a list, a close) answered by every other
/// replica, asked at once.
async fn peers_answers(
    app: &AppState,
    replica: &Replica,
    parts: &axum::http::request::Parts,
) -> Vec<Response> {
    let asks = peers(app, replica).await.into_iter().map(|(_, url)| {
        let again = bodiless(parts);
        async move { proxy(app, replica, &url, again).await }
    });
    futures_util::future::join_all(asks).await
}

/// The request again, without its body (a list, a close).
fn bodiless(parts: &axum::http::request::Parts) -> Request {
    Request::from_parts(parts.clone(), Body::empty())
}

/// A successful answer's body.
async fn ok_body(r: Response) -> Option<bytes::Bytes> {
    if !r.status().is_success() {
        return None;
    }
    axum::body::to_bytes(r.into_body(), usize::MAX).await.ok()
}

pub(crate) async fn peers(app: &AppState, replica: &Replica) -> Vec<(String, String)> {
    let store = app.store.clone();
    let id = replica.id.clone();
    tokio::task::spawn_blocking(move || store.peers(&id))
        .await
        .unwrap_or_default()
}

/// How long a replica waits for another's answer to "do you hold it?".
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The replica that holds `what` (`worker`, `node`, …) `id`.
async fn holder_of(app: &AppState, replica: &Replica, what: &str, id: &str) -> Option<String> {
    holder_by(app, replica, &[(what, id)]).await
}

/// The other replica that holds what `query` (of `/internal/v1/holds`)
/// names: each is asked at once; the first that holds it answers.
pub(crate) async fn holder_by(
    app: &AppState,
    replica: &Replica,
    query: &[(&str, &str)],
) -> Option<String> {
    let query: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let asks = peers(app, replica).await.into_iter().map(|(_, url)| {
        let http = replica.http.clone();
        let key = replica.key.clone();
        let q = format!("{url}/internal/v1/holds");
        let what = query.clone();
        async move {
            // A replica that does not answer soon is taken not to hold it.
            let r = http
                .get(&q)
                .query(&what)
                .bearer_auth(key)
                .timeout(PROBE_TIMEOUT)
                .send()
                .await
                .ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            (v["holds"] == true).then_some(url)
        }
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .next()
}

#[derive(Deserialize)]
pub(super) struct HoldsQuery {
    worker: Option<String>,
    node: Option<String>,
    deployment: Option<String>,
    mcp_session: Option<String>,
    /// An MCP exec that outlived its call (`sandbox.exec_follow`).
    mcp_exec: Option<String>,
    /// With `job`: a worker of that task's job.
    task: Option<String>,
    job: Option<String>,
    /// With `task` and `job`: only in this organization.
    org: Option<String>,
}

/// A new MCP session (a request without a session id) goes to a replica
/// that holds a node the caller may use through MCP when this one holds
/// none: the session lives there, and its tools reach that replica's nodes.
pub(super) async fn mcp_home(
    app: &AppState,
    scope: &crate::server::mcp::Scope,
    req: Request,
) -> Result<Response, Request> {
    let Some(replica) = app.replica.as_ref() else {
        return Err(req);
    };
    if forwarded(&req) {
        return Err(req);
    }
    let usable: Vec<String> = app
        .store
        .mcp_nodes()
        .into_iter()
        .filter(|n| {
            let org = app
                .hub
                .node_org(n)
                .or_else(|| app.store.node_identity(n).map(|i| i.org));
            org.is_some_and(|o| scope.may_use(n, &o))
        })
        .collect();
    if usable.iter().any(|n| holds_node(app, n)) {
        return Err(req);
    }
    for n in &usable {
        if let Some(url) = node_holder(app, replica, n).await {
            return Ok(proxy(app, replica, &url, req).await);
        }
    }
    Err(req)
}

/// Whether this replica serves MCP session `id`.
pub(super) async fn has_mcp_session(app: &AppState, id: &str) -> bool {
    app.mcp_sessions.sessions.read().await.contains_key(
        &rmcp::transport::common::server_side_http::SessionId::from(id),
    )
}

/// Lets through only requests with the replicas' key, before their body is
/// read: nobody else makes this replica buffer a large body.
pub(super) async fn replicas_only(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    match from_a_replica(&app, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => error_response(e),
    }
}

/// Whether a request carries the replicas' shared key: only another
/// replica may ask the `/internal/v1/` routes.
pub(super) fn from_a_replica(app: &AppState, headers: &HeaderMap) -> Result<(), ErrorBody> {
    let Some(replica) = app.replica.as_ref() else {
        return Err(ErrorBody::new(ErrorCode::NotFound, "no such endpoint"));
    };
    let given = auth::bearer(headers.get("authorization").and_then(|v| v.to_str().ok()));
    if !given.is_some_and(|k| auth::secret_eq(k, &replica.key)) {
        return Err(ErrorBody::new(
            ErrorCode::Unauthorized,
            "invalid replica key",
        ));
    }
    Ok(())
}

/// `GET /internal/v1/holds?worker=ID|node=ID|…`, asked by other replicas
/// with the replicas' shared key: whether this replica holds it.
pub(super) async fn holds(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HoldsQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    from_a_replica(&app, &headers)?;
    let online = |n: &str| holds_node(&app, n);
    let holds = if let Some(w) = q.worker {
        holds_worker(&app, &w)
    } else if let Some(n) = q.node {
        online(&n)
    } else if let Some(d) = q.deployment {
        app.hub
            .deployments()
            .iter()
            .any(|s| s.deployment == d && online(&s.node_id))
    } else if let Some(s) = q.mcp_session {
        has_mcp_session(&app, &s).await
    } else if let Some(e) = q.mcp_exec {
        app.mcp_execs.holds(&e)
    } else if let (Some(t), Some(j)) = (q.task, q.job) {
        holds_job(&app, &t, &j, q.org.as_deref())
    } else {
        false
    };
    Ok(Json(json!({ "holds": holds })))
}

/// Passes `req` to the replica at `url` and gives back its answer,
/// WebSocket upgrades included. The client's `Host` goes with it (a
/// host-based preview is told by its name).
async fn proxy(app: &AppState, replica: &Replica, url: &str, mut req: Request) -> Response {
    // The replica's address is the operators' to know (in the log), not
    // every client's; why it did not answer (a TLS error) is said.
    let unreachable = |e: String| {
        tracing::warn!(replica = %url, error = %e, "the replica that holds a request's target did not answer");
        error_response(ErrorBody::new(
            ErrorCode::Unavailable,
            format!("the replica that holds this did not answer: {e}"),
        ))
    };
    let Ok(base) = url::Url::parse(url) else {
        return unreachable("bad replica URL".into());
    };
    let Some(host) = base.host_str() else {
        return unreachable("bad replica URL".into());
    };
    let addr = format!("{host}:{}", base.port_or_known_default().unwrap_or(80));
    let tcp = match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return unreachable(e.to_string()),
        Err(_) => return unreachable("no connection within 2 s".into()),
    };
    let _ = tcp.set_nodelay(true);
    if let Ok(v) = HeaderValue::from_str(&replica.id) {
        req.headers_mut().insert(FORWARDED, v);
    }
    if !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&addr)
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let relayed = if base.scheme() == "https" {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(name) = rustls::pki_types::ServerName::try_from(bare.to_string()) else {
            return unreachable("bad replica host name".into());
        };
        match tokio::time::timeout(PROBE_TIMEOUT, replica.tls.connect(name, tcp)).await {
            Ok(Ok(tls)) => super::relay_http(&app.hub, tls, req).await,
            Ok(Err(e)) => return unreachable(format!("TLS: {e}")),
            Err(_) => return unreachable("no TLS handshake within 2 s".into()),
        }
    } else {
        super::relay_http(&app.hub, tcp, req).await
    };
    match relayed {
        Ok(r) => r,
        Err(e) => unreachable(e.to_string()),
    }
}
