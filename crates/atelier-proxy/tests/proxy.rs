//! End-to-end tests: a real upstream, the proxy in front of it, clients on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use atelier_proxy::{Scheme, redirect_to_https};
use bytes::Bytes;
use common::tls_client;
use common::*;
use futures::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;

const HOST: &str = "sandbox-sb-abc123xyz0.localhost";
const TLS_DOMAIN: &str = "atelier.test";
const TLS_HOST: &str = "sandbox-sb-abc123xyz0.atelier.test";

/// A plain-HTTP client that maps every test host name to `addr`.
fn client_for(addr: SocketAddr, hosts: &[&str]) -> reqwest::Client {
    let mut b = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    for h in hosts {
        b = b.resolve(h, addr);
    }
    b.build().unwrap()
}

async fn plain_proxy() -> SocketAddr {
    let upstream = spawn_upstream(1).await;
    spawn_plain(front_app(upstream, "localhost", Scheme::Http)).await
}

#[tokio::test]
async fn get_strips_credentials_and_sets_forwarded_headers() {
    let front = plain_proxy().await;
    let port = front.port();
    let resp = client_for(front, &[HOST])
        .get(format!(
            "http://{HOST}:{port}/echo?x=1&atelier_token=secret&y=2"
        ))
        .header("authorization", "Bearer secret")
        .header("cookie", "a=1; atelier_session=secret; b=2")
        .header("x-forwarded-for", "6.6.6.6")
        .header("connection", "x-private")
        .header("x-private", "hop")
        .header("x-app", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    let h = &echo["headers"];
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["uri"], "/echo?x=1&y=2");
    assert!(h.get("authorization").is_none(), "{h}");
    assert_eq!(h["cookie"][0], "a=1; b=2");
    assert_eq!(h["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], format!("{HOST}:{port}"));
    assert_eq!(h["host"][0], format!("{HOST}:{port}"));
    assert!(h.get("x-private").is_none(), "{h}");
    assert_eq!(h["x-app"][0], "kept");
    assert!(!echo.to_string().contains("secret"), "{echo}");

    // Unknown hosts never reach the upstream.
    let resp = client_for(front, &["other.localhost"])
        .get(format!("http://other.localhost:{port}/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn upstream_cannot_set_the_session_cookie() {
    let front = plain_proxy().await;
    let resp = client_for(front, &[HOST])
        .get(format!("http://{HOST}:{}/set-cookie", front.port()))
        .send()
        .await
        .unwrap();
    let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["app=1; Path=/"]);
}

#[tokio::test]
async fn streams_256_mib_up_and_down_intact() {
    const SIZE: u64 = 256 * 1024 * 1024;
    let front = plain_proxy().await;
    let client = client_for(front, &[HOST]);
    let base = format!("http://{HOST}:{}", front.port());
    let expected = payload_digest(SIZE).await;

    let resp = client
        .post(format!("{base}/upload"))
        .body(reqwest::Body::wrap_stream(payload(SIZE)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got["len"], SIZE);
    assert_eq!(got["sha256"], expected);

    let resp = client
        .get(format!("{base}/download/{SIZE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let (mut hasher, mut len) = (Sha256::new(), 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    assert_eq!(len, SIZE);
    assert_eq!(hex(&hasher.finalize()), expected);
}

/// Sends a text and a binary message and expects both echoed.
async fn ws_roundtrip<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text("hello through the proxy"))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello through the proxy")
    );
    let binary: Vec<u8> = (0..=255).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(binary));
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn websocket_echo_over_plain_http() {
    let front = plain_proxy().await;
    let req = format!("ws://{HOST}:{}/ws?atelier_token=t", front.port())
        .into_client_request()
        .unwrap();
    let tcp = TcpStream::connect(front).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws_roundtrip(&mut ws).await;
}

async fn tls_proxy(dir: &std::path::Path) -> TlsFront {
    let upstream = spawn_upstream(1).await;
    spawn_tls(
        front_app(upstream, TLS_DOMAIN, Scheme::Https),
        dir,
        &[TLS_DOMAIN, "localhost"],
    )
    .await
}

#[tokio::test]
async fn websocket_echo_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let front = tls_proxy(dir.path()).await;
    let config = tls_client::trusting(&front.ca_pem, &[b"http/1.1"]);
    let tls = tls_client::connect(config, front.addr, TLS_HOST).await;
    let req = format!("wss://{TLS_HOST}:{}/ws", front.addr.port())
        .into_client_request()
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws_roundtrip(&mut ws).await;
}

#[tokio::test]
async fn websocket_echo_over_http2_extended_connect() {
    let dir = tempfile::tempdir().unwrap();
    let front = tls_proxy(dir.path()).await;
    let config = tls_client::trusting(&front.ca_pem, &[b"h2"]);
    let tls = tls_client::connect(config, front.addr, TLS_HOST).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{TLS_HOST}/ws"))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    ws_roundtrip(&mut ws).await;
}

#[tokio::test]
async fn http2_client_over_tls_then_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let front = tls_proxy(dir.path()).await;
    let dev_host = "dev-web-sb-abc123xyz0.atelier.test";
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(front.ca_pem.as_bytes()).unwrap())
        .resolve(TLS_HOST, front.addr)
        .resolve(dev_host, front.addr)
        .build()
        .unwrap();
    for host in [TLS_HOST, dev_host] {
        let resp = client
            .get(format!("https://{host}:{}/echo", front.addr.port()))
            .header("cookie", "atelier_session=s")
            .header("cookie", "theme=dark")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        let echo: Value = resp.json().await.unwrap();
        let h = &echo["headers"];
        assert_eq!(echo["version"], "HTTP/1.1");
        assert_eq!(h["host"][0], format!("{host}:{}", front.addr.port()));
        assert_eq!(h["x-forwarded-proto"][0], "https");
        assert_eq!(h["cookie"], serde_json::json!(["theme=dark"]));
    }
    drop(client);
    front.shutdown.send(()).unwrap();
    front.done.await.unwrap();
}

