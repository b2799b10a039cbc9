//! Hung guests and hung VMMs with real VMs: an agent worker stopped with SIGSTOP
//! inside the guest, a QEMU stopped with SIGSTOP on the host. Requests to them fail
//! with a timeout error instead of hanging, stop falls back to QMP quit and
//! SIGKILL, delete wins over an operation stuck on them, and other sandboxes keep
//! working throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Server;

/// Upper bound for any one CLI call in these tests; far above the deadlines under
/// test, so a call that hangs fails the test instead of stalling it.
const BOUND: Duration = Duration::from_secs(120);

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

fn show(srv: &Server, name: &str) -> serde_json::Value {
    json(&srv.ok(&["--json", "sandbox", "show", name]))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Starts a CLI call in the background.
fn spawn_cli(srv: &Server, args: &[&str]) -> Child {
    srv.cli()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a background CLI call, failing the test after `limit`.
fn wait_bounded(child: Child, what: &str, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("{what} did not return within {limit:?}");
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The other sandbox answers while `name` hangs.
fn assert_answers(srv: &Server, name: &str) {
    let out = srv.run_bounded(&["sandbox", "exec", name, "--", "echo", "alive"], BOUND);
    assert!(out.status.success(), "{name}: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive");
}

/// A metrics request to `name`'s agent through the API: its status and body. A
/// plain request and reply, so unlike an exec it cannot be caught mid-stream.
fn metrics(srv: &Server, name: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = srv
            .api(
                reqwest::Method::GET,
                &format!("/api/v1/sandboxes/{name}/metrics"),
            )
            .timeout(BOUND)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    })
}

/// The status of `GET /` through the proxy for host `host`, if it answered.
fn proxy_status(srv: &Server, host: &str) -> Option<u16> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{}/", srv.url))
            .header("Host", host)
            .bearer_auth(&srv.token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    })
}

/// SIGSTOPs the agent worker (the atelier-agent process that is not PID 1) in
/// `name`'s guest through an exec (which itself never completes: the worker that
/// would report its exit is stopped), and waits until the agent stops answering
/// (a metrics request times out). Returns the hung exec's process.
fn stop_agent_worker(srv: &Server, name: &str) -> Child {
    let script = r#"for p in /proc/[0-9]*; do n=${p#/proc/}; [ "$n" != 1 ] && case "$(readlink $p/exe)" in */atelier-agent) kill -STOP $n;; esac; done"#;
    let stopper = spawn_cli(srv, &["sandbox", "exec", name, "--", "sh", "-c", script]);
    let start = Instant::now();
    let (status, body) = loop {
        let (status, body) = metrics(srv, name);
        if status != 200 || start.elapsed() > BOUND {
            break (status, body);
        }
    };
    assert_eq!(
        status, 503,
        "the agent in {name} should stop answering: {body}"
    );
    assert!(body.contains("metrics timed out"), "{body}");
    stopper
}

/// SIGSTOPs the VMM of sandbox `id` on the host (pid from its pidfile).
fn stop_vmm(srv: &Server, id: &str) -> i32 {
    let pidfile = srv.data_dir.path().join(format!("sandboxes/{id}/vmm.pid"));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let st = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    pid
}

fn create(srv: &Server, name: &str) -> String {
    let s = json(&srv.ok(&[
        "--json", "sandbox", "create", "--name", name, "--memory", "512",
    ]));
    assert_eq!(s["state"], "running", "{s}");
    s["id"].as_str().unwrap().to_owned()
}

#[test]
fn stopped_agent_times_out_requests_and_stop_and_rm_still_work() {
    let srv = Server::start_with(&[
        ("ATELIER_AGENT_TIMEOUT_SECS", "5"),
        ("ATELIER_QMP_TIMEOUT_SECS", "5"),
    ]);
    create(&srv, "a");
    let id_b = create(&srv, "b");

    let stopper = stop_agent_worker(&srv, "a");
    let failed = srv.run_bounded(&["sandbox", "exec", "a", "--", "true"], BOUND);
    let msg = text(&failed);
    assert_eq!(failed.status.code(), Some(7), "unavailable: {msg}");
    assert!(
        msg.contains("exec timed out after 5s") && msg.contains("agent did not answer"),
        "{msg}"
    );
    // Another guest is not affected.
    assert_answers(&srv, "b");
    // Nor are its dev routes: a server that starts listening in b now gets its
    // route from the route watcher, which also polls the hung a.
    srv.ok(&[
        "dev",
        "start",
        "b",
        "app",
        "--port",
        "8000",
        "--",
        "while [ ! -e /tmp/go ]; do sleep 0.2; done; exec python3 -m http.server 8000",
    ]);
    srv.ok(&["sandbox", "exec", "b", "--", "touch", "/tmp/go"]);
    let host = format!("dev-app-{id_b}.localhost");
    wait_for("b's dev route", BOUND, || {
        proxy_status(&srv, &host) == Some(200)
    });
    // Reading a file is bounded too.
    let dest = srv.data_dir.path().join("hostname.copy");
    let dest = dest.to_str().unwrap();
    let out = srv.run_bounded(&["sandbox", "cp", "a:/etc/hostname", dest], BOUND);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("timed out"), "{}", text(&out));
    // The health check marks the guest unresponsive.
    wait_for("a to be unresponsive", BOUND, || {
        show(&srv, "a")["agent"] == "unresponsive"
    });
    assert_eq!(show(&srv, "b")["agent"], "ready");

    // Stop cannot power off through the agent; QEMU quits instead. The sandbox is
    // stopped and the record (and the CLI) says how.
    let out = srv.run_bounded(&["--json", "sandbox", "stop", "a"], BOUND);
    assert!(out.status.success(), "{}", text(&out));
    let s = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s["state"], "stopped", "{s}");
    let why = s["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("forced stop")
            && why.contains("shutdown timed out after 5s")
            && why.contains("qmp quit"),
        "{s}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: forced stop"),
        "{}",
        text(&out)
    );
    // The exec that stopped the agent ends with the VM.
    let hung = wait_bounded(stopper, "the stopping exec", BOUND);
    assert!(!hung.status.success(), "{}", text(&hung));

    assert_answers(&srv, "b");
    // A stopped sandbox boots again with a working agent.
    let out = srv.run_bounded(&["sandbox", "start", "a"], Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out));
    assert_answers(&srv, "a");

    // Hang it again and delete it outright, with no stop first.
    let stopper = stop_agent_worker(&srv, "a");
    let out = srv.run_bounded(&["sandbox", "rm", "a"], BOUND);
    assert!(out.status.success(), "{}", text(&out));
    let hung = wait_bounded(stopper, "the stopping exec", BOUND);
    assert!(!hung.status.success(), "{}", text(&hung));
    assert_answers(&srv, "b");
    srv.ok(&["sandbox", "rm", "b"]);
    srv.assert_clean();
}

