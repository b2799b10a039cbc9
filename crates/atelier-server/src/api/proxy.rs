//! The proxy side of the listener: requests whose Host is `sandbox-{id}.DOMAIN` or
//! `dev-{name}-{id}.DOMAIN` go to the guest, after auth; everything else is the API.
//!
//! Auth on proxied hosts: an API token (`Authorization: Bearer`) or a session
//! cookie set by `/__atelier/login` (a form asking for a token, served on every
//! proxied host so the cookie is first-party wherever the user lands; the cookie's
//! Domain is the wildcard domain, so one login covers every sandbox). Our
//! credentials are stripped before a request reaches the (untrusted) guest.

use std::net::SocketAddr;

use atelier_core::{ErrorKind, SandboxId};
use atelier_proxy::{ForwardOpts, Forwarder, Route, Scheme, parse_host};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::{ApiError, AppState};
use crate::Error;
use crate::auth::{constant_time_eq, generate_token, hash_token};

/// Session cookie name.
pub const SESSION_COOKIE: &str = "atelier_session";
/// Query parameter that may carry an API token (stripped before forwarding).
pub const TOKEN_PARAM: &str = "atelier_token";
/// Login path on proxied hosts.
pub const LOGIN_PATH: &str = "/__atelier/login";
/// Session lifetime.
const SESSION_DAYS: i64 = 7;

/// Proxy settings shared by the listeners.
#[derive(Clone, Debug)]
pub struct ProxyState {
    /// Wildcard domain.
    pub domain: String,
    /// Guest port `sandbox-{id}` goes to.
    pub sandbox_port: u16,
    /// The forwarding client.
    pub forwarder: Forwarder,
}

impl ProxyState {
    /// Settings for `domain` (lower-cased).
    pub fn new(domain: &str, sandbox_port: u16) -> Self {
        ProxyState {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            sandbox_port,
            forwarder: Forwarder::new(),
        }
    }
}

fn host_of(req: &Request) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// Middleware on the whole app: proxied hosts never reach the API routes.
pub(crate) async fn dispatch(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(proxy) = st.proxy.clone() else {
        return next.run(req).await;
    };
    let scheme = if req.extensions().get::<Tls>().is_some() {
        Scheme::Https
    } else {
        Scheme::Http
    };
    // The login form answers on every host: the manager's own (`/login` too)
    // and every proxied one; the cookie's Domain covers all sandboxes.
    let route = host_of(&req).and_then(|h| parse_host(&h, &proxy.domain));
    let path = req.uri().path();
    if path == LOGIN_PATH || (route.is_none() && path == "/login") {
        return login(&st, &proxy, req, scheme).await;
    }
    let Some(route) = route else {
        return next.run(req).await;
    };
    if !authorized(&st, req.headers(), req.uri().query()).await {
        return unauthorized(&req);
    }
    let (id, port) = match &route {
        Route::Sandbox { id } => (id.clone(), None),
        Route::Dev { id, name } => (id.clone(), Some(name.clone())),
    };
    let Some(sid) = SandboxId::parse(&id) else {
        return not_found(format!("no sandbox {id}"));
    };
    let upstream = match &port {
        None => st.mgr.upstream(&sid, proxy.sandbox_port),
        Some(name) => st.mgr.dev_upstream(&sid, name),
    };
    let Some(upstream) = upstream else {
        return not_found(match port {
            None => format!("sandbox {id} is not running"),
            Some(name) => format!(
                "no dev command {name:?} is listening in sandbox {id} (see `atelier dev list {id}`)"
            ),
        });
    };
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut opts = ForwardOpts::new(client, scheme);
    opts.strip_authorization = true;
    opts.strip_cookie = Some(SESSION_COOKIE.to_owned());
    opts.strip_query_param = Some(TOKEN_PARAM.to_owned());
    proxy.forwarder.forward(req, upstream, &opts).await
}

/// Marks requests that arrived over TLS (set by the HTTPS listener).
#[derive(Clone, Copy, Debug)]
pub struct Tls;

fn not_found(message: String) -> Response {
    ApiError(Error::not_found(message)).into_response()
}

fn token_ok(st: &AppState, token: &str) -> bool {
    let h = hash_token(token.trim());
    st.token_hashes
        .iter()
        .fold(false, |acc, known| acc | constant_time_eq(known, &h))
}

/// A valid API token (header or query) or session cookie.
async fn authorized(st: &AppState, headers: &HeaderMap, query: Option<&str>) -> bool {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        && token_ok(st, t)
    {
        return true;
    }
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some(t) = pair
                .strip_prefix(TOKEN_PARAM)
                .and_then(|r| r.strip_prefix('='))
                && token_ok(st, t)
            {
                return true;
            }
        }
    }
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for c in v.split(';') {
            if let Some(val) = c
                .trim()
                .strip_prefix(SESSION_COOKIE)
                .and_then(|r| r.strip_prefix('='))
                && st
                    .mgr
                    .store()
                    .session_valid(&hash_token(val))
                    .await
                    .unwrap_or(false)
            {
                return true;
            }
        }
    }
    false
}

