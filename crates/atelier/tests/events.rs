//! `GET /api/v1/events` and `atelier events` against a real manager with a real VM:
//! the life of a sandbox arrives in order, a reconnecting client gets exactly what
//! it missed, a stale resume point gets `resync`, and a client that never reads
//! does not hold the manager up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::Server;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use serde_json::Value;

type Sse = std::pin::Pin<
    Box<
        dyn Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

async fn connect(srv: &Server, query: &str, last: Option<&str>) -> Sse {
    let mut rb = srv.api(reqwest::Method::GET, &format!("/api/v1/events{query}"));
    if let Some(l) = last {
        rb = rb.header("Last-Event-ID", l);
    }
    let resp = rb.send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    Box::pin(resp.bytes_stream().eventsource())
}

/// The next event (type, id, JSON), within a deadline.
async fn next(s: &mut Sse, what: &str) -> (String, String, Value) {
    let ev = tokio::time::timeout(Duration::from_secs(240), s.next())
        .await
        .unwrap_or_else(|_| panic!("no event while waiting for {what}"))
        .unwrap_or_else(|| panic!("stream ended while waiting for {what}"))
        .unwrap();
    let data = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
    (ev.event, ev.id, data)
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_life_as_events_with_resume_and_slow_clients() {
    let srv = Server::start();

    // Bad requests are refused before any streaming starts.
    let r = reqwest::Client::new()
        .get(format!("{}/api/v1/events", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = srv
        .api(
            reqwest::Method::GET,
            "/api/v1/events?types=sandbox,nonsense",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("nonsense"));

    // A client that connects and never reads a byte.
    let host = srv.url.trim_start_matches("http://").to_owned();
    let mut idle = std::net::TcpStream::connect(&host).unwrap();
    write!(
        idle,
        "GET /api/v1/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\r\n",
        srv.token
    )
    .unwrap();

    let mut all = connect(&srv, "", None).await;
    let mut only_sandboxes = connect(&srv, "?types=sandbox.state", None).await;

    let created: Value =
        serde_json::from_str(&srv.ok(&["--json", "sandbox", "create", "--name", "ev"])).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    srv.ok(&["sandbox", "stop", "ev"]);
    srv.ok(&["sandbox", "rm", "ev"]);

    // In order: created, creating→running, running→stopping→stopped, →deleting, deleted.
    let expected = [
        ("sandbox.created", None),
        ("sandbox.state", Some("running")),
        ("sandbox.state", Some("stopping")),
        ("sandbox.state", Some("stopped")),
        ("sandbox.state", Some("deleting")),
        ("sandbox.deleted", None),
    ];
    let mut seen = Vec::new();
    for (ty, to) in expected {
        let (t, eid, data) = next(&mut all, ty).await;
        assert_eq!(t, ty, "{data}");
        assert_eq!(data["type"], ty);
        assert_eq!(data["sandbox"], id.as_str());
        assert_eq!(data["name"], "ev");
        assert_eq!(data["id"].as_u64().unwrap().to_string(), eid);
        if let Some(to) = to {
            assert_eq!(data["to"], to, "{data}");
        }
        seen.push(eid.parse::<u64>().unwrap());
    }
    assert!(
        seen.windows(2).all(|w| w[1] > w[0]),
        "ids must grow: {seen:?}"
    );

    // The filtered stream has only the four state changes.
    for to in ["running", "stopping", "stopped", "deleting"] {
        let (t, _, data) = next(&mut only_sandboxes, to).await;
        assert_eq!(t, "sandbox.state");
        assert_eq!(data["to"], to);
    }

    // Resuming after the `running` event yields exactly the four after it.
    let mut resumed = connect(&srv, "", Some(&seen[1].to_string())).await;
    for want in &seen[2..] {
        let (_, eid, _) = next(&mut resumed, "a replayed event").await;
        assert_eq!(eid.parse::<u64>().unwrap(), *want);
    }
    // ...and nothing more until something new happens: a new event comes next.
    srv.ok(&["sandbox", "create", "--name", "ev2", "--no-wait"]);
    let (t, eid, data) = next(&mut resumed, "the next live event").await;
    assert_eq!(t, "sandbox.created");
    assert_eq!(data["name"], "ev2");
    assert!(eid.parse::<u64>().unwrap() > seen[5]);

    // A resume point older than anything kept asks the client to resync.
    let mut stale = connect(&srv, "", Some("1")).await;
    let (t, eid, _) = next(&mut stale, "resync").await;
    assert_eq!(t, "resync");
    assert!(eid.is_empty(), "resync carries no id");

    // The CLI replays the same six sandbox events from just before the first, as
    // JSON lines (started afterwards: a follower started earlier may connect after
    // the first event, so the test would race).
    let since = (seen[0] - 1).to_string();
    let cli = srv
        .cli()
        .args([
            "--json", "events", "--types", "sandbox", "--since", &since, "--count", "6",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = lines.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        expected.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        "{lines:?}"
    );
    assert_eq!(
        lines
            .iter()
            .map(|v| v["id"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        seen
    );

    // The idle client held nothing up: all of the above completed while it was
    // connected, and the manager still answers.
    drop(idle);
    srv.ok(&["sandbox", "rm", "ev2"]);
}
