//! `AgentClient` against a scripted fake guest: hostile input, restarts, disconnects,
//! flow control. Every test is bounded by a timeout so a hang fails instead of stalling.

use std::time::Duration;

use atelier_agent_proto::frame::{FRAME_MAGIC, FrameReader};
use atelier_agent_proto::limits::{DECODE_ERROR_BUDGET, GARBAGE_BUDGET, HELLO_BUDGET};
use atelier_agent_proto::{
    AgentClient, CAP_TCP_STREAM, CONTROL_QUEUE, ExecEvent, ExecHandle, ExecRequest, GuestMessage,
    Hello, HostMessage, MAX_FRAME_LEN, PROTOCOL_VERSION, ProtoError, REPLY_QUEUE, STREAM_WINDOW,
    encode_frame,
};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UnixStream;

const T: Duration = Duration::from_secs(5);

struct FakeGuest {
    reader: FrameReader<ReadHalf<UnixStream>>,
    writer: WriteHalf<UnixStream>,
}

impl FakeGuest {
    async fn send(&mut self, msg: &GuestMessage) {
        self.raw(&encode_frame(msg).expect("encode")).await;
    }

    /// The raw read half, for reading bytes without decoding.
    fn reader_mut(&mut self) -> &mut ReadHalf<UnixStream> {
        self.reader.get_mut()
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    /// Announces a current agent: Hello, then its capabilities.
    async fn announce(&mut self, pid: u32) {
        self.send(&hello(pid)).await;
        self.send(&GuestMessage::Capabilities {
            caps: vec![CAP_TCP_STREAM.into()],
        })
        .await;
    }

    /// Next host message other than the host Hello.
    async fn recv(&mut self) -> HostMessage {
        loop {
            let msg = tokio::time::timeout(T, self.reader.next::<HostMessage>())
                .await
                .expect("host message in time")
                .expect("read")
                .expect("not eof")
                .expect("valid frame");
            if !matches!(msg, HostMessage::Hello { .. }) {
                return msg;
            }
        }
    }
}

fn hello(pid: u32) -> GuestMessage {
    GuestMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        boot_id: "boot".into(),
        pid,
    })
}

fn pair() -> (AgentClient, FakeGuest) {
    let (a, b) = UnixStream::pair().expect("pair");
    let client = AgentClient::from_stream(a);
    let (r, w) = tokio::io::split(b);
    (
        client,
        FakeGuest {
            reader: FrameReader::new(r),
            writer: w,
        },
    )
}

#[tokio::test]
async fn garbage_and_oversize_frames_neither_panic_nor_hang() {
    let (client, mut guest) = pair();
    guest.raw(b"\x00\x01garbage\xA7\xA7").await;
    // Oversize length: must be rejected without allocating 4 GiB.
    let mut oversize = FRAME_MAGIC.to_vec();
    oversize.extend(u32::MAX.to_le_bytes());
    guest.raw(&oversize).await;
    let mut big = FRAME_MAGIC.to_vec();
    big.extend(((MAX_FRAME_LEN + 1) as u32).to_le_bytes());
    guest.raw(&big).await;
    // Malformed body.
    let mut bad = FRAME_MAGIC.to_vec();
    bad.extend(4u32.to_le_bytes());
    bad.extend([0xEE, 0xEE, 0xEE, 0xEE]);
    guest.raw(&bad).await;
    guest.announce(10).await;
    let h = client.wait_ready(T).await.expect("hello after garbage");
    assert_eq!(h.pid, 10);
    assert!(
        client.decode_errors() >= 3,
        "errors: {}",
        client.decode_errors()
    );

    let ping = tokio::spawn({
        let client = client.clone();
        async move { client.ping(T).await }
    });
    let HostMessage::Ping { id } = guest.recv().await else {
        panic!("expected ping")
    };
    guest.send(&GuestMessage::Pong { id }).await;
    ping.await.expect("join").expect("ping");
    assert!(client.is_connected());
}

