//! `/api/v1/sessions` and `/api/v1/tokens`: browser sessions (list, revoke) and
//! API tokens (list, create, revoke). Revocation takes effect on the next request:
//! every check reads the store.

use atelier_store::{SessionRecord, TokenRecord};
use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::sandboxes::{ApiJson, rfc3339};
use super::{ApiAuth, ApiErrorBody, ApiResult, AppState};
use crate::Error;
use crate::auth::{generate_token, hash_token};

/// A browser session (never its cookie).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// Id (`ses-…`): what `DELETE /sessions/{id}` takes.
    pub id: String,
    /// `manager` (signed in on the manager's origin; can only open sandbox hosts
    /// through one-time codes) or `proxy` (opens exactly one sandbox host).
    pub kind: String,
    /// The sandbox host a `proxy` session opens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The manager session a `proxy` session was made from (revoked with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The API token that signed in (revoked with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<i64>,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// When it expires (RFC 3339).
    pub expires_at: String,
}

impl From<SessionRecord> for SessionView {
    fn from(r: SessionRecord) -> Self {
        SessionView {
            id: r.id,
            kind: r.kind,
            host: r.host,
            parent_id: r.parent_id,
            token_id: r.token_id,
            created_at: rfc3339(r.created_at),
            expires_at: rfc3339(r.expires_at),
        }
    }
}

/// An API token (never its value).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    /// Id: what `DELETE /tokens/{id}` takes.
    pub id: i64,
    /// Name given at creation.
    pub name: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
}

impl From<TokenRecord> for TokenView {
    fn from(r: TokenRecord) -> Self {
        TokenView {
            id: r.id,
            name: r.name,
            created_at: rfc3339(r.created_at),
        }
    }
}

/// `POST /tokens`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreateBody {
    /// A name to recognise it by (like a sandbox name).
    pub name: String,
}

/// A new token: the only time its value is shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedTokenView {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// The token itself; only its hash is stored.
    pub token: String,
}

/// List unexpired browser sessions.
#[utoipa::path(get, path = "/api/v1/sessions", tag = "auth",
    responses((status = 200, body = [SessionView])))]
pub async fn list_sessions(State(st): State<AppState>) -> ApiResult<Json<Vec<SessionView>>> {
    let items = st
        .mgr
        .store()
        .browser_sessions()
        .await
        .map_err(Error::from)?;
    Ok(Json(items.into_iter().map(SessionView::from).collect()))
}

/// Revoke a browser session (and, for a manager session, every sandbox session made
/// from it); refused on the very next request.
#[utoipa::path(delete, path = "/api/v1/sessions/{id}", tag = "auth",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 204), (status = 404, body = ApiErrorBody)))]
pub async fn revoke_session(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let n = st
        .mgr
        .store()
        .revoke_browser_session(&id)
        .await
        .map_err(Error::from)?;
    if n == 0 {
        return Err(
            Error::not_found(format!("no session {id} (see `atelier session list`)")).into(),
        );
    }
    Ok(StatusCode::NO_CONTENT)
}

/// How many sessions a revocation removed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevokedView {
    /// Sessions removed.
    pub revoked: u64,
}

/// Revoke every browser session: every browser must sign in again.
#[utoipa::path(delete, path = "/api/v1/sessions", tag = "auth",
    responses((status = 200, body = RevokedView)))]
pub async fn revoke_all_sessions(State(st): State<AppState>) -> ApiResult<Json<RevokedView>> {
    let revoked = st
        .mgr
        .store()
        .revoke_all_browser_sessions()
        .await
        .map_err(Error::from)?;
    Ok(Json(RevokedView { revoked }))
}

/// List API tokens (names and ids, never values).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "auth",
    responses((status = 200, body = [TokenView])))]
pub async fn list_tokens(State(st): State<AppState>) -> ApiResult<Json<Vec<TokenView>>> {
    let items = st.mgr.store().tokens().await.map_err(Error::from)?;
    Ok(Json(items.into_iter().map(TokenView::from).collect()))
}

/// Create an API token; its value is in this response only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "auth",
    request_body = TokenCreateBody,
    responses((status = 201, body = CreatedTokenView), (status = 400, body = ApiErrorBody)))]
pub async fn create_token(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<TokenCreateBody>,
) -> ApiResult<(StatusCode, Json<CreatedTokenView>)> {
    atelier_core::validate_name(&body.name)
        .map_err(|e| Error::invalid(format!("token name {:?}: {e}", body.name)))?;
    let token = generate_token();
    let id = st
        .mgr
        .store()
        .create_token(&body.name, &hash_token(&token))
        .await
        .map_err(Error::from)?;
    tracing::info!(token_id = id, name = %body.name, "API token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedTokenView {
            id,
            name: body.name,
            token,
        }),
    ))
}

/// Revoke an API token and every browser session it signed in; requests with it
/// fail from the next one on.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "auth",
    params(("id" = i64, Path, description = "Token id")),
    responses((status = 204), (status = 404, body = ApiErrorBody)))]
pub async fn revoke_token(
    State(st): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<StatusCode> {
    if !st.mgr.store().revoke_token(id).await.map_err(Error::from)? {
        return Err(Error::not_found(format!("no token {id} (see `atelier token list`)")).into());
    }
    tracing::info!(token_id = id, "API token revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Who is asking: how this request was authenticated, and for the dashboard's
/// session the CSRF token its state-changing requests must carry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MeView {
    /// `token` (an API token in `Authorization`) or `session` (the dashboard's
    /// session cookie).
    pub via: String,
    /// The API token's id (for a session: the token that signed in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<i64>,
    /// The session's id (`ses-…`), for `via: session`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// What to send in `X-Atelier-Csrf` on every request but GET and HEAD, for
    /// `via: session`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf: Option<String>,
    /// When the session expires (RFC 3339), for `via: session`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// How this request was authenticated; the dashboard reads its CSRF token here.
#[utoipa::path(get, path = "/api/v1/me", tag = "auth",
    responses((status = 200, body = MeView), (status = 401, body = ApiErrorBody)))]
pub async fn me(Extension(auth): Extension<ApiAuth>) -> Json<MeView> {
    Json(match auth {
        ApiAuth::Token(id) => MeView {
            via: "token".into(),
            token_id: Some(id),
            session_id: None,
            csrf: None,
            expires_at: None,
        },
        ApiAuth::Session { session, csrf } => MeView {
            via: "session".into(),
            token_id: session.token_id,
            session_id: Some(session.id),
            csrf: Some(csrf),
            expires_at: Some(rfc3339(session.expires_at)),
        },
    })
}
