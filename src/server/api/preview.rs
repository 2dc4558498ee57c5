//! Preview: HTTP to a port of a worker, proxied through a tunnel. Each
//! request is one tunnel connection carrying one HTTP/1.1 exchange, with
//! the method, headers and `Host` as the client sent them; bodies stream
//! both ways, and an upgrade (a WebSocket) becomes a two-way byte stream.
//!
//! Path-based: `/api/v1/workers/{id}/ports/{port}/...` (the worker sees
//! `/...`, and the prefix in `X-Forwarded-Prefix`). Host-based:
//! `{port}-{worker}.{preview domain}`, when the server has one. Either is
//! authorized by the operator token or by a preview grant: the signed URL
//! `?tether_preview=` sets a cookie scoped to that worker and port. The
//! worker never sees the operator token or the grant.

use super::*;
use crate::protocol::operator::{PreviewInfo, PreviewRequest};
use crate::server::preview::{self, PREVIEW_PARAM};
use crate::server::tunnels::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Default lifetime of a preview URL.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// `POST /api/v1/workers/{id}/previews`: a signed, expiring preview URL.
pub(super) async fn issue(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(req): Json<PreviewRequest>,
) -> ApiResult<Json<PreviewInfo>> {
    if req.port == 0 {
        return Err(ErrorBody::new(ErrorCode::InvalidRequest, "port must be 1 to 65535").into());
    }
    let ttl = req.ttl_secs.map_or(DEFAULT_TTL, Duration::from_secs);
    if ttl.is_zero() || ttl > preview::MAX_TTL {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!(
                "ttl must be 1 s to {}",
                humantime::format_duration(preview::MAX_TTL)
            ),
        )
        .into());
    }
    let worker = app.hub.worker(&id)?;
    let target = preview::Target {
        worker_id: &worker.worker_id,
        container_id: &worker.container_id,
        port: req.port,
    };
    let org = app.hub.worker_org(&id);
    let (grant, token) = app.preview_key.grant(target, org, ttl);
    let g = grant.clone();
    on_store(&app, move |s| s.add_preview(g)).await?;
    let mut info = grant_info(&grant);
    info.path = Some(format!(
        "{}/?{PREVIEW_PARAM}={token}",
        path_prefix(&grant.worker_id, grant.port)
    ));
    info.url = app.cfg.preview_domain.as_ref().map(|d| {
        let scheme = if app.cfg.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!(
            "{scheme}://{}-{}.{d}/?{PREVIEW_PARAM}={token}",
            grant.port,
            crate::server::preview::host_label(&grant.worker_id)
        )
    });
    tracing::info!(preview = %grant.id, worker_id = %grant.worker_id, port = grant.port, expires = grant.expires, "preview URL issued");
    Ok(Json(info))
}

fn grant_info(g: &preview::PreviewGrant) -> PreviewInfo {
    let expires = std::time::UNIX_EPOCH + Duration::from_secs(g.expires);
    PreviewInfo {
        id: g.id.clone(),
        worker_id: g.worker_id.clone(),
        port: g.port,
        expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
        path: None,
        url: None,
    }
}

/// `GET /api/v1/previews`: grants neither expired nor revoked.
pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Json<Vec<PreviewInfo>> {
    Json(
        app.store
            .previews()
            .iter()
            .filter(|g| sees_grant(&caller, g))
            .map(grant_info)
            .collect(),
    )
}

/// `DELETE /api/v1/previews/{id}`: revokes a grant at once.
pub(super) async fn revoke(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if !app
        .store
        .preview(&id)
        .is_some_and(|g| sees_grant(&caller, &g))
    {
        return Err(ErrorBody::new(ErrorCode::NotFound, "no such preview URL").into());
    }
    let grant = id.clone();
    let gone = on_store(&app, move |s| s.revoke_preview(&id)).await?;
    // What it opened ends too (here: another replica's connections end at
    // the grant's expiry or when the client next asks).
    app.tunnels.revoke_grant(&grant);
    if gone {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ErrorBody::new(ErrorCode::NotFound, "no such preview URL").into())
    }
}

