//! Dev commands, run by the real agent binary: start, status, logs, restarts, stop,
//! rotation, replacement, and what a worker restart leaves behind.

use std::path::Path;
use std::time::{Duration, Instant};

use atelier_agent_proto::{AgentClient, DevSpec, DevState, DevStatus, ErrorKind, RestartPolicy};
use futures::StreamExt;

mod common;
use common::{Harness, Options, READY, agent_error, alive, group_members, spawn_agent};

/// Bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(10);

async fn status(client: &AgentClient, name: &str) -> DevStatus {
    client
        .dev_list()
        .await
        .expect("dev_list")
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

/// Polls the status of `name` until `pred` holds.
async fn wait_status(
    client: &AgentClient,
    name: &str,
    what: &str,
    pred: impl Fn(&DevStatus) -> bool,
) -> DevStatus {
    let deadline = Instant::now() + SOON;
    loop {
        let s = status(client, name).await;
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{name}: {what}: last {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole log of `name` as it is now.
async fn logs(client: &AgentClient, name: &str) -> String {
    let mut stream = client.dev_logs(name, false, u64::MAX).await.expect("logs");
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls the log of `name` until it contains every needle.
async fn wait_logs(client: &AgentClient, name: &str, needles: &[&str]) -> String {
    let deadline = Instant::now() + SOON;
    loop {
        let text = logs(client, name).await;
        if needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        assert!(Instant::now() < deadline, "{needles:?} not in {text:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn runs_logs_env_and_stop_kills_the_whole_group() {
    let h = Harness::start_with(Options {
        capture_stderr: true,
        ..Options::default()
    })
    .await;
    let secret = "s3cr3t-value-42";
    h.client
        .dev_start(
            DevSpec::new(
                "web",
                "echo out; echo err >&2; echo token=$API_TOKEN; pwd; sleep 1000",
            )
            .env("API_TOKEN", secret)
            .cwd("/tmp"),
        )
        .await
        .expect("dev_start");
    let s = status(&h.client, "web").await;
    assert_eq!(s.state, DevState::Running, "{s:?}");
    assert_eq!(s.restarts, 0);
    assert_eq!(s.last_exit, None);
    assert!(!s.listening);
    let pid = s.pid.expect("pid");
    assert!(alive(pid));
    let text = wait_logs(&h.client, "web", &["out\n", "err\n", "/tmp\n"]).await;
    assert!(text.contains(&format!("token={secret}\n")), "{text:?}");
    // The shell runs `sleep` as a child in its group.
    let deadline = Instant::now() + SOON;
    while group_members(pid).len() < 2 {
        assert!(Instant::now() < deadline, "no child in group {pid}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let members = group_members(pid);

    let start = Instant::now();
    h.client.dev_stop("web").await.expect("dev_stop");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    for m in &members {
        assert!(!alive(*m), "{m} of group {pid} survived the stop");
    }
    let s = status(&h.client, "web").await;
    assert_eq!(s.state, DevState::Stopped, "{s:?}");
    assert_eq!(s.pid, None);
    assert_eq!(s.uptime_secs, 0);
    // Stopped by SIGTERM.
    assert_eq!(s.last_exit, Some(-15));
    // The log stays readable; stopping again is fine.
    assert!(logs(&h.client, "web").await.contains("out\n"));
    h.client.dev_stop("web").await.expect("stop again");

    // Errors.
    let (kind, msg) = agent_error(h.client.dev_stop("nope").await.expect_err("unknown"));
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(msg.contains("nope"), "{msg}");
    let err = h
        .client
        .dev_start(DevSpec::new("Bad_Name", "true"))
        .await
        .expect_err("bad name");
    assert_eq!(agent_error(err).0, ErrorKind::Invalid);
    let err = h
        .client
        .dev_start(DevSpec::new("x", "true").cwd("/nonexistent-dir"))
        .await
        .expect_err("missing cwd");
    assert_eq!(agent_error(err).0, ErrorKind::NotFound);
    let mut missing = h.client.dev_logs("nope", false, 10).await.expect("send");
    let err = missing.next().await.expect("item").expect_err("unknown");
    assert_eq!(agent_error(err).0, ErrorKind::NotFound);
    assert!(missing.next().await.is_none());

    // The agent logged names and commands, never env values.
    h.client.shutdown(false).await.expect("shutdown");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let console = h.stderr_text();
    assert!(console.contains("dev web"), "{console}");
    assert!(
        !console.contains(secret),
        "secret leaked to the console: {console}"
    );
}

#[tokio::test]
async fn restart_policies_and_back_off() {
    let h = Harness::start().await;
    let c = &h.client;
    c.dev_start(DevSpec::new("flaky", "echo run; exit 3"))
        .await
        .expect("start flaky");
    c.dev_start(DevSpec::new("once", "exit 3").restart(RestartPolicy::Never))
        .await
        .expect("start once");
    c.dev_start(DevSpec::new("done", "exit 0"))
        .await
        .expect("start done");
    c.dev_start(DevSpec::new("again", "exit 0").restart(RestartPolicy::Always))
        .await
        .expect("start again");

    let once = wait_status(c, "once", "fails", |s| s.state == DevState::Failed).await;
    assert_eq!(
        (once.restarts, once.last_exit, once.pid),
        (0, Some(3), None)
    );
    let done = wait_status(c, "done", "exits", |s| s.state == DevState::Exited).await;
    assert_eq!((done.restarts, done.last_exit), (0, Some(0)));
    wait_status(c, "again", "restarts", |s| s.restarts >= 1).await;

    // Back-off 1 s then 2 s: restarts at about 1 s and 3 s, not a tight loop.
    let start = Instant::now();
    let first = wait_status(c, "flaky", "restarts once", |s| s.restarts >= 1).await;
    assert_eq!(first.last_exit, Some(3));
    wait_status(c, "flaky", "restarts twice", |s| s.restarts >= 2).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "second restart after {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = status(c, "flaky").await;
    assert!(s.restarts <= 3, "{s:?}");
    assert!(
        matches!(s.state, DevState::Restarting | DevState::Running),
        "{s:?}"
    );
    let text = logs(c, "flaky").await;
    assert!(text.matches("run\n").count() >= 3, "{text:?}");

    // Stopping during the back-off ends the restarts.
    c.dev_stop("flaky").await.expect("stop");
    let stopped = status(c, "flaky").await;
    assert_eq!(stopped.state, DevState::Stopped);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = status(c, "flaky").await;
    assert_eq!(later.state, DevState::Stopped);
    assert_eq!(later.restarts, stopped.restarts);
    c.dev_stop("again").await.expect("stop again");

    let names: Vec<String> = c
        .dev_list()
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["again", "done", "flaky", "once"]);
}

#[tokio::test]
async fn listening_follows_the_port() {
    let h = Harness::start().await;
    let port = free_port();
    h.client
        .dev_start(
            DevSpec::new(
                "http",
                format!("exec python3 -m http.server {port} --bind 127.0.0.1"),
            )
            .port(port),
        )
        .await
        .expect("dev_start");
    let s = wait_status(&h.client, "http", "listens", |s| s.listening).await;
    assert_eq!(s.state, DevState::Running, "{s:?}");
    assert_eq!(s.port, Some(port));
    // Really serving.
    let conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(conn.is_ok(), "{conn:?}");
    drop(conn);
    h.client.dev_stop("http").await.expect("stop");
    let s = status(&h.client, "http").await;
    assert!(!s.listening, "{s:?}");
    assert_eq!(s.state, DevState::Stopped);
}

/// Waits until the agent pushes a status of `name` for which `pred` holds; no
/// `dev_list` request is sent.
async fn wait_pushed(
    changes: &mut tokio::sync::watch::Receiver<Option<Vec<DevStatus>>>,
    name: &str,
    what: &str,
    pred: impl Fn(&DevStatus) -> bool,
) -> DevStatus {
    let found = tokio::time::timeout(SOON, async {
        loop {
            let now = changes.borrow_and_update().clone();
            if let Some(s) = now.iter().flatten().find(|s| s.name == name && pred(s)) {
                return s.clone();
            }
            changes.changed().await.expect("agent connection ended");
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{name}: {what}: last push {:?}", changes.borrow()))
}

#[tokio::test]
async fn the_agent_pushes_every_change_of_a_dev_command() {
    let h = Harness::start().await;
    h.client.wait_ready(SOON).await.expect("ready");
    assert!(h.client.supports(atelier_agent_proto::CAP_DEV_EVENTS));
    let mut changes = h.client.dev_changes();
    // Right after its Hello the agent says what runs: nothing yet.
    let first = tokio::time::timeout(SOON, changes.wait_for(|c| c.is_some()))
        .await
        .expect("a first push")
        .expect("connected")
        .clone();
    assert_eq!(first, Some(Vec::new()));
    let port = free_port();
    h.client
        .dev_start(
            DevSpec::new(
                "web",
                format!("exec python3 -m http.server {port} --bind 127.0.0.1"),
            )
            .port(port),
        )
        .await
        .expect("dev_start");
    let s = wait_pushed(&mut changes, "web", "pushed as listening", |s| s.listening).await;
    assert_eq!(s.state, DevState::Running, "{s:?}");
    h.client.dev_stop("web").await.expect("stop");
    let s = wait_pushed(&mut changes, "web", "pushed as stopped", |s| {
        s.state == DevState::Stopped
    })
    .await;
    assert!(!s.listening, "{s:?}");
}

#[tokio::test]
async fn logs_follow_until_cancelled_or_replaced() {
    let h = Harness::start().await;
    let c = &h.client;
    c.dev_start(DevSpec::new(
        "ticker",
        "echo begin; i=0; while :; do echo tick$i; i=$((i+1)); sleep 0.2; done",
    ))
    .await
    .expect("start");
    wait_logs(c, "ticker", &["tick1\n"]).await;

    // Only new output (tail 0), as it comes.
    let mut follow = c.dev_logs("ticker", true, 0).await.expect("follow");
    let mut seen = String::new();
    let mut arrivals = Vec::new();
    while seen.matches("tick").count() < 4 {
        let chunk = tokio::time::timeout(SOON, follow.next())
            .await
            .expect("new output in time")
            .expect("open")
            .expect("chunk");
        arrivals.push(Instant::now());
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!seen.contains("begin"), "{seen:?}");
    let spread = *arrivals.last().expect("last") - arrivals[0];
    assert!(spread >= Duration::from_millis(300), "burst: {spread:?}");
    // Cancel by dropping; the agent goes on serving.
    drop(follow);
    c.ping(Duration::from_secs(5)).await.expect("ping");

    // A tail reaches back into the log.
    let mut tail = c.dev_logs("ticker", false, 6).await.expect("tail");
    let mut last = Vec::new();
    while let Some(chunk) = tail.next().await {
        last.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(last.len(), 6, "{last:?}");
    assert!(last.ends_with(b"\n"));

    // A follower from the start ends when the command is replaced.
    let mut follow = c.dev_logs("ticker", true, u64::MAX).await.expect("follow");
    let first = follow.next().await.expect("item").expect("chunk");
    assert!(first.starts_with(b"begin\n"), "{first:?}");
    c.dev_start(DevSpec::new("ticker", "echo second; sleep 1000"))
        .await
        .expect("replace");
    let ended = tokio::time::timeout(SOON, async {
        while let Some(item) = follow.next().await {
            item.expect("chunk");
        }
    })
    .await;
    assert!(ended.is_ok(), "the follower did not end on replacement");
    // The new command has a fresh log; the old one rotated to .1 (a full tail shows
    // both, in order).
    let text = wait_logs(c, "ticker", &["second\n"]).await;
    assert!(text.starts_with("begin\ntick0\n"), "{text:?}");
    assert!(text.ends_with("\nsecond\n"), "{text:?}");
    let dir = h.root().join("var/log/atelier/dev");
    let live = std::fs::read_to_string(dir.join("ticker.log")).expect("live log");
    assert_eq!(live, "second\n");
    let old = std::fs::read_to_string(dir.join("ticker.log.1")).expect("rotated log");
    assert!(
        old.starts_with("begin\n") && !old.contains("second"),
        "{old:?}"
    );
    let s = status(c, "ticker").await;
    assert_eq!(
        (s.command.as_str(), s.state),
        ("echo second; sleep 1000", DevState::Running)
    );
    c.dev_stop("ticker").await.expect("stop");
}

#[tokio::test]
async fn log_rotation_keeps_two_old_files() {
    let h = Harness::start().await;
    // 3.5 MiB of output, in lines.
    h.client
        .dev_start(
            DevSpec::new("big", "yes 0123456789abcdef | head -c 3670016")
                .restart(RestartPolicy::Never),
        )
        .await
        .expect("start");
    wait_status(&h.client, "big", "exits", |s| s.state == DevState::Exited).await;
    let dir = h.root().join("var/log/atelier/dev");
    let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len());
    let mut total = 0;
    for name in ["big.log", "big.log.1", "big.log.2"] {
        let len = size(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(len > 0 && len <= 1 << 20, "{name}: {len}");
        total += len;
    }
    assert!(size("big.log.3").is_err());
    assert!(total < 3670016);
    // A full tail spans the three files, in order: the end of what the command wrote.
    let text = logs(&h.client, "big").await;
    assert_eq!(text.len() as u64, total);
    let written: String = "0123456789abcdef\n".repeat(3670016 / 17 + 1)[..3670016].into();
    assert!(
        written.ends_with(&text),
        "the tail is not the end of the output"
    );
    let rotated = std::fs::read_to_string(dir.join("big.log.2")).expect("read");
    assert!(text.starts_with(&rotated));
}

#[tokio::test]
async fn a_new_worker_kills_what_the_old_one_left() {
    let mut h = Harness::start().await;
    h.client
        .dev_start(DevSpec::new("orphan", "sleep 1000; echo never"))
        .await
        .expect("start");
    let pid = status(&h.client, "orphan").await.pid.expect("pid");
    let deadline = Instant::now() + SOON;
    while group_members(pid).len() < 2 {
        assert!(Instant::now() < deadline, "no child in group {pid}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let members = group_members(pid);
    assert!(Path::new(&h.root().join("run/atelier/dev/orphan.pgid")).exists());

    // The worker dies without cleaning up (as a crash would).
    h.agent.start_kill().expect("kill agent");
    h.agent.wait().await.expect("reap");
    assert!(
        members.iter().any(|m| alive(*m)),
        "the group died with the agent"
    );
    let mut second = spawn_agent(h.dir.path());
    let second_pid = second.id().expect("pid");
    // wait_ready returns the old Hello at once: wait for the new agent's.
    let deadline = Instant::now() + READY;
    while h.client.hello().map(|hello| hello.pid) != Some(second_pid) {
        assert!(Instant::now() < deadline, "no hello from the new agent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + SOON;
    while members.iter().any(|m| alive(*m)) {
        assert!(
            Instant::now() < deadline,
            "{members:?} survived the new worker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h.client.dev_list().await.expect("list").is_empty());
    assert!(!h.root().join("run/atelier/dev/orphan.pgid").exists());
    second.start_kill().expect("kill");
}
