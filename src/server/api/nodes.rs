//! Node routes: list, inspect, forget, drain, push configuration.

use super::*;

pub(super) async fn nodes(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> impl IntoResponse {
    Json(json!({ "nodes": app.hub.nodes_in(&caller.scope) }))
}

pub(super) async fn node(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.node_detail(&id)?))
}

/// `tether ctl node rm`: the node's key binding is forgotten (its tokens
/// are refused from now on), its connection closes at once, and the node id
/// may register again, with any key.
pub(super) async fn forget_node(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let node = id.clone();
    let bound = on_store(&app, move |s| s.forget_node(&node)).await?;
    let known = app.hub.forget_node(&id);
    app.proofs_seen.lock().unwrap().remove(&id);
    if !bound && !known {
        return Err(ErrorBody::new(ErrorCode::NotFound, format!("no such node: {id}")).into());
    }
    tracing::info!(node_id = %id, "node removed by an operator");
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn drain(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.set_draining(&id, true)?))
}

pub(super) async fn undrain(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.set_draining(&id, false)?))
}

pub(super) async fn push_config(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Json<crate::protocol::NodeConfig>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(mut cfg) =
        body.map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, e.body_text()))?;
    app.hub.node_info(&id)?;
    if cfg.config_version.is_empty() {
        cfg.config_version = ulid::Ulid::new().to_string();
    }
    // Kept before it is sent: a server restart still knows what it wants.
    let (node, kept) = (id.clone(), cfg.clone());
    on_store(&app, move |s| s.set_desired_config(&node, Some(&kept))).await?;
    Ok(Json(app.hub.push_config(&id, cfg).await?))
}
