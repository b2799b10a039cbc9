//! `atelier events`: follows `GET /api/v1/events`, reconnecting with
//! `Last-Event-ID` when the connection drops, so nothing is missed or repeated.

use std::time::Duration;

use atelier_core::event::{Event, EventKind, LAGGED, RESYNC};
use clap::Args;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::Method;

use crate::Global;
use crate::client::Client;

/// `atelier events`
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only these event types or prefixes, comma-separated (e.g. `sandbox,dev.state`).
    #[arg(long)]
    types: Option<String>,
    /// Only events about this sandbox id.
    #[arg(long)]
    sandbox: Option<String>,
    /// Replay the kept events after this id first.
    #[arg(long)]
    since: Option<u64>,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
}

/// Follows the event stream until interrupted (or `--count` events).
pub async fn run(g: &Global, args: EventsArgs) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    let mut query = Vec::new();
    if let Some(t) = &args.types {
        query.push(("types", t.clone()));
    }
    if let Some(s) = &args.sandbox {
        query.push(("sandbox", s.clone()));
    }
    let mut last = args.since;
    let mut seen = 0u64;
    let mut failures = 0u32;
    let mut connected_once = false;
    loop {
        let mut rb = c.request(Method::GET, "/api/v1/events").query(&query);
        if let Some(id) = last {
            rb = rb.header("Last-Event-ID", id.to_string());
        }
        // The first connection's errors are the user's (bad filter, no manager);
        // later ones are a dropped connection we retry.
        let resp = match c.send(rb).await {
            Ok(r) => r,
            Err(e) if !connected_once => return Err(e),
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    return Err(e);
                }
                eprintln!("events: {e}; reconnecting");
                tokio::time::sleep(Duration::from_secs(u64::from(failures.min(5)))).await;
                continue;
            }
        };
        failures = 0;
        connected_once = true;
        let mut stream = resp.bytes_stream().eventsource();
        while let Some(item) = stream.next().await {
            let ev = match item {
                Ok(ev) => ev,
                Err(e) => {
                    eprintln!("events: stream interrupted ({e}); reconnecting");
                    break;
                }
            };
            match ev.event.as_str() {
                RESYNC => {
                    eprintln!(
                        "events: some events after {} are no longer kept; re-read what you need",
                        last.map_or("the start".to_owned(), |l| l.to_string())
                    );
                    if g.json {
                        println!("{{\"type\":\"resync\"}}");
                    }
                    continue;
                }
                LAGGED => {
                    eprintln!("events: too slow; the manager dropped {} events", ev.data);
                    if g.json {
                        println!("{{\"type\":\"lagged\",\"detail\":{}}}", ev.data);
                    }
                    continue;
                }
                _ => {}
            }
            let parsed: Event = match serde_json::from_str(&ev.data) {
                Ok(p) => p,
                // A newer manager's event type: show it raw rather than stop.
                Err(_) if g.json => {
                    println!("{}", ev.data);
                    continue;
                }
                Err(_) => {
                    println!("{} {}", ev.event, ev.data);
                    continue;
                }
            };
            last = Some(parsed.id);
            if g.json {
                println!("{}", ev.data);
            } else {
                println!("{}", human(&parsed));
            }
            seen += 1;
            if args.count.is_some_and(|n| seen >= n) {
                return Ok(0);
            }
        }
        // The stream ended (the manager restarted?): resume after the last event.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One line per event: time, type, what changed.
fn human(e: &Event) -> String {
    let ms_of_day = e.at_ms.rem_euclid(86_400_000);
    let t = format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    );
    let what = match &e.kind {
        EventKind::SandboxCreated { name, image, .. } => format!("{name} created ({image})"),
        EventKind::SandboxState {
            name,
            from,
            to,
            reason,
            error,
            ..
        } => match error {
            Some(err) => format!("{name} {from} -> {to} ({reason}): {err}"),
            None => format!("{name} {from} -> {to} ({reason})"),
        },
        EventKind::SandboxDeleted { name, .. } => format!("{name} deleted"),
        EventKind::PrebuildStatus {
            prebuild,
            workspace,
            status,
            error,
        } => match error {
            Some(err) => format!("{workspace} {prebuild} {status}: {err}"),
            None => format!("{workspace} {prebuild} {status}"),
        },
        EventKind::PrebuildLog { prebuild, line } => format!("{prebuild} | {line}"),
        EventKind::DevState {
            sandbox,
            name,
            up,
            url,
        } => format!(
            "{name} in {sandbox} {} {url}",
            if *up { "up" } else { "down" }
        ),
        EventKind::SandboxAgent {
            name,
            agent,
            reason,
            ..
        } => match reason {
            Some(r) => format!("{name} agent {agent}: {r}"),
            None => format!("{name} agent {agent}"),
        },
        EventKind::WorkspaceChanged { workspace, deleted } => {
            format!(
                "{workspace} {}",
                if *deleted { "deleted" } else { "changed" }
            )
        }
        EventKind::TaskChanged {
            task,
            title,
            state,
            from,
            todos_done,
            todos_total,
            error,
            ..
        } => {
            let head = match from {
                None => format!("{task} created ({state}): {title}"),
                Some(f) if f != state => format!("{task} {f} -> {state}: {title}"),
                Some(_) => format!("{task} {state} todos {todos_done}/{todos_total}"),
            };
            match error {
                Some(err) => format!("{head} ({err})"),
                None => head,
            }
        }
        EventKind::AttentionChanged {
            item,
            task,
            kind,
            status,
            title,
        } => format!(
            "{item} of {task} {} {}: {title}",
            kind.as_str(),
            status.as_str()
        ),
    };
    format!("{t} {:<17} {what}", e.kind.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_core::task::{AttentionKind, AttentionStatus};

    #[test]
    fn a_budget_item_reads_as_one() {
        let e = Event {
            id: 1,
            at_ms: 3_600_000 + 61_000,
            kind: EventKind::AttentionChanged {
                item: "at-1".into(),
                task: "tk-1".into(),
                kind: AttentionKind::Budget,
                status: AttentionStatus::Pending,
                title: "budget reached: 120 of the task's 100 tokens; continue?".into(),
            },
        };
        let line = human(&e);
        assert!(
            line.starts_with("01:01:01.000Z attention.changed"),
            "{line}"
        );
        assert!(
            line.contains("at-1 of tk-1 budget pending: budget reached"),
            "{line}"
        );
        let v = serde_json::to_value(&e).unwrap_or_default();
        assert_eq!(v["kind"], "budget");
    }
}
