//! `GET /api/v1/events`: the event bus as Server-Sent Events.

use std::convert::Infallible;
use std::time::Duration;

use atelier_core::event::{Event, LAGGED, RESYNC};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use utoipa::IntoParams;

use super::sandboxes::ApiQuery;
use super::{ApiResult, AppState};
use crate::Error;
use crate::events::Delivery;

/// Every event type name, for `?types=` validation.
pub const EVENT_TYPES: [&str; 10] = [
    "sandbox.created",
    "sandbox.state",
    "sandbox.deleted",
    "prebuild.status",
    "prebuild.log",
    "dev.state",
    "workspace.changed",
    "sandbox.agent",
    "task.changed",
    "attention.changed",
];

/// Seconds between heartbeats (SSE comment lines) on an idle stream.
pub const HEARTBEAT_SECS: u64 = 15;

/// Filters and the resume point of an event stream.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Comma-separated event types or type prefixes (`sandbox`, `prebuild.log`);
    /// all when absent.
    #[param(example = "sandbox,dev.state")]
    pub types: Option<String>,
    /// Only events about this sandbox id (sandbox and dev events).
    pub sandbox: Option<String>,
    /// Only events about this task id (task and attention events).
    pub task: Option<String>,
    /// Resume after this event id (what `Last-Event-ID` does; the header wins).
    pub last_event_id: Option<u64>,
}

/// Live events: sandbox, prebuild, dev-command, workspace, task and attention changes, as
/// Server-Sent Events. Each `event:` line names the type and each `data:` line is
/// one JSON [`Event`]; `id:` lines carry the event id, so a reconnecting client's
/// `Last-Event-ID` resumes exactly after what it saw. When the resume point is no
/// longer kept, the first event is `resync` (re-read your state); a client that
/// reads too slowly gets `lagged` with `{"missed": N}`. A comment line is sent
/// every 15 s of silence.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, content_type = "text/event-stream", body = Event,
         description = "A stream of events (one JSON Event per `data:` line)"),
        (status = 400, body = super::ApiErrorBody, description = "Unknown event type or bad resume id"),
        (status = 401, body = super::ApiErrorBody, description = "Missing or invalid token")))]
pub async fn events(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let after = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| Error::invalid("Last-Event-ID must be an event id (a number)"))?,
        ),
        None => q.last_event_id,
    };
    let types: Option<Vec<String>> = match q.types.as_deref() {
        None | Some("") => None,
        Some(list) => Some(
            list.split(',')
                .map(|t| t.trim().to_owned())
                .map(|t| {
                    let known = EVENT_TYPES
                        .iter()
                        .any(|k| *k == t || k.split('.').next() == Some(t.as_str()));
                    if known {
                        Ok(t)
                    } else {
                        Err(Error::invalid(format!(
                            "unknown event type {t:?}; known: {}",
                            EVENT_TYPES.join(", ")
                        )))
                    }
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let sandbox = q.sandbox;
    let task = q.task;
    let wanted = move |e: &Event| {
        let name = e.kind.name();
        let type_ok = types.as_ref().is_none_or(|ts| {
            ts.iter()
                .any(|t| name == t || name.split('.').next() == Some(t.as_str()))
        });
        let sandbox_ok = sandbox
            .as_deref()
            .is_none_or(|s| e.kind.sandbox() == Some(s));
        let task_ok = task.as_deref().is_none_or(|t| e.kind.task() == Some(t));
        type_ok && sandbox_ok && task_ok
    };
    let stream = st.mgr.events().subscribe(after).filter_map(move |d| {
        let out = match d {
            Delivery::Event(e) if !wanted(&e) => None,
            Delivery::Event(e) => SseEvent::default()
                .id(e.id.to_string())
                .event(e.kind.name())
                .json_data(&*e)
                .ok(),
            Delivery::Resync => Some(SseEvent::default().event(RESYNC).data("{}")),
            Delivery::Lagged(n) => Some(
                SseEvent::default()
                    .event(LAGGED)
                    .data(format!("{{\"missed\":{n}}}")),
            ),
        };
        std::future::ready(out.map(Ok))
    });
    Ok(Sse::new(stream).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(HEARTBEAT_SECS))
            .text("heartbeat"),
    ))
}
