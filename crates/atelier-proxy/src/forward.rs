//! Forwarding one request to a sandbox's HTTP server, streaming both ways, with protocol
//! upgrades (WebSocket) bridged as raw byte streams.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use crate::headers::{
    remove_hop_by_hop, strip_cookie, strip_query_param, strip_set_cookie, wants_upgrade,
};

/// The error type request bodies may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long to wait for the TCP connection to an upstream before answering 502.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled upstream connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The scheme the client used to reach the proxy, reported as `X-Forwarded-Proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// Per-request facts the proxy cannot learn from the request itself, and the credentials
/// that belong to the manager and must never reach the (untrusted) upstream.
#[derive(Debug, Clone)]
pub struct ForwardOpts {
    /// The client's address, sent as `X-Forwarded-For` (replacing any client-supplied value).
    pub client_addr: SocketAddr,
    /// How the client reached the proxy.
    pub scheme: Scheme,
    /// Remove the `Authorization` header (the manager's API token).
    pub strip_authorization: bool,
    /// Remove this cookie (e.g. `atelier_session`) from `Cookie` and from upstream `Set-Cookie`.
    pub strip_cookie: Option<String>,
    /// Remove this query parameter (e.g. `atelier_token`).
    pub strip_query_param: Option<String>,
}

impl ForwardOpts {
    /// Options that strip nothing.
    pub fn new(client_addr: SocketAddr, scheme: Scheme) -> Self {
        Self {
            client_addr,
            scheme,
            strip_authorization: false,
            strip_cookie: None,
            strip_query_param: None,
        }
    }
}

/// A pooled HTTP/1.1 client for upstreams; clones share the pool.
#[derive(Debug, Clone)]
pub struct Forwarder {
    client: Client<HttpConnector, Body>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

/// What kind of exchange a request starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    /// HTTP/1.1 `Connection: upgrade`.
    Upgrade,
    /// HTTP/2 extended CONNECT (RFC 8441) for WebSocket, turned into an HTTP/1.1 upgrade.
    H2WebSocket,
}

impl Forwarder {
    /// A forwarder with a 5 s connect timeout and connection pooling.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Self { client }
    }

    /// Forwards `req` to `upstream` over HTTP/1.1 and returns its response; never fails:
    /// upstream problems become a 502 with a short plain-text reason.
    pub async fn forward<B>(
        &self,
        req: Request<B>,
        upstream: SocketAddr,
        opts: &ForwardOpts,
    ) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = req.into_parts();
        let kind = if parts.method == Method::CONNECT {
            let websocket = parts
                .extensions
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
            if !websocket {
                return text(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported");
            }
            Kind::H2WebSocket
        } else if parts.version <= Version::HTTP_11 && wants_upgrade(&parts.headers) {
            Kind::Upgrade
        } else {
            Kind::Plain
        };
        let client_upgrade = parts.extensions.remove::<OnUpgrade>();

        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        let headers = &mut parts.headers;
        remove_hop_by_hop(headers, kind == Kind::Upgrade);
        if opts.strip_authorization {
            headers.remove(header::AUTHORIZATION);
        }
        if let Some(name) = &opts.strip_cookie {
            strip_cookie(headers, name);
        }
        if let Some(host) = host {
            headers.insert(header::HOST, host.clone());
            headers.insert("x-forwarded-host", host);
        }
        if let Ok(v) = HeaderValue::from_str(&opts.client_addr.ip().to_string()) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(opts.scheme.as_str()),
        );
        if kind == Kind::H2WebSocket {
            parts.method = Method::GET;
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
            if let Ok(key) = HeaderValue::from_str(&key) {
                headers.insert(header::SEC_WEBSOCKET_KEY, key);
            }
        }
        parts.uri = match upstream_uri(&parts.uri, upstream, opts.strip_query_param.as_deref()) {
            Some(uri) => uri,
            None => return text(StatusCode::BAD_REQUEST, "invalid request target"),
        };
        parts.version = Version::HTTP_11;
        let body = match kind {
            Kind::H2WebSocket => Body::empty(),
            Kind::Plain | Kind::Upgrade => Body::new(body),
        };

        let mut resp = match self.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp,
            Err(err) => return bad_gateway(&err, upstream),
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade.filter(|_| kind != Kind::Plain) else {
                return text(
                    StatusCode::BAD_GATEWAY,
                    "upstream switched protocols unasked",
                );
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(bridge(client_upgrade, upstream_upgrade));
            let (mut parts, _) = resp.into_parts();
            if kind == Kind::H2WebSocket {
                // Over HTTP/2 a successful extended CONNECT is a plain 200 with no handshake headers.
                parts.status = StatusCode::OK;
                remove_hop_by_hop(&mut parts.headers, false);
                parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
            } else {
                remove_hop_by_hop(&mut parts.headers, true);
            }
            return Response::from_parts(parts, Body::empty());
        }

        let (mut parts, body) = resp.into_parts();
        remove_hop_by_hop(&mut parts.headers, false);
        if let Some(name) = &opts.strip_cookie {
            strip_set_cookie(&mut parts.headers, name);
        }
        Response::from_parts(parts, Body::new(body))
    }
}

