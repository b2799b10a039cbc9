//! Transport failures: a connector that fails, a server that never answers, an event
//! stream that floods or goes silent. Fake peers stand in for OpenCode only where the
//! real one cannot misbehave on demand.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use atelier_opencode::{Client, Connector, Error, Event, Io, MAX_EVENT};
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

struct Refused;

impl Connector for Refused {
    fn connect(&self) -> BoxFuture<'static, io::Result<Box<dyn Io>>> {
        async {
            Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "guest stream refused",
            ))
        }
        .boxed()
    }
}

#[tokio::test]
async fn a_failing_connector_is_a_connect_error() {
    let client = Client::new(Arc::new(Refused), "pw", "/work");
    match client.health().await {
        Err(Error::Connect(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
        other => panic!("expected Connect, got {other:?}"),
    }
    assert!(matches!(client.events().await, Err(Error::Connect(_))));
    // Nothing listening on a TCP port is the same error.
    let port = atelier_testkit::free_port();
    let client = Client::tcp(([127, 0, 0, 1], port).into(), "pw", "/work");
    assert!(matches!(client.health().await, Err(Error::Connect(_))));
}

#[tokio::test]
async fn a_silent_server_is_a_timeout_within_the_deadline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // accept and never answer
        }
    });
    let client = Client::tcp(addr, "pw", "/work").with_timeout(Duration::from_millis(400));
    let start = Instant::now();
    match client.permissions().await {
        Err(Error::Timeout(what)) => assert_eq!(what, "list permissions"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(client.events().await, Err(Error::Timeout(_))));
}

/// A connector whose every connection is served by `serve` on the far end of a duplex.
struct Fake<F>(F);

impl<F, Fut> Connector for Fake<F>
where
    F: Fn(DuplexStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    fn connect(&self) -> BoxFuture<'static, io::Result<Box<dyn Io>>> {
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn((self.0)(far));
        async move { Ok(Box::new(near) as Box<dyn Io>) }.boxed()
    }
}

/// Reads the request head, then answers an event stream (body until close).
async fn sse_head(s: &mut DuplexStream) -> io::Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&b[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("get /event "), "{head}");
    assert!(
        head.contains("x-opencode-directory: %2fwork%2fa%20b"),
        "{head}"
    );
    assert!(head.contains("authorization: basic "), "{head}");
    s.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n\
          data: {\"id\":\"evt_1\",\"type\":\"server.connected\",\"properties\":{}}\r\n\r\n",
    )
    .await
}

#[tokio::test]
async fn an_oversized_event_is_an_error_not_memory_growth() {
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let client = Client::new(
        Arc::new(Fake(move |mut s: DuplexStream| {
            let w = w.clone();
            async move {
                if sse_head(&mut s).await.is_err() {
                    return;
                }
                // One endless data line, 64 KiB at a time, up to 64 MiB.
                let _ = s.write_all(b"data: ").await;
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..1024 {
                    if s.write_all(&chunk).await.is_err() {
                        return; // the client hung up
                    }
                    w.fetch_add(chunk.len(), Ordering::Relaxed);
                }
            }
        })),
        "pw",
        "/work/a b",
    );
    let mut events = client.events().await.expect("open");
    assert_eq!(
        events.next().await.expect("item").expect("event"),
        Event::Connected
    );
    match events.next().await {
        Some(Err(Error::Stream(m))) => assert!(m.contains("longer than"), "{m}"),
        other => panic!("expected a Stream error, got {other:?}"),
    }
    assert!(
        events.next().await.is_none(),
        "the stream ends after the error"
    );
    drop(events);
    // The peer was stopped by back-pressure soon after the limit, not read to the end.
    let sent = written.load(Ordering::Relaxed);
    assert!(sent < MAX_EVENT + (1 << 20), "peer wrote {sent} bytes");
}

#[tokio::test]
async fn a_silent_event_stream_ends_with_a_timeout_and_heartbeats_keep_it() {
    let client = Client::new(
        Arc::new(Fake(|mut s: DuplexStream| async move {
            if sse_head(&mut s).await.is_err() {
                return;
            }
            // Three heartbeats 100 ms apart (each within the idle deadline), an event
            // split across writes, then silence with the connection open.
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let hb = b"data: {\"id\":\"evt_2\",\"type\":\"server.heartbeat\",\"properties\":{}}\n\n";
                if s.write_all(hb).await.is_err() {
                    return;
                }
            }
            let ev = b": comment\ndata: {\"type\":\"session.idle\",\r\ndata: \"properties\":{\"sessionID\":\"ses_1\"}}\r\n\r\n";
            let (a, b) = ev.split_at(17);
            let _ = s.write_all(a).await;
            let _ = s.flush().await;
            let _ = s.write_all(b).await;
            let mut sink = [0u8; 64];
            let _ = s.read(&mut sink).await; // hold the connection until the client goes
        })),
        "pw",
        "/work/a b",
    )
    .with_event_idle(Duration::from_millis(250));
    let mut events = client.events().await.expect("open");
    assert_eq!(
        events.next().await.expect("item").expect("event"),
        Event::Connected
    );
    assert_eq!(
        events.next().await.expect("item").expect("event"),
        Event::SessionIdle {
            session: "ses_1".into()
        }
    );
    let start = Instant::now();
    match events.next().await {
        Some(Err(Error::Timeout(_))) => {}
        other => panic!("expected a Timeout, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(events.next().await.is_none());
}
