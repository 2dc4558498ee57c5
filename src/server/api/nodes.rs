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
    check_config_version(&cfg.config_version, crate::protocol::now_millis())?;
    // Kept before it is sent: a server restart still knows what it wants.
    let (node, kept) = (id.clone(), cfg.clone());
    on_store(&app, move |s| s.set_desired_config(&node, Some(&kept))).await?;
    Ok(Json(app.hub.push_config(&id, cfg).await?))
}

/// How far ahead of this server's clock a pushed `config_version` may be.
const CONFIG_VERSION_SKEW_MS: u64 = 5 * 60 * 1000;

/// A `config_version` given by the operator: a ULID written as it is
/// generated (upper case, so that versions order as strings, as nodes
/// compare them) and not from the future. A version far ahead would leave
/// the node refusing every later push as "not newer".
fn check_config_version(v: &str, now_ms: u64) -> Result<(), ErrorBody> {
    let bad = |why: &str| {
        ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("config_version {v:?} {why} (leave it out to have one made)"),
        )
    };
    let ulid: ulid::Ulid = v.parse().map_err(|_| bad("is not a ULID"))?;
    if ulid.to_string() != v {
        return Err(bad("is not written in upper case"));
    }
    if ulid.timestamp_ms() > now_ms + CONFIG_VERSION_SKEW_MS {
        return Err(bad("lies in the future"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_version_is_an_upper_case_ulid_of_now_or_before() {
        let now = crate::protocol::now_millis();
        let fresh = ulid::Ulid::new().to_string();
        assert!(check_config_version(&fresh, now).is_ok());
        for bad in [
            fresh.to_lowercase(),
            "7ZZZZZZZZZZZZZZZZZZZZZZZZZ".to_string(),
            ulid::Ulid::from_parts(now + 3_600_000, 1).to_string(),
            "v7".to_string(),
        ] {
            let e = check_config_version(&bad, now).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
        }
    }
}
