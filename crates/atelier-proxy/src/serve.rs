//! Serving an axum app over TLS (HTTP/1.1 and HTTP/2, with upgrades), and the port-80
//! companion that redirects to HTTPS while leaving room for ACME HTTP-01 challenges.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;
use tracing::{debug, warn};

/// A slow or silent client gets this long to finish the TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` over TLS until `shutdown` resolves, then stops accepting
/// and waits for open connections to finish. Handlers can extract
/// `ConnectInfo<SocketAddr>` with the client's address.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // RFC 8441: lets HTTP/2 clients open WebSockets with extended CONNECT.
    builder.http2().enable_connect_protocol();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    warn!(error = %err, "accepting a TLS connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Subscribed now, so a shutdown during the handshake still reaches this connection.
        let watcher = graceful.watcher();
        let (acceptor, builder, app) = (acceptor.clone(), builder.clone(), app.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    debug!(%peer, error = %err, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(req)
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(err) = watcher.watch(conn.into_owned()).await {
                debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Pending ACME HTTP-01 challenges: token to key authorization. Whoever runs ACME
/// inserts entries; the port-80 router serves them.
pub type AcmeChallenges = Arc<RwLock<HashMap<String, String>>>;

/// The port-80 router: answers `/.well-known/acme-challenge/{token}` from `challenges`
/// and redirects everything else (301) to the same host and path over HTTPS on
/// `https_port`. Merge more routes into it if port 80 must serve anything else.
pub fn redirect_to_https(challenges: AcmeChallenges, https_port: u16) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(acme_challenge))
        .with_state(challenges)
        .fallback(move |headers: HeaderMap, uri: Uri| async move {
            redirect(&headers, &uri, https_port)
        })
}

async fn acme_challenge(
    State(challenges): State<AcmeChallenges>,
    Path(token): Path<String>,
) -> Response {
    let map = challenges.read().unwrap_or_else(PoisonError::into_inner);
    match map.get(&token) {
        Some(key_auth) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            key_auth.clone(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn redirect(headers: &HeaderMap, uri: &Uri, https_port: u16) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.host());
    let Some(host) = host.and_then(host_without_port) else {
        return (StatusCode::BAD_REQUEST, "missing or invalid Host header\n").into_response();
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{host}{port}{path}");
    (
        StatusCode::MOVED_PERMANENTLY,
        [(header::LOCATION, location)],
    )
        .into_response()
}

/// The host part of a Host header, if it is made only of host-name characters (so a
/// crafted header cannot turn the redirect into an open redirect to another URL shape).
fn host_without_port(host: &str) -> Option<&str> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_validation() {
        assert_eq!(host_without_port("example.com:80"), Some("example.com"));
        assert_eq!(host_without_port("Example.com"), Some("Example.com"));
        assert_eq!(host_without_port("evil.com/x"), None);
        assert_eq!(host_without_port("a@b"), None);
        assert_eq!(host_without_port(":80"), None);
    }
}
