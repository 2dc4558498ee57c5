//! The operator HTTP API (bearer operator token) and node registration
//! (bearer pre-shared key). Errors are `{"error": {"code", "message"}}` with
//! the HTTP status of the code.

use super::conn::Admission;
use super::hub::{DetachedExec, Duplex, ExecOptions, LogOptions, StreamEvent};
use super::orgs::Caller;
use super::{AppState, auth};
use crate::protocol::operator::{self, ClientMsg, ServerMsg, Started};
use crate::protocol::{
    AGENT_CONNECT_PATH, Bootstrap, ErrorBody, ErrorCode, NodeAuth, Orchestrator, REGISTER_PATH,
    RegisterRequest, SpawnRequest, StreamKind, TermSize,
};
use axum::body::Body;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

mod deployments;
mod exec;
pub(crate) mod forward;
mod mcp;
mod nodes;
mod orgs;
mod preview;
mod register;
mod streams;
mod tunnel;
mod workers;

use exec::exec_ws;
use nodes::{drain, forget_node, node, nodes, push_config, undrain};
use register::register;
use streams::*;
use tunnel::tunnel_ws;
use workers::{audit, get_archive, put_archive, remove, spawn, stat, stop, worker, workers};

/// Maximum size of a JSON request body on the API.
const MAX_JSON_BODY: usize = 1024 * 1024;

pub(crate) fn error_response(e: ErrorBody) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(json!({ "error": e }))).into_response()
}

struct ApiError(ErrorBody);

impl From<ErrorBody> for ApiError {
    fn from(e: ErrorBody) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.0)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs `f` on the store from a blocking thread (the single-machine store
/// commits to SQLite and syncs).
async fn on_store<T: Send + 'static>(
    app: &AppState,
    f: impl FnOnce(&dyn super::store::Store) -> Result<T, super::store::StoreError> + Send + 'static,
) -> Result<T, ErrorBody> {
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?
        .map_err(ErrorBody::from)
}

