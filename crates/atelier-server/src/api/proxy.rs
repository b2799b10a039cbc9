//! The proxy side of the listener: requests whose Host is `sandbox-{id}.DOMAIN` or
//! `dev-{name}-{id}.DOMAIN` go to the guest, after auth; everything else is the API
//! (and the manager's sign-in pages).
//!
//! Every sandbox host shares one registrable domain with the others and with the
//! manager, and the pages they serve are hostile, so browser auth is per host:
//!
//! - Signing in happens only on the manager's own origin (`/login`), which sets a
//!   host-only `manager` session cookie. That cookie opens the API for the
//!   dashboard's own pages only (same origin, a CSRF token on every write: see
//!   [`api_browser_check`]) and no sandbox: there it can only mint `proxy` sessions.
//! - A sandbox host without a session sends the browser to the manager's
//!   `/__atelier/authorize`, which redirects back to the sandbox host's
//!   `/__atelier/session` with a one-time code (single use, [`CODE_TTL`]). The proxy
//!   exchanges it for a host-only session cookie that opens that host and no other,
//!   and redirects again to drop the code from the URL.
//! - A query token (`?atelier_token=`) is never forwarded: it is answered with a
//!   redirect that drops it and sets the host's session cookie.
//! - Cookie-authenticated requests must come from the host's own pages or be
//!   top-level navigations (Fetch Metadata), WebSockets must carry the host's own
//!   `Origin`, responses may not be framed by other origins, and service worker
//!   scripts are never fetched from the guest.
//!
//! Our credentials are stripped before a request reaches the (untrusted) guest, and
//! an upstream can neither set our session cookie nor send a `Set-Cookie` we cannot
//! parse.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use atelier_core::{ErrorKind, SandboxId};
use atelier_proxy::{ForwardOpts, Forwarder, Route, Scheme, parse_host};
use atelier_store::{NewSession, SessionRecord};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::{ApiError, AppState};
use crate::Error;
use crate::auth::{generate_token, hash_token};

/// Session cookie name over plain HTTP.
pub const SESSION_COOKIE: &str = "atelier_session";
/// Session cookie name over HTTPS: the `__Host-` prefix makes browsers refuse it
/// unless it is Secure, host-only and `Path=/`, so a sibling host cannot plant it.
pub const SECURE_SESSION_COOKIE: &str = "__Host-atelier_session";
/// Query parameter that may carry an API token (answered with a redirect, never
/// forwarded).
pub const TOKEN_PARAM: &str = "atelier_token";
/// Where the manager's origin mints a one-time code for a sandbox host.
pub const AUTHORIZE_PATH: &str = "/__atelier/authorize";
/// Where a sandbox host exchanges a one-time code for its session cookie.
pub const SESSION_PATH: &str = "/__atelier/session";
/// Signs a browser out of one sandbox host (POST).
pub const HOST_LOGOUT_PATH: &str = "/__atelier/logout";
/// The old sign-in path on sandbox hosts: now a redirect to the manager.
pub const LOGIN_PATH: &str = "/__atelier/login";
/// Lifetime of a browser session.
pub const SESSION_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Lifetime of a one-time code.
pub const CODE_TTL: Duration = Duration::from_secs(60);
/// One-time codes waiting to be exchanged, at most.
pub const MAX_PENDING_CODES: usize = 4096;
/// Cookies looked at in one request, at most; the rest are ignored.
pub const MAX_COOKIES_EXAMINED: usize = 64;
/// Session cookie values looked up in the store for one request, at most (a
/// hostile sibling page can plant extra cookies of the same name on the parent
/// domain).
pub const MAX_SESSION_CANDIDATES: usize = 4;
/// Largest sign-in form accepted.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// Longest `next` path kept across the sign-in redirects.
const MAX_NEXT_LEN: usize = 2048;

/// A function from a route to its upstream address.
pub type ResolveFn = dyn Fn(&Route) -> Option<SocketAddr> + Send + Sync;

/// Resolves a route to its upstream instead of the manager (for embedding the
/// proxy without sandboxes, e.g. in tests).
#[derive(Clone)]
pub struct RouteResolver(pub Arc<ResolveFn>);

impl std::fmt::Debug for RouteResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteResolver")
    }
}

