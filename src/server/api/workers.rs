//! Worker routes: list, inspect, spawn, stop, remove, stat, archives.

use super::*;

pub(super) async fn workers(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> impl IntoResponse {
    Json(json!({ "workers": app.hub.workers_in(&caller.scope) }))
}

pub(super) async fn worker(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.inspect(&id).await?))
}

pub(super) async fn spawn(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<SpawnRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(req) = body.map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::TooLarge
        } else {
            ErrorCode::InvalidRequest
        };
        ErrorBody::new(code, e.body_text())
    })?;
    let t0 = std::time::Instant::now();
    let args = serde_json::to_value(&req).unwrap_or_default();
    let (task, job) = (req.task_id.clone(), req.job_id.clone());
    let r = app.hub.spawn_in(req, &caller.scope).await;
    let mut rec = api_record(&caller, "api:spawn", &args, t0, &r);
    (rec.task_id, rec.job_id) = (task, job);
    if let Ok(w) = &r {
        rec.worker_id = Some(w.worker_id.clone());
        rec.node_id = Some(w.node_id.clone());
    }
    append_audit(&app, rec);
    Ok((StatusCode::CREATED, Json(r?)))
}

#[derive(Deserialize)]
pub(super) struct StopQuery {
    pub(super) timeout: Option<u32>,
}

pub(super) async fn stop(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<StopQuery>,
) -> ApiResult<impl IntoResponse> {
    let op = WorkerOp::start(&app, &id);
    let r = app.hub.stop(&id, q.timeout).await;
    op.record(
        &app,
        &caller,
        "api:stop",
        &json!({"timeout": q.timeout}),
        &r,
    );
    Ok(Json(r?))
}

#[derive(Deserialize)]
pub(super) struct RemoveQuery {
    #[serde(default)]
    pub(super) force: bool,
}

pub(super) async fn remove(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult<impl IntoResponse> {
    let op = WorkerOp::start(&app, &id);
    let r = app.hub.remove(&id, q.force).await;
    op.record(&app, &caller, "api:remove", &json!({"force": q.force}), &r);
    r?;
    Ok(Json(json!({ "worker_id": id, "removed": true })))
}

/// A record of an operator's call through the API.
pub(super) fn api_record<T>(
    caller: &Caller,
    op: &str,
    args: &serde_json::Value,
    t0: std::time::Instant,
    r: &Result<T, ErrorBody>,
) -> crate::server::audit::AuditRecord {
    let mut rec = crate::server::audit::AuditRecord::new(&caller.name, op);
    if let crate::server::OrgScope::Org(o) = &caller.scope {
        rec.org = Some(o.clone());
    }
    rec.args_digest = crate::server::audit::digest(args);
    rec.duration_ms = t0.elapsed().as_millis() as u64;
    rec.outcome = outcome(r.as_ref().err());
    rec
}

/// An audit record's outcome: `ok`, or the error's code and message.
pub(super) fn outcome(error: Option<&ErrorBody>) -> String {
    error.map_or("ok".into(), |e| format!("{}: {}", e.code, e.message))
}

/// An operation on an existing worker, to be audited once it ends: the
/// worker as the registry knew it before (for its task and node, which a
/// removal forgets) and when it started.
pub(super) struct WorkerOp {
    id: String,
    before: Option<crate::protocol::WorkerInfo>,
    t0: std::time::Instant,
}

impl WorkerOp {
    pub(super) fn start(app: &AppState, id: &str) -> WorkerOp {
        WorkerOp {
            id: id.to_string(),
            before: app.hub.worker(id).ok(),
            t0: std::time::Instant::now(),
        }
    }

    /// Appends the operation's record to the audit trail; a copy of it.
    pub(super) fn record<T>(
        self,
        app: &AppState,
        caller: &Caller,
        op: &str,
        args: &serde_json::Value,
        r: &Result<T, ErrorBody>,
    ) -> crate::server::audit::AuditRecord {
        let mut rec = api_record(caller, op, args, self.t0, r);
        rec.worker_id = Some(self.id);
        if let Some(w) = self.before {
            (rec.task_id, rec.job_id, rec.node_id) = (w.task_id, w.job_id, Some(w.node_id));
        }
        append_audit(app, rec.clone());
        rec
    }
}

/// Appends to the audit trail from a blocking thread.
pub(super) fn append_audit(app: &AppState, mut rec: crate::server::audit::AuditRecord) {
    if rec.org.is_none() {
        rec.org = rec.node_id.as_deref().and_then(|n| app.hub.node_org(n));
    }
    let (store, rec) = (app.store.clone(), rec.bounded());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.append_audit(&rec) {
            tracing::error!(error = %e, "could not append to the audit trail");
        }
    });
}

