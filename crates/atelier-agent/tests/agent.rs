//! Runs the real agent binary (`serve --connect-unix`) against the real `AgentClient`.
//!
//! A small bridge stands in for QEMU's chardev: the client's connection stays open
//! while agent processes come and go, exactly as a virtio-serial port behaves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_agent_proto::{AgentClient, ErrorKind, ExecEvent, ExecRequest, ProtoError};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Mutex;

const READY: Duration = Duration::from_secs(10);

struct Harness {
    dir: tempfile::TempDir,
    client: AgentClient,
    agent: tokio::process::Child,
}

fn agent_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

/// Host side <-> whichever agent is connected; the host connection never closes.
async fn bridge(host: UnixListener, agents: UnixListener) {
    let Ok((host_conn, _)) = host.accept().await else {
        return;
    };
    let (mut host_r, mut host_w) = host_conn.into_split();
    let agent_w: Arc<Mutex<Option<OwnedWriteHalf>>> = Arc::default();
    let to_agent = agent_w.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match host_r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Like a port with no guest reader: bytes for a missing agent are lost.
            if let Some(w) = to_agent.lock().await.as_mut() {
                let _ = w.write_all(&buf[..n]).await;
            }
        }
    });
    loop {
        let Ok((conn, _)) = agents.accept().await else {
            return;
        };
        let (mut r, w) = conn.into_split();
        *agent_w.lock().await = Some(w);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if host_w.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        *agent_w.lock().await = None;
    }
}