/// A one-time code waiting for its sandbox host.
#[derive(Debug)]
struct PendingCode {
    host: String,
    parent: String,
    token_id: Option<i64>,
    expires_at: i64,
    deadline: Instant,
}

/// Proxy settings shared by the listeners.
#[derive(Debug)]
pub struct ProxyState {
    /// Wildcard domain.
    pub domain: String,
    /// Guest port `sandbox-{id}` goes to.
    pub sandbox_port: u16,
    /// The forwarding client.
    pub forwarder: Forwarder,
    /// Overrides the manager's routes when set.
    pub resolver: Option<RouteResolver>,
    /// One-time codes by hash.
    codes: Mutex<HashMap<String, PendingCode>>,
}

impl ProxyState {
    /// Settings for `domain` (lower-cased).
    pub fn new(domain: &str, sandbox_port: u16) -> Self {
        ProxyState {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            sandbox_port,
            forwarder: Forwarder::new(),
            resolver: None,
            codes: Mutex::new(HashMap::new()),
        }
    }

    fn mint_code(&self, pending: PendingCode) -> Result<String, Error> {
        let mut codes = self.codes.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        codes.retain(|_, c| c.deadline > now);
        if codes.len() >= MAX_PENDING_CODES {
            return Err(Error::unavailable(
                "too many sign-ins in progress; try again in a minute",
            ));
        }
        let code = generate_token();
        codes.insert(hash_token(&code), pending);
        Ok(code)
    }

    /// Takes the code (single use) if it is unexpired and meant for `host`.
    fn take_code(&self, code: &str, host: &str) -> Option<PendingCode> {
        let mut codes = self.codes.lock().unwrap_or_else(PoisonError::into_inner);
        let c = codes.remove(&hash_token(code))?;
        (c.deadline > Instant::now() && c.host == host).then_some(c)
    }
}

/// Marks requests that arrived over TLS (set by the HTTPS listener).
#[derive(Clone, Copy, Debug)]
pub struct Tls;

/// HTTPS when the request came through the TLS listener.
pub(crate) fn request_scheme(req: &Request) -> Scheme {
    if req.extensions().get::<Tls>().is_some() {
        Scheme::Https
    } else {
        Scheme::Http
    }
}

fn host_of(req: &Request) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// `:port` of a Host header, or empty.
fn port_suffix(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) && i + 1 < host.len() => {
            &host[i..]
        }
        _ => "",
    }
}

/// The canonical host of a route: lowercase, no port.
fn route_host(route: &Route, domain: &str) -> String {
    match route {
        Route::Sandbox { id } => format!("sandbox-{id}.{domain}"),
        Route::Dev { name, id } => format!("dev-{name}-{id}.{domain}"),
    }
}

fn cookie_name(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Https => SECURE_SESSION_COOKIE,
        Scheme::Http => SESSION_COOKIE,
    }
}

fn scheme_str(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Https => "https",
        Scheme::Http => "http",
    }
}

