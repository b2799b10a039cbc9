//! Guest services for the TCP stream tests (small python3 servers started through
//! exec, listening on 127.0.0.1) and the checks run through them. Shared with the VM
//! tests of the `atelier` crate (included there with `#[path]`), so it depends only
//! on the protocol crate, tokio and sha2.

#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use atelier_agent_proto::{
    AgentClient, ExecEvent, ExecHandle, ExecRequest, GuestStream, STREAM_CHUNK_LEN, STREAM_WINDOW,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes everything back; at end of input prints `<bytes> <sha256>` of what it got.
pub const ECHO: &str = r#"
import hashlib, socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
h = hashlib.sha256()
n = 0
while True:
    d = c.recv(262144)
    if not d:
        break
    h.update(d)
    n += len(d)
    c.sendall(d)
c.shutdown(socket.SHUT_WR)
print(n, h.hexdigest(), flush=True)
"#;

/// Writes as fast as it can until the connection breaks, then prints the bytes sent.
pub const FLOOD: &str = r#"
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
buf = b"x" * 65536
n = 0
try:
    while True:
        c.sendall(buf)
        n += len(buf)
except OSError:
    pass
print(n, flush=True)
"#;

/// A python3 server running in the guest.
pub struct Service {
    exec: ExecHandle,
    out: Vec<u8>,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
}

impl Service {
    /// Starts `script` with python3 and waits (up to `deadline`) for its port.
    pub async fn start(client: &AgentClient, script: &str, deadline: Duration) -> Service {
        let exec = client
            .exec(ExecRequest::new(["python3", "-c", script]))
            .await
            .expect("start python3");
        let mut svc = Service {
            exec,
            out: Vec::new(),
            port: 0,
        };
        let line = svc.line(deadline).await;
        svc.port = line.trim().parse().expect("port line");
        svc
    }

    /// The next line of its stdout, within `deadline`.
    pub async fn line(&mut self, deadline: Duration) -> String {
        let end = Instant::now() + deadline;
        loop {
            if let Some(pos) = self.out.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.out.drain(..=pos).collect();
                return String::from_utf8(line).expect("utf8");
            }
            let left = end.saturating_duration_since(Instant::now());
            let event = tokio::time::timeout(left, self.exec.next_event())
                .await
                .expect("service output in time")
                .expect("service still running")
                .expect("service event");
            match event {
                ExecEvent::Stdout(d) => self.out.extend(d),
                ExecEvent::Stderr(d) => eprint!("service: {}", String::from_utf8_lossy(&d)),
                ExecEvent::Exit { code, signal, .. } => {
                    panic!("service exited ({code:?}, {signal:?}) before a full line")
                }
                ExecEvent::Started { .. } => {}
            }
        }
    }

    /// Waits (up to `deadline`) until it exits; returns its exit code.
    pub async fn exit(mut self, deadline: Duration) -> Option<i32> {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.exec.next_event())
                .await
                .expect("service exits in time")
            {
                Some(Ok(ExecEvent::Exit { code, .. })) => return code,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("service: {e}"),
                None => panic!("service ended without an exit event"),
            }
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a reordering or loss shows.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Result of [`echo_roundtrip`].
#[derive(Debug)]
pub struct Roundtrip {
    /// Bytes sent (and received back).
    pub bytes: u64,
    /// Time from the first write to the last byte read back.
    pub elapsed: Duration,
    /// Peak bytes buffered on the host for the stream.
    pub peak_buffered: u64,
}

/// Opens streams with [`AgentClient::open_stream`].
pub fn opener(
    client: &AgentClient,
    deadline: Duration,
) -> impl FnOnce(u16) -> std::pin::Pin<Box<dyn Future<Output = GuestStream> + Send>> {
    let client = client.clone();
    move |port| {
        Box::pin(async move {
            client
                .open_stream(port, deadline)
                .await
                .expect("open stream to the service")
        })
    }
}