pub(super) async fn audit(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(mut f): Query<crate::server::audit::AuditFilter>,
) -> ApiResult<impl IntoResponse> {
    if let crate::server::OrgScope::Org(o) = &caller.scope {
        f.org = Some(o.clone());
    }
    let records = on_store(&app, move |s| {
        let records = s.audit(&f);
        // An organization sees its records from its creation on: one made
        // under the name of a removed one does not read the removed one's.
        let created = f.org.as_deref().and_then(|o| {
            s.organizations()
                .into_iter()
                .find(|org| org.name == o)
                .map(|org| org.created_at)
        });
        Ok(match created {
            Some(at) => crate::server::audit::since(records, &at),
            None => records,
        })
    })
    .await?;
    Ok(Json(json!({ "records": records })))
}

#[derive(Deserialize)]
pub(super) struct PathQuery {
    pub(super) path: String,
}

pub(super) async fn stat(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.stat(&id, &q.path).await?))
}

pub(super) async fn get_archive(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    let op = WorkerOp::start(&app, &id);
    let opened = app.hub.get_archive(&id, &q.path).await;
    op.record(
        &app,
        &caller,
        "api:get_archive",
        &json!({"path": q.path}),
        &opened,
    );
    let stream = opened?;
    // Body pulls from the channel as the client reads: credit follows.
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        match s.next().await? {
            StreamEvent::Data(_, b) => Some((Ok(b), s)),
            // Not asked for: a download never reports its end of data.
            StreamEvent::Eof => Some((Ok(bytes::Bytes::new()), s)),
            StreamEvent::Gap(n) => Some((
                Err(std::io::Error::other(format!(
                    "{n} bytes of the archive were lost"
                ))),
                s,
            )),
            StreamEvent::End { error: Some(e), .. } => {
                Some((Err(std::io::Error::other(e.to_string())), s))
            }
            StreamEvent::End { .. } => None,
        }
    });
    Ok((
        [("content-type", "application/x-tar")],
        Body::from_stream(body),
    )
        .into_response())
}

pub(super) async fn put_archive(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let op = WorkerOp::start(&app, &id);
    let r = put_archive_into(&app, &id, &q.path, body).await;
    op.record(
        &app,
        &caller,
        "api:put_archive",
        &json!({"path": q.path}),
        &r,
    );
    Ok(Json(r?))
}

async fn put_archive_into(
    app: &Arc<AppState>,
    id: &str,
    path: &str,
    body: Body,
) -> Result<serde_json::Value, ErrorBody> {
    let q = PathQuery {
        path: path.to_string(),
    };
    let mut up = app.hub.put_archive(id, &q.path).await?;
    let mut data = body.into_data_stream();
    loop {
        tokio::select! {
            chunk = data.next() => match chunk {
                Some(Ok(b)) => {
                    if up.write(b).await.is_err() {
                        // The channel closed under us: report the agent's reason.
                        let e = up.error().await;
                        return Err(e.unwrap_or_else(|| ErrorBody::new(ErrorCode::Internal, "upload ended early")));
                    }
                }
                Some(Err(e)) => return Err(ErrorBody::new(ErrorCode::InvalidRequest, format!("upload interrupted: {e}"))),
                None => break,
            },
            // The agent may refuse midway (bad archive): stop sending then.
            err = up.error() => {
                return Err(err.unwrap_or_else(|| ErrorBody::new(ErrorCode::Internal, "upload ended early")));
            }
        }
    }
    up.finish().await?;
    Ok(json!({ "worker_id": id, "path": q.path }))
}