/// Middleware on the whole app: proxied hosts never reach the API routes.
pub(crate) async fn dispatch(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(proxy) = st.proxy.clone() else {
        return next.run(req).await;
    };
    let scheme = request_scheme(&req);
    let host = host_of(&req).unwrap_or_default();
    let route = parse_host(&host, &proxy.domain);
    let path = req.uri().path();
    let Some(route) = route else {
        return match path {
            "/login" => login(&st, req, scheme).await,
            "/logout" => logout(&st, req, scheme, None).await,
            AUTHORIZE_PATH => authorize(&st, &proxy, req, scheme).await,
            _ => next.run(req).await,
        };
    };
    let canonical = route_host(&route, &proxy.domain);
    match path {
        SESSION_PATH => return exchange_code(&st, &proxy, req, scheme, &canonical).await,
        HOST_LOGOUT_PATH => return logout(&st, req, scheme, Some(&canonical)).await,
        LOGIN_PATH => {
            let next = req
                .uri()
                .query()
                .and_then(|q| form_value(q, "next"))
                .map(|n| safe_next(Some(n)))
                .unwrap_or_else(|| "/".to_owned());
            return redirect_to_manager(&proxy, &host, scheme, &canonical, &next);
        }
        _ => {}
    }
    // A query token is answered, never forwarded.
    if let Some(token) = req.uri().query().and_then(query_token) {
        return token_redirect(&st, req, scheme, &canonical, &token).await;
    }
    let auth = match authenticate(&st, req.headers(), scheme, &canonical).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    match auth {
        None => return unauthorized(&proxy, &req, &host, scheme, &canonical),
        Some(Auth::Bearer) => {}
        Some(Auth::Cookie) => {
            if let Err(why) = browser_request_allowed(req.method(), req.headers(), &host, scheme) {
                return forbidden(why);
            }
        }
    }
    if is_service_worker_script(req.headers()) {
        return forbidden("service worker scripts are not served through sandbox URLs");
    }
    let (id, port) = match &route {
        Route::Sandbox { id } => (id.clone(), None),
        Route::Dev { id, name } => (id.clone(), Some(name.clone())),
    };
    let Some(sid) = SandboxId::parse(&id) else {
        return not_found(format!("no sandbox {id}"));
    };
    let upstream = match &proxy.resolver {
        Some(r) => (r.0)(&route),
        None => match &port {
            None => st.mgr.upstream(&sid, proxy.sandbox_port),
            Some(name) => st.mgr.dev_upstream(&sid, name),
        },
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
    let mut resp = proxy.forwarder.forward(req, upstream, &opts).await;
    frame_protection(resp.headers_mut());
    resp
}

/// How a proxied request proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// An API token in `Authorization`.
    Bearer,
    /// This host's session cookie.
    Cookie,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The id of the API token `token`, if it exists now (revocation is immediate:
/// every check reads the store).
pub(crate) async fn token_id(st: &AppState, token: &str) -> Result<Option<i64>, Error> {
    let token = token.trim();
    if token.is_empty() || token.len() > 256 {
        return Ok(None);
    }
    Ok(st.mgr.store().token_id(&hash_token(token)).await?)
}

/// Values of the session cookies in `headers` (both names), at most
/// [`MAX_SESSION_CANDIDATES`] of them among the first [`MAX_COOKIES_EXAMINED`]
/// cookies.
fn session_cookies(headers: &HeaderMap, scheme: Scheme) -> Vec<String> {
    let names: &[&str] = match scheme {
        Scheme::Https => &[SECURE_SESSION_COOKIE, SESSION_COOKIE],
        Scheme::Http => &[SESSION_COOKIE],
    };
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .take(MAX_COOKIES_EXAMINED)
        .filter_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            names
                .contains(&k.trim())
                .then(|| v.trim().to_owned())
                .filter(|v| !v.is_empty() && v.len() <= 128)
        })
        .take(MAX_SESSION_CANDIDATES)
        .collect()
}

/// The session in `headers` of `kind` (and for proxy sessions, bound to `host`).
async fn find_session(
    st: &AppState,
    headers: &HeaderMap,
    scheme: Scheme,
    kind: &str,
    host: Option<&str>,
) -> Result<Option<SessionRecord>, Error> {
    Ok(find_session_and_value(st, headers, scheme, kind, host)
        .await?
        .map(|(s, _)| s))
}

/// [`find_session`], with the cookie value that opened it.
async fn find_session_and_value(
    st: &AppState,
    headers: &HeaderMap,
    scheme: Scheme,
    kind: &str,
    host: Option<&str>,
) -> Result<Option<(SessionRecord, String)>, Error> {
    for value in session_cookies(headers, scheme) {
        if let Some(s) = st.mgr.store().browser_session(&hash_token(&value)).await?
            && s.kind == kind
            && s.host.as_deref() == host
        {
            return Ok(Some((s, value)));
        }
    }
    Ok(None)
}

/// The manager session in `headers` and its cookie value (the CSRF token is
/// derived from the value, so it needs no storage).
pub(crate) async fn manager_session(
    st: &AppState,
    headers: &HeaderMap,
    scheme: Scheme,
) -> Result<Option<(SessionRecord, String)>, Error> {
    find_session_and_value(st, headers, scheme, "manager", None).await
}

/// The CSRF token of a manager session: what the dashboard sends back in
/// [`CSRF_HEADER`] on every state-changing request. Derived from the HttpOnly
/// cookie's value, which no script (and no other host) can read.
pub(crate) fn csrf_token(cookie_value: &str) -> String {
    hash_token(&format!("csrf:{cookie_value}"))
}

