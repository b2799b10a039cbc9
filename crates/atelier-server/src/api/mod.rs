//! The REST API under `/api/v1`, its auth (API tokens; the dashboard's session),
//! error mapping, the OpenAPI document generated from the handlers, and the
//! dashboard's files on every other path.

mod contract;
mod dashboard;
mod dev;
mod events;
mod prebuilds;
pub mod proxy;
pub mod pty;
mod sandboxes;
mod secrets;
mod sessions;
mod system;
mod tasks;
mod workspaces;

use std::sync::Arc;

use atelier_core::ErrorKind;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::OpenApi;

use crate::Error;
use crate::manager::Manager;
use contract::{Constraints, ErrorResponses};

pub use dev::{DevStartBody, DevView};
pub use prebuilds::PrebuildView;
pub use sandboxes::{ExecBody, ExecEventView, SandboxView};
pub use secrets::SecretView;
pub use sessions::{CreatedTokenView, MeView, SessionView, TokenCreateBody, TokenView};
pub use system::StatusView;
pub use tasks::{AnswerView, AttentionView, ChainBody, SayBody, TaskDetail, TaskView, UsageView};
pub use workspaces::WorkspaceView;

/// Shared state of every handler.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The sandbox service.
    pub mgr: Arc<Manager>,
    /// Where Swagger UI's static files are (npm `swagger-ui-dist`), if installed.
    pub swagger_dir: Option<std::path::PathBuf>,
    /// Host-routed proxy to sandboxes and dev commands; None serves only the API.
    pub proxy: Option<Arc<proxy::ProxyState>>,
    /// The local CA's certificate (PEM), when TLS uses it.
    pub ca_pem: Option<Arc<String>>,
    /// The task service.
    pub tasks: Arc<crate::tasks::Tasks>,
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiErrorBody {
    /// Stable code: invalid, unauthorized, forbidden, not_found, conflict, resource_exhausted, unavailable, internal.
    pub code: ErrorKind,
    /// What went wrong and what to do.
    pub message: String,
    /// The request's id (also the `x-request-id` header): the manager log's lines
    /// about this request carry it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// For invalid input, the field that was wrong, named as in the request:
    /// a path into a document such as `repos[1].path` (a form shows the error
    /// there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

tokio::task_local! {
    /// The id of the request being served (set by [`request_id`]).
    static REQUEST_ID: String;
}

/// The id of the request this task serves, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Header carrying the request id both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Gives every request an id (the client's `x-request-id` when it is a short
/// token, else a new one), a tracing span carrying it, and the header on the
/// response.
async fn request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    let span =
        tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = REQUEST_ID
        .scope(
            id.clone(),
            tracing::Instrument::instrument(next.run(req), span),
        )
        .await;
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

fn new_request_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}

