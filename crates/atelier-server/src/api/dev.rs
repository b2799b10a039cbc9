//! `/api/v1/sandboxes/{id}/dev`: dev commands the guest agent supervises, and
//! `/api/v1/tls/ca`: the local CA users add to their trust store.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::sandboxes::{ApiJson, ApiQuery};
use super::{ApiResult, AppState};
use crate::Error;
use atelier_agent_proto::{DevSpec, DevState, DevStatus, RestartPolicy};
use atelier_core::SandboxId;

/// Body of a dev command start.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevStartBody {
    /// Name: 1-30 of a-z, 0-9 and '-', starting with a letter; the URL is
    /// `dev-{name}-{sandbox id}.DOMAIN`.
    pub name: String,
    /// Shell command line (`/bin/sh -c`): 1 byte to 16 KiB, not blank, no NUL.
    pub command: String,
    /// TCP port it serves on (the proxy routes to it once it listens).
    #[serde(default)]
    pub port: Option<u16>,
    /// Working directory in the guest (absolute).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment (values are never logged or shown).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Restart policy: `always`, `on-failure` (default) or `never`.
    #[serde(default)]
    pub restart: Option<String>,
}

/// A dev command as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DevView {
    /// Name.
    pub name: String,
    /// Command line.
    pub command: String,
    /// Port it serves on.
    pub port: Option<u16>,
    /// `starting`, `running`, `restarting`, `exited`, `stopped` or `failed`.
    pub state: String,
    /// Pid of its shell in the guest.
    pub pid: Option<u32>,
    /// Restarts by policy so far.
    pub restarts: u32,
    /// Exit code of the last run (minus the signal number when killed).
    pub last_exit: Option<i32>,
    /// Whether its port listens (then the proxy routes to it).
    pub listening: bool,
    /// Seconds the current run has been up.
    pub uptime_secs: u64,
    /// Its URL through the proxy, when it has a port.
    pub url: Option<String>,
}

fn state_name(s: DevState) -> &'static str {
    match s {
        DevState::Starting => "starting",
        DevState::Running => "running",
        DevState::Restarting => "restarting",
        DevState::Exited => "exited",
        DevState::Stopped => "stopped",
        DevState::Failed => "failed",
    }
}

fn view(st: &AppState, id: &SandboxId, s: DevStatus) -> DevView {
    DevView {
        url: s.port.and_then(|_| st.mgr.dev_url(id, &s.name)),
        state: state_name(s.state).to_owned(),
        name: s.name,
        command: s.command,
        port: s.port,
        pid: s.pid,
        restarts: s.restarts,
        last_exit: s.last_exit,
        listening: s.listening,
        uptime_secs: s.uptime_secs,
    }
}

/// List a sandbox's dev commands.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/dev", tag = "dev",
    params(("id" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = [DevView]), (status = 404, body = super::ApiErrorBody), (status = 409, body = super::ApiErrorBody), (status = 503, body = super::ApiErrorBody)))]
pub async fn list(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<DevView>>> {
    let rec = st.mgr.get(&id).await?;
    let items = st.mgr.dev_list(&id).await?;
    Ok(Json(
        items.into_iter().map(|s| view(&st, &rec.id, s)).collect(),
    ))
}

/// Start (or replace) a dev command; it runs again after restarts until stopped.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/dev", tag = "dev",
    params(("id" = String, Path, description = "Sandbox id or name")),
    request_body = DevStartBody,
    responses((status = 201, body = DevView), (status = 400, body = super::ApiErrorBody), (status = 404, body = super::ApiErrorBody),
              (status = 409, body = super::ApiErrorBody), (status = 503, body = super::ApiErrorBody)))]
pub async fn start(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DevStartBody>,
) -> ApiResult<(StatusCode, Json<DevView>)> {
    let restart = match body.restart.as_deref() {
        None | Some("on-failure") => RestartPolicy::OnFailure,
        Some("always") => RestartPolicy::Always,
        Some("never") => RestartPolicy::Never,
        Some(other) => {
            return Err(Error::invalid(format!(
                "restart {other:?}: use always, on-failure or never"
            ))
            .into());
        }
    };
    let spec = DevSpec {
        name: body.name,
        command: body.command,
        cwd: body.cwd,
        env: body.env.into_iter().collect(),
        port: body.port,
        restart,
    };
    let rec = st.mgr.get(&id).await?;
    let s = st.mgr.dev_start(&id, spec).await?;
    Ok((StatusCode::CREATED, Json(view(&st, &rec.id, s))))
}

/// Stop a dev command (its route goes away; its logs stay readable).
#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}/dev/{name}", tag = "dev",
    params(("id" = String, Path, description = "Sandbox id or name"),
           ("name" = String, Path, description = "Dev command name")),
    responses((status = 200, body = DevView), (status = 404, body = super::ApiErrorBody), (status = 409, body = super::ApiErrorBody),
              (status = 503, body = super::ApiErrorBody)))]
pub async fn stop(
    State(st): State<AppState>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<Json<DevView>> {
    let rec = st.mgr.get(&id).await?;
    let s = st.mgr.dev_stop(&id, &name).await?;
    Ok(Json(view(&st, &rec.id, s)))
}

/// `?follow=&tail=` for dev logs.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Keep streaming new output (default false).
    #[serde(default)]
    pub follow: bool,
    /// Bytes of existing log to send first (default 64 KiB).
    #[serde(default)]
    pub tail: Option<u64>,
}

/// A dev command's output (stdout and stderr), streamed.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/dev/{name}/logs", tag = "dev",
    params(("id" = String, Path, description = "Sandbox id or name"),
           ("name" = String, Path, description = "Dev command name"), LogsQuery),
    responses((status = 200, content_type = "text/plain", body = String),
              (status = 400, body = super::ApiErrorBody), (status = 404, body = super::ApiErrorBody), (status = 409, body = super::ApiErrorBody), (status = 503, body = super::ApiErrorBody)))]
pub async fn logs(
    State(st): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> ApiResult<Response> {
    let (_rec, agent) = st.mgr.agent(&id).await?;
    crate::dev::no_such_name(&name)?;
    let mut stream = agent
        .dev_logs(&name, q.follow, q.tail.unwrap_or(64 * 1024))
        .await
        .map_err(crate::Manager::agent_error)?;
    // The first item carries an unknown-name error; answer it as a status.
    let first = match stream.next().await {
        Some(Err(e)) => return Err(crate::Manager::agent_error(e).into()),
        other => other,
    };
    let body = futures::stream::iter(first)
        .chain(stream)
        .map(|r| r.map_err(|e| std::io::Error::other(e.to_string())));
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response())
}

/// The local certificate authority's certificate (PEM), to add to a trust store.
#[utoipa::path(get, path = "/api/v1/tls/ca", tag = "system",
    responses((status = 200, content_type = "application/x-pem-file", body = String),
              (status = 404, body = super::ApiErrorBody)))]
pub async fn ca(State(st): State<AppState>) -> ApiResult<Response> {
    match &st.ca_pem {
        Some(pem) => Ok((
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            pem.as_str().to_owned(),
        )
            .into_response()),
        None => Err(Error::not_found(
            "no local CA: TLS is off, or certificates come from ACME or files",
        )
        .into()),
    }
}
