//! The manager's listeners with `atelier serve`'s flags: one client address cannot
//! take every connection (`--max-connections-per-ip`), so the API still answers
//! another address while it holds its share open.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `addr` from source address `from` (127.0.0.2 and 127.0.0.1 are
/// distinct client addresses on loopback).
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_address_cannot_take_every_api_connection() {
    let srv = Server::start_with(&[
        ("ATELIER_MAX_CONNECTIONS", "8"),
        ("ATELIER_MAX_CONNECTIONS_PER_IP", "3"),
    ]);
    let addr: SocketAddr = srv.url.trim_start_matches("http://").parse().unwrap();
    // 127.0.0.2 opens twice the cap of idle connections (the header timeout is 30 s,
    // so without a per-address cap they would hold every slot that long).
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(connect_from("127.0.0.2", addr).await);
    }
    // 127.0.0.1 is answered at once.
    let t0 = Instant::now();
    let mut tcp = connect_from("127.0.0.1", addr).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut reply))
        .await
        .expect("the API answers another address while one holds its share")
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    println!("API answered 127.0.0.1 in {:?}", t0.elapsed());
    // Of 127.0.0.2's connections, those beyond its 3 were closed.
    let mut closed = 0;
    for mut c in idle {
        let mut buf = [0u8; 16];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 13, "connections of 127.0.0.2 closed by the cap");
    // The CLI still works.
    srv.ok(&["status"]);
}
