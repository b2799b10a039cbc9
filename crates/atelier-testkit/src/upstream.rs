//! An upstream HTTP test server (echo, streamed upload and download with digests,
//! WebSocket echo, a barrier for concurrency, Set-Cookie) and deterministic payloads:
//! what proxy tests forward to.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Barrier;

/// Size of each chunk of [`payload`].
pub const CHUNK: usize = 64 * 1024;

/// Deterministic payload of `total` bytes in 64 KiB chunks, each stamped with its index so
/// reordered or repeated chunks change the digest; generated lazily, never held whole.
pub fn payload(total: u64) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    let base = BASE.get_or_init(|| (0..CHUNK).map(|i| (i * 7 % 251) as u8).collect());
    let chunks = total.div_ceil(CHUNK as u64);
    futures::stream::iter(0..chunks).map(move |i| {
        let len = (total - i * CHUNK as u64).min(CHUNK as u64) as usize;
        let mut chunk = base[..len].to_vec();
        let stamp = i.to_le_bytes();
        let n = stamp.len().min(len);
        chunk[..n].copy_from_slice(&stamp[..n]);
        Ok(Bytes::from(chunk))
    })
}

/// Hex sha256 of `payload(total)`, computed chunk by chunk.
pub async fn payload_digest(total: u64) -> String {
    let mut hasher = Sha256::new();
    let mut s = std::pin::pin!(payload(total));
    while let Some(chunk) = s.next().await {
        hasher.update(chunk.unwrap());
    }
    hex(&hasher.finalize())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone)]
struct UpstreamState {
    gather: Arc<Barrier>,
}

/// Starts the upstream test server (HTTP/1.1 via axum::serve); `gather` is how many
/// `/gather` requests must be in flight together before any of them is answered.
pub async fn spawn_upstream(gather: usize) -> SocketAddr {
    let app = Router::new()
        .route("/echo", any(echo))
        .route("/upload", post(upload))
        .route("/download/{n}", get(download))
        .route("/ws", get(ws))
        .route("/gather", get(gather_handler))
        .route("/set-cookie", get(set_cookie))
        .with_state(UpstreamState {
            gather: Arc::new(Barrier::new(gather.max(1))),
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn echo(req: Request) -> axum::Json<serde_json::Value> {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.to_string())
            .or_default()
            .push(v.to_str().unwrap_or("<binary>").to_owned());
    }
    axum::Json(serde_json::json!({
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    }))
}

async fn upload(body: Body) -> axum::Json<serde_json::Value> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    axum::Json(serde_json::json!({ "len": len, "sha256": hex(&hasher.finalize()) }))
}

async fn download(UrlPath(n): UrlPath<u64>) -> Body {
    Body::from_stream(payload(n))
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(t),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn gather_handler(State(st): State<UpstreamState>) -> &'static str {
    st.gather.wait().await;
    "gathered"
}

/// Tries to plant the manager's session cookie (plain and `__Host-` forms) and
/// sends `Set-Cookie` values a browser might parse differently from a proxy; only
/// `app=1; Path=/` is well formed and harmless. (`AppendHeaders`: a plain array
/// would insert, keeping only the last.)
async fn set_cookie() -> impl IntoResponse {
    (
        axum::response::AppendHeaders([
            (
                header::SET_COOKIE,
                "atelier_session=planted; Domain=localhost",
            ),
            (
                header::SET_COOKIE,
                "__Host-atelier_session=planted; Path=/; Secure",
            ),
            (header::SET_COOKIE, "app=1; Path=/"),
            (header::SET_COOKIE, "no-equals-sign; Path=/"),
            (header::SET_COOKIE, "bad name=1"),
            (header::SET_COOKIE, "=nameless"),
        ]),
        "ok",
    )
}

/// Serves `app` over plain HTTP on an ephemeral port.
pub async fn spawn_plain(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    addr
}