/// The header that carries a manager session's CSRF token.
pub const CSRF_HEADER: &str = "x-atelier-csrf";

/// Checks a request to the API that the manager session cookie authenticated:
/// only the dashboard's own pages (same origin by Fetch Metadata or Origin; a
/// WebSocket with the manager's own Origin) may use it, and every state-changing
/// request must carry the session's CSRF token. Sandbox pages are same-site with
/// the manager, so `SameSite` alone would not stop them.
pub(crate) fn api_browser_check(
    req: &Request,
    scheme: Scheme,
    csrf: &str,
) -> Result<(), &'static str> {
    let headers = req.headers();
    let host = host_of(req).unwrap_or_default();
    let origin = header_str(headers, "origin");
    let ws = is_websocket(req.method(), headers);
    if ws && !origin.is_some_and(|o| same_origin(o, &host, scheme)) {
        return Err(
            "a WebSocket through the dashboard's session must come from the dashboard's own pages",
        );
    }
    match header_str(headers, "sec-fetch-site") {
        Some("same-origin" | "none") => {}
        Some(_) => {
            return Err(
                "the API takes the dashboard's session only from the dashboard's own pages",
            );
        }
        None => {
            if origin.is_some_and(|o| !same_origin(o, &host, scheme)) {
                return Err("requests from other origins may not use the dashboard's session");
            }
        }
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && !ws {
        let sent = header_str(headers, CSRF_HEADER).unwrap_or_default();
        if !crate::auth::constant_time_eq(sent, csrf) {
            return Err(
                "missing or wrong X-Atelier-Csrf header: the dashboard reads its value from GET /api/v1/me",
            );
        }
    }
    Ok(())
}