/// `http://{upstream}{path}?{query}` with the credential query parameter removed.
fn upstream_uri(uri: &Uri, upstream: SocketAddr, strip: Option<&str>) -> Option<Uri> {
    let path = uri.path();
    let query = match (uri.query(), strip) {
        (Some(q), Some(name)) => strip_query_param(q, name),
        (q, _) => q.map(str::to_owned),
    };
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    Uri::builder()
        .scheme("http")
        .authority(upstream.to_string())
        .path_and_query(PathAndQuery::try_from(pq).ok()?)
        .build()
        .ok()
}

/// Copies bytes both ways between the client's and the upstream's upgraded connections
/// until either side closes.
async fn bridge(client: OnUpgrade, upstream: OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            debug!(error = %err, "protocol upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        debug!(error = %err, "upgraded connection ended with an error");
    }
}

/// A 502 naming what went wrong with the upstream, without internal details.
fn bad_gateway(err: &hyper_util::client::legacy::Error, upstream: SocketAddr) -> Response<Body> {
    let port = upstream.port();
    let io_kind = std::iter::successors(Some(err as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .find_map(|e| e.downcast_ref::<std::io::Error>())
    .map(std::io::Error::kind);
    debug!(error = %err, %upstream, "forwarding to upstream failed");
    let reason = if err.is_connect() {
        match io_kind {
            Some(std::io::ErrorKind::ConnectionRefused) => {
                format!("nothing is listening on port {port} in the sandbox")
            }
            Some(std::io::ErrorKind::TimedOut) => {
                format!("connecting to port {port} in the sandbox timed out")
            }
            _ => format!("could not connect to port {port} in the sandbox"),
        }
    } else {
        format!(
            "the server on port {port} in the sandbox closed the connection or sent an invalid response"
        )
    };
    text(StatusCode::BAD_GATEWAY, &format!("bad gateway: {reason}\n"))
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.to_owned()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_strips_token_and_keeps_path() {
        let up: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let uri: Uri = "https://sandbox-sb-abc123xyz0.example.com/a/b?x=1&atelier_token=t&y=2"
            .parse()
            .unwrap();
        let out = upstream_uri(&uri, up, Some("atelier_token")).unwrap();
        assert_eq!(out.to_string(), "http://10.0.0.2:8080/a/b?x=1&y=2");
        let uri: Uri = "/p?atelier_token=t".parse().unwrap();
        let out = upstream_uri(&uri, up, Some("atelier_token")).unwrap();
        assert_eq!(out.to_string(), "http://10.0.0.2:8080/p");
        let out = upstream_uri(&uri, up, None).unwrap();
        assert_eq!(out.to_string(), "http://10.0.0.2:8080/p?atelier_token=t");
    }
}
