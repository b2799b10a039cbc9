//! Runs the real agent binary (`serve --connect-unix`) against the real `AgentClient`
//! (harness in `common`): exec, files, PTY sessions, restarts.

use std::path::Path;
use std::time::{Duration, Instant};

use atelier_agent_proto::{
    AgentClient, ErrorKind, ExecEvent, ExecRequest, ProtoError, PtyEvent, PtyReader, PtyRequest,
    PtyWriter,
};
use futures::StreamExt;
use sha2::{Digest, Sha256};

mod common;
use common::{Harness, READY, agent_error, alive, spawn_agent};

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

// ---- PTY sessions ----

/// Generous bound for one interactive step; steps normally take milliseconds.
const STEP: Duration = Duration::from_secs(10);

/// The last 2000 bytes of `buf`, for failure messages.
fn tail(buf: &[u8]) -> String {
    String::from_utf8_lossy(&buf[buf.len().saturating_sub(2000)..]).into_owned()
}

/// One side of a terminal: reads output into a buffer and waits for text in it.
struct Term {
    reader: PtyReader,
    writer: PtyWriter,
    buf: Vec<u8>,
    marks: u32,
}

impl Term {
    async fn open(client: &AgentClient, req: PtyRequest) -> Term {
        let session = client.pty(req).await.expect("pty");
        assert!(session.pid() > 0);
        let (mut reader, writer) = session.split();
        assert!(matches!(
            reader.next_event().await,
            Some(Ok(PtyEvent::Started { pid })) if pid == reader.pid()
        ));
        Term {
            reader,
            writer,
            buf: Vec::new(),
            marks: 0,
        }
    }

    async fn send(&self, text: &str) {
        self.writer.send(text.as_bytes()).await.expect("send");
    }

    /// Reads until `needle` appears; returns the text up to it and keeps the rest.
    async fn expect(&mut self, needle: &str) -> String {
        let wait = async {
            // Only new bytes (plus a needle's length of overlap) are searched each time.
            let mut searched = 0usize;
            loop {
                let from = searched.saturating_sub(needle.len());
                if let Some(pos) = self.buf[from..]
                    .windows(needle.len())
                    .position(|w| w == needle.as_bytes())
                {
                    let rest = self.buf.split_off(from + pos + needle.len());
                    let seen = std::mem::replace(&mut self.buf, rest);
                    return String::from_utf8_lossy(&seen).into_owned();
                }
                searched = self.buf.len();
                match self.reader.next_event().await {
                    Some(Ok(PtyEvent::Output(d))) => self.buf.extend(d),
                    other => panic!(
                        "waiting for {needle:?}: got {other:?}; output so far: {:?}",
                        tail(&self.buf)
                    ),
                }
            }
        };
        match tokio::time::timeout(STEP, wait).await {
            Ok(seen) => seen,
            Err(_) => panic!(
                "{needle:?} did not appear in time; output: {:?}",
                tail(&self.buf)
            ),
        }
    }

    /// Runs a shell command line and returns its output. The end marker is computed by
    /// the shell, so the terminal's echo of the typed line cannot match it.
    async fn run(&mut self, cmd: &str) -> String {
        self.marks += 1;
        let n = self.marks;
        self.send(&format!("{cmd}; echo done$((1000+{n}))\n")).await;
        // Skip the echo of the typed line, then collect up to the computed marker.
        self.expect(&format!("done$((1000+{n}))")).await;
        self.expect(&format!("done{}", 1000 + n)).await
    }

    /// Reads to the end; returns the exit event.
    async fn exit(&mut self) -> (Option<i32>, Option<i32>) {
        let wait = async {
            loop {
                match self.reader.next_event().await {
                    Some(Ok(PtyEvent::Output(d))) => self.buf.extend(d),
                    Some(Ok(PtyEvent::Exit { code, signal })) => return (code, signal),
                    other => panic!("waiting for exit: got {other:?}"),
                }
            }
        };
        tokio::time::timeout(STEP, wait)
            .await
            .expect("exit in time")
    }
}

#[tokio::test]
async fn pty_shell_size_resize_tty_ctrl_c_and_exit_code() {
    let h = Harness::start().await;
    let mut t = Term::open(&h.client, PtyRequest::new(["sh"], 24, 80).cwd("/tmp")).await;

    let out = t.run("stty size; pwd; echo $TERM").await;
    assert!(out.contains("24 80\r\n"), "{out:?}");
    assert!(out.contains("/tmp\r\n"), "{out:?}");
    assert!(out.contains("xterm-256color\r\n"), "{out:?}");

    t.writer.resize(40, 132).expect("resize");
    let out = t.run("stty size").await;
    assert!(out.contains("40 132\r\n"), "{out:?}");

    let out = t.run("tty").await;
    assert!(out.contains("/dev/pts/"), "{out:?}");

    // A resize reaches the foreground job as SIGWINCH.
    t.send("sh -c 'trap \"echo winch\\$((2+3))\" WINCH; echo loop$((2+3)); while :; do sleep 0.05; done'\n")
        .await;
    t.expect("loop5").await;
    t.writer.resize(30, 100).expect("resize");
    t.expect("winch5").await;
    // Ctrl-C is a byte; the line discipline makes it SIGINT for the foreground job.
    t.send("\x03").await;
    let out = t.run("stty size").await;
    assert!(out.contains("30 100\r\n"), "{out:?}");

    t.send("sleep 100\n").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    t.send("\x03").await;
    t.run("echo back").await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "Ctrl-C did not interrupt sleep"
    );

    t.send("exit 7\n").await;
    assert_eq!(t.exit().await, (Some(7), None));
    assert!(t.reader.next_event().await.is_none());
    // Input after the end fails instead of hanging.
    assert!(t.writer.send(b"x").await.is_err());
}