/// A valid API token in the header, or this host's own session cookie.
async fn authenticate(
    st: &AppState,
    headers: &HeaderMap,
    scheme: Scheme,
    host: &str,
) -> Result<Option<Auth>, Response> {
    let err = |e: Error| ApiError(e).into_response();
    if let Some(t) = bearer(headers) {
        return Ok(token_id(st, t).await.map_err(err)?.map(|_| Auth::Bearer));
    }
    Ok(find_session(st, headers, scheme, "proxy", Some(host))
        .await
        .map_err(err)?
        .map(|_| Auth::Cookie))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn is_websocket(method: &Method, headers: &HeaderMap) -> bool {
    *method == Method::CONNECT
        || header_str(headers, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
}

/// Whether `origin` (an `Origin` header) is `scheme://host` (host as in the Host
/// header, with its port).
fn same_origin(origin: &str, host: &str, scheme: Scheme) -> bool {
    origin.eq_ignore_ascii_case(&format!("{}://{host}", scheme_str(scheme)))
}

/// Fetch Metadata and Origin checks for a request that a browser's cookie
/// authenticated: the page's own requests, and top-level navigations, pass; a
/// sibling host's fetches, form posts, frames and WebSockets do not.
pub(crate) fn browser_request_allowed(
    method: &Method,
    headers: &HeaderMap,
    host: &str,
    scheme: Scheme,
) -> Result<(), &'static str> {
    let origin = header_str(headers, "origin");
    if is_websocket(method, headers) && !origin.is_some_and(|o| same_origin(o, host, scheme)) {
        return Err("a WebSocket through a session cookie must come from the sandbox's own pages");
    }
    match header_str(headers, "sec-fetch-site") {
        Some("same-origin" | "none") => Ok(()),
        Some("same-site" | "cross-site") => {
            let navigate = header_str(headers, "sec-fetch-mode") == Some("navigate");
            let top = header_str(headers, "sec-fetch-dest").is_none_or(|d| d == "document");
            let safe = matches!(*method, Method::GET | Method::HEAD);
            if navigate && top && safe {
                Ok(())
            } else {
                Err(
                    "requests from other sites (other sandboxes too) may not use this sandbox's session",
                )
            }
        }
        Some(_) => Err("unknown Sec-Fetch-Site"),
        // No Fetch Metadata (an old browser or not a browser): the Origin header,
        // when there is one, must be this host's own.
        None => match origin {
            Some(o) if !same_origin(o, host, scheme) => {
                Err("requests from other origins may not use this sandbox's session")
            }
            _ => Ok(()),
        },
    }
}

/// A service worker registration's script fetch (`Service-Worker: script`).
fn is_service_worker_script(headers: &HeaderMap) -> bool {
    header_str(headers, "service-worker").is_some_and(|v| v.eq_ignore_ascii_case("script"))
}

/// No other origin may frame a sandbox page (CSP `frame-ancestors`, appended so a
/// guest's own policy still applies, and `X-Frame-Options` for old browsers).
fn frame_protection(headers: &mut HeaderMap) {
    headers.append(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'self'"),
    );
    headers.insert(
        header::X_FRAME_OPTIONS,
        HeaderValue::from_static("SAMEORIGIN"),
    );
}

fn forbidden(why: &str) -> Response {
    let mut r = (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("forbidden: {why}\n"),
    )
        .into_response();
    frame_protection(r.headers_mut());
    r
}

fn not_found(message: String) -> Response {
    ApiError(Error::not_found(message)).into_response()
}

/// A redirect that sends no Referer onwards and is never cached.
fn redirect(status: StatusCode, location: &str) -> Response {
    let mut r = status.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn set_cookie(resp: &mut Response, scheme: Scheme, value: &str, max_age: u64) {
    let secure = if matches!(scheme, Scheme::Https) {
        "; Secure"
    } else {
        ""
    };
    // Host-only: no Domain attribute, so no sibling host ever receives it.
    let cookie = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}",
        cookie_name(scheme)
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// Stores a new session and returns its cookie value.
async fn new_session(
    st: &AppState,
    kind: &str,
    host: Option<&str>,
    parent: Option<&str>,
    token_id: Option<i64>,
    expires_at: i64,
) -> Result<String, Error> {
    let value = generate_token();
    let id = format!("ses-{}", &hash_token(&generate_token())[..16]);
    st.mgr
        .store()
        .insert_browser_session(&NewSession {
            id: &id,
            sha256: &hash_token(&value),
            kind,
            host,
            parent_id: parent,
            token_id,
            expires_at,
        })
        .await?;
    Ok(value)
}

fn session_expiry() -> i64 {
    atelier_store::now_ms() + SESSION_TTL.as_millis() as i64
}

fn max_age_until(expires_at: i64) -> u64 {
    ((expires_at - atelier_store::now_ms()).max(0) / 1000) as u64
}

/// The manager's origin as seen from a sandbox host (the same listener: scheme and
/// port of the request, host the bare domain).
fn manager_origin(proxy: &ProxyState, host: &str, scheme: Scheme) -> String {
    format!(
        "{}://{}{}",
        scheme_str(scheme),
        proxy.domain,
        port_suffix(host)
    )
}

fn redirect_to_manager(
    proxy: &ProxyState,
    host: &str,
    scheme: Scheme,
    canonical: &str,
    next: &str,
) -> Response {
    redirect(
        StatusCode::SEE_OTHER,
        &format!(
            "{}{AUTHORIZE_PATH}?host={}&next={}",
            manager_origin(proxy, host, scheme),
            urlencode(canonical),
            urlencode(next)
        ),
    )
}

/// Browsers go through the manager's sign-in; other clients get a 401.
fn unauthorized(
    proxy: &ProxyState,
    req: &Request,
    host: &str,
    scheme: Scheme,
    canonical: &str,
) -> Response {
    let wants_html = req.method() == Method::GET
        && header_str(req.headers(), "accept").is_some_and(|a| a.contains("text/html"));
    if wants_html {
        let next = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        return redirect_to_manager(
            proxy,
            host,
            scheme,
            canonical,
            &safe_next(Some(next.into())),
        );
    }
    let mut r = ApiError(Error::new(
        ErrorKind::Unauthorized,
        "sign in first: send `Authorization: Bearer <token>`, or open the URL in a browser to sign in on the manager",
    ))
    .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// The `atelier_token` value in a query, if the parameter is there at all (an
/// empty value counts, and fails).
fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == TOKEN_PARAM).then(|| urldecode(v))
    })
}

