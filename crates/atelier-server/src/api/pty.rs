//! `GET /api/v1/sandboxes/{id}/pty`: an interactive terminal over a WebSocket.
//!
//! The client's first message is a text frame `{"type":"start", ...}` (command, env,
//! cwd, rows, cols, term) — env travels in the body, never in the URL, so secrets
//! stay out of access logs. Then binary frames carry terminal bytes both ways; text
//! frames carry control: client `{"type":"resize","rows","cols"}` and
//! `{"type":"signal","signal"}`, server `{"type":"started","pid"}` and
//! `{"type":"exit","code","signal"}` (or `{"type":"error","message"}`) before closing.

use std::collections::BTreeMap;
use std::time::Duration;

use atelier_agent_proto::{PtyEvent, PtyRequest};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::{ApiResult, AppState};
use crate::manager::Manager;

/// Control messages from the client.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PtyClientMessage {
    /// Must come first: what to run and the terminal size.
    Start {
        /// Program and arguments; empty runs the login shell.
        #[serde(default)]
        command: Vec<String>,
        /// Extra environment.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Working directory.
        #[serde(default)]
        cwd: Option<String>,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
        /// TERM (default xterm-256color).
        #[serde(default)]
        term: Option<String>,
    },
    /// The window changed size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Send a signal to the program's process group.
    Signal {
        /// Signal number.
        signal: i32,
    },
}

/// Control messages from the server.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PtyServerMessage {
    /// The program runs.
    Started {
        /// Guest pid.
        pid: u32,
    },
    /// The program ended.
    Exit {
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
    },
    /// The session could not start or broke.
    Error {
        /// What happened.
        message: String,
    },
}

fn text(m: &PtyServerMessage) -> Message {
    Message::Text(serde_json::to_string(m).unwrap_or_default().into())
}

/// Upgrades to the terminal WebSocket (the sandbox must be running).
pub async fn pty(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let (_rec, agent) = st.mgr.agent(&id).await?;
    Ok(ws
        .max_message_size(1 << 20)
        .on_upgrade(move |socket| session(socket, agent)))
}

async fn session(mut ws: WebSocket, agent: atelier_agent_proto::AgentClient) {
    let start = tokio::time::timeout(Duration::from_secs(30), ws.recv()).await;
    let req = match start {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<PtyClientMessage>(&t) {
            Ok(PtyClientMessage::Start {
                command,
                env,
                cwd,
                rows,
                cols,
                term,
            }) => {
                let mut r = PtyRequest::new(command, rows.max(1), cols.max(1));
                for (k, v) in env {
                    r = r.env(k, v);
                }
                if let Some(c) = cwd {
                    r = r.cwd(c);
                }
                if let Some(t) = term {
                    r = r.term(t);
                }
                r
            }
            _ => {
                let _ = ws
                    .send(text(&PtyServerMessage::Error {
                        message: "the first message must be {\"type\":\"start\",...}".into(),
                    }))
                    .await;
                return;
            }
        },
        _ => return,
    };
    let pty = match agent.pty(req).await {
        Ok(p) => p,
        Err(e) => {
            let _ = ws
                .send(text(&PtyServerMessage::Error {
                    message: Manager::agent_error(e).message,
                }))
                .await;
            return;
        }
    };
    let (mut reader, writer) = pty.split();
    loop {
        tokio::select! {
            ev = reader.next_event() => match ev {
                Some(Ok(PtyEvent::Started { pid })) => {
                    if ws.send(text(&PtyServerMessage::Started { pid })).await.is_err() { return; }
                }
                Some(Ok(PtyEvent::Output(bytes))) => {
                    if ws.send(Message::Binary(bytes.into())).await.is_err() { return; }
                }
                Some(Ok(PtyEvent::Exit { code, signal })) => {
                    let _ = ws.send(text(&PtyServerMessage::Exit { code, signal })).await;
                    let _ = ws.send(Message::Close(None)).await;
                    return;
                }
                Some(Err(e)) => {
                    let _ = ws.send(text(&PtyServerMessage::Error { message: e.to_string() })).await;
                    return;
                }
                None => return,
            },
            msg = ws.recv() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if writer.send(&b).await.is_err() { return; }
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<PtyClientMessage>(&t) {
                    Ok(PtyClientMessage::Resize { rows, cols }) => { let _ = writer.resize(rows.max(1), cols.max(1)); }
                    Ok(PtyClientMessage::Signal { signal }) => { let _ = writer.kill(signal); }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