#[tokio::test]
async fn pty_sessions_run_concurrently_and_independently() {
    let h = Harness::start().await;
    let (mut a, mut b) = tokio::join!(
        Term::open(&h.client, PtyRequest::new(["sh"], 10, 50)),
        Term::open(&h.client, PtyRequest::new(["sh"], 20, 70).env("WHO", "bee")),
    );
    // A blocks on a read while B works; then B's output floods far beyond the window
    // while A is idle.
    a.send("read line; echo got-$line-$((6*7))\n").await;
    let (out_b, big) = {
        let out = b.run("stty size; tty; echo $WHO").await;
        let big = b.run("head -c 3000000 /dev/zero | tr '\\0' x; echo").await;
        (out, big)
    };
    assert!(out_b.contains("20 70\r\n"), "{out_b:?}");
    assert!(out_b.contains("bee\r\n"), "{out_b:?}");
    assert!(big.bytes().filter(|c| *c == b'x').count() >= 3_000_000);
    // Input to A from another task, through a cloned writer.
    let writer = a.writer.clone();
    tokio::spawn(async move { writer.send(b"hello\n").await.expect("send") })
        .await
        .expect("join");
    a.expect("got-hello-42").await;
    let out_a = a.run("stty size; tty").await;
    assert!(out_a.contains("10 50\r\n"), "{out_a:?}");
    let tty = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("/dev/pts/"))
            .map(|l| l.trim().to_owned())
    };
    assert_ne!(tty(&out_a), tty(&out_b), "sessions share a terminal");
    assert!(tty(&out_a).is_some());

    a.send("exit 3\n").await;
    b.send("exit 4\n").await;
    let (ea, eb) = tokio::join!(a.exit(), b.exit());
    assert_eq!(ea, (Some(3), None));
    assert_eq!(eb, (Some(4), None));
}

#[tokio::test]
async fn dropping_a_pty_session_hangs_up_and_kills_its_processes() {
    let h = Harness::start().await;
    let mut t = Term::open(&h.client, PtyRequest::new(["sh"], 24, 80)).await;
    let shell = t.reader.pid();
    // A background job (its own process group) and a foreground one that ignores SIGHUP.
    let out = t.run("sleep 30 & echo bg=$!=").await;
    let bg: u32 = out
        .split("bg=")
        .nth(1)
        .and_then(|s| s.split('=').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    t.send("trap '' HUP; echo fg$((1+1)); sleep 30\n").await;
    t.expect("fg2").await;
    assert!(alive(shell) && alive(bg));
    drop(t);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (alive(shell) || alive(bg)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(shell), "shell {shell} survived the hangup");
    assert!(!alive(bg), "background job {bg} survived the hangup");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            fields.first() != Some(&"Z") && fields.get(3) == Some(&shell.to_string().as_str())
        })
        .collect();
    assert!(left.is_empty(), "processes left in the session: {left:?}");
    h.client.ping(Duration::from_secs(5)).await.expect("ping");
}

#[tokio::test]
async fn pty_kill_errors_and_login_shell() {
    let h = Harness::start().await;
    // kill() signals the program; the exit reports the signal.
    let mut t = Term::open(&h.client, PtyRequest::new(["sleep", "30"], 24, 80)).await;
    t.writer.kill(15).expect("kill");
    assert_eq!(t.exit().await, (None, Some(15)));

    let err = h
        .client
        .pty(PtyRequest::new(["/nonexistent/tool"], 24, 80))
        .await
        .err()
        .expect("missing program");
    let (kind, message) = agent_error(err);
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(message.contains("/nonexistent/tool"), "{message}");
    let err = h
        .client
        .pty(PtyRequest::new(["sh"], 24, 80).cwd("/nonexistent-dir"))
        .await
        .err()
        .expect("missing cwd");
    assert_eq!(agent_error(err).0, ErrorKind::NotFound);

    // Empty argv: the login shell, in the home directory, with TERM set.
    let mut t = Term::open(&h.client, PtyRequest::shell(24, 80).term("vt100")).await;
    let out = t
        .run("echo term=$TERM; [ \"$(pwd)\" = \"$HOME\" ] && echo home$((1+1))")
        .await;
    assert!(out.contains("term=vt100\r\n"), "{out:?}");
    assert!(out.contains("home2\r\n"), "{out:?}");
    t.send("exit\n").await;
    assert_eq!(t.exit().await, (Some(0), None));
    h.client.ping(Duration::from_secs(5)).await.expect("ping");
}
