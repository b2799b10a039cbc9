//! `/api/v1/secrets`: secret values for workspaces. A value goes in (raw request
//! body) and never comes out: responses carry names and times only.

use atelier_store::SecretRecord;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::sandboxes::rfc3339;
use super::{ApiErrorBody, ApiResult, AppState};

/// A secret as the API shows it: never its value.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SecretView {
    /// Name.
    pub name: String,
    /// When first set (RFC 3339).
    pub created_at: String,
    /// When last set (RFC 3339).
    pub updated_at: String,
}

impl From<SecretRecord> for SecretView {
    fn from(r: SecretRecord) -> Self {
        SecretView {
            name: r.name,
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        }
    }
}

/// Create or replace a secret; the raw request body is the value (at most 64 KiB).
/// It is stored encrypted and is never returned.
#[utoipa::path(put, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name: 1-64 of a-z, 0-9, '.', '_', '-'")),
    request_body(content = [u8], content_type = "application/octet-stream",
                 description = "The value"),
    responses((status = 200, body = SecretView), (status = 400, body = ApiErrorBody)))]
pub async fn put(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<SecretView>> {
    let rec = st.mgr.set_secret(&name, Vec::from(body)).await?;
    Ok(Json(rec.into()))
}

/// List secrets (names and times, never values).
#[utoipa::path(get, path = "/api/v1/secrets", tag = "secrets",
    responses((status = 200, body = [SecretView])))]
pub async fn list(State(st): State<AppState>) -> ApiResult<Json<Vec<SecretView>>> {
    let items = st.mgr.secrets().await?;
    Ok(Json(items.into_iter().map(SecretView::from).collect()))
}

/// Delete a secret; refused (409) while a workspace references it.
#[utoipa::path(delete, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    responses((status = 204), (status = 404, body = ApiErrorBody),
              (status = 409, body = ApiErrorBody)))]
pub async fn delete(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    st.mgr.delete_secret(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
