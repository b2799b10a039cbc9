//! The built-in proxy with real VMs: a dev server in the guest (HTTP, header echo,
//! large streamed bodies, a WebSocket echo) reached as `dev-{name}-{id}.localhost`
//! through the manager's listener and its TLS listener, with auth on every route;
//! 200 concurrent connections; the route disappears when the dev command stops;
//! and after a kill -9 of the manager routes, TAPs and addresses are as before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Server, free_port};
use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

const SERVER_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/assets/devserver.py");

/// Creates sandbox `name` and starts the test dev server in it as dev command `app`
/// on port 8000. Returns the sandbox id.
fn sandbox_with_dev_server(srv: &Server, name: &str) -> String {
    let sb = json(&srv.ok(&["--json", "sandbox", "create", "--name", name]));
    srv.ok(&[
        "sandbox",
        "cp",
        SERVER_PY,
        &format!("{name}:/root/devserver.py"),
    ]);
    srv.ok(&[
        "dev",
        "start",
        name,
        "app",
        "--port",
        "8000",
        "--",
        "python3",
        "/root/devserver.py",
        "8000",
    ]);
    sb["id"].as_str().unwrap().to_owned()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Waits until `GET /` through the proxy answers 200.
async fn wait_route(srv: &Server, host: &str) {
    let start = Instant::now();
    loop {
        let r = client()
            .get(format!("{}/", srv.url))
            .header("Host", host)
            .bearer_auth(&srv.token)
            .send()
            .await;
        if matches!(&r, Ok(r) if r.status() == 200) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "route {host} never answered: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn pattern_sha(n: usize) -> String {
    let block: Vec<u8> = (0..256 * 256).map(|i| (i % 256) as u8).collect();
    let mut h = Sha256::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(block.len());
        h.update(&block[..k]);
        left -= k;
    }
    hex::encode(h.finalize())
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_command_urls_with_auth_websocket_tls_and_load() {
    let https = format!("127.0.0.1:{}", free_port());
    let srv = Server::start_with(&[("ATELIER_HTTPS_LISTEN", &https)]);
    let id = sandbox_with_dev_server(&srv, "web");
    let host = format!("dev-app-{id}.localhost");
    wait_route(&srv, &host).await;
    let dev = json(&srv.ok(&["--json", "dev", "list", "web"]));
    assert_eq!(dev[0]["name"], "app");
    assert_eq!(dev[0]["listening"], true);
    assert_eq!(
        dev[0]["url"],
        format!("https://{host}:{}/", https.rsplit(':').next().unwrap())
    );
    let c = client();
    let url = |p: &str| format!("{}{p}", srv.url);

    // No credentials: 401 for API clients, the login form for browsers. The same
    // for a host that does not exist, so nothing is revealed before auth.
    let r = c.get(url("/")).header("Host", &host).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(url("/x"))
        .header("Host", "dev-app-sb-0000000000.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(url("/page?q=1"))
        .header("Host", &host)
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection());
    assert_eq!(
        r.headers()["location"],
        format!("http://localhost/__atelier/authorize?host={host}&next=/page%3Fq%3D1")
    );
    let r = c
        .get(url("/"))
        .header("Host", &host)
        .bearer_auth("atl_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A token: the guest answers, and never sees our credentials.
    let r = c
        .get(url("/headers"))
        .header("Host", &host)
        .bearer_auth(&srv.token)
        .header("Cookie", "theirs=1; atelier_session=abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: serde_json::Value = r.json().await.unwrap();
    let h = &echo["headers"];
    assert!(h.get("authorization").is_none(), "{h}");
    assert_eq!(h["cookie"], "theirs=1");
    assert_eq!(h["x-forwarded-host"], host);
    // A token in the query is swapped for this host's cookie by a redirect that
    // drops it; the guest never sees it.
    let r = c
        .get(url(&format!("/headers?a=1&atelier_token={}", srv.token)))
        .header("Host", &host)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], "/headers?a=1");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(!cookie.contains("Domain="), "{cookie}");
    let r = c
        .get(url("/headers?a=1"))
        .header("Host", &host)
        .header("Cookie", cookie.split(';').next().unwrap())
        .header("Sec-Fetch-Site", "none")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["path"], "/headers?a=1");

    // Browser sign-in happens on the manager's origin only; a one-time code then
    // opens this one host with a host-only cookie.
    let r = c
        .post(url("/login"))
        .form(&[("token", "atl_nope"), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(url("/login"))
        .form(&[("token", srv.token.as_str()), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && !cookie.contains("Domain="),
        "{cookie}"
    );
    let manager = cookie.split(';').next().unwrap().to_owned();
    let r = c
        .get(url("/"))
        .header("Host", &host)
        .header("Cookie", &manager)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the manager's cookie opens no sandbox");
    let r = c
        .get(url(&format!("/__atelier/authorize?host={host}&next=/")))
        .header("Cookie", &manager)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let code_path = &loc[loc.find("/__atelier/session").unwrap()..];
    let r = c
        .get(url(code_path))
        .header("Host", &host)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    assert_eq!(r.headers()["location"], "/");
    let session = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let r = c
        .get(url("/"))
        .header("Host", &host)
        .header("Cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello from the dev server\n");

    // Large bodies stream through intact, both ways.
    let n = 32 << 20;
    let r = c
        .get(url(&format!("/big/{n}")))
        .header("Host", &host)
        .bearer_auth(&srv.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut h = Sha256::new();
    let mut got = 0usize;
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        got += chunk.len();
        h.update(&chunk);
    }
    assert_eq!(got, n);
    assert_eq!(hex::encode(h.finalize()), pattern_sha(n));
    let chunks = futures::stream::iter((0..n / 65536).map(|_| {
        Ok::<_, std::io::Error>(bytes::Bytes::from(
            (0..65536).map(|i| (i % 256) as u8).collect::<Vec<u8>>(),
        ))
    }));
    let r = c
        .post(url("/sha"))
        .header("Host", &host)
        .bearer_auth(&srv.token)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), format!("{n} {}", pattern_sha(n)));

    // WebSocket echo through the proxy.
    let port: u16 = srv.url.rsplit(':').next().unwrap().parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = tokio_tungstenite::tungstenite::http::Request::builder()
        .uri(format!("ws://{host}/ws"))
        .header("Host", &host)
        .header("Authorization", format!("Bearer {}", srv.token))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello ws")).await.unwrap();
    let big: Vec<u8> = (0..200_000).map(|i| (i * 7 % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let m @ (Message::Text(_) | Message::Binary(_)) = ws.next().await.unwrap().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got[0], Message::text("hello ws"));
    assert_eq!(got[1], Message::binary(big));
    let _ = ws.close(None).await;

    // TLS with the local CA: each name gets a certificate that verifies for it
    // (SNI), HTTP/2 is negotiated, and auth still applies.
    let ca = srv.ok(&["tls", "ca"]);
    let https_addr: std::net::SocketAddr = https.parse().unwrap();
    let sandbox_host = format!("sandbox-{id}.localhost");
    let tls = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .resolve(&host, https_addr)
        .resolve(&sandbox_host, https_addr)
        .build()
        .unwrap();
    let r = tls
        .get(format!("https://{host}:{}/", https_addr.port()))
        .bearer_auth(&srv.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let r = tls
        .get(format!("https://{host}:{}/", https_addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // sandbox-{id} has its own certificate; nothing listens on its port (4096) here.
    let r = tls
        .get(format!("https://{sandbox_host}:{}/", https_addr.port()))
        .bearer_auth(&srv.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);

    // 200 concurrent connections through the proxy to one dev server.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (u, host, token) = (
            url(&format!("/headers?n={i}")),
            host.clone(),
            srv.token.clone(),
        );
        tasks.spawn(async move {
            // A client each: its own connection.
            let r = reqwest::Client::new()
                .get(u)
                .header("Host", host)
                .bearer_auth(token)
                .timeout(Duration::from_secs(240))
                .send()
                .await?;
            Ok::<_, reqwest::Error>(r.status())
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(s) if s == 200 => ok += 1,
            other => panic!("a request failed: {other:?}"),
        }
    }
    assert_eq!(ok, 200);

    // Stopping the dev command removes the route.
    srv.ok(&["dev", "stop", "web", "app"]);
    let r = c
        .get(url("/"))
        .header("Host", &host)
        .bearer_auth(&srv.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let listed = json(&srv.ok(&["--json", "dev", "list", "web"]));
    assert_eq!(listed[0]["state"], "stopped");

    srv.ok(&["sandbox", "rm", "web"]);
    srv.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_with_three_sandboxes_keeps_routes_taps_and_addresses() {
    let mut srv = Server::start();
    let id = sandbox_with_dev_server(&srv, "s1");
    srv.ok(&["sandbox", "create", "--name", "s2"]);
    srv.ok(&["sandbox", "create", "--name", "s3", "--egress", "deny-all"]);
    let host = format!("dev-app-{id}.localhost");
    wait_route(&srv, &host).await;
    let ips = |srv: &Server| -> Vec<String> {
        ["s1", "s2", "s3"]
            .iter()
            .map(|n| {
                json(&srv.ok(&["--json", "sandbox", "show", n]))["ip"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect()
    };
    let before_ips = ips(&srv);
    let mut before_ports = srv.net.ports();
    before_ports.sort();
    let mut before_elems = srv.net.elements();
    before_elems.sort();
    assert_eq!(before_ports.len(), 3);

    srv.kill9();
    srv.restart(&[]);
    // The VMs were adopted: same addresses, same TAPs on the bridge, same firewall
    // state, and the dev route comes back.
    wait_route(&srv, &host).await;
    assert_eq!(ips(&srv), before_ips);
    let mut ports = srv.net.ports();
    ports.sort();
    assert_eq!(ports, before_ports);
    let mut elems = srv.net.elements();
    elems.sort();
    assert_eq!(elems, before_elems);
    let journal = srv.journal();
    assert_eq!(
        journal.iter().filter(|r| r.starts_with("tap ")).count(),
        3,
        "{journal:?}"
    );
    assert_eq!(
        journal.iter().filter(|r| r.starts_with("ip ")).count(),
        3,
        "{journal:?}"
    );

    for n in ["s1", "s2", "s3"] {
        srv.ok(&["sandbox", "rm", n]);
    }
    srv.assert_clean();
}
