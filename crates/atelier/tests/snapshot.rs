//! Spawning from memory snapshots with real VMs: after a first (cold) create, the
//! manager saves a template of the booted guest; later creates restore it. Restored
//! sandboxes get their own hostname, machine-id, clock and random stream, and a
//! crash during a template build leaves nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Server;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

fn wait_template(srv: &Server) {
    let start = Instant::now();
    loop {
        let st = json(&srv.ok(&["--json", "status"]));
        if !st["templates"].as_array().unwrap().is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no template was built:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn restored_sandboxes_have_their_own_identity() {
    let srv = Server::start();
    let first = json(&srv.ok(&[
        "--json", "sandbox", "create", "--name", "first", "--memory", "512",
    ]));
    assert_eq!(first["booted_from"], "boot");
    wait_template(&srv);

    let mut seen = Vec::new();
    for name in ["r1", "r2"] {
        let s = json(&srv.ok(&[
            "--json", "sandbox", "create", "--name", name, "--memory", "512",
        ]));
        assert_eq!(s["booted_from"], "snapshot", "{s}");
        let out = srv.ok(&["sandbox", "exec", name, "--", "sh", "-c",
            "hostname; cat /etc/machine-id; date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], name, "hostname: {out}");
        assert_eq!(lines[1].len(), 32, "machine-id: {out}");
        let guest_now: u64 = lines[2].parse().unwrap();
        let host_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            guest_now.abs_diff(host_now) <= 5,
            "guest clock {guest_now} vs host {host_now}"
        );
        seen.push((lines[1].to_owned(), lines[3].to_owned()));
    }
    assert_ne!(seen[0].0, seen[1].0, "machine-ids differ");
    assert_ne!(seen[0].1, seen[1].1, "random streams differ");
    // Pause frees the VMM and keeps running processes and files; resume continues.
    srv.ok(&["sandbox", "exec", "r2", "--", "sh", "-c",
        "echo kept > /tmp/f; nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.2; done' >/dev/null 2>&1 &"]);
    std::thread::sleep(Duration::from_secs(1));
    let paused = json(&srv.ok(&["--json", "sandbox", "pause", "r2"]));
    assert_eq!(paused["state"], "paused");
    let r2 = paused["id"].as_str().unwrap().to_owned();
    let marker = format!("{}/sandboxes/{r2}/", srv.data_dir.path().display());
    assert!(
        common::pids_matching(&marker).is_empty(),
        "no VMM while paused"
    );
    assert_eq!(
        srv.run(&["sandbox", "exec", "r2", "--", "true"])
            .status
            .code(),
        Some(5)
    );
    let before: u64 = std::fs::metadata(
        srv.data_dir
            .path()
            .join(format!("sandboxes/{r2}/paused.state")),
    )
    .unwrap()
    .len();
    assert!(before > 0);
    srv.ok(&["sandbox", "resume", "r2"]);
    let n1: u64 = srv
        .ok(&["sandbox", "exec", "r2", "--", "cat", "/tmp/n"])
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let out = srv.ok(&[
        "sandbox",
        "exec",
        "r2",
        "--",
        "sh",
        "-c",
        "cat /tmp/n; cat /tmp/f",
    ]);
    let n2: u64 = out.lines().next().unwrap().parse().unwrap();
    assert!(
        n2 > n1,
        "the process kept running after resume: {n1} -> {n2}"
    );
    assert!(out.contains("kept"));

    // Fork: the copy starts with the source's files and running processes, gets its
    // own identity, and the two diverge.
    let fork = json(&srv.ok(&["--json", "sandbox", "fork", "r2", "--name", "r2-fork"]));
    assert_eq!(fork["state"], "running");
    let out = srv.ok(&[
        "sandbox",
        "exec",
        "r2-fork",
        "--",
        "sh",
        "-c",
        "hostname; cat /tmp/f; cat /tmp/n; echo fork > /tmp/f",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["r2-fork", "kept"], "{out}");
    let f1: u64 = lines[2].parse().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let f2: u64 = srv
        .ok(&["sandbox", "exec", "r2-fork", "--", "cat", "/tmp/n"])
        .trim()
        .parse()
        .unwrap();
    assert!(f2 > f1, "the forked process runs on: {f1} -> {f2}");
    assert_eq!(
        srv.ok(&["sandbox", "exec", "r2", "--", "cat", "/tmp/f"])
            .trim(),
        "kept",
        "source unaffected"
    );
    srv.ok(&["sandbox", "rm", "r2-fork"]);

    // A forced cold boot still works next to the template.
    let cold = json(&srv.ok(&[
        "--json", "sandbox", "create", "--name", "cold", "--memory", "512", "--cold",
    ]));
    assert_eq!(cold["booted_from"], "boot");
    // A restored sandbox stops and boots again from its own disk.
    srv.ok(&[
        "sandbox",
        "exec",
        "r1",
        "--",
        "sh",
        "-c",
        "echo persisted > /root/p; sync",
    ]);
    srv.ok(&["sandbox", "stop", "r1"]);
    srv.ok(&["sandbox", "start", "r1"]);
    assert_eq!(
        srv.ok(&["sandbox", "exec", "r1", "--", "cat", "/root/p"])
            .trim(),
        "persisted"
    );
    srv.ok(&["sandbox", "rm", "first", "r1", "r2", "cold"]);
    srv.assert_clean();
}

#[test]
fn manager_killed_during_template_build_leaves_nothing() {
    let mut srv = Server::start_with(&[("ATELIER_FAULT_PAUSE", "template-after-launch")]);
    srv.ok(&["sandbox", "create", "--name", "a", "--memory", "512"]);
    srv.wait_log("fault point reached", Duration::from_secs(120));
    let marker = format!("{}/pool/templates/.build-", srv.data_dir.path().display());
    assert_eq!(
        common::pids_matching(&marker).len(),
        1,
        "the template VM runs"
    );
    srv.kill9();
    srv.restart(&[]);
    assert!(
        common::pids_matching(&marker).is_empty(),
        "template VMM reclaimed"
    );
    let leftovers: Vec<_> = std::fs::read_dir(srv.data_dir.path().join("pool/templates"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    srv.ok(&["sandbox", "rm", "a"]);
    srv.assert_clean();
}
