//! Bad input gets a clear error with the right status and exit code, and the
//! manager survives a guest that writes garbage onto the agent channel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::Server;
use reqwest::Method;
use serde_json::{Value, json};

async fn call(srv: &Server, rb: reqwest::RequestBuilder) -> (u16, Value) {
    let _ = srv;
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_typed_errors() {
    let srv = Server::start();
    let post = |body: Value| srv.api(Method::POST, "/api/v1/sandboxes").json(&body);

    // Validation: each field named in a 400.
    for (body, field) in [
        (json!({"name": "Bad_Name"}), "name"),
        (json!({"name": ""}), "name"),
        (json!({"name": "x", "vcpus": 0}), "vcpus"),
        (json!({"name": "x", "vcpus": 99}), "vcpus"),
        (json!({"name": "x", "memory_mib": 10}), "memory_mib"),
        (json!({"name": "x", "memory_mib": 1048576}), "memory_mib"),
        (json!({"name": "x", "colour": "red"}), "colour"),
        (json!({"vcpus": 1}), "name"),
    ] {
        let (status, err) = call(&srv, post(body.clone())).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["code"], "invalid");
        assert!(
            err["message"].as_str().unwrap().contains(field),
            "{body}: {err}"
        );
    }
    let (status, err) = call(
        &srv,
        srv.api(Method::POST, "/api/v1/sandboxes")
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid")));
    let (status, err) = call(&srv, post(json!({"name": "x", "image": "nosuchimage"}))).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (404, Some("not_found")),
        "{err}"
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("atelier image build"),
        "{err}"
    );

    // Unknown ids and names.
    let (status, err) = call(
        &srv,
        srv.api(Method::GET, "/api/v1/sandboxes/sb-0000000000"),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    let (status, _) = call(&srv, srv.api(Method::DELETE, "/api/v1/sandboxes/ghost")).await;
    assert_eq!(status, 404);
    let (status, _) = call(&srv, srv.api(Method::GET, "/api/v1/nope")).await;
    assert_eq!(status, 404);

    // Auth: missing and wrong tokens.
    let anon = reqwest::Client::new();
    let (status, err) = call(&srv, anon.get(format!("{}/api/v1/sandboxes", srv.url))).await;
    assert_eq!((status, err["code"].as_str()), (401, Some("unauthorized")));
    let (status, _) = call(
        &srv,
        anon.get(format!("{}/api/v1/status", srv.url))
            .bearer_auth("atl_wrong"),
    )
    .await;
    assert_eq!(status, 401);
    let out = srv
        .cli()
        .env("ATELIER_TOKEN", "atl_wrong")
        .args(["sandbox", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "wrong token exits 3");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid API token"));

    // CLI exit codes map the kinds.
    assert_eq!(
        srv.run(&["sandbox", "create", "--name", "x", "--vcpus", "0"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        srv.run(&["sandbox", "create", "--name", "x", "--memory", "10"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        srv.run(&["sandbox", "show", "ghost"]).status.code(),
        Some(4)
    );
    assert_eq!(
        srv.run(&["sandbox", "exec", "ghost", "--", "true"])
            .status
            .code(),
        Some(4)
    );
    let out = srv
        .cli()
        .env("ATELIER_URL", "http://127.0.0.1:1")
        .args(["status"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "unreachable manager is unavailable"
    );

    // A real sandbox: name conflicts, bad exec and file requests, exec when stopped.
    srv.ok(&["sandbox", "create", "--name", "victim", "--memory", "512"]);
    let (status, err) = call(&srv, post(json!({"name": "victim"}))).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("conflict")));
    let (status, _) = call(
        &srv,
        srv.api(Method::POST, "/api/v1/sandboxes/victim/exec")
            .json(&json!({"command": []})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, err) = call(
        &srv,
        srv.api(Method::POST, "/api/v1/sandboxes/victim/exec")
            .json(&json!({"command": ["/no/such/binary"]})),
    )
    .await;
    assert_eq!(status, 404, "missing binary: {err}");
    let (status, _) = call(
        &srv,
        srv.api(Method::GET, "/api/v1/sandboxes/victim/files?path=relative"),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(
        &srv,
        srv.api(
            Method::PUT,
            "/api/v1/sandboxes/victim/files?path=/root/x&mode=999",
        )
        .body("x"),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(
        &srv,
        srv.api(
            Method::PUT,
            "/api/v1/sandboxes/victim/files?path=/no/such/dir/x",
        )
        .body("x"),
    )
    .await;
    assert_eq!(status, 404);

    // A guest that kills its agent and writes garbage (and an oversize length) onto
    // the agent's port: the manager neither crashes nor hangs, and the restarted
    // agent is usable again.
    let script = r#"
P=; for d in /sys/class/virtio-ports/*; do [ "$(cat $d/name)" = org.atelier.agent.0 ] && P=/dev/$(basename $d); done
W=; for p in /proc/[0-9]*; do n=${p#/proc/}; [ "$n" != 1 ] && case "$(readlink $p/exe)" in */atelier-agent) W=$n;; esac; done
( kill -9 $W; for i in 1 2 3 4 5 6 7 8 9 10; do
    { printf '\247ATL\377\377\377\177'; printf '\247ATL\144\000\000\000'; head -c 100 /dev/urandom;
      head -c 300000 /dev/urandom; } > $P 2>/dev/null && break; sleep 0.05; done ) </dev/null >/dev/null 2>&1 &
"#;
    let (status, _) = call(
        &srv,
        srv.api(Method::POST, "/api/v1/sandboxes/victim/exec")
            .json(&json!({"command": ["sh", "-c", script]})),
    )
    .await;
    assert!(status == 200 || status == 503, "{status}");
    let start = Instant::now();
    loop {
        let out = srv.run(&["sandbox", "exec", "victim", "--", "echo", "alive"]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "agent never came back:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        srv.ok(&["status"]).contains("manager:"),
        "manager still answers"
    );

    srv.ok(&["sandbox", "stop", "victim"]);
    let (status, err) = call(
        &srv,
        srv.api(Method::POST, "/api/v1/sandboxes/victim/exec")
            .json(&json!({"command": ["true"]})),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (409, Some("conflict")));
    assert!(
        err["message"].as_str().unwrap().contains("stopped"),
        "{err}"
    );
    let (status, _) = call(&srv, srv.api(Method::POST, "/api/v1/sandboxes/victim/stop")).await;
    assert_eq!(status, 200, "stopping a stopped sandbox is a no-op");
    srv.ok(&["sandbox", "rm", "victim"]);
    srv.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_carry_a_request_id_and_no_host_detail() {
    // A QEMU that is not there: every create fails with 503 (unavailable), and the
    // real cause names a host path that must reach the log, not the client.
    let missing = "/var/tmp/atelier-test-no-such-dir/qemu-system-x86_64";
    let srv = Server::start_with(&[("ATELIER_QEMU", missing), ("ATELIER_ACCEL", "tcg")]);
    let resp = srv
        .api(Method::POST, "/api/v1/sandboxes")
        .header("x-request-id", "test-req-42")
        .json(&json!({"name": "noqemu"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-request-id"], "test-req-42");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "unavailable", "{body}");
    assert_eq!(body["request_id"], "test-req-42", "{body}");
    let text = body.to_string();
    for leak in [missing, "/var/tmp", srv.data_dir.path().to_str().unwrap()] {
        assert!(!text.contains(leak), "body leaks {leak}: {text}");
    }
    // The log line about it carries the request id and the real cause.
    srv.wait_log("test-req-42", Duration::from_secs(10));
    let log = srv.log();
    assert!(
        log.lines()
            .any(|l| l.contains("test-req-42") && l.contains(missing)),
        "no log line with the request id and the cause:\n{log}"
    );

    // Every answer carries an id, fresh when the client sent none (or a bad one).
    let resp = srv
        .api(Method::GET, "/api/v1/sandboxes/nope")
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.len() >= 8 && !id.contains(' '), "{id}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["request_id"], id.as_str());
}

#[test]
fn serve_notifies_systemd_when_ready() {
    // What systemd's Type=notify listens on: a datagram socket named by NOTIFY_SOCKET.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let srv = Server::start_with(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("no readiness notification");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.contains("READY=1"), "{msg}");
    // Ready means serving.
    assert!(srv.ok(&["status"]).contains("manager:   ok"));
}
