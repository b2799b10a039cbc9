//! The harness shared by the integration tests: the real agent binary
//! (`serve --connect-unix`) against the real `AgentClient`.
//!
//! A small bridge stands in for QEMU's chardev: the client's connection stays open
//! while agent processes come and go, exactly as a virtio-serial port behaves. Each
//! agent keeps its files under its own `ATELIER_AGENT_ROOT` (the test's temp dir), so
//! parallel agents share nothing and the host's system files are never touched.

#![allow(dead_code)]

pub mod streams;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use atelier_agent_proto::{AgentClient, ErrorKind, ProtoError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Mutex;

/// Time an agent gets to say hello.
pub const READY: Duration = Duration::from_secs(10);

/// One agent connected to one client.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub client: AgentClient,
    pub agent: tokio::process::Child,
    /// What the agent wrote on stderr, when captured.
    pub stderr: Arc<std::sync::Mutex<Vec<u8>>>,
}

/// How to run the agent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// In a network namespace of its own (`unshare --net`).
    pub netns: bool,
    /// Collect its stderr into [`Harness::stderr`] instead of passing it through.
    pub capture_stderr: bool,
}

pub fn agent_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

/// The `ATELIER_AGENT_ROOT` of the agents of `dir`.
pub fn agent_root(dir: &Path) -> PathBuf {
    dir.join("root")
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

/// Starts an agent for the harness in `dir` (plain options).
pub fn spawn_agent(dir: &Path) -> tokio::process::Child {
    spawn_agent_with(dir, Options::default())
}

/// Starts an agent for the harness in `dir`.
pub fn spawn_agent_with(dir: &Path, opts: Options) -> tokio::process::Child {
    let agent = env!("CARGO_BIN_EXE_atelier-agent");
    let mut cmd = if opts.netns {
        let mut c = tokio::process::Command::new("unshare");
        c.args(["--net", "--"]).arg(agent);
        c
    } else {
        tokio::process::Command::new(agent)
    };
    let root = agent_root(dir);
    std::fs::create_dir_all(root.join("etc")).expect("agent root");
    cmd.arg("serve")
        .arg("--connect-unix")
        .arg(agent_socket(dir))
        .env("ATELIER_AGENT_ROOT", &root)
        .kill_on_drop(true);
    if opts.capture_stderr {
        cmd.stderr(Stdio::piped());
    }
    cmd.spawn().expect("spawn agent")
}

impl Harness {
    /// A plain agent.
    pub async fn start() -> Harness {
        Self::start_with(Options::default()).await
    }

    /// An agent run as `opts` say.
    pub async fn start_with(opts: Options) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = UnixListener::bind(dir.path().join("host.sock")).expect("bind host");
        let agents = UnixListener::bind(agent_socket(dir.path())).expect("bind agent");
        tokio::spawn(bridge(host, agents));
        let client = AgentClient::connect_unix(&dir.path().join("host.sock"))
            .await
            .expect("connect");
        let mut agent = spawn_agent_with(dir.path(), opts);
        let stderr: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
        if let Some(mut pipe) = agent.stderr.take() {
            let sink = stderr.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
            });
        }
        let hello = client.wait_ready(READY).await.expect("hello");
        assert_eq!(hello.pid, agent.id().expect("pid"));
        Harness {
            dir,
            client,
            agent,
            stderr,
        }
    }

    /// `name` in the test's temp dir.
    pub fn path(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("utf8")
            .to_owned()
    }

    /// The agent's `ATELIER_AGENT_ROOT`.
    pub fn root(&self) -> PathBuf {
        agent_root(self.dir.path())
    }

    /// The captured stderr of the agent, as text.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("lock")).into_owned()
    }
}

impl Drop for Harness {
    /// Kills the process groups of dev commands the agent recorded, even when a test
    /// failed before stopping them (the agent itself is killed on drop).
    fn drop(&mut self) {
        let run_dir = self.root().join("run/atelier/dev");
        let Ok(entries) = std::fs::read_dir(run_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if let Some(pgid) = text
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
                .filter(|p| *p > 1)
            {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pgid}")])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

pub fn agent_error(e: ProtoError) -> (ErrorKind, String) {
    match e {
        ProtoError::Agent { kind, message, .. } => (kind, message),
        other => panic!("expected an agent error, got {other:?}"),
    }
}

// Process helpers shared with the other suites live in the test kit.
#[allow(unused_imports)]
pub use atelier_testkit::{alive, group_members};
