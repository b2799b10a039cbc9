//! `/api/v1/workspaces`: workspace definitions (apply, list, show, delete). A
//! definition references secrets by name only; values are never part of it.

use atelier_core::{ValidationError, WorkspaceSpec};
use atelier_store::WorkspaceRecord;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::sandboxes::rfc3339;
use super::{ApiErrorBody, ApiResult, AppState};
use crate::Error;
use crate::manager::Manager;

/// A workspace definition as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkspaceView {
    /// Unique name.
    pub name: String,
    /// 1 when first applied; grows by one with every change.
    pub revision: i64,
    /// Whether this request changed the definition (false for reads and for
    /// re-applying an identical one).
    pub changed: bool,
    /// The definition, with defaults filled in (secrets appear by name only).
    pub spec: WorkspaceSpec,
    /// When first applied (RFC 3339).
    pub created_at: String,
    /// When last changed (RFC 3339).
    pub updated_at: String,
}

impl WorkspaceView {
    fn new(rec: WorkspaceRecord, changed: bool) -> Result<Self, Error> {
        Ok(WorkspaceView {
            spec: Manager::workspace_spec(&rec)?,
            name: rec.name,
            revision: rec.revision,
            changed,
            created_at: rfc3339(rec.created_at),
            updated_at: rfc3339(rec.updated_at),
        })
    }
}

fn is_yaml(headers: &HeaderMap) -> bool {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    matches!(
        essence.to_ascii_lowercase().as_str(),
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml"
    )
}

/// Parses a body as YAML (`Content-Type: application/yaml`) or JSON (otherwise).
fn parse_spec(headers: &HeaderMap, body: &[u8]) -> Result<WorkspaceSpec, Error> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Error::invalid("the workspace document is not UTF-8 text"))?;
    if is_yaml(headers) {
        return Ok(WorkspaceSpec::from_yaml(text)?);
    }
    let spec: WorkspaceSpec = serde_json::from_str(text).map_err(|e| {
        ValidationError::new(
            "workspace document",
            format!("{e} (send YAML with Content-Type: application/yaml)"),
        )
    })?;
    spec.validate()?;
    Ok(spec)
}

/// Create or update a workspace definition. The body is the definition as JSON, or
/// as YAML with `Content-Type: application/yaml`; its `name` must match the path.
/// Every secret it references must exist.
#[utoipa::path(put, path = "/api/v1/workspaces/{name}", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name")),
    request_body(content((WorkspaceSpec = "application/json"), (String = "application/yaml")),
                 description = "The workspace definition"),
    responses((status = 200, body = WorkspaceView), (status = 400, body = ApiErrorBody)))]
pub async fn put(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<WorkspaceView>> {
    let spec = parse_spec(&headers, &body)?;
    if spec.name != name {
        return Err(Error::invalid(format!(
            "invalid name: the document names workspace {:?} but the URL names {name:?}",
            spec.name
        ))
        .into());
    }
    let (rec, changed) = st.mgr.apply_workspace(spec).await?;
    Ok(Json(WorkspaceView::new(rec, changed)?))
}

/// List workspace definitions.
#[utoipa::path(get, path = "/api/v1/workspaces", tag = "workspaces",
    responses((status = 200, body = [WorkspaceView])))]
pub async fn list(State(st): State<AppState>) -> ApiResult<Json<Vec<WorkspaceView>>> {
    let items = st
        .mgr
        .workspaces()
        .await?
        .into_iter()
        .map(|r| WorkspaceView::new(r, false))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(items))
}

/// Show one workspace definition.
#[utoipa::path(get, path = "/api/v1/workspaces/{name}", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name")),
    responses((status = 200, body = WorkspaceView), (status = 404, body = ApiErrorBody)))]
pub async fn show(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<WorkspaceView>> {
    let rec = st.mgr.workspace(&name).await?;
    Ok(Json(WorkspaceView::new(rec, false)?))
}

/// Delete a workspace definition (its secrets stay).
#[utoipa::path(delete, path = "/api/v1/workspaces/{name}", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name")),
    responses((status = 204), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn delete(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<axum::http::StatusCode> {
    st.mgr.delete_workspace(&name).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