/// `?atelier_token=`: a valid token gets this host's session cookie and a redirect
/// to the same URL without the token; the guest never sees it.
async fn token_redirect(
    st: &AppState,
    req: Request,
    scheme: Scheme,
    canonical: &str,
    token: &str,
) -> Response {
    let tid = match token_id(st, token).await {
        Ok(Some(id)) => id,
        Ok(None) => {
            return ApiError(Error::new(ErrorKind::Unauthorized, "invalid API token"))
                .into_response();
        }
        Err(e) => return ApiError(e).into_response(),
    };
    let expires = session_expiry();
    let value = match new_session(st, "proxy", Some(canonical), None, Some(tid), expires).await {
        Ok(v) => v,
        Err(e) => return ApiError(e).into_response(),
    };
    let path = req.uri().path();
    let location = match req.uri().query().and_then(|q| strip_param(q, TOKEN_PARAM)) {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    // 307 keeps the method and body; the browser repeats the request with the cookie.
    let mut r = redirect(StatusCode::TEMPORARY_REDIRECT, &location);
    set_cookie(&mut r, scheme, &value, max_age_until(expires));
    r
}

fn strip_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(name))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// `GET /__atelier/authorize?host=H&next=P` on the manager's origin: with a manager
/// session, a one-time code for sandbox host H; without, the sign-in form first.
async fn authorize(st: &AppState, proxy: &ProxyState, req: Request, scheme: Scheme) -> Response {
    if req.method() != Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, "use GET\n").into_response();
    }
    let own_host = host_of(&req).unwrap_or_default();
    let query = req.uri().query().unwrap_or("");
    let target = form_value(query, "host").and_then(|h| parse_host(&h, &proxy.domain));
    let Some(target) = target else {
        return ApiError(Error::invalid(format!(
            "host must be a sandbox host under {}",
            proxy.domain
        )))
        .into_response();
    };
    let target = route_host(&target, &proxy.domain);
    let next = safe_next(form_value(query, "next"));
    let session = match find_session(st, req.headers(), scheme, "manager", None).await {
        Ok(s) => s,
        Err(e) => return ApiError(e).into_response(),
    };
    let Some(session) = session else {
        let back = format!(
            "{AUTHORIZE_PATH}?host={}&next={}",
            urlencode(&target),
            urlencode(&next)
        );
        return redirect(
            StatusCode::SEE_OTHER,
            &format!("/login?next={}", urlencode(&back)),
        );
    };
    if let Err(why) = browser_request_allowed(req.method(), req.headers(), &own_host, scheme) {
        return forbidden(why);
    }
    let code = match proxy.mint_code(PendingCode {
        host: target.clone(),
        parent: session.id.clone(),
        token_id: session.token_id,
        expires_at: session.expires_at,
        deadline: Instant::now() + CODE_TTL,
    }) {
        Ok(c) => c,
        Err(e) => return ApiError(e).into_response(),
    };
    redirect(
        StatusCode::SEE_OTHER,
        &format!(
            "{}://{target}{}{SESSION_PATH}?code={code}&next={}",
            scheme_str(scheme),
            port_suffix(&own_host),
            urlencode(&next)
        ),
    )
}

/// `GET /__atelier/session?code=C&next=P` on a sandbox host: exchanges the code for
/// this host's session cookie and redirects to P, dropping the code.
async fn exchange_code(
    st: &AppState,
    proxy: &ProxyState,
    req: Request,
    scheme: Scheme,
    canonical: &str,
) -> Response {
    let query = req.uri().query().unwrap_or("");
    let next = safe_next(form_value(query, "next"));
    let pending = form_value(query, "code").and_then(|c| proxy.take_code(&c, canonical));
    let Some(pending) = pending else {
        return ApiError(Error::new(
            ErrorKind::Unauthorized,
            "this sign-in link is invalid, used or expired; open the sandbox URL again",
        ))
        .into_response();
    };
    let expires = pending.expires_at.min(session_expiry());
    let value = match new_session(
        st,
        "proxy",
        Some(canonical),
        Some(&pending.parent),
        pending.token_id,
        expires,
    )
    .await
    {
        Ok(v) => v,
        Err(e) => return ApiError(e).into_response(),
    };
    let mut r = redirect(StatusCode::SEE_OTHER, &next);
    set_cookie(&mut r, scheme, &value, max_age_until(expires));
    r
}