/// Sends `total` bytes through an [`ECHO`] service (started with `client`, the stream
/// opened with `open`) and reads them back at the same time; checks the sha256 of
/// what went in, what the service saw and what came out.
pub async fn echo_roundtrip<F, Fut>(
    client: &AgentClient,
    total: usize,
    deadline: Duration,
    open: F,
) -> Roundtrip
where
    F: FnOnce(u16) -> Fut,
    Fut: Future<Output = GuestStream>,
{
    let mut svc = Service::start(client, ECHO, deadline).await;
    let stream = open(svc.port).await;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0usize;
        while sent < total {
            let n = buf.len().min(total - sent);
            fill(&mut buf[..n], &mut state);
            hash.update(&buf[..n]);
            wr.write_all(&buf[..n]).await.expect("write to guest");
            sent += n;
        }
        wr.shutdown().await.expect("half-close");
        (hash.finalize(), wr)
    });
    let mut hash = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let read = async {
        loop {
            let n = rd.read(&mut buf).await.expect("read from guest");
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n;
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .expect("echo finished in time");
    let elapsed = start.elapsed();
    let (sent_hash, wr) = writer.await.expect("writer");
    assert_eq!(got, total, "bytes back");
    let sent_hex = hex(&sent_hash);
    assert_eq!(hex(&hash.finalize()), sent_hex, "sha256 of the bytes back");
    let report = svc.line(deadline).await;
    assert_eq!(
        report.trim(),
        format!("{total} {sent_hex}"),
        "what the guest service received"
    );
    let stream = rd.unsplit(wr);
    let peak = stream.peak_buffered();
    assert!(peak <= u64::from(STREAM_WINDOW), "peak {peak}");
    drop(stream);
    assert_eq!(svc.exit(deadline).await, Some(0));
    Roundtrip {
        bytes: total as u64,
        elapsed,
        peak_buffered: peak,
    }
}

/// Opens a stream to a [`FLOOD`] service and reads nothing until the agent filled the
/// window: the host then buffers at most [`STREAM_WINDOW`] bytes while the service
/// keeps trying to write. Then reads `drain` bytes, drops the stream and checks the
/// service saw the connection close. Returns the peak buffered bytes.
pub async fn flood_stays_within_window<F, Fut>(
    client: &AgentClient,
    drain: usize,
    deadline: Duration,
    open: F,
) -> u64
where
    F: FnOnce(u16) -> Fut,
    Fut: Future<Output = GuestStream>,
{
    let svc = Service::start(client, FLOOD, deadline).await;
    let mut stream = open(svc.port).await;
    let full = u64::from(STREAM_WINDOW) - STREAM_CHUNK_LEN as u64;
    wait_until(deadline, "the agent to fill the window", || {
        stream.buffered() >= full
    })
    .await;
    // The service keeps writing; the agent must not read beyond the window. Watch a
    // while (a number of agent round trips, not a time) that nothing more arrives.
    for _ in 0..20 {
        client.ping(deadline).await.expect("ping");
        let b = stream.buffered();
        assert!(b <= u64::from(STREAM_WINDOW), "buffered {b}");
    }
    assert!(stream.peak_buffered() <= u64::from(STREAM_WINDOW));
    let mut buf = vec![0u8; 128 * 1024];
    let mut got = 0;
    while got < drain {
        let n = tokio::time::timeout(deadline, stream.read(&mut buf))
            .await
            .expect("read in time")
            .expect("read");
        assert!(n > 0, "flood ended early");
        assert!(buf[..n].iter().all(|b| *b == b'x'));
        got += n;
    }
    let peak = stream.peak_buffered();
    assert!(peak <= u64::from(STREAM_WINDOW), "peak {peak}");
    drop(stream);
    // Dropping the stream closes the socket in the guest: the service's write fails.
    assert_eq!(svc.exit(deadline).await, Some(0));
    peak
}

/// Polls `cond` every few milliseconds until it holds; fails after `deadline`.
pub async fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens a stream to a guest port where nothing listens; returns the error.
pub async fn refused(
    client: &AgentClient,
    port: u16,
    deadline: Duration,
) -> atelier_agent_proto::ProtoError {
    match client.open_stream(port, deadline).await {
        Ok(s) => panic!("stream to an unused port opened: {s:?}"),
        Err(e) => e,
    }
}
