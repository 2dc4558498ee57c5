//! The MCP endpoint's authorization (the operator token or an MCP token),
//! its allowlist (which nodes' tools it exposes) and its tokens.

use super::*;

#[derive(serde::Serialize)]
pub(super) struct McpNodes {
    nodes: Vec<String>,
}

pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Json<McpNodes> {
    let mut nodes = app.store.mcp_nodes();
    nodes.retain(|n| caller.is_admin() || node_org(&app, n).is_some_and(|o| caller.sees(&o)));
    Json(McpNodes { nodes })
}

pub(super) async fn allow(
    State(app): State<Arc<AppState>>,
    caller: Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<McpNodes>> {
    app.hub.node_info(&id)?;
    on_store(&app, move |s| s.set_mcp_node(&id, true)).await?;
    Ok(list(State(app), caller).await)
}

pub(super) async fn deny(
    State(app): State<Arc<AppState>>,
    caller: Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<McpNodes>> {
    on_store(&app, move |s| s.set_mcp_node(&id, false)).await?;
    Ok(list(State(app), caller).await)
}

/// The MCP caller an `Authorization` value names: the operator token or an
/// MCP token.
async fn scope_of(
    app: &Arc<AppState>,
    authorization: Option<&HeaderValue>,
) -> Result<crate::server::mcp::Scope, ErrorBody> {
    use crate::server::mcp::Scope;
    let given = auth::bearer(authorization.and_then(|v| v.to_str().ok()));
    let scope = match given {
        Some(t) => match app.caller_fresh(t).await {
            Ok(c) => Some(Scope::Operator(c)),
            Err(_) => app
                .store
                .mcp_token_by_hash(&crate::server::orgs::secret_hash(t))
                .filter(|t| !t.expired(crate::server::preview::now_secs()))
                .map(Scope::Token),
        },
        None => None,
    };
    scope.ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::Unauthorized,
            "missing or invalid token for /mcp (the operator token or one from tether ctl mcp token create)",
        )
    })
}

