//! Ten sandboxes created, used and deleted concurrently, with no failure and no leak.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use reqwest::Method;
use serde_json::{Value, json};

const N: usize = 10;

#[tokio::test(flavor = "multi_thread")]
async fn ten_concurrent_sandboxes() {
    let srv = Server::start();
    let creates = (0..N).map(|i| {
        let rb = srv
            .api(Method::POST, "/api/v1/sandboxes")
            .json(&json!({"name": format!("c{i}"), "memory_mib": 512, "vcpus": 1}));
        async move {
            let resp = rb.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    });
    for (status, body) in futures::future::join_all(creates).await {
        assert_eq!(status, 201, "{body}\n{}", srv.log());
        assert_eq!(body["state"], "running");
    }
    assert_eq!(srv.vmm_pids().len(), N);
    let execs = (0..N).map(|i| {
        let rb = srv
            .api(Method::POST, &format!("/api/v1/sandboxes/c{i}/exec"))
            .json(&json!({"command": ["hostname"]}));
        async move { rb.send().await.unwrap().text().await.unwrap() }
    });
    for (i, out) in futures::future::join_all(execs)
        .await
        .into_iter()
        .enumerate()
    {
        assert!(out.contains("\"exit\""), "{out}");
        let want = base64_of(&format!("c{i}\n"));
        assert!(out.contains(&want), "sandbox c{i} answered {out}");
    }
    let deletes = (0..N).map(|i| {
        srv.api(Method::DELETE, &format!("/api/v1/sandboxes/c{i}"))
            .send()
    });
    for r in futures::future::join_all(deletes).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    srv.assert_clean();
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