#[test]
fn stopped_qemu_times_out_qmp_and_agent_requests_and_stop_and_rm_still_work() {
    let srv = Server::start_with(&[
        ("ATELIER_AGENT_TIMEOUT_SECS", "5"),
        ("ATELIER_QMP_TIMEOUT_SECS", "5"),
    ]);
    let id_a = create(&srv, "a");
    let id_c = create(&srv, "c");
    create(&srv, "b");
    stop_vmm(&srv, &id_a);

    // The agent behind a stopped QEMU does not answer.
    let out = srv.run_bounded(&["sandbox", "exec", "a", "--", "true"], BOUND);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(7), "unavailable: {msg}");
    assert!(msg.contains("exec timed out after 5s"), "{msg}");
    assert_answers(&srv, "b");

    // Pause talks to QEMU: a QMP timeout naming the command (its run dir goes to
    // the log, never into the response).
    let out = srv.run_bounded(&["sandbox", "pause", "a"], BOUND);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(7), "unavailable: {msg}");
    assert!(
        msg.contains("timed out after 5s waiting for qmp migrate-set-capabilities")
            && !msg.contains(&format!("sandboxes/{id_a}")),
        "{msg}"
    );
    assert_eq!(show(&srv, "a")["state"], "running");

    // Stop: agent power-off and QMP quit time out, SIGKILL ends the stopped QEMU.
    let out = srv.run_bounded(&["--json", "sandbox", "stop", "a"], BOUND);
    assert!(out.status.success(), "{}", text(&out));
    let s = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s["state"], "stopped", "{s}");
    let why = s["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("shutdown timed out")
            && why.contains("waiting for qmp quit")
            && why.contains("SIGKILL"),
        "{s}"
    );
    let marker = format!("{}/sandboxes/{id_a}/", srv.data_dir.path().display());
    assert!(common::pids_matching(&marker).is_empty(), "the VMM is gone");
    assert_answers(&srv, "b");

    // Delete a sandbox whose QEMU is stopped, with nothing else in flight.
    stop_vmm(&srv, &id_c);
    let out = srv.run_bounded(&["sandbox", "rm", "c"], BOUND);
    assert!(out.status.success(), "{}", text(&out));
    assert_answers(&srv, "b");

    srv.ok(&["sandbox", "rm", "a", "b"]);
    srv.assert_clean();
}

#[test]
fn delete_wins_over_operations_stuck_on_a_hung_vm() {
    // Deadlines far beyond this test's bound: without preemption the delete below
    // would wait behind the stop for many minutes.
    let srv = Server::start_with(&[
        ("ATELIER_AGENT_TIMEOUT_SECS", "900"),
        ("ATELIER_QMP_TIMEOUT_SECS", "900"),
    ]);
    let id_a = create(&srv, "a");
    create(&srv, "b");
    stop_vmm(&srv, &id_a);

    // An exec and a stop get stuck on the hung VM; the stop holds its lock.
    let exec = spawn_cli(&srv, &["sandbox", "exec", "a", "--", "true"]);
    let stop = spawn_cli(&srv, &["sandbox", "stop", "a"]);
    wait_for("the stop to be in flight", BOUND, || {
        show(&srv, "a")["state"] == "stopping"
    });
    // Neither blocks another sandbox.
    assert_answers(&srv, "b");

    let out = srv.run_bounded(&["sandbox", "rm", "a"], BOUND);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(srv.run(&["sandbox", "show", "a"]).status.code(), Some(4));
    // The stuck calls end with the VM.
    let stopped = wait_bounded(stop, "the stuck stop", BOUND);
    let exec = wait_bounded(exec, "the stuck exec", BOUND);
    assert!(!exec.status.success(), "{}", text(&exec));
    let _ = stopped;

    assert_answers(&srv, "b");
    srv.ok(&["sandbox", "rm", "b"]);
    srv.assert_clean();
}