/// Browsers go to the login form; other clients get a 401.
fn unauthorized(req: &Request) -> Response {
    let wants_html = req.method() == Method::GET
        && req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        let next = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        return Redirect::to(&format!("{LOGIN_PATH}?next={}", urlencode(next))).into_response();
    }
    let mut r = ApiError(Error::new(
        ErrorKind::Unauthorized,
        format!("sign in first: send `Authorization: Bearer <token>` or log in at {LOGIN_PATH}"),
    ))
    .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Bytes kept as they are in a query value (RFC 3986 unreserved, and `/` so a
/// `next=` path stays readable).
const QUERY_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

fn urlencode(s: &str) -> String {
    utf8_percent_encode(s, QUERY_KEEP).to_string()
}

/// Decodes a form value: `+` is a space, `%XX` a byte; malformed escapes stay.
fn urldecode(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn form_value(body: &str, key: &str) -> Option<String> {
    body.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == key).then(|| urldecode(v))
    })
}

/// Only same-site relative paths: never `//host` or a scheme.
fn safe_next(next: Option<String>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/".to_owned(),
    }
}

const LOGIN_FORM: &str = r#"<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>Atelier sign-in</title>
<style>body{font-family:system-ui,sans-serif;max-width:24rem;margin:4rem auto;padding:0 1rem}input,button{font-size:1rem;width:100%;padding:.5rem;margin:.3rem 0;box-sizing:border-box}</style></head>
<body><h1>Atelier</h1><p>This sandbox URL is private. Paste an API token (<code>atelier</code> prints the admin token once; it is also in the data directory's <code>admin-token</code>).</p>
<form method="post"><input type="password" name="token" placeholder="atl_…" autofocus required><input type="hidden" name="next" value="__NEXT__"><button type="submit">Sign in</button></form>__ERROR__</body></html>"#;

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn login(st: &AppState, proxy: &ProxyState, req: Request, scheme: Scheme) -> Response {
    let query_next = req.uri().query().and_then(|q| form_value(q, "next"));
    match *req.method() {
        Method::GET => Html(
            LOGIN_FORM
                .replace("__NEXT__", &html_escape(&safe_next(query_next)))
                .replace("__ERROR__", ""),
        )
        .into_response(),
        Method::POST => {
            let Ok(body) = axum::body::to_bytes(req.into_body(), 16 * 1024).await else {
                return (StatusCode::PAYLOAD_TOO_LARGE, "form too large").into_response();
            };
            let body = String::from_utf8_lossy(&body);
            let next = safe_next(form_value(&body, "next"));
            let token = form_value(&body, "token").unwrap_or_default();
            if !token_ok(st, &token) {
                return (
                    StatusCode::UNAUTHORIZED,
                    Html(LOGIN_FORM.replace("__NEXT__", &html_escape(&next)).replace(
                        "__ERROR__",
                        "<p><strong>That token is not valid.</strong></p>",
                    )),
                )
                    .into_response();
            }
            let session = generate_token();
            let expires = atelier_store::now_ms() + SESSION_DAYS * 86_400_000;
            if let Err(e) = st
                .mgr
                .store()
                .insert_session(&hash_token(&session), expires)
                .await
            {
                return ApiError(e.into()).into_response();
            }
            let secure = if matches!(scheme, Scheme::Https) {
                "; Secure"
            } else {
                ""
            };
            let cookie = format!(
                "{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}; Domain={}{secure}",
                SESSION_DAYS * 86_400,
                proxy.domain
            );
            let mut r = Redirect::to(&next).into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, "use GET or POST").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_kept_on_site() {
        assert_eq!(safe_next(Some("/a?b=1".into())), "/a?b=1");
        assert_eq!(safe_next(Some("//evil.example/".into())), "/");
        assert_eq!(safe_next(Some("https://evil.example/".into())), "/");
        assert_eq!(safe_next(Some("/\\evil".into())), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn form_decoding() {
        assert_eq!(
            form_value("token=atl_x%2By&next=%2Fa%3Fb%3D1", "next").as_deref(),
            Some("/a?b=1")
        );
        assert_eq!(form_value("token=a+b", "token").as_deref(), Some("a b"));
        assert_eq!(form_value("token=%zz", "token").as_deref(), Some("%zz"));
        assert_eq!(urldecode("%"), "%");
        assert_eq!(urldecode("%4"), "%4");
    }
}