#[tokio::test]
async fn sni_selects_a_leaf_per_name_and_the_default_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let front = tls_proxy(dir.path()).await;
    let trusting = tls_client::trusting(&front.ca_pem, &[]);
    for name in [
        TLS_HOST,
        "dev-web-sb-abc123xyz0.atelier.test",
        "sandbox-sb-0000000000.localhost",
    ] {
        // Verified against the local CA for this very name, then the SAN checked directly.
        let tls = tls_client::connect(trusting.clone(), front.addr, name).await;
        assert_eq!(tls_client::peer_dns_names(&tls), [name]);
    }
    let any = tls_client::accepting_any();
    for name in ["evil.example.com", "atelier.test.evil.com", "127.0.0.1"] {
        let tls = tls_client::connect(any.clone(), front.addr, name).await;
        assert_eq!(
            tls_client::peer_dns_names(&tls),
            [TLS_DOMAIN, "*.atelier.test"],
            "{name}"
        );
    }
}

#[tokio::test]
async fn upstream_down_gives_502() {
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let front = spawn_plain(front_app(dead, "localhost", Scheme::Http)).await;
    let resp = client_for(front, &[HOST])
        .get(format!(
            "http://{HOST}:{}/echo?atelier_token=secret",
            front.port()
        ))
        .header("authorization", "Bearer secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains(&format!("nothing is listening on port {}", dead.port())),
        "{body}"
    );
    assert!(!body.contains("secret"), "{body}");
}

#[tokio::test]
async fn port_80_redirects_and_serves_acme_challenges() {
    let challenges = Arc::new(RwLock::new(HashMap::from([(
        "tok123".to_owned(),
        "tok123.keyauth".to_owned(),
    )])));
    let front = spawn_plain(redirect_to_https(challenges, 8443)).await;
    let client = client_for(front, &[HOST]);
    let base = format!("http://{HOST}:{}", front.port());
    let resp = client.get(format!("{base}/a/b?c=1")).send().await.unwrap();
    assert_eq!(resp.status(), 301);
    assert_eq!(
        resp.headers()["location"],
        format!("https://{HOST}:8443/a/b?c=1")
    );
    let resp = client
        .get(format!("{base}/.well-known/acme-challenge/tok123"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "tok123.keyauth");
    let resp = client
        .get(format!("{base}/.well-known/acme-challenge/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}
