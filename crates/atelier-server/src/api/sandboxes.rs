//! `/api/v1/sandboxes`: create, list, show, start, stop, delete, exec (streamed
//! NDJSON), files (streamed bodies), console logs and metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use atelier_agent_proto::{ExecEvent, ExecRequest};
use atelier_core::{SandboxSpec, SandboxState};
use atelier_store::SandboxRecord;
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiErrorBody, ApiResult, AppState};
use crate::Error;
use crate::manager::{AgentHealth, Manager};

/// JSON body extractor whose rejections are API errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| ApiJson(v))
            .map_err(|e: JsonRejection| {
                ApiError(Error::invalid(format!(
                    "bad request body: {}",
                    e.body_text()
                )))
            })
    }
}

/// Query extractor whose rejections are API errors.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e: QueryRejection| {
                ApiError(Error::invalid(format!("bad query: {}", e.body_text())))
            })
    }
}

pub(super) fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A sandbox as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SandboxView {
    /// Id (`sb-` and 10 characters).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Image it was made from.
    pub image: String,
    /// Current state.
    pub state: SandboxState,
    /// The operation in flight (`create`, `start`, `resume`, `fork`, `pause`,
    /// `stop`, `delete`), if any.
    #[serde(default)]
    pub operation: Option<atelier_core::SandboxOp>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Milliseconds from request to agent ready, for the last boot.
    pub boot_ms: Option<i64>,
    /// Why it failed, for failed sandboxes; for a stopped one, what a forced stop
    /// had to do (a hung guest or QEMU).
    pub error: Option<String>,
    /// Agent health for running sandboxes: `ready` or `unresponsive`.
    pub agent: Option<String>,
    /// Why the agent is not ready, when known: its connection was closed (e.g. for a
    /// protocol violation by the guest) and the manager is reconnecting, or gave up
    /// (then stop and start the sandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_detail: Option<String>,
    /// How many times the guest agent restarted since this manager connected.
    pub agent_restarts: Option<u64>,
    /// How the running VM came up: `snapshot` (restored from a memory snapshot) or `boot`.
    pub booted_from: Option<String>,
    /// Host folders shared into the guest.
    pub mounts: Vec<atelier_core::MountSpec>,
    /// Egress policy (`allow-all`, `deny-all`, or the allowed domains, comma-separated).
    pub egress: String,
    /// The guest's address on the sandbox network, when it has one.
    pub ip: Option<String>,
    /// The sandbox's own URL through the proxy (`https://sandbox-{id}.{domain}/`).
    pub url: Option<String>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last state change (RFC 3339).
    pub updated_at: String,
}

impl SandboxView {
    fn new(mgr: &Manager, r: SandboxRecord) -> Self {
        let health = mgr.agent_health(&r.id);
        SandboxView {
            agent: health.map(|(h, _)| match h {
                AgentHealth::Ready => "ready".to_owned(),
                AgentHealth::Unresponsive => "unresponsive".to_owned(),
            }),
            agent_detail: mgr.agent_detail(&r.id),
            agent_restarts: health.map(|(_, n)| n),
            booted_from: mgr.restored(&r.id).map(|r| {
                if r {
                    "snapshot".to_owned()
                } else {
                    "boot".to_owned()
                }
            }),
            id: r.id.to_string(),
            name: r.name,
            image: r.image,
            state: r.state,
            operation: r.operation,
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            boot_ms: r.boot_ms,
            error: r.error,
            mounts: r.mounts,
            ip: mgr.ip_of(&r.id),
            url: mgr.sandbox_url(&r.id),
            egress: r.egress,
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        }
    }
}

/// Body of a create request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Unique name: 1-63 of a-z, 0-9 and '-', starting with a letter.
    pub name: String,
    /// Image name (default `minimal`).
    #[serde(default = "default_image")]
    pub image: String,
    /// vCPUs, 1-8 (default 1).
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Memory in MiB, 512-16384 (default 1024).
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Host folders to share into the guest (virtio-9p).
    #[serde(default)]
    pub mounts: Vec<atelier_core::MountSpec>,
    /// Host user the VM of a sandbox with mounts runs as: the shared folders' owner (absent or root means that owner; another user is refused; never root).
    #[serde(default)]
    pub mount_owner: Option<atelier_core::Owner>,
    /// Boot the kernel even when a memory snapshot of this image could be restored.
    #[serde(default)]
    pub cold_boot: bool,
    /// Egress policy: `"allow-all"` (default), `"deny-all"`, or `{"allow": ["github.com", "*.pypi.org"]}`.
    #[serde(default)]
    pub egress: atelier_core::EgressPolicy,
    /// Spawn from this workspace's newest ready prebuild; its image, vCPUs, memory
    /// and egress policy replace the fields above.
    #[serde(default)]
    pub workspace: Option<String>,
}

