//! The dashboard: the Vite build of `web/` (`web/dist`), embedded in the binary
//! at compile time (release builds; debug builds read `web/dist` from disk, so a
//! `npm run build` shows without recompiling), served on the manager's origin.
//!
//! `/assets/*` are content-hashed by Vite and cached for a year; everything else
//! (index.html, the manifest, the service worker) is revalidated on every load
//! (`no-cache` with an ETag). Any other GET path that names no file is a client
//! route and gets index.html.

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use rust_embed::{Embed, EmbeddedFile};

use super::ApiError;
use crate::Error;

/// `web/dist`, produced by `npm --prefix web run build` (scripts/install.sh and
/// scripts/test.sh build it before cargo).
#[derive(Embed)]
#[folder = "../../web/dist"]
#[allow_missing = true]
struct Dist;

/// The policy of every dashboard page: only its own bundled code and styles, its
/// own API, never framed.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; worker-src 'self'; manifest-src 'self'; object-src 'none'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Whether a request path is a dashboard path (everything the API, sign-in and
/// health routes do not own).
fn is_dashboard_path(path: &str) -> bool {
    !(path == "/api" || path.starts_with("/api/") || path.starts_with("/__atelier/"))
}

/// A path inside `dist`: plain segments only (no `..`, no backslashes, no empty
/// segments), so nothing the client sends can name a file outside it.
fn dist_path(path: &str) -> Option<&str> {
    let rel = path.strip_prefix('/')?;
    let ok = rel.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~' | b'@'))
    });
    (ok && !rel.is_empty()).then_some(rel)
}

fn etag(file: &EmbeddedFile) -> String {
    format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]))
}

fn security_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
}

fn serve(name: &str, file: EmbeddedFile, headers: &HeaderMap, method: &Method) -> Response {
    let tag = etag(&file);
    let cache = if name.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let mut r = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else if *method == Method::HEAD {
        StatusCode::OK.into_response()
    } else {
        file.data.into_owned().into_response()
    };
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(file.metadata.mimetype()) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    security_headers(h);
    r
}

const NOT_BUILT: &str = "<!doctype html><meta charset=\"utf-8\"><title>Atelier</title>\
<p>The dashboard is not built into this binary. Build it with \
<code>npm --prefix web ci &amp;&amp; npm --prefix web run build</code>, then rebuild \
<code>atelier</code> (<code>scripts/install.sh</code> does both). The API is at \
<a href=\"/api/docs\">/api/docs</a>.";

/// The router's fallback: dashboard files and client routes; anything else under
/// `/api` is the API's JSON 404.
pub async fn fallback(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path();
    let readable = method == Method::GET || method == Method::HEAD;
    if !readable || !is_dashboard_path(path) {
        return ApiError(Error::not_found(
            "no such route; the API lives under /api/v1 (see /api/docs)",
        ))
        .into_response();
    }
    if let Some(name) = dist_path(path)
        && let Some(file) = Dist::get(name)
    {
        return serve(name, file, &headers, &method);
    }
    // A missing file (a name with an extension, or under assets/) is a 404, not
    // the app: a stale tab asking for an old hashed asset must fail visibly.
    let last = path.rsplit('/').next().unwrap_or_default();
    if path.starts_with("/assets/") || last.contains('.') {
        return ApiError(Error::not_found(format!("no dashboard file {path}"))).into_response();
    }
    match Dist::get("index.html") {
        Some(index) => serve("index.html", index, &headers, &method),
        None => {
            let mut r = (StatusCode::SERVICE_UNAVAILABLE, Html(NOT_BUILT)).into_response();
            security_headers(r.headers_mut());
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_reach_the_dist_folder() {
        assert_eq!(
            dist_path("/assets/index-AbC_1.js"),
            Some("assets/index-AbC_1.js")
        );
        assert_eq!(dist_path("/sw.js"), Some("sw.js"));
        for bad in [
            "/",
            "//x",
            "/../Cargo.toml",
            "/assets/../../x",
            "/a\\b",
            "/a/./b",
            "/a//b",
            "/%2e%2e/x",
            "/a b",
        ] {
            assert_eq!(dist_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_api_and_sign_in_paths_are_not_the_dashboards() {
        assert!(is_dashboard_path("/"));
        assert!(is_dashboard_path("/tasks/t-1"));
        assert!(!is_dashboard_path("/api"));
        assert!(!is_dashboard_path("/api/v1/nope"));
        assert!(!is_dashboard_path("/__atelier/authorize"));
    }
}
