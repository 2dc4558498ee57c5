//! `POST /api/v1/register`: the pre-shared key and a key proof in, a node
//! token and the bootstrap payload out (§2.1).

use super::*;

/// A registration body's bound: `node_id`, `public_key` and `proof` are
/// well under a kilobyte.
const MAX_REGISTER_BODY: usize = 16 * 1024;
/// How long a registration body may take to arrive after its head.
const REGISTER_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) async fn register(
    State(app): State<Arc<AppState>>,
    admission: Option<Extension<Admission>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Bootstrap>> {
    let key = auth::bearer(headers.get("authorization").and_then(|v| v.to_str().ok()));
    // The server-wide key registers into the default organization, an
    // organization's key into that organization.
    let org = match key {
        Some(k) if auth::secret_eq(k, &app.cfg.psk) => Some(crate::server::hub::DEFAULT_ORG.into()),
        Some(k) => app
            .store
            .registration_key_by_hash(&crate::server::orgs::secret_hash(k))
            .map(|r| r.org),
        None => None,
    };
    let Some(org) = org else {
        return Err(
            ErrorBody::new(ErrorCode::Unauthorized, "wrong or missing registration key").into(),
        );
    };
    if let Some(Extension(a)) = admission {
        a.authenticated();
    }
    // The body only now, once the key is known good: an unauthenticated
    // request that never sends the body it announces does not hold its
    // connection (and a pending slot) while it is waited for. A body is a
    // few hundred bytes, sent at once.
    let body = match tokio::time::timeout(
        REGISTER_BODY_TIMEOUT,
        axum::body::to_bytes(body, MAX_REGISTER_BODY),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                format!("registration body over {MAX_REGISTER_BODY} bytes, or cut short"),
            )
            .into());
        }
        Err(_) => {
            return Err(ErrorBody::new(
                ErrorCode::Timeout,
                format!("no registration body within {REGISTER_BODY_TIMEOUT:?}"),
            )
            .into());
        }
    };
    // Parsed here, after the key: any malformed body is a 400 the agent
    // knows to be permanent (§2.1), never a framework's 415 or 422.
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    let parsed = if json_type {
        serde_json::from_slice::<RegisterRequest>(&body).map_err(|e| e.to_string())
    } else {
        Err("Content-Type must be application/json".to_string())
    };
    let body = parsed.map_err(|why| {
        ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("body must be JSON {{\"node_id\", \"public_key\", \"proof\"}}: {why}"),
        )
    })?;
    if !crate::docker::valid_node_id(&body.node_id) {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            "node_id must be 1-64 characters of letters, digits, '-', '_' and '.', not starting with '.' or '-'",
        )
        .into());
    }
    // A bound id takes only its own key: another is refused before its
    // proof is even looked at. Then the proof, then the binding.
    if let Some(bound) = app.store.node_identity(&body.node_id)
        && !bound
            .public_key
            .eq_ignore_ascii_case(body.public_key.trim())
    {
        tracing::warn!(node_id = %body.node_id, "registration with another key refused");
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            crate::server::store::StoreError::BoundElsewhere {
                node_id: body.node_id.clone(),
            }
            .to_string(),
        )
        .into());
    }
    app.check_proof(
        &body.node_id,
        &body.public_key,
        crate::protocol::ProofPurpose::Register,
        Some(&body.proof),
    )
    .await?;
    let (node, key) = (body.node_id.clone(), body.public_key.clone());
    let identity = on_store(&app, move |s| s.bind_node(&node, &key, &org))
        .await
        .inspect_err(|e| {
            if e.code == ErrorCode::Conflict {
                tracing::warn!(node_id = %body.node_id, "registration with another key refused");
            }
        })?;
    // The configuration it will get: the one wanted for it, or else the
    // server's configuration for new nodes, kept as wanted from now on (the
    // hub takes it from the store when the node connects).
    let mut desired = app.store.desired_config(&body.node_id);
    if desired.is_none()
        && let Some(mut cfg) = app.cfg.node_config.clone()
    {
        cfg.config_version = ulid::Ulid::new().to_string();
        let (node, kept) = (body.node_id.clone(), cfg.clone());
        on_store(&app, move |s| s.set_desired_config(&node, Some(&kept))).await?;
        desired = Some(cfg);
    }
    let (node_jwt, exp) = app.signer.issue(&body.node_id, &identity.binding);
    tracing::info!(node_id = %body.node_id, key_id = %crate::protocol::key_id(&identity.public_key), "node registered");
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    Ok(Json(Bootstrap {
        version: 1,
        node_id: body.node_id,
        orchestrator: Orchestrator {
            base_url: format!(
                "{}://{host}",
                if app.cfg.tls.is_some() {
                    "https"
                } else {
                    "http"
                }
            ),
            connect_path: AGENT_CONNECT_PATH.into(),
        },
        auth: NodeAuth {
            node_jwt,
            expires_at: humantime::format_rfc3339_seconds(exp).to_string(),
        },
        config_version: desired.map(|c| c.config_version),
    }))
}