fn default_image() -> String {
    "minimal".into()
}
fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u32 {
    1024
}

/// `?wait=` for create and start.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait until the agent is ready (default true); false returns at once.
    #[serde(default = "yes")]
    pub wait: bool,
}

fn yes() -> bool {
    true
}

/// List live sandboxes.
#[utoipa::path(get, path = "/api/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, body = [SandboxView])))]
pub async fn list(State(st): State<AppState>) -> ApiResult<Json<Vec<SandboxView>>> {
    let rows = st
        .mgr
        .store()
        .list_sandboxes(false)
        .await
        .map_err(Error::from)?;
    Ok(Json(
        rows.into_iter()
            .map(|r| SandboxView::new(&st.mgr, r))
            .collect(),
    ))
}

/// Create a sandbox and (by default) wait until its agent answers.
#[utoipa::path(post, path = "/api/v1/sandboxes", tag = "sandboxes", params(WaitQuery),
    request_body = CreateBody,
    responses((status = 201, body = SandboxView), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
              (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody), (status = 507, body = ApiErrorBody)))]
pub async fn create(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<WaitQuery>,
    ApiJson(body): ApiJson<CreateBody>,
) -> ApiResult<(StatusCode, Json<SandboxView>)> {
    let spec = SandboxSpec {
        name: body.name,
        image: body.image,
        vcpus: body.vcpus,
        memory_mib: body.memory_mib,
        mounts: body.mounts,
        mount_owner: body.mount_owner,
        cold_boot: body.cold_boot,
        egress: body.egress,
        workspace: body.workspace,
    };
    let rec = st.mgr.create(spec, q.wait).await?;
    Ok((StatusCode::CREATED, Json(SandboxView::new(&st.mgr, rec))))
}

/// Show one sandbox, by id or name.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = SandboxView), (status = 404, body = ApiErrorBody)))]
pub async fn show(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxView>> {
    let rec = st.mgr.get(&id).await?;
    Ok(Json(SandboxView::new(&st.mgr, rec)))
}

/// Delete a sandbox in any state, reclaiming everything it holds.
#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = SandboxView), (status = 404, body = ApiErrorBody),
              (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub async fn delete(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxView>> {
    let rec = st.mgr.delete(&id).await?;
    Ok(Json(SandboxView::new(&st.mgr, rec)))
}

/// Boot a stopped or failed sandbox.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/start", tag = "sandboxes", params(
    ("id" = String, Path, description = "Sandbox id or name"), WaitQuery),
    responses((status = 200, body = SandboxView), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody),
              (status = 503, body = ApiErrorBody), (status = 507, body = ApiErrorBody)))]
pub async fn start(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> ApiResult<Json<SandboxView>> {
    let rec = st.mgr.start(&id, q.wait).await?;
    Ok(Json(SandboxView::new(&st.mgr, rec)))
}

/// Stop a running sandbox (its disk is kept).
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/stop", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = SandboxView), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub async fn stop(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxView>> {
    let rec = st.mgr.stop(&id).await?;
    Ok(Json(SandboxView::new(&st.mgr, rec)))
}

/// Pause a running sandbox: memory and device state go to disk, host RAM is freed.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/pause", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = SandboxView), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody),
              (status = 503, body = ApiErrorBody), (status = 507, body = ApiErrorBody)))]
pub async fn pause(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxView>> {
    let rec = st.mgr.pause(&id).await?;
    Ok(Json(SandboxView::new(&st.mgr, rec)))
}

/// Resume a paused sandbox where it was.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/resume", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = SandboxView), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody),
              (status = 503, body = ApiErrorBody), (status = 507, body = ApiErrorBody)))]
pub async fn resume(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxView>> {
    let rec = st.mgr.resume(&id).await?;
    Ok(Json(SandboxView::new(&st.mgr, rec)))
}

/// Body of a fork request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// Name of the new sandbox.
    pub name: String,
}