/// Replaces every absolute host path in `text` with `<path>`: a last guard on
/// what 5xx bodies may carry (the detail goes to the log instead).
fn scrub_paths(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            let core = word.trim_start_matches(['(', '"', '\'', '`', '[']);
            if core.starts_with('/') && core.len() > 1 && !core.starts_with("//") {
                let lead = &word[..word.len() - core.len()];
                let tail: String = core
                    .chars()
                    .rev()
                    .take_while(|c| {
                        matches!(c, ')' | '"' | '\'' | '`' | ']' | ',' | ';' | ':' | '.')
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("{lead}<path>{tail}")
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An error as the API sends it.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.0.kind;
        let status =
            StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let request_id = current_request_id().unwrap_or_default();
        let field = self.0.field.clone().filter(|_| kind == ErrorKind::Invalid);
        let message = if status.is_server_error() {
            // The whole chain goes to the log (inside the request's span, so the
            // line carries the request id); the client gets no host detail.
            tracing::error!(request_id = %request_id, kind = ?kind, error = %self.0, "request failed");
            if kind == ErrorKind::Internal {
                format!("internal error; the manager log has the cause (request id {request_id})")
            } else {
                scrub_paths(&self.0.message)
            }
        } else {
            self.0.message
        };
        (
            status,
            Json(ApiErrorBody {
                code: kind,
                message,
                request_id,
                field,
            }),
        )
            .into_response()
    }
}

/// Handler result.
pub type ApiResult<T> = Result<T, ApiError>;

/// How a request to `/api/v1` was authenticated (a request extension that
/// `GET /api/v1/me` reports).
#[derive(Clone, Debug)]
pub(crate) enum ApiAuth {
    /// An API token in `Authorization: Bearer`.
    Token(i64),
    /// The dashboard's manager session cookie.
    Session {
        /// The session.
        session: atelier_store::SessionRecord,
        /// Its CSRF token.
        csrf: String,
    },
}

/// A bearer token, or the manager session cookie from the dashboard's own pages
/// (with its CSRF token on writes). Both are read from the store on every
/// request: a revoked token or session fails at once.
async fn require_token(
    State(st): State<AppState>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let auth = match presented {
        Some(t) => match proxy::token_id(&st, t).await {
            Ok(id) => id.map(ApiAuth::Token),
            Err(e) => return ApiError(e).into_response(),
        },
        None => {
            let scheme = proxy::request_scheme(&req);
            match proxy::manager_session(&st, &headers, scheme).await {
                Ok(Some((session, value))) => {
                    let csrf = proxy::csrf_token(&value);
                    if let Err(why) = proxy::api_browser_check(&req, scheme, &csrf) {
                        return ApiError(Error::new(ErrorKind::Forbidden, why)).into_response();
                    }
                    Some(ApiAuth::Session { session, csrf })
                }
                Ok(None) => None,
                Err(e) => return ApiError(e).into_response(),
            }
        }
    };
    let Some(auth) = auth else {
        let message = if presented.is_none() {
            "missing API token: send `Authorization: Bearer <token>` (the CLI reads ATELIER_TOKEN or a token file), or sign in at /login"
        } else {
            "invalid API token (revoked, or never issued)"
        };
        return ApiError(Error::new(ErrorKind::Unauthorized, message)).into_response();
    };
    req.extensions_mut().insert(auth);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn scrub_removes_host_paths_only() {
        assert_eq!(
            super::scrub_paths("cannot open /var/lib/atelier/x.sock: refused (see `/tmp/a`)"),
            "cannot open <path>: refused (see `<path>`)"
        );
        assert_eq!(
            super::scrub_paths("retry with `atelier sandbox start x` at http://h/p"),
            "retry with `atelier sandbox start x` at http://h/p"
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Atelier API", description = "Self-hosted VM sandboxes for AI coding agents."),
    paths(
        sandboxes::list, sandboxes::create, sandboxes::show, sandboxes::delete,
        sandboxes::start, sandboxes::stop, sandboxes::pause, sandboxes::resume, sandboxes::fork, sandboxes::exec, sandboxes::upload,
        sandboxes::download, sandboxes::logs, sandboxes::metrics,
        system::status, system::images, dev::list, dev::start, dev::stop, dev::logs, dev::ca,
        workspaces::list, workspaces::show, workspaces::put, workspaces::delete,
        secrets::list, secrets::put, secrets::delete,
        prebuilds::create, prebuilds::list, prebuilds::show, prebuilds::logs,
        events::events,
        sessions::list_sessions, sessions::revoke_session, sessions::revoke_all_sessions,
        sessions::list_tokens, sessions::create_token, sessions::revoke_token, sessions::me,
        tasks::create, tasks::list, tasks::usage, tasks::show, tasks::start, tasks::retry, tasks::cancel, tasks::done,
        tasks::say, tasks::chain, tasks::diff, tasks::attention, tasks::attention_item, tasks::answer,
        tasks::templates, tasks::template, tasks::put_template, tasks::reset_template,
    ),
    components(schemas(ApiErrorBody, atelier_core::event::Event, atelier_core::event::EventKind)),
    modifiers(&BearerAuth, &ErrorResponses, &Constraints),
    security(("bearer" = []), ("session" = [])),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let comps = openapi.components.get_or_insert_with(Default::default);
        comps.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // The dashboard's session (set by `/login`); writes also need the
        // `X-Atelier-Csrf` header from `GET /api/v1/me`.
        comps.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                proxy::SESSION_COOKIE,
                "The dashboard's session cookie (`__Host-atelier_session` over HTTPS); \
                 state-changing requests must also send `X-Atelier-Csrf` from `GET /api/v1/me`",
            ))),
        );
    }
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/sandboxes", get(sandboxes::list).post(sandboxes::create))
        .route(
            "/sandboxes/{id}",
            get(sandboxes::show).delete(sandboxes::delete),
        )
        .route("/sandboxes/{id}/start", post(sandboxes::start))
        .route("/sandboxes/{id}/stop", post(sandboxes::stop))
        .route("/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/sandboxes/{id}/fork", post(sandboxes::fork))
        .route("/sandboxes/{id}/exec", post(sandboxes::exec))
        .route(
            "/sandboxes/{id}/files",
            get(sandboxes::download).put(sandboxes::upload),
        )
        .route("/sandboxes/{id}/logs", get(sandboxes::logs))
        .route("/sandboxes/{id}/metrics", get(sandboxes::metrics))
        .route("/sandboxes/{id}/pty", get(pty::pty))
        .route("/sandboxes/{id}/dev", get(dev::list).post(dev::start))
        .route(
            "/sandboxes/{id}/dev/{name}",
            axum::routing::delete(dev::stop),
        )
        .route("/sandboxes/{id}/dev/{name}/logs", get(dev::logs))
        .route("/workspaces", get(workspaces::list))
        .route(
            "/workspaces/{name}",
            get(workspaces::show)
                .put(workspaces::put)
                .delete(workspaces::delete),
        )
        .route("/workspaces/{name}/prebuilds", post(prebuilds::create))
        .route("/prebuilds", get(prebuilds::list))
        .route("/prebuilds/{id}", get(prebuilds::show))
        .route("/prebuilds/{id}/logs", get(prebuilds::logs))
        .route("/secrets", get(secrets::list))
        .route(
            "/secrets/{name}",
            axum::routing::put(secrets::put).delete(secrets::delete),
        )
        .route("/me", get(sessions::me))
        .route(
            "/sessions",
            get(sessions::list_sessions).delete(sessions::revoke_all_sessions),
        )
        .route(
            "/sessions/{id}",
            axum::routing::delete(sessions::revoke_session),
        )
        .route(
            "/tokens",
            get(sessions::list_tokens).post(sessions::create_token),
        )
        .route(
            "/tokens/{id}",
            axum::routing::delete(sessions::revoke_token),
        )
        .route("/tasks", get(tasks::list).post(tasks::create))
        .route("/tasks/usage", get(tasks::usage))
        .route("/tasks/{id}", get(tasks::show))
        .route("/tasks/{id}/start", post(tasks::start))
        .route("/tasks/{id}/retry", post(tasks::retry))
        .route("/tasks/{id}/cancel", post(tasks::cancel))
        .route("/tasks/{id}/done", post(tasks::done))
        .route("/tasks/{id}/say", post(tasks::say))
        .route("/tasks/{id}/chain", post(tasks::chain))
        .route("/tasks/{id}/diff", get(tasks::diff))
        .route("/attention", get(tasks::attention))
        .route("/attention/{id}", get(tasks::attention_item))
        .route("/attention/{id}/answer", post(tasks::answer))
        .route("/templates", get(tasks::templates))
        .route(
            "/templates/{name}",
            get(tasks::template)
                .put(tasks::put_template)
                .delete(tasks::reset_template),
        )
        .route("/tls/ca", get(dev::ca))
        .route("/events", get(events::events))
        .route("/status", get(system::status))
        .route("/images", get(system::images))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .nest("/api/v1", v1)
        .route("/api/openapi.json", get(system::openapi_json))
        .route("/api/docs", get(system::docs_page))
        .route("/api/docs/{file}", get(system::docs_asset))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(dashboard::fallback)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            proxy::dispatch,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}