#[tokio::test]
async fn hello_before_or_after_wait_ready_and_version_check() {
    let (client, mut guest) = pair();
    let waiter = tokio::spawn({
        let client = client.clone();
        async move { client.wait_ready(T).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    guest.announce(1).await;
    assert_eq!(waiter.await.expect("join").expect("ready").pid, 1);
    // Already seen: returns at once.
    assert_eq!(
        client
            .wait_ready(Duration::from_millis(10))
            .await
            .expect("ready")
            .pid,
        1
    );
    // Same agent re-announcing is not a restart.
    guest.announce(1).await;
    client.ping(Duration::from_millis(1)).await.ok();
    assert_eq!(client.restarts(), 0);

    let (client, mut guest) = pair();
    guest
        .send(&GuestMessage::Hello(Hello {
            version: PROTOCOL_VERSION + 1,
            agent_version: "future".into(),
            boot_id: "b".into(),
            pid: 2,
        }))
        .await;
    let err = client.wait_ready(T).await.expect_err("incompatible");
    assert!(
        matches!(err, ProtoError::IncompatibleVersion { .. }),
        "{err:?}"
    );

    let (client, _guest) = pair();
    let err = client
        .wait_ready(Duration::from_millis(50))
        .await
        .expect_err("no hello");
    assert!(
        matches!(
            err,
            ProtoError::Timeout {
                op: "wait_ready",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn new_hello_fails_outstanding_requests() {
    let (client, mut guest) = pair();
    guest.announce(1).await;
    client.wait_ready(T).await.expect("ready");
    let mut exec = client
        .exec(ExecRequest::new(["sleep", "9"]))
        .await
        .expect("exec");
    let metrics = tokio::spawn({
        let client = client.clone();
        async move { client.metrics().await }
    });
    let HostMessage::Exec { id, .. } = guest.recv().await else {
        panic!("expected exec")
    };
    guest
        .send(&GuestMessage::Exec {
            id,
            event: ExecEvent::Started { pid: 5 },
        })
        .await;
    assert!(matches!(guest.recv().await, HostMessage::Metrics { .. }));
    assert!(matches!(
        exec.next_event().await,
        Some(Ok(ExecEvent::Started { pid: 5 }))
    ));
    guest.announce(2).await;
    let err = exec
        .next_event()
        .await
        .expect("event")
        .expect_err("restart");
    assert!(
        matches!(err, ProtoError::AgentRestarted { op: "exec", pid: 2 }),
        "{err:?}"
    );
    assert!(exec.next_event().await.is_none());
    let err = metrics.await.expect("join").expect_err("restart");
    assert!(
        matches!(err, ProtoError::AgentRestarted { op: "metrics", .. }),
        "{err:?}"
    );
    assert_eq!(client.restarts(), 1);
    assert_eq!(client.hello().expect("hello").pid, 2);
}

#[tokio::test]
async fn socket_close_fails_everything_and_reports_disconnected() {
    let (client, mut guest) = pair();
    guest.announce(1).await;
    client.wait_ready(T).await.expect("ready");
    let ping = tokio::spawn({
        let client = client.clone();
        async move { client.ping(T).await }
    });
    assert!(matches!(guest.recv().await, HostMessage::Ping { .. }));
    drop(guest);
    let err = ping.await.expect("join").expect_err("disconnected");
    assert!(matches!(err, ProtoError::Disconnected { .. }), "{err:?}");
    assert!(!client.is_connected());
    let err = client.metrics().await.expect_err("closed");
    assert!(matches!(err, ProtoError::Disconnected { .. }), "{err:?}");
    let err = client.wait_ready(T).await.expect_err("closed");
    assert!(matches!(err, ProtoError::Disconnected { .. }), "{err:?}");
}

#[tokio::test]
async fn guest_overrunning_the_window_fails_only_that_stream() {
    let (client, mut guest) = pair();
    guest.announce(1).await;
    client.wait_ready(T).await.expect("ready");
    let mut exec = client.exec(ExecRequest::new(["yes"])).await.expect("exec");
    let HostMessage::Exec { id, .. } = guest.recv().await else {
        panic!("expected exec")
    };
    // Send more than the window without waiting for credit; the consumer reads nothing.
    let chunk = vec![b'y'; 64 * 1024];
    for _ in 0..(STREAM_WINDOW as usize / chunk.len() + 2) {
        guest
            .send(&GuestMessage::Exec {
                id,
                event: ExecEvent::Stdout(chunk.clone()),
            })
            .await;
    }
    // The client cancels the stream ...
    assert_eq!(guest.recv().await, HostMessage::Cancel { id });
    // ... the consumer sees the buffered data, then the flow-control error.
    let mut total = 0;
    let err = loop {
        match exec.next_event().await.expect("event") {
            Ok(ExecEvent::Stdout(d)) => total += d.len(),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => break e,
        }
    };
    assert!(total <= STREAM_WINDOW as usize);
    assert!(matches!(err, ProtoError::FlowControl { .. }), "{err:?}");
    // Other requests still work.
    let ping = tokio::spawn({
        let client = client.clone();
        async move { client.ping(T).await }
    });
    loop {
        match guest.recv().await {
            HostMessage::Ping { id } => {
                guest.send(&GuestMessage::Pong { id }).await;
                break;
            }
            HostMessage::Credit { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    ping.await.expect("join").expect("ping");
}

#[tokio::test]
async fn consumer_credits_and_early_upload_error() {
    let (client, mut guest) = pair();
    guest.announce(1).await;
    client.wait_ready(T).await.expect("ready");
    // Upload: the guest rejects it at once; the client must stop and report it.
    let upload = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .write_file("/x/y", 0o600, &vec![0u8; 8 << 20][..])
                .await
        }
    });
    let HostMessage::WriteFile { id, path, mode } = guest.recv().await else {
        panic!("expected write")
    };
    assert_eq!((path.as_str(), mode), ("/x/y", 0o600));
    guest
        .send(&GuestMessage::Error {
            id,
            kind: atelier_agent_proto::ErrorKind::NotFound,
            message: "parent directory /x does not exist".into(),
        })
        .await;
    let err = tokio::time::timeout(T, upload)
        .await
        .expect("no hang")
        .expect("join")
        .expect_err("fails");
    assert!(
        matches!(
            err,
            ProtoError::Agent {
                op: "write_file",
                ..
            }
        ),
        "{err:?}"
    );
    // Without credits from the guest, at most one window of chunks was sent.
    let mut chunk_bytes = 0;
    while let Ok(Ok(Some(Ok(msg)))) = tokio::time::timeout(
        Duration::from_millis(100),
        guest.reader.next::<HostMessage>(),
    )
    .await
    {
        if let HostMessage::WriteChunk { data, .. } = msg {
            chunk_bytes += data.len();
        }
    }
    assert!(
        chunk_bytes <= STREAM_WINDOW as usize,
        "sent {chunk_bytes} bytes without credit"
    );
}

#[tokio::test]
async fn a_silent_agent_times_out_every_kind_of_request_and_the_client_recovers() {
    let (client, mut guest) = pair();
    guest.announce(1).await;
    client.wait_ready(T).await.expect("ready");
    let short = Duration::from_millis(200);
    client.set_timeout(short);
    assert_eq!(client.timeout(), short);

    // A control request: typed timeout naming the operation and the deadline.
    let err = tokio::time::timeout(T, client.metrics())
        .await
        .expect("bounded by the client's deadline")
        .expect_err("no answer");
    assert!(
        matches!(err, ProtoError::Timeout { op: "metrics", after } if after == short),
        "{err:?}"
    );
    assert!(err.to_string().contains("metrics timed out"), "{err}");

    // A stream: the start is bounded, and the command is cancelled in the guest.
    let mut exec = client
        .exec(ExecRequest::new(["sleep", "9"]))
        .await
        .expect("queued");
    let err = tokio::time::timeout(T, exec.next_event())
        .await
        .expect("bounded")
        .expect("an event")
        .expect_err("no start");
    assert!(
        matches!(err, ProtoError::Timeout { op: "exec", .. }),
        "{err:?}"
    );
    assert!(exec.next_event().await.is_none());
    drop(exec);
    let err = tokio::time::timeout(T, client.read_file("/etc/hostname"))
        .await
        .expect("bounded")
        .err()
        .expect("no open");
    assert!(
        matches!(
            err,
            ProtoError::Timeout {
                op: "read_file",
                ..
            }
        ),
        "{err:?}"
    );
    // An upload whose guest never grants credit beyond the first window.
    let err = tokio::time::timeout(
        T,
        client.write_file("/tmp/x", 0o644, &vec![0u8; 4 << 20][..]),
    )
    .await
    .expect("bounded")
    .expect_err("stalled");
    assert!(
        matches!(
            err,
            ProtoError::Timeout {
                op: "write_file",
                ..
            }
        ),
        "{err:?}"
    );

    // The guest wakes up: drain what queued, answer the next request; late answers
    // to the abandoned ones are ignored.
    let mut cancelled = Vec::new();
    let ping = tokio::spawn({
        let client = client.clone();
        async move { client.ping(T).await }
    });
    loop {
        match guest.recv().await {
            HostMessage::Metrics { id } => {
                guest.send(&GuestMessage::Done { id }).await;
            }
            HostMessage::Cancel { id } => cancelled.push(id),
            HostMessage::Ping { id } => {
                guest.send(&GuestMessage::Pong { id }).await;
                break;
            }
            _ => {}
        }
    }
    ping.await.expect("join").expect("ping after the hang");
    assert!(
        !cancelled.is_empty(),
        "the timed-out exec was cancelled in the guest"
    );
    assert!(client.is_connected());
}

#[tokio::test]
async fn exec_started_in_time_runs_past_the_deadline() {
    let (client, mut guest) = pair();
    guest.announce(1).await;
    client.wait_ready(T).await.expect("ready");
    client.set_timeout(Duration::from_secs(1));
    let mut exec = client
        .exec(ExecRequest::new(["sleep", "1"]))
        .await
        .expect("exec");
    let HostMessage::Exec { id, .. } = guest.recv().await else {
        panic!("expected exec")
    };
    guest
        .send(&GuestMessage::Exec {
            id,
            event: ExecEvent::Started { pid: 7 },
        })
        .await;
    assert!(matches!(
        exec.next_event().await,
        Some(Ok(ExecEvent::Started { pid: 7 }))
    ));
    // Well past the start deadline, the running command's exit still arrives.
    let waiter = tokio::spawn(async move { exec.next_event().await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    guest
        .send(&GuestMessage::Exec {
            id,
            event: ExecEvent::Exit {
                code: Some(0),
                signal: None,
                timed_out: false,
            },
        })
        .await;
    let ev = tokio::time::timeout(T, waiter)
        .await
        .expect("bounded")
        .expect("join");
    assert!(
        matches!(ev, Some(Ok(ExecEvent::Exit { code: Some(0), .. }))),
        "{ev:?}"
    );
}

/// Waits until the client reports the connection closed, and returns why.
async fn closed_reason(client: &AgentClient) -> String {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match client.wait_ready(T).await {
            Err(ProtoError::Disconnected { reason }) => {
                assert!(!client.is_connected());
                return reason;
            }
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "connection still open: {other:?}"
                );
                tokio::task::yield_now().await;
            }
        }
    }
}

async fn started_exec(client: &AgentClient, guest: &mut FakeGuest) -> (ExecHandle, u64) {
    guest.announce(1).await;
    client.wait_ready(T).await.expect("ready");
    let exec = client.exec(ExecRequest::new(["yes"])).await.expect("exec");
    let HostMessage::Exec { id, .. } = guest.recv().await else {
        panic!("expected exec")
    };
    guest
        .send(&GuestMessage::Exec {
            id,
            event: ExecEvent::Started { pid: 5 },
        })
        .await;
    (exec, id)
}

#[tokio::test]
async fn repeated_started_closes_the_connection() {
    let (client, mut guest) = pair();
    let (mut exec, id) = started_exec(&client, &mut guest).await;
    assert!(matches!(
        exec.next_event().await,
        Some(Ok(ExecEvent::Started { pid: 5 }))
    ));
    guest
        .send(&GuestMessage::Exec {
            id,
            event: ExecEvent::Started { pid: 5 },
        })
        .await;
    let reason = closed_reason(&client).await;
    assert!(reason.contains("protocol violation"), "{reason}");
    assert!(reason.contains("Started"), "{reason}");
    // `closed` (what the manager's reconnection waits on) says the same at once.
    let said = tokio::time::timeout(T, client.closed())
        .await
        .expect("closed");
    assert_eq!(said, reason);
    let err = exec.next_event().await.expect("event").expect_err("closed");
    assert!(matches!(err, ProtoError::Disconnected { .. }), "{err:?}");
}

#[tokio::test]
async fn flood_of_tiny_frames_fails_only_that_stream() {
    let (client, mut guest) = pair();
    let (mut exec, id) = started_exec(&client, &mut guest).await;
    // Tiny frames stay far inside the byte window but would queue one message each.
    for _ in 0..REPLY_QUEUE + 100 {
        guest
            .send(&GuestMessage::Exec {
                id,
                event: ExecEvent::Stdout(vec![b'y']),
            })
            .await;
    }
    assert_eq!(guest.recv().await, HostMessage::Cancel { id });
    let mut events = 0;
    let err = loop {
        match exec.next_event().await.expect("event") {
            Ok(_) => events += 1,
            Err(e) => break e,
        }
    };
    assert!(events <= REPLY_QUEUE, "{events} events queued");
    assert!(matches!(err, ProtoError::FlowControl { .. }), "{err:?}");
    assert!(client.is_connected());
}

#[tokio::test]
async fn garbage_flood_closes_the_connection() {
    let (client, mut guest) = pair();
    guest.announce(1).await;
    client.wait_ready(T).await.expect("ready");
    // One restart preamble's worth of zeros is fine ...
    guest
        .raw(&vec![0u8; atelier_agent_proto::frame::SYNC_PREAMBLE_LEN])
        .await;
    guest.announce(1).await;
    client.wait_ready(T).await.expect("still ready");
    // ... a sustained flood of bytes that never form a frame is not.
    let noise: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 | 1).collect();
    let budget = GARBAGE_BUDGET.burst as usize;
    for _ in 0..(2 * budget / noise.len()) {
        if !client.is_connected() {
            break;
        }
        // The client may close the socket mid-flood; a write must never hang.
        let written = tokio::time::timeout(T, guest.writer.write_all(&noise))
            .await
            .expect("the client keeps reading or closes");
        if written.is_err() {
            break;
        }
    }
    let reason = closed_reason(&client).await;
    assert!(reason.contains("garbage"), "{reason}");
}

#[tokio::test]
async fn flood_of_bad_frames_and_hellos_closes_the_connection() {
    let (client, mut guest) = pair();
    guest.announce(1).await;
    client.wait_ready(T).await.expect("ready");
    let mut bad = FRAME_MAGIC.to_vec();
    bad.extend(u32::MAX.to_le_bytes());
    for _ in 0..=DECODE_ERROR_BUDGET.burst {
        guest.raw(&bad).await;
    }
    let reason = closed_reason(&client).await;
    assert!(reason.contains("rejected frames"), "{reason}");

    let (client, mut guest) = pair();
    for _ in 0..=HELLO_BUDGET.burst {
        guest.send(&hello(1)).await;
    }
    let reason = closed_reason(&client).await;
    assert!(reason.contains("Hellos"), "{reason}");
}

#[tokio::test]
async fn agent_that_stops_reading_is_disconnected() {
    let (client, mut guest) = pair();
    let (exec, _id) = started_exec(&client, &mut guest).await;
    // From here on the fake never reads: once the socket buffer is full, control
    // frames (here kills) pile up in the bounded control queue, and overflowing it
    // closes the connection instead of growing.
    let mut sent = 0usize;
    let err = loop {
        match exec.kill(15) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1_000_000, "control queue never filled");
        if sent.is_multiple_of(256) {
            // Let the writer task move frames into the socket buffer.
            tokio::task::yield_now().await;
        }
    };
    assert!(matches!(err, ProtoError::Disconnected { .. }), "{err:?}");
    let reason = closed_reason(&client).await;
    assert!(reason.contains("control channel"), "{reason}");
    assert!(sent >= CONTROL_QUEUE, "only {sent} queued");
    // The writer, blocked on the full socket, let go of it: the guest sees the close.
    let mut buf = vec![0u8; 1 << 20];
    let eof = tokio::time::timeout(T, async {
        loop {
            match tokio::io::AsyncReadExt::read(guest.reader_mut(), &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "socket still open after the violation");
    drop(exec);
}
