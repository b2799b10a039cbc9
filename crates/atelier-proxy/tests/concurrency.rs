//! 200 simultaneous connections through the proxy (its own test binary, so its sockets
//! do not compete with the other tests' for file descriptors).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use atelier_proxy::Scheme;
use common::*;

const N: usize = 200;
/// A safety bound so a regression fails instead of hanging; nothing is timed.
const BOUND: Duration = Duration::from_secs(300);

async fn gather_all(client: reqwest::Client, url: String) {
    let requests = (0..N).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.text().await.unwrap()
        })
    });
    let bodies = tokio::time::timeout(BOUND, futures::future::join_all(requests))
        .await
        .expect("all requests finish");
    for body in bodies {
        assert_eq!(body.unwrap(), "gathered");
    }
}

/// The upstream answers none of the N requests until all N are in flight at once, so
/// success means N concurrent connections through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_plain_connections() {
    let upstream = spawn_upstream(N).await;
    let front = spawn_plain(front_app(upstream, "localhost", Scheme::Http)).await;
    let host = "sandbox-sb-abc123xyz0.localhost";
    let client = reqwest::Client::builder()
        .resolve(host, front)
        .build()
        .unwrap();
    gather_all(client, format!("http://{host}:{}/gather", front.port())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_tls_connections() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = spawn_upstream(N).await;
    let front = spawn_tls(
        front_app(upstream, "localhost", Scheme::Https),
        dir.path(),
        &["localhost"],
    )
    .await;
    let host = "sandbox-sb-abc123xyz0.localhost";
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(front.ca_pem.as_bytes()).unwrap())
        .resolve(host, front.addr)
        .http1_only()
        .build()
        .unwrap();
    gather_all(
        client,
        format!("https://{host}:{}/gather", front.addr.port()),
    )
    .await;
}