/// Fork a running sandbox into a new one that continues from the same memory,
/// processes and disk (the source pauses only for the copy).
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/fork", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name")), request_body = ForkBody,
    responses((status = 201, body = SandboxView), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
              (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody), (status = 507, body = ApiErrorBody)))]
pub async fn fork(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ForkBody>,
) -> ApiResult<(StatusCode, Json<SandboxView>)> {
    let rec = st.mgr.fork(&id, &body.name).await?;
    Ok((StatusCode::CREATED, Json(SandboxView::new(&st.mgr, rec))))
}

/// Body of an exec request.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments (no shell; use `["sh","-c","..."]` for one); the
    /// program must not be empty.
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest (default `/root`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the command (and its process group) after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Standard input, base64; stdin is /dev/null when absent.
    #[serde(default)]
    pub stdin: Option<String>,
}

/// One line of an exec response stream (NDJSON).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEventView {
    /// The process started.
    Started {
        /// Guest pid.
        pid: u32,
    },
    /// Output on stdout (base64).
    Stdout {
        /// Base64 bytes.
        data: String,
    },
    /// Output on stderr (base64).
    Stderr {
        /// Base64 bytes.
        data: String,
    },
    /// The process ended; always the last line unless an error line comes instead.
    Exit {
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
        /// Killed because of `timeout_secs`.
        timed_out: bool,
    },
    /// The stream broke (e.g. the agent restarted); no exit status is known.
    Error {
        /// What happened.
        message: String,
    },
}

/// Most standard input an exec request may carry (decoded).
pub(super) const MAX_STDIN: usize = 64 << 20;

/// Longest guest path a file transfer may name, in bytes.
pub(super) const MAX_GUEST_PATH: usize = 4096;