/// Grants are the organization's that owned the worker when they were
/// issued (also once the worker is gone, and never the next owner of its
/// name's).
fn sees_grant(caller: &Caller, g: &preview::PreviewGrant) -> bool {
    caller.is_admin() || g.org.as_deref().is_some_and(|o| caller.sees(o))
}

fn path_prefix(worker_id: &str, port: u16) -> String {
    format!("/api/v1/workers/{worker_id}/ports/{port}")
}

/// `/api/v1/workers/{id}/ports/{port}[/...]`: the path-based preview.
pub(super) async fn by_path(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let mut parts = path.split('/').skip(4);
    let (Some(worker), Some("ports"), Some(port)) = (parts.next(), parts.next(), parts.next())
    else {
        return error_response(ErrorBody::new(ErrorCode::NotFound, "no such endpoint"));
    };
    // Written as a number is written (no `+`, no leading zero): the prefix
    // the worker's path is cut from is the one in the address.
    let Some(port) = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0 && p.to_string() == port)
    else {
        return error_response(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("port must be 1 to 65535, got {port:?}"),
        ));
    };
    let prefix = path_prefix(worker, port);
    let rest = &path[prefix.len()..];
    if rest.is_empty() {
        // The app's relative links resolve against a directory.
        let q = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        return redirect(&format!("{prefix}/{q}"), None);
    }
    let worker = worker.to_string();
    let rest = rest.to_string();
    serve(&app, &worker, port, req, &rest, Some(&prefix)).await
}

/// Before routing: a request whose `Host` names a worker port under the
/// preview domain is a host-based preview, whatever its path.
pub(super) async fn by_host(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let target = app.cfg.preview_domain.as_deref().and_then(|d| {
        let host = req.headers().get(header::HOST)?.to_str().ok()?;
        preview::parse_host(host, d)
    });
    match target {
        Some((worker, port)) => {
            // A worker another replica holds is served there, for a
            // request that could open it.
            let known = || app.hub.worker(&worker).is_ok() || app.replica.is_none();
            let req = if known() || !credible(&app, req.headers(), req.uri(), &worker, port).await {
                req
            } else {
                match super::forward::elsewhere(&app, "worker", &worker, known, req).await {
                    Ok(answer) => return answer,
                    Err(req) => req,
                }
            };
            let path = req.uri().path().to_string();
            serve(&app, &worker, port, req, &path, None).await
        }
        None => next.run(req).await,
    }
}

/// Whether a request for `port` of `worker` carries what could open it
/// wherever the worker is: an operator token, or the preview token of a live
/// grant for that worker and port (checked against the grant's own record,
/// since the worker may be another replica's). Only such a request makes
/// this replica ask its peers where a worker it does not know is: an
/// anonymous one is refused here, at no cost to the peers and in a time
/// that tells nothing of where the worker runs.
pub(super) async fn credible(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    worker: &str,
    port: u16,
) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| auth::bearer(Some(v)));
    if let Some(t) = bearer
        && app.caller_fresh(t).await.is_ok()
    {
        return true;
    }
    let query = uri.query().unwrap_or("");
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let granted = |token: &str| {
        let id = token.split('.').next().unwrap_or_default();
        app.store.preview(id).is_some_and(|g| {
            let target = preview::Target {
                worker_id: worker,
                container_id: &g.container_id,
                port,
            };
            g.worker_id == worker && g.port == port && app.preview_key.verify(token, target).is_ok()
        })
    };
    preview::param(query)
        .into_iter()
        .chain(preview::cookies(cookies, PREVIEW_PARAM))
        .any(granted)
}

