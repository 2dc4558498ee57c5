//! The MCP endpoint's authorization (the operator token or an MCP token),
//! its allowlist (which nodes' tools it exposes) and its tokens.

use super::*;

#[derive(serde::Serialize)]
pub(super) struct McpNodes {
    nodes: Vec<String>,
}

pub(super) async fn list(State(app): State<Arc<AppState>>) -> Json<McpNodes> {
    Json(McpNodes {
        nodes: app.store.mcp_nodes(),
    })
}

pub(super) async fn allow(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<McpNodes>> {
    app.hub.node_info(&id)?;
    on_store(&app, move |s| s.set_mcp_node(&id, true)).await?;
    Ok(list(State(app)).await)
}

pub(super) async fn deny(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<McpNodes>> {
    on_store(&app, move |s| s.set_mcp_node(&id, false)).await?;
    Ok(list(State(app)).await)
}

/// Lets the operator token or an MCP token through to `/mcp`, with the
/// caller's [`Scope`](crate::server::mcp::Scope) for the tools to check.
pub(super) async fn authorize(
    State(app): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    use crate::server::mcp::Scope;
    let given = auth::bearer(
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
    .map(String::from);
    let scope = match given {
        Some(t) if auth::secret_eq(&t, &app.admin_token) => Some(Scope::Operator),
        Some(t) => app
            .store
            .mcp_token_by_hash(&token_hash(&t))
            .map(Scope::Token),
        None => None,
    };
    let Some(scope) = scope else {
        return error_response(ErrorBody::new(
            ErrorCode::Unauthorized,
            "missing or invalid token for /mcp (the operator token or one from tether ctl mcp token create)",
        ));
    };
    super::super::conn::authenticated(req.extensions());
    req.extensions_mut().insert(scope);
    next.run(req).await
}

fn token_hash(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
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
}

fn info(t: crate::server::store::McpToken, secret: Option<String>) -> TokenInfo {
    TokenInfo {
        id: t.id,
        token: secret,
        nodes: t.nodes,
        task_prefix: t.task_prefix,
        created_at: t.created_at,
    }
}

pub(super) async fn create_token(
    State(app): State<Arc<AppState>>,
    Json(req): Json<NewToken>,
) -> ApiResult<(StatusCode, Json<TokenInfo>)> {
    for n in &req.nodes {
        app.hub.node_info(n)?;
    }
    let secret = format!("tmcp_{}", auth::random_secret(32));
    let t = crate::server::store::McpToken {
        id: ulid::Ulid::new().to_string().to_ascii_lowercase(),
        hash: token_hash(&secret),
        nodes: req.nodes,
        task_prefix: req.task_prefix.filter(|p| !p.is_empty()),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let kept = t.clone();
    on_store(&app, move |s| s.add_mcp_token(kept)).await?;
    Ok((StatusCode::CREATED, Json(info(t, Some(secret)))))
}

pub(super) async fn list_tokens(State(app): State<Arc<AppState>>) -> Json<Vec<TokenInfo>> {
    Json(
        app.store
            .mcp_tokens()
            .into_iter()
            .map(|t| info(t, None))
            .collect(),
    )
}

pub(super) async fn revoke_token(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let gone = id.clone();
    if on_store(&app, move |s| s.revoke_mcp_token(&gone)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ErrorBody::new(ErrorCode::NotFound, format!("no such MCP token: {id}")).into())
    }
}
