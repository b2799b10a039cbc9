//! Running commands: each in its own process group, output streamed as it comes
//! under the host's credit window, stdin streamed in, timeout kills the group.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use atelier_agent_proto::{
    EXEC_CHUNK_LEN, ErrorKind, ExecEvent, ExecRequest, GuestMessage, STREAM_WINDOW,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::serve::{Agent, ExecCtl, Stream};

/// After the process exits, output still arriving within this gap is forwarded; a
/// pipe kept open longer by a background child is abandoned.
const DRAIN_GAP: Duration = Duration::from_millis(200);

/// Sends `signal` to process group `pgid`.
pub fn signal_group(pgid: i32, signal: i32) -> Result<(), String> {
    let pid = rustix::process::Pid::from_raw(pgid)
        .ok_or_else(|| "the process is not running".to_owned())?;
    let sig = rustix::process::Signal::from_named_raw(signal)
        .ok_or_else(|| format!("unsupported signal number {signal}"))?;
    rustix::process::kill_process_group(pid, sig)
        .map_err(|e| format!("signalling process group {pgid}: {e}"))
}

/// Registers exec `id` and runs it in a task.
pub fn start(agent: Arc<Agent>, id: u64, req: ExecRequest) {
    let (stdin_tx, stdin_rx) = if req.stdin {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let credit = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
    let pgid = Arc::new(AtomicI32::new(0));
    agent.streams().insert(
        id,
        Stream::Exec(ExecCtl {
            stdin: stdin_tx,
            credit: credit.clone(),
            pgid: pgid.clone(),
        }),
    );
    tokio::spawn(async move {
        if let Err((kind, message)) = run(&agent, id, req, stdin_rx, credit, pgid).await {
            agent.send_error(id, kind, message).await;
        }
        agent.remove(id);
    });
}

/// Maps a spawn failure of `program` to a protocol error.
pub fn spawn_error(program: &str, e: &std::io::Error) -> (ErrorKind, String) {
    let message = match e.kind() {
        std::io::ErrorKind::NotFound => format!("executable not found: {program}"),
        std::io::ErrorKind::PermissionDenied => format!("permission denied executing {program}"),
        _ => format!("spawning {program}: {e}"),
    };
    (ErrorKind::from_io(e.kind()), message)
}

async fn run(
    agent: &Arc<Agent>,
    id: u64,
    req: ExecRequest,
    stdin_rx: Option<mpsc::UnboundedReceiver<(Vec<u8>, bool)>>,
    credit: Arc<Semaphore>,
    pgid: Arc<AtomicI32>,
) -> Result<(), (ErrorKind, String)> {
    let Some(program) = req.argv.first() else {
        return Err((ErrorKind::Invalid, "exec needs a non-empty argv".into()));
    };
    if let Some(cwd) = &req.cwd
        && !std::path::Path::new(cwd).is_dir()
    {
        return Err((
            ErrorKind::NotFound,
            format!("working directory {cwd} does not exist"),
        ));
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&req.argv[1..])
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd.spawn().map_err(|e| spawn_error(program, &e))?;
    let pid = child.id().unwrap_or(0);
    pgid.store(pid as i32, Ordering::Release);
    if credit.is_closed() {
        // Cancelled while spawning: the Cancel found no process group to kill.
        let _ = signal_group(pid as i32, libc::SIGKILL);
    }
    agent
        .send(GuestMessage::Exec {
            id,
            event: ExecEvent::Started { pid },
        })
        .await;

    let (exited_tx, exited_rx) = watch::channel(false);
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(
            agent.clone(),
            id,
            out,
            false,
            credit.clone(),
            exited_rx.clone(),
        )));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(
            agent.clone(),
            id,
            err,
            true,
            credit.clone(),
            exited_rx,
        )));
    }
    if let (Some(stdin), Some(rx)) = (child.stdin.take(), stdin_rx) {
        tokio::spawn(feed_stdin(agent.clone(), id, stdin, rx));
    }

    let mut timed_out = false;
    let status = match req.timeout_ms {
        Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                timed_out = true;
                let _ = signal_group(pid as i32, libc::SIGKILL);
                child.wait().await
            }
        },
        None => child.wait().await,
    };
    let _ = exited_tx.send(true);
    for p in pumps {
        let _ = p.await;
    }
    // The leader is reaped: its pid may be recycled, so later kills must not use it.
    pgid.store(0, Ordering::Release);
    let status = status.map_err(|e| (ErrorKind::Io, format!("waiting for {program}: {e}")))?;
    agent
        .send(GuestMessage::Exec {
            id,
            event: ExecEvent::Exit {
                code: status.code(),
                signal: status.signal(),
                timed_out,
            },
        })
        .await;
    Ok(())
}

/// Forwards one output pipe. Waits for credits; when the stream is cancelled (credits
/// closed) keeps draining the pipe and drops the data.
async fn pump(
    agent: Arc<Agent>,
    id: u64,
    mut pipe: impl AsyncRead + Unpin,
    stderr: bool,
    credit: Arc<Semaphore>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; EXEC_CHUNK_LEN];
    let mut discard = false;
    loop {
        let read = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_GAP, pipe.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                r = pipe.read(&mut buf) => r,
                _ = exited.changed() => continue,
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !discard {
            // n <= EXEC_CHUNK_LEN, fits u32.
            match credit.acquire_many(n as u32).await {
                Ok(permit) => permit.forget(),
                Err(_) => discard = true,
            }
        }
        if !discard {
            let data = buf[..n].to_vec();
            let event = if stderr {
                ExecEvent::Stderr(data)
            } else {
                ExecEvent::Stdout(data)
            };
            agent.send(GuestMessage::Exec { id, event }).await;
        }
    }
}

/// Writes host stdin frames to the process and grants the host credit for each.
async fn feed_stdin(
    agent: Arc<Agent>,
    id: u64,
    stdin: tokio::process::ChildStdin,
    mut rx: mpsc::UnboundedReceiver<(Vec<u8>, bool)>,
) {
    let mut stdin = Some(stdin);
    while let Some((data, eof)) = rx.recv().await {
        if let Some(pipe) = stdin.as_mut()
            && !data.is_empty()
            && pipe.write_all(&data).await.is_err()
        {
            // The process closed stdin: drop further input but keep granting credit.
            stdin = None;
        }
        if !data.is_empty() {
            // data.len() <= frame limit, fits u32.
            agent
                .send(GuestMessage::Credit {
                    id,
                    bytes: data.len() as u32,
                })
                .await;
        }
        if eof {
            stdin = None;
        }
    }
}