/// `POST /logout` (manager origin: the manager session and every sandbox session
/// made from it) or `POST /__atelier/logout` (one sandbox host's session).
async fn logout(st: &AppState, req: Request, scheme: Scheme, host: Option<&str>) -> Response {
    if req.method() != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "use POST\n").into_response();
    }
    let own_host = host_of(&req).unwrap_or_default();
    if let Err(why) = same_origin_form(req.headers(), &own_host, scheme) {
        return forbidden(why);
    }
    let kind = if host.is_some() { "proxy" } else { "manager" };
    match find_session(st, req.headers(), scheme, kind, host).await {
        Ok(Some(s)) => {
            if let Err(e) = st.mgr.store().revoke_browser_session(&s.id).await {
                return ApiError(e.into()).into_response();
            }
        }
        Ok(None) => {}
        Err(e) => return ApiError(e).into_response(),
    }
    let mut r = redirect(
        StatusCode::SEE_OTHER,
        if host.is_some() { "/" } else { "/login" },
    );
    set_cookie(&mut r, scheme, "", 0);
    r
}

/// A form post must come from this very origin (no login or logout CSRF from a
/// sibling host).
fn same_origin_form(headers: &HeaderMap, host: &str, scheme: Scheme) -> Result<(), &'static str> {
    match header_str(headers, "sec-fetch-site") {
        Some("same-origin" | "none") => Ok(()),
        Some(_) => Err("this form only accepts posts from its own page"),
        None => match header_str(headers, "origin") {
            Some(o) if !same_origin(o, host, scheme) => {
                Err("this form only accepts posts from its own page")
            }
            _ => Ok(()),
        },
    }
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

/// Only a path on this origin: `/` then not `/` or `\`, no control or blank
/// characters anywhere (browsers drop tabs and newlines from URLs, so
/// `/\t/evil.com` would become `//evil.com`), no backslash, at most
/// [`MAX_NEXT_LEN`] bytes. Anything else becomes `/`.
pub(crate) fn safe_next(next: Option<String>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && n.len() <= MAX_NEXT_LEN
                && !n
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || c == '\\') =>
        {
            n
        }
        _ => "/".to_owned(),
    }
}

const LOGIN_FORM: &str = r#"<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><meta name="referrer" content="no-referrer"><title>Atelier sign-in</title>
<style>body{font-family:system-ui,sans-serif;max-width:24rem;margin:4rem auto;padding:0 1rem}input,button{font-size:1rem;width:100%;padding:.5rem;margin:.3rem 0;box-sizing:border-box}</style></head>
<body><h1>Atelier</h1><p>Sign in to the dashboard and sandbox URLs. Paste an API token (<code>atelier</code> prints the admin token once; it is also in the data directory's <code>admin-token</code>).</p>
<form method="post" action="/login"><input type="password" name="token" placeholder="atl_…" autofocus required><input type="hidden" name="next" value="__NEXT__"><button type="submit">Sign in</button></form>__ERROR__</body></html>"#;

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn login_page(status: StatusCode, next: &str, error: &str) -> Response {
    let mut r = (
        status,
        Html(
            LOGIN_FORM
                .replace("__NEXT__", &html_escape(next))
                .replace("__ERROR__", error),
        ),
    )
        .into_response();
    let h = r.headers_mut();
    frame_protection(h);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
    );
    r
}