/// Authorizes, then proxies `req` to `port` of `worker` as `path` (plus the
/// query). `prefix` is the path-based preview's prefix.
async fn serve(
    app: &Arc<AppState>,
    worker: &str,
    port: u16,
    mut req: Request,
    path: &str,
    prefix: Option<&str>,
) -> Response {
    let query = req.uri().query().unwrap_or("").to_string();
    // A signed URL: checked, turned into a cookie, and the token taken out
    // of the address bar.
    if let Some(token) = preview::param(&query) {
        return match check_grant(app, token, worker, port) {
            Ok((_, expires)) => {
                let rest = preview::without_param(&query)
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                let location = format!("{}{path}{rest}", prefix.unwrap_or(""));
                let secure = if app.cfg.tls.is_some() {
                    "; Secure"
                } else {
                    ""
                };
                let cookie = format!(
                    "{PREVIEW_PARAM}={token}; Path={}; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
                    prefix.unwrap_or("/"),
                    preview::remaining(expires)
                );
                redirect(&location, Some(cookie))
            }
            Err(e) => error_response(e),
        };
    }
    use axum::http::Method;
    let writes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || req.headers().contains_key(header::UPGRADE);
    let grant = match authorize(app, req.headers_mut(), worker, port, writes) {
        Ok(grant) => grant,
        Err(e) => return error_response(e),
    };
    let target = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    match target.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => {
            return error_response(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "bad request path",
            ));
        }
    }
    if let Some(p) = prefix
        && let Ok(v) = HeaderValue::from_str(p)
    {
        req.headers_mut().insert("x-forwarded-prefix", v);
    }
    match forward(app, worker, port, req, grant).await {
        Ok(mut r) => {
            contain(r.headers_mut(), prefix);
            r
        }
        Err(e) => error_response(e),
    }
}

/// Keeps what a worker's response sets on its own preview: its cookies
/// (see [`preview::contained_set_cookie`]) and, under a path-based preview,
/// which shares the API's origin, its service workers, whose scope can
/// then not be widened beyond the prefix (`Service-Worker-Allowed` is
/// dropped), so no worker's page can intercept another preview's requests.
fn contain(headers: &mut HeaderMap, prefix: Option<&str>) {
    if prefix.is_some() {
        headers.remove("service-worker-allowed");
    }
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| HeaderValue::from_str(&preview::contained_set_cookie(v, prefix)).ok())
        .collect();
    headers.remove(header::SET_COOKIE);
    for c in cookies {
        headers.append(header::SET_COOKIE, c);
    }
}

/// The operator token or a live grant for this worker and port; either is
/// taken out of the headers the worker will see.
///
/// A grant's cookie does not carry a request that changes state or opens
/// a WebSocket (`writes`) from a page of another origin: host-based
/// previews of one domain are one site, so `SameSite=Lax` lets one
/// preview's page send another's cookie.
fn authorize(
    app: &AppState,
    headers: &mut HeaderMap,
    worker: &str,
    port: u16,
    writes: bool,
) -> Result<Option<(String, u64)>, ErrorBody> {
    // An operator token of the worker's organization (or the admin's);
    // another organization's worker is not found.
    let caller = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| auth::bearer(Some(v)))
        .and_then(|t| app.caller(t).ok());
    if let Some(c) = &caller
        && !sees_worker(app, c, worker)
    {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("no such worker: {worker}"),
        ));
    }
    let operator = caller.is_some();
    // The server's credentials never reach the worker, valid or not (an
    // expired token, one made a moment ago at another replica); an app's
    // own `Authorization` does.
    let ours = |v: &HeaderValue| {
        v.to_str()
            .is_ok_and(|v| preview::is_server_credential(v, &app.admin_token))
    };
    if operator || headers.get_all(header::AUTHORIZATION).iter().any(ours) {
        headers.remove(header::AUTHORIZATION);
    }
    headers.remove(header::PROXY_AUTHORIZATION);
    let cookie_headers: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(String::from))
        .collect();
    let mut grant = None;
    let mut refusal = None;
    if !operator {
        for token in preview::cookies(cookie_headers.iter().map(String::as_str), PREVIEW_PARAM) {
            match check_grant(app, token, worker, port) {
                Ok(g) => {
                    grant = Some(g);
                    break;
                }
                Err(e) => refusal = Some(e),
            }
        }
    }
    let granted = operator || grant.is_some();
    if granted && !operator && writes && !preview::same_origin(headers) {
        return Err(ErrorBody::new(
            ErrorCode::PolicyDenied,
            "a preview URL's cookie does not carry a request that changes state or upgrades from a page of another origin",
        ));
    }
    if !granted {
        return Err(refusal.unwrap_or_else(|| {
            ErrorBody::new(
                ErrorCode::Unauthorized,
                "a preview needs the operator token or a preview URL (tether ctl preview-url)",
            )
        }));
    }
    headers.remove(header::COOKIE);
    for h in &cookie_headers {
        if let Some(kept) = preview::without_cookie(h, PREVIEW_PARAM)
            && let Ok(v) = HeaderValue::from_str(&kept)
        {
            headers.append(header::COOKIE, v);
        }
    }
    Ok(grant)
}

