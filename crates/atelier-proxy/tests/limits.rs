//! What a stranger can hold open: slow-header and silent connections are closed
//! within the header-read timeout, the connection cap holds, and a real request
//! still gets through while the cap is reached (its own test binary: it counts
//! sockets and time).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use atelier_proxy::{ConnLimits, serve};
use axum::Router;
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const CAP: usize = 8;
/// Scheduling slack on a loaded 2-core host; nothing is timed more tightly.
const SLACK: Duration = Duration::from_secs(3);

async fn start(limits: ConnLimits) -> SocketAddr {
    let app = Router::new().route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, None, app, limits, std::future::pending()));
    addr
}

/// Waits for the server to close `tcp`; how long that took from `since`.
async fn closed_after(mut tcp: TcpStream, since: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(HEADER_TIMEOUT + SLACK * 4, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            // hyper may answer 408 before closing.
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection was never closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_and_the_api_answers_at_the_cap() {
    let addr = start(ConnLimits {
        header_read_timeout: HEADER_TIMEOUT,
        max_connections: CAP,
        ..ConnLimits::default()
    })
    .await;
    let t0 = Instant::now();
    // Fill the cap: half trickle a request head byte by byte, half send nothing.
    let mut slow = Vec::new();
    for i in 0..CAP {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        slow.push(tcp);
    }
    let trickle: Vec<_> = slow
        .into_iter()
        .map(|mut tcp| {
            tokio::spawn(async move {
                // Keeps sending header bytes, never finishing the head.
                let (mut rd, mut wr) = tcp.split();
                let writer = async {
                    for _ in 0..100 {
                        if wr.write_all(b"X-Slow: 1\r\n").await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                };
                let mut buf = [0u8; 1024];
                let reader = async {
                    loop {
                        match rd.read(&mut buf).await {
                            Ok(0) | Err(_) => return t0.elapsed(),
                            Ok(_) => continue,
                        }
                    }
                };
                tokio::select! {
                    () = writer => panic!("a slow connection outlived 20 s"),
                    d = reader => d,
                }
            })
        })
        .collect();
    // With the cap reached, a well-behaved client still gets its answer: the slow
    // connections are dropped by their deadline and free their slots.
    let asked = Instant::now();
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(HEADER_TIMEOUT + SLACK * 4)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let waited = asked.elapsed();
    assert!(
        waited < HEADER_TIMEOUT + SLACK,
        "the API answered after {waited:?}"
    );
    for t in trickle {
        let d = t.await.unwrap();
        assert!(
            d < HEADER_TIMEOUT + SLACK,
            "a slow-header connection lived {d:?}"
        );
    }
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_when_idle() {
    let addr = start(ConnLimits {
        header_read_timeout: HEADER_TIMEOUT,
        ..ConnLimits::default()
    })
    .await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let d = closed_after(tcp, Instant::now()).await;
    assert!(d < HEADER_TIMEOUT + SLACK, "idle for {d:?}");
}

#[tokio::test]
async fn a_connection_moving_no_bytes_is_dropped_after_the_idle_timeout() {
    // A request whose body never comes: past the head timer, only the idle
    // watchdog ends it.
    let app = Router::new().route(
        "/upload",
        axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = ConnLimits {
        idle_timeout: Duration::from_secs(1),
        ..ConnLimits::default()
    };
    tokio::spawn(serve(listener, None, app, limits, std::future::pending()));
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let d = closed_after(tcp, Instant::now()).await;
    // Asked to close after one idle period, dropped after a second.
    assert!(d < Duration::from_secs(2) + SLACK, "lived {d:?}");
}

/// A TCP connection to `addr` from source address `from` (127.0.0.2 and 127.0.0.1 are
/// distinct client addresses on loopback).
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_cannot_take_every_connection() {
    const PER_IP: usize = 3;
    // Long header timeout: idle connections would hold their slots for the whole
    // test without the per-address cap.
    let addr = start(ConnLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: CAP,
        max_connections_per_ip: PER_IP,
        ..ConnLimits::default()
    })
    .await;
    // One address opens twice the whole cap of idle connections.
    let mut idle = Vec::new();
    for _ in 0..CAP * 2 {
        idle.push(connect_from("127.0.0.2", addr).await);
    }
    // Those beyond its share are closed at once; its share stays open.
    let t0 = Instant::now();
    let mut open = 0;
    let mut closed = 0;
    for mut tcp in idle {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(SLACK, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => panic!("an idle connection got an answer"),
            Err(_) => {
                open += 1;
                // Keep it open until the end of the test.
                std::mem::forget(tcp);
            }
        }
    }
    assert_eq!(
        (open, closed),
        (PER_IP, CAP * 2 - PER_IP),
        "after {:?}",
        t0.elapsed()
    );
    // Another address is served at once.
    let t1 = Instant::now();
    let mut tcp = connect_from("127.0.0.1", addr).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(SLACK, tcp.read_to_string(&mut reply))
        .await
        .expect("the other address is answered within the slack")
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    println!(
        "127.0.0.2 kept {open} of {} connections; 127.0.0.1 answered in {:?}",
        CAP * 2,
        t1.elapsed()
    );
}
