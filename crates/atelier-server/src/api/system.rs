//! `/api/v1/status`, `/api/v1/images`, the OpenAPI document and Swagger UI.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiResult, AppState};
use crate::Error;

/// Manager health and what it runs on.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    /// Manager version.
    pub version: String,
    /// Accelerator in use (`kvm`, `tcg`), or `undecided` before the first boot.
    pub accel: String,
    /// Why that accelerator.
    pub accel_reason: Option<String>,
    /// Hypervisor backend.
    pub hypervisor: String,
    /// QEMU's version line.
    pub qemu_version: String,
    /// Storage backend (`reflink` or `qcow2`).
    pub storage_backend: String,
    /// Free bytes in the storage pool.
    pub storage_free_bytes: u64,
    /// Live sandboxes per state.
    pub sandboxes: BTreeMap<String, usize>,
    /// Names of built images.
    pub images: Vec<String>,
    /// Memory-snapshot templates ready for fast spawns (`<image hash>-<MiB>m-<vCPUs>c-<accel>`).
    pub templates: Vec<String>,
    /// Seconds since the manager started.
    pub uptime_secs: u64,
    /// Data directory.
    pub data_dir: String,
}

/// Manager health, accelerator, storage and counts.
#[utoipa::path(get, path = "/api/v1/status", tag = "system", responses((status = 200, body = StatusView)))]
pub async fn status(State(st): State<AppState>) -> ApiResult<Json<StatusView>> {
    let mgr = &st.mgr;
    let counts = mgr.counts().await?;
    let images = atelier_image::list(&mgr.config().images_dir())
        .map_err(|e| Error::internal(e.to_string()))?
        .into_iter()
        .map(|i| i.manifest.name)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let accel = mgr.accel_if_known();
    Ok(Json(StatusView {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        accel: accel
            .map(|a| a.accel.as_str().to_owned())
            .unwrap_or_else(|| "undecided".into()),
        accel_reason: accel.map(|a| a.reason.clone()),
        hypervisor: "qemu".into(),
        qemu_version: mgr.qemu_version().to_owned(),
        storage_backend: mgr.pool().backend().as_str().to_owned(),
        storage_free_bytes: mgr.pool().space().map(|(f, _)| f).unwrap_or(0),
        sandboxes: counts
            .into_iter()
            .map(|(k, v)| (k.as_str().to_owned(), v))
            .collect(),
        images,
        templates: mgr.template_keys(),
        uptime_secs: mgr.uptime().as_secs(),
        data_dir: mgr.config().data_dir.display().to_string(),
    }))
}

/// A built image.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageView {
    /// Name (recipe).
    pub name: String,
    /// Content hash (12 hex).
    pub hash: String,
    /// Guest kernel release.
    pub kernel: String,
    /// Root filesystem image size in bytes.
    pub rootfs_bytes: u64,
    /// When it was built.
    pub created: String,
}

/// Built images, newest first.
#[utoipa::path(get, path = "/api/v1/images", tag = "system", responses((status = 200, body = [ImageView])))]
pub async fn images(State(st): State<AppState>) -> ApiResult<Json<Vec<ImageView>>> {
    let list = atelier_image::list(&st.mgr.config().images_dir())
        .map_err(|e| Error::internal(e.to_string()))?;
    Ok(Json(
        list.into_iter()
            .map(|i| ImageView {
                name: i.manifest.name,
                hash: i.manifest.hash,
                kernel: i.manifest.kernel_release,
                rootfs_bytes: i.manifest.rootfs_size_bytes,
                created: i.manifest.created,
            })
            .collect(),
    ))
}

/// The OpenAPI document.
pub async fn openapi_json() -> Response {
    Json(super::openapi()).into_response()
}

/// Swagger UI over the OpenAPI document, served from npm's `swagger-ui-dist`.
pub async fn docs_page(State(st): State<AppState>) -> Html<String> {
    if st
        .swagger_dir
        .as_ref()
        .is_none_or(|d| !d.join("swagger-ui-bundle.js").exists())
    {
        return Html(
            "<!doctype html><title>Atelier API</title><p>Swagger UI is not installed. \
             The OpenAPI document is at <a href=\"/api/openapi.json\">/api/openapi.json</a>. \
             Install the UI with <code>scripts/install.sh</code> (npm package swagger-ui-dist)."
                .into(),
        );
    }
    Html(
        r##"<!doctype html><html><head><meta charset="utf-8"><title>Atelier API</title>
<link rel="stylesheet" href="/api/docs/swagger-ui.css"></head><body><div id="ui"></div>
<script src="/api/docs/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/api/openapi.json", dom_id: "#ui"});</script></body></html>"##
            .into(),
    )
}

/// Swagger UI's static files (a fixed allow-list; no path from the client reaches the disk).
pub async fn docs_asset(
    State(st): State<AppState>,
    Path(file): Path<String>,
) -> ApiResult<Response> {
    let ctype = match file.as_str() {
        "swagger-ui.css" => "text/css",
        "swagger-ui-bundle.js" => "application/javascript",
        _ => return Err(Error::not_found(format!("no docs asset {file:?}")).into()),
    };
    let dir = st
        .swagger_dir
        .as_ref()
        .ok_or_else(|| Error::not_found("swagger ui is not installed"))?;
    let bytes = tokio::fs::read(dir.join(&file))
        .await
        .map_err(|_| Error::not_found(format!("swagger ui asset {file} is missing")))?;
    Ok(([(header::CONTENT_TYPE, ctype)], bytes).into_response())
}
