//! Shared fixtures: a front proxy app and TLS listeners; the upstream test server,
//! payloads and the plain listener come from the test kit.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use atelier_proxy::{
    CertResolver, ForwardOpts, Forwarder, LocalCa, Scheme, parse_host, serve_tls, server_config,
};
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub mod tls_client;

// The upstream server, payloads and the plain listener live in the test kit.
#[allow(unused_imports)]
pub use atelier_testkit::upstream::*;

pub const ID: &str = "sb-abc123xyz0";

// ---- front proxy ----

#[derive(Clone)]
struct FrontState {
    forwarder: Forwarder,
    upstream: SocketAddr,
    domain: String,
    scheme: Scheme,
}

/// The front app as the server crate would build it: route by Host, forward, strip the
/// manager's credentials.
pub fn front_app(upstream: SocketAddr, domain: &str, scheme: Scheme) -> Router {
    Router::new().fallback(proxy).with_state(FrontState {
        forwarder: Forwarder::new(),
        upstream,
        domain: domain.to_owned(),
        scheme,
    })
}

async fn proxy(
    State(st): State<FrontState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let host = host_of(req.headers(), req.uri());
    if host
        .as_deref()
        .and_then(|h| parse_host(h, &st.domain))
        .is_none()
    {
        return (StatusCode::NOT_FOUND, "no such sandbox\n").into_response();
    }
    let opts = ForwardOpts {
        strip_authorization: true,
        strip_cookie: Some("atelier_session".into()),
        strip_query_param: Some("atelier_token".into()),
        ..ForwardOpts::new(peer, st.scheme)
    };
    st.forwarder.forward(req, st.upstream, &opts).await
}

fn host_of(headers: &HeaderMap, uri: &axum::http::Uri) -> Option<String> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.to_string()))
}

/// A TLS front: its address, the CA PEM to trust, and a sender that shuts it down.
pub struct TlsFront {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub shutdown: oneshot::Sender<()>,
    pub done: tokio::task::JoinHandle<()>,
}

/// Serves `app` with `serve_tls`, certificates from a local CA in `ca_dir` for `domains`.
pub async fn spawn_tls(app: Router, ca_dir: &Path, domains: &[&str]) -> TlsFront {
    let ca = Arc::new(LocalCa::load_or_create(ca_dir).unwrap());
    let ca_pem = ca.ca_pem();
    let resolver = Arc::new(CertResolver::local(ca, domains).unwrap());
    let config = server_config(resolver).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(serve_tls(listener, config, app, async {
        let _ = rx.await;
    }));
    TlsFront {
        addr,
        ca_pem,
        shutdown: tx,
        done,
    }
}