/// Run a command; the response streams its output as NDJSON lines, in order, as it
/// comes, ending with an `exit` line.
#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/exec", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name")), request_body = ExecBody,
    responses((status = 200, description = "NDJSON stream of ExecEventView", content_type = "application/x-ndjson", body = ExecEventView),
              (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub async fn exec(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> ApiResult<Response> {
    if body.command.is_empty() || body.command[0].is_empty() {
        return Err(Error::invalid("command must name a program").into());
    }
    let stdin = match &body.stdin {
        Some(s) => {
            let data = B64
                .decode(s)
                .map_err(|e| Error::invalid(format!("stdin is not base64: {e}")))?;
            if data.len() > MAX_STDIN {
                return Err(
                    Error::invalid(format!("stdin is over {} MiB", MAX_STDIN >> 20)).into(),
                );
            }
            Some(data)
        }
        None => None,
    };
    let (_rec, agent) = st.mgr.agent(&id).await?;
    let mut req = ExecRequest::new(body.command.clone())
        .cwd(body.cwd.clone().unwrap_or_else(|| "/root".into()));
    for (k, v) in &body.env {
        req = req.env(k, v);
    }
    if let Some(t) = body.timeout_secs {
        req = req.timeout(Duration::from_secs(t));
    }
    if stdin.is_some() {
        req = req.with_stdin();
    }
    let mut handle = agent.exec(req).await.map_err(Manager::agent_error)?;
    if let Some(data) = stdin
        && let Some(mut w) = handle.take_stdin()
    {
        tokio::spawn(async move {
            for chunk in data.chunks(64 << 10) {
                if w.send(chunk).await.is_err() {
                    return;
                }
            }
            let _ = w.close().await;
        });
    }
    // The first event tells whether the command started at all; a missing binary or
    // bad cwd is an error status, not a 200 with an error line.
    let first = match handle.next_event().await {
        Some(Ok(ev)) => Some(ev),
        Some(Err(e)) => return Err(Manager::agent_error(e).into()),
        None => None,
    };
    let stream = futures::stream::unfold((first, Some(handle)), |(first, h)| async move {
        let mut h = h?;
        let next = match first {
            Some(ev) => Ok(ev),
            None => h.next_event().await?,
        };
        let (view, more) = match next {
            Ok(ExecEvent::Started { pid }) => (ExecEventView::Started { pid }, true),
            Ok(ExecEvent::Stdout(d)) => (
                ExecEventView::Stdout {
                    data: B64.encode(d),
                },
                true,
            ),
            Ok(ExecEvent::Stderr(d)) => (
                ExecEventView::Stderr {
                    data: B64.encode(d),
                },
                true,
            ),
            Ok(ExecEvent::Exit {
                code,
                signal,
                timed_out,
            }) => (
                ExecEventView::Exit {
                    code,
                    signal,
                    timed_out,
                },
                false,
            ),
            Err(e) => (
                ExecEventView::Error {
                    message: e.to_string(),
                },
                false,
            ),
        };
        let mut line = serde_json::to_vec(&view).unwrap_or_default();
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
            (None, more.then_some(h)),
        ))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `?path=` (and `mode=` for uploads) for file transfers.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Absolute path in the guest.
    pub path: String,
    /// Octal mode for uploads (default 644).
    #[serde(default)]
    pub mode: Option<String>,
}

fn check_guest_path(p: &str) -> Result<(), Error> {
    if !p.starts_with('/') || p.len() > MAX_GUEST_PATH || p.contains('\0') {
        return Err(Error::invalid(format!(
            "path {p:?} must be absolute, without NUL, and at most {MAX_GUEST_PATH} bytes"
        )));
    }
    Ok(())
}

/// An upload's `mode`: 1 to 4 octal digits (so at most 0o7777), as the schema says;
/// `from_str_radix` alone would also take "+644" and any number of leading zeros.
fn parse_mode(m: &str) -> Result<u32, Error> {
    Some(m)
        .filter(|m| (1..=4).contains(&m.len()) && m.bytes().all(|b| (b'0'..=b'7').contains(&b)))
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .ok_or_else(|| {
            Error::invalid(format!(
                "mode {m:?} is not an octal file mode: write 1 to 4 digits 0-7, such as 644"
            ))
        })
}

/// Upload a file into the sandbox; the body is streamed.
#[utoipa::path(put, path = "/api/v1/sandboxes/{id}/files", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name"), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "Bytes written", body = serde_json::Value),
              (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub async fn upload(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    check_guest_path(&q.path)?;
    let mode = match &q.mode {
        Some(m) => parse_mode(m)?,
        None => 0o644,
    };
    let (_rec, agent) = st.mgr.agent(&id).await?;
    let stream = body
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other));
    let reader = tokio_util::io::StreamReader::new(stream);
    let size = agent
        .write_file(&q.path, mode, reader)
        .await
        .map_err(Manager::agent_error)?;
    Ok(Json(serde_json::json!({ "path": q.path, "bytes": size })))
}

/// Download a file from the sandbox; the response is streamed.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/files", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name"), FileQuery),
    responses((status = 200, description = "File bytes", content_type = "application/octet-stream"),
              (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub async fn download(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> ApiResult<Response> {
    check_guest_path(&q.path)?;
    let (_rec, agent) = st.mgr.agent(&id).await?;
    let stream = agent
        .read_file(&q.path)
        .await
        .map_err(Manager::agent_error)?;
    let body = Body::from_stream(stream.map(|r| r.map_err(std::io::Error::other)));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// `?tail_bytes=` for logs.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only the last N bytes (default 1 MiB).
    #[serde(default)]
    pub tail_bytes: Option<u64>,
}

/// The guest's serial console log (kernel and agent messages), all boots appended.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/logs", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name"), LogsQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ApiErrorBody)))]
pub async fn logs(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> ApiResult<Response> {
    let rec = st.mgr.get(&id).await?;
    let path = st.mgr.sandbox_dir(&rec.id).join("console.log");
    let tail = q.tail_bytes.unwrap_or(1 << 20).min(64 << 20);
    // The log is capped and rotated; its tail may reach into the rotated part.
    let buf = tokio::task::spawn_blocking(move || atelier_vmm::console::read_tail(&path, tail))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], buf).into_response())
}

/// A metrics sample from the guest agent.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/metrics", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = serde_json::Value), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub async fn metrics(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let (_rec, agent) = st.mgr.agent(&id).await?;
    let m = agent.metrics().await.map_err(Manager::agent_error)?;
    Ok(Json(
        serde_json::to_value(m).map_err(|e| Error::internal(e.to_string()))?,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn upload_mode_is_what_the_schema_says() {
        let re = regex::Regex::new(super::super::contract::MODE_PATTERN).unwrap_or_else(|e| {
            panic!("MODE_PATTERN does not compile: {e}");
        });
        for m in [
            "", "0", "7", "644", "0755", "7777", "8", "+644", "00644", "-1", "64 4", "0o644",
        ] {
            assert_eq!(super::parse_mode(m).is_ok(), re.is_match(m), "mode {m:?}");
        }
        assert_eq!(super::parse_mode("0755").ok(), Some(0o755));
    }
}