/// A grant token that is signed for this worker and port, unexpired and
/// not revoked: the grant's id and expiry.
fn check_grant(
    app: &AppState,
    token: &str,
    worker: &str,
    port: u16,
) -> Result<(String, u64), ErrorBody> {
    // A worker this replica does not know opens with no token: the same
    // answer as a forged one, whether the worker exists elsewhere or not.
    let container_id = app
        .hub
        .worker(worker)
        .map_err(|_| {
            ErrorBody::new(
                ErrorCode::Unauthorized,
                "the preview token is not valid for this worker and port",
            )
        })?
        .container_id;
    let target = preview::Target {
        worker_id: worker,
        container_id: &container_id,
        port,
    };
    let id = app.preview_key.verify(token, target)?;
    match app.store.preview(&id) {
        Some(g) => Ok((id, g.expires)),
        None => Err(ErrorBody::new(
            ErrorCode::Unauthorized,
            "the preview URL was revoked",
        )),
    }
}

fn redirect(location: &str, cookie: Option<String>) -> Response {
    let mut r = Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, location)
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(c) = cookie {
        r = r.header(header::SET_COOKIE, c);
    }
    r.body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// One HTTP exchange with the worker's port over a new tunnel connection;
/// one a grant authorized ends when the grant is revoked or expires.
async fn forward(
    app: &Arc<AppState>,
    worker: &str,
    port: u16,
    req: Request,
    grant: Option<(String, u64)>,
) -> Result<Response, ErrorBody> {
    let conn = match grant {
        Some((id, expires)) => app.tunnels.connect_granted(worker, port, &id, expires),
        None => app.tunnels.connect(worker, port),
    };
    let session = app.hub.tunnel(worker, port).await?;
    let io = pipe(&app.hub, session, conn);
    super::relay_http(&app.hub, io, req)
        .await
        .map_err(|e| bad_gateway(worker, port, e))
}

fn bad_gateway(worker: &str, port: u16, e: hyper::Error) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::HostUnreachable,
        format!("port {port} of worker {worker} did not answer HTTP: {e}"),
    )
}

/// What a pipe holds of the tunnel before handing it to hyper.
const PIPE_BUFFER: usize = 256 * 1024;

/// The tunnel as a byte stream for hyper. Ends (and the tunnel with it)
/// when hyper lets go of its end, when the worker closes, or when an
/// operator closes the tunnel.
fn pipe(hub: &crate::server::Hub, session: Duplex, conn: Connection) -> tokio::io::DuplexStream {
    let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
    let Duplex {
        mut input,
        mut output,
    } = session;
    output.report_eof();
    hub.spawn_task(async move {
        let (mut from_hyper, mut to_hyper) = tokio::io::split(theirs);
        let up = async {
            loop {
                let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
                match from_hyper.read_buf(&mut buf).await {
                    // hyper never half-closes: its end is gone.
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        conn.to_worker(n);
                        if input.write(buf.freeze()).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let down = async {
            while let Some(ev) = output.next().await {
                match ev {
                    StreamEvent::Data(_, b) => {
                        conn.from_worker(b.len());
                        if to_hyper.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                    StreamEvent::Eof => {
                        let _ = to_hyper.shutdown().await;
                    }
                    StreamEvent::Gap(_) => {}
                    StreamEvent::End { .. } => return,
                }
            }
        };
        tokio::select! {
            _ = up => {}
            _ = down => {}
            _ = conn.closed() => {}
        }
        // Dropping the output before its end cancels the tunnel on the agent.
    });
    ours
}