/// `/login` on the manager's origin: the form (GET) and the sign-in (POST), which
/// sets the host-only manager session cookie.
async fn login(st: &AppState, req: Request, scheme: Scheme) -> Response {
    let query_next = req.uri().query().and_then(|q| form_value(q, "next"));
    match *req.method() {
        Method::GET => login_page(StatusCode::OK, &safe_next(query_next), ""),
        Method::POST => {
            let own_host = host_of(&req).unwrap_or_default();
            if let Err(why) = same_origin_form(req.headers(), &own_host, scheme) {
                return forbidden(why);
            }
            let Ok(body) = axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES).await else {
                return (StatusCode::PAYLOAD_TOO_LARGE, "form too large\n").into_response();
            };
            let body = String::from_utf8_lossy(&body);
            let next = safe_next(form_value(&body, "next"));
            let token = form_value(&body, "token").unwrap_or_default();
            let tid = match token_id(st, &token).await {
                Ok(Some(id)) => id,
                Ok(None) => {
                    return login_page(
                        StatusCode::UNAUTHORIZED,
                        &next,
                        "<p><strong>That token is not valid.</strong></p>",
                    );
                }
                Err(e) => return ApiError(e).into_response(),
            };
            let expires = session_expiry();
            let value = match new_session(st, "manager", None, None, Some(tid), expires).await {
                Ok(v) => v,
                Err(e) => return ApiError(e).into_response(),
            };
            let mut r = redirect(StatusCode::SEE_OTHER, &next);
            set_cookie(&mut r, scheme, &value, max_age_until(expires));
            r
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_kept_on_site() {
        assert_eq!(safe_next(Some("/a?b=1".into())), "/a?b=1");
        assert_eq!(safe_next(None), "/");
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil.example",
            "\\/evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r\n/evil.example",
            "/ /evil.example",
            "/\u{0}/x",
            "/\u{7f}/x",
            "/\u{85}/x",
            "evil.example",
            "",
        ] {
            assert_eq!(safe_next(Some(bad.into())), "/", "{bad:?}");
        }
        // Percent-encoded tricks arrive decoded from the form or query.
        assert_eq!(safe_next(form_value("next=/%09/evil.com", "next")), "/");
        assert_eq!(safe_next(form_value("next=%2F%2Fevil.com", "next")), "/");
        assert_eq!(safe_next(form_value("next=/%5Cevil.com", "next")), "/");
        assert_eq!(safe_next(Some(format!("/{}", "a".repeat(5000)))), "/");
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

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn fetch_metadata_rules() {
        let host = "sandbox-sb-aaaaaaaaaa.localhost:7070";
        let ok = |m: Method, p: &[(&'static str, &'static str)]| {
            browser_request_allowed(&m, &h(p), host, Scheme::Http).is_ok()
        };
        assert!(ok(Method::GET, &[("sec-fetch-site", "same-origin")]));
        assert!(ok(Method::POST, &[("sec-fetch-site", "same-origin")]));
        assert!(ok(Method::GET, &[("sec-fetch-site", "none")]));
        let nav = [
            ("sec-fetch-site", "same-site"),
            ("sec-fetch-mode", "navigate"),
            ("sec-fetch-dest", "document"),
        ];
        assert!(ok(Method::GET, &nav));
        assert!(!ok(Method::POST, &nav), "a form post from a sibling");
        assert!(!ok(
            Method::GET,
            &[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "cors")]
        ));
        assert!(!ok(
            Method::GET,
            &[
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "iframe")
            ]
        ));
        assert!(!ok(Method::GET, &[("sec-fetch-site", "cross-site")]));
        // Without Fetch Metadata, Origin decides.
        assert!(ok(Method::POST, &[]));
        assert!(ok(
            Method::POST,
            &[("origin", "http://sandbox-sb-aaaaaaaaaa.localhost:7070")]
        ));
        assert!(!ok(
            Method::POST,
            &[("origin", "http://sandbox-sb-bbbbbbbbbb.localhost:7070")]
        ));
        // WebSockets need their own Origin, whatever else is said.
        let ws = [("upgrade", "websocket"), ("sec-fetch-site", "same-origin")];
        assert!(!ok(Method::GET, &ws));
        assert!(ok(
            Method::GET,
            &[
                ("upgrade", "websocket"),
                ("origin", "http://sandbox-sb-aaaaaaaaaa.localhost:7070")
            ]
        ));
        assert!(!ok(
            Method::GET,
            &[
                ("upgrade", "websocket"),
                ("origin", "http://sandbox-sb-bbbbbbbbbb.localhost:7070")
            ]
        ));
    }

    #[test]
    fn cookies_examined_are_capped() {
        let many: String = (0..200)
            .map(|i| format!("atelier_session=v{i}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut m = HeaderMap::new();
        m.insert(header::COOKIE, HeaderValue::from_str(&many).unwrap());
        assert_eq!(
            session_cookies(&m, Scheme::Http).len(),
            MAX_SESSION_CANDIDATES
        );
        let late = format!("{}; atelier_session=x", "a=1; ".repeat(100));
        m.insert(header::COOKIE, HeaderValue::from_str(&late).unwrap());
        assert!(session_cookies(&m, Scheme::Http).is_empty());
    }
}
