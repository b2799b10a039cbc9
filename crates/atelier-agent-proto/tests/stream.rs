//! Protocol versioning and TCP streams of `AgentClient` against a scripted fake guest:
//! old agents (served or refused), stream data both ways, credits, refused ports,
//! open deadlines, and hostile stream frames (unknown ids, duplicates, overruns).

use std::time::Duration;

use atelier_agent_proto::frame::FrameReader;
use atelier_agent_proto::{
    AgentClient, CAP_TCP_STREAM, ErrorKind, GuestMessage, Hello, HostMessage,
    MIN_AGENT_PROTOCOL_VERSION, PROTOCOL_VERSION, ProtoError, STREAM_WINDOW, encode_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UnixStream;

const T: Duration = Duration::from_secs(5);

struct FakeGuest {
    reader: FrameReader<ReadHalf<UnixStream>>,
    writer: WriteHalf<UnixStream>,
}

impl FakeGuest {
    async fn send(&mut self, msg: &GuestMessage) {
        let frame = encode_frame(msg).expect("encode");
        self.writer.write_all(&frame).await.expect("write");
    }

    async fn hello(&mut self, version: u32, pid: u32) {
        self.send(&GuestMessage::Hello(Hello {
            version,
            agent_version: format!("v{version}"),
            boot_id: "boot".into(),
            pid,
        }))
        .await;
    }

    /// Next host message other than the host Hello and credits.
    async fn recv(&mut self) -> HostMessage {
        loop {
            let msg = self.recv_any().await;
            if !matches!(msg, HostMessage::Hello { .. } | HostMessage::Credit { .. }) {
                return msg;
            }
        }
    }

    async fn recv_any(&mut self) -> HostMessage {
        tokio::time::timeout(T, self.reader.next::<HostMessage>())
            .await
            .expect("host message in time")
            .expect("read")
            .expect("not eof")
            .expect("valid frame")
    }

    /// Answers one ping, proving the connection still works; returns what came before.
    async fn pong(&mut self, client: &AgentClient) -> Vec<HostMessage> {
        let ping = tokio::spawn({
            let client = client.clone();
            async move { client.ping(T).await }
        });
        let mut before = Vec::new();
        loop {
            match self.recv_any().await {
                HostMessage::Ping { id } => {
                    self.send(&GuestMessage::Pong { id }).await;
                    break;
                }
                other => before.push(other),
            }
        }
        ping.await.expect("join").expect("ping");
        before
    }
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

async fn ready_current(client: &AgentClient, guest: &mut FakeGuest) {
    guest.hello(PROTOCOL_VERSION, 1).await;
    guest
        .send(&GuestMessage::Capabilities {
            caps: vec!["something-else".into(), CAP_TCP_STREAM.into()],
        })
        .await;
    client.wait_ready(T).await.expect("ready");
}

#[tokio::test]
async fn version_1_agent_is_served_without_streams() {
    let (client, mut guest) = pair();
    // The exact Hello encoding a version-1 agent sends (frozen in message.rs too).
    guest.hello(1, 7).await;
    let hello = client.wait_ready(T).await.expect("a v1 agent is served");
    assert_eq!(hello.version, 1);
    assert_eq!(client.capabilities(), Some(Vec::new()));
    assert!(!client.supports(CAP_TCP_STREAM));
    let err = client.open_stream(80, T).await.expect_err("unsupported");
    assert!(
        matches!(
            err,
            ProtoError::Unsupported {
                op: "open_stream",
                capability: CAP_TCP_STREAM,
                agent_version: 1
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("rebuild"), "{err}");
    // Nothing was sent to the old agent (it could not decode a StreamOpen).
    let before = guest.pong(&client).await;
    assert!(
        before
            .iter()
            .all(|m| matches!(m, HostMessage::Hello { .. })),
        "{before:?}"
    );
}

#[tokio::test]
async fn agent_below_the_minimum_version_is_refused() {
    let (client, mut guest) = pair();
    guest.hello(MIN_AGENT_PROTOCOL_VERSION - 1, 3).await;
    let err = client.wait_ready(T).await.expect_err("too old");
    assert!(
        matches!(err, ProtoError::AgentTooOld { agent, min } if agent == MIN_AGENT_PROTOCOL_VERSION - 1 && min == MIN_AGENT_PROTOCOL_VERSION),
        "{err:?}"
    );
    assert!(err.to_string().contains("rebuild"), "{err}");
    let err = client.open_stream(80, T).await.expect_err("too old");
    assert!(matches!(err, ProtoError::AgentTooOld { .. }), "{err:?}");
}

#[tokio::test]
async fn current_agent_is_ready_only_with_its_capabilities() {
    let (client, mut guest) = pair();
    guest.hello(PROTOCOL_VERSION, 1).await;
    let err = client
        .wait_ready(Duration::from_millis(100))
        .await
        .expect_err("capabilities missing");
    assert!(matches!(err, ProtoError::Timeout { .. }), "{err:?}");
    guest
        .send(&GuestMessage::Capabilities {
            caps: vec![CAP_TCP_STREAM.into()],
        })
        .await;
    client.wait_ready(T).await.expect("ready");
    assert!(client.supports(CAP_TCP_STREAM));
    // The same agent re-announcing keeps its capabilities; a restarted one must
    // announce again.
    guest.hello(PROTOCOL_VERSION, 1).await;
    guest.pong(&client).await;
    assert!(client.supports(CAP_TCP_STREAM));
    guest.hello(PROTOCOL_VERSION, 2).await;
    let deadline = tokio::time::Instant::now() + T;
    while client.hello().map(|h| h.pid) != Some(2) {
        assert!(tokio::time::Instant::now() < deadline, "restart not seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(client.capabilities(), None);
    guest
        .send(&GuestMessage::Capabilities { caps: Vec::new() })
        .await;
    client.wait_ready(T).await.expect("ready again");
    assert!(!client.supports(CAP_TCP_STREAM));
}

#[tokio::test]
async fn stream_relays_both_ways_with_half_close_and_credits() {
    let (client, mut guest) = pair();
    ready_current(&client, &mut guest).await;
    let opener = tokio::spawn({
        let client = client.clone();
        async move { client.open_stream(4096, T).await }
    });
    let HostMessage::StreamOpen {
        id,
        ip,
        port,
        connect_timeout_ms,
    } = guest.recv().await
    else {
        panic!("expected StreamOpen")
    };
    assert_eq!((ip.to_string().as_str(), port), ("127.0.0.1", 4096));
    assert!(connect_timeout_ms > 0 && connect_timeout_ms <= 5000);
    guest.send(&GuestMessage::StreamOpened { id }).await;
    let mut stream = opener.await.expect("join").expect("open");
    assert_eq!(stream.id(), id);

    stream.write_all(b"hello guest").await.expect("write");
    stream.shutdown().await.expect("half-close");
    assert_eq!(
        guest.recv().await,
        HostMessage::StreamData {
            id,
            data: b"hello guest".to_vec()
        }
    );
    assert_eq!(guest.recv().await, HostMessage::StreamEof { id });

    guest
        .send(&GuestMessage::StreamData {
            id,
            data: b"hello host".to_vec(),
        })
        .await;
    guest.send(&GuestMessage::StreamEof { id }).await;
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, b"hello host");
    // Reading returned credit for what was consumed.
    let mut credited = 0;
    while credited < 10 {
        if let HostMessage::Credit { id: cid, bytes } = guest.recv_any().await {
            assert_eq!(cid, id);
            credited += bytes;
        }
    }
    assert_eq!(stream.buffered(), 0);
    drop(stream);
    assert_eq!(guest.recv().await, HostMessage::Cancel { id });
}

#[tokio::test]
async fn host_writes_wait_for_guest_credit() {
    let (client, mut guest) = pair();
    ready_current(&client, &mut guest).await;
    let opener = tokio::spawn({
        let client = client.clone();
        async move { client.open_stream(1, T).await }
    });
    let HostMessage::StreamOpen { id, .. } = guest.recv().await else {
        panic!("expected StreamOpen")
    };
    guest.send(&GuestMessage::StreamOpened { id }).await;
    let mut stream = opener.await.expect("join").expect("open");
    // Write twice the window in the background; without credit only one window goes.
    let writer = tokio::spawn(async move {
        let data = vec![7u8; 2 * STREAM_WINDOW as usize];
        stream.write_all(&data).await.map(|_| stream)
    });
    let mut sent = 0usize;
    while sent < STREAM_WINDOW as usize {
        match guest.recv().await {
            HostMessage::StreamData { data, .. } => sent += data.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sent, STREAM_WINDOW as usize);
    // Nothing more without credit: the next frame is the ping.
    assert!(guest.pong(&client).await.is_empty());
    guest
        .send(&GuestMessage::Credit {
            id,
            bytes: STREAM_WINDOW,
        })
        .await;
    while sent < 2 * STREAM_WINDOW as usize {
        match guest.recv().await {
            HostMessage::StreamData { data, .. } => sent += data.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    tokio::time::timeout(T, writer)
        .await
        .expect("writer done")
        .expect("join")
        .expect("write");
}

#[tokio::test]
async fn refused_port_is_a_typed_error() {
    let (client, mut guest) = pair();
    ready_current(&client, &mut guest).await;
    let opener = tokio::spawn({
        let client = client.clone();
        async move { client.open_stream(9, T).await }
    });
    let HostMessage::StreamOpen { id, .. } = guest.recv().await else {
        panic!("expected StreamOpen")
    };
    guest
        .send(&GuestMessage::Error {
            id,
            kind: ErrorKind::ConnectionRefused,
            message: "connection refused".into(),
        })
        .await;
    let err = opener.await.expect("join").expect_err("refused");
    match &err {
        ProtoError::ConnectionRefused { addr, .. } => assert_eq!(addr.port(), 9),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        err.to_string().contains("nothing listens on 127.0.0.1:9"),
        "{err}"
    );
    // A refused stream is not cancelled (the agent already forgot it).
    assert!(guest.pong(&client).await.is_empty());
}

#[tokio::test]
async fn open_deadline_cancels_the_connect() {
    let (client, mut guest) = pair();
    ready_current(&client, &mut guest).await;
    let opener = tokio::spawn({
        let client = client.clone();
        async move { client.open_stream(5, Duration::from_millis(200)).await }
    });
    let HostMessage::StreamOpen { id, .. } = guest.recv().await else {
        panic!("expected StreamOpen")
    };
    // The guest never answers.
    let err = opener.await.expect("join").expect_err("times out");
    assert!(
        matches!(
            err,
            ProtoError::Timeout {
                op: "open_stream",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(guest.recv().await, HostMessage::Cancel { id });
}

#[tokio::test]
async fn flooding_guest_cannot_grow_host_buffers_past_the_window() {
    let (client, mut guest) = pair();
    ready_current(&client, &mut guest).await;
    let opener = tokio::spawn({
        let client = client.clone();
        async move { client.open_stream(2, T).await }
    });
    let HostMessage::StreamOpen { id, .. } = guest.recv().await else {
        panic!("expected StreamOpen")
    };
    guest.send(&GuestMessage::StreamOpened { id }).await;
    let mut stream = opener.await.expect("join").expect("open");
    // Exactly the window is fine ...
    let chunk = vec![b'f'; 64 * 1024];
    let chunks = STREAM_WINDOW as usize / chunk.len();
    for _ in 0..chunks {
        guest
            .send(&GuestMessage::StreamData {
                id,
                data: chunk.clone(),
            })
            .await;
    }
    guest.pong(&client).await;
    assert_eq!(stream.buffered(), u64::from(STREAM_WINDOW));
    // ... one byte more is a protocol violation that closes the stream.
    guest
        .send(&GuestMessage::StreamData {
            id,
            data: vec![b'x'; 1],
        })
        .await;
    assert_eq!(guest.recv().await, HostMessage::Cancel { id });
    assert!(stream.peak_buffered() <= u64::from(STREAM_WINDOW) + 1);
    // More flooding after the close is dropped (unknown id): nothing grows.
    for _ in 0..8 {
        guest
            .send(&GuestMessage::StreamData {
                id,
                data: chunk.clone(),
            })
            .await;
    }
    guest.pong(&client).await;
    assert!(stream.buffered() <= u64::from(STREAM_WINDOW) + 1);
    // The reader gets the data within the window, then the error.
    let mut total = 0usize;
    let mut buf = vec![0u8; 100_000];
    let err = loop {
        match stream.read(&mut buf).await {
            Ok(0) => panic!("clean end of stream after a violation"),
            Ok(n) => total += n,
            Err(e) => break e,
        }
    };
    assert_eq!(total, STREAM_WINDOW as usize);
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
}

#[tokio::test]
async fn hostile_stream_frames_for_unknown_ids_and_repeats_are_harmless() {
    let (client, mut guest) = pair();
    ready_current(&client, &mut guest).await;
    for id in [0, 1, u64::MAX] {
        guest
            .send(&GuestMessage::StreamData {
                id,
                data: vec![1; 1000],
            })
            .await;
        guest.send(&GuestMessage::StreamEof { id }).await;
        guest.send(&GuestMessage::StreamOpened { id }).await;
        guest
            .send(&GuestMessage::Credit {
                id,
                bytes: u32::MAX,
            })
            .await;
    }
    guest.pong(&client).await;
    assert!(client.is_connected());
}

/// Waits until the client reports the connection closed, and returns why.
async fn closed_reason(client: &AgentClient) -> String {
    let err = tokio::time::timeout(T, async {
        loop {
            match client.wait_ready(T).await {
                Err(e) => break e,
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("connection closed in time");
    assert!(!client.is_connected());
    err.to_string()
}

#[tokio::test]
async fn stream_event_for_a_request_that_is_no_stream_closes_the_connection() {
    let (client, mut guest) = pair();
    ready_current(&client, &mut guest).await;
    let metrics = tokio::spawn({
        let client = client.clone();
        async move { client.metrics().await }
    });
    let HostMessage::Metrics { id } = guest.recv().await else {
        panic!("expected Metrics")
    };
    guest.send(&GuestMessage::StreamEof { id }).await;
    let err = tokio::time::timeout(T, metrics)
        .await
        .expect("metrics done")
        .expect("join")
        .expect_err("violation");
    assert!(err.to_string().contains("protocol violation"), "{err}");
    assert!(closed_reason(&client).await.contains("protocol violation"));
}

#[tokio::test]
async fn repeated_stream_opened_closes_the_connection() {
    let (client, mut guest) = pair();
    ready_current(&client, &mut guest).await;
    let opener = tokio::spawn({
        let client = client.clone();
        async move { client.open_stream(3, T).await }
    });
    let HostMessage::StreamOpen { id: sid, .. } = guest.recv().await else {
        panic!("expected StreamOpen")
    };
    guest.send(&GuestMessage::StreamOpened { id: sid }).await;
    let mut stream = opener.await.expect("join").expect("open");
    guest.send(&GuestMessage::StreamOpened { id: sid }).await;
    let mut buf = [0u8; 16];
    let err = stream.read(&mut buf).await.expect_err("violation");
    assert!(err.to_string().contains("protocol violation"), "{err}");
    assert!(closed_reason(&client).await.contains("StreamOpened"));
}

#[tokio::test]
async fn excess_credit_closes_the_connection_without_panicking() {
    let (client, mut guest) = pair();
    ready_current(&client, &mut guest).await;
    let opener = tokio::spawn({
        let client = client.clone();
        async move { client.open_stream(3, T).await }
    });
    let HostMessage::StreamOpen { id: sid, .. } = guest.recv().await else {
        panic!("expected StreamOpen")
    };
    guest.send(&GuestMessage::StreamOpened { id: sid }).await;
    let _stream = opener.await.expect("join").expect("open");
    // Nothing was sent yet, so any credit is more than the window.
    guest
        .send(&GuestMessage::Credit { id: sid, bytes: 1 })
        .await;
    let reason = closed_reason(&client).await;
    assert!(reason.contains("exceeds the window"), "{reason}");
}
