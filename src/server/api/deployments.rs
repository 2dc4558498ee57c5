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
    let name = req.deployment.clone();
    let names = StoreNames {
        store: app.store.clone(),
        scope: caller.scope.clone(),
    };
    let r = match recorded_node(&app, &name, up.node_id, &caller.scope) {
        Ok(node) => app.hub.deploy_in(req, node, &caller.scope, &names).await,
        Err(e) => Err(e),
    };
    // Recorded again once made: a concurrent `up` to the same node that
    // failed gives back the reservation this one shared.
    if let Ok(d) = &r {
        let node = d.node_id.clone();
        if let Err(e) = on_store(&app, move |s| s.set_deployment_node(&name, Some(&node))).await {
            tracing::error!(deployment = %d.deployment, error = %e, "the deployment is up but its node could not be recorded");
        }
    }
    let mut rec = api_record(&caller, "api:deploy_up", &args, t0, &r);
    if let Ok(d) = &r {
        rec.node_id = Some(d.node_id.clone());
    }
    append_audit(&app, rec);
    Ok(Json(r?))
}

/// Where an `up` of deployment `name` must go, by the store's record of the
/// node it was made on (kept across restarts; the registry learns only from
/// the nodes that have reported since): that node, even while it is
/// offline. A name recorded on another organization's node is taken.
fn recorded_node(
    app: &AppState,
    name: &str,
    asked: Option<String>,
    scope: &crate::server::hub::OrgScope,
) -> Result<Option<String>, ErrorBody> {
    let Some(at) = app.store.deployment_node(name) else {
        return Ok(asked);
    };
    let Some(identity) = app.store.node_identity(&at) else {
        // Its node was forgotten: the name is free.
        return Ok(asked);
    };
    if !scope.admits(&identity.org) {
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!("the deployment name {name} is taken: choose another"),
        ));
    }
    match asked {
        Some(n) if n != at => Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!("deployment {name} runs on node {at}: take it down to move it to {n}"),
        )),
        _ => Ok(Some(at)),
    }
}

/// Deployment names reserved in the store, which replicas on one database
/// share: of two `up`s of a new name, at any replicas, one wins.
struct StoreNames {
    store: Arc<dyn crate::server::store::Store>,
    scope: crate::server::hub::OrgScope,
}

impl crate::server::DeploymentNames for StoreNames {
    fn claim(
        &self,
        name: &str,
        node: &str,
    ) -> futures_util::future::BoxFuture<'static, Result<bool, ErrorBody>> {
        use crate::server::store::Claim;
        let (store, scope) = (self.store.clone(), self.scope.clone());
        let (name, node) = (name.to_string(), node.to_string());
        Box::pin(async move {
            let claim = {
                let (store, name, node) = (store.clone(), name.clone(), node.clone());
                tokio::task::spawn_blocking(move || store.claim_deployment(&name, &node))
                    .await
                    .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))??
            };
            match claim {
                Claim::New => Ok(true),
                Claim::Held => Ok(false),
                Claim::TakenBy(at) => {
                    let ours = store
                        .node_identity(&at)
                        .is_some_and(|i| scope.admits(&i.org));
                    Err(ErrorBody::new(
                        ErrorCode::Conflict,
                        if ours {
                            format!(
                                "deployment {name} runs on node {at}: take it down to move it to {node}"
                            )
                        } else {
                            format!("the deployment name {name} is taken: choose another")
                        },
                    ))
                }
            }
        })
    }

    fn release(&self, name: &str, node: &str) -> futures_util::future::BoxFuture<'static, ()> {
        let store = self.store.clone();
        let (name, node) = (name.to_string(), node.to_string());
        Box::pin(async move {
            let done = tokio::task::spawn_blocking({
                let (name, node) = (name.clone(), node.clone());
                move || store.release_deployment(&name, &node)
            })
            .await;
            if !matches!(done, Ok(Ok(()))) {
                tracing::error!(deployment = %name, %node, "a refused deployment's name could not be given back");
            }
        })
    }
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
    if r.is_ok() {
        let gone = name.clone();
        if let Err(e) = on_store(&app, move |s| s.set_deployment_node(&gone, None)).await {
            tracing::error!(deployment = %name, error = %e, "the deployment is down but its record stays");
        }
    }
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
