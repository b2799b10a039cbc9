//! Crash safety with real VMs: the manager killed mid-create and mid-delete, a VMM
//! killed under a running sandbox, the guest agent killed, the manager restarted
//! under a running sandbox. Nothing may be orphaned.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::Server;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

fn state(srv: &Server, name: &str) -> serde_json::Value {
    json(&srv.ok(&["--json", "sandbox", "show", name]))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn manager_killed_mid_create_and_mid_delete_leaves_nothing() {
    let mut srv = Server::start_with(&[("ATELIER_FAULT_PAUSE", "create-after-launch")]);
    // Create stalls after the VMM is launched (disk cloned, process running).
    let out = srv.run(&[
        "--json",
        "sandbox",
        "create",
        "--name",
        "doomed",
        "--memory",
        "512",
        "--no-wait",
    ]);
    assert!(out.status.success());
    srv.wait_log("fault point reached", Duration::from_secs(120));
    assert_eq!(srv.vmm_pids().len(), 1, "the VMM is running");
    assert_eq!(srv.disks().len(), 1, "the disk is cloned");
    srv.kill9();
    srv.restart(&[]);
    let s = state(&srv, "doomed");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("manager stopped during create"),
        "{s}"
    );
    assert!(
        srv.vmm_pids().is_empty(),
        "VMM reclaimed: {:?}",
        srv.vmm_pids()
    );
    assert!(srv.disks().is_empty(), "disk reclaimed: {:?}", srv.disks());
    // The failed sandbox can be started again (a fresh clone) and then deleted.
    srv.ok(&["sandbox", "start", "doomed"]);
    assert_eq!(
        srv.ok(&["sandbox", "exec", "doomed", "--", "echo", "up"])
            .trim(),
        "up"
    );

    // Delete stalls after the VMM is killed, before disk and directory are removed.
    srv.restart(&[("ATELIER_FAULT_PAUSE", "delete-after-kill")]);
    assert_eq!(
        state(&srv, "doomed")["state"],
        "running",
        "adopted across restart"
    );
    let mut rm = srv.cli().args(["sandbox", "rm", "doomed"]).spawn().unwrap();
    srv.wait_log("fault point reached", Duration::from_secs(60));
    srv.kill9();
    let _ = rm.wait();
    assert_eq!(
        srv.disks().len(),
        1,
        "the disk is still there before restart"
    );
    srv.restart(&[]);
    assert_eq!(
        srv.run(&["sandbox", "show", "doomed"]).status.code(),
        Some(4),
        "delete finished by reconcile"
    );
    srv.assert_clean();
}

#[test]
fn killed_vmm_fails_the_sandbox_and_killed_agent_comes_back() {
    let mut srv = Server::start();
    srv.ok(&["sandbox", "create", "--name", "a", "--memory", "512"]);
    srv.ok(&["sandbox", "create", "--name", "b", "--memory", "512"]);

    // Kill the agent worker inside the guest: PID 1's watchdog restarts it.
    // The worker is the atelier-agent process that is not PID 1 (init).
    let script = r#"for p in /proc/[0-9]*; do n=${p#/proc/}; [ "$n" != 1 ] && case "$(readlink $p/exe)" in */atelier-agent) kill -9 $n;; esac; done"#;
    let _ = srv.run(&["sandbox", "exec", "a", "--", "sh", "-c", script]);
    wait_for("agent restart", Duration::from_secs(60), || {
        srv.run(&["sandbox", "exec", "a", "--", "true"])
            .status
            .success()
    });
    let s = state(&srv, "a");
    assert_eq!(s["agent"], "ready");
    assert_eq!(s["agent_restarts"], 1, "{s}");

    // kill -9 the VMM of `a`: it goes to failed, its VMM and sockets are reclaimed,
    // and its disk (the user's work) is kept for `start`.
    let id_a = state(&srv, "a")["id"].as_str().unwrap().to_owned();
    let marker = format!("{}/sandboxes/{id_a}/", srv.data_dir.path().display());
    let pids = common::pids_matching(&marker);
    assert_eq!(pids.len(), 1);
    std::process::Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status()
        .unwrap();
    wait_for("sandbox a failed", Duration::from_secs(30), || {
        state(&srv, "a")["state"] == "failed"
    });
    let s = state(&srv, "a");
    assert!(
        s["error"].as_str().unwrap().contains("exited unexpectedly"),
        "{s}"
    );
    assert!(common::pids_matching(&marker).is_empty());
    let run = srv.data_dir.path().join(format!("sandboxes/{id_a}"));
    assert!(
        !run.join("qmp.sock").exists() && !run.join("agent.sock").exists(),
        "sockets reclaimed"
    );
    assert!(
        srv.data_dir
            .path()
            .join(format!("pool/disks/{id_a}.img"))
            .exists(),
        "the disk (the user's work) is kept for start"
    );

    // Manager killed under a running sandbox: it is adopted, not lost.
    srv.kill9();
    srv.restart(&[]);
    assert_eq!(state(&srv, "b")["state"], "running");
    assert_eq!(
        srv.ok(&["sandbox", "exec", "b", "--", "echo", "still here"])
            .trim(),
        "still here"
    );
    assert_eq!(state(&srv, "a")["state"], "failed");
    srv.ok(&["sandbox", "start", "a"]);
    assert_eq!(
        state(&srv, "a")["state"],
        "running",
        "a failed sandbox boots again from its disk"
    );

    // An orphan VMM (say, left by a lost journal) is found by the periodic reconcile.
    srv.ok(&["sandbox", "rm", "a", "b"]);
    srv.assert_clean();
}