pub(super) fn router(state: Arc<AppState>) -> Router {
    // Routes that name a node, a worker or a deployment check first that
    // the caller's organization owns it (another's is `not_found`). A
    // node's organization is in the store, so it is judged before the
    // request goes to the replica holding the node (the last layer added
    // runs first): a holder that does not answer must not turn another
    // organization's `not_found` into `unavailable`. A worker or a
    // deployment is known only to its holder, which judges it there.
    let node_routes = Router::new()
        .route("/api/v1/nodes/{id}", get(node).delete(forget_node))
        .route("/api/v1/nodes/{id}/drain", post(drain))
        .route("/api/v1/nodes/{id}/undrain", post(undrain))
        .route("/api/v1/nodes/{id}/config", axum::routing::put(push_config))
        .route(
            "/api/v1/mcp/nodes/{id}",
            axum::routing::put(mcp::allow).delete(mcp::deny),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            forward::node_route,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), node_scope));
    let worker_routes = Router::new()
        .route("/api/v1/workers/{id}", get(worker).delete(remove))
        .route("/api/v1/workers/{id}/stop", post(stop))
        .route("/api/v1/workers/{id}/exec", get(exec_ws))
        .route("/api/v1/workers/{id}/logs", get(logs_ws))
        .route("/api/v1/workers/{id}/tunnels/{port}", get(tunnel_ws))
        .route("/api/v1/workers/{id}/previews", post(preview::issue))
        .route("/api/v1/workers/{id}/stat", get(stat))
        .route(
            "/api/v1/workers/{id}/archive",
            get(get_archive).put(put_archive),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), worker_scope))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            forward::worker_route,
        ));
    let deployment_routes = Router::new()
        .route(
            "/api/v1/deployments/{name}",
            get(deployments::inspect).delete(deployments::down),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            deployment_scope,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            forward::deployment_route,
        ));
    // Replicas: lists gather every replica's part; a spawn goes where a
    // node for it is held.
    let collections = Router::new()
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/workers", get(workers).post(spawn))
        .route(
            "/api/v1/deployments",
            get(deployments::list).post(deployments::up),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            forward::collection_route,
        ));
    // Tunnels live in the replica that carries them: asked of every one.
    let tunnels = Router::new()
        .route("/api/v1/tunnels", get(tunnel::list))
        .route(
            "/api/v1/tunnels/{id}",
            axum::routing::delete(tunnel::close_tunnel),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            forward::tunnels_route,
        ));
    let operator = Router::new()
        .merge(tunnels)
        .route("/api/v1/previews", get(preview::list))
        .route(
            "/api/v1/previews/{id}",
            axum::routing::delete(preview::revoke),
        )
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/mcp/nodes", get(mcp::list))
        .route(
            "/api/v1/mcp/tokens",
            get(mcp::list_tokens).post(mcp::create_token),
        )
        .route(
            "/api/v1/mcp/tokens/{id}",
            axum::routing::delete(mcp::revoke_token),
        )
        .route("/api/v1/orgs", get(orgs::list).post(orgs::create))
        .route("/api/v1/orgs/{name}", axum::routing::delete(orgs::remove))
        .route("/api/v1/orgs/{name}/keys", post(orgs::add_key))
        .route("/api/v1/tokens", get(orgs::tokens).post(orgs::create_token))
        .route(
            "/api/v1/tokens/{id}",
            axum::routing::delete(orgs::revoke_token),
        )
        .merge(collections)
        .merge(node_routes)
        .merge(worker_routes)
        .merge(deployment_routes)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_operator,
        ));
    // Authorized inside: by the operator token or a preview grant.
    let previews = Router::new()
        .route("/api/v1/workers/{id}/ports/{port}", any(preview::by_path))
        .route("/api/v1/workers/{id}/ports/{port}/", any(preview::by_path))
        .route(
            "/api/v1/workers/{id}/ports/{port}/{*rest}",
            any(preview::by_path),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            forward::preview_route,
        ));
    // The operator token or an MCP token.
    let mcp_endpoint = Router::new()
        .nest_service(
            "/mcp",
            super::mcp::service(state.clone(), state.cfg.mcp_allowed_hosts.clone()),
        )
        .layer(middleware::from_fn_with_state(
            state.clone(),
            mcp::authorize,
        ));
    let api = Router::new()
        .merge(operator)
        .merge(mcp_endpoint)
        .merge(previews)
        .route(REGISTER_PATH, post(register))
        .route("/internal/v1/holds", get(forward::holds))
        .route(
            "/internal/v1/mcp/call",
            // A file of `sandbox.put_file` (4 MiB) in base64, and the rest;
            // read only once the replicas' key is checked.
            post(mcp::call)
                .layer(DefaultBodyLimit::max(8 * 1024 * 1024))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    forward::replicas_only,
                )),
        )
        .route(AGENT_CONNECT_PATH, get(super::agent_ws::connect))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async {
            error_response(ErrorBody::new(ErrorCode::NotFound, "no such endpoint"))
        })
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn(close_refused_upgrades))
        .with_state(state.clone());
    // A host-based preview is decided by `Host`, before any route.
    Router::new()
        .fallback_service(api)
        .layer(middleware::from_fn_with_state(state, preview::by_host))
}

/// Marks a response that came from a worker: passed on as it is.
#[derive(Clone, Copy)]
struct Proxied;

/// A refused WebSocket upgrade (bad token, wrong subprotocol, no such
/// route) gets its error and then `Connection: close`: hyper closes the
/// connection after the response instead of keeping an unauthenticated
/// socket open for another request.
async fn close_refused_upgrades(req: Request, next: Next) -> Response {
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let mut resp = next.run(req).await;
    if upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Every refusal is a JSON error body, including axum's own rejections
/// (bad query strings, wrong method, a plain GET on a WebSocket route).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if resp.extensions().get::<Proxied>().is_some() {
        return resp;
    }
    let is_json = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status.as_u16() {
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::PolicyDenied,
        404 => ErrorCode::NotFound,
        413 => ErrorCode::TooLarge,
        s if s < 500 => ErrorCode::InvalidRequest,
        _ => ErrorCode::Internal,
    };
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = if text.is_empty() {
        status.to_string()
    } else {
        text
    };
    let mut r = error_response(ErrorBody::new(code, message));
    *r.status_mut() = status;
    r
}

