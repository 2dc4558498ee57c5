//! The MCP allowlist: which nodes' tools `/mcp` exposes.

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
