//! Browser sessions on sandbox hosts, in process: the manager's real router and
//! listener, two sandbox hosts (A and B) routed to the test kit's upstream server,
//! and a client that sends what a browser would (cookies, Fetch Metadata, Origin).
//! No VM: what is under test is the auth in front of the guest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use atelier_proxy::{ConnLimits, Route};
use atelier_server::api::proxy::{ProxyState, RouteResolver};
use atelier_server::api::{AppState, router};
use atelier_server::auth::{generate_token, hash_token};
use atelier_server::{Manager, ManagerConfig};
use atelier_storage::BackendChoice;
use reqwest::header::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "sandbox-sb-aaaaaaaaaa.localhost";
const B: &str = "sandbox-sb-bbbbbbbbbb.localhost";

struct Env {
    addr: SocketAddr,
    mgr: Arc<Manager>,
    token: String,
    /// The local CA's PEM when serving TLS.
    ca_pem: Option<String>,
    _data: tempfile::TempDir,
}

impl Env {
    async fn start() -> Env {
        Self::start_with(false).await
    }

    async fn start_with(tls: bool) -> Env {
        let data = tempfile::tempdir().unwrap();
        let mut cfg = ManagerConfig::new(data.path());
        cfg.storage = BackendChoice::Qcow2;
        cfg.network = None;
        let mgr = Manager::open(cfg).await.expect("open manager");
        let token = generate_token();
        mgr.store()
            .create_token("admin", &hash_token(&token))
            .await
            .unwrap();
        let upstream = atelier_testkit::upstream::spawn_upstream(1).await;
        let mut proxy = ProxyState::new("localhost", 4096);
        proxy.resolver = Some(RouteResolver(Arc::new(move |r: &Route| match r {
            Route::Sandbox { .. } => Some(upstream),
            Route::Dev { .. } => None,
        })));
        let app = router(AppState {
            tasks: atelier_server::tasks::Tasks::new(&mgr, Default::default()),
            mgr: Arc::clone(&mgr),
            swagger_dir: None,
            proxy: Some(Arc::new(proxy)),
            ca_pem: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (config, ca_pem, app) = if tls {
            let ca =
                Arc::new(atelier_proxy::LocalCa::load_or_create(&data.path().join("tls")).unwrap());
            let pem = ca.ca_pem();
            let resolver = atelier_proxy::CertResolver::local(ca, &["localhost"]).unwrap();
            let config = atelier_proxy::server_config(Arc::new(resolver)).unwrap();
            let app = app.layer(axum::Extension(atelier_server::api::proxy::Tls));
            (Some(config), Some(pem), app)
        } else {
            (None, None, app)
        };
        tokio::spawn(atelier_proxy::serve(
            listener,
            config,
            app,
            ConnLimits::default(),
            std::future::pending(),
        ));
        Env {
            addr,
            mgr,
            token,
            ca_pem,
            _data: data,
        }
    }

    fn host(&self, h: &str) -> String {
        format!("{h}:{}", self.addr.port())
    }

    fn origin(&self, h: &str) -> String {
        format!("http://{}", self.host(h))
    }

    /// A request to `path` on host `h` (the manager is `localhost`).
    fn req(&self, method: reqwest::Method, h: &str, path: &str) -> reqwest::RequestBuilder {
        client()
            .request(method, format!("http://{}{path}", self.addr))
            .header("host", self.host(h))
    }

    fn get(&self, h: &str, path: &str) -> reqwest::RequestBuilder {
        self.req(reqwest::Method::GET, h, path)
    }

    /// Signs in on the manager's origin; the manager session cookie.
    async fn manager_login(&self) -> String {
        let r = self
            .req(reqwest::Method::POST, "localhost", "/login")
            .header("sec-fetch-site", "same-origin")
            .header("origin", self.origin("localhost"))
            .form(&[("token", self.token.as_str()), ("next", "/")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        cookie_of(r.headers())
    }

    /// Runs the one-time code flow for sandbox host `h` with manager cookie `m`;
    /// the host's session cookie.
    async fn sandbox_session(&self, m: &str, h: &str) -> String {
        let r = self
            .get(
                "localhost",
                &format!("/__atelier/authorize?host={h}&next=/echo"),
            )
            .header("cookie", m)
            .header("sec-fetch-site", "none")
            .header("sec-fetch-mode", "navigate")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        let loc = location(&r);
        let prefix = format!("http://{}/__atelier/session?code=", self.host(h));
        assert!(loc.starts_with(&prefix), "{loc}");
        let path = &loc[format!("http://{}", self.host(h)).len()..];
        let r = self
            .get(h, path)
            .header("sec-fetch-site", "same-site")
            .header("sec-fetch-mode", "navigate")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        assert_eq!(location(&r), "/echo");
        assert_eq!(r.headers()["referrer-policy"], "no-referrer");
        // Single use.
        let again = self.get(h, path).send().await.unwrap();
        assert_eq!(again.status(), 401);
        cookie_of(r.headers())
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_owned()
}

/// The `name=value` of the one Set-Cookie, after checking it is host-only.
fn cookie_of(h: &HeaderMap) -> String {
    let c = h["set-cookie"].to_str().unwrap();
    assert!(!c.to_ascii_lowercase().contains("domain="), "{c}");
    assert!(c.contains("HttpOnly") && c.contains("Path=/"), "{c}");
    c.split(';').next().unwrap().to_owned()
}

/// A raw WebSocket handshake to `/ws` on `h` with `cookie` and `origin`; the
/// status code.
async fn ws_status(env: &Env, h: &str, cookie: &str, origin: &str) -> u16 {
    ws_handshake(env, h, "/ws", cookie, origin).await
}

/// A raw WebSocket handshake to `path` on `h` with `cookie` and `origin`.
async fn ws_handshake(env: &Env, h: &str, path: &str, cookie: &str, origin: &str) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Cookie: {cookie}\r\nOrigin: {origin}\r\n\r\n",
        env.host(h)
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("handshake answer")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn sign_in_happens_on_the_manager_and_codes_open_one_host() {
    let env = Env::start().await;
    // A browser without a session goes to the manager, not to a form on the
    // (hostile) sandbox host.
    let r = env
        .get(A, "/page?q=1")
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        location(&r),
        format!(
            "{}/__atelier/authorize?host={A}&next=/page%3Fq%3D1",
            env.origin("localhost")
        )
    );
    let r = env.get(A, "/__atelier/login").send().await.unwrap();
    assert!(location(&r).starts_with(&env.origin("localhost")));
    // The manager asks for a sign-in first.
    let r = env
        .get(
            "localhost",
            &format!("/__atelier/authorize?host={A}&next=/x"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(location(&r).starts_with("/login?next=/__atelier/authorize"));
    // A sibling page cannot sign the browser in (login CSRF), and a bad token fails.
    let r = env
        .req(reqwest::Method::POST, "localhost", "/login")
        .header("sec-fetch-site", "same-site")
        .form(&[("token", env.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = env
        .req(reqwest::Method::POST, "localhost", "/login")
        .header("origin", env.origin(B))
        .form(&[("token", env.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = env
        .req(reqwest::Method::POST, "localhost", "/login")
        .header("sec-fetch-site", "same-origin")
        .form(&[("token", "atl_wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let m = env.manager_login().await;
    // The manager cookie opens no sandbox (its API use is `dashboard_session_*`).
    let r = env
        .get(A, "/echo")
        .header("cookie", &m)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Hosts outside the domain get no code.
    let r = env
        .get("localhost", "/__atelier/authorize?host=evil.example&next=/")
        .header("cookie", &m)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A code minted for A is useless on B.
    let r = env
        .get(
            "localhost",
            &format!("/__atelier/authorize?host={A}&next=/"),
        )
        .header("cookie", &m)
        .header("sec-fetch-site", "none")
        .send()
        .await
        .unwrap();
    let loc = location(&r);
    let code_path = &loc[loc.find("/__atelier").unwrap()..];
    let r = env.get(B, code_path).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // A sibling page's fetch cannot mint codes with the manager cookie.
    let r = env
        .get(
            "localhost",
            &format!("/__atelier/authorize?host={A}&next=/"),
        )
        .header("cookie", &m)
        .header("sec-fetch-site", "same-site")
        .header("sec-fetch-mode", "cors")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let sa = env.sandbox_session(&m, A).await;
    let sb = env.sandbox_session(&m, B).await;
    // A's session opens A, and the guest sees none of our credentials.
    let r = env
        .get(A, "/echo")
        .header("cookie", format!("theirs=1; {sa}"))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-security-policy"],
        "frame-ancestors 'self'"
    );
    assert_eq!(r.headers()["x-frame-options"], "SAMEORIGIN");
    let echo = r.text().await.unwrap();
    assert!(echo.contains("theirs=1"), "{echo}");
    let sa_value = sa.split('=').nth(1).unwrap();
    for secret in [sa_value, env.token.as_str(), m.split('=').nth(1).unwrap()] {
        assert!(!echo.contains(secret), "{echo}");
    }
    // A's session is useless on B, and B's on A.
    for (h, c) in [(B, &sa), (A, &sb)] {
        let r = env
            .get(h, "/echo")
            .header("cookie", c)
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{h}");
    }
}

#[tokio::test]
async fn a_sibling_page_cannot_use_a_sandbox_session() {
    let env = Env::start().await;
    let m = env.manager_login().await;
    let sa = env.sandbox_session(&m, A).await;
    let b = env.origin(B);
    // The browser attaches A's cookie to requests B's page makes to A (same site),
    // but Fetch Metadata and Origin give B away: fetch, form post, frame, WebSocket.
    let fetch = env
        .get(A, "/echo")
        .header("cookie", &sa)
        .header("sec-fetch-site", "same-site")
        .header("sec-fetch-mode", "cors")
        .header("sec-fetch-dest", "empty")
        .header("origin", &b)
        .send()
        .await
        .unwrap();
    assert_eq!(fetch.status(), 403);
    let form = env
        .req(reqwest::Method::POST, A, "/echo")
        .header("cookie", &sa)
        .header("sec-fetch-site", "same-site")
        .header("sec-fetch-mode", "navigate")
        .header("sec-fetch-dest", "document")
        .header("origin", &b)
        .body("a=1")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 403);
    let frame = env
        .get(A, "/echo")
        .header("cookie", &sa)
        .header("sec-fetch-site", "same-site")
        .header("sec-fetch-mode", "navigate")
        .header("sec-fetch-dest", "iframe")
        .send()
        .await
        .unwrap();
    assert_eq!(frame.status(), 403);
    let no_metadata = env
        .req(reqwest::Method::POST, A, "/echo")
        .header("cookie", &sa)
        .header("origin", &b)
        .send()
        .await
        .unwrap();
    assert_eq!(no_metadata.status(), 403);
    assert_eq!(ws_status(&env, A, &sa, &b).await, 403);
    // A's own pages, and a top-level link from anywhere, work.
    assert_eq!(ws_status(&env, A, &sa, &env.origin(A)).await, 101);
    let own = env
        .req(reqwest::Method::POST, A, "/echo")
        .header("cookie", &sa)
        .header("sec-fetch-site", "same-origin")
        .header("origin", env.origin(A))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let link = env
        .get(A, "/echo")
        .header("cookie", &sa)
        .header("sec-fetch-site", "cross-site")
        .header("sec-fetch-mode", "navigate")
        .header("sec-fetch-dest", "document")
        .send()
        .await
        .unwrap();
    assert_eq!(link.status(), 200);
    // No service worker script is ever fetched from the guest.
    let sw = env
        .get(A, "/echo")
        .header("cookie", &sa)
        .header("sec-fetch-site", "same-origin")
        .header("service-worker", "script")
        .send()
        .await
        .unwrap();
    assert_eq!(sw.status(), 403);
    // The guest cannot set our cookie, nor send a Set-Cookie we cannot parse.
    let r = env
        .get(A, "/set-cookie")
        .header("cookie", &sa)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set: Vec<_> = r.headers().get_all("set-cookie").iter().collect();
    assert_eq!(set, ["app=1; Path=/"]);
}

#[tokio::test]
async fn query_tokens_are_swapped_for_a_cookie_and_never_forwarded() {
    let env = Env::start().await;
    let r = env
        .get(A, &format!("/echo?x=1&atelier_token={}&y=2", env.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(location(&r), "/echo?x=1&y=2");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    let sa = cookie_of(r.headers());
    let r = env
        .get(A, "/echo?x=1&y=2")
        .header("cookie", &sa)
        .header("sec-fetch-site", "none")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = env
        .get(A, "/echo?atelier_token=atl_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The bearer header still works for programs.
    let r = env
        .get(A, "/echo")
        .bearer_auth(&env.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.text().await.unwrap().contains(&env.token));
}

#[tokio::test]
async fn logout_and_revocation_take_effect_at_once() {
    let env = Env::start().await;
    let ok = |r: &reqwest::Response| r.status() == 200;
    let use_session = |h: &'static str, c: String| {
        env.get(h, "/echo")
            .header("cookie", c)
            .header("sec-fetch-site", "same-origin")
            .send()
    };
    // Logout on a sandbox host.
    let m = env.manager_login().await;
    let sa = env.sandbox_session(&m, A).await;
    assert!(ok(&use_session(A, sa.clone()).await.unwrap()));
    let r = env
        .req(reqwest::Method::POST, A, "/__atelier/logout")
        .header("cookie", &sa)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(use_session(A, sa.clone()).await.unwrap().status(), 401);
    // Logout on the manager takes its sandbox sessions along.
    let sb = env.sandbox_session(&m, B).await;
    let r = env
        .req(reqwest::Method::POST, "localhost", "/logout")
        .header("cookie", &m)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(use_session(B, sb).await.unwrap().status(), 401);

    // Revocation through the API.
    let api = |method: reqwest::Method, path: &str| {
        env.req(method, "localhost", path).bearer_auth(&env.token)
    };
    let m = env.manager_login().await;
    let sa = env.sandbox_session(&m, A).await;
    let list: serde_json::Value = api(reqwest::Method::GET, "/api/v1/sessions")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let proxy_id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "proxy" && s["host"] == A)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = api(
        reqwest::Method::DELETE,
        &format!("/api/v1/sessions/{proxy_id}"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(use_session(A, sa).await.unwrap().status(), 401);
    let r = api(reqwest::Method::DELETE, "/api/v1/sessions/ses-nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A revoked API token is refused at once: API, proxy, and its sessions.
    let created: serde_json::Value = api(reqwest::Method::POST, "/api/v1/tokens")
        .json(&serde_json::json!({"name": "ci"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t2 = created["token"].as_str().unwrap().to_owned();
    let status = |t: String| env.get("localhost", "/api/v1/status").bearer_auth(t).send();
    assert!(ok(&status(t2.clone()).await.unwrap()));
    let r = env
        .get(A, &format!("/echo?atelier_token={t2}"))
        .send()
        .await
        .unwrap();
    let s2 = cookie_of(r.headers());
    assert!(ok(&use_session(A, s2.clone()).await.unwrap()));
    let r = api(
        reqwest::Method::DELETE,
        &format!("/api/v1/tokens/{}", created["id"]),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(status(t2.clone()).await.unwrap().status(), 401);
    let r = env.get(A, "/echo").bearer_auth(&t2).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(use_session(A, s2).await.unwrap().status(), 401);
    // The admin token still works; the revoked one is gone from the list.
    let tokens: serde_json::Value = api(reqwest::Method::GET, "/api/v1/tokens")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tokens.as_array().unwrap().len(), 1);
    assert_eq!(tokens[0]["name"], "admin");
    drop(env.mgr.clone());
}

#[tokio::test]
async fn over_tls_the_cookie_is_host_prefixed_and_secure() {
    let env = Env::start_with(true).await;
    let port = env.addr.port();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(
            reqwest::Certificate::from_pem(env.ca_pem.as_ref().unwrap().as_bytes()).unwrap(),
        )
        .resolve(A, env.addr)
        .resolve(B, env.addr)
        .build()
        .unwrap();
    let r = client
        .get(format!(
            "https://{A}:{port}/echo?atelier_token={}",
            env.token
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with("__Host-atelier_session="), "{set}");
    assert!(set.contains("; Secure") && set.contains("Path=/"), "{set}");
    let cookie = cookie_of(r.headers());
    let r = client
        .get(format!("https://{A}:{port}/echo"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo = r.text().await.unwrap();
    assert!(!echo.contains("atelier_session"), "{echo}");
    let r = client
        .get(format!("https://{B}:{port}/echo"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Over TLS too (HTTP/2 here, where the upgrade headers do not exist), a
    // request with A's cookie and B's Origin, without Fetch Metadata, is refused.
    let r = client
        .get(format!("https://{A}:{port}/ws"))
        .header("cookie", &cookie)
        .header("origin", format!("https://{B}:{port}"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// `GET /api/v1/me` through `cookie` with Fetch Metadata `site`; status and body.
async fn me(env: &Env, cookie: &str, site: &str) -> (u16, serde_json::Value) {
    let r = env
        .get("localhost", "/api/v1/me")
        .header("cookie", cookie)
        .header("sec-fetch-site", site)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn dashboard_session_opens_the_api_from_its_own_pages_only() {
    let env = Env::start().await;
    // No cookie, no token: 401 with a way out.
    let (status, body) = me(&env, "x=y", "same-origin").await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    assert!(
        body["message"].as_str().unwrap().contains("/login"),
        "{body}"
    );

    let m = env.manager_login().await;
    let (status, body) = me(&env, &m, "same-origin").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["via"], "session");
    assert!(body["session_id"].as_str().unwrap().starts_with("ses-"));
    let csrf = body["csrf"].as_str().unwrap().to_owned();
    assert_eq!(csrf.len(), 64);
    // The token's own view has no CSRF token.
    let r: serde_json::Value = env
        .get("localhost", "/api/v1/me")
        .bearer_auth(&env.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((r["via"].as_str(), r.get("csrf")), (Some("token"), None));

    // Reads from the dashboard's pages (and typed-in URLs) pass.
    for site in ["same-origin", "none"] {
        let r = env
            .get("localhost", "/api/v1/tasks")
            .header("cookie", &m)
            .header("sec-fetch-site", site)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{site}");
    }
    // A sandbox page is same-site with the manager: its fetches carry the Lax
    // cookie, and are refused, reads too.
    for site in ["same-site", "cross-site"] {
        let (status, body) = me(&env, &m, site).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("forbidden")),
            "{site}"
        );
    }
    // Without Fetch Metadata the Origin decides.
    let r = env
        .get("localhost", "/api/v1/me")
        .header("cookie", &m)
        .header("origin", env.origin(A))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Writes need the CSRF token, even from the dashboard's own origin.
    let create = |csrf: Option<&str>| {
        let mut r = env
            .req(reqwest::Method::POST, "localhost", "/api/v1/tokens")
            .header("cookie", &m)
            .header("sec-fetch-site", "same-origin")
            .header("origin", env.origin("localhost"))
            .json(&serde_json::json!({"name": "from-dashboard"}));
        if let Some(c) = csrf {
            r = r.header("x-atelier-csrf", c);
        }
        r.send()
    };
    for bad in [None, Some("0".repeat(64).as_str()), Some("")] {
        let r = create(bad).await.unwrap();
        assert_eq!(r.status(), 403, "{bad:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains("X-Atelier-Csrf"),
            "{body}"
        );
    }
    let r = create(Some(&csrf)).await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    // Another session's token does not fit this one.
    let m2 = env.manager_login().await;
    let (_, other) = me(&env, &m2, "same-origin").await;
    assert_ne!(other["csrf"].as_str(), Some(csrf.as_str()));
    let r = create(Some(other["csrf"].as_str().unwrap())).await.unwrap();
    assert_eq!(r.status(), 403);

    // The terminal's WebSocket: the dashboard's own Origin only.
    assert_eq!(
        ws_handshake(
            &env,
            "localhost",
            "/api/v1/sandboxes/sb-aaaaaaaaaa/pty",
            &m,
            &env.origin(A)
        )
        .await,
        403
    );
    assert_ne!(
        ws_handshake(
            &env,
            "localhost",
            "/api/v1/sandboxes/sb-aaaaaaaaaa/pty",
            &m,
            &env.origin("localhost")
        )
        .await,
        403
    );
    assert_ne!(
        ws_handshake(
            &env,
            "localhost",
            "/api/v1/sandboxes/sb-aaaaaaaaaa/pty",
            &m,
            &env.origin("localhost")
        )
        .await,
        401
    );

    // A sandbox host's session is no key to the API.
    let sa = env.sandbox_session(&m, A).await;
    let (status, _) = me(&env, &sa, "same-origin").await;
    assert_eq!(status, 401);

    // Logout ends the API session at once.
    let r = env
        .req(reqwest::Method::POST, "localhost", "/logout")
        .header("cookie", &m)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(me(&env, &m, "same-origin").await.0, 401);
    assert_eq!(me(&env, &m2, "same-origin").await.0, 200);
}

#[tokio::test]
async fn dashboard_files_and_client_routes() {
    let env = Env::start().await;
    let get = |path: &'static str| env.get("localhost", path).send();
    // Unknown API routes stay JSON 404s; missing files are 404s, not the app.
    for path in [
        "/api/v1/nope",
        "/api/nope",
        "/assets/index-0000.js",
        "/nope.png",
    ] {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = env
        .req(reqwest::Method::POST, "localhost", "/tasks")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A client route is index.html (or, in a build without the dashboard, a page
    // that says how to build it), under the dashboard's CSP.
    let index = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web/dist/index.html");
    for path in ["/", "/tasks/t-1", "/needs-you"] {
        let r = get(path).await.unwrap();
        let h = r.headers().clone();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert!(
            h["content-type"].to_str().unwrap().starts_with("text/html"),
            "{path}"
        );
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        match std::fs::read_to_string(&index) {
            Ok(want) => {
                assert_eq!(status, 200, "{path}");
                assert_eq!(h["cache-control"], "no-cache");
                assert_eq!(body, want);
                // Revalidation.
                let tag = h["etag"].to_str().unwrap().to_owned();
                let r = env
                    .get("localhost", path)
                    .header("if-none-match", &tag)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 304);
            }
            Err(_) => {
                assert_eq!(status, 503, "{path}");
                assert!(body.contains("npm --prefix web run build"), "{body}");
            }
        }
    }
    // Hashed assets are cached for good.
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web/dist/assets");
    if let Some(first) = std::fs::read_dir(&assets).ok().and_then(|mut d| d.next()) {
        let name = first.unwrap().file_name().into_string().unwrap();
        let r = env
            .get("localhost", &format!("/assets/{name}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["cache-control"],
            "public, max-age=31536000, immutable"
        );
    }
}