#[test]
fn manager_killed_mid_resume_and_mid_fork_keeps_the_users_disk() {
    let mut srv = Server::start();
    srv.ok(&["sandbox", "create", "--name", "keep", "--memory", "512"]);
    let marker = format!("work-{}", std::process::id());
    srv.ok(&[
        "sandbox",
        "exec",
        "keep",
        "--",
        "sh",
        "-c",
        &format!("echo {marker} > /root/marker && sync"),
    ]);
    let cat = |srv: &Server| {
        srv.ok(&["sandbox", "exec", "keep", "--", "cat", "/root/marker"])
            .trim()
            .to_owned()
    };

    // Resume interrupted after its VMM is up: back to paused with disk and saved
    // memory kept, and a later resume carries on.
    srv.ok(&["sandbox", "pause", "keep"]);
    srv.restart(&[("ATELIER_FAULT_PAUSE", "resume-after-launch")]);
    let mut resume = srv
        .cli()
        .args(["sandbox", "resume", "keep"])
        .spawn()
        .unwrap();
    srv.wait_log("fault point reached", Duration::from_secs(120));
    assert_eq!(state(&srv, "keep")["operation"], "resume");
    srv.kill9();
    let _ = resume.wait();
    srv.restart(&[]);
    let s = state(&srv, "keep");
    assert_eq!(s["state"], "paused", "{s}");
    assert!(s["operation"].is_null(), "{s}");
    assert!(
        s["error"].as_str().unwrap_or("").contains("during resume"),
        "{s}"
    );
    assert!(
        srv.vmm_pids().is_empty(),
        "the interrupted VMM is reclaimed"
    );
    assert_eq!(srv.disks().len(), 1, "the user's disk is kept");
    srv.ok(&["sandbox", "resume", "keep"]);
    assert_eq!(cat(&srv), marker);

    // Fork interrupted while the source is stopped for the copy: the source runs on
    // with its disk, the half-made fork is failed and its disk reclaimed.
    srv.restart(&[("ATELIER_FAULT_PAUSE", "fork-after-copy")]);
    let mut fork = srv
        .cli()
        .args(["sandbox", "fork", "keep", "--name", "kid"])
        .spawn()
        .unwrap();
    srv.wait_log("fault point reached", Duration::from_secs(120));
    assert_eq!(state(&srv, "keep")["operation"], "fork");
    srv.kill9();
    let _ = fork.wait();
    srv.restart(&[]);
    let s = state(&srv, "keep");
    assert_eq!(s["state"], "running", "{s}");
    assert!(s["operation"].is_null(), "{s}");
    assert_eq!(cat(&srv), marker, "the source runs on with its data");
    let kid = state(&srv, "kid");
    assert_eq!(kid["state"], "failed", "{kid}");
    assert_eq!(srv.disks().len(), 1, "only the source's disk is left");
    assert_eq!(srv.vmm_pids().len(), 1, "only the source's VMM runs");

    // And it stops and starts from its disk as usual.
    srv.ok(&["sandbox", "stop", "keep"]);
    srv.ok(&["sandbox", "start", "keep"]);
    assert_eq!(cat(&srv), marker);
    srv.ok(&["sandbox", "rm", "keep", "kid"]);
    wait_for("nothing left", Duration::from_secs(30), || {
        srv.vmm_pids().is_empty() && srv.disks().is_empty()
    });
}
