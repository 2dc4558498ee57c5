//! Worker routes: list, inspect, spawn, stop, remove, stat, archives.

use super::*;

pub(super) async fn workers(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    Json(json!({ "workers": app.hub.workers() }))
}

pub(super) async fn worker(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.inspect(&id).await?))
}

pub(super) async fn spawn(
    State(app): State<Arc<AppState>>,
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
    let w = app.hub.spawn(req).await?;
    Ok((StatusCode::CREATED, Json(w)))
}

#[derive(Deserialize)]
pub(super) struct StopQuery {
    pub(super) timeout: Option<u32>,
}

pub(super) async fn stop(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<StopQuery>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.stop(&id, q.timeout).await?))
}

#[derive(Deserialize)]
pub(super) struct RemoveQuery {
    #[serde(default)]
    pub(super) force: bool,
}

pub(super) async fn remove(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult<impl IntoResponse> {
    app.hub.remove(&id, q.force).await?;
    Ok(Json(json!({ "worker_id": id, "removed": true })))
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
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    let stream = app.hub.get_archive(&id, &q.path).await?;
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
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let mut up = app.hub.put_archive(&id, &q.path).await?;
    let mut data = body.into_data_stream();
    loop {
        tokio::select! {
            chunk = data.next() => match chunk {
                Some(Ok(b)) => {
                    if up.write(b).await.is_err() {
                        // The channel closed under us: report the agent's reason.
                        let e = up.error().await;
                        return Err(e.unwrap_or_else(|| ErrorBody::new(ErrorCode::Internal, "upload ended early")).into());
                    }
                }
                Some(Err(e)) => return Err(ErrorBody::new(ErrorCode::InvalidRequest, format!("upload interrupted: {e}")).into()),
                None => break,
            },
            // The agent may refuse midway (bad archive): stop sending then.
            err = up.error() => {
                return Err(err.unwrap_or_else(|| ErrorBody::new(ErrorCode::Internal, "upload ended early")).into());
            }
        }
    }
    up.finish().await?;
    Ok(Json(json!({ "worker_id": id, "path": q.path })))
}
