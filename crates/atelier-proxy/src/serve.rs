//! Serving an axum app over TLS (HTTP/1.1 and HTTP/2, with upgrades), and the port-80
//! companion that redirects to HTTPS while leaving room for ACME HTTP-01 challenges.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;
use tracing::{debug, warn};

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often a connection's idle watchdog looks at the clock.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Runs connection `$conn` to its end: asks it to close (graceful shutdown) when the
/// listener stops or once no byte has moved for the idle timeout, and drops it
/// when a further idle timeout passes without its finishing. hyper has no idle
/// timeout of its own beyond the HTTP/1 head timer, so this watches the socket's
/// last activity ([`Activity`]). A macro because hyper's HTTP/1 and HTTP/2
/// connections share no trait for `graceful_shutdown`.
macro_rules! drive {
    ($conn:expr, $last:expr, $limits:expr, $stop:expr, $peer:expr) => {{
        let (last, limits, mut stop, peer) = ($last, $limits, $stop, $peer);
        let start = Instant::now();
        let mut conn = std::pin::pin!($conn);
        let mut tick = tokio::time::interval(IDLE_TICK);
        let mut closing = false;
        let mut closing_since = Duration::ZERO;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(err) = r {
                        debug!(%peer, error = %err, "connection ended with an error");
                    }
                    break;
                }
                _ = stop.wait_for(|s| *s), if !closing => {
                    closing = true;
                    closing_since = start.elapsed();
                    conn.as_mut().graceful_shutdown();
                }
                _ = tick.tick() => {
                    let moved = Duration::from_millis(last.load(Ordering::Relaxed));
                    let idle = start.elapsed().saturating_sub(moved.max(closing_since));
                    if idle >= limits.idle_timeout {
                        if closing {
                            debug!(%peer, "dropping an idle connection");
                            break;
                        }
                        debug!(%peer, "closing an idle connection");
                        closing = true;
                        closing_since = start.elapsed();
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }};
}

/// What one client may hold open or send on a listener (API and proxy alike).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// A client gets this long to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// HTTP/1: time to send a request's head, counted from when the server is
    /// ready for it, so it is also how long a kept-alive connection may sit idle
    /// between requests (hyper's `header_read_timeout`).
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves this long is asked to close (HTTP/2
    /// GOAWAY; HTTP/1 no keep-alive), and dropped after as long again. Protocol
    /// upgrades (WebSockets) have left the listener by then and are not affected.
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue until one
    /// closes.
    pub max_connections: usize,
    /// Connections one client address holds at once (an IPv6 client: its /64);
    /// beyond it a new connection from that address is closed at once, so one client
    /// cannot take every slot of [`max_connections`](Self::max_connections).
    pub max_connections_per_ip: usize,
    /// HTTP/1: most request-head bytes (431 beyond); HTTP/2: most header-list bytes.
    pub max_header_bytes: usize,
    /// HTTP/1: most header fields in a request (431 beyond).
    pub max_headers: usize,
    /// HTTP/2: most concurrent streams on one connection.
    pub max_concurrent_streams: u32,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15 * 60),
            max_connections: 4096,
            max_connections_per_ip: 512,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_concurrent_streams: 250,
        }
    }
}

/// Serves `app` on `listener` over TLS with [`ConnLimits::default`]; see [`serve`].
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    serve(listener, Some(tls), app, ConnLimits::default(), shutdown).await;
}

/// Serves `app` on `listener` (over TLS when `tls` is given: HTTP/2 when ALPN picks
/// it, else HTTP/1.1; plain HTTP/1.1 otherwise) within `limits`, until `shutdown`
/// resolves; then stops accepting and waits for open connections to finish.
/// Handlers can extract `ConnectInfo<SocketAddr>` with the client's address.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_ip = Arc::new(PerClient::default());
    let limits = Arc::new(limits);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // At the cap, stop accepting: new clients wait in the backlog, and the
        // slow ones already in are dropped by their deadlines.
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // One client address over its share: closed at once, its slot freed.
        let Some(client_slot) = per_ip.take(peer.ip(), limits.max_connections_per_ip) else {
            debug!(%peer, cap = limits.max_connections_per_ip, "client address at its connection cap; closing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let stop = stop_rx.clone();
        let (acceptor, app, limits) = (acceptor.clone(), app.clone(), Arc::clone(&limits));
        tokio::spawn(async move {
            let _permit = permit;
            let _client_slot = client_slot;
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(req)
            });
            let Some(acceptor) = acceptor else {
                let (io, last) = Activity::wrap(tcp);
                let conn = http1(&limits)
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades();
                drive!(conn, last, &limits, stop, peer);
                return;
            };
            let stream =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
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
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let (io, last) = Activity::wrap(stream);
            if h2 {
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new())
                    // RFC 8441: lets HTTP/2 clients open WebSockets with extended CONNECT.
                    .enable_connect_protocol()
                    .max_concurrent_streams(limits.max_concurrent_streams)
                    .max_header_list_size(
                        u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
                    );
                let conn = b.serve_connection(TokioIo::new(io), service);
                drive!(conn, last, &limits, stop, peer);
            } else {
                let conn = http1(&limits)
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades();
                drive!(conn, last, &limits, stop, peer);
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a slot: all slots back means all connections closed.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// Open connections per client address (IPv6 clients by /64: one host usually holds
/// a whole /64, so counting single addresses would not bound it).
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One connection of a client; gives its count back when dropped.
struct ClientSlot {
    map: Arc<PerClient>,
    key: IpAddr,
}

impl PerClient {
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
        }
    }

    /// A slot for a connection from `ip`, unless it holds `cap` already.
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<ClientSlot> {
        let key = Self::key(ip);
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(key).or_insert(0);
        if *n >= cap.max(1) {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            map: Arc::clone(self),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.map.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

fn http1(limits: &ConnLimits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes);
    b
}

/// A socket that records when it last moved a byte (ms since `start`).
struct Activity<S> {
    inner: S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Activity<S> {
    fn wrap(inner: S) -> (Self, Arc<AtomicU64>) {
        let last = Arc::new(AtomicU64::new(0));
        (
            Activity {
                inner,
                start: Instant::now(),
                last: Arc::clone(&last),
            },
            last,
        )
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
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

    #[test]
    fn clients_are_counted_by_address_and_ipv6_by_slash_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{s}: {e}"));
        let map = Arc::new(PerClient::default());
        let a: Vec<_> = (0..2).filter_map(|_| map.take(ip("10.0.0.1"), 2)).collect();
        assert_eq!(a.len(), 2);
        assert!(map.take(ip("10.0.0.1"), 2).is_none());
        assert!(
            map.take(ip("::ffff:10.0.0.1"), 2).is_none(),
            "v4-mapped is v4"
        );
        let other = map.take(ip("10.0.0.2"), 2);
        assert!(other.is_some());
        let v6 = map.take(ip("2001:db8:1:2::1"), 1);
        assert!(v6.is_some());
        assert!(
            map.take(ip("2001:db8:1:2:ffff::9"), 1).is_none(),
            "same /64"
        );
        assert!(map.take(ip("2001:db8:1:3::1"), 1).is_some(), "another /64");
        drop(a);
        assert!(map.take(ip("10.0.0.1"), 2).is_some(), "slots come back");
        drop((other, v6));
        assert!(
            map.0.lock().unwrap_or_else(PoisonError::into_inner).len() <= 1,
            "empty entries are removed"
        );
    }
}
