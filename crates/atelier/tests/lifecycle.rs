//! End to end through the CLI and the API with real VMs: create, exec (streamed),
//! cp both ways, stop/start, list/show, rm — and nothing left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::Server;
use futures::StreamExt;
use sha2::{Digest, Sha256};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_lifecycle_end_to_end() {
    let srv = Server::start();

    // Create through the CLI; exit 0 only when ready.
    let created = json(&srv.ok(&[
        "--json", "sandbox", "create", "--name", "demo", "--vcpus", "2", "--memory", "2048",
    ]));
    assert_eq!(created["state"], "running");
    assert_eq!(created["vcpus"], 2);
    let id = created["id"].as_str().unwrap().to_owned();

    // Exec: output and exit code propagate.
    let out = srv.run(&["sandbox", "exec", "demo", "--", "uname", "-a"]);
    assert!(out.status.success());
    let uname = String::from_utf8_lossy(&out.stdout);
    assert!(uname.starts_with("Linux demo "), "{uname}");
    let out = srv.run(&[
        "sandbox",
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "echo oops >&2; exit 42",
    ]);
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "oops");

    // Streaming through the API: each line arrives when printed, in order.
    let resp = srv
        .api(reqwest::Method::POST, "/api/v1/sandboxes/demo/exec")
        .json(&serde_json::json!({"command": ["sh", "-c", "for i in 1 2 3; do echo $i; sleep 1; done"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let start = Instant::now();
    let mut arrivals = Vec::new();
    let mut buf = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut exit = None;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let ev: serde_json::Value = serde_json::from_slice(&line).unwrap();
            match ev["type"].as_str().unwrap() {
                "stdout" => {
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(ev["data"].as_str().unwrap())
                        .unwrap();
                    for l in String::from_utf8(data).unwrap().lines() {
                        arrivals.push((l.to_owned(), start.elapsed()));
                    }
                }
                "exit" => exit = Some(ev["code"].as_i64().unwrap()),
                _ => {}
            }
        }
    }
    assert_eq!(exit, Some(0));
    let lines: Vec<&str> = arrivals.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(lines, ["1", "2", "3"]);
    // Streamed, not buffered: the first line came well before the last was printed.
    assert!(
        arrivals[2].1 - arrivals[0].1 >= Duration::from_millis(1500),
        "{arrivals:?}"
    );

    // The CLI streams too, and env/cwd/timeout reach the guest.
    let out = srv.ok(&[
        "sandbox",
        "exec",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "demo",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING $(pwd)\"",
    ]);
    assert_eq!(out.trim(), "hi there /tmp");
    let out = srv.run(&[
        "sandbox",
        "exec",
        "--timeout",
        "1",
        "demo",
        "--",
        "sleep",
        "30",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));

    // cp both ways with a 50 MiB file.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("big");
    let mut data = vec![0u8; 50 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    std::fs::write(&local, &data).unwrap();
    let want = hex::encode(Sha256::digest(&data));
    srv.ok(&["sandbox", "cp", local.to_str().unwrap(), "demo:/root/big"]);
    let in_guest = srv.ok(&["sandbox", "exec", "demo", "--", "sha256sum", "/root/big"]);
    assert!(in_guest.starts_with(&want), "{in_guest} vs {want}");
    let back = dir.path().join("back");
    srv.ok(&["sandbox", "cp", "demo:/root/big", back.to_str().unwrap()]);
    assert_eq!(
        hex::encode(Sha256::digest(std::fs::read(&back).unwrap())),
        want
    );
    let out = srv.run(&[
        "sandbox",
        "cp",
        "demo:/no/such/file",
        back.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "missing guest file is not-found"
    );

    // list/show, human and JSON.
    let list = json(&srv.ok(&["--json", "sandbox", "list"]));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(srv.ok(&["sandbox", "list"]).contains("demo"));
    let shown = json(&srv.ok(&["--json", "sandbox", "show", &id]));
    assert_eq!(shown["name"], "demo");
    assert_eq!(shown["agent"], "ready");
    let status = json(&srv.ok(&["--json", "status"]));
    assert!(
        ["kvm", "tcg"].contains(&status["accel"].as_str().unwrap()),
        "{status}"
    );
    assert_eq!(status["sandboxes"]["running"], 1);

    // Console log holds the kernel and agent output.
    let logs = srv.ok(&["sandbox", "logs", "demo"]);
    assert!(logs.contains("atelier-agent: ready"), "{logs}");

    // stop keeps the disk; exec is refused; start brings the file back.
    srv.ok(&[
        "sandbox",
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "echo kept > /root/kept && sync",
    ]);
    let stopped = json(&srv.ok(&["--json", "sandbox", "stop", "demo"]));
    assert_eq!(stopped["state"], "stopped");
    assert!(srv.vmm_pids().is_empty(), "stop leaves no vmm");
    assert_eq!(srv.disks().len(), 1, "stop keeps the disk");
    let out = srv.run(&["sandbox", "exec", "demo", "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "exec on a stopped sandbox is a conflict"
    );
    srv.ok(&["sandbox", "start", "demo"]);
    assert_eq!(
        srv.ok(&["sandbox", "exec", "demo", "--", "cat", "/root/kept"])
            .trim(),
        "kept"
    );

    // rm reclaims everything.
    srv.ok(&["sandbox", "rm", "demo"]);
    assert_eq!(srv.run(&["sandbox", "show", "demo"]).status.code(), Some(4));
    srv.assert_clean();
}
