//! `/api/v1/prebuilds`: build, list and follow workspace prebuilds.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::sandboxes::ApiQuery;
use super::{ApiResult, AppState};
use crate::Error;

/// A prebuild as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PrebuildView {
    /// Id (`pb-` and 10 characters).
    pub id: String,
    /// Workspace it belongs to.
    pub workspace: String,
    /// Workspace revision it was built from.
    pub revision: i64,
    /// `building`, `ready`, `stale` (ready, but the workspace or a repo moved on;
    /// still used until its replacement is ready) or `failed`.
    pub status: String,
    /// Commit of each repo, by guest path.
    pub commits: BTreeMap<String, String>,
    /// Bytes on disk (memory file and disk image).
    pub size_bytes: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Build start (ms since epoch).
    pub created_at: i64,
    /// When it became ready (ms since epoch).
    pub ready_at: Option<i64>,
    /// Version of the OpenCode server running warm in its snapshot, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opencode_version: Option<String>,
    /// Guest port of that server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opencode_port: Option<u16>,
}

fn view((p, stale): (atelier_store::PrebuildRecord, bool)) -> PrebuildView {
    PrebuildView {
        status: p.status.shown(stale).to_owned(),
        commits: serde_json::from_str(&p.commits).unwrap_or_default(),
        id: p.id,
        workspace: p.workspace,
        revision: p.revision,
        size_bytes: p.size_bytes,
        error: p.error,
        created_at: p.created_at,
        ready_at: p.ready_at,
        opencode_version: p.opencode.as_ref().map(|o| o.version.clone()),
        opencode_port: p.opencode.as_ref().map(|o| o.port),
    }
}

/// Build a prebuild of a workspace (in the background; follow its log).
#[utoipa::path(post, path = "/api/v1/workspaces/{name}/prebuilds", tag = "prebuilds",
    params(("name" = String, Path, description = "Workspace name")),
    responses((status = 202, body = PrebuildView), (status = 400, body = super::ApiErrorBody), (status = 404, body = super::ApiErrorBody),
              (status = 409, body = super::ApiErrorBody)))]
pub async fn create(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<PrebuildView>)> {
    let p = st.mgr.prebuild_create(&name).await?;
    Ok((StatusCode::ACCEPTED, Json(view((p, false)))))
}

/// `?workspace=` filter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this workspace's prebuilds.
    #[serde(default)]
    pub workspace: Option<String>,
}

/// List prebuilds, newest first.
#[utoipa::path(get, path = "/api/v1/prebuilds", tag = "prebuilds", params(ListQuery),
    responses((status = 200, body = [PrebuildView])))]
pub async fn list(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<Vec<PrebuildView>>> {
    let items = st.mgr.prebuild_list(q.workspace.as_deref()).await?;
    Ok(Json(items.into_iter().map(view).collect()))
}

/// One prebuild.
#[utoipa::path(get, path = "/api/v1/prebuilds/{id}", tag = "prebuilds",
    params(("id" = String, Path, description = "Prebuild id")),
    responses((status = 200, body = PrebuildView), (status = 404, body = super::ApiErrorBody)))]
pub async fn show(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<PrebuildView>> {
    st.mgr
        .prebuild_list(None)
        .await?
        .into_iter()
        .find(|(p, _)| p.id == id)
        .map(|p| Json(view(p)))
        .ok_or_else(|| Error::not_found(format!("prebuild {id} not found")).into())
}

/// `?follow=` for a build log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Keep streaming until the build ends.
    #[serde(default)]
    pub follow: bool,
}

/// A prebuild's build log (clone and init output), streamed while it builds.
#[utoipa::path(get, path = "/api/v1/prebuilds/{id}/logs", tag = "prebuilds",
    params(("id" = String, Path, description = "Prebuild id"), LogQuery),
    responses((status = 200, content_type = "text/plain", body = String),
              (status = 404, body = super::ApiErrorBody)))]
pub async fn logs(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> ApiResult<Response> {
    if st
        .mgr
        .store()
        .prebuild(&id)
        .await
        .map_err(Error::from)?
        .is_none()
        || id.contains('/')
    {
        return Err(Error::not_found(format!("prebuild {id} not found")).into());
    }
    let mgr = st.mgr.clone();
    let stream = async_stream(mgr, id, q.follow);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Reads the log from the start; when following, waits for the build's
/// `prebuild.log`/`prebuild.status` events and reads on, until the build is no
/// longer `building` (then sends what is left).
fn async_stream(
    mgr: std::sync::Arc<crate::Manager>,
    id: String,
    follow: bool,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    use futures::StreamExt;
    // Subscribed before the first read, so no line written after it is missed.
    let events = Box::pin(mgr.events().subscribe(None));
    futures::stream::unfold(
        (0u64, false, events),
        move |(offset, finished, mut events)| {
            let (mgr, id) = (mgr.clone(), id.clone());
            async move {
                if finished {
                    return None;
                }
                loop {
                    let building = matches!(
                        mgr.store().prebuild(&id).await,
                        Ok(Some(p)) if p.status == atelier_core::PrebuildStatus::Building
                    );
                    let data = read_from(&mgr.prebuild_log_path(&id), offset);
                    if !data.is_empty() {
                        let next = offset + data.len() as u64;
                        return Some((Ok(bytes::Bytes::from(data)), (next, false, events)));
                    }
                    if !follow || !building {
                        return None;
                    }
                    // Wake on this build's next line or status change. A lagged or
                    // resync delivery also wakes us (we just read the file again); the
                    // timeout only guards against a missed wake-up.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                        while let Some(d) = events.next().await {
                            match d {
                                crate::events::Delivery::Event(e) => match &e.kind {
                                    atelier_core::event::EventKind::PrebuildLog {
                                        prebuild,
                                        ..
                                    }
                                    | atelier_core::event::EventKind::PrebuildStatus {
                                        prebuild,
                                        ..
                                    } if *prebuild == id => return,
                                    _ => {}
                                },
                                _ => return,
                            }
                        }
                    })
                    .await;
                }
            }
        },
    )
}

fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(1 << 20).read_to_end(&mut buf);
    buf
}
