//! Deployment routes: up (a Compose file), list, inspect, down.

use super::workers::{api_record, append_audit};
use super::*;
use crate::protocol::NetworkPolicy;

/// `POST /api/v1/deployments` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Up {
    /// The Compose file's text.
    compose: String,
    /// Overrides the file's `name:`.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default)]
    network_policy: Option<NetworkPolicy>,
}

pub(super) async fn up(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<Up>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(up) = body.map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, e.body_text()))?;
    let t0 = std::time::Instant::now();
    let req = crate::server::compose::parse(&up.compose, up.name.as_deref(), up.network_policy)?;
    let args = json!({ "deployment": req.deployment, "services": req.services.len() });
    let r = app.hub.deploy_in(req, up.node_id, &caller.scope).await;
    let mut rec = api_record(&caller, "api:deploy_up", &args, t0, &r);
    if let Ok(d) = &r {
        rec.node_id = Some(d.node_id.clone());
    }
    append_audit(&app, rec);
    Ok(Json(r?))
}

pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> impl IntoResponse {
    Json(json!({ "deployments": app.hub.deployments_in(&caller.scope) }))
}

pub(super) async fn inspect(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.deployment(&name).await?))
}

#[derive(Deserialize)]
pub(super) struct DownQuery {
    #[serde(default)]
    volumes: bool,
}

pub(super) async fn down(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<DownQuery>,
) -> ApiResult<impl IntoResponse> {
    let t0 = std::time::Instant::now();
    let org = app.hub.deployment_org(&name);
    let r = app.hub.undeploy(&name, q.volumes).await;
    let mut rec = api_record(
        &caller,
        "api:deploy_down",
        &json!({ "deployment": name, "volumes": q.volumes }),
        t0,
        &r,
    );
    rec.org = org.or(rec.org);
    append_audit(&app, rec);
    Ok(Json(r?))
}
