//! TCP streams through the real agent binary (`serve --connect-unix`), run in a
//! network namespace of its own: no network card, only loopback, as in a sandbox
//! with `--no-network`. The guest services are python3 servers started with exec.

use std::time::Duration;

use atelier_agent_proto::{CAP_TCP_STREAM, ExecRequest, PROTOCOL_VERSION, ProtoError};

mod common;
use common::streams::{self, Service};
use common::{Harness, Options};

const DEADLINE: Duration = Duration::from_secs(60);

/// An agent in its own network namespace with loopback up (as the guest's init does).
async fn isolated_agent() -> Harness {
    let h = Harness::start_with(Options {
        netns: true,
        ..Options::default()
    })
    .await;
    let out = h
        .client
        .exec(ExecRequest::new(["ip", "link", "set", "lo", "up"]))
        .await
        .expect("exec")
        .wait()
        .await
        .expect("ip");
    assert!(out.success(), "{}", String::from_utf8_lossy(&out.stderr));
    h
}

#[tokio::test]
async fn agent_announces_stream_capability() {
    let h = Harness::start().await;
    assert_eq!(h.client.hello().expect("hello").version, PROTOCOL_VERSION);
    assert!(
        h.client.supports(CAP_TCP_STREAM),
        "{:?}",
        h.client.capabilities()
    );
}

#[tokio::test]
async fn stream_carries_64_mib_both_ways_without_a_network() {
    let h = isolated_agent().await;
    let open = streams::opener(&h.client, DEADLINE);
    let r = streams::echo_roundtrip(&h.client, 64 << 20, DEADLINE, open).await;
    eprintln!(
        "64 MiB echoed in {:?} ({:.1} MiB/s each way), peak buffered {} bytes",
        r.elapsed,
        64.0 / r.elapsed.as_secs_f64(),
        r.peak_buffered
    );
}

#[tokio::test]
async fn flooding_service_is_held_to_the_credit_window() {
    let h = isolated_agent().await;
    let open = streams::opener(&h.client, DEADLINE);
    let peak = streams::flood_stays_within_window(&h.client, 16 << 20, DEADLINE, open).await;
    eprintln!("peak buffered while flooded: {peak} bytes");
}

#[tokio::test]
async fn refused_port_is_a_typed_error_and_the_agent_goes_on() {
    let h = isolated_agent().await;
    // Nothing listens in a fresh namespace.
    let err = streams::refused(&h.client, 9, DEADLINE).await;
    match &err {
        ProtoError::ConnectionRefused { addr, message } => {
            assert_eq!(addr.port(), 9);
            assert!(message.contains("127.0.0.1:9"), "{message}");
        }
        other => panic!("expected ConnectionRefused, got {other:?}"),
    }
    // Other addresses: an unroutable one fails (no network), with a clear error.
    let err = h
        .client
        .open_stream_to("10.255.255.1:80".parse().expect("addr"), DEADLINE)
        .await
        .expect_err("no route");
    assert!(
        matches!(err, ProtoError::Agent { .. } | ProtoError::Timeout { .. }),
        "{err:?}"
    );
    h.client.ping(DEADLINE).await.expect("ping");
}

#[tokio::test]
async fn many_streams_at_once_and_drop_closes_the_guest_socket() {
    let h = isolated_agent().await;
    // Several echo services, all streams in flight together.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            let open = streams::opener(&client, DEADLINE);
            streams::echo_roundtrip(&client, 4 << 20, DEADLINE, open).await
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    // Dropping a stream while the service still waits for input: it sees the close.
    let svc = Service::start(&h.client, streams::ECHO, DEADLINE).await;
    let stream = h
        .client
        .open_stream(svc.port, DEADLINE)
        .await
        .expect("open");
    drop(stream);
    assert_eq!(svc.exit(DEADLINE).await, Some(0));
}
