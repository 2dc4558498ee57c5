//! Organizations and their operator tokens and registration keys. Only the
//! server's admin token makes organizations and keys; operator tokens are
//! made and revoked by the admin, or by an organization's operator for its
//! own organization (none outliving the token that makes it). An
//! organization's operator sees its own organization and tokens.

use super::*;
use crate::server::OrgScope;
use crate::server::orgs::{
    self, Caller, OperatorToken, Organization, RegistrationKey, new_id, now_rfc3339, secret_hash,
};
use serde::Serialize;

#[derive(Serialize)]
pub(super) struct OrgInfo {
    name: String,
    created_at: Option<String>,
    /// A registration key, only in the answer that made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    registration_key: Option<NewSecret>,
}

/// A secret shown once, with the id that names it later.
#[derive(Serialize)]
pub(super) struct NewSecret {
    id: String,
    secret: String,
}

pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Json<Vec<OrgInfo>> {
    let default = OrgInfo {
        name: crate::server::hub::DEFAULT_ORG.into(),
        created_at: None,
        registration_key: None,
    };
    let made = app.store.organizations().into_iter().map(|o| OrgInfo {
        name: o.name,
        created_at: Some(o.created_at),
        registration_key: None,
    });
    Json(
        std::iter::once(default)
            .chain(made)
            .filter(|o| caller.sees(&o.name))
            .collect(),
    )
}

#[derive(Deserialize)]
pub(super) struct NewOrg {
    name: String,
}

fn registration_key(org: &str) -> (RegistrationKey, NewSecret) {
    let secret = format!("treg_{}", auth::random_secret(32));
    let key = RegistrationKey {
        id: new_id(),
        org: org.to_string(),
        hash: secret_hash(&secret),
        created_at: now_rfc3339(),
    };
    let shown = NewSecret {
        id: key.id.clone(),
        secret,
    };
    (key, shown)
}

pub(super) async fn create(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<NewOrg>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<OrgInfo>)> {
    caller.require_admin("create organizations")?;
    let Json(req) = body.map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, e.body_text()))?;
    orgs::check_name(&req.name)?;
    let org = Organization {
        name: req.name.clone(),
        // To the millisecond, as audit records are: the trail an
        // organization reads starts here.
        created_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    };
    let (key, shown) = registration_key(&req.name);
    let kept = org.clone();
    on_store(&app, move |s| s.add_organization(kept, key)).await?;
    tracing::info!(org = %org.name, "organization created");
    Ok((
        StatusCode::CREATED,
        Json(OrgInfo {
            name: org.name,
            created_at: Some(org.created_at),
            registration_key: Some(shown),
        }),
    ))
}

/// `DELETE /api/v1/orgs/{name}`: the organization, its keys and tokens
/// go; refused while a node belongs to it.
pub(super) async fn remove(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(org): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin("remove organizations")?;
    let gone = org.clone();
    if on_store(&app, move |s| s.remove_organization(&gone)).await? {
        tracing::info!(%org, "organization removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ErrorBody::new(ErrorCode::NotFound, format!("no such organization: {org}")).into())
    }
}

/// Another registration key for an organization (the earlier ones stay
/// valid).
pub(super) async fn add_key(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(org): Path<String>,
) -> ApiResult<(StatusCode, Json<NewSecret>)> {
    caller.require_admin("make registration keys")?;
    let (key, shown) = registration_key(&org);
    on_store(&app, move |s| s.add_registration_key(key)).await?;
    Ok((StatusCode::CREATED, Json(shown)))
}

#[derive(Serialize)]
pub(super) struct TokenInfo {
    id: String,
    org: String,
    created_at: String,
    /// RFC 3339 UTC; none: until revoked.
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

fn token_info(t: OperatorToken, secret: Option<String>) -> TokenInfo {
    TokenInfo {
        id: t.id,
        org: t.org,
        created_at: t.created_at,
        expires_at: t.expires.map(|e| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(e))
                .to_string()
        }),
        token: secret,
    }
}

pub(super) async fn tokens(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Json<Vec<TokenInfo>> {
    Json(
        app.store
            .operator_tokens()
            .into_iter()
            .filter(|t| caller.sees(&t.org))
            .map(|t| token_info(t, None))
            .collect(),
    )
}

#[derive(Deserialize)]
pub(super) struct NewToken {
    /// The organization; an organization's operator may leave it out (its
    /// own).
    #[serde(default)]
    org: Option<String>,
    /// Lifetime in seconds; none: until revoked.
    #[serde(default)]
    expires_in_secs: Option<u64>,
}

pub(super) async fn create_token(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<NewToken>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<TokenInfo>)> {
    let Json(req) = body.map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, e.body_text()))?;
    if req.expires_in_secs == Some(0) {
        return Err(
            ErrorBody::new(ErrorCode::InvalidRequest, "expires_in_secs must be > 0").into(),
        );
    }
    let expires = req
        .expires_in_secs
        .map(|s| crate::server::preview::now_secs().saturating_add(s));
    let (org, expires) = match &caller.scope {
        OrgScope::All => (
            req.org.ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    "name the token's organization (org)",
                )
            })?,
            expires,
        ),
        // An organization's operator makes tokens of its own organization,
        // none outliving the token that makes it (a short-lived token must
        // not mint a lasting one).
        OrgScope::Org(own) => {
            if req.org.as_ref().is_some_and(|o| o != own) {
                return Err(ErrorBody::new(
                    ErrorCode::PolicyDenied,
                    "an organization's operator makes tokens of its own organization only",
                )
                .into());
            }
            let limit = caller_token(&app, &caller).and_then(|t| t.expires);
            let expires = match (expires, limit) {
                (Some(e), Some(l)) if e > l => {
                    return Err(ErrorBody::new(
                        ErrorCode::PolicyDenied,
                        "a token may not outlive the token that makes it: ask for a shorter --expires",
                    )
                    .into());
                }
                (None, Some(l)) => Some(l),
                (e, _) => e,
            };
            (own.clone(), expires)
        }
    };
    let secret = format!(
        "{}{}",
        crate::server::orgs::TOKEN_PREFIX,
        auth::random_secret(32)
    );
    let t = OperatorToken {
        id: new_id(),
        org,
        hash: secret_hash(&secret),
        created_at: now_rfc3339(),
        expires,
    };
    let kept = t.clone();
    on_store(&app, move |s| s.add_operator_token(kept)).await?;
    tracing::info!(token_id = %t.id, org = %t.org, "operator token created");
    Ok((StatusCode::CREATED, Json(token_info(t, Some(secret)))))
}

pub(super) async fn revoke_token(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    // An organization's operator revokes its own organization's tokens;
    // another's answers as a made-up id does.
    let visible = app
        .store
        .operator_tokens()
        .iter()
        .any(|t| t.id == id && caller.sees(&t.org));
    if !visible {
        return Err(
            ErrorBody::new(ErrorCode::NotFound, format!("no such operator token: {id}")).into(),
        );
    }
    let gone = id.clone();
    if on_store(&app, move |s| s.revoke_operator_token(&gone)).await? {
        tracing::info!(token_id = %id, "operator token revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ErrorBody::new(ErrorCode::NotFound, format!("no such operator token: {id}")).into())
    }
}

/// The operator token the caller came with (none for the admin token).
pub(super) fn caller_token(app: &AppState, caller: &Caller) -> Option<OperatorToken> {
    let id = caller.name.strip_prefix("token:")?;
    app.store.operator_tokens().into_iter().find(|t| t.id == id)
}