/// `POST /internal/v1/mcp/call`: a tool call of an MCP session at another
/// replica, about what this one holds. The replicas' key authorizes the
/// passing on; the caller's own token ([`CALLER`]) the call, judged here as
/// at `/mcp`. The answer streams lines of JSON ([`RemoteCall`]): progress
/// notifications as the command makes output, then the result.
///
/// [`CALLER`]: crate::server::mcp::CALLER
/// [`RemoteCall`]: crate::server::mcp::RemoteCall
pub(super) async fn call(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> ApiResult<Response> {
    use crate::server::mcp::{Progress, Tools};
    // The key was checked before the body was read (`replicas_only`).
    let call: crate::server::mcp::RemoteCall = serde_json::from_slice(&body)
        .map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, format!("bad call: {e}")))?;
    let scope = scope_of(&app, headers.get(crate::server::mcp::CALLER)).await?;
    let tools = Tools::new(app.clone());
    let (tx, rx) = tokio::sync::mpsc::channel::<serde_json::Value>(64);
    let progress = call.progress.then(|| Progress::Relay(tx.clone()));
    // Tracked by the hub; the command goes on if the asker goes away, as
    // it does when a client leaves `/mcp`.
    app.hub.spawn_task(async move {
        let end = match tools.call_here(&scope, call, progress).await {
            Ok(v) => serde_json::json!({ "ok": v }),
            Err(e) => serde_json::json!({ "error": e }),
        };
        let _ = tx.send(end).await;
    });
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(format!("{v}\n")), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// Lets the operator token or an MCP token through to `/mcp`, with the
/// caller's [`Scope`](crate::server::mcp::Scope) for the tools to check.
pub(super) async fn authorize(
    State(app): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let scope = match scope_of(&app, req.headers().get("authorization")).await {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    // A request of a session another replica serves goes there (a
    // balancer need not keep an MCP client on one replica), and a new
    // session to a replica that holds a node it may use when this one holds
    // none; either is authorized there again.
    let session = req
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    // A session is its opener's: another token that learns its id gets
    // nothing of it (it would otherwise be answered in that session, and
    // could take over its requests' answers).
    let owner = auth::bearer(
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
    .map(crate::server::orgs::secret_hash)
    .unwrap_or_default();
    if let Some(id) = &session
        && let Some(opener) = app.mcp_owners.lock().unwrap().get(id)
        && !auth::secret_eq(opener, &owner)
    {
        return error_response(ErrorBody::new(ErrorCode::NotFound, "no such MCP session"));
    }
    let elsewhere = match &session {
        Some(id) => {
            let known = super::forward::has_mcp_session(&app, id).await;
            super::forward::elsewhere(&app, "mcp_session", id, || known, req).await
        }
        None => super::forward::mcp_home(&app, &scope, req).await,
    };
    req = match elsewhere {
        Ok(answer) => return answer,
        Err(req) => req,
    };
    super::super::conn::authenticated(req.extensions());
    req.extensions_mut().insert(scope);
    let answer = next.run(req).await;
    if session.is_none()
        && let Some(id) = answer
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
    {
        let live = app.mcp_sessions.sessions.read().await;
        let mut owners = app.mcp_owners.lock().unwrap();
        owners.retain(|id, _| {
            live.contains_key(&rmcp::transport::common::server_side_http::SessionId::from(
                id.as_str(),
            ))
        });
        owners.insert(id.to_string(), owner);
    }
    answer
}

#[derive(Deserialize)]
pub(super) struct NewToken {
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    task_prefix: Option<String>,
}

/// A token as listed (its secret only in the answer that created it).
#[derive(serde::Serialize)]
pub(super) struct TokenInfo {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    nodes: Vec<String>,
    task_prefix: Option<String>,
    created_at: String,
    /// Unix seconds (none: it does not expire).
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
}

fn info(t: crate::server::store::McpToken, secret: Option<String>) -> TokenInfo {
    TokenInfo {
        id: t.id,
        token: secret,
        nodes: t.nodes,
        task_prefix: t.task_prefix,
        created_at: t.created_at,
        expires: t.expires,
    }
}

pub(super) async fn create_token(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<NewToken>,
) -> ApiResult<(StatusCode, Json<TokenInfo>)> {
    for n in &req.nodes {
        if !app.hub.node_org(n).is_some_and(|o| caller.sees(&o)) {
            return Err(ErrorBody::new(ErrorCode::NotFound, format!("no such node: {n}")).into());
        }
    }
    let secret = format!(
        "{}{}",
        crate::server::orgs::MCP_TOKEN_PREFIX,
        auth::random_secret(32)
    );
    let t = crate::server::store::McpToken {
        id: ulid::Ulid::new().to_string().to_ascii_lowercase(),
        hash: crate::server::orgs::secret_hash(&secret),
        nodes: req.nodes,
        task_prefix: req.task_prefix.filter(|p| !p.is_empty()),
        created_at: crate::server::orgs::now_rfc3339(),
        org: match &caller.scope {
            crate::server::OrgScope::All => None,
            crate::server::OrgScope::Org(o) => Some(o.clone()),
        },
        expires: super::orgs::caller_token(&app, &caller).and_then(|t| t.expires),
    };
    let kept = t.clone();
    on_store(&app, move |s| s.add_mcp_token(kept)).await?;
    Ok((StatusCode::CREATED, Json(info(t, Some(secret)))))
}

/// Whether `caller` sees an MCP token: the admin every one, an
/// organization those its operators made.
fn sees_token(caller: &Caller, t: &crate::server::store::McpToken) -> bool {
    caller.is_admin() || t.org.as_deref().is_some_and(|o| caller.sees(o))
}

pub(super) async fn list_tokens(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Json<Vec<TokenInfo>> {
    Json(
        app.store
            .mcp_tokens()
            .into_iter()
            .filter(|t| sees_token(&caller, t))
            .map(|t| info(t, None))
            .collect(),
    )
}

pub(super) async fn revoke_token(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let gone = id.clone();
    let visible = app
        .store
        .mcp_tokens()
        .iter()
        .any(|t| t.id == id && sees_token(&caller, t));
    if visible && on_store(&app, move |s| s.revoke_mcp_token(&gone)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ErrorBody::new(ErrorCode::NotFound, format!("no such MCP token: {id}")).into())
    }
}
