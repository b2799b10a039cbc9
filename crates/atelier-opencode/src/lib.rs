//! A typed client of OpenCode's HTTP server (`opencode serve`), checked against
//! OpenCode 1.18.33 (npm `opencode-ai`, its OpenAPI document at `GET /doc` and the real
//! binary driven by a scripted model).
//!
//! The manager is OpenCode's only client. OpenCode runs inside a sandbox VM and its
//! port is reached through a byte stream the guest agent opens, so the transport is a
//! [`Connector`] handing out any `AsyncRead + AsyncWrite` stream ([`Io`]); [`Client::tcp`]
//! dials TCP. Every call opens a fresh stream, speaks one HTTP/1.1 exchange (hyper) and
//! finishes under a deadline ([`Client::with_timeout`], default 30 s) or fails with
//! [`Error::Timeout`].
//!
//! What it covers: health, sessions (create with a permission ruleset, prompt
//! asynchronously, abort, statuses, todos, messages with cost and tokens), permission
//! requests and questions (list, reply, reject), provider API keys, and the event
//! stream ([`Client::events`], `GET /event`) as typed [`Event`]s.
//!
//! Authentication is HTTP basic with user `opencode` and `OPENCODE_SERVER_PASSWORD`.
//! The project directory goes in the `x-opencode-directory` header, percent-encoded
//! (OpenCode decodes it once; a `directory` query parameter is its alternative).
//!
//! The event stream: OpenCode sends `server.connected` first and `server.heartbeat`
//! about every 10 s. The heartbeat is consumed here as the keepalive; a stream silent
//! for longer than its idle deadline ([`Client::with_event_idle`], default 30 s) ends
//! with [`Error::Timeout`]. A line or event over [`MAX_EVENT`] (1 MiB) ends it with
//! [`Error::Stream`] instead of growing memory. Events are not replayed across
//! streams: after reconnecting, re-read permissions, questions and statuses.
//!
//! Deviations from the interface first agreed: [`Todo::id`] is always `None` (1.18 sends
//! no id); [`Part::Tool`] carries `call_id`, `title`, `input` and `output`; a broken
//! byte stream mid-call is [`Error::Stream`]; `server.heartbeat` is not an [`Event`].
//!
//! This crate must not depend on the manager (`atelier-server`) or any VM crate.

mod client;
mod error;
mod event;
pub mod sse;
mod types;

pub use client::{
    Client, Connector, DEFAULT_EVENT_IDLE, DEFAULT_TIMEOUT, DIRECTORY_HEADER, EventStream, Io,
    MAX_BODY, MAX_ERROR_BODY, MAX_EVENT, TcpConnector, USER,
};
pub use error::Error;
pub use event::{Event, HEARTBEAT};
pub use types::{
    Action, Health, Message, ModelRef, Part, PermissionRequest, PermissionRule, Prompt, Question,
    QuestionOption, QuestionRequest, Reply, SessionInfo, SessionStatus, Todo, Tokens, ToolRef,
};