fn spawn_agent(dir: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_atelier-agent"))
        .arg("serve")
        .arg("--connect-unix")
        .arg(agent_socket(dir))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn agent")
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = UnixListener::bind(dir.path().join("host.sock")).expect("bind host");
        let agents = UnixListener::bind(agent_socket(dir.path())).expect("bind agent");
        tokio::spawn(bridge(host, agents));
        let client = AgentClient::connect_unix(&dir.path().join("host.sock"))
            .await
            .expect("connect");
        let agent = spawn_agent(dir.path());
        let hello = client.wait_ready(READY).await.expect("hello");
        assert_eq!(hello.pid, agent.id().expect("pid"));
        Harness { dir, client, agent }
    }

    fn path(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("utf8")
            .to_owned()
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[tokio::test]
async fn ping_and_metrics() {
    let h = Harness::start().await;
    let rtt = h.client.ping(Duration::from_secs(5)).await.expect("ping");
    assert!(rtt < Duration::from_secs(1));
    let m = h.client.metrics().await.expect("metrics");
    assert!(m.cpu_count >= 1);
    assert!(m.cpu.total() > 0);
    assert!(m.mem_total_bytes > 0 && m.mem_available_bytes <= m.mem_total_bytes);
    assert!(m.disk_total_bytes > 0 && m.disk_free_bytes <= m.disk_total_bytes);
    assert!(m.uptime_secs > 0.0);
}

#[tokio::test]
async fn exec_streams_output_in_order_and_in_time() {
    let h = Harness::start().await;
    let mut exec = h
        .client
        .exec(sh("for i in 1 2 3; do echo $i; sleep 0.2; done"))
        .await
        .expect("exec");
    let mut events = Vec::new();
    while let Some(ev) = exec.next_event().await {
        events.push((Instant::now(), ev.expect("event")));
    }
    assert!(matches!(
        events.first(),
        Some((_, ExecEvent::Started { .. }))
    ));
    assert!(matches!(
        events.last(),
        Some((
            _,
            ExecEvent::Exit {
                code: Some(0),
                signal: None,
                timed_out: false
            }
        ))
    ));
    let outs: Vec<(Instant, Vec<u8>)> = events
        .iter()
        .filter_map(|(t, e)| match e {
            ExecEvent::Stdout(d) => Some((*t, d.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        outs.iter().flat_map(|(_, d)| d.clone()).collect::<Vec<_>>(),
        b"1\n2\n3\n"
    );
    assert_eq!(
        outs.len(),
        3,
        "each line should arrive on its own: {outs:?}"
    );
    let spread = outs[2].0 - outs[0].0;
    assert!(
        spread >= Duration::from_millis(300),
        "output arrived in a burst ({spread:?})"
    );
}

#[tokio::test]
async fn exec_exit_code_stderr_env_cwd() {
    let h = Harness::start().await;
    let out = h
        .client
        .exec(
            sh("echo oops >&2; echo $FOO; pwd; exit 7")
                .env("FOO", "bar")
                .cwd("/tmp"),
        )
        .await
        .expect("exec")
        .wait()
        .await
        .expect("wait");
    assert_eq!(out.code, Some(7));
    assert!(!out.success());
    assert_eq!(out.stdout, b"bar\n/tmp\n");
    assert_eq!(out.stderr, b"oops\n");
    assert!(out.pid > 0);
}

#[tokio::test]
async fn exec_timeout_kills_the_process_group() {
    let h = Harness::start().await;
    let start = Instant::now();
    let out = h
        .client
        .exec(sh("sleep 30 & sleep 30").timeout(Duration::from_millis(300)))
        .await
        .expect("exec")
        .wait()
        .await
        .expect("wait");
    assert!(out.timed_out);
    assert_eq!(out.signal, Some(9));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn exec_kill_sends_signal() {
    let h = Harness::start().await;
    let mut exec = h
        .client
        .exec(ExecRequest::new(["sleep", "30"]))
        .await
        .expect("exec");
    assert!(matches!(
        exec.next_event().await,
        Some(Ok(ExecEvent::Started { .. }))
    ));
    exec.kill(15).expect("kill");
    let out = exec.wait().await.expect("wait");
    assert_eq!(out.signal, Some(15));
    assert!(!out.timed_out);
}

#[tokio::test]
async fn exec_stdin_streams_beyond_the_window() {
    let h = Harness::start().await;
    let mut exec = h
        .client
        .exec(ExecRequest::new(["cat"]).with_stdin())
        .await
        .expect("exec");
    let mut stdin = exec.take_stdin().expect("stdin");
    stdin.send(b"hello ").await.expect("send");
    stdin.send(b"world").await.expect("send");
    stdin.close().await.expect("close");
    let out = exec.wait().await.expect("wait");
    assert_eq!(out.stdout, b"hello world");

    // 3 MiB through `wc -c`: needs several credit round trips.
    let mut exec = h
        .client
        .exec(ExecRequest::new(["wc", "-c"]).with_stdin())
        .await
        .expect("exec");
    let mut stdin = exec.take_stdin().expect("stdin");
    let big = vec![b'x'; 3 << 20];
    let send = tokio::spawn(async move {
        stdin.send(&big).await.expect("send");
        stdin.close().await.expect("close");
    });
    let out = exec.wait().await.expect("wait");
    send.await.expect("sender");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (3u32 << 20).to_string()
    );
}

#[tokio::test]
async fn large_output_with_a_slow_consumer() {
    let h = Harness::start().await;
    // 8 MiB of output, far beyond the window; consume slowly at first.
    let mut exec = h
        .client
        .exec(sh("head -c 8388608 /dev/zero"))
        .await
        .expect("exec");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile the connection stays usable.
    h.client
        .ping(Duration::from_secs(5))
        .await
        .expect("ping while stream is stalled");
    let mut total = 0;
    while let Some(ev) = exec.next_event().await {
        match ev.expect("event") {
            ExecEvent::Stdout(d) => total += d.len(),
            ExecEvent::Exit { code, .. } => assert_eq!(code, Some(0)),
            _ => {}
        }
    }
    assert_eq!(total, 8 << 20);
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn fifty_mib_file_roundtrip() {
    let h = Harness::start().await;
    let data = pseudo_random(50 << 20);
    let want = Sha256::digest(&data);
    let path = h.path("big.bin");
    let start = Instant::now();
    let written = h
        .client
        .write_file(&path, 0o640, &data[..])
        .await
        .expect("write");
    assert_eq!(written, 50 << 20);
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
        0o640
    );
    let mut stream = h.client.read_file(&path).await.expect("read");
    let mut hasher = Sha256::new();
    let mut chunks = 0;
    let mut size = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        assert!(chunk.len() <= atelier_agent_proto::FILE_CHUNK_LEN);
        size += chunk.len();
        chunks += 1;
        hasher.update(&chunk);
    }
    assert_eq!(size, 50 << 20);
    assert!(chunks >= 200);
    assert_eq!(hasher.finalize(), want);
    eprintln!("50 MiB write+read in {:?}", start.elapsed());
    // No temp file left behind.
    let leftovers: Vec<_> = std::fs::read_dir(h.dir.path())
        .expect("readdir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("atelier-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn agent_error(e: ProtoError) -> (ErrorKind, String) {
    match e {
        ProtoError::Agent { kind, message, .. } => (kind, message),
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[tokio::test]
async fn errors_are_typed_and_the_agent_survives() {
    let h = Harness::start().await;
    let mut exec = h
        .client
        .exec(ExecRequest::new(["/nonexistent/tool", "x"]))
        .await
        .expect("send");
    let err = exec
        .next_event()
        .await
        .expect("an event")
        .expect_err("must fail");
    let (kind, message) = agent_error(err);
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(message.contains("/nonexistent/tool"), "{message}");

    let mut exec = h
        .client
        .exec(ExecRequest::new(["true"]).cwd("/nonexistent-dir"))
        .await
        .expect("send");
    let (kind, message) = agent_error(exec.next_event().await.expect("event").expect_err("fail"));
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(message.contains("/nonexistent-dir"), "{message}");

    let mut exec = h
        .client
        .exec(ExecRequest::new(Vec::<String>::new()))
        .await
        .expect("send");
    let (kind, _) = agent_error(exec.next_event().await.expect("event").expect_err("fail"));
    assert_eq!(kind, ErrorKind::Invalid);

    let err = h
        .client
        .read_file(&h.path("missing.txt"))
        .await
        .err()
        .expect("missing file");
    let (kind, message) = agent_error(err);
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(message.contains("missing.txt"), "{message}");

    let err = h
        .client
        .write_file(&h.path("no/such/dir/f"), 0o644, &b"data"[..])
        .await
        .expect_err("missing parent");
    let (kind, message) = agent_error(err);
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(message.contains("parent directory"), "{message}");

    let err = h
        .client
        .set_time(std::time::SystemTime::now())
        .await
        .expect_err("not in a VM");
    assert_eq!(agent_error(err).0, ErrorKind::Unsupported);

    h.client
        .ping(Duration::from_secs(5))
        .await
        .expect("still alive");
}

#[tokio::test]
async fn agent_killed_mid_exec_fails_requests_and_restart_is_seen() {
    let mut h = Harness::start().await;
    let first_pid = h.client.hello().expect("hello").pid;
    // A stream in full flow so the kill likely tears a frame.
    let mut exec = h
        .client
        .exec(ExecRequest::new(["yes"]))
        .await
        .expect("exec");
    let mut got = 0;
    while got < 4 {
        if let ExecEvent::Stdout(_) = exec.next_event().await.expect("event").expect("ok") {
            got += 1;
        }
    }
    h.agent.start_kill().expect("SIGKILL agent");
    h.agent.wait().await.expect("reap");
    let mut second = spawn_agent(h.dir.path());
    // The outstanding exec must fail (restart), not hang.
    let failure = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match exec.next_event().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("exec must fail promptly");
    assert!(
        matches!(failure, Some(ProtoError::AgentRestarted { .. })),
        "got {failure:?}"
    );
    assert_eq!(h.client.restarts(), 1);
    let hello = h.client.wait_ready(READY).await.expect("hello");
    assert_ne!(hello.pid, first_pid);
    assert_eq!(hello.pid, second.id().expect("pid"));
    h.client
        .ping(Duration::from_secs(5))
        .await
        .expect("ping new agent");
    let out = h
        .client
        .exec(sh("echo back"))
        .await
        .expect("exec")
        .wait()
        .await
        .expect("wait");
    assert_eq!(out.stdout, b"back\n");
    second.start_kill().expect("kill");
}

#[tokio::test]
async fn shutdown_is_acknowledged() {
    let mut h = Harness::start().await;
    h.client.shutdown(false).await.expect("shutdown");
    // Outside a VM the agent exits instead of powering off.
    let status = tokio::time::timeout(Duration::from_secs(5), h.agent.wait())
        .await
        .expect("agent exits")
        .expect("wait");
    assert!(status.success());
}

#[tokio::test]
async fn dropping_an_exec_handle_kills_the_command() {
    let h = Harness::start().await;
    let marker = h.path("still-running");
    let script = format!("sleep 1; touch {marker}");
    let mut exec = h.client.exec(sh(&script)).await.expect("exec");
    assert!(matches!(
        exec.next_event().await,
        Some(Ok(ExecEvent::Started { .. }))
    ));
    drop(exec);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !Path::new(&marker).exists(),
        "cancelled command kept running"
    );
    h.client.ping(Duration::from_secs(5)).await.expect("ping");
}