async fn require_operator(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let given = auth::bearer(
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    );
    let caller = match given {
        Some(t) => Some(app.caller_fresh(t).await),
        None => None,
    };
    match caller {
        Some(Ok(caller)) => {
            super::conn::authenticated(req.extensions());
            let mut req = req;
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Some(Err(e)) => error_response(e),
        None => error_response(ErrorBody::new(
            ErrorCode::Unauthorized,
            "missing operator token (Authorization: Bearer <token from admin.token>)",
        )),
    }
}

/// The organization of node `id`: the hub's, or for a node offline since
/// the server started, the store's.
fn node_org(app: &AppState, id: &str) -> Option<String> {
    app.hub
        .node_org(id)
        .or_else(|| app.store.node_identity(id).map(|i| i.org))
}

/// The organization of node `id` as it is now: that of its connection if
/// this replica holds it, else the store's binding read from the database
/// itself (another replica may have forgotten the node or bound it anew
/// since this one's registry, and even its copy of the store, last saw it).
async fn node_org_now(app: &AppState, id: &str) -> Option<String> {
    if app.replica.is_none() || forward::holds_node(app, id) {
        return node_org(app, id);
    }
    let (store, node) = (app.store.clone(), id.to_string());
    tokio::task::spawn_blocking(move || store.refresh_node(&node))
        .await
        .ok()
        .flatten()
        .map(|i| i.org)
}

/// Whether `caller` sees worker `id` (the admin sees every id, known or
/// not; an organization only the workers of its nodes).
fn sees_worker(app: &AppState, caller: &Caller, id: &str) -> bool {
    caller.is_admin() || app.hub.worker_org(id).is_some_and(|o| caller.sees(&o))
}

/// Lets the request through if the caller sees what it names (`org`: the
/// organization that owns it, if known); otherwise answers `not_found`
/// exactly as for something that does not exist.
async fn scoped(
    caller: &Caller,
    org: Option<String>,
    not_found: String,
    req: Request,
    next: Next,
) -> Response {
    let seen = match org {
        Some(o) => caller.sees(&o),
        None => caller.is_admin(),
    };
    if seen {
        next.run(req).await
    } else {
        error_response(ErrorBody::new(ErrorCode::NotFound, not_found))
    }
}

type PathParams = Path<std::collections::HashMap<String, String>>;

async fn node_scope(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(p): PathParams,
    req: Request,
    next: Next,
) -> Response {
    let id = p.get("id").cloned().unwrap_or_default();
    let org = node_org_now(&app, &id).await;
    scoped(&caller, org, format!("no such node: {id}"), req, next).await
}

async fn worker_scope(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(p): PathParams,
    req: Request,
    next: Next,
) -> Response {
    let id = p.get("id").cloned().unwrap_or_default();
    let org = app.hub.worker_org(&id);
    scoped(&caller, org, format!("no such worker: {id}"), req, next).await
}

async fn deployment_scope(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(p): PathParams,
    req: Request,
    next: Next,
) -> Response {
    let name = p.get("name").cloned().unwrap_or_default();
    let org = app.hub.deployment_org(&name);
    scoped(
        &caller,
        org,
        format!("no such deployment: {name}"),
        req,
        next,
    )
    .await
}

/// Carries an upgraded connection both ways until the far side (`far`)
/// ends it, or the client breaks off. The client's clean end of input
/// passes on as a half-close, but a client that never ends does not keep
/// the splice (and the server's socket) once the far side has: a revoked
/// preview grant ends its upgrades even for a silent client.
async fn splice<C, F>(client: C, far: F)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    F: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::AsyncWriteExt;
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut fr, mut fw) = tokio::io::split(far);
    let up = async {
        if tokio::io::copy(&mut cr, &mut fw).await.is_ok() {
            let _ = fw.shutdown().await;
            std::future::pending::<()>().await;
        }
    };
    let down = async {
        let _ = tokio::io::copy(&mut fr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// One HTTP exchange over `io` (a worker's port through a tunnel, another
/// replica): the answer as it comes, marked [`Proxied`]; a WebSocket
/// upgrade on both sides is spliced through for as long as it lasts.
async fn relay_http<I>(hub: &super::Hub, io: I, mut req: Request) -> Result<Response, hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::TokioIo;
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Body>(TokioIo::new(io))
        .await?;
    hub.spawn_task(async move {
        let _ = connection.with_upgrades().await;
    });
    let client_upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    // A connection not authenticated (a preview's) stays one that can be
    // closed to make room while the other side takes its time, and so
    // does what it is upgraded to.
    let admission = req
        .extensions()
        .get::<crate::server::conn::Admission>()
        .cloned();
    if let Some(a) = &admission {
        a.evictable();
    }
    let closing = admission.and_then(|a| a.closing());
    let mut resp = sender.send_request(req).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade
    {
        let upstream = hyper::upgrade::on(&mut resp);
        hub.spawn_task(async move {
            if let (Ok(c), Ok(u)) = tokio::join!(client, upstream) {
                let closed = async {
                    match closing {
                        Some(c) => c.cancelled_owned().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = splice(TokioIo::new(c), TokioIo::new(u)) => {}
                    _ = closed => {}
                }
            }
        });
    }
    let mut resp = resp.map(Body::new);
    resp.extensions_mut().insert(Proxied);
    Ok(resp)
}
